//! SIMULATED devices of testkit's fleet against a real hub: they take their
//! desired states, run (in simulation) the revisions, and report them and
//! their verdicts as the agent does.

use std::time::Duration;

use outpost_proto::{Event, EventKind};
use serde_json::{json, Value};
use testkit::fleet::{Devices, FailureScript, SimSpec, SimulatedFleet};

use crate::support::*;

fn config_for(dir: &std::path::Path, devices: &[SimSpec]) -> hub::Config {
    let devices = devices.iter().map(|d| (d.id.clone(), d.token.clone())).collect();
    hub::Config { devices, ..config(dir) }
}

fn deployment(name: &str, revision: u64, workloads: &[&str]) -> Value {
    let workloads: Vec<Value> = workloads.iter().map(|w| json!({ "name": w, "image": "busybox:latest" })).collect();
    json!({ "name": name, "revision": revision, "workloads": workloads })
}

async fn set_desired(hub: &TestHub, device: &str, generation: u64, deployments: Vec<Value>) {
    let body = json!({ "version": 1, "generation": generation, "deployments": deployments });
    let (status, body) = hub.put(&format!("/v1/devices/{device}/desired"), &body.to_string()).await;
    assert_eq!(status, 200, "{body}");
}

/// Polls the device's events stored by the hub until there are `count` of them.
async fn wait_for_events(hub: &TestHub, id: &str, count: usize) -> Vec<EventKind> {
    let mut last = Vec::new();
    let found = within(WAIT, async {
        loop {
            let (status, body) = hub.get(&format!("/v1/devices/{id}/events")).await;
            assert_eq!(status, 200, "{body}");
            last = serde_json::from_value::<Vec<Event>>(body).unwrap().into_iter().map(|e| e.kind).collect();
            if last.len() >= count {
                return last.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    found.unwrap_or_else(|| panic!("{id}: the hub never stored {count} events; it has {last:#?}"))
}

/// The hub's view of a device's workloads, by name: (name, deployment, revision, state).
fn workloads_with_revisions(view: &Value) -> Vec<(String, String, u64, String)> {
    let text = |v: &Value| v.as_str().unwrap().to_string();
    let rows = view["workloads"].as_array().unwrap().iter();
    let mut rows: Vec<_> = rows
        .map(|w| (text(&w["name"]), text(&w["deployment"]), w["revision"].as_u64().unwrap(), text(&w["state"])))
        .collect();
    rows.sort();
    rows
}

fn row(workload: &str, deployment: &str, revision: u64, state: &str) -> (String, String, u64, String) {
    (workload.into(), deployment.into(), revision, state.into())
}

fn started(deployment: &str, revision: u64) -> EventKind {
    EventKind::RevisionStarted { deployment: deployment.into(), revision }
}

fn healthy(deployment: &str, revision: u64) -> EventKind {
    EventKind::Healthy { deployment: deployment.into(), revision }
}

#[tokio::test]
async fn simulated_devices_run_both_deployments_of_their_desired_state_and_the_hub_stores_their_healthy_events() {
    let dir = tempfile::tempdir().unwrap();
    let devices = SimSpec::numbered(2);
    let hub = TestHub::start(config_for(dir.path(), &devices)).await;
    let fleet = SimulatedFleet::start(hub.mqtt, devices.clone(), FailureScript::healthy());
    for device in &devices {
        set_desired(&hub, &device.id, 1, vec![deployment("app", 1, &["web"]), deployment("db", 3, &["pg"])]).await;
    }
    for (i, device) in devices.iter().enumerate() {
        let events = wait_for_events(&hub, &device.id, 5).await;
        assert_eq!(
            events,
            [
                EventKind::Applied { generation: 1 },
                started("app", 1),
                started("db", 3),
                healthy("app", 1),
                healthy("db", 3)
            ]
        );
        let view = hub.wait_for_device(&device.id, "generation 1 reported", |d| d["generation"] == 1).await;
        assert_eq!(workloads_with_revisions(&view), [row("pg", "db", 3, "running"), row("web", "app", 1, "running")]);
        assert_eq!((fleet.revision(i, "app"), fleet.revision(i, "db")), (Some(1), Some(3)));
    }
    assert_eq!((fleet.stored(1), fleet.running("app", 1), fleet.running("db", 3)), (2, 2, 2));
    fleet.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_simulated_device_scripted_to_fail_a_revision_reports_failed_and_rolled_back_and_runs_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let devices = SimSpec::numbered(2);
    let hub = TestHub::start(config_for(dir.path(), &devices)).await;
    // Revision 2 fails on the odd devices: sim-00001.
    let script = FailureScript::healthy().fail("app", 2, Devices::EveryNth { every: 2, offset: 1 });
    let fleet = SimulatedFleet::start(hub.mqtt, devices.clone(), script);
    for device in &devices {
        set_desired(&hub, &device.id, 1, vec![deployment("app", 1, &["web"])]).await;
    }
    for device in &devices {
        wait_for_events(&hub, &device.id, 3).await;
    }
    for device in &devices {
        set_desired(&hub, &device.id, 2, vec![deployment("app", 2, &["web", "worker"])]).await;
    }

    let holds = wait_for_events(&hub, "sim-00000", 6).await;
    assert_eq!(holds[3..], [EventKind::Applied { generation: 2 }, started("app", 2), healthy("app", 2)]);
    let view = hub.wait_for_device("sim-00000", "generation 2 reported", |d| d["generation"] == 2).await;
    assert_eq!(workloads_with_revisions(&view), [row("web", "app", 2, "running"), row("worker", "app", 2, "running")]);

    let fails = wait_for_events(&hub, "sim-00001", 7).await;
    let reason = testkit::fleet::runtime::SCRIPTED_FAILURE;
    assert_eq!(
        fails[3..],
        [
            EventKind::Applied { generation: 2 },
            started("app", 2),
            EventKind::Failed { deployment: "app".into(), revision: 2, workload: "web".into(), reason: reason.into() },
            EventKind::RolledBack {
                deployment: "app".into(),
                from_revision: 2,
                to_revision: 1,
                reason: format!("workload `web`: {reason}"),
            },
        ]
    );
    let view = hub
        .wait_for_device("sim-00001", "revision 1 reported running again", |d| {
            d["generation"] == 2 && d["workloads"].as_array().is_some_and(|w| w.len() == 1)
        })
        .await;
    assert_eq!(workloads_with_revisions(&view), [row("web", "app", 1, "running")], "worker went with revision 2");
    assert_eq!((fleet.revision(0, "app"), fleet.revision(1, "app")), (Some(2), Some(1)));
    fleet.stop().await;
    hub.stop().await;
}
