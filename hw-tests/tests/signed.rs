//! Signed deployments with a real agent (daemon, containers) and a real hub:
//! the agent runs only what the test operator's deployments key signed
//! (testkit::trust), refuses the rest, reports it, and keeps running its last
//! good state. Needs root (CI runs as root).

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::agent::{state, Agent};
use testkit::hub::Hub;

const WAIT: Duration = Duration::from_secs(30);
const DEVICE: &str = "signed-1";
const TOKEN: &str = "signed-1-token";

fn document(generation: u64, command: &str) -> String {
    let image = testkit::image::busybox_pinned();
    format!(
        "version = 1\ngeneration = {generation}\n[[deployments]]\nname = \"app\"\nrevision = {generation}\n\
         [[deployments.workloads]]\nname = \"svc\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", {command:?}]\nstop-grace-period = \"100ms\"\n"
    )
}

fn linked_agent(hub: &Hub) -> Agent {
    let mut agent = Agent::new();
    testkit::import_busybox(&agent);
    agent.link_to(hub.mqtt, DEVICE, TOKEN);
    agent.start_daemon();
    agent
}

fn wait_until<T>(what: &str, logs: impl Fn() -> String, check: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "never: {what}\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_deployment_altered_at_the_hub_is_refused_reported_to_the_hub_and_the_previous_workload_keeps_running() {
    let hub = Hub::new(&[(DEVICE, TOKEN)]);
    let agent = linked_agent(&hub);
    let logs = || format!("hub log:\n{}\nagent log:\n{}", hub.log(), agent.daemon_log());
    hub.set_desired(DEVICE, &document(1, "exec sleep 601"));
    let running = agent.wait_for("svc", WAIT, "running", |w| state(w) == "running");
    let pid = running["status"]["pid"].as_i64().expect("a pid");

    // The operator signed generation 2 running `sleep 602`; the hub (or someone
    // on its network) sends `sleep 666` under those signatures.
    let signed = testkit::trust::operator().sign_document(&document(2, "exec sleep 602"));
    let altered = signed.replace("sleep 602", "sleep 666");
    assert_ne!(signed, altered);
    let file = hub.data.path().join("altered.json");
    std::fs::write(&file, altered).unwrap();
    let out = hub.cli(&["set-desired", DEVICE, "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "a hub without trust-root stores and forwards: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let reason = wait_until("the hub has the device's refused event", logs, || {
        let events = hub.get(&format!("/v1/devices/{DEVICE}/events?after=0"));
        let events = events.as_array().cloned().or_else(|| events["events"].as_array().cloned())?;
        let refused = events.iter().find(|e| e["event"] == "refused" && e["generation"] == 2)?;
        Some(refused["reason"].as_str().unwrap_or_default().to_string())
    });
    assert!(reason.contains("deployment app revision 2") && reason.contains("altered after signing"), "{reason}");
    let device = hub.get(&format!("/v1/devices/{DEVICE}"));
    assert_eq!(device["refused"]["generation"], 2, "{device:#}");
    assert_eq!(device["generation"], 1, "the device still reports generation 1 stored: {device:#}");
    let devices = hub.cli(&["devices"]);
    assert!(String::from_utf8_lossy(&devices.stdout).contains("1/2 (refused 2)"), "{devices:?}");

    // The last good state keeps running, untouched.
    std::thread::sleep(Duration::from_secs(1));
    let svc = agent.workload("svc");
    assert_eq!(svc["status"]["pid"].as_i64(), Some(pid), "{svc:#}\n{}", logs());
    assert!(agent.daemon_log().contains("refused desired state generation 2"), "{}", logs());
}

#[test]
fn edge_agent_apply_refuses_an_unsigned_file_and_one_signed_by_a_key_the_root_does_not_list() {
    let agent = Agent::new();
    testkit::import_busybox(&agent);
    let doc = document(1, "exec sleep 603");

    let out = agent.apply_as_is(&doc);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unsigned file was applied");
    assert!(err.contains("is not signed") && err.contains("ota sign-desired --key"), "{err}");

    let mut desired = outpost_proto::DesiredState::parse(&doc).unwrap();
    let (stranger, _) = ota::SigningKey::generate().unwrap();
    ota::sign_desired(&mut desired, &stranger).unwrap();
    let out = agent.apply_as_is(&serde_json::to_string(&desired).unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a file signed by an unknown key was applied");
    assert!(err.contains("keys the trusted root does not list"), "{err}");

    let events = agent.events();
    assert_eq!(events.iter().filter(|e| e["event"] == "refused").count(), 2, "{events:#?}");
    assert!(agent.workload("svc").is_null(), "nothing may run");

    // The operator's signature: it runs.
    let out = agent.apply(&doc);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    agent.wait_for("svc", WAIT, "running", |w| state(w) == "running");
}

#[test]
fn without_a_trusted_root_a_new_desired_state_is_refused_naming_trust_root() {
    let mut agent = Agent::new();
    agent.use_config("trust-root = \"/nonexistent/outpost/root.json\"\n");
    testkit::import_busybox(&agent);
    let out = agent.apply(&document(1, "exec sleep 604"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "applied with no trusted root");
    assert!(err.contains("trust-root") && err.contains("ota new-root"), "{err}");
}

#[test]
fn a_deployment_signed_through_hub_apply_key_runs_and_its_revision_keeps_the_signatures() {
    let hub = Hub::new(&[(DEVICE, TOKEN)]);
    let agent = linked_agent(&hub);
    let labelled = hub.cli(&["label", DEVICE, "site=lab"]);
    assert!(labelled.status.success(), "{}", String::from_utf8_lossy(&labelled.stderr));
    let spec = json!({
        "name": "app",
        "selector": { "site": "lab" },
        "strategy": { "waves": ["100%"], "min-healthy": "1s" },
        "workloads": [{
            "name": "svc", "image": testkit::image::busybox_pinned(), "command": ["/bin/sh", "-c", "exec sleep 605"],
            "stop-grace-period": "100ms",
        }],
    });
    let file = hub.data.path().join("app.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    let key = testkit::trust::operator().deployments_key_path();
    let out = hub.cli(&["apply", "-f", file.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("revision 1"), "{out:?}");

    let revisions = hub.get("/v1/deployments/app/revisions");
    assert_eq!(revisions[0]["signatures"].as_array().map(Vec::len), Some(1), "{revisions:#}");
    agent.wait_for("svc", WAIT, "running", |w| state(w) == "running");
}
