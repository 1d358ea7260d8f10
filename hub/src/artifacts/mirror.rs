//! The pull-through mirror: what the site's devices ask of `/v2/` and the
//! cache does not hold is fetched from the image's registry, verified, stored
//! and then served. A site hub with a parent (`[upstream] http`) asks its
//! parent's mirror instead, for images and for `/v1/artifacts` alike, so
//! each blob crosses the WAN once per site (docs/federation.md). A blob is fetched whole before it is served (no
//! streaming to the first client while it arrives), by one task per digest
//! however many devices ask at once; that task is not tied to any request, so
//! a device giving up does not waste what was already fetched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{Certificate, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use ota::Digest;
use outpost_proto::workload::ACCEPTED_MANIFESTS;
use tokio::sync::watch;

use super::{Cache, CacheError};
use crate::config::CacheConfig;

/// A registry that does not connect within this is taken as unreachable, so
/// a device is answered (from the cache, or with an error) before it gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence while reading from a registry.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the mirror cannot serve something; cloned to every waiting request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MirrorError {
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    /// The registry failed, is unreachable, or sent bad content.
    #[error("{0}")]
    Upstream(String),
    /// The hub's own disk failed.
    #[error("{0}")]
    Cache(String),
}

/// The upstream of one repository name, as the mirror resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub registry: String,
    pub repository: String,
}

type Outcome = Option<Result<(), MirrorError>>;

/// Where a missing blob comes from.
enum Source {
    Registry(Upstream),
    /// The parent hub's `/v1/artifacts`, at this base URL.
    Parent(String),
}

pub struct Mirror {
    cache: Cache,
    client: Client,
    /// For the parent's `/v1/artifacts`.
    http: reqwest::Client,
    config: CacheConfig,
    /// The parent hub's HTTP base URL, on a site hub.
    parent: Option<String>,
    /// Blob fetches under way, by digest: later requests wait for the same one.
    inflight: Mutex<HashMap<Digest, watch::Receiver<Outcome>>>,
}

