//! The hub's store, the only module that knows sled: devices, their desired
//! states and their events. Values are JSON, so an operator can read them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use outpost_proto::federation::{SiteHold, SiteItem, Upward};
use outpost_proto::sync::WorkloadReport;
use outpost_proto::{DesiredState, Event};

use crate::rollout::{DeploymentRecord, Sent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// sled's default cache is 1 GiB. The hub reads a device's record once per
/// message from it; the rest can wait for the OS page cache. sled can use
/// several times this (docs/benchmarks.md measures the hub with 10,000 devices).
const CACHE_CAPACITY: u64 = 16 << 20;

/// Events kept per device: the newest ones; older ones are deleted as new ones arrive.
const EVENTS_KEPT: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the hub's store failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("the hub's store holds a record it cannot read ({what}): {source}")]
    Corrupt { what: String, source: serde_json::Error },
}

/// What the hub knows of one device. Times are Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Device {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    /// None until the device first connects (an operator may set its labels
    /// or desired state before).
    pub first_seen: Option<u64>,
    pub last_seen: Option<u64>,
    pub online: bool,
    /// The desired-state generation the device reported as stored.
    pub generation: Option<u64>,
    /// The epoch of the device's store, which `report_seq` and `event_seq`
    /// count in; 0 until the device sends one (agents before epochs never do).
    pub epoch: u64,
    /// Highest report sequence number applied; 0 before the first full report.
    pub report_seq: u64,
    /// Highest event sequence number stored, as the device numbers them; 0 before the first event.
    pub event_seq: u64,
    /// Added to the device's event numbers to number its events here: the
    /// events of every epoch stay, one rising sequence, when a new store
    /// starts again at 1.
    pub event_offset: u64,
    /// When the device's numbering last started afresh under a new epoch:
    /// its store was wiped or replaced, or its agent upgraded to one with epochs.
    pub store_reset_at: Option<u64>,
    /// The view missed a report: a full one was requested and until it
    /// arrives `workloads` may be out of date.
    pub stale: bool,
    pub full_report_requested_at: Option<u64>,
    /// The last command id sent to the device.
    pub command_id: u64,
    pub workloads: BTreeMap<String, WorkloadReport>,
    /// Per deployment rolled out to it: the revision sent and how it went.
    pub rollouts: BTreeMap<String, Sent>,
    /// The last desired state the device refused (its signatures did not verify).
    pub refused: Option<Refusal>,
    /// The site hub the device is reached through; none: it connects here.
    pub site: Option<String>,
}

/// What a parent hub knows of one of its site hubs (docs/federation.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Site {
    pub id: String,
    /// The site's link to this hub is up (its presence; its last will says when it goes).
    pub online: bool,
    /// When a batch from the site was last stored.
    pub last_sync: Option<u64>,
    /// The highest item number stored from the site: items up to it are not stored again.
    pub acked_seq: u64,
}

/// A desired state a device refused, and why, from its `refused` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub generation: u64,
    pub reason: String,
}

/// What the rollout engine reads of every device once a second: the
/// device record without its workloads, which it does not need.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct DeviceSummary {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub online: bool,
    pub generation: Option<u64>,
    pub rollouts: BTreeMap<String, Sent>,
}

/// A device refused while `unknown-devices = "hold"`, waiting for an
/// operator. Only a hash of its token is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingDevice {
    pub id: String,
    /// sha256 of the token it presented last, hex.
    pub token_sha256: String,
    pub first_attempt: u64,
    pub last_attempt: u64,
    pub attempts: u64,
}

/// What a one-time enrollment token lets its bearer do: get a certificate
/// for `device`, until `expires` (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollToken {
    pub device: String,
    pub expires: u64,
}

