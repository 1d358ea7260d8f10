//! The site cache: a content-addressed store of blobs (update bundles, image
//! manifests, configs and layers) under `data-dir/cache`, served over HTTP
//! with Range (`api`), filled by operators or from upstream registries
//! (`mirror`). Described in docs/artifacts.md.
//!
//! - `blobs/sha256/<hex>`: verified content only. A blob is written to `tmp/`,
//!   hashed as it arrives, checked (sha256, and length when known), fsynced
//!   and renamed into place, so a file there is always what its name says.
//!   Its mtime is its last use, for eviction.
//! - `pinned/sha256/<hex>`: an empty marker for a blob an operator pushed,
//!   which is never evicted (nothing upstream could bring it back).
//! - `tags/<name>/<tag>`: the manifest digest a registry last gave for a tag
//!   (`/` in the name written `%2F`), so an offline site serves the last known tag.
//! - `tuf/<role>.json`: signed update metadata, stored as the operator pushed it.

pub mod api;
mod mirror;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{Stream, StreamExt};
use ota::{Digest, Hasher};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

pub use mirror::Mirror;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {action} {path:?}: {source}; check the hub's data disk and its free space")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the content's sha256 is {actual}, not {expected}: send the bytes the digest names")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("the content is {actual} bytes where {expected} were announced")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("the content is larger than the whole cache ({max} bytes, [cache] max-size)")]
    TooLarge { max: u64 },
    #[error("the transfer broke off: {0}")]
    Transfer(String),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io { action, path: path.to_owned(), source }
}

/// One cached blob, as `GET /v1/artifacts` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
    /// Unix milliseconds of the last time it was stored or served.
    pub last_used: u64,
    /// Pushed by an operator: never evicted.
    pub pinned: bool,
}

/// The store; cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    max_size: u64,
    /// Blobs being served, with how many readers: never evicted under them.
    in_use: Mutex<HashMap<Digest, usize>>,
    /// One eviction pass at a time.
    evicting: tokio::sync::Mutex<()>,
}

/// Keeps a blob from eviction while it is served.
pub struct InUse {
    cache: Cache,
    digest: Digest,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut in_use = self.cache.inner.in_use.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = in_use.get_mut(&self.digest) {
            *count -= 1;
            if *count == 0 {
                in_use.remove(&self.digest);
            }
        }
    }
}

/// A stored blob opened for reading.
pub struct OpenBlob {
    pub file: tokio::fs::File,
    pub len: u64,
    pub digest: Digest,
    pub guard: InUse,
}

