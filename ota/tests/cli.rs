//! The `ota` binary, run as a user would.

use std::process::Command;

fn ota(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ota")).args(args).output().unwrap()
}

#[test]
fn keygen_writes_a_key_prints_its_id_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("root.der");
    let out = ota(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap();
    let loaded = ota::SigningKey::from_pkcs8(&std::fs::read(&key).unwrap()).unwrap();
    assert_eq!(id.trim(), loaded.public_key().key_id());
    assert!(!ota(&["keygen", "--out", key.to_str().unwrap()]).status.success());
}

#[test]
fn a_root_signed_with_the_cli_verifies_and_a_tampered_copy_does_not() {
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    use ota::metadata::{Key, KeyType, RoleKeys, RoleType, Root, Signed};

    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("key.der");
    assert!(ota(&["keygen", "--out", key_path.to_str().unwrap()]).status.success());
    let public = ota::SigningKey::from_pkcs8(&std::fs::read(&key_path).unwrap()).unwrap().public_key();
    let id = public.key_id();
    let one_key = RoleKeys { keyids: vec![id.clone()], threshold: 1 };
    let roles = [RoleType::Root, RoleType::Targets, RoleType::Snapshot, RoleType::Timestamp];
    let root = Root {
        kind: RoleType::Root,
        version: 1,
        expires: SystemTime::now() + Duration::from_secs(86_400),
        keys: BTreeMap::from([(id, Key { keytype: KeyType::Ed25519, public: public.to_hex() })]),
        roles: roles.into_iter().map(|r| (r, one_key.clone())).collect(),
    };
    let root_path = dir.path().join("root.json");
    std::fs::write(&root_path, Signed::new(root).to_json().unwrap()).unwrap();
    let (root_arg, key_arg) = (root_path.to_str().unwrap(), key_path.to_str().unwrap());

    assert!(!ota(&["verify", "--root", root_arg, "--role", "root", root_arg]).status.success());
    assert!(ota(&["sign", "--key", key_arg, root_arg]).status.success());
    let out = ota(&["verify", "--root", root_arg, "--role", "root", root_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inspect = String::from_utf8(ota(&["inspect", root_arg]).stdout).unwrap();
    assert!(inspect.contains("\"root\"") && inspect.contains("signed by"), "{inspect}");

    let tampered = dir.path().join("tampered.json");
    let text = std::fs::read_to_string(&root_path).unwrap().replace("\"version\": 1", "\"version\": 2");
    std::fs::write(&tampered, text).unwrap();
    let out = ota(&["verify", "--root", root_arg, "--role", "root", tampered.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("below its threshold"));
}
