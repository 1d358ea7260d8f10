//! A/B slots with automatic rollback, Mender/U-Boot style.
//!
//! Two slots hold two system images (or two agent binaries). A small boot
//! environment, [`BootEnv`], says which one boots, and whether that slot is a
//! fresh update still on probation. Walking through one update from slot A:
//!
//! | step                           | `active` | `upgrade_available` | `bootcount` | slot A        | slot B          |
//! |--------------------------------|----------|---------------------|-------------|---------------|-----------------|
//! | running, nothing pending       | A        | false               | 0           | running       | inactive, free  |
//! | image written to B, [`BootEnv::install`] | B | true         | 0           | fallback      | new, not booted |
//! | reboot, [`BootEnv::on_boot`]   | B        | true                | 1           | fallback      | on probation    |
//! | healthy, [`BootEnv::confirm`]  | B        | false               | 0           | inactive, free| running         |
//!
//! If B is never confirmed, each reboot counts one more try; the boot that
//! takes `bootcount` past `bootlimit` sets `active` back to A and clears
//! `upgrade_available`, so A boots again and B is free for the next update.
//! While an update is pending the other slot is the fallback, so a second
//! install is refused until the pending one is confirmed or rolled back.
//!
//! The state machine is pure data and functions; [`SlotBackend`] is where the
//! slots and the environment live. [`FileSlots`] keeps them in image files
//! (the hardware tests use those as slots). [`install_update`], [`boot`] and
//! [`confirm_boot`] are the three steps above against a backend.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, HashingWriter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// What the bootloader reads to choose a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEnv {
    /// The slot the next boot starts.
    pub active: Slot,
    /// `active` is a fresh update not yet confirmed healthy; the other slot is
    /// its fallback.
    pub upgrade_available: bool,
    /// Boots of the pending update so far.
    pub bootcount: u32,
    /// How many boots a pending update gets to confirm itself in.
    pub bootlimit: u32,
}

impl BootEnv {
    /// Running from `active` with nothing pending.
    pub fn new(active: Slot, bootlimit: u32) -> Self {
        Self { active, upgrade_available: false, bootcount: 0, bootlimit }
    }

    /// The slot an update is written to. Only free while nothing is pending:
    /// during a pending update it holds the fallback.
    pub fn inactive(self) -> Result<Slot, SlotError> {
        if self.upgrade_available {
            return Err(SlotError::UpgradePending { pending: self.active });
        }
        Ok(self.active.other())
    }

    /// After the inactive slot is written and verified: the next boot starts
    /// it, on probation, and the slot running now becomes its fallback.
    pub fn install(self) -> Result<Self, SlotError> {
        let new = self.inactive()?;
        if self.bootlimit == 0 {
            return Err(SlotError::ZeroBootLimit);
        }
        Ok(Self { active: new, upgrade_available: true, bootcount: 0, bootlimit: self.bootlimit })
    }

    /// The bootloader's part, once per boot: counts a boot of a pending
    /// update, and falls back to the other slot when the update has used up
    /// `bootlimit` boots without confirming. Returns the new environment and
    /// the slot to start, which is always its `active`.
    pub fn on_boot(self) -> (Self, Slot) {
        if !self.upgrade_available {
            return (self, self.active);
        }
        let bootcount = self.bootcount.saturating_add(1);
        let next = if bootcount > self.bootlimit {
            Self::new(self.active.other(), self.bootlimit)
        } else {
            Self { bootcount, ..self }
        };
        (next, next.active)
    }

    /// The pending update booted healthy: it stays, and the old slot is free.
    /// Nothing changes when no update is pending.
    pub fn confirm(self) -> Self {
        Self::new(self.active, self.bootlimit)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("an update in slot {pending} is waiting to confirm itself and the other slot is its fallback; confirm it or let it roll back before installing another")]
    UpgradePending { pending: Slot },
    #[error("bootlimit is 0, so an installed update would never boot; set bootlimit to at least 1")]
    ZeroBootLimit,
    #[error("no boot environment at {path:?}; write one naming the slot the running system booted from")]
    EnvMissing { path: PathBuf },
    #[error("boot environment {path:?} is corrupt ({source}); write a fresh one naming the slot the running system booted from")]
    EnvCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the image for slot {slot} ended at {received} of {expected} bytes; the slot and the boot environment are unchanged")]
    ImageTooShort { slot: Slot, expected: u64, received: u64 },
    #[error("the image for slot {slot} is longer than the expected {expected} bytes; the slot and the boot environment are unchanged")]
    ImageTooLong { slot: Slot, expected: u64 },
    #[error("the image for slot {slot} has sha256 {actual}, not {expected}; the slot and the boot environment are unchanged")]
    HashMismatch { slot: Slot, expected: Digest, actual: Digest },
    #[error("could not {action} {path:?}: {source}; check the disk and its free space")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the two slots and the boot environment live: image files here, raw
/// partitions and bootloader variables on hardware.
pub trait SlotBackend {
    fn env(&self) -> Result<BootEnv, SlotError>;

