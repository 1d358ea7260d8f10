//! A device whose store was wiped numbers its reports and events from 1
//! again, under a new epoch: the hub counts them afresh.

use std::collections::BTreeMap;

use outpost_proto::sync::Report;

use crate::support::*;

const OLD_EPOCH: u64 = 0x51de;
const NEW_EPOCH: u64 = 0x7e57;

fn in_epoch(epoch: u64, report: Report) -> Report {
    Report { epoch, ..report }
}

#[tokio::test]
async fn a_device_whose_store_was_wiped_has_its_new_reports_and_events_counted_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    hub.set_generation("pump-3", 1).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.desired(1).await;
    pump3.events_in(OLD_EPOCH, &[1, 2, 3]).await;
    pump3.report(&in_epoch(OLD_EPOCH, report(1, true, 1, &[("web", "running")], &[]))).await;
    pump3.report(&in_epoch(OLD_EPOCH, report(2, false, 1, &[("web", "exited")], &[]))).await;
    let ack = pump3.ack(2, 3).await;
    assert_eq!(ack.epoch, OLD_EPOCH);
    pump3.cut();

    // Wiped: the device comes back with a new store, numbering from 1 below what the hub has.
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.events_in(NEW_EPOCH, &[1, 2]).await;
    pump3.report(&in_epoch(NEW_EPOCH, report(1, true, 1, &[("db", "running")], &[]))).await;
    // The wiped store lost its desired state, and the broker, which kept the device's session,
    // does not send the retained one again on its subscription: the hub sends it.
    pump3.desired(1).await;
    let ack = pump3
        .next("an ack of the new store", |m| match m {
            FromHub::Ack(a) if a.epoch == NEW_EPOCH && a.reports == 1 && a.events == 2 => Some(a),
            _ => None,
        })
        .await;
    assert_eq!((ack.reports, ack.events), (1, 2), "not dropped as duplicates");

    let view = hub.wait_for_device("pump-3", "the new store's report", |d| d["epoch"] == NEW_EPOCH).await;
    assert_eq!(view["report_seq"], 1);
    let expected: BTreeMap<String, String> = [("db".to_string(), "running".to_string())].into();
    assert_eq!(workloads(&view), expected, "the view is the new store's full report");
    assert_eq!(view["stale"], false);
    assert!(view["store_reset_at"].as_u64().is_some(), "the view says the store was reset: {view:#}");
    // The old events stay; the new ones follow them.
    assert_eq!(hub.event_seqs("pump-3").await, [1, 2, 3, 4, 5]);
    hub.stop().await;
}
