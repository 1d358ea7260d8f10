//! Fleet deployments rolled out by the hub to simulated devices, which the
//! tests drive by hand: what each device reports, and when.

use outpost_proto::sync::{encode, Channel, Encoding, EventBatch, Report, WorkloadReport, PROTOCOL_VERSION};
use outpost_proto::{AgentUpdate, Event, EventKind, UpdateOrigin};
use serde_json::{json, Value};

use crate::support::*;

/// pump-3 and pump-4 are at site a, pump-5 at site b.
async fn site(hub: &TestHub) -> [DeviceSimulator; 3] {
    for (device, site) in [("pump-3", "a"), ("pump-4", "a"), ("pump-5", "b")] {
        let (status, body) =
            hub.put(&format!("/v1/devices/{device}/labels"), &json!({ "site": site }).to_string()).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut devices = Vec::new();
    for (id, token) in DEVICES {
        devices.push(DeviceSimulator::connect(hub.mqtt, id, token).await);
    }
    devices.try_into().unwrap_or_else(|_| unreachable!())
}

/// pump-3 and pump-4 in wave order: the canary first.
fn canary_first() -> [&'static str; 2] {
    let order = hub::rollout::waves::order(["pump-3", "pump-4"]);
    [order[0], order[1]]
}

fn deployment(name: &str, selector: Value, image: &str, waves: &[&str]) -> Value {
    json!({
        "name": name,
        "selector": selector,
        "strategy": { "waves": waves, "min-healthy": "0s", "max-failure-ratio": 0.1, "on-failure": "rollback", "device-timeout": "30s" },
        "workloads": [{ "name": format!("{name}-web"), "image": pinned(image) }],
    })
}

async fn apply(hub: &TestHub, spec: &Value) -> Value {
    let name = spec["name"].as_str().unwrap();
    let (status, body) = hub.put(&format!("/v1/deployments/{name}"), &spec.to_string()).await;
    assert_eq!(status, 200, "{body}");
    body
}

pub(crate) async fn rollout_reaches(hub: &TestHub, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let found = within(WAIT, async {
        loop {
            let (_, status) = hub.get(&format!("/v1/deployments/{name}")).await;
            if check(&status) {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    found.unwrap_or_else(|| panic!("the rollout of {name} never reached {what}"))
}

/// The deployments and revisions of a desired state, as (name, revision).
fn due(desired: &outpost_proto::sync::DesiredMessage) -> Vec<(String, u64)> {
    desired.state.deployments.iter().map(|d| (d.name.clone(), d.revision)).collect()
}

/// A device's full report: each of `deployments`' workloads at its revision, in `state`.
fn report_running(seq: u64, generation: u64, desired: &outpost_proto::sync::DesiredMessage, state: &str) -> Report {
    let workloads = desired
        .state
        .deployments
        .iter()
        .flat_map(|d| {
            d.workloads.iter().map(|w| WorkloadReport {
                name: w.name.clone(),
                deployment: Some(d.name.clone()),
                revision: Some(d.revision),
                state: state.into(),
                health: None,
                restarts: 0,
                last_exit: None,
            })
        })
        .collect();
    Report {
        v: PROTOCOL_VERSION,
        epoch: 0,
        seq,
        full: true,
        generation: Some(generation),
        agent_version: "0.1.0-sim".into(),
        workloads,
        removed: vec![],
    }
}

fn device<'a>(devices: &'a mut [DeviceSimulator; 3], id: &str) -> &'a mut DeviceSimulator {
    devices.iter_mut().find(|d| d.id == id).unwrap()
}

fn received_a_desired_state(device: &mut DeviceSimulator) -> bool {
    device.drain().into_iter().any(|m| matches!(m, FromHub::Desired(_)))
}

#[tokio::test]
async fn a_rollout_goes_wave_by_wave_to_the_labelled_devices_only_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut devices = site(&hub).await;
    let [canary, second] = canary_first();

    let status = apply(&hub, &deployment("app", json!({ "site": "a" }), "web:1", &["1", "100%"])).await;
    assert_eq!(status["rollout"]["counts"]["targeted"], 2, "{status}");
    assert_eq!(status["rollout"]["counts"]["due"], 1, "{status}");

    let desired = device(&mut devices, canary).desired(1).await;
    assert_eq!(due(&desired), [("app".to_string(), 1)]);
    assert!(
        !received_a_desired_state(device(&mut devices, second)),
        "the second wave started before the canary was healthy"
    );
    device(&mut devices, canary).report(&report_running(1, 1, &desired, "running")).await;

    let desired = device(&mut devices, second).desired(1).await;
    device(&mut devices, second).report(&report_running(1, 1, &desired, "running")).await;
    let status = rollout_reaches(&hub, "app", "complete", |s| s["rollout"]["state"] == "complete").await;
    let counts = &status["rollout"]["counts"];
    assert_eq!((counts["targeted"].as_u64(), counts["healthy"].as_u64()), (Some(2), Some(2)), "{status}");
    assert!(!received_a_desired_state(device(&mut devices, "pump-5")), "a device of another site got it");
    let by_hand = r#"{"version": 1, "generation": 99, "deployments": []}"#;
    let (status, body) = hub.put(&format!("/v1/devices/{canary}/desired"), by_hand).await;
    assert_eq!(status, 409, "deployments own its desired state: {body}");
    assert!(body["error"].as_str().unwrap().contains("app"), "{body}");
    hub.stop().await;
}

#[tokio::test]
async fn a_revision_failing_on_the_canary_rolls_back_and_never_reaches_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut devices = site(&hub).await;
    let [canary, second] = canary_first();
    apply(&hub, &deployment("app", json!({ "site": "a" }), "web:1", &["100%"])).await;
    for id in [canary, second] {
        let desired = device(&mut devices, id).desired(1).await;
        device(&mut devices, id).report(&report_running(1, 1, &desired, "running")).await;
    }
    rollout_reaches(&hub, "app", "complete", |s| s["rollout"]["state"] == "complete").await;

    apply(&hub, &deployment("app", json!({ "site": "a" }), "web:2", &["1", "100%"])).await;
    let desired = device(&mut devices, canary).desired(2).await;
    assert_eq!(due(&desired), [("app".to_string(), 2)]);
    device(&mut devices, canary).report(&report_running(2, 2, &desired, "crash-loop")).await;

    let status = rollout_reaches(&hub, "app", "rolled back", |s| s["rollout"]["state"] == "rolled-back").await;
    assert!(status["rollout"]["reason"].as_str().unwrap().contains("failed revision 2"), "{status}");
    let back = device(&mut devices, canary).desired(3).await;
    assert_eq!(due(&back), [("app".to_string(), 1)], "the canary returns to revision 1");
    let other = device(&mut devices, second).drain();
    assert!(
        !other.iter().any(|m| matches!(m, FromHub::Desired(d) if d.state.generation > 1)),
        "revision 2 reached the second wave"
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_device_rolling_itself_back_counts_as_a_failure_of_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut devices = site(&hub).await;
    let [canary, _] = canary_first();
    apply(&hub, &deployment("app", json!({ "site": "a" }), "web:1", &["100%"])).await;
    apply(&hub, &deployment("app", json!({ "site": "a" }), "web:2", &["1", "100%"])).await;
    let desired = device(&mut devices, canary).desired_with("app", 2).await;
    let generation = desired.state.generation;
    let batch = EventBatch {
        v: PROTOCOL_VERSION,
        epoch: 0,
        events: vec![Event {
            seq: 1,
            at: 1,
            kind: EventKind::RolledBack {
                deployment: "app".into(),
                from_revision: 2,
                to_revision: 1,
                reason: "web failed its health probe".into(),
            },
        }],
        oldest_held: Some(1),
    };
    let canary_device = device(&mut devices, canary);
    canary_device.publish(Channel::Events, false, encode(Encoding::Json, &batch)).await;
    canary_device.report(&report_running(1, generation, &desired, "starting")).await;
    let status = rollout_reaches(&hub, "app", "rolled back", |s| s["rollout"]["state"] == "rolled-back").await;
    assert_eq!(status["rollout"]["counts"]["failed"], 0, "counted against revision 1 once rolled back: {status}");
    assert!(status["rollout"]["reason"].as_str().unwrap().contains("1 of 1"), "{status}");
    hub.stop().await;
}

#[tokio::test]
async fn two_deployments_on_a_device_merge_and_a_shared_workload_goes_to_the_higher_priority() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut devices = site(&hub).await;
    let mut base = deployment("base", json!({}), "exporter:1", &["100%"]);
    base["workloads"] =
        json!([{ "name": "metrics", "image": pinned("exporter:1") }, { "name": "logs", "image": pinned("fluent:1") }]);
    let mut app = deployment("app", json!({ "site": "b" }), "web:1", &["100%"]);
    app["priority"] = json!(10);
    app["workloads"] =
        json!([{ "name": "web", "image": pinned("web:1") }, { "name": "logs", "image": pinned("app-logs:1") }]);
    apply(&hub, &base).await;
    apply(&hub, &app).await;

    let pump5 = device(&mut devices, "pump-5");
    let desired = pump5.desired_with("app", 1).await;
    let names: Vec<(String, Vec<String>)> = desired
        .state
        .deployments
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                d.active_workloads().map(|w| format!("{}={}", w.name, w.image.split('@').next().unwrap())).collect(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("app".to_string(), vec!["web=web:1".to_string(), "logs=app-logs:1".to_string()]),
            ("base".to_string(), vec!["metrics=exporter:1".to_string()])
        ]
    );
    // The loser keeps the workload it lost, excluded: its signature covers it.
    assert_eq!(desired.state.deployment("base").unwrap().excluded, ["logs"]);
    let (_, status) = hub.get("/v1/deployments/base").await;
    assert_eq!(
        status["conflicts"],
        json!([{ "device": "pump-5", "workload": "logs", "winner": "app", "loser": "base" }]),
        "{status}"
    );
    let pump3 = device(&mut devices, "pump-3").desired_with("base", 1).await;
    assert_eq!(pump3.state.deployments[0].workloads.len(), 2, "no conflict where app does not run");
    hub.stop().await;
}

