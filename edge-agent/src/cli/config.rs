use crate::config::Config;

#[derive(clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the default configuration, commented
    Default,
}

pub fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Default => print!("{}", Config::default_toml()),
    }
    Ok(())
}
