//! The agent on a device the size of a Pi Zero 2 with room for workloads:
//! the daemon (and so its shims) in a cgroup of 64 MiB and a quarter of a
//! CPU, ten busy workloads, linked to a real hub. The short version of the
//! soak benchmark (`bench-soak`, docs/benchmarks.md), which measures memory
//! over a long run; this one checks behaviour. Needs root (CI runs as root).

use std::sync::Arc;
use std::time::Duration;

use testkit::agent::Agent;
use testkit::constrained::Constrained;
use testkit::hub::Hub;
use testkit::soak::{churn, delivery, document, process_start, same_view, wait_running};

const DEVICE: &str = "small-1";
const TOKEN: &str = "small-token";

#[test]
fn agent_in_a_64_mib_quarter_cpu_cgroup_runs_ten_busy_workloads_with_no_oom_kill_and_the_hub_sees_every_change() {
    let hub = Hub::new(&[(DEVICE, TOKEN)]);
    let mut agent = Agent::new();
    testkit::import_busybox(&agent);
    agent.link_to(hub.mqtt, DEVICE, TOKEN);
    let cgroup =
        Arc::new(Constrained::new(&agent.cgroup_parent.replace("outpost-test-", "outpost-small-"), 64 << 20, 0.25));
    agent.daemon_cgroup = Some(cgroup.clone());
    agent.start_daemon();
    let pid = agent.daemon_pid().unwrap();
    let started = process_start(pid);

    // Twelve sleepers, then two generations that remove seven of them and keep
    // the rest busy: crashes and restarts, probes, rotating logs, a replaced workload.
    hub.set_desired(DEVICE, &document(1, &testkit::soak::steady(12)));
    wait_running(&hub, DEVICE, 1, 12, Duration::from_secs(120)).unwrap();
    for generation in 2..=3 {
        hub.set_desired(DEVICE, &document(generation, &churn(generation)));
        wait_running(&hub, DEVICE, generation, 10, Duration::from_secs(120)).unwrap();
        std::thread::sleep(Duration::from_secs(12));
    }

    assert_eq!(cgroup.oom_kills(), 0, "the kernel killed something in the agent's cgroup:\n{}", agent.daemon_log());
    assert_eq!(process_start(pid), started, "the agent daemon died or was replaced:\n{}", agent.daemon_log());
    let restarts = same_view(&agent, &hub, DEVICE, Duration::from_secs(30)).unwrap();
    assert!(restarts >= 2, "the crashing workloads were restarted, and the hub was told: {restarts} restarts");
    let delivered = delivery(&agent, &hub, DEVICE).unwrap();
    assert!(delivered.complete() && delivered.stored >= 3, "every event at the hub once: {delivered:?}");
}
