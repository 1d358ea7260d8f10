//! Agent updates that come in a deployment (docs/trust.md, "Agent updates
//! in rollouts"): the hub rolls them out in waves like workloads, and the
//! device acts on each deployment revision's update once: installs it and
//! restarts into it, finds it running already, or refuses it. The verdict
//! reaches the hub as an event naming the revision, which its rollout judges.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::{AgentUpdate, EventKind, UpdateOrigin};

use super::fetch::{Installed, Outcome, Updater};
use super::stage0;
use crate::store::Store;

/// The longest wait between two tries of an update the link kept from us.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// What the loop does after one look at the desired state.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Nothing to do, or done: look again at the next interval.
    Idle,
    /// The hub or the link failed: try again later.
    RetryLater,
    /// Installed: restart into it.
    Restart(Installed),
}

/// The update the stored desired state asks for, with the revision asking.
fn wanted(store: &Store) -> Option<(AgentUpdate, UpdateOrigin)> {
    let state = match store.effective() {
        Ok(state) => state?,
        Err(e) => {
            tracing::error!("cannot read the desired state for its agent update: {e}");
            return None;
        }
    };
    state.deployments.into_iter().find_map(|d| {
        let origin = UpdateOrigin { deployment: d.name, revision: d.revision };
        d.update.map(|update| (update, origin))
    })
}

/// One look: acts on the desired state's agent update unless this revision
/// was acted on already or an update is on trial.
pub async fn step(store: &Store, updater: Option<&Updater>, running_binary: &Path) -> Step {
    let Some((update, origin)) = wanted(store) else { return Step::Idle };
    match store.agent_update_handled() {
        Ok(Some(handled)) if handled == origin => return Step::Idle,
        Ok(_) => {}
        Err(e) => {
            tracing::error!("cannot read which agent update was handled: {e}");
            return Step::RetryLater;
        }
    }
    let Some(updater) = updater else {
        let reason = "agent updates need hub-http in the agent's configuration".to_string();
        return refuse(store, &update, origin, reason);
    };
    if updater.agent.pending().ok().flatten().is_some() {
        // An update on trial: its verdict comes first.
        return Step::Idle;
    }
    let (target, version) = (&update.target, &update.version);
    tracing::info!(%target, %version, deployment = %origin.deployment, revision = origin.revision, "agent update asked by a deployment");
    match updater.update_for(store, &update, origin.clone(), running_binary).await {
        Ok(outcome) => {
            if let Err(e) = store.set_agent_update_handled(&origin) {
                tracing::error!("cannot record the agent update as handled: {e}");
                return Step::RetryLater;
            }
            match outcome {
                Outcome::Installed(installed) => Step::Restart(installed),
                Outcome::AlreadyRunning { version } => {
                    tracing::info!(%target, %version, "the agent already runs this update");
                    let kind = EventKind::Updated { target: target.clone(), version, from: Some(origin) };
                    if let Err(e) = store.push_event(kind) {
                        tracing::error!("cannot record an event: {e}");
                    }
                    Step::Idle
                }
            }
        }
        Err(e) if e.is_transient() => {
            tracing::warn!(%target, "agent update not fetched, trying again later: {e}");
            Step::RetryLater
        }
        Err(e) => refuse(store, &update, origin, e.to_string()),
    }
}

fn refuse(store: &Store, update: &AgentUpdate, origin: UpdateOrigin, reason: String) -> Step {
    tracing::error!(target = %update.target, version = %update.version, "agent update refused: {reason}");
    let kind = EventKind::UpdateFailed {
        target: update.target.clone(),
        version: update.version.clone(),
        reason,
        deployment: origin.deployment.clone(),
        revision: origin.revision,
    };
    if let Err(e) = store.push_event(kind).and_then(|_| store.set_agent_update_handled(&origin)) {
        tracing::error!("cannot record the refused agent update: {e}");
    }
    Step::Idle
}

/// Looks every `interval`; after a failed fetch, waits longer each time.
pub async fn run(store: Arc<Store>, updater: Option<Arc<Updater>>, interval: Duration) {
    let running_binary: PathBuf = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return tracing::error!("cannot find this agent's binary, so no agent update can run: {e}"),
    };
    let mut wait = interval;
    loop {
        match step(&store, updater.as_deref(), &running_binary).await {
            Step::Idle => wait = interval,
            Step::RetryLater => wait = (wait * 2).clamp(interval, MAX_RETRY),
            Step::Restart(installed) => {
                tracing::info!(target = %installed.target, version = %installed.version, slot = %installed.slot, "agent update installed; restarting into it");
                // Exec keeps the pid; stage 0 counts the new agent's first boot.
                tracing::error!("{:#}", stage0::exec(&running_binary, false));
                wait = interval;
            }
        }
        tokio::time::sleep(wait).await;
    }
}
