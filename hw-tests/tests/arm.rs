//! The aarch64 build of edge-agent (a Raspberry Pi 3/4/5 with a 64-bit OS),
//! cross-built here with Debian's rustc-web (`scripts/cross-cargo.sh`, into
//! `target/cross`, in the `cross-test` profile: the quickest cold build) and
//! run under qemu-user (`qemu-aarch64-static -L /`), against an x86_64 hub on
//! this machine. Needs root and the cross packages (`scripts/test.sh` installs
//! them, through `cross_deps arm64` in scripts/deps.sh); fails, never skips,
//! when one is missing. The cross build takes about 5 minutes cold on 2 cores.
//!
//! The aarch64 libraries come from Debian's multiarch packages (`libc6:arm64`,
//! `libseccomp2:arm64`), as on the Pi: `-L /` makes qemu-user load the
//! program's interpreter, `/lib/ld-linux-aarch64.so.1`, and through it every
//! library from there. Not from the cross sysroot `/usr/aarch64-linux-gnu`
//! (`-L /usr/aarch64-linux-gnu`): it holds `libc6-arm64-cross` 2.36-8cross1's
//! ld.so and libc, but that ld.so looks for libc.so.6 in /lib/aarch64-linux-gnu,
//! which the sysroot lacks, so qemu-user falls back to the host's, where it
//! finds `libc6:arm64`'s (2.36-9+deb12u14, once `libseccomp-dev:arm64` or the
//! Rust std for arm64 is installed): an ld.so and a libc of two glibc builds,
//! which share private data. With that mix every aarch64
//! program, C or Rust, spins forever in its first pthread_create (glibc's
//! get_cached_stack walks a stack list the other build laid out), under
//! qemu-user 7.2 (Debian 12's) and 10.0 (bookworm-backports) alike: the hang
//! that had this test ignored, blamed on qemu. `qemu_runs_threads` says so
//! if it comes back.
//!
//! Covered, by the aarch64 code itself: the CLI and configuration; the store
//! (sled, its flushes); importing an OCI layout; enrolling with a one-time
//! token over HTTPS (the device's key and CSR: ring, rcgen; rustls); MQTT over
//! TLS with the device's certificate; checking the desired state's signatures
//! against the trust root (Ed25519), storing it and recording `applied`;
//! reports and events reaching the hub (online, the stored generation, the
//! `applied` event) and the hub's ack emptying the device's outbox; planning the desired workload and asking the registry
//! it names for its image.
//!
//! Not covered: containers. qemu-user translates one process's instructions;
//! the shim the agent starts is its own binary executed again, which the
//! kernel runs only with a binfmt_misc handler for aarch64, and libcontainer
//! would then create namespaces, mounts and cgroups that qemu-user does not
//! emulate (clone with namespace flags is refused). So the desired workload
//! names an image the device does not have and cannot pull (a closed port on
//! loopback): no shim is started, and the test checks that the device stores
//! the state, acknowledges its generation, records and sends `applied` (and
//! drops it once acknowledged) and tries to pull the image. The workload itself is not in the device's
//! reports (the agent reports the workloads it created), nor are pulls,
//! image unpacking, workload states, health or restarts. Containers, limits and seccomp on arm are covered by
//! running the whole hw-tests on a real Pi (README.md, "Running hw-tests on
//! real hardware"). Not covered either: armv7 (`scripts/release.sh` builds
//! it, nothing runs it here), the agent's self-update, and speed.
//!
//! Compiled on x86_64 hosts only: on an arm machine the whole of hw-tests
//! already runs the native agent, containers included, which this emulates less.
#![cfg(target_arch = "x86_64")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::{require_root, Agent};
use testkit::hub::{free_port, Hub};

