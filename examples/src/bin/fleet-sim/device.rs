//! One SIMULATED device: a bare rumqttc client speaking the sync protocol as
//! the edge-agent does (docs/protocol.md), with nothing behind it. It runs no
//! workloads: it keeps the desired state in memory and reports every workload
//! of it as running as soon as it arrives.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::sync::{
    decode, encode, Ack, Channel, Command, CommandMessage, DesiredMessage, Encoding, Presence, Report, Topics,
    WorkloadReport, PROTOCOL_VERSION,
};
use outpost_proto::DesiredState;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::OwnedSemaphorePermit;

/// The edge-agent's default.
const KEEP_ALIVE: Duration = Duration::from_secs(120);
/// Requests queued between a device and its event loop: a device sends a
/// handful of messages per connection, and 10,000 of these channels add up.
const REQUEST_CAPACITY: usize = 16;
const INFLIGHT: u16 = 8;
const MAX_PACKET: usize = 64 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the whole simulated fleet has done so far, for the report.
#[derive(Default)]
pub struct Progress {
    /// Devices that had their first CONNACK.
    pub connected: AtomicUsize,
    /// Devices that stored a new desired state.
    pub stored: AtomicUsize,
    /// Devices whose report of their newest desired state the hub acknowledged.
    pub acknowledged: AtomicUsize,
    /// Connection attempts that failed (each one retried after a backoff).
    pub connection_errors: AtomicUsize,
}

pub struct Spec {
    pub id: String,
    pub token: String,
    pub host: String,
    pub port: u16,
    pub topics: Arc<Topics>,
    /// Seeds the reconnect jitter, so that devices do not retry in lockstep.
    pub seed: u64,
}

