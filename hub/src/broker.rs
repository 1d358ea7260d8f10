//! The embedded MQTT broker, the only module that knows rumqttd. It runs on
//! its own threads with a small configuration built here (no prometheus, no
//! websocket, small segments), and authenticates each device by its token.
//!
//! rumqttd keeps nothing across restarts (retained messages, sessions), and
//! has no way to stop: its threads end with the process. It is patched for
//! fleets (third_party/rumqttd/OUTPOST-PATCHES.md): 10,000 devices connect in
//! about 25 s and cost the hub under 300 MB (docs/benchmarks.md). Mosquitto
//! costs less still; a large fleet may prefer it (`broker = "mqtt://..."`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use outpost_proto::federation::SiteTopics;
use outpost_proto::sync::Topics;
use rumqttd::{Authorizer, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings, TlsConfig};
use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use crate::acl::{self, Access};
use crate::config::UnknownDevices;
use crate::store::Store;

/// Room for a fleet of 10,000 devices and the hub (see above for how rumqttd copes).
const MAX_CONNECTIONS: usize = 10_100;
/// Devices' reports with many workloads, and desired states, fit.
const MAX_PAYLOAD: usize = 256 * 1024;
/// rumqttd keeps each subscription's messages in memory segments, dropping
/// the oldest segment when full: a reader further behind skips ahead and
/// loses messages. Reports, events, presence and logs replies from every
/// device go to the hub's four subscriptions, each filter with segments of
/// its own: room for a burst from the whole fleet (or for 16 logs replies of
/// 64 KiB at once).
const FLEET_SEGMENT: SegmentConfig = SegmentConfig { max_segment_size: 4 << 20, max_segment_count: 2 };
/// Each device's desired, ack and command topics: only the newest message
/// matters (desired states and acks are retained and cumulative), so the
/// smallest segment rumqttd allows, times one.
const DEVICE_SEGMENT: SegmentConfig = SegmentConfig { max_segment_size: 1024, max_segment_count: 1 };

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot find a free port on {ip}: {source}")]
    FreePort { ip: IpAddr, source: std::io::Error },
    #[error("cannot start the embedded MQTT broker's thread: {0}")]
    Thread(std::io::Error),
}

/// The hub's store as the broker sees it. rumqttd's threads never end, so
/// the hub takes the store back when it stops (and can open it again).
pub type StoreHandle = Arc<RwLock<Option<Store>>>;

/// Who may connect.
pub struct Auth {
    /// Device id -> token, from the configuration.
    pub devices: BTreeMap<String, String>,
    /// Devices approved by an operator, and those held for approval.
    pub store: StoreHandle,
    pub unknown_devices: UnknownDevices,
    pub hub_user: String,
    pub hub_token: String,
    /// Devices are held off until the hub has subscribed: a message a device
    /// sends earlier reaches no subscriber and is lost.
    pub hub_subscribed: Arc<AtomicBool>,
}

pub struct Settings {
    pub listen: SocketAddr,
    /// Filters of the hub's subscriptions (device -> hub).
    pub fleet_filters: Vec<String>,
    /// Filters covering each device's topics (hub -> device).
    pub device_filters: Vec<String>,
    pub auth: Auth,
    /// Which topics each device may use (`acl::allows`).
    pub topics: Topics,
    /// Site hubs below this one, which use their site topics (`acl::site_allows`).
    pub sites: BTreeSet<String>,
    pub tls: Option<TlsSettings>,
}

