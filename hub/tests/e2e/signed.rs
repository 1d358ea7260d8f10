//! Signed applies to a hub that has the operator's root (`trust-root`): it
//! checks signatures as they arrive and refuses bad ones at once, saying to
//! sign again; it never pins a signed spec, which would break its signature.

use hub::rollout;
use outpost_proto::DeploymentSpec;
use serde_json::{json, Value};

use crate::support::*;

async fn hub_with_root(dir: &tempfile::TempDir) -> TestHub {
    let config = hub::Config { trust_root: Some(testkit::trust::operator().root_path()), ..config(dir.path()) };
    TestHub::start(config).await
}

fn spec(image: &str) -> Value {
    json!({ "name": "app", "workloads": [{ "name": "web", "image": image }] })
}

/// The body of a signed apply of `spec` as `revision`, signed by the test operator.
fn signed(spec: &Value, revision: u64) -> String {
    let parsed: DeploymentSpec = serde_json::from_value(spec.clone()).unwrap();
    let mut deployment = rollout::deployment(&parsed, revision, Vec::new());
    let key = std::fs::read(testkit::trust::operator().deployments_key_path()).unwrap();
    ota::sign_deployment(&mut deployment, &ota::SigningKey::from_pkcs8(&key).unwrap()).unwrap();
    json!({ "spec": spec, "revision": revision, "signatures": deployment.signatures }).to_string()
}

fn error(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_signed_apply_is_verified_and_stored_with_its_signatures_and_the_same_spec_again_makes_no_revision() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_with_root(&dir).await;
    let web = spec(&pinned("web:1"));
    let (status, body) = hub.put("/v1/deployments/app", &signed(&web, 1)).await;
    assert_eq!(status, 200, "{body}");
    let (_, revisions) = hub.get("/v1/deployments/app/revisions").await;
    assert_eq!(revisions[0]["signatures"].as_array().map(Vec::len), Some(1), "{revisions}");
    assert_eq!(revisions[0]["spec"]["workloads"][0]["image"], pinned("web:1"), "stored as signed");

    let (status, body) = hub.put("/v1/deployments/app", &signed(&web, 1)).await;
    assert_eq!((status, body["revision"].as_u64()), (200, Some(1)), "{body}");
    let (status, body) = hub.put("/v1/deployments/app", &signed(&spec(&pinned("web:2")), 2)).await;
    assert_eq!((status, body["revision"].as_u64()), (200, Some(2)), "{body}");
    hub.stop().await;
}

#[tokio::test]
async fn signatures_that_do_not_verify_or_are_for_another_revision_are_refused_saying_to_sign_again() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_with_root(&dir).await;

    // Signed for web:1, sent with web:2: altered after signing.
    let body: Value = serde_json::from_str(&signed(&spec(&pinned("web:1")), 1)).unwrap();
    let altered = json!({ "spec": spec(&pinned("web:2")), "revision": 1, "signatures": body["signatures"] });
    let (status, body) = hub.put("/v1/deployments/app", &altered.to_string()).await;
    assert_eq!(status, 400, "{body}");
    assert!(error(&body).contains("does not verify") && error(&body).contains("sign it again"), "{body}");

    // Signed as revision 3 of a deployment that has none: it would be revision 1.
    let (status, body) = hub.put("/v1/deployments/app", &signed(&spec(&pinned("web:1")), 3)).await;
    assert_eq!(status, 409, "{body}");
    assert!(error(&body).contains("would be revision 1") && error(&body).contains("sign it again"), "{body}");

    // Unsigned: devices would refuse it.
    let (status, body) = hub
        .put(
            "/v1/deployments/app",
            &json!({ "spec": spec(&pinned("web:1")), "revision": 1, "signatures": [] }).to_string(),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(error(&body).contains("is not signed"), "{body}");

    let (status, _) = hub.get("/v1/deployments/app").await;
    assert_eq!(status, 404, "nothing was stored");
    hub.stop().await;
}

#[tokio::test]
async fn a_signed_spec_with_an_image_not_pinned_by_digest_is_refused_not_pinned_by_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_with_root(&dir).await;
    let unpinned = json!({ "spec": spec("web:1"), "revision": 1, "signatures": [{ "keyid": "k", "sig": "00" }] });
    let (status, body) = hub.put("/v1/deployments/app", &unpinned.to_string()).await;
    assert_eq!(status, 400, "{body}");
    assert!(error(&body).contains("not pinned by digest") && error(&body).contains("hub apply --key"), "{body}");
    hub.stop().await;
}

#[tokio::test]
async fn an_unsigned_desired_state_is_refused_by_a_hub_with_a_trust_root() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_with_root(&dir).await;
    let image = pinned("web:1");
    let desired = json!({ "version": 1, "generation": 1, "deployments": [
        { "name": "app", "revision": 1, "workloads": [{ "name": "web", "image": image }] }
    ] });
    let (status, body) = hub.put("/v1/devices/pump-3/desired", &desired.to_string()).await;
    assert_eq!(status, 400, "{body}");
    assert!(error(&body).contains("is not signed"), "{body}");
    hub.stop().await;
}
