//! Small real images for tests, examples and benchmarks, built from the host's
//! busybox-static: no registry outside is needed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context};
use flate2::write::GzEncoder;
use ring::digest::{digest, SHA256};
use serde_json::json;

/// The host binary every busybox image is made of.
pub const BUSYBOX: &str = "/bin/busybox";

fn require_busybox() -> anyhow::Result<()> {
    let out = std::process::Command::new(BUSYBOX).arg("--list").output();
    match out {
        Ok(out) if out.status.success() => Ok(()),
        _ => bail!("needs a static busybox at {BUSYBOX}: apt-get install busybox-static"),
    }
}

/// A complete rootfs: busybox, a link per applet, /etc/passwd and the usual mount points.
pub fn busybox_rootfs(dir: &Path) -> anyhow::Result<()> {
    require_busybox()?;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(BUSYBOX, bin.join("busybox")).context("copying busybox")?;
    let list = std::process::Command::new(BUSYBOX).arg("--list").output()?.stdout;
    for applet in String::from_utf8_lossy(&list).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let link = bin.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    for d in ["etc", "tmp", "proc", "sys", "dev", "root", "var/run"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    std::fs::set_permissions(dir.join("tmp"), std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
    Ok(())
}

/// How the image says it runs.
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

/// One layer of an image under construction.
pub enum Layer {
    /// A directory tree, packed as it is.
    Dir(PathBuf),
    /// A ready tar stream (e.g. with whiteout entries).
    Tar(Vec<u8>),
}

/// Writes an OCI image layout at `out` holding one image tagged `tag`, with
/// gzip layers, base first. Returns the manifest digest (`sha256:...`).
pub fn build_oci_layout(out: &Path, tag: &str, layers: &[Layer], config: &RunConfig) -> anyhow::Result<String> {
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let write_blob = |bytes: &[u8]| -> anyhow::Result<(String, usize)> {
        let hex = hex(digest(&SHA256, bytes).as_ref());
        std::fs::write(blobs.join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len()))
    };
    let mut diff_ids = Vec::new();
    let mut layer_descriptors = Vec::new();
    for layer in layers {
        let tar = match layer {
            Layer::Dir(dir) => tar_dir(dir)?,
            Layer::Tar(bytes) => bytes.clone(),
        };
        diff_ids.push(format!("sha256:{}", hex(digest(&SHA256, &tar).as_ref())));
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar)?;
        let (digest, size) = write_blob(&gz.finish()?)?;
        layer_descriptors.push(
            json!({ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size }),
        );
    }
    let image_config = json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": { "Entrypoint": config.entrypoint, "Cmd": config.cmd, "Env": config.env },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let (config_digest, config_size) = write_blob(&serde_json::to_vec(&image_config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": layer_descriptors,
    });
    let (manifest_digest, manifest_size) = write_blob(&serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(out.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(manifest_digest)
}

/// The busybox image as an OCI layout in a directory kept for the life of the
/// test process; built once.
pub fn busybox_layout() -> &'static Path {
    static LAYOUT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &LAYOUT
        .get_or_init(|| {
            let dir = tempfile::Builder::new().prefix("outpost-busybox-").tempdir().expect("temp dir");
            let rootfs = dir.path().join("rootfs");
            busybox_rootfs(&rootfs).expect("busybox rootfs");
            let layout = dir.path().join("layout");
            build_oci_layout(&layout, BUSYBOX_TAG, &[Layer::Dir(rootfs)], &busybox_config()).expect("busybox layout");
            (dir, layout)
        })
        .1
}

/// The tag the busybox layout carries.
pub const BUSYBOX_TAG: &str = "busybox:test";

/// The busybox image by its tag and manifest digest, as a signed deployment
/// must name it; an agent that imported the layout finds it locally.
pub fn busybox_pinned() -> String {
    let index = std::fs::read(busybox_layout().join("index.json")).expect("the busybox layout's index.json");
    let index: serde_json::Value = serde_json::from_slice(&index).expect("index.json is JSON");
    let digest = index["manifests"][0]["digest"].as_str().expect("index.json names its manifest");
    format!("{BUSYBOX_TAG}@{digest}")
}

pub fn busybox_config() -> RunConfig {
    RunConfig { cmd: vec!["/bin/sh".into()], env: vec!["PATH=/bin".into()], ..Default::default() }
}

fn tar_dir(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir)?;
    Ok(builder.into_inner()?)
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
