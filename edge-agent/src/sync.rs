//! The agent's link to its hub: the only module that knows rumqttc.
//!
//! rumqttc forgets unacknowledged messages when the process restarts or the
//! broker drops the session, so the outbox lives in the store: reports and
//! events stay there until the hub's `Ack` (published after the hub stored
//! them) covers them, and everything not yet covered is sent again after each
//! reconnect. The hub drops duplicates by sequence number, so each report and
//! event counts once. The numbers count within the store's epoch: an ack of
//! another epoch (the hub's retained ack of a store since wiped) is ignored,
//! as it would delete this store's messages under the same numbers. A
//! desired state is acknowledged by the reports' `generation` only after it
//! is stored and flushed.
//!
//! Logs asked for with `send-logs` go straight out, never through the
//! outbox: they answer a live request, which the operator makes again if the
//! reply is lost.
//!
//! Nothing here can stop a workload: without a link the device runs its last
//! desired state, and the link comes back on its own, with exponential
//! backoff and jitter.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::sync::{
    decode, encode, Ack, Channel, Command, CommandMessage, DesiredMessage, Encoding, EventBatch, LogsMessage, Presence,
    Report, Topics, WorkloadReport, MAX_LOG_BYTES, MAX_LOG_LINES, PROTOCOL_VERSION,
};
use outpost_proto::DesiredState;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::Notify;

use crate::daemon::{self, ApplyError};
use crate::runtime::logs::read_lines;
use crate::runtime::{RuntimeError, Supervisor};
use crate::store::Store;

/// Events per message when the outbox is sent again.
const EVENTS_PER_BATCH: usize = 100;
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long the hub may take to acknowledge what the device sent before the
/// device sends it again, doubling while nothing is acknowledged.
const RESEND_FIRST: Duration = Duration::from_secs(30);
const RESEND_MAX: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// `mqtt://host:port`, or `mqtts://host:port` with `tls`.
    pub hub: String,
    /// For `mqtts://`: the hub's CA and the device's certificate, which
    /// replaces the token (crate::identity).
    pub tls: Option<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
    pub device_id: String,
    pub token: String,
    pub topics: Topics,
    pub encoding: Encoding,
    pub keep_alive: Duration,
    pub report_interval: Duration,
    /// Notified each time the link to the hub comes up (an agent update on
    /// trial waits for it).
    pub connected: Arc<Notify>,
}

#[derive(Debug, thiserror::Error)]
#[error("hub address {0:?} is not valid: write mqtt://host:port, or mqtts://host:port with the device's certificate")]
pub struct BadHubAddress(String);

/// Host and port of an `mqtt://` URL, or of an `mqtts://` one when `tls`.
fn host_port(url: &str, tls: bool) -> Result<(String, u16), BadHubAddress> {
    let (scheme, default_port) = if tls { ("mqtts://", 8883) } else { ("mqtt://", 1883) };
    let rest = url.strip_prefix(scheme).ok_or_else(|| BadHubAddress(url.to_string()))?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => {
            Ok((host.trim_matches(['[', ']']).to_string(), port.parse().map_err(|_| BadHubAddress(url.to_string()))?))
        }
        None if !rest.is_empty() => Ok((rest.to_string(), default_port)),
        _ => Err(BadHubAddress(url.to_string())),
    }
}

