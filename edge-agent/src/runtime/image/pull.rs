//! Pulling from an OCI distribution registry.
//!
//! oci-client's `pull()` holds every layer in memory; instead we fetch the
//! manifest, then stream each blob into `partial/<hex>` and hash it as it
//! arrives. A dropped connection resumes with an HTTP Range request from the
//! bytes already on disk, also in a later process: the partial file is kept
//! and fsync'd as it grows.
//!
//! With a registry mirror (the site's hub), an image is asked of it first as
//! `MIRROR/v2/REGISTRY/REPOSITORY/...`: the image's registry host is the first
//! part of the name, so one mirror serves every registry with a standard
//! client. When the mirror fails, the image's registry is asked; blobs the
//! mirror already delivered stay, and what is partial resumes from there.

use std::io::{Read, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{Descriptor, ImageManifest};
use ota::{Digest, Hasher};
use outpost_proto::workload::ACCEPTED_MANIFESTS;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::error::IoContext;
use super::index;
use super::oci::{self, Manifest};
use super::store::sync_dir;
use super::{Image, ImageError, ImageStore};

/// fsync a growing partial download this often, so a crash loses little.
const SYNC_EVERY: u64 = 4 << 20;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries (`host:port`) spoken to over plain HTTP; all others use HTTPS.
    pub insecure_registries: Vec<String>,
    /// Failed requests retried in a row before giving up; an attempt that
    /// downloaded something resets the count.
    pub retries: u32,
    /// Wait before the first retry; doubles each time, up to 30 s.
    pub backoff: Duration,
    /// Connect timeout, and longest silence while reading.
    pub timeout: Duration,
    /// `http://HOST[:PORT]` or `https://...` of a mirror asked first.
    pub registry_mirror: Option<String>,
}

/// The `host:port` of a registry mirror's URL, and whether it speaks plain HTTP.
pub fn mirror_host(url: &str) -> Result<(String, bool), String> {
    let wrong = || format!("registry-mirror {url:?} must be http://HOST[:PORT] or https://HOST[:PORT], without a path");
    let (insecure, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (true, rest),
        (_, Some(rest)) => (false, rest),
        _ => return Err(wrong()),
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', '@', ' ', '?', '#']) {
        return Err(wrong());
    }
    Ok((host.to_string(), insecure))
}

/// `reference` as the mirror at `host` names it: the registry becomes the
/// first part of the repository.
fn via_mirror(reference: &Reference, host: &str) -> Reference {
    let (host, repository) = (host.to_string(), format!("{}/{}", reference.registry(), reference.repository()));
    match (reference.tag(), reference.digest()) {
        (Some(tag), Some(digest)) => Reference::with_tag_and_digest(host, repository, tag.into(), digest.into()),
        (None, Some(digest)) => Reference::with_digest(host, repository, digest.into()),
        (tag, None) => Reference::with_tag(host, repository, tag.unwrap_or("latest").into()),
    }
}

/// Whether the image's own registry may succeed where the mirror failed.
fn worth_the_registry(error: &ImageError) -> bool {
    matches!(
        error,
        ImageError::NotFound { .. }
            | ImageError::Unauthorized { .. }
            | ImageError::RegistryUnreachable { .. }
            | ImageError::Registry { .. }
            | ImageError::DownloadFailed { .. }
            | ImageError::DigestMismatch { .. }
            | ImageError::SizeMismatch { .. }
    )
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            retries: 5,
            backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(30),
            registry_mirror: None,
        }
    }
}

/// Reports a pull as it goes. Blobs are named by digest.
pub trait PullProgress: Send + Sync {
    /// A download (re)starts at `resumed_from` bytes of `total`.
    fn blob_started(&self, _digest: &str, _resumed_from: u64, _total: u64) {}
    fn blob_progress(&self, _digest: &str, _done: u64, _total: u64) {}
    /// The blob is complete and verified (or was already stored).
    fn blob_done(&self, _digest: &str, _total: u64) {}
    /// A request failed; the pull retries after `wait`.
    fn retrying(&self, _what: &str, _attempt: u32, _wait: Duration, _error: &ImageError) {}
    /// A layer blob is being unpacked.
    fn unpacking(&self, _digest: &str) {}
}

