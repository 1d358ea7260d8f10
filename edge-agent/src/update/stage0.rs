//! Stage 0: the first thing `edge-agent daemon` does, before it opens the
//! store. The boot environment of the agent's slots says which binary should
//! run; if that is not this one, exec it with the same arguments.
//!
//! A boot is counted (see [`ota::boot`]) by the process that starts stage 0,
//! not by the one it execs into, which [`BOOTED_ENV`] marks: one start of the
//! daemon counts one boot however many execs it takes, and a marked process
//! never execs again, so a confused environment cannot make a loop.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use ota::{BootEnv, Slot, SlotBackend};

use super::AgentSlots;

/// Set on a process exec'd by stage 0: its boot is already counted.
pub const BOOTED_ENV: &str = "OUTPOST_AGENT_BOOTED";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage0 {
    /// No agent update was ever installed: the installed binary runs.
    RunInstalled,
    /// This binary is the slot the environment names: it runs, on trial when
    /// it is an update not yet confirmed.
    Run { slot: Slot, trial: bool },
    /// Another slot's binary must run.
    Exec(Slot),
    /// Exec'd already, yet the environment names another slot (changed in
    /// between): this binary runs rather than exec again.
    Mismatch { running: Option<Slot>, active: Slot },
}

/// Which binary runs, given the boot environment after this boot was counted,
/// the slot this binary is (`None` for the installed binary outside the
/// slots), and whether stage 0 already exec'd into it.
pub fn decide(env: Option<BootEnv>, running: Option<Slot>, execd: bool) -> Stage0 {
    let Some(env) = env else { return Stage0::RunInstalled };
    if running == Some(env.active) {
        return Stage0::Run { slot: env.active, trial: env.upgrade_available };
    }
    if execd {
        return Stage0::Mismatch { running, active: env.active };
    }
    Stage0::Exec(env.active)
}

/// What the daemon runs as, once stage 0 let it run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boot {
    pub slot: Option<Slot>,
    /// An update on probation: it must confirm itself within the deadline.
    pub trial: bool,
}

/// Counts this boot, then returns when this binary is the one to run, or
/// execs the one that is (and does not return).
pub fn run(agent: &AgentSlots) -> anyhow::Result<Boot> {
    let execd = std::env::var_os(BOOTED_ENV).is_some();
    let exe = std::env::current_exe()?;
    let running = agent.slot_of(&exe);
    let mut env = agent.env()?;
    if env.is_some() && !execd {
        ota::boot(&agent.slots)?;
        env = agent.env()?;
    }
    match decide(env, running, execd) {
        Stage0::RunInstalled => Ok(Boot { slot: None, trial: false }),
        Stage0::Run { slot, trial } => {
            if trial {
                let count = env.map(|e| e.bootcount).unwrap_or(0);
                tracing::warn!(%slot, "running an agent update on trial, boot {count} of {}", super::BOOTLIMIT);
            }
            Ok(Boot { slot: Some(slot), trial })
        }
        Stage0::Exec(slot) => {
            let path = agent.slots.slot_path(slot);
            tracing::info!(%slot, "starting the agent of slot {slot} ({})", path.display());
            Err(exec(&path, true))
        }
        Stage0::Mismatch { running, active } => {
            tracing::error!(
                ?running,
                %active,
                "stage 0 exec'd this agent, but the boot environment names slot {active}: running this one"
            );
            Ok(Boot { slot: running, trial: false })
        }
    }
}

/// Replaces this process with `binary`, same arguments and pid. Returns only
/// the error when exec fails. Without `counted`, the new process counts a
/// boot in its stage 0.
pub fn exec(binary: &Path, counted: bool) -> anyhow::Error {
    let mut command = Command::new(binary);
    command.args(std::env::args_os().skip(1));
    if counted {
        command.env(BOOTED_ENV, "1");
    } else {
        command.env_remove(BOOTED_ENV);
    }
    let error = command.exec();
    anyhow::Error::new(error).context(format!("cannot exec the agent binary {}", binary.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u32 = super::super::BOOTLIMIT;

    #[test]
    fn without_an_environment_the_installed_binary_runs() {
        assert_eq!(decide(None, None, false), Stage0::RunInstalled);
    }

    #[test]
    fn the_installed_binary_execs_the_slot_a_confirmed_update_left_active() {
        assert_eq!(decide(Some(BootEnv::new(Slot::B, LIMIT)), None, false), Stage0::Exec(Slot::B));
    }

    #[test]
    fn a_slot_running_as_the_environment_says_runs_and_is_not_on_trial_once_confirmed() {
        assert_eq!(
            decide(Some(BootEnv::new(Slot::A, LIMIT)), Some(Slot::A), false),
            Stage0::Run { slot: Slot::A, trial: false }
        );
    }

    #[test]
    fn a_pending_update_is_exec_d_from_the_old_slot_and_runs_on_trial() {
        let (env, _) = BootEnv::new(Slot::A, LIMIT).install().unwrap().on_boot();
        assert_eq!(decide(Some(env), Some(Slot::A), false), Stage0::Exec(Slot::B));
        assert_eq!(decide(Some(env), Some(Slot::B), true), Stage0::Run { slot: Slot::B, trial: true });
    }

    #[test]
    fn an_update_out_of_boots_makes_its_own_binary_exec_the_previous_slot() {
        let mut env = BootEnv::new(Slot::A, LIMIT).install().unwrap();
        for _ in 0..=LIMIT {
            (env, _) = env.on_boot();
        }
        assert_eq!(decide(Some(env), Some(Slot::B), false), Stage0::Exec(Slot::A));
        assert_eq!(decide(Some(env), Some(Slot::A), true), Stage0::Run { slot: Slot::A, trial: false });
    }

    #[test]
    fn an_exec_d_binary_that_is_not_the_active_slot_runs_rather_than_exec_again() {
        assert_eq!(
            decide(Some(BootEnv::new(Slot::A, LIMIT)), Some(Slot::B), true),
            Stage0::Mismatch { running: Some(Slot::B), active: Slot::A }
        );
    }
}
