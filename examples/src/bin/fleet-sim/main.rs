//! FLEET SIMULATOR: many SIMULATED devices against one real hub, to measure
//! how the hub copes with a fleet. The devices are testkit's simulated fleet
//! (testkit/src/fleet): light MQTT clients in this one process (rumqttc, one
//! tokio task each) that follow the sync protocol as the edge-agent does, in
//! front of a simulated runtime that runs nothing. No containers, no agents;
//! the hub (and mosquitto) are the real programs.
//!
//! Two benchmarks, each run with the embedded broker, mosquitto, or both:
//! - `fleet-sim` (issue 4): a new desired state for every device, one PUT
//!   each; see sync.rs.
//! - `fleet-sim rollout` (issue 5): one deployment rolled out to every
//!   device in one 100 % wave; see rollout.rs.
//!
//! usage: fleet-sim [rollout] [--devices N] [--hub PATH] [--broker embedded|mosquitto|both]
//!                  [--connect-burst K] [--put-concurrency C] [--timeout SECONDS]

mod processes;
mod rollout;
mod stage;
mod sync;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

const USAGE: &str = "usage: fleet-sim [rollout] [--devices N] [--hub PATH] [--broker embedded|mosquitto|both] \
                     [--connect-burst K] [--put-concurrency C] [--timeout SECONDS]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One desired state per device (issue 4).
    Sync,
    /// One deployment to the whole fleet (issue 5).
    Rollout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Embedded,
    Mosquitto,
}

pub struct Args {
    mode: Mode,
    pub devices: usize,
    pub hub: PathBuf,
    brokers: Vec<Broker>,
    /// Devices connecting at once; the others wait for one of them to get its CONNACK.
    pub connect_burst: usize,
    /// HTTP requests at once, when the simulator sets something on every device.
    pub put_concurrency: usize,
    /// For each phase (connect, sync).
    pub timeout: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        mode: Mode::Sync,
        devices: 10_000,
        hub: PathBuf::from("target/release/hub"),
        brokers: vec![Broker::Embedded, Broker::Mosquitto],
        connect_burst: 200,
        // An operator's script setting a whole fleet would do it in parallel;
        // the hub shares one store flush among the PUTs that wait for it.
        put_concurrency: 32,
        timeout: Duration::from_secs(300),
    };
    let mut it = std::env::args().skip(1).peekable();
    if it.peek().map(String::as_str) == Some("rollout") {
        it.next();
        args.mode = Mode::Rollout;
    }
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value; {USAGE}"));
        let number = |text: String| text.parse::<usize>().with_context(|| format!("{flag} takes a number"));
        match flag.as_str() {
            "--devices" => args.devices = number(value()?)?,
            "--hub" => args.hub = value()?.into(),
            "--broker" => {
                args.brokers = match value()?.as_str() {
                    "embedded" => vec![Broker::Embedded],
                    "mosquitto" => vec![Broker::Mosquitto],
                    "both" => vec![Broker::Embedded, Broker::Mosquitto],
                    other => bail!("--broker {other}: embedded, mosquitto or both"),
                }
            }
            "--connect-burst" => args.connect_burst = number(value()?)?.max(1),
            "--put-concurrency" => args.put_concurrency = number(value()?)?.max(1),
            "--timeout" => args.timeout = Duration::from_secs(number(value()?)? as u64),
            other => bail!("unknown argument {other}; {USAGE}"),
        }
    }
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if !args.hub.exists() {
        bail!("no hub at {} (cargo build --release -p hub, or give --hub PATH)", args.hub.display());
    }
    Ok(args)
}

/// Each device holds a socket here and the broker holds the other end; the
/// hub and mosquitto inherit this limit.
fn raise_open_files(devices: usize) -> anyhow::Result<()> {
    let want = (devices + 1024) as libc::rlim_t;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if limit.rlim_cur >= want {
        return Ok(());
    }
    let raised = libc::rlimit { rlim_cur: want, rlim_max: limit.rlim_max.max(want) };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        bail!(
            "{devices} devices need {want} open files, and the limit is {} (hard {}): {} (raising the hard limit needs root)",
            limit.rlim_cur,
            limit.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    raise_open_files(args.devices)?;
    match args.mode {
        Mode::Sync => {
            let mut all = Vec::new();
            for &broker in &args.brokers {
                eprintln!("== {} simulated devices, broker: {}", args.devices, name(broker));
                let figures = sync::run(&args, broker).await?;
                sync::print(&figures);
                all.push(figures);
            }
            sync::print_table(&all);
        }
        Mode::Rollout => {
            let mut all = Vec::new();
            for &broker in &args.brokers {
                eprintln!("== rollout to {} simulated devices, broker: {}", args.devices, name(broker));
                let figures = rollout::run(&args, broker).await?;
                rollout::print(&figures);
                all.push(figures);
            }
            rollout::print_table(&all);
        }
    }
    Ok(())
}

pub fn name(broker: Broker) -> &'static str {
    match broker {
        Broker::Embedded => "embedded (rumqttd)",
        Broker::Mosquitto => "mosquitto",
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.0} MB", kib as f64 / 1024.0)
}

pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