/// Progress reports dropped.
pub struct NoProgress;

impl PullProgress for NoProgress {}

impl ImageStore {
    /// Pulls `reference` (by tag or by digest), stores and unpacks it, and
    /// records it in the index. A tag is resolved to a digest now.
    pub async fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<Image, ImageError> {
        let parsed = index::parse_reference(reference)?;
        let store = self.clone();
        let _lock = tokio::task::spawn_blocking(move || store.lock_shared())
            .await
            .expect("locking the store does not panic")?;
        if let Some(mirror) = &opts.registry_mirror {
            let (host, insecure) = mirror_host(mirror)
                .map_err(|detail| ImageError::InvalidReference { reference: reference.to_string(), detail })?;
            let mut mirror_opts = opts.clone();
            if insecure {
                mirror_opts.insecure_registries.push(host.clone());
            }
            let puller = Puller {
                store: self,
                client: client(&mirror_opts),
                source: via_mirror(&parsed, &host),
                at_mirror: true,
                registry: host,
                reference: parsed.clone(),
                opts: &mirror_opts,
                progress,
            };
            match puller.run().await {
                Err(e) if worth_the_registry(&e) => {
                    tracing::warn!("registry mirror {mirror}: {e}; pulling {reference} from its registry");
                }
                done => return done,
            }
        }
        Puller {
            store: self,
            client: client(opts),
            registry: parsed.registry().to_string(),
            source: parsed.clone(),
            at_mirror: false,
            reference: parsed,
            opts,
            progress,
        }
        .run()
        .await
    }
}

fn client(opts: &PullOptions) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(opts.insecure_registries.clone()),
        connect_timeout: Some(opts.timeout),
        read_timeout: Some(opts.timeout),
        ..Default::default()
    })
}

struct Puller<'a> {
    store: &'a ImageStore,
    client: Client,
    /// The image as it is recorded.
    reference: Reference,
    /// Where it is asked for: the reference itself, or its name at a mirror.
    source: Reference,
    /// A mirror that cannot be reached is left at once for the registry; one
    /// that answers slowly is retried as a registry would be, since it may be
    /// fetching a large blob for the whole site.
    at_mirror: bool,
    registry: String,
    opts: &'a PullOptions,
    progress: &'a dyn PullProgress,
}

/// A failed request, and whether trying again may help.
struct Failure {
    error: ImageError,
    transient: bool,
}

impl From<ImageError> for Failure {
    fn from(error: ImageError) -> Self {
        Self { error, transient: false }
    }
}

