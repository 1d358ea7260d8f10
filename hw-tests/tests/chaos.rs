//! Chaos: a cloud hub, a site hub below it and three real agents (real
//! containers), each tier in its own network namespace, while the cloud rolls
//! out several revisions of a signed deployment and a seeded schedule of
//! faults fires: links between the devices and the site, the site and the
//! cloud, and a device and the cloud are cut, stalled (packets dropped
//! silently) and slowed; agents, shims and both hubs are SIGKILLed and started
//! again on the same data; one device's disk fills up (its data dir is on a
//! small loop-mounted ext4); another device's wall clock jumps back and forth.
//! After the faults, everything is healed, and within a bound every device
//! runs the final revision, the cloud's view of each device matches what the
//! device says, every event reached the cloud exactly once, and no store was
//! corrupt or reset.
//!
//! The seed is printed first: `OUTPOST_CHAOS_SEED=N` replays the same
//! schedule of faults (the processes' own timing is the kernel's, so a replay
//! is the same schedule, not the same interleaving). `OUTPOST_CHAOS_SECONDS`
//! sets how long the faults go on (CI: the default, 75 s). The long run:
//!
//! ```sh
//! OUTPOST_CHAOS_SECONDS=1800 cargo test -p hw-tests --test chaos -- --nocapture
//! ```
//!
//! `OUTPOST_CHAOS_LOGS=1` prints the hubs' and agents' logs after a pass
//! too (a failure always prints them).
//!
//! Needs root, iproute2 (with sch_tbf), nftables, faketime, e2fsprogs and
//! loop devices: testkit::chaos::require_tools says what is missing.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use testkit::agent::{agent_binary, Agent};
use testkit::chaos::{DiskFiller, FakeClock, Link, Rng};
use testkit::hub::{free_port, Hub};
use testkit::loopfs::LoopFs;
use testkit::netns::{Netns, Veth};

const SITE: &str = "rig";
/// Devices behind the site hub, then the one straight on the cloud.
const DEVICES: [&str; 3] = ["pi-1", "pi-2", "pi-3"];
/// pi-1's data dir is on a loop filesystem of this size, which fills up.
const DISK_MIB: u64 = 96;
/// Revisions the cloud applies during the faults (the first before them).
const REVISIONS: u64 = 4;
/// The revision that always finds pi-1's disk full.
const DISK_FULL_REVISION: u64 = 3;
const CONVERGE: Duration = Duration::from_secs(180);

fn millis_since(start: Instant) -> String {
    format!("{:7.1}s", start.elapsed().as_secs_f64())
}

struct Device {
    id: &'static str,
    /// Declared before `disk`: dropped (daemon killed, workloads removed) before it is unmounted.
    agent: Agent,
    disk: Option<LoopFs>,
    clock: Option<FakeClock>,
    _ns: Netns,
    /// Its link to its hub.
    link: Link,
    /// Where pi-1's agent log is (off its small disk).
    _log: tempfile::NamedTempFile,
}

struct World {
    /// Devices first: they go before the hubs and the namespaces.
    devices: Vec<Device>,
    cloud: Hub,
    site: Hub,
    wan: Link,
    _mgmt: Veth,
    _site_ns: Netns,
    dir: tempfile::TempDir,
}

