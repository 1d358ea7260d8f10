//! Images pinned by digest when a deployment is applied: every device of a
//! rollout runs the same image, and a tag moved later changes nothing already
//! rolled out.
//!
//! A tag is resolved the way the agent pulls it: the same accepted media types,
//! the digest of the manifest bytes. A multi-platform index is pinned as the
//! index, so each device still picks its own platform from it.

use std::collections::BTreeMap;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use outpost_proto::workload::{WorkloadSpec, ACCEPTED_MANIFESTS};
use outpost_proto::DeploymentSpec;

/// Connect timeout, and longest silence while reading: an operator is waiting.
const TIMEOUT: Duration = Duration::from_secs(10);

/// How the hub reaches registries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registries {
    /// Registries (`host:port`) spoken to over plain HTTP; all others use HTTPS.
    pub insecure: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("workload {workload:?}: {image:?} is not a valid image reference ({detail})")]
    InvalidReference { workload: String, image: String, detail: String },
    #[error(
        "workload {workload:?}: image {image:?} was not found at registry {registry}: check the repository \
         and tag, and that the image was pushed there"
    )]
    NotFound { workload: String, image: String, registry: String },
    #[error(
        "workload {workload:?}: cannot resolve image {image:?} to a digest: {cause}. Make the registry \
         reachable from the hub (insecure-registries for plain HTTP), or pin the image yourself as \
         image@sha256:..."
    )]
    Unresolved { workload: String, image: String, cause: String },
}

/// Rewrites each workload image that has no digest as `image@sha256:...`,
/// the digest its registry serves for it now; images with a digest are kept
/// as they are, without asking any registry. On error `spec` is unchanged.
pub async fn pin_images(spec: &mut DeploymentSpec, registries: &Registries) -> Result<(), PinError> {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(registries.insecure.clone()),
        connect_timeout: Some(TIMEOUT),
        read_timeout: Some(TIMEOUT),
        ..Default::default()
    });
    // Every reference is checked before any registry is asked.
    let mut unpinned = Vec::new();
    for workload in &spec.workloads {
        let reference: Reference =
            workload.image.parse().map_err(|e: oci_client::ParseError| PinError::InvalidReference {
                workload: workload.name.clone(),
                image: workload.image.clone(),
                detail: e.to_string(),
            })?;
        if reference.digest().is_none() {
            unpinned.push((workload, reference));
        }
    }
    // Image text -> digest, resolved once: two workloads naming one tag get one image.
    let mut digests = BTreeMap::new();
    for (workload, reference) in unpinned {
        if !digests.contains_key(&workload.image) {
            let digest = manifest_digest(&client, &reference).await.map_err(|e| failure(workload, &reference, e))?;
            digests.insert(workload.image.clone(), digest);
        }
    }
    for workload in &mut spec.workloads {
        if let Some(digest) = digests.get(&workload.image) {
            workload.image = format!("{}@{digest}", workload.image);
        }
    }
    Ok(())
}

/// `sha256:...` of the manifest (or index) the registry serves for `reference`.
async fn manifest_digest(client: &Client, reference: &Reference) -> Result<String, OciDistributionError> {
    let (bytes, _) = client.pull_manifest_raw(reference, &RegistryAuth::Anonymous, ACCEPTED_MANIFESTS).await?;
    let hash = ring::digest::digest(&ring::digest::SHA256, &bytes);
    Ok(format!("sha256:{}", hash.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// What the operator should hear: an image that is not there, or a registry
/// that could not tell.
fn failure(workload: &WorkloadSpec, reference: &Reference, error: OciDistributionError) -> PinError {
    let not_found = match &error {
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound)
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        _ => false,
    };
    let (workload, image) = (workload.name.clone(), workload.image.clone());
    if not_found {
        PinError::NotFound { workload, image, registry: reference.resolve_registry().to_string() }
    } else {
        PinError::Unresolved { workload, image, cause: outpost_proto::error_chain(&error) }
    }
}
