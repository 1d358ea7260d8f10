use std::fs::File;
use std::os::fd::FromRawFd;

use anyhow::Context;
use nix::unistd::{fork, setsid, ForkResult};

use crate::runtime::{shim, Paths};

#[derive(clap::Args)]
pub struct ShimArgs {
    #[arg(long)]
    name: String,
    /// Inherited pipe on which to report the first start.
    #[arg(long)]
    ready_fd: Option<i32>,
}

pub fn run(paths: Paths, args: ShimArgs) -> anyhow::Result<()> {
    // Fork before any thread exists: the parent exits at once so the agent
    // can reap it, and the child lives on in a session of its own, untouched
    // by whatever happens to the agent or its terminal.
    // SAFETY: the process is single-threaded here.
    if let ForkResult::Parent { .. } = unsafe { fork() }.context("cannot fork the shim")? {
        std::process::exit(0);
    }
    setsid().context("cannot start a session for the shim")?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(std::io::stderr).init();
    // SAFETY: the agent passed this descriptor open for us alone.
    let ready = args.ready_fd.map(|fd| unsafe { File::from_raw_fd(fd) });
    shim::run(paths, &args.name, ready).with_context(|| format!("shim of `{}`", args.name))
}
