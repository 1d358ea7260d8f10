//! Three tiers on three hosts: the cloud hub in the test's own network
//! namespace, a site hub in one of its own, and a real agent with a real
//! container in a third; the WAN between cloud and site is a veth pair the
//! test takes down with `ip link set DEV down` (docs/federation.md). Needs
//! root and iproute2 (CI runs as root).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::agent::{state, Agent};
use testkit::hub::{free_port, Hub};
use testkit::netns::{Netns, Veth};

const WAIT: Duration = Duration::from_secs(60);
const DEVICE: &str = "pi-1";
const SITE: &str = "rig-7";

fn wait_until(what: &str, hubs: &[&Hub], agent: &Agent, check: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        if Instant::now() > deadline {
            let logs: Vec<String> = hubs.iter().map(|h| h.log()).collect();
            panic!(
                "{what} not within {WAIT:?}\nhub logs:\n{}\nagent log:\n{}",
                logs.join("\n---\n"),
                agent.daemon_log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn events(hub: &Hub) -> Vec<Value> {
    hub.try_get(&format!("/v1/devices/{DEVICE}/events")).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// The device's events as the site's operator sees them, on site.
fn site_events(site: &Hub) -> Vec<Value> {
    let out = site.cli(&["events", DEVICE, "--json"]);
    assert!(out.status.success(), "hub events at the site: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

#[test]
fn a_site_keeps_running_and_is_managed_on_site_while_its_wan_link_is_down_and_the_cloud_catches_up_after() {
    let tag = std::process::id() % 100_000;
    let site_ns = Netns::new(&format!("op-site-{tag}"));
    let device_ns = Netns::new(&format!("op-dev-{tag}"));
    // 10.213.1.0/24 is the WAN (cloud .1, site .2); 10.213.2.0/24 the site's network.
    let wan = Veth::new(&format!("opw{tag}"), None, "10.213.1.1/24", &format!("opw{tag}s"), &site_ns, "10.213.1.2/24");
    let _lan = Veth::new(
        &format!("opl{tag}"),
        Some(&site_ns),
        "10.213.2.1/24",
        &format!("opl{tag}d"),
        &device_ns,
        "10.213.2.2/24",
    );

    let cloud_http = SocketAddr::from(([10, 213, 1, 1], free_port()));
    let cloud_mqtt = SocketAddr::from(([10, 213, 1, 1], free_port()));
    let cloud = Hub::configured(
        None,
        cloud_http,
        cloud_mqtt,
        &format!("http = \"{cloud_http}\"\nmqtt-listen = \"{cloud_mqtt}\"\n[sites]\n{SITE} = \"site-token\"\n"),
    );
    let site_http = SocketAddr::from(([10, 213, 1, 2], 8080));
    let site_mqtt = SocketAddr::from(([10, 213, 2, 1], 1883));
    let site = Hub::configured(
        Some(&site_ns.name),
        site_http,
        site_mqtt,
        &format!(
            "http = \"0.0.0.0:8080\"\nmqtt-listen = \"0.0.0.0:1883\"\n[devices]\n{DEVICE} = \"device-token\"\n\
             [upstream]\nmqtt = \"mqtt://{cloud_mqtt}\"\nsite = \"{SITE}\"\ntoken = \"site-token\"\nhttp = \"http://{cloud_http}\"\n"
        ),
    );

    let mut agent = Agent::new();
    testkit::import_busybox(&agent);
    agent.use_config(&format!(
        "device-id = \"{DEVICE}\"\nhub = \"mqtt://{site_mqtt}\"\nhub-token = \"device-token\"\n\
         report-interval = \"200ms\"\nkeep-alive = \"5s\"\n"
    ));
    agent.netns = Some(device_ns.name.clone());
    agent.start_daemon();
    wait_until("the device known at the cloud through its site", &[&cloud, &site], &agent, || {
        cloud.try_get(&format!("/v1/devices/{DEVICE}")).is_ok_and(|d| d["site"] == SITE && d["online"] == true)
    });

    // The operator applies a signed deployment at the cloud.
    let spec = json!({
        "name": "app",
        "strategy": { "waves": ["100%"], "min-healthy": "1s" },
        "workloads": [{
            // Exits every few seconds and is started again: a device whose
            // reports keep coming, through the cut too.
            "name": "svc", "image": testkit::image::busybox_pinned(),
            "command": ["/bin/sh", "-c", "echo served; exec sleep 3"],
            "restart": { "mode": "always", "min-uptime": "1s", "backoff-initial": "100ms" },
            "stop-grace-period": "100ms",
        }],
    });
    let file = cloud.data.path().join("app.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    let key = testkit::trust::operator().deployments_key_path();
    let out = cloud.cli(&["apply", "-f", file.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    assert!(out.status.success(), "hub apply at the cloud: {}", String::from_utf8_lossy(&out.stderr));
    wait_until("the rollout complete at the cloud", &[&cloud, &site], &agent, || {
        cloud.try_get("/v1/deployments/app").is_ok_and(|s| s["rollout"]["state"] == "complete")
    });

    // The WAN goes down: the site runs on, and is managed on site.
    wan.set_up(false);
    let logs = site.cli(&["logs", DEVICE, "svc"]);
    assert!(logs.status.success(), "hub logs at the site: {}", String::from_utf8_lossy(&logs.stderr));
    assert!(String::from_utf8_lossy(&logs.stdout).contains("served"), "{logs:?}");
    // The device's reports reach the site; the cloud's view stays where the cut left it.
    let cloud_reports = |cloud: &Hub| cloud.get(&format!("/v1/devices/{DEVICE}"))["report_seq"].as_u64().unwrap();
    let site_device = || {
        let out = site.cli(&["devices", "--json"]);
        let devices: Value = serde_json::from_slice(&out.stdout).expect("hub devices --json at the site");
        devices[0].clone()
    };
    let at_cut = cloud_reports(&cloud);
    wait_until("reports made during the cut at the site", &[&cloud, &site], &agent, || {
        site_device()["report_seq"].as_u64().unwrap_or(0) > at_cut
    });
    let device = site_device();
    assert_eq!(device["online"], true, "the site sees its device: {device:#}");
    let site_reports = device["report_seq"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cloud_reports(&cloud), at_cut, "nothing crossed the cut WAN");

    // The WAN returns: the cloud gets what happened on site, each event once.
    wan.set_up(true);
    wait_until("the cloud holding the reports made during the cut", &[&cloud, &site], &agent, || {
        cloud_reports(&cloud) >= site_reports
    });
    let site_events = site_events(&site);
    wait_until("the cloud holding every event of the site", &[&cloud, &site], &agent, || {
        events(&cloud).len() >= site_events.len()
    });
    let cloud_events = events(&cloud);
    let seqs: Vec<u64> = cloud_events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    let mut unique = seqs.clone();
    unique.dedup();
    assert_eq!(seqs, unique, "an event stored twice at the cloud: {cloud_events:#?}");
    let at_site: Vec<u64> = site_events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs[..at_site.len()], at_site[..], "the cloud holds the site's events in order");
    let sites = cloud.get("/v1/sites");
    assert_eq!(sites[0]["id"], SITE, "{sites:#}");
    // It exits every few seconds by design: running again soon, whenever asked.
    agent.wait_for("svc", WAIT, "running", |w| state(w) == "running");
}
