//! The same sync flow with an external broker: Debian's mosquitto, started
//! by the test on a free loopback port, with a password file.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_proto::sync::Command as HubCommand;

use crate::support::*;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const HUB_PASSWORD: &str = "hub-password";

struct Mosquitto {
    child: Child,
    port: u16,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    fn start(dir: &Path) -> Self {
        assert!(Path::new(MOSQUITTO).exists(), "needs mosquitto: apt-get install mosquitto");
        let passwords = dir.join("passwd");
        let users = std::iter::once(("outpost-hub", HUB_PASSWORD)).chain(DEVICES);
        for (i, (user, password)) in users.enumerate() {
            let create: &[&str] = if i == 0 { &["-c"] } else { &[] };
            let status = Command::new("mosquitto_passwd")
                .args(create)
                .arg("-b")
                .arg(&passwords)
                .args([user, password])
                .status()
                .expect("needs mosquitto_passwd: apt-get install mosquitto");
            assert!(status.success(), "mosquitto_passwd failed");
        }
        // A free port: mosquitto cannot report one it picked itself.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\n",
                passwords.display()
            ),
        )
        .unwrap();
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("needs mosquitto: apt-get install mosquitto");
        let mosquitto = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        mosquitto
    }

    fn hub_config(&self, data_dir: &Path) -> hub::Config {
        hub::Config {
            broker: hub::BrokerSetting::External { host: "127.0.0.1".into(), port: self.port },
            broker_username: "outpost-hub".into(),
            broker_password: HUB_PASSWORD.into(),
            ..config(data_dir)
        }
    }
}

#[tokio::test]
async fn the_sync_flow_works_the_same_through_an_external_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path());
    let data = dir.path().join("hub");
    let hub = TestHub::start(mosquitto.hub_config(&data)).await;

    hub.set_generation("pump-3", 1).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.desired(1).await;
    // Presence is retained, so the hub sees it once subscribed: from then on
    // what the device publishes reaches the hub.
    hub.wait_for_device("pump-3", "online", |d| d["online"] == true).await;

    pump3.publish(outpost_proto::sync::Channel::Reported, false, b"\xff garbage".to_vec()).await;
    pump3.report(&report(1, true, 1, &[("web", "running"), ("db", "backoff")], &[])).await;
    pump3.report(&report(2, false, 1, &[("db", "running")], &["web"])).await;
    pump3.report(&report(2, false, 1, &[("db", "exited")], &[])).await;
    pump3.events(&[1, 2]).await;
    pump3.events(&[2, 3]).await;
    let ack = pump3.ack(2, 3).await;
    assert_eq!((ack.reports, ack.events), (2, 3));
    let view = hub.wait_for_device("pump-3", "report 2", |d| d["report_seq"] == 2).await;
    assert_eq!(workloads(&view).into_iter().collect::<Vec<_>>(), [("db".to_string(), "running".to_string())]);
    assert_eq!(hub.event_seqs("pump-3").await, [1, 2, 3]);

    pump3.report(&report(4, false, 1, &[], &["db"])).await;
    assert_eq!(pump3.command().await.command, HubCommand::FullReport);

    // A wrong token is mosquitto's to refuse.
    let wrong = DeviceSimulator::connect_with(
        hub.mqtt,
        "pump-4",
        "not-its-token",
        outpost_proto::sync::Topics::default(),
        outpost_proto::sync::Encoding::Json,
    );
    assert!(wrong.await.is_none());

    // The hub restarts; mosquitto kept its session and the retained messages.
    hub.stop().await;
    let hub = TestHub::start(mosquitto.hub_config(&data)).await;
    pump3.report(&report(5, true, 1, &[("db", "running")], &[])).await;
    let view = hub.wait_for_device("pump-3", "the full report after the restart", |d| d["report_seq"] == 5).await;
    assert_eq!(view["stale"], false);
    hub.set_generation("pump-3", 2).await;
    pump3.desired(2).await;
    hub.stop().await;
}
