//! Resumable, verified downloads of update artifacts over HTTP.
//!
//! The bytes go into `<dest>.partial`, fsync'd as it grows. A dropped
//! connection resumes with `Range: bytes=N-` from the partial file's length,
//! also in a later process, and the prefix already on disk is hashed again so
//! the final sha256 covers every byte. Only a file of the expected length and
//! digest is renamed to `dest`. The expected length is also a cap: a server
//! that sends more is cut off there.
//!
//! One `fetch` per `dest` at a time: the partial file is not locked.

use std::ffi::OsString;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::digest::{Digest, Hasher};

/// fsync a growing partial file this often, so a crash loses little.
const SYNC_EVERY: u64 = 4 << 20;

/// What to download, where to, and what it must be.
#[derive(Debug, Clone)]
pub struct Download {
    pub url: String,
    pub dest: PathBuf,
    /// The artifact's exact length; no byte past it is accepted.
    pub length: u64,
    pub sha256: Digest,
    /// Reads no faster than this on average when set.
    pub max_bytes_per_sec: Option<u64>,
}

impl Download {
    /// Where the bytes accumulate until they are verified: `<dest>.partial`.
    pub fn partial_path(&self) -> PathBuf {
        let mut name = self.dest.file_name().map(OsString::from).unwrap_or_default();
        name.push(".partial");
        self.dest.with_file_name(name)
    }
}

/// How long `fetch` keeps trying after transient failures (cuts, timeouts,
/// 5xx, 408, 429). Bounded by attempts, not by time: `attempts` failures in a
/// row, where an attempt that stored new bytes resets the count, so a link
/// that keeps breaking but keeps making progress finishes the download.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Gives up at this many failures in a row.
    pub attempts: u32,
    /// Wait before the first retry; doubles each time, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 5, backoff: Duration::from_millis(500), max_backoff: Duration::from_secs(30) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("could not {action} {path:?}: {source}; check the disk and its free space, then fetch again")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("request to {url} failed: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}; the partial file is kept, so fetching again resumes once the server serves the artifact")]
    Status { url: String, status: StatusCode },
    #[error("{url} ended the transfer at {received} of {expected} bytes")]
    EndedEarly { url: String, received: u64, expected: u64 },
    #[error("gave up on {url} after {failures} failures in a row without progress; the partial file is kept, so fetching again resumes")]
    GaveUp {
        url: String,
        failures: u32,
        #[source]
        last: Box<DownloadError>,
    },
    #[error("{url} serves {served} bytes where {expected} are expected; the partial file was deleted: check that the URL and the metadata name the same artifact")]
    LengthMismatch { url: String, expected: u64, served: u64 },
    #[error("{url} sent more than the expected {expected} bytes; refused at the cap and the partial file deleted: the server is faulty or hostile")]
    TooLong { url: String, expected: u64 },
    #[error("{url} answered a request for bytes from {offset} with Content-Range {content_range:?}; the partial file was deleted")]
    BadContentRange { url: String, offset: u64, content_range: String },
    #[error("{url} has sha256 {actual}, not {expected}; the partial file was deleted, so fetching again starts over")]
    HashMismatch { url: String, expected: Digest, actual: Digest },
}

impl DownloadError {
    /// Whether another attempt may succeed, resuming from the partial file.
    fn is_transient(&self) -> bool {
        match self {
            Self::Request { source, .. } => !source.is_builder(),
            Self::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::EndedEarly { .. } => true,
            _ => false,
        }
    }

    /// Whether the partial file holds bytes that resuming cannot make right.
    fn spoils_partial(&self) -> bool {
        matches!(
            self,
            Self::LengthMismatch { .. }
                | Self::TooLong { .. }
                | Self::BadContentRange { .. }
                | Self::HashMismatch { .. }
        )
    }
}

