//! One SIMULATED device's link: a bare rumqttc client speaking the sync
//! protocol as the edge-agent does (docs/protocol.md, edge-agent/src/sync.rs),
//! in front of a simulated runtime (runtime.rs). Reports and events are
//! numbered and kept in an outbox until the hub's ack, and sent again after
//! every reconnect or when unacknowledged for long; there is no store, so no
//! epoch (0, as an agent before epochs).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_proto::sync::{
    decode, encode, Ack, Channel, Command, CommandMessage, DesiredMessage, Encoding, EventBatch, Presence, Report,
    Topics, WorkloadReport, PROTOCOL_VERSION,
};
use outpost_proto::{Event, EventKind};
use rumqttc::{AsyncClient, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::runtime::{Output, Runtime, Step};
use super::script::FailureScript;

/// The edge-agent's default.
const KEEP_ALIVE: Duration = Duration::from_secs(120);
/// Requests queued between a device and its event loop: a device sends a
/// handful of messages per connection, and 10,000 of these channels add up.
const REQUEST_CAPACITY: usize = 16;
const INFLIGHT: u16 = 8;
const MAX_PACKET: usize = 64 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// As the agent.
const EVENTS_PER_BATCH: usize = 100;
/// As the agent: what the hub has not acknowledged goes again after 30 s,
/// then ever more rarely (a broker may drop what it acknowledged).
const RESEND_FIRST: Duration = Duration::from_secs(30);
const RESEND_MAX: Duration = Duration::from_secs(600);
/// No store, so no epoch: the hub counts the numbers as they come, as from an agent before epochs.
const EPOCH: u64 = 0;

/// Counters over the whole fleet.
#[derive(Default)]
pub(super) struct Counters {
    /// Devices that had their first CONNACK.
    pub connected: AtomicUsize,
    /// Connection attempts that failed (each one retried after a backoff).
    pub connection_errors: AtomicUsize,
}

/// What the fleet's accessors read of one device.
pub(super) struct DeviceState {
    pub runtime: Runtime,
    /// The newest generation whose report the hub acknowledged.
    pub acknowledged: Option<u64>,
}

pub(super) struct Link {
    pub index: usize,
    pub id: String,
    pub token: String,
    pub mqtt: SocketAddr,
    pub topics: Arc<Topics>,
    pub script: Arc<FailureScript>,
    pub state: Arc<Mutex<DeviceState>>,
    pub counters: Arc<Counters>,
}

/// Runs the device until its task is aborted. It connects once it holds a
/// permit of `connecting`, which it keeps until its first CONNACK: the fleet
/// bounds how many devices connect at once with it.
pub(super) async fn run(link: Link, connecting: Arc<Semaphore>) {
    let Ok(permit) = connecting.acquire_owned().await else { return };
    let mut permit = Some(permit);
    let presence = |online| encode(Encoding::Cbor, &Presence { v: PROTOCOL_VERSION, online });
    let mut options = MqttOptions::new(&link.id, link.mqtt.ip().to_string(), link.mqtt.port());
    options
        .set_credentials(&link.id, &link.token)
        .set_clean_session(false)
        .set_keep_alive(KEEP_ALIVE)
        .set_inflight(INFLIGHT)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_last_will(LastWill::new(
            link.topics.topic(&link.id, Channel::Presence),
            presence(false),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut events) = AsyncClient::new(options, REQUEST_CAPACITY);
    let mut rng = link.index as u64 + 1;
    let mut device = Device {
        link,
        client,
        report_seq: 0,
        reports: VecDeque::new(),
        awaiting: None,
        reported: Vec::new(),
        event_seq: 0,
        events: VecDeque::new(),
        sent_events: 0,
        verdicts: Vec::new(),
        resend_at: None,
        resend_after: RESEND_FIRST,
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        let next_verdict = device.verdicts.iter().map(|(at, _, _)| *at).min();
        tokio::select! {
            polled = events.poll() => match polled {
                Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                    if permit.take().is_some() {
                        device.link.counters.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    backoff = FIRST_BACKOFF;
                    device.on_connect(presence(true));
                }
                Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => {
                    device.on_publish(&publish.topic, &publish.payload)
                }
                Ok(_) => {}
                Err(_) => {
                    device.link.counters.connection_errors.fetch_add(1, Ordering::Relaxed);
                    // xorshift: up to a quarter of the backoff on top, as the agent does.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    tokio::time::sleep(backoff + backoff.mul_f64((rng % 1000) as f64 / 4000.0)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            },
            _ = sleep_until(next_verdict) => device.judge_due(),
            _ = sleep_until(device.resend_at) => device.resend(),
        }
        device.arm_resend();
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Device {
    link: Link,
    client: AsyncClient,
    /// Number of the last report made.
    report_seq: u64,
    /// Reports the hub has not acknowledged yet, sent again after each reconnect.
    reports: VecDeque<(u64, Vec<u8>)>,
    /// (report, generation): the first report of the newest desired state, until the hub acknowledges it.
    awaiting: Option<(u64, u64)>,
    /// The workloads of the last report, for the next delta's `removed`.
    reported: Vec<String>,
    /// Number of the last event made.
    event_seq: u64,
    /// Events the hub has not acknowledged yet.
    events: VecDeque<Event>,
    /// Highest event number handed to the client since the last connect.
    sent_events: u64,
    /// Verdicts due: when, deployment, revision.
    verdicts: Vec<(Instant, String, u64)>,
    /// When to send the outbox again if the hub has not acknowledged it.
    resend_at: Option<Instant>,
    resend_after: Duration,
}

impl Device {
    fn topic(&self, channel: Channel) -> String {
        self.link.topics.topic(&self.link.id, channel)
    }

    /// `try_`: the event loop runs in this same task, so waiting for room in
    /// the request channel would wait forever. What does not fit stays in
    /// the outbox for later.
    fn publish(&self, channel: Channel, retain: bool, payload: Vec<u8>) -> bool {
        self.client.try_publish(self.topic(channel), QoS::AtLeastOnce, retain, payload).is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeviceState> {
        self.link.state.lock().expect("no simulated device panics holding its state")
    }

    fn on_connect(&mut self, online: Vec<u8>) {
        let filters = [Channel::Desired, Channel::Ack, Channel::Command]
            .map(|channel| rumqttc::SubscribeFilter::new(self.topic(channel), QoS::AtLeastOnce));
        let _ = self.client.try_subscribe_many(filters);
        self.publish(Channel::Presence, true, online);
        self.send_outbox();
        // As an agent after its start: a full report first.
        if self.report_seq == 0 {
            self.full_report();
        }
    }

    fn send_outbox(&mut self) {
        for (_, payload) in &self.reports {
            self.publish(Channel::Reported, false, payload.clone());
        }
        self.sent_events = 0;
        self.send_events();
    }

    fn arm_resend(&mut self) {
        if self.reports.is_empty() && self.events.is_empty() {
            self.resend_at = None;
            self.resend_after = RESEND_FIRST;
        } else if self.resend_at.is_none() {
            self.resend_at = Some(Instant::now() + self.resend_after);
        }
    }

    fn resend(&mut self) {
        self.send_outbox();
        self.resend_after = (self.resend_after * 2).min(RESEND_MAX);
        self.resend_at = Some(Instant::now() + self.resend_after);
    }

    fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        let Some((_, channel)) = self.link.topics.parse(topic) else { return };
        match channel {
            Channel::Desired => {
                let Ok(message) = decode::<DesiredMessage>(payload) else { return };
                let step = self.lock().runtime.apply(&message.state, &self.link.script);
                if step.outputs.is_empty() {
                    return;
                }
                self.take(step);
                self.awaiting = Some((self.report_seq, message.state.generation));
            }
            Channel::Ack => {
                let Ok(ack) = decode::<Ack>(payload) else { return };
                // An ack of another epoch counts another store's messages.
                if ack.epoch != EPOCH {
                    return;
                }
                let before = self.reports.len() + self.events.len();
                self.reports.retain(|(seq, _)| *seq > ack.reports);
                self.events.retain(|event| event.seq > ack.events);
                if self.reports.len() + self.events.len() < before {
                    // The hub is alive: a full wait again.
                    self.resend_at = None;
                    self.resend_after = RESEND_FIRST;
                }
                if let Some((_, generation)) = self.awaiting.filter(|(seq, _)| *seq <= ack.reports) {
                    self.awaiting = None;
                    self.lock().acknowledged = Some(generation);
                }
            }
            Channel::Command => {
                // Restarts and logs concern workloads, which a simulated device does not run.
                if let Ok(CommandMessage { command: Command::FullReport, .. }) = decode(payload) {
                    self.full_report();
                }
            }
            Channel::Reported | Channel::Events | Channel::Presence | Channel::Logs => {}
        }
    }

    fn judge_due(&mut self) {
        let now = Instant::now();
        let (due, later) = std::mem::take(&mut self.verdicts).into_iter().partition(|(at, _, _)| *at <= now);
        self.verdicts = later;
        for (_, deployment, revision) in due {
            let step = self.lock().runtime.judge(&deployment, revision, &self.link.script);
            self.take(step);
        }
    }

    /// Records and sends what a step of the runtime produced, and schedules its verdicts.
    fn take(&mut self, step: Step) {
        let now = Instant::now();
        for due in step.verdicts_due {
            self.verdicts.push((now + due.after, due.deployment, due.revision));
        }
        for output in step.outputs {
            match output {
                Output::Event(kind) => self.event(kind),
                Output::Report(workloads) => self.report(false, workloads),
            }
        }
        self.send_events();
    }

    fn event(&mut self, kind: EventKind) {
        self.event_seq += 1;
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.events.push_back(Event { seq: self.event_seq, at, kind });
    }

    /// Hands the events not handed yet since the connect to the client, in order.
    fn send_events(&mut self) {
        let unsent: Vec<Event> = self.events.iter().filter(|e| e.seq > self.sent_events).cloned().collect();
        let oldest_held = self.events.front().map(|e| e.seq);
        for batch in unsent.chunks(EVENTS_PER_BATCH) {
            let message = EventBatch { v: PROTOCOL_VERSION, epoch: EPOCH, events: batch.to_vec(), oldest_held };
            if !self.publish(Channel::Events, false, encode(Encoding::Cbor, &message)) {
                return;
            }
            self.sent_events = batch.last().map_or(self.sent_events, |e| e.seq);
        }
    }

    fn full_report(&mut self) {
        let workloads = self.lock().runtime.workloads();
        self.report(true, workloads);
    }

    /// Reports `workloads`, every workload the device has: a delta carries
    /// them all too, with those gone since the last report as `removed`.
    fn report(&mut self, full: bool, workloads: Vec<WorkloadReport>) {
        let names: Vec<String> = workloads.iter().map(|w| w.name.clone()).collect();
        let removed = match full {
            true => Vec::new(),
            false => self.reported.iter().filter(|name| !names.contains(name)).cloned().collect(),
        };
        self.reported = names;
        self.report_seq += 1;
        let report = Report {
            v: PROTOCOL_VERSION,
            epoch: EPOCH,
            seq: self.report_seq,
            full,
            generation: self.lock().runtime.generation(),
            // As the agent: the version goes with full reports only.
            agent_version: if full { "fleet-sim".into() } else { String::new() },
            workloads,
            removed,
        };
        let payload = encode(Encoding::Cbor, &report);
        self.reports.push_back((self.report_seq, payload.clone()));
        self.publish(Channel::Reported, false, payload);
    }
}
