//! Devices and the hub over the embedded broker.

use std::collections::BTreeMap;

use outpost_proto::sync::{Channel, Command, Encoding, Topics};

use crate::support::*;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test]
async fn a_device_with_a_wrong_token_or_an_unknown_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    // The broker is up and lets known devices in...
    let _pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    // ...but not with another device's token, nor an id it does not know.
    let wrong = DeviceSimulator::connect_with(hub.mqtt, "pump-4", token("pump-3"), Topics::default(), Encoding::Json);
    assert!(wrong.await.is_none(), "a wrong token was accepted");
    let stranger = DeviceSimulator::connect_with(hub.mqtt, "stranger", "guess", Topics::default(), Encoding::Json);
    assert!(stranger.await.is_none(), "an unknown device was accepted");
    hub.stop().await;
}

#[tokio::test]
async fn an_unknown_device_comes_in_when_the_hub_allows_unknown_devices() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(hub::Config { unknown_devices: hub::UnknownDevices::Accept, ..config(dir.path()) }).await;
    let stranger = DeviceSimulator::connect(hub.mqtt, "stranger", "anything").await;
    stranger.report(&report(1, true, 0, &[("web", "running")], &[])).await;
    hub.wait_for_device("stranger", "its first report", |d| d["report_seq"] == 1).await;
    hub.stop().await;
}

#[tokio::test]
async fn a_device_receives_its_desired_state_retained_after_put() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    // Set before the device connects: retained, so it finds it on subscribing.
    hub.set_generation("pump-3", 1).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.desired(1).await;
    // Set while it is connected.
    hub.set_generation("pump-3", 2).await;
    pump3.desired(2).await;
    // Each device has its own.
    let mut pump4 = DeviceSimulator::connect(hub.mqtt, "pump-4", token("pump-4")).await;
    hub.set_generation("pump-4", 7).await;
    pump4.desired(7).await;
    let leaked = pump3.drain().into_iter().any(|m| matches!(m, FromHub::Desired(d) if d.state.generation == 7));
    assert!(!leaked, "pump-3 received pump-4's desired state");
    hub.stop().await;
}

#[tokio::test]
async fn a_full_report_then_deltas_make_the_hubs_view_follow() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.report(&report(1, true, 1, &[("web", "running"), ("db", "backoff")], &[])).await;
    pump3.report(&report(2, false, 2, &[("db", "running")], &[])).await;
    pump3.report(&report(3, false, 2, &[("cache", "running")], &["web"])).await;
    let view = hub.wait_for_device("pump-3", "report 3 applied", |d| d["report_seq"] == 3).await;
    assert_eq!(workloads(&view), map(&[("cache", "running"), ("db", "running")]));
    assert_eq!((view["generation"].as_u64(), view["stale"].as_bool()), (Some(2), Some(false)));
    assert_eq!(view["agent_version"], "0.1.0-sim");
    assert_eq!(pump3.ack(3, 0).await.reports, 3);
    hub.stop().await;
}

#[tokio::test]
async fn a_gap_in_reports_makes_the_hub_ask_the_device_for_a_full_report() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.report(&report(1, true, 1, &[("web", "running")], &[])).await;
    pump3.report(&report(3, false, 1, &[("web", "exited")], &[])).await;
    assert_eq!(pump3.command().await.command, Command::FullReport);
    let view = hub.wait_for_device("pump-3", "a stale view", |d| d["stale"] == true).await;
    assert_eq!(view["report_seq"], 1, "the delta after the gap is not applied");
    assert_eq!(workloads(&view), map(&[("web", "running")]));
    pump3.report(&report(4, true, 1, &[("web", "backoff")], &[])).await;
    let view = hub.wait_for_device("pump-3", "the full report applied", |d| d["report_seq"] == 4).await;
    assert_eq!(view["stale"], false);
    assert_eq!(workloads(&view), map(&[("web", "backoff")]));
    hub.stop().await;
}

#[tokio::test]
async fn a_delta_before_any_full_report_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.report(&report(5, false, 1, &[("web", "running")], &[])).await;
    assert_eq!(pump3.command().await.command, Command::FullReport);
    hub.stop().await;
}

