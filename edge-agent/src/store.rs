//! The agent's durable state: the desired state with each deployment's
//! previous revision and local rollbacks, and the outbox of reports and
//! events for the hub, numbered within the store's epoch.
//!
//! The only module that knows sled. Values are JSON. Every mutation is flushed
//! before it returns, because callers acknowledge only after that. The desired
//! state is also kept as a JSON snapshot next to the store (`desired.json`),
//! so that a store sled cannot read is replaced by a fresh one that still
//! knows what to run.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ota::verify::Versions;
use outpost_proto::{Deployment, DesiredState, Event, EventKind, UpdateOrigin};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::runtime::paths::write_atomic;

/// Events kept at most while no hub has acknowledged them.
#[cfg(not(test))]
const MAX_EVENTS: u64 = 10_000;
#[cfg(test)]
const MAX_EVENTS: u64 = 50;
/// The layout this code reads and writes; `Store::migrate` brings older ones up to it.
const SCHEMA_VERSION: u32 = 2;

const SCHEMA_VERSION_KEY: &[u8] = b"schema_version";
/// The last event number handed out: the events tree alone forgets it once every event is acked.
const LAST_EVENT_SEQ_KEY: &[u8] = b"last_event_seq";
const LAST_REPORT_SEQ_KEY: &[u8] = b"last_report_seq";
/// Random, made once with the store: report and event numbers count within it.
const EPOCH_KEY: &[u8] = b"epoch";
/// The deployment revision whose agent update was last acted on.
const AGENT_UPDATE_KEY: &[u8] = b"agent_update";
/// The one key of the `desired` tree.
const CURRENT_KEY: &[u8] = b"current";
const SNAPSHOT_FILE: &str = "desired.json";
/// Keys of the `trust` tree.
const TRUSTED_ROOT_KEY: &[u8] = b"root";
const VERSIONS_KEY: &[u8] = b"versions";

/// Room sled needs to open a store: it writes a snapshot and may start a log
/// segment. An open on a full disk can leave an empty snapshot behind, which
/// the next open reads as a corrupt store (the chaos hw-test found it).
const MIN_FREE_TO_OPEN: u64 = 2 << 20;

/// sled's log segment for new stores. sled writes its log through an
/// in-memory buffer of one segment, touched as the log advances: at the
/// agent's pace its default (512 KiB) made the daemon's memory grow for most
/// of an hour, this one for a few minutes (docs/benchmarks.md). Values over a
/// quarter of it go to files of their own (sled's blobs).
const SEGMENT_SIZE: usize = 64 << 10;
/// What every store created before SEGMENT_SIZE uses.
const SLED_DEFAULT_SEGMENT_SIZE: usize = 512 << 10;

/// sled lets go of its file lock a moment after a `Db` is dropped (sled issue
/// 1234): an open in that moment is retried this often, this far apart. A
/// store held by another running agent stays locked far longer.
const LOCK_ATTEMPTS: u32 = 10;
const LOCK_RETRY_DELAY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {dir} is in use by another edge-agent process: stop that one first")]
    Locked { dir: PathBuf },

    #[error(
        "the filesystem holding the store at {dir} has {free_kib} KiB free, and opening the store writes to it: \
         not opened, so that the store is not damaged; make room (`edge-agent gc` removes unused images), then \
         start the agent again"
    )]
    DiskFull { dir: PathBuf, free_kib: u64 },

    #[error(
        "cannot make the store's settings at {dir}/conf durable ({source}): check the disk, then start the agent again"
    )]
    SyncConf { dir: PathBuf, source: std::io::Error },
    #[error("cannot open the store at {dir}: {source}")]
    Open { dir: PathBuf, source: sled::Error },

    #[error(
        "the store at {dir} has schema version {found}, written by a newer edge-agent; this one reads up to \
         version {supported}: run the newer agent again, or move {dir} aside to start from a fresh store \
         (the hub sends the desired state again)"
    )]
    NewerSchema { dir: PathBuf, found: u32, supported: u32 },

    #[error(
        "the store at {dir} is corrupt ({reason}), and it was left in place because the snapshot {snapshot} \
         cannot be read ({detail}): fix or remove the snapshot, then start the agent again"
    )]
    UnreadableSnapshot { dir: PathBuf, reason: String, snapshot: PathBuf, detail: String },

    #[error("the store at {dir} is corrupt ({reason}), and moving it aside to {to} failed: {source}")]
    MoveAside { dir: PathBuf, reason: String, to: PathBuf, source: std::io::Error },

    #[error("cannot write the desired-state snapshot {path}: {source}")]
    WriteSnapshot { path: PathBuf, source: std::io::Error },

    #[error(
        "desired state generation {offered} is older than the stored generation {current}: refused, a device \
         never goes back to an older generation"
    )]
    StaleGeneration { current: u64, offered: u64 },

    #[error(
        "a different desired state with generation {generation} is already stored: refused, every change must \
         come with a higher generation"
    )]
    ConflictingGeneration { generation: u64 },

    #[error("cannot make the store's epoch: the system's random number generator failed")]
    Random,

    #[error("the store holds an unreadable {what} ({detail}): the store is damaged")]
    Decode { what: &'static str, detail: String },

    #[error("the store failed: {0}")]
    Sled(#[from] sled::Error),
}

/// What `Store::open` did with a store sled could not use.
#[derive(Debug)]
pub struct Recovered {
    pub moved_to: PathBuf,
    pub reason: String,
    /// The generation restored from the snapshot; None when there was no snapshot.
    pub restored_generation: Option<u64>,
}

/// A deployment returned to an earlier revision by the device itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Rollback {
    /// The revision that failed.
    pub from_revision: u64,
    /// What runs instead.
    pub to: Deployment,
    pub reason: String,
}

