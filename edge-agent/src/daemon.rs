//! The long-running agent: keeps the device converged on its desired state,
//! watches each new revision and rolls it back on the device when it fails.
//!
//! It needs nothing but its own disk: at start it runs the last desired state
//! it stored, with no network and no hub, and nothing is ever stopped because
//! a hub cannot be reached. It is `run(listener, shutdown)` so that tests
//! start it in-process.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_proto::{DesiredState, EventKind};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::control::{Request, Response};
use crate::reconcile::Reconciler;
use crate::rollback::{judge, Verdict, Watch};
use crate::runtime::image::PullOptions;
use crate::runtime::Supervisor;
use crate::store::{Rollback, Store, StoreError};
use crate::sync::{self, SyncSettings};
use crate::trust;
use crate::update::fetch::Updater;
use crate::update::stage0;

/// Events the control socket returns per request at most.
const EVENTS_PER_REQUEST: usize = 1000;

/// The agent's state between passes.
pub struct Core {
    store: Arc<Store>,
    supervisor: Supervisor,
    pulls: PullOptions,
    /// The config's `trust-root`: seeds the store's trusted root on first use.
    trust_root: PathBuf,
    watches: Vec<Watch>,
    /// The revision of each deployment this process has started, so that a
    /// revision is watched once per start of the agent.
    started: BTreeMap<String, u64>,
    /// Agent self-update from the hub, when hub-http is configured.
    updater: Option<Arc<Updater>>,
    /// The store could not be read: sled keeps failing every call after an
    /// I/O error (a full disk), also once the disk has room again. (A failed
    /// write says so in `Store::failed`.)
    store_failed: bool,
}

impl Core {
    pub fn new(store: Arc<Store>, supervisor: Supervisor, pulls: PullOptions, trust_root: PathBuf) -> Self {
        Self {
            store,
            supervisor,
            pulls,
            trust_root,
            watches: Vec::new(),
            started: BTreeMap::new(),
            updater: None,
            store_failed: false,
        }
    }

    pub fn with_updater(self, updater: Arc<Updater>) -> Self {
        Self { updater: Some(updater), ..self }
    }

    /// One reconcile pass, then the verdict on each watched revision. Returns
    /// true when it rolled a deployment back, so another pass should follow.
    pub fn pass(&mut self) -> bool {
        // A write that failed may still show in what sled reads back (a
        // desired state refused for want of room): act on nothing from it.
        if self.store.failed() {
            return false;
        }
        let state = match self.store.effective() {
            Ok(Some(state)) if !self.store.failed() => state,
            Ok(_) => return false,
            Err(e) => {
                tracing::error!("cannot read the desired state: {e}");
                self.store_failed = true;
                return false;
            }
        };
        self.watch_new_revisions(&state);
        Reconciler { supervisor: &self.supervisor, pulls: &self.pulls }.pass(&state);
        self.judge_watches(&state)
    }

    fn watch_new_revisions(&mut self, state: &DesiredState) {
        let rollbacks = self.store.rollbacks().unwrap_or_default();
        for d in &state.deployments {
            if self.started.get(&d.name) == Some(&d.revision) {
                continue;
            }
            self.started.insert(d.name.clone(), d.revision);
            self.watches.retain(|w| w.deployment != d.name);
            // A rolled-back deployment runs a revision that already held; a
            // revision confirmed healthy before a restart stays confirmed.
            if rollbacks.contains_key(&d.name) || self.store.confirmed(&d.name).ok().flatten() == Some(d.revision) {
                continue;
            }
            self.event(EventKind::RevisionStarted { deployment: d.name.clone(), revision: d.revision });
            self.watches.push(Watch {
                deployment: d.name.clone(),
                revision: d.revision,
                since: Instant::now(),
                window: d.rollback_window,
            });
        }
    }

