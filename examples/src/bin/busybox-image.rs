//! Writes a small real OCI image, made of the host's busybox-static, as an
//! OCI image layout directory: what the quickstart imports and runs.
//!
//! usage: busybox-image OUT_DIR [TAG]

use anyhow::Context;
use testkit::image::{build_oci_layout, busybox_config, busybox_rootfs, Layer};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().context("usage: busybox-image OUT_DIR [TAG]")?);
    let tag = args.next().unwrap_or_else(|| "busybox:quickstart".into());
    let staging = tempfile::tempdir()?;
    busybox_rootfs(staging.path())?;
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot replace {}", out.display()))?;
    }
    let digest = build_oci_layout(&out, &tag, &[Layer::Dir(staging.path().to_path_buf())], &busybox_config())?;
    println!("{tag} {digest} -> {}", out.display());
    Ok(())
}
