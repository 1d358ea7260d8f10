//! A SIMULATED device's runtime: what the edge-agent's daemon does with a
//! desired state (edge-agent/src/daemon.rs), with no workloads behind it.
//! Pure: the device task feeds it desired states and due verdicts, and
//! publishes what it returns.
//!
//! As the agent: each new revision of a deployment is started
//! (`revision-started`) and watched; it then holds (`healthy`) or fails
//! (`failed`, its workloads in `crash-loop`), and a failed revision returns
//! its deployment to the revision it replaced (`rolled-back`), which stays
//! until the desired state brings a newer revision than the failed one.
//! Unlike the agent, it takes every desired state as valid (the hub checks
//! them before sending) and keeps nothing across a restart.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_proto::sync::WorkloadReport;
use outpost_proto::{Deployment, DesiredState, EventKind};

use super::script::FailureScript;

/// The reason a scripted failure gives, in `failed` and `rolled-back` events.
pub const SCRIPTED_FAILURE: &str = "crash loop (scripted failure of a simulated device)";
/// The restarts a crash-looping workload reports: a supervisor declares a
/// crash loop after a few quick restarts, never after none.
const CRASH_LOOP_RESTARTS: u32 = 5;

/// What the device records and says, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// An event for the outbox.
    Event(EventKind),
    /// Every workload as it is now, for a report.
    Report(Vec<WorkloadReport>),
}

