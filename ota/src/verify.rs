//! Verification of signed metadata, pure and clock-injected: every check takes
//! `now` from the caller, so expiry and clock errors are tested without
//! waiting or faking the system clock.
//!
//! [`TrustedState`] walks the TUF order from a trusted root: root rotations,
//! then timestamp → snapshot → targets, each document size-capped before it is
//! parsed, its signatures checked before its content is read, and its version
//! compared with the device's stored one and with the version its parent role
//! vouches for.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical::{to_canonical, CanonicalError};
use crate::digest::Digest;
use crate::hex;
use crate::keys::PublicKey;
use crate::metadata::{
    Role, RoleType, Root, Signed, Snapshot, Target, Targets, Timestamp, SNAPSHOT_FILE, TARGETS_FILE,
};

/// How far past its expiry a document is still accepted: device clocks drift.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// A device clock before this (2024-01-01T00:00:00Z) has never been set, not
/// merely drifted: no metadata could have been made then, so say so.
pub const CLOCK_FLOOR: Duration = Duration::from_secs(1_704_067_200);

/// Caps on each role's document, read before anything is parsed, so a server
/// sending endless data is cut off (TUF's "endless data" attack).
pub const MAX_ROOT_SIZE: u64 = 64 * 1024;
pub const MAX_TIMESTAMP_SIZE: u64 = 16 * 1024;
pub const MAX_SNAPSHOT_SIZE: u64 = 64 * 1024;
pub const MAX_TARGETS_SIZE: u64 = 1024 * 1024;

pub fn max_size(role: RoleType) -> u64 {
    match role {
        RoleType::Root => MAX_ROOT_SIZE,
        RoleType::Timestamp => MAX_TIMESTAMP_SIZE,
        RoleType::Snapshot => MAX_SNAPSHOT_SIZE,
        RoleType::Targets => MAX_TARGETS_SIZE,
        // Deployments travel inside a desired state, never as a file of their
        // own; the cap is the targets one, should one ever be read alone.
        RoleType::Deployments => MAX_TARGETS_SIZE,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{role} metadata is {len} bytes, over its cap of {cap}; the server may be sending endless data, so it was not read")]
    TooLarge { role: RoleType, len: u64, cap: u64 },
    #[error("{role} metadata is not valid: {source}; the repository must publish it again")]
    Malformed { role: RoleType, source: serde_json::Error },
    #[error("the document holds {found} metadata where {expected} was expected; check which file was fetched")]
    WrongType { expected: RoleType, found: RoleType },
    #[error("the root is unusable: {0}; publish a corrected root")]
    InvalidRoot(String),
    #[error("{role} metadata has {valid} valid signature(s) from its keys, below its threshold of {threshold}; it was tampered with or signed with the wrong keys")]
    Threshold { role: RoleType, valid: u32, threshold: u32 },
    #[error("{role} metadata version {found} is older than the trusted version {trusted}; refusing the rollback")]
    Rollback { role: RoleType, trusted: u64, found: u64 },
    #[error("the next root must be version {expected} but is {found}; roots are applied one version at a time")]
    RootVersion { expected: u64, found: u64 },
    #[error("{role} metadata expired at {expires} (device time {now}); the repository must re-sign it, or the device is being fed stale metadata")]
    Expired { role: RoleType, expires: String, now: String },
    #[error("the device clock reads {now}, before metadata could exist; set the clock (NTP or RTC) and try again")]
    ClockWrong { now: String },
    #[error("{role} metadata is version {found} but {parent} vouches for version {expected}; refusing to mix metadata from different releases")]
    VersionMismatch { role: RoleType, parent: RoleType, expected: u64, found: u64 },
    #[error("{role} metadata does not list {file}; the repository must publish it again")]
    MissingMeta { role: RoleType, file: &'static str },
    #[error("{need} metadata must be loaded first")]
    OutOfOrder { need: RoleType },
    #[error(
        "{what} has sha256 {found} but {expected} was signed for; it was tampered with or corrupted, download it again"
    )]
    HashMismatch { what: String, expected: String, found: String },
    #[error("target {name:?} is not in the targets metadata")]
    UnknownTarget { name: String },
    #[error(
        "target {name:?} is not for hardware {hardware:?} (only {supported:?}); refusing to install the wrong software"
    )]
    WrongHardware { name: String, hardware: String, supported: Vec<String> },
    #[error("target {name:?} download reached {received} bytes, over its signed length {length}; stopped reading")]
    Oversized { name: String, length: u64, received: u64 },
    #[error(
        "target {name:?} download ended at {received} bytes, short of its signed length {length}; download it again"
    )]
    Truncated { name: String, length: u64, received: u64 },
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
}