/// Flushes run one at a time, numbered from 1.
#[derive(Default)]
struct Flushes {
    started: AtomicU64,
    /// The number of the last flush that completed.
    done: tokio::sync::Mutex<u64>,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// The store's directory, for `flush`'s fsyncs.
    dir: Arc<PathBuf>,
    flushes: Arc<Flushes>,
    devices: sled::Tree,
    desired: sled::Tree,
    /// Key: device id, `/`, sequence number (big-endian), so a device's events are one ordered range.
    events: sled::Tree,
    /// Devices an operator approved: id -> sha256 (hex) of their token.
    approved: sled::Tree,
    pending: sled::Tree,
    /// Fleet deployments by name: their revisions and rollout.
    deployments: sled::Tree,
    /// One-time enrollment tokens: sha256 (hex) of the token -> `EnrollToken`.
    enroll_tokens: sled::Tree,
    /// A site hub's queue to its parent: item number (big-endian) -> `SiteItem`.
    outbox: sled::Tree,
    /// A parent hub's sites: id -> `Site`.
    sites: sled::Tree,
    /// A site hub's two sources of each device's desired state, which it
    /// composes (site.rs): device id -> `Source`.
    parent_desired: sled::Tree,
    local_desired: sled::Tree,
    /// A site hub's holds on its parent's rollouts: deployment -> `SiteHold`.
    site_holds: sled::Tree,
    /// Every revision of the parent's deployments a site hub received, which
    /// a hold sends back: "name\0" + revision (big-endian) -> `Deployment`.
    parent_revisions: sled::Tree,
    /// Composing a site device's desired state reads and writes several
    /// records; the rollout engine, the parent link and the API all do it.
    composing: Arc<std::sync::Mutex<()>>,
}

/// One source of a site device's desired state: its deployments, and when
/// each last changed (Unix milliseconds), which decides a name in both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Source {
    /// The parent's generation; 0 for the site's own deployments.
    pub generation: u64,
    pub deployments: Vec<outpost_proto::Deployment>,
    pub changed_at: BTreeMap<String, u64>,
    /// Site generation -> the parent generation it held, newest last (a
    /// bounded window): a report of a site generation goes up as the
    /// parent's.
    pub generations: Vec<(u64, u64)>,
    /// Parent source only: the revision of each deployment the device was
    /// last given, and the parent revisions a site hold keeps from it (told
    /// to the parent once each).
    pub passed: BTreeMap<String, u64>,
    pub held: BTreeMap<String, u64>,
}

