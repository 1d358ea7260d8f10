//! Agent self-update, with the agent's binary in two slots under the data dir
//! (`<data-dir>/agent/{a,b}/edge-agent` and `bootenv.json`, an
//! [`ota::FileSlots`]), rolled back by boot counting as A/B systems are.
//!
//! - [`fetch`]: the signed way in. TUF metadata from the hub (root rotations,
//!   timestamp, snapshot, targets), every verified version saved in the store
//!   at once so no version ever goes back, across restarts included; then the
//!   target for this hardware downloaded (resumed, verified, paced) and
//!   written to the inactive slot.
//! - [`stage0`]: what `edge-agent daemon` does first. It counts a boot of a
//!   pending update and execs the binary the boot environment names; past the
//!   boot limit the environment names the previous slot again.
//! - [`health`]: an agent on trial confirms itself within
//!   `update-health-deadline` (store opens, and the hub connected, or with no
//!   hub the offline self-check passed), or counts a failed boot by starting
//!   stage 0 again.
//!
//! - [`deployment`]: an update that a deployment asks for, acted on once
//!   per revision, so the hub's rollouts carry agent updates in waves.
//!
//! Workloads keep running throughout: their shims are separate processes
//! that do not care which agent binary runs. Exec keeps the daemon's pid.

pub mod deployment;
pub mod fetch;
pub mod health;
pub mod stage0;

use std::path::{Path, PathBuf};

use ota::{FileSlots, Slot, SlotBackend, SlotError};
use outpost_proto::UpdateOrigin;
use serde::{Deserialize, Serialize};

use crate::runtime::paths::write_atomic;

/// Boots an update gets to confirm itself in, deadline misses included.
pub const BOOTLIMIT: u32 = 3;

/// The update waiting for its verdict, kept next to the boot environment so
/// that the agent which learns the outcome, after any number of execs, can
/// record it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub target: String,
    pub version: String,
    pub slot: Slot,
    /// Why each trial boot so far failed; the last one is the rollback's reason.
    pub failures: Vec<String>,
    /// The deployment revision that asked for it; none from `edge-agent update`.
    #[serde(default)]
    pub from: Option<UpdateOrigin>,
}

/// The agent's two binary slots and what goes with them.
#[derive(Debug, Clone)]
pub struct AgentSlots {
    dir: PathBuf,
    pub slots: FileSlots,
}

impl AgentSlots {
    pub fn new(data_dir: &Path) -> Self {
        let dir = data_dir.join("agent");
        Self { slots: FileSlots::for_programs(&dir, "edge-agent"), dir }
    }

    /// Where downloads accumulate before they are written to a slot.
    pub fn download_dir(&self) -> PathBuf {
        self.dir.join("download")
    }

    pub(crate) fn pending_path(&self) -> PathBuf {
        self.dir.join("pending.json")
    }

    pub fn pending(&self) -> std::io::Result<Option<Pending>> {
        match std::fs::read(self.pending_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn set_pending(&self, pending: &Pending) -> std::io::Result<()> {
        write_atomic(&self.pending_path(), &serde_json::to_vec_pretty(pending).map_err(std::io::Error::other)?)
    }

    pub fn clear_pending(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.pending_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The boot environment, `None` while no update was ever installed.
    pub fn env(&self) -> Result<Option<ota::BootEnv>, SlotError> {
        match self.slots.env() {
            Ok(env) => Ok(Some(env)),
            Err(SlotError::EnvMissing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Which slot `exe` is, if it is one of them.
    pub fn slot_of(&self, exe: &Path) -> Option<Slot> {
        let exe = std::fs::canonicalize(exe).ok()?;
        [Slot::A, Slot::B]
            .into_iter()
            .find(|&slot| std::fs::canonicalize(self.slots.slot_path(slot)).ok() == Some(exe.clone()))
    }
}
