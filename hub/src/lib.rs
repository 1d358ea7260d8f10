//! Outpost's hub: an MQTT broker (embedded, or an external one), the device
//! registry and desired states in its own store, and an HTTP API for
//! operators. The protocol with devices is `outpost_proto::sync`.
//!
//! A server is `run(config, http_listener, shutdown)`: tests bind
//! 127.0.0.1:0 and start it in-process. `Hub::start` then `Hub::serve` do
//! the same in two steps, for a caller that needs the broker's address.

pub mod acl;
pub mod api;
pub mod artifacts;
mod broker;
pub mod cli;
pub mod config;
mod enroll;
mod https;
mod logs;
mod pki;
mod registry;
pub mod rollout;
mod site;
mod store;
mod sync;
mod upstream;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use outpost_proto::sync::{Channel, Topics};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

pub use config::{BrokerSetting, Config, UnknownDevices};

use broker::EmbeddedBroker;
use store::Store;

/// A started hub: its store is open and its embedded broker (if any) listens.
pub struct Hub {
    config: Config,
    store: Store,
    cache: artifacts::Cache,
    broker: Option<(EmbeddedBroker, String)>,
    /// The embedded broker's handle on the store, emptied when the hub stops.
    broker_store: Option<broker::StoreHandle>,
    hub_subscribed: Arc<AtomicBool>,
    /// The CA and the server certificate, when a listener uses TLS.
    tls: Option<Tls>,
    /// A site hub's TLS to its parent (`[upstream.tls]`), read at start.
    upstream_tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

/// What the TLS listeners need.
struct Tls {
    ca: Arc<pki::Ca>,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    /// Bound at start, so that its port is known (`enroll-listen`).
    enroll: Option<std::net::TcpListener>,
}

pub async fn run(config: Config, http_listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Hub::start(config)?.serve(http_listener, shutdown).await
}

impl Hub {
    pub fn start(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create the data directory {:?}", config.data_dir))?;
        let store = Store::open(&config.data_dir)
            .with_context(|| format!("cannot open the hub's store in {:?}", config.data_dir))?;
        let cache_dir = config.data_dir.join("cache");
        let cache = artifacts::Cache::open(&cache_dir, config.cache.max_size.0)
            .with_context(|| format!("cannot open the site cache in {cache_dir:?}"))?;
        let hub_subscribed = Arc::new(AtomicBool::new(false));
        let broker_store = matches!(config.broker, BrokerSetting::Embedded)
            .then(|| Arc::new(std::sync::RwLock::new(Some(store.clone()))));
        let tls = match config.uses_tls() {
            true => {
                let ca = pki::Ca::open_or_create(&pki_dir(&config))?;
                let (cert, key) = ca.write_server_cert(&config.tls_names)?;
                let enroll = match config.enroll_listen {
                    Some(addr) => {
                        let listener = std::net::TcpListener::bind(addr)
                            .with_context(|| format!("cannot listen on {addr} (`enroll-listen`)"))?;
                        listener.set_nonblocking(true)?;
                        Some(listener)
                    }
                    None => None,
                };
                Some(Tls { ca: Arc::new(ca), cert, key, enroll })
            }
            false => None,
        };
        let broker = match config.broker {
            BrokerSetting::External { .. } => None,
            BrokerSetting::Embedded => {
                // A fresh broker: no device is connected to it yet.
                registry::mark_all_offline(&store)?;
                let hub_token = random_token()?;
                let topics = Topics::new(&config.topic_prefix);
                let filters = |channels: &[Channel]| channels.iter().map(|&c| topics.all(c)).collect();
                let broker = EmbeddedBroker::start(broker::Settings {
                    listen: config.mqtt_listen,
                    fleet_filters: filters(&sync::FROM_DEVICES),
                    device_filters: filters(&[Channel::Desired, Channel::Ack, Channel::Command]),
                    auth: broker::Auth {
                        // Site hubs log in as devices do, under their site ids.
                        devices: config
                            .devices
                            .iter()
                            .chain(&config.sites)
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        store: broker_store.clone().expect("made for the embedded broker"),
                        unknown_devices: config.unknown_devices,
                        hub_user: sync::HUB_CLIENT_ID.to_string(),
                        hub_token: hub_token.clone(),
                        hub_subscribed: hub_subscribed.clone(),
                    },
                    topics: topics.clone(),
                    sites: config.sites.keys().cloned().collect(),
                    tls: config.mqtts_listen.zip(tls.as_ref()).map(|(listen, tls)| broker::TlsSettings {
                        listen,
                        ca: tls.ca.cert_path(),
                        cert: tls.cert.clone(),
                        key: tls.key.clone(),
                    }),
                })?;
                info!("embedded MQTT broker listening on {}", broker.addr());
                if let Some(addr) = broker.tls_addr() {
                    info!("embedded MQTT broker listening over TLS, for devices with certificates, on {addr}");
                }
                Some((broker, hub_token))
            }
        };
        let upstream_tls =
            config.upstream.as_ref().and_then(|u| u.tls.as_ref()).map(upstream::tls_config).transpose()?;
        Ok(Self { config, store, cache, broker, broker_store, hub_subscribed, tls, upstream_tls })
    }

