//! The hub's side of the sync protocol, the only module that knows rumqttc:
//! one MQTT client (persistent session, QoS 1) that takes reports, events,
//! presence and logs replies from every device, and publishes desired
//! states, acks and commands.
//!
//! Two tasks: one polls the MQTT event loop (which also reconnects), the
//! other applies what arrives to the store and publishes. The only publisher
//! is the second task, and it reads the store when it publishes, so the last
//! desired state published is always the last one stored.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use outpost_proto::sync::{
    decode, encode, Channel, Command, CommandMessage, DesiredMessage, Encoding, EventBatch, LogsMessage, Presence,
    Report, Topics, PROTOCOL_VERSION,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::logs::SharedReplies;
use crate::registry::{self, ReportOutcome};
use crate::store::{Store, StoreError};

/// The hub's MQTT client id (and user name at its own broker); the
/// configuration refuses a device of this name.
pub const HUB_CLIENT_ID: &str = "outpost-hub";

/// Devices' reports with many workloads exceed rumqttc's 10 KiB default.
const MAX_PACKET_SIZE: usize = 256 * 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Messages applied together, then flushed once and acknowledged.
const BATCH: usize = 256;
/// What the hub subscribes to: everything devices send.
pub const FROM_DEVICES: [Channel; 4] = [Channel::Reported, Channel::Events, Channel::Presence, Channel::Logs];

pub struct Settings {
    pub host: String,
    pub port: u16,
    /// Empty: connect without credentials.
    pub username: String,
    pub password: String,
    pub topics: Topics,
    pub encoding: Encoding,
}

enum Input {
    /// The client (re)connected: subscribe, and publish every desired state and ack again.
    Connected,
    Message(Publish),
    DesiredChanged(String),
    /// An operator's command, numbered and stored: publish it to the device.
    Command(String, CommandMessage),
}

/// Tells the sync task that a device's desired state changed in the store.
#[derive(Clone)]
pub struct Publisher {
    inputs: mpsc::UnboundedSender<Input>,
}

impl Publisher {
    pub fn desired_changed(&self, device: &str) {
        // Fails only once the sync task has stopped, at shutdown.
        let _ = self.inputs.send(Input::DesiredChanged(device.to_string()));
    }

    pub fn command(&self, device: &str, message: CommandMessage) {
        // As above: fails only at shutdown.
        let _ = self.inputs.send(Input::Command(device.to_string(), message));
    }
}

pub struct Tasks {
    event_loop: JoinHandle<()>,
    applier: JoinHandle<()>,
}

impl Tasks {
    /// Waits until both tasks have stopped: the event loop at `shutdown`,
    /// the applier once every `Publisher` is dropped too.
    pub async fn join(self) {
        for task in [self.event_loop, self.applier] {
            if let Err(e) = task.await {
                error!("a sync task failed: {e}");
            }
        }
    }
}

/// Starts the client. `subscribed` turns true once the broker confirms the
/// hub's subscriptions.
pub fn start(
    settings: Settings,
    store: Store,
    logs: SharedReplies,
    subscribed: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
) -> (Publisher, Tasks) {
    let mut options = MqttOptions::new(HUB_CLIENT_ID, &settings.host, settings.port);
    options.set_clean_session(false).set_keep_alive(KEEP_ALIVE).set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE);
    if !settings.username.is_empty() {
        options.set_credentials(&settings.username, &settings.password);
    }
    let (client, event_loop) = AsyncClient::new(options, 1024);
    // Unbounded: the event loop must never wait on the applier, which may
    // itself be waiting for the event loop to take its publishes.
    let (inputs, rx) = mpsc::unbounded_channel();
    let event_loop = tokio::spawn(poll(event_loop, inputs.clone(), subscribed, shutdown));
    let applier = Applier { client, store, logs, topics: settings.topics, encoding: settings.encoding };
    let applier = tokio::spawn(applier.run(rx));
    (Publisher { inputs }, Tasks { event_loop, applier })
}

async fn poll(
    mut event_loop: rumqttc::EventLoop,
    inputs: mpsc::UnboundedSender<Input>,
    subscribed: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let event = tokio::select! {
            event = event_loop.poll() => event,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let input = match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(session_present = ack.session_present, "connected to the MQTT broker");
                backoff = FIRST_BACKOFF;
                Input::Connected
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => Input::Message(publish),
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subscribed.store(true, Ordering::Release);
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                // Polling again reconnects; the pause is ours.
                warn!("MQTT connection: {e}; trying again in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if inputs.send(input).is_err() {
            return;
        }
    }
}

struct Applier {
    client: AsyncClient,
    store: Store,
    logs: SharedReplies,
    topics: Topics,
    encoding: Encoding,
}

/// What one batch of inputs asks to publish.
#[derive(Default)]
struct Outgoing {
    subscribe: bool,
    desired: BTreeSet<String>,
    acks: BTreeSet<String>,
    full_report_commands: Vec<(String, u64)>,
    commands: Vec<(String, CommandMessage)>,
}

