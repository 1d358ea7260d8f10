//! Issue 7's benchmark: WAN bytes for rolling one image-based revision out
//! to a site of N devices (default 100), through a site hub against the same
//! devices connected straight to the cloud hub, in the same run; and WAN
//! bytes per idle hour for each.
//!
//! Real hubs (in-process, embedded brokers), a real registry (Debian's
//! docker-registry on loopback) holding one image with a 4 MiB layer of
//! random bytes, and the WAN as TCP proxies that count every byte both ways
//! (MQTT and HTTP). The devices are SIMULATED (testkit::fleet): they follow
//! the sync protocol and report the revision running; the bench pulls the
//! image once per device, as each device's agent would, from the hub that
//! device talks to (its `registry-mirror`): the cloud's mirror through the
//! WAN when connected straight to it, the site hub's on the site network.
//!
//! usage: bench-wan [--devices N] [--idle-seconds S]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hub::config::Upstream;
use hub::{BrokerSetting, Config, Hub};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use testkit::fleet::{FailureScript, SimSpec, SimulatedFleet};
use testkit::image::{build_oci_layout, RunConfig};
use testkit::{CuttingProxy, Registry};
use tokio::sync::oneshot;

const SITE: &str = "site-1";
const SITE_TOKEN: &str = "site-token";
const LAYER: usize = 4 << 20;
const WAIT: Duration = Duration::from_secs(180);
/// Pulls under way at once, as devices of a site would start them.
const PULLS_AT_ONCE: usize = 10;

struct Args {
    devices: usize,
    idle: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args { devices: 100, idle: Duration::from_secs(120) };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--devices" => args.devices = value.parse().context("--devices takes a number")?,
            "--idle-seconds" => args.idle = Duration::from_secs(value.parse().context("--idle-seconds takes seconds")?),
            other => bail!("unknown flag {other}: bench-wan [--devices N] [--idle-seconds S]"),
        }
    }
    Ok(args)
}

/// A hub served in-process until dropped.
struct RunningHub {
    http: SocketAddr,
    mqtt: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start_hub(config: Config) -> anyhow::Result<RunningHub> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = listener.local_addr()?;
    let hub = Hub::start(config)?;
    let mqtt = hub.mqtt_addr().context("an embedded broker")?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(hub.serve(listener, async move {
        let _ = stopped.await;
    }));
    Ok(RunningHub { http, mqtt, _stop: stop })
}

fn hub_config(dir: &Path, registry: &str) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        http: "127.0.0.1:0".parse().expect("an address"),
        mqtt_listen: "127.0.0.1:0".parse().expect("an address"),
        insecure_registries: vec![registry.to_string()],
        ..Config::default()
    }
}

fn tokens(devices: &[SimSpec]) -> BTreeMap<String, String> {
    devices.iter().map(|d| (d.id.clone(), d.token.clone())).collect()
}

/// The WAN: one proxy for MQTT, one for HTTP; bytes both ways.
struct Wan {
    mqtt: CuttingProxy,
    http: CuttingProxy,
}

impl Wan {
    async fn to(cloud: &RunningHub) -> anyhow::Result<Self> {
        Ok(Self { mqtt: CuttingProxy::start(cloud.mqtt).await?, http: CuttingProxy::start(cloud.http).await? })
    }

    fn bytes(&self) -> u64 {
        [&self.mqtt, &self.http].iter().map(|p| p.downstream_bytes() + p.upstream_bytes()).sum()
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> anyhow::Result<serde_json::Value> {
    Ok(client.get(url).send().await?.error_for_status()?.json().await?)
}

async fn wait_until<F: std::future::Future<Output = anyhow::Result<bool>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !check().await? {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Pulls `image` from the registry mirror at `mirror`, `times` times.
async fn pull(mirror: SocketAddr, repository: &str, digest: &str, times: usize) -> anyhow::Result<()> {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![mirror.to_string()]),
        ..Default::default()
    });
    let reference = Reference::with_digest(mirror.to_string(), repository.to_string(), digest.to_string());
    let layers = vec!["application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar"];
    let mut left = times;
    while left > 0 {
        let batch = left.min(PULLS_AT_ONCE);
        let pulls = (0..batch).map(|_| client.pull(&reference, &RegistryAuth::Anonymous, layers.clone()));
        for pulled in futures_util::future::join_all(pulls).await {
            pulled.with_context(|| format!("pulling {reference}"))?;
        }
        left -= batch;
    }
    Ok(())
}

struct Figures {
    connect: u64,
    rollout: u64,
    idle_per_hour: u64,
}

