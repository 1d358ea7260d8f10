//! `hub watch DEVICE`: polls the hub until the device has stored its desired
//! generation and runs every workload of it, printing each change on the way.

use std::time::Duration;

use anyhow::bail;
use outpost_proto::DesiredState;
use tokio::time::Instant;

use super::client::{ApiClient, ClientError};
use crate::api::DeviceView;

#[derive(clap::Args)]
pub struct Args {
    device: String,
    /// Give up (and exit non-zero) after this long, e.g. "5m".
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// How often to ask the hub.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

pub async fn run(client: &ApiClient, args: Args) -> anyhow::Result<()> {
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut last = String::new();
    loop {
        // The hub going away for a moment (a restart) is part of what one watches.
        let summary = match fetch(client, &args.device).await {
            Ok((device, desired)) => {
                let (done, summary) = progress(&device, &desired);
                if done {
                    println!("{}: {summary}", args.device);
                    return Ok(());
                }
                summary
            }
            Err(e @ ClientError::Unreachable { .. }) => e.to_string(),
            Err(e) => return Err(e.into()),
        };
        if summary != last {
            println!("{}: {summary}", args.device);
            last = summary;
        }
        if deadline.is_some_and(|d| Instant::now() + args.interval > d) {
            bail!(
                "{} has not converged within {}: {last}",
                args.device,
                humantime::format_duration(args.timeout.unwrap_or_default())
            );
        }
        tokio::time::sleep(args.interval).await;
    }
}

async fn fetch(client: &ApiClient, id: &str) -> Result<(DeviceView, DesiredState), ClientError> {
    Ok((client.device(id).await?, client.desired(id).await?))
}

/// Whether the device runs its desired state, and where it is.
fn progress(device: &DeviceView, desired: &DesiredState) -> (bool, String) {
    let stored = match device.generation {
        Some(g) => format!("generation {g} of {} stored", desired.generation),
        None => format!("generation {} not stored yet", desired.generation),
    };
    let mut waiting = Vec::new();
    let mut workloads = Vec::new();
    for spec in desired.deployments.iter().flat_map(|d| &d.workloads) {
        match device.workloads.iter().find(|w| w.name == spec.name) {
            Some(w) => {
                workloads.push(format!("{} {}", w.name, w.state));
                if w.state != "running" {
                    waiting.push(&spec.name);
                }
            }
            None => {
                workloads.push(format!("{} not reported", spec.name));
                waiting.push(&spec.name);
            }
        }
    }
    let mut summary = stored;
    if !workloads.is_empty() {
        summary = format!("{summary}; {}", workloads.join(", "));
    }
    if device.stale {
        summary.push_str(" (the hub awaits a full report)");
    }
    let done = device.generation == Some(desired.generation) && waiting.is_empty() && !device.stale;
    if done {
        summary = format!("converged: {summary}");
    }
    (done, summary)
}

#[cfg(test)]
mod tests {
    use outpost_proto::sync::WorkloadReport;

    use super::*;

    fn desired() -> DesiredState {
        DesiredState::parse(
            "version = 1\ngeneration = 5\n[[deployments]]\nname = \"app\"\nrevision = 1\n\
             [[deployments.workloads]]\nname = \"web\"\nimage = \"web:1\"\n\
             [[deployments.workloads]]\nname = \"db\"\nimage = \"db:1\"\n",
        )
        .unwrap()
    }

    fn device(generation: u64, states: &[(&str, &str)]) -> DeviceView {
        DeviceView {
            id: "d".into(),
            labels: Default::default(),
            agent_version: String::new(),
            first_seen: None,
            last_seen: None,
            online: true,
            generation: Some(generation),
            desired_generation: Some(5),
            epoch: 0,
            report_seq: 1,
            event_seq: 0,
            store_reset_at: None,
            stale: false,
            workloads: states
                .iter()
                .map(|(name, state)| WorkloadReport {
                    name: name.to_string(),
                    deployment: None,
                    revision: None,
                    state: state.to_string(),
                    health: None,
                    restarts: 0,
                    last_exit: None,
                })
                .collect(),
            refused: None,
            site: None,
            site_local: Vec::new(),
        }
    }

    #[test]
    fn converged_needs_the_generation_stored_and_every_workload_running() {
        let (done, summary) = progress(&device(4, &[("web", "running"), ("db", "running")]), &desired());
        assert!(!done);
        assert_eq!(summary, "generation 4 of 5 stored; web running, db running");
        let (done, summary) = progress(&device(5, &[("web", "running")]), &desired());
        assert!(!done);
        assert_eq!(summary, "generation 5 of 5 stored; web running, db not reported");
        let (done, _) = progress(&device(5, &[("web", "running"), ("db", "backoff")]), &desired());
        assert!(!done);
        let (done, summary) = progress(&device(5, &[("web", "running"), ("db", "running")]), &desired());
        assert!(done);
        assert_eq!(summary, "converged: generation 5 of 5 stored; web running, db running");
        let stale = DeviceView { stale: true, ..device(5, &[("web", "running"), ("db", "running")]) };
        assert!(!progress(&stale, &desired()).0);
    }
}