/// Runs the device until its task is aborted. `connecting` is held until the
/// first CONNACK: the caller bounds how many devices connect at once with it.
pub async fn run(spec: Spec, progress: Arc<Progress>, connecting: OwnedSemaphorePermit) {
    let presence = |online| encode(Encoding::Cbor, &Presence { v: PROTOCOL_VERSION, online });
    let mut options = MqttOptions::new(&spec.id, &spec.host, spec.port);
    options
        .set_credentials(&spec.id, &spec.token)
        .set_clean_session(false)
        .set_keep_alive(KEEP_ALIVE)
        .set_inflight(INFLIGHT)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_last_will(LastWill::new(
            spec.topics.topic(&spec.id, Channel::Presence),
            presence(false),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut events) = AsyncClient::new(options, REQUEST_CAPACITY);
    let mut device = Device { spec, client, progress, seq: 0, desired: None, outbox: VecDeque::new(), awaiting: None };
    let mut connecting = Some(connecting);
    let mut backoff = FIRST_BACKOFF;
    let mut rng = device.spec.seed | 1;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if connecting.take().is_some() {
                    device.progress.connected.fetch_add(1, Ordering::Relaxed);
                }
                backoff = FIRST_BACKOFF;
                device.on_connect(presence(true));
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => device.on_publish(&publish.topic, &publish.payload),
            Ok(_) => {}
            Err(_) => {
                device.progress.connection_errors.fetch_add(1, Ordering::Relaxed);
                // xorshift: up to a quarter of the backoff on top, as the agent does.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                tokio::time::sleep(backoff + backoff.mul_f64((rng % 1000) as f64 / 4000.0)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

struct Device {
    spec: Spec,
    client: AsyncClient,
    progress: Arc<Progress>,
    /// Number of the last report made.
    seq: u64,
    desired: Option<DesiredState>,
    /// Reports the hub has not acknowledged yet, sent again after each
    /// reconnect (the agent keeps them in its store).
    outbox: VecDeque<(u64, Vec<u8>)>,
    /// The report that carries the newest desired state's generation, until the hub acknowledges it.
    awaiting: Option<u64>,
}

impl Device {
    fn topic(&self, channel: Channel) -> String {
        self.spec.topics.topic(&self.spec.id, channel)
    }

    /// `try_`: the event loop runs in this same task, so waiting for room in
    /// the request channel would wait forever. A report that does not fit
    /// stays in the outbox for the next connection.
    fn publish(&self, channel: Channel, retain: bool, payload: Vec<u8>) {
        let _ = self.client.try_publish(self.topic(channel), QoS::AtLeastOnce, retain, payload);
    }

    fn on_connect(&mut self, online: Vec<u8>) {
        let filters = [Channel::Desired, Channel::Ack, Channel::Command]
            .map(|channel| rumqttc::SubscribeFilter::new(self.topic(channel), QoS::AtLeastOnce));
        let _ = self.client.try_subscribe_many(filters);
        self.publish(Channel::Presence, true, online);
        for (_, payload) in &self.outbox {
            self.publish(Channel::Reported, false, payload.clone());
        }
        // As an agent after its start: a full report first.
        if self.seq == 0 {
            self.report(true, Vec::new());
        }
    }

    fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        let Some((_, channel)) = self.spec.topics.parse(topic) else { return };
        match channel {
            Channel::Desired => {
                let Ok(message) = decode::<DesiredMessage>(payload) else { return };
                // The retained state comes again after every reconnect.
                if self.desired.as_ref().is_some_and(|d| d.generation >= message.state.generation) {
                    return;
                }
                let kept = |d: &DesiredState, name: &str| workloads(d).any(|w| w.name == name);
                let removed = match &self.desired {
                    Some(old) => workloads(old).filter(|w| !kept(&message.state, &w.name)).map(|w| w.name).collect(),
                    None => Vec::new(),
                };
                self.desired = Some(message.state);
                self.progress.stored.fetch_add(1, Ordering::Relaxed);
                self.report(false, removed);
                self.awaiting = Some(self.seq);
            }
            Channel::Ack => {
                let Ok(ack) = decode::<Ack>(payload) else { return };
                self.outbox.retain(|(seq, _)| *seq > ack.reports);
                if self.awaiting.is_some_and(|seq| seq <= ack.reports) {
                    self.awaiting = None;
                    self.progress.acknowledged.fetch_add(1, Ordering::Relaxed);
                }
            }
            Channel::Command => {
                // Restarts and logs concern workloads, which a simulated device does not run.
                if let Ok(CommandMessage { command: Command::FullReport, .. }) = decode(payload) {
                    self.report(true, Vec::new());
                }
            }
            Channel::Reported | Channel::Events | Channel::Presence | Channel::Logs => {}
        }
    }

    /// Reports every workload of the desired state as running: in a delta,
    /// since only they can have changed.
    fn report(&mut self, full: bool, removed: Vec<String>) {
        self.seq += 1;
        let report = Report {
            v: PROTOCOL_VERSION,
            // No store, so no epoch: the hub counts the numbers as they come, as from an agent before epochs.
            epoch: 0,
            seq: self.seq,
            full,
            generation: self.desired.as_ref().map(|d| d.generation),
            // As the agent: the version goes with full reports only.
            agent_version: if full { "fleet-sim".into() } else { String::new() },
            workloads: self.desired.iter().flat_map(workloads).collect(),
            removed,
        };
        let payload = encode(Encoding::Cbor, &report);
        self.outbox.push_back((self.seq, payload.clone()));
        self.publish(Channel::Reported, false, payload);
    }
}

fn workloads(state: &DesiredState) -> impl Iterator<Item = WorkloadReport> + '_ {
    state.deployments.iter().flat_map(|deployment| {
        deployment.workloads.iter().map(|workload| WorkloadReport {
            name: workload.name.clone(),
            deployment: Some(deployment.name.clone()),
            revision: Some(deployment.revision),
            state: "running".into(),
            health: None,
            restarts: 0,
            last_exit: None,
        })
    })
}