#[tokio::test]
async fn a_selector_change_moves_workloads_off_some_devices_and_onto_others() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut devices = site(&hub).await;
    apply(&hub, &deployment("app", json!({ "site": "a" }), "web:1", &["100%"])).await;
    device(&mut devices, "pump-3").desired_with("app", 1).await;

    apply(&hub, &deployment("app", json!({ "site": "b" }), "web:1", &["100%"])).await;
    let gone = device(&mut devices, "pump-3").desired(2).await;
    assert!(gone.state.deployments.is_empty(), "still on pump-3: {:?}", due(&gone));
    let arrived = device(&mut devices, "pump-5").desired_with("app", 2).await;
    assert_eq!(due(&arrived), [("app".to_string(), 2)]);

    // Labels move devices too.
    let (status, _) = hub.put("/v1/devices/pump-4/labels", &json!({ "site": "b" }).to_string()).await;
    assert_eq!(status, 200);
    device(&mut devices, "pump-4").desired_with("app", 2).await;
    hub.stop().await;
}

#[tokio::test]
async fn a_device_offline_during_the_rollout_does_not_hold_it_and_gets_the_revision_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let [mut pump3, pump4, pump5] = site(&hub).await;
    pump4.cut();
    pump5.cut();
    hub.wait_for_device("pump-4", "offline", |d| d["online"] == false).await;
    let mut spec = deployment("app", json!({ "site": "a" }), "web:1", &["100%"]);
    spec["strategy"]["device-timeout"] = json!("1s");
    apply(&hub, &spec).await;
    let desired = pump3.desired_with("app", 1).await;
    pump3.report(&report_running(1, desired.state.generation, &desired, "running")).await;
    let status = rollout_reaches(&hub, "app", "complete", |s| s["rollout"]["state"] == "complete").await;
    assert_eq!(status["rollout"]["counts"]["offline"], 1, "{status}");

    let mut pump4 = DeviceSimulator::connect(hub.mqtt, "pump-4", token("pump-4")).await;
    pump4.desired_with("app", 1).await;
    hub.stop().await;
}