impl Mirror {
    pub fn new(
        cache: Cache,
        config: CacheConfig,
        mut insecure_registries: Vec<String>,
        parent: Option<String>,
        parent_ca: Option<Certificate>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let parent = parent.map(|p| p.trim_end_matches('/').to_string());
        // The parent's mirror is a registry too, spoken to as its URL says.
        if let Some(host) = parent.as_deref().and_then(|p| p.strip_prefix("http://")) {
            insecure_registries.push(host.to_string());
        }
        let mut http = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).read_timeout(READ_TIMEOUT);
        // A parent at https:// shows a certificate of its own CA, which
        // the site knows from `[upstream.tls]`: for blobs, artifacts and manifests alike.
        if let Some(ca) = &parent_ca {
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&ca.data)?);
        }
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure_registries),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            extra_root_certificates: parent_ca.into_iter().collect(),
            ..Default::default()
        });
        let http = http.build()?;
        Ok(Arc::new(Self { cache, client, http, config, parent, inflight: Mutex::new(HashMap::new()) }))
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Where `name` comes from: its first part when that is a registry host
    /// (`127.0.0.1:5000/app`, `docker.io/library/busybox`), else the default registry.
    pub fn upstream(&self, name: &str) -> Result<Upstream, MirrorError> {
        let (first, rest) = name.split_once('/').unwrap_or((name, ""));
        let is_host = first.contains(['.', ':']) || first == "localhost";
        let (registry, repository) = if is_host && !rest.is_empty() {
            (first.to_string(), rest.to_string())
        } else if self.config.default_registry.is_empty() {
            return Err(MirrorError::InvalidName(format!(
                "{name:?} does not start with a registry host (as in 127.0.0.1:5000/app or docker.io/library/busybox) \
                 and the hub has no [cache] default-registry: ask for /v2/REGISTRY/REPOSITORY/..."
            )));
        } else {
            (self.config.default_registry.clone(), name.to_string())
        };
        let allowed = &self.config.upstream_registries;
        if !allowed.is_empty() && !allowed.contains(&registry) {
            return Err(MirrorError::Refused(format!(
                "registry {registry} is not in the hub's [cache] upstream-registries ({}): add it there to mirror it",
                allowed.join(", ")
            )));
        }
        // The parent's mirror takes the registry as the name's first part.
        if let Some(parent) = &self.parent {
            let host = parent.trim_start_matches("http://").trim_start_matches("https://");
            return Ok(Upstream { registry: host.to_string(), repository: format!("{registry}/{repository}") });
        }
        Ok(Upstream { registry, repository })
    }

    /// The bytes and digest of a manifest. By tag: asked of the registry,
    /// else (registry unreachable or failing) the last one it gave. By
    /// digest: from the cache, else the registry.
    pub async fn manifest(&self, name: &str, reference: &str) -> Result<(Vec<u8>, Digest), MirrorError> {
        let upstream = self.upstream(name)?;
        if let Ok(digest) = reference.parse::<Digest>() {
            if let Some(bytes) = self.cache.read_blob(&digest).await.map_err(cache_error)? {
                return Ok((bytes, digest));
            }
            let bytes = self.fetch_manifest(&upstream, reference).await?;
            let actual = Digest::of(&bytes);
            if actual != digest {
                return Err(MirrorError::Upstream(format!(
                    "registry {} sent a manifest for {digest} that hashes to {actual}: refused, not cached",
                    upstream.registry
                )));
            }
            self.cache.insert_bytes(&digest, bytes.clone()).await.map_err(cache_error)?;
            return Ok((bytes, digest));
        }
        match self.fetch_manifest(&upstream, reference).await {
            Ok(bytes) => {
                let digest = Digest::of(&bytes);
                self.cache.insert_bytes(&digest, bytes.clone()).await.map_err(cache_error)?;
                self.cache.set_tag(name, reference, &digest).map_err(cache_error)?;
                Ok((bytes, digest))
            }
            Err(MirrorError::Upstream(why)) => {
                let cached = match self.cache.tag(name, reference) {
                    Some(digest) => self.cache.read_blob(&digest).await.map_err(cache_error)?.map(|b| (b, digest)),
                    None => None,
                };
                match cached {
                    Some((bytes, digest)) => {
                        tracing::warn!("site cache: serving the last known {name}:{reference} ({digest}): {why}");
                        Ok((bytes, digest))
                    }
                    None => Err(MirrorError::Upstream(why)),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn fetch_manifest(&self, upstream: &Upstream, reference: &str) -> Result<Vec<u8>, MirrorError> {
        let image = upstream.reference(reference);
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&image, &RegistryAuth::Anonymous, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| upstream_error(&image, e))?;
        Ok(bytes.to_vec())
    }

    /// Makes sure the blob is in the cache, fetching it from `name`'s registry
    /// once however many requests ask for it at the same time.
    pub async fn ensure_blob(self: &Arc<Self>, name: &str, digest: &Digest) -> Result<(), MirrorError> {
        if self.cache.has(digest) {
            return Ok(());
        }
        let upstream = self.upstream(name)?;
        self.ensure(digest, Source::Registry(upstream)).await
    }

    /// Makes sure an artifact is in the cache: on a site hub, fetched from
    /// the parent once. False when it is missing and there is no parent.
    pub async fn ensure_artifact(self: &Arc<Self>, digest: &Digest) -> Result<bool, MirrorError> {
        if self.cache.has(digest) {
            return Ok(true);
        }
        let Some(parent) = self.parent.clone() else { return Ok(false) };
        self.ensure(digest, Source::Parent(parent)).await.map(|()| true)
    }

    /// The parent's TUF metadata file, fresh; None without a parent.
    pub async fn parent_tuf(&self, file: &str) -> Option<Result<Vec<u8>, MirrorError>> {
        let url = format!("{}/v1/tuf/{file}", self.parent.as_ref()?);
        let fetched = async {
            let response =
                self.http.get(&url).send().await.map_err(|e| MirrorError::Upstream(format!("{url}: {e}")))?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Err(MirrorError::NotFound(format!("the parent hub has no {file}")));
            }
            if !response.status().is_success() {
                return Err(MirrorError::Upstream(format!("{url} answered {}", response.status())));
            }
            let bytes = response.bytes().await.map_err(|e| MirrorError::Upstream(format!("{url}: {e}")))?;
            Ok(bytes.to_vec())
        };
        Some(fetched.await)
    }

    async fn ensure(self: &Arc<Self>, digest: &Digest, source: Source) -> Result<(), MirrorError> {
        let mut outcome = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            // A fetch that just finished removed itself before this lock was taken.
            if self.cache.has(digest) {
                return Ok(());
            }
            inflight
                .entry(*digest)
                .or_insert_with(|| {
                    let (done, outcome) = watch::channel(None);
                    let mirror = self.clone();
                    let digest = *digest;
                    tokio::spawn(async move {
                        let result = match &source {
                            Source::Registry(upstream) => mirror.fetch_blob(upstream, &digest).await,
                            Source::Parent(parent) => mirror.fetch_artifact(parent, &digest).await,
                        };
                        mirror.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&digest);
                        done.send_replace(Some(result));
                    });
                    outcome
                })
                .clone()
        };
        let result = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| MirrorError::Cache("the fetch of the blob stopped without a result".into()))?;
        result.clone().expect("waited for Some")
    }

    async fn fetch_blob(&self, upstream: &Upstream, digest: &Digest) -> Result<(), MirrorError> {
        if let Some(parent) = &self.parent {
            let url = format!("{parent}/v2/{}/blobs/{digest}", upstream.repository);
            return self.fetch_from_parent(&url, digest, "image blob").await;
        }
        let image = upstream.reference("latest");
        let name = digest.to_string();
        tracing::info!("site cache: fetching {name} from {}/{}", upstream.registry, upstream.repository);
        let response =
            self.client.pull_blob_stream(&image, name.as_str()).await.map_err(|e| upstream_error(&image, e))?;
        // The length a registry announces is only checked; the digest decides.
        let length = response.content_length;
        let stream = response.map(|chunk| chunk.map_err(|e| stream_error(&upstream.registry, digest, e)));
        match self.cache.insert(digest, length, stream, false).await {
            Ok(_) => Ok(()),
            Err(e @ (CacheError::Io { .. } | CacheError::TooLarge { .. })) => Err(cache_error(e)),
            Err(e) => Err(MirrorError::Upstream(format!(
                "the blob {name} from registry {} was refused, not cached: {e}",
                upstream.registry
            ))),
        }
    }
}

