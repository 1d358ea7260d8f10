//! Whether a deployment's new revision holds: a pure verdict over what its
//! workloads' shims report, so that the rule is tested without waiting.
//!
//! Within the rollback window, a crash loop, a failing probe, a failed start,
//! or an exit with an error fails the revision. When the window closes, every
//! workload must be up (running, and healthy if it has a probe) or have
//! finished cleanly.

use std::time::{Duration, Instant};

use outpost_proto::Deployment;

use crate::runtime::health::Health;
use crate::runtime::record::instance_id;
use crate::runtime::status::State;
use crate::runtime::supervisor::WorkloadInfo;

/// A revision under watch since it started on this device.
#[derive(Debug, Clone, PartialEq)]
pub struct Watch {
    pub deployment: String,
    pub revision: u64,
    pub since: Instant,
    pub window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pending,
    Healthy,
    Failed { workload: String, reason: String },
}

pub fn judge(watch: &Watch, deployment: &Deployment, instances: &[WorkloadInfo], now: Instant) -> Verdict {
    let closed = now.duration_since(watch.since) >= watch.window;
    for spec in deployment.active_workloads() {
        let id = instance_id(spec);
        let status = instances.iter().find(|i| i.instance == id).and_then(|i| i.status.as_ref());
        let failed = |reason: String| Verdict::Failed { workload: spec.name.clone(), reason };
        let Some(status) = status else {
            if closed {
                return failed("it never started (see the agent's log for why)".into());
            }
            continue;
        };
        let last_exit = status.last_exit.as_ref().map(|e| e.describe()).unwrap_or_else(|| "no exit yet".into());
        if status.crash_loop {
            return failed(format!("crash loop after {} restarts, last {last_exit}", status.restarts));
        }
        if status.health == Health::Unhealthy {
            return failed("its health probe fails".into());
        }
        match status.state {
            State::Failed => return failed(format!("it cannot start: {}", status.error.clone().unwrap_or_default())),
            State::Exited if !status.last_exit.as_ref().is_some_and(|e| e.success()) => {
                return failed(format!("it exited: {last_exit}"));
            }
            State::Exited => {}
            State::Running if matches!(status.health, Health::None | Health::Healthy) => {}
            _ if closed => {
                let state = serde_json::to_value(status.state).ok().and_then(|v| v.as_str().map(String::from));
                return failed(format!(
                    "not up when the {:?} window closed ({}, health {:?})",
                    watch.window,
                    state.unwrap_or_default(),
                    status.health
                ));
            }
            _ => {}
        }
    }
    if closed {
        Verdict::Healthy
    } else {
        Verdict::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::status::{ExitStatus, WorkloadStatus};
    use outpost_proto::WorkloadSpec;

    const WINDOW: Duration = Duration::from_secs(60);

    fn deployment() -> Deployment {
        Deployment {
            name: "app".into(),
            revision: 2,
            rollback_window: WINDOW,
            workloads: vec![WorkloadSpec::parse("name = \"web\"\nimage = \"web:2\"").unwrap()],
            update: None,
            excluded: Vec::new(),
            signatures: Vec::new(),
        }
    }

    fn instance(status: impl FnOnce(&mut WorkloadStatus)) -> WorkloadInfo {
        let d = deployment();
        let mut s = WorkloadStatus::starting("web", 1);
        s.state = State::Running;
        status(&mut s);
        WorkloadInfo {
            instance: instance_id(&d.workloads[0]),
            name: "web".into(),
            deployment: None,
            spec_hash: String::new(),
            image: String::new(),
            image_digest: String::new(),
            state: String::new(),
            status: Some(s),
        }
    }

    fn verdict(after: Duration, instances: &[WorkloadInfo]) -> Verdict {
        let t0 = Instant::now();
        let watch = Watch { deployment: "app".into(), revision: 2, since: t0, window: WINDOW };
        judge(&watch, &deployment(), instances, t0 + after)
    }

    fn failed(v: Verdict) -> String {
        match v {
            Verdict::Failed { reason, .. } => reason,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn running_revision_is_pending_inside_the_window_and_healthy_after() {
        let up = [instance(|_| {})];
        assert_eq!(verdict(Duration::from_secs(5), &up), Verdict::Pending);
        assert_eq!(verdict(WINDOW, &up), Verdict::Healthy);
    }

    #[test]
    fn crash_loop_inside_the_window_fails_the_revision_at_once() {
        let looping = [instance(|s| {
            s.crash_loop = true;
            s.restarts = 5;
            s.last_exit = Some(ExitStatus { code: Some(1), signal: None, oom_killed: false, at: 0 });
        })];
        assert!(
            failed(verdict(Duration::from_secs(5), &looping)).contains("crash loop after 5 restarts, last exit code 1")
        );
    }

    #[test]
    fn failing_probe_or_error_exit_fails_the_revision() {
        assert!(
            failed(verdict(Duration::from_secs(1), &[instance(|s| s.health = Health::Unhealthy)])).contains("probe")
        );
        let exited = instance(|s| {
            s.state = State::Exited;
            s.last_exit = Some(ExitStatus { code: Some(1), signal: None, oom_killed: false, at: 0 });
        });
        assert!(failed(verdict(Duration::from_secs(1), &[exited])).contains("exit code 1"));
    }

    #[test]
    fn clean_exit_of_a_one_shot_workload_is_healthy() {
        let done = instance(|s| {
            s.state = State::Exited;
            s.last_exit = Some(ExitStatus { code: Some(0), signal: None, oom_killed: false, at: 0 });
        });
        assert_eq!(verdict(WINDOW, &[done]), Verdict::Healthy);
    }

    #[test]
    fn workload_still_not_up_when_the_window_closes_fails() {
        let probing = [instance(|s| s.health = Health::Starting)];
        assert_eq!(verdict(Duration::from_secs(5), &probing), Verdict::Pending);
        assert!(failed(verdict(WINDOW, &probing)).contains("not up"));
        assert!(failed(verdict(WINDOW, &[])).contains("never started"));
    }
}