#[tokio::test]
async fn a_restarted_hub_resumes_the_rollout_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut devices = site(&hub).await;
    let [canary, second] = canary_first();
    apply(&hub, &deployment("app", json!({ "site": "a" }), "web:1", &["1", "100%"])).await;
    device(&mut devices, canary).desired(1).await;
    for d in devices {
        d.cut();
    }
    hub.stop().await;

    let hub = TestHub::start(config(dir.path())).await;
    let (_, status) = hub.get("/v1/deployments/app").await;
    assert_eq!(
        (status["rollout"]["state"].as_str(), status["rollout"]["wave"].as_u64()),
        (Some("progressing"), Some(0))
    );
    let mut canary_device = DeviceSimulator::connect(hub.mqtt, canary, token(canary)).await;
    let desired = canary_device.desired(1).await;
    canary_device.report(&report_running(1, 1, &desired, "running")).await;
    let mut second_device = DeviceSimulator::connect(hub.mqtt, second, token(second)).await;
    second_device.desired_with("app", 1).await;
    hub.stop().await;
}

#[tokio::test]
async fn operators_pause_resume_and_roll_back_by_hand_and_bad_requests_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let _devices = site(&hub).await;
    apply(&hub, &deployment("app", json!({ "site": "a" }), "web:1", &["1", "100%"])).await;
    let (status, body) = hub.post("/v1/deployments/app/rollout/pause", "").await;
    assert_eq!((status, body["rollout"]["state"].as_str()), (200, Some("paused")), "{body}");
    let (status, body) = hub.post("/v1/deployments/app/rollout/pause", "").await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = hub.post("/v1/deployments/app/rollout/rollback", "").await;
    assert_eq!(status, 409, "revision 1 has nothing before it: {body}");
    assert!(body["error"].as_str().unwrap().contains("hub deployment delete"), "{body}");
    let (status, _) = hub.post("/v1/deployments/app/rollout/resume", "").await;
    assert_eq!(status, 200);

    apply(&hub, &deployment("app", json!({ "site": "a" }), "web:2", &["1", "100%"])).await;
    let (status, body) = hub.post("/v1/deployments/app/rollout/rollback", "").await;
    assert_eq!((status, body["rollout"]["state"].as_str()), (200, Some("rolled-back")), "{body}");
    let (status, body) = hub.post("/v1/deployments/app/rollout/rollback", r#"{"revision": 2}"#).await;
    assert_eq!((status, body["rollout"]["revision"].as_u64()), (200, Some(2)), "{body}");
    let (status, body) = hub.post("/v1/deployments/app/rollout/rollback", r#"{"revision": 9}"#).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = hub.post("/v1/deployments/app/rollout/jump", "").await;
    assert_eq!(status, 404);
    let (_, revisions) = hub.get("/v1/deployments/app/revisions").await;
    assert_eq!(revisions.as_array().unwrap().len(), 2);

    let (status, body) =
        hub.put("/v1/deployments/other", &deployment("app", json!({}), "x:1", &["100%"]).to_string()).await;
    assert_eq!(status, 400, "{body}");
    let mut bad = deployment("bad", json!({}), "x:1", &["0%"]);
    let (status, body) = hub.put("/v1/deployments/bad", &bad.to_string()).await;
    assert!(status == 400 && body["error"].as_str().unwrap().contains("wave"), "{body}");
    bad["strategy"]["waves"] = json!(["100%"]);
    bad["workloads"] = json!([]);
    let (status, body) = hub.put("/v1/deployments/bad", &bad.to_string()).await;
    assert!(status == 400 && body["error"].as_str().unwrap().contains("no workloads"), "{body}");
    hub.stop().await;
}

#[tokio::test]
async fn a_deployment_breaking_the_admission_policy_is_refused_naming_each_rule() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut spec = deployment("app", json!({}), "web:1", &["100%"]);
    spec["workloads"][0]["privileged"] = json!(true);
    spec["workloads"][0]["mounts"] = json!([{ "source": "/etc", "target": "/host-etc" }]);
    let (status, body) = hub.put("/v1/deployments/app", &spec.to_string()).await;
    assert_eq!(status, 403, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("policy.allow-privileged") && error.contains("policy.allowed-host-paths"), "{error}");
    let (status, _) = hub.get("/v1/deployments/app").await;
    assert_eq!(status, 404, "nothing stored");

    let mut unpinned = deployment("app", json!({}), "web:1", &["100%"]);
    unpinned["workloads"][0]["image"] = json!("127.0.0.1:1/web:1");
    let (status, body) = hub.put("/v1/deployments/app", &unpinned.to_string()).await;
    assert_eq!(status, 502, "a registry the hub cannot reach: {body}");
    assert!(body["error"].as_str().unwrap().contains("pin the image yourself"), "{body}");
    hub.stop().await;
}

