//! Subcommands, one file each. `anyhow` with context lives here, at the edge;
//! the runtime's errors are typed.

mod apply;
mod config;
mod daemon;
mod enroll;
mod events;
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
mod update;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_proto::ByteSize;

use crate::config::Config;
use crate::runtime::{Paths, RuntimeSettings, Supervisor};

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Outpost edge agent: runs OCI workloads on this device and keeps them running"
)]
pub struct Cli {
    /// The agent's configuration (see `edge-agent config default`); /etc/outpost/agent.toml when it exists.
    #[arg(long, global = true, env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Images, workloads, volumes, the store and logs: kept across reboots.
    #[arg(long, global = true, env = "OUTPOST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Runtime state of running workloads: a tmpfs that a reboot empties.
    #[arg(long, global = true, env = "OUTPOST_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// cgroup under which each workload's cgroup is made.
    #[arg(long, global = true, env = "OUTPOST_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// Size at which a workload's log file is rotated.
    #[arg(long, global = true)]
    pub log_max_size: Option<ByteSize>,
    /// Log files kept per workload, the current one included.
    #[arg(long, global = true)]
    pub log_files: Option<u32>,
    /// A registry reached over plain HTTP (host:port), e.g. a site cache on the LAN. Repeatable.
    #[arg(long = "insecure-registry", global = true, env = "OUTPOST_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The configuration file (or the defaults) with the command line on top.
    fn resolve_config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(dir) = &self.run_dir {
            config.run_dir = dir.clone();
        }
        if let Some(parent) = &self.cgroup_parent {
            config.cgroup_parent = parent.clone();
        }
        if let Some(size) = self.log_max_size {
            config.log_max_size = size;
        }
        if let Some(files) = self.log_files {
            config.log_files = files;
        }
        config.insecure_registries.extend(self.insecure_registries.iter().cloned());
        config.validate()?;
        Ok(config)
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Keep this device converged on its desired state (the long-running agent).
    Daemon,
    /// Apply a desired-state document from a file: through the running daemon, or directly when none runs.
    Apply(apply::ApplyArgs),
    /// Get this device's certificate from the hub with a one-time token (for an mqtts:// hub).
    Enroll(enroll::EnrollArgs),
    /// The device's events: applied, revision started, healthy, failed, rolled back.
    Events(events::EventsArgs),
    /// The agent's configuration.
    #[command(subcommand)]
    Config(config::ConfigCommand),
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
    /// Update the agent itself from the hub's signed targets (A/B slots, rolled back unless healthy).
    Update(update::UpdateArgs),
    /// The per-workload supervisor process; started by the agent, not by hand.
    #[command(hide = true)]
    Shim(shim::ShimArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Config(command) = cli.command {
        return config::run(command);
    }
    let config = cli.resolve_config()?;
    let paths = Paths::new(&config.data_dir, &config.run_dir);
    if let Command::Shim(args) = cli.command {
        return shim::run(paths, args);
    }
    init_logging();
    let settings = RuntimeSettings {
        cgroup_parent: config.cgroup_parent.clone(),
        log_max_size: config.log_max_size.0,
        log_files: config.log_files,
        shim_binary: std::env::current_exe().context("cannot find the edge-agent binary to start shims from")?,
    };
    let supervisor = Supervisor::new(paths, settings);
    let pulls = config.pull_options();
    match cli.command {
        Command::Daemon => daemon::run(&config, supervisor),
        Command::Apply(args) => apply::run(&config, supervisor, args),
        Command::Events(args) => events::run(&config, args),
        Command::Enroll(args) => block_on(enroll::run(&config, args))?,
        Command::Run(args) => run::run(&supervisor, &pulls, args),
        Command::Ps(args) => ps::run(&supervisor, args),
        Command::Logs(args) => logs::run(&supervisor, args),
        Command::Start(args) => start::run(&supervisor, args),
        Command::Stop(args) => stop::run(&supervisor, args),
        Command::Rm(args) => rm::run(&supervisor, args),
        Command::Pull(args) => block_on(pull::run(supervisor.paths(), &pulls, args))?,
        Command::Import(args) => import::run(supervisor.paths(), args),
        Command::Images(args) => images::run(supervisor.paths(), args),
        Command::Gc(args) => gc::run(supervisor.paths(), args),
        Command::Update(args) => update::run(&config, args),
        Command::Config(_) | Command::Shim(_) => unreachable!("handled above"),
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