impl Puller<'_> {
    async fn run(&self) -> Result<Image, ImageError> {
        let whole = self.reference.whole();
        let (bytes, digest) = self.manifest(&self.source).await?;
        let (bytes, digest, manifest) = match oci::parse_manifest(&bytes, &whole)? {
            Manifest::Image(manifest) => (bytes, digest, manifest),
            Manifest::Index(index) => {
                let entry = oci::descriptor_digest(oci::select_platform(&index, &whole)?)?;
                let (bytes, digest) = self.manifest(&self.source.clone_with_digest(entry.to_string())).await?;
                if digest != entry {
                    return Err(ImageError::DigestMismatch { blob: entry.to_string(), actual: digest.to_string() });
                }
                match oci::parse_manifest(&bytes, &whole)? {
                    Manifest::Image(manifest) => (bytes, digest, manifest),
                    Manifest::Index(_) => {
                        return Err(ImageError::MalformedImage {
                            what: whole,
                            detail: "its index points at another index".to_string(),
                        })
                    }
                }
            }
        };

        self.fetch_blob(manifest.config()).await?;
        for layer in manifest.layers() {
            self.fetch_blob(layer).await?;
        }
        self.unpack_layers(&manifest, &whole).await?;
        self.store.write_blob(&digest, &bytes)?;
        self.store.record(&whole, &digest)?;
        self.store.load_image(&whole, &digest.to_string())
    }

    /// A manifest's bytes and digest, checked against the reference's digest if it has one.
    async fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, Digest), ImageError> {
        let what = format!("manifest of {}", reference.whole());
        let (bytes, _) = self
            .retry(&what, || async {
                self.client
                    .pull_manifest_raw(reference, &RegistryAuth::Anonymous, ACCEPTED_MANIFESTS)
                    .await
                    .map_err(|e| self.classify(e))
            })
            .await?;
        let digest = Digest::of(&bytes);
        if let Some(expected) = reference.digest() {
            if expected != digest.to_string() {
                return Err(ImageError::DigestMismatch { blob: expected.to_string(), actual: digest.to_string() });
            }
        }
        Ok((bytes.to_vec(), digest))
    }

    /// Runs `request` until it succeeds, fails for good, or fails
    /// `opts.retries` more times with backoff.
    async fn retry<T, F, Fut>(&self, what: &str, mut request: F) -> Result<T, ImageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut failures = 0;
        loop {
            match request().await {
                Ok(value) => return Ok(value),
                Err(Failure { error, transient: false }) => return Err(error),
                Err(Failure { error: error @ ImageError::RegistryUnreachable { .. }, .. }) if self.at_mirror => {
                    return Err(error)
                }
                Err(Failure { error, .. }) if failures >= self.opts.retries => return Err(error),
                Err(Failure { error, .. }) => {
                    failures += 1;
                    let wait = self.backoff(failures);
                    self.progress.retrying(what, failures, wait, &error);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        self.opts.backoff.saturating_mul(1 << (failures - 1).min(16)).min(MAX_BACKOFF)
    }

    /// Downloads a blob into the store unless it is there, resuming what an
    /// earlier attempt (or process) left in `partial/`.
    async fn fetch_blob(&self, desc: &Descriptor) -> Result<(), ImageError> {
        let digest = oci::descriptor_digest(desc)?;
        let name = digest.to_string();
        let size = desc.size();
        if self.store.has_blob(&digest) {
            self.progress.blob_done(&name, size);
            return Ok(());
        }
        let path = self.store.partial_path(&digest);
        let (lock, hasher) = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open_partial(&path))
                .await
                .expect("opening a partial download does not panic")?
        };
        // Another process may have finished it while we waited for the lock.
        if self.store.has_blob(&digest) {
            self.progress.blob_done(&name, size);
            return Ok(());
        }
        let mut file = tokio::fs::File::from_std(lock.try_clone().at(&path)?);
        file.seek(SeekFrom::End(0)).await.at(&path)?;
        let mut download = Download { file, hasher, path: path.clone(), name: name.clone(), size };
        if download.hasher.byte_count() > size {
            download.restart().await?;
        }

        let mut failures = 0;
        loop {
            let before = download.hasher.byte_count();
            match self.attempt(&mut download).await {
                Ok(()) => break,
                Err(Failure { error, transient: false }) => {
                    if matches!(error, ImageError::DigestMismatch { .. } | ImageError::SizeMismatch { .. }) {
                        // Resuming bad content cannot make it good.
                        drop(std::fs::remove_file(&path));
                    }
                    return Err(error);
                }
                Err(Failure { error, .. }) => {
                    if download.hasher.byte_count() > before {
                        failures = 0;
                    }
                    if failures >= self.opts.retries {
                        return Err(ImageError::DownloadFailed {
                            blob: name,
                            registry: self.registry.clone(),
                            attempts: failures + 1,
                            detail: error.to_string(),
                        });
                    }
                    failures += 1;
                    let wait = self.backoff(failures);
                    self.progress.retrying(&name, failures, wait, &error);
                    tokio::time::sleep(wait).await;
                }
            }
        }

        let Download { file, hasher, .. } = download;
        file.sync_all().await.at(&path)?;
        let actual = hasher.finish();
        if actual != digest {
            drop(std::fs::remove_file(&path));
            return Err(ImageError::DigestMismatch { blob: name, actual: actual.to_string() });
        }
        self.store.install_blob(&path, &digest)?;
        sync_dir(&self.store.partial_dir())?;
        drop(lock);
        self.progress.blob_done(&name, size);
        Ok(())
    }

    /// One request for the rest of a blob.
    async fn attempt(&self, download: &mut Download) -> Result<(), Failure> {
        let offset = download.hasher.byte_count();
        if offset < download.size {
            let layer = download.name.as_str();
            let stream = if offset == 0 {
                self.client.pull_blob_stream(&self.source, layer).await.map_err(|e| self.classify(e))?
            } else {
                match self
                    .client
                    .pull_blob_stream_partial(&self.source, layer, offset, None)
                    .await
                    .map_err(|e| self.classify(e))?
                {
                    BlobResponse::Partial(stream) => stream,
                    // The registry ignored the Range: take the whole blob from the start.
                    BlobResponse::Full(stream) => {
                        download.restart().await?;
                        stream
                    }
                }
            };
            self.progress.blob_started(&download.name, download.hasher.byte_count(), download.size);
            let received = self.receive(download, stream).await;
            download.file.flush().await.at(&download.path)?;
            received?;
        }
        if download.hasher.byte_count() < download.size {
            return Err(Failure {
                error: ImageError::Registry {
                    registry: self.registry.clone(),
                    detail: format!("the download of {} ended early", download.name),
                },
                transient: true,
            });
        }
        Ok(())
    }

    async fn receive(&self, download: &mut Download, mut stream: SizedStream) -> Result<(), Failure> {
        let mut unsynced = 0u64;
        while let Some(chunk) = stream.next().await {
            let bytes = chunk.map_err(|e| self.stream_failure(&download.name, e))?;
            let done = download.hasher.byte_count() + bytes.len() as u64;
            if done > download.size {
                return Err(ImageError::SizeMismatch {
                    blob: download.name.clone(),
                    expected: download.size,
                    actual: done,
                }
                .into());
            }
            download.file.write_all(&bytes).await.at(&download.path)?;
            download.hasher.update(&bytes);
            unsynced += bytes.len() as u64;
            if unsynced >= SYNC_EVERY {
                download.file.sync_data().await.at(&download.path)?;
                unsynced = 0;
            }
            self.progress.blob_progress(&download.name, done, download.size);
        }
        Ok(())
    }

    async fn unpack_layers(&self, manifest: &ImageManifest, whole: &str) -> Result<(), ImageError> {
        let config_digest = oci::descriptor_digest(manifest.config())?;
        let config = oci::parse_config(&self.store.read_blob(&config_digest)?, whole)?;
        let diff_ids = oci::diff_ids(&config, manifest, whole)?;
        for (layer, diff_id) in manifest.layers().iter().zip(diff_ids) {
            let compression = oci::layer_compression(layer)?;
            let digest = oci::descriptor_digest(layer)?;
            if self.store.layer_path(&diff_id).is_dir() {
                continue;
            }
            self.progress.unpacking(&digest.to_string());
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || {
                store.ensure_layer(&store.blob_path(&digest), &digest.to_string(), compression, &diff_id)
            })
            .await
            .expect("unpacking does not panic")?;
        }
        Ok(())
    }

    /// Sorts a client error into what the operator should hear, and whether
    /// retrying may help.
    fn classify(&self, error: OciDistributionError) -> Failure {
        let reference = self.reference.whole();
        let registry = self.registry.clone();
        let not_found = || ImageError::NotFound { reference: reference.clone(), registry: registry.clone() };
        let unauthorized = || ImageError::Unauthorized { reference: reference.clone(), registry: registry.clone() };
        let other = |detail: String, transient: bool| Failure {
            error: ImageError::Registry { registry: registry.clone(), detail },
            transient,
        };
        match error {
            OciDistributionError::RequestError(e) if e.is_connect() => Failure {
                error: ImageError::RegistryUnreachable { registry, detail: outpost_proto::error_chain(&e) },
                transient: true,
            },
            OciDistributionError::RequestError(e) => other(outpost_proto::error_chain(&e), true),
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<_> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    not_found().into()
                } else if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                    unauthorized().into()
                } else {
                    let busy = codes.iter().any(|c| matches!(c, OciErrorCode::Toomanyrequests));
                    other(envelope.to_string(), busy)
                }
            }
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => not_found().into(),
            OciDistributionError::ServerError { code: 401 | 403, .. }
            | OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => unauthorized().into(),
            OciDistributionError::ServerError { code, message, .. } => {
                other(format!("HTTP {code}: {message}"), code == 429 || code >= 500)
            }
            OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
                ImageError::DigestMismatch { blob: expected, actual }.into()
            }
            OciDistributionError::UnsupportedMediaTypeError(media_type) => {
                ImageError::UnsupportedMediaType { what: reference, media_type }.into()
            }
            e => other(e.to_string(), false),
        }
    }

    /// A blob stream broke off: a digest failure from oci-client's own check
    /// is final, anything else is a connection problem worth resuming.
    fn stream_failure(&self, blob: &str, error: std::io::Error) -> Failure {
        if let Some(DigestError::VerificationError { actual, .. }) =
            error.get_ref().and_then(|e| e.downcast_ref::<DigestError>())
        {
            return ImageError::DigestMismatch { blob: blob.to_string(), actual: actual.clone() }.into();
        }
        Failure {
            error: ImageError::Registry { registry: self.registry.clone(), detail: outpost_proto::error_chain(&error) },
            transient: true,
        }
    }
}