/// A second listener, over TLS: each device presents a certificate signed by
/// the hub's CA, whose common name is its device id (docs/identity.md).
pub struct TlsSettings {
    pub listen: SocketAddr,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct EmbeddedBroker {
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    /// Says why, when the broker stops (it cannot listen, or it failed).
    pub stopped: oneshot::Receiver<String>,
}

impl EmbeddedBroker {
    /// Starts the broker on its own threads. Port 0 picks a free port; see `free_port`.
    pub fn start(mut settings: Settings) -> Result<Self, BrokerError> {
        let mut addr = settings.listen;
        if addr.port() == 0 {
            addr.set_port(free_port(addr.ip())?);
        }
        if let Some(tls) = &mut settings.tls {
            if tls.listen.port() == 0 {
                tls.listen.set_port(free_port(tls.listen.ip())?);
            }
        }
        let tls_addr = settings.tls.as_ref().map(|tls| tls.listen);
        let config = config(addr, settings);
        let (tx, stopped) = oneshot::channel();
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                // `start` returns only when every listener has stopped; rumqttd
                // has logged why (typically: the address is in use).
                let why = match rumqttd::Broker::new(config).start() {
                    Ok(()) => format!("the embedded MQTT broker stopped listening on {addr}; its log says why"),
                    Err(e) => format!("the embedded MQTT broker failed on {addr}: {e}"),
                };
                let _ = tx.send(why);
            })
            .map_err(BrokerError::Thread)?;
        Ok(Self { addr, tls_addr, stopped })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it listens over TLS, if it does.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Where the hub's own client reaches it.
    pub fn local_addr(&self) -> SocketAddr {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.addr.port())
    }
}

/// rumqttd binds its listener itself and cannot report the port it got: so
/// bind port 0 here, note the port, and let it go for rumqttd. Another
/// process could take it in between; then rumqttd cannot listen and the hub
/// stops with that error.
fn free_port(ip: IpAddr) -> Result<u16, BrokerError> {
    let listener = TcpListener::bind((ip, 0)).map_err(|source| BrokerError::FreePort { ip, source })?;
    let port = listener.local_addr().map_err(|source| BrokerError::FreePort { ip, source })?.port();
    Ok(port)
}

fn config(addr: SocketAddr, settings: Settings) -> rumqttd::Config {
    let custom_segment = settings
        .fleet_filters
        .iter()
        .map(|f| (f.clone(), FLEET_SEGMENT))
        .chain(settings.device_filters.iter().map(|f| (f.clone(), DEVICE_SEGMENT)))
        .collect();
    let router = RouterConfig {
        max_connections: MAX_CONNECTIONS,
        max_outgoing_packet_count: 200,
        max_segment_size: FLEET_SEGMENT.max_segment_size,
        max_segment_count: FLEET_SEGMENT.max_segment_count,
        custom_segment: Some(custom_segment),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
        authorizer: Some(authorizer(settings.topics, settings.sites)),
    };
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: false,
        cert_auth: None,
    };
    let auth = Arc::new(settings.auth);
    let token_auth = auth.clone();
    connections.set_auth_handler(move |client_id, user, password| {
        std::future::ready(token_auth.allows(&client_id, &user, &password))
    });
    // Only the TLS listener verifies client certificates (an Outpost patch
    // gives rumqttd the common name); the plain one goes on taking tokens.
    connections.cert_auth = Some(Arc::new(move |client_id, common_name| auth.allows_cert(client_id, common_name)));
    let server = |name: &str, listen, tls| ServerSettings {
        name: name.into(),
        listen,
        tls,
        // Accepting paced at 1 ms made 10,000 devices take 25 s to connect;
        // agents spread their reconnects themselves (backoff with jitter).
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let mut servers = HashMap::from([("1".to_string(), server("outpost-mqtt", addr, None))]);
    if let Some(tls) = settings.tls {
        let config = TlsConfig::Rustls {
            capath: Some(tls.ca.display().to_string()),
            certpath: tls.cert.display().to_string(),
            keypath: tls.key.display().to_string(),
        };
        servers.insert("2".to_string(), server("outpost-mqtts", tls.listen, Some(config)));
    }
    rumqttd::Config { id: 0, router, v4: Some(servers), ..Default::default() }
}

/// Asked by rumqttd (an Outpost patch) for each PUBLISH and SUBSCRIBE: a
/// refused SUBSCRIBE filter fails in its SUBACK, a refused PUBLISH closes the
/// device's connection unacknowledged (the agent reconnects: its own topics
/// work again). Each refusal is logged with the device and the topic.
fn authorizer(topics: Topics, sites: BTreeSet<String>) -> Authorizer {
    let site_topics = SiteTopics::new(topics.prefix());
    Authorizer(Arc::new(move |client_id, access, topic| {
        let access = match access {
            rumqttd::Access::Publish => Access::Publish,
            rumqttd::Access::Subscribe => Access::Subscribe,
        };
        let allowed = match sites.contains(client_id) {
            true => acl::site_allows(&site_topics, client_id, access, topic),
            false => acl::allows(&topics, client_id, access, topic),
        };
        if !allowed {
            warn!(device = client_id, topic, ?access, "refused a device access to a topic that is not its own");
        }
        allowed
    }))
}