/// Checks a `role` document against `root`: size cap, a threshold of distinct
/// valid signatures from the role's keys, the `_type`, a version no lower than
/// `min_version` (the device's stored one), and expiry at `now`.
pub fn verify_role<T: Role>(bytes: &[u8], root: &Root, now: SystemTime, min_version: u64) -> Result<T, VerifyError> {
    let envelope = parse_envelope(T::TYPE, bytes)?;
    check_signatures(&envelope, root, T::TYPE)?;
    let role: T = parse_signed(T::TYPE, envelope.signed)?;
    if role.version() < min_version {
        return Err(VerifyError::Rollback { role: T::TYPE, trusted: min_version, found: role.version() });
    }
    check_fresh(T::TYPE, role.expires(), now)?;
    Ok(role)
}

/// The root that follows `old`: signed by a threshold of `old`'s root keys and
/// of its own, and exactly one version later. Expiry is not checked here:
/// a chain of rotations may pass through roots that have since expired; the
/// last one is checked before it is used.
pub fn update_root(old: &Root, new_bytes: &[u8]) -> Result<Root, VerifyError> {
    let envelope = parse_envelope(RoleType::Root, new_bytes)?;
    check_signatures(&envelope, old, RoleType::Root)?;
    let new: Root = parse_signed(RoleType::Root, envelope.signed.clone())?;
    validate_root(&new)?;
    check_signatures(&envelope, &new, RoleType::Root)?;
    if new.version <= old.version {
        return Err(VerifyError::Rollback { role: RoleType::Root, trusted: old.version, found: new.version });
    }
    if new.version != old.version + 1 {
        return Err(VerifyError::RootVersion { expected: old.version + 1, found: new.version });
    }
    Ok(new)
}

/// Refuses a received download as soon as it passes the target's signed
/// length: call it as bytes arrive, so an endless download is cut off.
pub fn check_received(name: &str, target: &Target, received: u64) -> Result<(), VerifyError> {
    if received > target.length {
        return Err(VerifyError::Oversized { name: name.to_string(), length: target.length, received });
    }
    Ok(())
}

/// Checks a finished download's length and digest against the target.
pub fn check_download(name: &str, target: &Target, len: u64, digest: &Digest) -> Result<(), VerifyError> {
    check_received(name, target, len)?;
    if len < target.length {
        return Err(VerifyError::Truncated { name: name.to_string(), length: target.length, received: len });
    }
    if digest.hex() != target.sha256 {
        return Err(VerifyError::HashMismatch {
            what: format!("target {name:?}"),
            expected: target.sha256.clone(),
            found: digest.hex(),
        });
    }
    Ok(())
}

/// The versions a device has trusted, kept in its store so that no role's
/// version can go back, across restarts included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    pub root: u64,
    pub timestamp: u64,
    pub snapshot: u64,
    pub targets: u64,
}

/// The metadata a device trusts, updated in TUF's order.
#[derive(Debug)]
pub struct TrustedState {
    root: Root,
    versions: Versions,
    timestamp: Option<Timestamp>,
    snapshot: Option<Snapshot>,
    targets: Option<Targets>,
}