/// Runs the link until the task is dropped.
pub async fn run(
    settings: SyncSettings,
    store: Arc<Store>,
    supervisor: Supervisor,
    kick: Arc<Notify>,
    trust_root: Arc<PathBuf>,
) -> Result<(), BadHubAddress> {
    let (host, port) = host_port(&settings.hub, settings.tls.is_some())?;
    let topic = |channel| settings.topics.topic(&settings.device_id, channel);
    let mut options = MqttOptions::new(&settings.device_id, host, port);
    match &settings.tls {
        Some(tls) => {
            options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
        }
        None => {
            options.set_credentials(&settings.device_id, &settings.token);
        }
    }
    options
        .set_keep_alive(settings.keep_alive)
        .set_clean_session(false)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_last_will(LastWill::new(
            topic(Channel::Presence),
            encode(settings.encoding, &Presence { v: PROTOCOL_VERSION, online: false }),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut events) = AsyncClient::new(options, 256);
    let epoch = store.epoch();
    let mut link = Link {
        settings: &settings,
        store,
        epoch,
        supervisor,
        kick,
        client,
        sent_events: 0,
        sent_reports: 0,
        acked: Ack { v: PROTOCOL_VERSION, epoch, events: 0, reports: 0 },
        resend: Resend::default(),
        last_view: None,
        trust_root,
        refused: None,
        unstored: None,
    };
    let mut backoff = Duration::from_secs(1);
    let mut tick = tokio::time::interval(settings.report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_secs(1);
                    tracing::info!(hub = %settings.hub, "connected to the hub");
                    settings.connected.notify_one();
                    link.on_connect().await;
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => link.on_publish(&publish.topic, &publish.payload).await,
                Ok(_) => {}
                Err(e) => {
                    let wait = backoff + jitter(backoff);
                    tracing::warn!(hub = %settings.hub, "hub unreachable ({e}); trying again in {:.1}s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            },
            _ = tick.tick() => {
                if let Some(state) = link.unstored.clone() {
                    link.store_desired(state).await;
                }
                link.report().await;
                link.resend_if_unacknowledged().await;
            }
        }
    }
}

/// When to send the outbox again while connected.
#[derive(Debug)]
struct Resend {
    after: Duration,
    /// Since when messages wait for the hub's ack (or since the last progress).
    since: Option<tokio::time::Instant>,
}

impl Default for Resend {
    fn default() -> Self {
        Self { after: RESEND_FIRST, since: None }
    }
}

impl Resend {
    /// The hub acknowledged something new: it is alive, wait again in full.
    fn progress(&mut self, now: tokio::time::Instant) {
        *self = Self { after: RESEND_FIRST, since: Some(now) };
    }

    /// Whether to send again now; each resend doubles the next wait.
    fn due(&mut self, waiting: bool, now: tokio::time::Instant) -> bool {
        if !waiting {
            *self = Self::default();
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) < self.after {
            return false;
        }
        self.since = Some(now);
        self.after = (self.after * 2).min(RESEND_MAX);
        true
    }
}

/// Up to a quarter of `base`, so that a site's devices do not all reconnect at once.
fn jitter(base: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    base.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

struct Link<'a> {
    settings: &'a SyncSettings,
    store: Arc<Store>,
    /// The store's epoch, which every report and event batch carries.
    epoch: u64,
    supervisor: Supervisor,
    kick: Arc<Notify>,
    client: AsyncClient,
    /// Highest event number handed to the client since the last connect.
    sent_events: u64,
    /// Highest report number handed to the client.
    sent_reports: u64,
    /// The hub's newest ack of this store's messages.
    acked: Ack,
    resend: Resend,
    /// The workloads as last reported; `None` sends a full report next.
    last_view: Option<ReportedView>,
    trust_root: Arc<PathBuf>,
    /// The generation last refused: the broker delivers the retained desired
    /// state again at each new session, and one refusal is reported once.
    refused: Option<u64>,
    /// A desired state the store could not take, offered again at each tick.
    unstored: Option<DesiredState>,
}

#[derive(Debug, Clone, PartialEq)]
struct ReportedView {
    generation: Option<u64>,
    workloads: BTreeMap<String, WorkloadReport>,
}

impl Link<'_> {
    fn topic(&self, channel: Channel) -> String {
        self.settings.topics.topic(&self.settings.device_id, channel)
    }

    /// False when the message did not fit the client's queue.
    fn publish(&self, channel: Channel, payload: Vec<u8>, retain: bool) -> bool {
        // try_: the event loop runs in this same task, so waiting for room
        // could wait forever; what does not fit is in the outbox for next time.
        match self.client.try_publish(self.topic(channel), QoS::AtLeastOnce, retain, payload) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("not sent now, kept for the next connection: {e}");
                false
            }
        }
    }

    async fn on_connect(&mut self) {
        for channel in [Channel::Desired, Channel::Ack, Channel::Command] {
            if let Err(e) = self.client.try_subscribe(self.topic(channel), QoS::AtLeastOnce) {
                tracing::warn!("cannot subscribe to {channel:?}: {e}");
            }
        }
        let presence = encode(self.settings.encoding, &Presence { v: PROTOCOL_VERSION, online: true });
        self.publish(Channel::Presence, presence, true);
        self.resend = Resend::default();
        self.send_outbox().await;
    }

    /// Everything the hub has not acknowledged goes again, oldest first.
    async fn send_outbox(&mut self) {
        let store = self.store.clone();
        let reports = blocking(move || store.reports()).await.unwrap_or_default();
        for (seq, payload) in reports {
            self.publish(Channel::Reported, payload, false);
            self.sent_reports = self.sent_reports.max(seq);
        }
        self.sent_events = 0;
        self.send_events().await;
    }

    /// A PUBACK says only that the broker has a message, and a broker may
    /// still drop it (rumqttd drops a slow subscriber's oldest messages); a
    /// message that did not fit the client's queue waits too. The hub's ack
    /// is the receipt: without it, the outbox goes again.
    async fn resend_if_unacknowledged(&mut self) {
        let waiting = self.sent_reports > self.acked.reports || self.sent_events > self.acked.events;
        if self.resend.due(waiting, tokio::time::Instant::now()) {
            tracing::info!("the hub has not acknowledged what this device sent; sending it again");
            self.send_outbox().await;
        }
    }

    /// Stores a desired state from the hub. One the store could not take (a
    /// full disk) is offered again at each tick until it is stored, or a
    /// newer one comes: the hub sends it only once per connection.
    async fn store_desired(&mut self, state: DesiredState) {
        let (store, trust_root) = (self.store.clone(), self.trust_root.clone());
        let generation = state.generation;
        let retry = self.unstored.as_ref().is_some_and(|s| s.generation == generation);
        self.unstored = None;
        let offered = state.clone();
        let applied = blocking(move || Ok::<_, String>(daemon::apply(&store, &trust_root, &offered))).await;
        match applied {
            Some(Ok(true)) => {
                tracing::info!(generation, "desired state from the hub stored");
                self.kick.notify_one();
            }
            Some(Ok(false)) => {}
            Some(Err(ApplyError::NotStored(e))) => {
                if !retry {
                    tracing::error!(
                        generation,
                        "desired state from the hub not stored: {e}; the stored state keeps running, and this one \
                         is stored as soon as the store can take it"
                    );
                }
                self.unstored = Some(state);
            }
            Some(Err(ApplyError::Refused(e))) => {
                tracing::warn!(generation, "desired state from the hub refused: {e}");
                self.refused = Some(generation);
            }
            None => {}
        }
    }

    async fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        let Some((_, channel)) = self.settings.topics.parse(topic) else { return };
        match channel {
            Channel::Desired => match decode::<DesiredMessage>(payload) {
                Ok(message) if self.refused == Some(message.state.generation) => {
                    tracing::debug!(generation = message.state.generation, "the refused desired state again: ignored");
                }
                Ok(message) => self.store_desired(message.state).await,
                Err(e) => tracing::warn!("dropped a desired state that does not decode: {e}"),
            },
            Channel::Ack => match decode::<Ack>(payload) {
                Ok(ack) if ack.epoch != self.epoch => {
                    // Rare enough to say: after a store reset, until the hub acks this store. (At every
                    // ack behind a hub from before epochs, which is to be upgraded first.)
                    tracing::info!(
                        epoch = ack.epoch,
                        own = self.epoch,
                        "ignored the hub's ack of another store (epoch {}): it does not cover this store's messages",
                        ack.epoch
                    );
                }
                Ok(ack) => {
                    if ack.events > self.acked.events || ack.reports > self.acked.reports {
                        self.resend.progress(tokio::time::Instant::now());
                    }
                    self.acked = ack;
                    let store = self.store.clone();
                    blocking(move || store.ack_events(ack.events).and_then(|_| store.ack_reports(ack.reports))).await;
                }
                Err(e) => tracing::warn!("dropped an ack that does not decode: {e}"),
            },
            Channel::Command => match decode::<CommandMessage>(payload) {
                Ok(message) => self.on_command(message.id, message.command).await,
                Err(e) => tracing::warn!("dropped a command that does not decode: {e}"),
            },
            Channel::Reported | Channel::Events | Channel::Presence | Channel::Logs => {}
        }
    }

    async fn on_command(&mut self, id: u64, command: Command) {
        match command {
            Command::FullReport => self.last_view = None,
            Command::RestartWorkload { name } => {
                // Stopped, the reconciler starts it again on its next pass.
                let supervisor = self.supervisor.clone();
                let stopped = blocking(move || {
                    Ok::<_, crate::runtime::RuntimeError>(supervisor.resolve(&name).and_then(|i| supervisor.stop(&i)))
                })
                .await;
                if let Some(Err(e)) = stopped {
                    tracing::warn!("restart command: {e}");
                }
                self.kick.notify_one();
            }
            Command::SendLogs { name, tail } => {
                let supervisor = self.supervisor.clone();
                let workload = name.clone();
                let read = tokio::task::spawn_blocking(move || read_workload_logs(&supervisor, &workload, tail)).await;
                let read = read.unwrap_or_else(|e| Err(format!("reading the logs failed: {e}")));
                let message = logs_reply(id, name, read, tail);
                let payload = encode(self.settings.encoding, &message);
                if let Err(e) = self.client.try_publish(self.topic(Channel::Logs), QoS::AtLeastOnce, false, payload) {
                    tracing::warn!(command = id, "the logs the hub asked for were not sent: {e}");
                }
            }
        }
    }

    /// Sends a report when something changed, and any new events.
    async fn report(&mut self) {
        let supervisor = self.supervisor.clone();
        let store = self.store.clone();
        let Some(view) = blocking(move || {
            let generation = store.desired()?.map(|d| d.generation);
            Ok::<_, crate::store::StoreError>(ReportedView { generation, workloads: current_workloads(&supervisor) })
        })
        .await
        else {
            return;
        };
        if self.last_view.as_ref() != Some(&view) {
            let report = diff(self.last_view.as_ref(), &view, 0);
            let encoding = self.settings.encoding;
            let (store, queued) = (self.store.clone(), report.clone());
            let epoch = self.epoch;
            let seq =
                blocking(move || store.push_report(|seq| encode(encoding, &Report { epoch, seq, ..queued.clone() })))
                    .await;
            if let Some(seq) = seq {
                self.publish(Channel::Reported, encode(encoding, &Report { epoch, seq, ..report }), false);
                self.sent_reports = seq;
                self.last_view = Some(view);
            }
        }
        self.send_events().await;
    }

    async fn send_events(&mut self) {
        let store = self.store.clone();
        let after = self.sent_events;
        let Some((oldest_held, events)) = blocking(move || {
            Ok::<_, crate::store::StoreError>((
                store.oldest_event()?,
                store.events_after(after, EVENTS_PER_BATCH * 10)?,
            ))
        })
        .await
        else {
            return;
        };
        for batch in events.chunks(EVENTS_PER_BATCH) {
            let message = EventBatch { v: PROTOCOL_VERSION, epoch: self.epoch, events: batch.to_vec(), oldest_held };
            // In order or not at all: the hub refuses a batch that jumps
            // over events this device still holds (docs/protocol.md).
            if !self.publish(Channel::Events, encode(self.settings.encoding, &message), false) {
                return;
            }
            self.sent_events = batch.last().map(|e| e.seq).unwrap_or(self.sent_events);
        }
    }
}

