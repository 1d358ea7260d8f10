//! Cold boot, offline: from `edge-agent daemon` being exec'd to all of N
//! cached workloads running, after a simulated power cut (every shim and
//! container killed, the run directory's tmpfs emptied, the overlay mounts
//! gone) and with the hub address pointing at nothing. Also the store's size
//! on disk and the daemon's resident memory with the N workloads running.
//!
//! usage (as root): bench-coldboot [--workloads N] [--rounds R] [--agent PATH]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    testkit::agent::require_root();
    let mut workloads = 20;
    let mut rounds = 10;
    let mut binary = PathBuf::from("target/release/edge-agent");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--workloads" => workloads = value()?.parse()?,
            "--rounds" => rounds = value()?.parse()?,
            "--agent" => binary = value()?.into(),
            other => bail!("unknown flag {other}; usage: bench-coldboot [--workloads N] [--rounds R] [--agent PATH]"),
        }
    }
    if !binary.exists() {
        bail!("needs edge-agent at {} (cargo build --release -p edge-agent)", binary.display());
    }
    let work = tempfile::Builder::new().prefix("outpost-coldboot-").tempdir()?;
    let data = work.path().join("data");
    let run = work.path().join("run");
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = {:?}\nrun-dir = {:?}\ncgroup-parent = \"outpost-coldboot\"\nhub = \"mqtt://127.0.0.1:1\"\n",
            data, run
        ),
    )?;
    let agent = |sub: &[&str]| {
        let mut c = Command::new(&binary);
        c.arg("--config").arg(&config).args(sub).stdin(Stdio::null());
        c
    };
    let ok = |c: &mut Command| -> anyhow::Result<()> {
        let out = c.output()?;
        if !out.status.success() {
            bail!("{c:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    ok(&mut agent(&["import", testkit::image::busybox_layout().to_str().unwrap()]))?;
    let mut doc = "version = 1\ngeneration = 1\n[[deployments]]\nname = \"fleet\"\nrevision = 1\n".to_string();
    for i in 0..workloads {
        doc += &format!(
            "[[deployments.workloads]]\nname = \"w{i}\"\nimage = \"busybox:test\"\ncommand = [\"/bin/sleep\", \"3600\"]\nstop-grace-period = \"100ms\"\n"
        );
    }
    let doc_file = work.path().join("desired.toml");
    std::fs::write(&doc_file, doc)?;
    ok(&mut agent(&["apply", "-f", doc_file.to_str().unwrap()]))?;

    let mut samples = Vec::new();
    let mut daemon_rss = 0;
    for _ in 0..rounds {
        power_cut(&run, &data)?;
        let start = Instant::now();
        let mut daemon = agent(&["daemon"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        wait_all_running(&run, workloads, Duration::from_secs(30))?;
        samples.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        daemon_rss = rss_kib(&daemon);
        daemon.kill()?;
        daemon.wait()?;
    }
    let store_size = dir_size(&data.join("store"))?;
    power_cut(&run, &data)?;

    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("cold boot offline, {workloads} cached workloads, {rounds} rounds");
    println!("| figure | value |");
    println!("|---|---|");
    println!("| daemon exec -> all running, median | {:.0} ms |", ms(samples[samples.len() / 2]));
    println!("| daemon exec -> all running, max | {:.0} ms |", ms(*samples.last().unwrap()));
    println!("| store on disk | {:.1} KiB |", store_size as f64 / 1024.0);
    println!("| daemon resident memory with {workloads} running | {:.1} MiB |", daemon_rss as f64 / 1024.0);
    Ok(())
}

/// What a power cut leaves: no process, an empty tmpfs, no mounts; the data directory intact.
fn power_cut(run: &Path, data: &Path) -> anyhow::Result<()> {
    for status in glob_status(run) {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        for key in ["shim_pid", "pid"] {
            if let Some(pid) = value[key].as_i64() {
                // SAFETY: kill(2) on a pid we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let prefix = data.display().to_string();
    for point in mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(&prefix)) {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
    if run.exists() {
        std::fs::remove_dir_all(run)?;
    }
    Ok(())
}

fn glob_status(run: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(run.join("workloads"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("status.json"))
        .filter(|p| p.exists())
        .collect()
}

fn wait_all_running(run: &Path, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let running = glob_status(run)
            .iter()
            .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("\"state\": \"running\"")))
            .count();
        if running == count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {running} of {count} workloads running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn rss_kib(child: &Child) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_size(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}
