//! The image store against real peers: Debian's docker-registry (filled with
//! skopeo), a proxy that cuts connections, skopeo's OCI archives, overlayfs
//! and a full tmpfs. Needs root (CI runs as root).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use edge_agent::runtime::image::{Image, ImageError, ImageStore, NoProgress, PullOptions, PullProgress};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tempfile::TempDir;
use testkit::image::{build_oci_layout, busybox_config, busybox_rootfs, Layer};
use testkit::layers::{random_file, whiteouts};
use testkit::registry::require_tool;
use testkit::{CuttingProxy, Registry};

const MIB: u64 = 1 << 20;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (chown, mknod of whiteouts, mounts): run them as root, as CI does"
    );
}

/// An OCI layout in `dir` of a busybox image tagged `name_tag`, with `extra` layers on top.
fn busybox_layout(dir: &Path, name_tag: &str, extra: Vec<Layer>) -> PathBuf {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs).unwrap();
    layout_of(&rootfs, &dir.join("layout"), name_tag, extra)
}

/// An OCI layout at `layout` of `rootfs` tagged `name_tag`, with `extra` layers on top.
fn layout_of(rootfs: &Path, layout: &Path, name_tag: &str, extra: Vec<Layer>) -> PathBuf {
    let mut layers = vec![Layer::Dir(rootfs.to_path_buf())];
    layers.extend(extra);
    build_oci_layout(layout, name_tag, &layers, &busybox_config()).unwrap();
    layout.to_path_buf()
}

/// A registry holding `name_tag`, and the layout it was pushed from.
fn registry_with(dir: &Path, name_tag: &str, extra: Vec<Layer>) -> (Registry, PathBuf) {
    let layout = busybox_layout(dir, name_tag, extra);
    let registry = Registry::start().unwrap();
    registry.push(&layout, name_tag).unwrap();
    (registry, layout)
}

fn options(insecure: &str) -> PullOptions {
    PullOptions {
        insecure_registries: vec![insecure.to_string()],
        backoff: Duration::from_millis(50),
        ..PullOptions::default()
    }
}

fn store(dir: &Path) -> ImageStore {
    ImageStore::open(&dir.join("images")).unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
}

/// Remembers where downloads (re)started.
#[derive(Default)]
struct Recorder {
    resumed: Mutex<Vec<(String, u64)>>,
}

impl PullProgress for Recorder {
    fn blob_started(&self, digest: &str, resumed_from: u64, _total: u64) {
        if resumed_from > 0 {
            self.resumed.lock().unwrap().push((digest.to_string(), resumed_from));
        }
    }
}

/// Unmounts when dropped, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.0, MntFlags::MNT_DETACH) {
            eprintln!("cannot unmount {}: {e}", self.0.display());
        }
    }
}

#[tokio::test]
async fn an_image_pushed_to_a_registry_is_pulled_and_busybox_runs_from_its_lowest_layer() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "busybox:1", vec![whiteouts(&["etc/group"]).unwrap()]);
    let reference = format!("{}/busybox:1", registry.host());
    let store = store(dir.path());

    let image = store.pull(&reference, &options(&registry.host()), &NoProgress).await.unwrap();

    assert_eq!(image.reference, reference);
    assert_eq!(image.config.cmd, ["/bin/sh"]);
    assert_eq!(image.layers.len(), 2);
    let busybox = image.layers[0].join("bin/busybox");
    assert!(fs::metadata(&busybox).unwrap().mode() & 0o111 != 0, "busybox is executable");
    assert_eq!(fs::read_link(image.layers[0].join("bin/sh")).unwrap(), Path::new("busybox"));
    let out = Command::new(&busybox).args(["echo", "hello from the layer"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from the layer\n");
    let whiteout = fs::symlink_metadata(image.layers[1].join("etc/group")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0, "whiteout is a 0:0 char device");

    assert_eq!(store.find(&reference).unwrap().as_ref(), Some(&image));
    assert_eq!(store.find(&image.digest).unwrap().as_ref(), Some(&image));
}

#[tokio::test]
async fn unpacked_layers_stacked_as_overlayfs_lowerdirs_hide_what_whiteouts_delete() {
    require_root();
    let dir = TempDir::new().unwrap();
    let layout = busybox_layout(dir.path(), "busybox:1", vec![whiteouts(&["etc/group", "bin/vi"]).unwrap()]);
    let image = store(dir.path()).import(&layout).unwrap().remove(0);

    let merged = dir.path().join("merged");
    fs::create_dir(&merged).unwrap();
    let lower: Vec<String> = image.layers.iter().rev().map(|l| l.display().to_string()).collect();
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(format!("lowerdir={}", lower.join(":")).as_str()),
    )
    .expect("overlayfs mount of the unpacked layers");
    let _mounted = Mounted(merged.clone());

    assert!(merged.join("bin/busybox").is_file());
    assert!(merged.join("etc/passwd").is_file());
    assert!(fs::symlink_metadata(merged.join("etc/group")).is_err(), "etc/group is whited out");
    assert!(fs::symlink_metadata(merged.join("bin/vi")).is_err(), "bin/vi is whited out");
}

