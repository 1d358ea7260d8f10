use crate::runtime::Supervisor;

#[derive(clap::Args)]
pub struct RmArgs {
    #[arg(required = true)]
    names: Vec<String>,
}

pub fn run(supervisor: &Supervisor, args: RmArgs) -> anyhow::Result<()> {
    for name in &args.names {
        supervisor.remove(&supervisor.resolve(name)?)?;
        println!("{name}: removed");
    }
    Ok(())
}