impl TrustedState {
    /// Starts from the device's trusted root (shipped with it, or the last one
    /// it rotated to) and its stored versions. The root must sign itself.
    pub fn new(root_bytes: &[u8], stored: Versions) -> Result<Self, VerifyError> {
        let envelope = parse_envelope(RoleType::Root, root_bytes)?;
        let root: Root = parse_signed(RoleType::Root, envelope.signed.clone())?;
        validate_root(&root)?;
        check_signatures(&envelope, &root, RoleType::Root)?;
        if root.version < stored.root {
            return Err(VerifyError::Rollback { role: RoleType::Root, trusted: stored.root, found: root.version });
        }
        let versions = Versions { root: root.version, ..stored };
        Ok(Self { root, versions, timestamp: None, snapshot: None, targets: None })
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The versions to write to the device's store after an update.
    pub fn versions(&self) -> Versions {
        self.versions
    }

    /// Rotates to the next root (see [`update_root`]).
    pub fn update_root(&mut self, bytes: &[u8]) -> Result<(), VerifyError> {
        let new = update_root(&self.root, bytes)?;
        // New timestamp or snapshot keys forget the stored versions: otherwise
        // a stolen old key that signed a huge version would lock devices out
        // forever (TUF's fast-forward recovery).
        if new.roles.get(&RoleType::Timestamp) != self.root.roles.get(&RoleType::Timestamp) {
            self.versions.timestamp = 0;
        }
        if new.roles.get(&RoleType::Snapshot) != self.root.roles.get(&RoleType::Snapshot) {
            self.versions.snapshot = 0;
        }
        self.versions.root = new.version;
        self.root = new;
        self.timestamp = None;
        self.snapshot = None;
        self.targets = None;
        Ok(())
    }

    pub fn update_timestamp(&mut self, bytes: &[u8], now: SystemTime) -> Result<&Timestamp, VerifyError> {
        check_fresh(RoleType::Root, self.root.expires, now)?;
        let timestamp: Timestamp = verify_role(bytes, &self.root, now, self.versions.timestamp)?;
        let meta = timestamp
            .meta
            .get(SNAPSHOT_FILE)
            .ok_or(VerifyError::MissingMeta { role: RoleType::Timestamp, file: SNAPSHOT_FILE })?;
        if meta.version < self.versions.snapshot {
            return Err(VerifyError::Rollback {
                role: RoleType::Snapshot,
                trusted: self.versions.snapshot,
                found: meta.version,
            });
        }
        self.versions.timestamp = timestamp.version;
        self.snapshot = None;
        self.targets = None;
        Ok(self.timestamp.insert(timestamp))
    }

    pub fn update_snapshot(&mut self, bytes: &[u8], now: SystemTime) -> Result<&Snapshot, VerifyError> {
        let timestamp = self.timestamp.as_ref().ok_or(VerifyError::OutOfOrder { need: RoleType::Timestamp })?;
        let meta = &timestamp.meta[SNAPSHOT_FILE];
        let len = bytes.len() as u64;
        if let Some(length) = meta.length.filter(|&length| len > length) {
            return Err(VerifyError::TooLarge { role: RoleType::Snapshot, len, cap: length });
        }
        if let Some(expected) = &meta.sha256 {
            let found = Digest::of(bytes).hex();
            if &found != expected {
                return Err(VerifyError::HashMismatch {
                    what: SNAPSHOT_FILE.into(),
                    expected: expected.clone(),
                    found,
                });
            }
        }
        let snapshot: Snapshot = verify_role(bytes, &self.root, now, self.versions.snapshot)?;
        check_vouched(RoleType::Snapshot, RoleType::Timestamp, meta.version, snapshot.version)?;
        let targets_meta = snapshot
            .meta
            .get(TARGETS_FILE)
            .ok_or(VerifyError::MissingMeta { role: RoleType::Snapshot, file: TARGETS_FILE })?;
        if targets_meta.version < self.versions.targets {
            return Err(VerifyError::Rollback {
                role: RoleType::Targets,
                trusted: self.versions.targets,
                found: targets_meta.version,
            });
        }
        self.versions.snapshot = snapshot.version;
        self.targets = None;
        Ok(self.snapshot.insert(snapshot))
    }

    pub fn update_targets(&mut self, bytes: &[u8], now: SystemTime) -> Result<&Targets, VerifyError> {
        let snapshot = self.snapshot.as_ref().ok_or(VerifyError::OutOfOrder { need: RoleType::Snapshot })?;
        let vouched = snapshot.meta[TARGETS_FILE].version;
        let targets: Targets = verify_role(bytes, &self.root, now, self.versions.targets)?;
        check_vouched(RoleType::Targets, RoleType::Snapshot, vouched, targets.version)?;
        self.versions.targets = targets.version;
        Ok(self.targets.insert(targets))
    }

    /// The target `name`, if it may be installed on `hardware`. Its `length`
    /// is the cap for the download (see [`check_received`]).
    pub fn target(&self, name: &str, hardware: &str) -> Result<&Target, VerifyError> {
        let targets = self.targets.as_ref().ok_or(VerifyError::OutOfOrder { need: RoleType::Targets })?;
        let target = targets.targets.get(name).ok_or_else(|| VerifyError::UnknownTarget { name: name.into() })?;
        if !target.hardware.iter().any(|h| h == hardware) {
            return Err(VerifyError::WrongHardware {
                name: name.into(),
                hardware: hardware.into(),
                supported: target.hardware.clone(),
            });
        }
        Ok(target)
    }
}

fn parse_envelope(role: RoleType, bytes: &[u8]) -> Result<Signed<Value>, VerifyError> {
    let len = bytes.len() as u64;
    let cap = max_size(role);
    if len > cap {
        return Err(VerifyError::TooLarge { role, len, cap });
    }
    serde_json::from_slice(bytes).map_err(|source| VerifyError::Malformed { role, source })
}

/// Parses a role after its signatures passed. The `_type` is looked at first
/// so that a document of another role is named as such, not as malformed.
fn parse_signed<T: Role>(role: RoleType, signed: Value) -> Result<T, VerifyError> {
    if let Some(found) = signed.get("_type").and_then(|t| serde_json::from_value::<RoleType>(t.clone()).ok()) {
        if found != role {
            return Err(VerifyError::WrongType { expected: role, found });
        }
    }
    serde_json::from_value(signed).map_err(|source| VerifyError::Malformed { role, source })
}

/// Counts distinct keys of `role` in `root` whose signature over the canonical
/// `signed` object verifies; a key signing twice counts once.
fn check_signatures(envelope: &Signed<Value>, root: &Root, role: RoleType) -> Result<(), VerifyError> {
    let role_keys = root
        .roles
        .get(&role)
        .ok_or_else(|| VerifyError::InvalidRoot(format!("it names no keys for the {role} role")))?;
    let message = to_canonical(&envelope.signed)?;
    let mut valid = BTreeSet::new();
    for signature in &envelope.signatures {
        if !role_keys.keyids.contains(&signature.keyid) {
            continue;
        }
        let Some(key) = root.keys.get(&signature.keyid) else { continue };
        let (Ok(public), Some(sig)) = (PublicKey::from_hex(&key.public), hex::decode(&signature.sig)) else {
            continue;
        };
        if public.verify(&message, &sig) {
            valid.insert(signature.keyid.as_str());
        }
    }
    let valid = valid.len() as u32;
    if valid < role_keys.threshold {
        return Err(VerifyError::Threshold { role, valid, threshold: role_keys.threshold });
    }
    Ok(())
}

/// A root that can be used at all: every role has a reachable, non-zero
/// threshold of known keys, and each key sits under its own id, so one key
/// cannot be listed twice to count twice.
fn validate_root(root: &Root) -> Result<(), VerifyError> {
    for (keyid, key) in &root.keys {
        let public = PublicKey::from_hex(&key.public).map_err(|e| VerifyError::InvalidRoot(e.to_string()))?;
        if &public.key_id() != keyid {
            return Err(VerifyError::InvalidRoot(format!("key {keyid} is listed under an id that is not its sha256")));
        }
    }
    for role in [RoleType::Root, RoleType::Targets, RoleType::Snapshot, RoleType::Timestamp, RoleType::Deployments] {
        let Some(keys) = root.roles.get(&role) else {
            // Roots from before signed deployments have no such role: they
            // still parse, and trust no deployment (crate::deployment says so).
            if role == RoleType::Deployments {
                continue;
            }
            return Err(VerifyError::InvalidRoot(format!("it names no keys for the {role} role")));
        };
        let distinct: BTreeSet<_> = keys.keyids.iter().collect();
        if keys.threshold == 0 || keys.threshold as usize > distinct.len() {
            return Err(VerifyError::InvalidRoot(format!(
                "the {role} threshold {} cannot be met by its {} distinct key(s)",
                keys.threshold,
                distinct.len()
            )));
        }
        if let Some(unknown) = keys.keyids.iter().find(|id| !root.keys.contains_key(*id)) {
            return Err(VerifyError::InvalidRoot(format!("the {role} role names unknown key {unknown}")));
        }
    }
    Ok(())
}

fn check_vouched(role: RoleType, parent: RoleType, expected: u64, found: u64) -> Result<(), VerifyError> {
    if found != expected {
        return Err(VerifyError::VersionMismatch { role, parent, expected, found });
    }
    Ok(())
}

fn check_fresh(role: RoleType, expires: SystemTime, now: SystemTime) -> Result<(), VerifyError> {
    let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if now < UNIX_EPOCH + CLOCK_FLOOR {
        return Err(VerifyError::ClockWrong { now: time(now) });
    }
    if now > expires + CLOCK_SKEW {
        return Err(VerifyError::Expired { role, expires: time(expires), now: time(now) });
    }
    Ok(())
}