    fn judge_watches(&mut self, state: &DesiredState) -> bool {
        let instances = self.supervisor.list();
        let now = Instant::now();
        let mut rolled_back = false;
        for watch in std::mem::take(&mut self.watches) {
            let Some(d) = state.deployment(&watch.deployment).filter(|d| d.revision == watch.revision) else {
                continue;
            };
            match judge(&watch, d, &instances, now) {
                Verdict::Pending => self.watches.push(watch),
                Verdict::Healthy => {
                    self.event(EventKind::Healthy { deployment: d.name.clone(), revision: d.revision });
                    if let Err(e) = self.store.set_confirmed(&d.name, d.revision) {
                        tracing::error!("cannot record that {} revision {} is healthy: {e}", d.name, d.revision);
                    }
                }
                Verdict::Failed { workload, reason } => {
                    tracing::warn!(deployment = %d.name, revision = d.revision, %workload, "revision failed: {reason}");
                    self.event(EventKind::Failed {
                        deployment: d.name.clone(),
                        revision: d.revision,
                        workload: workload.clone(),
                        reason: reason.clone(),
                    });
                    rolled_back |= self.roll_back(&d.name, d.revision, format!("workload `{workload}`: {reason}"));
                }
            }
        }
        rolled_back
    }

    fn roll_back(&mut self, deployment: &str, from_revision: u64, reason: String) -> bool {
        let previous = match self.store.previous(deployment) {
            Ok(Some(previous)) => previous,
            Ok(None) => {
                tracing::error!(%deployment, "revision {from_revision} failed and there is no earlier revision to return to: its workloads keep restarting");
                return false;
            }
            Err(e) => {
                tracing::error!(%deployment, "cannot read the previous revision: {e}");
                return false;
            }
        };
        let to_revision = previous.revision;
        if let Err(e) =
            self.store.set_rollback(deployment, &Rollback { from_revision, to: previous, reason: reason.clone() })
        {
            tracing::error!(%deployment, "cannot record the rollback: {e}");
            return false;
        }
        tracing::warn!(%deployment, "rolled back from revision {from_revision} to {to_revision}: {reason}");
        self.event(EventKind::RolledBack { deployment: deployment.to_string(), from_revision, to_revision, reason });
        true
    }

    fn event(&self, kind: EventKind) {
        if let Err(e) = self.store.push_event(kind) {
            tracing::error!("cannot record an event: {e}");
        }
    }
}

/// Why `apply` did not store a desired state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The document is refused (invalid, not signed by the trusted root, an
    /// older or conflicting generation): it never will be stored.
    #[error("{0}")]
    Refused(String),
    /// The store could not take it (a full disk, an I/O error): the same
    /// document may be stored once the store can take it.
    #[error("{0}")]
    NotStored(String),
}

/// Verifies a desired state's signatures against the trusted root at
/// `trust_root` (see `trust`), stores it and records the event; the caller
/// reconciles. A refused state is not stored: the last good one keeps running.
pub fn apply(store: &Store, trust_root: &Path, state: &DesiredState) -> Result<bool, ApplyError> {
    let generation = state.generation;
    if let Err(e) = state.validate() {
        return refuse(store, EventKind::Rejected { reason: e.to_string() });
    }
    if let Err(e) = trust::verify(store, trust_root, state) {
        let reason = e.to_string();
        tracing::warn!(
            generation,
            "refused desired state generation {generation}: {reason}; the stored state keeps running"
        );
        return refuse(store, EventKind::Refused { generation, reason });
    }
    match store.set_desired(state) {
        // The store has it (it is what the agent runs and reports); only its
        // JSON copy, which restores a corrupt store, is behind until the next one.
        Err(StoreError::WriteSnapshot { path, source }) => {
            tracing::error!(generation, "stored, but its snapshot {} is not written: {source}", path.display());
            if let Err(e) = store.push_event(EventKind::Applied { generation }) {
                tracing::error!("cannot record an event: {e}");
            }
            Ok(true)
        }
        Ok(true) => {
            if let Err(e) = store.push_event(EventKind::Applied { generation }) {
                tracing::error!("cannot record an event: {e}");
            }
            Ok(true)
        }
        Ok(false) => Ok(false),
        Err(e @ (StoreError::StaleGeneration { .. } | StoreError::ConflictingGeneration { .. })) => {
            refuse(store, EventKind::Rejected { reason: e.to_string() })
        }
        // Not a verdict on the document: no event (the store that failed
        // would have to keep it), and the caller may offer it again.
        Err(e) => Err(ApplyError::NotStored(e.to_string())),
    }
}

fn refuse(store: &Store, event: EventKind) -> Result<bool, ApplyError> {
    let reason = match &event {
        EventKind::Rejected { reason } | EventKind::Refused { reason, .. } => reason.clone(),
        _ => String::new(),
    };
    if let Err(e) = store.push_event(event) {
        tracing::error!("cannot record an event: {e}");
    }
    Err(ApplyError::Refused(reason))
}

