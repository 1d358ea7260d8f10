//! Pinning deployment images to digests against a real registry (Debian's
//! docker-registry on loopback, filled with skopeo).

use std::path::Path;

use hub::rollout::pin::{pin_images, PinError, Registries};
use outpost_proto::DeploymentSpec;
use tempfile::TempDir;
use testkit::image::{build_oci_layout, RunConfig};
use testkit::layers::random_file;
use testkit::Registry;

/// A deployment running `images`, one workload each (`w0`, `w1`, ...).
fn deployment(images: &[&str]) -> DeploymentSpec {
    let workloads: String = images
        .iter()
        .enumerate()
        .map(|(i, image)| format!("[[workloads]]\nname = \"w{i}\"\nimage = \"{image}\"\n"))
        .collect();
    toml::from_str(&format!("name = \"app\"\n{workloads}")).unwrap()
}

/// Pushes a small image of random content as `name_tag`; returns its manifest digest.
fn push_new_image(registry: &Registry, dir: &Path, name_tag: &str) -> String {
    let layout = tempfile::tempdir_in(dir).unwrap();
    let digest =
        build_oci_layout(layout.path(), name_tag, &[random_file("data", 1024).unwrap()], &RunConfig::default())
            .unwrap();
    registry.push(layout.path(), name_tag).unwrap();
    digest
}

fn insecure(registry: &Registry) -> Registries {
    Registries { insecure: vec![registry.host()] }
}

#[tokio::test]
async fn a_tag_is_pinned_to_the_digest_the_registry_serves_keeping_the_tag() {
    let dir = TempDir::new().unwrap();
    let registry = Registry::start().unwrap();
    let digest = push_new_image(&registry, dir.path(), "app:1");
    let image = format!("{}/app:1", registry.host());
    let mut spec = deployment(&[&image, &image]);

    pin_images(&mut spec, &insecure(&registry)).await.unwrap();

    let pinned = format!("{image}@{digest}");
    assert_eq!(spec.workloads[0].image, pinned);
    assert_eq!(spec.workloads[1].image, pinned);
    spec.validate().unwrap();
}

#[tokio::test]
async fn a_tag_moved_after_pinning_leaves_the_pinned_spec_on_the_first_image() {
    let dir = TempDir::new().unwrap();
    let registry = Registry::start().unwrap();
    let first = push_new_image(&registry, dir.path(), "app:1");
    let image = format!("{}/app:1", registry.host());
    let mut applied = deployment(&[&image]);
    pin_images(&mut applied, &insecure(&registry)).await.unwrap();
    let rolled_out = applied.clone();

    let second = push_new_image(&registry, dir.path(), "app:1");
    assert_ne!(first, second);
    let mut reapplied = deployment(&[&image]);
    pin_images(&mut reapplied, &insecure(&registry)).await.unwrap();
    pin_images(&mut applied, &insecure(&registry)).await.unwrap();

    assert_eq!(reapplied.workloads[0].image, format!("{image}@{second}"), "a new apply takes the tag's new image");
    assert_eq!(applied, rolled_out, "pinning again does not follow the moved tag");
    assert_eq!(applied.workloads[0].image, format!("{image}@{first}"));
}

#[tokio::test]
async fn an_unreachable_registry_is_reported_naming_workload_image_and_what_to_do() {
    // A port that was free a moment ago: nothing answers there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let image = format!("{closed}/cam:1");
    let mut spec = deployment(&[&image]);
    let before = spec.clone();

    let err = pin_images(&mut spec, &Registries { insecure: vec![closed.to_string()] }).await.unwrap_err();

    assert!(matches!(err, PinError::Unresolved { .. }), "{err:?}");
    let message = err.to_string();
    let start = format!("workload \"w0\": cannot resolve image \"{image}\" to a digest: ");
    assert!(message.starts_with(&start), "{message}");
    assert!(message.contains("insecure-registries") && message.contains("image@sha256:"), "{message}");
    assert_eq!(spec, before, "nothing is rewritten when an image cannot be pinned");
}

#[tokio::test]
async fn a_tag_missing_from_the_registry_is_reported_not_found() {
    let registry = Registry::start().unwrap();
    let image = format!("{}/absent:1", registry.host());
    let mut spec = deployment(&[&image]);

    let err = pin_images(&mut spec, &insecure(&registry)).await.unwrap_err();

    assert!(matches!(err, PinError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(&image) && err.to_string().contains(&registry.host()), "{err}");
}

#[tokio::test]
async fn an_image_with_a_digest_is_kept_as_written_without_asking_any_registry() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    // Port 1 on loopback: any request there would fail the pin.
    let images = [format!("127.0.0.1:1/cam:1@{digest}"), format!("127.0.0.1:1/cam@{digest}")];
    let mut spec = deployment(&[&images[0], &images[1]]);
    let before = spec.clone();

    pin_images(&mut spec, &Registries { insecure: vec!["127.0.0.1:1".into()] }).await.unwrap();

    assert_eq!(spec, before);
}

#[tokio::test]
async fn an_invalid_image_reference_is_refused_naming_the_workload() {
    let mut spec = deployment(&["cam:1", "Cam Image"]);

    let err = pin_images(&mut spec, &Registries::default()).await.unwrap_err();

    assert!(matches!(err, PinError::InvalidReference { .. }), "{err:?}");
    assert!(err.to_string().starts_with("workload \"w1\": \"Cam Image\" is not a valid image reference"), "{err}");
    assert_eq!(spec.workloads[0].image, "cam:1");
}