#[tokio::test]
async fn a_pull_by_digest_gives_the_image_its_tag_resolved_to() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "busybox:1", vec![]);
    let store = store(dir.path());
    let opts = options(&registry.host());
    let by_tag = store.pull(&format!("{}/busybox:1", registry.host()), &opts, &NoProgress).await.unwrap();
    let by_digest_ref = format!("{}/busybox@{}", registry.host(), by_tag.digest);
    let by_digest = store.pull(&by_digest_ref, &opts, &NoProgress).await.unwrap();
    assert_eq!(by_digest.digest, by_tag.digest);
    assert_eq!(by_digest.layers, by_tag.layers);
    assert_eq!(by_digest.reference, by_digest_ref);
}

/// The digest `registry` serves for `reference`, as skopeo (not our code) sees it.
fn served_digest(registry: &Registry, reference: &str) -> String {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{}/{reference}", registry.host()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn an_image_pinned_by_the_hub_as_tag_at_digest_runs_and_later_starts_again_without_the_registry() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "busybox:1", vec![]);
    let digest = served_digest(&registry, "busybox:1");
    let pinned = [format!("{}/busybox:1@{digest}", registry.host()), format!("{}/busybox@{digest}", registry.host())];
    let mut agent = testkit::agent::Agent::new();
    agent.extra_args = vec!["--insecure-registry".into(), registry.host()];
    let spec = |name: &str, image: &str| {
        format!(
            "name = \"{name}\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", \"echo pinned\"]\n\
             [restart]\nmode = \"never\"\n"
        )
    };
    let ran = |name: &str| {
        agent.wait_for(name, Duration::from_secs(15), "exited", |w| testkit::agent::state(w) == "exited");
        assert!(agent.logs(name).contains("stdout pinned"), "{}", agent.logs(name));
    };

    agent.run_spec(&spec("tagged", &pinned[0]));
    ran("tagged");
    agent.run_spec(&spec("untagged", &pinned[1]));
    ran("untagged");

    let images: serde_json::Value = serde_json::from_str(&agent.ok(&["images", "--json"])).unwrap();
    let listed: Vec<(&str, &str)> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["reference"].as_str().unwrap(), i["digest"].as_str().unwrap()))
        .collect();
    // The second reference was found locally by its digest: pulled once, listed once.
    assert_eq!(listed, [(pinned[0].as_str(), digest.as_str())]);
    drop(registry);
    agent.run_spec(&spec("offline", &pinned[0]));
    ran("offline");
}

#[tokio::test]
async fn a_pull_cut_mid_blob_resumes_with_a_range_request_and_moves_little_more_than_the_image() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "big:1", vec![random_file("data/random", 4 * MIB as usize).unwrap()]);
    let proxy = CuttingProxy::start(registry.addr()).await.unwrap();
    // The busybox layer comes first (about 1 MiB): cut well inside the 4 MiB one.
    proxy.cut_after(3 * MIB);
    let progress = Recorder::default();

    let image =
        store(dir.path()).pull(&format!("{}/big:1", proxy.host()), &options(&proxy.host()), &progress).await.unwrap();

    assert_eq!(proxy.cuts(), 1);
    assert!(proxy.saw_range_request(), "the resumed download asked for a byte range");
    assert_eq!(progress.resumed.lock().unwrap().len(), 1, "one download resumed");
    let moved = proxy.downstream_bytes();
    let allowed = image.size + image.size / 10 + 64 * 1024;
    assert!(moved <= allowed, "{moved} bytes moved for a {}-byte image (at most {allowed})", image.size);
    assert_eq!(fs::metadata(image.layers[1].join("data/random")).unwrap().len(), 4 * MIB);
}

