//! A real agent (daemon, containers) and a real hub (HTTP API) over loopback,
//! with a cutting proxy on the device's link. Each scenario runs on the hub's
//! embedded broker and on an external mosquitto. Needs root (CI runs as root)
//! and mosquitto.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::{state, Agent};
use testkit::hub::Hub;
use testkit::{CuttingProxy, Mosquitto};

const WAIT: Duration = Duration::from_secs(30);
const DEVICE: &str = "pump-3";
const TOKEN: &str = "pump-3-token";
const GARBAGE_SENDER: (&str, &str) = ("garbage-sender", "garbage-token");
const HUB_USER: &str = "outpost-hub";
const HUB_PASSWORD: &str = "hub-password";

#[derive(Clone, Copy)]
enum Broker {
    /// The hub's own rumqttd, which authenticates the devices from the hub's configuration.
    Embedded,
    /// Mosquitto, which authenticates the devices and the hub from its password file.
    Mosquitto,
}

/// The hub, its broker, a proxy in front of the broker, and an agent linked through the proxy.
struct Site {
    hub: Hub,
    proxy: CuttingProxy,
    agent: Agent,
    /// On `Broker::Mosquitto` only.
    mosquitto: Option<Mosquitto>,
    _runtime: tokio::runtime::Runtime,
}

fn site(broker: Broker) -> Site {
    let agent = Agent::new();
    testkit::import_busybox(&agent);
    let (hub, mosquitto) = match broker {
        Broker::Embedded => (Hub::new(&[(DEVICE, TOKEN), GARBAGE_SENDER]), None),
        Broker::Mosquitto => {
            let mosquitto = Mosquitto::new(&[(HUB_USER, HUB_PASSWORD), (DEVICE, TOKEN), GARBAGE_SENDER]);
            (Hub::external(mosquitto.addr(), HUB_USER, HUB_PASSWORD), Some(mosquitto))
        }
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(CuttingProxy::start(hub.mqtt)).unwrap();
    let mut agent = agent;
    agent.link_to(proxy.addr(), DEVICE, TOKEN);
    agent.start_daemon();
    Site { hub, proxy, agent, mosquitto, _runtime: runtime }
}

impl Site {
    /// Every log of the site, for a failure's message.
    fn logs(&self) -> String {
        let mosquitto = self.mosquitto.as_ref().map(|m| format!("\nmosquitto log:\n{}", m.log())).unwrap_or_default();
        format!("hub log:\n{}\nagent log:\n{}{mosquitto}", self.hub.log(), self.agent.daemon_log())
    }
}

fn document(generation: u64, command: &str) -> String {
    let image = testkit::image::busybox_pinned();
    format!(
        "version = 1\ngeneration = {generation}\n[[deployments]]\nname = \"app\"\nrevision = {generation}\n\
         [[deployments.workloads]]\nname = \"svc\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", {command:?}]\nstop-grace-period = \"100ms\"\n"
    )
}

/// How many times `crashing_document`'s svc exits before it keeps running.
const CRASHES: u64 = 12;

/// A svc that exits 1 at each of its first `CRASHES` runs (counted in a
/// volume) and is restarted 50 ms later each time; the next run keeps running.
fn crashing_document(generation: u64) -> String {
    let command = format!(
        "n=$(cat /state/runs 2>/dev/null || echo 0); echo $((n + 1)) > /state/runs; \
         [ $n -ge {CRASHES} ] && exec sleep 600; exit 1"
    );
    document(generation, &command)
        + "mounts = [{ volume = \"state\", target = \"/state\" }]\n[deployments.workloads.restart]\n\
           backoff-initial = \"50ms\"\nbackoff-max = \"50ms\"\ncrash-loop-threshold = 100\n"
}

/// The hub's view of the device; null until the hub has heard of it.
fn device(site: &Site) -> Value {
    site.hub.try_get(&format!("/v1/devices/{DEVICE}")).unwrap_or(Value::Null)
}