#[tokio::test]
async fn duplicate_reports_and_events_are_stored_once_and_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    // What a device re-sends after a reconnect, before it had the ack.
    pump3.events(&[1, 2, 3]).await;
    pump3.events(&[2, 3, 4]).await;
    pump3.report(&report(1, true, 1, &[("web", "running")], &[])).await;
    pump3.report(&report(1, true, 1, &[("web", "running")], &[])).await;
    pump3.report(&report(2, false, 1, &[("web", "exited")], &[])).await;
    pump3.report(&report(2, false, 1, &[("web", "backoff")], &[])).await;
    let ack = pump3.ack(2, 4).await;
    assert_eq!((ack.reports, ack.events), (2, 4));
    assert_eq!(hub.event_seqs("pump-3").await, [1, 2, 3, 4]);
    let view = hub.device("pump-3").await;
    assert_eq!(workloads(&view), map(&[("web", "exited")]), "the second copy of report 2 was dropped");
    hub.stop().await;
}

#[tokio::test]
async fn an_agent_started_behind_a_desired_state_it_could_not_store_is_sent_it_again_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    hub.set_generation("pump-3", 1).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.desired(1).await;
    pump3.report(&report(1, true, 1, &[("web", "running")], &[])).await;
    hub.set_generation("pump-3", 2).await;
    pump3.desired(2).await;
    // Its disk was full: generation 2 not stored. A delta that says so is no reason to send it again.
    pump3.report(&report(2, false, 1, &[("web", "backoff")], &[])).await;
    pump3.ack(2, 0).await;
    pump3.cut();

    // The agent starts again (its service manager restarts it) on the same
    // session: the broker delivered generation 2 to it already.
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.report(&report(3, true, 1, &[("web", "running")], &[])).await;
    pump3.desired(2).await;
    // Stored now: its next full report is level with the hub, and nothing more comes.
    pump3.report(&report(4, true, 2, &[("web", "running")], &[])).await;
    pump3.ack(4, 0).await;
    let again = pump3.drain().into_iter().filter(|m| matches!(m, FromHub::Desired(_))).count();
    assert_eq!(again, 0, "the desired state was sent again to a device level with it");
    hub.stop().await;
}

#[tokio::test]
async fn a_restarted_hub_publishes_desired_states_and_acks_again_from_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestHub::start(config(dir.path())).await;
    first.set_generation("pump-3", 3).await;
    let mut pump3 = DeviceSimulator::connect(first.mqtt, "pump-3", token("pump-3")).await;
    pump3.desired(3).await;
    pump3.report(&report(1, true, 3, &[("web", "running")], &[])).await;
    pump3.events(&[1, 2]).await;
    pump3.ack(1, 2).await;
    pump3.cut();
    let first_broker = first.mqtt;
    first.stop().await;

    // A new embedded broker: it knows nothing; the hub's store does.
    let second = TestHub::start(config(dir.path())).await;
    assert_ne!(second.mqtt, first_broker);
    let mut pump3 = DeviceSimulator::connect(second.mqtt, "pump-3", token("pump-3")).await;
    pump3.desired(3).await;
    let ack = pump3.ack(1, 2).await;
    assert_eq!((ack.reports, ack.events), (1, 2));
    let view = second.wait_for_device("pump-3", "online again", |d| d["online"] == true).await;
    assert_eq!((view["report_seq"].as_u64(), view["desired_generation"].as_u64()), (Some(1), Some(3)));
    assert_eq!(second.event_seqs("pump-3").await, [1, 2]);
    second.stop().await;
}

#[tokio::test]
async fn a_malformed_payload_is_dropped_and_the_devices_next_report_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.publish(Channel::Reported, false, b"\xff\x00 not cbor".to_vec()).await;
    pump3.publish(Channel::Reported, false, br#"{"v":1,"seq":"one"}"#.to_vec()).await;
    pump3.publish(Channel::Events, false, b"{ not json".to_vec()).await;
    pump3.publish(Channel::Presence, true, b"[]".to_vec()).await;
    pump3.report(&report(1, true, 1, &[("web", "running")], &[])).await;
    assert_eq!(pump3.ack(1, 0).await.reports, 1);
    let view = hub.wait_for_device("pump-3", "report 1 applied", |d| d["report_seq"] == 1).await;
    assert_eq!(workloads(&view), map(&[("web", "running")]));
    assert!(hub.event_seqs("pump-3").await.is_empty());
    hub.stop().await;
}

#[tokio::test]
async fn presence_shows_online_and_the_last_will_offline() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    let view = hub.wait_for_device("pump-3", "online", |d| d["online"] == true).await;
    assert!(view["last_seen"].as_u64().is_some());
    pump3.cut();
    hub.wait_for_device("pump-3", "offline by its last will", |d| d["online"] == false).await;
    hub.stop().await;
}