/// Downloads `download.url` to `download.dest`, resuming from
/// `<dest>.partial` if an earlier attempt or process left one, retrying
/// transient failures as `retry` allows, and renaming into place only once
/// the length and sha256 match. Configure timeouts on `client`: a server that
/// goes silent is waited for as long as the client allows.
pub async fn fetch(client: &reqwest::Client, download: &Download, retry: RetryPolicy) -> Result<(), DownloadError> {
    let path = download.partial_path();
    let mut partial = Partial::open(&path).await?;
    if partial.hasher.byte_count() > download.length {
        partial.restart().await?;
    }
    let mut bucket = download.max_bytes_per_sec.map(TokenBucket::new);

    let mut failures = 0;
    loop {
        let before = partial.hasher.byte_count();
        let result = attempt(client, download, &mut partial, bucket.as_mut()).await;
        // Keep what arrived even if the process dies while backing off.
        partial.file.sync_data().await.map_err(|e| partial.io("sync", e))?;
        let Err(error) = result else { break };
        if error.spoils_partial() {
            drop(partial);
            remove_partial(&path).await?;
            return Err(error);
        }
        if !error.is_transient() {
            return Err(error);
        }
        if partial.hasher.byte_count() > before {
            failures = 0;
        }
        failures += 1;
        if failures >= retry.attempts {
            return Err(DownloadError::GaveUp { url: download.url.clone(), failures, last: Box::new(error) });
        }
        let wait = retry.backoff.saturating_mul(1 << (failures - 1).min(16)).min(retry.max_backoff);
        tokio::time::sleep(wait).await;
    }

    let Partial { file, hasher, .. } = partial;
    file.sync_all().await.map_err(|e| io_error("sync", &path, e))?;
    drop(file);
    let actual = hasher.finish();
    if actual != download.sha256 {
        remove_partial(&path).await?;
        return Err(DownloadError::HashMismatch { url: download.url.clone(), expected: download.sha256, actual });
    }
    tokio::fs::rename(&path, &download.dest).await.map_err(|e| io_error("rename into place", &path, e))?;
    sync_parent(&download.dest).await
}

/// One request for the rest of the artifact; `Ok` once the partial file has
/// all `length` bytes.
async fn attempt(
    client: &reqwest::Client,
    download: &Download,
    partial: &mut Partial,
    mut bucket: Option<&mut TokenBucket>,
) -> Result<(), DownloadError> {
    let url = || download.url.clone();
    let offset = partial.hasher.byte_count();
    // A complete partial file (the process stopped before renaming) needs no
    // request, which also spares us the server's 416 for `bytes=<length>-`.
    if offset == download.length {
        return Ok(());
    }
    let mut request = client.get(&download.url);
    if offset > 0 {
        request = request.header(RANGE, format!("bytes={offset}-"));
    }
    let mut response = request.send().await.map_err(|source| DownloadError::Request { url: url(), source })?;
    match response.status() {
        StatusCode::PARTIAL_CONTENT if offset > 0 => {
            let content_range = response.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
            match parse_content_range(content_range) {
                Some((start, total)) if start == offset && total == download.length => {}
                Some((start, total)) if start == offset => {
                    return Err(DownloadError::LengthMismatch { url: url(), expected: download.length, served: total })
                }
                _ => {
                    return Err(DownloadError::BadContentRange {
                        url: url(),
                        offset,
                        content_range: content_range.to_string(),
                    })
                }
            }
        }
        // The server ignored the Range: take the whole artifact from the start.
        StatusCode::OK => {
            partial.restart().await?;
            if let Some(served) = response.content_length() {
                if served != download.length {
                    return Err(DownloadError::LengthMismatch { url: url(), expected: download.length, served });
                }
            }
        }
        // The server has fewer bytes than we already hold.
        StatusCode::RANGE_NOT_SATISFIABLE => {
            let content_range = response.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok());
            let served = content_range.and_then(|v| v.strip_prefix("bytes */")).and_then(|t| t.parse().ok());
            return Err(DownloadError::LengthMismatch {
                url: url(),
                expected: download.length,
                served: served.unwrap_or(offset),
            });
        }
        status => return Err(DownloadError::Status { url: url(), status }),
    }

    let mut unsynced = 0u64;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(source) => return Err(DownloadError::Request { url: url(), source }),
        };
        let room = download.length - partial.hasher.byte_count();
        if chunk.len() as u64 > room {
            // Dropping the response closes the connection: nothing more is read.
            return Err(DownloadError::TooLong { url: url(), expected: download.length });
        }
        if let Some(bucket) = bucket.as_deref_mut() {
            bucket.take(chunk.len() as u64).await;
        }
        partial.file.write_all(&chunk).await.map_err(|e| partial.io("write", e))?;
        partial.hasher.update(&chunk);
        unsynced += chunk.len() as u64;
        if unsynced >= SYNC_EVERY {
            partial.file.sync_data().await.map_err(|e| partial.io("sync", e))?;
            unsynced = 0;
        }
    }
    let received = partial.hasher.byte_count();
    if received < download.length {
        return Err(DownloadError::EndedEarly { url: url(), received, expected: download.length });
    }
    Ok(())
}

