//! A device kept busy for a long run, and the checks that nothing it said
//! was lost on the way to its hub: shared by the soak benchmark
//! (examples/src/bin/bench-soak.rs) and its short hw-test.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::agent::Agent;
use crate::hub::Hub;

/// A workload of a desired-state document: `script` run by busybox sh.
pub fn workload(name: &str, image: &str, script: &str, extra: &str) -> String {
    format!(
        "[[deployments.workloads]]\nname = \"{name}\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n\
         stop-grace-period = \"100ms\"\n{extra}"
    )
}

/// `count` busybox workloads that only sleep.
pub fn steady(count: usize) -> Vec<String> {
    let image = crate::image::busybox_pinned();
    (0..count).map(|i| workload(&format!("w{i}"), &image, "exec sleep 3600", "")).collect()
}

/// Ten workloads that keep the agent busy: two crash every 10 s and are
/// restarted, two answer an exec health probe every second, one writes
/// logs that rotate, and w9 restarts with each generation.
pub fn churn(generation: u64) -> Vec<String> {
    let image = crate::image::busybox_pinned();
    let crash = "sleep 10; exit 1";
    let restart =
        "[deployments.workloads.restart]\nbackoff-initial = \"1s\"\nbackoff-max = \"1s\"\nmin-uptime = \"5s\"\n";
    let probe = "[deployments.workloads.health]\nexec = [\"cat\", \"/tmp/ready\"]\ninterval = \"1s\"\n";
    let chatty = "while true; do echo \"$(date) a line of log output to rotate\"; usleep 20000; done";
    let mut out: Vec<String> = (0..4).map(|i| workload(&format!("w{i}"), &image, "exec sleep 3600", "")).collect();
    out.push(workload("crash-a", &image, crash, restart));
    out.push(workload("crash-b", &image, crash, restart));
    out.push(workload("probed-a", &image, "touch /tmp/ready; exec sleep 3600", probe));
    out.push(workload("probed-b", &image, "touch /tmp/ready; exec sleep 3600", probe));
    out.push(workload("chatty", &image, chatty, ""));
    out.push(workload("w9", &image, &format!("echo generation {generation}; exec sleep 3600"), ""));
    out
}

/// A desired-state document of one deployment, `soak`, at `generation`.
pub fn document(generation: u64, workloads: &[String]) -> String {
    format!(
        "version = 1\ngeneration = {generation}\n[[deployments]]\nname = \"soak\"\nrevision = {generation}\n{}",
        workloads.concat()
    )
}

fn view_of(hub: &Hub, device: &str) -> Value {
    hub.try_get(&format!("/v1/devices/{device}")).unwrap_or(Value::Null)
}

/// Waits until the hub sees the device at `generation` with `count` workloads running.
pub fn wait_running(hub: &Hub, device: &str, generation: u64, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let view = view_of(hub, device);
        let running = view["workloads"].as_array().map_or(0, |w| w.iter().filter(|w| w["state"] == "running").count());
        if view["generation"].as_u64() == Some(generation) && running >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the device never ran generation {generation} with {count} workloads: {view:#}\n{}", hub.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn wait_generation(hub: &Hub, device: &str, generation: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while view_of(hub, device)["generation"].as_u64() != Some(generation) {
        if Instant::now() > deadline {
            bail!("the device never acknowledged generation {generation}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Waits until every workload's state and restart count at the hub are what
/// the device says (`edge-agent ps`); the restarts summed.
pub fn same_view(agent: &Agent, hub: &Hub, device: &str, timeout: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let local: Value = serde_json::from_str(&agent.ok(&["ps", "--json"]))?;
        let view = view_of(hub, device);
        // `ps` keeps the restart count in the workload's status; the hub's view has it flat.
        let listed = |list: &Value, restarts: fn(&Value) -> &Value| -> Vec<(String, String, u64)> {
            let mut out: Vec<_> = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| {
                    let name = w["name"].as_str().unwrap_or_default().to_string();
                    (name, w["state"].as_str().unwrap_or_default().to_string(), restarts(w).as_u64().unwrap_or(0))
                })
                .collect();
            out.sort();
            out
        };
        let ours = listed(&local, |w| &w["status"]["restarts"]);
        let theirs = listed(&view["workloads"], |w| &w["restarts"]);
        if ours == theirs {
            return Ok(ours.iter().map(|(_, _, r)| r).sum());
        }
        if Instant::now() > deadline {
            bail!(
                "the hub's view never matched the device's:\ndevice: {ours:?}\nhub: {theirs:?}\nthe hub's device: {view:#}\n\
                 hub log:\n{}\nagent log:\n{}",
                hub.log(),
                agent.daemon_log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What became of the device's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub stored: usize,
    /// Still on the device: the device drops those the hub acknowledged.
    pub undelivered: usize,
    /// Numbers missing at the hub below its highest, and numbers stored twice.
    pub gaps: usize,
    pub doubled: usize,
}

impl Delivery {
    pub fn complete(&self) -> bool {
        self.undelivered == 0 && self.gaps == 0 && self.doubled == 0
    }
}

pub fn delivery(agent: &Agent, hub: &Hub, device: &str) -> anyhow::Result<Delivery> {
    let mut seqs: Vec<u64> = Vec::new();
    loop {
        let after = seqs.last().copied().unwrap_or(0);
        let page = hub.get(&format!("/v1/devices/{device}/events?after={after}&limit=10000"));
        let page: Vec<u64> = page.as_array().context("events")?.iter().filter_map(|e| e["seq"].as_u64()).collect();
        if page.is_empty() {
            break;
        }
        seqs.extend(page);
    }
    let unique: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
    Ok(Delivery {
        stored: unique.len(),
        undelivered: agent.events().len(),
        gaps: (1..=unique.last().copied().unwrap_or(0)).filter(|s| !unique.contains(s)).count(),
        doubled: seqs.len() - unique.len(),
    })
}

/// The process's resident memory (KiB); 0 once it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// A KiB figure of /proc/PID/status (`VmRSS`, `RssAnon`, `RssFile`); 0 when the process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// The process's start time (clock ticks after boot): the same pid with
/// another start time is another process.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}
