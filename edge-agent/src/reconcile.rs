//! Desired against actual: the smallest change that makes them agree.
//!
//! Level-triggered: `plan` looks only at what is wanted and what exists now,
//! never at what happened before, so it converges from any starting point (a
//! crash mid-update, a reboot, an operator's hand) and a second run right
//! after the first finds nothing to do. Each workload is planned on its own:
//! a change of one never touches another.

use outpost_proto::workload::UpdateStrategy;
use outpost_proto::{DesiredState, WorkloadSpec};

use crate::runtime::health::Health;
use crate::runtime::image::{Image, ImageStore, NoProgress, PullOptions};
use crate::runtime::record::{instance_id, DeploymentRef};
use crate::runtime::status::State;
use crate::runtime::supervisor::WorkloadInfo;
use crate::runtime::Supervisor;

/// A workload the device should run, and the deployment revision asking for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub spec: WorkloadSpec,
    pub deployment: DeploymentRef,
}

pub fn wanted(state: &DesiredState) -> Vec<Wanted> {
    state
        .deployments
        .iter()
        .flat_map(|d| {
            d.active_workloads().map(|w| Wanted {
                spec: w.clone(),
                deployment: DeploymentRef { name: d.name.clone(), revision: d.revision },
            })
        })
        .collect()
}

/// An instance as the plan sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Actual {
    pub instance: String,
    pub name: String,
    pub owned: bool,
    pub phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Its shim supervises it: running, starting, or backing off between restarts.
    Supervised,
    /// Running, and healthy or without a probe: a start-first replacement may retire the old one.
    Up,
    /// Exited for good under its restart policy: left as it is.
    Finished,
    /// Not running and should be: never started, stopped, its shim lost, its start failed.
    Down,
}

impl Actual {
    pub fn from_info(info: &WorkloadInfo) -> Self {
        let phase = match &info.status {
            None => Phase::Down,
            Some(s) if !s.state.is_final() && !s.shim_alive() => Phase::Down,
            Some(s) => match s.state {
                State::Running if matches!(s.health, Health::None | Health::Healthy) => Phase::Up,
                State::Running | State::Starting | State::Backoff | State::Stopping => Phase::Supervised,
                State::Exited => Phase::Finished,
                State::Stopped | State::Failed => Phase::Down,
            },
        };
        Self { instance: info.instance.clone(), name: info.name.clone(), owned: info.deployment.is_some(), phase }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Stop and delete an instance (its named volumes stay).
    Remove(String),
    /// Write a new instance for this workload and start it.
    Create(Box<Wanted>),
    /// Start an existing instance again.
    Start(String),
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Remove(instance) => write!(f, "remove {instance}"),
            Action::Create(w) => {
                write!(f, "create {} ({} revision {})", w.spec.name, w.deployment.name, w.deployment.revision)
            }
            Action::Start(instance) => write!(f, "start {instance}"),
        }
    }
}

pub fn plan(wanted: &[Wanted], actual: &[Actual]) -> Vec<Action> {
    let mut actions = Vec::new();
    for w in wanted {
        let id = instance_id(&w.spec);
        let current = actual.iter().find(|a| a.instance == id);
        let others: Vec<&Actual> = actual.iter().filter(|a| a.name == w.spec.name && a.instance != id).collect();
        let retire =
            |actions: &mut Vec<Action>| actions.extend(others.iter().map(|a| Action::Remove(a.instance.clone())));
        match (w.spec.update_strategy, current.map(|c| c.phase)) {
            (UpdateStrategy::StopFirst, None) => {
                retire(&mut actions);
                actions.push(Action::Create(Box::new(w.clone())));
            }
            (UpdateStrategy::StartFirst, None) => actions.push(Action::Create(Box::new(w.clone()))),
            (_, Some(Phase::Down)) => {
                if w.spec.update_strategy == UpdateStrategy::StopFirst {
                    retire(&mut actions);
                }
                actions.push(Action::Start(id));
            }
            (UpdateStrategy::StartFirst, Some(Phase::Supervised)) => {}
            (_, Some(_)) => retire(&mut actions),
        }
    }
    for a in actual {
        if a.owned && !wanted.iter().any(|w| w.spec.name == a.name) {
            actions.push(Action::Remove(a.instance.clone()));
        }
    }
    actions
}

/// What one action of a pass did.
#[derive(Debug)]
pub struct Outcome {
    pub action: Action,
    pub result: Result<(), String>,
}

/// Carries out plans with the supervisor, one action at a time.
pub struct Reconciler<'a> {
    pub supervisor: &'a Supervisor,
    pub pulls: &'a PullOptions,
}

