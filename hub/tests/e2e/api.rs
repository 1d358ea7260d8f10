//! The HTTP API: operators' input checked, with errors that say what is wrong.

use serde_json::Value;

use crate::support::*;

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("no `error` string in {body}"))
}

#[tokio::test]
async fn put_desired_refuses_a_generation_not_above_the_stored_one() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    hub.set_generation("pump-3", 2).await;
    for generation in [2, 1] {
        let (status, body) = hub.put("/v1/devices/pump-3/desired", &desired_json(generation)).await;
        assert_eq!(status, 409, "{body}");
        let error = error_of(&body);
        assert!(error.contains(&format!("generation {generation} is not above the stored generation 2")), "{error}");
    }
    let (status, body) = hub.get("/v1/devices/pump-3/desired").await;
    assert_eq!((status, body["generation"].as_u64()), (200, Some(2)));
    hub.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_4xx_with_a_json_error_saying_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let desired = "/v1/devices/pump-3/desired";
    let duplicate = r#"{"version": 1, "generation": 1, "deployments": [
        {"name": "a", "revision": 1, "workloads": [{"name": "web", "image": "web:1"}]},
        {"name": "b", "revision": 1, "workloads": [{"name": "web", "image": "web:2"}]}]}"#;
    let cases: Vec<(u16, Value, &str)> = vec![
        (400, hub.put(desired, "version = 1").await.1, "must be a JSON object"),
        (400, hub.put(desired, r#"{"version": 1, "generation": "four"}"#).await.1, "expected u64 at line 1 column 35"),
        (400, hub.put(desired, r#"{"version": 2, "generation": 1}"#).await.1, "version 2"),
        (400, hub.put(desired, duplicate).await.1, "workload `web` appears twice"),
        (400, hub.put("/v1/devices/pump-3/labels", r#"["site"]"#).await.1, "labels must be a JSON object"),
        (400, hub.put("/v1/devices/pump-3/labels", r#"{"": "x"}"#).await.1, "label key \"\""),
        (400, hub.get("/v1/devices/pump-3/events?after=ten").await.1, "`after`"),
        (400, hub.get("/v1/devices/a+b").await.1, "device id \"a+b\" is not valid"),
        (404, hub.get("/v1/devices/nobody").await.1, "no device \"nobody\""),
        (404, hub.get("/v1/devices/nobody/desired").await.1, "has no desired state"),
        (404, hub.get("/v3/devices").await.1, "no endpoint GET /v3/devices"),
    ];
    for (expected, body, says) in &cases {
        assert!(error_of(body).contains(says), "expected {expected} saying {says:?}, got {body}");
    }
    // And the statuses themselves.
    assert_eq!(hub.put(desired, "version = 1").await.0, 400);
    assert_eq!(hub.get("/v1/devices/nobody").await.0, 404);
    let response = reqwest::Client::new().delete(format!("{}/v1/devices", hub.api)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let body: Value = response.json().await.unwrap();
    assert!(error_of(&body).contains("DELETE is not allowed"), "{body}");
    hub.stop().await;
}

#[tokio::test]
async fn labels_are_set_before_a_device_connects_and_events_are_listed_after_a_number() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(config(dir.path())).await;
    let (status, body) = hub.put("/v1/devices/pump-3/labels", r#"{"site": "north", "tier": "edge"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["labels"]["site"], "north");
    let (_, list) = hub.get("/v1/devices").await;
    let ids: Vec<&str> = list.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["pump-3"]);
    assert_eq!(list[0]["first_seen"], Value::Null, "it has not connected");

    let pump3 = DeviceSimulator::connect(hub.mqtt, "pump-3", token("pump-3")).await;
    pump3.events(&[1, 2, 3, 4, 5]).await;
    hub.wait_for_device("pump-3", "5 events", |d| d["event_seq"] == 5).await;
    let seqs = |body: Value| body.as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(seqs(hub.get("/v1/devices/pump-3/events?after=3").await.1), [4, 5]);
    assert_eq!(seqs(hub.get("/v1/devices/pump-3/events?limit=2").await.1), [1, 2]);
    let (_, events) = hub.get("/v1/devices/pump-3/events?after=4").await;
    assert_eq!(events[0]["event"], "applied");
    assert_eq!(hub.device("pump-3").await["labels"]["tier"], "edge", "labels survive the device's reports");
    hub.stop().await;
}