#[tokio::test]
async fn a_registry_that_ignores_range_requests_gets_the_cut_blob_downloaded_again_from_the_start() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "big:1", vec![random_file("data/random", 4 * MIB as usize).unwrap()]);
    let proxy = CuttingProxy::start(registry.addr()).await.unwrap();
    proxy.cut_after(3 * MIB);
    proxy.ignore_range_requests();
    let progress = Recorder::default();

    let image =
        store(dir.path()).pull(&format!("{}/big:1", proxy.host()), &options(&proxy.host()), &progress).await.unwrap();

    assert_eq!(proxy.cuts(), 1);
    assert!(progress.resumed.lock().unwrap().is_empty(), "the whole blob came again: nothing to resume from");
    assert!(proxy.downstream_bytes() > image.size + MIB, "the cut blob was downloaded twice");
    assert_eq!(fs::metadata(image.layers[1].join("data/random")).unwrap().len(), 4 * MIB);
}

#[tokio::test]
async fn a_multi_platform_index_resolves_to_the_image_for_this_machine() {
    require_root();
    let dir = TempDir::new().unwrap();
    let layout = busybox_layout(dir.path(), "multi:1", vec![]);
    let image_digest = wrap_in_multi_platform_index(&layout, "multi:1");
    let registry = Registry::start().unwrap();
    registry.push(&layout, "multi:1").unwrap();

    let image = store(dir.path())
        .pull(&format!("{}/multi:1", registry.host()), &options(&registry.host()), &NoProgress)
        .await
        .unwrap();

    assert_eq!(image.digest, image_digest, "the platform's manifest, not the index");
    assert!(image.layers[0].join("bin/busybox").is_file());

    // The hub pins such a tag to the index: the device still picks its platform.
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/multi:1", registry.host()))
        .output()
        .unwrap();
    assert!(raw.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&raw.stderr));
    assert!(String::from_utf8_lossy(&raw.stdout).contains("\"manifests\""), "the registry serves the index");
    let pinned = format!("{}/multi:1@{}", registry.host(), ota::Digest::of(&raw.stdout));
    let image = store(dir.path()).pull(&pinned, &options(&registry.host()), &NoProgress).await.unwrap();
    assert_eq!(image.digest, image_digest);
    assert_eq!(image.reference, pinned);
}

/// Replaces the layout's single image by an index listing that image for
/// this machine and for another platform; returns the image's manifest digest.
fn wrap_in_multi_platform_index(layout: &Path, name_tag: &str) -> String {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let image = &index["manifests"][0];
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let entry = |arch: &str| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image["digest"], "size": image["size"],
            "platform": {"architecture": arch, "os": "linux"},
        })
    };
    let other = if arch == "s390x" { "riscv64" } else { "s390x" };
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(other), entry(arch)],
    }))
    .unwrap();
    let nested_digest = ota::Digest::of(&nested).to_string();
    fs::write(layout.join("blobs/sha256").join(&nested_digest[7..]), &nested).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": nested_digest, "size": nested.len(),
            "annotations": {"org.opencontainers.image.ref.name": name_tag},
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    image["digest"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_pull_cut_again_and_again_still_completes_by_resuming_each_time() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "big:1", vec![random_file("data/random", 4 * MIB as usize).unwrap()]);
    let proxy = CuttingProxy::start(registry.addr()).await.unwrap();
    proxy.cut_every(MIB);
    let opts = PullOptions { retries: 2, ..options(&proxy.host()) };

    let image = store(dir.path()).pull(&format!("{}/big:1", proxy.host()), &opts, &NoProgress).await.unwrap();

    assert!(proxy.cuts() >= 4, "cut {} times", proxy.cuts());
    assert_eq!(fs::metadata(image.layers[1].join("data/random")).unwrap().len(), 4 * MIB);
}