fn agent_update(version: &str, waves: &[&str]) -> Value {
    json!({
        "name": "agent",
        "selector": { "site": "a" },
        "strategy": { "waves": waves, "min-healthy": "0s", "max-failure-ratio": 0.1, "on-failure": "rollback", "device-timeout": "30s" },
        "update": { "target": format!("edge-agent-{version}"), "version": version },
    })
}

async fn send_event(device: &DeviceSimulator, seq: u64, kind: EventKind) {
    let batch =
        EventBatch { v: PROTOCOL_VERSION, epoch: 0, events: vec![Event { seq, at: 1, kind }], oldest_held: Some(seq) };
    device.publish(Channel::Events, false, encode(Encoding::Json, &batch)).await;
}

/// What a device says once its new agent confirmed itself for `revision`.
async fn confirm_agent_update(device: &DeviceSimulator, seq: u64, desired: &outpost_proto::sync::DesiredMessage) {
    let d = desired.state.deployment("agent").expect("the agent deployment");
    let update = d.update.clone().expect("an agent update");
    device.report(&report_running(seq, desired.state.generation, desired, "running")).await;
    let from = Some(UpdateOrigin { deployment: "agent".into(), revision: d.revision });
    send_event(device, seq, EventKind::Updated { target: update.target, version: update.version, from }).await;
}

