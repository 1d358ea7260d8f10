//! A fleet rollout with real agents (daemons, containers) and a real hub
//! (embedded broker, HTTP API, CLI) over loopback: two devices, one wave
//! each. Needs root (CI runs as root).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::agent::{state, Agent};
use testkit::hub::Hub;

const WAIT: Duration = Duration::from_secs(60);
const DEVICES: [(&str, &str); 2] = [("rig-1", "rig-1-token"), ("rig-2", "rig-2-token")];

struct Fleet {
    hub: Hub,
    /// In the order of DEVICES.
    agents: Vec<Agent>,
    dir: tempfile::TempDir,
}

fn fleet() -> Fleet {
    let hub = Hub::new(&DEVICES);
    let mut agents = Vec::new();
    for (device, token) in DEVICES {
        let mut agent = Agent::new();
        testkit::import_busybox(&agent);
        agent.link_to(hub.mqtt, device, token);
        agent.start_daemon();
        let labelled = hub.cli(&["label", device, "site=rig"]);
        assert!(labelled.status.success(), "{}", String::from_utf8_lossy(&labelled.stderr));
        agents.push(agent);
    }
    Fleet { hub, agents, dir: tempfile::tempdir().unwrap() }
}

/// The deployment: one workload running `script`, in two waves.
fn deployment(script: &str) -> Value {
    json!({
        "name": "app",
        "selector": { "site": "rig" },
        "rollback-window": "20s",
        "strategy": { "waves": ["1", "100%"], "min-healthy": "1s", "max-failure-ratio": 0.1,
                      "on-failure": "rollback", "device-timeout": "60s" },
        "workloads": [{
            "name": "svc", "image": testkit::image::busybox_pinned(), "command": ["/bin/sh", "-c", script],
            "stop-grace-period": "100ms",
            "restart": { "backoff-initial": "100ms", "crash-loop-threshold": 2 },
        }],
    })
}

impl Fleet {
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = self.hub.cli(args);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(format!("{}{}", text(&out.stdout), text(&out.stderr)))
        }
    }

    fn apply(&self, spec: &Value) {
        let file = self.dir.path().join("app.json");
        std::fs::write(&file, spec.to_string()).unwrap();
        let key = testkit::trust::operator().deployments_key_path();
        self.cli(&["apply", "-f", file.to_str().unwrap(), "--key", key.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn logs(&self) -> String {
        let agents: Vec<String> = self.agents.iter().map(|a| a.daemon_log()).collect();
        format!("hub log:\n{}\nagent logs:\n{}", self.hub.log(), agents.join("\n----\n"))
    }

    /// The revision of svc a device runs, as the hub sees it.
    fn revision(&self, device: &str) -> Option<u64> {
        let view = self.hub.try_get(&format!("/v1/devices/{device}")).ok()?;
        let workloads = view["workloads"].as_array()?;
        let svc = workloads.iter().find(|w| w["name"] == "svc" && w["state"] == "running")?;
        svc["revision"].as_u64()
    }

    fn all_run(&self, revision: u64) -> bool {
        DEVICES.iter().all(|(id, _)| self.revision(id) == Some(revision))
            && self.agents.iter().all(|a| state(&a.workload("svc")) == "running")
    }

    fn wait(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !check(self) {
            assert!(Instant::now() < deadline, "never: {what}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn a_revision_whose_containers_exit_1_stops_at_the_canary_and_every_device_runs_the_previous_one() {
    let fleet = fleet();
    fleet.apply(&deployment("exec sleep 600"));
    fleet.cli(&["rollout", "watch", "app", "--timeout", "60s"]).unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    fleet.wait("both devices run revision 1", |f| f.all_run(1));

    let order = hub::rollout::waves::order(DEVICES.map(|(id, _)| id));
    let canary = DEVICES.iter().position(|(id, _)| *id == order[0]).unwrap();
    let other = &fleet.agents[1 - canary];
    let untouched_pid = other.workload("svc")["status"]["pid"].as_i64();

    fleet.apply(&deployment("exit 1"));
    let watched =
        fleet.cli(&["rollout", "watch", "app", "--timeout", "90s"]).expect_err("the rollout of a failing revision");
    assert!(watched.contains("rolled back") && watched.contains("failed revision 2"), "{watched}\n{}", fleet.logs());

    fleet.wait("both devices run revision 1 again", |f| f.all_run(1));
    assert_eq!(other.workload("svc")["status"]["pid"].as_i64(), untouched_pid, "revision 2 reached the second wave");
    let shown = fleet.cli(&["deployment", "show", "app"]).unwrap();
    assert!(shown.contains("rolled back"), "{shown}");
}