impl Applier {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            let mut outgoing = Outgoing::default();
            for input in batch.drain(..) {
                self.apply(input, &mut outgoing);
            }
            if let Err(e) = self.publish(outgoing).await {
                error!("the sync task stops: {e}");
                return;
            }
        }
    }

    fn apply(&self, input: Input, out: &mut Outgoing) {
        match input {
            Input::Connected => {
                out.subscribe = true;
                match (self.store.desired_states(), self.store.devices()) {
                    (Ok(desired), Ok(devices)) => {
                        out.desired.extend(desired.into_iter().map(|(id, _)| id));
                        let heard = devices.into_iter().filter(|d| d.epoch != 0 || d.report_seq > 0 || d.event_seq > 0);
                        out.acks.extend(heard.map(|d| d.id));
                    }
                    (Err(e), _) | (_, Err(e)) => error!("cannot publish the desired states and acks again: {e}"),
                }
            }
            Input::DesiredChanged(id) => {
                out.desired.insert(id);
            }
            Input::Command(id, message) => out.commands.push((id, message)),
            Input::Message(publish) => self.apply_message(&publish, out),
        }
    }

    /// A payload that does not decode is logged and dropped: the device's
    /// connection and the hub's view of it stay as they were.
    fn apply_message(&self, publish: &Publish, out: &mut Outgoing) {
        let Some((device, channel)) = self.topics.parse(&publish.topic) else {
            debug!(topic = publish.topic, "ignored a message outside the protocol's topics");
            return;
        };
        if !registry::valid_device_id(device) {
            warn!(topic = publish.topic, "dropped a message from a device whose id is not valid");
            return;
        }
        let now = now_ms();
        let payload = &publish.payload[..];
        let stored = match channel {
            Channel::Reported => decode::<Report>(payload).map(|report| {
                self.follow_epoch(device, report.epoch, now, out)?;
                let outcome = registry::apply_report(&self.store, device, &report, now)?;
                if let ReportOutcome::Gap { full_report_command: Some(id) } = outcome {
                    info!(device, seq = report.seq, "a report is missing: asking the device for a full report");
                    out.full_report_commands.push((device.to_string(), id));
                }
                out.acks.insert(device.to_string());
                Ok(())
            }),
            Channel::Events => decode::<EventBatch>(payload).map(|batch| {
                self.follow_epoch(device, batch.epoch, now, out)?;
                registry::store_events(&self.store, device, &batch, now)?;
                out.acks.insert(device.to_string());
                Ok(())
            }),
            Channel::Presence => decode::<Presence>(payload)
                .map(|presence| registry::set_presence(&self.store, device, &presence, publish.retain, now)),
            Channel::Logs => decode::<LogsMessage>(payload).map(|message| {
                debug!(device, command = message.command, workload = message.workload, "logs from the device");
                self.logs.lock().unwrap_or_else(PoisonError::into_inner).insert(device, message, now);
                Ok(())
            }),
            // The hub's own channels: not subscribed to.
            Channel::Desired | Channel::Ack | Channel::Command => return,
        };
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(device, "cannot store a message from the device: {e}"),
            Err(e) => warn!(device, ?channel, "dropped a payload that does not decode: {e}"),
        }
    }

    fn follow_epoch(&self, device: &str, epoch: u64, now: u64, out: &mut Outgoing) -> Result<(), StoreError> {
        if registry::follow_epoch(&self.store, device, epoch, now)? {
            warn!(
                device,
                epoch,
                "the device's store was reset (wiped, replaced, or its agent upgraded to one with epochs): its report \
                 and event numbers start again, its events so far are kept"
            );
            // A wiped store lost its desired state, and the broker need not send the retained one
            // again: rumqttd sends retained messages only on a subscription new to the session.
            out.desired.insert(device.to_string());
        }
        Ok(())
    }

    /// Publishes what a batch asks for; acks only after the store is flushed.
    async fn publish(&self, out: Outgoing) -> Result<(), rumqttc::ClientError> {
        if out.subscribe {
            let filters =
                FROM_DEVICES.map(|channel| rumqttc::SubscribeFilter::new(self.topics.all(channel), QoS::AtLeastOnce));
            self.client.subscribe_many(filters).await?;
        }
        for id in &out.desired {
            match self.store.desired(id) {
                Ok(Some(state)) => {
                    let message = DesiredMessage { v: PROTOCOL_VERSION, state };
                    self.send(id, Channel::Desired, true, encode(self.encoding, &message)).await?;
                }
                Ok(None) => {}
                Err(e) => error!(device = id, "cannot read the desired state to publish: {e}"),
            }
        }
        if !out.acks.is_empty() {
            if let Err(e) = self.store.flush().await {
                error!("cannot flush the store, so nothing is acknowledged: {e}");
                return Ok(());
            }
        }
        for id in &out.acks {
            match self.store.device(id) {
                Ok(Some(device)) => {
                    self.send(id, Channel::Ack, true, encode(self.encoding, &registry::ack(&device))).await?;
                }
                Ok(None) => {}
                Err(e) => error!(device = id, "cannot read the device to acknowledge: {e}"),
            }
        }
        for (id, command_id) in out.full_report_commands {
            let message = CommandMessage { v: PROTOCOL_VERSION, id: command_id, command: Command::FullReport };
            self.send(&id, Channel::Command, false, encode(self.encoding, &message)).await?;
        }
        for (id, message) in out.commands {
            info!(device = id, command = message.id, "sending an operator's command: {:?}", message.command);
            self.send(&id, Channel::Command, false, encode(self.encoding, &message)).await?;
        }
        Ok(())
    }

    async fn send(
        &self,
        device: &str,
        channel: Channel,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), rumqttc::ClientError> {
        self.client.publish(self.topics.topic(device, channel), QoS::AtLeastOnce, retain, payload).await
    }
}

pub(crate) fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_millis() as u64
}
