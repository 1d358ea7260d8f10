//! The `hub` binary's operator commands, against an in-process hub.

use std::future::Future;
use std::process::Output;

use outpost_proto::sync::{Encoding, Topics};
use tokio::process::Command;

use crate::support::*;

/// Runs `hub --hub-url API ARGS...`; the future owns what it needs, so it can be spawned.
pub(crate) fn hub_cli(api: &str, args: &[&str]) -> impl Future<Output = Output> + 'static {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hub"));
    command.arg("--hub-url").arg(api).args(args);
    async move { command.output().await.unwrap() }
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const DESIRED: &str = r#"
version = 1
generation = 1

[[deployments]]
name = "app"
revision = 1

[[deployments.workloads]]
name = "web"
image = "web:1"
"#;

#[tokio::test]
async fn the_cli_sets_a_desired_state_and_watches_the_device_converge() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    let file = dir.path().join("desired.toml");
    std::fs::write(&file, DESIRED).unwrap();

    let set = hub_cli(&hub.api, &["set-desired", "pump-3", "-f", file.to_str().unwrap()]).await;
    assert!(set.status.success(), "{}", stderr(&set));
    assert!(stdout(&set).contains("generation 1 stored"), "{}", stdout(&set));
    pump3.desired(1).await;

    let early = hub_cli(&hub.api, &["watch", "pump-3", "--timeout", "300ms", "--interval", "100ms"]).await;
    assert!(!early.status.success(), "converged before the device reported");
    assert!(stderr(&early).contains("has not converged within 300ms"), "{}", stderr(&early));

    let watch = tokio::spawn(hub_cli(&hub.api, &["watch", "pump-3", "--timeout", "20s", "--interval", "100ms"]));
    pump3.report(&report(1, true, 1, &[("web", "backoff")], &[])).await;
    pump3.report(&report(2, false, 1, &[("web", "running")], &[])).await;
    let watched = watch.await.unwrap();
    assert!(watched.status.success(), "{}{}", stdout(&watched), stderr(&watched));
    assert!(stdout(&watched).contains("converged: generation 1 of 1 stored; web running"), "{}", stdout(&watched));

    let label = hub_cli(&hub.api, &["label", "pump-3", "site=north", "tier=edge"]).await;
    assert!(label.status.success(), "{}", stderr(&label));
    let label = hub_cli(&hub.api, &["label", "pump-3", "tier-"]).await;
    assert_eq!(stdout(&label), "pump-3: site=north\n");

    let table = stdout(&hub_cli(&hub.api, &["devices"]).await);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("pump-3") && l.contains("1/1") && l.contains("site=north")), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&hub_cli(&hub.api, &["devices", "--json"]).await)).unwrap();
    assert_eq!(json[0]["id"], "pump-3");
    hub.stop().await;
}

#[tokio::test]
async fn the_cli_says_what_the_hub_refused_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    hub.set_generation("pump-3", 5).await;
    let file = dir.path().join("desired.toml");
    std::fs::write(&file, DESIRED).unwrap();
    let refused = hub_cli(&hub.api, &["set-desired", "pump-3", "-f", file.to_str().unwrap()]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("409 Conflict: generation 1 is not above the stored generation 5"),
        "{}",
        stderr(&refused)
    );
    let unreachable = hub_cli("http://127.0.0.1:9", &["devices"]).await;
    assert!(stderr(&unreachable).contains("cannot reach the hub at http://127.0.0.1:9/"), "{}", stderr(&unreachable));
    hub.stop().await;
}

#[tokio::test]
async fn hub_config_default_prints_the_embedded_default_file() {
    let output = hub_cli("http://unused", &["config", "default"]).await;
    assert!(output.status.success());
    assert_eq!(stdout(&output), hub::config::DEFAULT_CONFIG);
}

#[tokio::test]
async fn a_held_device_connects_once_the_operator_approves_it_and_only_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(hub::Config { unknown_devices: hub::UnknownDevices::Hold, ..config(dir.path()) }).await;
    let connect = |token: &'static str| {
        DeviceSimulator::connect_with(hub.mqtt, "cam-9", token, Topics::default(), Encoding::Json)
    };
    assert!(connect("cam-secret").await.is_none(), "an unknown device came in before approval");

    let listed = hub_cli(&hub.api, &["pending"]).await;
    assert!(listed.status.success(), "{}", stderr(&listed));
    // sha256("cam-secret"), first 12 hex digits: what the operator compares.
    assert!(stdout(&listed).contains("cam-9") && stdout(&listed).contains("f82751c7d43c"), "{}", stdout(&listed));
    let (status, _) = hub.get("/v1/devices/cam-9").await;
    assert_eq!(status, 404, "a held device is not in the registry");

    let approved = hub_cli(&hub.api, &["approve", "cam-9"]).await;
    assert!(approved.status.success(), "{}", stderr(&approved));
    let again = hub_cli(&hub.api, &["approve", "cam-9"]).await;
    assert!(!again.status.success() && stderr(&again).contains("waits for approval"), "{}", stderr(&again));

    assert!(connect("another-token").await.is_none(), "an approved device came in with another token");
    let cam = connect("cam-secret").await.expect("the approved device comes in with its token");
    cam.report(&report(1, true, 0, &[("cam", "running")], &[])).await;
    hub.wait_for_device("cam-9", "its first report", |d| d["report_seq"] == 1).await;
    let (_, pending) = hub.get("/v1/pending-devices").await;
    assert_eq!(pending, serde_json::json!([]));
    hub.stop().await;
}