    /// Replaces the environment all at once: after a crash the bootloader
    /// sees either the old one or the new one.
    fn write_env(&self, env: &BootEnv) -> Result<(), SlotError>;

    /// Writes exactly `length` bytes from `image` into `slot` and checks them
    /// against `sha256`. Writes whatever slot it is given: [`install_update`]
    /// is the caller that picks the inactive one.
    fn write_slot(&self, slot: Slot, image: &mut dyn Read, length: u64, sha256: &Digest) -> Result<(), SlotError>;

    /// Where `slot`'s image lives: a file, or a block device on hardware.
    fn slot_path(&self, slot: Slot) -> PathBuf;
}

/// Writes a verified image into the inactive slot and makes the next boot
/// start it on probation. Returns that slot. On any error the environment is
/// unchanged, so the next boot starts the running slot again.
pub fn install_update(
    backend: &dyn SlotBackend,
    image: &mut dyn Read,
    length: u64,
    sha256: &Digest,
) -> Result<Slot, SlotError> {
    let env = backend.env()?;
    let slot = env.inactive()?;
    backend.write_slot(slot, image, length, sha256)?;
    backend.write_env(&env.install()?)?;
    Ok(slot)
}

/// The bootloader, simulated: applies [`BootEnv::on_boot`], saves the result
/// and returns the slot to start.
pub fn boot(backend: &dyn SlotBackend) -> Result<Slot, SlotError> {
    let env = backend.env()?;
    let (next, slot) = env.on_boot();
    // Ordinary boots leave the environment as it is, as U-Boot does, so they
    // do not wear the flash.
    if next != env {
        backend.write_env(&next)?;
    }
    Ok(slot)
}

/// Called by the running system once it has checked itself healthy: a
/// pending update stays for good. Returns the saved environment.
pub fn confirm_boot(backend: &dyn SlotBackend) -> Result<BootEnv, SlotError> {
    let env = backend.env()?;
    let next = env.confirm();
    if next != env {
        backend.write_env(&next)?;
    }
    Ok(next)
}

/// Slots as two image files, `slot-a.img` and `slot-b.img`, next to the boot
/// environment `bootenv.json`, all in one directory.
///
/// A slot image is written to a temporary file, verified, fsync'd and renamed
/// over the slot, so a refused or interrupted write leaves the slot's old
/// bytes in place. The environment is written the same way.
///
/// A missing or corrupt environment is an error rather than a default:
/// guessing a slot could boot one whose update was rolled back or never
/// finished, or let the next update overwrite the running slot.
#[derive(Debug, Clone)]
pub struct FileSlots {
    dir: PathBuf,
}

impl FileSlots {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn env_path(&self) -> PathBuf {
        self.dir.join("bootenv.json")
    }

    /// Fills a temporary file next to `path` with `write`, fsyncs it and
    /// renames it over `path`, then fsyncs the directory so the rename is
    /// durable. When `write` fails, `path` is untouched and the temporary
    /// file is removed.
    fn replace_file(
        &self,
        path: &Path,
        write: impl FnOnce(&mut File, &Path) -> Result<(), SlotError>,
    ) -> Result<(), SlotError> {
        let tmp = tmp_path(path);
        let mut file = File::create(&tmp).map_err(|e| io_error("create", &tmp, e))?;
        let written = write(&mut file, &tmp).and_then(|()| file.sync_all().map_err(|e| io_error("sync", &tmp, e)));
        drop(file);
        if let Err(e) = written {
            // The temporary file holds nothing worth keeping; the error that
            // made it useless is the one to report.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, path).map_err(|e| io_error("rename into place", &tmp, e))?;
        let dir = File::open(&self.dir).map_err(|e| io_error("open", &self.dir, e))?;
        dir.sync_all().map_err(|e| io_error("sync", &self.dir, e))
    }
}

impl SlotBackend for FileSlots {
    fn env(&self) -> Result<BootEnv, SlotError> {
        let path = self.env_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SlotError::EnvMissing { path }),
            Err(e) => return Err(io_error("read", &path, e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| SlotError::EnvCorrupt { path, source })
    }

