//! The site cache over real HTTP: update artifacts pushed by an operator and
//! fetched with `ota::fetch` through a link that keeps breaking, and the
//! registry mirror in front of a real registry (Debian's docker-registry),
//! behind a proxy that counts what the site pulls from upstream.

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, ImageData};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use ota::{Digest, Download, RetryPolicy};
use ring::rand::{SecureRandom, SystemRandom};
use tempfile::TempDir;
use testkit::image::{build_oci_layout, RunConfig};
use testkit::layers::random_file;
use testkit::{CuttingProxy, Registry};

use crate::support::{config, TestHub};

const KB: u64 = 1024;
const LAYER: usize = 2 << 20;

pub(crate) fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new().fill(&mut bytes).unwrap();
    bytes
}

pub(crate) fn host(hub: &TestHub) -> String {
    hub.api.trim_start_matches("http://").to_string()
}

pub(crate) async fn put_artifact(hub: &TestHub, digest: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let response =
        reqwest::Client::new().put(format!("{}/v1/artifacts/{digest}", hub.api)).body(body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Pulls `name:tag` through the hub's mirror as a registry client would.
pub(crate) async fn pull_through(hub_host: &str, name: &str, tag: &str) -> ImageData {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![hub_host.to_string()]),
        ..Default::default()
    });
    let reference = Reference::with_tag(hub_host.to_string(), name.to_string(), tag.to_string());
    client
        .pull(&reference, &RegistryAuth::Anonymous, vec!["application/vnd.oci.image.layer.v1.tar+gzip"])
        .await
        .unwrap_or_else(|e| panic!("pull of {name}:{tag} through the hub: {}", outpost_proto::error_chain(&e)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_pulling_one_image_get_each_blob_fetched_upstream_once_and_the_next_pull_works_offline() {
    let dir = TempDir::new().unwrap();
    let registry = Registry::start().unwrap();
    let layout = dir.path().join("layout");
    build_oci_layout(&layout, "app:1", &[random_file("data", LAYER).unwrap()], &RunConfig::default()).unwrap();
    registry.push(&layout, "app:1").unwrap();
    let upstream = CuttingProxy::start(registry.addr()).await.unwrap();
    let mut config = config(&dir.path().join("hub"));
    config.insecure_registries = vec![upstream.host()];
    config.cache.upstream_registries = vec![upstream.host()];
    let hub = TestHub::start(config).await;
    let name = format!("{}/app", upstream.host());
    let hub_host = host(&hub);

    let (first, second) = tokio::join!(pull_through(&hub_host, &name, "1"), pull_through(&hub_host, &name, "1"));

    assert_eq!(first.digest, second.digest);
    assert_eq!(first.layers[0].data, second.layers[0].data);
    let blobs: u64 = first.manifest.as_ref().unwrap().layers.iter().map(|l| l.size as u64).sum::<u64>()
        + first.manifest.as_ref().unwrap().config.size as u64;
    let fetched = upstream.downstream_bytes();
    // Two manifest requests (a tag is asked each time) and headers are the only extra.
    assert!(
        fetched < blobs + 32 * KB,
        "the registry sent {fetched} bytes for {blobs} bytes of blobs: some blob was fetched twice"
    );

    drop(upstream);
    drop(registry);
    let offline = pull_through(&hub_host, &name, "1").await;
    assert_eq!(offline.digest, first.digest, "the last known tag is served while the registry is unreachable");
    assert_eq!(offline.layers[0].data, first.layers[0].data);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_downloads_whole_through_a_link_cut_every_300_kb_fetching_under_5_percent_more() {
    let dir = TempDir::new().unwrap();
    let hub = TestHub::start(config(&dir.path().join("hub"))).await;
    let artifact = random_bytes(3 << 20);
    let digest = Digest::of(&artifact);
    let (status, body) = put_artifact(&hub, &digest.to_string(), artifact.clone()).await;
    assert_eq!(status, 201, "{body}");
    let proxy = CuttingProxy::start(host(&hub).parse().unwrap()).await.unwrap();
    proxy.cut_every(300 * KB);

    let download = Download {
        url: format!("http://{}/v1/artifacts/{digest}", proxy.host()),
        dest: dir.path().join("bundle"),
        length: artifact.len() as u64,
        sha256: digest,
        max_bytes_per_sec: None,
    };
    let retry =
        RetryPolicy { attempts: 5, backoff: Duration::from_millis(20), max_backoff: Duration::from_millis(200) };
    ota::fetch(&reqwest::Client::new(), &download, retry).await.unwrap();

    assert_eq!(std::fs::read(&download.dest).unwrap(), artifact);
    assert!(proxy.cuts() >= 9, "the link was cut {} times", proxy.cuts());
    assert!(proxy.saw_range_request(), "the download resumed with Range requests");
    let fetched = proxy.downstream_bytes() as f64;
    assert!(
        fetched <= artifact.len() as f64 * 1.05,
        "{fetched} bytes crossed the link for a {} byte artifact",
        artifact.len()
    );
    hub.stop().await;
}

#[tokio::test]
async fn an_upload_whose_bytes_do_not_hash_to_its_digest_is_refused_with_400_and_not_stored() {
    let dir = TempDir::new().unwrap();
    let hub = TestHub::start(config(&dir.path().join("hub"))).await;
    let claimed = Digest::of(b"the bundle the operator signed");

    let (status, body) = put_artifact(&hub, &claimed.to_string(), b"another bundle".to_vec()).await;

    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains(&claimed.to_string()) && message.contains("nothing stored"), "{message}");
    let (status, _) = hub.get(&format!("/v1/artifacts/{claimed}")).await;
    assert_eq!(status, 404);
    hub.stop().await;
}

#[tokio::test]
async fn a_range_past_the_end_answers_416_and_tuf_metadata_is_served_as_pushed() {
    let dir = TempDir::new().unwrap();
    let hub = TestHub::start(config(&dir.path().join("hub"))).await;
    let artifact = random_bytes(1000);
    let digest = Digest::of(&artifact);
    put_artifact(&hub, &digest.to_string(), artifact.clone()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/artifacts/{digest}", hub.api);

    let part = http.get(&url).header("range", "bytes=990-").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 990-999/1000");
    assert_eq!(part.headers()["etag"].to_str().unwrap(), format!("\"{digest}\""));
    assert_eq!(part.bytes().await.unwrap(), artifact[990..]);
    let past = http.get(&url).header("range", "bytes=1000-").send().await.unwrap();
    assert_eq!(past.status(), 416);
    assert_eq!(past.headers()["content-range"], "bytes */1000");

    let signed = r#"{"signed":{"_type":"timestamp","version":3},"signatures":[{"keyid":"ab","sig":"cd"}]}"#;
    let put = http.put(format!("{}/v1/tuf/timestamp.json", hub.api)).body(signed).send().await.unwrap();
    assert_eq!(put.status(), 204);
    let got = http.get(format!("{}/v1/tuf/timestamp.json", hub.api)).send().await.unwrap();
    assert_eq!(got.text().await.unwrap(), signed, "served byte for byte");
    let unsigned = http.put(format!("{}/v1/tuf/targets.json", hub.api)).body("{}").send().await.unwrap();
    assert_eq!(unsigned.status(), 400);
    hub.stop().await;
}

#[tokio::test]
async fn a_blob_whose_upstream_content_does_not_match_its_digest_is_refused_and_not_cached() {
    // A registry that answers every blob with the same wrong bytes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap().to_string();
    let app = axum::Router::new()
        .route("/v2/", axum::routing::get(|| async { "{}" }))
        .route("/v2/{*path}", axum::routing::get(|| async { "not what the digest names" }));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = TempDir::new().unwrap();
    let mut config = config(&dir.path().join("hub"));
    config.insecure_registries = vec![upstream.clone()];
    let hub = TestHub::start(config).await;
    let digest = Digest::of(b"the layer the manifest names");

    let response = reqwest::get(format!("{}/v2/{upstream}/app/blobs/{digest}", hub.api)).await.unwrap();

    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("not cached") && message.contains(&digest.to_string()), "{message}");
    let (status, _) = hub.get(&format!("/v1/artifacts/{digest}")).await;
    assert_eq!(status, 404, "nothing was cached");
    assert!(!dir.path().join("hub/cache/blobs/sha256").join(digest.hex()).exists());
    hub.stop().await;
    server.abort();
}
