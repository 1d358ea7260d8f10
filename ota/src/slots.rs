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
//! (the tests use those as slots, and the agent keeps its own binary in
//! them); [`PartitionSlots`] writes A/B block devices with a text boot
//! environment a bootloader reads. [`install_update`], [`boot`] and
//! [`confirm_boot`] are the three steps above against a backend.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
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
    #[error("boot environment {path:?} is not valid ({reason}); write a fresh one naming the slot the running system booted from")]
    EnvInvalid { path: PathBuf, reason: String },
    #[error("the image for slot {slot} is {length} bytes but its partition {path:?} holds {capacity}; nothing was written: publish an image that fits, or repartition")]
    ImageTooBig { slot: Slot, path: PathBuf, length: u64, capacity: u64 },
    #[error("slot {slot} ({path:?}) reads back with sha256 {actual}, not the {expected} written; the boot environment is unchanged: the storage may be failing, try again and check it")]
    ReadBackMismatch { slot: Slot, path: PathBuf, expected: Digest, actual: Digest },
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
    names: [PathBuf; 2],
    executable: bool,
}

impl FileSlots {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), names: ["slot-a.img".into(), "slot-b.img".into()], executable: false }
    }

    /// Slots that hold a program: `<dir>/a/<file_name>` and
    /// `<dir>/b/<file_name>`, written executable. Renaming over a slot keeps
    /// a program running from it intact (its old inode lives on), where
    /// writing into it would fail with "text file busy".
    pub fn for_programs(dir: impl Into<PathBuf>, file_name: &str) -> Self {
        let names = [Path::new("a").join(file_name), Path::new("b").join(file_name)];
        Self { dir: dir.into(), names, executable: true }
    }

    pub fn env_path(&self) -> PathBuf {
        self.dir.join("bootenv.json")
    }
}

impl SlotBackend for FileSlots {
    fn env(&self) -> Result<BootEnv, SlotError> {
        let path = self.env_path();
        let Some(bytes) = read_env_file(&path)? else { return Err(SlotError::EnvMissing { path }) };
        serde_json::from_slice(&bytes).map_err(|source| SlotError::EnvCorrupt { path, source })
    }

    fn write_env(&self, env: &BootEnv) -> Result<(), SlotError> {
        let json = serde_json::to_vec_pretty(env).expect("a BootEnv always serializes");
        replace_file(&self.env_path(), |file, tmp| file.write_all(&json).map_err(|e| io_error("write", tmp, e)))
    }

    fn write_slot(&self, slot: Slot, image: &mut dyn Read, length: u64, sha256: &Digest) -> Result<(), SlotError> {
        let path = self.slot_path(slot);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
        }
        let executable = self.executable;
        replace_file(&path, |file, tmp| {
            let mut writer = HashingWriter::new(&mut *file);
            io::copy(&mut image.take(length), &mut writer).map_err(|e| io_error("write", tmp, e))?;
            let (_, actual, received) = writer.finish();
            check_image(slot, image, length, received, &actual, sha256)?;
            if executable {
                file.set_permissions(fs::Permissions::from_mode(0o755)).map_err(|e| io_error("chmod", tmp, e))?;
            }
            Ok(())
        })
    }

    fn slot_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(match slot {
            Slot::A => &self.names[0],
            Slot::B => &self.names[1],
        })
    }
}

/// A/B partitions: each slot is a block device (e.g. `/dev/mmcblk0p2` and
/// `/dev/mmcblk0p3`) written in place, and the boot environment is a small
/// text file of `key=value` lines, the shape U-Boot's `env import -t` and
/// GRUB's `load_env` read:
///
/// ```text
/// active=B
/// upgrade_available=1
/// bootcount=0
/// bootlimit=3
/// ```
///
/// Writing a partition cannot be made atomic: the inactive one is written
/// while nothing points at it, fsync'd, read back and hashed, and only then
/// does the environment (replaced atomically: temporary file, fsync, rename,
/// directory fsync) send the next boot there. An image larger than the
/// partition is refused before a byte is written. Any failure leaves the
/// active slot and the environment as they were.
///
/// The bootloader's part, at every boot: read the file; when
/// `upgrade_available=1`, add one to `bootcount`, and if it is then above
/// `bootlimit`, set `active` to the other slot, `upgrade_available=0` and
/// `bootcount=0`; write the file back if it changed; boot `active`. That is
/// [`BootEnv::on_boot`], which [`boot`] runs to simulate it.
#[derive(Debug, Clone)]
pub struct PartitionSlots {
    devices: [PathBuf; 2],
    env: PathBuf,
}

impl PartitionSlots {
    pub fn new(a: impl Into<PathBuf>, b: impl Into<PathBuf>, env: impl Into<PathBuf>) -> Self {
        Self { devices: [a.into(), b.into()], env: env.into() }
    }

    pub fn env_path(&self) -> &Path {
        &self.env
    }
}

