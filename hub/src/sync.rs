//! The hub's side of the sync protocol: one MQTT client (persistent
//! session, QoS 1) that takes reports, events, presence and logs replies
//! from every device, and publishes desired states, acks and commands. With
//! site hubs below (`[sites]`), it also takes their batches of their
//! devices' messages, and publishes those devices' desired states to them
//! (docs/federation.md). With a parent (`[upstream]`), what devices say is
//! queued for it too; `upstream.rs` sends the queue.
//!
//! Two tasks: one polls the MQTT event loop (which also reconnects), the
//! other applies what arrives to the store and publishes. The only publisher
//! is the second task, and it reads the store when it publishes, so the last
//! desired state published is always the last one stored.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use outpost_proto::federation::{SiteAck, SiteBatch, SiteChannel, SiteItem, SiteTopics, Upward};
use outpost_proto::sync::{
    decode, encode, Channel, Command, CommandMessage, DesiredMessage, Encoding, EventBatch, LogsMessage, Presence,
    Report, Topics, PROTOCOL_VERSION,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::logs::SharedReplies;
use crate::registry::{self, ReportOutcome};
use crate::store::{Device, Store, StoreError};

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
    /// Whether site hubs report here (`[sites]`).
    pub sites: bool,
    /// Set on a site hub: what its devices say is queued for the parent,
    /// and this wakes the link that sends it.
    pub upward: Option<Arc<Notify>>,
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
    let site_topics = SiteTopics::new(settings.topics.prefix());
    let applier = Applier {
        client,
        store,
        logs,
        topics: settings.topics,
        encoding: settings.encoding,
        site_topics: settings.sites.then_some(site_topics),
        upward: settings.upward,
    };
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
    /// Set when site hubs report here.
    site_topics: Option<SiteTopics>,
    upward: Option<Arc<Notify>>,
}

