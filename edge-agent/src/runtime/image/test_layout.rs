//! Tiny OCI image layouts written in tests, so store, import and gc tests
//! need neither a registry nor external tools.

use std::fs;
use std::path::Path;

use ota::Digest;
use serde_json::json;

/// A layout at `dir` holding one image named `name` (if any), whose single
/// gzip layer holds `files`. Returns the manifest digest.
pub(crate) fn write_layout(dir: &Path, name: Option<&str>, files: &[(&str, &[u8])]) -> Digest {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = Digest::of(bytes);
        fs::write(blobs.join(digest.hex()), bytes).unwrap();
        (digest, bytes.len())
    };
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_600_000_000);
        header.set_size(data.len() as u64);
        tar.append_data(&mut header, path, *data).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let (layer, layer_size) = put(&gz.finish().unwrap());
    let config = json!({
        "architecture": oci_spec::image::Arch::default().to_string(),
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(&tar).to_string()]},
    });
    let (config, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": layer_size}],
    });
    let (manifest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let mut entry = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest.to_string(),
        "size": manifest_size,
    });
    if let Some(name) = name {
        entry["annotations"] = json!({"org.opencontainers.image.ref.name": name});
    }
    let index = json!({"schemaVersion": 2, "manifests": [entry]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    manifest
}

/// Where the layer blob of a layout written by `write_layout` is.
pub(crate) fn layer_blob(dir: &Path, manifest: &Digest) -> std::path::PathBuf {
    let bytes = fs::read(dir.join("blobs/sha256").join(manifest.hex())).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let digest: Digest = manifest["layers"][0]["digest"].as_str().unwrap().parse().unwrap();
    dir.join("blobs/sha256").join(digest.hex())
}