/// The report that takes the hub from `last` to `now`: full when there is no `last`.
fn diff(last: Option<&ReportedView>, now: &ReportedView, seq: u64) -> Report {
    let mut report = Report {
        v: PROTOCOL_VERSION,
        epoch: 0,
        seq,
        full: last.is_none(),
        generation: now.generation,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        workloads: Vec::new(),
        removed: Vec::new(),
    };
    match last {
        None => report.workloads = now.workloads.values().cloned().collect(),
        Some(last) => {
            report.workloads = now
                .workloads
                .iter()
                .filter(|(name, w)| last.workloads.get(*name) != Some(w))
                .map(|(_, w)| w.clone())
                .collect();
            // The view is keyed by instance, the hub's by workload name: a name
            // is removed once no instance of it is left (a replaced instance
            // comes back under the same name).
            let names_now: BTreeSet<&str> = now.workloads.values().map(|w| w.name.as_str()).collect();
            let gone: BTreeSet<&str> =
                last.workloads.values().map(|w| w.name.as_str()).filter(|name| !names_now.contains(name)).collect();
            report.removed = gone.into_iter().map(String::from).collect();
            report.agent_version.clear();
        }
    }
    report
}

/// The workload's last `tail` log lines, but no more than one past the
/// protocol's cap (`logs_reply` tells from it whether the cap left some out);
/// an error says why there are none.
fn read_workload_logs(supervisor: &Supervisor, name: &str, tail: usize) -> Result<Vec<String>, String> {
    let instance = supervisor.resolve(name).map_err(|e| match e {
        RuntimeError::NotFound(_) => format!("no workload named {name:?} on this device"),
        e => e.to_string(),
    })?;
    let dir = supervisor.paths().workload(&instance).logs();
    match read_lines(&dir, Some(tail.min(MAX_LOG_LINES + 1))) {
        Ok(lines) => Ok(lines),
        // Nothing written yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read the logs in {}: {e}", dir.display())),
    }
}