pub struct Store {
    db: sled::Db,
    /// The store's directory, for `flush`'s fsyncs.
    dir: PathBuf,
    meta: sled::Tree,
    desired: sled::Tree,
    previous: sled::Tree,
    rollbacks: sled::Tree,
    confirmed: sled::Tree,
    reports: Numbered,
    events: Numbered,
    trust: sled::Tree,
    snapshot: PathBuf,
    /// Read (or made) by `migrate`, which every open runs.
    epoch: u64,
    /// See `Store::failed`.
    failed: AtomicBool,
}

/// Why `open_db` failed: a store sled cannot read, or anything else (a lock,
/// permissions), which must never cost the operator the store.
enum OpenFailure {
    Corrupt(sled::Error),
    Other(StoreError),
}

impl Store {
    /// Opens (creating) the store at `dir` (= data_dir/store) with a small cache (bytes).
    ///
    /// A store sled cannot read is moved aside to `dir.corrupt-<unix secs>`,
    /// and a fresh one gets the desired state from the snapshot.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<(Store, Option<Recovered>), StoreError> {
        let snapshot = dir.with_file_name(SNAPSHOT_FILE);
        if let Some(free) = free_bytes(dir).filter(|free| *free < MIN_FREE_TO_OPEN) {
            return Err(StoreError::DiskFull { dir: dir.to_path_buf(), free_kib: free >> 10 });
        }
        let reason = match open_db(dir, cache_bytes) {
            Ok(db) => {
                let mut store = Store::with_db(db, dir, snapshot.clone())?;
                let version = store.schema_version();
                // Before anything else: a newer agent's store must survive a downgrade untouched.
                if let Ok(Some(found)) = version {
                    if found > SCHEMA_VERSION {
                        return Err(StoreError::NewerSchema {
                            dir: dir.to_path_buf(),
                            found,
                            supported: SCHEMA_VERSION,
                        });
                    }
                }
                match version.and_then(|_| store.desired()) {
                    Ok(desired) if desired.is_some() || !snapshot.exists() => {
                        store.migrate()?;
                        return Ok((store, None));
                    }
                    // The snapshot is written only after the store holds that state, so a store
                    // without one next to a snapshot has lost its data: sled reads a damaged
                    // file as an empty database rather than failing.
                    Ok(_) => format!("it holds no desired state while {} does", snapshot.display()),
                    Err(e @ StoreError::Decode { .. }) => e.to_string(),
                    Err(e) => return Err(e),
                }
            }
            Err(OpenFailure::Corrupt(e)) => e.to_string(),
            Err(OpenFailure::Other(e)) => return Err(e),
        };
        let (store, recovered) = Store::recover(dir, cache_bytes, &snapshot, reason)?;
        Ok((store, Some(recovered)))
    }

    fn with_db(db: sled::Db, dir: &Path, snapshot: PathBuf) -> Result<Store, StoreError> {
        let meta = db.open_tree("meta")?;
        Ok(Store {
            reports: Numbered::open(&meta, db.open_tree("reports")?, LAST_REPORT_SEQ_KEY, "report number")?,
            events: Numbered::open(&meta, db.open_tree("events")?, LAST_EVENT_SEQ_KEY, "event number")?,
            meta,
            desired: db.open_tree("desired")?,
            previous: db.open_tree("previous")?,
            rollbacks: db.open_tree("rollbacks")?,
            confirmed: db.open_tree("confirmed")?,
            trust: db.open_tree("trust")?,
            db,
            dir: dir.to_path_buf(),
            snapshot,
            epoch: 0,
            failed: AtomicBool::new(false),
        })
    }

    /// Moves the store at `dir` aside and starts a fresh one with the snapshot's desired state.
    fn recover(
        dir: &Path,
        cache_bytes: u64,
        snapshot: &Path,
        reason: String,
    ) -> Result<(Store, Recovered), StoreError> {
        // Read the snapshot before moving anything: without it the agent would start from nothing.
        let state = match std::fs::read_to_string(snapshot) {
            Ok(text) => Some(DesiredState::parse(&text).map_err(|e| e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(Err(e.to_string())),
        }
        .transpose()
        .map_err(|detail| StoreError::UnreadableSnapshot {
            dir: dir.to_path_buf(),
            reason: reason.clone(),
            snapshot: snapshot.to_path_buf(),
            detail,
        })?;

        let mut moved_to = OsString::from(dir.as_os_str());
        moved_to.push(format!(".corrupt-{}", unix_now().as_secs()));
        let moved_to = PathBuf::from(moved_to);
        std::fs::rename(dir, &moved_to).map_err(|source| StoreError::MoveAside {
            dir: dir.to_path_buf(),
            reason: reason.clone(),
            to: moved_to.clone(),
            source,
        })?;

        let db = open_db(dir, cache_bytes).map_err(|failure| match failure {
            OpenFailure::Corrupt(source) => StoreError::Open { dir: dir.to_path_buf(), source },
            OpenFailure::Other(e) => e,
        })?;
        let mut store = Store::with_db(db, dir, snapshot.to_path_buf())?;
        // A new epoch: the hub counts this store's numbers afresh, apart from the lost one's.
        store.migrate()?;
        if let Some(state) = &state {
            store.set_desired(state)?;
        }
        let restored_generation = state.map(|s| s.generation);
        tracing::error!(
            store = %dir.display(),
            moved_to = %moved_to.display(),
            snapshot = %snapshot.display(),
            restored_generation = ?restored_generation,
            "the store is corrupt ({reason}): moved it aside and started a fresh one"
        );
        Ok((store, Recovered { moved_to, reason, restored_generation }))
    }

    fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        self.meta.get(SCHEMA_VERSION_KEY)?.map(|bytes| decode("schema version", &bytes)).transpose()
    }

    /// Brings a store written by an older agent to `SCHEMA_VERSION`, one version at a time.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let found = self.schema_version()?.unwrap_or(0);
        for version in found..SCHEMA_VERSION {
            match version {
                // Written before the schema had a version, or just created: version 1's layout.
                0 => {}
                // Version 2 numbers reports and events within an epoch. A store from before
                // gets one now and keeps its numbers; the hub restarts its count once.
                1 => {
                    self.meta.insert(EPOCH_KEY, encode(&random_epoch()?))?;
                }
                _ => unreachable!("every version below SCHEMA_VERSION has a step"),
            }
            self.meta.insert(SCHEMA_VERSION_KEY, encode(&(version + 1)))?;
        }
        self.flush()?;
        self.epoch = match self.meta.get(EPOCH_KEY)? {
            Some(bytes) => decode("epoch", &bytes)?,
            None => return Err(StoreError::Decode { what: "epoch", detail: "it is missing".into() }),
        };
        Ok(())
    }

    /// The newest trusted root (root.json bytes, as signed), if one was stored.
    pub fn trusted_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.trust.get(TRUSTED_ROOT_KEY)?.map(|bytes| bytes.to_vec()))
    }

    /// The TUF versions trusted so far: no role may go below them.
    pub fn trusted_versions(&self) -> Result<Versions, StoreError> {
        self.trust
            .get(VERSIONS_KEY)?
            .map(|bytes| decode("trusted versions", &bytes))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Stores a root the caller verified (the first, or a rotation) with the
    /// versions trusted after it, in one flushed transaction.
    pub fn set_trust(&self, root: Option<&[u8]>, versions: &Versions) -> Result<(), StoreError> {
        self.write(|| {
            let versions = encode(versions);
            self.trust
                .transaction(|trust| {
                    if let Some(root) = root {
                        trust.insert(TRUSTED_ROOT_KEY, root)?;
                    }
                    trust.insert(VERSIONS_KEY, versions.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(transaction_error)?;
            self.flush()?;
            Ok(())
        })
    }

    /// Whether a write failed with an I/O error (a full disk). sled then
    /// refuses every write until the process opens it again, also once the
    /// disk has room: the agent stops, and its service manager starts it afresh.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Makes every write so far durable. sled's own flush syncs its log with
    /// `sync_file_range`, which leaves out the file's size and block map, and
    /// writes its blob files (values over a quarter segment) with no sync at
    /// all: a power cut could take an acknowledged write that grew the file
    /// (the power-loss hw-test lost an `applied` event so). Done here, after
    /// sled's flush, not by patching sled to fdatasync in its write path: that
    /// was tried, and made the daemon's memory grow under churn again
    /// (docs/benchmarks.md). The hub's store does the same.
    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        sync_log(&self.dir).map_err(|e| StoreError::Sled(sled::Error::Io(e)))
    }

    fn write<T>(&self, mutation: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = mutation();
        if let Err(StoreError::Sled(sled::Error::Io(_))) = &result {
            self.failed.store(true, Ordering::Relaxed);
        }
        result
    }

    /// This store's epoch: never 0, which stands for "before epochs" in the protocol.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn desired(&self) -> Result<Option<DesiredState>, StoreError> {
        self.desired.get(CURRENT_KEY)?.map(|bytes| decode("desired state", &bytes)).transpose()
    }

    /// Stores a new desired state; Ok(false) when it is the one already stored.
    ///
    /// Refuses a lower generation, and a different state under the same
    /// generation. Keeps, per deployment, the revision a new one replaces
    /// (for rollback); a newer revision of a rolled-back deployment ends its
    /// rollback; a deployment no longer desired takes both with it.
    pub fn set_desired(&self, state: &DesiredState) -> Result<bool, StoreError> {
        self.write(|| {
            let abort = ConflictableTransactionError::Abort;
            let stored = (&self.desired, &self.previous, &self.rollbacks)
                .transaction(|(desired, previous, rollbacks)| {
                    let current = desired.get(CURRENT_KEY)?;
                    let current: Option<DesiredState> =
                        current.map(|bytes| decode("desired state", &bytes)).transpose().map_err(abort)?;
                    if let Some(current) = &current {
                        if state.generation < current.generation {
                            return Err(abort(StoreError::StaleGeneration {
                                current: current.generation,
                                offered: state.generation,
                            }));
                        }
                        if state.generation == current.generation {
                            if state == current {
                                return Ok(false);
                            }
                            return Err(abort(StoreError::ConflictingGeneration { generation: state.generation }));
                        }
                        for old in &current.deployments {
                            match state.deployment(&old.name) {
                                Some(new) if new.revision != old.revision => {
                                    // What the device runs is replaced: the rollback's revision when one is in force.
                                    let running = match rollbacks.get(old.name.as_bytes())? {
                                        Some(bytes) => decode::<Rollback>("rollback", &bytes).map_err(abort)?.to,
                                        None => old.clone(),
                                    };
                                    previous.insert(old.name.as_bytes(), encode(&running))?;
                                }
                                Some(_) => {}
                                None => {
                                    previous.remove(old.name.as_bytes())?;
                                    rollbacks.remove(old.name.as_bytes())?;
                                }
                            }
                        }
                    }
                    for new in &state.deployments {
                        if let Some(bytes) = rollbacks.get(new.name.as_bytes())? {
                            let rollback: Rollback = decode("rollback", &bytes).map_err(abort)?;
                            if new.revision > rollback.from_revision {
                                rollbacks.remove(new.name.as_bytes())?;
                            }
                        }
                    }
                    desired.insert(CURRENT_KEY, encode(state))?;
                    Ok(true)
                })
                .map_err(transaction_error)?;
            if stored {
                self.flush()?;
                let json = serde_json::to_vec_pretty(state).expect("a desired state serializes to JSON");
                write_atomic(&self.snapshot, &json)
                    .map_err(|source| StoreError::WriteSnapshot { path: self.snapshot.clone(), source })?;
            }
            Ok(stored)
        })
    }

    /// The revision the deployment's current one replaced.
    pub fn previous(&self, deployment: &str) -> Result<Option<Deployment>, StoreError> {
        self.previous.get(deployment.as_bytes())?.map(|bytes| decode("previous revision", &bytes)).transpose()
    }

    /// The local rollbacks in force: deployment name -> Rollback.
    pub fn rollbacks(&self) -> Result<BTreeMap<String, Rollback>, StoreError> {
        self.rollbacks
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                Ok((String::from_utf8_lossy(&key).into_owned(), decode("rollback", &value)?))
            })
            .collect()
    }

    pub fn set_rollback(&self, deployment: &str, rollback: &Rollback) -> Result<(), StoreError> {
        self.write(|| {
            self.rollbacks.insert(deployment.as_bytes(), encode(rollback))?;
            self.flush()?;
            Ok(())
        })
    }

    /// Queues a report for the hub under the next report number, which
    /// survives restarts; returns the number. Kept until the hub acknowledges it.
    pub fn push_report(&self, build: impl FnOnce(u64) -> Vec<u8>) -> Result<u64, StoreError> {
        self.write(|| {
            let seq = self.reports.push(&self.meta, build)?;
            self.flush()?;
            Ok(seq)
        })
    }

    /// Queued reports, oldest first, as encoded for the wire.
    pub fn reports(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.reports
            .entries
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                Ok((seq_of(&key), value.to_vec()))
            })
            .collect()
    }

    /// Drops the queued reports up to and including `seq` (the hub has them).
    pub fn ack_reports(&self, seq: u64) -> Result<(), StoreError> {
        self.write(|| {
            self.reports.ack(seq)?;
            self.flush()?;
            Ok(())
        })
    }

    /// The revision of `deployment` that held through its rollback window on
    /// this device, so that a restart of the agent does not judge it again.
    pub fn confirmed(&self, deployment: &str) -> Result<Option<u64>, StoreError> {
        self.confirmed.get(deployment.as_bytes())?.map(|v| decode::<u64>("confirmed revision", &v)).transpose()
    }

    pub fn set_confirmed(&self, deployment: &str, revision: u64) -> Result<(), StoreError> {
        self.write(|| {
            self.confirmed.insert(deployment.as_bytes(), encode(&revision))?;
            self.flush()?;
            Ok(())
        })
    }

    /// The deployment revision whose agent update was last acted on
    /// (installed, found running, or refused): it is not tried again.
    pub fn agent_update_handled(&self) -> Result<Option<UpdateOrigin>, StoreError> {
        let bytes = self.meta.get(AGENT_UPDATE_KEY)?;
        bytes.map(|bytes| decode("agent update", &bytes)).transpose()
    }

    pub fn set_agent_update_handled(&self, origin: &UpdateOrigin) -> Result<(), StoreError> {
        self.write(|| {
            self.meta.insert(AGENT_UPDATE_KEY, encode(origin))?;
            self.flush()?;
            Ok(())
        })
    }

    /// The desired state with each rolled-back deployment replaced by what it
    /// rolled back to. None when there is no desired state.
    pub fn effective(&self) -> Result<Option<DesiredState>, StoreError> {
        // Read, then check the desired state did not change meanwhile, rather
        // than a sled transaction: this runs at every reconcile pass, and
        // sled 0.34 writes to its log and keeps memory for every transaction,
        // read-only ones too (the soak bench saw the agent grow by it). A
        // desired state and its rollbacks stored together are seen together:
        // the second read comes after the rollbacks were read.
        loop {
            let Some(bytes) = self.desired.get(CURRENT_KEY)? else { return Ok(None) };
            let mut state: DesiredState = decode("desired state", &bytes)?;
            for deployment in &mut state.deployments {
                if let Some(rollback) = self.rollbacks.get(deployment.name.as_bytes())? {
                    let rollback: Rollback = decode("rollback", &rollback)?;
                    *deployment = rollback.to;
                }
            }
            if self.desired.get(CURRENT_KEY)?.as_ref() == Some(&bytes) {
                return Ok(Some(state));
            }
        }
    }

    /// Appends an event numbered one above the last one ever handed out (the first is 1).
    pub fn push_event(&self, kind: EventKind) -> Result<Event, StoreError> {
        self.write(|| {
            let mut event = Event { seq: 0, at: unix_now_ms(), kind };
            self.events.push(&self.meta, |seq| {
                event.seq = seq;
                encode(&event)
            })?;
            // A device that never reaches a hub must not fill its disk with
            // events: past the cap the oldest go (their numbers show the gap).
            // Kept events are one run of numbers (acks delete from the front).
            while let Some((oldest, _)) = self.events.entries.first()? {
                let oldest = seq_of(&oldest);
                if event.seq - oldest < MAX_EVENTS {
                    break;
                }
                self.events.entries.remove(oldest.to_be_bytes())?;
            }
            self.flush()?;
            Ok(event)
        })
    }

    /// The number of the oldest event kept, if any.
    pub fn oldest_event(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.events.entries.first()?.map(|(key, _)| seq_of(&key)))
    }

    /// Up to `limit` events numbered above `seq`, oldest first.
    pub fn events_after(&self, seq: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.events
            .entries
            .range((Bound::Excluded(seq.to_be_bytes()), Bound::Unbounded))
            .take(limit)
            .map(|entry| decode("event", &entry?.1))
            .collect()
    }

    /// Deletes events up to and including `seq` (the hub has them).
    pub fn ack_events(&self, seq: u64) -> Result<(), StoreError> {
        self.write(|| {
            self.events.ack(seq)?;
            self.flush()?;
            Ok(())
        })
    }

    /// Bytes the store uses on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

