//! The device's desired state on a real kernel: convergence from any starting
//! point, cold boot with no network, local rollback, bad documents, and
//! SIGKILL of the agent at random moments. Needs root (CI runs as root).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::{state, Agent};

const WAIT: Duration = Duration::from_secs(20);

/// A workload of busybox running `script`, with fast stop and restarts.
fn workload(name: &str, script: &str, extra: &str) -> String {
    let image = testkit::image::busybox_pinned();
    format!(
        "[[deployments.workloads]]\nname = \"{name}\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\nstop-grace-period = \"100ms\"\n{extra}\n"
    )
}

fn document(generation: u64, deployments: &[(&str, u64, &str, &[String])]) -> String {
    let mut doc = format!("version = 1\ngeneration = {generation}\n");
    for (name, revision, extra, workloads) in deployments {
        doc += &format!("\n[[deployments]]\nname = \"{name}\"\nrevision = {revision}\n{extra}\n");
        for w in *workloads {
            doc += w;
        }
    }
    doc
}

fn agent() -> Agent {
    let agent = Agent::new();
    testkit::import_busybox(&agent);
    agent
}

fn instances(agent: &Agent) -> Vec<Value> {
    serde_json::from_str::<Value>(&agent.ok(&["ps", "--json"])).unwrap().as_array().cloned().unwrap()
}

