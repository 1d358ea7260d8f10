//! `hub ca`, `hub enroll-token DEVICE`, `hub issue-cert DEVICE --csr FILE`:
//! devices' identities (docs/identity.md). `ca` and `issue-cert` work on the
//! CA in the hub's data directory, with or without the hub running.

use std::path::PathBuf;

use anyhow::Context;

use super::client::ApiClient;
use crate::config::Config;
use crate::pki::Ca;

#[derive(clap::Args)]
pub struct CaArgs {
    /// The hub's configuration: its data-dir holds the CA (made if missing).
    #[arg(long, short, env = "OUTPOST_HUB_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct EnrollTokenArgs {
    device: String,
}

#[derive(clap::Args)]
pub struct IssueCertArgs {
    device: String,
    /// The device's certificate signing request (PEM); its subject is ignored.
    #[arg(long)]
    csr: PathBuf,
    /// The hub's configuration: its data-dir holds the CA (made if missing).
    #[arg(long, short, env = "OUTPOST_HUB_CONFIG")]
    config: Option<PathBuf>,
}

fn open_ca(config: Option<&PathBuf>) -> anyhow::Result<Ca> {
    let config = match config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    Ok(Ca::open_or_create(&crate::pki_dir(&config))?)
}

pub fn ca(args: CaArgs) -> anyhow::Result<()> {
    let ca = open_ca(args.config.as_ref())?;
    eprintln!("the hub's CA certificate, {:?}:", ca.cert_path());
    print!("{}", ca.cert_pem());
    Ok(())
}

pub async fn enroll_token(client: &ApiClient, args: EnrollTokenArgs) -> anyhow::Result<()> {
    let token = client.enroll_token(&args.device).await?;
    let expires = std::time::UNIX_EPOCH + std::time::Duration::from_millis(token.expires);
    eprintln!(
        "usable once, until {} UTC: edge-agent enroll --hub-url https://HUB:PORT --ca-cert ca.pem --token ...",
        humantime::format_rfc3339_seconds(expires)
    );
    println!("{}", token.token);
    Ok(())
}

pub fn issue_cert(args: IssueCertArgs) -> anyhow::Result<()> {
    let ca = open_ca(args.config.as_ref())?;
    let csr = std::fs::read_to_string(&args.csr).with_context(|| format!("cannot read {:?}", args.csr))?;
    print!("{}", ca.issue_device_cert(&args.device, &csr)?);
    Ok(())
}
