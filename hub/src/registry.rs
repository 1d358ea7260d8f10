//! What the hub does with what devices send and operators set: plain
//! functions over the store, so each rule is tested without a broker.

use std::collections::BTreeMap;

use outpost_proto::desired::DesiredStateError;
use outpost_proto::federation::{HeldNotice, HoldAction};
use outpost_proto::sync::{
    Ack, Command, CommandMessage, EventBatch, Presence, Report, MAX_LOG_LINES, PROTOCOL_VERSION,
};
use outpost_proto::DesiredState;
use outpost_proto::{Event, EventKind};

use crate::store::{Device, Refusal, Store, StoreError};

/// While a view is stale, a further gap asks again for a full report only
/// after this long: the first request may have been lost, but a burst of
/// deltas re-sent after a reconnect must not become a burst of requests.
pub const FULL_REPORT_RETRY_MS: u64 = 30_000;

/// Letters, digits, `.`, `_`, `-`: safe in a topic level, a store key and a URL path.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// The view follows the report.
    Applied,
    /// Already applied (sequence number not above the last one): dropped.
    Duplicate,
    /// A delta that does not follow the view (a gap, or no full report yet):
    /// not applied, the view is marked stale. With a command id: send the
    /// device a full-report command with it.
    Gap { full_report_command: Option<u64> },
}

/// Follows the device to the store epoch a message of it carries. A new
/// epoch after numbers of another means the device's store was wiped or
/// replaced (or its agent upgraded to one with epochs) and numbers again
/// from 1: the hub counts afresh, and the view is stale until a full report.
/// The events stored stay, and the new ones are numbered after them. Epoch 0
/// says nothing (an agent, or an outbox entry, from before epochs): the
/// numbers go on. Returns whether the numbering started afresh.
pub fn follow_epoch(store: &Store, id: &str, epoch: u64, now: u64) -> Result<bool, StoreError> {
    store.update_device(id, |device| {
        if epoch == 0 || epoch == device.epoch {
            return false;
        }
        let counted = device.epoch != 0 || device.report_seq > 0 || device.event_seq > 0;
        device.epoch = epoch;
        if !counted {
            return false;
        }
        device.event_offset = device.event_offset.saturating_add(device.event_seq);
        device.event_seq = 0;
        device.report_seq = 0;
        device.stale = true;
        device.full_report_requested_at = None;
        device.store_reset_at = Some(now);
        true
    })
}

/// Applies a device's report to its view, by the sequence-number rules of
/// the protocol (docs/protocol.md). `follow_epoch` comes first.
pub fn apply_report(store: &Store, id: &str, report: &Report, now: u64) -> Result<ReportOutcome, StoreError> {
    store.update_device(id, |device| {
        seen(device, now);
        if device.report_seq > 0 && report.seq <= device.report_seq {
            return ReportOutcome::Duplicate;
        }
        let follows = device.report_seq > 0 && !device.stale && report.seq == device.report_seq + 1;
        if !report.full && !follows {
            device.stale = true;
            let asked_recently =
                device.full_report_requested_at.is_some_and(|at| now.saturating_sub(at) < FULL_REPORT_RETRY_MS);
            if asked_recently {
                return ReportOutcome::Gap { full_report_command: None };
            }
            device.full_report_requested_at = Some(now);
            device.command_id += 1;
            return ReportOutcome::Gap { full_report_command: Some(device.command_id) };
        }
        if report.full {
            device.workloads.clear();
            device.stale = false;
            device.full_report_requested_at = None;
        }
        for workload in &report.workloads {
            device.workloads.insert(workload.name.clone(), workload.clone());
        }
        for name in &report.removed {
            device.workloads.remove(name);
        }
        if report.generation.is_some() {
            device.generation = report.generation;
        }
        if !report.agent_version.is_empty() {
            device.agent_version.clone_from(&report.agent_version);
        }
        let workloads: Vec<_> = device.workloads.values().collect();
        crate::rollout::observe_workloads(&mut device.rollouts, &workloads, now);
        device.report_seq = report.seq;
        ReportOutcome::Applied
    })
}

