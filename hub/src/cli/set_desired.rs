//! `hub set-desired DEVICE -f FILE`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use outpost_proto::DesiredState;

use super::client::ApiClient;

#[derive(clap::Args)]
pub struct Args {
    device: String,
    /// The desired state, TOML or JSON (docs/desired-state.md).
    #[arg(long, short)]
    file: PathBuf,
    /// Sign every deployment of the document with this operator deployments
    /// key (PKCS#8 DER) before sending it; repeat for several keys. The
    /// document names its revisions itself, and its images must be pinned
    /// by digest (image@sha256:...).
    #[arg(long)]
    key: Vec<PathBuf>,
}

/// An operator key, read here at the CLI: it never goes to the hub.
pub fn load_key(path: &Path) -> anyhow::Result<ota::SigningKey> {
    let der = std::fs::read(path).with_context(|| format!("cannot read key {}", path.display()))?;
    ota::SigningKey::from_pkcs8(&der).with_context(|| format!("cannot load key {}", path.display()))
}

pub async fn run(client: &ApiClient, args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {:?}", args.file))?;
    let mut state = DesiredState::parse(&text).with_context(|| format!("in {:?}", args.file))?;
    for path in &args.key {
        ota::sign_desired(&mut state, &load_key(path)?).with_context(|| format!("cannot sign {:?}", args.file))?;
    }
    let stored = client.put_desired(&args.device, &state).await?;
    println!(
        "{}: desired state generation {} stored; the hub publishes it to the device (`hub watch {}` follows it)",
        args.device, stored.generation, args.device
    );
    Ok(())
}