impl Auth {
    /// A device connects with its id as user name and client id, and its
    /// token as password. Refusals are logged; rumqttd closes the connection.
    fn allows(&self, client_id: &str, user: &str, password: &str) -> bool {
        if user == self.hub_user {
            let allowed = client_id == self.hub_user && same(password, &self.hub_token);
            if !allowed {
                warn!(client_id, "refused an MQTT connection with the hub's user name and a wrong token");
            }
            return allowed;
        }
        if client_id != user {
            warn!(client_id, user, "refused a device: its MQTT client id must be its device id (the user name)");
            return false;
        }
        let expected = match self.token_of(user) {
            Ok(expected) => expected,
            Err(e) => {
                error!(device = user, "refused a device: {e}");
                return false;
            }
        };
        let allowed = match &expected {
            Some(Token::Plain(token)) => same(password, token),
            Some(Token::Sha256(hash)) => same(&token_sha256(password), hash),
            None => self.unknown_allowed(user, password),
        };
        if !allowed {
            if expected.is_some() {
                warn!(device = user, "refused a device: wrong token");
            }
            return false;
        }
        if !self.hub_subscribed.load(Ordering::Acquire) {
            debug!(device = user, "held off a device until the hub has subscribed");
            return false;
        }
        true
    }

    /// A device over TLS: the broker verified its certificate against the
    /// hub's CA, whose common name is the device id. Refusals are logged.
    fn allows_cert(&self, client_id: &str, common_name: &str) -> bool {
        if client_id != common_name {
            warn!(client_id, common_name, "refused a device: its MQTT client id must be its certificate's common name");
            return false;
        }
        if common_name == self.hub_user || !crate::registry::valid_device_id(common_name) {
            warn!(common_name, "refused a certificate whose common name is not a valid device id");
            return false;
        }
        if !self.hub_subscribed.load(Ordering::Acquire) {
            debug!(device = common_name, "held off a device until the hub has subscribed");
            return false;
        }
        true
    }

    /// The token a device must present: from the configuration, or the
    /// one it presented when an operator approved it.
    fn token_of(&self, id: &str) -> Result<Option<Token>, String> {
        if let Some(token) = self.devices.get(id) {
            return Ok(Some(Token::Plain(token.clone())));
        }
        let store = self.store.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let store = store.as_ref().ok_or("the hub is stopping")?;
        Ok(store.approved_token(id).map_err(|e| e.to_string())?.map(Token::Sha256))
    }

    /// What `unknown-devices` says of a device without a matching token.
    fn unknown_allowed(&self, id: &str, password: &str) -> bool {
        if !crate::registry::valid_device_id(id) {
            warn!(device = id, "refused an unknown device whose id is not valid");
            return false;
        }
        match self.unknown_devices {
            UnknownDevices::Refuse => {
                warn!(device = id, "refused an unknown device (unknown-devices = \"refuse\")");
                false
            }
            UnknownDevices::Accept => {
                warn!(device = id, "accepted an unknown device (unknown-devices = \"accept\")");
                true
            }
            UnknownDevices::Hold => {
                let hash = token_sha256(password);
                let store = self.store.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                let Some(store) = store.as_ref() else { return false };
                match store.hold(id, &hash, crate::sync::now_ms()) {
                    // Devices retry every minute at most: tell the operator once per token.
                    Ok(false) => {
                        debug!(device = id, "a held device tried again");
                        return false;
                    }
                    Ok(true) => {}
                    Err(e) => {
                        error!(device = id, "refused a device and could not hold it for approval: {e}");
                        return false;
                    }
                }
                warn!(
                    device = id,
                    token_sha256 = &hash[..12],
                    "held an unknown device for approval: `hub pending` lists it, `hub approve {id}` lets it in"
                );
                false
            }
        }
    }
}

