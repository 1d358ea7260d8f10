//! Device identity over real TLS on loopback (docs/identity.md): the
//! agent's own enrollment code gets a certificate with a one-time token over
//! HTTPS, the device syncs over mqtts with it, and the operators' API over
//! HTTPS answers the `hub` CLI.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edge_agent::identity::{self, IdentityPaths};
use outpost_proto::sync::{encode, Channel, Encoding, Presence, Topics, PROTOCOL_VERSION};
use rumqttc::tokio_rustls::rustls::ClientConfig;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::support::*;

/// A hub in-process with every TLS listener on loopback.
struct TlsHub {
    api: String,
    enroll: String,
    /// The plain listener, for devices with tokens.
    mqtt: SocketAddr,
    mqtts: SocketAddr,
    ca: std::path::PathBuf,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TlsHub {
    async fn start(data_dir: &Path) -> Self {
        Self::start_with(config(data_dir)).await
    }

    /// `config` with every TLS listener on loopback.
    async fn start_with(config: hub::Config) -> Self {
        let config = hub::Config {
            mqtts_listen: Some("127.0.0.1:0".parse().unwrap()),
            enroll_listen: Some("127.0.0.1:0".parse().unwrap()),
            http_tls: true,
            ..config
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("https://{}", listener.local_addr().unwrap());
        let hub = hub::Hub::start(config).expect("the hub starts");
        let enroll = format!("https://{}", hub.enroll_addr().expect("an enrollment listener"));
        let mqtts = hub.mqtts_addr().expect("an mqtts listener");
        let mqtt = hub.mqtt_addr().expect("the embedded broker");
        let ca = hub.ca_cert_path().expect("a CA");
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(hub.serve(listener, async move {
            let _ = stopped.await;
        }));
        Self { api, enroll, mqtt, mqtts, ca, stop, served }
    }

    /// `hub --hub-url https://... --hub-ca CA ARGS...`: stdout, or panics with stderr.
    async fn cli(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hub"))
            .arg("--hub-url")
            .arg(&self.api)
            .arg("--hub-ca")
            .arg(&self.ca)
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "hub {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.served.await.unwrap().expect("the hub stops cleanly");
    }
}

/// Connects over mqtts as `client_id`; the client once the broker accepted
/// it, or the error that ended the attempt.
async fn connect(addr: SocketAddr, client_id: &str, tls: Arc<ClientConfig>) -> Result<AsyncClient, String> {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut event_loop) = AsyncClient::new(options, 16);
    // The hub holds devices off until it has subscribed: try for a while.
    let attempt = within(WAIT, async {
        let mut last_error = String::new();
        for _ in 0..50 {
            match event_loop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => continue,
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last_error)
    });
    attempt.await.unwrap_or_else(|| Err("no answer".into()))?;
    tokio::spawn(async move { while event_loop.poll().await.is_ok() {} });
    Ok(client)
}

async fn enroll(hub: &TlsHub, token: &str, device: &str, paths: &IdentityPaths) -> Result<(), identity::IdentityError> {
    let ca = std::fs::read(&hub.ca).unwrap();
    identity::enroll(&hub.enroll, token, &ca, device, paths).await
}

async fn device_view(hub: &TlsHub, device: &str) -> Value {
    let json = hub.cli(&["devices", "--json"]).await;
    let devices: Vec<Value> = serde_json::from_str(&json).unwrap();
    devices.into_iter().find(|d| d["id"] == device).unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_device_enrolls_once_with_its_token_over_https_then_syncs_over_mqtts_with_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TlsHub::start(&dir.path().join("hub")).await;
    // The operator makes a token through the API over HTTPS.
    let token = hub.cli(&["enroll-token", "cam-1"]).await.trim().to_string();
    let paths = IdentityPaths::under(&dir.path().join("device"));
    enroll(&hub, &token, "cam-1", &paths).await.expect("enrolled");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&paths.key).unwrap().permissions().mode() & 0o777, 0o600);

    // The token serves once, even for the same device.
    let again = IdentityPaths::under(&dir.path().join("again"));
    let err = enroll(&hub, &token, "cam-1", &again).await.unwrap_err().to_string();
    assert!(err.contains("403") && err.contains("already used"), "{err}");
    assert!(!again.cert.exists());

    let device = connect(hub.mqtts, "cam-1", identity::client_config(&paths).unwrap()).await.expect("connected");
    let topics = Topics::default();
    let presence = encode(Encoding::Json, &Presence { v: PROTOCOL_VERSION, online: true });
    device.publish(topics.topic("cam-1", Channel::Presence), QoS::AtLeastOnce, true, presence).await.unwrap();
    let seen = within(WAIT, async {
        loop {
            if device_view(&hub, "cam-1").await["online"] == true {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(seen.await.is_some(), "the hub never saw cam-1 online");
    hub.stop().await;
}

#[tokio::test]
async fn a_certificate_used_under_another_client_id_or_signed_by_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TlsHub::start(&dir.path().join("hub")).await;
    let enroll_token = hub.cli(&["enroll-token", "cam-1"]).await.trim().to_string();
    let paths = IdentityPaths::under(&dir.path().join("device"));
    enroll(&hub, &enroll_token, "cam-1", &paths).await.expect("enrolled");
    let tls = identity::client_config(&paths).unwrap();
    assert!(connect(hub.mqtts, "cam-2", tls.clone()).await.is_err(), "cam-1's certificate as cam-2");
    assert!(connect(hub.mqtts, "cam-1", tls).await.is_ok());

    // A CA of its own, with a certificate for cam-1: the hub's TLS refuses it.
    let rogue_key = rcgen::KeyPair::generate().unwrap();
    let mut rogue_ca = rcgen::CertificateParams::default();
    rogue_ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(rogue_ca, rogue_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "cam-1");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let forged = IdentityPaths::under(&dir.path().join("forged"));
    std::fs::create_dir_all(forged.key.parent().unwrap()).unwrap();
    std::fs::write(&forged.key, key.serialize_pem()).unwrap();
    std::fs::write(&forged.cert, cert.pem()).unwrap();
    std::fs::copy(&hub.ca, &forged.ca).unwrap();
    let err = connect(hub.mqtts, "cam-1", identity::client_config(&forged).unwrap()).await.unwrap_err();
    assert!(!err.is_empty());

    // And the plain listener still takes tokens.
    let _pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    hub.stop().await;
}

#[tokio::test]
async fn a_site_hub_enrolled_at_its_parent_syncs_over_mqtts_and_fetches_over_https_with_its_certificate_and_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = TlsHub::start_with(hub::Config {
        sites: [("rig-7".to_string(), "unused-token".to_string())].into(),
        ..config(&dir.path().join("cloud"))
    })
    .await;
    // The site enrolls with a one-time token, as a device does.
    let enroll_token = cloud.cli(&["enroll-token", "rig-7"]).await.trim().to_string();
    let paths = IdentityPaths::under(&dir.path().join("site-identity"));
    enroll(&cloud, &enroll_token, "rig-7", &paths).await.expect("the site enrolled");

    let upstream = hub::config::Upstream {
        mqtt: hub::BrokerSetting::External { host: "127.0.0.1".into(), port: cloud.mqtts.port() },
        site: "rig-7".into(),
        token: String::new(),
        http: Some(cloud.api.clone()),
        tls: Some(hub::config::UpstreamTls { ca: paths.ca.clone(), cert: paths.cert.clone(), key: paths.key.clone() }),
    };
    let site = TestHub::start(hub::Config { upstream: Some(upstream), ..config(&dir.path().join("site")) }).await;
    let pump = DeviceSimulator::connect(site.mqtt, "pump-3", token("pump-3")).await;
    pump.events(&[1, 2]).await;
    let found = within(WAIT, async {
        loop {
            let device = device_view(&cloud, "pump-3").await;
            if device["event_seq"] == 2 && device["site"] == "rig-7" {
                return device;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(found.is_some(), "the site's device never reached the cloud over mqtts");

    // An artifact only the cloud has comes down to the site over HTTPS,
    // the cloud's certificate checked against the CA the site enrolled with.
    let artifact = b"an update bundle only the cloud has".to_vec();
    let digest = ota::Digest::of(&artifact);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cloud.ca).unwrap()).unwrap();
    let operator = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let put = operator.put(format!("{}/v1/artifacts/{digest}", cloud.api)).body(artifact.clone()).send().await.unwrap();
    assert!(put.status().is_success(), "the cloud took the artifact: {}", put.status());
    let fetched = reqwest::get(format!("{}/v1/artifacts/{digest}", site.api)).await.unwrap();
    assert_eq!(fetched.status(), 200, "the site fetched it from the cloud over https");
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), artifact.as_slice());
    site.stop().await;
    cloud.stop().await;
}
