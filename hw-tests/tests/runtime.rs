//! The container runtime on a real kernel: lifecycle, restarts, limits, logs,
//! probes, and workloads that outlive the agent. Needs root (CI runs as root).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::{state, Agent};

const WAIT: Duration = Duration::from_secs(15);

/// An agent with the busybox test image imported; returns the image reference.
fn agent_with_busybox() -> (Agent, String) {
    let agent = Agent::new();
    let reference = testkit::import_busybox(&agent);
    (agent, reference)
}

fn spec(name: &str, image: &str, script: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\nstop-grace-period = \"1s\"\n{extra}\n"
    )
}

fn pid(w: &Value) -> i64 {
    w["status"]["pid"].as_i64().unwrap_or(0)
}

#[test]
fn workload_runs_and_its_exit_code_is_recorded() {
    let (agent, image) = agent_with_busybox();
    let out = agent.run_spec(&spec("exits", &image, "echo started; sleep 0.3; exit 3", "[restart]\nmode = \"never\""));
    assert!(out.contains("exits: running"), "{out}");
    let w = agent.wait_for("exits", WAIT, "exited", |w| state(w) == "exited");
    assert_eq!(w["status"]["last_exit"]["code"], 3);
    assert_eq!(w["status"]["restarts"], 0);
    assert!(agent.logs("exits").contains("stdout started"));
}

#[test]
fn workload_runs_in_its_own_namespaces_with_its_hostname() {
    let (agent, image) = agent_with_busybox();
    agent.run_spec(&spec("isolated", &image, "hostname; echo pid=$$; ls /sys/fs/cgroup >/dev/null; sleep 30", ""));
    let w = agent.wait_for("isolated", WAIT, "logging", |_| agent.logs("isolated").contains("pid="));
    assert_eq!(state(&w), "running");
    let logs = agent.logs("isolated");
    assert!(logs.contains("stdout isolated"), "hostname is the workload name: {logs}");
    assert!(logs.contains("pid=1"), "the workload is PID 1 of its own namespace: {logs}");
}

#[test]
fn crashed_workload_is_restarted_with_backoff_and_reported_as_crash_loop() {
    let (agent, image) = agent_with_busybox();
    let restart = "[restart]\nmode = \"on-failure\"\nbackoff-initial = \"100ms\"\nbackoff-max = \"400ms\"\ncrash-loop-threshold = 3";
    agent.run_spec(&spec("crasher", &image, "echo crash; exit 1", restart));
    let started = Instant::now();
    let w = agent.wait_for("crasher", WAIT, "crash-looping", |w| state(w) == "crash-loop");
    assert!(w["status"]["restarts"].as_u64().unwrap() >= 3);
    assert_eq!(w["status"]["last_exit"]["code"], 1);
    // Backoff 100, 200, 400, 400... ms: two seconds hold a handful of restarts, not hundreds.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    let restarts = agent.workload("crasher")["status"]["restarts"].as_u64().unwrap();
    assert!((3..=9).contains(&restarts), "{restarts} restarts in 2 s: backoff is not applied");
}

#[test]
fn workload_that_exits_cleanly_is_not_restarted_under_on_failure() {
    let (agent, image) = agent_with_busybox();
    agent.run_spec(&spec("oneshot", &image, "exit 0", "[restart]\nmode = \"on-failure\"\nbackoff-initial = \"100ms\""));
    let w = agent.wait_for("oneshot", WAIT, "exited", |w| state(w) == "exited");
    assert_eq!(w["status"]["last_exit"]["code"], 0);
    assert_eq!(w["status"]["restarts"], 0);
}

