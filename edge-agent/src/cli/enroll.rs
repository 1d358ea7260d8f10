//! `edge-agent enroll`: gets this device's certificate from the hub with a
//! one-time token, for an `mqtts://` hub (docs/identity.md).

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::identity;

#[derive(clap::Args)]
pub struct EnrollArgs {
    /// The hub's enrollment listener, e.g. https://hub.local:8443.
    #[arg(long)]
    hub_url: String,
    /// The one-time token from the operator (`hub enroll-token DEVICE`).
    #[arg(long, env = "OUTPOST_ENROLL_TOKEN")]
    token: String,
    /// The hub CA's certificate from the operator (`hub ca`); without it, the one at tls-ca.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
}

pub async fn run(config: &Config, args: EnrollArgs) -> anyhow::Result<()> {
    let paths = config.identity_paths();
    let ca_path = args.ca_cert.as_ref().unwrap_or(&paths.ca);
    let ca = std::fs::read(ca_path).with_context(|| {
        format!("cannot read the hub's CA certificate {ca_path:?}: pass --ca-cert with the file `hub ca` prints")
    })?;
    identity::enroll(&args.hub_url, &args.token, &ca, &config.device_id, &paths).await?;
    println!(
        "enrolled as {}: key {:?}, certificate {:?}, hub CA {:?}",
        config.device_id, paths.key, paths.cert, paths.ca
    );
    Ok(())
}