/// Waits until exactly the named workloads run, one instance each; returns name -> instance.
fn converged(agent: &Agent, names: &[&str]) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = instances(agent);
        let running: BTreeMap<String, Value> = all
            .iter()
            .filter(|w| state(w) == "running")
            .map(|w| (w["name"].as_str().unwrap().to_string(), w.clone()))
            .collect();
        if all.len() == names.len() && running.len() == names.len() && names.iter().all(|n| running.contains_key(*n)) {
            return running;
        }
        assert!(Instant::now() < deadline, "never converged on {names:?}: {all:#?}\n{}", agent.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pid(w: &Value) -> i64 {
    w["status"]["pid"].as_i64().unwrap_or(0)
}

fn applied(agent: &Agent, doc: &str) {
    let out = agent.apply(doc);
    assert!(out.status.success(), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn refused(agent: &Agent, doc: &str) -> String {
    let out = agent.apply(doc);
    assert!(!out.status.success(), "apply should have been refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn agent_converges_from_empty_partial_extra_and_changed_states() {
    let agent = agent();
    agent.start_daemon();
    let (a, b) = (workload("a", "sleep 600", ""), workload("b", "sleep 600", ""));
    applied(&agent, &document(1, &[("app", 1, "", &[a.clone(), b.clone()])]));
    let first = converged(&agent, &["a", "b"]);

    // Partial: an instance removed behind the agent's back comes back.
    agent.ok(&["rm", "b"]);
    let again = converged(&agent, &["a", "b"]);
    assert_eq!(pid(&again["a"]), pid(&first["a"]), "a was left alone");

    // Changed: a new spec for a replaces a only.
    let a2 = workload("a", "sleep 601", "");
    applied(&agent, &document(2, &[("app", 2, "", &[a2, b.clone()])]));
    let deadline = Instant::now() + WAIT;
    let changed = loop {
        let now = converged(&agent, &["a", "b"]);
        if now["a"]["instance"] != first["a"]["instance"] {
            break now;
        }
        assert!(Instant::now() < deadline, "a was never replaced");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(pid(&changed["b"]), pid(&again["b"]), "a change of a never restarts b");

    // Extra: a workload no longer wanted goes; one run by hand stays.
    let spec = agent.data.path().join("mine.toml");
    std::fs::write(&spec, "name = \"mine\"\nimage = \"busybox:test\"\ncommand = [\"sleep\", \"600\"]\n").unwrap();
    agent.ok(&["run", "-f", spec.to_str().unwrap()]);
    applied(&agent, &document(3, &[("app", 3, "", &[b])]));
    converged(&agent, &["b", "mine"]);
}

#[test]
fn reconciling_twice_changes_nothing() {
    let agent = agent();
    let doc = document(1, &[("app", 1, "", &[workload("a", "sleep 600", "")])]);
    // No daemon: apply converges once, here; a second apply of the same generation finds nothing to do.
    applied(&agent, &doc);
    let first = converged(&agent, &["a"]);
    let out = agent.apply(&doc);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already applied"));
    let second = converged(&agent, &["a"]);
    assert_eq!(pid(&first["a"]), pid(&second["a"]));
    assert_eq!(second["a"]["status"]["restarts"], 0);
}

#[test]
fn cold_boot_with_no_network_runs_every_workload() {
    let mut agent = agent();
    let names: Vec<String> = (0..5).map(|i| format!("w{i}")).collect();
    let workloads: Vec<String> = names.iter().map(|n| workload(n, "sleep 600", "")).collect();
    agent.start_daemon();
    applied(&agent, &document(1, &[("app", 1, "", &workloads)]));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    converged(&agent, &refs);

    // Power off: the agent, every shim and container, the tmpfs run dir, the mounts.
    agent.kill_daemon();
    for w in instances(&agent) {
        for key in ["shim_pid", "pid"] {
            if let Some(pid) = w["status"][key].as_i64() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "grep -o ' {}[^ ]*rootfs' /proc/self/mountinfo | xargs -r -n1 umount -l",
            agent.data.path().display()
        ))
        .status();
    for entry in std::fs::read_dir(agent.run.path()).unwrap().flatten() {
        let _ = std::fs::remove_dir_all(entry.path());
    }
    // The hub is an address where nothing listens, and the device has no route anywhere else.
    let config = agent.data.path().join("agent.toml");
    std::fs::write(&config, "hub = \"mqtt://127.0.0.1:1\"\n").unwrap();
    agent.extra_args = vec!["--config".into(), config.to_str().unwrap().into()];

    let boot = Instant::now();
    agent.start_daemon();
    converged(&agent, &refs);
    assert!(boot.elapsed() < Duration::from_secs(10), "workloads took {:?} to come back", boot.elapsed());
}

#[test]
fn failing_new_revision_is_rolled_back_on_the_device() {
    let agent = agent();
    agent.start_daemon();
    let window = "rollback-window = \"20s\"";
    let good = workload("svc", "sleep 600", "");
    applied(&agent, &document(1, &[("app", 1, window, &[good])]));
    converged(&agent, &["svc"]);

    let broken = workload(
        "svc",
        "echo broken; exit 1",
        "[deployments.workloads.restart]\nbackoff-initial = \"50ms\"\nbackoff-max = \"100ms\"\ncrash-loop-threshold = 3",
    );
    applied(&agent, &document(2, &[("app", 2, window, &[broken])]));
    let deadline = Instant::now() + WAIT;
    let rollback = loop {
        if let Some(e) = agent.events().into_iter().find(|e| e["event"] == "rolled-back") {
            break e;
        }
        assert!(Instant::now() < deadline, "no rollback: {:#?}\n{}", agent.events(), agent.daemon_log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(rollback["from_revision"], 2);
    assert_eq!(rollback["to_revision"], 1);
    assert!(rollback["reason"].as_str().unwrap().contains("crash loop"), "{rollback}");
    let running = converged(&agent, &["svc"]);
    assert!(running["svc"]["status"]["last_exit"].is_null(), "revision 1 runs again, fresh");
    let events: Vec<String> = agent.events().iter().map(|e| e["event"].as_str().unwrap().to_string()).collect();
    for kind in ["applied", "revision-started", "failed", "rolled-back"] {
        assert!(events.contains(&kind.to_string()), "{kind} missing from {events:?}");
    }
}

#[test]
fn revision_whose_probe_fails_is_rolled_back() {
    let agent = agent();
    agent.start_daemon();
    let window = "rollback-window = \"20s\"";
    applied(&agent, &document(1, &[("app", 1, window, &[workload("svc", "sleep 600", "")])]));
    converged(&agent, &["svc"]);
    let probed = workload(
        "svc",
        "sleep 600",
        "[deployments.workloads.health]\nexec = [\"test\", \"-f\", \"/ready\"]\ninterval = \"100ms\"\nfailure-threshold = 2",
    );
    applied(&agent, &document(2, &[("app", 2, window, &[probed])]));
    let deadline = Instant::now() + WAIT;
    while !agent.events().iter().any(|e| e["event"] == "rolled-back") {
        assert!(Instant::now() < deadline, "no rollback: {:#?}", agent.events());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The rollback is recorded before revision 1's container replaces revision 2's.
    agent.wait_for("svc", WAIT, "the probe-less revision 1 running again", |w| {
        state(w) == "running" && w["status"]["health"] == "none"
    });
    converged(&agent, &["svc"]);
}

#[test]
fn bad_documents_are_refused_and_the_running_state_is_untouched() {
    let agent = agent();
    agent.start_daemon();
    applied(&agent, &document(5, &[("app", 1, "", &[workload("a", "sleep 600", "")])]));
    let before = converged(&agent, &["a"]);

    let err = refused(&agent, "version = 1\ngeneration = \"six\"\n");
    assert!(err.contains("generation"), "{err}");
    let err = refused(&agent, "version = 9\ngeneration = 6\n");
    assert!(err.contains("version 9") && err.contains("update the agent"), "{err}");
    let dup = [workload("a", "sleep 1", ""), workload("a", "sleep 2", "")];
    let err = refused(&agent, &document(6, &[("app", 2, "", &dup)]));
    assert!(err.contains("workload `a` appears twice"), "{err}");
    let err = refused(&agent, &document(4, &[("app", 2, "", &[workload("a", "sleep 3", "")])]));
    assert!(err.contains('4') && err.contains('5'), "a lower generation names both: {err}");

    std::thread::sleep(Duration::from_millis(500));
    let after = converged(&agent, &["a"]);
    assert_eq!(pid(&after["a"]), pid(&before["a"]), "the running workload was not touched");
    assert!(agent.events().iter().any(|e| e["event"] == "rejected"));
}

#[test]
fn agent_killed_at_random_moments_while_applying_always_converges_to_the_newest_acknowledged_state() {
    let agent = agent();
    let rounds: u64 = std::env::var("OUTPOST_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let mut seed: u64 = std::env::var("OUTPOST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed);
    println!("seed {seed}, {rounds} rounds (replay with OUTPOST_SEED={seed})");
    let mut random = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    // Each generation's workloads: c0, c1 and sometimes c2, each sleeping a
    // number of seconds that tells which generation started it.
    let wanted = |generation: u64, count: u64| -> Vec<(String, String)> {
        (0..count).map(|i| (format!("c{i}"), format!("sleep {}", 600 + (generation + i) % 3))).collect()
    };
    let mut counts = BTreeMap::new();
    let mut acknowledged = 0;
    agent.start_daemon();
    for generation in 1..=rounds {
        let count = 2 + random(2);
        counts.insert(generation, count);
        let workloads: Vec<String> = wanted(generation, count).iter().map(|(n, c)| workload(n, c, "")).collect();
        let file = agent.data.path().join("round.toml");
        let signed =
            testkit::trust::operator().sign_document(&document(generation, &[("app", generation, "", &workloads)]));
        std::fs::write(&file, signed).unwrap();
        let mut apply = agent
            .command()
            .args(["apply", "-f", file.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(random(80)));
        agent.kill_daemon();
        if apply.wait().unwrap().success() {
            acknowledged = generation;
        }
        agent.start_daemon();
    }
    assert!(acknowledged > 0, "no apply was ever acknowledged");
    // What the store holds: the newest acknowledged generation, or a newer one stored just before a kill.
    let stored = agent
        .events()
        .iter()
        .filter(|e| e["event"] == "applied")
        .filter_map(|e| e["generation"].as_u64())
        .max()
        .unwrap();
    assert!(stored >= acknowledged, "the store lost acknowledged generation {acknowledged} (has {stored})");
    let expected = wanted(stored, counts[&stored]);
    let names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    converged(&agent, &names);
    // A workload whose command changed is replaced after the names converge.
    let cmdline = |w: &Value| {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid(w))).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    };
    for (name, command) in &expected {
        agent.wait_for(name, WAIT, &format!("running generation {stored}'s `{command}`"), |w| {
            state(w) == "running" && cmdline(w).contains(command.as_str())
        });
    }
}
