//! When to restart a workload that exited: a pure decision, so that backoff and
//! crash-loop detection are tested without waiting.

use std::time::Duration;

use outpost_proto::workload::{RestartMode, RestartPolicy};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    RestartAfter(Duration),
    GiveUp,
}

/// Restart history of one workload since its shim started.
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    /// Exits in a row, each after running less than `min_uptime`.
    pub quick_exits: u32,
    pub restarts: u32,
}

impl RestartTracker {
    /// Records an exit and says what to do. `success` is exit code 0.
    pub fn on_exit(&mut self, policy: &RestartPolicy, success: bool, ran_for: Duration) -> Decision {
        let restart = match policy.mode {
            RestartMode::Always => true,
            RestartMode::OnFailure => !success,
            RestartMode::Never => false,
        };
        if ran_for >= policy.min_uptime {
            self.quick_exits = 0;
        }
        if !restart {
            return Decision::GiveUp;
        }
        let delay = policy
            .backoff_initial
            .checked_mul(1u32.checked_shl(self.quick_exits.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(policy.backoff_max)
            .min(policy.backoff_max);
        self.quick_exits += 1;
        self.restarts += 1;
        Decision::RestartAfter(delay)
    }

    /// Reported as such so that an operator sees "crash-loop", not "restarting".
    pub fn crash_looping(&self, policy: &RestartPolicy) -> bool {
        self.quick_exits >= policy.crash_loop_threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: RestartMode) -> RestartPolicy {
        RestartPolicy {
            mode,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            min_uptime: Duration::from_secs(10),
            crash_loop_threshold: 3,
        }
    }

    const QUICK: Duration = Duration::from_millis(50);

    #[test]
    fn quick_exits_double_the_backoff_up_to_the_cap() {
        let p = policy(RestartMode::Always);
        let mut t = RestartTracker::default();
        let delays: Vec<Decision> = (0..6).map(|_| t.on_exit(&p, false, QUICK)).collect();
        let ms = |n| Decision::RestartAfter(Duration::from_millis(n));
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        assert_eq!(t.restarts, 6);
    }

    #[test]
    fn a_long_run_resets_the_backoff_and_the_crash_loop() {
        let p = policy(RestartMode::Always);
        let mut t = RestartTracker::default();
        for _ in 0..3 {
            t.on_exit(&p, false, QUICK);
        }
        assert!(t.crash_looping(&p));
        assert_eq!(t.on_exit(&p, false, Duration::from_secs(60)), Decision::RestartAfter(Duration::from_millis(100)));
        assert!(!t.crash_looping(&p));
    }

    #[test]
    fn crash_loop_is_reported_after_the_threshold_of_quick_exits() {
        let p = policy(RestartMode::OnFailure);
        let mut t = RestartTracker::default();
        t.on_exit(&p, false, QUICK);
        t.on_exit(&p, false, QUICK);
        assert!(!t.crash_looping(&p));
        t.on_exit(&p, false, QUICK);
        assert!(t.crash_looping(&p));
    }

    #[test]
    fn on_failure_stops_after_a_clean_exit_and_never_never_restarts() {
        let mut t = RestartTracker::default();
        assert_eq!(t.on_exit(&policy(RestartMode::OnFailure), true, QUICK), Decision::GiveUp);
        assert_eq!(t.on_exit(&policy(RestartMode::Never), false, QUICK), Decision::GiveUp);
        assert!(matches!(t.on_exit(&policy(RestartMode::Always), true, QUICK), Decision::RestartAfter(_)));
    }

    #[test]
    fn backoff_never_overflows_after_many_restarts() {
        let p = policy(RestartMode::Always);
        let mut t = RestartTracker { quick_exits: 1000, restarts: 0 };
        assert_eq!(t.on_exit(&p, false, QUICK), Decision::RestartAfter(Duration::from_secs(1)));
    }
}