/// Runs the agent until `shutdown` completes, linked to a hub when `hub` is
/// given. Workloads keep running after it returns: their shims supervise them.
pub async fn run(
    core: Core,
    listener: UnixListener,
    interval: Duration,
    hub: Option<SyncSettings>,
    shutdown: impl Future<Output = ()>,
) {
    let store = core.store.clone();
    let supervisor = core.supervisor.clone();
    let updater = core.updater.clone();
    let trust_root = Arc::new(core.trust_root.clone());
    let core = Arc::new(Mutex::new(core));
    let kick = Arc::new(Notify::new());
    let mut reconciler = tokio::spawn(reconcile_loop(core, kick.clone(), interval));
    let updates = tokio::spawn(crate::update::deployment::run(store.clone(), updater.clone(), interval));
    let link = hub.map(|settings| {
        let (store, kick, trust_root) = (store.clone(), kick.clone(), trust_root.clone());
        tokio::spawn(async move {
            if let Err(e) = sync::run(settings, store, supervisor, kick, trust_root).await {
                tracing::error!("no link to the hub: {e}");
            }
        })
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = &mut reconciler => {
                // Only a store opened again works again: stop, and the service
                // manager (Restart=always) starts the agent anew; the
                // workloads keep running under their shims meanwhile.
                tracing::error!("the store fails: the agent stops, to start again with the store opened afresh");
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, store.clone(), kick.clone(), trust_root.clone(), updater.clone()));
                }
                Err(e) => tracing::warn!("control socket: {e}"),
            },
        }
    }
    reconciler.abort();
    updates.abort();
    if let Some(link) = link {
        link.abort();
    }
}

/// Returns when the store failed.
async fn reconcile_loop(core: Arc<Mutex<Core>>, kick: Arc<Notify>, interval: Duration) {
    loop {
        let core = core.clone();
        let (again, failed) = tokio::task::spawn_blocking(move || {
            core.lock().map(|mut c| (c.pass(), c.store_failed || c.store.failed())).unwrap_or((false, false))
        })
        .await
        .unwrap_or((false, false));
        if failed {
            return;
        }
        if again {
            continue;
        }
        tokio::select! {
            _ = kick.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn serve(
    stream: UnixStream,
    store: Arc<Store>,
    kick: Arc<Notify>,
    trust_root: Arc<PathBuf>,
    updater: Option<Arc<Updater>>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error(format!("malformed request: {e}")),
            Ok(Request::Events { after }) => match store.events_after(after, EVENTS_PER_REQUEST) {
                Ok(events) => Response::Events(events),
                Err(e) => Response::Error(e.to_string()),
            },
            Ok(Request::Apply(state)) => {
                let (store, trust_root) = (store.clone(), trust_root.clone());
                let generation = state.generation;
                match tokio::task::spawn_blocking(move || apply(&store, &trust_root, &state)).await {
                    Ok(Ok(changed)) => {
                        kick.notify_one();
                        Response::Applied { generation, changed }
                    }
                    Ok(Err(e)) => Response::Error(e.to_string()),
                    Err(e) => Response::Error(format!("the agent failed while storing: {e}")),
                }
            }
            Ok(Request::Update { target }) => update(&store, updater.as_deref(), &target).await,
        };
        let mut line = serde_json::to_vec(&response).unwrap_or_default();
        line.push(b'\n');
        if write.write_all(&line).await.is_err() {
            return;
        }
        if matches!(response, Response::Updating { .. }) {
            // Answered; now the new agent takes over this pid through stage 0,
            // which counts its first boot.
            match std::env::current_exe() {
                Ok(exe) => tracing::error!("{:#}", stage0::exec(&exe, false)),
                Err(e) => tracing::error!("cannot find this agent's binary to restart into the update: {e}"),
            }
        }
    }
}

async fn update(store: &Store, updater: Option<&Updater>, target: &str) -> Response {
    let Some(updater) = updater else {
        return Response::Error("agent updates need hub-http in the agent's configuration".into());
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Response::Error(format!("cannot find this agent's binary: {e}")),
    };
    match updater.update(store, target, &exe).await {
        Ok(installed) => {
            tracing::info!(target, version = %installed.version, slot = %installed.slot, "agent update installed; restarting into it");
            Response::Updating {
                target: installed.target,
                version: installed.version,
                slot: installed.slot.to_string(),
            }
        }
        Err(e) => {
            tracing::error!(target, "agent update refused: {e}");
            Response::Error(e.to_string())
        }
    }
}