/// A blob being downloaded into its partial file; `hasher` has seen exactly
/// the bytes in the file.
struct Download {
    file: tokio::fs::File,
    hasher: Hasher,
    path: PathBuf,
    name: String,
    size: u64,
}

impl Download {
    async fn restart(&mut self) -> Result<(), ImageError> {
        self.file.set_len(0).await.at(&self.path)?;
        self.file.seek(SeekFrom::Start(0)).await.at(&self.path)?;
        self.hasher = Hasher::new();
        Ok(())
    }
}

/// Opens (or creates) a partial download, locked so that two pulls never
/// append to the same file, and hashes what is already in it.
fn open_partial(path: &Path) -> Result<(nix::fcntl::Flock<std::fs::File>, Hasher), ImageError> {
    let file = std::fs::File::options().read(true).write(true).create(true).truncate(false).open(path).at(path)?;
    let mut lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| ImageError::io(path, errno.into()))?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = lock.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok((lock, hasher))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_a_mirror_the_image_keeps_its_registry_as_the_first_part_of_its_name() {
        let at = |r: &str| via_mirror(&r.parse().unwrap(), "hub:8080").whole();
        assert_eq!(at("127.0.0.1:5000/app:1"), "hub:8080/127.0.0.1:5000/app:1");
        assert_eq!(at("busybox"), "hub:8080/docker.io/library/busybox:latest");
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(at(&format!("reg.example/a/b@{digest}")), format!("hub:8080/reg.example/a/b@{digest}"));
        assert_eq!(mirror_host("http://hub:8080/").unwrap(), ("hub:8080".to_string(), true));
        assert_eq!(mirror_host("https://hub").unwrap(), ("hub".to_string(), false));
    }
}
