//! Drives the real edge-agent binary the way an operator does, each instance
//! with its own data and run directories and its own cgroup, so tests run in
//! parallel and clean up after themselves.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// Panics with the reason when the test cannot run here: never a silent skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (namespaces, cgroups, mounts): run it as root, as CI does");
    }
}

/// The edge-agent binary of this workspace, built once per test process.
pub fn agent_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_binary("edge-agent", "edge-agent"))
}

/// Builds a binary of this workspace with cargo (quick when it is up to date) and returns its path.
/// With `OUTPOST_TEST_BIN_DIR` set, takes the binary from there and builds nothing: test
/// executables copied to a machine with no workspace or toolchain (a Raspberry Pi: README.md).
pub(crate) fn build_binary(package: &str, bin: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTPOST_TEST_BIN_DIR") {
        let path = Path::new(&dir).join(bin);
        assert!(path.is_file(), "OUTPOST_TEST_BIN_DIR has no {bin}: {}", path.display());
        return path;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(workspace)
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
    assert!(status.success(), "building {bin} failed");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target"));
    target.join("debug").join(bin)
}

pub struct Agent {
    binary: &'static Path,
    pub data: TempDir,
    pub run: TempDir,
    pub cgroup_parent: String,
    pub extra_args: Vec<String>,
    /// The network namespace the daemon runs in (entered with nsenter, which,
    /// unlike `ip netns exec`, leaves /sys and its cgroups mounted); none: the test's.
    pub netns: Option<String>,
    /// A cgroup the daemon (and so its shims) starts in: a small device's size.
    pub daemon_cgroup: Option<std::sync::Arc<crate::constrained::Constrained>>,
    daemon: Mutex<Option<Child>>,
}

impl Agent {
    pub fn new() -> Self {
        Self::with_binary(agent_binary())
    }

    /// As `new`, with another build of the agent (a release build, for a benchmark).
    pub fn with_binary(binary: &'static Path) -> Self {
        require_root();
        let data = tempfile::Builder::new().prefix("outpost-data-").tempdir().expect("temp dir");
        let run = tempfile::Builder::new().prefix("outpost-run-").tempdir().expect("temp dir");
        let cgroup_parent = format!("outpost-test-{}", run.path().file_name().unwrap().to_string_lossy());
        let mut agent = Self {
            binary,
            data,
            run,
            cgroup_parent,
            extra_args: Vec::new(),
            netns: None,
            daemon_cgroup: None,
            daemon: Mutex::new(None),
        };
        agent.use_config("");
        agent
    }

    /// Runs every later command with this configuration file, which trusts
    /// the test operator's root (`crate::trust`) unless it names its own.
    pub fn use_config(&mut self, toml: &str) {
        let config = self.data.path().join("agent.toml");
        // First, so that it is a top-level key whatever tables follow.
        let trust = if toml.contains("trust-root") {
            String::new()
        } else {
            format!("trust-root = {:?}\n", crate::trust::operator().root_path())
        };
        std::fs::write(&config, trust + toml).expect("writing the agent's configuration");
        self.extra_args = vec!["--config".into(), config.to_str().expect("a UTF-8 path").into()];
    }

    /// Links the agent to a hub's broker at `mqtt` as `device`, with the
    /// short intervals tests want.
    pub fn link_to(&mut self, mqtt: std::net::SocketAddr, device: &str, token: &str) {
        self.use_config(&format!(
            "device-id = \"{device}\"\nhub = \"mqtt://{mqtt}\"\nhub-token = \"{token}\"\nreport-interval = \"200ms\"\nkeep-alive = \"5s\"\n"
        ));
    }

    pub fn command(&self) -> Command {
        self.command_in(None)
    }

