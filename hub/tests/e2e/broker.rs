//! The embedded broker outlives clients that misbehave on the wire.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

/// An MQTT 3.1.1 CONNECT with a user name and password and a clean session.
fn connect_packet(client_id: &str, password: &str) -> Vec<u8> {
    let field = |s: &str| [&(s.len() as u16).to_be_bytes()[..], s.as_bytes()].concat();
    let mut body = [field("MQTT"), vec![4, 0b1100_0010, 0, 30]].concat();
    body.extend([field(client_id), field(client_id), field(password)].concat());
    assert!(body.len() < 128, "one byte of remaining length");
    [vec![0x10, body.len() as u8], body].concat()
}

// A device whose connect timed out under load used to leave a stale will
// handler behind; its next CONNECT then panicked the listener's thread and
// no device could connect again (rumqttd's broker.rs, an Outpost patch).
#[tokio::test]
async fn a_device_reset_while_connecting_connects_again_and_so_do_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let (id, password) = DEVICES[0];
    for _ in 0..5 {
        let mut stream = TcpStream::connect(hub.mqtt).await.unwrap();
        stream.write_all(&connect_packet(id, password)).await.unwrap();
        // Closing with a zero linger sends a reset, before the CONNACK.
        stream.set_zero_linger().unwrap();
        drop(stream);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (id, password) in DEVICES {
        let device =
            DeviceSimulator::connect_with(hub.mqtt, id, password, Default::default(), Default::default()).await;
        assert!(device.is_some(), "{id} cannot connect after a reset while connecting");
    }
    hub.stop().await;
}
