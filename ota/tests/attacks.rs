//! One fixture per attack on the update metadata, each with its test. The
//! fixture is a good repository built in memory with fresh keys; each test
//! applies one attack to it and checks the refusal names what went wrong.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ota::metadata::{
    Key, KeyType, MetaVersion, Role, RoleKeys, RoleType, Root, Signed, Snapshot, SnapshotMeta, Target, Targets,
    Timestamp, SNAPSHOT_FILE, TARGETS_FILE,
};
use ota::verify::{check_download, check_received, TrustedState, VerifyError, Versions, CLOCK_SKEW, MAX_TARGETS_SIZE};
use ota::{Digest, SigningKey};

const IMAGE: &[u8] = b"os image v1.2.0";
const HARDWARE: &str = "rpi4";

/// 2025-06-01T00:00:00Z, the fixture's "now".
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_748_736_000)
}

fn expires() -> SystemTime {
    now() + Duration::from_secs(30 * 24 * 3600)
}

fn key() -> SigningKey {
    SigningKey::generate().unwrap().0
}

fn role_keys(keys: &[&SigningKey], threshold: u32) -> RoleKeys {
    RoleKeys { keyids: keys.iter().map(|k| k.public_key().key_id()).collect(), threshold }
}

/// A good repository: root (2 of 3 keys), targets (2 of 2), snapshot and
/// timestamp (1 each), one target for `rpi4`.
struct Repo {
    root_keys: Vec<SigningKey>,
    targets_keys: Vec<SigningKey>,
    snapshot_key: SigningKey,
    timestamp_key: SigningKey,
    root: Signed<Root>,
    targets: Signed<Targets>,
    snapshot: Signed<Snapshot>,
    timestamp: Signed<Timestamp>,
}

impl Repo {
    fn new() -> Self {
        let root_keys = vec![key(), key(), key()];
        let targets_keys = vec![key(), key()];
        let (snapshot_key, timestamp_key) = (key(), key());
        let root = Self::root_for(1, &root_keys, &targets_keys, &snapshot_key, &timestamp_key);
        let target = Target {
            version: "1.2.0".into(),
            length: IMAGE.len() as u64,
            sha256: Digest::of(IMAGE).hex(),
            hardware: vec![HARDWARE.into()],
        };
        let targets = Targets {
            kind: RoleType::Targets,
            version: 1,
            expires: expires(),
            targets: BTreeMap::from([("os.img".to_string(), target)]),
        };
        let snapshot = Snapshot { kind: RoleType::Snapshot, version: 1, expires: expires(), meta: BTreeMap::new() };
        let timestamp = Timestamp { kind: RoleType::Timestamp, version: 1, expires: expires(), meta: BTreeMap::new() };
        let mut repo = Self {
            root: Signed::new(root),
            targets: Signed::new(targets),
            snapshot: Signed::new(snapshot),
            timestamp: Signed::new(timestamp),
            root_keys,
            targets_keys,
            snapshot_key,
            timestamp_key,
        };
        repo.publish();
        repo
    }

    fn root_for(
        version: u64,
        root_keys: &[SigningKey],
        targets_keys: &[SigningKey],
        snapshot_key: &SigningKey,
        timestamp_key: &SigningKey,
    ) -> Root {
        let all = root_keys.iter().chain(targets_keys).chain([snapshot_key, timestamp_key]);
        let keys = all
            .map(|k| (k.public_key().key_id(), Key { keytype: KeyType::Ed25519, public: k.public_key().to_hex() }))
            .collect();
        let root_refs: Vec<_> = root_keys.iter().collect();
        let targets_refs: Vec<_> = targets_keys.iter().collect();
        Root {
            kind: RoleType::Root,
            version,
            expires: expires(),
            keys,
            roles: BTreeMap::from([
                (RoleType::Root, role_keys(&root_refs, 2)),
                (RoleType::Targets, role_keys(&targets_refs, 2)),
                (RoleType::Snapshot, role_keys(&[snapshot_key], 1)),
                (RoleType::Timestamp, role_keys(&[timestamp_key], 1)),
            ]),
        }
    }

