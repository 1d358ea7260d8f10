//! What an operator writes to roll workloads out to a fleet: a deployment
//! with a label selector, a priority and a rollout strategy (waves as data),
//! and what the hub answers about its rollout.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::desired::{AgentUpdate, DesiredStateError};
use crate::workload::WorkloadSpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Devices whose labels include all of these. Empty: every device.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// When two deployments on one device name the same workload, the
    /// higher priority wins (then the name that sorts first); the other is
    /// shown as a conflict.
    #[serde(default)]
    pub priority: i32,
    /// On the device: how long a new revision must stay up and healthy before
    /// it is confirmed; a failure within it rolls the device back by itself.
    #[serde(default = "default_rollback_window", with = "humantime_serde")]
    pub rollback_window: Duration,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Instead of workloads: an agent update, rolled out in waves like them
    /// (a device counts healthy once the new agent confirmed itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<AgentUpdate>,
}

fn default_rollback_window() -> Duration {
    Duration::from_secs(120)
}

/// How a new revision reaches the targeted devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Strategy {
    /// Cumulative: each wave says how many of the targeted devices have the
    /// new revision once it is done. The last wave is always the whole fleet.
    pub waves: Vec<Wave>,
    /// How long a device must run the new revision healthy before it counts.
    #[serde(with = "humantime_serde")]
    pub min_healthy: Duration,
    /// Failed devices over reachable devices of the waves so far above this
    /// stops the rollout.
    pub max_failure_ratio: f64,
    pub on_failure: OnFailure,
    /// A device of the current wave that has not taken the revision after
    /// this long while offline counts as offline and does not hold the wave.
    #[serde(with = "humantime_serde")]
    pub device_timeout: Duration,
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            waves: vec![Wave::Devices(1), Wave::Percent(10.0), Wave::Percent(50.0), Wave::Percent(100.0)],
            min_healthy: Duration::from_secs(60),
            max_failure_ratio: 0.1,
            on_failure: OnFailure::Rollback,
            device_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Stop where it is; the operator decides.
    Pause,
    /// Stop and return every updated device to the previous revision.
    Rollback,
}

/// A wave's size: a number of devices (`"1"`) or a share of them (`"10%"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Wave {
    Devices(u32),
    Percent(f64),
}

impl Wave {
    /// How many of `targeted` devices the wave covers (at least one when
    /// there are any, never more than all).
    pub fn size(self, targeted: usize) -> usize {
        let size = match self {
            Wave::Devices(n) => n as usize,
            Wave::Percent(p) => (targeted as f64 * p / 100.0).ceil() as usize,
        };
        size.clamp(targeted.min(1), targeted)
    }
}

impl TryFrom<String> for Wave {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let wrong = || format!("wave {text:?}: a number of devices (\"1\") or a percentage (\"10%\")");
        match text.strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Wave::Percent(p)),
                _ => Err(wrong()),
            },
            None => match text.trim().parse::<u32>() {
                Ok(n) if n > 0 => Ok(Wave::Devices(n)),
                _ => Err(wrong()),
            },
        }
    }
}

impl From<Wave> for String {
    fn from(wave: Wave) -> String {
        wave.to_string()
    }
}

impl fmt::Display for Wave {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wave::Devices(n) => write!(f, "{n}"),
            Wave::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error("deployment name {0:?} is not valid: use letters, digits, `.`, `_` and `-`")]
    Name(String),
    #[error("selector key {0:?} is not valid: use 1 to 63 letters, digits, `.`, `_`, `-` or `/`")]
    SelectorKey(String),
    #[error("the deployment has no workloads and no agent update: `hub deployment delete NAME` removes a deployment")]
    NoWorkloads,
    #[error("strategy: {0}")]
    Strategy(String),
    #[error(transparent)]
    Workloads(#[from] DesiredStateError),
}

impl DeploymentSpec {
    pub fn validate(&self) -> Result<(), DeploymentError> {
        if !valid_name(&self.name) {
            return Err(DeploymentError::Name(self.name.clone()));
        }
        if let Some(key) = self.selector.keys().find(|k| !valid_label_key(k)) {
            return Err(DeploymentError::SelectorKey(key.clone()));
        }
        if self.workloads.is_empty() && self.update.is_none() {
            return Err(DeploymentError::NoWorkloads);
        }
        let strategy = &self.strategy;
        if strategy.waves.is_empty() {
            return Err(DeploymentError::Strategy("waves must have at least one wave (\"100%\")".into()));
        }
        if !(0.0..=1.0).contains(&strategy.max_failure_ratio) {
            return Err(DeploymentError::Strategy(format!(
                "max-failure-ratio {} must be between 0 and 1",
                strategy.max_failure_ratio
            )));
        }
        // The workloads' own rules (names, images, unique names) are the desired state's.
        let as_desired = crate::DesiredState {
            version: crate::desired::DESIRED_STATE_VERSION,
            generation: 1,
            deployments: vec![crate::Deployment {
                name: self.name.clone(),
                revision: 1,
                rollback_window: self.rollback_window,
                workloads: self.workloads.clone(),
                update: self.update.clone(),
                excluded: Vec::new(),
                signatures: Vec::new(),
            }],
        };
        as_desired.validate()?;
        Ok(())
    }

