//! TUF-shaped metadata: four roles (root, targets, snapshot, timestamp), each
//! a JSON document `{"signed": {...}, "signatures": [...]}` whose signatures
//! cover the canonical JSON of `signed`. Every role carries its `_type`, a
//! version and an expiry (RFC 3339, UTC, `Z`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::canonical::{to_canonical, CanonicalError};
use crate::hex;
use crate::keys::SigningKey;

/// The file names snapshot and timestamp use to point at the next role.
pub const TARGETS_FILE: &str = "targets.json";
pub const SNAPSHOT_FILE: &str = "snapshot.json";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleType {
    Root,
    Targets,
    Snapshot,
    Timestamp,
    /// The operator's keys for fleet deployments (see [`crate::deployment`]).
    /// Optional in a root: one without it trusts no deployment.
    Deployments,
}

impl fmt::Display for RoleType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoleType::Root => "root",
            RoleType::Targets => "targets",
            RoleType::Snapshot => "snapshot",
            RoleType::Timestamp => "timestamp",
            RoleType::Deployments => "deployments",
        })
    }
}

/// What every role's `signed` object has in common.
pub trait Role: Serialize + DeserializeOwned {
    const TYPE: RoleType;
    fn version(&self) -> u64;
    fn expires(&self) -> SystemTime;
}

/// A signed document: the role and the signatures over its canonical JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed<T> {
    pub signed: T,
    pub signatures: Vec<Signature>,
}

/// Shared with the deployments of a desired state, which `outpost-proto` defines.
pub use outpost_proto::Signature;

impl<T: Serialize> Signed<T> {
    pub fn new(signed: T) -> Self {
        Self { signed, signatures: Vec::new() }
    }

    /// Signs the canonical form of `signed` with `key`, replacing an earlier
    /// signature by the same key so re-signing never duplicates one.
    pub fn sign(&mut self, key: &SigningKey) -> Result<(), CanonicalError> {
        let message = to_canonical(&self.signed)?;
        let keyid = key.public_key().key_id();
        self.signatures.retain(|s| s.keyid != keyid);
        self.signatures.push(Signature { keyid, sig: hex::encode(&key.sign(&message)) });
        Ok(())
    }

    /// The document as pretty JSON, as it is written to a file.
    pub fn to_json(&self) -> Result<Vec<u8>, CanonicalError> {
        Ok(serde_json::to_vec_pretty(self)?)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    #[serde(rename = "_type")]
    pub kind: RoleType,
    pub version: u64,
    #[serde(with = "rfc3339")]
    pub expires: SystemTime,
    /// Key id to public key.
    pub keys: BTreeMap<String, Key>,
    /// Which keys may sign each role, and how many of them must.
    pub roles: BTreeMap<RoleType, RoleKeys>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    /// Always `ed25519`: written out so a future key type is refused, not misread.
    pub keytype: KeyType,
    /// The raw public key, lowercase hex.
    pub public: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    Ed25519,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleKeys {
    pub keyids: Vec<String>,
    pub threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    #[serde(rename = "_type")]
    pub kind: RoleType,
    pub version: u64,
    #[serde(with = "rfc3339")]
    pub expires: SystemTime,
    /// Target name to what it must be.
    pub targets: BTreeMap<String, Target>,
}

/// One installable artifact, bound to everything a device checks before use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The software version, as the vendor names it.
    pub version: String,
    /// Exact length in bytes; also the cap on how much a download may read.
    pub length: u64,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    /// Hardware ids this target may be installed on.
    pub hardware: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    #[serde(rename = "_type")]
    pub kind: RoleType,
    pub version: u64,
    #[serde(with = "rfc3339")]
    pub expires: SystemTime,
    /// `targets.json` to the version this snapshot vouches for.
    pub meta: BTreeMap<String, MetaVersion>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaVersion {
    pub version: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timestamp {
    #[serde(rename = "_type")]
    pub kind: RoleType,
    pub version: u64,
    #[serde(with = "rfc3339")]
    pub expires: SystemTime,
    /// `snapshot.json` to the snapshot this timestamp vouches for.
    pub meta: BTreeMap<String, SnapshotMeta>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub version: u64,
    /// When given, the snapshot's exact length, and the cap on reading it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// When given, the snapshot file's SHA-256, lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

macro_rules! role {
    ($ty:ty, $role:expr) => {
        impl Role for $ty {
            const TYPE: RoleType = $role;
            fn version(&self) -> u64 {
                self.version
            }
            fn expires(&self) -> SystemTime {
                self.expires
            }
        }
    };
}

role!(Root, RoleType::Root);
role!(Targets, RoleType::Targets);
role!(Snapshot, RoleType::Snapshot);
role!(Timestamp, RoleType::Timestamp);

/// Expiry times as RFC 3339 in UTC with a `Z`, whole seconds.
mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_seconds(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339(&text).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not an RFC 3339 UTC time like 2030-01-01T00:00:00Z: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn targets() -> Targets {
        let target =
            Target { version: "1.2.0".into(), length: 3, sha256: "ab".repeat(32), hardware: vec!["rpi4".into()] };
        Targets {
            kind: RoleType::Targets,
            version: 7,
            expires: UNIX_EPOCH + Duration::from_secs(1_900_000_000),
            targets: BTreeMap::from([("os.img".to_string(), target)]),
        }
    }

    #[test]
    fn targets_round_trip_with_an_rfc3339_expiry_and_a_type_tag() {
        let json = serde_json::to_value(targets()).unwrap();
        assert_eq!(json["expires"], "2030-03-17T17:46:40Z");
        assert_eq!(json["_type"], "targets");
        assert_eq!(serde_json::from_value::<Targets>(json).unwrap(), targets());
    }

    #[test]
    fn unknown_fields_are_refused_rather_than_ignored() {
        let mut json = serde_json::to_value(targets()).unwrap();
        json["targets"]["os.img"]["hardwre"] = serde_json::json!(["any"]);
        assert!(serde_json::from_value::<Targets>(json).is_err());
    }

    #[test]
    fn an_expiry_without_a_utc_zone_is_refused() {
        let mut json = serde_json::to_value(targets()).unwrap();
        json["expires"] = "2030-03-17 17:46:40".into();
        assert!(serde_json::from_value::<Targets>(json).is_err());
    }

    #[test]
    fn signing_twice_with_one_key_keeps_one_signature() {
        let (key, _) = SigningKey::generate().unwrap();
        let mut signed = Signed::new(targets());
        signed.sign(&key).unwrap();
        signed.sign(&key).unwrap();
        assert_eq!(signed.signatures.len(), 1);
        assert_eq!(signed.signatures[0].keyid, key.public_key().key_id());
    }
}
