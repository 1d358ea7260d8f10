//! Fleet deployments and their rollouts. An operator applies a deployment
//! (workloads, a label selector, a priority, a strategy); each change is a
//! new revision, kept; the engine rolls the newest out in waves, judged by
//! what devices report, and writes each targeted device's desired state as
//! the merge of the deployments due on it.
//!
//! The decisions are pure functions (`waves`, `judge`, `merge`); `engine`
//! carries them out against the store.

pub mod engine;
pub mod judge;
pub mod merge;
pub mod pin;
pub mod policy;
pub mod waves;

use outpost_proto::fleet::{DeploymentSpec, RolloutState};
use outpost_proto::sync::WorkloadReport;
use outpost_proto::{Deployment, EventKind, Signature};
use serde::{Deserialize, Serialize};

pub use judge::{Rollout, Sent};

/// A deployment as stored: every revision, and the rollout of one of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub name: String,
    /// Oldest first; revision numbers start at 1 and grow by one.
    pub revisions: Vec<Revision>,
    pub rollout: Rollout,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    pub revision: u64,
    pub created_at: u64,
    pub spec: DeploymentSpec,
    /// The operator's signatures over this revision's deployment as devices
    /// get it (see `deployment`); none for an unsigned apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<Signature>,
}

impl Revision {
    /// The deployment a device gets for this revision, with all its
    /// workloads: what the operator signs and the device verifies.
    pub fn deployment(&self) -> Deployment {
        deployment(&self.spec, self.revision, self.signatures.clone())
    }
}

/// Revision `revision` of `spec` as a device's desired state carries it.
pub fn deployment(spec: &DeploymentSpec, revision: u64, signatures: Vec<Signature>) -> Deployment {
    Deployment {
        name: spec.name.clone(),
        revision,
        rollback_window: spec.rollback_window,
        workloads: spec.workloads.clone(),
        update: spec.update.clone(),
        excluded: Vec::new(),
        signatures,
    }
}

impl DeploymentRecord {
    pub fn newest(&self) -> &Revision {
        self.revisions.last().expect("a deployment has at least one revision")
    }

    pub fn revision(&self, revision: u64) -> Option<&Revision> {
        self.revisions.iter().find(|r| r.revision == revision)
    }

    /// The revision a new spec would get.
    pub fn next_revision(record: Option<&Self>) -> u64 {
        record.map_or(1, |r| r.newest().revision + 1)
    }

    /// Stores `spec` (with its signatures for the next revision) as a new
    /// revision and starts rolling it out, unless it is the newest revision
    /// already; returns whether it was new.
    pub fn apply(record: Option<Self>, spec: DeploymentSpec, signatures: Vec<Signature>, now: u64) -> (Self, bool) {
        let Some(mut record) = record else {
            let (name, rollout) = (spec.name.clone(), Rollout::start(1, None, now));
            let revision = Revision { revision: 1, created_at: now, spec, signatures };
            return (Self { name, revisions: vec![revision], rollout }, true);
        };
        if record.newest().spec == spec {
            return (record, false);
        }
        let revision = record.newest().revision + 1;
        record.revisions.push(Revision { revision, created_at: now, spec, signatures });
        record.rollout = Rollout::start(revision, Some(record.effective_revision()).filter(|&r| r > 0), now);
        (record, true)
    }

    /// The revision a device that a finished rollout reached runs.
    pub fn effective_revision(&self) -> u64 {
        match self.rollout.state {
            RolloutState::RolledBack => self.rollout.previous.unwrap_or(0),
            _ => self.rollout.revision,
        }
    }
}

/// An operator's request that the rollout's state does not allow.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotNow(pub String);

impl DeploymentRecord {
    pub fn pause(&mut self, now: u64) -> Result<(), NotNow> {
        self.expect(&[RolloutState::Progressing], "pause")?;
        self.set(RolloutState::Paused, "paused by an operator", now);
        Ok(())
    }

    /// Its current wave starts over: devices offline meanwhile get their timeout again.
    pub fn resume(&mut self, now: u64) -> Result<(), NotNow> {
        self.expect(&[RolloutState::Paused], "resume")?;
        self.set(RolloutState::Progressing, "", now);
        self.rollout.reason = None;
        self.rollout.wave_started_at = now;
        Ok(())
    }

    /// Stops where it is: devices keep what they have.
    pub fn abort(&mut self, now: u64) -> Result<(), NotNow> {
        self.expect(&[RolloutState::Progressing, RolloutState::Paused], "abort")?;
        self.set(RolloutState::Aborted, "aborted by an operator", now);
        Ok(())
    }

