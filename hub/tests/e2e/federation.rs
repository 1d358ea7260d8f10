//! A cloud hub with a site hub below it, over a WAN link the tests cut and
//! restore with a proxy (docs/federation.md); simulated devices at the site.

use std::time::Duration;

use hub::config::Upstream;
use hub::{BrokerSetting, Config};
use testkit::proxy::CuttingProxy;

use outpost_proto::sync::Channel;

use crate::artifacts::{host, pull_through, put_artifact, random_bytes};
use crate::cli::{hub_cli, stderr, stdout};
use crate::commands::{logs_for, logs_reply};
use crate::rollouts::rollout_reaches;
use crate::support::*;

const SITE: &str = "rig-7";
const SITE_TOKEN: &str = "site-token";

/// A cloud hub that knows the site, and the WAN proxy in front of its broker.
async fn cloud(dir: &std::path::Path) -> (TestHub, CuttingProxy) {
    let config = Config {
        sites: [(SITE.to_string(), SITE_TOKEN.to_string())].into(),
        devices: Default::default(),
        ..config(dir)
    };
    let cloud = TestHub::start(config).await;
    let wan = CuttingProxy::start(cloud.mqtt).await.unwrap();
    (cloud, wan)
}

/// A cloud hub, the WAN proxy in front of its broker, and a site hub behind
/// it; the directories live as long as the hubs.
struct Topology {
    cloud: TestHub,
    wan: CuttingProxy,
    site: TestHub,
    _dirs: [tempfile::TempDir; 2],
}

impl Topology {
    async fn start() -> Self {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (cloud, wan) = cloud(dirs[0].path()).await;
        let site = TestHub::start(site_config(dirs[1].path(), &wan)).await;
        Self { cloud, wan, site, _dirs: dirs }
    }
}

fn site_config(dir: &std::path::Path, wan: &CuttingProxy) -> Config {
    let upstream = Upstream {
        mqtt: BrokerSetting::External { host: "127.0.0.1".into(), port: wan.addr().port() },
        site: SITE.into(),
        token: SITE_TOKEN.into(),
        http: None,
        tls: None,
    };
    Config { upstream: Some(upstream), ..config(dir) }
}

#[tokio::test]
async fn reports_and_events_made_while_the_wan_is_cut_reach_the_cloud_once_after_it_returns() {
    let Topology { cloud, wan, site, _dirs } = Topology::start().await;
    let pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.report(&report(1, true, 0, &[("web", "running")], &[])).await;
    pump.events(&[1, 2]).await;
    let view = cloud
        .wait_for_device("pump-3", "its report through the site", |d| d["report_seq"] == 1 && d["event_seq"] == 2)
        .await;
    assert_eq!(view["site"], SITE, "{view}");
    assert_eq!(view["online"], true, "{view}");

    wan.set_link_down(true);
    cloud.wait_for_device("pump-3", "offline with its site", |d| d["online"] == false).await;
    pump.report(&report(2, false, 0, &[("web", "exited")], &[])).await;
    pump.events(&[3, 4, 5]).await;
    // The site answers for the device meanwhile: it is managed on site.
    site.wait_for_device("pump-3", "the report at the site", |d| d["report_seq"] == 2 && d["event_seq"] == 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cloud.device("pump-3").await["event_seq"], 2, "nothing crossed the cut link");

    wan.set_link_down(false);
    let view = cloud
        .wait_for_device("pump-3", "what it said during the cut", |d| {
            d["report_seq"] == 2 && d["event_seq"] == 5 && d["online"] == true
        })
        .await;
    assert_eq!(workloads(&view)["web"], "exited", "{view}");
    assert_eq!(cloud.event_seqs("pump-3").await, [1, 2, 3, 4, 5], "each event once");
    let (_, sites) = cloud.get("/v1/sites").await;
    assert_eq!(sites[0]["id"], SITE, "{sites}");
    assert_eq!(sites[0]["online"], true, "{sites}");
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_desired_state_set_at_the_cloud_during_the_cut_reaches_the_device_when_the_wan_returns() {
    let Topology { cloud, wan, site, _dirs } = Topology::start().await;
    let mut pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.report(&report(1, true, 0, &[], &[])).await;
    cloud.wait_for_device("pump-3", "known through the site", |d| d["site"] == SITE).await;

    cloud.set_generation("pump-3", 1).await;
    assert_eq!(pump.desired(1).await.state.generation, 1);

    wan.set_link_down(true);
    cloud.wait_for_device("pump-3", "offline with its site", |d| d["online"] == false).await;
    cloud.set_generation("pump-3", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pump.drain().is_empty(), "nothing crossed the cut link");
    wan.set_link_down(false);
    assert_eq!(pump.desired(2).await.state.generation, 2);
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_site_hub_restarted_during_the_cut_loses_nothing_it_queued() {
    let Topology { cloud, wan, site, _dirs } = Topology::start().await;
    let pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.events(&[1]).await;
    cloud.wait_for_device("pump-3", "its first event", |d| d["event_seq"] == 1).await;

    wan.set_link_down(true);
    pump.events(&[2, 3]).await;
    site.wait_for_device("pump-3", "the events at the site", |d| d["event_seq"] == 3).await;
    drop(pump);
    site.stop().await;
    let site = TestHub::start(site_config(_dirs[1].path(), &wan)).await;
    wan.set_link_down(false);
    cloud.wait_for_device("pump-3", "the events queued before the restart", |d| d["event_seq"] == 3).await;
    assert_eq!(cloud.event_seqs("pump-3").await, [1, 2, 3]);
    site.stop().await;
    cloud.stop().await;
}

/// Copies a hub's data dir as it is on disk now, while the hub runs: what a
/// SIGKILL of the hub at this instant would leave (sled keeps what it has
/// not flushed in the process's memory, which the copy does not see).
fn copy_as_on_disk(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_as_on_disk(&entry.path(), &target);
        } else {
            // A file sled removes meanwhile is one it no longer needs.
            let _ = std::fs::copy(entry.path(), target);
        }
    }
}