/// The reply to `send-logs`: the newest of `read` lines within `tail` and
/// the protocol's limits, saying when the limits left out some.
fn logs_reply(command: u64, workload: String, read: Result<Vec<String>, String>, tail: usize) -> LogsMessage {
    let mut message =
        LogsMessage { v: PROTOCOL_VERSION, command, workload, lines: Vec::new(), truncated: false, error: None };
    let mut lines = match read {
        Ok(lines) => lines,
        Err(e) => {
            message.error = Some(e);
            return message;
        }
    };
    let asked = lines.len().min(tail);
    let mut bytes = 0;
    let kept = lines
        .iter()
        .rev()
        .take(asked.min(MAX_LOG_LINES))
        .take_while(|line| {
            bytes += line.len();
            bytes <= MAX_LOG_BYTES
        })
        .count();
    lines.drain(..lines.len() - kept);
    message.truncated = kept < asked;
    message.lines = lines;
    message
}

fn current_workloads(supervisor: &Supervisor) -> BTreeMap<String, WorkloadReport> {
    supervisor
        .list()
        .into_iter()
        .map(|w| {
            let status = w.status.as_ref();
            let health = status
                .and_then(|s| serde_json::to_value(s.health).ok())
                .and_then(|v| v.as_str().map(String::from))
                .filter(|h| h != "none");
            let report = WorkloadReport {
                name: w.name.clone(),
                deployment: w.deployment.as_ref().map(|d| d.name.clone()),
                revision: w.deployment.as_ref().map(|d| d.revision),
                state: w.state.clone(),
                health,
                restarts: status.map(|s| s.restarts).unwrap_or(0),
                last_exit: status.and_then(|s| s.last_exit.as_ref()).map(|e| e.describe()),
            };
            (w.instance, report)
        })
        .collect()
}