/// Everything is emulated on the device's side: generous.
const WAIT: Duration = Duration::from_secs(90);
const DEVICE: &str = "pi-aarch64";
const TRIPLE: &str = "aarch64-unknown-linux-gnu";
const QEMU: &str = "qemu-aarch64-static";
/// Where qemu-user finds the program's interpreter and libraries: the
/// host's own root, whose arm64 multiarch packages are Debian 12's for a Pi.
const ROOT: &str = "/";
/// The aarch64 interpreter and the libraries the agent links, and their packages.
const LIBRARIES: [(&str, &str); 3] = [
    ("/lib/ld-linux-aarch64.so.1", "libc6:arm64"),
    ("/lib/aarch64-linux-gnu/libc.so.6", "libc6:arm64"),
    ("/lib/aarch64-linux-gnu/libseccomp.so.2", "libseccomp2:arm64"),
];
/// The cargo profile of the cross build (Cargo.toml): no debug info, quickest cold.
const PROFILE: &str = "cross-test";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// The aarch64 edge-agent, cross-built once per test process (cargo keeps
/// it in the cross target dir, so only the first run builds), in the
/// `cross-test` profile: a dev build without debug info, about 5 minutes cold
/// on 2 cores instead of 8 (dev) or more (release's LTO); the test needs no speed.
fn aarch64_agent() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        require_root();
        let started = Instant::now();
        eprintln!("arm: cross-building edge-agent for {TRIPLE} (about 5 minutes the first time, on 2 cores)");
        let out = Command::new(workspace().join("scripts/cross-cargo.sh"))
            .args([TRIPLE, "build", "--quiet", "--locked", "--profile", PROFILE])
            .args(["-p", "edge-agent", "--bin", "edge-agent"])
            .current_dir(workspace())
            .output()
            .unwrap_or_else(|e| panic!("cannot run scripts/cross-cargo.sh: {e}"));
        assert!(
            out.status.success(),
            "cross-building edge-agent for {TRIPLE} failed (as root, `source scripts/deps.sh; cross_deps arm64` \
             installs the cross packages):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("arm: built in {:.0?}", started.elapsed());
        let target = std::env::var_os("OUTPOST_CROSS_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target/cross"));
        target.join(TRIPLE).join(PROFILE).join("edge-agent")
    })
}

/// A script that runs the aarch64 agent under qemu-user with its arguments,
/// for `Agent::with_binary`: exec keeps the pid, so the daemon's pid is qemu's.
fn under_qemu() -> &'static Path {
    static WRAPPER: OnceLock<PathBuf> = OnceLock::new();
    WRAPPER.get_or_init(|| {
        let qemu = qemu();
        for (library, package) in LIBRARIES {
            assert!(
                Path::new(library).exists(),
                "{library} is missing: apt-get install {package} after dpkg --add-architecture arm64 \
                 (`cross_deps arm64` in scripts/deps.sh does, as root)"
            );
        }
        let binary = aarch64_agent();
        let header = std::fs::read(binary).expect("the aarch64 agent");
        // ELF, 64-bit, e_machine 183 (EM_AARCH64): not a host binary by mistake.
        assert!(
            header.starts_with(b"\x7fELF\x02") && header[18..20] == [183, 0],
            "{} is not an aarch64 ELF",
            binary.display()
        );
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("arm");
        std::fs::create_dir_all(&dir).unwrap();
        let wrapper = dir.join("edge-agent-aarch64");
        let script = format!("#!/bin/sh\nexec {} -L {ROOT} {} \"$@\"\n", qemu.display(), binary.display());
        std::fs::write(&wrapper, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        wrapper
    })
}

