//! Subcommands, one file each: `serve`, `config`, and the operator commands
//! that talk to a running hub over its HTTP API. `anyhow` lives here, at the
//! edge; the library's errors are typed.

mod approval;
mod artifact;
mod client;
mod config;
mod deployments;
mod devices;
mod events;
mod hold;
mod identity;
mod label;
mod logs;
mod mosquitto_acl;
mod restart;
mod rollout;
mod serve;
mod set_desired;
mod watch;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use client::ApiClient;

#[derive(Parser)]
#[command(name = "hub", version, about = "Outpost hub: MQTT broker, device registry and desired states for a fleet")]
pub struct Cli {
    /// The hub's HTTP API, for the operator commands.
    #[arg(long, global = true, env = "OUTPOST_HUB_URL", default_value = "http://127.0.0.1:8080")]
    pub hub_url: String,
    /// The hub CA's certificate (`hub ca` prints it), for an https:// hub URL.
    #[arg(long, global = true, env = "OUTPOST_HUB_CA")]
    pub hub_ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the hub: broker, registry, HTTP API.
    Serve(serve::Args),
    /// The configuration file.
    #[command(subcommand)]
    Config(config::Command),
    /// List the devices.
    Devices(devices::Args),
    /// Set or remove a device's labels.
    Label(label::Args),
    /// Set a device's desired state from a file (TOML or JSON).
    SetDesired(set_desired::Args),
    /// Follow a device until it runs its desired state.
    Watch(watch::Args),
    /// Apply a fleet deployment from a file (TOML, YAML or JSON): a new
    /// revision when it changed, rolled out in waves.
    Apply(deployments::ApplyArgs),
    /// List the fleet deployments and their rollouts.
    Deployments(deployments::ListArgs),
    /// Show, delete, or list the revisions of a deployment.
    #[command(subcommand)]
    Deployment(deployments::Command),
    /// Watch, pause, resume, abort or roll back a deployment's rollout.
    #[command(subcommand)]
    Rollout(rollout::Command),
    /// On a site hub: pause or roll back the parent's rollout of a deployment at this site.
    #[command(subcommand)]
    Hold(hold::Command),
    /// On a site hub: list the holds on the parent's rollouts.
    Holds(hold::ListArgs),
    /// Restart a workload on a device.
    Restart(restart::Args),
    /// List a device's events as this hub stored them.
    Events(events::Args),
    /// Print a workload's last log lines, asked from the device.
    Logs(logs::Args),
    /// List the devices held for approval (unknown-devices = "hold").
    Pending(approval::PendingArgs),
    /// Let a held device in, with the token it presented.
    Approve(approval::DeviceArgs),
    /// Forget a held device's request.
    Reject(approval::DeviceArgs),
    /// Push or list update artifacts in the hub's site cache.
    #[command(subcommand)]
    Artifact(artifact::Command),
    /// Push signed update metadata (TUF) for devices to fetch.
    #[command(subcommand)]
    Tuf(artifact::TufCommand),
    /// Print the ACL file for an external mosquitto: each device may use only its own topics.
    MosquittoAcl(mosquitto_acl::Args),
    /// Print the hub CA's certificate, which devices and operators trust the hub by.
    Ca(identity::CaArgs),
    /// Make a one-time token with which a device enrolls (gets its certificate).
    EnrollToken(identity::EnrollTokenArgs),
    /// Sign a device's certificate from its CSR, without the device online (factory provisioning).
    IssueCert(identity::IssueCertArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn")))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let client = || ApiClient::new(&cli.hub_url, cli.hub_ca.as_deref());
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Config(command) => config::run(command),
            Command::Devices(args) => devices::run(&client()?, args).await,
            Command::Label(args) => label::run(&client()?, args).await,
            Command::SetDesired(args) => set_desired::run(&client()?, args).await,
            Command::Watch(args) => watch::run(&client()?, args).await,
            Command::Apply(args) => deployments::apply(&client()?, args).await,
            Command::Deployments(args) => deployments::list(&client()?, args).await,
            Command::Deployment(command) => deployments::run(&client()?, command).await,
            Command::Rollout(command) => rollout::run(&client()?, command).await,
            Command::Hold(command) => hold::run(&client()?, command).await,
            Command::Holds(args) => hold::list(&client()?, args).await,
            Command::Restart(args) => restart::run(&client()?, args).await,
            Command::Events(args) => events::run(&client()?, args).await,
            Command::Logs(args) => logs::run(&client()?, args).await,
            Command::Pending(args) => approval::pending(&client()?, args).await,
            Command::Approve(args) => approval::approve(&client()?, args).await,
            Command::Reject(args) => approval::reject(&client()?, args).await,
            Command::Artifact(command) => artifact::run(&client()?, command).await,
            Command::Tuf(command) => artifact::run_tuf(&client()?, command).await,
            Command::MosquittoAcl(args) => mosquitto_acl::run(args),
            Command::Ca(args) => identity::ca(args),
            Command::EnrollToken(args) => identity::enroll_token(&client()?, args).await,
            Command::IssueCert(args) => identity::issue_cert(args),
        }
    })
}

/// Rows under a header, each column as wide as its widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
