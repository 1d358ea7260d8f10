//! `ota::fetch` against a real HTTP server on loopback, mostly behind a
//! `CuttingProxy` that breaks the link and counts what crosses it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ota::{fetch, Digest, Download, DownloadError, RetryPolicy};
use ring::rand::{SecureRandom, SystemRandom};
use testkit::proxy::CuttingProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const KB: usize = 1024;

/// Longest any test may take; only there so a broken cap fails instead of hanging.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// What the test server answers to every GET.
#[derive(Clone)]
enum Content {
    /// The artifact, with Range support.
    Artifact(Arc<Vec<u8>>),
    /// A 200 without a length whose body never ends.
    Endless,
}

/// A minimal HTTP/1.1 server on 127.0.0.1: one request per connection.
struct Server {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Server {
    async fn start(content: Content) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the test server");
        let addr = listener.local_addr().expect("test server address");
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, content.clone()));
            }
        });
        Self { addr, accept }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve(mut stream: TcpStream, content: Content) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let request = String::from_utf8_lossy(&request).to_ascii_lowercase();
    let range_start = request
        .lines()
        .find_map(|line| line.strip_prefix("range: bytes="))
        .and_then(|range| range.trim().strip_suffix('-'))
        .and_then(|start| start.parse::<usize>().ok());

    let artifact = match content {
        Content::Artifact(artifact) => artifact,
        Content::Endless => {
            let head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let zeros = vec![0u8; 16 * KB];
            while stream.write_all(&zeros).await.is_ok() {}
            return;
        }
    };
    let len = artifact.len();
    let (head, body) = match range_start {
        Some(start) if start >= len => (
            format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n"),
            &[][..],
        ),
        Some(start) => (
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{len}\r\nContent-Length: {}\r\n",
                len - 1,
                len - start
            ),
            &artifact[start..],
        ),
        None => (format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n"), &artifact[..]),
    };
    let head = format!("{head}Connection: close\r\n\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    for piece in body.chunks(16 * KB) {
        if stream.write_all(piece).await.is_err() {
            return;
        }
    }
    drop(stream.shutdown().await);
}

fn random_artifact(len: usize) -> Arc<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new().fill(&mut bytes).expect("random bytes");
    Arc::new(bytes)
}

fn download_of(artifact: &[u8], addr: SocketAddr, dir: &tempfile::TempDir) -> Download {
    Download {
        url: format!("http://{addr}/artifact"),
        dest: dir.path().join("artifact"),
        length: artifact.len() as u64,
        sha256: Digest::of(artifact),
        max_bytes_per_sec: None,
    }
}

/// Quick retries: the links here break on purpose, not under load.
fn quick_retries() -> RetryPolicy {
    RetryPolicy { attempts: 5, backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(100) }
}

async fn fetch_guarded(download: &Download) -> Result<(), DownloadError> {
    tokio::time::timeout(HANG_GUARD, fetch(&reqwest::Client::new(), download, quick_retries()))
        .await
        .expect("the download ends within the hang guard")
}

fn files_in(dir: &tempfile::TempDir) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

#[tokio::test]
async fn download_through_a_link_cut_every_300_kb_completes_and_fetches_the_artifact_about_once() {
    let artifact = random_artifact(2048 * KB);
    let server = Server::start(Content::Artifact(artifact.clone())).await;
    let proxy = CuttingProxy::start(server.addr).await.unwrap();
    proxy.cut_every(300 * KB as u64);
    let dir = tempfile::tempdir().unwrap();
    let download = download_of(&artifact, proxy.addr(), &dir);

    fetch_guarded(&download).await.unwrap();

    assert_eq!(std::fs::read(&download.dest).unwrap(), *artifact);
    assert_eq!(files_in(&dir), vec![download.dest.clone()], "no partial file is left");
    assert!(proxy.cuts() >= 6, "the link was cut {} times", proxy.cuts());
    let fetched = proxy.downstream_bytes() as f64;
    let size = artifact.len() as f64;
    assert!(fetched >= size && fetched <= size * 1.05, "fetched {fetched} bytes for a {size}-byte artifact");
}

#[tokio::test]
async fn partial_file_from_an_earlier_run_resumes_and_fetches_only_the_rest() {
    let artifact = random_artifact(2048 * KB);
    let server = Server::start(Content::Artifact(artifact.clone())).await;
    let proxy = CuttingProxy::start(server.addr).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let download = download_of(&artifact, proxy.addr(), &dir);
    let held = 1536 * KB;
    std::fs::write(download.partial_path(), &artifact[..held]).unwrap();

    fetch_guarded(&download).await.unwrap();

    assert_eq!(std::fs::read(&download.dest).unwrap(), *artifact);
    assert!(proxy.saw_range_request());
    let remaining = (artifact.len() - held) as f64;
    let fetched = proxy.downstream_bytes() as f64;
    assert!(fetched >= remaining && fetched <= remaining * 1.05, "fetched {fetched} bytes for the last {remaining}");
}

