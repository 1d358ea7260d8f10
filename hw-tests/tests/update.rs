//! Agent self-update on a real kernel: the real daemon updates itself from a
//! TUF repository served over loopback HTTP, into the slots under its data
//! dir, while a real container workload keeps running. Needs root.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::{agent_binary, state, Agent};
use testkit::http::StaticServer;
use testkit::tuf::TufRepo;

const HARDWARE: &str = "test-board";
const WAIT: Duration = Duration::from_secs(15);
/// Downloading and writing two copies of a debug build takes a while.
const UPDATE_WAIT: Duration = Duration::from_secs(120);

/// A daemon with a long-running workload, configured to update from `repo`.
struct Setup {
    agent: Agent,
    _server: StaticServer,
    container_pid: i64,
}

fn setup(repo: &TufRepo, extra_config: &str) -> Setup {
    let server = StaticServer::start(repo.dir()).unwrap();
    let mut agent = Agent::new();
    let root = agent.data.path().join("root.json");
    std::fs::write(&root, repo.root_json()).unwrap();
    agent.use_config(&format!(
        "hub-http = \"{}\"\nhardware = \"{HARDWARE}\"\ntrust-root = \"{}\"\n{extra_config}",
        server.url(),
        root.display()
    ));
    let image = testkit::import_busybox(&agent);
    agent.run_spec(&format!(
        "name = \"steady\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 3600\"]\nstop-grace-period = \"1s\"\n"
    ));
    let w = agent.wait_for("steady", WAIT, "running", |w| state(w) == "running" && w["status"]["pid"].is_i64());
    let container_pid = w["status"]["pid"].as_i64().unwrap();
    agent.start_daemon();
    Setup { agent, _server: server, container_pid }
}

/// The running agent binary with a few bytes appended: another sha256, and it runs.
fn new_agent_build() -> Vec<u8> {
    let mut bytes = std::fs::read(agent_binary()).unwrap();
    bytes.extend_from_slice(b"\nedge-agent 2.0.0\n");
    bytes
}

fn slot_binary(agent: &Agent, slot: &str) -> PathBuf {
    agent.data.path().join("agent").join(slot).join("edge-agent")
}

fn update_status(agent: &Agent) -> Value {
    serde_json::from_str(&agent.ok(&["update", "--status", "--json"])).unwrap()
}

/// Polls until `check` holds, or panics with the daemon's log.
fn wait_until(agent: &Agent, timeout: Duration, what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} not within {timeout:?}; daemon log:\n{}", agent.daemon_log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Events as the daemon serves them; empty while it is between execs.
fn events(agent: &Agent) -> Vec<Value> {
    let out = agent.exec(&["events", "--json"]);
    serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

fn daemon_exe(agent: &Agent) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{}/exe", agent.daemon_pid()?)).ok()
}

#[test]
fn agent_updates_itself_into_slot_b_and_confirms_while_the_workload_keeps_its_pid() {
    let mut repo = TufRepo::new();
    repo.add_target("edge-agent", "2.0.0", &new_agent_build(), &[HARDWARE]);
    repo.publish();
    // Bound whole: the server must outlive the update.
    let setup = setup(&repo, "update-health-deadline = \"30s\"\n");
    let (agent, container_pid) = (&setup.agent, setup.container_pid);
    let pid = agent.daemon_pid().unwrap();

    let out = agent.ok(&["update", "--target", "edge-agent"]);
    assert!(out.contains("installed in slot B"), "{out}");

    let slot_b = slot_binary(agent, "b");
    wait_until(agent, UPDATE_WAIT, "the agent running from slot B, confirmed", || {
        daemon_exe(agent).as_ref() == Some(&slot_b) && update_status(agent)["confirmed"] == true
    });
    assert_eq!(agent.daemon_pid(), Some(pid), "exec keeps the daemon's pid");
    assert_eq!(update_status(agent)["slot"], "B");
    assert_eq!(std::fs::read(&slot_b).unwrap(), new_agent_build());
    wait_until(agent, WAIT, "an updated event", || {
        events(agent).iter().any(|e| e["event"] == "updated" && e["version"] == "2.0.0")
    });
    let w = agent.workload("steady");
    assert_eq!((state(&w), w["status"]["pid"].as_i64()), ("running", Some(container_pid)), "{w:#}");
}