/// Runs store and supervisor work off the async threads; logs and drops errors.
async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            tracing::error!("{e}");
            None
        }
        Err(e) => {
            tracing::error!("a blocking task failed: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, state: &str) -> WorkloadReport {
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

    fn view(workloads: &[(&str, &str)]) -> ReportedView {
        ReportedView {
            generation: Some(3),
            workloads: workloads.iter().map(|(n, s)| (n.to_string(), workload(n, s))).collect(),
        }
    }

    /// Instances named `{name}-{suffix}`, as the supervisor names them.
    fn instances(workloads: &[(&str, &str, &str)]) -> ReportedView {
        ReportedView {
            generation: Some(3),
            workloads: workloads.iter().map(|(n, i, s)| (format!("{n}-{i}"), workload(n, s))).collect(),
        }
    }

    #[test]
    fn a_removed_workload_is_reported_by_its_name_and_a_replaced_one_is_not_removed() {
        let first = instances(&[("web", "a1", "running"), ("db", "b1", "running")]);
        let second = instances(&[("web", "a2", "running")]);
        let delta = diff(Some(&first), &second, 2);
        assert_eq!(delta.removed, ["db"], "the hub knows workloads by name, not by instance");
        assert_eq!(delta.workloads.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["web"]);
    }

    #[test]
    fn first_report_is_full_and_later_ones_carry_only_the_changes() {
        let first = view(&[("a", "running"), ("b", "running")]);
        let full = diff(None, &first, 1);
        assert!(full.full);
        assert_eq!(full.workloads.len(), 2);

        let second = view(&[("a", "backoff"), ("c", "running")]);
        let delta = diff(Some(&first), &second, 2);
        assert!(!delta.full);
        let names: Vec<&str> = delta.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(delta.removed, ["b"]);
        assert!(delta.agent_version.is_empty(), "the version goes with full reports only");
    }

    fn numbered(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("line {i}")).collect()
    }

    #[test]
    fn a_logs_reply_carries_the_last_lines_asked_for() {
        let reply = logs_reply(7, "web".into(), Ok(numbered(5)), 2);
        assert_eq!((reply.command, reply.workload.as_str()), (7, "web"));
        assert_eq!(reply.lines, ["line 4", "line 5"]);
        assert!(!reply.truncated, "what was asked for is all there");
        let short = logs_reply(7, "web".into(), Ok(numbered(3)), 100);
        assert_eq!((short.lines.len(), short.truncated), (3, false), "a short log is not truncated");
    }

    #[test]
    fn a_logs_reply_past_the_caps_keeps_the_newest_lines_and_says_so() {
        let reply = logs_reply(1, "web".into(), Ok(numbered(MAX_LOG_LINES + 1)), usize::MAX);
        assert_eq!(reply.lines.len(), MAX_LOG_LINES);
        assert_eq!(reply.lines.last().unwrap(), &format!("line {}", MAX_LOG_LINES + 1));
        assert!(reply.truncated);

        let long = vec!["x".repeat(MAX_LOG_BYTES / 4); 5];
        let reply = logs_reply(1, "web".into(), Ok(long), 5);
        assert_eq!(reply.lines.len(), 4, "the fifth line would pass the byte cap");
        assert!(reply.truncated);
    }

    #[test]
    fn a_logs_reply_for_an_unknown_workload_carries_the_error_and_no_lines() {
        let reply = logs_reply(3, "nope".into(), Err("no workload named \"nope\" on this device".into()), 10);
        assert!(reply.lines.is_empty());
        assert_eq!(reply.error.as_deref(), Some("no workload named \"nope\" on this device"));
    }

    #[test]
    fn unacknowledged_messages_go_again_after_30s_then_ever_more_rarely_until_the_hub_acks() {
        let start = tokio::time::Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut resend = Resend::default();
        assert!(!resend.due(true, at(0)));
        assert!(!resend.due(true, at(29)));
        assert!(resend.due(true, at(30)));
        assert!(!resend.due(true, at(89)), "the second wait is twice the first");
        assert!(resend.due(true, at(90)));
        resend.progress(at(100));
        assert!(!resend.due(true, at(129)), "an ack starts the wait over");
        assert!(resend.due(true, at(130)));
        assert!(!resend.due(false, at(1000)), "nothing waiting");
        assert!(!resend.due(true, at(1001)));
        for hour in 1..=10 {
            assert!(resend.due(true, at(3600 * hour)));
        }
        assert_eq!(resend.after, RESEND_MAX);
    }

    #[test]
    fn hub_addresses_parse_with_or_without_a_port() {
        assert_eq!(host_port("mqtt://hub.local:1884", false).unwrap(), ("hub.local".into(), 1884));
        assert_eq!(host_port("mqtt://hub.local", false).unwrap(), ("hub.local".into(), 1883));
        assert_eq!(host_port("mqtt://[::1]:1883", false).unwrap(), ("::1".into(), 1883));
        assert!(host_port("http://hub.local", false).is_err());
        assert!(host_port("mqtt://hub:port", false).is_err());
        assert_eq!(host_port("mqtts://hub.local", true).unwrap(), ("hub.local".into(), 8883));
        assert!(host_port("mqtts://hub.local", false).is_err(), "mqtts without a certificate");
    }
}
