//! What both benchmarks start from: the hub (with mosquitto as its broker,
//! or its own), the simulated fleet connected and online in the hub's view,
//! and the memory sampler running; and the waits and requests they measure with.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;
use tempfile::TempDir;
use testkit::fleet::{FailureScript, FleetOptions, SimSpec, SimulatedFleet};
use tokio::task::JoinSet;

use crate::processes::{Hub, HubBroker, MemorySampler, Mosquitto, Process};
use crate::{mib, name, secs, Args, Broker};

/// How often the hub's view is read: the resolution of the times measured
/// through it. Each read lists the whole fleet, which costs the hub too.
pub const VIEW_POLL: Duration = Duration::from_millis(250);
/// How often the simulator's own counts are read.
const FLEET_POLL: Duration = Duration::from_millis(10);

pub struct Stage {
    broker: Broker,
    pub hub: Hub,
    pub mosquitto: Option<Mosquitto>,
    pub fleet: SimulatedFleet,
    pub devices: Vec<SimSpec>,
    pub http: reqwest::Client,
    sampler: MemorySampler,
    /// From the first connection attempt until every device had its CONNACK.
    pub connected: Duration,
    /// ...until the hub's view showed every device online.
    pub online: Duration,
    /// Holds the hub's store and logs until the end of the run.
    _dir: TempDir,
}

/// What both benchmarks measure around their own figures.
pub struct Frame {
    pub broker: Broker,
    pub devices: usize,
    /// From the first connection attempt until every device had its CONNACK.
    pub connected: Duration,
    /// ...until the hub's view showed every device online.
    pub online: Duration,
    pub connection_errors: usize,
    /// Peak sampled VmRSS and VmHWM of the hub, in KiB.
    pub hub_memory: (u64, u64),
    /// ...and of mosquitto.
    pub mosquitto_memory: Option<(u64, u64)>,
}

impl Frame {
    pub fn print_head(&self) {
        println!("broker                         {}", name(self.broker));
        println!("simulated devices              {}", self.devices);
        println!("all connected (CONNACK)        {}", secs(self.connected));
        println!("all online in the hub's view   {}", secs(self.online));
        println!("connection errors (retried)    {}", self.connection_errors);
    }

    pub fn print_memory(&self) {
        let (rss, hwm) = self.hub_memory;
        println!("hub peak RSS                   {} sampled, {} VmHWM", mib(rss), mib(hwm));
        if let Some((rss, hwm)) = self.mosquitto_memory {
            println!("mosquitto peak RSS             {} sampled, {} VmHWM", mib(rss), mib(hwm));
        }
    }

    /// mosquitto's peak RSS for a table cell.
    pub fn mosquitto_cell(&self) -> String {
        self.mosquitto_memory.map_or("-".to_string(), |(rss, _)| mib(rss))
    }
}

/// What the simulator reads of the hub's device objects (docs/hub-api.md).
#[derive(Deserialize)]
pub struct View {
    pub online: bool,
    pub generation: Option<u64>,
}

impl Stage {
    pub async fn start(args: &Args, broker: Broker, script: FailureScript) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("outpost-fleet-sim-").tempdir()?;
        let devices = SimSpec::numbered(args.devices);
        let tokens: Vec<(String, String)> = devices.iter().map(|d| (d.id.clone(), d.token.clone())).collect();
        let mosquitto = match broker {
            Broker::Mosquitto => Some(Mosquitto::start(dir.path(), &tokens)?),
            Broker::Embedded => None,
        };
        let hub_broker = match &mosquitto {
            Some(m) => HubBroker::External { port: m.port, password: m.hub_password.clone() },
            None => HubBroker::Embedded { devices: tokens },
        };
        let hub = Hub::start(&args.hub, dir.path(), hub_broker)?;
        let sampler = MemorySampler::start(
            std::iter::once(&hub.process).chain(mosquitto.iter().map(|m| &m.process)).map(|p| p.pid()).collect(),
        );
        let hub_log = || hub.process.log_tail();
        let http = reqwest::Client::builder().timeout(args.timeout).build()?;
        let api = format!("http://{}/v1/devices", hub.api);

        let start = Instant::now();
        // The first device alone: once the hub's view shows it, the hub has
        // subscribed, and nothing the others send goes unheard.
        let options = FleetOptions { connect_burst: args.connect_burst, ..FleetOptions::default() };
        let mut fleet = SimulatedFleet::start_with(hub.mqtt, devices[..1].to_vec(), script, options);
        let online_count = |views: &[View]| views.iter().filter(|v| v.online).count();
        wait_view(&http, &api, "the first device online", 1, online_count, args.timeout).await.with_context(hub_log)?;
        fleet.add(devices[1..].to_vec());
        let n = args.devices;
        let connected =
            wait_fleet("connected", n, start, args.timeout, || fleet.connected()).await.with_context(hub_log)?;
        wait_view(&http, &api, "online in the hub's view", n, online_count, args.timeout)
            .await
            .with_context(hub_log)?;
        let online = start.elapsed();
        Ok(Self { broker, hub, mosquitto, fleet, devices, http, sampler, connected, online, _dir: dir })
    }

    pub fn hub_log(&self) -> String {
        self.hub.process.log_tail()
    }

    /// Stops sampling, then the hub first, so that it does not process the
    /// fleet's last wills, then the fleet and mosquitto.
    pub async fn stop(self) -> Frame {
        let peaks = self.sampler.stop();
        let hwm = |p: &Process| p.vm_hwm_kib().unwrap_or(0);
        let frame = Frame {
            broker: self.broker,
            devices: self.devices.len(),
            connected: self.connected,
            online: self.online,
            connection_errors: self.fleet.connection_errors(),
            hub_memory: (peaks[0], hwm(&self.hub.process)),
            mosquitto_memory: self.mosquitto.as_ref().map(|m| (peaks[1], hwm(&m.process))),
        };
        drop(self.hub);
        self.fleet.stop().await;
        drop(self.mosquitto);
        frame
    }
}

/// Waits until the simulator's own `count` reaches `target`; the time since `since`.
pub async fn wait_fleet(
    what: &str,
    target: usize,
    since: Instant,
    timeout: Duration,
    count: impl Fn() -> usize,
) -> anyhow::Result<Duration> {
    let mut said = Instant::now();
    loop {
        let count = count();
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
        tokio::time::sleep(FLEET_POLL).await;
    }
}

/// Reads the hub's view of the fleet until `count` of it reaches `target`.
pub async fn wait_view(
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

/// PUTs each (url, JSON body), `concurrency` at a time, counting the `answered` ones.
pub async fn put_all(
    http: reqwest::Client,
    requests: Vec<(String, String)>,
    concurrency: usize,
    answered: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (http, requests, next, answered) = (http.clone(), requests.clone(), next.clone(), answered.clone());
        workers.spawn(async move {
            while let Some((url, body)) = requests.get(next.fetch_add(1, Ordering::Relaxed)) {
                let response =
                    http.put(url).header("content-type", "application/json").body(body.clone()).send().await?;
                let status = response.status();
                if !status.is_success() {
                    bail!("PUT {url}: {status} {}", response.text().await.unwrap_or_default());
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(worker) = workers.join_next().await {
        worker??;
    }
    Ok(())
}
