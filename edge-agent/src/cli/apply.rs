use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use outpost_proto::DesiredState;

use crate::config::Config;
use crate::control::{self, Request, Response};
use crate::daemon::{self, Core};
use crate::runtime::supervisor::require_root;
use crate::runtime::Supervisor;
use crate::store::Store;

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The desired-state document (TOML, or JSON); see docs/desired-state.md.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
}

pub fn run(config: &Config, supervisor: Supervisor, args: ApplyArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let state = DesiredState::parse(&text).with_context(|| format!("{} was refused", args.file.display()))?;
    require_root()?;
    let generation = state.generation;
    match control::call(&config.run_dir, &Request::Apply(state.clone())).context("cannot talk to the running agent")? {
        Some(Response::Applied { changed: true, .. }) => {
            println!("generation {generation} applied; the agent is converging (see `edge-agent ps`)")
        }
        Some(Response::Applied { changed: false, .. }) => println!("generation {generation} was already applied"),
        Some(Response::Error(e)) => bail!("{} was refused: {e}", args.file.display()),
        Some(other) => bail!("the agent answered {other:?}"),
        None => apply_without_daemon(config, supervisor, &state)?,
    }
    Ok(())
}

/// No daemon runs (a device being set up by hand, or from a USB stick):
/// store the document and converge once, here.
fn apply_without_daemon(config: &Config, supervisor: Supervisor, state: &DesiredState) -> anyhow::Result<()> {
    let (store, _) = Store::open(&config.data_dir.join("store"), config.store_cache.0)
        .context("cannot open the agent's store (is a daemon starting?)")?;
    let store = Arc::new(store);
    match daemon::apply(&store, &config.trust_root, state) {
        Ok(true) => println!("generation {} applied (no agent running: converging once now)", state.generation),
        Ok(false) => println!("generation {} was already applied; converging", state.generation),
        Err(e) => bail!("refused: {e}"),
    }
    let mut core = Core::new(store, supervisor, config.pull_options(), config.trust_root.clone());
    while core.pass() {}
    Ok(())
}
