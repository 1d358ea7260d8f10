//! FLEET SIMULATOR: many SIMULATED devices against one real hub, to measure
//! how the hub copes with a fleet (issue 4's benchmark). The devices are light
//! MQTT clients in this one process (rumqttc, one tokio task each) that follow
//! the sync protocol as the edge-agent does, but run nothing: see device.rs.
//! No containers, no agents; the hub (and mosquitto) are the real programs.
//!
//! One run: start the hub (and, for mosquitto, mosquitto as its external
//! broker), connect every device, then set a new desired state for each of
//! them through the hub's HTTP API (one PUT per device, as the API is today)
//! and time from the first PUT until `GET /v1/devices` shows every device at
//! the new generation. Resident memory is sampled all along.
//!
//! usage: fleet-sim [--devices N] [--hub PATH] [--broker embedded|mosquitto|both]
//!                  [--connect-burst K] [--put-concurrency C] [--timeout SECONDS]

mod device;
mod processes;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_proto::sync::Topics;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use device::Progress;
use processes::{Hub, HubBroker, MemorySampler, Mosquitto};

const USAGE: &str = "usage: fleet-sim [--devices N] [--hub PATH] [--broker embedded|mosquitto|both] \
                     [--connect-burst K] [--put-concurrency C] [--timeout SECONDS]";
/// How often the hub's view is read: the resolution of the times measured
/// through it. Each read lists the whole fleet, which costs the hub too.
const VIEW_POLL: Duration = Duration::from_millis(250);
const GENERATION: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broker {
    Embedded,
    Mosquitto,
}

struct Args {
    devices: usize,
    hub: PathBuf,
    brokers: Vec<Broker>,
    /// Devices connecting at once; the others wait for one of them to get its CONNACK.
    connect_burst: usize,
    put_concurrency: usize,
    /// For each phase (connect, sync).
    timeout: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        devices: 10_000,
        hub: PathBuf::from("target/release/hub"),
        brokers: vec![Broker::Embedded, Broker::Mosquitto],
        connect_burst: 200,
        // An operator's script setting a whole fleet would do it in parallel;
        // the hub shares one store flush among the PUTs that wait for it.
        put_concurrency: 32,
        timeout: Duration::from_secs(300),
    };
    let mut it = std::env::args().skip(1);
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
            other => bail!("unknown flag {other}; {USAGE}"),
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

/// What the simulator reads of the hub's device objects (docs/hub-api.md).
#[derive(Deserialize)]
struct View {
    online: bool,
    generation: Option<u64>,
}

struct Figures {
    broker: Broker,
    devices: usize,
    /// From the first connection attempt until every device had its CONNACK.
    connected: Duration,
    /// ...until the hub's view showed every device online.
    online: Duration,
    /// From the first PUT until every PUT was answered.
    puts: Duration,
    /// From the first PUT until every device stored the new state, as the simulator saw it.
    stored: Duration,
    /// ...until the hub had acknowledged every device's report of it, as the simulator saw it.
    acknowledged: Duration,
    /// ...until the hub's view showed every device at the new generation: the headline figure.
    converged: Duration,
    connection_errors: usize,
    /// Peak sampled VmRSS and VmHWM, in KiB.
    hub_memory: (u64, u64),
    mosquitto_memory: Option<(u64, u64)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    raise_open_files(args.devices)?;
    let mut all = Vec::new();
    for &broker in &args.brokers {
        eprintln!("== {} simulated devices, broker: {}", args.devices, name(broker));
        let figures = run(&args, broker).await?;
        print(&figures);
        all.push(figures);
    }
    println!(
        "\n| broker | simulated devices | all connected | all online in the hub's view | {} PUTs answered \
         | all at the new generation in the hub's view | hub peak RSS | mosquitto peak RSS |",
        args.devices
    );
    println!("|---|---|---|---|---|---|---|---|");
    for f in &all {
        let mosquitto = f.mosquitto_memory.map_or("-".to_string(), |(rss, _)| mib(rss));
        println!(
            "| {} | {} | {:.1} s | {:.1} s | {:.1} s | **{:.1} s** | {} | {mosquitto} |",
            name(f.broker),
            f.devices,
            f.connected.as_secs_f64(),
            f.online.as_secs_f64(),
            f.puts.as_secs_f64(),
            f.converged.as_secs_f64(),
            mib(f.hub_memory.0),
        );
    }
    Ok(())
}