#[test]
fn agent_update_that_never_confirms_is_rolled_back_by_boot_counting_and_the_workload_never_stops() {
    let mut repo = TufRepo::new();
    repo.add_target("edge-agent", "2.0.0", &new_agent_build(), &[HARDWARE]);
    repo.publish();
    // The hub is configured but never answers: the updated agent cannot
    // confirm itself, the old one never needed to.
    let setup = setup(&repo, "hub = \"mqtt://127.0.0.1:9\"\nupdate-health-deadline = \"2s\"\n");
    let (agent, container_pid) = (&setup.agent, setup.container_pid);

    let out = agent.ok(&["update", "--target", "edge-agent"]);
    assert!(out.contains("installed in slot B"), "{out}");

    let slot_a = slot_binary(agent, "a");
    wait_until(agent, UPDATE_WAIT, "a rollback to slot A", || {
        let status = update_status(agent);
        status["slot"] == "A" && status["confirmed"] == true && daemon_exe(agent).as_ref() == Some(&slot_a)
    });
    wait_until(agent, WAIT, "an update-rolled-back event", || {
        events(agent).iter().any(|e| {
            e["event"] == "update-rolled-back"
                && e["version"] == "2.0.0"
                && e["reason"].as_str().unwrap_or("").contains("hub was not reached")
        })
    });
    assert!(!events(agent).iter().any(|e| e["event"] == "updated"));
    assert_eq!(std::fs::read(&slot_a).unwrap(), std::fs::read(agent_binary()).unwrap(), "the old agent is back");
    let w = agent.workload("steady");
    assert_eq!((state(&w), w["status"]["pid"].as_i64()), ("running", Some(container_pid)), "{w:#}");
}

