//! `hub config default`: the commented default configuration, to start from.

use clap::Subcommand;

use crate::config::DEFAULT_CONFIG;

#[derive(Subcommand)]
pub enum Command {
    /// Print the default configuration, every key commented.
    Default,
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Default => print!("{DEFAULT_CONFIG}"),
    }
    Ok(())
}