#[tokio::test]
async fn a_pull_that_gives_up_leaves_its_partial_download_and_the_next_pull_resumes_it() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "big:1", vec![random_file("data/random", 4 * MIB as usize).unwrap()]);
    let proxy = CuttingProxy::start(registry.addr()).await.unwrap();
    let reference = format!("{}/big:1", proxy.host());
    proxy.cut_after(3 * MIB);

    let give_up = PullOptions { retries: 0, ..options(&proxy.host()) };
    let err = store(dir.path()).pull(&reference, &give_up, &NoProgress).await.unwrap_err();
    assert!(matches!(err, ImageError::DownloadFailed { .. }), "{err}");
    assert!(err.to_string().contains("next pull resumes"), "{err}");
    let partials = files_under(&dir.path().join("images/partial"));
    let kept: u64 = partials.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    assert!(kept > MIB, "the partial download is kept ({kept} bytes in {partials:?})");
    assert!(store(dir.path()).find(&reference).unwrap().is_none());

    // A fresh store on the same directory, as a new agent process would open it.
    let before = proxy.downstream_bytes();
    let progress = Recorder::default();
    let image = store(dir.path()).pull(&reference, &options(&proxy.host()), &progress).await.unwrap();
    assert!(proxy.saw_range_request());
    let resumed = progress.resumed.lock().unwrap().clone();
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0].1, kept, "resumed exactly where the partial file ends");
    let moved = proxy.downstream_bytes() - before;
    assert!(moved < image.size - kept + 64 * 1024, "the second pull moved {moved} bytes, the first had kept {kept}");
}

#[tokio::test]
async fn pulling_a_missing_image_says_it_is_not_found_naming_reference_and_registry() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "busybox:1", vec![]);
    let store = store(dir.path());
    for missing in ["busybox:2", "nothing:here"] {
        let reference = format!("{}/{missing}", registry.host());
        let err = store.pull(&reference, &options(&registry.host()), &NoProgress).await.unwrap_err();
        assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&reference) && message.contains(&registry.host()), "{message}");
    }
    assert!(store.list().unwrap().is_empty());
}

#[tokio::test]
async fn a_registry_that_does_not_answer_is_reported_unreachable() {
    require_root();
    let dir = TempDir::new().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let opts = PullOptions { retries: 1, ..options(&closed) };
    let err = store(dir.path()).pull(&format!("{closed}/app:1"), &opts, &NoProgress).await.unwrap_err();
    assert!(matches!(err, ImageError::RegistryUnreachable { .. }), "{err}");
    assert!(err.to_string().contains("edge-agent import"), "{err}");
}

/// `skopeo copy SRC DST`, the archive writer of the tools sites use.
fn skopeo_copy(source: &str, destination: &str) {
    let status =
        Command::new("skopeo").args(["copy", "--quiet", "--insecure-policy", source, destination]).status().unwrap();
    assert!(status.success(), "skopeo could not copy {source} to {destination}");
}

#[test]
fn an_oci_archive_made_by_skopeo_is_imported() {
    require_root();
    require_tool("skopeo", "skopeo").unwrap();
    let dir = TempDir::new().unwrap();
    let layout = busybox_layout(dir.path(), "busybox:1", vec![]);
    let archive = dir.path().join("busybox.tar");
    skopeo_copy(
        &format!("oci:{}:busybox:1", layout.display()),
        &format!("oci-archive:{}:site/busybox:1", archive.display()),
    );

    let store = store(dir.path());
    let images = store.import(&archive).unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].reference, "docker.io/site/busybox:1");
    assert!(images[0].layers[0].join("bin/busybox").is_file());
    assert_eq!(store.find("site/busybox:1").unwrap().as_ref(), Some(&images[0]));
}

#[test]
fn an_unnamed_oci_archive_is_imported_and_found_by_digest() {
    require_root();
    require_tool("skopeo", "skopeo").unwrap();
    let dir = TempDir::new().unwrap();
    let layout = busybox_layout(dir.path(), "busybox:1", vec![]);
    let archive = dir.path().join("busybox.tar");
    skopeo_copy(&format!("oci:{}", layout.display()), &format!("oci-archive:{}", archive.display()));

    let store = store(dir.path());
    let image = store.import(&archive).unwrap().remove(0);
    assert!(image.layers[0].join("bin/busybox").is_file());
    assert_eq!(store.find(&image.digest).unwrap().as_ref(), Some(&image));
}