    /// Signs every role with its keys, chaining snapshot to targets and
    /// timestamp to snapshot, as a repository publishes a release.
    fn publish(&mut self) {
        resign(&mut self.root, &self.root_keys[..2]);
        resign(&mut self.targets, &self.targets_keys);
        let targets_version = self.targets.signed.version;
        self.snapshot.signed.meta = BTreeMap::from([(TARGETS_FILE.into(), MetaVersion { version: targets_version })]);
        resign(&mut self.snapshot, std::slice::from_ref(&self.snapshot_key));
        let snapshot_bytes = self.snapshot.to_json().unwrap();
        let meta = SnapshotMeta {
            version: self.snapshot.signed.version,
            length: Some(snapshot_bytes.len() as u64),
            sha256: Some(Digest::of(&snapshot_bytes).hex()),
        };
        self.timestamp.signed.meta = BTreeMap::from([(SNAPSHOT_FILE.into(), meta)]);
        resign(&mut self.timestamp, std::slice::from_ref(&self.timestamp_key));
    }

    fn load(&self, stored: Versions, now: SystemTime) -> Result<TrustedState, VerifyError> {
        let mut state = TrustedState::new(&self.root.to_json().unwrap(), stored)?;
        state.update_timestamp(&self.timestamp.to_json().unwrap(), now)?;
        state.update_snapshot(&self.snapshot.to_json().unwrap(), now)?;
        state.update_targets(&self.targets.to_json().unwrap(), now)?;
        Ok(state)
    }
}

fn resign<T: Role>(signed: &mut Signed<T>, keys: &[SigningKey]) {
    signed.signatures.clear();
    for key in keys {
        signed.sign(key).unwrap();
    }
}

#[test]
fn a_good_repository_is_trusted_and_its_target_download_accepted() {
    let repo = Repo::new();
    let state = repo.load(Versions::default(), now()).unwrap();
    let target = state.target("os.img", HARDWARE).unwrap();
    check_download("os.img", target, IMAGE.len() as u64, &Digest::of(IMAGE)).unwrap();
    assert_eq!(state.versions(), Versions { root: 1, timestamp: 1, snapshot: 1, targets: 1 });
}

#[test]
fn a_tampered_byte_in_targets_is_refused() {
    let repo = Repo::new();
    let mut state = repo.load(Versions::default(), now()).unwrap();
    let good = String::from_utf8(repo.targets.to_json().unwrap()).unwrap();
    let tampered = good.replace("\"version\": \"1.2.0\"", "\"version\": \"1.3.0\"");
    assert_ne!(good, tampered);
    let err = state.update_targets(tampered.as_bytes(), now()).unwrap_err();
    assert!(matches!(err, VerifyError::Threshold { role: RoleType::Targets, valid: 0, threshold: 2 }), "{err}");
}

#[test]
fn targets_signed_with_keys_the_root_does_not_name_are_refused() {
    let mut repo = Repo::new();
    resign(&mut repo.targets, &[key(), key()]);
    let err = repo.load(Versions::default(), now()).unwrap_err();
    assert!(matches!(err, VerifyError::Threshold { role: RoleType::Targets, valid: 0, .. }), "{err}");
}

#[test]
fn targets_signed_by_fewer_keys_than_the_threshold_are_refused() {
    let mut repo = Repo::new();
    resign(&mut repo.targets, &repo.targets_keys[..1]);
    let err = repo.load(Versions::default(), now()).unwrap_err();
    assert!(matches!(err, VerifyError::Threshold { role: RoleType::Targets, valid: 1, threshold: 2 }), "{err}");
}

#[test]
fn one_key_signing_twice_counts_once_toward_the_threshold() {
    let mut repo = Repo::new();
    resign(&mut repo.targets, &repo.targets_keys[..1]);
    let duplicate = repo.targets.signatures[0].clone();
    repo.targets.signatures.push(duplicate);
    let err = repo.load(Versions::default(), now()).unwrap_err();
    assert!(matches!(err, VerifyError::Threshold { role: RoleType::Targets, valid: 1, threshold: 2 }), "{err}");
}

