//! Rollout decisions as pure functions: which revision a device is due,
//! where each device stands, and what the rollout does next. The engine
//! (engine.rs) feeds them what the store holds and carries out the answer.

use std::time::Duration;

use outpost_proto::fleet::{Counts, RolloutState, Strategy};
use serde::{Deserialize, Serialize};

/// A deployment's rollout, as stored. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The revision rolled out.
    pub revision: u64,
    /// What devices not reached yet keep, and what a rollback returns to.
    pub previous: Option<u64>,
    pub state: RolloutState,
    /// The wave in progress (the last one once complete).
    pub wave: usize,
    pub wave_started_at: u64,
    pub started_at: u64,
    pub updated_at: u64,
    pub reason: Option<String>,
}

impl Rollout {
    /// A rollout of `revision` from its first wave.
    pub fn start(revision: u64, previous: Option<u64>, now: u64) -> Self {
        Self {
            revision,
            previous,
            state: RolloutState::Progressing,
            wave: 0,
            wave_started_at: now,
            started_at: now,
            updated_at: now,
            reason: None,
        }
    }
}

/// What the hub sent a device for one deployment, and how it went; kept in
/// the device's record and updated from its reports and events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sent {
    pub revision: u64,
    /// The first desired-state generation that held this revision.
    pub generation: u64,
    /// Since when the device reports every workload of the revision running
    /// (and not unhealthy), without a break.
    pub running_since: Option<u64>,
    /// Why the revision failed on the device (a failed workload, or the
    /// device rolled itself back).
    pub failed: Option<String>,
    /// The revision is an agent update: events, not workload reports, say
    /// whether it runs.
    pub agent_update: bool,
    /// The device's site hub holds the revision back (an operator paused
    /// the rollout on site): the device waits for its site, like one offline.
    pub held: Option<String>,
}

/// What a rollout needs to know of one targeted device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceFacts<'a> {
    pub online: bool,
    /// The desired-state generation the device acknowledged.
    pub acknowledged: Option<u64>,
    pub sent: Option<&'a Sent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Not sent, or not acknowledged yet; online.
    Pending,
    /// Not sent, or not acknowledged yet; offline.
    Offline,
    /// Acknowledged, not healthy for long enough yet.
    Updated,
    Healthy,
    Failed,
}

/// The revision a device runs for this deployment: the rollout's once a
/// wave reached it (at `position` in wave order), and from then on even if
/// the fleet's order shifts; else the previous one.
pub fn due(rollout: &Rollout, position: usize, covered: usize, sent: Option<&Sent>) -> Option<u64> {
    match rollout.state {
        RolloutState::RolledBack => rollout.previous,
        RolloutState::Complete => Some(rollout.revision),
        RolloutState::Progressing | RolloutState::Paused | RolloutState::Aborted => {
            let reached = position < covered || sent.is_some_and(|s| s.revision == rollout.revision);
            if reached {
                Some(rollout.revision)
            } else {
                rollout.previous
            }
        }
    }
}

pub fn device_state(due: u64, device: DeviceFacts, min_healthy: Duration, now: u64) -> DeviceState {
    let waiting = if device.online { DeviceState::Pending } else { DeviceState::Offline };
    let Some(sent) = device.sent.filter(|s| s.revision == due) else { return waiting };
    if sent.failed.is_some() {
        return DeviceState::Failed;
    }
    if sent.held.is_some() {
        return DeviceState::Offline;
    }
    if device.acknowledged.is_none_or(|g| g < sent.generation) {
        return waiting;
    }
    match sent.running_since {
        Some(since) if now.saturating_sub(since) >= min_healthy.as_millis() as u64 => DeviceState::Healthy,
        _ => DeviceState::Updated,
    }
}

