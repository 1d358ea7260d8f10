//! Issue 4's benchmark: connect every device, then set a new desired state
//! for each of them through the hub's HTTP API (one PUT per device, as the
//! API is) and time from the first PUT until `GET /v1/devices` shows every
//! device at the new generation. Resident memory is sampled all along.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use testkit::fleet::FailureScript;

use crate::stage::{put_all, wait_fleet, wait_view, Frame, Stage, View};
use crate::{mib, name, secs, Args, Broker};

const GENERATION: u64 = 1;

pub struct Figures {
    frame: Frame,
    /// From the first PUT until every PUT was answered.
    puts: Duration,
    /// From the first PUT until every device stored the new state, as the simulator saw it.
    stored: Duration,
    /// ...until the hub had acknowledged every device's report of it, as the simulator saw it.
    acknowledged: Duration,
    /// ...until the hub's view showed every device at the new generation: the headline figure.
    converged: Duration,
}

pub async fn run(args: &Args, broker: Broker) -> anyhow::Result<Figures> {
    let stage = Stage::start(args, broker, FailureScript::healthy()).await?;
    let n = args.devices;
    // One workload, as small as a real one: the devices report it running.
    let body = serde_json::json!({
        "version": 1,
        "generation": GENERATION,
        "deployments": [{
            "name": "fleet-sim",
            "revision": 1,
            "workloads": [{ "name": "demo", "image": "busybox:latest", "command": ["/bin/sleep", "infinity"] }],
        }],
    })
    .to_string();
    let api = stage.hub.api;
    let requests =
        stage.devices.iter().map(|d| (format!("http://{api}/v1/devices/{}/desired", d.id), body.clone())).collect();

    let first_put = Instant::now();
    let answered = Arc::new(AtomicUsize::new(0));
    let puts = async {
        put_all(stage.http.clone(), requests, args.put_concurrency, answered.clone()).await?;
        anyhow::Ok(first_put.elapsed())
    };
    let fleet_side = async {
        let fleet = &stage.fleet;
        let stored = wait_fleet("stored the new state", n, first_put, args.timeout, || fleet.stored(GENERATION));
        let stored = stored.await?;
        let acknowledged = wait_fleet("acknowledged", n, first_put, args.timeout, || fleet.acknowledged(GENERATION));
        anyhow::Ok((stored, acknowledged.await?))
    };
    let hub_side = async {
        let at_generation = |views: &[View]| views.iter().filter(|v| v.generation == Some(GENERATION)).count();
        let what = format!("at generation {GENERATION} in the hub's view");
        let devices = format!("http://{api}/v1/devices");
        wait_view(&stage.http, &devices, &what, n, at_generation, args.timeout)
            .await
            .with_context(|| format!("{} of {n} PUTs answered", answered.load(Ordering::Relaxed)))?;
        anyhow::Ok(first_put.elapsed())
    };
    let (puts, fleet_side, converged) = tokio::join!(puts, fleet_side, hub_side);
    let converged = converged.with_context(|| stage.hub_log())?;
    let puts = puts.context("setting the desired states")?;
    let (stored, acknowledged) = fleet_side?;

    let frame = stage.stop().await;
    Ok(Figures { frame, puts, stored, acknowledged, converged })
}

pub fn print(f: &Figures) {
    f.frame.print_head();
    println!("after the first PUT:");
    println!("  every PUT answered           {}", secs(f.puts));
    println!("  every device stored it       {}", secs(f.stored));
    println!("  every report acknowledged    {}", secs(f.acknowledged));
    println!("  every device at generation {GENERATION} in the hub's view: {}", secs(f.converged));
    f.frame.print_memory();
}

pub fn print_table(all: &[Figures]) {
    let Some(first) = all.first() else { return };
    println!(
        "\n| broker | simulated devices | all connected | all online in the hub's view | {} PUTs answered \
         | all at the new generation in the hub's view | hub peak RSS | mosquitto peak RSS |",
        first.frame.devices
    );
    println!("|---|---|---|---|---|---|---|---|");
    for f in all {
        let mosquitto = f.frame.mosquitto_cell();
        println!(
            "| {} | {} | {} | {} | {} | **{}** | {} | {mosquitto} |",
            name(f.frame.broker),
            f.frame.devices,
            secs(f.frame.connected),
            secs(f.frame.online),
            secs(f.puts),
            secs(f.converged),
            mib(f.frame.hub_memory.0),
        );
    }
}