/// An outbox tree (reports, events) keyed by number, big-endian, so that its
/// order is theirs: numbers go up by one and are never handed out twice,
/// across restarts and acks.
///
/// No sled transaction: sled 0.34 keeps memory for each one, and the soak
/// bench saw the agent grow by the two made per report and event. The lock
/// numbers pushes in order; the entry goes in before `meta`'s record of its
/// number, and opening takes the higher of that record and the newest entry,
/// so an abrupt stop between the two inserts does not hand a number out twice.
struct Numbered {
    entries: sled::Tree,
    last_key: &'static [u8],
    last: Mutex<u64>,
}

impl Numbered {
    fn open(
        meta: &sled::Tree,
        entries: sled::Tree,
        last_key: &'static [u8],
        what: &'static str,
    ) -> Result<Numbered, StoreError> {
        let recorded: u64 = meta.get(last_key)?.map(|bytes| decode(what, &bytes)).transpose()?.unwrap_or(0);
        let newest = entries.last()?.map(|(key, _)| seq_of(&key)).unwrap_or(0);
        Ok(Numbered { entries, last_key, last: Mutex::new(recorded.max(newest)) })
    }

    /// Inserts what `build` makes of the next number; the caller flushes.
    fn push(&self, meta: &sled::Tree, build: impl FnOnce(u64) -> Vec<u8>) -> Result<u64, StoreError> {
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let seq = *last + 1;
        self.entries.insert(seq.to_be_bytes(), build(seq))?;
        *last = seq;
        meta.insert(self.last_key, encode(&seq))?;
        Ok(seq)
    }

