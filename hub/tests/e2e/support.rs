//! A hub started in-process, and a SIMULATED device: a plain rumqttc client
//! speaking the sync protocol the way the edge-agent does, scripted by each
//! test. It runs no workloads; it only publishes what the test tells it.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hub::{Config, Hub};
use outpost_proto::sync::{
    decode, encode, Ack, Channel, CommandMessage, DesiredMessage, Encoding, EventBatch, Presence, Report, Topics,
    WorkloadReport, PROTOCOL_VERSION,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(15);

/// The devices every test hub knows, with their tokens.
pub const DEVICES: [(&str, &str); 3] = [("pump-3", "token-3"), ("pump-4", "token-4"), ("pump-5", "token-5")];

pub fn config(data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        http: "127.0.0.1:0".parse().unwrap(),
        mqtt_listen: "127.0.0.1:0".parse().unwrap(),
        devices: DEVICES.iter().map(|(id, token)| (id.to_string(), token.to_string())).collect(),
        ..Config::default()
    }
}

pub fn token(device: &str) -> &'static str {
    DEVICES.iter().find(|(id, _)| *id == device).map(|(_, token)| *token).expect("a test device")
}

/// A hub served in-process on loopback, until `stop`.
pub struct TestHub {
    pub api: String,
    /// Where devices connect: the embedded broker, or the external one.
    pub mqtt: SocketAddr,
    stop: oneshot::Sender<()>,
    served: JoinHandle<anyhow::Result<()>>,
    http: reqwest::Client,
}

