//! `hub mosquitto-acl`: the ACL file an external mosquitto needs so that each
//! device uses only its own topics (docs/identity.md).

use std::path::PathBuf;

use outpost_proto::sync::Topics;

use crate::config::Config;

#[derive(clap::Args)]
pub struct Args {
    /// The hub's configuration: its topic-prefix and broker-username go into the file.
    #[arg(long, short, env = "OUTPOST_HUB_CONFIG")]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    print!("{}", crate::acl::mosquitto_acl(&Topics::new(&config.topic_prefix), &config.broker_username));
    Ok(())
}