#[tokio::test]
async fn complete_partial_file_is_verified_and_renamed_without_a_request() {
    let artifact = random_artifact(64 * KB);
    let server = Server::start(Content::Artifact(artifact.clone())).await;
    let proxy = CuttingProxy::start(server.addr).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let download = download_of(&artifact, proxy.addr(), &dir);
    std::fs::write(download.partial_path(), &artifact[..]).unwrap();

    fetch_guarded(&download).await.unwrap();

    assert_eq!(std::fs::read(&download.dest).unwrap(), *artifact);
    assert_eq!(files_in(&dir), vec![download.dest.clone()]);
    assert_eq!(proxy.upstream_bytes(), 0, "no request was sent");
}

#[tokio::test]
async fn server_ignoring_range_requests_makes_the_download_start_over() {
    let artifact = random_artifact(512 * KB);
    let server = Server::start(Content::Artifact(artifact.clone())).await;
    let proxy = CuttingProxy::start(server.addr).await.unwrap();
    proxy.ignore_range_requests();
    let dir = tempfile::tempdir().unwrap();
    let download = download_of(&artifact, proxy.addr(), &dir);
    // Bytes that are not the artifact's: kept, they would spoil the hash.
    std::fs::write(download.partial_path(), vec![0xAA; 200 * KB]).unwrap();

    fetch_guarded(&download).await.unwrap();

    assert_eq!(std::fs::read(&download.dest).unwrap(), *artifact);
    assert!(proxy.saw_range_request());
}

#[tokio::test]
async fn wrong_sha256_is_refused_and_leaves_no_file() {
    let artifact = random_artifact(256 * KB);
    let server = Server::start(Content::Artifact(artifact.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let download = Download { sha256: Digest::of(b"another artifact"), ..download_of(&artifact, server.addr, &dir) };

    let error = fetch_guarded(&download).await.unwrap_err();

    assert!(matches!(error, DownloadError::HashMismatch { actual, .. } if actual == Digest::of(&artifact)), "{error}");
    assert_eq!(files_in(&dir), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn server_sending_more_than_the_length_is_refused_at_the_cap() {
    let server = Server::start(Content::Endless).await;
    let dir = tempfile::tempdir().unwrap();
    let expected = vec![0u8; 256 * KB];
    let download = download_of(&expected, server.addr, &dir);

    let error = fetch_guarded(&download).await.unwrap_err();

    assert!(matches!(error, DownloadError::TooLong { expected: 262_144, .. }), "{error}");
    assert_eq!(files_in(&dir), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn bandwidth_cap_of_512_kb_per_second_makes_256_kb_take_at_least_0_4_seconds() {
    let artifact = random_artifact(256 * KB);
    let server = Server::start(Content::Artifact(artifact.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let download = Download { max_bytes_per_sec: Some(512 * KB as u64), ..download_of(&artifact, server.addr, &dir) };

    let start = Instant::now();
    fetch_guarded(&download).await.unwrap();

    // A lower bound only: it proves the cap works without timing the machine.
    assert!(start.elapsed() >= Duration::from_millis(400), "took {:?}", start.elapsed());
    assert_eq!(std::fs::read(&download.dest).unwrap(), *artifact);
}

#[tokio::test]
async fn server_serving_another_length_is_refused_and_leaves_no_file() {
    let artifact = random_artifact(64 * KB);
    let server = Server::start(Content::Artifact(artifact.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let download = Download { length: artifact.len() as u64 + 1, ..download_of(&artifact, server.addr, &dir) };

    let error = fetch_guarded(&download).await.unwrap_err();

    assert!(matches!(error, DownloadError::LengthMismatch { served: 65_536, .. }), "{error}");
    assert_eq!(files_in(&dir), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn link_that_stays_down_makes_fetch_give_up_and_keep_the_partial_file() {
    let artifact = random_artifact(256 * KB);
    let server = Server::start(Content::Artifact(artifact.clone())).await;
    let proxy = CuttingProxy::start(server.addr).await.unwrap();
    proxy.set_link_down(true);
    let dir = tempfile::tempdir().unwrap();
    let download = download_of(&artifact, proxy.addr(), &dir);
    std::fs::write(download.partial_path(), &artifact[..100 * KB]).unwrap();

    let error = fetch_guarded(&download).await.unwrap_err();

    assert!(matches!(error, DownloadError::GaveUp { failures: 5, .. }), "{error}");
    assert_eq!(std::fs::read(download.partial_path()).unwrap(), artifact[..100 * KB]);
    assert!(!download.dest.exists());
}