    /// As `command`, inside network namespace `netns` when one is given.
    fn command_in(&self, netns: Option<&str>) -> Command {
        let mut command = match netns {
            Some(ns) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(self.binary);
                command
            }
            None => Command::new(self.binary),
        };
        command
            .arg("--data-dir")
            .arg(self.data.path())
            .arg("--run-dir")
            .arg(self.run.path())
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(&self.extra_args);
        command
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("cannot run edge-agent")
    }

    /// Runs a subcommand that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(out.status.success(), "edge-agent {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a subcommand that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            !out.status.success(),
            "edge-agent {args:?} succeeded but should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Writes a spec file and runs it.
    pub fn run_spec(&self, spec: &str) -> String {
        let file = self.data.path().join(format!("spec-{}.toml", unique()));
        std::fs::write(&file, spec).unwrap();
        self.ok(&["run", "-f", file.to_str().unwrap()])
    }

    pub fn run_spec_fails(&self, spec: &str) -> String {
        let file = self.data.path().join(format!("spec-{}.toml", unique()));
        std::fs::write(&file, spec).unwrap();
        self.fails(&["run", "-f", file.to_str().unwrap()])
    }

    /// `ps --json` for one workload.
    pub fn workload(&self, name: &str) -> Value {
        let list: Value = serde_json::from_str(&self.ok(&["ps", "--json"])).expect("ps --json is JSON");
        list.as_array().unwrap().iter().find(|w| w["name"] == name).cloned().unwrap_or(Value::Null)
    }

    /// Polls `ps` until `check` holds, or panics with the last state seen.
    pub fn wait_for(&self, name: &str, timeout: Duration, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let w = self.workload(name);
            if check(&w) {
                return w;
            }
            if Instant::now() > deadline {
                panic!("workload {name} never became {what} within {timeout:?}; last seen: {w:#}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self, name: &str) -> String {
        self.ok(&["logs", name])
    }

    /// Starts `edge-agent daemon` and waits until its control socket answers.
    pub fn start_daemon(&self) {
        let socket = self.run.path().join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.data.path().join("daemon.log"))
            .expect("daemon log");
        // nsenter execs the agent, as does the cgroup's shell: the child's pid is the daemon's.
        let mut command = self.command_in(self.netns.as_deref());
        command.arg("daemon").env("OUTPOST_LOG", "info");
        if let Some(cgroup) = &self.daemon_cgroup {
            command = cgroup.wrap(&command);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start edge-agent daemon");
        *self.daemon.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not open its socket: {}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's pid, which stays the same across the execs of a self-update.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.lock().unwrap().as_ref().map(|child| child.id())
    }

    /// Waits up to `timeout` for the daemon to exit by itself; its exit status, if it did.
    pub fn wait_daemon_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut daemon = self.daemon.lock().unwrap();
        let child = daemon.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                *daemon = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL to the daemon, as a crash or a power cut would do it.
    pub fn kill_daemon(&self) {
        if let Some(mut child) = self.daemon.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("daemon.log")).unwrap_or_default()
    }

    /// `apply -f` of a desired-state document, signed by the test operator first.
    pub fn apply(&self, document: &str) -> Output {
        self.apply_as_is(&crate::trust::operator().sign_document(document))
    }

    /// `apply -f` of a document exactly as given: unsigned, or signed by another key.
    pub fn apply_as_is(&self, document: &str) -> Output {
        let file = self.data.path().join(format!("desired-{}.toml", unique()));
        std::fs::write(&file, document).unwrap();
        self.exec(&["apply", "-f", file.to_str().unwrap()])
    }

    pub fn events(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.ok(&["events", "--json"])).unwrap().as_array().cloned().unwrap_or_default()
    }
}

impl Default for Agent {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The daemon first: it would start again what is removed below.
        self.kill_daemon();
        let Ok(out) = self.command().args(["ps", "--json"]).output() else { return };
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        for w in list.as_array().into_iter().flatten() {
            if let Some(name) = w["name"].as_str() {
                let _ = self.command().args(["rm", name]).output();
            }
        }
        for controller in
            ["memory", "cpu", "cpuacct", "pids", "cpuset", "devices", "freezer", "blkio", "systemd", "unified"]
        {
            let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(controller).join(&self.cgroup_parent));
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The state `ps` shows.
pub fn state(w: &Value) -> &str {
    w["state"].as_str().unwrap_or("")
}