impl Reconciler<'_> {
    /// Plans against what exists now and carries the plan out. An action that
    /// fails (an image that cannot be had offline, a device unplugged) is
    /// reported and the rest go on: one broken workload never holds back the others.
    pub fn pass(&self, state: &DesiredState) -> Vec<Outcome> {
        let actual: Vec<Actual> = self.supervisor.list().iter().map(Actual::from_info).collect();
        plan(&wanted(state), &actual)
            .into_iter()
            .map(|action| {
                let result = self.execute(&action);
                if let Err(e) = &result {
                    tracing::warn!("{action}: {e}");
                }
                Outcome { action, result }
            })
            .collect()
    }

    fn execute(&self, action: &Action) -> Result<(), String> {
        match action {
            Action::Remove(instance) => self.supervisor.remove(instance).map_err(|e| e.to_string()),
            Action::Start(instance) => self.supervisor.start(instance).map(drop).map_err(|e| e.to_string()),
            Action::Create(w) => {
                let image = self.image(&w.spec.image)?;
                let instance =
                    self.supervisor.create(&w.spec, &image, Some(w.deployment.clone())).map_err(|e| e.to_string())?;
                self.supervisor.start(&instance).map(drop).map_err(|e| e.to_string())
            }
        }
    }

    /// The local image, else a pull: a device offline runs what it has.
    fn image(&self, reference: &str) -> Result<Image, String> {
        let store = ImageStore::open(&self.supervisor.paths().images()).map_err(|e| e.to_string())?;
        if let Some(image) = store.find(reference).map_err(|e| e.to_string())? {
            return Ok(image);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime for the pull: {e}"))?;
        runtime.block_on(store.pull(reference, self.pulls, &NoProgress)).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, image: &str) -> WorkloadSpec {
        WorkloadSpec::parse(&format!("name = \"{name}\"\nimage = \"{image}\"")).unwrap()
    }

    fn want(name: &str, image: &str) -> Wanted {
        Wanted { spec: spec(name, image), deployment: DeploymentRef { name: "app".into(), revision: 1 } }
    }

    fn start_first(mut w: Wanted) -> Wanted {
        w.spec.update_strategy = UpdateStrategy::StartFirst;
        w
    }

    fn have(w: &Wanted, phase: Phase) -> Actual {
        Actual { instance: instance_id(&w.spec), name: w.spec.name.clone(), owned: true, phase }
    }

    #[test]
    fn empty_device_creates_every_wanted_workload() {
        let wanted = [want("a", "x:1"), want("b", "y:1")];
        assert_eq!(
            plan(&wanted, &[]),
            [Action::Create(Box::new(wanted[0].clone())), Action::Create(Box::new(wanted[1].clone()))]
        );
    }

    #[test]
    fn converged_device_plans_nothing_whatever_the_phase() {
        let wanted = [want("a", "x:1"), want("b", "y:1"), want("c", "z:1")];
        let actual =
            [have(&wanted[0], Phase::Up), have(&wanted[1], Phase::Supervised), have(&wanted[2], Phase::Finished)];
        assert!(plan(&wanted, &actual).is_empty());
    }

    #[test]
    fn partial_device_creates_only_what_is_missing() {
        let wanted = [want("a", "x:1"), want("b", "y:1")];
        assert_eq!(plan(&wanted, &[have(&wanted[0], Phase::Up)]), [Action::Create(Box::new(wanted[1].clone()))]);
    }

    #[test]
    fn stopped_or_lost_instance_is_started_again() {
        let wanted = [want("a", "x:1")];
        assert_eq!(plan(&wanted, &[have(&wanted[0], Phase::Down)]), [Action::Start(instance_id(&wanted[0].spec))]);
    }

    #[test]
    fn extra_owned_instance_is_removed_and_a_hand_run_one_is_left_alone() {
        let wanted = [want("a", "x:1")];
        let mut hand_run = have(&want("mine", "m:1"), Phase::Up);
        hand_run.owned = false;
        let stray = have(&want("old", "o:1"), Phase::Up);
        let actual = [have(&wanted[0], Phase::Up), stray.clone(), hand_run];
        assert_eq!(plan(&wanted, &actual), [Action::Remove(stray.instance)]);
    }

    #[test]
    fn changed_spec_stops_the_old_instance_before_creating_the_new_one() {
        let old = want("a", "x:1");
        let new = want("a", "x:2");
        let other = want("b", "y:1");
        let actual = [have(&old, Phase::Up), have(&other, Phase::Up)];
        let actions = plan(&[new.clone(), other], &actual);
        assert_eq!(actions, [Action::Remove(instance_id(&old.spec)), Action::Create(Box::new(new))]);
    }

    #[test]
    fn start_first_keeps_the_old_instance_until_the_new_one_is_up() {
        let old = start_first(want("a", "x:1"));
        let new = start_first(want("a", "x:2"));
        let wanted = [new.clone()];
        assert_eq!(plan(&wanted, &[have(&old, Phase::Up)]), [Action::Create(Box::new(new.clone()))]);
        assert!(plan(&wanted, &[have(&old, Phase::Up), have(&new, Phase::Supervised)]).is_empty());
        let done = plan(&wanted, &[have(&old, Phase::Up), have(&new, Phase::Up)]);
        assert_eq!(done, [Action::Remove(instance_id(&old.spec))]);
    }

    #[test]
    fn crash_between_remove_and_create_converges_to_the_new_instance() {
        let new = want("a", "x:2");
        let half_made = have(&new, Phase::Down);
        assert_eq!(plan(std::slice::from_ref(&new), &[half_made]), [Action::Start(instance_id(&new.spec))]);
    }

    #[test]
    fn desired_state_flattens_to_workloads_with_their_revision() {
        let state = DesiredState::parse(
            "version = 1\ngeneration = 3\n[[deployments]]\nname = \"d\"\nrevision = 9\n[[deployments.workloads]]\nname = \"w\"\nimage = \"i\"\n",
        )
        .unwrap();
        let w = wanted(&state);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].deployment, DeploymentRef { name: "d".into(), revision: 9 });
    }
}
