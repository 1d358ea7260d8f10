//! Operators' commands through the API and the CLI, answered by a simulated device.

use std::future::Future;
use std::process::Output;

use outpost_proto::sync::{encode, Channel, Command, Encoding, LogsMessage, PROTOCOL_VERSION};
use serde_json::Value;
use tokio::process::Command as Process;

use crate::support::*;

fn hub_cli(api: &str, args: &[&str]) -> impl Future<Output = Output> + 'static {
    let mut command = Process::new(env!("CARGO_BIN_EXE_hub"));
    command.arg("--hub-url").arg(api).args(args);
    async move { command.output().await.unwrap() }
}

pub(crate) fn logs_reply(command: u64, workload: &str, lines: &[&str], error: Option<&str>) -> Vec<u8> {
    let message = LogsMessage {
        v: PROTOCOL_VERSION,
        command,
        workload: workload.into(),
        lines: lines.iter().map(|l| l.to_string()).collect(),
        truncated: false,
        error: error.map(String::from),
    };
    encode(Encoding::Json, &message)
}

/// Polls the API for the device's logs of `workload` until they answer command `id`.
pub(crate) async fn logs_for(hub: &TestHub, workload: &str, id: u64) -> Value {
    let found = within(WAIT, async {
        loop {
            let (status, body) = hub.get(&format!("/v1/devices/pump-3/logs/{workload}")).await;
            if status == 200 && body["command"] == id {
                return body;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    found.unwrap_or_else(|| panic!("the logs reply to command {id} never showed"))
}

#[tokio::test]
async fn an_operators_commands_reach_the_device_and_its_logs_reply_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    hub.wait_for_device("pump-3", "online", |d| d["online"] == true).await;
    let (status, body) = hub.get("/v1/devices/pump-3/logs/web").await;
    assert_eq!(status, 404, "no reply yet: {body}");

    let (status, body) =
        hub.post("/v1/devices/pump-3/commands", r#"{"command":"send-logs","name":"web","tail":2}"#).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_u64().unwrap();
    let command = pump3.command().await;
    assert_eq!((command.id, command.command), (id, Command::SendLogs { name: "web".into(), tail: 2 }));
    pump3.publish(Channel::Logs, false, logs_reply(id, "web", &["one", "two"], None)).await;
    let reply = logs_for(&hub, "web", id).await;
    assert_eq!(reply["lines"], serde_json::json!(["one", "two"]));
    assert_eq!((reply["workload"].as_str(), reply["error"].as_str()), (Some("web"), None));
    assert!(reply["received_at"].as_u64().is_some(), "{reply}");

    let (status, body) =
        hub.post("/v1/devices/pump-3/commands", r#"{"command":"restart-workload","name":"web"}"#).await;
    assert_eq!((status, body["id"].as_u64()), (202, Some(id + 1)), "{body}");
    assert_eq!(pump3.command().await.command, Command::RestartWorkload { name: "web".into() });

    for refused in [
        r#"{"command":"full-report"}"#,
        r#"{"command":"send-logs","name":"web","tail":0}"#,
        r#"{"command":"send-logs","name":"web","tail":1001}"#,
        r#"{"command":"restart-workload","name":""}"#,
        r#"{"command":"reboot"}"#,
        "not json",
    ] {
        let (status, body) = hub.post("/v1/devices/pump-3/commands", refused).await;
        assert_eq!(status, 400, "{refused} was not refused: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    }
    let (status, body) =
        hub.post("/v1/devices/pump-9/commands", r#"{"command":"restart-workload","name":"web"}"#).await;
    assert_eq!(status, 404, "{body}");
    hub.stop().await;
}

#[tokio::test]
async fn hub_logs_prints_the_devices_reply_to_its_own_command_and_restart_sends_one() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let mut pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    hub.wait_for_device("pump-3", "online", |d| d["online"] == true).await;

    // An earlier reply is there: `hub logs` must wait for the one to its own command.
    pump3.publish(Channel::Logs, false, logs_reply(0, "web", &["stale"], None)).await;
    logs_for(&hub, "web", 0).await;
    let cli = tokio::spawn(hub_cli(&hub.api, &["logs", "pump-3", "web", "--tail", "5", "--timeout", "15s"]));
    let command = pump3.command().await;
    assert_eq!(command.command, Command::SendLogs { name: "web".into(), tail: 5 });
    pump3.publish(Channel::Logs, false, logs_reply(command.id, "web", &["fresh 1", "fresh 2"], None)).await;
    let out = cli.await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "fresh 1\nfresh 2\n");

    // The device answers that it has no such workload.
    let cli = tokio::spawn(hub_cli(&hub.api, &["logs", "pump-3", "nope"]));
    let command = pump3.command().await;
    pump3.publish(Channel::Logs, false, logs_reply(command.id, "nope", &[], Some("no workload named \"nope\""))).await;
    let out = cli.await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workload named \"nope\""));

    let out = hub_cli(&hub.api, &["restart", "pump-3", "web"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(pump3.command().await.command, Command::RestartWorkload { name: "web".into() });
    hub.stop().await;
}

#[tokio::test]
async fn hub_logs_gives_up_saying_the_device_may_be_offline_when_no_reply_comes() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    hub.set_generation("pump-3", 1).await;
    let out = hub_cli(&hub.api, &["logs", "pump-3", "web", "--timeout", "1s"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not send the logs of web within 1s") && stderr.contains("offline"), "{stderr}");
    hub.stop().await;
}