/// Stores the events that follow the last stored one, numbered after the
/// events of the device's earlier epochs, and returns what it stored, in
/// the device's numbers (for the hub's parent). Events at or below the last
/// stored one were stored already. A jump in the numbers is taken only over
/// numbers the device says it no longer holds (`oldest_held`): a batch that
/// overtook an earlier one would otherwise make the hub skip, and the device
/// delete on the hub's ack, events never stored. `follow_epoch` comes first.
pub fn store_events(store: &Store, id: &str, batch: &EventBatch, now: u64) -> Result<EventBatch, StoreError> {
    let (last, offset) = store.device(id)?.map_or((0, 0), |d| (d.event_seq, d.event_offset));
    let mut newest = last;
    let mut taken = Vec::new();
    for event in &batch.events {
        if event.seq <= newest {
            continue;
        }
        let follows = event.seq == newest + 1 || batch.oldest_held.is_none_or(|oldest| event.seq <= oldest);
        if !follows {
            tracing::info!(
                device = id,
                "events from {} on came before {} to {}, which the device still holds: stored none of them; the \
                 device sends them again",
                event.seq,
                newest + 1,
                event.seq - 1
            );
            break;
        }
        newest = event.seq;
        taken.push(event.clone());
    }
    let stored: Vec<_> =
        taken.iter().map(|event| Event { seq: offset.saturating_add(event.seq), ..event.clone() }).collect();
    // Events first: if the hub stops in between, the device sends them
    // again and storing one twice keeps one copy.
    store.put_events(id, &stored)?;
    store.update_device(id, |device| {
        seen(device, now);
        device.event_seq = device.event_seq.max(newest);
        for event in &stored {
            crate::rollout::observe_event(&mut device.rollouts, &event.kind, now);
            if let EventKind::Refused { generation, reason } = &event.kind {
                device.refused = Some(Refusal { generation: *generation, reason: reason.clone() });
            }
        }
    })?;
    Ok(EventBatch { events: taken, ..batch.clone() })
}

/// Records a device's presence. A retained presence replayed by the broker
/// (`replayed`) says nothing about when the device was last heard from.
pub fn set_presence(store: &Store, id: &str, presence: &Presence, replayed: bool, now: u64) -> Result<(), StoreError> {
    store.update_device(id, |device| {
        if !replayed {
            seen(device, now);
        }
        device.online = presence.online;
    })
}

/// A site hub held one of this hub's revisions back from a device, or let
/// it through again: a pause makes the device wait for its site, a
/// rollback on site fails the revision there. A notice about a revision no
/// longer sent changes nothing.
pub fn apply_held(store: &Store, id: &str, site: &str, notice: &HeldNotice) -> Result<(), StoreError> {
    store.update_device(id, |device| {
        let Some(sent) = device.rollouts.get_mut(&notice.deployment).filter(|s| s.revision == notice.revision) else {
            return;
        };
        let why = notice.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
        match notice.hold {
            None => sent.held = None,
            Some(HoldAction::Pause) => sent.held = Some(format!("paused at site {site}{why}")),
            Some(HoldAction::Rollback { to }) => {
                sent.failed.get_or_insert_with(|| format!("rolled back at site {site} to revision {to}{why}"));
            }
        }
    })
}

/// A site hub's link to this hub came up or went. When it goes, the site's
/// devices are out of reach: offline here until the site says otherwise.
pub fn set_site_presence(store: &Store, site: &str, online: bool, now: u64) -> Result<(), StoreError> {
    store.update_site(site, |s| {
        s.online = online;
        if online {
            s.last_sync = Some(now);
        }
    })?;
    if !online {
        for device in store.devices()?.into_iter().filter(|d| d.site.as_deref() == Some(site) && d.online) {
            store.update_device(&device.id, |d| d.online = false)?;
        }
    }
    Ok(())
}

