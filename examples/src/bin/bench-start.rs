//! Start latency: from a workload spec whose image is on disk to its process
//! running, with edge-agent, against `runc run -d` and `youki run -d` of an
//! equivalent bundle (the same config.json edge-agent generated, the same
//! busybox rootfs), measured in the same run. Also the memory of the agent
//! command and of one shim while its container runs.
//!
//! usage (as root): bench-start [--iterations N] [--agent PATH] [--runc PATH] [--youki PATH]
//! The agent defaults to target/release/edge-agent; runc to Debian's; youki is
//! measured only when given (build it from its source beside this project).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

struct Args {
    iterations: usize,
    agent: PathBuf,
    runc: PathBuf,
    youki: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        iterations: 30,
        agent: PathBuf::from("target/release/edge-agent"),
        runc: PathBuf::from("/usr/sbin/runc"),
        youki: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--iterations" => args.iterations = value()?.parse().context("--iterations takes a number")?,
            "--agent" => args.agent = value()?.into(),
            "--runc" => args.runc = value()?.into(),
            "--youki" => args.youki = Some(value()?.into()),
            other => bail!(
                "unknown flag {other}; usage: bench-start [--iterations N] [--agent PATH] [--runc PATH] [--youki PATH]"
            ),
        }
    }
    for (what, path) in
        [("edge-agent (cargo build --release -p edge-agent)", &args.agent), ("runc (apt-get install runc)", &args.runc)]
    {
        if !path.exists() {
            bail!("needs {what} at {}", path.display());
        }
    }
    Ok(args)
}

/// Runs a command to completion; its wall time and peak resident memory (KiB).
fn timed(command: &mut Command) -> anyhow::Result<(Duration, i64)> {
    let start = Instant::now();
    let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for the child we just spawned; Child is not used to wait again.
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let elapsed = start.elapsed();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr {
            use std::io::Read;
            pipe.read_to_string(&mut stderr)?;
        }
        bail!("{command:?} failed: {stderr}");
    }
    Ok((elapsed, usage.ru_maxrss))
}

fn quiet(command: &mut Command) {
    let _ = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// A `Key: N kB` line of a /proc file.
fn proc_kib(path: &str, key: &str) -> Option<i64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
}