/// Found by the chaos hw-test: a site hub killed just after it passed a
/// desired state on came back without it, served the device an older
/// generation, and sent the device's reports of the newer one up as the
/// older one, so that the cloud never saw the device take its revision.
#[tokio::test]
async fn a_desired_state_from_the_parent_is_on_the_sites_disk_before_its_device_gets_it() {
    let Topology { cloud, wan: _wan, site, _dirs } = Topology::start().await;
    let mut pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.report(&report(1, true, 0, &[], &[])).await;
    cloud.wait_for_device("pump-3", "known through the site", |d| d["site"] == SITE).await;
    for generation in 1..=5 {
        cloud.set_generation("pump-3", generation).await;
        pump.desired(generation).await;
        let crashed = tempfile::tempdir().unwrap();
        copy_as_on_disk(_dirs[1].path(), crashed.path());
        // The copy on its own, not linked to the cloud: only what it has on disk.
        let copy = TestHub::start(config(crashed.path())).await;
        let (status, stored) = copy.get("/v1/devices/pump-3/desired").await;
        assert_eq!((status, stored["generation"].as_u64()), (200, Some(generation)), "{stored}");
        copy.stop().await;
    }
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_site_hub_cannot_speak_for_another_sites_topics_or_a_device_directly() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, _wan) = cloud(dir.path()).await;
    let mut options = rumqttc::MqttOptions::new(SITE, "127.0.0.1", cloud.mqtt.port());
    options.set_credentials(SITE, SITE_TOKEN);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
    let subacks = tokio::spawn(async move {
        let mut codes = Vec::new();
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack))) => {
                    codes.extend(ack.return_codes);
                    if codes.len() == 3 {
                        return codes;
                    }
                }
                Ok(_) => {}
                // Held off until the hub subscribed: polling again reconnects.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    for filter in ["outpost/v1/sites/rig-8/desired/+", "outpost/v1/pump-3/desired", "outpost/v1/sites/rig-7/desired/+"]
    {
        client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.unwrap();
    }
    let codes = within(WAIT, subacks).await.expect("three subacks").unwrap();
    use rumqttc::SubscribeReasonCode::{Failure, Success};
    assert_eq!(codes, [Failure, Failure, Success(rumqttc::QoS::AtLeastOnce)]);
    cloud.stop().await;
}