#[test]
fn an_expired_timestamp_is_refused() {
    let repo = Repo::new();
    let later = expires() + CLOCK_SKEW + Duration::from_secs(1);
    let err = repo.load(Versions::default(), later).unwrap_err();
    assert!(matches!(err, VerifyError::Expired { role: RoleType::Root, .. }), "{err}");

    let mut repo = Repo::new();
    repo.timestamp.signed.expires = now() - CLOCK_SKEW - Duration::from_secs(1);
    repo.publish();
    let err = repo.load(Versions::default(), now()).unwrap_err();
    assert!(matches!(err, VerifyError::Expired { role: RoleType::Timestamp, .. }), "{err}");
}

#[test]
fn metadata_expired_by_less_than_the_clock_skew_is_accepted() {
    let repo = Repo::new();
    repo.load(Versions::default(), expires() + CLOCK_SKEW - Duration::from_secs(1)).unwrap();
}

#[test]
fn a_device_clock_before_2024_is_reported_as_wrong_not_as_expiry() {
    let repo = Repo::new();
    let unset_clock = UNIX_EPOCH + Duration::from_secs(86_400);
    let err = repo.load(Versions::default(), unset_clock).unwrap_err();
    assert!(matches!(err, VerifyError::ClockWrong { .. }), "{err}");
    assert!(err.to_string().contains("set the clock"), "{err}");
}

#[test]
fn a_rolled_back_targets_version_is_refused() {
    let repo = Repo::new();
    let stored = Versions { root: 1, timestamp: 1, snapshot: 1, targets: 2 };
    let err = repo.load(stored, now()).unwrap_err();
    assert!(matches!(err, VerifyError::Rollback { role: RoleType::Targets, trusted: 2, found: 1 }), "{err}");
}

#[test]
fn a_rolled_back_timestamp_version_is_refused() {
    let repo = Repo::new();
    let stored = Versions { root: 1, timestamp: 5, snapshot: 1, targets: 1 };
    let err = repo.load(stored, now()).unwrap_err();
    assert!(matches!(err, VerifyError::Rollback { role: RoleType::Timestamp, trusted: 5, found: 1 }), "{err}");
}

#[test]
fn a_root_rotated_by_old_and_new_thresholds_is_accepted_and_its_new_keys_trusted() {
    let mut repo = Repo::new();
    let mut state = TrustedState::new(&repo.root.to_json().unwrap(), Versions::default()).unwrap();
    let new_root_keys = vec![key(), key(), key()];
    let new_targets_keys = vec![key(), key()];
    let root = Repo::root_for(2, &new_root_keys, &new_targets_keys, &repo.snapshot_key, &repo.timestamp_key);
    let mut rotated = Signed::new(root);
    for k in repo.root_keys[..2].iter().chain(&new_root_keys[..2]) {
        rotated.sign(k).unwrap();
    }
    state.update_root(&rotated.to_json().unwrap()).unwrap();
    assert_eq!(state.versions().root, 2);

    // The old targets keys no longer count; the new ones do.
    repo.root = rotated;
    repo.root_keys = new_root_keys;
    let old_targets_keys = std::mem::replace(&mut repo.targets_keys, new_targets_keys);
    repo.publish();
    state.update_timestamp(&repo.timestamp.to_json().unwrap(), now()).unwrap();
    state.update_snapshot(&repo.snapshot.to_json().unwrap(), now()).unwrap();
    state.update_targets(&repo.targets.to_json().unwrap(), now()).unwrap();
    resign(&mut repo.targets, &old_targets_keys);
    let err = state.update_targets(&repo.targets.to_json().unwrap(), now()).unwrap_err();
    assert!(matches!(err, VerifyError::Threshold { role: RoleType::Targets, valid: 0, .. }), "{err}");
}

