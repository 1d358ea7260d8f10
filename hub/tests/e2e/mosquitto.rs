//! The same sync flow with an external broker: Debian's mosquitto
//! (`testkit::Mosquitto`) on a free loopback port, with a password file.

use std::path::Path;

use outpost_proto::sync::Command as HubCommand;
use testkit::Mosquitto;

use crate::support::*;

const HUB_USER: &str = "outpost-hub";
const HUB_PASSWORD: &str = "hub-password";

fn hub_config(mosquitto: &Mosquitto, data_dir: &Path) -> hub::Config {
    hub::Config {
        broker: hub::BrokerSetting::External { host: "127.0.0.1".into(), port: mosquitto.addr().port() },
        broker_username: HUB_USER.into(),
        broker_password: HUB_PASSWORD.into(),
        ..config(data_dir)
    }
}

#[tokio::test]
async fn the_sync_flow_works_the_same_through_an_external_mosquitto() {
    let users: Vec<_> = std::iter::once((HUB_USER, HUB_PASSWORD)).chain(DEVICES).collect();
    let mosquitto = Mosquitto::new(&users);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let hub = TestHub::start(hub_config(&mosquitto, &data)).await;

    hub.set_generation("pump-3", 1).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.desired(1).await;
    // Presence is retained, so the hub sees it once subscribed: from then on
    // what the device publishes reaches the hub.
    hub.wait_for_device("pump-3", "online", |d| d["online"] == true).await;

    pump3.publish(outpost_proto::sync::Channel::Reported, false, b"\xff garbage".to_vec()).await;
    pump3.report(&report(1, true, 1, &[("web", "running"), ("db", "backoff")], &[])).await;
    pump3.report(&report(2, false, 1, &[("db", "running")], &["web"])).await;
    pump3.report(&report(2, false, 1, &[("db", "exited")], &[])).await;
    pump3.events(&[1, 2]).await;
    pump3.events(&[2, 3]).await;
    let ack = pump3.ack(2, 3).await;
    assert_eq!((ack.reports, ack.events), (2, 3));
    let view = hub.wait_for_device("pump-3", "report 2", |d| d["report_seq"] == 2).await;
    assert_eq!(workloads(&view).into_iter().collect::<Vec<_>>(), [("db".to_string(), "running".to_string())]);
    assert_eq!(hub.event_seqs("pump-3").await, [1, 2, 3]);

    pump3.report(&report(4, false, 1, &[], &["db"])).await;
    assert_eq!(pump3.command().await.command, HubCommand::FullReport);

    // A wrong token is mosquitto's to refuse.
    let wrong = DeviceSimulator::connect_with(
        hub.mqtt,
        "pump-4",
        "not-its-token",
        outpost_proto::sync::Topics::default(),
        outpost_proto::sync::Encoding::Json,
    );
    assert!(wrong.await.is_none());

    // The hub restarts; mosquitto kept its session and the retained messages.
    hub.stop().await;
    let hub = TestHub::start(hub_config(&mosquitto, &data)).await;
    pump3.report(&report(5, true, 1, &[("db", "running")], &[])).await;
    let view = hub.wait_for_device("pump-3", "the full report after the restart", |d| d["report_seq"] == 5).await;
    assert_eq!(view["stale"], false);
    hub.set_generation("pump-3", 2).await;
    pump3.desired(2).await;
    hub.stop().await;
}