    /// Whether a device with these labels is targeted.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Letters, digits, `.`, `_`, `-`; what device ids and deployment names use.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub fn valid_label_key(key: &str) -> bool {
    (1..=63).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

/// A rollout's state as the hub shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    Progressing,
    Paused,
    /// Every wave done.
    Complete,
    /// Stopped by failures or by hand, and every updated device sent back
    /// to the previous revision.
    RolledBack,
    /// Stopped by hand where it was.
    Aborted,
}

/// How many targeted devices are where, for one deployment: the "are all
/// 431 copies out there?" answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub targeted: usize,
    /// Due the rollout's revision now (in a wave reached so far).
    pub due: usize,
    /// Acknowledged a desired state holding the revision due.
    pub updated: usize,
    /// Running the revision due, healthy for the strategy's minimum time.
    pub healthy: usize,
    /// The revision failed there (a workload failed, or the device rolled itself back).
    pub failed: usize,
    /// Due a revision they have not acknowledged yet, and online.
    pub pending: usize,
    /// Due a revision they have not acknowledged yet, and offline.
    pub offline: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveStatus {
    pub wave: Wave,
    /// Devices this wave covers, counting the waves before it.
    pub devices: usize,
    pub done: bool,
}

/// A workload that two deployments name on one device: the winner runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub device: String,
    pub workload: String,
    pub winner: String,
    pub loser: String,
}

/// `GET /v1/deployments/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    pub name: String,
    /// The newest revision.
    pub revision: u64,
    pub spec: DeploymentSpec,
    pub rollout: RolloutStatus,
    pub conflicts: Vec<Conflict>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The revision being rolled out (or rolled back to).
    pub revision: u64,
    /// What devices not yet reached keep running.
    pub previous: Option<u64>,
    pub state: RolloutState,
    /// Index into `waves` of the wave in progress (the last one once complete).
    pub wave: usize,
    pub waves: Vec<WaveStatus>,
    pub counts: Counts,
    /// Why it paused, rolled back or aborted.
    pub reason: Option<String>,
    pub started_at: u64,
    pub updated_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_parse_as_counts_or_percentages_and_size_within_the_fleet() {
        let waves: Vec<Wave> = serde_json::from_str(r#"["1", "10%", "50%", "100%"]"#).unwrap();
        assert_eq!(waves, [Wave::Devices(1), Wave::Percent(10.0), Wave::Percent(50.0), Wave::Percent(100.0)]);
        assert_eq!(serde_json::to_string(&waves).unwrap(), r#"["1","10%","50%","100%"]"#);
        assert_eq!(Wave::Percent(10.0).size(431), 44);
        assert_eq!(Wave::Percent(10.0).size(3), 1);
        assert_eq!(Wave::Devices(5).size(3), 3);
        assert_eq!(Wave::Percent(1.0).size(0), 0);
        for bad in [r#""0""#, r#""0%""#, r#""150%""#, r#""ten""#, r#""-1""#] {
            assert!(serde_json::from_str::<Wave>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_deployment_file_takes_the_default_strategy_and_is_validated() {
        let spec: DeploymentSpec = toml::from_str(
            "name = \"camera\"\nselector = { site = \"rig-7\", role = \"camera\" }\n\
             [[workloads]]\nname = \"cam\"\nimage = \"cam:1\"\n",
        )
        .unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.strategy, Strategy::default());
        let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(spec.selects(&labels(&[("site", "rig-7"), ("role", "camera"), ("x", "y")])));
        assert!(!spec.selects(&labels(&[("site", "rig-7")])));

        let mut bad = spec.clone();
        bad.workloads.clear();
        assert!(bad.validate().unwrap_err().to_string().contains("no workloads"));
        let mut bad = spec.clone();
        bad.strategy.max_failure_ratio = 2.0;
        assert!(bad.validate().unwrap_err().to_string().contains("max-failure-ratio"));
        let mut bad = spec;
        bad.name = "a b".into();
        assert!(bad.validate().unwrap_err().to_string().contains("not valid"));
    }
}