/// A stolen timestamp key that signed a huge version would lock devices out
/// for good; a root rotating the timestamp key lets them start over, and
/// only then (TUF's fast-forward recovery).
#[test]
fn a_timestamp_version_inflated_by_a_stolen_key_is_recovered_by_rotating_the_timestamp_key_only() {
    let mut repo = Repo::new();
    let inflated = Versions { root: 1, timestamp: 1_000_000, snapshot: 1, targets: 1 };
    let rotate = |repo: &Repo, timestamp_key: &SigningKey| {
        let root = Repo::root_for(2, &repo.root_keys, &repo.targets_keys, &repo.snapshot_key, timestamp_key);
        let mut rotated = Signed::new(root);
        resign(&mut rotated, &repo.root_keys[..2]);
        let mut state = TrustedState::new(&repo.root.to_json().unwrap(), inflated).unwrap();
        state.update_root(&rotated.to_json().unwrap()).unwrap();
        (rotated, state)
    };

    // A rotation that keeps the timestamp key keeps the stored version.
    let (_, mut state) = rotate(&repo, &repo.timestamp_key);
    let err = state.update_timestamp(&repo.timestamp.to_json().unwrap(), now()).unwrap_err();
    assert!(matches!(err, VerifyError::Rollback { role: RoleType::Timestamp, trusted: 1_000_000, .. }), "{err}");

    let new_timestamp_key = key();
    let (rotated, mut state) = rotate(&repo, &new_timestamp_key);
    repo.root = rotated;
    repo.timestamp_key = new_timestamp_key;
    repo.publish();
    state.update_timestamp(&repo.timestamp.to_json().unwrap(), now()).unwrap();
    assert_eq!(state.versions().timestamp, 1);
}

#[test]
fn a_rotated_root_not_signed_by_the_old_root_threshold_is_refused() {
    let repo = Repo::new();
    let mut state = TrustedState::new(&repo.root.to_json().unwrap(), Versions::default()).unwrap();
    let new_root_keys = vec![key(), key(), key()];
    let root = Repo::root_for(2, &new_root_keys, &repo.targets_keys, &repo.snapshot_key, &repo.timestamp_key);
    let mut rotated = Signed::new(root);
    for k in repo.root_keys[..1].iter().chain(&new_root_keys) {
        rotated.sign(k).unwrap();
    }
    let err = state.update_root(&rotated.to_json().unwrap()).unwrap_err();
    assert!(matches!(err, VerifyError::Threshold { role: RoleType::Root, valid: 1, threshold: 2 }), "{err}");
    assert_eq!(state.versions().root, 1);
}

#[test]
fn a_rotated_root_not_signed_by_its_own_threshold_is_refused() {
    let repo = Repo::new();
    let mut state = TrustedState::new(&repo.root.to_json().unwrap(), Versions::default()).unwrap();
    let new_root_keys = vec![key(), key(), key()];
    let root = Repo::root_for(2, &new_root_keys, &repo.targets_keys, &repo.snapshot_key, &repo.timestamp_key);
    let mut rotated = Signed::new(root);
    for k in repo.root_keys[..2].iter().chain(&new_root_keys[..1]) {
        rotated.sign(k).unwrap();
    }
    let err = state.update_root(&rotated.to_json().unwrap()).unwrap_err();
    assert!(matches!(err, VerifyError::Threshold { role: RoleType::Root, valid: 1, threshold: 2 }), "{err}");
}

#[test]
fn a_rotated_root_that_skips_a_version_is_refused() {
    let repo = Repo::new();
    let mut state = TrustedState::new(&repo.root.to_json().unwrap(), Versions::default()).unwrap();
    let root = Repo::root_for(3, &repo.root_keys, &repo.targets_keys, &repo.snapshot_key, &repo.timestamp_key);
    let mut rotated = Signed::new(root);
    resign(&mut rotated, &repo.root_keys[..2]);
    let err = state.update_root(&rotated.to_json().unwrap()).unwrap_err();
    assert!(matches!(err, VerifyError::RootVersion { expected: 2, found: 3 }), "{err}");
}

