use crate::runtime::health::Health;
use crate::runtime::Supervisor;

#[derive(clap::Args)]
pub struct PsArgs {
    /// One JSON array, for scripts.
    #[arg(long)]
    json: bool,
}

pub fn run(supervisor: &Supervisor, args: PsArgs) -> anyhow::Result<()> {
    let workloads = supervisor.list();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&workloads)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<11} {:<10} {:>7} {:>8}  {:<26} IMAGE",
        "NAME", "STATE", "HEALTH", "PID", "RESTARTS", "LAST EXIT"
    );
    for w in workloads {
        let status = w.status.as_ref();
        let health = match status.map(|s| s.health) {
            Some(Health::None) | None => "-".to_string(),
            Some(h) => serde_json::to_value(h)?.as_str().unwrap_or_default().to_string(),
        };
        let pid = status.and_then(|s| s.pid).map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let restarts = status.map(|s| s.restarts).unwrap_or(0);
        let exit = status.and_then(|s| s.last_exit.as_ref()).map(|e| e.describe()).unwrap_or_else(|| "-".into());
        println!("{:<20} {:<11} {:<10} {:>7} {:>8}  {:<26} {}", w.name, w.state, health, pid, restarts, exit, w.image);
    }
    Ok(())
}
