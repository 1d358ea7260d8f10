//! A site hub's link to its parent hub (docs/federation.md): one MQTT
//! client of the parent's broker, with a persistent session and a last will
//! that tells the parent the site is gone.
//!
//! Up: what the site's devices said is queued in the store as it is applied
//! (sync.rs), and sent from here oldest first, in compressed batches, one
//! batch in flight; the parent's ack drops what it stored. The queue is on
//! disk, so a cut of days or a restart of the site hub loses nothing, and
//! the parent skips items it already has, so nothing arrives twice.
//!
//! Down: the parent publishes each of the site's devices' desired states,
//! retained; the site stores a newer one and serves it to the device. The
//! parent's commands for a device are passed on as they come.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::federation::{SiteAck, SiteBatch, SiteChannel, SiteTopics, Upward};
use outpost_proto::sync::{decode, encode, CommandMessage, DesiredMessage, Encoding, Presence, PROTOCOL_VERSION};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tracing::{debug, error, info, warn};

use crate::store::Store;
use crate::sync::{now_ms, Publisher};

/// Items per batch, and about how many bytes before compression.
const BATCH_ITEMS: usize = 500;
const BATCH_BYTES: usize = 256 * 1024;
/// A batch the parent has not acknowledged by then is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// A decompressed batch larger than this is refused (a zstd bomb).
pub const MAX_BATCH: u64 = 16 << 20;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// A SYN every 10 s at most while the WAN is down: little, and the site is
/// back soon after the link.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub struct Settings {
    pub host: String,
    pub port: u16,
    pub site: String,
    pub token: String,
    /// TLS with this site's certificate, instead of the token.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub topics: SiteTopics,
    pub encoding: Encoding,
}

/// The TLS client configuration from `[upstream.tls]`: the parent's CA and
/// this site's certificate and key.
pub fn tls_config(tls: &crate::config::UpstreamTls) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = |path: &std::path::Path| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("upstream.tls: cannot read the certificates in {}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(&tls.ca)? {
        roots.add(ca).context("upstream.tls.ca: not a CA certificate")?;
    }
    let chain = certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("upstream.tls.key: cannot read the key in {}", tls.key.display()))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("upstream.tls: the certificate and key do not go together")?;
    Ok(Arc::new(config))
}

/// Compresses an encoded batch for the WAN.
pub fn compress(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).expect("compressing in memory does not fail")
}

/// Decompresses a batch, refusing one that would grow beyond [`MAX_BATCH`].
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, String> {
    let decoder = zstd::stream::read::Decoder::new(payload).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    decoder.take(MAX_BATCH + 1).read_to_end(&mut bytes).map_err(|e| format!("not a zstd frame: {e}"))?;
    if bytes.len() as u64 > MAX_BATCH {
        return Err(format!("it decompresses to more than {MAX_BATCH} bytes"));
    }
    Ok(bytes)
}

pub fn start(
    settings: Settings,
    store: Store,
    publisher: Publisher,
    wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let mut options = MqttOptions::new(&settings.site, &settings.host, settings.port);
    let offline = encode(settings.encoding, &Presence { v: PROTOCOL_VERSION, online: false });
    let presence = settings.topics.topic(&settings.site, &SiteChannel::Presence);
    match &settings.tls {
        // The parent knows the site by its certificate's common name.
        Some(tls) => {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.clone())));
        }
        None => {
            options.set_credentials(&settings.site, &settings.token);
        }
    }
    options
        .set_clean_session(false)
        .set_keep_alive(KEEP_ALIVE)
        .set_max_packet_size(BATCH_BYTES * 4, BATCH_BYTES * 4)
        .set_last_will(LastWill::new(presence, offline, QoS::AtLeastOnce, true));
    let (client, event_loop) = AsyncClient::new(options, 64);
    // The event loop is polled by a task of its own and never cancelled
    // but at shutdown: rumqttc does not promise that dropping a poll is safe.
    let (incoming, rx) = mpsc::unbounded_channel();
    let poller = tokio::spawn(poll(event_loop, incoming, shutdown.clone()));
    let link = Link { client, store, publisher, settings, in_flight: None };
    tokio::spawn(async move {
        link.run(rx, wake, shutdown).await;
        let _ = poller.await;
    })
}

