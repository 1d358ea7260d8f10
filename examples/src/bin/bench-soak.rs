//! The agent on a small device: the release agent daemon (and so its shims)
//! inside a cgroup of 64 MiB and a quarter of a CPU, linked to a real hub on
//! loopback, running 10 workloads from signed desired states.
//!
//! 1. idle: 10 steady workloads; the daemon's resident memory (VmRSS);
//! 2. pulling: an 11th workload whose image (busybox and a 48 MiB layer)
//!    comes from a registry on loopback; the daemon's peak VmRSS meanwhile;
//! 3. soak: 10 workloads that change all the time (2 crash and are
//!    restarted, 2 answer exec health probes, 2 write logs that rotate, a
//!    new generation that restarts one every minute), with every interval
//!    compressed, for --minutes; the daemon's VmRSS each second.
//!
//! At the end: no OOM kill in the cgroup, the daemon still the same
//! process, and every event the device recorded stored at the hub exactly
//! once. The figures go to docs/benchmarks.md.
//!
//! usage (as root): bench-soak [--minutes M] [--agent PATH] [--quiet]
//!
//! --quiet: the soak's workloads only sleep, and no new generation comes:
//! what the agent costs when nothing happens, to tell a leak by cause.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use testkit::agent::Agent;
use testkit::constrained::Constrained;
use testkit::hub::Hub;
use testkit::image::{build_oci_layout, busybox_config, busybox_rootfs, Layer};
use testkit::soak::{
    churn, delivery, document, process_start, rss_kib, same_view, status_kib, steady, wait_generation, wait_running,
    workload,
};

const DEVICE: &str = "soak-1";
const TOKEN: &str = "soak-token";
const MEMORY: u64 = 64 << 20;
const CPUS: f64 = 0.25;
const LAYER: usize = 48 << 20;