impl SlotBackend for PartitionSlots {
    fn env(&self) -> Result<BootEnv, SlotError> {
        let Some(bytes) = read_env_file(&self.env)? else {
            return Err(SlotError::EnvMissing { path: self.env.clone() });
        };
        let text = String::from_utf8_lossy(&bytes);
        parse_text_env(&text).map_err(|reason| SlotError::EnvInvalid { path: self.env.clone(), reason })
    }

    fn write_env(&self, env: &BootEnv) -> Result<(), SlotError> {
        let text = format!(
            "active={}\nupgrade_available={}\nbootcount={}\nbootlimit={}\n",
            env.active,
            u8::from(env.upgrade_available),
            env.bootcount,
            env.bootlimit
        );
        replace_file(&self.env, |file, tmp| file.write_all(text.as_bytes()).map_err(|e| io_error("write", tmp, e)))
    }

    fn write_slot(&self, slot: Slot, image: &mut dyn Read, length: u64, sha256: &Digest) -> Result<(), SlotError> {
        let path = self.slot_path(slot);
        let mut device = File::options().read(true).write(true).open(&path).map_err(|e| io_error("open", &path, e))?;
        // A block device's size is where seeking to its end lands.
        let capacity = device.seek(SeekFrom::End(0)).map_err(|e| io_error("measure", &path, e))?;
        if length > capacity {
            return Err(SlotError::ImageTooBig { slot, path, length, capacity });
        }
        device.rewind().map_err(|e| io_error("seek", &path, e))?;
        let mut writer = HashingWriter::new(&mut device);
        io::copy(&mut image.take(length), &mut writer).map_err(|e| io_error("write", &path, e))?;
        let (_, actual, received) = writer.finish();
        check_image(slot, image, length, received, &actual, sha256)?;
        device.sync_all().map_err(|e| io_error("sync", &path, e))?;

        // What the bootloader will load is what the device holds, not what
        // was handed to write(2): read it back.
        device.rewind().map_err(|e| io_error("seek", &path, e))?;
        let mut hasher = crate::digest::Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut left = length;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = device.read(&mut buf[..want]).map_err(|e| io_error("read back", &path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        let read_back = hasher.finish();
        if left > 0 || read_back != *sha256 {
            return Err(SlotError::ReadBackMismatch { slot, path, expected: *sha256, actual: read_back });
        }
        Ok(())
    }

    fn slot_path(&self, slot: Slot) -> PathBuf {
        match slot {
            Slot::A => self.devices[0].clone(),
            Slot::B => self.devices[1].clone(),
        }
    }
}

/// Checks a streamed image once `length` bytes (or fewer, if it ended) went
/// through: nothing may follow them, and the count and hash must match.
fn check_image(
    slot: Slot,
    image: &mut dyn Read,
    length: u64,
    received: u64,
    actual: &Digest,
    sha256: &Digest,
) -> Result<(), SlotError> {
    if received < length {
        return Err(SlotError::ImageTooShort { slot, expected: length, received });
    }
    // One byte past `length` tells a longer image without reading all of it.
    let mut extra = [0u8; 1];
    let more = loop {
        match image.read(&mut extra) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error("read", Path::new("the image"), e)),
        }
    };
    if more > 0 {
        return Err(SlotError::ImageTooLong { slot, expected: length });
    }
    if actual != sha256 {
        return Err(SlotError::HashMismatch { slot, expected: *sha256, actual: *actual });
    }
    Ok(())
}

/// `key=value` lines; every key of [`BootEnv`] must be there, once.
fn parse_text_env(text: &str) -> Result<BootEnv, String> {
    let mut fields = std::collections::BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.split_once('=').ok_or_else(|| format!("line {line:?} is not key=value"))?;
        if fields.insert(key.trim(), value.trim()).is_some() {
            return Err(format!("{key} is set twice"));
        }
    }
    let get = |key: &str| fields.get(key).copied().ok_or_else(|| format!("{key} is missing"));
    let number = |key: &str| get(key)?.parse::<u32>().map_err(|_| format!("{key} is not a whole number"));
    let active = match get("active")? {
        "A" => Slot::A,
        "B" => Slot::B,
        other => return Err(format!("active is {other:?}, not A or B")),
    };
    let upgrade_available = match get("upgrade_available")? {
        "0" => false,
        "1" => true,
        other => return Err(format!("upgrade_available is {other:?}, not 0 or 1")),
    };
    Ok(BootEnv { active, upgrade_available, bootcount: number("bootcount")?, bootlimit: number("bootlimit")? })
}

fn read_env_file(path: &Path) -> Result<Option<Vec<u8>>, SlotError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path, e)),
    }
}

/// Fills a temporary file next to `path` with `write`, fsyncs it and renames
/// it over `path`, then fsyncs the directory so the rename is durable. When
/// `write` fails, `path` is untouched and the temporary file is removed.
fn replace_file(path: &Path, write: impl FnOnce(&mut File, &Path) -> Result<(), SlotError>) -> Result<(), SlotError> {
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
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let handle = File::open(dir).map_err(|e| io_error("open", dir, e))?;
    handle.sync_all().map_err(|e| io_error("sync", dir, e))
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