    /// Deletes the entries up to and including `seq`; the caller flushes.
    fn ack(&self, seq: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for entry in self.entries.range(..=seq.to_be_bytes()) {
            batch.remove(entry?.0);
        }
        Ok(self.entries.apply_batch(batch)?)
    }
}

fn seq_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().unwrap_or([0; 8]))
}

/// Bytes free to this process on the filesystem `path` is (or would be) on;
/// None when that cannot be told.
fn free_bytes(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let stat = nix::sys::statvfs::statvfs(existing).ok()?;
    // u32 on 32-bit targets (armv7).
    #[allow(clippy::useless_conversion)]
    Some(u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size())))
}

fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, OpenFailure> {
    let config = sled::Config::new().path(dir).cache_capacity(cache_bytes).segment_size(segment_size(dir));
    let mut attempt = 1;
    let db = loop {
        match config.open() {
            Err(sled::Error::Io(e)) if is_lock_error(&e) && attempt < LOCK_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(LOCK_RETRY_DELAY);
            }
            result => break result.map_err(|e| classify_open_error(dir, e))?,
        }
    };
    // sled writes `conf` without an fsync, and the segment size in it is what
    // the log must be read with: make it durable before anything is stored.
    sync_conf(dir).map_err(|source| OpenFailure::Other(StoreError::SyncConf { dir: dir.to_path_buf(), source }))?;
    Ok(db)
}

