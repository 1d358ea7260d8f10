use anyhow::{bail, Context};

use crate::config::Config;
use crate::control::{self, Request, Response};
use crate::runtime::supervisor::require_root;
use crate::store::Store;
use crate::update::fetch::Updater;
use crate::update::AgentSlots;

#[derive(clap::Args)]
pub struct UpdateArgs {
    /// The target to install, as named in the hub's signed targets metadata.
    #[arg(long, required_unless_present = "status")]
    target: Option<String>,
    /// Show which slot the agent runs from and whether an update waits for its verdict.
    #[arg(long, conflicts_with = "target")]
    status: bool,
    /// With --status: print JSON.
    #[arg(long, requires = "status")]
    json: bool,
}

pub fn run(config: &Config, args: UpdateArgs) -> anyhow::Result<()> {
    let agent = AgentSlots::new(&config.data_dir);
    if args.status {
        return status(&agent, args.json);
    }
    let target = args.target.expect("clap requires --target without --status");
    require_root()?;
    let request = Request::Update { target: target.clone() };
    match control::call(&config.run_dir, &request).context("cannot talk to the running agent")? {
        Some(Response::Updating { version, slot, .. }) => {
            println!("{target} {version} installed in slot {slot}; the agent is restarting into it")
        }
        Some(Response::Error(e)) => bail!("update to {target} refused: {e}"),
        Some(other) => bail!("the agent answered {other:?}"),
        None => {
            // No daemon: install here; the next `edge-agent daemon` starts it.
            let (store, _) = Store::open(&config.data_dir.join("store"), config.store_cache.0)
                .context("cannot open the agent's store (is a daemon starting?)")?;
            let updater = Updater::from_config(config, agent);
            let exe = std::env::current_exe().context("cannot find this agent's binary")?;
            let installed = super::block_on(updater.update(&store, &target, &exe))?
                .with_context(|| format!("update to {target} refused"))?;
            println!(
                "{target} {} installed in slot {}; it runs on trial at the next `edge-agent daemon`",
                installed.version, installed.slot
            );
        }
    }
    Ok(())
}

fn status(agent: &AgentSlots, json: bool) -> anyhow::Result<()> {
    let env = agent.env().context("cannot read the agent's boot environment")?;
    let pending = agent.pending().context("cannot read the pending agent update")?;
    if json {
        let value = serde_json::json!({
            "slot": env.map(|e| e.active.to_string()),
            "confirmed": env.map(|e| !e.upgrade_available),
            "bootcount": env.map(|e| e.bootcount),
            "pending": pending.map(|p| serde_json::json!({"target": p.target, "version": p.version, "slot": p.slot.to_string()})),
        });
        println!("{value}");
        return Ok(());
    }
    match env {
        None => println!("the installed binary runs: no agent update was ever installed"),
        Some(env) if env.upgrade_available => {
            println!("slot {}: on trial, boot {} of {}", env.active, env.bootcount, env.bootlimit)
        }
        Some(env) => println!("slot {}: confirmed", env.active),
    }
    Ok(())
}