/// What one transition produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    pub outputs: Vec<Output>,
    /// Revisions to judge (`Runtime::judge`) once their delay has passed.
    pub verdicts_due: Vec<Due>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub deployment: String,
    pub revision: u64,
    pub after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Started; its verdict is due.
    Watching,
    Healthy,
    /// Failed with no earlier revision to return to: it keeps crash-looping.
    CrashLoop,
    /// Runs an earlier revision since `from_revision` failed.
    RolledBack {
        from_revision: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Running {
    /// The revision that runs: an earlier one than desired after a rollback.
    deployment: Deployment,
    phase: Phase,
}

/// One simulated device's deployments, known by its index in the fleet.
#[derive(Debug, Clone)]
pub struct Runtime {
    index: usize,
    generation: Option<u64>,
    running: BTreeMap<String, Running>,
    /// Per deployment, the revision the running one replaced: where a failure returns to.
    previous: BTreeMap<String, Deployment>,
}

impl Runtime {
    pub fn new(index: usize) -> Self {
        Self { index, generation: None, running: BTreeMap::new(), previous: BTreeMap::new() }
    }

    /// The generation of the desired state stored last.
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// The revision of `deployment` that runs (an earlier one after a rollback).
    pub fn revision(&self, deployment: &str) -> Option<u64> {
        self.running.get(deployment).map(|r| r.deployment.revision)
    }

    /// Takes a desired state; an older or the same generation changes
    /// nothing (the broker hands the retained one again on every reconnect).
    pub fn apply(&mut self, state: &DesiredState, script: &FailureScript) -> Step {
        let mut step = Step::default();
        if self.generation.is_some_and(|g| g >= state.generation) {
            return step;
        }
        self.generation = Some(state.generation);
        step.outputs.push(Output::Event(EventKind::Applied { generation: state.generation }));
        self.running.retain(|name, _| state.deployment(name).is_some());
        self.previous.retain(|name, _| state.deployment(name).is_some());
        for desired in &state.deployments {
            let kept = match self.running.get(&desired.name) {
                Some(r) if r.deployment.revision == desired.revision => true,
                // As the agent: a rollback holds until a revision newer than the failed one.
                Some(Running { phase: Phase::RolledBack { from_revision }, .. }) => desired.revision <= *from_revision,
                _ => false,
            };
            if kept {
                continue;
            }
            let started = Running { deployment: desired.clone(), phase: Phase::Watching };
            if let Some(replaced) = self.running.insert(desired.name.clone(), started) {
                self.previous.insert(desired.name.clone(), replaced.deployment);
            }
            step.outputs.push(Output::Event(EventKind::RevisionStarted {
                deployment: desired.name.clone(),
                revision: desired.revision,
            }));
            let after = match script.fails(self.index, &desired.name, desired.revision) {
                true => script.failing_after,
                false => script.healthy_after,
            };
            step.verdicts_due.push(Due { deployment: desired.name.clone(), revision: desired.revision, after });
        }
        step.outputs.push(Output::Report(self.workloads()));
        step
    }

    /// The verdict on `revision` of `deployment`, if it still runs under watch.
    pub fn judge(&mut self, deployment: &str, revision: u64, script: &FailureScript) -> Step {
        let mut step = Step::default();
        let Some(running) = self.running.get_mut(deployment) else { return step };
        if running.deployment.revision != revision || running.phase != Phase::Watching {
            return step;
        }
        if !script.fails(self.index, deployment, revision) {
            running.phase = Phase::Healthy;
            step.outputs.push(Output::Event(EventKind::Healthy { deployment: deployment.to_string(), revision }));
            return step;
        }
        running.phase = Phase::CrashLoop;
        let workload = running.deployment.active_workloads().next().map(|w| w.name.clone()).unwrap_or_default();
        step.outputs.push(Output::Report(self.workloads()));
        step.outputs.push(Output::Event(EventKind::Failed {
            deployment: deployment.to_string(),
            revision,
            workload: workload.clone(),
            reason: SCRIPTED_FAILURE.into(),
        }));
        let Some(previous) = self.previous.remove(deployment) else { return step };
        step.outputs.push(Output::Event(EventKind::RolledBack {
            deployment: deployment.to_string(),
            from_revision: revision,
            to_revision: previous.revision,
            reason: format!("workload `{workload}`: {SCRIPTED_FAILURE}"),
        }));
        let back = Running { deployment: previous, phase: Phase::RolledBack { from_revision: revision } };
        self.running.insert(deployment.to_string(), back);
        step.outputs.push(Output::Report(self.workloads()));
        step
    }

    /// Every workload that runs, with its deployment and revision.
    pub fn workloads(&self) -> Vec<WorkloadReport> {
        let mut workloads = Vec::new();
        for running in self.running.values() {
            let (state, restarts) = match running.phase {
                Phase::CrashLoop => ("crash-loop", CRASH_LOOP_RESTARTS),
                Phase::Watching | Phase::Healthy | Phase::RolledBack { .. } => ("running", 0),
            };
            workloads.extend(running.deployment.active_workloads().map(|w| WorkloadReport {
                name: w.name.clone(),
                deployment: Some(running.deployment.name.clone()),
                revision: Some(running.deployment.revision),
                state: state.into(),
                health: None,
                restarts,
                last_exit: None,
            }));
        }
        workloads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::script::Devices;

    fn deployment(name: &str, revision: u64, workloads: &[&str]) -> Deployment {
        Deployment {
            name: name.into(),
            revision,
            rollback_window: Duration::from_secs(120),
            workloads: workloads
                .iter()
                .map(|w| serde_json::from_value(serde_json::json!({ "name": w, "image": "busybox:latest" })).unwrap())
                .collect(),
            update: None,
            excluded: Vec::new(),
            signatures: Vec::new(),
        }
    }

    fn state(generation: u64, deployments: Vec<Deployment>) -> DesiredState {
        DesiredState { version: 1, generation, deployments }
    }

    fn events(step: &Step) -> Vec<EventKind> {
        step.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Event(e) => Some(e.clone()),
                Output::Report(_) => None,
            })
            .collect()
    }

    /// Each report of the step, as (workload, deployment, revision, state).
    fn reports(step: &Step) -> Vec<Vec<(String, String, u64, String)>> {
        step.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Report(workloads) => Some(
                    workloads
                        .iter()
                        .map(|w| {
                            let deployment = w.deployment.clone().unwrap();
                            (w.name.clone(), deployment, w.revision.unwrap(), w.state.clone())
                        })
                        .collect(),
                ),
                Output::Event(_) => None,
            })
            .collect()
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

    #[test]
    fn a_new_desired_state_starts_each_revision_reports_it_running_and_makes_its_verdict_due() {
        let script = FailureScript { healthy_after: Duration::from_secs(3), ..FailureScript::healthy() };
        let mut runtime = Runtime::new(0);
        let step =
            runtime.apply(&state(1, vec![deployment("app", 1, &["web"]), deployment("db", 4, &["pg"])]), &script);
        assert_eq!(
            events(&step),
            [EventKind::Applied { generation: 1 }, started("app", 1), started("db", 4)],
            "deployments in the desired state's order"
        );
        assert_eq!(reports(&step), [vec![row("web", "app", 1, "running"), row("pg", "db", 4, "running")]]);
        let due = |d: &str, revision| Due { deployment: d.into(), revision, after: Duration::from_secs(3) };
        assert_eq!(step.verdicts_due, [due("app", 1), due("db", 4)]);
        assert_eq!(
            (runtime.generation(), runtime.revision("app"), runtime.revision("db")),
            (Some(1), Some(1), Some(4))
        );

        let step = runtime.judge("app", 1, &script);
        assert_eq!(events(&step), [healthy("app", 1)]);
        assert!(reports(&step).is_empty(), "holding changes no workload");
        assert_eq!(runtime.judge("app", 1, &script), Step::default(), "a revision is judged once");
    }

    #[test]
    fn the_same_or_an_older_generation_changes_nothing() {
        let script = FailureScript::healthy();
        let mut runtime = Runtime::new(0);
        runtime.apply(&state(2, vec![deployment("app", 1, &["web"])]), &script);
        assert_eq!(runtime.apply(&state(2, vec![deployment("app", 1, &["web"])]), &script), Step::default());
        assert_eq!(runtime.apply(&state(1, vec![deployment("app", 9, &["web"])]), &script), Step::default());
        assert_eq!(runtime.revision("app"), Some(1));
    }

    #[test]
    fn an_unchanged_revision_is_not_started_again_and_a_dropped_deployment_goes() {
        let script = FailureScript::healthy();
        let mut runtime = Runtime::new(0);
        runtime.apply(&state(1, vec![deployment("app", 1, &["web"]), deployment("db", 1, &["pg"])]), &script);
        let step = runtime.apply(&state(2, vec![deployment("app", 1, &["web"])]), &script);
        assert_eq!(events(&step), [EventKind::Applied { generation: 2 }]);
        assert_eq!(reports(&step), [vec![row("web", "app", 1, "running")]]);
        assert!(step.verdicts_due.is_empty());
        assert_eq!(runtime.revision("db"), None);
    }

    #[test]
    fn a_failing_revision_crash_loops_then_rolls_back_to_the_revision_it_replaced() {
        let script = FailureScript::healthy().fail("app", 2, Devices::Indices(vec![3]));
        let mut runtime = Runtime::new(3);
        runtime.apply(&state(1, vec![deployment("app", 1, &["web"])]), &script);
        runtime.judge("app", 1, &script);
        let step = runtime.apply(&state(2, vec![deployment("app", 2, &["web", "worker"])]), &script);
        assert_eq!(events(&step), [EventKind::Applied { generation: 2 }, started("app", 2)]);
        assert_eq!(reports(&step), [vec![row("web", "app", 2, "running"), row("worker", "app", 2, "running")]]);

        let step = runtime.judge("app", 2, &script);
        assert_eq!(
            events(&step),
            [
                EventKind::Failed {
                    deployment: "app".into(),
                    revision: 2,
                    workload: "web".into(),
                    reason: SCRIPTED_FAILURE.into()
                },
                EventKind::RolledBack {
                    deployment: "app".into(),
                    from_revision: 2,
                    to_revision: 1,
                    reason: format!("workload `web`: {SCRIPTED_FAILURE}"),
                },
            ]
        );
        assert_eq!(
            reports(&step),
            [
                vec![row("web", "app", 2, "crash-loop"), row("worker", "app", 2, "crash-loop")],
                vec![row("web", "app", 1, "running")],
            ],
            "the crash loop is reported, then the previous revision running"
        );
        assert_eq!(runtime.revision("app"), Some(1));
        assert_eq!(runtime.judge("app", 2, &script), Step::default(), "a revision rolled back is not judged again");
    }

    #[test]
    fn a_rollback_holds_until_a_revision_newer_than_the_failed_one() {
        let script = FailureScript::healthy().fail("app", 2, Devices::All);
        let mut runtime = Runtime::new(0);
        runtime.apply(&state(1, vec![deployment("app", 1, &["web"])]), &script);
        runtime.apply(&state(2, vec![deployment("app", 2, &["web"])]), &script);
        runtime.judge("app", 2, &script);
        // Another deployment changes: the failed revision is still desired, and not started again.
        let step =
            runtime.apply(&state(3, vec![deployment("app", 2, &["web"]), deployment("db", 1, &["pg"])]), &script);
        assert_eq!(events(&step), [EventKind::Applied { generation: 3 }, started("db", 1)]);
        assert_eq!(runtime.revision("app"), Some(1));
        let step = runtime.apply(&state(4, vec![deployment("app", 3, &["web"])]), &script);
        assert_eq!(events(&step), [EventKind::Applied { generation: 4 }, started("app", 3)]);
        assert_eq!(runtime.revision("app"), Some(3));
    }

    #[test]
    fn a_failing_first_revision_has_nothing_to_return_to_and_keeps_crash_looping() {
        let script = FailureScript::healthy().fail("app", 1, Devices::All);
        let mut runtime = Runtime::new(0);
        runtime.apply(&state(1, vec![deployment("app", 1, &["web"])]), &script);
        let step = runtime.judge("app", 1, &script);
        assert!(matches!(events(&step)[..], [EventKind::Failed { revision: 1, .. }]), "{step:?}");
        assert_eq!(reports(&step), [vec![row("web", "app", 1, "crash-loop")]]);
        assert_eq!(runtime.revision("app"), Some(1));
    }

    #[test]
    fn a_verdict_on_a_revision_already_replaced_is_ignored() {
        let script = FailureScript::healthy().fail("app", 1, Devices::All);
        let mut runtime = Runtime::new(0);
        runtime.apply(&state(1, vec![deployment("app", 1, &["web"])]), &script);
        runtime.apply(&state(2, vec![deployment("app", 2, &["web"])]), &script);
        assert_eq!(runtime.judge("app", 1, &script), Step::default());
        assert_eq!(events(&runtime.judge("app", 2, &script)), [healthy("app", 2)]);
    }
}
