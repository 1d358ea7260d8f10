//! The status a shim publishes about its workload, and how the agent reads it.
//!
//! One JSON file per workload under the run directory, replaced atomically on
//! every transition. The agent never trusts it alone: it checks that the shim
//! that wrote it is still alive (pid and start time, against pid reuse).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::health::Health;
use super::paths::write_atomic;

/// The workload's lifecycle, as its shim drives it.
///
/// ```text
/// starting -> running -> backoff -> starting ...      (restart policy)
///                     -> exited                         (policy says no restart)
/// any      -> stopping -> stopped                       (operator stop)
/// starting -> failed                                    (first start impossible)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Starting,
    Running,
    Backoff,
    Stopping,
    Stopped,
    Exited,
    Failed,
}

impl State {
    /// A shim in this state has finished and exited.
    pub fn is_final(self) -> bool {
        matches!(self, State::Stopped | State::Exited | State::Failed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The kernel killed it for passing its memory limit.
    #[serde(default)]
    pub oom_killed: bool,
    /// Unix seconds.
    pub at: u64,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn describe(&self) -> String {
        match (&self.code, &self.signal) {
            _ if self.oom_killed => "OOM-killed (memory limit)".to_string(),
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by {signal}"),
            (None, None) => "exit status unknown".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub name: String,
    pub state: State,
    pub shim_pid: i32,
    /// Start time of the shim in clock ticks since boot (field 22 of /proc/PID/stat).
    pub shim_start: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Unix seconds when the current process started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    pub restarts: u32,
    pub crash_loop: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitStatus>,
    pub health: Health,
    /// Why the last start failed, in the runtime's words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl WorkloadStatus {
    /// The first status a shim (process `shim_pid`) publishes.
    pub fn starting(name: &str, shim_pid: i32) -> Self {
        Self {
            name: name.to_string(),
            state: State::Starting,
            shim_pid,
            shim_start: process_start_time(shim_pid).unwrap_or(0),
            pid: None,
            started_at: None,
            restarts: 0,
            crash_loop: false,
            last_exit: None,
            health: Health::None,
            error: None,
        }
    }

    pub fn read(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        write_atomic(path, &serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)
    }

    /// The shim that wrote this is still the process with that pid.
    pub fn shim_alive(&self) -> bool {
        process_start_time(self.shim_pid) == Some(self.shim_start)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Field 22 of /proc/PID/stat, for a process that has not exited; the
/// command name (field 2) may hold spaces, so count from the closing
/// parenthesis. A zombie counts as exited: its parent may be slow to reap it.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_start_time_is_readable_and_a_dead_pid_has_none() {
        assert!(process_start_time(std::process::id() as i32).is_some());
        assert_eq!(process_start_time(i32::MAX), None);
    }

    #[test]
    fn status_of_a_dead_shim_is_not_alive() {
        let mut status = WorkloadStatus::starting("a", std::process::id() as i32);
        status.shim_start += 1;
        assert!(!status.shim_alive(), "same pid, other start time: a reused pid");
    }

    #[test]
    fn exit_descriptions_name_oom_code_or_signal() {
        let exit = |code, signal: Option<&str>, oom_killed| ExitStatus {
            code,
            signal: signal.map(String::from),
            oom_killed,
            at: 0,
        };
        assert_eq!(exit(Some(3), None, false).describe(), "exit code 3");
        assert_eq!(exit(None, Some("SIGKILL"), true).describe(), "OOM-killed (memory limit)");
        assert_eq!(exit(None, Some("SIGTERM"), false).describe(), "killed by SIGTERM");
    }
}