#[test]
fn an_oci_layout_directory_is_imported() {
    require_root();
    let dir = TempDir::new().unwrap();
    let layout = busybox_layout(dir.path(), "busybox:1", vec![]);
    let store = store(dir.path());
    let images = store.import(&layout).unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].reference, "docker.io/library/busybox:1");
    assert!(images[0].layers[0].join("bin/busybox").is_file());
    assert_eq!(store.list().unwrap(), images);
}

#[test]
fn a_tampered_blob_in_an_imported_layout_is_refused_and_nothing_is_stored() {
    require_root();
    let dir = TempDir::new().unwrap();
    let layout = busybox_layout(dir.path(), "busybox:1", vec![]);
    let biggest =
        files_under(&layout.join("blobs/sha256")).into_iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = fs::read(&biggest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    fs::write(&biggest, bytes).unwrap();

    let store = store(dir.path());
    let err = store.import(&layout).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    let hex = biggest.file_name().unwrap().to_str().unwrap();
    assert!(err.to_string().contains(hex), "the error names the blob: {err}");
    assert!(store.list().unwrap().is_empty());
    for sub in ["blobs/sha256", "layers", "tmp"] {
        assert!(files_under(&dir.path().join("images").join(sub)).is_empty(), "{sub} is not empty");
    }
}

#[tokio::test]
async fn gc_removes_an_unused_image_and_keeps_a_used_one_with_the_layer_they_share() {
    require_root();
    let dir = TempDir::new().unwrap();
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs).unwrap();
    let small = layout_of(&rootfs, &dir.path().join("small"), "small:1", vec![]);
    let big =
        layout_of(&rootfs, &dir.path().join("big"), "big:1", vec![random_file("data/random", MIB as usize).unwrap()]);
    let store = store(dir.path());
    let used: Image = store.import(&small).unwrap().remove(0);
    let unused: Image = store.import(&big).unwrap().remove(0);
    assert_eq!(used.layers[0], unused.layers[0], "the busybox layer is unpacked once, shared");

    let report = store.gc(std::slice::from_ref(&used.digest)).unwrap();

    assert_eq!(report.images_removed, ["docker.io/library/big:1"]);
    assert_eq!(report.layers_removed, 1);
    assert!(report.bytes_freed >= MIB, "freed {} bytes", report.bytes_freed);
    assert_eq!(store.find("small:1").unwrap().as_ref(), Some(&used));
    assert!(store.find("big:1").unwrap().is_none());
    assert!(used.layers[0].join("bin/busybox").is_file());
    assert!(!unused.layers[1].exists());
}

#[tokio::test]
async fn the_pull_command_on_a_full_disk_collects_unused_images_and_succeeds_on_its_one_retry() {
    require_root();
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    mount(Some("tmpfs"), &data, Some("tmpfs"), MsFlags::empty(), Some("size=3m")).expect("mounting a tiny tmpfs");
    let _mounted = Mounted(data.clone());
    let old = dir.path().join("old");
    let old_layer = random_file("old", 1200 * 1024).unwrap();
    build_oci_layout(&old, "old:1", &[old_layer], &busybox_config()).unwrap();
    let new = dir.path().join("new");
    let new_layer = random_file("new", 1200 * 1024).unwrap();
    build_oci_layout(&new, "new:1", &[new_layer], &busybox_config()).unwrap();
    let registry = Registry::start().unwrap();
    registry.push(&new, "new:1").unwrap();
    let agent = |args: &[&str]| {
        Command::new(testkit::agent::agent_binary())
            .arg("--data-dir")
            .arg(&data)
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .args(["--insecure-registry", &registry.host()])
            .args(args)
            .output()
            .unwrap()
    };
    let import = agent(&["import", old.to_str().unwrap()]);
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));

    let pull = agent(&["pull", &format!("{}/new:1", registry.host())]);

    let stderr = String::from_utf8_lossy(&pull.stderr);
    assert!(pull.status.success(), "{stderr}");
    assert!(stderr.contains("no space left") && stderr.contains("collecting unused images"), "{stderr}");
    let images = agent(&["images", "--json"]);
    let images: serde_json::Value = serde_json::from_slice(&images.stdout).unwrap();
    let references: Vec<&str> = images.as_array().unwrap().iter().map(|i| i["reference"].as_str().unwrap()).collect();
    assert_eq!(references, [format!("{}/new:1", registry.host())]);
}

