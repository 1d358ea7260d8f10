//! The rollout engine. Once a second, and at once when an operator changes
//! something, a pass judges every rollout from the store, moves it on, and
//! writes the desired state of each device whose due deployments changed.
//! All it decides is in the store first, so a restarted hub resumes every
//! rollout where it was.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use outpost_proto::desired::DESIRED_STATE_VERSION;
use outpost_proto::fleet::{Counts, DeploymentStatus, OnFailure, RolloutState, RolloutStatus, WaveStatus};
use outpost_proto::DesiredState;
use tokio::sync::{watch, Mutex};
use tracing::{error, info, warn};

use super::judge::{self, DeviceFacts, DeviceState, Sent, Step};
use super::merge::{self, Offer};
use super::{waves, DeploymentRecord};
use crate::store::{DeviceSummary, Store, StoreError};
use crate::sync::Publisher;

const TICK: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Engine {
    store: Store,
    publisher: Publisher,
    /// Each deployment's status as of the last pass.
    statuses: Arc<RwLock<BTreeMap<String, DeploymentStatus>>>,
    /// One pass at a time; true once one has run.
    passing: Arc<Mutex<bool>>,
    /// The last pass found no deployment and no device that runs one: until
    /// an operator applies one, passes have nothing to do.
    idle: Arc<AtomicBool>,
    /// A site hub composes its deployments with its parent's (site.rs).
    site: bool,
}

impl Engine {
    pub fn new(store: Store, publisher: Publisher, site: bool) -> Self {
        Self { store, publisher, statuses: Arc::default(), passing: Arc::default(), idle: Arc::default(), site }
    }

    pub async fn status(&self, name: &str) -> Result<Option<DeploymentStatus>, StoreError> {
        self.first_pass().await?;
        Ok(self.statuses.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned())
    }

    pub async fn statuses(&self) -> Result<Vec<DeploymentStatus>, StoreError> {
        self.first_pass().await?;
        Ok(self.statuses.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect())
    }

    /// Right after a start there is no status yet.
    async fn first_pass(&self) -> Result<(), StoreError> {
        if *self.passing.lock().await {
            return Ok(());
        }
        self.pass().await
    }

    /// Runs passes until `stopping`.
    pub fn start(self, mut stopping: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let idle = self.idle.load(Ordering::Relaxed) && !self.store.has_deployments().unwrap_or(true);
                if !idle {
                    if let Err(e) = self.pass().await {
                        error!("rollouts: {e}");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(TICK) => {}
                    _ = stopping.wait_for(|stop| *stop) => return,
                }
            }
        })
    }

    /// One pass, now: the API runs one after an operator's change, so its
    /// answer shows the change's effect.
    pub async fn pass(&self) -> Result<(), StoreError> {
        let mut passed = self.passing.lock().await;
        let store = self.store.clone();
        let now = crate::sync::now_ms();
        let site = self.site;
        let pass = tokio::task::spawn_blocking(move || pass(&store, now, site))
            .await
            .expect("a rollout pass does not panic")?;
        self.idle.store(pass.idle, Ordering::Relaxed);
        *self.statuses.write().unwrap_or_else(|p| p.into_inner()) = pass.statuses;
        *passed = true;
        if !pass.changed.is_empty() {
            self.store.flush().await?;
            for device in &pass.changed {
                self.publisher.desired_changed(device);
            }
        }
        Ok(())
    }
}

struct Pass {
    statuses: BTreeMap<String, DeploymentStatus>,
    /// Devices whose desired state the pass changed.
    changed: Vec<String>,
    idle: bool,
}

/// Where one rollout stands on the fleet.
struct Judged<'a> {
    counts: Counts,
    /// The states of the devices due the rollout's revision.
    reached: Vec<DeviceState>,
    /// Each targeted device that is due a revision, and which.
    dues: Vec<(&'a str, u64)>,
}

fn judge<'a>(
    record: &DeploymentRecord,
    order: &[&'a str],
    devices: &HashMap<&str, &DeviceSummary>,
    now: u64,
) -> Judged<'a> {
    let strategy = &record.newest().spec.strategy;
    let covered = waves::covered(&strategy.waves, record.rollout.wave, order.len());
    let mut judged =
        Judged { counts: Counts { targeted: order.len(), ..Counts::default() }, reached: vec![], dues: vec![] };
    for (position, &id) in order.iter().enumerate() {
        let device = devices[id];
        let sent = device.rollouts.get(&record.name);
        let Some(due) = judge::due(&record.rollout, position, covered, sent) else { continue };
        let facts = DeviceFacts { online: device.online, acknowledged: device.generation, sent };
        let state = judge::device_state(due, facts, strategy.min_healthy, now);
        if due == record.rollout.revision {
            judged.counts.due += 1;
            judged.reached.push(state);
        }
        judge::count(&mut judged.counts, state);
        judged.dues.push((id, due));
    }
    judged
}

