//! Operators' commands and store resets with a real agent (daemon,
//! containers) and a real hub (embedded broker, HTTP API, CLI) over
//! loopback. Needs root (CI runs as root).

use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::{state, Agent};
use testkit::hub::Hub;

const WAIT: Duration = Duration::from_secs(30);
const DEVICE: &str = "pump-3";
const TOKEN: &str = "pump-3-token";

/// The hub, and an agent linked to its broker.
struct Site {
    hub: Hub,
    agent: Agent,
}

fn site() -> Site {
    let mut agent = Agent::new();
    testkit::import_busybox(&agent);
    let hub = Hub::new(&[(DEVICE, TOKEN)]);
    agent.link_to(hub.mqtt, DEVICE, TOKEN);
    agent.start_daemon();
    Site { hub, agent }
}

fn document(generation: u64, command: &str) -> String {
    let image = testkit::image::busybox_pinned();
    format!(
        "version = 1\ngeneration = {generation}\n[[deployments]]\nname = \"app\"\nrevision = {generation}\n\
         [[deployments.workloads]]\nname = \"svc\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", {command:?}]\nstop-grace-period = \"100ms\"\n"
    )
}

/// Polls the hub's view of the device until `check` holds.
fn hub_sees(site: &Site, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = site.hub.try_get(&format!("/v1/devices/{DEVICE}")).unwrap_or(Value::Null);
        if check(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "the hub never saw {what}: {seen:#}\nhub log:\n{}\nagent log:\n{}",
            site.hub.log(),
            site.agent.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn runs_svc(device: &Value) -> bool {
    device["workloads"].as_array().into_iter().flatten().any(|w| w["name"] == "svc" && w["state"] == "running")
}

/// `hub ARGS...`: its stdout when it succeeds, its stderr as the error otherwise.
fn hub_cli(site: &Site, args: &[&str]) -> Result<String, String> {
    let out = site.hub.cli(args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn pid(agent: &Agent) -> i64 {
    agent.wait_for("svc", WAIT, "running", |w| state(w) == "running")["status"]["pid"].as_i64().unwrap()
}

#[test]
fn operator_reads_a_workloads_logs_and_restarts_it_through_the_hub() {
    let site = site();
    site.hub.set_desired(DEVICE, &document(1, "echo started; for i in 1 2 3; do echo line $i; done; exec sleep 600"));
    hub_sees(&site, "svc running", runs_svc);
    let first = pid(&site.agent);

    let logs = hub_cli(&site, &["logs", DEVICE, "svc", "--timeout", "20s"]).unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 4, "{logs}");
    assert!(lines[0].ends_with("stdout started") && lines[3].ends_with("stdout line 3"), "{logs}");
    let tail = hub_cli(&site, &["logs", DEVICE, "svc", "--tail", "2"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(tail.lines().count() == 2 && tail.ends_with("line 3\n"), "{tail}");
    let unknown = hub_cli(&site, &["logs", DEVICE, "nope"]).expect_err("logs of a workload the device does not run");
    assert!(unknown.contains("no workload named \"nope\""), "{unknown}");

    let sent = hub_cli(&site, &["restart", DEVICE, "svc"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(sent.contains("restart of svc sent"), "{sent}");
    let deadline = Instant::now() + WAIT;
    while pid(&site.agent) == first {
        assert!(Instant::now() < deadline, "svc was never restarted: {}", site.agent.daemon_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    hub_sees(&site, "svc running again", runs_svc);
    // The new process wrote its lines after the old one's.
    let logs = hub_cli(&site, &["logs", DEVICE, "svc", "--timeout", "20s"]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(logs.lines().filter(|l| l.ends_with("stdout started")).count(), 2, "{logs}");
}

#[test]
fn a_wiped_agent_store_numbers_afresh_and_the_hub_shows_its_new_reports_and_events() {
    let site = site();
    site.hub.set_desired(DEVICE, &document(1, "exec sleep 601"));
    let before = hub_sees(&site, "generation 1 and its events", |d| {
        d["generation"] == 1 && runs_svc(d) && d["event_seq"].as_u64() >= Some(2)
    });
    let old_events = site.hub.get(&format!("/v1/devices/{DEVICE}/events")).as_array().unwrap().len();

    // Wiped: the store and its snapshot go; the agent starts from nothing and
    // gets its desired state from the hub again. The hub restarts meanwhile, so
    // that its new broker has no session of the device: on subscribing, the
    // device surely gets the retained ack of the old store, with numbers above
    // the new store's, and must not take it for its own.
    site.agent.kill_daemon();
    site.hub.kill();
    for path in [site.agent.data.path().join("store"), site.agent.data.path().join("desired.json")] {
        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        assert!(!path.exists(), "{} was not removed", path.display());
    }
    site.hub.start();
    site.agent.start_daemon();

    let after = hub_sees(&site, "the new store's reports", |d| {
        d["epoch"] != before["epoch"] && d["generation"] == 1 && runs_svc(d) && d["stale"] == false
    });
    assert!(after["store_reset_at"].as_u64().is_some(), "{after:#}");
    // The new store's events (the desired state applied again) are stored after the old ones, none dropped.
    let deadline = Instant::now() + WAIT;
    loop {
        let events = site.hub.get(&format!("/v1/devices/{DEVICE}/events"));
        let events = events.as_array().unwrap();
        let applied = events.iter().filter(|e| e["event"] == "applied" && e["generation"] == 1).count();
        let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "numbered in order, each once: {seqs:?}");
        if applied == 2 && events.len() > old_events {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new store's events never all arrived: {events:#?}\nhub log:\n{}\nagent log:\n{}",
            site.hub.log(),
            site.agent.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = site.agent.daemon_log();
    assert!(log.contains("ignored the hub's ack of another store"), "the stale ack never came:\n{log}");
    // Its outbox empties once the hub acknowledges this store's numbers.
    let deadline = Instant::now() + WAIT;
    while !site.agent.events().is_empty() {
        assert!(Instant::now() < deadline, "the agent's outbox never emptied: {}", site.agent.daemon_log());
        std::thread::sleep(Duration::from_millis(200));
    }
}
