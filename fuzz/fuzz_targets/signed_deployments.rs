//! Signed desired states as a device receives them (JSON or TOML): parsed,
//! canonicalized and verified against an operator root, refused with an
//! error and never a panic, whatever the signatures, floats or keys hold.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use ota::metadata::{Key, KeyType, RoleKeys, RoleType, Root};
use ota::{sign_desired, verify_desired, SigningKey};
use outpost_proto::{sync, DesiredState};

fn root_and_key() -> &'static (Root, SigningKey) {
    static ROOT: OnceLock<(Root, SigningKey)> = OnceLock::new();
    ROOT.get_or_init(|| {
        let key = SigningKey::generate().expect("a key").0;
        let public = key.public_key();
        let id = public.key_id();
        let keys = BTreeMap::from([(id.clone(), Key { keytype: KeyType::Ed25519, public: public.to_hex() })]);
        let one = || RoleKeys { keyids: vec![id.clone()], threshold: 1 };
        let roles = [RoleType::Root, RoleType::Targets, RoleType::Snapshot, RoleType::Timestamp, RoleType::Deployments]
            .into_iter()
            .map(|role| (role, one()))
            .collect();
        let expires = SystemTime::now() + Duration::from_secs(3600);
        (Root { kind: RoleType::Root, version: 1, expires, keys, roles }, key)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mut state) = DesiredState::parse(text) else { return };
    let (root, key) = root_and_key();
    let _ = verify_desired(&state, root);
    // What the operator's tool signs, the device must accept, also after the
    // document went through JSON on its way (`ota sign-desired`, the hub, a
    // JSON sync link): a float or a string that reads back another way would
    // break this.
    if sign_desired(&mut state, key).is_ok() {
        assert!(verify_desired(&state, root).is_ok(), "a document signed here does not verify");
        let json = sync::encode(sync::Encoding::Json, &state);
        let back: DesiredState = sync::decode(&json).expect("a signed state parses back");
        assert!(verify_desired(&back, root).is_ok(), "a signed document does not verify after JSON");
    }
});