impl Mirror {
    async fn fetch_artifact(&self, parent: &str, digest: &Digest) -> Result<(), MirrorError> {
        self.fetch_from_parent(&format!("{parent}/v1/artifacts/{digest}"), digest, "artifact").await
    }

    /// Resumable: a cut WAN costs only what was in flight, and a partial
    /// download survives a restart of the site hub (`ota::fetch`). The
    /// parent's HEAD makes it fetch the blob into its own cache first.
    async fn fetch_from_parent(&self, url: &str, digest: &Digest, what: &str) -> Result<(), MirrorError> {
        tracing::info!("site cache: fetching {what} {digest} from the parent hub");
        let upstream = |e: reqwest::Error| MirrorError::Upstream(format!("cannot fetch {url}: {e}"));
        let head = self.http.head(url).send().await.map_err(upstream)?;
        if head.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(MirrorError::NotFound(format!("neither this hub nor its parent has {what} {digest}")));
        }
        let head = head.error_for_status().map_err(upstream)?;
        let length = head
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| MirrorError::Upstream(format!("{url} did not say the artifact's length")))?;
        let dest = self.cache.partial_path(digest);
        let download = ota::Download {
            url: url.to_string(),
            dest: dest.clone(),
            length,
            sha256: *digest,
            max_bytes_per_sec: None,
        };
        ota::fetch(&self.http, &download, ota::RetryPolicy::default())
            .await
            .map_err(|e| MirrorError::Upstream(format!("{what} {digest} from the parent hub: {e}")))?;
        self.cache.adopt(digest, &dest).await.map_err(cache_error)?;
        Ok(())
    }
}

impl Upstream {
    /// `reference` (a tag or a digest) in this repository.
    fn reference(&self, reference: &str) -> Reference {
        if reference.starts_with("sha256:") {
            Reference::with_digest(self.registry.clone(), self.repository.clone(), reference.to_string())
        } else {
            Reference::with_tag(self.registry.clone(), self.repository.clone(), reference.to_string())
        }
    }
}

fn cache_error(e: CacheError) -> MirrorError {
    tracing::error!("site cache: {e}");
    MirrorError::Cache(e.to_string())
}

/// A registry's answer, sorted into "not there" and "could not get it".
fn upstream_error(image: &Reference, error: OciDistributionError) -> MirrorError {
    let not_found = match &error {
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::BlobUnknown
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        _ => false,
    };
    let what = format!("{}/{}", image.registry(), image.repository());
    if not_found {
        MirrorError::NotFound(format!("registry {} has no {what}:{}", image.registry(), reference_part(image)))
    } else {
        MirrorError::Upstream(format!(
            "cannot fetch {what}:{} from its registry: {}",
            reference_part(image),
            outpost_proto::error_chain(&error)
        ))
    }
}

fn reference_part(image: &Reference) -> &str {
    image.digest().or(image.tag()).unwrap_or("")
}

/// oci-client checks a blob's digest as it streams; its verdict says so plainly.
fn stream_error(registry: &str, digest: &Digest, error: std::io::Error) -> CacheError {
    match error.get_ref().and_then(|e| e.downcast_ref::<DigestError>()) {
        Some(DigestError::VerificationError { actual, .. }) => {
            CacheError::Transfer(format!("registry {registry} sent content for {digest} that hashes to {actual}"))
        }
        _ => CacheError::Transfer(format!("registry {registry}: {}", outpost_proto::error_chain(&error))),
    }
}