/// The segment size to open `dir` with: sled refuses any but the one a store
/// was created with, which its `conf` records. A store with a log and no
/// readable `conf` is from before SEGMENT_SIZE, which used sled's default.
fn segment_size(dir: &Path) -> usize {
    if let Some(recorded) = std::fs::read(dir.join("conf")).ok().and_then(|conf| recorded_segment_size(&conf)) {
        return recorded;
    }
    let has_log = std::fs::metadata(dir.join("db")).is_ok_and(|db| db.len() > 0);
    if has_log {
        SLED_DEFAULT_SEGMENT_SIZE
    } else {
        SEGMENT_SIZE
    }
}

/// The `segment_size: N` line of a sled `conf` (its text precedes a CRC).
fn recorded_segment_size(conf: &[u8]) -> Option<usize> {
    conf.split(|b| *b == b'\n')
        .find_map(|line| line.strip_prefix(b"segment_size: "))
        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
}

/// fdatasync of sled's log and of its blob files, then of the blob
/// directory, whose new entries are what make the blobs findable.
fn sync_log(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir.join("db"))?.sync_data()?;
    let blobs = dir.join("blobs");
    let mut any = false;
    for entry in std::fs::read_dir(&blobs)? {
        std::fs::File::open(entry?.path())?.sync_data()?;
        any = true;
    }
    if any {
        std::fs::File::open(&blobs)?.sync_all()?;
    }
    Ok(())
}

fn sync_conf(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir.join("conf"))?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

fn classify_open_error(dir: &Path, e: sled::Error) -> OpenFailure {
    use std::io::ErrorKind::{InvalidData, UnexpectedEof};
    match e {
        sled::Error::Io(ref io) if is_lock_error(io) => {
            OpenFailure::Other(StoreError::Locked { dir: dir.to_path_buf() })
        }
        // What sled says about files it cannot make sense of (a damaged `conf` is `Unsupported`).
        sled::Error::Corruption { .. } | sled::Error::Unsupported(_) | sled::Error::ReportableBug(_) => {
            OpenFailure::Corrupt(e)
        }
        sled::Error::Io(ref io) if matches!(io.kind(), UnexpectedEof | InvalidData) => OpenFailure::Corrupt(e),
        source => OpenFailure::Other(StoreError::Open { dir: dir.to_path_buf(), source }),
    }
}

/// sled reports its lock as an `Other` I/O error; its text is how to tell (sled is pinned).
fn is_lock_error(e: &std::io::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

fn transaction_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // The stored types are plain structs with string-keyed maps: their JSON serialization cannot fail.
    serde_json::to_vec(value).expect("stored values serialize to JSON")
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Decode { what, detail: e.to_string() })
}

