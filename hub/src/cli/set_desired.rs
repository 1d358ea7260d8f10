//! `hub set-desired DEVICE -f FILE`.

use std::path::PathBuf;

use anyhow::Context;
use outpost_proto::DesiredState;

use super::client::ApiClient;

#[derive(clap::Args)]
pub struct Args {
    device: String,
    /// The desired state, TOML or JSON (docs/desired-state.md).
    #[arg(long, short)]
    file: PathBuf,
}

pub async fn run(client: &ApiClient, args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {:?}", args.file))?;
    let state = DesiredState::parse(&text).with_context(|| format!("in {:?}", args.file))?;
    let stored = client.put_desired(&args.device, &state).await?;
    println!(
        "{}: desired state generation {} stored; the hub publishes it to the device (`hub watch {}` follows it)",
        args.device, stored.generation, args.device
    );
    Ok(())
}
