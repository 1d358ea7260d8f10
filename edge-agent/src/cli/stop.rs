use crate::runtime::Supervisor;

#[derive(clap::Args)]
pub struct StopArgs {
    name: String,
}

pub fn run(supervisor: &Supervisor, args: StopArgs) -> anyhow::Result<()> {
    let info = supervisor.stop(&supervisor.resolve(&args.name)?)?;
    let exit = info
        .status
        .as_ref()
        .and_then(|s| s.last_exit.as_ref())
        .map(|e| format!(" ({})", e.describe()))
        .unwrap_or_default();
    println!("{}: {}{exit}", args.name, info.state);
    Ok(())
}