#[test]
fn targets_from_another_release_than_the_snapshot_names_are_refused() {
    let mut repo = Repo::new();
    let release_one_targets = repo.targets.to_json().unwrap();
    repo.targets.signed.version = 2;
    repo.snapshot.signed.version = 2;
    repo.timestamp.signed.version = 2;
    repo.publish();
    let mut state = TrustedState::new(&repo.root.to_json().unwrap(), Versions::default()).unwrap();
    state.update_timestamp(&repo.timestamp.to_json().unwrap(), now()).unwrap();
    state.update_snapshot(&repo.snapshot.to_json().unwrap(), now()).unwrap();
    let err = state.update_targets(&release_one_targets, now()).unwrap_err();
    assert!(
        matches!(err, VerifyError::VersionMismatch { role: RoleType::Targets, expected: 2, found: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_snapshot_other_than_the_one_the_timestamp_names_is_refused() {
    let mut repo = Repo::new();
    let release_one_timestamp = repo.timestamp.to_json().unwrap();
    repo.snapshot.signed.version = 2;
    repo.publish();
    let mut state = TrustedState::new(&repo.root.to_json().unwrap(), Versions::default()).unwrap();
    state.update_timestamp(&release_one_timestamp, now()).unwrap();
    let err = state.update_snapshot(&repo.snapshot.to_json().unwrap(), now()).unwrap_err();
    assert!(matches!(err, VerifyError::HashMismatch { .. }), "{err}");
}

#[test]
fn a_target_for_other_hardware_is_refused() {
    let state = Repo::new().load(Versions::default(), now()).unwrap();
    let err = state.target("os.img", "rpi3").unwrap_err();
    assert!(matches!(err, VerifyError::WrongHardware { .. }), "{err}");
    assert!(matches!(state.target("other.img", HARDWARE), Err(VerifyError::UnknownTarget { .. })));
}

#[test]
fn an_oversized_target_download_is_cut_off_at_its_signed_length() {
    let state = Repo::new().load(Versions::default(), now()).unwrap();
    let target = state.target("os.img", HARDWARE).unwrap();
    check_received("os.img", target, target.length).unwrap();
    let err = check_received("os.img", target, target.length + 1).unwrap_err();
    assert!(matches!(err, VerifyError::Oversized { .. }), "{err}");
    let mut longer = IMAGE.to_vec();
    longer.push(0);
    let err = check_download("os.img", target, longer.len() as u64, &Digest::of(&longer)).unwrap_err();
    assert!(matches!(err, VerifyError::Oversized { .. }), "{err}");
}

#[test]
fn a_target_download_with_another_hash_or_cut_short_is_refused() {
    let state = Repo::new().load(Versions::default(), now()).unwrap();
    let target = state.target("os.img", HARDWARE).unwrap();
    let other = b"os image v6.6.6";
    let err = check_download("os.img", target, other.len() as u64, &Digest::of(other)).unwrap_err();
    assert!(matches!(err, VerifyError::HashMismatch { .. }), "{err}");
    let err = check_download("os.img", target, 3, &Digest::of(&IMAGE[..3])).unwrap_err();
    assert!(matches!(err, VerifyError::Truncated { .. }), "{err}");
}

#[test]
fn an_endless_targets_document_is_refused_before_it_is_parsed() {
    let repo = Repo::new();
    let mut state = TrustedState::new(&repo.root.to_json().unwrap(), Versions::default()).unwrap();
    state.update_timestamp(&repo.timestamp.to_json().unwrap(), now()).unwrap();
    state.update_snapshot(&repo.snapshot.to_json().unwrap(), now()).unwrap();
    let endless = vec![b' '; MAX_TARGETS_SIZE as usize + 1];
    let err = state.update_targets(&endless, now()).unwrap_err();
    assert!(matches!(err, VerifyError::TooLarge { role: RoleType::Targets, .. }), "{err}");
}

#[test]
fn a_targets_document_offered_as_the_snapshot_is_named_as_the_wrong_role() {
    let mut repo = Repo::new();
    // Even signed by the snapshot key, a targets document is not a snapshot.
    resign(&mut repo.targets, std::slice::from_ref(&repo.snapshot_key));
    let targets_bytes = repo.targets.to_json().unwrap();
    let mut state = TrustedState::new(&repo.root.to_json().unwrap(), Versions::default()).unwrap();
    let timestamp = repo.timestamp.signed.meta.get_mut(SNAPSHOT_FILE).unwrap();
    (timestamp.length, timestamp.sha256) = (None, None);
    resign(&mut repo.timestamp, std::slice::from_ref(&repo.timestamp_key));
    state.update_timestamp(&repo.timestamp.to_json().unwrap(), now()).unwrap();
    let err = state.update_snapshot(&targets_bytes, now()).unwrap_err();
    assert!(matches!(err, VerifyError::WrongType { expected: RoleType::Snapshot, found: RoleType::Targets }), "{err}");
}