/// `bytes <start>-<end>/<total>` as `(start, total)`.
fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let (range, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.parse().ok()?, total.parse().ok()?))
}

/// The partial file, positioned at its end; `hasher` has seen exactly its bytes.
struct Partial {
    file: File,
    hasher: Hasher,
    path: PathBuf,
}

impl Partial {
    /// Opens (or creates) the partial file and hashes what is already in it.
    async fn open(path: &Path) -> Result<Self, DownloadError> {
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .await
            .map_err(|e| io_error("open", path, e))?;
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf).await.map_err(|e| io_error("read", path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        file.seek(SeekFrom::End(0)).await.map_err(|e| io_error("seek", path, e))?;
        Ok(Self { file, hasher, path: path.to_path_buf() })
    }

    async fn restart(&mut self) -> Result<(), DownloadError> {
        self.file.set_len(0).await.map_err(|e| self.io("truncate", e))?;
        self.file.seek(SeekFrom::Start(0)).await.map_err(|e| self.io("seek", e))?;
        self.hasher = Hasher::new();
        Ok(())
    }

    fn io(&self, action: &'static str, source: std::io::Error) -> DownloadError {
        io_error(action, &self.path, source)
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> DownloadError {
    DownloadError::Io { action, path: path.to_path_buf(), source }
}

async fn remove_partial(path: &Path) -> Result<(), DownloadError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error("delete", path, e)),
        _ => Ok(()),
    }
}

/// Makes a rename into `path`'s directory durable.
async fn sync_parent(path: &Path) -> Result<(), DownloadError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let handle = File::open(dir).await.map_err(|e| io_error("open", dir, e))?;
    handle.sync_all().await.map_err(|e| io_error("sync", dir, e))
}

/// Paces reads to `rate` bytes per second. Starts empty and holds at most
/// 100 ms worth of tokens, so bursts stay short; a chunk larger than what is
/// there is taken on credit and paid for by sleeping.
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        Self { rate, capacity: rate / 10.0, tokens: 0.0, last: Instant::now() }
    }

    async fn take(&mut self, bytes: u64) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.capacity);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_gives_start_and_total() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, 200)));
        assert_eq!(parse_content_range("bytes */200"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn partial_path_appends_to_the_file_name() {
        let download = Download {
            url: "http://127.0.0.1/a".to_string(),
            dest: PathBuf::from("/var/ota/image.raw"),
            length: 1,
            sha256: Digest::of(b""),
            max_bytes_per_sec: None,
        };
        assert_eq!(download.partial_path(), PathBuf::from("/var/ota/image.raw.partial"));
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_paces_bytes_to_its_rate() {
        let mut bucket = TokenBucket::new(1000);
        let start = Instant::now();
        for _ in 0..10 {
            bucket.take(500).await;
        }
        assert!(start.elapsed() >= Duration::from_secs(5), "took {:?}", start.elapsed());
    }
}
