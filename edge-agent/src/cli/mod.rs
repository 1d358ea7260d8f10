//! Subcommands, one file each. `anyhow` with context lives here, at the edge;
//! the runtime's errors are typed.

mod gc;
mod images;
mod import;
mod logs;
mod ps;
mod pull;
mod rm;
mod run;
mod shim;
mod start;
mod stop;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_proto::ByteSize;

use crate::runtime::{Paths, RuntimeSettings, Supervisor};

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Outpost edge agent: runs OCI workloads on this device and keeps them running"
)]
pub struct Cli {
    /// Images, workloads, volumes and logs: kept across reboots.
    #[arg(long, global = true, env = "OUTPOST_DATA_DIR", default_value = "/var/lib/outpost")]
    pub data_dir: PathBuf,
    /// Runtime state of running workloads: a tmpfs that a reboot empties.
    #[arg(long, global = true, env = "OUTPOST_RUN_DIR", default_value = "/run/outpost")]
    pub run_dir: PathBuf,
    /// cgroup under which each workload's cgroup is made.
    #[arg(long, global = true, env = "OUTPOST_CGROUP_PARENT", default_value = "outpost")]
    pub cgroup_parent: String,
    /// Size at which a workload's log file is rotated.
    #[arg(long, global = true, default_value = "1MiB")]
    pub log_max_size: ByteSize,
    /// Log files kept per workload, the current one included.
    #[arg(long, global = true, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub log_files: u32,
    /// A registry reached over plain HTTP (host:port), e.g. a site cache on the LAN. Repeatable.
    #[arg(long = "insecure-registry", global = true, env = "OUTPOST_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a workload from a spec file (TOML or JSON), pulling its image if needed.
    Run(run::RunArgs),
    /// List workloads with their state.
    Ps(ps::PsArgs),
    /// Show a workload's output.
    Logs(logs::LogsArgs),
    /// Start a stopped workload again.
    Start(start::StartArgs),
    /// Stop a workload: SIGTERM, its grace period, then SIGKILL.
    Stop(stop::StopArgs),
    /// Stop a workload and delete it (its named volumes stay).
    Rm(rm::RmArgs),
    /// Pull an image from a registry; an interrupted download resumes where it stopped.
    Pull(pull::PullArgs),
    /// Import images from an OCI layout directory or archive (for sites with no link).
    Import(import::ImportArgs),
    /// List the images on this device.
    Images(images::ImagesArgs),
    /// Remove the images no workload uses.
    Gc(gc::GcArgs),
    /// The per-workload supervisor process; started by the agent, not by hand.
    #[command(hide = true)]
    Shim(shim::ShimArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = Paths::new(&cli.data_dir, &cli.run_dir);
    if let Command::Shim(args) = cli.command {
        return shim::run(paths, args);
    }
    init_logging();
    let settings = RuntimeSettings {
        cgroup_parent: cli.cgroup_parent.clone(),
        log_max_size: cli.log_max_size.0,
        log_files: cli.log_files,
        shim_binary: std::env::current_exe().context("cannot find the edge-agent binary to start shims from")?,
    };
    let supervisor = Supervisor::new(paths, settings);
    match cli.command {
        Command::Run(args) => run::run(&supervisor, &cli.insecure_registries, args),
        Command::Ps(args) => ps::run(&supervisor, args),
        Command::Logs(args) => logs::run(&supervisor, args),
        Command::Start(args) => start::run(&supervisor, args),
        Command::Stop(args) => stop::run(&supervisor, args),
        Command::Rm(args) => rm::run(&supervisor, args),
        Command::Pull(args) => block_on(pull::run(supervisor.paths(), &cli.insecure_registries, args))?,
        Command::Import(args) => import::run(supervisor.paths(), args),
        Command::Images(args) => images::run(supervisor.paths(), args),
        Command::Gc(args) => gc::run(supervisor.paths(), args),
        Command::Shim(_) => unreachable!("handled above"),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// A small runtime for the subcommands that talk to the network.
fn block_on<F: std::future::Future>(future: F) -> anyhow::Result<F::Output> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    Ok(runtime.block_on(future))
}
