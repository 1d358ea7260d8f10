//! A TUF repository on disk, laid out as the hub serves it
//! (`v1/tuf/{timestamp,snapshot,targets}.json`, `v1/tuf/N.root.json`,
//! `v1/artifacts/sha256:<hex>`), with fresh keys, for tests to serve with
//! [`crate::http::StaticServer`] and to attack.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ota::metadata::{
    Key, KeyType, MetaVersion, Role, RoleKeys, RoleType, Root, Signed, Snapshot, SnapshotMeta, Target, Targets,
    Timestamp, SNAPSHOT_FILE, TARGETS_FILE,
};
use ota::{Digest, SigningKey};
use tempfile::TempDir;

pub struct TufRepo {
    dir: TempDir,
    root_key: SigningKey,
    targets_key: SigningKey,
    snapshot_key: SigningKey,
    timestamp_key: SigningKey,
    pub root: Signed<Root>,
    pub targets: Signed<Targets>,
    /// Expiry given to every document signed from now on.
    pub expires: SystemTime,
}

impl TufRepo {
    /// Root version 1, no targets yet, nothing published.
    pub fn new() -> Self {
        let key = || SigningKey::generate().expect("generating a test key").0;
        let (root_key, targets_key, snapshot_key, timestamp_key) = (key(), key(), key(), key());
        let expires = SystemTime::now() + Duration::from_secs(30 * 24 * 3600);
        let all = [&root_key, &targets_key, &snapshot_key, &timestamp_key];
        let keys = all
            .iter()
            .map(|k| (k.public_key().key_id(), Key { keytype: KeyType::Ed25519, public: k.public_key().to_hex() }))
            .collect();
        let one = |k: &SigningKey| RoleKeys { keyids: vec![k.public_key().key_id()], threshold: 1 };
        let root = Root {
            kind: RoleType::Root,
            version: 1,
            expires,
            keys,
            roles: BTreeMap::from([
                (RoleType::Root, one(&root_key)),
                (RoleType::Targets, one(&targets_key)),
                (RoleType::Snapshot, one(&snapshot_key)),
                (RoleType::Timestamp, one(&timestamp_key)),
            ]),
        };
        let mut root = Signed::new(root);
        root.sign(&root_key).unwrap();
        let targets = Targets { kind: RoleType::Targets, version: 0, expires, targets: BTreeMap::new() };
        let dir = tempfile::Builder::new().prefix("outpost-tuf-").tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("v1/tuf")).unwrap();
        std::fs::create_dir_all(dir.path().join("v1/artifacts")).unwrap();
        Self { dir, root_key, targets_key, snapshot_key, timestamp_key, root, targets: Signed::new(targets), expires }
    }

    /// Lists `key` as the root's deployments role and signs root version 1
    /// again, so that one root trusts both updates and deployments, as an
    /// operator's does (docs/trust.md). Before anything is published.
    pub fn trust_deployments(&mut self, key: &SigningKey) {
        let public = key.public_key();
        let root = &mut self.root.signed;
        root.keys.insert(public.key_id(), Key { keytype: KeyType::Ed25519, public: public.to_hex() });
        root.roles.insert(RoleType::Deployments, RoleKeys { keyids: vec![public.key_id()], threshold: 1 });
        self.root.signatures.clear();
        self.root.sign(&self.root_key).unwrap();
    }

    /// The directory to serve.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The root a device starts from (its `trust-root` file).
    pub fn root_json(&self) -> Vec<u8> {
        self.root.to_json().unwrap()
    }

    pub fn artifact_path(&self, content: &[u8]) -> PathBuf {
        self.dir.path().join("v1/artifacts").join(format!("sha256:{}", Digest::of(content).hex()))
    }

    /// Stores `content` as an artifact and lists it as target `name`.
    pub fn add_target(&mut self, name: &str, version: &str, content: &[u8], hardware: &[&str]) {
        std::fs::write(self.artifact_path(content), content).unwrap();
        let target = Target {
            version: version.into(),
            length: content.len() as u64,
            sha256: Digest::of(content).hex(),
            hardware: hardware.iter().map(|h| h.to_string()).collect(),
        };
        self.targets.signed.targets.insert(name.into(), target);
    }

    /// Publishes a release: targets, snapshot and timestamp one version up
    /// from the last, signed and written.
    pub fn publish(&mut self) {
        let version = self.targets.signed.version + 1;
        self.targets.signed.version = version;
        self.targets.signed.expires = self.expires;
        sign(&mut self.targets, &self.targets_key);
        let mut snapshot = Signed::new(Snapshot {
            kind: RoleType::Snapshot,
            version,
            expires: self.expires,
            meta: BTreeMap::from([(TARGETS_FILE.into(), MetaVersion { version })]),
        });
        sign(&mut snapshot, &self.snapshot_key);
        let snapshot_bytes = snapshot.to_json().unwrap();
        let meta = SnapshotMeta {
            version,
            length: Some(snapshot_bytes.len() as u64),
            sha256: Some(Digest::of(&snapshot_bytes).hex()),
        };
        let mut timestamp = Signed::new(Timestamp {
            kind: RoleType::Timestamp,
            version,
            expires: self.expires,
            meta: BTreeMap::from([(SNAPSHOT_FILE.into(), meta)]),
        });
        sign(&mut timestamp, &self.timestamp_key);
        self.write("targets.json", &self.targets.to_json().unwrap());
        self.write("snapshot.json", &snapshot_bytes);
        self.write("timestamp.json", &timestamp.to_json().unwrap());
    }

    /// Publishes root version N+1 (same keys, new expiry) as `N+1.root.json`,
    /// signed by the root key, as a rotation.
    pub fn rotate_root(&mut self) {
        self.root.signed.version += 1;
        self.root.signed.expires = self.expires;
        sign(&mut self.root, &self.root_key);
        let name = format!("{}.root.json", self.root.signed.version);
        self.write(&name, &self.root.to_json().unwrap());
    }

    /// Every metadata file as served now, to serve again later (a replay).
    pub fn metadata_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = self.dir.path().join("v1/tuf");
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(p).unwrap()))
            .collect()
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.path().join("v1/tuf").join(name), bytes).unwrap();
    }
}

impl Default for TufRepo {
    fn default() -> Self {
        Self::new()
    }
}

fn sign<T: Role>(signed: &mut Signed<T>, key: &SigningKey) {
    signed.signatures.clear();
    signed.sign(key).unwrap();
}
