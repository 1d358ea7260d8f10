//! A real agent (daemon, containers) enrolls with a one-time token over
//! HTTPS and syncs with a real hub over mqtts with its own certificate
//! (docs/identity.md). Needs root (CI runs as root).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use testkit::agent::Agent;
use testkit::hub::{free_port, Hub};

const WAIT: Duration = Duration::from_secs(30);
const DEVICE: &str = "cam-1";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[test]
fn an_agent_enrolled_with_a_one_time_token_runs_its_desired_state_over_mqtts() {
    let (mqtts, enroll) = (loopback(), loopback());
    let hub = Hub::with_tls(mqtts, enroll);
    let token = hub.cli(&["enroll-token", DEVICE]);
    assert!(token.status.success(), "hub enroll-token: {}", String::from_utf8_lossy(&token.stderr));
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();

    let mut agent = Agent::new();
    testkit::import_busybox(&agent);
    agent.use_config(&format!(
        "device-id = \"{DEVICE}\"\nhub = \"mqtts://{mqtts}\"\nreport-interval = \"200ms\"\nkeep-alive = \"5s\"\n"
    ));
    let hub_url = format!("https://{enroll}");
    let ca = hub.ca_cert();
    let args = ["enroll", "--hub-url", &hub_url, "--token", &token, "--ca-cert", ca.to_str().unwrap()];
    let enrolled = agent.exec(&args);
    assert!(enrolled.status.success(), "edge-agent enroll: {}", String::from_utf8_lossy(&enrolled.stderr));
    let again = agent.exec(&args);
    assert!(!again.status.success(), "the token served twice");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already used"));

    agent.start_daemon();
    let image = testkit::image::busybox_pinned();
    let document = format!(
        "version = 1\ngeneration = 1\n[[deployments]]\nname = \"app\"\nrevision = 1\n\
         [[deployments.workloads]]\nname = \"svc\"\nimage = \"{image}\"\n\
         command = [\"/bin/sleep\", \"611\"]\nstop-grace-period = \"100ms\"\n"
    );
    hub.set_desired(DEVICE, &document);
    let deadline = Instant::now() + WAIT;
    loop {
        let device = hub.try_get(&format!("/v1/devices/{DEVICE}")).unwrap_or_default();
        if device["online"] == true
            && device["generation"].as_u64().or(device["applied_generation"].as_u64()) == Some(1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hub never saw {DEVICE} apply generation 1 over mqtts: {device:#}\nhub log:\n{}\nagent log:\n{}",
            hub.log(),
            agent.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