/// What the poller tells the link.
enum Incoming {
    Connected,
    Message(Publish),
    Lost,
}

async fn poll(
    mut event_loop: rumqttc::EventLoop,
    incoming: mpsc::UnboundedSender<Incoming>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut connected = false;
    loop {
        let event = tokio::select! {
            event = event_loop.poll() => event,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let told = match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(session_present = ack.session_present, "connected to the parent hub");
                backoff = FIRST_BACKOFF;
                connected = true;
                Incoming::Connected
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => Incoming::Message(publish),
            Ok(_) => continue,
            Err(e) => {
                if connected {
                    warn!("the link to the parent hub went: {e}; the site keeps working and queues for it");
                    let _ = incoming.send(Incoming::Lost);
                } else {
                    debug!("the parent hub cannot be reached: {e}; trying again in {backoff:?}");
                }
                connected = false;
                // Polling again reconnects; the pause is ours.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if incoming.send(told).is_err() {
            return;
        }
    }
}

struct Link {
    client: AsyncClient,
    store: Store,
    publisher: Publisher,
    settings: Settings,
    /// The highest item of the batch sent and not acknowledged yet, and
    /// when it was sent.
    in_flight: Option<(u64, Instant)>,
}

impl Link {
    async fn run(
        mut self,
        mut incoming: mpsc::UnboundedReceiver<Incoming>,
        wake: Arc<Notify>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut connected = false;
        loop {
            let ack_due = self.in_flight.map_or_else(Instant::now, |(_, sent)| sent + ACK_TIMEOUT);
            let told = tokio::select! {
                told = incoming.recv() => Some(told),
                _ = wake.notified() => None,
                _ = tokio::time::sleep_until(ack_due), if self.in_flight.is_some() => {
                    debug!("the parent did not acknowledge the last batch in time: sending it again");
                    self.in_flight = None;
                    None
                }
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            match told {
                Some(Some(Incoming::Connected)) => {
                    connected = true;
                    self.in_flight = None;
                    if let Err(e) = self.on_connect().await {
                        return error!("the link to the parent hub stops: {e}");
                    }
                }
                Some(Some(Incoming::Message(publish))) => self.on_message(&publish).await,
                Some(Some(Incoming::Lost)) => connected = false,
                Some(None) => return,
                None => {}
            }
            if connected && self.in_flight.is_none() {
                if let Err(e) = self.send_batch().await {
                    return error!("the link to the parent hub stops: {e}");
                }
            }
        }
    }

    /// Subscribes, says the site is online, and queues every device's
    /// presence: the parent marked them offline when the site went.
    async fn on_connect(&self) -> Result<(), rumqttc::ClientError> {
        let (site, topics) = (&self.settings.site, &self.settings.topics);
        self.client.subscribe(topics.all_desired(site), QoS::AtLeastOnce).await?;
        self.client.subscribe(topics.all_commands(site), QoS::AtLeastOnce).await?;
        self.client.subscribe(topics.topic(site, &SiteChannel::Ack), QoS::AtLeastOnce).await?;
        let online = encode(self.settings.encoding, &Presence { v: PROTOCOL_VERSION, online: true });
        self.client.publish(topics.topic(site, &SiteChannel::Presence), QoS::AtLeastOnce, true, online).await?;
        let now = now_ms();
        match self.store.devices() {
            Ok(devices) => {
                for device in devices.into_iter().filter(|d| d.first_seen.is_some()) {
                    let presence = Upward::Presence(Presence { v: PROTOCOL_VERSION, online: device.online });
                    if let Err(e) = self.store.push_upward(&device.id, presence, now) {
                        error!(device = device.id, "cannot queue the device's presence for the parent: {e}");
                    }
                }
            }
            Err(e) => error!("cannot read the devices to tell the parent their presence: {e}"),
        }
        Ok(())
    }

    async fn send_batch(&mut self) -> Result<(), rumqttc::ClientError> {
        let items = match self.store.upward(BATCH_ITEMS, BATCH_BYTES) {
            Ok(items) => items,
            Err(e) => {
                error!("cannot read the queue to the parent: {e}");
                return Ok(());
            }
        };
        let Some(last) = items.last().map(|item| item.seq) else { return Ok(()) };
        let count = items.len();
        let encoded = encode(self.settings.encoding, &SiteBatch { v: PROTOCOL_VERSION, items });
        let payload = compress(&encoded);
        debug!(count, last, bytes = payload.len(), uncompressed = encoded.len(), "sending a batch to the parent");
        let topic = self.settings.topics.topic(&self.settings.site, &SiteChannel::Up);
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await?;
        self.in_flight = Some((last, Instant::now()));
        Ok(())
    }

    async fn on_message(&mut self, publish: &Publish) {
        let Some((site, channel)) = self.settings.topics.parse(&publish.topic) else { return };
        if site != self.settings.site {
            return;
        }
        match channel {
            SiteChannel::Ack => match decode::<SiteAck>(&publish.payload) {
                Ok(ack) => {
                    if let Err(e) = self.store.ack_upward(ack.seq) {
                        error!("cannot drop what the parent acknowledged: {e}");
                    }
                    if self.in_flight.is_some_and(|(last, _)| ack.seq >= last) {
                        self.in_flight = None;
                    }
                }
                Err(e) => warn!("dropped an ack from the parent that does not decode: {e}"),
            },
            SiteChannel::Desired(device) => match decode::<DesiredMessage>(&publish.payload) {
                Ok(message) => self.store_desired(&device, message).await,
                Err(e) => warn!(device, "dropped a desired state from the parent that does not decode: {e}"),
            },
            SiteChannel::Command(device) => match decode::<CommandMessage>(&publish.payload) {
                // The parent's numbering, so the device's reply names the parent's command.
                Ok(message) if crate::registry::valid_device_id(&device) => {
                    info!(device, command = message.id, "passing on the parent's command: {:?}", message.command);
                    self.publisher.command(&device, message);
                }
                Ok(_) => warn!(device, "dropped a command for a device whose id is not valid"),
                Err(e) => warn!(device, "dropped a command from the parent that does not decode: {e}"),
            },
            SiteChannel::Up | SiteChannel::Presence => {}
        }
    }

    /// The parent's generations only grow: an older one (a retained
    /// message delivered again) changes nothing. The site composes it with
    /// its own deployments (site.rs), and flushes before the device gets
    /// it: a site that lost, in a crash, a generation its device holds would
    /// give that number to another state, and send the device's reports of
    /// it up as the generation before.
    async fn store_desired(&self, device: &str, message: DesiredMessage) {
        if !crate::registry::valid_device_id(device) {
            return warn!(device, "dropped a desired state for a device whose id is not valid");
        }
        let newer = match self.store.source(device, true) {
            Ok(stored) => stored.is_none_or(|s| s.generation < message.state.generation),
            Err(e) => return error!(device, "cannot read the device's desired state: {e}"),
        };
        if !newer {
            return;
        }
        let generation = message.state.generation;
        info!(device, generation, "a desired state from the parent");
        match crate::site::set_source(&self.store, device, true, generation, message.state.deployments, now_ms()) {
            Ok(Some(_)) => match self.store.flush().await {
                Ok(()) => self.publisher.desired_changed(device),
                // Not passed on unless on disk: after a restart, the parent's retained message brings it again.
                Err(e) => error!(device, "cannot flush the desired state from the parent: {e}"),
            },
            Ok(None) => {}
            Err(e) => error!(device, "cannot store the desired state from the parent: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_decompresses_and_one_that_would_grow_past_the_cap_is_refused() {
        let batch = b"a batch of items".repeat(100);
        assert_eq!(decompress(&compress(&batch)).unwrap(), batch);
        // A few KiB that would grow to more than MAX_BATCH: refused before it is all in memory.
        let bomb = compress(&vec![0u8; MAX_BATCH as usize + 1]);
        assert!(bomb.len() < 64 * 1024);
        assert!(decompress(&bomb).unwrap_err().contains("more than"), "the bomb was taken");
        assert!(decompress(b"not zstd").is_err());
    }
}