enum Token {
    Plain(String),
    Sha256(String),
}

/// How the hub keeps an approved device's token: its sha256, hex.
pub(crate) fn token_sha256(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares tokens in time that does not depend on where they differ.
fn same(given: &str, expected: &str) -> bool {
    given.len() == expected.len() && given.bytes().zip(expected.bytes()).fold(0, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(unknown_devices: UnknownDevices) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth {
            devices: BTreeMap::from([("pump-3".to_string(), "t0ken".to_string())]),
            store: Arc::new(RwLock::new(Some(Store::open(dir.path()).unwrap()))),
            unknown_devices,
            hub_user: "outpost-hub".into(),
            hub_token: "hub-secret".into(),
            hub_subscribed: Arc::new(AtomicBool::new(true)),
        };
        (dir, auth)
    }

    fn store(auth: &Auth) -> Store {
        auth.store.read().unwrap().clone().unwrap()
    }

    #[test]
    fn devices_need_their_own_token_and_their_id_as_client_id() {
        let (_dir, auth) = auth(UnknownDevices::Refuse);
        assert!(auth.allows("pump-3", "pump-3", "t0ken"));
        assert!(!auth.allows("pump-3", "pump-3", "t0kem"));
        assert!(!auth.allows("pump-3", "pump-3", ""));
        assert!(!auth.allows("pump-4", "pump-3", "t0ken"), "a device posing as another client");
        assert!(!auth.allows("stranger", "stranger", "x"));
        assert!(auth.allows("outpost-hub", "outpost-hub", "hub-secret"));
        assert!(!auth.allows("outpost-hub", "outpost-hub", "t0ken"));
        assert!(store(&auth).pending().unwrap().is_empty(), "refused, not held");
    }

    #[test]
    fn unknown_devices_come_in_only_when_accepted_and_with_a_valid_id() {
        let (_dir, auth) = auth(UnknownDevices::Accept);
        assert!(auth.allows("stranger", "stranger", "anything"));
        assert!(!auth.allows("a+b", "a+b", "anything"));
        assert!(!auth.allows("pump-3", "pump-3", "wrong"), "a known device still needs its token");
    }

    #[test]
    fn a_held_device_comes_in_after_approval_with_the_token_it_presented_and_no_other() {
        let (_dir, auth) = auth(UnknownDevices::Hold);
        assert!(!auth.allows("cam-1", "cam-1", "first"));
        assert!(!auth.allows("cam-1", "cam-1", "cam-secret"));
        assert!(!auth.allows("a+b", "a+b", "x"), "an invalid id is not held");
        let pending = store(&auth).pending().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].token_sha256, token_sha256("cam-secret"), "the token it presented last");

        store(&auth).approve("cam-1").unwrap().unwrap();
        assert!(auth.allows("cam-1", "cam-1", "cam-secret"));
        assert!(!auth.allows("cam-1", "cam-1", "first"));
        assert!(store(&auth).pending().unwrap().is_empty(), "a wrong token for an approved device is not held again");
    }

    #[test]
    fn devices_wait_until_the_hub_has_subscribed() {
        let (_dir, auth) = auth(UnknownDevices::Refuse);
        auth.hub_subscribed.store(false, Ordering::Release);
        assert!(!auth.allows("pump-3", "pump-3", "t0ken"));
        assert!(auth.allows("outpost-hub", "outpost-hub", "hub-secret"));
    }

    #[test]
    fn a_certificate_identifies_the_device_named_by_its_common_name_and_no_other() {
        let (_dir, auth) = auth(UnknownDevices::Refuse);
        assert!(auth.allows_cert("cam-9", "cam-9"), "any device the CA vouches for");
        assert!(!auth.allows_cert("pump-3", "cam-9"), "a device posing as another client");
        assert!(!auth.allows_cert("outpost-hub", "outpost-hub"));
        auth.hub_subscribed.store(false, Ordering::Release);
        assert!(!auth.allows_cert("cam-9", "cam-9"), "held off until the hub has subscribed");
    }

    #[test]
    fn token_hashes_are_sha256_in_hex() {
        assert_eq!(token_sha256("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
