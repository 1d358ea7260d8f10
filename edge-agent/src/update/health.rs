//! An agent on trial proves itself: within `update-health-deadline` the store
//! must open (it did, or the daemon would not be here) and, with a hub
//! configured, the MQTT link must come up, or, with no hub, the offline
//! self-check must pass. A hub is required when one is configured because
//! the update came through it: an agent that cannot reach it again cannot be
//! managed, and the old one could.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::EventKind;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{stage0, AgentSlots, Pending};
use crate::runtime::Supervisor;
use crate::store::Store;

const CHECK_EVERY: Duration = Duration::from_millis(500);

/// The offline self-check: the store reads, the run dir takes a file, and
/// the shim of every workload that should be running is alive.
pub fn self_check(store: &Store, run_dir: &Path, supervisor: &Supervisor) -> Result<(), String> {
    store.effective().map_err(|e| format!("the store cannot be read: {e}"))?;
    let probe = run_dir.join(".update-check");
    std::fs::write(&probe, b"ok").map_err(|e| format!("the run dir {} is not writable: {e}", run_dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    for workload in supervisor.list() {
        let Some(status) = workload.status else { continue };
        if !status.state.is_final() && !status.shim_alive() {
            return Err(format!("the shim of workload {} (pid {}) is gone", workload.name, status.shim_pid));
        }
    }
    Ok(())
}

/// Records what became of an update that ended while no agent was there to
/// say so (rolled back by the boot count, or confirmed just before a crash).
pub fn settle(agent: &AgentSlots, store: &Store) {
    let (pending, env) = match (agent.pending(), agent.env()) {
        (Ok(Some(pending)), Ok(Some(env))) if !env.upgrade_available => (pending, env),
        (Err(e), _) => return tracing::error!("cannot read the pending agent update: {e}"),
        _ => return,
    };
    let kind = if env.active == pending.slot {
        EventKind::Updated {
            target: pending.target.clone(),
            version: pending.version.clone(),
            from: pending.from.clone(),
        }
    } else {
        let reason = pending
            .failures
            .last()
            .cloned()
            .unwrap_or_else(|| format!("it did not confirm itself healthy within {} boots", super::BOOTLIMIT));
        tracing::error!(target = %pending.target, version = %pending.version, "agent update rolled back: {reason}");
        EventKind::UpdateRolledBack {
            target: pending.target.clone(),
            version: pending.version.clone(),
            reason,
            from: pending.from.clone(),
        }
    };
    record(agent, store, kind);
}

fn record(agent: &AgentSlots, store: &Store, kind: EventKind) {
    if let Err(e) = store.push_event(kind) {
        tracing::error!("cannot record the agent update's outcome: {e}");
        return;
    }
    if let Err(e) = agent.clear_pending() {
        tracing::error!("cannot clear the pending agent update: {e}");
    }
}

/// What the trial watches.
pub struct Trial {
    pub agent: AgentSlots,
    pub store: Arc<Store>,
    pub supervisor: Supervisor,
    pub run_dir: PathBuf,
    /// Notified when the hub link comes up; `None` when no hub is configured.
    pub hub_connected: Option<Arc<Notify>>,
    pub deadline: Duration,
}

/// Confirms this boot once healthy; past the deadline, notes why and starts
/// stage 0 again, which counts the failed boot (and, past the boot limit,
/// brings back the previous agent).
pub async fn watch(trial: Trial) {
    let reason = match healthy_by(&trial, Instant::now() + trial.deadline).await {
        Ok(()) => return confirm(&trial),
        Err(reason) => reason,
    };
    let reason = format!("not healthy within {:?}: {reason}", trial.deadline);
    tracing::error!("agent update on trial: {reason}; counting a failed boot");
    match trial.agent.pending() {
        Ok(Some(mut pending)) => {
            pending.failures.push(reason);
            if let Err(e) = trial.agent.set_pending(&pending) {
                tracing::error!("cannot record the failed boot's reason: {e}");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::error!("cannot read the pending agent update: {e}"),
    }
    match std::env::current_exe() {
        Ok(exe) => tracing::error!("{:#}", stage0::exec(&exe, false)),
        Err(e) => tracing::error!("cannot find this agent's binary to start again: {e}"),
    }
}

async fn healthy_by(trial: &Trial, deadline: Instant) -> Result<(), String> {
    if let Some(connected) = &trial.hub_connected {
        return tokio::time::timeout_at(deadline, connected.notified())
            .await
            .map_err(|_| "the hub was not reached".to_string());
    }
    loop {
        let (store, supervisor, run_dir) = (trial.store.clone(), trial.supervisor.clone(), trial.run_dir.clone());
        let checked = tokio::task::spawn_blocking(move || self_check(&store, &run_dir, &supervisor))
            .await
            .unwrap_or_else(|e| Err(format!("the self-check failed: {e}")));
        match checked {
            Ok(()) => return Ok(()),
            Err(reason) if Instant::now() + CHECK_EVERY > deadline => return Err(reason),
            Err(_) => tokio::time::sleep(CHECK_EVERY).await,
        }
    }
}

fn confirm(trial: &Trial) {
    if let Err(e) = ota::confirm_boot(&trial.agent.slots) {
        // Unconfirmed, the next start counts a boot: the update may still be
        // rolled back, which is the safe side.
        return tracing::error!("cannot confirm the agent update: {e}");
    }
    match trial.agent.pending() {
        Ok(Some(Pending { target, version, from, .. })) => {
            tracing::info!(%target, %version, "agent update confirmed healthy");
            record(&trial.agent, &trial.store, EventKind::Updated { target, version, from });
        }
        Ok(None) => tracing::info!("agent update confirmed healthy"),
        Err(e) => tracing::error!("cannot read the pending agent update: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use ota::{BootEnv, Slot, SlotBackend};
    use outpost_proto::UpdateOrigin;

    use super::*;

    fn pending(failures: &[&str]) -> Pending {
        Pending {
            target: "edge-agent".into(),
            version: "2.0.0".into(),
            slot: Slot::B,
            failures: failures.iter().map(|f| f.to_string()).collect(),
            from: Some(UpdateOrigin { deployment: "agent".into(), revision: 4 }),
        }
    }

    /// An agent's slots and store in a temp dir, with `env` and `pending` recorded.
    fn device(env: BootEnv, pending: &Pending) -> (tempfile::TempDir, AgentSlots, Store) {
        let dir = tempfile::tempdir().unwrap();
        let agent = AgentSlots::new(dir.path());
        std::fs::create_dir_all(dir.path().join("agent")).unwrap();
        agent.slots.write_env(&env).unwrap();
        agent.set_pending(pending).unwrap();
        let (store, _) = Store::open(&dir.path().join("store"), 1 << 20).unwrap();
        (dir, agent, store)
    }

    fn kinds(store: &Store) -> Vec<EventKind> {
        store.events_after(0, 100).unwrap().into_iter().map(|e| e.kind).collect()
    }

    #[test]
    fn settle_records_a_rollback_with_the_last_failed_boot_s_reason() {
        let (_dir, agent, store) = device(BootEnv::new(Slot::A, 3), &pending(&["first", "hub not reached"]));
        settle(&agent, &store);
        assert_eq!(
            kinds(&store),
            [EventKind::UpdateRolledBack {
                target: "edge-agent".into(),
                version: "2.0.0".into(),
                reason: "hub not reached".into(),
                from: Some(UpdateOrigin { deployment: "agent".into(), revision: 4 }),
            }]
        );
        assert_eq!(agent.pending().unwrap(), None);
    }

    #[test]
    fn settle_records_an_update_confirmed_before_its_event_was_written() {
        let (_dir, agent, store) = device(BootEnv::new(Slot::B, 3), &pending(&[]));
        settle(&agent, &store);
        let from = Some(UpdateOrigin { deployment: "agent".into(), revision: 4 });
        assert_eq!(kinds(&store), [EventKind::Updated { target: "edge-agent".into(), version: "2.0.0".into(), from }]);
    }

    #[test]
    fn settle_leaves_an_update_still_on_trial_alone() {
        let on_trial = BootEnv::new(Slot::A, 3).install().unwrap();
        let (_dir, agent, store) = device(on_trial, &pending(&[]));
        settle(&agent, &store);
        assert_eq!(kinds(&store), []);
        assert!(agent.pending().unwrap().is_some());
    }
}