#[test]
fn agent_update_that_exits_at_once_is_rolled_back_after_the_service_manager_restarts_it_bootlimit_times() {
    let mut repo = TufRepo::new();
    repo.add_target("edge-agent", "2.0.0", b"#!/bin/sh\necho broken agent >&2\nexit 1\n", &[HARDWARE]);
    repo.publish();
    let setup = setup(&repo, "");
    let (agent, container_pid) = (&setup.agent, setup.container_pid);

    agent.ok(&["update", "--target", "edge-agent"]);

    // Boot 1: the daemon execs into the update, which exits.
    let status = agent.wait_daemon_exit(UPDATE_WAIT).expect("the broken agent exits");
    assert_eq!(status.code(), Some(1), "{}", agent.daemon_log());
    // Boots 2 and 3, as systemd's Restart=always would start them.
    for boot in 2..=edge_agent::update::BOOTLIMIT {
        let out = agent.command().arg("daemon").output().unwrap();
        assert_eq!(out.status.code(), Some(1), "boot {boot}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(update_status(agent)["bootcount"], boot);
    }
    // Past the limit, the previous agent runs again.
    agent.start_daemon();
    let slot_a = slot_binary(agent, "a");
    wait_until(agent, WAIT, "the agent running from slot A", || daemon_exe(agent).as_ref() == Some(&slot_a));
    assert_eq!(update_status(agent)["slot"], "A");
    wait_until(agent, WAIT, "an update-rolled-back event", || {
        events(agent).iter().any(|e| {
            e["event"] == "update-rolled-back" && e["reason"].as_str().unwrap_or("").contains("within 3 boots")
        })
    });
    let w = agent.workload("steady");
    assert_eq!((state(&w), w["status"]["pid"].as_i64()), ("running", Some(container_pid)), "{w:#}");
}

/// The whole way an operator updates a fleet's agents: the update pushed to
/// a real hub (metadata and artifact in its site cache), a signed deployment
/// naming it applied with `hub apply --key`, the real daemon linked over MQTT
/// installing it from the hub, restarting into it and confirming, and the
/// hub's rollout completing on that confirmation.
#[test]
fn an_agent_update_rolled_out_through_the_hub_is_installed_confirmed_and_completes_the_rollout() {
    const DEVICE: &str = "pi-1";
    let (deployments_key, pkcs8) = ota::SigningKey::generate().unwrap();
    let mut repo = TufRepo::new();
    repo.trust_deployments(&deployments_key);
    let new_agent = new_agent_build();
    repo.add_target("edge-agent-2.0.0", "2.0.0", &new_agent, &[HARDWARE]);
    repo.publish();

    let hub = testkit::hub::Hub::new(&[(DEVICE, "token-1")]);
    let tuf = repo.dir().join("v1/tuf");
    let pushed = hub.cli(&["tuf", "push", tuf.to_str().unwrap()]);
    assert!(pushed.status.success(), "hub tuf push: {}", String::from_utf8_lossy(&pushed.stderr));
    let artifact = repo.artifact_path(&new_agent);
    let pushed = hub.cli(&["artifact", "push", artifact.to_str().unwrap()]);
    assert!(pushed.status.success(), "hub artifact push: {}", String::from_utf8_lossy(&pushed.stderr));

    let mut agent = Agent::new();
    let root = agent.data.path().join("root.json");
    std::fs::write(&root, repo.root_json()).unwrap();
    agent.use_config(&format!(
        "trust-root = \"{}\"\ndevice-id = \"{DEVICE}\"\nhub = \"mqtt://{}\"\nhub-token = \"token-1\"\n\
         hub-http = \"http://{}\"\nhardware = \"{HARDWARE}\"\nreport-interval = \"200ms\"\nkeep-alive = \"5s\"\n\
         reconcile-interval = \"500ms\"\nupdate-health-deadline = \"30s\"\n",
        root.display(),
        hub.mqtt,
        hub.http
    ));
    agent.start_daemon();
    let pid = agent.daemon_pid().unwrap();

    let key = agent.data.path().join("deployments.key");
    std::fs::write(&key, pkcs8).unwrap();
    let spec = agent.data.path().join("agent-update.toml");
    std::fs::write(
        &spec,
        "name = \"agent\"\nupdate = { target = \"edge-agent-2.0.0\", version = \"2.0.0\" }\n\
         [strategy]\nwaves = [\"100%\"]\nmin-healthy = \"0s\"\n",
    )
    .unwrap();
    let applied = hub.cli(&["apply", "-f", spec.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    assert!(applied.status.success(), "hub apply: {}", String::from_utf8_lossy(&applied.stderr));

    let slot_b = slot_binary(&agent, "b");
    wait_until(&agent, UPDATE_WAIT, "the agent running from slot B, confirmed", || {
        daemon_exe(&agent).as_ref() == Some(&slot_b) && update_status(&agent)["confirmed"] == true
    });
    assert_eq!(agent.daemon_pid(), Some(pid), "exec keeps the daemon's pid");
    assert_eq!(std::fs::read(&slot_b).unwrap(), new_agent);
    let deadline = Instant::now() + WAIT;
    loop {
        let status = hub.get("/v1/deployments/agent");
        if status["rollout"]["state"] == "complete" {
            assert_eq!(status["rollout"]["counts"]["healthy"], 1, "{status:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout never completed: {status:#}\nhub log:\n{}\nagent log:\n{}",
            hub.log(),
            agent.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The device deletes events the hub has: the hub's copy tells.
    let events = hub.get(&format!("/v1/devices/{DEVICE}/events"));
    let events = events.as_array().cloned().unwrap_or_default();
    let updated = events.into_iter().find(|e| e["event"] == "updated").expect("the hub has the updated event");
    assert_eq!((updated["deployment"].as_str(), updated["revision"].as_u64()), (Some("agent"), Some(1)), "{updated}");
}
