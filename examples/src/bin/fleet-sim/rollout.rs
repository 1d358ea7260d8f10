//! Issue 5's benchmark: one revision rolled out to every simulated device in
//! one 100 % wave with no health wait (`min-healthy = "0s"`).
//!
//! Once every device is online, the simulator labels each one through the
//! hub's API (`PUT /v1/devices/{id}/labels`, one per device), then applies a
//! deployment selecting that label (`PUT /v1/deployments/{name}`) and times,
//! from that PUT, until the rollout's counts show every targeted device
//! `updated` (it acknowledged a desired state holding the revision) and then
//! `healthy`. The simulated devices hold every revision at once (their
//! failure script is empty), so `healthy` measures the hub, not a wait.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_proto::fleet::{Counts, RolloutState, Strategy, Wave};
use outpost_proto::DeploymentSpec;
use serde::Deserialize;
use testkit::fleet::FailureScript;

use crate::stage::{put_all, wait_fleet, Frame, Stage, VIEW_POLL};
use crate::{mib, name, secs, Args, Broker};

const DEPLOYMENT: &str = "fleet-sim-rollout";
const LABEL: (&str, &str) = ("fleet-sim", "rollout");

pub struct Figures {
    frame: Frame,
    /// Every device's labels set, one PUT each.
    labelled: Duration,
    /// From the deployment's PUT until it was answered.
    applied: Duration,
    /// ...until the simulator's devices all ran the revision.
    running: Duration,
    /// ...until the rollout counted every targeted device updated: the headline figure.
    updated: Duration,
    /// ...until it counted every one healthy.
    healthy: Duration,
}

/// What the simulator reads of `GET /v1/deployments/{name}`.
#[derive(Deserialize)]
struct Status {
    revision: u64,
    rollout: Rollout,
}

#[derive(Deserialize)]
struct Rollout {
    state: RolloutState,
    counts: Counts,
    reason: Option<String>,
}

fn deployment() -> DeploymentSpec {
    DeploymentSpec {
        name: DEPLOYMENT.into(),
        selector: BTreeMap::from([(LABEL.0.to_string(), LABEL.1.to_string())]),
        priority: 0,
        // The simulated devices do not wait for it: their script makes every revision healthy at once.
        rollback_window: Duration::from_secs(120),
        strategy: Strategy { waves: vec![Wave::Percent(100.0)], min_healthy: Duration::ZERO, ..Strategy::default() },
        // One workload, as small as a real one; pinned already, as the hub
        // would pin it (the simulated devices pull nothing).
        workloads: vec![serde_json::from_value(serde_json::json!({
            "name": "demo",
            "image": "busybox:latest@sha256:0000000000000000000000000000000000000000000000000000000000000001",
            "command": ["/bin/sleep", "infinity"],
        }))
        .expect("a valid workload")],
        update: None,
    }
}

pub async fn run(args: &Args, broker: Broker) -> anyhow::Result<Figures> {
    let stage = Stage::start(args, broker, FailureScript::healthy()).await?;
    let n = args.devices;
    let api = stage.hub.api;

    let labels = serde_json::json!({ LABEL.0: LABEL.1 }).to_string();
    let requests =
        stage.devices.iter().map(|d| (format!("http://{api}/v1/devices/{}/labels", d.id), labels.clone())).collect();
    let start = Instant::now();
    let answered = Arc::new(AtomicUsize::new(0));
    put_all(stage.http.clone(), requests, args.put_concurrency, answered.clone())
        .await
        .with_context(|| format!("labelling the devices: {} of {n} answered", answered.load(Ordering::Relaxed)))?;
    let labelled = start.elapsed();

    let url = format!("http://{api}/v1/deployments/{DEPLOYMENT}");
    let put = Instant::now();
    let response = stage.http.put(&url).json(&deployment()).send().await?;
    let status = response.status();
    if !status.is_success() {
        bail!("PUT {url}: {status} {}", response.text().await.unwrap_or_default());
    }
    let revision = response.json::<Status>().await.context("the deployment's status")?.revision;
    let applied = put.elapsed();

    let fleet = &stage.fleet;
    let fleet_side = wait_fleet("run the revision", n, put, args.timeout, || fleet.running(DEPLOYMENT, revision));
    let hub_side = wait_rollout(&stage.http, &url, n, put, args.timeout);
    let (running, hub_side) = tokio::join!(fleet_side, hub_side);
    let (updated, healthy) = hub_side.with_context(|| stage.hub_log())?;
    let running = running?;

    let frame = stage.stop().await;
    Ok(Figures { frame, labelled, applied, running, updated, healthy })
}

/// Reads the rollout's counts until every one of the `n` devices is
/// updated, then healthy; the times since `since`. A rollout that stops
/// (paused, rolled back, aborted) ends the run.
async fn wait_rollout(
    http: &reqwest::Client,
    url: &str,
    n: usize,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<(Duration, Duration)> {
    let mut updated = None;
    let mut said = Instant::now();
    loop {
        let status: Status = http.get(url).send().await?.error_for_status()?.json().await?;
        let (rollout, counts) = (&status.rollout, status.rollout.counts);
        if !matches!(rollout.state, RolloutState::Progressing | RolloutState::Complete) {
            bail!(
                "the rollout stopped: {:?} ({}); counts {counts:?}",
                rollout.state,
                rollout.reason.as_deref().unwrap_or("")
            );
        }
        if counts.targeted >= n && counts.updated >= n && updated.is_none() {
            updated = Some(since.elapsed());
        }
        if let Some(updated) = updated.filter(|_| counts.healthy >= n) {
            return Ok((updated, since.elapsed()));
        }
        if since.elapsed() > timeout {
            bail!("after {timeout:?}, the rollout to {n} devices counts {counts:?}");
        }
        if said.elapsed() > Duration::from_secs(5) {
            eprintln!("  {:>5.1} s: rollout {:?}, counts {counts:?}", since.elapsed().as_secs_f64(), rollout.state);
            said = Instant::now();
        }
        tokio::time::sleep(VIEW_POLL).await;
    }
}

pub fn print(f: &Figures) {
    f.frame.print_head();
    println!("every device labelled          {}", secs(f.labelled));
    println!("after the deployment's PUT (one 100 % wave, min-healthy 0s):");
    println!("  PUT answered                 {}", secs(f.applied));
    println!("  every device runs it         {}", secs(f.running));
    println!("  rollout: all updated         {}", secs(f.updated));
    println!("  rollout: all healthy         {}", secs(f.healthy));
    f.frame.print_memory();
}

pub fn print_table(all: &[Figures]) {
    let Some(first) = all.first() else { return };
    println!(
        "\n| broker | simulated devices | all online in the hub's view | {} label PUTs | deployment PUT answered \
         | all updated (acknowledged) | all healthy | hub peak RSS | mosquitto peak RSS |",
        first.frame.devices
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for f in all {
        let mosquitto = f.frame.mosquitto_cell();
        println!(
            "| {} | {} | {} | {} | {} | **{}** | {} | {} | {mosquitto} |",
            name(f.frame.broker),
            f.frame.devices,
            secs(f.frame.online),
            secs(f.labelled),
            secs(f.applied),
            secs(f.updated),
            secs(f.healthy),
            mib(f.frame.hub_memory.0),
        );
    }
}
