//! Signed deployments: nothing runs on a device unless an operator key of the
//! root's `deployments` role signed it.
//!
//! What is signed is the deployment of a desired state as the agent acts on
//! it (name, revision, rollback window, every workload), in canonical JSON,
//! without its `signatures` and `excluded`: the hub chooses per device which
//! workloads a deployment of higher priority owns, and that can only take
//! workloads away. Each image must be pinned by digest, so the signature
//! covers the image bytes too. See docs/trust.md, "Signed deployments".

use std::collections::BTreeSet;

use outpost_proto::{Deployment, DesiredState};

use crate::canonical::{to_canonical, CanonicalError};
use crate::hex;
use crate::keys::{PublicKey, SigningKey};
use crate::metadata::{RoleType, Root, Signature};

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error(
        "the trusted root has no `deployments` role, so it trusts no deployment: add the operator's deployments \
         keys to it (`ota new-root --deployments-key`, or rotate to a root that has them)"
    )]
    NoRole,
    #[error(
        "deployment {name} revision {revision} is not signed: sign it with a deployments key \
         (`hub apply --key`, `hub set-desired --key`, or `ota sign-desired --key`)"
    )]
    Unsigned { name: String, revision: u64 },
    #[error(
        "deployment {name} revision {revision}: signature by key {keyid} does not verify: the document was altered \
         after signing, or signed by another key"
    )]
    BadSignature { name: String, revision: u64, keyid: String },
    #[error(
        "deployment {name} revision {revision} is signed only by keys the trusted root does not list for \
         deployments ({keyids}): sign it with a deployments key of the root"
    )]
    UnknownKeys { name: String, revision: u64, keyids: String },
    #[error(
        "deployment {name} revision {revision} has {valid} valid signature(s) from deployments keys, below the \
         threshold of {threshold}: have more deployments keys sign it"
    )]
    Threshold { name: String, revision: u64, valid: u32, threshold: u32 },
    #[error(
        "deployment {name} revision {revision}: workload `{workload}` image {image:?} is not pinned by digest, so \
         the signature would not cover the image: write it as image@sha256:... (`hub apply` pins it before signing)"
    )]
    Unpinned { name: String, revision: u64, workload: String, image: String },
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
}

/// The bytes a deployment's signatures cover.
pub fn signed_bytes(deployment: &Deployment) -> Result<Vec<u8>, CanonicalError> {
    let signed = Deployment { signatures: Vec::new(), excluded: Vec::new(), ..deployment.clone() };
    to_canonical(&signed)
}

/// Adds `key`'s signature, replacing an earlier one by the same key. Refuses
/// an image not pinned by digest: the device would refuse it anyway.
pub fn sign_deployment(deployment: &mut Deployment, key: &SigningKey) -> Result<(), DeploymentError> {
    check_pinned(deployment)?;
    let message = signed_bytes(deployment)?;
    let keyid = key.public_key().key_id();
    deployment.signatures.retain(|s| s.keyid != keyid);
    deployment.signatures.push(Signature { keyid, sig: hex::encode(&key.sign(&message)) });
    Ok(())
}

/// Signs every deployment of a desired state.
pub fn sign_desired(state: &mut DesiredState, key: &SigningKey) -> Result<(), DeploymentError> {
    state.deployments.iter_mut().try_for_each(|d| sign_deployment(d, key))
}

/// Checks that a threshold of distinct deployments keys of `root` signed the
/// deployment, and that its images are pinned by digest.
pub fn verify_deployment(deployment: &Deployment, root: &Root) -> Result<(), DeploymentError> {
    let role = root.roles.get(&RoleType::Deployments).ok_or(DeploymentError::NoRole)?;
    let (name, revision) = (deployment.name.clone(), deployment.revision);
    if deployment.signatures.is_empty() {
        return Err(DeploymentError::Unsigned { name, revision });
    }
    let message = signed_bytes(deployment)?;
    let mut valid = BTreeSet::new();
    let mut bad = None;
    let mut unknown = Vec::new();
    for signature in &deployment.signatures {
        let key = role.keyids.contains(&signature.keyid).then(|| root.keys.get(&signature.keyid)).flatten();
        let Some(key) = key else {
            unknown.push(short(&signature.keyid));
            continue;
        };
        let verifies = match (PublicKey::from_hex(&key.public), hex::decode(&signature.sig)) {
            (Ok(public), Some(sig)) => public.verify(&message, &sig),
            _ => false,
        };
        if verifies {
            valid.insert(signature.keyid.as_str());
        } else {
            bad.get_or_insert_with(|| short(&signature.keyid));
        }
    }
    let valid = valid.len() as u32;
    if valid < role.threshold {
        return Err(match (bad, unknown.is_empty()) {
            (Some(keyid), _) => DeploymentError::BadSignature { name, revision, keyid },
            (None, false) if valid == 0 => DeploymentError::UnknownKeys { name, revision, keyids: unknown.join(", ") },
            _ => DeploymentError::Threshold { name, revision, valid, threshold: role.threshold },
        });
    }
    check_pinned(deployment)
}

/// Verifies every deployment of a desired state (see [`verify_deployment`]).
pub fn verify_desired(state: &DesiredState, root: &Root) -> Result<(), DeploymentError> {
    state.deployments.iter().try_for_each(|d| verify_deployment(d, root))
}

/// Whether `image` names its content by digest: `...@sha256:` and 64 hex digits.
pub fn pinned(image: &str) -> bool {
    image.rsplit_once("@sha256:").is_some_and(|(name, digest)| {
        !name.is_empty() && digest.len() == 64 && digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn check_pinned(deployment: &Deployment) -> Result<(), DeploymentError> {
    match deployment.workloads.iter().find(|w| !pinned(&w.image)) {
        None => Ok(()),
        Some(w) => Err(DeploymentError::Unpinned {
            name: deployment.name.clone(),
            revision: deployment.revision,
            workload: w.name.clone(),
            image: w.image.clone(),
        }),
    }
}

/// A key id as errors show it: enough to tell keys apart.
fn short(keyid: &str) -> String {
    format!("{}…", keyid.get(..8).unwrap_or(keyid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_images_with_a_full_sha256_digest_are_pinned() {
        let digest = "a".repeat(64);
        assert!(pinned(&format!("busybox@sha256:{digest}")));
        assert!(pinned(&format!("registry:5000/app:1@sha256:{digest}")));
        assert!(!pinned("busybox:latest"));
        assert!(!pinned(&format!("@sha256:{digest}")));
        assert!(!pinned("busybox@sha256:abcd"));
        assert!(!pinned(&format!("busybox@sha256:{}", "A".repeat(64))));
    }
}
