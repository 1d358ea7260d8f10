//! One test per attack on a signed deployment, as attacks.rs does for update
//! metadata: a good operator root (a deployments role of two keys, threshold
//! two) and a signed deployment, then one alteration each.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ota::metadata::{Key, KeyType, RoleKeys, RoleType, Root};
use ota::{sign_deployment, verify_deployment, DeploymentError, SigningKey};
use outpost_proto::{Deployment, DesiredState};

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn key() -> SigningKey {
    SigningKey::generate().unwrap().0
}

struct Operator {
    deployment_keys: Vec<SigningKey>,
    root: Root,
}

impl Operator {
    fn new() -> Self {
        let root_key = key();
        let deployment_keys = vec![key(), key()];
        let mut keys = BTreeMap::new();
        for k in std::iter::once(&root_key).chain(&deployment_keys) {
            let public = k.public_key();
            keys.insert(public.key_id(), Key { keytype: KeyType::Ed25519, public: public.to_hex() });
        }
        let one = |k: &SigningKey| RoleKeys { keyids: vec![k.public_key().key_id()], threshold: 1 };
        let roles = BTreeMap::from([
            (RoleType::Root, one(&root_key)),
            (RoleType::Targets, one(&root_key)),
            (RoleType::Snapshot, one(&root_key)),
            (RoleType::Timestamp, one(&root_key)),
            (
                RoleType::Deployments,
                RoleKeys { keyids: deployment_keys.iter().map(|k| k.public_key().key_id()).collect(), threshold: 2 },
            ),
        ]);
        let expires = SystemTime::now() + Duration::from_secs(3600);
        Self { deployment_keys, root: Root { kind: RoleType::Root, version: 1, expires, keys, roles } }
    }

    /// Revision 3 of `app`, signed by both deployments keys.
    fn signed(&self) -> Deployment {
        let mut d = deployment();
        for k in &self.deployment_keys {
            sign_deployment(&mut d, k).unwrap();
        }
        d
    }
}

fn deployment() -> Deployment {
    let doc = format!(
        "version = 1\ngeneration = 1\n[[deployments]]\nname = \"app\"\nrevision = 3\n\
         [[deployments.workloads]]\nname = \"web\"\nimage = \"web@{DIGEST}\"\n[deployments.workloads.resources]\ncpus = 0.5\n\
         [[deployments.workloads]]\nname = \"db\"\nimage = \"db@{DIGEST}\"\n"
    );
    DesiredState::parse(&doc).unwrap().deployments.remove(0)
}

fn refusal(d: &Deployment, root: &Root) -> String {
    let err = verify_deployment(d, root).unwrap_err();
    err.to_string()
}

#[test]
fn a_deployment_signed_by_the_threshold_of_deployments_keys_verifies_also_after_a_json_round_trip() {
    let op = Operator::new();
    let d = op.signed();
    verify_deployment(&d, &op.root).unwrap();
    let json = serde_json::to_string(&d).unwrap();
    verify_deployment(&serde_json::from_str(&json).unwrap(), &op.root).unwrap();
}

// Found by the signed_deployments fuzz target: serde_json without
// float_roundtrip read some 17-digit numbers back one step off, so a
// deployment signed from TOML was refused once it went through JSON.
#[test]
fn a_cpu_quota_with_17_significant_digits_verifies_after_json_and_cbor_round_trips() {
    let op = Operator::new();
    let mut d = deployment();
    d.workloads[0].resources.cpus = Some(27.958190151922622);
    for k in &op.deployment_keys {
        sign_deployment(&mut d, k).unwrap();
    }
    let json = serde_json::to_vec_pretty(&d).unwrap();
    let from_json: Deployment = serde_json::from_slice(&json).unwrap();
    assert_eq!(from_json.workloads[0].resources.cpus, Some(27.958190151922622));
    verify_deployment(&from_json, &op.root).unwrap();
    let cbor = outpost_proto::sync::encode(outpost_proto::sync::Encoding::Cbor, &d);
    verify_deployment(&outpost_proto::sync::decode(&cbor).unwrap(), &op.root).unwrap();
}