impl World {
    fn new(tag: u32) -> Self {
        let site_ns = Netns::new(&format!("op-ch-site-{tag}"));
        // 10.214.0.0/24: the test's own view of the site hub (an operator's
        // management network), never faulted. 10.214.1.0/24: the WAN.
        let mgmt =
            Veth::new(&format!("ocm{tag}"), None, "10.214.0.1/24", &format!("ocm{tag}s"), &site_ns, "10.214.0.2/24");
        let wan = Link::new(
            "wan",
            &format!("ocw{tag}"),
            None,
            "10.214.1.1/24",
            &format!("ocw{tag}s"),
            &site_ns,
            "10.214.1.2/24",
        );

        let (cloud_http, cloud_mqtt) = (free_port(), free_port());
        // On every address: the WAN's (for the site) and pi-3's link.
        let cloud = Hub::configured(
            None,
            SocketAddr::from(([127, 0, 0, 1], cloud_http)),
            SocketAddr::from(([127, 0, 0, 1], cloud_mqtt)),
            &format!(
                "http = \"0.0.0.0:{cloud_http}\"\nmqtt-listen = \"0.0.0.0:{cloud_mqtt}\"\n\
                 [sites]\n{SITE} = \"site-token\"\n[devices]\n{id} = \"{id}-token\"\n",
                id = DEVICES[2]
            ),
        );
        let mut site_devices = String::new();
        for id in &DEVICES[..2] {
            site_devices += &format!("{id} = \"{id}-token\"\n");
        }
        let site = Hub::configured(
            Some(&site_ns.name),
            SocketAddr::from(([10, 214, 0, 2], 8080)),
            SocketAddr::from(([10, 214, 0, 2], 1883)),
            &format!(
                "http = \"0.0.0.0:8080\"\nmqtt-listen = \"0.0.0.0:1883\"\n[devices]\n{site_devices}\
                 [upstream]\nmqtt = \"mqtt://10.214.1.1:{cloud_mqtt}\"\nsite = \"{SITE}\"\ntoken = \"site-token\"\n\
                 http = \"http://10.214.1.1:{cloud_http}\"\n"
            ),
        );

        let mut devices = Vec::new();
        for (i, id) in DEVICES.into_iter().enumerate() {
            let ns = Netns::new(&format!("op-ch-{id}-{tag}"));
            let net = 10 + i;
            let behind_site = i < 2;
            let (link, hub) = if behind_site {
                let link = Link::new(
                    id,
                    &format!("ocd{i}{tag}"),
                    Some(&site_ns),
                    &format!("10.214.{net}.1/24"),
                    &format!("ocd{i}{tag}d"),
                    &ns,
                    &format!("10.214.{net}.2/24"),
                );
                (link, format!("mqtt://10.214.{net}.1:1883"))
            } else {
                let link = Link::new(
                    id,
                    &format!("ocd{i}{tag}"),
                    None,
                    &format!("10.214.{net}.1/24"),
                    &format!("ocd{i}{tag}d"),
                    &ns,
                    &format!("10.214.{net}.2/24"),
                );
                (link, format!("mqtt://10.214.{net}.1:{cloud_mqtt}"))
            };
            // pi-2's wall clock jumps; pi-1's disk fills.
            let clock = (i == 1).then(|| FakeClock::wrapping(agent_binary()));
            let mut agent = match &clock {
                Some(clock) => Agent::with_binary(clock.binary()),
                None => Agent::new(),
            };
            let disk = (i == 0).then(|| LoopFs::new(DISK_MIB));
            if let Some(disk) = &disk {
                agent.data = tempfile::Builder::new()
                    .prefix("outpost-data-")
                    .tempdir_in(disk.path())
                    .expect("data dir on the loop fs");
            }
            // Its log on another filesystem, as journald's is on a device:
            // what the agent says while its disk is full must be seen.
            let log = tempfile::Builder::new().prefix("outpost-chaos-log-").tempfile().expect("a log file");
            if disk.is_some() {
                std::os::unix::fs::symlink(log.path(), agent.data.path().join("daemon.log")).unwrap();
            }
            agent.use_config(&format!(
                "device-id = \"{id}\"\nhub = \"{hub}\"\nhub-token = \"{id}-token\"\n\
                 report-interval = \"200ms\"\nkeep-alive = \"5s\"\nreconcile-interval = \"1s\"\n"
            ));
            agent.netns = Some(ns.name.clone());
            testkit::import_busybox(&agent);
            agent.start_daemon();
            devices.push(Device { id, agent, disk, clock, _ns: ns, link, _log: log });
        }
        let dir = tempfile::tempdir().unwrap();
        World { devices, cloud, site, wan, _mgmt: mgmt, _site_ns: site_ns, dir }
    }