impl TestHub {
    pub async fn start(config: Config) -> Self {
        let external = match &config.broker {
            hub::BrokerSetting::External { host, port } => Some(format!("{host}:{port}").parse().unwrap()),
            hub::BrokerSetting::Embedded => None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let hub = Hub::start(config).expect("the hub starts");
        let mqtt = hub.mqtt_addr().or(external).expect("an MQTT address");
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(hub.serve(listener, async move {
            let _ = stopped.await;
        }));
        Self { api, mqtt, stop, served, http: reqwest::Client::new() }
    }

    /// Stops it gracefully; its store is closed when this returns.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.served.await.unwrap().expect("the hub stops cleanly");
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(format!("{}{path}", self.api)).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    pub async fn put(&self, path: &str, body: &str) -> (u16, Value) {
        self.send(self.http.put(format!("{}{path}", self.api)), body).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.api)), body).await
    }

    /// The status, and the body as JSON (null when empty).
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let response = self.http.delete(format!("{}{path}", self.api)).send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap();
        (status, if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() })
    }

    async fn send(&self, request: reqwest::RequestBuilder, body: &str) -> (u16, Value) {
        let response = request.header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// `PUT /v1/devices/{id}/desired` with no deployments, expecting success.
    pub async fn set_generation(&self, device: &str, generation: u64) {
        let (status, body) = self.put(&format!("/v1/devices/{device}/desired"), &desired_json(generation)).await;
        assert_eq!(status, 200, "{body}");
    }

    pub async fn device(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/devices/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls the device's view until `check` holds.
    pub async fn wait_for_device(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let found = within(WAIT, async {
            loop {
                let (status, body) = self.get(&format!("/v1/devices/{id}")).await;
                if status == 200 && check(&body) {
                    return body;
                }
                last = body;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|| panic!("{id}: {what} never happened; last view: {last:#}"))
    }

    pub async fn event_seqs(&self, id: &str) -> Vec<u64> {
        let (status, body) = self.get(&format!("/v1/devices/{id}/events")).await;
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect()
    }
}

pub fn desired_json(generation: u64) -> String {
    format!(r#"{{"version": 1, "generation": {generation}, "deployments": []}}"#)
}

pub async fn within<T>(limit: Duration, work: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, work).await.ok()
}

/// What the simulated device got from the hub.
#[derive(Debug)]
pub enum FromHub {
    Desired(DesiredMessage),
    Ack(Ack),
    Command(CommandMessage),
    /// A payload the device could not decode: a test fails on it.
    Garbage(Channel),
}

pub struct DeviceSimulator {
    pub id: String,
    client: AsyncClient,
    topics: Topics,
    encoding: Encoding,
    received: mpsc::UnboundedReceiver<FromHub>,
    poller: JoinHandle<()>,
}

impl Drop for DeviceSimulator {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl DeviceSimulator {
    /// Connects like the agent (persistent session, last will "offline"),
    /// retrying while the hub holds devices off, subscribes to its
    /// channels and says it is online.
    pub async fn connect(mqtt: SocketAddr, id: &str, password: &str) -> Self {
        let device = Self::connect_with(mqtt, id, password, Topics::default(), Encoding::Json).await;
        device.expect("the simulated device connects")
    }

    /// None when the broker never accepts it within a few seconds.
    pub async fn connect_with(
        mqtt: SocketAddr,
        id: &str,
        password: &str,
        topics: Topics,
        encoding: Encoding,
    ) -> Option<Self> {
        let mut options = MqttOptions::new(id, mqtt.ip().to_string(), mqtt.port());
        let offline = encode(encoding, &Presence { v: PROTOCOL_VERSION, online: false });
        options
            .set_clean_session(false)
            .set_credentials(id, password)
            .set_keep_alive(Duration::from_secs(5))
            .set_last_will(LastWill::new(topics.topic(id, Channel::Presence), offline, QoS::AtLeastOnce, true));
        let (client, mut event_loop) = AsyncClient::new(options, 64);
        let (tx, received) = mpsc::unbounded_channel();
        let (connected_tx, mut connected) = watch::channel(false);
        let subscriptions = [Channel::Desired, Channel::Ack, Channel::Command].map(|c| topics.topic(id, c));
        let (poll_client, poll_topics) = (client.clone(), topics.clone());
        let poller = tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for topic in &subscriptions {
                            poll_client.try_subscribe(topic, QoS::AtLeastOnce).unwrap();
                        }
                        connected_tx.send_replace(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Some((_, channel)) = poll_topics.parse(&p.topic) else { continue };
                        let message = match channel {
                            Channel::Desired => decode(&p.payload).map(FromHub::Desired),
                            Channel::Ack => decode(&p.payload).map(FromHub::Ack),
                            Channel::Command => decode(&p.payload).map(FromHub::Command),
                            _ => continue,
                        };
                        let _ = tx.send(message.unwrap_or(FromHub::Garbage(channel)));
                    }
                    Ok(_) => {}
                    // Refused, or the link went: polling again reconnects.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let device = Self { id: id.to_string(), client, topics, encoding, received, poller };
        let attempt = within(Duration::from_secs(5), connected.wait_for(|c| *c)).await;
        attempt?.ok()?;
        device.presence(true).await;
        Some(device)
    }

    pub async fn publish(&self, channel: Channel, retain: bool, payload: Vec<u8>) {
        self.client.publish(self.topics.topic(&self.id, channel), QoS::AtLeastOnce, retain, payload).await.unwrap();
    }

    pub async fn presence(&self, online: bool) {
        self.publish(Channel::Presence, true, encode(self.encoding, &Presence { v: PROTOCOL_VERSION, online })).await;
    }

    pub async fn report(&self, report: &Report) {
        self.publish(Channel::Reported, false, encode(self.encoding, report)).await;
    }

    pub async fn events(&self, seqs: &[u64]) {
        self.events_in(0, seqs).await;
    }

    /// Events numbered `seqs` in the store epoch `epoch`, each an `applied` event of generation = its number.
    pub async fn events_in(&self, epoch: u64, seqs: &[u64]) {
        let events: Vec<_> = seqs
            .iter()
            .map(|&seq| outpost_proto::Event {
                seq,
                at: seq,
                kind: outpost_proto::EventKind::Applied { generation: seq },
            })
            .collect();
        let oldest_held = events.first().map(|e| e.seq);
        let batch = EventBatch { v: PROTOCOL_VERSION, epoch, events, oldest_held };
        self.publish(Channel::Events, false, encode(self.encoding, &batch)).await;
    }

    /// Drops the connection without a DISCONNECT, as a lost link would.
    pub fn cut(self) {
        self.poller.abort();
    }

    /// The next message from the hub that `pick` takes, skipping others.
    pub async fn next<T>(&mut self, what: &str, pick: impl Fn(FromHub) -> Option<T>) -> T {
        let found = within(WAIT, async {
            while let Some(message) = self.received.recv().await {
                if let FromHub::Garbage(channel) = message {
                    panic!("the hub sent a {channel:?} payload that does not decode");
                }
                if let Some(found) = pick(message) {
                    return Some(found);
                }
            }
            None
        })
        .await;
        found.flatten().unwrap_or_else(|| panic!("{}: never received {what}", self.id))
    }

    /// Waits for the desired state of this generation (a hub may publish
    /// the same one again, after it restarts).
    pub async fn desired(&mut self, generation: u64) -> DesiredMessage {
        self.next(&format!("the desired state of generation {generation}"), |m| match m {
            FromHub::Desired(d) if d.state.generation == generation => Some(d),
            _ => None,
        })
        .await
    }

    /// Waits for a desired state that holds this revision of this deployment.
    pub async fn desired_with(&mut self, deployment: &str, revision: u64) -> DesiredMessage {
        self.next(&format!("a desired state with {deployment} revision {revision}"), |m| match m {
            FromHub::Desired(d)
                if d.state.deployments.iter().any(|x| x.name == deployment && x.revision == revision) =>
            {
                Some(d)
            }
            _ => None,
        })
        .await
    }

    /// Waits for an ack of at least these sequence numbers.
    pub async fn ack(&mut self, reports: u64, events: u64) -> Ack {
        self.next(&format!("an ack of reports {reports}, events {events}"), |m| match m {
            FromHub::Ack(a) if a.reports >= reports && a.events >= events => Some(a),
            _ => None,
        })
        .await
    }

    pub async fn command(&mut self) -> CommandMessage {
        self.next("a command", |m| match m {
            FromHub::Command(c) => Some(c),
            _ => None,
        })
        .await
    }

    /// Messages received so far, without waiting.
    pub fn drain(&mut self) -> Vec<FromHub> {
        std::iter::from_fn(|| self.received.try_recv().ok()).collect()
    }
}

pub fn workload(name: &str, state: &str) -> WorkloadReport {
    WorkloadReport {
        name: name.into(),
        deployment: Some("app".into()),
        revision: Some(1),
        state: state.into(),
        health: None,
        restarts: 0,
        last_exit: None,
    }
}

pub fn report(seq: u64, full: bool, generation: u64, workloads: &[(&str, &str)], removed: &[&str]) -> Report {
    Report {
        v: PROTOCOL_VERSION,
        epoch: 0,
        seq,
        full,
        generation: Some(generation),
        agent_version: "0.1.0-sim".into(),
        workloads: workloads.iter().map(|(n, s)| workload(n, s)).collect(),
        removed: removed.iter().map(|s| s.to_string()).collect(),
    }
}

/// The hub's view of a device's workloads: name -> state.
pub fn workloads(view: &Value) -> BTreeMap<String, String> {
    view["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap().to_string(), w["state"].as_str().unwrap().to_string()))
        .collect()
}

/// An image reference pinned by a made-up digest: the hub takes it as
/// written, without asking a registry.
pub fn pinned(image: &str) -> String {
    let hex: String = image.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{image}@sha256:{hex:0>64}")
}