    /// Without `to`: every device back to the revision before this rollout's,
    /// at once. With `to`: a new rollout of that revision, in waves.
    pub fn rollback(&mut self, to: Option<u64>, now: u64) -> Result<(), NotNow> {
        let Some(to) = to else {
            if self.rollout.previous.is_none() {
                return Err(NotNow(format!(
                    "revision {} of {} has no revision before it to go back to: `hub deployment delete {}` removes it",
                    self.rollout.revision, self.name, self.name
                )));
            }
            self.expect(
                &[RolloutState::Progressing, RolloutState::Paused, RolloutState::Aborted, RolloutState::Complete],
                "roll back",
            )?;
            self.set(RolloutState::RolledBack, "rolled back by an operator", now);
            return Ok(());
        };
        if self.revision(to).is_none() {
            let known: Vec<String> = self.revisions.iter().map(|r| r.revision.to_string()).collect();
            return Err(NotNow(format!("{} has no revision {to}: it has {}", self.name, known.join(", "))));
        }
        let effective = self.effective_revision();
        if to == effective {
            return Err(NotNow(format!("devices of {} are due revision {to} already", self.name)));
        }
        self.rollout = Rollout {
            reason: Some(format!("rollback to revision {to} by an operator")),
            ..Rollout::start(to, Some(effective).filter(|&r| r > 0), now)
        };
        Ok(())
    }

    fn expect(&self, states: &[RolloutState], what: &str) -> Result<(), NotNow> {
        if states.contains(&self.rollout.state) {
            return Ok(());
        }
        Err(NotNow(format!(
            "cannot {what} the rollout of {} revision {}: it is {:?}",
            self.name, self.rollout.revision, self.rollout.state
        )))
    }

    fn set(&mut self, state: RolloutState, reason: &str, now: u64) {
        self.rollout.state = state;
        self.rollout.reason = Some(reason.to_string()).filter(|r| !r.is_empty());
        self.rollout.updated_at = now;
    }
}

/// Follows a device's report: for each deployment sent to it, whether every
/// workload of the revision sent runs (and is not unhealthy), or has failed.
pub fn observe_workloads(sent: &mut std::collections::BTreeMap<String, Sent>, workloads: &[&WorkloadReport], now: u64) {
    // An agent update's health comes from the device's events instead.
    for (deployment, sent) in sent.iter_mut().filter(|(_, s)| !s.agent_update) {
        let of_revision: Vec<&&WorkloadReport> = workloads
            .iter()
            .filter(|w| w.deployment.as_deref() == Some(deployment) && w.revision == Some(sent.revision))
            .collect();
        let running = |w: &WorkloadReport| {
            w.state == "running" && !matches!(w.health.as_deref(), Some("starting") | Some("unhealthy"))
        };
        if let Some(crashed) = of_revision.iter().find(|w| w.state == "crash-loop") {
            sent.failed.get_or_insert_with(|| format!("workload {} is in a crash loop", crashed.name));
        }
        if !of_revision.is_empty() && of_revision.iter().all(|w| running(w)) {
            sent.running_since.get_or_insert(now);
        } else {
            sent.running_since = None;
        }
    }
}