    /// Where the embedded broker listens, if the hub runs one.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().map(|(broker, _)| broker.addr())
    }

    /// Where the embedded broker listens over TLS (`mqtts-listen`).
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().and_then(|(broker, _)| broker.tls_addr())
    }

    /// Where devices enroll (`enroll-listen`), if they can.
    pub fn enroll_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref()?.enroll.as_ref()?.local_addr().ok()
    }

    /// The hub CA's certificate file, when a listener uses TLS.
    pub fn ca_cert_path(&self) -> Option<std::path::PathBuf> {
        self.tls.as_ref().map(|tls| tls.ca.cert_path())
    }

    /// Serves the HTTP API and syncs with devices until `shutdown` completes
    /// (or the embedded broker stops), then stops every task and closes the store.
    pub async fn serve(self, http_listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (host, port, username, password, broker_stopped) = match (self.broker, &self.config.broker) {
            (Some((broker, token)), _) => {
                let addr = broker.local_addr();
                (addr.ip().to_string(), addr.port(), sync::HUB_CLIENT_ID.to_string(), token, Some(broker.stopped))
            }
            (None, BrokerSetting::External { host, port }) => {
                info!("using the MQTT broker at {host}:{port}");
                let c = &self.config;
                (host.clone(), *port, c.broker_username.clone(), c.broker_password.clone(), None)
            }
            (None, BrokerSetting::Embedded) => unreachable!("`start` starts the embedded broker"),
        };
        let settings = sync::Settings {
            host,
            port,
            username,
            password,
            topics: Topics::new(&self.config.topic_prefix),
            encoding: self.config.encoding,
            sites: !self.config.sites.is_empty(),
            upward: self.config.upstream.as_ref().map(|_| Arc::new(tokio::sync::Notify::new())),
        };
        let upward = settings.upward.clone();
        let api_upward = upward.clone();
        let (stop, stopping) = watch::channel(false);
        let logs = logs::SharedReplies::default();
        let (publisher, sync_tasks) =
            sync::start(settings, self.store.clone(), logs.clone(), self.hub_subscribed.clone(), stopping.clone());
        let upstream = match (&self.config.upstream, upward) {
            (Some(upstream), Some(wake)) => {
                let BrokerSetting::External { host, port } = &upstream.mqtt else {
                    unreachable!("the configuration refuses an embedded upstream")
                };
                info!(site = upstream.site, "a site hub: its parent's broker is {host}:{port}");
                let settings = upstream::Settings {
                    host: host.clone(),
                    port: *port,
                    site: upstream.site.clone(),
                    token: upstream.token.clone(),
                    tls: self.upstream_tls.clone(),
                    topics: outpost_proto::federation::SiteTopics::new(&self.config.topic_prefix),
                    encoding: self.config.encoding,
                };
                Some(upstream::start(settings, self.store.clone(), publisher.clone(), wake, stopping.clone()))
            }
            _ => None,
        };

        info!("HTTP API listening on {}", http_listener.local_addr()?);
        let engine =
            rollout::engine::Engine::new(self.store.clone(), publisher.clone(), self.config.upstream.is_some());
        let rollouts = engine.clone().start(stopping.clone());
        let trust = match &self.config.trust_root {
            Some(path) => {
                let bytes =
                    std::fs::read(path).with_context(|| format!("cannot read trust-root {}", path.display()))?;
                let state = ota::TrustedState::new(&bytes, ota::Versions::default())
                    .with_context(|| format!("trust-root {} is not a root that signs itself", path.display()))?;
                Some(state.root().clone())
            }
            None => None,
        };
        let admission = api::Admission {
            trust,
            policy: self.config.policy.clone(),
            registries: rollout::pin::Registries { insecure: self.config.insecure_registries.clone() },
            site_hub: self.config.upstream.as_ref().map(|u| u.site.clone()),
        };
        let parent_ca = match self.config.upstream.as_ref().and_then(|u| u.tls.as_ref()) {
            Some(tls) => Some(oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: std::fs::read(&tls.ca)
                    .with_context(|| format!("cannot read [upstream.tls] ca {}", tls.ca.display()))?,
            }),
            None => None,
        };
        let mirror = artifacts::Mirror::new(
            self.cache.clone(),
            self.config.cache.clone(),
            self.config.insecure_registries.clone(),
            self.config.upstream.as_ref().and_then(|u| u.http.clone()),
            parent_ca,
        )
        .context("[upstream.tls] ca is not a PEM certificate: the parent's `hub ca` prints the right one")?;
        // The site cache's and enrollment's routes are their own; every other
        // path falls to the API's "no endpoint".
        let app = api::router(self.store.clone(), publisher, logs, engine, admission, api_upward)
            .merge(artifacts::api::router(mirror))
            .merge(enroll::operator_router(
                self.store.clone(),
                self.config.enroll_token_ttl,
                self.config.enroll_listen.is_some(),
            ));
        let mut http_stopping = stopping.clone();
        let mut tls = self.tls;
        let http = match &tls {
            Some(tls) if self.config.http_tls => {
                let acceptor = https::acceptor(&tls.cert, &tls.key)?;
                tokio::spawn(async move {
                    https::serve(http_listener, acceptor, app, http_stopping).await;
                    Ok(())
                })
            }
            _ => tokio::spawn(
                axum::serve(http_listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = http_stopping.wait_for(|stop| *stop).await;
                    })
                    .into_future(),
            ),
        };
        let enroll = match tls.as_mut().and_then(|tls| Some((tls.enroll.take()?, tls))) {
            Some((listener, tls)) => {
                let listener = TcpListener::from_std(listener)?;
                info!("enrollment listening over HTTPS on {}", listener.local_addr()?);
                let acceptor = https::acceptor(&tls.cert, &tls.key)?;
                let app = enroll::device_router(self.store.clone(), tls.ca.clone());
                Some(tokio::spawn(https::serve(listener, acceptor, app, stopping.clone())))
            }
            None => None,
        };

        let broker_stopped = async {
            match broker_stopped {
                Some(stopped) => stopped.await.unwrap_or_else(|_| "the embedded MQTT broker's thread ended".into()),
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            _ = shutdown => {
                info!("shutting down");
                Ok(())
            }
            why = broker_stopped => Err(anyhow::anyhow!(why)),
        };
        let _ = stop.send(true);
        let served = http.await.context("the HTTP server task failed")?;
        if let Some(enroll) = enroll {
            enroll.await.context("the enrollment server task failed")?;
        }
        if let Some(upstream) = upstream {
            let _ = upstream.await;
        }
        sync_tasks.join().await;
        let _ = rollouts.await;
        if let Some(handle) = &self.broker_store {
            *handle.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        }
        served.context("the HTTP server failed")?;
        outcome
    }
}

/// Where the hub keeps its CA and server certificate.
pub fn pki_dir(config: &Config) -> std::path::PathBuf {
    config.data_dir.join("pki")
}

/// The hub's own password at its embedded broker, new at every start.
fn random_token() -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random number generator failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
