//! Which simulated devices fail which revision, and when verdicts come: data,
//! so that a test or a benchmark says its failures in one place.

use std::time::Duration;

/// What the simulated runtimes do with each revision they start.
///
/// A revision no rule names holds: `healthy` after `healthy_after`. A
/// revision a rule names fails on the rule's devices after `failing_after`.
/// Both delays default to zero: the hub's own `min-healthy` is the wait a
/// rollout test or benchmark means to measure, not the device's rollback window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FailureScript {
    pub rules: Vec<FailureRule>,
    pub healthy_after: Duration,
    pub failing_after: Duration,
}

/// Revision `revision` of deployment `deployment` crash-loops on `devices`.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRule {
    pub deployment: String,
    pub revision: u64,
    pub devices: Devices,
}

/// Devices by their index in the fleet (the order they were started in).
#[derive(Debug, Clone, PartialEq)]
pub enum Devices {
    All,
    /// Those whose index % `every` == `offset`.
    EveryNth {
        every: usize,
        offset: usize,
    },
    /// About `ratio` of them, chosen by a hash of (`seed`, index): the same
    /// devices on every run with the same seed.
    Ratio {
        ratio: f64,
        seed: u64,
    },
    Indices(Vec<usize>),
}

impl FailureScript {
    /// Every revision holds, at once.
    pub fn healthy() -> Self {
        Self::default()
    }

    /// Adds a rule: `revision` of `deployment` fails on `devices`.
    pub fn fail(mut self, deployment: &str, revision: u64, devices: Devices) -> Self {
        self.rules.push(FailureRule { deployment: deployment.to_string(), revision, devices });
        self
    }

    /// Whether `revision` of `deployment` fails on the device at `index`.
    pub fn fails(&self, index: usize, deployment: &str, revision: u64) -> bool {
        self.rules.iter().any(|r| r.deployment == deployment && r.revision == revision && r.devices.contains(index))
    }
}

impl Devices {
    pub fn contains(&self, index: usize) -> bool {
        match self {
            Devices::All => true,
            Devices::EveryNth { every, offset } => *every > 0 && index % every == *offset,
            Devices::Ratio { ratio, seed } => (splitmix64(seed ^ index as u64) as f64 / u64::MAX as f64) < *ratio,
            Devices::Indices(indices) => indices.contains(&index),
        }
    }
}

/// A well-mixed hash of a number: neighbouring indices land far apart.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_fails_only_its_revision_of_its_deployment_on_its_devices() {
        let script = FailureScript::healthy().fail("app", 2, Devices::EveryNth { every: 3, offset: 1 });
        let failing: Vec<usize> = (0..10).filter(|&i| script.fails(i, "app", 2)).collect();
        assert_eq!(failing, [1, 4, 7]);
        assert!(!script.fails(1, "app", 1), "another revision holds");
        assert!(!script.fails(1, "web", 2), "another deployment holds");
        assert!(!FailureScript::healthy().fails(0, "app", 2));
    }

    #[test]
    fn a_ratio_picks_about_that_share_of_devices_the_same_way_for_the_same_seed() {
        let picked =
            |seed| (0..10_000).filter(|&i| Devices::Ratio { ratio: 0.1, seed }.contains(i)).collect::<Vec<_>>();
        let share = picked(7).len();
        assert!((900..=1100).contains(&share), "{share} of 10,000 devices for a ratio of 0.1");
        assert_eq!(picked(7), picked(7));
        assert_ne!(picked(7), picked(8), "another seed picks other devices");
        assert!(!Devices::Ratio { ratio: 0.0, seed: 7 }.contains(3));
        assert!((0..100).all(|i| Devices::Ratio { ratio: 1.0, seed: 7 }.contains(i)));
    }

    #[test]
    fn listed_indices_every_nth_with_zero_and_all_select_as_written() {
        assert!(Devices::Indices(vec![2, 5]).contains(5));
        assert!(!Devices::Indices(vec![2, 5]).contains(3));
        assert!(!Devices::EveryNth { every: 0, offset: 0 }.contains(0), "every 0th device is none");
        assert!(Devices::All.contains(12_345));
    }
}
