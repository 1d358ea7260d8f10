//! The embedded MQTT broker, the only module that knows rumqttd. It runs on
//! its own threads with a small configuration built here (no prometheus, no
//! websocket, small segments), and authenticates each device by its token.
//!
//! rumqttd keeps nothing across restarts (retained messages, sessions), and
//! has no way to stop: its threads end with the process. Measured here with
//! 0.20: about 45 KiB per connection and 6 KiB per subscription (three per
//! device), and every new subscription scans every retained message (three
//! per device), so connecting a fleet takes time quadratic in its size:
//! 2,000 devices in 8 s, and 10,000 not all within 5 minutes. Mosquitto does both
//! easily; a large fleet wants it (`broker = "mqtt://..."`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rumqttd::{ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};
use tokio::sync::oneshot;
use tracing::{debug, warn};

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
const FLEET_SEGMENT: SegmentConfig = SegmentConfig { max_segment_size: 1 << 20, max_segment_count: 2 };
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

/// Who may connect.
pub struct Auth {
    /// Device id -> token.
    pub devices: BTreeMap<String, String>,
    pub allow_unknown_devices: bool,
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
}

pub struct EmbeddedBroker {
    addr: SocketAddr,
    /// Says why, when the broker stops (it cannot listen, or it failed).
    pub stopped: oneshot::Receiver<String>,
}

impl EmbeddedBroker {
    /// Starts the broker on its own threads. Port 0 picks a free port; see `free_port`.
    pub fn start(settings: Settings) -> Result<Self, BrokerError> {
        let mut addr = settings.listen;
        if addr.port() == 0 {
            addr.set_port(free_port(addr.ip())?);
        }
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
        Ok(Self { addr, stopped })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
    };
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    };
    let auth = Arc::new(settings.auth);
    connections.set_auth_handler(move |client_id, user, password| {
        std::future::ready(auth.allows(&client_id, &user, &password))
    });
    let server = ServerSettings {
        name: "outpost-mqtt".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    rumqttd::Config { id: 0, router, v4: Some(HashMap::from([("1".to_string(), server)])), ..Default::default() }
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
        let known = match self.devices.get(user) {
            Some(token) if same(password, token) => true,
            Some(_) => {
                warn!(device = user, "refused a device: wrong token");
                return false;
            }
            None if !self.allow_unknown_devices => {
                warn!(device = user, "refused an unknown device (allow-unknown-devices is off)");
                return false;
            }
            None if !crate::registry::valid_device_id(user) => {
                warn!(device = user, "refused an unknown device whose id is not valid");
                return false;
            }
            None => false,
        };
        if !self.hub_subscribed.load(Ordering::Acquire) {
            debug!(device = user, "held off a device until the hub has subscribed");
            return false;
        }
        if !known {
            warn!(device = user, "accepted an unknown device (allow-unknown-devices is on)");
        }
        true
    }
}

/// Compares tokens in time that does not depend on where they differ.
fn same(given: &str, expected: &str) -> bool {
    given.len() == expected.len() && given.bytes().zip(expected.bytes()).fold(0, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(allow_unknown_devices: bool) -> Auth {
        Auth {
            devices: BTreeMap::from([("pump-3".to_string(), "t0ken".to_string())]),
            allow_unknown_devices,
            hub_user: "outpost-hub".into(),
            hub_token: "hub-secret".into(),
            hub_subscribed: Arc::new(AtomicBool::new(true)),
        }
    }

    #[test]
    fn devices_need_their_own_token_and_their_id_as_client_id() {
        let auth = auth(false);
        assert!(auth.allows("pump-3", "pump-3", "t0ken"));
        assert!(!auth.allows("pump-3", "pump-3", "t0kem"));
        assert!(!auth.allows("pump-3", "pump-3", ""));
        assert!(!auth.allows("pump-4", "pump-3", "t0ken"), "a device posing as another client");
        assert!(!auth.allows("stranger", "stranger", "x"));
        assert!(auth.allows("outpost-hub", "outpost-hub", "hub-secret"));
        assert!(!auth.allows("outpost-hub", "outpost-hub", "t0ken"));
    }

    #[test]
    fn unknown_devices_come_in_only_when_allowed_and_with_a_valid_id() {
        let auth = auth(true);
        assert!(auth.allows("stranger", "stranger", "anything"));
        assert!(!auth.allows("a+b", "a+b", "anything"));
        assert!(!auth.allows("pump-3", "pump-3", "wrong"), "a known device still needs its token");
    }

    #[test]
    fn devices_wait_until_the_hub_has_subscribed() {
        let auth = auth(false);
        auth.hub_subscribed.store(false, Ordering::Release);
        assert!(!auth.allows("pump-3", "pump-3", "t0ken"));
        assert!(auth.allows("outpost-hub", "outpost-hub", "hub-secret"));
    }
}