/// fdatasync of sled's log and blob files, then of the blob directory,
/// whose new entries are what make the blobs findable.
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

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).cache_capacity(CACHE_CAPACITY).open()?;
        Ok(Self {
            devices: db.open_tree("devices")?,
            desired: db.open_tree("desired")?,
            events: db.open_tree("events")?,
            approved: db.open_tree("approved")?,
            pending: db.open_tree("pending")?,
            deployments: db.open_tree("deployments")?,
            enroll_tokens: db.open_tree("enroll_tokens")?,
            outbox: db.open_tree("outbox")?,
            sites: db.open_tree("sites")?,
            parent_desired: db.open_tree("parent_desired")?,
            local_desired: db.open_tree("local_desired")?,
            site_holds: db.open_tree("site_holds")?,
            parent_revisions: db.open_tree("parent_revisions")?,
            composing: Arc::default(),
            db,
            dir: Arc::new(dir.to_path_buf()),
            flushes: Arc::default(),
        })
    }

    /// Makes everything written so far durable: done before acknowledging it
    /// to anyone. Callers that come while a flush runs share the next one.
    ///
    /// sled's own flush syncs its log with `sync_file_range`, which leaves out
    /// the file's size and block map, and its blob files not at all: the
    /// fdatasyncs after it are what keep a write through a power cut (the
    /// agent's store lost an acknowledged write without them). The same as
    /// the agent's store (edge-agent/src/store.rs says why not in sled).
    ///
    /// Not sled's `flush_async`: concurrent calls of it deadlock in 0.34
    /// (spacejam/sled#1308, fixed after the last release).
    pub async fn flush(&self) -> Result<(), StoreError> {
        // A flush numbered above this one starts after our writes.
        let seen = self.flushes.started.load(Ordering::SeqCst);
        let mut done = self.flushes.done.lock().await;
        if *done > seen {
            return Ok(());
        }
        let number = self.flushes.started.fetch_add(1, Ordering::SeqCst) + 1;
        let (db, dir) = (self.db.clone(), self.dir.clone());
        tokio::task::spawn_blocking(move || {
            db.flush()?;
            sync_log(&dir).map_err(sled::Error::Io)
        })
        .await
        .expect("sled's flush does not panic")?;
        *done = number;
        Ok(())
    }

    pub fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        self.devices.get(id)?.map(|bytes| decode(&bytes, id)).transpose()
    }

    /// Every device, by id.
    pub fn devices(&self) -> Result<Vec<Device>, StoreError> {
        self.devices.iter().values().map(|bytes| decode(&bytes?, "a device")).collect()
    }

    pub fn device_summaries(&self) -> Result<Vec<DeviceSummary>, StoreError> {
        self.devices.iter().values().map(|bytes| decode(&bytes?, "a device")).collect()
    }

    /// Changes a device's record atomically, creating it if needed, and
    /// returns what `change` returned. `change` runs again when another
    /// writer got there first, so it must have no side effects.
    pub fn update_device<T>(&self, id: &str, mut change: impl FnMut(&mut Device) -> T) -> Result<T, StoreError> {
        loop {
            let old = self.devices.get(id)?;
            let mut device = match &old {
                Some(bytes) => decode(bytes, id)?,
                None => Device { id: id.to_string(), ..Device::default() },
            };
            let out = change(&mut device);
            if self.devices.compare_and_swap(id, old, Some(encode(&device)))?.is_ok() {
                return Ok(out);
            }
        }
    }

    pub fn desired(&self, id: &str) -> Result<Option<DesiredState>, StoreError> {
        self.desired.get(id)?.map(|bytes| decode(&bytes, id)).transpose()
    }

    /// Every device's desired state, by device id.
    pub fn desired_states(&self) -> Result<Vec<(String, DesiredState)>, StoreError> {
        self.desired
            .iter()
            .map(|entry| {
                let (key, bytes) = entry?;
                let id = String::from_utf8_lossy(&key).into_owned();
                let state = decode(&bytes, &id)?;
                Ok((id, state))
            })
            .collect()
    }

    /// Stores `state` as the device's desired state if `accept` agrees with
    /// the stored one, atomically against other writers; `accept` may run
    /// more than once.
    pub fn replace_desired<E: From<StoreError>>(
        &self,
        id: &str,
        state: &DesiredState,
        mut accept: impl FnMut(Option<&DesiredState>) -> Result<(), E>,
    ) -> Result<(), E> {
        let new = encode(state);
        loop {
            let old = self.desired.get(id).map_err(StoreError::from)?;
            let stored = old.as_ref().map(|bytes| decode::<DesiredState>(bytes, id)).transpose()?;
            accept(stored.as_ref())?;
            if self.desired.compare_and_swap(id, old, Some(new.clone())).map_err(StoreError::from)?.is_ok() {
                return Ok(());
            }
        }
    }

    /// Stores events (keyed by sequence number, so storing one twice keeps
    /// one copy), then deletes those `EVENTS_KEPT` or more below the newest.
    pub fn put_events(&self, id: &str, events: &[Event]) -> Result<(), StoreError> {
        let Some(newest) = events.iter().map(|e| e.seq).max() else { return Ok(()) };
        let mut batch = sled::Batch::default();
        for event in events {
            batch.insert(event_key(id, event.seq), encode(event));
        }
        for key in self.events.range(event_key(id, 0)..=event_key(id, newest.saturating_sub(EVENTS_KEPT))).keys() {
            batch.remove(key?);
        }
        self.events.apply_batch(batch)?;
        Ok(())
    }

    /// Up to `limit` events numbered above `after`, oldest first.
    pub fn events(&self, id: &str, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let Some(start) = after.checked_add(1) else { return Ok(Vec::new()) };
        self.events
            .range(event_key(id, start)..=event_key(id, u64::MAX))
            .values()
            .take(limit)
            .map(|bytes| decode(&bytes?, id))
            .collect()
    }
}