/// At the start of a hub with its own broker, no device is connected yet.
pub fn mark_all_offline(store: &Store) -> Result<(), StoreError> {
    for device in store.devices()? {
        if device.online {
            store.update_device(&device.id, |d| d.online = false)?;
        }
    }
    Ok(())
}

/// What the hub tells a device it has stored.
pub fn ack(device: &Device) -> Ack {
    Ack { v: PROTOCOL_VERSION, epoch: device.epoch, events: device.event_seq, reports: device.report_seq }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("device id {0:?} is not valid: use letters, digits, `.`, `_` and `-`")]
    InvalidId(String),
    #[error("no device {0:?}: it has not connected, and has no labels or desired state")]
    UnknownDevice(String),
    #[error("the command needs the name of a workload")]
    NoWorkload,
    #[error("tail {0} is not between 1 and {MAX_LOG_LINES} (a device sends at most {MAX_LOG_LINES} lines)")]
    Tail(usize),
    #[error("full-report is not an operator's command: the hub asks for one itself when it misses a report")]
    FullReport,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An operator's command for a device the hub knows, checked and numbered
/// with the device's next command id: ready to publish.
pub fn command(store: &Store, id: &str, command: Command) -> Result<CommandMessage, CommandError> {
    if !valid_device_id(id) {
        return Err(CommandError::InvalidId(id.to_string()));
    }
    match &command {
        Command::FullReport => return Err(CommandError::FullReport),
        Command::RestartWorkload { name } | Command::SendLogs { name, .. } if name.is_empty() => {
            return Err(CommandError::NoWorkload)
        }
        Command::SendLogs { tail, .. } if !(1..=MAX_LOG_LINES).contains(tail) => return Err(CommandError::Tail(*tail)),
        Command::RestartWorkload { .. } | Command::SendLogs { .. } => {}
    }
    if store.device(id)?.is_none() {
        return Err(CommandError::UnknownDevice(id.to_string()));
    }
    let number = store.update_device(id, |device| {
        device.command_id += 1;
        device.command_id
    })?;
    Ok(CommandMessage { v: PROTOCOL_VERSION, id: number, command })
}

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("device id {0:?} is not valid: use letters, digits, `.`, `_` and `-`")]
    InvalidId(String),
    #[error(transparent)]
    Invalid(#[from] DesiredStateError),
    #[error("generation {given} is not above the stored generation {stored}: every change needs a higher generation")]
    NotNewer { given: u64, stored: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Validates and stores a device's desired state; its generation must be
/// above the stored one, as a device never goes back. The device record is
/// created if the device has not connected yet, so it shows in the registry.
pub fn set_desired(store: &Store, id: &str, state: &DesiredState) -> Result<(), DesiredError> {
    if !valid_device_id(id) {
        return Err(DesiredError::InvalidId(id.to_string()));
    }
    state.validate()?;
    store.replace_desired(id, state, |stored| match stored {
        Some(stored) if state.generation <= stored.generation => {
            Err(DesiredError::NotNewer { given: state.generation, stored: stored.generation })
        }
        _ => Ok(()),
    })?;
    store.update_device(id, |_| ())?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error("device id {0:?} is not valid: use letters, digits, `.`, `_` and `-`")]
    InvalidId(String),
    #[error("label key {0:?} is not valid: use 1 to 63 letters, digits, `.`, `_`, `-` or `/`")]
    InvalidKey(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Replaces a device's labels; returns its record.
pub fn set_labels(store: &Store, id: &str, labels: &BTreeMap<String, String>) -> Result<Device, LabelsError> {
    if !valid_device_id(id) {
        return Err(LabelsError::InvalidId(id.to_string()));
    }
    let valid_key =
        |k: &str| (1..=63).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if let Some(key) = labels.keys().find(|k| !valid_key(k)) {
        return Err(LabelsError::InvalidKey(key.clone()));
    }
    Ok(store.update_device(id, |device| {
        device.labels.clone_from(labels);
        device.clone()
    })?)
}

fn seen(device: &mut Device, now: u64) {
    device.first_seen.get_or_insert(now);
    device.last_seen = Some(now);
}

#[cfg(test)]
mod tests {
    use outpost_proto::sync::WorkloadReport;
    use outpost_proto::{Event, EventKind};

    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn workload(name: &str, state: &str) -> WorkloadReport {
        WorkloadReport {
            name: name.into(),
            deployment: Some("app".into()),
            revision: Some(1),
            state: state.into(),
            health: None,
            restarts: 0,
            last_exit: None,
        }
    }

    fn report(seq: u64, full: bool, workloads: &[(&str, &str)], removed: &[&str]) -> Report {
        Report {
            v: PROTOCOL_VERSION,
            epoch: 0,
            seq,
            full,
            generation: Some(seq),
            agent_version: "0.1.0".into(),
            workloads: workloads.iter().map(|(n, s)| workload(n, s)).collect(),
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn view(store: &Store) -> Vec<(String, String)> {
        let device = store.device("d").unwrap().unwrap();
        device.workloads.values().map(|w| (w.name.clone(), w.state.clone())).collect()
    }

    fn events(seqs: &[u64]) -> EventBatch {
        let events =
            seqs.iter().map(|&seq| Event { seq, at: 0, kind: EventKind::Applied { generation: seq } }).collect();
        EventBatch { v: PROTOCOL_VERSION, epoch: 0, events, oldest_held: None }
    }

    #[test]
    fn a_full_report_replaces_the_view_and_deltas_follow_it() {
        let (_dir, store) = store();
        let full = report(1, true, &[("web", "running"), ("db", "backoff")], &[]);
        assert_eq!(apply_report(&store, "d", &full, 10).unwrap(), ReportOutcome::Applied);
        let delta = report(2, false, &[("db", "running"), ("cache", "running")], &["web"]);
        assert_eq!(apply_report(&store, "d", &delta, 20).unwrap(), ReportOutcome::Applied);
        assert_eq!(view(&store), [("cache".into(), "running".into()), ("db".into(), "running".into())]);
        let device = store.device("d").unwrap().unwrap();
        assert_eq!((device.report_seq, device.generation, device.stale), (2, Some(2), false));
        assert_eq!((device.first_seen, device.last_seen), (Some(10), Some(20)));
        assert_eq!(ack(&device), Ack { v: PROTOCOL_VERSION, epoch: 0, events: 0, reports: 2 });
        // A full report drops what it does not list.
        apply_report(&store, "d", &report(3, true, &[("web", "exited")], &[]), 30).unwrap();
        assert_eq!(view(&store), [("web".into(), "exited".into())]);
    }

    #[test]
    fn a_duplicate_report_is_dropped() {
        let (_dir, store) = store();
        apply_report(&store, "d", &report(1, true, &[("web", "running")], &[]), 0).unwrap();
        apply_report(&store, "d", &report(2, false, &[("web", "exited")], &[]), 0).unwrap();
        let stale_copy = report(2, false, &[("web", "backoff")], &[]);
        assert_eq!(apply_report(&store, "d", &stale_copy, 0).unwrap(), ReportOutcome::Duplicate);
        let old_full = report(1, true, &[], &[]);
        assert_eq!(apply_report(&store, "d", &old_full, 0).unwrap(), ReportOutcome::Duplicate);
        assert_eq!(view(&store), [("web".into(), "exited".into())]);
    }

    #[test]
    fn a_gap_asks_for_a_full_report_once_and_the_full_report_clears_it() {
        let (_dir, store) = store();
        apply_report(&store, "d", &report(1, true, &[("web", "running")], &[]), 0).unwrap();
        let gap = apply_report(&store, "d", &report(3, false, &[("web", "exited")], &[]), 100).unwrap();
        assert_eq!(gap, ReportOutcome::Gap { full_report_command: Some(1) });
        let device = store.device("d").unwrap().unwrap();
        assert!(device.stale);
        assert_eq!(device.report_seq, 1, "the delta after the gap is not applied");
        assert_eq!(view(&store), [("web".into(), "running".into())]);
        // While stale, even the next delta in sequence is not applied, and
        // the request is not repeated at once...
        let next = apply_report(&store, "d", &report(2, false, &[("web", "exited")], &[]), 200).unwrap();
        assert_eq!(next, ReportOutcome::Gap { full_report_command: None });
        // ...but it is once the first request may have been lost.
        let later = apply_report(&store, "d", &report(4, false, &[], &[]), 100 + FULL_REPORT_RETRY_MS).unwrap();
        assert_eq!(later, ReportOutcome::Gap { full_report_command: Some(2) });
        let full = report(5, true, &[("web", "backoff")], &[]);
        assert_eq!(apply_report(&store, "d", &full, 0).unwrap(), ReportOutcome::Applied);
        let device = store.device("d").unwrap().unwrap();
        assert_eq!((device.stale, device.report_seq), (false, 5));
        assert_eq!(view(&store), [("web".into(), "backoff".into())]);
    }

    #[test]
    fn a_delta_before_any_full_report_asks_for_one() {
        let (_dir, store) = store();
        let outcome = apply_report(&store, "d", &report(1, false, &[("web", "running")], &[]), 0).unwrap();
        assert_eq!(outcome, ReportOutcome::Gap { full_report_command: Some(1) });
        assert!(view(&store).is_empty());
    }

    fn stored(store: &Store, batch: &EventBatch) -> Vec<u64> {
        store_events(store, "d", batch, 0).unwrap().events.iter().map(|e| e.seq).collect()
    }

    fn held_from(oldest: u64, seqs: &[u64]) -> EventBatch {
        EventBatch { oldest_held: Some(oldest), ..events(seqs) }
    }

    #[test]
    fn events_are_stored_once_each() {
        let (_dir, store) = store();
        assert_eq!(stored(&store, &held_from(1, &[1, 2, 3])), [1, 2, 3]);
        assert_eq!(stored(&store, &held_from(2, &[2, 3, 4])), [4]);
        assert!(stored(&store, &held_from(4, &[4])).is_empty());
        // A device that dropped events (its outbox is bounded) leaves a gap: kept as is.
        assert_eq!(stored(&store, &held_from(7, &[7, 8])), [7, 8]);
        let seqs: Vec<u64> = store.events("d", 0, 100).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 7, 8]);
        assert_eq!(ack(&store.device("d").unwrap().unwrap()).events, 8);
    }

    #[test]
    fn a_batch_that_overtook_one_the_device_still_holds_is_not_stored_until_the_gap_is_filled() {
        let (_dir, store) = store();
        assert_eq!(stored(&store, &held_from(1, &[1, 2])), [1, 2]);
        // 3 was dropped on the way (or is late): the device still holds it.
        assert!(stored(&store, &held_from(3, &[4, 5])).is_empty());
        assert_eq!(ack(&store.device("d").unwrap().unwrap()).events, 2, "the ack must not cover 3");
        // Within a batch too: stored up to the jump.
        assert_eq!(stored(&store, &held_from(3, &[3, 5])), [3]);
        assert_eq!(stored(&store, &held_from(4, &[4, 5, 6])), [4, 5, 6]);
        let seqs: Vec<u64> = store.events("d", 0, 100).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn an_agent_that_does_not_say_what_it_holds_has_its_events_stored_above_the_newest() {
        let (_dir, store) = store();
        assert_eq!(stored(&store, &events(&[1, 2])), [1, 2]);
        assert_eq!(stored(&store, &events(&[5])), [5]);
    }

    /// What the applier does with a report or an event batch of an epoch.
    fn receive_report(store: &Store, epoch: u64, report: Report) -> ReportOutcome {
        follow_epoch(store, "d", epoch, 500).unwrap();
        apply_report(store, "d", &Report { epoch, ..report }, 500).unwrap()
    }

    fn receive_events(store: &Store, epoch: u64, seqs: &[u64]) -> usize {
        follow_epoch(store, "d", epoch, 500).unwrap();
        store_events(store, "d", &EventBatch { epoch, ..events(seqs) }, 500).unwrap().events.len()
    }

    fn stored_events(store: &Store) -> Vec<(u64, u64)> {
        let events = store.events("d", 0, 100).unwrap();
        events
            .iter()
            .map(|e| match e.kind {
                EventKind::Applied { generation } => (e.seq, generation),
                _ => unreachable!("the tests store applied events"),
            })
            .collect()
    }

    #[test]
    fn a_new_epoch_starts_the_numbering_afresh_and_keeps_the_stored_events() {
        let (_dir, store) = store();
        assert_eq!(receive_events(&store, 7, &[1, 2, 3]), 3);
        assert_eq!(receive_report(&store, 7, report(4, true, &[("web", "running")], &[])), ReportOutcome::Applied);
        assert_eq!(store.device("d").unwrap().unwrap().store_reset_at, None, "a first epoch is no reset");

        // The store was wiped: epoch 9 numbers from 1 again, below what epoch 7 reached.
        assert!(follow_epoch(&store, "d", 9, 600).unwrap());
        let device = store.device("d").unwrap().unwrap();
        assert_eq!((device.epoch, device.report_seq, device.event_seq), (9, 0, 0));
        assert_eq!((device.stale, device.store_reset_at), (true, Some(600)), "the view is the old store's");
        assert_eq!(ack(&device), Ack { v: PROTOCOL_VERSION, epoch: 9, events: 0, reports: 0 });

        assert_eq!(receive_events(&store, 9, &[1, 2]), 2, "not taken for duplicates");
        assert_eq!(receive_report(&store, 9, report(1, true, &[("db", "running")], &[])), ReportOutcome::Applied);
        assert_eq!(view(&store), [("db".into(), "running".into())]);
        let device = store.device("d").unwrap().unwrap();
        assert_eq!((device.report_seq, device.event_seq, device.stale), (1, 2, false));
        // Each event once, in the order they came: the new ones numbered after the old ones.
        assert_eq!(stored_events(&store), [(1, 1), (2, 2), (3, 3), (4, 1), (5, 2)]);
        assert_eq!(receive_events(&store, 9, &[2, 3]), 1);
        assert_eq!(stored_events(&store).last(), Some(&(6, 3)));
    }

    #[test]
    fn a_delta_first_after_a_new_epoch_asks_for_a_full_report() {
        let (_dir, store) = store();
        receive_report(&store, 7, report(5, true, &[("web", "running")], &[]));
        let outcome = receive_report(&store, 9, report(2, false, &[("web", "exited")], &[]));
        assert_eq!(outcome, ReportOutcome::Gap { full_report_command: Some(1) });
        assert_eq!(view(&store), [("web".into(), "running".into())], "not applied over the old store's view");
    }

    #[test]
    fn epoch_0_is_no_epoch_and_the_numbers_go_on() {
        let (_dir, store) = store();
        // An agent from before epochs.
        receive_events(&store, 0, &[1, 2]);
        receive_report(&store, 0, report(1, true, &[("web", "running")], &[]));
        assert_eq!(store.device("d").unwrap().unwrap().epoch, 0);
        // Upgraded: its store gets an epoch. The hub cannot tell this from a wipe, so it counts afresh.
        assert!(follow_epoch(&store, "d", 7, 600).unwrap());
        assert_eq!(receive_report(&store, 7, report(2, true, &[("web", "running")], &[])), ReportOutcome::Applied);
        // A report queued before the upgrade, sent again without an epoch: it counts in the current one.
        assert!(!follow_epoch(&store, "d", 0, 700).unwrap());
        assert_eq!(receive_report(&store, 0, report(2, false, &[], &[])), ReportOutcome::Duplicate);
        assert_eq!(store.device("d").unwrap().unwrap().epoch, 7);
    }

    #[test]
    fn an_operators_command_is_checked_and_numbered_per_device() {
        let (_dir, store) = store();
        let logs = |tail| Command::SendLogs { name: "web".into(), tail };
        let err = command(&store, "d", logs(10)).unwrap_err();
        assert!(matches!(err, CommandError::UnknownDevice(_)), "{err}");
        set_labels(&store, "d", &BTreeMap::new()).unwrap();
        assert_eq!(command(&store, "d", logs(10)).unwrap().id, 1);
        let restart = command(&store, "d", Command::RestartWorkload { name: "web".into() }).unwrap();
        assert_eq!(
            restart,
            CommandMessage { v: PROTOCOL_VERSION, id: 2, command: Command::RestartWorkload { name: "web".into() } }
        );
        for (bad, what) in [
            (logs(0), "tail 0"),
            (logs(MAX_LOG_LINES + 1), "tail too large"),
            (Command::RestartWorkload { name: String::new() }, "no workload"),
            (Command::FullReport, "full-report"),
        ] {
            assert!(command(&store, "d", bad).is_err(), "{what} was accepted");
        }
        assert!(matches!(command(&store, "a/b", logs(1)), Err(CommandError::InvalidId(_))));
        assert_eq!(store.device("d").unwrap().unwrap().command_id, 2, "refused commands take no number");
    }

    #[test]
    fn a_desired_state_needs_a_higher_generation() {
        let (_dir, store) = store();
        let state = |generation| DesiredState { version: 1, generation, deployments: vec![] };
        set_desired(&store, "d", &state(2)).unwrap();
        let err = set_desired(&store, "d", &state(2)).unwrap_err();
        assert!(matches!(err, DesiredError::NotNewer { given: 2, stored: 2 }), "{err}");
        set_desired(&store, "d", &state(3)).unwrap();
        assert_eq!(store.desired("d").unwrap().unwrap().generation, 3);
        assert!(store.device("d").unwrap().is_some(), "a device set up before it connects is listed");
        let err = set_desired(&store, "a/b", &state(1)).unwrap_err();
        assert!(matches!(err, DesiredError::InvalidId(_)), "{err}");
        let err = set_desired(&store, "d", &DesiredState { version: 9, ..state(4) }).unwrap_err();
        assert!(matches!(err, DesiredError::Invalid(_)), "{err}");
    }

    #[test]
    fn presence_replayed_by_the_broker_does_not_count_as_seen() {
        let (_dir, store) = store();
        set_presence(&store, "d", &Presence { v: 1, online: true }, true, 5).unwrap();
        let device = store.device("d").unwrap().unwrap();
        assert_eq!((device.online, device.last_seen), (true, None));
        set_presence(&store, "d", &Presence { v: 1, online: true }, false, 6).unwrap();
        mark_all_offline(&store).unwrap();
        let device = store.device("d").unwrap().unwrap();
        assert_eq!((device.online, device.last_seen), (false, Some(6)));
    }

    #[test]
    fn labels_are_replaced_and_bad_keys_named() {
        let (_dir, store) = store();
        let labels = BTreeMap::from([("site".to_string(), "north".to_string())]);
        assert_eq!(set_labels(&store, "d", &labels).unwrap().labels, labels);
        let bad = BTreeMap::from([("".to_string(), "x".to_string())]);
        assert!(matches!(set_labels(&store, "d", &bad), Err(LabelsError::InvalidKey(k)) if k.is_empty()));
    }
}