impl Cache {
    /// Opens (or creates) the cache under `root`; what an interrupted write left in `tmp/` is removed.
    pub fn open(root: &Path, max_size: u64) -> Result<Self, CacheError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io("clear", &tmp))?;
        }
        // `partial/` is kept: a download from the parent hub resumes from it.
        for dir in ["blobs/sha256", "pinned/sha256", "tags", "tuf", "tmp", "partial"] {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                max_size,
                in_use: Mutex::new(HashMap::new()),
                evicting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("blobs/sha256").join(digest.hex())
    }

    fn pin_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("pinned/sha256").join(digest.hex())
    }

    pub fn has(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob to serve it, marking it used now; None when it is not stored.
    pub async fn open_blob(&self, digest: &Digest) -> Result<Option<OpenBlob>, CacheError> {
        let guard = self.hold(digest);
        let path = self.blob_path(digest);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("open", &path)(e)),
        };
        let len = file.metadata().await.map_err(io("read the size of", &path))?.len();
        touch(&path);
        Ok(Some(OpenBlob { file, len, digest: *digest, guard }))
    }

    /// A whole (small) blob: a manifest.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.blob_path(digest);
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                touch(&path);
                Ok(Some(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    fn hold(&self, digest: &Digest) -> InUse {
        *self.inner.in_use.lock().unwrap_or_else(|p| p.into_inner()).entry(*digest).or_default() += 1;
        InUse { cache: self.clone(), digest: *digest }
    }

    /// Stores the bytes of `stream` as `expected`, once they hash to it (and
    /// are `length` long, when given); then evicts down to the budget.
    /// `pinned`: an operator's upload, never evicted.
    pub async fn insert<S>(
        &self,
        expected: &Digest,
        length: Option<u64>,
        mut stream: S,
        pinned: bool,
    ) -> Result<u64, CacheError>
    where
        S: Stream<Item = Result<axum::body::Bytes, CacheError>> + Unpin,
    {
        let max = self.inner.max_size;
        if length.is_some_and(|len| len > max) {
            return Err(CacheError::TooLarge { max });
        }
        let tmp = self.inner.root.join("tmp").join(format!("{}-{}", expected.hex(), unique()));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io("create", &tmp))?;
        let written = async {
            let mut hasher = Hasher::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                let count = hasher.byte_count();
                if let Some(expected) = length.filter(|&len| count > len) {
                    return Err(CacheError::LengthMismatch { expected, actual: count });
                }
                if count > max {
                    return Err(CacheError::TooLarge { max });
                }
                file.write_all(&chunk).await.map_err(io("write", &tmp))?;
            }
            let count = hasher.byte_count();
            if let Some(expected) = length.filter(|&len| count != len) {
                return Err(CacheError::LengthMismatch { expected, actual: count });
            }
            let actual = hasher.finish();
            if actual != *expected {
                return Err(CacheError::DigestMismatch { expected: *expected, actual });
            }
            file.sync_all().await.map_err(io("sync", &tmp))?;
            Ok(count)
        }
        .await;
        drop(file);
        let size = match written {
            Ok(size) => size,
            Err(e) => {
                drop(tokio::fs::remove_file(&tmp).await);
                return Err(e);
            }
        };
        if pinned {
            let pin = self.pin_path(expected);
            std::fs::File::create(&pin).map_err(io("create", &pin))?;
        }
        let path = self.blob_path(expected);
        tokio::fs::rename(&tmp, &path).await.map_err(io("move into place", &path))?;
        sync_dir(path.parent().expect("a blob has a directory"))?;
        self.evict().await?;
        Ok(size)
    }

    /// Where a resumable download of `digest` writes, kept across restarts.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("partial").join(digest.hex())
    }

    /// Takes a verified file (a finished download, its length and sha256
    /// checked and fsync'd) into the cache as `expected`.
    pub async fn adopt(&self, expected: &Digest, file: &Path) -> Result<u64, CacheError> {
        let size = tokio::fs::metadata(file).await.map_err(io("read", file))?.len();
        if size > self.inner.max_size {
            drop(tokio::fs::remove_file(file).await);
            return Err(CacheError::TooLarge { max: self.inner.max_size });
        }
        let path = self.blob_path(expected);
        tokio::fs::rename(file, &path).await.map_err(io("move into place", &path))?;
        sync_dir(path.parent().expect("a blob has a directory"))?;
        self.evict().await?;
        Ok(size)
    }

    pub async fn insert_bytes(&self, expected: &Digest, bytes: Vec<u8>) -> Result<u64, CacheError> {
        let len = bytes.len() as u64;
        let stream = futures_util::stream::iter([Ok::<_, CacheError>(axum::body::Bytes::from(bytes))]);
        self.insert(expected, Some(len), stream, false).await
    }

    /// Every stored blob.
    pub fn list(&self) -> Result<Vec<BlobInfo>, CacheError> {
        let dir = self.inner.root.join("blobs/sha256");
        let mut blobs = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("list", &dir))? {
            let entry = entry.map_err(io("list", &dir))?;
            let Some(Ok(digest)) = entry.file_name().to_str().map(Digest::from_hex) else { continue };
            // Evicted or replaced since the listing: skip it.
            let Ok(meta) = entry.metadata() else { continue };
            let last_used = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
            blobs.push(BlobInfo {
                digest: digest.to_string(),
                size: meta.len(),
                last_used: last_used.map_or(0, |d| d.as_millis() as u64),
                pinned: self.pin_path(&digest).exists(),
            });
        }
        blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(blobs)
    }

    /// Removes the least recently used blobs, never pinned ones nor ones
    /// being served, until the total is within `max-size`.
    pub async fn evict(&self) -> Result<(), CacheError> {
        let _one_at_a_time = self.inner.evicting.lock().await;
        let mut blobs = self.list()?;
        let mut total: u64 = blobs.iter().map(|b| b.size).sum();
        if total <= self.inner.max_size {
            return Ok(());
        }
        blobs.sort_by_key(|b| b.last_used);
        for blob in blobs {
            if total <= self.inner.max_size {
                break;
            }
            let digest: Digest = blob.digest.parse().expect("listed from valid file names");
            let in_use = self.inner.in_use.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&digest);
            if blob.pinned || in_use {
                continue;
            }
            let path = self.blob_path(&digest);
            std::fs::remove_file(&path).map_err(io("evict", &path))?;
            tracing::info!("site cache: evicted {} ({} bytes, least recently used)", blob.digest, blob.size);
            total -= blob.size;
        }
        if total > self.inner.max_size {
            tracing::warn!(
                "site cache: {total} bytes stored, over [cache] max-size {}, but the rest is pinned or being served",
                self.inner.max_size
            );
        }
        Ok(())
    }

    fn tag_path(&self, name: &str, tag: &str) -> PathBuf {
        self.inner.root.join("tags").join(name.replace('%', "%25").replace('/', "%2F")).join(tag)
    }

    /// The manifest digest last seen for `name:tag`.
    pub fn tag(&self, name: &str, tag: &str) -> Option<Digest> {
        std::fs::read_to_string(self.tag_path(name, tag)).ok()?.trim().parse().ok()
    }

    pub fn set_tag(&self, name: &str, tag: &str, digest: &Digest) -> Result<(), CacheError> {
        let path = self.tag_path(name, tag);
        write_atomic(&self.inner.root.join("tmp"), &path, digest.to_string().as_bytes())
    }

    fn tuf_path(&self, role: &str) -> PathBuf {
        self.inner.root.join("tuf").join(format!("{role}.json"))
    }

    /// The signed metadata of `role` (as `tuf_role` checks it), if pushed.
    pub fn tuf(&self, role: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.tuf_path(role);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    pub fn set_tuf(&self, role: &str, bytes: &[u8]) -> Result<(), CacheError> {
        write_atomic(&self.inner.root.join("tmp"), &self.tuf_path(role), bytes)
    }
}