/// qemu-user, as found on PATH, its links resolved: what the daemon's
/// /proc/PID/exe names (bookworm-backports' qemu-aarch64-static is a link to
/// qemu-aarch64, itself static).
fn qemu() -> &'static Path {
    static QEMU_PATH: OnceLock<PathBuf> = OnceLock::new();
    QEMU_PATH.get_or_init(|| {
        let found = which(QEMU).unwrap_or_else(|| {
            panic!("{QEMU} is not installed: apt-get install qemu-user-static (`cross_deps arm64` in scripts/deps.sh does, as root)")
        });
        let qemu = std::fs::canonicalize(&found).unwrap_or_else(|e| panic!("{}: {e}", found.display()));
        let version = Command::new(&qemu).arg("-version").output().map(|o| o.stdout).unwrap_or_default();
        let version = String::from_utf8_lossy(&version);
        eprintln!("arm: {} ({})", found.display(), version.lines().next().unwrap_or("no version"));
        qemu
    })
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls the hub's view of the device until `check` holds.
fn hub_sees(hub: &Hub, agent: &Agent, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let device = hub.try_get(&format!("/v1/devices/{DEVICE}")).unwrap_or(Value::Null);
        if check(&device) {
            return device;
        }
        assert!(
            Instant::now() < deadline,
            "the hub never saw the aarch64 agent {what}: {device:#}\nhub log:\n{}\nagent log:\n{}",
            hub.log(),
            agent.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An aarch64 program whose ld.so and libc come from two glibc builds hangs
/// in its first pthread_create (the top of this file): the daemon (tokio,
/// sled) would never start. Said plainly rather than as a socket that never opens.
fn qemu_runs_threads(agent: &Agent) {
    // `events` with no daemon opens the store, whose first thread is sled's.
    let mut child = agent.command().arg("events").stdout(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{QEMU} -L {ROOT} hangs running a multithreaded aarch64 program here (`edge-agent events` \
                 opening its store never returned in 30 s), so the daemon cannot start. Seen when the \
                 program's ld.so and libc.so.6 come from two glibc builds (the cross sysroot's and \
                 libc6:arm64's): `{QEMU} -strace` shows which files it opens"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_aarch64_agent_under_qemu_enrolls_stores_its_desired_state_and_reports_it_to_an_x86_hub() {
    require_root();
    let (mqtts, enroll) = (loopback(), loopback());
    let hub = Hub::with_tls(mqtts, enroll);
    let token = hub.cli(&["enroll-token", DEVICE]);
    assert!(token.status.success(), "hub enroll-token: {}", String::from_utf8_lossy(&token.stderr));
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();

    let mut agent = Agent::with_binary(under_qemu());
    let started = Instant::now();
    let step = |what: &str| eprintln!("arm: {what} ({:.1?} under qemu)", started.elapsed());
    let version = agent.ok(&["--version"]);
    assert!(version.starts_with("edge-agent "), "edge-agent --version under qemu: {version}");

    // An OCI layout imported into the aarch64 agent's image store.
    testkit::import_busybox(&agent);
    assert!(agent.ok(&["images"]).contains("busybox"), "the imported image is not listed");
    step("imported an OCI layout");

    agent.use_config(&format!(
        "device-id = \"{DEVICE}\"\nhub = \"mqtts://{mqtts}\"\nreport-interval = \"200ms\"\nkeep-alive = \"5s\"\n"
    ));
    let hub_url = format!("https://{enroll}");
    let ca = hub.ca_cert();
    let enrolled = agent.exec(&["enroll", "--hub-url", &hub_url, "--token", &token, "--ca-cert", ca.to_str().unwrap()]);
    assert!(enrolled.status.success(), "edge-agent enroll under qemu: {}", String::from_utf8_lossy(&enrolled.stderr));
    step("enrolled over HTTPS");

    qemu_runs_threads(&agent);
    agent.start_daemon();
    // The daemon is qemu running the aarch64 binary, not a host build.
    let pid = agent.daemon_pid().expect("the daemon's pid");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    assert_eq!(exe, qemu(), "the daemon runs {}, not {QEMU}", exe.display());

    hub_sees(&hub, &agent, "online", |d| d["online"] == true);
    step("the daemon is online at the hub over MQTT/TLS");

    // Pinned, as signed deployments must be, to a registry that is not there:
    // the device cannot start it, which is fine here (see the top of the file).
    let registry = format!("127.0.0.1:{}", free_port());
    let image = format!("{registry}/outpost/absent:1@sha256:{}", "ab".repeat(32));
    let document = format!(
        "version = 1\ngeneration = 3\n[[deployments]]\nname = \"app\"\nrevision = 1\n\
         [[deployments.workloads]]\nname = \"svc\"\nimage = \"{image}\"\n\
         command = [\"/bin/sleep\", \"600\"]\nstop-grace-period = \"100ms\"\n"
    );
    hub.set_desired(DEVICE, &document);

    // The device reports the generation it stored; svc is not in its report:
    // the agent reports the workloads it created, and it creates none without its image.
    let device = hub_sees(&hub, &agent, "acknowledge generation 3", |d| {
        d["online"] == true && d["generation"].as_u64() == Some(3)
    });
    assert_eq!(device["desired_generation"].as_u64(), Some(3), "{device:#}");
    step("the hub sees the device online with generation 3 stored");

    // The `applied` event the device recorded in its store reaches the hub...
    let applied = |events: &[Value]| events.iter().any(|e| e["event"] == "applied" && e["generation"] == 3);
    let deadline = Instant::now() + WAIT;
    loop {
        let events = hub.get(&format!("/v1/devices/{DEVICE}/events?after=0"));
        let events = events.as_array().cloned().or_else(|| events["events"].as_array().cloned()).unwrap_or_default();
        if applied(&events) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hub never stored the applied event: {events:#?}\n{}",
            agent.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // ...and the hub's ack empties the device's outbox (its store keeps events until then).
    let deadline = Instant::now() + WAIT;
    while !agent.events().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the aarch64 agent's outbox never emptied: {:#?}\n{}",
            agent.events(),
            agent.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    step("the applied event of generation 3 is at the hub, acknowledged");

    // And the daemon acts on what it stored: it plans svc and asks the
    // registry the document names for the pinned image.
    let tried = format!("create svc (app revision 1): cannot reach registry {registry}");
    let deadline = Instant::now() + WAIT;
    while !agent.daemon_log().contains(&tried) {
        assert!(
            Instant::now() < deadline,
            "the aarch64 daemon never tried to create svc from {registry}:\n{}",
            agent.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    step("the daemon tried to pull svc's image from the registry named");
}