/// Follows a device's events: a revision that failed, or that the device
/// rolled back from, failed; so did the revisions first sent in a desired
/// state the device refused (their signatures did not verify). An agent
/// update runs from the event saying the new agent confirmed itself, and
/// failed when it was refused or rolled back.
pub fn observe_event(sent: &mut std::collections::BTreeMap<String, Sent>, event: &EventKind, now: u64) {
    if let EventKind::Refused { generation, reason } = event {
        for sent in sent.values_mut().filter(|s| s.generation == *generation) {
            sent.failed.get_or_insert_with(|| format!("the device refused the desired state: {reason}"));
        }
        return;
    }
    if let EventKind::Updated { from: Some(from), .. } = event {
        if let Some(sent) = sent.get_mut(&from.deployment).filter(|s| s.revision == from.revision) {
            sent.running_since.get_or_insert(now);
        }
        return;
    }
    let (deployment, revision, why) = match event {
        EventKind::UpdateRolledBack { version, reason, from: Some(from), .. } => (
            &from.deployment,
            from.revision,
            format!("the agent update to {version} did not confirm itself and was rolled back: {reason}"),
        ),
        EventKind::UpdateFailed { version, reason, deployment, revision, .. } => {
            (deployment, *revision, format!("the agent update to {version} was refused: {reason}"))
        }
        EventKind::Failed { deployment, revision, workload, reason } => {
            (deployment, *revision, format!("workload {workload} failed: {reason}"))
        }
        EventKind::RolledBack { deployment, from_revision, to_revision, reason } => {
            (deployment, *from_revision, format!("the device rolled back to revision {to_revision}: {reason}"))
        }
        _ => return,
    };
    if let Some(sent) = sent.get_mut(deployment).filter(|s| s.revision == revision) {
        sent.failed.get_or_insert(why);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use outpost_proto::UpdateOrigin;

    use super::*;

    fn spec(image: &str) -> DeploymentSpec {
        toml::from_str(&format!("name = \"app\"\n[[workloads]]\nname = \"web\"\nimage = \"{image}\"\n")).unwrap()
    }

    #[test]
    fn each_change_makes_a_revision_rolled_out_from_the_one_before_and_the_same_spec_none() {
        let (record, new) = DeploymentRecord::apply(None, spec("web:1"), vec![], 10);
        assert!(new);
        assert_eq!((record.rollout.revision, record.rollout.previous), (1, None));
        let (record, new) = DeploymentRecord::apply(Some(record), spec("web:1"), vec![], 20);
        assert!(!new);
        let (mut record, new) = DeploymentRecord::apply(Some(record), spec("web:2"), vec![], 30);
        assert!(new);
        assert_eq!((record.rollout.revision, record.rollout.previous, record.revisions.len()), (2, Some(1), 2));
        record.rollout.state = RolloutState::RolledBack;
        let (record, _) = DeploymentRecord::apply(Some(record), spec("web:3"), vec![], 40);
        assert_eq!(record.rollout.previous, Some(1), "after a rollback devices run 1, not 2");
    }

    fn report(name: &str, revision: u64, state: &str, health: Option<&str>) -> WorkloadReport {
        WorkloadReport {
            name: name.into(),
            deployment: Some("app".into()),
            revision: Some(revision),
            state: state.into(),
            health: health.map(String::from),
            restarts: 0,
            last_exit: None,
        }
    }

    #[test]
    fn a_revision_runs_from_when_all_its_workloads_run_and_fails_on_a_crash_loop_or_a_rollback() {
        let mut sent = BTreeMap::from([("app".to_string(), Sent { revision: 2, generation: 4, ..Sent::default() })]);
        let (web, db) = (report("web", 2, "running", Some("healthy")), report("db", 2, "backoff", None));
        observe_workloads(&mut sent, &[&web, &db], 100);
        assert_eq!(sent["app"].running_since, None);
        let db = report("db", 2, "running", None);
        observe_workloads(&mut sent, &[&web, &db], 200);
        observe_workloads(&mut sent, &[&web, &db], 300);
        assert_eq!(sent["app"].running_since, Some(200));
        let old = report("web", 1, "running", None);
        observe_workloads(&mut sent, &[&old], 400);
        assert_eq!(sent["app"].running_since, None, "the previous revision's workloads do not count");

        let crashed = report("web", 2, "crash-loop", None);
        observe_workloads(&mut sent, &[&crashed], 500);
        assert!(sent["app"].failed.as_deref().unwrap().contains("crash loop"));

        let mut sent = BTreeMap::from([("app".to_string(), Sent { revision: 2, ..Sent::default() })]);
        let back = |from| EventKind::RolledBack {
            deployment: "app".into(),
            from_revision: from,
            to_revision: 1,
            reason: "probe".into(),
        };
        observe_event(&mut sent, &back(1), 0);
        assert_eq!(sent["app"].failed, None, "another revision");
        observe_event(&mut sent, &back(2), 0);
        assert!(sent["app"].failed.as_deref().unwrap().contains("rolled back"));
    }

    #[test]
    fn an_agent_update_runs_from_the_event_of_its_revision_and_fails_when_rolled_back_or_refused() {
        let update = |revision| Sent { revision, agent_update: true, ..Sent::default() };
        let mut sent = BTreeMap::from([("agent".to_string(), update(2))]);
        let from = |revision| Some(UpdateOrigin { deployment: "agent".into(), revision });
        let updated =
            |revision| EventKind::Updated { target: "edge-agent".into(), version: "2".into(), from: from(revision) };
        observe_event(&mut sent, &updated(1), 100);
        assert_eq!(sent["agent"].running_since, None, "another revision");
        observe_event(&mut sent, &updated(2), 100);
        assert_eq!(sent["agent"].running_since, Some(100));
        observe_workloads(&mut sent, &[], 200);
        assert_eq!(sent["agent"].running_since, Some(100), "no workloads to report does not stop an update");

        let mut sent = BTreeMap::from([("agent".to_string(), update(2))]);
        let rolled_back = EventKind::UpdateRolledBack {
            target: "edge-agent".into(),
            version: "2".into(),
            reason: "the hub was not reached".into(),
            from: from(2),
        };
        observe_event(&mut sent, &rolled_back, 100);
        assert!(sent["agent"].failed.as_deref().unwrap().contains("rolled back: the hub was not reached"));

        let mut sent = BTreeMap::from([("agent".to_string(), update(2))]);
        let refused = EventKind::UpdateFailed {
            target: "edge-agent".into(),
            version: "2".into(),
            reason: "other hardware".into(),
            deployment: "agent".into(),
            revision: 2,
        };
        observe_event(&mut sent, &refused, 100);
        assert!(sent["agent"].failed.as_deref().unwrap().contains("refused: other hardware"));
    }
}