#[test]
fn a_workload_whose_image_digest_changed_after_signing_is_refused_naming_the_deployment_and_key() {
    let op = Operator::new();
    let mut d = op.signed();
    d.workloads[0].image = format!("web@sha256:{}", "2".repeat(64));
    let err = refusal(&d, &op.root);
    assert!(err.contains("deployment app revision 3: signature by key"), "{err}");
    assert!(err.contains("altered after signing"), "{err}");
}

#[test]
fn a_changed_cpu_quota_or_revision_is_refused() {
    let op = Operator::new();
    let mut d = op.signed();
    d.workloads[0].resources.cpus = Some(4.0);
    assert!(matches!(verify_deployment(&d, &op.root), Err(DeploymentError::BadSignature { .. })));
    let mut d = op.signed();
    d.revision = 4;
    assert!(matches!(verify_deployment(&d, &op.root), Err(DeploymentError::BadSignature { .. })));
}

#[test]
fn excluding_workloads_keeps_the_signature_valid() {
    let op = Operator::new();
    let mut d = op.signed();
    d.excluded = vec!["db".into()];
    verify_deployment(&d, &op.root).unwrap();
}

#[test]
fn a_deployment_signed_by_keys_the_root_does_not_list_is_refused() {
    let op = Operator::new();
    let mut d = deployment();
    sign_deployment(&mut d, &key()).unwrap();
    sign_deployment(&mut d, &key()).unwrap();
    let err = refusal(&d, &op.root);
    assert!(err.contains("signed only by keys the trusted root does not list"), "{err}");
}

#[test]
fn a_signature_from_the_root_key_does_not_count_for_deployments() {
    // The root key is in the root, but not in the deployments role: another role's key.
    let op = Operator::new();
    let root_keyid = op.root.roles[&RoleType::Root].keyids[0].clone();
    let mut d = deployment();
    sign_deployment(&mut d, &op.deployment_keys[0]).unwrap();
    d.signatures.push(ota::metadata::Signature { keyid: root_keyid, sig: "00".repeat(64) });
    assert!(matches!(verify_deployment(&d, &op.root), Err(DeploymentError::Threshold { valid: 1, threshold: 2, .. })));
}

#[test]
fn below_threshold_is_refused_and_one_key_signing_twice_counts_once() {
    let op = Operator::new();
    let mut d = deployment();
    sign_deployment(&mut d, &op.deployment_keys[0]).unwrap();
    let sig = d.signatures[0].clone();
    d.signatures.push(sig);
    let err = refusal(&d, &op.root);
    assert!(err.contains("1 valid signature(s)") && err.contains("threshold of 2"), "{err}");
}

#[test]
fn an_unsigned_deployment_says_how_to_sign_it() {
    let op = Operator::new();
    let err = refusal(&deployment(), &op.root);
    assert!(err.contains("is not signed") && err.contains("hub apply --key"), "{err}");
}

#[test]
fn a_root_without_a_deployments_role_trusts_no_deployment_and_says_how_to_fix_it() {
    let mut op = Operator::new();
    let d = op.signed();
    op.root.roles.remove(&RoleType::Deployments);
    let err = refusal(&d, &op.root);
    assert!(err.contains("no `deployments` role") && err.contains("ota new-root"), "{err}");
}

#[test]
fn an_image_not_pinned_by_digest_is_neither_signed_nor_verified() {
    let op = Operator::new();
    let mut d = deployment();
    d.workloads[1].image = "db:latest".into();
    let err = sign_deployment(&mut d, &op.deployment_keys[0]).unwrap_err().to_string();
    assert!(err.contains("`db`") && err.contains("not pinned by digest"), "{err}");
    // Signed by hand over the unpinned image: still refused.
    let message = ota::deployment::signed_bytes(&d).unwrap();
    for k in &op.deployment_keys {
        let sig = k.sign(&message).iter().map(|b| format!("{b:02x}")).collect();
        d.signatures.push(ota::metadata::Signature { keyid: k.public_key().key_id(), sig });
    }
    assert!(matches!(verify_deployment(&d, &op.root), Err(DeploymentError::Unpinned { .. })));
}
