//! Bytes on a device's link, counted at a TCP proxy between a real agent and
//! a real hub (embedded broker): for one desired-state change of one workload
//! (down, and the reports and events back up), and per idle hour at the
//! default settings. Run for each payload encoding in the same invocation.
//!
//! usage (as root): bench-sync-bytes [--idle-seconds N]
//! The idle window is extrapolated to an hour: an idle device sends nothing
//! but MQTT pings, one per keep-alive.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use testkit::agent::Agent;
use testkit::hub::Hub;
use testkit::CuttingProxy;

const DEVICE: &str = "bench-device";
const TOKEN: &str = "bench-token";

fn document(generation: u64) -> String {
    // Signed by testkit's operator in `set_desired`: the image must be pinned.
    let image = testkit::image::busybox_pinned();
    format!(
        "version = 1\ngeneration = {generation}\n[[deployments]]\nname = \"app\"\nrevision = {generation}\n\
         [[deployments.workloads]]\nname = \"svc\"\nimage = \"{image}\"\ncommand = [\"/bin/sleep\", \"{}\"]\nstop-grace-period = \"100ms\"\n",
        600 + generation
    )
}

fn wait_generation(hub: &Hub, generation: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let device = hub.try_get(&format!("/v1/devices/{DEVICE}")).unwrap_or_default();
        let running = device.to_string().contains("\"running\"");
        if device["generation"].as_u64() == Some(generation) && running {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the device never reported generation {generation}: {device}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Figures {
    encoding: &'static str,
    change_down: u64,
    change_up: u64,
    idle_per_hour: f64,
}

fn measure(encoding: &'static str, idle: Duration) -> anyhow::Result<Figures> {
    let runtime = tokio::runtime::Runtime::new()?;
    let hub = Hub::new(&[(DEVICE, TOKEN)]);
    let proxy = runtime.block_on(CuttingProxy::start(hub.mqtt))?;
    let mut agent = Agent::new();
    testkit::import_busybox(&agent);
    // Defaults for everything that shapes traffic, but the encoding under test.
    agent.use_config(&format!(
        "device-id = \"{DEVICE}\"\nhub = \"mqtt://{}\"\nhub-token = \"{TOKEN}\"\nencoding = \"{encoding}\"\n",
        proxy.addr()
    ));
    agent.start_daemon();

    hub.set_desired(DEVICE, &document(1));
    wait_generation(&hub, 1)?;
    // Let acks and the last state changes settle before counting.
    std::thread::sleep(Duration::from_secs(6));

    let (down, up) = (proxy.downstream_bytes(), proxy.upstream_bytes());
    hub.set_desired(DEVICE, &document(2));
    wait_generation(&hub, 2)?;
    std::thread::sleep(Duration::from_secs(6));
    let (change_down, change_up) = (proxy.downstream_bytes() - down, proxy.upstream_bytes() - up);

    let before = proxy.downstream_bytes() + proxy.upstream_bytes();
    std::thread::sleep(idle);
    let idle_bytes = proxy.downstream_bytes() + proxy.upstream_bytes() - before;
    Ok(Figures { encoding, change_down, change_up, idle_per_hour: idle_bytes as f64 * 3600.0 / idle.as_secs_f64() })
}

fn main() -> anyhow::Result<()> {
    testkit::agent::require_root();
    let mut idle = Duration::from_secs(600);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--idle-seconds" => idle = Duration::from_secs(args.next().context("--idle-seconds N")?.parse()?),
            other => bail!("unknown flag {other}; usage: bench-sync-bytes [--idle-seconds N]"),
        }
    }
    let figures = [measure("cbor", idle)?, measure("json", idle)?];
    println!("bytes on the device's link (MQTT payloads and headers, both directions; TCP/IP headers not counted)");
    println!("| encoding | one change, hub -> device | one change, device -> hub | idle, per hour |");
    println!("|---|---|---|---|");
    for f in &figures {
        println!("| {} | {} B | {} B | {:.0} B |", f.encoding, f.change_down, f.change_up, f.idle_per_hour);
    }
    Ok(())
}