/// One scenario: devices at `device_mqtt`, pulling from `mirror`, the
/// deployment applied at the cloud. WAN bytes from the devices' connection
/// on.
async fn scenario(
    cloud: &RunningHub,
    wan: &Wan,
    devices: Vec<SimSpec>,
    device_mqtt: SocketAddr,
    mirror: SocketAddr,
    image: &Image,
    idle: Duration,
) -> anyhow::Result<Figures> {
    let http = reqwest::Client::new();
    let api = format!("http://{}", cloud.http);
    let count = devices.len();
    let start = wan.bytes();
    let fleet = SimulatedFleet::start(device_mqtt, devices, FailureScript::healthy());
    wait_until("every device online at the cloud", || {
        let (http, api) = (http.clone(), api.clone());
        async move {
            let devices = get_json(&http, &format!("{api}/v1/devices")).await?;
            Ok(devices.as_array().map_or(0, |d| d.iter().filter(|d| d["online"] == true).count()) == count)
        }
    })
    .await?;
    let connected = wan.bytes();

    let spec = serde_json::json!({
        "name": "camera",
        "strategy": { "waves": ["100%"], "min-healthy": "0s" },
        "workloads": [{ "name": "cam", "image": format!("{}@{}", image.name, image.digest) }],
    });
    http.put(format!("{api}/v1/deployments/camera")).json(&spec).send().await?.error_for_status()?;
    wait_until("every device stored the revision", || async { Ok(fleet.running("camera", 1) == count) }).await?;
    pull(mirror, &image.name, &image.digest, count).await?;
    wait_until("the rollout complete at the cloud", || {
        let (http, api) = (http.clone(), api.clone());
        async move {
            let status = get_json(&http, &format!("{api}/v1/deployments/camera")).await?;
            Ok(status["rollout"]["state"] == "complete")
        }
    })
    .await?;
    let rolled_out = wan.bytes();

    tokio::time::sleep(idle).await;
    let idle_bytes = wan.bytes() - rolled_out;
    fleet.stop().await;
    Ok(Figures {
        connect: connected - start,
        rollout: rolled_out - connected,
        idle_per_hour: idle_bytes * 3600 / idle.as_secs().max(1),
    })
}

struct Image {
    /// `REGISTRY/app`, as devices name it.
    name: String,
    digest: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let dir = tempfile::tempdir()?;
    let registry = Registry::start().context("Debian's docker-registry (apt-get install docker-registry)")?;
    let layout = dir.path().join("layout");
    build_oci_layout(&layout, "app:1", &[testkit::layers::random_file("data", LAYER)?], &RunConfig::default())?;
    registry.push(&layout, "app:1")?;
    let registry_host = registry.addr().to_string();
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"].as_str().context("the layout's manifest")?.to_string();
    let image = Image { name: format!("{registry_host}/app"), digest };
    let devices = SimSpec::numbered(args.devices);

    // Straight to the cloud: MQTT and every pull cross the WAN.
    let cloud =
        start_hub(Config { devices: tokens(&devices), ..hub_config(&dir.path().join("direct-cloud"), &registry_host) })
            .await?;
    let wan = Wan::to(&cloud).await?;
    let direct = scenario(&cloud, &wan, devices.clone(), wan.mqtt.addr(), wan.http.addr(), &image, args.idle).await?;
    drop(cloud);

    // Through a site hub: the devices and their pulls stay on the site network.
    let cloud = start_hub(Config {
        sites: [(SITE.to_string(), SITE_TOKEN.to_string())].into(),
        ..hub_config(&dir.path().join("site-cloud"), &registry_host)
    })
    .await?;
    let wan = Wan::to(&cloud).await?;
    let upstream = Upstream {
        mqtt: BrokerSetting::External { host: "127.0.0.1".into(), port: wan.mqtt.addr().port() },
        site: SITE.into(),
        token: SITE_TOKEN.into(),
        http: Some(format!("http://{}", wan.http.addr())),
        tls: None,
    };
    let site = start_hub(Config {
        devices: tokens(&devices),
        upstream: Some(upstream),
        ..hub_config(&dir.path().join("site"), &registry_host)
    })
    .await?;
    let through_site = scenario(&cloud, &wan, devices, site.mqtt, site.http, &image, args.idle).await?;

    let kib = |b: u64| b as f64 / 1024.0;
    println!(
        "{} devices, one revision of an image with a {} MiB layer; WAN bytes both ways:",
        args.devices,
        LAYER >> 20
    );
    println!("| path | connect (KiB) | rollout (KiB) | idle per hour (KiB) |");
    println!("|---|---|---|---|");
    for (name, f) in [("straight to the cloud hub", &direct), ("through a site hub", &through_site)] {
        println!("| {name} | {:.1} | {:.1} | {:.1} |", kib(f.connect), kib(f.rollout), kib(f.idle_per_hour));
    }
    println!(
        "rollout: {:.1} times fewer WAN bytes through the site hub (target: at least 50)",
        direct.rollout as f64 / through_site.rollout.max(1) as f64
    );
    Ok(())
}
