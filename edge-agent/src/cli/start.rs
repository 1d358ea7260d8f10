use crate::runtime::Supervisor;

#[derive(clap::Args)]
pub struct StartArgs {
    name: String,
}

pub fn run(supervisor: &Supervisor, args: StartArgs) -> anyhow::Result<()> {
    let pid = supervisor.start(&supervisor.resolve(&args.name)?)?;
    println!("{}: running (pid {pid})", args.name);
    Ok(())
}