/// Polls the hub's view of the device until `check` holds.
fn hub_sees(site: &Site, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = device(site);
        if check(&seen) {
            return seen;
        }
        assert!(Instant::now() < deadline, "the hub never saw {what}: {seen:#}\n{}", site.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn generation(device: &Value) -> Option<u64> {
    device["generation"].as_u64().or_else(|| device["applied_generation"].as_u64())
}

/// A workload as the hub's view of the device lists it.
fn hub_workload<'a>(device: &'a Value, name: &str) -> Option<&'a Value> {
    device["workloads"].as_array()?.iter().find(|w| w["name"] == name)
}

/// Every event the hub stored for the device: numbered without a duplicate.
fn hub_events(site: &Site) -> Vec<Value> {
    let events = site.hub.get(&format!("/v1/devices/{DEVICE}/events?after=0"));
    let events = events.as_array().cloned().or_else(|| events["events"].as_array().cloned()).unwrap_or_default();
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "an event arrived twice: {seqs:?}");
    events
}

fn running_command(agent: &Agent) -> String {
    let w = agent.wait_for("svc", WAIT, "running", |w| state(w) == "running");
    let pid = w["status"]["pid"].as_i64().unwrap();
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).replace('\0', " ")
}

/// Waits until the device's `svc` runs `command` (a replacement takes a moment).
fn runs(agent: &Agent, command: &str) -> bool {
    let deadline = Instant::now() + WAIT;
    while !running_command(agent).contains(command) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// The generations of the `applied` events the hub stored, in order.
fn applied_generations(site: &Site) -> Vec<u64> {
    let events = hub_events(site);
    events.iter().filter(|e| e["event"] == "applied").filter_map(|e| e["generation"].as_u64()).collect()
}

/// Waits until the hub has stored exactly these `applied` events, each once.
fn hub_has_applied(site: &Site, generations: &[u64]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let applied = applied_generations(site);
        if applied == generations {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the hub's applied events are {applied:?}, never {generations:?}\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the device has no event left to deliver (it forgets those the
/// hub acknowledged) and the hub holds events 1 to n, each once.
fn every_event_reached_the_hub_once(site: &Site) {
    let deadline = Instant::now() + WAIT;
    loop {
        let undelivered = site.agent.events().len();
        let seqs: Vec<u64> = hub_events(site).iter().filter_map(|e| e["seq"].as_u64()).collect();
        if undelivered == 0 && seqs.iter().copied().eq(1..=seqs.len() as u64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{undelivered} events still on the device; the hub holds {seqs:?}\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One `#[test]` per broker for each scenario, named `on_the_embedded_broker::SCENARIO`
/// and `on_mosquitto::SCENARIO`.
macro_rules! on_both_brokers {
    ($($scenario:ident),+ $(,)?) => {
        mod on_the_embedded_broker {
            $(#[test]
            fn $scenario() {
                super::$scenario(super::Broker::Embedded)
            })+
        }
        mod on_mosquitto {
            $(#[test]
            fn $scenario() {
                super::$scenario(super::Broker::Mosquitto)
            })+
        }
    };
}

on_both_brokers!(
    device_runs_the_desired_state_set_through_the_hub_and_reports_it,
    desired_state_changed_while_the_link_is_down_arrives_when_it_returns_and_every_event_once,
    events_recorded_while_the_link_is_down_reach_the_hub_once_through_repeated_cuts,
    hub_restarted_loses_nothing_and_the_device_still_takes_new_desired_states,
    agent_restarted_sends_what_it_had_not_delivered_and_runs_on,
    another_device_cannot_publish_to_the_devices_topics_and_the_link_and_state_stay_intact,
    reports_sent_in_a_burst_through_repeated_cuts_leave_the_hub_with_the_devices_last_view,
);

fn device_runs_the_desired_state_set_through_the_hub_and_reports_it(broker: Broker) {
    let site = site(broker);
    hub_sees(&site, "the device online", |d| d["online"] == true);
    site.hub.set_desired(DEVICE, &document(1, "sleep 601"));
    // The report that says generation 1 is stored may come before the one listing its workload.
    hub_sees(&site, "generation 1 applied and its workload listed", |d| {
        generation(d) == Some(1) && d["workloads"].to_string().contains("svc")
    });
    assert!(runs(&site.agent, "sleep 601"), "the device never ran `sleep 601`");
    let watch = site.hub.cli(&["watch", DEVICE, "--timeout", "30s"]);
    assert!(watch.status.success(), "hub watch: {}", String::from_utf8_lossy(&watch.stderr));
    hub_has_applied(&site, &[1]);
}

fn desired_state_changed_while_the_link_is_down_arrives_when_it_returns_and_every_event_once(broker: Broker) {
    let site = site(broker);
    site.hub.set_desired(DEVICE, &document(1, "sleep 601"));
    hub_sees(&site, "generation 1", |d| generation(d) == Some(1));

    site.proxy.set_link_down(true);
    site.hub.set_desired(DEVICE, &document(2, "sleep 602"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(running_command(&site.agent).contains("sleep 601"), "the device keeps running while the link is down");

    site.proxy.set_link_down(false);
    hub_sees(&site, "generation 2 after the link returned", |d| generation(d) == Some(2));
    assert!(runs(&site.agent, "sleep 602"), "the device never ran `sleep 602`");
    hub_has_applied(&site, &[1, 2]);
}

fn events_recorded_while_the_link_is_down_reach_the_hub_once_through_repeated_cuts(broker: Broker) {
    let site = site(broker);
    site.hub.set_desired(DEVICE, &document(1, "sleep 601"));
    hub_sees(&site, "generation 1", |d| generation(d) == Some(1));
    site.proxy.set_link_down(true);
    // Applied locally while the hub is out of reach: events and reports wait in the outbox.
    for generation in 2..=4 {
        let out = site.agent.apply(&document(generation, &format!("sleep {}", 600 + generation)));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(runs(&site.agent, "sleep 604"), "the device never ran `sleep 604`");
    // The link comes back flaky: cut again and again while the outbox drains.
    site.proxy.set_link_down(false);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        site.proxy.set_link_down(true);
        site.proxy.set_link_down(false);
    }
    hub_has_applied(&site, &[1, 2, 3, 4]);
    every_event_reached_the_hub_once(&site);
}

fn reports_sent_in_a_burst_through_repeated_cuts_leave_the_hub_with_the_devices_last_view(broker: Broker) {
    let site = site(broker);
    site.hub.set_desired(DEVICE, &crashing_document(1));
    let deadline = Instant::now() + WAIT;
    while site.agent.workload("svc").is_null() {
        assert!(Instant::now() < deadline, "svc never started: the desired state did not arrive\n{}", site.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // While svc crashes, its state and restart count change at nearly every
    // 200 ms report tick: cut the link again and again through that burst.
    let deadline = Instant::now() + WAIT;
    loop {
        let svc = site.agent.workload("svc");
        if state(&svc) == "running" && svc["status"]["restarts"] == CRASHES {
            break;
        }
        assert!(Instant::now() < deadline, "svc never settled after {CRASHES} restarts: {svc:#}\n{}", site.logs());
        std::thread::sleep(Duration::from_millis(400));
        site.proxy.set_link_down(true);
        site.proxy.set_link_down(false);
    }
    assert!(site.proxy.cuts() >= 3, "svc settled after {} cuts: too few to test anything", site.proxy.cuts());
    hub_sees(&site, "svc running after its restarts, as the device has it", |d| {
        d["stale"] == false
            && hub_workload(d, "svc").is_some_and(|w| w["state"] == "running" && w["restarts"] == CRASHES)
    });
    every_event_reached_the_hub_once(&site);
}

fn hub_restarted_loses_nothing_and_the_device_still_takes_new_desired_states(broker: Broker) {
    let site = site(broker);
    site.hub.set_desired(DEVICE, &document(1, "sleep 601"));
    hub_sees(&site, "generation 1", |d| generation(d) == Some(1));
    site.hub.kill();
    site.hub.start();
    hub_sees(&site, "the device back online", |d| d["online"] == true);
    site.hub.set_desired(DEVICE, &document(2, "sleep 602"));
    hub_sees(&site, "generation 2", |d| generation(d) == Some(2));
    assert!(runs(&site.agent, "sleep 602"), "the device never ran `sleep 602`");
    hub_has_applied(&site, &[1, 2]);
}

fn agent_restarted_sends_what_it_had_not_delivered_and_runs_on(broker: Broker) {
    let site = site(broker);
    site.hub.set_desired(DEVICE, &document(1, "sleep 601"));
    hub_sees(&site, "generation 1", |d| generation(d) == Some(1));
    site.proxy.set_link_down(true);
    let out = site.agent.apply(&document(2, "sleep 602"));
    assert!(out.status.success());
    site.agent.kill_daemon();
    site.proxy.set_link_down(false);
    site.agent.start_daemon();
    hub_sees(&site, "generation 2 from the restarted agent", |d| generation(d) == Some(2));
    hub_has_applied(&site, &[1, 2]);
}

fn another_device_cannot_publish_to_the_devices_topics_and_the_link_and_state_stay_intact(broker: Broker) {
    let site = site(broker);
    site.hub.set_desired(DEVICE, &document(1, "sleep 601"));
    hub_sees(&site, "generation 1", |d| generation(d) == Some(1));

    // Another device publishes garbage on the device's topics: the embedded
    // broker refuses it and closes its connection, mosquitto's ACL drops it.
    let topics = outpost_proto::sync::Topics::default();
    let (user, password) = GARBAGE_SENDER;
    let mut options = rumqttc::MqttOptions::new(user, "127.0.0.1", site.hub.mqtt.port());
    options.set_credentials(user, password);
    let (client, mut connection) = rumqttc::Client::new(options, 16);
    for channel in [outpost_proto::sync::Channel::Desired, outpost_proto::sync::Channel::Command] {
        client
            .publish(topics.topic(DEVICE, channel), rumqttc::QoS::AtLeastOnce, false, &b"\xff\x00not a message"[..])
            .unwrap();
    }
    let mut acked = 0;
    let mut closed = false;
    while acked < 2 && !closed {
        match connection.recv_timeout(WAIT) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => closed = true,
            Err(_) => panic!("the broker neither acknowledged nor refused the garbage"),
        }
    }
    if let Broker::Embedded = broker {
        assert!(closed, "the embedded broker closes the connection of a device that publishes on another's topics");
        let log = site.hub.log();
        assert!(
            log.lines().any(|l| l.contains("refused")
                && l.contains(user)
                && l.contains(&topics.topic(DEVICE, outpost_proto::sync::Channel::Desired))),
            "the hub's log names the refusal:\n{}",
            site.logs()
        );
    }

    site.hub.set_desired(DEVICE, &document(2, "sleep 602"));
    hub_sees(&site, "generation 2 after the garbage", |d| generation(d) == Some(2));
    assert!(runs(&site.agent, "sleep 602"), "the device never ran `sleep 602`");
}

/// On mosquitto only: restarting the embedded broker means restarting the hub, above.
#[test]
fn mosquitto_restarted_with_no_memory_the_device_runs_the_newest_desired_state_and_every_event_counts_once() {
    let site = site(Broker::Mosquitto);
    let mosquitto = site.mosquitto.as_ref().expect("a site on mosquitto");
    site.hub.set_desired(DEVICE, &document(1, "sleep 601"));
    hub_sees(&site, "generation 1", |d| generation(d) == Some(1));

    // Mosquitto comes back without the sessions, the retained desired state
    // and the acks: the hub publishes them again when it reconnects, and the
    // device sends again whatever was not acknowledged.
    mosquitto.kill();
    site.hub.set_desired(DEVICE, &document(2, "sleep 602"));
    mosquitto.start();
    hub_sees(&site, "generation 2 after the restart", |d| generation(d) == Some(2));
    assert!(runs(&site.agent, "sleep 602"), "the device never ran `sleep 602`");
    hub_has_applied(&site, &[1, 2]);

    site.hub.set_desired(DEVICE, &document(3, "sleep 603"));
    hub_sees(&site, "generation 3", |d| generation(d) == Some(3));
    assert!(runs(&site.agent, "sleep 603"), "the device never ran `sleep 603`");
    hub_has_applied(&site, &[1, 2, 3]);
    every_event_reached_the_hub_once(&site);
}
