use anyhow::{bail, Context};
use outpost_proto::Event;

use crate::config::Config;
use crate::control::{self, Request, Response};
use crate::store::Store;

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Only events with a sequence number above this.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// One JSON array, for scripts.
    #[arg(long)]
    json: bool,
}

pub fn run(config: &Config, args: EventsArgs) -> anyhow::Result<()> {
    let events: Vec<Event> = match control::call(&config.run_dir, &Request::Events { after: args.after })
        .context("cannot talk to the running agent")?
    {
        Some(Response::Events(events)) => events,
        Some(Response::Error(e)) => bail!("{e}"),
        Some(other) => bail!("the agent answered {other:?}"),
        None => {
            let (store, _) = Store::open(&config.data_dir.join("store"), config.store_cache.0)
                .context("cannot open the agent's store")?;
            store.events_after(args.after, usize::MAX)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&events)?);
        return Ok(());
    }
    for event in events {
        let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(event.at));
        let detail = serde_json::to_value(&event.kind)?;
        println!("{:>6} {at} {detail}", event.seq);
    }
    Ok(())
}