impl Store {
    /// The sha256 (hex) of an approved device's token.
    pub fn approved_token(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.approved.get(id)?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Records an attempt of a held device; true when it is new, or came
    /// with another token than last time.
    pub fn hold(&self, id: &str, token_sha256: &str, now: u64) -> Result<bool, StoreError> {
        let old = self.pending.fetch_and_update(id, |old| {
            let mut pending = match old.map(serde_json::from_slice::<PendingDevice>) {
                Some(Ok(pending)) => pending,
                // Unreadable: start again; it is only a request.
                _ => PendingDevice {
                    id: id.to_string(),
                    token_sha256: String::new(),
                    first_attempt: now,
                    last_attempt: now,
                    attempts: 0,
                },
            };
            token_sha256.clone_into(&mut pending.token_sha256);
            pending.last_attempt = now;
            pending.attempts += 1;
            Some(encode(&pending))
        })?;
        let old = old.and_then(|bytes| serde_json::from_slice::<PendingDevice>(&bytes).ok());
        Ok(old.is_none_or(|old| old.token_sha256 != token_sha256))
    }

    pub fn pending(&self) -> Result<Vec<PendingDevice>, StoreError> {
        self.pending.iter().values().map(|bytes| decode(&bytes?, "a pending device")).collect()
    }

    /// Approves a held device with the token it presented last, in one
    /// transaction; None when it is not pending.
    pub fn approve(&self, id: &str) -> Result<Option<PendingDevice>, StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
        let outcome = (&self.pending, &self.approved).transaction(|(pending, approved)| {
            let Some(bytes) = pending.remove(id)? else { return Ok(None) };
            let record: PendingDevice = decode(&bytes, id).map_err(ConflictableTransactionError::Abort)?;
            approved.insert(id, record.token_sha256.as_bytes())?;
            Ok(Some(record))
        });
        match outcome {
            Ok(record) => Ok(record),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    pub fn put_enroll_token(&self, token_sha256: &str, token: &EnrollToken) -> Result<(), StoreError> {
        self.enroll_tokens.insert(token_sha256, encode(token))?;
        Ok(())
    }

    /// Removes a token and gives what it allowed: whoever takes it first
    /// is the only one to use it.
    pub fn take_enroll_token(&self, token_sha256: &str) -> Result<Option<EnrollToken>, StoreError> {
        self.enroll_tokens.remove(token_sha256)?.map(|bytes| decode(&bytes, "an enrollment token")).transpose()
    }

    pub fn deployment(&self, name: &str) -> Result<Option<DeploymentRecord>, StoreError> {
        self.deployments.get(name)?.map(|bytes| decode(&bytes, name)).transpose()
    }

    pub fn has_deployments(&self) -> Result<bool, StoreError> {
        Ok(!self.deployments.is_empty())
    }

    pub fn deployment_records(&self) -> Result<Vec<DeploymentRecord>, StoreError> {
        self.deployments.iter().values().map(|bytes| decode(&bytes?, "a deployment")).collect()
    }

    /// Changes a deployment atomically (None: no such deployment, or
    /// delete it), like `update_device`; `change` may run more than once.
    pub fn update_deployment<T>(
        &self,
        name: &str,
        mut change: impl FnMut(Option<DeploymentRecord>) -> (Option<DeploymentRecord>, T),
    ) -> Result<T, StoreError> {
        loop {
            let old = self.deployments.get(name)?;
            let record = old.as_ref().map(|bytes| decode(bytes, name)).transpose()?;
            let (new, out) = change(record);
            if self.deployments.compare_and_swap(name, old, new.as_ref().map(encode))?.is_ok() {
                return Ok(out);
            }
        }
    }

    /// Stores a device's desired state as the rollout engine computed it
    /// (its generation is the engine's to choose).
    pub fn put_desired(&self, id: &str, state: &DesiredState) -> Result<(), StoreError> {
        self.desired.insert(id, encode(state))?;
        Ok(())
    }

    /// Queues a device's message for the parent hub, numbered after the
    /// last one queued (numbers never repeat, acknowledged ones included).
    pub fn push_upward(&self, device: &str, message: Upward, at: u64) -> Result<u64, StoreError> {
        let seq = self.db.generate_id()? + 1;
        let item = SiteItem { seq, device: device.to_string(), at, message };
        self.outbox.insert(seq.to_be_bytes(), encode(&item))?;
        Ok(seq)
    }

    /// The oldest queued items, at most `max` of them and about `max_bytes`.
    pub fn upward(&self, max: usize, max_bytes: usize) -> Result<Vec<SiteItem>, StoreError> {
        let mut items = Vec::new();
        let mut bytes = 0;
        for entry in self.outbox.iter().values() {
            let value = entry?;
            if !items.is_empty() && (items.len() == max || bytes + value.len() > max_bytes) {
                break;
            }
            bytes += value.len();
            items.push(decode(&value, "a queued item")?);
        }
        Ok(items)
    }

    /// How many items wait for the parent.
    pub fn upward_len(&self) -> usize {
        self.outbox.len()
    }

    /// Drops the queued items up to `seq`, which the parent stored.
    pub fn ack_upward(&self, seq: u64) -> Result<(), StoreError> {
        while let Some((key, _)) = self.outbox.first()? {
            if u64::from_be_bytes(key.as_ref().try_into().unwrap_or([0; 8])) > seq {
                break;
            }
            self.outbox.remove(key)?;
        }
        Ok(())
    }

    pub fn site(&self, id: &str) -> Result<Option<Site>, StoreError> {
        self.sites.get(id)?.map(|bytes| decode(&bytes, id)).transpose()
    }

    pub fn site_records(&self) -> Result<Vec<Site>, StoreError> {
        self.sites.iter().values().map(|bytes| decode(&bytes?, "a site")).collect()
    }

    /// Changes a site's record, creating it if needed. One writer (the sync
    /// task), so no compare-and-swap.
    pub fn update_site<T>(&self, id: &str, change: impl FnOnce(&mut Site) -> T) -> Result<T, StoreError> {
        let mut site = self.site(id)?.unwrap_or_else(|| Site { id: id.to_string(), ..Site::default() });
        let out = change(&mut site);
        self.sites.insert(id, encode(&site))?;
        Ok(out)
    }

    /// What the parent sent for a device of this site (`parent = true`), or
    /// what the site's own deployments make of it.
    pub fn source(&self, id: &str, parent: bool) -> Result<Option<Source>, StoreError> {
        let tree = if parent { &self.parent_desired } else { &self.local_desired };
        tree.get(id)?.map(|bytes| decode(&bytes, id)).transpose()
    }

    pub fn put_source(&self, id: &str, parent: bool, source: &Source) -> Result<(), StoreError> {
        let tree = if parent { &self.parent_desired } else { &self.local_desired };
        tree.insert(id, encode(source))?;
        Ok(())
    }

    /// Held while a site device's desired state is composed (site.rs).
    pub fn composing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.composing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn site_holds(&self) -> Result<BTreeMap<String, SiteHold>, StoreError> {
        self.site_holds
            .iter()
            .map(|entry| {
                let (name, bytes) = entry?;
                Ok((String::from_utf8_lossy(&name).into_owned(), decode(&bytes, "a site hold")?))
            })
            .collect()
    }

    pub fn put_site_hold(&self, hold: &SiteHold) -> Result<(), StoreError> {
        self.site_holds.insert(&hold.deployment, encode(hold))?;
        Ok(())
    }

    /// False when there was none.
    pub fn remove_site_hold(&self, deployment: &str) -> Result<bool, StoreError> {
        Ok(self.site_holds.remove(deployment)?.is_some())
    }

    /// Keeps a revision of a parent deployment the site received.
    pub fn keep_parent_revision(&self, deployment: &outpost_proto::Deployment) -> Result<(), StoreError> {
        let key = revision_key(&deployment.name, deployment.revision);
        if !self.parent_revisions.contains_key(&key)? {
            self.parent_revisions.insert(key, encode(deployment))?;
        }
        Ok(())
    }

    pub fn parent_revision(&self, name: &str, revision: u64) -> Result<Option<outpost_proto::Deployment>, StoreError> {
        self.parent_revisions.get(revision_key(name, revision))?.map(|b| decode(&b, name)).transpose()
    }

    /// The revisions of a parent deployment the site received, oldest first.
    pub fn parent_revision_numbers(&self, name: &str) -> Result<Vec<u64>, StoreError> {
        let prefix = revision_key(name, 0);
        let prefix = &prefix[..prefix.len() - 8];
        let mut numbers = Vec::new();
        for key in self.parent_revisions.scan_prefix(prefix).keys() {
            let key = key?;
            if let Ok(bytes) = <[u8; 8]>::try_from(&key[prefix.len()..]) {
                numbers.push(u64::from_be_bytes(bytes));
            }
        }
        Ok(numbers)
    }

    /// Forgets a held device's request; false when there was none.
    pub fn reject(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.pending.remove(id)?.is_some())
    }
}

fn revision_key(name: &str, revision: u64) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&revision.to_be_bytes());
    key
}