fn name(broker: Broker) -> &'static str {
    match broker {
        Broker::Embedded => "embedded (rumqttd)",
        Broker::Mosquitto => "mosquitto",
    }
}

fn mib(kib: u64) -> String {
    format!("{:.0} MB", kib as f64 / 1024.0)
}

fn print(f: &Figures) {
    let s = |d: Duration| format!("{:.1} s", d.as_secs_f64());
    println!("broker                         {}", name(f.broker));
    println!("simulated devices              {}", f.devices);
    println!("all connected (CONNACK)        {}", s(f.connected));
    println!("all online in the hub's view   {}", s(f.online));
    println!("connection errors (retried)    {}", f.connection_errors);
    println!("after the first PUT:");
    println!("  every PUT answered           {}", s(f.puts));
    println!("  every device stored it       {}", s(f.stored));
    println!("  every report acknowledged    {}", s(f.acknowledged));
    println!("  every device at generation {GENERATION} in the hub's view: {}", s(f.converged));
    println!("hub peak RSS                   {} sampled, {} VmHWM", mib(f.hub_memory.0), mib(f.hub_memory.1));
    if let Some((rss, hwm)) = f.mosquitto_memory {
        println!("mosquitto peak RSS             {} sampled, {} VmHWM", mib(rss), mib(hwm));
    }
}

async fn run(args: &Args, broker: Broker) -> anyhow::Result<Figures> {
    let dir = tempfile::Builder::new().prefix("outpost-fleet-sim-").tempdir()?;
    let devices: Vec<(String, String)> =
        (0..args.devices).map(|i| (format!("sim-{i:05}"), format!("sim-token-{i:05}"))).collect();
    let mosquitto = match broker {
        Broker::Mosquitto => Some(Mosquitto::start(dir.path(), &devices)?),
        Broker::Embedded => None,
    };
    let hub_broker = match &mosquitto {
        Some(m) => HubBroker::External { port: m.port, password: m.hub_password.clone() },
        None => HubBroker::Embedded { devices: devices.clone() },
    };
    let hub = Hub::start(&args.hub, dir.path(), hub_broker)?;
    let sampler = MemorySampler::start(
        std::iter::once(&hub.process).chain(mosquitto.iter().map(|m| &m.process)).map(|p| p.pid()).collect(),
    );
    let hub_log = || hub.process.log_tail();
    let http = reqwest::Client::builder().timeout(args.timeout).build()?;
    let api = format!("http://{}/v1/devices", hub.api);
    let progress = Arc::new(Progress::default());
    let topics = Arc::new(Topics::default());
    let connecting = Arc::new(Semaphore::new(args.connect_burst));
    let mut fleet = JoinSet::new();
    let mut spawn = |i: usize, permit| {
        let (id, token) = devices[i].clone();
        let spec = device::Spec {
            id,
            token,
            host: hub.mqtt.ip().to_string(),
            port: hub.mqtt.port(),
            topics: topics.clone(),
            seed: i as u64 + 1,
        };
        fleet.spawn(device::run(spec, progress.clone(), permit));
    };

    let start = Instant::now();
    // The first device alone: once the hub's view shows it, the hub has
    // subscribed, and nothing the others send goes unheard.
    spawn(0, connecting.clone().acquire_owned().await?);
    let online_count = |views: &[View]| views.iter().filter(|v| v.online).count();
    wait_view(&http, &api, "the first device online", 1, online_count, args.timeout).await.with_context(hub_log)?;
    for i in 1..args.devices {
        spawn(i, connecting.clone().acquire_owned().await?);
    }
    let n = args.devices;
    let connected = wait_count("connected", &progress.connected, n, start, args.timeout).await.with_context(hub_log)?;
    wait_view(&http, &api, "online in the hub's view", n, online_count, args.timeout).await.with_context(hub_log)?;
    let online = start.elapsed();

    let first_put = Instant::now();
    let answered = Arc::new(AtomicUsize::new(0));
    let puts =
        tokio::spawn(put_desired(http.clone(), hub.api, devices, args.put_concurrency, answered.clone(), first_put));
    let fleet_side = {
        let (progress, timeout) = (progress.clone(), args.timeout);
        tokio::spawn(async move {
            let stored = wait_count("stored the new state", &progress.stored, n, first_put, timeout).await?;
            let acknowledged = wait_count("acknowledged", &progress.acknowledged, n, first_put, timeout).await?;
            anyhow::Ok((stored, acknowledged))
        })
    };
    let at_generation = |views: &[View]| views.iter().filter(|v| v.generation == Some(GENERATION)).count();
    let what = format!("at generation {GENERATION} in the hub's view");
    wait_view(&http, &api, &what, n, at_generation, args.timeout)
        .await
        .with_context(|| format!("{} of {n} PUTs answered", answered.load(Ordering::Relaxed)))
        .with_context(hub_log)?;
    let converged = first_put.elapsed();
    let puts = puts.await?.context("setting the desired states")?;
    let (stored, acknowledged) = fleet_side.await??;

    let peaks = sampler.stop();
    let hwm = |p: &processes::Process| p.vm_hwm_kib().unwrap_or(0);
    let figures = Figures {
        broker,
        devices: n,
        connected,
        online,
        puts,
        stored,
        acknowledged,
        converged,
        connection_errors: progress.connection_errors.load(Ordering::Relaxed),
        hub_memory: (peaks[0], hwm(&hub.process)),
        mosquitto_memory: mosquitto.as_ref().map(|m| (peaks[1], hwm(&m.process))),
    };
    // The hub first, so that it does not process the fleet's last wills.
    drop(hub);
    drop(fleet);
    Ok(figures)
}