#[tokio::test]
async fn an_agent_update_rolls_out_in_waves_as_devices_confirm_it_and_rolls_back_when_the_canary_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut devices = site(&hub).await;
    let [canary, second] = canary_first();

    apply(&hub, &agent_update("2.0", &["1", "100%"])).await;
    let desired = device(&mut devices, canary).desired(1).await;
    let expected = AgentUpdate { target: "edge-agent-2.0".into(), version: "2.0".into() };
    assert_eq!(desired.state.deployment("agent").unwrap().update, Some(expected));
    device(&mut devices, canary).report(&report_running(1, 1, &desired, "running")).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !received_a_desired_state(device(&mut devices, second)),
        "the second wave started before the canary confirmed"
    );
    confirm_agent_update(device(&mut devices, canary), 2, &desired).await;

    let desired = device(&mut devices, second).desired(1).await;
    confirm_agent_update(device(&mut devices, second), 1, &desired).await;
    let status = rollout_reaches(&hub, "agent", "complete", |s| s["rollout"]["state"] == "complete").await;
    assert_eq!(status["rollout"]["counts"]["healthy"], 2, "{status}");
    assert!(!received_a_desired_state(device(&mut devices, "pump-5")), "a device of another site got it");

    // Revision 2: the canary's new agent never confirms and its old one comes back.
    apply(&hub, &agent_update("3.0", &["1", "100%"])).await;
    let desired = device(&mut devices, canary).desired(2).await;
    let from = Some(UpdateOrigin { deployment: "agent".into(), revision: 2 });
    let reason = "not healthy within 60s: the hub was not reached".to_string();
    let kind = EventKind::UpdateRolledBack { target: "edge-agent-3.0".into(), version: "3.0".into(), reason, from };
    send_event(device(&mut devices, canary), 3, kind).await;
    device(&mut devices, canary).report(&report_running(3, 2, &desired, "running")).await;

    let status = rollout_reaches(&hub, "agent", "rolled back", |s| s["rollout"]["state"] == "rolled-back").await;
    assert!(status["rollout"]["reason"].as_str().unwrap().contains("failed revision 2"), "{status}");
    let back = device(&mut devices, canary).desired(3).await;
    let version = back.state.deployment("agent").and_then(|d| d.update.as_ref()).map(|u| u.version.clone());
    assert_eq!(version.as_deref(), Some("2.0"), "the canary is sent back to agent 2.0");
    let other = device(&mut devices, second).drain();
    assert!(
        !other.iter().any(|m| matches!(m, FromHub::Desired(d) if d.state.generation > 1)),
        "agent 3.0 reached the second wave"
    );
    let (_, view) = hub.get(&format!("/v1/devices/{canary}/events")).await;
    assert!(view.to_string().contains("update-rolled-back"), "the hub keeps the device's event: {view}");
    hub.stop().await;
}