/// A site hub whose cache asks the cloud's through `wan_http`.
fn site_with_cache(dir: &std::path::Path, wan: &CuttingProxy, wan_http: &CuttingProxy) -> Config {
    let mut config = site_config(dir, wan);
    config.upstream.as_mut().unwrap().http = Some(format!("http://{}", wan_http.host()));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_crosses_the_wan_once_for_all_the_sites_devices_and_is_served_while_the_wan_is_cut() {
    let (cloud_dir, site_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cloud, wan) = cloud(cloud_dir.path()).await;
    let artifact = random_bytes(1 << 20);
    let digest = ota::Digest::of(&artifact).to_string();
    assert_eq!(put_artifact(&cloud, &digest, artifact.clone()).await.0, 201);
    let timestamp = br#"{"signed": {"_type": "timestamp"}, "signatures": []}"#.to_vec();
    let pushed = reqwest::Client::new().put(format!("{}/v1/tuf/timestamp.json", cloud.api)).body(timestamp.clone());
    assert_eq!(pushed.send().await.unwrap().status(), 204);
    let wan_http = CuttingProxy::start(host(&cloud).parse().unwrap()).await.unwrap();
    let site = TestHub::start(site_with_cache(site_dir.path(), &wan, &wan_http)).await;

    let get = |path: String| async move { reqwest::get(path).await.unwrap().bytes().await.unwrap().to_vec() };
    let url = format!("{}/v1/artifacts/{digest}", site.api);
    let (a, b, c) = tokio::join!(get(url.clone()), get(url.clone()), get(url.clone()));
    assert!(a == artifact && b == artifact && c == artifact, "every device gets the artifact");
    let crossed = wan_http.downstream_bytes();
    assert!(
        crossed < artifact.len() as u64 + 16 * 1024,
        "{crossed} bytes crossed the WAN for one {} byte artifact",
        artifact.len()
    );
    assert_eq!(get(format!("{}/v1/tuf/timestamp.json", site.api)).await, timestamp);

    wan_http.set_link_down(true);
    assert_eq!(get(url).await, artifact, "served from the site cache while the WAN is cut");
    assert_eq!(get(format!("{}/v1/tuf/timestamp.json", site.api)).await, timestamp, "the last metadata kept");
    let missing = reqwest::get(format!("{}/v1/artifacts/{}", site.api, ota::Digest::of(b"other"))).await.unwrap();
    assert_eq!(missing.status(), 502, "an artifact the site never had cannot be fetched while the WAN is cut");
    site.stop().await;
    cloud.stop().await;
}

/// A registry holding app:1 (one random layer of `layer` bytes), a cloud hub
/// that mirrors it, and a site hub whose cache asks the cloud over a WAN
/// proxy, cut every `cut_every` bytes if given.
struct ImageBehindCloud {
    cloud: TestHub,
    site: TestHub,
    wan_http: CuttingProxy,
    registry_host: String,
    _wan: CuttingProxy,
    _registry: testkit::Registry,
    _dirs: [tempfile::TempDir; 2],
}

impl ImageBehindCloud {
    async fn start(layer: usize, cut_every: Option<u64>) -> Self {
        use testkit::image::{build_oci_layout, RunConfig};
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let registry = testkit::Registry::start().unwrap();
        let layout = dirs[0].path().join("layout");
        let layer = testkit::layers::random_file("data", layer).unwrap();
        build_oci_layout(&layout, "app:1", &[layer], &RunConfig::default()).unwrap();
        registry.push(&layout, "app:1").unwrap();
        let registry_host = registry.addr().to_string();
        let mut cloud_config = Config {
            sites: [(SITE.to_string(), SITE_TOKEN.to_string())].into(),
            ..config(&dirs[0].path().join("hub"))
        };
        cloud_config.insecure_registries = vec![registry_host.clone()];
        let cloud = TestHub::start(cloud_config).await;
        let wan = CuttingProxy::start(cloud.mqtt).await.unwrap();
        let wan_http = CuttingProxy::start(host(&cloud).parse().unwrap()).await.unwrap();
        if let Some(bytes) = cut_every {
            wan_http.cut_every(bytes);
        }
        let site = TestHub::start(site_with_cache(dirs[1].path(), &wan, &wan_http)).await;
        Self { cloud, site, wan_http, registry_host, _wan: wan, _registry: registry, _dirs: dirs }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_pulled_at_the_site_comes_through_the_clouds_mirror_once() {
    let ImageBehindCloud { cloud, site, wan_http, registry_host, _wan, _registry, _dirs } =
        ImageBehindCloud::start(1 << 20, None).await;

    let name = format!("{registry_host}/app");
    let site_host = host(&site);
    let (first, second) = tokio::join!(pull_through(&site_host, &name, "1"), pull_through(&site_host, &name, "1"));
    assert_eq!(first.layers[0].data, second.layers[0].data);
    let crossed = wan_http.downstream_bytes();
    assert!(crossed < (1 << 20) + 64 * 1024, "{crossed} bytes crossed the WAN for a 1 MiB layer pulled twice");
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_rollout_started_at_the_cloud_during_the_cut_counts_the_site_offline_and_completes_after_it_returns() {
    let Topology { cloud, wan, site, _dirs } = Topology::start().await;
    let mut pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.report(&report(1, true, 0, &[], &[])).await;
    cloud.wait_for_device("pump-3", "known through the site", |d| d["site"] == SITE && d["online"] == true).await;

    wan.set_link_down(true);
    cloud.wait_for_device("pump-3", "offline with its site", |d| d["online"] == false).await;
    let spec = serde_json::json!({
        "name": "app",
        "strategy": { "waves": ["100%"], "min-healthy": "0s", "device-timeout": "1s" },
        "workloads": [{ "name": "web", "image": pinned("web:1") }],
    });
    let (status, body) = cloud.put("/v1/deployments/app", &spec.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let offline =
        rollout_reaches(&cloud, "app", "the cut site's device offline", |s| s["rollout"]["counts"]["offline"] == 1)
            .await;
    assert_eq!(offline["rollout"]["counts"]["failed"], 0, "{offline}");
    let (_, sites) = cloud.get("/v1/sites").await;
    assert_eq!(sites[0]["online"], false, "{sites}");
    assert_eq!(sites[0]["devices"][0]["not_received"], serde_json::json!(["app@1"]), "{sites}");

    wan.set_link_down(false);
    let desired = pump.desired_with("app", 1).await;
    let generation = desired.state.generation;
    let mut running = report(2, true, generation, &[("web", "running")], &[]);
    running.workloads[0].deployment = Some("app".into());
    running.workloads[0].revision = Some(1);
    pump.report(&running).await;
    let complete = rollout_reaches(&cloud, "app", "complete", |s| s["rollout"]["state"] == "complete").await;
    assert_eq!(complete["rollout"]["counts"]["healthy"], 1, "{complete}");
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn with_two_sites_a_cut_at_one_leaves_the_other_reporting_and_each_device_reached_through_its_own_site() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let cloud = TestHub::start(Config {
        sites: [(SITE.to_string(), SITE_TOKEN.to_string()), ("rig-8".to_string(), "other-token".to_string())].into(),
        devices: Default::default(),
        ..config(dirs[0].path())
    })
    .await;
    let (wan_a, wan_b) =
        (CuttingProxy::start(cloud.mqtt).await.unwrap(), CuttingProxy::start(cloud.mqtt).await.unwrap());
    let site_a = TestHub::start(site_config(dirs[1].path(), &wan_a)).await;
    let mut b_config = site_config(dirs[2].path(), &wan_b);
    let upstream = b_config.upstream.as_mut().unwrap();
    (upstream.site, upstream.token) = ("rig-8".into(), "other-token".into());
    let site_b = TestHub::start(b_config).await;
    let pump_a = DeviceSimulator::connect(site_a.mqtt, "pump-3", token("pump-3")).await;
    let mut pump_b = DeviceSimulator::connect(site_b.mqtt, "pump-4", token("pump-4")).await;
    pump_a.report(&report(1, true, 0, &[], &[])).await;
    pump_b.report(&report(1, true, 0, &[], &[])).await;
    cloud.wait_for_device("pump-3", "known through rig-7", |d| d["site"] == SITE).await;
    cloud.wait_for_device("pump-4", "known through rig-8", |d| d["site"] == "rig-8").await;

    wan_a.set_link_down(true);
    cloud.wait_for_device("pump-3", "offline with rig-7", |d| d["online"] == false).await;
    pump_b.events(&[1]).await;
    cloud.wait_for_device("pump-4", "its event through rig-8", |d| d["event_seq"] == 1 && d["online"] == true).await;
    cloud.set_generation("pump-4", 1).await;
    assert_eq!(pump_b.desired(1).await.state.generation, 1, "rig-8 serves its device while rig-7 is cut");

    wan_a.set_link_down(false);
    cloud.wait_for_device("pump-3", "back with rig-7", |d| d["online"] == true).await;
    let (_, sites) = cloud.get("/v1/sites").await;
    let devices_of = |site: &str| -> Vec<String> {
        let site = sites.as_array().unwrap().iter().find(|s| s["id"] == site).unwrap();
        site["devices"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!((devices_of(SITE), devices_of("rig-8")), (vec!["pump-3".to_string()], vec!["pump-4".to_string()]));
    for hub in [site_a, site_b, cloud] {
        hub.stop().await;
    }
}

#[tokio::test]
async fn an_operators_command_at_the_cloud_reaches_a_device_behind_a_site_and_its_logs_come_back() {
    let Topology { cloud, wan: _wan, site, _dirs } = Topology::start().await;
    let mut pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.report(&report(1, true, 0, &[("web", "running")], &[])).await;
    cloud.wait_for_device("pump-3", "known through the site", |d| d["site"] == SITE).await;

    let (status, body) =
        cloud.post("/v1/devices/pump-3/commands", r#"{"command":"send-logs","name":"web","tail":2}"#).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_u64().unwrap();
    let command = pump.command().await;
    assert_eq!(command.id, id, "the site passes the cloud's command on with the cloud's number");
    pump.publish(Channel::Logs, false, logs_reply(id, "web", &["one", "two"], None)).await;
    let reply = logs_for(&cloud, "web", id).await;
    assert_eq!(reply["lines"], serde_json::json!(["one", "two"]), "{reply}");
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn events_streamed_through_a_wan_cut_every_few_acks_reach_the_cloud_each_once_and_in_order() {
    let Topology { cloud, wan, site, _dirs } = Topology::start().await;
    let pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.events(&[1]).await;
    cloud.wait_for_device("pump-3", "its first event", |d| d["event_seq"] == 1).await;

    // The link to the cloud is cut each time 120 more bytes came down it
    // (a few acks): batches in flight and acks are lost, over and over.
    wan.cut_every(120);
    for first in (2..=200).step_by(10) {
        pump.events(&(first..first + 10).collect::<Vec<_>>()).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    site.wait_for_device("pump-3", "every event at the site", |d| d["event_seq"] == 201).await;
    wan.cut_every(u64::MAX);
    cloud.wait_for_device("pump-3", "every event at the cloud", |d| d["event_seq"] == 201).await;
    assert_eq!(cloud.event_seqs("pump-3").await, (1..=201).collect::<Vec<u64>>(), "each event once, in order");
    assert!(wan.cuts() >= 2, "the link was cut {} times", wan.cuts());
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_site_hub_refuses_a_desired_state_set_by_hand_saying_to_apply_a_deployment() {
    let Topology { cloud, wan: _wan, site, _dirs } = Topology::start().await;
    let (status, body) = site.put("/v1/devices/pump-3/desired", &desired_json(1)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("apply a deployment here"), "{body}");
    site.stop().await;
    cloud.stop().await;
}

/// The deployments of a desired state, as (name, revision, image of its first workload).
fn running(desired: &outpost_proto::sync::DesiredMessage) -> Vec<(String, u64, String)> {
    desired.state.deployments.iter().map(|d| (d.name.clone(), d.revision, d.workloads[0].image.clone())).collect()
}

/// A full report of every active workload of `desired` running.
fn all_running(seq: u64, desired: &outpost_proto::sync::DesiredMessage) -> outpost_proto::sync::Report {
    let mut out = report(seq, true, desired.state.generation, &[], &[]);
    for d in &desired.state.deployments {
        for w in d.active_workloads() {
            let mut w_report = workload(&w.name, "running");
            w_report.deployment = Some(d.name.clone());
            w_report.revision = Some(d.revision);
            out.workloads.push(w_report);
        }
    }
    out
}

#[tokio::test]
async fn a_site_local_deployment_applied_during_the_cut_runs_beside_the_clouds_and_the_cloud_wins_what_it_changes_after(
) {
    let Topology { cloud, wan, site, _dirs } = Topology::start().await;
    let mut pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.report(&report(1, true, 0, &[], &[])).await;
    cloud.wait_for_device("pump-3", "known through the site", |d| d["site"] == SITE).await;
    let spec = |name: &str, workload: &str, image: &str| {
        serde_json::json!({
            "name": name,
            "strategy": { "waves": ["100%"], "min-healthy": "0s" },
            "workloads": [{ "name": workload, "image": pinned(image) }],
        })
        .to_string()
    };
    assert_eq!(cloud.put("/v1/deployments/app", &spec("app", "web", "web:1")).await.0, 200);
    let desired = pump.desired_with("app", 1).await;
    pump.report(&all_running(2, &desired)).await;
    rollout_reaches(&cloud, "app", "complete", |s| s["rollout"]["state"] == "complete").await;
    let parent_generation = cloud.device("pump-3").await["desired_generation"].clone();

    // On site, with the WAN cut: a deployment the cloud does not know.
    wan.set_link_down(true);
    let (status, body) = site.put("/v1/deployments/kiosk", &spec("kiosk", "screen", "screen:1")).await;
    assert_eq!(status, 200, "{body}");
    let desired = pump.desired_with("kiosk", 1).await;
    assert_eq!(running(&desired), [("app".into(), 1, pinned("web:1")), ("kiosk".into(), 1, pinned("screen:1"))]);
    pump.report(&all_running(3, &desired)).await;

    // Back: the cloud sees the site-local workload, and its own rollout still holds,
    // the device's generation being the cloud's, not the site's.
    wan.set_link_down(false);
    let view =
        cloud.wait_for_device("pump-3", "the site-local workload", |d| workloads(d).contains_key("screen")).await;
    assert_eq!(view["generation"], parent_generation, "{view}");
    assert_eq!(view["site_local"], serde_json::json!(["kiosk"]), "marked site-local at the cloud: {view}");
    let status = cloud.get("/v1/deployments/app").await.1;
    assert_eq!(status["rollout"]["counts"]["healthy"], 1, "{status}");

    // A name in both: the site's change, then the cloud's later one, each wins in turn.
    assert_eq!(site.put("/v1/deployments/app", &spec("app", "web", "web:site")).await.0, 200);
    let desired = pump.desired_with("app", 1).await;
    let local_app = running(&desired).into_iter().find(|(name, ..)| name == "app").unwrap();
    assert_eq!(local_app.2, pinned("web:site"), "the site changed app after the cloud");
    assert_eq!(cloud.put("/v1/deployments/app", &spec("app", "web", "web:2")).await.0, 200);
    let desired = pump.desired_with("app", 2).await;
    assert_eq!(running(&desired), [("app".into(), 2, pinned("web:2")), ("kiosk".into(), 1, pinned("screen:1"))]);
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_layer_from_the_clouds_mirror_resumes_through_a_wan_cut_every_300_kb_fetching_under_5_percent_more() {
    let ImageBehindCloud { cloud, site, wan_http, registry_host, _wan, _registry, _dirs } =
        ImageBehindCloud::start(3 << 20, Some(300 * 1024)).await;

    let image = pull_through(&host(&site), &format!("{registry_host}/app"), "1").await;
    assert!(image.layers[0].data.len() > 3 << 20, "the layer came whole");
    assert!(wan_http.cuts() >= 9, "the WAN was cut {} times", wan_http.cuts());
    let crossed = wan_http.downstream_bytes() as f64;
    let size = image.layers[0].data.len() as f64;
    assert!(crossed <= size * 1.05, "{crossed} bytes crossed the WAN for a layer of {size} bytes");
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_from_the_parent_resumes_through_a_wan_cut_every_300_kb_fetching_under_5_percent_more() {
    let (cloud_dir, site_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cloud, wan) = cloud(cloud_dir.path()).await;
    let artifact = random_bytes(3 << 20);
    let digest = ota::Digest::of(&artifact).to_string();
    assert_eq!(put_artifact(&cloud, &digest, artifact.clone()).await.0, 201);
    let wan_http = CuttingProxy::start(host(&cloud).parse().unwrap()).await.unwrap();
    wan_http.cut_every(300 * 1024);
    let site = TestHub::start(site_with_cache(site_dir.path(), &wan, &wan_http)).await;

    let fetched = reqwest::get(format!("{}/v1/artifacts/{digest}", site.api)).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert!(fetched.bytes().await.unwrap() == artifact, "the device gets the artifact whole");
    assert!(wan_http.cuts() >= 9, "the WAN was cut {} times", wan_http.cuts());
    let crossed = wan_http.downstream_bytes() as f64;
    assert!(crossed <= artifact.len() as f64 * 1.05, "{crossed} bytes crossed the WAN for {} bytes", artifact.len());
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_site_cannot_report_for_a_device_another_site_carries() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let cloud = TestHub::start(Config {
        sites: [(SITE.to_string(), SITE_TOKEN.to_string()), ("rig-8".to_string(), "other-token".to_string())].into(),
        devices: Default::default(),
        ..config(dirs[0].path())
    })
    .await;
    let wan = CuttingProxy::start(cloud.mqtt).await.unwrap();
    let site = TestHub::start(site_config(dirs[1].path(), &wan)).await;
    let pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.events(&[1]).await;
    cloud.wait_for_device("pump-3", "its event through rig-7", |d| d["event_seq"] == 1).await;

    // rig-8, a site of the same cloud, forges events and a report for rig-7's device.
    use outpost_proto::federation::{SiteBatch, SiteItem, Upward};
    use outpost_proto::sync::{encode, Encoding, EventBatch, PROTOCOL_VERSION};
    let forged = EventBatch {
        v: PROTOCOL_VERSION,
        epoch: 0,
        events: vec![outpost_proto::Event { seq: 2, at: 2, kind: outpost_proto::EventKind::Applied { generation: 9 } }],
        oldest_held: None,
    };
    // In the same batch, its own device's event: the batch was taken, the forged item left out.
    let own =
        EventBatch { events: vec![outpost_proto::Event { seq: 1, ..forged.events[0].clone() }], ..forged.clone() };
    let items = vec![
        SiteItem { seq: 1, device: "pump-3".into(), at: 1, message: Upward::Events(forged) },
        SiteItem { seq: 2, device: "pump-9".into(), at: 1, message: Upward::Events(own) },
    ];
    let payload = zstd::encode_all(&encode(Encoding::Json, &SiteBatch { v: PROTOCOL_VERSION, items })[..], 3).unwrap();
    let mut options = rumqttc::MqttOptions::new("rig-8", "127.0.0.1", cloud.mqtt.port());
    options.set_credentials("rig-8", "other-token");
    let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
    let poller = tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    client.publish("outpost/v1/sites/rig-8/up", rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
    cloud.wait_for_device("pump-9", "rig-8's own device", |d| d["event_seq"] == 1 && d["site"] == "rig-8").await;

    let view = cloud.device("pump-3").await;
    assert_eq!((view["event_seq"].as_u64(), view["site"].as_str()), (Some(1), Some(SITE)), "{view}");
    assert_eq!(cloud.event_seqs("pump-3").await, [1]);
    poller.abort();
    site.stop().await;
    cloud.stop().await;
}

fn app(revision: &str, waves: serde_json::Value, min_healthy: &str) -> String {
    serde_json::json!({
        "name": "app",
        "strategy": { "waves": waves, "min-healthy": min_healthy },
        "workloads": [{ "name": "web", "image": pinned(&format!("web:{revision}")) }],
    })
    .to_string()
}

/// The revision of `app` in the desired state the site hub serves a device.
async fn app_at_site(site: &TestHub, device: &str) -> Option<u64> {
    let (_, desired) = site.get(&format!("/v1/devices/{device}/desired")).await;
    let deployments = desired["deployments"].as_array()?;
    deployments.iter().find(|d| d["name"] == "app").and_then(|d| d["revision"].as_u64())
}

#[tokio::test]
async fn an_operator_on_site_rolls_the_clouds_revision_back_during_the_cut_and_the_cloud_counts_it_failed_after() {
    let Topology { cloud, wan, site, _dirs } = Topology::start().await;
    let mut pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.report(&report(1, true, 0, &[], &[])).await;
    cloud.wait_for_device("pump-3", "known through the site", |d| d["site"] == SITE).await;
    assert_eq!(cloud.put("/v1/deployments/app", &app("1", serde_json::json!(["100%"]), "0s")).await.0, 200);
    let desired = pump.desired_with("app", 1).await;
    pump.report(&all_running(2, &desired)).await;
    rollout_reaches(&cloud, "app", "complete", |s| s["rollout"]["state"] == "complete").await;
    // Revision 2 runs but is not yet healthy for long enough: the rollout is still going.
    assert_eq!(cloud.put("/v1/deployments/app", &app("2", serde_json::json!(["100%"]), "1h")).await.0, 200);
    let desired = pump.desired_with("app", 2).await;
    pump.report(&all_running(3, &desired)).await;

    wan.set_link_down(true);
    let (status, body) = site.post("/v1/deployments/app/rollout/rollback", "").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("hub hold rollback app"), "{body}");
    let (status, hold) =
        site.put("/v1/site-holds/app", r#"{"action": "rollback", "reason": "pump 3 overheats"}"#).await;
    assert_eq!(status, 200, "{hold}");
    assert_eq!(hold["action"], serde_json::json!({ "rollback": { "to": 1 } }), "{hold}");
    assert_eq!(hold["devices_held"], serde_json::json!(["pump-3"]), "{hold}");
    let desired = pump.desired_with("app", 1).await;
    assert_eq!(running(&desired), [("app".into(), 1, pinned("web:1"))], "the site sent revision 1 back");
    pump.report(&all_running(4, &desired)).await;

    wan.set_link_down(false);
    let stopped = rollout_reaches(&cloud, "app", "rolled back", |s| s["rollout"]["state"] == "rolled-back").await;
    let reason = stopped["rollout"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("1 of 1 reachable devices failed revision 2"), "{stopped}");
    let device = cloud.device("pump-3").await;
    assert_eq!(workloads(&device).get("web").map(String::as_str), Some("running"), "{device}");
    let (status, _) = site.post("/v1/deployments/app/rollout/rollback", "").await;
    assert_eq!(status, 404);
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_rollout_paused_on_site_keeps_the_sites_devices_on_their_revision_and_the_cloud_counts_them_waiting() {
    let Topology { cloud, wan, site, _dirs } = Topology::start().await;
    let mut pumps = Vec::new();
    for id in ["pump-3", "pump-4"] {
        let pump = DeviceSimulator::connect(site.mqtt, id, token(id)).await;
        pump.report(&report(1, true, 0, &[], &[])).await;
        cloud.wait_for_device(id, "known through the site", |d| d["site"] == SITE).await;
        pumps.push(pump);
    }
    assert_eq!(cloud.put("/v1/deployments/app", &app("1", serde_json::json!(["100%"]), "0s")).await.0, 200);
    for pump in &mut pumps {
        let desired = pump.desired_with("app", 1).await;
        pump.report(&all_running(2, &desired)).await;
    }
    rollout_reaches(&cloud, "app", "complete", |s| s["rollout"]["state"] == "complete").await;

    // Revision 2 in two waves; the first reaches one pump.
    assert_eq!(cloud.put("/v1/deployments/app", &app("2", serde_json::json!(["1", "100%"]), "0s")).await.0, 200);
    let first = within(WAIT, async {
        loop {
            for (i, id) in ["pump-3", "pump-4"].iter().enumerate() {
                if app_at_site(&site, id).await == Some(2) {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the first wave reached the site");
    let (second_id, first_id) = (["pump-3", "pump-4"][1 - first], ["pump-3", "pump-4"][first]);

    // On site, with the WAN cut: pause it. The first pump keeps revision 2, and is healthy.
    wan.set_link_down(true);
    let paused = hub_cli(&site.api, &["hold", "pause", "app", "--reason", "night shift"]).await;
    assert!(paused.status.success(), "{}", stderr(&paused));
    assert_eq!(stdout(&paused), "app: paused (revisions up to 2), 0 devices held back\n");
    let desired = pumps[first].desired_with("app", 2).await;
    pumps[first].report(&all_running(3, &desired)).await;

    // Back: the cloud's next wave gives the second pump revision 2, which the site holds back.
    wan.set_link_down(false);
    let sites = within(WAIT, async {
        loop {
            let (_, sites) = cloud.get("/v1/sites").await;
            let held =
                sites[0]["devices"].as_array().unwrap().iter().any(|d| !d["held"].as_array().unwrap().is_empty());
            if held {
                return sites;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the cloud hears that the site holds revision 2 back");
    let second = sites[0]["devices"].as_array().unwrap().iter().find(|d| d["id"] == second_id).unwrap().clone();
    assert_eq!(second["held"], serde_json::json!(["app@2: paused at site rig-7: night shift"]), "{sites}");
    assert_eq!(app_at_site(&site, second_id).await, Some(1), "the second pump stays on revision 1");
    assert_eq!(app_at_site(&site, first_id).await, Some(2));
    let status = rollout_reaches(&cloud, "app", "the held pump waiting for its site", |s| {
        s["rollout"]["counts"]["offline"] == 1
    })
    .await;
    assert_eq!(status["rollout"]["state"], "progressing", "{status}");
    assert_eq!(status["rollout"]["counts"]["failed"], 0, "{status}");
    assert_eq!(site.get("/v1/site-holds").await.1[0]["devices_held"], serde_json::json!([second_id]));
    let holds = stdout(&hub_cli(&site.api, &["holds"]).await);
    assert!(holds.contains(second_id) && holds.contains("night shift"), "{holds}");

    // Released on site: the second pump gets revision 2 and the cloud's rollout completes.
    let released = hub_cli(&site.api, &["hold", "release", "app"]).await;
    assert!(released.status.success(), "{}", stderr(&released));
    let desired = pumps[1 - first].desired_with("app", 2).await;
    pumps[1 - first].report(&all_running(3, &desired)).await;
    rollout_reaches(&cloud, "app", "complete", |s| s["rollout"]["state"] == "complete").await;
    site.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_hold_on_a_hub_without_a_parent_or_on_a_deployment_the_site_never_received_is_refused() {
    let Topology { cloud, wan: _wan, site, _dirs } = Topology::start().await;
    let (status, body) = cloud.put("/v1/site-holds/app", r#"{"action": "pause"}"#).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no parent"), "{body}");
    let (status, body) = site.put("/v1/site-holds/app", r#"{"action": "pause"}"#).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = site.put("/v1/site-holds/app", r#"{"action": "stop"}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(site.delete("/v1/site-holds/app").await.0, 404);
    site.stop().await;
    cloud.stop().await;
}