/// Adds a device due some revision to the counts.
pub fn count(counts: &mut Counts, state: DeviceState) {
    match state {
        DeviceState::Pending => counts.pending += 1,
        DeviceState::Offline => counts.offline += 1,
        DeviceState::Updated => counts.updated += 1,
        DeviceState::Healthy => {
            counts.updated += 1;
            counts.healthy += 1;
        }
        DeviceState::Failed => {
            counts.updated += 1;
            counts.failed += 1;
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Wait,
    NextWave,
    Complete,
    /// Too many failures: pause or roll back, as the strategy says.
    Stop {
        reason: String,
    },
}

/// What a progressing rollout does next, from the states of the devices
/// its waves have reached so far.
///
/// A device that has not taken the revision `device_timeout` after its
/// wave started is unreachable: it no longer holds the wave, and it is not
/// counted in the failure ratio (it gets the revision when it comes back).
/// One that took it but is not healthy `min_healthy` after that counts as
/// failed, so that no rollout waits forever.
pub fn decide(strategy: &Strategy, rollout: &Rollout, reached: &[DeviceState], now: u64) -> Step {
    let elapsed = now.saturating_sub(rollout.wave_started_at);
    let timeout = strategy.device_timeout.as_millis() as u64;
    let unreachable_after_timeout = elapsed >= timeout;
    let stuck = elapsed >= timeout + strategy.min_healthy.as_millis() as u64;
    let mut failed = 0;
    let mut unreachable = 0;
    let mut waiting = 0;
    for state in reached {
        match state {
            DeviceState::Healthy => {}
            DeviceState::Failed => failed += 1,
            DeviceState::Updated if stuck => failed += 1,
            DeviceState::Pending | DeviceState::Offline if unreachable_after_timeout => unreachable += 1,
            DeviceState::Updated | DeviceState::Pending | DeviceState::Offline => waiting += 1,
        }
    }
    let reachable = reached.len() - unreachable;
    if failed > 0 && failed as f64 / reachable as f64 > strategy.max_failure_ratio {
        return Step::Stop {
            reason: format!(
                "{failed} of {reachable} reachable devices failed revision {} (max-failure-ratio {})",
                rollout.revision, strategy.max_failure_ratio
            ),
        };
    }
    if waiting > 0 {
        return Step::Wait;
    }
    if rollout.wave + 1 >= strategy.waves.len() {
        Step::Complete
    } else {
        Step::NextWave
    }
}

#[cfg(test)]
mod tests {
    use outpost_proto::fleet::{OnFailure, Wave};

    use super::*;

    const MIN: u64 = 60_000;

    fn strategy() -> Strategy {
        Strategy {
            waves: vec![Wave::Devices(1), Wave::Percent(50.0), Wave::Percent(100.0)],
            min_healthy: Duration::from_secs(60),
            max_failure_ratio: 0.25,
            on_failure: OnFailure::Rollback,
            device_timeout: Duration::from_secs(300),
        }
    }

    fn rollout(state: RolloutState, wave: usize) -> Rollout {
        Rollout {
            revision: 2,
            previous: Some(1),
            state,
            wave,
            wave_started_at: 1_000_000,
            started_at: 1_000_000,
            updated_at: 1_000_000,
            reason: None,
        }
    }

    fn sent(revision: u64) -> Sent {
        Sent { revision, generation: 5, ..Sent::default() }
    }

    #[test]
    fn a_device_is_due_the_new_revision_once_a_wave_reaches_it_and_keeps_it() {
        let progressing = rollout(RolloutState::Progressing, 0);
        assert_eq!(due(&progressing, 0, 1, None), Some(2));
        assert_eq!(due(&progressing, 1, 1, None), Some(1));
        assert_eq!(due(&progressing, 1, 1, Some(&sent(2))), Some(2), "the fleet's order shifted; it keeps what it got");
        assert_eq!(due(&rollout(RolloutState::Paused, 0), 5, 1, None), Some(1));
        assert_eq!(
            due(&rollout(RolloutState::Aborted, 0), 0, 1, None),
            Some(2),
            "an abort leaves devices where they are"
        );
        assert_eq!(due(&rollout(RolloutState::Complete, 2), 99, 1, None), Some(2), "a late device gets it");
        assert_eq!(due(&rollout(RolloutState::RolledBack, 1), 0, 1, Some(&sent(2))), Some(1));
        let first = Rollout { previous: None, ..rollout(RolloutState::Progressing, 0) };
        assert_eq!(due(&first, 3, 1, None), None, "a new deployment reaches devices wave by wave");
    }

    #[test]
    fn a_device_is_healthy_only_after_acknowledging_and_running_for_the_minimum_time() {
        let now = 10_000_000;
        let state = |online, acknowledged, sent: Option<Sent>| {
            let facts = DeviceFacts { online, acknowledged, sent: sent.as_ref() };
            device_state(2, facts, Duration::from_millis(MIN), now)
        };
        assert_eq!(state(true, Some(9), None), DeviceState::Pending);
        assert_eq!(state(false, Some(9), Some(sent(1))), DeviceState::Offline, "sent another revision");
        assert_eq!(state(true, Some(4), Some(sent(2))), DeviceState::Pending, "not acknowledged yet");
        assert_eq!(state(true, Some(5), Some(sent(2))), DeviceState::Updated);
        let running = |since| Sent { running_since: Some(since), ..sent(2) };
        assert_eq!(state(true, Some(5), Some(running(now - MIN + 1))), DeviceState::Updated);
        assert_eq!(state(false, Some(5), Some(running(now - MIN))), DeviceState::Healthy);
        let failed = Sent { failed: Some("crash loop".into()), ..running(now - MIN) };
        assert_eq!(state(true, Some(5), Some(failed)), DeviceState::Failed);
    }

    #[test]
    fn a_device_whose_site_holds_the_revision_back_waits_like_an_offline_one() {
        let held = Sent { held: Some("paused at site rig-7".into()), ..sent(2) };
        let facts = DeviceFacts { online: true, acknowledged: Some(5), sent: Some(&held) };
        assert_eq!(device_state(2, facts, Duration::from_millis(MIN), 10_000_000), DeviceState::Offline);
    }

    #[test]
    fn a_wave_moves_on_when_every_device_is_healthy_and_completes_after_the_last() {
        use DeviceState::*;
        let now = 1_000_000 + 1_000;
        assert_eq!(decide(&strategy(), &rollout(RolloutState::Progressing, 0), &[Healthy], now), Step::NextWave);
        assert_eq!(decide(&strategy(), &rollout(RolloutState::Progressing, 1), &[Healthy, Updated], now), Step::Wait);
        assert_eq!(decide(&strategy(), &rollout(RolloutState::Progressing, 2), &[Healthy; 4], now), Step::Complete);
        assert_eq!(decide(&strategy(), &rollout(RolloutState::Progressing, 2), &[], now), Step::Complete);
    }

    #[test]
    fn failures_over_the_ratio_stop_the_rollout_and_under_it_do_not() {
        use DeviceState::*;
        let now = 1_000_000 + 1_000;
        let step = decide(&strategy(), &rollout(RolloutState::Progressing, 0), &[Failed], now);
        assert!(matches!(&step, Step::Stop { reason } if reason.contains("1 of 1")), "{step:?}");
        let some = [Failed, Healthy, Healthy, Healthy];
        assert_eq!(decide(&strategy(), &rollout(RolloutState::Progressing, 1), &some, now), Step::NextWave);
        let many = [Failed, Failed, Healthy, Updated];
        assert!(matches!(decide(&strategy(), &rollout(RolloutState::Progressing, 1), &many, now), Step::Stop { .. }));
    }

    #[test]
    fn offline_devices_hold_a_wave_only_until_the_device_timeout_and_never_count_as_failures() {
        use DeviceState::*;
        let wave = [Healthy, Offline, Pending, Failed];
        let rollout = rollout(RolloutState::Progressing, 1);
        assert_eq!(decide(&strategy(), &rollout, &wave, 1_000_000 + 299_000), Step::Wait);
        // After the timeout 1 of 2 reachable failed: over 0.25.
        let after = 1_000_000 + 300_000;
        assert!(matches!(decide(&strategy(), &rollout, &wave, after), Step::Stop { .. }));
        let wave = [Healthy, Offline, Pending, Healthy, Healthy, Failed];
        assert_eq!(decide(&strategy(), &rollout, &wave, after), Step::NextWave, "1 of 4 reachable is not over 0.25");
    }

    #[test]
    fn a_device_that_took_the_revision_but_never_became_healthy_counts_as_failed_in_the_end() {
        use DeviceState::*;
        let rollout = rollout(RolloutState::Progressing, 1);
        let wave = [Healthy, Healthy, Healthy, Updated];
        assert_eq!(decide(&strategy(), &rollout, &wave, 1_000_000 + 300_000 + MIN - 1), Step::Wait);
        assert_eq!(decide(&strategy(), &rollout, &wave, 1_000_000 + 300_000 + MIN), Step::NextWave, "1 of 4: under");
        let wave = [Healthy, Updated, Updated];
        assert!(matches!(decide(&strategy(), &rollout, &wave, 1_000_000 + 300_000 + MIN), Step::Stop { .. }));
    }
}