/// Waits until `counter` reaches `target`; the time since `since`.
async fn wait_count(
    what: &str,
    counter: &AtomicUsize,
    target: usize,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let mut said = Instant::now();
    loop {
        let count = counter.load(Ordering::Relaxed);
        if count >= target {
            return Ok(since.elapsed());
        }
        if since.elapsed() > timeout {
            bail!("after {timeout:?}, only {count} of {target} simulated devices {what}");
        }
        if said.elapsed() > Duration::from_secs(5) {
            eprintln!("  {:>5.1} s: {count}/{target} simulated devices {what}", since.elapsed().as_secs_f64());
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads the hub's view of the fleet until `count` of it reaches `target`.
async fn wait_view(
    http: &reqwest::Client,
    api: &str,
    what: &str,
    target: usize,
    count: impl Fn(&[View]) -> usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut said = Instant::now();
    loop {
        let views: Vec<View> = http.get(api).send().await?.error_for_status()?.json().await?;
        let counted = count(&views);
        if counted >= target {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("after {timeout:?}, {counted} of {target} devices {what}");
        }
        if said.elapsed() > Duration::from_secs(5) {
            eprintln!("  {:>5.1} s: {counted}/{target} devices {what}", start.elapsed().as_secs_f64());
            said = Instant::now();
        }
        tokio::time::sleep(VIEW_POLL).await;
    }
}

/// `PUT /v1/devices/{id}/desired` for every device, `concurrency` at a
/// time, counting the `answered` ones; the time from `first` until the last answer.
async fn put_desired(
    http: reqwest::Client,
    api: std::net::SocketAddr,
    devices: Vec<(String, String)>,
    concurrency: usize,
    answered: Arc<AtomicUsize>,
    first: Instant,
) -> anyhow::Result<Duration> {
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
    let devices = Arc::new(devices);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (http, body, devices, next, answered) =
            (http.clone(), body.clone(), devices.clone(), next.clone(), answered.clone());
        workers.spawn(async move {
            while let Some((id, _)) = devices.get(next.fetch_add(1, Ordering::Relaxed)) {
                let response = http
                    .put(format!("http://{api}/v1/devices/{id}/desired"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = response.status();
                if !status.is_success() {
                    bail!("PUT the desired state of {id}: {status} {}", response.text().await.unwrap_or_default());
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(worker) = workers.join_next().await {
        worker??;
    }
    Ok(first.elapsed())
}