fn main() -> anyhow::Result<()> {
    testkit::agent::require_root();
    let mut minutes = 10u64;
    let mut quiet = false;
    let mut binary = PathBuf::from("target/release/edge-agent");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => minutes = value()?.parse()?,
            "--quiet" => quiet = true,
            "--agent" => binary = value()?.into(),
            other => bail!("unknown flag {other}; usage: bench-soak [--minutes M] [--agent PATH] [--quiet]"),
        }
    }
    if !binary.exists() {
        bail!("needs edge-agent at {} (cargo build --release -p edge-agent)", binary.display());
    }
    let binary: &'static Path = Box::leak(std::fs::canonicalize(&binary)?.into_boxed_path());

    let work = tempfile::Builder::new().prefix("outpost-soak-").tempdir()?;
    let registry = testkit::Registry::start()?;
    let big = big_image(work.path(), &registry)?;
    let hub = Hub::new(&[(DEVICE, TOKEN)]);
    let cgroup = Arc::new(Constrained::new(&format!("outpost-soak-{}", std::process::id()), MEMORY, CPUS));
    let mut agent = Agent::with_binary(binary);
    agent.use_config(&format!(
        "device-id = \"{DEVICE}\"\nhub = \"mqtt://{}\"\nhub-token = \"{TOKEN}\"\nreport-interval = \"200ms\"\n\
         reconcile-interval = \"500ms\"\nkeep-alive = \"5s\"\nlog-max-size = \"64KiB\"\ninsecure-registries = [\"{}\"]\n{}",
        hub.mqtt,
        registry.host(),
        std::env::var("OUTPOST_SOAK_CONFIG").unwrap_or_default()
    ));
    testkit::import_busybox(&agent);
    agent.daemon_cgroup = Some(cgroup.clone());
    agent.start_daemon();
    let pid = agent.daemon_pid().context("the daemon's pid")?;
    let started = process_start(pid);
    println!("agent daemon pid {pid} in a cgroup of {} MiB and {CPUS} CPU", MEMORY >> 20);

    // 1. Idle.
    hub.set_desired(DEVICE, &document(1, &steady(10)));
    wait_running(&hub, DEVICE, 1, 10, Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(10));
    let idle = sample(pid, Duration::from_secs(20), Duration::from_millis(200));
    println!("idle: median {:.1} MiB, max {:.1} MiB", mib(median(&idle)), mib(max(&idle)));

    // 2. Pulling.
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let pull_started = Instant::now();
    let mut with_big = steady(10);
    with_big.push(workload("big", &big, "exec sleep 3600", ""));
    hub.set_desired(DEVICE, &document(2, &with_big));
    wait_running(&hub, DEVICE, 2, 11, Duration::from_secs(300))?;
    let pull_took = pull_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("the sampler does not panic");
    let pulling = peak.load(Ordering::Relaxed);
    println!("pulling a {} MiB layer: peak {:.1} MiB, {:.1} s", LAYER >> 20, mib(pulling), pull_took.as_secs_f64());

    if minutes == 0 {
        agent.kill_daemon();
        return Ok(());
    }

    // 3. Soak.
    let mut generation = 3;
    let workloads = |generation| if quiet { steady(10) } else { churn(generation) };
    hub.set_desired(DEVICE, &document(generation, &workloads(generation)));
    wait_running(&hub, DEVICE, generation, 10, Duration::from_secs(120))?;
    let soak_started = Instant::now();
    let mut per_minute: Vec<Vec<u64>> = Vec::new();
    let (mut anon_per_minute, mut file_per_minute) = (Vec::new(), Vec::new());
    while soak_started.elapsed() < Duration::from_secs(minutes * 60) {
        let samples = sample(pid, Duration::from_secs(60), Duration::from_secs(1));
        if samples.is_empty() || process_start(pid) != started {
            bail!("the agent daemon is gone after {:?}:\n{}", soak_started.elapsed(), agent.daemon_log());
        }
        // Anonymous memory (heap, stacks) is what a leak grows; file pages
        // are the binary's code as it is first run, shared and reclaimable.
        let (anon, file) = (status_kib(pid, "RssAnon"), status_kib(pid, "RssFile"));
        println!(
            "minute {:>3}: VmRSS min {:.1} median {:.1} max {:.1} MiB (anon {} KiB, file {:.1} MiB); oom kills {}",
            per_minute.len() + 1,
            mib(*samples.iter().min().unwrap()),
            mib(median(&samples)),
            mib(max(&samples)),
            anon,
            mib(file),
            cgroup.oom_kills()
        );
        per_minute.push(samples);
        anon_per_minute.push(anon);
        file_per_minute.push(file);
        if !quiet {
            generation += 1;
            hub.set_desired(DEVICE, &document(generation, &workloads(generation)));
        }
    }
    wait_generation(&hub, DEVICE, generation, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(3));

    let oom_kills = cgroup.oom_kills();
    let delivered = delivery(&agent, &hub, DEVICE)?;
    let restarts = same_view(&agent, &hub, DEVICE, Duration::from_secs(30))?;

    let first = median(&per_minute[0]);
    let last = median(per_minute.last().unwrap());
    println!();
    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!("| agent VmRSS idle, 10 workloads (median) | {:.1} MiB | under 15 MB |", mib(median(&idle)));
    println!("| agent VmRSS pulling a {} MiB layer (peak) | {:.1} MiB | under 25 MB |", LAYER >> 20, mib(pulling));
    println!("| soak length | {minutes} min, {} generations | |", generation - 2);
    println!("| agent VmRSS, first minute of the soak (median) | {:.1} MiB | |", mib(first));
    println!("| agent VmRSS, last minute of the soak (median) | {:.1} MiB | flat |", mib(last));
    println!("| agent VmRSS, whole soak (max) | {:.1} MiB | |", mib(per_minute.iter().map(|m| max(m)).max().unwrap()));
    println!(
        "| agent RssAnon (heap, stacks), end of first / last minute | {} / {} KiB | flat |",
        anon_per_minute[0],
        anon_per_minute.last().unwrap()
    );
    println!(
        "| agent RssFile (its code as first run), end of first / last minute | {:.1} / {:.1} MiB | |",
        mib(file_per_minute[0]),
        mib(*file_per_minute.last().unwrap())
    );
    println!(
        "| cgroup peak (agent and shims, page cache included) | {:.1} MiB | 64 MiB limit |",
        cgroup.peak_bytes() as f64 / (1 << 20) as f64
    );
    println!("| OOM kills in the cgroup | {oom_kills} | 0 |");
    println!("| workload restarts, the device's count = the hub's view | {restarts} | equal |");
    println!("| events stored at the hub | {} | |", delivered.stored);
    println!(
        "| events undelivered / missing at the hub / stored twice | {} / {} / {} | 0 / 0 / 0 |",
        delivered.undelivered, delivered.gaps, delivered.doubled
    );
    agent.kill_daemon();
    if oom_kills > 0 || !delivered.complete() {
        bail!("the soak failed: {oom_kills} OOM kills, {delivered:?}");
    }
    Ok(())
}

/// busybox with a 48 MiB layer of random bytes on top, pushed as big:1; its pinned reference.
fn big_image(dir: &Path, registry: &testkit::Registry) -> anyhow::Result<String> {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs)?;
    let layers = [Layer::Dir(rootfs), testkit::layers::random_file("data", LAYER)?];
    let digest = build_oci_layout(&dir.join("layout"), "big:1", &layers, &busybox_config())?;
    registry.push(&dir.join("layout"), "big:1")?;
    Ok(format!("{}/big:1@{digest}", registry.host()))
}

/// VmRSS samples (KiB) every `every` for `length`; stops early if the process is gone.
fn sample(pid: u32, length: Duration, every: Duration) -> Vec<u64> {
    let end = Instant::now() + length;
    let mut samples = Vec::new();
    while Instant::now() < end {
        match rss_kib(pid) {
            0 => break,
            kib => samples.push(kib),
        }
        std::thread::sleep(every);
    }
    samples
}

fn median(samples: &[u64]) -> u64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

fn max(samples: &[u64]) -> u64 {
    samples.iter().copied().max().unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