#[tokio::test]
async fn a_pull_onto_a_full_filesystem_reports_no_space_and_suggests_gc() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "big:1", vec![random_file("data/random", 4 * MIB as usize).unwrap()]);
    let tiny = dir.path().join("tiny");
    fs::create_dir(&tiny).unwrap();
    mount(Some("tmpfs"), &tiny, Some("tmpfs"), MsFlags::empty(), Some("size=2m")).expect("mounting a tiny tmpfs");
    let _mounted = Mounted(tiny.clone());
    let store = store(&tiny);

    let err =
        store.pull(&format!("{}/big:1", registry.host()), &options(&registry.host()), &NoProgress).await.unwrap_err();

    assert!(matches!(err, ImageError::NoSpace { .. }), "{err}");
    assert!(err.is_no_space());
    let message = err.to_string();
    assert!(message.contains("edge-agent gc") && message.contains(tiny.to_str().unwrap()), "{message}");
    assert!(store.list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_registry_mirror_runs_an_image_the_hub_fetched_from_the_registry() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "busybox:mirrored", vec![]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub_addr = listener.local_addr().unwrap();
    let config = hub::Config {
        data_dir: dir.path().join("hub"),
        http: hub_addr,
        mqtt_listen: "127.0.0.1:0".parse().unwrap(),
        insecure_registries: vec![registry.host()],
        ..hub::Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = tokio::spawn(hub::run(config, listener, async move {
        drop(stopped.await);
    }));
    let mut agent = testkit::agent::Agent::new();
    // The registry speaks plain HTTP and the agent does not list it as
    // insecure: only through the hub can the agent get the image.
    agent.use_config(&format!("registry-mirror = \"http://{hub_addr}\"\n"));
    let image = format!("{}/busybox:mirrored", registry.host());
    let spec = format!(
        "name = \"mirrored\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", \"echo via the hub\"]\n[restart]\nmode = \"never\"\n"
    );

    let agent = tokio::task::spawn_blocking(move || {
        agent.run_spec(&spec);
        agent.wait_for("mirrored", Duration::from_secs(30), "exited", |w| testkit::agent::state(w) == "exited");
        agent
    })
    .await
    .unwrap();

    assert!(agent.logs("mirrored").contains("via the hub"), "{}", agent.logs("mirrored"));
    let images: serde_json::Value = serde_json::from_str(&agent.ok(&["images", "--json"])).unwrap();
    assert_eq!(images[0]["reference"], image.as_str(), "recorded under its own name, not the mirror's");
    let cached: serde_json::Value = get_json(&format!("http://{hub_addr}/v1/artifacts")).await;
    let cached: Vec<&str> = cached.as_array().unwrap().iter().map(|b| b["digest"].as_str().unwrap()).collect();
    assert!(cached.contains(&images[0]["digest"].as_str().unwrap()), "the hub cached the manifest: {cached:?}");
    let _ = stop.send(());
    hub.await.unwrap().unwrap();
}

/// GET and parse, over a plain socket (this crate has no HTTP client).
async fn get_json(url: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{response}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn a_pull_goes_to_the_registry_at_once_when_the_mirror_is_unreachable() {
    require_root();
    let dir = TempDir::new().unwrap();
    let (registry, _) = registry_with(dir.path(), "busybox:direct", vec![]);
    // A port that was free a moment ago: nothing answers there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let opts = PullOptions { registry_mirror: Some(format!("http://{closed}")), ..options(&registry.host()) };
    let reference = format!("{}/busybox:direct", registry.host());

    let started = std::time::Instant::now();
    let image = store(dir.path()).pull(&reference, &opts, &NoProgress).await.unwrap();

    assert_eq!(image.reference, reference);
    assert!(started.elapsed() < Duration::from_secs(10), "no retries against a mirror that refuses connections");
}