/// Per-shim memory with `count` workloads running at once: resident, private
/// (anonymous) and proportional (file pages shared by all shims split among them).
fn shim_memory(agent: &dyn Fn(&[&str]) -> Command, work: &Path, count: usize) -> anyhow::Result<[i64; 3]> {
    for i in 0..count {
        let spec = work.join(format!("idle-{i}.toml"));
        std::fs::write(&spec, format!("name = \"idle-{i}\"\nimage = \"busybox:test\"\ncommand = [\"/bin/sleep\", \"600\"]\nstop-grace-period = \"100ms\"\n"))?;
        timed(&mut agent(&["run", "-f", spec.to_str().unwrap()]))?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let list: Value = serde_json::from_slice(&agent(&["ps", "--json"]).output()?.stdout)?;
    let mut samples: [Vec<i64>; 3] = Default::default();
    for w in list.as_array().into_iter().flatten() {
        let Some(pid) = w["status"]["shim_pid"].as_i64() else { continue };
        samples[0].extend(proc_kib(&format!("/proc/{pid}/status"), "VmRSS:"));
        samples[1].extend(proc_kib(&format!("/proc/{pid}/status"), "RssAnon:"));
        samples[2].extend(proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:"));
    }
    for i in 0..count {
        quiet(&mut agent(&["rm", &format!("idle-{i}")]));
    }
    Ok(samples.map(|mut v| median(&mut v)))
}

fn median(v: &mut [i64]) -> i64 {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

struct Stats {
    name: String,
    samples: Vec<Duration>,
}

impl Stats {
    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }
    fn row(&self) -> String {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let median = sorted[sorted.len() / 2];
        let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
        let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
        format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            self.name,
            Self::ms(median),
            Self::ms(p90),
            Self::ms(mean),
            Self::ms(sorted[0])
        )
    }
}

fn main() -> anyhow::Result<()> {
    testkit::agent::require_root();
    let args = parse_args()?;
    let work = tempfile::Builder::new().prefix("outpost-bench-").tempdir()?;
    let data = work.path().join("data");
    let run = work.path().join("run");
    let agent = |sub: &[&str]| {
        let mut c = Command::new(&args.agent);
        c.arg("--data-dir").arg(&data).arg("--run-dir").arg(&run).args(["--cgroup-parent", "outpost-bench"]).args(sub);
        c
    };
    let status =
        agent(&["import", testkit::image::busybox_layout().to_str().unwrap()]).stdout(Stdio::null()).status()?;
    if !status.success() {
        bail!("importing the busybox image failed");
    }
    let spec = work.path().join("bench.toml");
    std::fs::write(
        &spec,
        "name = \"bench\"\nimage = \"busybox:test\"\ncommand = [\"/bin/sleep\", \"600\"]\nstop-grace-period = \"100ms\"\n[restart]\nmode = \"never\"\n",
    )?;

    let mut outpost = Stats { name: "edge-agent run (spec -> running)".into(), samples: Vec::new() };
    let mut agent_rss = Vec::new();
    let mut bundle: Option<PathBuf> = None;
    for _ in 0..args.iterations {
        let (elapsed, maxrss) = timed(agent(&["run", "-f", spec.to_str().unwrap()]).env("OUTPOST_LOG", "off"))?;
        outpost.samples.push(elapsed);
        agent_rss.push(maxrss);
        if bundle.is_none() {
            bundle = Some(equivalent_bundle(work.path(), &data)?);
        }
        quiet(&mut agent(&["rm", "bench"]));
    }
    let bundle = bundle.context("no iteration ran")?;

    let mut runc = Stats { name: "runc run -d (bundle -> running)".into(), samples: Vec::new() };
    let runc_root = work.path().join("runc-state");
    for i in 0..args.iterations {
        let id = format!("bench-runc-{i}");
        let (elapsed, _) = timed(
            Command::new(&args.runc).arg("--root").arg(&runc_root).args(["run", "-d", "-b"]).arg(&bundle).arg(&id),
        )?;
        runc.samples.push(elapsed);
        quiet(Command::new(&args.runc).arg("--root").arg(&runc_root).args(["delete", "-f", &id]));
    }
    let mut results = vec![outpost, runc];
    if let Some(youki) = &args.youki {
        let mut stats = Stats { name: "youki run -d (bundle -> running)".into(), samples: Vec::new() };
        let youki_root = work.path().join("youki-state");
        for i in 0..args.iterations {
            let id = format!("bench-youki-{i}");
            let (elapsed, _) = timed(
                Command::new(youki).arg("--root").arg(&youki_root).args(["run", "-d", "-b"]).arg(&bundle).arg(&id),
            )?;
            stats.samples.push(elapsed);
            quiet(Command::new(youki).arg("--root").arg(&youki_root).args(["delete", "-f", &id]));
        }
        results.push(stats);
    }

    println!("start latency, {} iterations each, busybox `sleep 600`, same config.json", args.iterations);
    println!("| runtime | median ms | p90 ms | mean ms | min ms |");
    println!("|---|---|---|---|---|");
    for r in &results {
        println!("{}", r.row());
    }
    let [rss, anon, pss] = shim_memory(&agent, work.path(), 10)?;
    let mib = |kib: i64| kib as f64 / 1024.0;
    println!();
    println!("| memory | median |");
    println!("|---|---|");
    println!("| `edge-agent run`, peak RSS of the whole command | {:.1} MiB |", mib(median(&mut agent_rss)));
    println!("| one shim (of 10 running), resident (RSS) | {:.1} MiB |", mib(rss));
    println!("| one shim (of 10 running), private (RssAnon) | {:.1} MiB |", mib(anon));
    println!("| one shim (of 10 running), proportional (PSS) | {:.1} MiB |", mib(pss));
    Ok(())
}

/// The bundle edge-agent generated, with its rootfs copied into a plain
/// directory and its own cgroup, so runc and youki run exactly the same container.
fn equivalent_bundle(work: &Path, data: &Path) -> anyhow::Result<PathBuf> {
    let bundle = work.join("bundle");
    let config: Value = serde_json::from_slice(&std::fs::read(data.join("workloads/bench/bundle/config.json"))?)?;
    let layers = std::fs::read_dir(data.join("images/layers"))?.flatten().map(|e| e.path()).collect::<Vec<_>>();
    let [layer] = layers.as_slice() else { bail!("expected one unpacked busybox layer, found {layers:?}") };
    std::fs::create_dir_all(&bundle)?;
    let status = Command::new("cp").arg("-a").arg(layer).arg(bundle.join("rootfs")).status()?;
    if !status.success() {
        bail!("copying the rootfs failed");
    }
    let mut config = config;
    config["root"]["path"] = Value::from("rootfs");
    config["linux"]["cgroupsPath"] = Value::from("/outpost-bench-peer/bench");
    std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(bundle)
}