#[test]
fn memory_limit_is_enforced_and_the_oom_kill_reported() {
    let (agent, image) = agent_with_busybox();
    // tail keeps the last 200 MiB of an endless stream in memory: far past the limit.
    let spec = format!(
        "name = \"hog\"\nimage = \"{image}\"\ncommand = [\"/bin/tail\", \"-c\", \"200m\", \"/dev/zero\"]\n[resources]\nmemory = \"16MiB\"\n[restart]\nmode = \"never\"\n"
    );
    agent.run_spec(&spec);
    let w = agent.wait_for("hog", WAIT, "exited", |w| state(w) == "exited");
    assert_eq!(w["status"]["last_exit"]["oom_killed"], true, "{w:#}");
    assert_eq!(w["status"]["last_exit"]["signal"], "SIGKILL");
    assert!(agent.ok(&["ps"]).contains("OOM-killed"));
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let (agent, image) = agent_with_busybox();
    agent.run_spec(&spec(
        "forker",
        &image,
        "i=0; while [ $i -lt 30 ]; do sleep 30 & i=$((i+1)); done",
        "[resources]\npids = 8\n[restart]\nmode = \"never\"",
    ));
    agent.wait_for("forker", WAIT, "refused a fork", |_| agent.logs("forker").contains("can't fork"));
}

#[test]
fn logs_are_captured_per_stream_and_rotated_at_the_size_cap() {
    let (mut agent, image) = agent_with_busybox();
    agent.extra_args = vec!["--log-max-size".into(), "2KiB".into(), "--log-files".into(), "2".into()];
    agent.run_spec(&spec(
        "chatty",
        &image,
        // stderr last, after a pause: the two pipes are read independently, so a
        // stderr line written first can land in a file rotated away since.
        "i=0; while [ $i -lt 300 ]; do echo line-$i; i=$((i+1)); done; echo done; sleep 0.5; echo to-stderr >&2",
        "[restart]\nmode = \"never\"",
    ));
    let w = agent.wait_for("chatty", WAIT, "exited", |w| state(w) == "exited");
    let dir = agent.data.path().join("workloads").join(w["instance"].as_str().unwrap()).join("logs");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 2, "current file and one rotated: {files:?}");
    for f in &files {
        assert!(f.metadata().unwrap().len() <= 2048, "{:?} passed the cap", f.path());
    }
    // Order across the two streams is not kept (two pipes), within each it is.
    let logs = agent.logs("chatty");
    assert!(logs.contains("stdout line-299\n") && logs.contains("stdout done"), "{logs}");
    assert!(logs.contains("stderr to-stderr"), "{logs}");
    assert!(!logs.contains("line-0\n"), "the oldest lines were rotated away");
    let tail = agent.ok(&["logs", "chatty", "--tail", "1"]);
    assert_eq!(tail.lines().count(), 1);
}

#[test]
fn stop_sends_sigterm_then_sigkill_after_the_grace_period() {
    let (agent, image) = agent_with_busybox();
    // PID 1 ignores SIGTERM unless it traps it: this one does and exits 0.
    agent.run_spec(&spec("polite", &image, "trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done", ""));
    // busybox sh as PID 1 ignores SIGTERM: only SIGKILL ends it.
    agent.run_spec(&spec("stubborn", &image, "while true; do sleep 0.1; done", ""));
    agent.wait_for("polite", WAIT, "running", |w| state(w) == "running");

    let out = agent.ok(&["stop", "polite"]);
    assert!(out.contains("stopped (exit code 0)"), "{out}");
    assert!(agent.logs("polite").contains("bye"));

    let started = Instant::now();
    let out = agent.ok(&["stop", "stubborn"]);
    assert!(out.contains("stopped (killed by SIGKILL)"), "{out}");
    assert!(started.elapsed() >= Duration::from_millis(900), "SIGKILL came before the 1 s grace period");

    agent.ok(&["start", "stubborn"]);
    agent.wait_for("stubborn", WAIT, "running again", |w| state(w) == "running");
    agent.ok(&["rm", "stubborn"]);
    assert_eq!(agent.workload("stubborn"), Value::Null);
}

