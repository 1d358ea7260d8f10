//! Signed update metadata from the network: whatever the bytes, the
//! verifier refuses them with an error, never a panic, as a root, as a
//! rotation of a trusted root, and as each role under it.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use ota::metadata::{Key, KeyType, RoleKeys, RoleType, Root, Snapshot, Targets, Timestamp};
use ota::verify::{update_root, verify_role};
use ota::{SigningKey, TrustedState, Versions};

/// A root whose one key signs every role.
fn root() -> &'static Root {
    static ROOT: OnceLock<Root> = OnceLock::new();
    ROOT.get_or_init(|| {
        let (key, _) = SigningKey::generate().expect("a key");
        let id = key.public_key().key_id();
        let role = RoleKeys { keyids: vec![id.clone()], threshold: 1 };
        Root {
            kind: RoleType::Root,
            version: 1,
            expires: SystemTime::now() + Duration::from_secs(3600),
            keys: BTreeMap::from([(id, Key { keytype: KeyType::Ed25519, public: key.public_key().to_hex() })]),
            roles: [RoleType::Root, RoleType::Targets, RoleType::Snapshot, RoleType::Timestamp]
                .into_iter()
                .map(|r| (r, role.clone()))
                .collect(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let now = SystemTime::now();
    let _ = TrustedState::new(data, Versions::default());
    let _ = update_root(root(), data);
    let _ = verify_role::<Targets>(data, root(), now, 0);
    let _ = verify_role::<Snapshot>(data, root(), now, 0);
    let _ = verify_role::<Timestamp>(data, root(), now, 0);
});