/// Moves a progressing rollout on; true when it changed.
fn step(record: &mut DeploymentRecord, reached: &[DeviceState], now: u64) -> bool {
    if record.rollout.state != RolloutState::Progressing {
        return false;
    }
    let strategy = record.newest().spec.strategy.clone();
    let rollout = &mut record.rollout;
    match judge::decide(&strategy, rollout, reached, now) {
        Step::Wait => return false,
        Step::NextWave => {
            rollout.wave += 1;
            rollout.wave_started_at = now;
            info!(deployment = %record.name, revision = rollout.revision, "wave {} started", rollout.wave + 1);
        }
        Step::Complete => {
            rollout.state = RolloutState::Complete;
            info!(deployment = %record.name, revision = rollout.revision, "rollout complete");
        }
        Step::Stop { reason } => {
            rollout.state = match strategy.on_failure {
                OnFailure::Rollback if rollout.previous.is_some() => RolloutState::RolledBack,
                OnFailure::Rollback | OnFailure::Pause => RolloutState::Paused,
            };
            warn!(deployment = %record.name, revision = rollout.revision, state = ?rollout.state, "rollout stopped: {reason}");
            rollout.reason = Some(reason);
        }
    }
    rollout.updated_at = now;
    true
}

fn pass(store: &Store, now: u64, site: bool) -> Result<Pass, StoreError> {
    let devices = store.device_summaries()?;
    let by_id: HashMap<&str, &DeviceSummary> = devices.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut records = store.deployment_records()?;
    let mut statuses = BTreeMap::new();
    // Device -> (index into records, revision due).
    let mut dues: HashMap<&str, Vec<(usize, u64)>> = HashMap::new();
    for (index, record) in records.iter_mut().enumerate() {
        let spec = &record.newest().spec;
        let order = waves::order(devices.iter().filter(|d| spec.selects(&d.labels)).map(|d| d.id.as_str()));
        let mut judged = judge(record, &order, &by_id, now);
        let read = record.clone();
        if step(record, &judged.reached, now) {
            // Stored only if no operator changed the deployment meanwhile; else the next pass judges again.
            let stored = store.update_deployment(&record.name, |old| match old {
                Some(old) if old == read => (Some(record.clone()), true),
                old => (old, false),
            })?;
            if !stored {
                *record = read;
            }
            judged = judge(record, &order, &by_id, now);
        }
        for &(device, revision) in &judged.dues {
            dues.entry(device).or_default().push((index, revision));
        }
        statuses.insert(record.name.clone(), status(record, order.len(), judged.counts));
    }

    let mut changed = Vec::new();
    let idle = records.is_empty() && devices.iter().all(|d| d.rollouts.is_empty());
    for device in &devices {
        let due = dues.remove(device.id.as_str()).unwrap_or_default();
        if due.is_empty() && device.rollouts.is_empty() {
            continue;
        }
        let offers: Vec<Offer> = due
            .iter()
            .filter_map(|&(index, revision)| {
                let record = &records[index];
                let stored = record.revision(revision)?;
                Some(Offer {
                    deployment: &record.name,
                    priority: record.newest().spec.priority,
                    revision,
                    rollback_window: stored.spec.rollback_window,
                    workloads: &stored.spec.workloads,
                    update: stored.spec.update.as_ref(),
                    signatures: &stored.signatures,
                })
            })
            .collect();
        let (deployments, conflicts) = merge::merge(&device.id, offers);
        for conflict in conflicts {
            for name in [&conflict.winner, &conflict.loser] {
                if let Some(status) = statuses.get_mut(name) {
                    status.conflicts.push(conflict.clone());
                }
            }
        }
        // The engine alone writes a managed device's desired state, and notes
        // each deployment's revision in it: unchanged revisions, unchanged state.
        let same = deployments.len() == device.rollouts.len()
            && deployments.iter().all(|d| device.rollouts.get(&d.name).is_some_and(|s| s.revision == d.revision));
        if same {
            continue;
        }
        let generation = if site {
            // The site's own deployments are one source; the parent's the other.
            let Some(generation) = crate::site::set_source(store, &device.id, false, 0, deployments.clone(), now)?
            else {
                continue;
            };
            generation
        } else {
            let stored = store.desired(&device.id)?;
            if stored.as_ref().map(|s| &s.deployments) == Some(&deployments) {
                continue;
            }
            stored.map_or(1, |s| s.generation + 1)
        };
        store.update_device(&device.id, |d| {
            d.rollouts.retain(|name, _| deployments.iter().any(|dep| &dep.name == name));
            for dep in &deployments {
                let sent = d.rollouts.entry(dep.name.clone()).or_default();
                if sent.revision != dep.revision {
                    *sent = Sent {
                        revision: dep.revision,
                        generation,
                        running_since: None,
                        failed: None,
                        agent_update: dep.update.is_some(),
                        held: None,
                    };
                }
            }
        })?;
        if !site {
            store.put_desired(&device.id, &DesiredState { version: DESIRED_STATE_VERSION, generation, deployments })?;
        }
        changed.push(device.id.clone());
    }
    Ok(Pass { statuses, changed, idle })
}

fn status(record: &DeploymentRecord, targeted: usize, counts: Counts) -> DeploymentStatus {
    let newest = record.newest();
    let rollout = &record.rollout;
    let waves = &newest.spec.strategy.waves;
    let complete = rollout.state == RolloutState::Complete;
    DeploymentStatus {
        name: record.name.clone(),
        revision: newest.revision,
        spec: newest.spec.clone(),
        rollout: RolloutStatus {
            revision: rollout.revision,
            previous: rollout.previous,
            state: rollout.state,
            wave: rollout.wave,
            waves: waves
                .iter()
                .enumerate()
                .map(|(i, &wave)| WaveStatus {
                    wave,
                    devices: waves::covered(waves, i, targeted),
                    done: complete || i < rollout.wave,
                })
                .collect(),
            counts,
            reason: rollout.reason.clone(),
            started_at: rollout.started_at,
            updated_at: rollout.updated_at,
        },
        conflicts: Vec::new(),
    }
}