/// Whether `role` names TUF metadata the hub keeps: the four roles, and
/// `N.root` (each root version, which clients walk to rotate keys).
pub fn tuf_role(role: &str) -> bool {
    matches!(role, "root" | "timestamp" | "snapshot" | "targets")
        || role.strip_suffix(".root").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Marks a blob used now: eviction goes by mtime. Best effort: a blob whose
/// time cannot be set is only evicted sooner.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        drop(file.set_modified(SystemTime::now()));
    }
}

fn write_atomic(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let dir = path.parent().expect("cache files have a directory");
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = tmp_dir.join(format!("write-{}", unique()));
    let mut file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("move into place", path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync", dir))
}

/// A name no other write in this process uses at the same time.
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn put(cache: &Cache, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        cache.insert_bytes(&digest, bytes.to_vec()).await.unwrap();
        digest
    }

    fn age(cache: &Cache, digest: &Digest, seconds_ago: u64) {
        let file = std::fs::File::options().append(true).open(cache.blob_path(digest)).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(seconds_ago)).unwrap();
    }

    #[tokio::test]
    async fn over_budget_the_least_recently_used_blob_goes_first_sparing_pinned_and_served_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 3000).unwrap();
        let pinned = Digest::of(&[0u8; 1000]);
        let stream = futures_util::stream::iter([Ok::<_, CacheError>(axum::body::Bytes::from(vec![0u8; 1000]))]);
        cache.insert(&pinned, Some(1000), stream, true).await.unwrap();
        let served = put(&cache, &[1u8; 1000]).await;
        let old = put(&cache, &[2u8; 500]).await;
        let recent = put(&cache, &[3u8; 500]).await;
        age(&cache, &pinned, 400);
        age(&cache, &served, 300);
        age(&cache, &old, 200);
        age(&cache, &recent, 100);
        let reading = cache.open_blob(&served).await.unwrap().unwrap();
        age(&cache, &served, 300);

        let new = put(&cache, &[4u8; 500]).await;

        assert!(cache.has(&pinned), "a pushed blob is never evicted");
        assert!(cache.has(&served), "a blob being served is not evicted");
        assert!(!cache.has(&old), "the least recently used of the rest goes");
        assert!(cache.has(&recent) && cache.has(&new));
        drop(reading);

        // Served no more, it is now the oldest evictable one.
        put(&cache, &[5u8; 600]).await;
        assert!(!cache.has(&served));
        assert!(cache.has(&pinned) && cache.has(&recent) && cache.has(&new));
    }

    #[tokio::test]
    async fn content_that_does_not_hash_to_its_name_is_refused_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let claimed = Digest::of(b"the real bundle");
        let err = cache.insert_bytes(&claimed, b"something else".to_vec()).await.unwrap_err();
        assert!(matches!(err, CacheError::DigestMismatch { .. }), "{err}");
        assert!(!cache.has(&claimed));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "nothing left behind");
    }

    #[test]
    fn tuf_roles_are_the_four_and_numbered_roots() {
        for role in ["root", "timestamp", "snapshot", "targets", "2.root", "10.root"] {
            assert!(tuf_role(role), "{role}");
        }
        for role in ["", ".root", "x.root", "../root", "mirrors", "root.json"] {
            assert!(!tuf_role(role), "{role}");
        }
    }
}
