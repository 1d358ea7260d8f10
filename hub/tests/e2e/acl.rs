//! Per-topic authorization: a device uses only its own topics, on the
//! embedded broker (the hub's authorizer, an Outpost patch to rumqttd) and on
//! mosquitto (the ACL file of `hub mosquitto-acl`, docs/mosquitto-acl.conf).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use outpost_proto::sync::{encode, Channel, Encoding, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use testkit::Mosquitto;
use tokio::sync::mpsc;

use crate::support::*;

const HUB_USER: &str = "outpost-hub";
const HUB_PASSWORD: &str = "hub-password";

/// What the hub logs, from every test of this binary (the broker's router
/// thread logs too, so the subscriber is global).
fn hub_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let writer = || LogWriter;
        tracing_subscriber::fmt().with_writer(writer).with_ansi(false).init();
        Mutex::new(Vec::new())
    })
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        hub_log().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a device connected with plain rumqttc heard from its broker.
enum Heard {
    SubAck(Vec<SubscribeReasonCode>),
    Publish(String),
    /// The broker closed the connection (or refused it).
    Closed,
}

/// Device `id` with its own token, polled until the broker closes the link.
async fn intruder(mqtt: SocketAddr, id: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Heard>) {
    let mut options = MqttOptions::new(id, mqtt.ip().to_string(), mqtt.port());
    options.set_credentials(id, token(id)).set_keep_alive(Duration::from_secs(5));
    let (client, mut event_loop) = AsyncClient::new(options, 16);
    let (tx, heard) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let what = match event_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => Heard::SubAck(ack.return_codes),
                Ok(Event::Incoming(Packet::Publish(p))) => Heard::Publish(p.topic),
                Ok(_) => continue,
                Err(_) => Heard::Closed,
            };
            let closed = matches!(what, Heard::Closed);
            if tx.send(what).is_err() || closed {
                return;
            }
        }
    });
    (client, heard)
}

async fn next_suback(heard: &mut mpsc::UnboundedReceiver<Heard>) -> Vec<SubscribeReasonCode> {
    let found = within(WAIT, async {
        loop {
            match heard.recv().await {
                Some(Heard::SubAck(codes)) => return codes,
                Some(Heard::Publish(_)) => {}
                Some(Heard::Closed) | None => panic!("the broker closed the connection before a SUBACK"),
            }
        }
    });
    found.await.expect("a SUBACK")
}

/// How a broker turned pump-4 away from pump-3's topics.
struct Refusals {
    /// The SUBACK codes of pump-3's desired, command and ack topics, `outpost/v1/+/desired` and `#`.
    subscriptions: Vec<SubscribeReasonCode>,
    /// Whether the broker closed pump-4's link after its forged publishes.
    closed: bool,
}

/// pump-4 tries to read and write pump-3's topics: nothing of pump-3's
/// reaches it, nothing it sends reaches pump-3 or changes the hub's view of
/// pump-3, and its own topics work.
async fn another_devices_topics_are_out_of_reach(hub: &TestHub) -> Refusals {
    let topics = Topics::default();
    hub.set_generation("pump-3", 1).await;
    hub.set_generation("pump-4", 7).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.desired(1).await;
    pump3.report(&report(1, true, 1, &[("web", "running")], &[])).await;
    hub.wait_for_device("pump-3", "its own report", |d| d["report_seq"] == 1).await;

    let (pump4, mut heard) = intruder(hub.mqtt, "pump-4").await;
    let mut subscriptions = Vec::new();
    let others = [Channel::Desired, Channel::Command, Channel::Ack].map(|c| topics.topic("pump-3", c));
    for filter in others.iter().map(String::as_str).chain(["outpost/v1/+/desired", "#"]) {
        pump4.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        subscriptions.extend(next_suback(&mut heard).await);
    }
    pump4.subscribe(topics.topic("pump-4", Channel::Desired), QoS::AtLeastOnce).await.unwrap();
    assert_eq!(next_suback(&mut heard).await, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    // A forged report and desired state for pump-3.
    let forged = encode(Encoding::Json, &report(99, true, 1, &[("evil", "running")], &[]));
    pump4.publish(topics.topic("pump-3", Channel::Reported), QoS::AtLeastOnce, false, forged).await.unwrap();
    pump4.publish(topics.topic("pump-3", Channel::Desired), QoS::AtLeastOnce, true, &b"{}"[..]).await.unwrap();
    let mut received = Vec::new();
    let mut closed = false;
    let _ = within(Duration::from_secs(2), async {
        while let Some(heard) = heard.recv().await {
            match heard {
                Heard::Publish(topic) => received.push(topic),
                Heard::SubAck(_) => {}
                Heard::Closed => closed = true,
            }
        }
    })
    .await;
    assert_eq!(received, [topics.topic("pump-4", Channel::Desired)], "pump-4 receives its own desired state only");

    // pump-3's own report goes through; the forged one never did.
    pump3.report(&report(2, false, 1, &[("web", "running")], &[])).await;
    hub.wait_for_device("pump-3", "its own second report", |d| d["report_seq"] == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let view = hub.device("pump-3").await;
    assert_eq!(view["report_seq"], 2, "{view}");
    assert!(!workloads(&view).contains_key("evil"), "{view}");
    let received = pump3.drain();
    let forged = received.iter().any(|m| matches!(m, FromHub::Garbage(_) | FromHub::Desired(_)));
    assert!(!forged, "pump-3 received the desired state pump-4 published");
    Refusals { subscriptions, closed }
}

#[tokio::test]
async fn on_the_embedded_broker_a_device_cannot_read_or_write_another_devices_topics_and_the_hub_logs_it() {
    hub_log();
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let refusals = another_devices_topics_are_out_of_reach(&hub).await;
    assert_eq!(refusals.subscriptions, [SubscribeReasonCode::Failure; 5], "every subscription of pump-4 fails");
    assert!(refusals.closed, "a refused publish closes the device's connection");
    let log = String::from_utf8_lossy(&hub_log().lock().unwrap()).into_owned();
    for topic in ["outpost/v1/pump-3/command", "outpost/v1/pump-3/reported", "outpost/v1/pump-3/desired"] {
        let refused = log.lines().any(|l| l.contains("refused") && l.contains("pump-4") && l.contains(topic));
        assert!(refused, "the hub's log names pump-4's refusal on {topic}:\n{log}");
    }
    hub.stop().await;
}

#[tokio::test]
async fn on_mosquitto_with_the_hubs_acl_a_device_cannot_read_or_write_another_devices_topics() {
    let users: Vec<_> = std::iter::once((HUB_USER, HUB_PASSWORD)).chain(DEVICES).collect();
    let mosquitto = Mosquitto::new(&users);
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(hub::Config {
        broker: hub::BrokerSetting::External { host: "127.0.0.1".into(), port: mosquitto.addr().port() },
        broker_username: HUB_USER.into(),
        broker_password: HUB_PASSWORD.into(),
        ..config(dir.path())
    })
    .await;
    // Mosquitto 2.0 grants the subscriptions but delivers nothing the ACL
    // does not let the device read, and drops a refused publish (acknowledged,
    // in MQTT 3.1.1) keeping the link.
    let refusals = another_devices_topics_are_out_of_reach(&hub).await;
    assert!(!refusals.closed, "mosquitto keeps the link");
    hub.stop().await;
}