fn event_key(id: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 9);
    key.extend_from_slice(id.as_bytes());
    key.push(b'/');
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("the hub's records serialize")
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt { what: what.to_string(), source })
}

#[cfg(test)]
mod tests {
    use outpost_proto::EventKind;

    use super::*;

    fn event(seq: u64) -> Event {
        Event { seq, at: seq * 10, kind: EventKind::Applied { generation: seq } }
    }

    #[test]
    fn a_device_record_is_created_on_first_update_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.device("pump-3").unwrap(), None);
            let seq = store.update_device("pump-3", |d| {
                d.report_seq = 4;
                d.report_seq
            });
            assert_eq!(seq.unwrap(), 4);
        }
        let store = Store::open(dir.path()).unwrap();
        let device = store.device("pump-3").unwrap().unwrap();
        assert_eq!((device.id.as_str(), device.report_seq), ("pump-3", 4));
        assert_eq!(store.devices().unwrap(), vec![device]);
    }

    #[test]
    fn an_approved_device_keeps_the_token_it_presented_last_and_leaves_the_pending_list() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.approve("cam-1").unwrap(), None, "not pending");
        assert!(store.hold("cam-1", "aaaa", 10).unwrap(), "new");
        assert!(!store.hold("cam-1", "aaaa", 15).unwrap(), "the same again");
        assert!(store.hold("cam-1", "bbbb", 20).unwrap(), "another token");
        store.hold("cam-2", "cccc", 30).unwrap();
        let pending = store.pending().unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!((pending[0].first_attempt, pending[0].last_attempt, pending[0].attempts), (10, 20, 3));

        assert_eq!(store.approve("cam-1").unwrap().map(|p| p.token_sha256), Some("bbbb".into()));
        assert_eq!(store.approved_token("cam-1").unwrap(), Some("bbbb".into()));
        assert_eq!(store.pending().unwrap().iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["cam-2"]);

        assert!(store.reject("cam-2").unwrap());
        assert!(!store.reject("cam-2").unwrap());
        assert_eq!(store.approved_token("cam-2").unwrap(), None);
    }

    #[test]
    fn events_are_kept_once_per_sequence_number_and_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_events("a", &[event(1), event(2)]).unwrap();
        store.put_events("a", &[event(2), event(3)]).unwrap();
        // A device whose id starts like another's keeps its own events.
        store.put_events("a.b", &[event(1)]).unwrap();
        let seqs = |id, after| store.events(id, after, 100).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs("a", 0), [1, 2, 3]);
        assert_eq!(seqs("a", 2), [3]);
        assert_eq!(seqs("a.b", 0), [1]);
        assert_eq!(seqs("a", u64::MAX), Vec::<u64>::new());
        assert_eq!(store.events("a", 0, 2).unwrap().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_flushes_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut flushes = tokio::task::JoinSet::new();
        for seq in 1..=200 {
            let store = store.clone();
            flushes.spawn(async move {
                store.put_events("a", &[event(seq)]).unwrap();
                store.flush().await.unwrap();
            });
        }
        let all = tokio::time::timeout(std::time::Duration::from_secs(30), flushes.join_all()).await;
        assert!(all.is_ok(), "flushes hung");
        assert_eq!(store.events("a", 0, 1000).unwrap().len(), 200);
    }

    #[test]
    fn old_events_are_deleted_beyond_the_kept_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_events("a", &[event(1), event(2), event(3)]).unwrap();
        store.put_events("a", &[event(EVENTS_KEPT + 2)]).unwrap();
        let seqs = store.events("a", 0, 100).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs, [3, EVENTS_KEPT + 2]);
    }
}