/// What one batch of inputs asks to publish.
#[derive(Default)]
struct Outgoing {
    subscribe: bool,
    desired: BTreeSet<String>,
    acks: BTreeSet<String>,
    full_report_commands: Vec<(String, u64)>,
    commands: Vec<(String, CommandMessage)>,
    /// Sites whose batches were stored: acknowledge them.
    site_acks: BTreeSet<String>,
    /// Items were queued for the parent.
    queued_upward: bool,
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
        if let Some((site, channel)) = self.site_topics.as_ref().and_then(|t| t.parse(&publish.topic)) {
            return self.apply_site_message(&site, channel, publish, out);
        }
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
            Channel::Reported => decode::<Report>(payload)
                .map(|report| self.apply_upward(device, None, Upward::Report(report), publish.retain, now, out)),
            Channel::Events => decode::<EventBatch>(payload)
                .map(|batch| self.apply_upward(device, None, Upward::Events(batch), publish.retain, now, out)),
            Channel::Presence => decode::<Presence>(payload)
                .map(|presence| self.apply_upward(device, None, Upward::Presence(presence), publish.retain, now, out)),
            Channel::Logs => decode::<LogsMessage>(payload)
                .map(|message| self.apply_upward(device, None, Upward::Logs(message), false, now, out)),
            // The hub's own channels: not subscribed to.
            Channel::Desired | Channel::Ack | Channel::Command => return,
        };
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(device, "cannot store a message from the device: {e}"),
            Err(e) => warn!(device, ?channel, "dropped a payload that does not decode: {e}"),
        }
    }

    /// A device's report, events or presence, from the device itself or
    /// (`site`) forwarded by the site hub it is connected to. Stored, then
    /// queued for this hub's own parent, if it has one.
    fn apply_upward(
        &self,
        device: &str,
        site: Option<&str>,
        message: Upward,
        retained: bool,
        now: u64,
        out: &mut Outgoing,
    ) -> Result<(), StoreError> {
        // Where the device is reached: its desired state goes that way. Only
        // a hub with sites below has devices behind one, and only a change is
        // written: this runs for every message.
        if self.site_topics.is_some() {
            let reached_through = site.map(str::to_string);
            if self.store.device(device)?.and_then(|d| d.site) != reached_through {
                self.store.update_device(device, |d| d.site.clone_from(&reached_through))?;
            }
        }
        let mut stored_events = None;
        match &message {
            Upward::Report(report) => {
                self.follow_epoch(device, report.epoch, now, out)?;
                let outcome = registry::apply_report(&self.store, device, report, now)?;
                if let ReportOutcome::Gap { full_report_command: Some(id) } = outcome {
                    info!(device, seq = report.seq, "a report is missing: asking the device for a full report");
                    out.full_report_commands.push((device.to_string(), id));
                }
                if site.is_none() && report.full && outcome == ReportOutcome::Applied && self.lags(device, report)? {
                    out.desired.insert(device.to_string());
                }
            }
            Upward::Events(batch) => {
                self.follow_epoch(device, batch.epoch, now, out)?;
                stored_events = Some(registry::store_events(&self.store, device, batch, now)?);
            }
            Upward::Presence(presence) => registry::set_presence(&self.store, device, presence, retained, now)?,
            Upward::Logs(message) => {
                debug!(device, command = message.command, workload = message.workload, "logs from the device");
                self.logs.lock().unwrap_or_else(PoisonError::into_inner).insert(device, message.clone(), now);
            }
            Upward::Held(notice) => match site {
                Some(site) => {
                    info!(device, site, deployment = notice.deployment, revision = notice.revision, hold = ?notice.hold,
                        "the site holds a revision back, or let it through");
                    registry::apply_held(&self.store, device, site, notice)?;
                }
                None => warn!(device, "dropped a hold notice that did not come from a site"),
            },
        }
        // A site hub acknowledges its devices itself; the parent acknowledges
        // the site. Presence and logs replies are not numbered.
        if site.is_none() && matches!(message, Upward::Report(_) | Upward::Events(_)) {
            out.acks.insert(device.to_string());
        }
        // Only the events stored go up: the parent applies the same rule.
        let message = match stored_events {
            Some(stored) if stored.events.is_empty() => return Ok(()),
            Some(stored) => Upward::Events(stored),
            None => message,
        };
        if self.upward.is_some() {
            let mut message = message;
            crate::site::translate(&self.store, device, &mut message)?;
            self.store.push_upward(device, message, now)?;
            out.queued_upward = true;
        }
        Ok(())
    }

    /// A site hub's batch of its devices' messages, or its own presence.
    fn apply_site_message(&self, site: &str, channel: SiteChannel, publish: &Publish, out: &mut Outgoing) {
        let now = now_ms();
        let stored = match channel {
            SiteChannel::Up => {
                let batch = crate::upstream::decompress(&publish.payload)
                    .and_then(|bytes| decode::<SiteBatch>(&bytes).map_err(|e| e.to_string()));
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(e) => return warn!(site, "dropped a site batch that does not decode: {e}"),
                };
                self.apply_site_batch(site, batch.items, now, out)
            }
            SiteChannel::Presence => match decode::<Presence>(&publish.payload) {
                Ok(presence) => registry::set_site_presence(&self.store, site, presence.online, now),
                Err(e) => return warn!(site, "dropped a site presence that does not decode: {e}"),
            },
            // The parent's own channels: not subscribed to.
            SiteChannel::Ack | SiteChannel::Desired(_) | SiteChannel::Command(_) => return,
        };
        if let Err(e) = stored {
            error!(site, "cannot store a batch from the site: {e}");
        }
    }

    /// Items at or below the site's acknowledged number were stored before
    /// (a batch sent again after a cut): skipped, so each is stored once.
    fn apply_site_batch(
        &self,
        site: &str,
        items: Vec<SiteItem>,
        now: u64,
        out: &mut Outgoing,
    ) -> Result<(), StoreError> {
        let acked = self.store.site(site)?.map_or(0, |s| s.acked_seq);
        let mut newest = acked;
        for item in items.into_iter().filter(|item| item.seq > acked) {
            if !registry::valid_device_id(&item.device) {
                warn!(site, device = item.device, "dropped a site item for a device whose id is not valid");
            } else if let Some(owner) = self.store.device(&item.device)?.and_then(|d| d.site).filter(|s| s != site) {
                warn!(site, device = item.device, owner, "dropped a site item for a device of another site");
            } else {
                // The site's clock says when the device said it, however late it arrives.
                self.apply_upward(&item.device, Some(site), item.message, false, item.at, out)?;
            }
            newest = newest.max(item.seq);
        }
        self.store.update_site(site, |s| {
            s.acked_seq = newest;
            s.last_sync = Some(now);
            s.online = true;
        })?;
        out.site_acks.insert(site.to_string());
        Ok(())
    }

    /// Whether a device's full report (an agent started afresh sends one)
    /// shows it behind its desired state, which it did not refuse: it
    /// received it and could not store it (a full disk), and the broker,
    /// which delivered it to the session already, does not send it again.
    /// One message per agent start at most: a device that merely lags is
    /// not sent its desired state again.
    fn lags(&self, device: &str, report: &Report) -> Result<bool, StoreError> {
        let Some(desired) = self.store.desired(device)?.map(|state| state.generation) else { return Ok(false) };
        let refused = self.store.device(device)?.and_then(|d| d.refused).map(|r| r.generation);
        Ok(report.generation.unwrap_or(0) < desired && refused != Some(desired))
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
            let mut filters: Vec<_> = FROM_DEVICES
                .map(|channel| rumqttc::SubscribeFilter::new(self.topics.all(channel), QoS::AtLeastOnce))
                .into();
            if let Some(sites) = &self.site_topics {
                for channel in [SiteChannel::Up, SiteChannel::Presence] {
                    filters.push(rumqttc::SubscribeFilter::new(sites.all(&channel), QoS::AtLeastOnce));
                }
            }
            self.client.subscribe_many(filters).await?;
        }
        for id in &out.desired {
            match self.store.desired(id) {
                Ok(Some(state)) => {
                    let message = encode(self.encoding, &DesiredMessage { v: PROTOCOL_VERSION, state });
                    match (self.store.device(id), &self.site_topics) {
                        (Ok(Some(Device { site: Some(site), .. })), Some(sites)) => {
                            let topic = sites.topic(&site, &SiteChannel::Desired(id.clone()));
                            self.client.publish(topic, QoS::AtLeastOnce, true, message).await?;
                        }
                        _ => self.send(id, Channel::Desired, true, message).await?,
                    }
                }
                Ok(None) => {}
                Err(e) => error!(device = id, "cannot read the desired state to publish: {e}"),
            }
        }
        if out.queued_upward || !out.site_acks.is_empty() {
            // Queued items reach the parent, and acks reach the sites, only once on disk.
            if let Err(e) = self.store.flush().await {
                error!("cannot flush the store, so nothing is acknowledged: {e}");
                return Ok(());
            }
            if let Some(upward) = out.queued_upward.then_some(self.upward.as_ref()).flatten() {
                upward.notify_one();
            }
        }
        if let Some(sites) = &self.site_topics {
            for site in &out.site_acks {
                let seq = self.store.site(site).ok().flatten().map_or(0, |s| s.acked_seq);
                let ack = encode(self.encoding, &SiteAck { v: PROTOCOL_VERSION, seq });
                self.client.publish(sites.topic(site, &SiteChannel::Ack), QoS::AtLeastOnce, true, ack).await?;
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
            self.send_command(&id, &message).await?;
        }
        for (id, message) in out.commands {
            info!(device = id, command = message.id, "sending an operator's command: {:?}", message.command);
            self.send_command(&id, &message).await?;
        }
        Ok(())
    }

    /// To the device, or through the site hub it is reached by.
    async fn send_command(&self, device: &str, message: &CommandMessage) -> Result<(), rumqttc::ClientError> {
        let payload = encode(self.encoding, message);
        match (self.store.device(device), &self.site_topics) {
            (Ok(Some(Device { site: Some(site), .. })), Some(sites)) => {
                let topic = sites.topic(&site, &SiteChannel::Command(device.to_string()));
                self.client.publish(topic, QoS::AtLeastOnce, false, payload).await
            }
            _ => self.send(device, Channel::Command, false, payload).await,
        }
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