#[tokio::test]
async fn rejecting_a_held_device_forgets_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(hub::Config { unknown_devices: hub::UnknownDevices::Hold, ..config(dir.path()) }).await;
    let held = DeviceSimulator::connect_with(hub.mqtt, "cam-9", "x", Topics::default(), Encoding::Json).await;
    assert!(held.is_none());
    let rejected = hub_cli(&hub.api, &["reject", "cam-9"]).await;
    assert!(rejected.status.success(), "{}", stderr(&rejected));
    let listed = hub_cli(&hub.api, &["pending"]).await;
    assert_eq!(stdout(&listed).trim(), "no device waits for approval");
    hub.stop().await;
}

const DEPLOYMENT_YAML: &str = r#"
name: app
selector: { site: a }
strategy: { waves: ["100%"], min-healthy: 0s }
workloads:
  - name: web
    image: web:1@sha256:0000000000000000000000000000000000000000000000000000000000000001
"#;

#[tokio::test]
async fn the_cli_applies_a_yaml_deployment_and_watches_its_rollout_complete() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let (status, _) = hub.put("/v1/devices/pump-3/labels", r#"{"site": "a"}"#).await;
    assert_eq!(status, 200);
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    let file = dir.path().join("app.yaml");
    std::fs::write(&file, DEPLOYMENT_YAML).unwrap();
    let file = file.to_str().unwrap();

    let applied = hub_cli(&hub.api, &["apply", "-f", file]).await;
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert!(stdout(&applied).contains("app: revision 1, rolling out to 1 devices in 1 waves"), "{}", stdout(&applied));
    let watch = tokio::spawn(hub_cli(&hub.api, &["rollout", "watch", "app", "--timeout", "20s"]));

    let desired = pump3.desired_with("app", 1).await;
    let mut running = report(1, true, desired.state.generation, &[("web", "running")], &[]);
    running.workloads[0].revision = Some(1);
    pump3.report(&running).await;
    let watched = watch.await.unwrap();
    assert!(watched.status.success(), "{}{}", stdout(&watched), stderr(&watched));

    let listed = hub_cli(&hub.api, &["deployments"]).await;
    assert!(stdout(&listed).contains("rev 1 complete"), "{}", stdout(&listed));
    let again = hub_cli(&hub.api, &["apply", "-f", file]).await;
    assert!(stdout(&again).contains("unchanged, revision 1"), "{}", stdout(&again));
    let history = hub_cli(&hub.api, &["deployment", "history", "app"]).await;
    assert_eq!(
        stdout(&history).trim(),
        "revision 1  web=web:1@sha256:0000000000000000000000000000000000000000000000000000000000000001"
    );
    let paused = hub_cli(&hub.api, &["rollout", "pause", "app"]).await;
    assert!(!paused.status.success() && stderr(&paused).contains("cannot pause"), "{}", stderr(&paused));
    hub.stop().await;
}

#[tokio::test]
async fn a_deployment_file_with_a_mistake_is_refused_before_it_reaches_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, DEPLOYMENT_YAML.replace("100%", "150%")).unwrap();
    // No hub listens there: the file is refused first.
    let refused = hub_cli("http://127.0.0.1:9", &["apply", "-f", file.to_str().unwrap()]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("bad.yaml is not a deployment") && stderr(&refused).contains("150%"),
        "{}",
        stderr(&refused)
    );
}

#[tokio::test]
async fn artifact_push_uploads_a_bundle_that_ls_lists_as_pushed_and_tuf_push_uploads_a_directory() {
    let dir = tempfile::TempDir::new().unwrap();
    let hub = TestHub::start(config(&dir.path().join("hub"))).await;
    let bundle = dir.path().join("bundle.raucb");
    std::fs::write(&bundle, vec![7u8; 300_000]).unwrap();
    let digest = ota::Digest::of(&std::fs::read(&bundle).unwrap());

    let pushed = hub_cli(&hub.api, &["artifact", "push", bundle.to_str().unwrap()]).await;
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert!(stdout(&pushed).contains(&digest.to_string()), "{}", stdout(&pushed));
    let listed = hub_cli(&hub.api, &["artifact", "ls"]).await;
    let line = stdout(&listed).lines().find(|l| l.contains(&digest.to_string())).map(str::to_string);
    assert!(line.as_deref().is_some_and(|l| l.contains("300000") && l.ends_with("pushed")), "{}", stdout(&listed));

    let tuf = dir.path().join("tuf");
    std::fs::create_dir(&tuf).unwrap();
    let signed = r#"{"signed":{"_type":"targets","version":1},"signatures":[]}"#;
    std::fs::write(tuf.join("targets.json"), signed).unwrap();
    std::fs::write(tuf.join("README"), "not metadata").unwrap();
    let pushed = hub_cli(&hub.api, &["tuf", "push", tuf.to_str().unwrap()]).await;
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert_eq!(stdout(&pushed), "pushed targets.json\n");
    let served = reqwest::get(format!("{}/v1/tuf/targets.json", hub.api)).await.unwrap().text().await.unwrap();
    assert_eq!(served, signed);
    hub.stop().await;
}