#[test]
fn containers_keep_running_when_the_agent_is_killed_and_a_new_agent_takes_them_back() {
    let (agent, image) = agent_with_busybox();
    let restart = "[restart]\nbackoff-initial = \"100ms\"";
    agent.run_spec(&spec("survivor-a", &image, "while true; do echo a; sleep 0.2; done", restart));
    agent.run_spec(&spec("survivor-b", &image, "while true; do sleep 0.2; done", restart));
    let pid_a = pid(&agent.wait_for("survivor-a", WAIT, "running", |w| state(w) == "running"));
    let pid_b = pid(&agent.workload("survivor-b"));

    // A long-running agent process in its own process group, killed with the whole group.
    let mut follower =
        agent.command().args(["logs", "-f", "survivor-a"]).stdout(Stdio::null()).process_group(0).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(follower.id() as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let _ = follower.wait();

    // A new agent sees both running, unchanged.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pid(&agent.workload("survivor-a")), pid_a);
    assert_eq!(pid(&agent.workload("survivor-b")), pid_b);
    assert!(Command::new("kill").args(["-0", &pid_a.to_string()]).status().unwrap().success());

    // They are still supervised: a crash is restarted, and stop works.
    Command::new("kill").args(["-9", &pid_b.to_string()]).status().unwrap();
    let w =
        agent.wait_for("survivor-b", WAIT, "restarted", |w| state(w) == "running" && pid(w) != pid_b && pid(w) != 0);
    assert_eq!(w["status"]["restarts"], 1);
    assert!(agent.ok(&["stop", "survivor-a"]).contains("stopped"));
}

#[test]
fn exec_health_probe_reports_healthy_then_unhealthy() {
    let (agent, image) = agent_with_busybox();
    let health = "[health]\nexec = [\"test\", \"-f\", \"/tmp/ready\"]\ninterval = \"200ms\"\nfailure-threshold = 2";
    agent.run_spec(&spec("probed", &image, "touch /tmp/ready; sleep 2; rm /tmp/ready; sleep 30", health));
    agent.wait_for("probed", WAIT, "healthy", |w| w["status"]["health"] == "healthy");
    agent.wait_for("probed", WAIT, "unhealthy", |w| w["status"]["health"] == "unhealthy");
}

#[test]
fn http_and_tcp_health_probes_reach_a_host_network_workload() {
    let (agent, image) = agent_with_busybox();
    let port = free_port();
    let health =
        format!("network = \"host\"\n[health]\nhttp = {{ port = {port}, path = \"/\" }}\ninterval = \"200ms\"");
    agent.run_spec(&spec(
        "web",
        &image,
        &format!("mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /www"),
        &health,
    ));
    agent.wait_for("web", WAIT, "healthy", |w| w["status"]["health"] == "healthy");

    let port2 = free_port();
    let health = format!("network = \"host\"\n[health]\ntcp = {port2}\ninterval = \"200ms\"\nfailure-threshold = 1");
    agent.run_spec(&spec("nolistener", &image, "sleep 30", &health));
    agent.wait_for("nolistener", WAIT, "unhealthy", |w| w["status"]["health"] == "unhealthy");
}

#[test]
fn named_volume_survives_removing_the_workload() {
    let (agent, image) = agent_with_busybox();
    let mount = "mounts = [{ volume = \"keep\", target = \"/data\" }]\n[restart]\nmode = \"never\"";
    agent.run_spec(&spec("writer", &image, "echo persisted > /data/file", mount));
    agent.wait_for("writer", WAIT, "exited", |w| state(w) == "exited");
    agent.ok(&["rm", "writer"]);
    agent.run_spec(&spec("reader", &image, "cat /data/file", mount));
    agent.wait_for("reader", WAIT, "exited", |w| state(w) == "exited");
    assert!(agent.logs("reader").contains("persisted"));
}

#[test]
fn read_only_rootfs_refuses_writes_outside_volumes() {
    let (agent, image) = agent_with_busybox();
    agent.run_spec(&spec(
        "ro",
        &image,
        "touch /file 2>&1 || echo refused",
        "read-only-rootfs = true\n[restart]\nmode = \"never\"",
    ));
    agent.wait_for("ro", WAIT, "exited", |w| state(w) == "exited");
    assert!(agent.logs("ro").contains("refused"));
}

#[test]
fn bad_inputs_are_refused_with_a_clear_error_and_nothing_left_behind() {
    let (agent, image) = agent_with_busybox();

    let err = agent.run_spec_fails("name = \"x\"\nimage = \"b\"\n[resources]\nmemroy = \"1G\"\n");
    assert!(err.contains("memroy"), "{err}");

    let err = agent.run_spec_fails(&spec("nodev", &image, "true", "devices = [{ path = \"/dev/ttyNOPE9\" }]"));
    assert!(err.contains("/dev/ttyNOPE9") && err.contains("does not exist"), "{err}");
    assert_eq!(agent.workload("nodev"), Value::Null, "a refused workload leaves nothing behind");

    let err = agent.run_spec_fails(&spec("nobin", &image, "true", "").replace("/bin/sh", "/no/such/binary"));
    assert!(err.contains("/no/such/binary"), "{err}");
    assert_eq!(agent.workload("nobin"), Value::Null);

    agent.run_spec(&spec("twice", &image, "sleep 30", ""));
    let err = agent.run_spec_fails(&spec("twice", &image, "sleep 30", ""));
    assert!(err.contains("already exists"), "{err}");

    let err = agent.fails(&["logs", "ghost"]);
    assert!(err.contains("no workload named `ghost`"), "{err}");
}

#[test]
fn running_workloads_without_root_is_refused_with_the_reason() {
    let (agent, image) = agent_with_busybox();
    let file = agent.data.path().join("spec.toml");
    std::fs::write(&file, spec("unprivileged", &image, "true", "")).unwrap();
    std::fs::set_permissions(agent.data.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = agent.command().args(["run", "-f", file.to_str().unwrap()]).uid(65534).gid(65534).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn killed_shim_is_reported_lost_and_rm_still_cleans_up_its_container() {
    let (agent, image) = agent_with_busybox();
    agent.run_spec(&spec("orphan", &image, "sleep 300", ""));
    let w = agent.wait_for("orphan", WAIT, "running", |w| state(w) == "running");
    let container_pid = pid(&w);
    let shim_pid = w["status"]["shim_pid"].as_i64().unwrap();
    Command::new("kill").args(["-9", &shim_pid.to_string()]).status().unwrap();
    agent.wait_for("orphan", WAIT, "lost", |w| state(w) == "lost");
    agent.ok(&["rm", "orphan"]);
    let deadline = Instant::now() + WAIT;
    while std::path::Path::new(&format!("/proc/{container_pid}")).exists() && !is_zombie(container_pid) {
        assert!(Instant::now() < deadline, "the orphaned container still runs after rm");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_zombie(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
}

#[test]
fn passed_through_device_is_usable_inside_the_container_and_others_are_not() {
    let (agent, image) = agent_with_busybox();
    // A device node of our own (the kernel's zero device, 1:5) stands in for a serial port.
    let node = format!("/dev/outpost-test-zero-{}", std::process::id());
    let made = Command::new("mknod").args([&node, "c", "1", "5"]).status().unwrap();
    assert!(made.success(), "mknod {node} failed");
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Remove(node.clone());

    let script = format!("head -c 3 {node} | od -An -tx1; head -c 1 /dev/mem 2>&1 || echo no-mem; mknod /tmp/mem c 1 1 2>&1 || echo no-mknod");
    agent.run_spec(&spec(
        "serial",
        &image,
        &script,
        &format!("devices = [{{ path = \"{node}\" }}]\n[restart]\nmode = \"never\""),
    ));
    agent.wait_for("serial", WAIT, "exited", |w| state(w) == "exited");
    let logs = agent.logs("serial");
    assert!(logs.contains("00 00 00"), "the passed device was read: {logs}");
    assert!(logs.contains("no-mem") && logs.contains("no-mknod"), "a device not passed stays out of reach: {logs}");
}

#[test]
fn unreadable_workload_record_is_shown_and_can_be_removed() {
    let (agent, image) = agent_with_busybox();
    agent.run_spec(&spec("damaged", &image, "sleep 300", ""));
    let w = agent.wait_for("damaged", WAIT, "running", |w| state(w) == "running");
    let instance = w["instance"].as_str().unwrap().to_string();
    let record = agent.data.path().join("workloads").join(&instance).join("workload.json");
    std::fs::write(&record, b"{ not json").unwrap();

    let listed = agent.wait_for(&instance, WAIT, "unreadable", |w| state(w) == "unreadable");
    assert_eq!(listed["status"]["state"], "running", "its shim still reports it");
    agent.ok(&["rm", &instance]);
    assert_eq!(agent.workload(&instance), Value::Null);
    assert!(!record.exists());
}