    fn logs(&self) -> String {
        let mut out = format!("=== cloud hub log\n{}\n=== site hub log\n{}\n", self.cloud.log(), self.site.log());
        for d in &self.devices {
            out += &format!("=== {} agent log\n{}\n", d.id, d.agent.daemon_log());
        }
        // What each side holds now.
        out += &format!("=== the cloud's devices\n{:?}\n", self.cloud.try_get("/v1/devices"));
        out += &format!("=== the site's devices\n{:?}\n", self.site.try_get("/v1/devices"));
        out += &format!("=== the cloud's sites\n{:?}\n", self.cloud.try_get("/v1/sites"));
        for d in &self.devices {
            let text = |args: &[&str]| {
                let o = d.agent.exec(args);
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
            };
            out += &format!(
                "=== {} ps\n{}\n=== {} events not acknowledged\n{}\n",
                d.id,
                text(&["ps", "--json"]),
                d.id,
                text(&["events", "--json"])
            );
        }
        out
    }

    fn link(&self, index: usize) -> &Link {
        match index {
            0 => &self.wan,
            i => &self.devices[i - 1].link,
        }
    }

    fn links(&self) -> usize {
        1 + self.devices.len()
    }

    /// `hub apply` at the cloud of revision `n`, retried while the cloud is down.
    fn apply(&self, n: u64) -> Result<(), String> {
        let file = self.dir.path().join("app.json");
        std::fs::write(&file, deployment(n).to_string()).unwrap();
        let key = testkit::trust::operator().deployments_key_path();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cloud.cli(&["apply", "-f", file.to_str().unwrap(), "--key", key.to_str().unwrap()]);
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn wait(&self, what: &str, timeout: Duration, check: impl Fn() -> Option<String>) {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(not_yet) = check() else { return };
            if Instant::now() > deadline {
                panic!("not within {timeout:?}: {what}\nlast seen: {not_yet}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Revision `n` of the deployment: one workload whose process says which revision started it.
fn deployment(n: u64) -> Value {
    json!({
        "name": "app",
        "rollback-window": "3s",
        // Chaos makes devices fail a revision now and then (a full disk); the
        // rollout goes on rather than stopping: the test is about reaching the
        // final revision, not about the failure ratio.
        "strategy": { "waves": ["1", "100%"], "min-healthy": "1s", "max-failure-ratio": 1.0,
                      "on-failure": "pause", "device-timeout": "20s" },
        "workloads": [{
            "name": "svc", "image": testkit::image::busybox_pinned(),
            "command": ["/bin/sh", "-c", format!("exec sleep {}", 700_000 + n)],
            "stop-grace-period": "100ms",
            "restart": { "mode": "always", "backoff-initial": "100ms" },
        }],
    })
}

/// Shim pids of a device, from the status files in its run dir.
fn shim_pids(agent: &Agent) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut dirs = vec![agent.run.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n == "status.json") {
                let status: Value =
                    std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
                if let Some(pid) = status["shim_pid"].as_i64() {
                    pids.push(pid as i32);
                }
            }
        }
    }
    pids
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Cut(usize),
    Stall(usize),
    Slow(usize),
    AgentDown(usize),
    CloudDown,
    SiteDown,
    DiskFull,
}

/// Runs the schedule for `length`, then heals everything.
fn chaos(world: &World, rng: &mut Rng, length: Duration, start: Instant) {
    let begin = Instant::now();
    // Revisions 2..=REVISIONS, spread over the first three quarters.
    let mut due: Vec<(Duration, u64)> =
        (2..=REVISIONS).map(|n| (length.mul_f64(0.75 * (n - 2) as f64 / (REVISIONS - 2) as f64), n)).collect();
    let mut active: Vec<(Fault, Instant)> = Vec::new();
    let say = |what: String| println!("chaos {} {what}", millis_since(start));
    while begin.elapsed() < length {
        let now = Instant::now();
        // Faults whose time is up end.
        let (ended, still): (Vec<_>, Vec<_>) = active.iter().partition(|(_, until)| *until <= now);
        active = still;
        for (fault, _) in ended {
            say(format!("end {fault:?}"));
            if !end(world, fault) {
                active.push((fault, Instant::now() + Duration::from_secs(2)));
            }
        }
        if let Some(&(at, n)) = due.first() {
            if begin.elapsed() >= at {
                due.remove(0);
                // Whatever the schedule, one revision arrives at a device
                // whose disk is full, while its agent runs (an agent that
                // does not start stays down, to be tried again).
                if n == DISK_FULL_REVISION {
                    active.retain(|(f, _)| *f != Fault::AgentDown(0) || !end(world, *f));
                    if !active.iter().any(|(f, _)| *f == Fault::DiskFull) {
                        say("begin DiskFull for 15.0s, over the next revision".into());
                        begin_fault(world, Fault::DiskFull);
                        active.push((Fault::DiskFull, Instant::now() + Duration::from_secs(15)));
                    }
                }
                say(format!("apply revision {n}"));
                // The cloud hub may be down (a fault): the operator applies again a second later.
                if let Err(e) = world.apply(n) {
                    say(format!("apply revision {n} failed, again in 1s: {e}"));
                    due.insert(0, (begin.elapsed() + Duration::from_secs(1), n));
                }
            }
        }
        // An agent that stopped by itself is started again 2 s later, as systemd would.
        for d in 0..world.devices.len() {
            if !active.iter().any(|(f, _)| *f == Fault::AgentDown(d)) && exited(&world.devices[d]) {
                say(format!("{}'s agent stopped by itself; starting it again in 2s", world.devices[d].id));
                active.push((Fault::AgentDown(d), Instant::now() + Duration::from_secs(2)));
            }
        }
        let busy = |f: Fault| active.iter().any(|(a, _)| *a == f);
        let link_busy = |l: usize| {
            active.iter().any(|(a, _)| matches!(a, Fault::Cut(x) | Fault::Stall(x) | Fault::Slow(x) if *x == l))
        };
        // One fault every 0.5 to 3 s.
        let kind = rng.weighted(&[5, 4, 2, 3, 2, 1, 1, 1, 1]);
        let target = rng.between(0, world.links() as u64 - 1) as usize;
        let device = rng.between(0, world.devices.len() as u64 - 1) as usize;
        let hold = rng.millis(1_000, 8_000);
        let fault = match kind {
            0 if !link_busy(target) => Some(Fault::Cut(target)),
            1 if !link_busy(target) => Some(Fault::Stall(target)),
            2 if !link_busy(target) => Some(Fault::Slow(target)),
            3 if !busy(Fault::AgentDown(device)) => Some(Fault::AgentDown(device)),
            4 => {
                let pids = shim_pids(&world.devices[device].agent);
                say(format!("SIGKILL the shims of {} {pids:?}", world.devices[device].id));
                for pid in pids {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                None
            }
            5 if !busy(Fault::CloudDown) => Some(Fault::CloudDown),
            6 if !busy(Fault::SiteDown) => Some(Fault::SiteDown),
            7 if !busy(Fault::DiskFull) => Some(Fault::DiskFull),
            8 => {
                let seconds = rng.between(0, 4 * 86_400) as i64 - 2 * 86_400;
                let device = &world.devices[1];
                say(format!("clock of {} jumps to host {seconds:+}s", device.id));
                device.clock.as_ref().unwrap().jump(seconds);
                None
            }
            _ => None,
        };
        if let Some(fault) = fault {
            let hold = if fault == Fault::DiskFull { hold * 3 } else { hold };
            say(format!("begin {fault:?} for {:.1}s", hold.as_secs_f64()));
            begin_fault(world, fault);
            active.push((fault, Instant::now() + hold));
        }
        std::thread::sleep(rng.millis(500, 3_000));
    }
    say("heal everything".into());
    // The disk first, so that the agents can start.
    active.sort_by_key(|(fault, _)| *fault != Fault::DiskFull);
    for (fault, _) in active {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !end(world, fault) {
            assert!(Instant::now() < deadline, "{fault:?} could not be ended");
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    for i in 0..world.links() {
        world.link(i).heal();
    }
    for (_, n) in due {
        say(format!("apply revision {n}"));
        world.apply(n).unwrap_or_else(|e| panic!("hub apply of revision {n} at the cloud, all healed: {e}"));
    }
}

fn begin_fault(world: &World, fault: Fault) {
    match fault {
        Fault::Cut(l) => world.link(l).cut(true),
        Fault::Stall(l) => world.link(l).stall(true),
        Fault::Slow(l) => world.link(l).slow(true),
        Fault::AgentDown(d) => world.devices[d].agent.kill_daemon(),
        Fault::CloudDown => world.cloud.kill(),
        Fault::SiteDown => world.site.kill(),
        Fault::DiskFull => {
            let disk = world.devices[0].disk.as_ref().unwrap();
            let taken = DiskFiller::new(disk.path()).fill();
            println!("chaos         {} has a full disk: {} MiB taken", world.devices[0].id, taken >> 20);
        }
    }
}

/// Ends a fault; false when it is not over yet (an agent that did not start).
fn end(world: &World, fault: Fault) -> bool {
    match fault {
        Fault::Cut(l) => world.link(l).cut(false),
        Fault::Stall(l) => world.link(l).stall(false),
        Fault::Slow(l) => world.link(l).slow(false),
        Fault::AgentDown(d) => return start_agent(&world.devices[d]),
        Fault::CloudDown => world.cloud.start(),
        Fault::SiteDown => world.site.start(),
        Fault::DiskFull => DiskFiller::new(world.devices[0].disk.as_ref().unwrap().path()).free(),
    }
    true
}

/// Starts a device's agent as systemd's `Restart=always` would
/// (packaging/systemd): false when it did not come up, to be tried again.
fn start_agent(device: &Device) -> bool {
    let agent = &device.agent;
    // Reaps the one that failed before, if any.
    agent.kill_daemon();
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| agent.start_daemon())).is_ok();
    if !started {
        let log = agent.daemon_log();
        let last = log.lines().last().unwrap_or_default();
        println!("chaos         {}'s agent did not start ({last}); again in 2s", device.id);
        agent.kill_daemon();
    }
    started
}

/// Whether the device's agent exited on its own (reaped if so).
fn exited(device: &Device) -> bool {
    device.agent.wait_daemon_exit(Duration::ZERO).is_some()
}

/// What a device runs of `svc`, by its own `ps`: (revision, state) of each instance.
fn device_view(agent: &Agent) -> Vec<(Option<u64>, String)> {
    let list: Value = serde_json::from_str(&agent.ok(&["ps", "--json"])).expect("ps --json");
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["name"] == "svc")
        .map(|w| (w["deployment"]["revision"].as_u64(), w["state"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// What the cloud says the device runs of `svc`: (revision, state) of each.
fn cloud_view(cloud: &Hub, id: &str) -> Vec<(Option<u64>, String)> {
    let Ok(device) = cloud.try_get(&format!("/v1/devices/{id}")) else { return Vec::new() };
    device["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["name"] == "svc")
        .map(|w| (w["revision"].as_u64(), w["state"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn converged(world: &World) -> Option<String> {
    let wanted = vec![(Some(REVISIONS), "running".to_string())];
    for d in &world.devices {
        if exited(d) {
            println!("chaos         {}'s agent stopped by itself; starting it again", d.id);
            if !start_agent(d) {
                return Some(format!("{}'s agent does not start", d.id));
            }
        }
        let on_device = device_view(&d.agent);
        let at_cloud = cloud_view(&world.cloud, d.id);
        if on_device != wanted || at_cloud != wanted {
            return Some(format!("{}: the device runs {on_device:?}, the cloud says {at_cloud:?}", d.id));
        }
        let pending = d.agent.events();
        if !pending.is_empty() {
            return Some(format!("{}: {} events not acknowledged yet", d.id, pending.len()));
        }
        let view = world.cloud.get(&format!("/v1/devices/{}", d.id));
        if view["generation"] != view["desired_generation"] || view["stale"] != false {
            return Some(format!("{}: the cloud's view is behind: {view}", d.id));
        }
    }
    None
}

fn check_stores_and_events(world: &World) {
    for d in &world.devices {
        // Every event once, numbered from 1 without a gap.
        let events = world.cloud.get(&format!("/v1/devices/{}/events?after=0&limit=10000", d.id));
        let seqs: Vec<u64> = events.as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{}: the cloud's events are not 1..=n, each once", d.id);
        let view = world.cloud.get(&format!("/v1/devices/{}", d.id));
        assert_eq!(view["event_seq"].as_u64(), Some(seqs.len() as u64), "{}: {view}", d.id);
        assert!(view["store_reset_at"].is_null(), "{}'s store was reset: {view}", d.id);
        assert!(
            events.as_array().unwrap().iter().any(|e| e["event"] == "applied"),
            "{}: no applied event at the cloud: {events}",
            d.id
        );
        // No store moved aside as corrupt, none reported so.
        let aside: Vec<_> = std::fs::read_dir(d.agent.data.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("store.corrupt"))
            .collect();
        assert!(aside.is_empty(), "{}: a corrupt store was moved aside: {aside:?}", d.id);
        assert!(!d.agent.daemon_log().contains("is corrupt"), "{}'s agent found its store corrupt", d.id);
        println!("{}: {} events at the cloud, 1..={} each once", d.id, seqs.len(), seqs.len());
    }
    // Both hubs' stores open again after one last SIGKILL, and hold what they held.
    let before: Vec<Value> =
        DEVICES.iter().map(|id| world.cloud.get(&format!("/v1/devices/{id}"))["generation"].clone()).collect();
    world.cloud.kill();
    world.cloud.start();
    world.site.kill();
    world.site.start();
    let after: Vec<Value> =
        DEVICES.iter().map(|id| world.cloud.get(&format!("/v1/devices/{id}"))["generation"].clone()).collect();
    assert_eq!(before, after, "the cloud's store after a restart");
    let devices = world.site.get("/v1/devices");
    assert_eq!(devices.as_array().map(Vec::len), Some(2), "the site's store after a restart: {devices}");
    for hub in [&world.cloud, &world.site] {
        assert!(!hub.log().contains("corrupt"), "a hub reported corruption:\n{}", hub.log());
    }
}

#[test]
fn a_fleet_under_random_faults_converges_on_the_final_revision_with_every_report_once() {
    testkit::chaos::require_tools();
    let seed = testkit::chaos::seed_from_env();
    let length = testkit::chaos::duration_from_env(Duration::from_secs(75));
    println!("chaos seed: {seed} (replay with OUTPOST_CHAOS_SEED={seed}), {}s of faults", length.as_secs());
    let start = Instant::now();
    let world = World::new(std::process::id() % 100_000);
    println!("chaos {} hubs and agents started", millis_since(start));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        world.wait("every device known and online at the cloud", Duration::from_secs(60), || {
            DEVICES.iter().find_map(|id| match world.cloud.try_get(&format!("/v1/devices/{id}")) {
                Ok(d) if d["online"] == true => None,
                other => Some(format!("{id}: {other:?}")),
            })
        });
        println!("chaos {} fleet up; revision 1 rolls out before the faults", millis_since(start));
        world.apply(1).unwrap();
        world.wait("revision 1 everywhere", Duration::from_secs(60), || {
            DEVICES.iter().find_map(|id| {
                let view = cloud_view(&world.cloud, id);
                (view != vec![(Some(1), "running".to_string())]).then(|| format!("{id}: {view:?}"))
            })
        });
        let mut rng = Rng::new(seed);
        chaos(&world, &mut rng, length, start);
        println!("chaos {} healed; waiting for convergence on revision {REVISIONS}", millis_since(start));
        world.wait(&format!("every device on revision {REVISIONS}, as the cloud sees it"), CONVERGE, || {
            converged(&world)
        });
        println!("chaos {} converged", millis_since(start));
        check_stores_and_events(&world);
    }));
    if let Err(panic) = result {
        eprintln!("{}", world.logs());
        eprintln!(
            "chaos seed: {seed} (replay with OUTPOST_CHAOS_SEED={seed} OUTPOST_CHAOS_SECONDS={})",
            length.as_secs()
        );
        std::panic::resume_unwind(panic);
    }
    if std::env::var_os("OUTPOST_CHAOS_LOGS").is_some() {
        println!("{}", world.logs());
    }
    println!("chaos seed {seed}: passed in {:.0}s", start.elapsed().as_secs_f64());
}