fn random_epoch() -> Result<u64, StoreError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| StoreError::Random)?;
    Ok(u64::from_le_bytes(bytes).max(1))
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn unix_now_ms() -> u64 {
    unix_now().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE: u64 = 1 << 20;

    fn open(dir: &Path) -> Store {
        let (store, recovered) = Store::open(dir, CACHE).unwrap();
        assert!(recovered.is_none(), "{recovered:?}");
        store
    }

    fn deployment(name: &str, revision: u64) -> Deployment {
        let mut d: Deployment =
            serde_json::from_value(serde_json::json!({ "name": name, "revision": revision })).unwrap();
        d.workloads = vec![serde_json::from_value(
            serde_json::json!({ "name": format!("{name}-w"), "image": format!("{name}:{revision}") }),
        )
        .unwrap()];
        d
    }

    fn state(generation: u64, deployments: &[(&str, u64)]) -> DesiredState {
        DesiredState {
            version: outpost_proto::desired::DESIRED_STATE_VERSION,
            generation,
            deployments: deployments.iter().map(|(name, revision)| deployment(name, *revision)).collect(),
        }
    }

    fn rollback(from_revision: u64, to: Deployment) -> Rollback {
        Rollback { from_revision, to, reason: "crash loop".into() }
    }

    fn applied(generation: u64) -> EventKind {
        EventKind::Applied { generation }
    }

    #[test]
    fn events_past_the_cap_drop_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("store"), 1 << 20).unwrap();
        for generation in 0..MAX_EVENTS + 5 {
            store.push_event(EventKind::Applied { generation }).unwrap();
        }
        let events = store.events_after(0, usize::MAX).unwrap();
        assert_eq!(events.len() as u64, MAX_EVENTS);
        assert_eq!(events[0].seq, 6, "the five oldest were dropped");
    }

    #[test]
    fn reports_are_numbered_across_reopen_and_dropped_when_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let (store, _) = Store::open(&path, 1 << 20).unwrap();
            assert_eq!(store.push_report(|seq| vec![seq as u8]).unwrap(), 1);
            assert_eq!(store.push_report(|seq| vec![seq as u8]).unwrap(), 2);
        }
        let (store, _) = Store::open(&path, 1 << 20).unwrap();
        assert_eq!(store.push_report(|seq| vec![seq as u8]).unwrap(), 3);
        store.ack_reports(2).unwrap();
        assert_eq!(store.reports().unwrap(), vec![(3, vec![3])]);
    }

    #[test]
    fn confirmed_revision_is_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let (store, _) = Store::open(&path, 1 << 20).unwrap();
            assert_eq!(store.confirmed("app").unwrap(), None);
            store.set_confirmed("app", 4).unwrap();
        }
        let (store, _) = Store::open(&path, 1 << 20).unwrap();
        assert_eq!(store.confirmed("app").unwrap(), Some(4));
    }

    #[test]
    fn generation_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("store"));
        assert_eq!(store.desired().unwrap(), None);
        assert!(store.set_desired(&state(5, &[("app", 1)])).unwrap());

        let err = store.set_desired(&state(4, &[("app", 2)])).unwrap_err();
        assert!(matches!(err, StoreError::StaleGeneration { current: 5, offered: 4 }), "{err}");
        assert!(!store.set_desired(&state(5, &[("app", 1)])).unwrap(), "a re-send is a no-op");
        let err = store.set_desired(&state(5, &[("app", 2)])).unwrap_err();
        assert!(matches!(err, StoreError::ConflictingGeneration { generation: 5 }), "{err}");

        assert_eq!(store.desired().unwrap(), Some(state(5, &[("app", 1)])));
        let snapshot = std::fs::read_to_string(dir.path().join("desired.json")).unwrap();
        assert_eq!(DesiredState::parse(&snapshot).unwrap(), state(5, &[("app", 1)]));
    }

    #[test]
    fn previous_revision_is_kept_per_deployment() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("store"));
        store.set_desired(&state(1, &[("app", 1), ("db", 1), ("gone", 1)])).unwrap();
        assert_eq!(store.previous("app").unwrap(), None);

        store.set_desired(&state(2, &[("app", 2), ("db", 1), ("gone", 2)])).unwrap();
        store.set_desired(&state(3, &[("app", 2), ("db", 1)])).unwrap();
        assert_eq!(store.previous("app").unwrap(), Some(deployment("app", 1)));
        assert_eq!(store.previous("db").unwrap(), None, "its revision never changed");
        assert_eq!(store.previous("gone").unwrap(), None, "no longer desired, so nothing to roll back to");

        store.set_desired(&state(4, &[("app", 3), ("db", 1)])).unwrap();
        assert_eq!(store.previous("app").unwrap(), Some(deployment("app", 2)));
    }

    #[test]
    fn rollback_override_is_applied_by_effective_and_cleared_by_a_newer_revision_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("store"));
        assert_eq!(store.effective().unwrap(), None);
        store.set_desired(&state(1, &[("app", 1), ("db", 1)])).unwrap();
        store.set_desired(&state(2, &[("app", 2), ("db", 1)])).unwrap();
        let back = rollback(2, store.previous("app").unwrap().unwrap());
        store.set_rollback("app", &back).unwrap();

        assert_eq!(store.rollbacks().unwrap(), BTreeMap::from([("app".to_string(), back.clone())]));
        assert_eq!(store.effective().unwrap(), Some(state(2, &[("app", 1), ("db", 1)])));
        assert_eq!(store.desired().unwrap(), Some(state(2, &[("app", 2), ("db", 1)])), "desired is untouched");

        store.set_desired(&state(2, &[("app", 2), ("db", 1)])).unwrap();
        store.set_desired(&state(3, &[("app", 2), ("db", 2)])).unwrap();
        assert_eq!(store.effective().unwrap(), Some(state(3, &[("app", 1), ("db", 2)])), "same revision: kept");

        store.set_desired(&state(4, &[("app", 3), ("db", 2)])).unwrap();
        assert!(store.rollbacks().unwrap().is_empty());
        assert_eq!(store.effective().unwrap(), Some(state(4, &[("app", 3), ("db", 2)])));
        assert_eq!(store.previous("app").unwrap(), Some(deployment("app", 1)), "what ran, not the failed revision");
    }

    #[test]
    fn events_are_numbered_from_1_and_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = open(&path);
        assert_eq!(store.push_event(applied(1)).unwrap().seq, 1);
        assert_eq!(store.push_event(applied(2)).unwrap().seq, 2);
        drop(store);

        let store = open(&path);
        assert_eq!(store.push_event(applied(3)).unwrap().seq, 3);
        let events = store.events_after(0, 10).unwrap();
        assert_eq!(
            events.iter().map(|e| (e.seq, e.kind.clone())).collect::<Vec<_>>(),
            [(1, applied(1)), (2, applied(2)), (3, applied(3))]
        );
        assert_eq!(store.events_after(1, 1).unwrap()[0].seq, 2);
        assert!(store.events_after(u64::MAX, 10).unwrap().is_empty());
        assert!(store.size_on_disk().unwrap() > 0);
    }

    #[test]
    fn acked_events_are_deleted_and_their_numbers_not_reused_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = open(&path);
        for generation in 1..=3 {
            store.push_event(applied(generation)).unwrap();
        }
        store.ack_events(2).unwrap();
        assert_eq!(store.events_after(0, 10).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        store.ack_events(3).unwrap();
        assert!(store.events_after(0, 10).unwrap().is_empty());
        drop(store);

        let store = open(&path);
        assert_eq!(store.push_event(applied(4)).unwrap().seq, 4);
    }

    /// An abrupt stop between storing an entry and recording its number.
    #[test]
    fn an_entry_whose_number_was_not_recorded_is_not_numbered_again_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = open(&path);
        store.push_event(applied(1)).unwrap();
        store.push_report(|_| b"r".to_vec()).unwrap();
        store.meta.remove(LAST_EVENT_SEQ_KEY).unwrap();
        store.meta.remove(LAST_REPORT_SEQ_KEY).unwrap();
        store.db.flush().unwrap();
        drop(store);

        let store = open(&path);
        assert_eq!(store.push_event(applied(2)).unwrap().seq, 2);
        assert_eq!(store.push_report(|_| Vec::new()).unwrap(), 2);
    }

    #[test]
    fn pushes_from_many_threads_get_one_number_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("store"));
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..10 {
                        store.push_event(applied(1)).unwrap();
                    }
                });
            }
        });
        let seqs: Vec<u64> = store.events_after(0, 100).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    }

    /// Garbage over sled's files, the two ways sled meets it: refusing to
    /// open (`conf`), or opening an empty database (`db`).
    #[test]
    fn corrupt_store_is_moved_aside_and_the_desired_state_restored_from_the_snapshot() {
        for file in ["conf", "db"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            let store = open(&path);
            store.set_desired(&state(7, &[("app", 3)])).unwrap();
            store.push_event(applied(7)).unwrap();
            let old_epoch = store.epoch();
            drop(store);
            std::fs::write(path.join(file), vec![0xa5; 4096]).unwrap();

            let (store, recovered) = Store::open(&path, CACHE).unwrap();
            let recovered = recovered.unwrap_or_else(|| panic!("garbage over {file} was not noticed"));
            assert_eq!(recovered.restored_generation, Some(7));
            assert!(recovered.moved_to.file_name().unwrap().to_str().unwrap().starts_with("store.corrupt-"));
            assert!(recovered.moved_to.join(file).exists(), "the damaged files are kept to look at");
            assert_eq!(store.desired().unwrap(), Some(state(7, &[("app", 3)])));
            assert_ne!(store.epoch(), old_epoch, "the hub must count the fresh store's numbers afresh");
            drop(store);
            assert!(Store::open(&path, CACHE).unwrap().1.is_none(), "the fresh store opens as it is");
        }
    }

    #[test]
    fn unreadable_desired_state_in_the_store_counts_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = open(&path);
        store.set_desired(&state(7, &[("app", 3)])).unwrap();
        store.desired.insert(CURRENT_KEY, &b"{ not json"[..]).unwrap();
        store.db.flush().unwrap();
        drop(store);

        let (store, recovered) = Store::open(&path, CACHE).unwrap();
        assert!(recovered.unwrap().reason.contains("unreadable desired state"));
        assert_eq!(store.desired().unwrap(), Some(state(7, &[("app", 3)])));
    }

    #[test]
    fn corrupt_store_without_a_snapshot_starts_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        drop(open(&path));
        std::fs::write(path.join("conf"), vec![0xa5; 4096]).unwrap();

        let (store, recovered) = Store::open(&path, CACHE).unwrap();
        assert_eq!(recovered.unwrap().restored_generation, None);
        assert_eq!(store.desired().unwrap(), None);
    }

    #[test]
    fn corrupt_store_is_left_in_place_when_the_snapshot_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        open(&path).set_desired(&state(7, &[("app", 3)])).unwrap();
        std::fs::write(path.join("conf"), vec![0xa5; 4096]).unwrap();
        std::fs::write(dir.path().join("desired.json"), "{ half a docu").unwrap();

        let err = Store::open(&path, CACHE).err().unwrap();
        assert!(matches!(err, StoreError::UnreadableSnapshot { .. }), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "nothing moved");
    }

    #[test]
    fn store_in_use_by_another_process_is_refused_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = open(&path);
        store.set_desired(&state(1, &[("app", 1)])).unwrap();

        let err = Store::open(&path, CACHE).err().unwrap();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert_eq!(store.desired().unwrap(), Some(state(1, &[("app", 1)])));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "store and snapshot, nothing moved");
    }

    #[test]
    fn newer_schema_version_is_refused_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = open(&path);
        store.meta.insert(SCHEMA_VERSION_KEY, encode(&(SCHEMA_VERSION + 1))).unwrap();
        store.db.flush().unwrap();
        drop(store);

        let err = Store::open(&path, CACHE).err().unwrap();
        assert!(matches!(err, StoreError::NewerSchema { found: 3, supported: 2, .. }), "{err}");
        assert!(err.to_string().contains("newer edge-agent"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing moved");
        let again = Store::open(&path, CACHE).err().unwrap();
        assert!(matches!(again, StoreError::NewerSchema { found: 3, .. }), "not stamped over: {again}");
    }

    #[test]
    fn v0_store_without_a_version_is_migrated_and_stamped_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let db = sled::open(&path).unwrap();
        db.open_tree("desired").unwrap().insert(CURRENT_KEY, encode(&state(3, &[("app", 2)]))).unwrap();
        db.flush().unwrap();
        drop(db);

        let store = open(&path);
        assert_eq!(store.schema_version().unwrap(), Some(2));
        assert_eq!(store.desired().unwrap(), Some(state(3, &[("app", 2)])));
        assert_ne!(store.epoch(), 0);
    }

    fn recorded(path: &Path) -> Option<usize> {
        recorded_segment_size(&std::fs::read(path.join("conf")).unwrap())
    }

    #[test]
    fn a_new_store_is_made_with_small_log_segments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        open(&path);
        assert_eq!(recorded(&path), Some(SEGMENT_SIZE));
        assert_eq!(recorded(&path), Some(64 << 10));
    }

    fn store_from_before_small_segments(path: &Path) {
        let db = sled::open(path).unwrap();
        db.open_tree("desired").unwrap().insert(CURRENT_KEY, encode(&state(3, &[("app", 2)]))).unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn a_store_from_before_small_segments_opens_with_its_own_and_keeps_its_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        store_from_before_small_segments(&path);
        assert_eq!(recorded(&path), Some(SLED_DEFAULT_SEGMENT_SIZE));

        let store = open(&path);
        assert_eq!(store.desired().unwrap(), Some(state(3, &[("app", 2)])));
        assert_eq!(recorded(&path), Some(SLED_DEFAULT_SEGMENT_SIZE));
    }

    #[test]
    fn a_store_from_before_small_segments_that_lost_its_conf_in_a_power_cut_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        store_from_before_small_segments(&path);
        std::fs::remove_file(path.join("conf")).unwrap();

        let store = open(&path);
        assert_eq!(store.desired().unwrap(), Some(state(3, &[("app", 2)])));
        assert_eq!(recorded(&path), Some(SLED_DEFAULT_SEGMENT_SIZE));
    }

    #[test]
    fn a_desired_state_over_a_quarter_segment_is_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let names: Vec<String> = (0..400).map(|i| format!("deployment-with-a-long-name-{i}")).collect();
        let big = state(2, &names.iter().map(|n| (n.as_str(), 1)).collect::<Vec<_>>());
        assert!(encode(&big).len() > SEGMENT_SIZE / 4, "the state must go to a blob");
        open(&path).set_desired(&big).unwrap();
        assert!(std::fs::read_dir(path.join("blobs")).unwrap().count() > 0, "sled keeps it in a blob file");
        assert_eq!(open(&path).desired().unwrap(), Some(big));
    }

    #[test]
    fn the_segment_size_is_read_from_a_conf_ending_in_its_checksum() {
        assert_eq!(
            recorded_segment_size(b"segment_size: 65536\nuse_compression: false\nversion: 0.34\nv\x19Q\xfe"),
            Some(65536)
        );
        assert_eq!(recorded_segment_size(b"use_compression: false\n"), None);
        assert_eq!(recorded_segment_size(b"segment_size: x\n"), None);
    }

    #[test]
    fn the_epoch_is_made_once_and_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let epoch = open(&path).epoch();
        assert_ne!(epoch, 0, "0 means an agent from before epochs");
        assert_eq!(open(&path).epoch(), epoch);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(open(&other.path().join("store")).epoch(), epoch, "another store, another epoch");
    }

    #[test]
    fn v1_store_gets_an_epoch_and_keeps_its_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            // The tree holds the database open too: both go before the store opens.
            let db = sled::open(&path).unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.insert(SCHEMA_VERSION_KEY, encode(&1u32)).unwrap();
            meta.insert(LAST_EVENT_SEQ_KEY, encode(&41u64)).unwrap();
            meta.insert(LAST_REPORT_SEQ_KEY, encode(&7u64)).unwrap();
            db.flush().unwrap();
        }

        let store = open(&path);
        assert_eq!(store.schema_version().unwrap(), Some(2));
        assert_ne!(store.epoch(), 0);
        assert_eq!(store.push_event(applied(1)).unwrap().seq, 42);
        assert_eq!(store.push_report(|_| Vec::new()).unwrap(), 8);
    }

    #[test]
    fn the_trusted_root_and_versions_survive_reopen_and_a_versions_update_keeps_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = open(&path);
            assert_eq!((store.trusted_root().unwrap(), store.trusted_versions().unwrap()), (None, Versions::default()));
            let versions = Versions { root: 1, timestamp: 4, snapshot: 3, targets: 2 };
            store.set_trust(Some(b"root-1"), &versions).unwrap();
            store.set_trust(None, &Versions { timestamp: 5, ..versions }).unwrap();
        }
        let store = open(&path);
        assert_eq!(store.trusted_root().unwrap().as_deref(), Some(&b"root-1"[..]));
        assert_eq!(store.trusted_versions().unwrap(), Versions { root: 1, timestamp: 5, snapshot: 3, targets: 2 });
    }
}