    fn write_env(&self, env: &BootEnv) -> Result<(), SlotError> {
        let json = serde_json::to_vec_pretty(env).expect("a BootEnv always serializes");
        self.replace_file(&self.env_path(), |file, tmp| file.write_all(&json).map_err(|e| io_error("write", tmp, e)))
    }

    fn write_slot(&self, slot: Slot, image: &mut dyn Read, length: u64, sha256: &Digest) -> Result<(), SlotError> {
        self.replace_file(&self.slot_path(slot), |file, tmp| {
            // One byte past `length` is read so a longer image is caught
            // without reading all of it.
            let mut writer = HashingWriter::new(file);
            io::copy(&mut image.take(length.saturating_add(1)), &mut writer).map_err(|e| io_error("write", tmp, e))?;
            let (_, actual, received) = writer.finish();
            if received > length {
                return Err(SlotError::ImageTooLong { slot, expected: length });
            }
            if received < length {
                return Err(SlotError::ImageTooShort { slot, expected: length, received });
            }
            if actual != *sha256 {
                return Err(SlotError::HashMismatch { slot, expected: *sha256, actual });
            }
            Ok(())
        })
    }

    fn slot_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(match slot {
            Slot::A => "slot-a.img",
            Slot::B => "slot-b.img",
        })
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> SlotError {
    SlotError::Io { action, path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u32 = 3;

    #[test]
    fn install_then_confirm_keeps_the_new_slot() {
        let installed = BootEnv::new(Slot::A, LIMIT).install().unwrap();
        assert_eq!(installed, BootEnv { active: Slot::B, upgrade_available: true, bootcount: 0, bootlimit: LIMIT });

        let (booted, slot) = installed.on_boot();
        assert_eq!(slot, Slot::B);
        let confirmed = booted.confirm();
        assert_eq!(confirmed, BootEnv::new(Slot::B, LIMIT));
        for _ in 0..2 * LIMIT {
            assert_eq!(confirmed.on_boot(), (confirmed, Slot::B));
        }
    }

    #[test]
    fn an_update_gets_bootlimit_boots_and_the_next_boot_returns_to_the_old_slot() {
        let mut env = BootEnv::new(Slot::A, LIMIT).install().unwrap();
        for try_number in 1..=LIMIT {
            let slot;
            (env, slot) = env.on_boot();
            assert_eq!((slot, env.bootcount), (Slot::B, try_number));
            assert!(env.upgrade_available);
        }
        let (env, slot) = env.on_boot();
        assert_eq!(slot, Slot::A);
        assert_eq!(env, BootEnv::new(Slot::A, LIMIT));
    }

    #[test]
    fn after_a_rollback_the_failed_slot_is_free_for_the_next_update() {
        let mut env = BootEnv::new(Slot::A, 1).install().unwrap();
        (env, _) = env.on_boot();
        (env, _) = env.on_boot();
        assert_eq!(env.active, Slot::A);
        assert_eq!(env.inactive().unwrap(), Slot::B);
    }

    #[test]
    fn confirm_without_a_pending_upgrade_changes_nothing() {
        let env = BootEnv::new(Slot::B, LIMIT);
        assert_eq!(env.confirm(), env);
    }

    #[test]
    fn a_second_install_while_one_is_pending_is_refused_to_keep_the_fallback() {
        let pending = BootEnv::new(Slot::A, LIMIT).install().unwrap();
        assert!(matches!(pending.install(), Err(SlotError::UpgradePending { pending: Slot::B })));
        assert!(matches!(pending.inactive(), Err(SlotError::UpgradePending { pending: Slot::B })));
    }

    #[test]
    fn install_with_a_bootlimit_of_zero_is_refused() {
        assert!(matches!(BootEnv::new(Slot::A, 0).install(), Err(SlotError::ZeroBootLimit)));
    }

    #[test]
    fn boot_env_json_names_slots_and_fields_as_the_bootloader_reads_them() {
        let json = serde_json::to_value(BootEnv::new(Slot::A, LIMIT).install().unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"active": "B", "upgrade_available": true, "bootcount": 0, "bootlimit": LIMIT})
        );
    }
}
