//! A device's desired state from the deployments that target it. Two
//! deployments that name the same workload conflict: the higher priority
//! wins (then the name that sorts first), and the conflict is reported,
//! never resolved silently. The loser keeps every workload, the lost ones
//! listed in `excluded`: its operator's signature covers all of them.

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_proto::fleet::Conflict;
use outpost_proto::{AgentUpdate, Deployment, Signature, WorkloadSpec};

/// How a conflict over the device's one agent names what was contested.
pub const AGENT_UPDATE: &str = "(agent update)";

/// One deployment's revision, as due on a device.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    pub deployment: &'a str,
    pub priority: i32,
    pub revision: u64,
    pub rollback_window: Duration,
    pub workloads: &'a [WorkloadSpec],
    pub update: Option<&'a AgentUpdate>,
    pub signatures: &'a [Signature],
}

/// The deployments of the device's desired state, in the order they won,
/// and the workloads they lost. A deployment that lost every workload is
/// left out.
pub fn merge(device: &str, mut offers: Vec<Offer<'_>>) -> (Vec<Deployment>, Vec<Conflict>) {
    offers.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.deployment.cmp(b.deployment)));
    let mut owners: Vec<(&str, &str)> = Vec::new();
    let mut taken = BTreeSet::new();
    let mut deployments = Vec::new();
    let mut conflicts = Vec::new();
    for offer in offers {
        let mut excluded = Vec::new();
        for workload in offer.workloads {
            if taken.insert(workload.name.as_str()) {
                owners.push((workload.name.as_str(), offer.deployment));
            } else {
                excluded.push(workload.name.clone());
                let winner = owners.iter().find(|(name, _)| *name == workload.name).map_or("", |(_, d)| d);
                conflicts.push(Conflict {
                    device: device.to_string(),
                    workload: workload.name.clone(),
                    winner: winner.to_string(),
                    loser: offer.deployment.to_string(),
                });
            }
        }
        // A device runs one agent: the first update by priority wins it, and
        // a losing update deployment is left out like one that lost all its
        // workloads (an update is never excluded, it is the whole deployment).
        let update = offer.update.filter(|_| {
            if taken.insert(AGENT_UPDATE) {
                owners.push((AGENT_UPDATE, offer.deployment));
                return true;
            }
            let winner = owners.iter().find(|(name, _)| *name == AGENT_UPDATE).map_or("", |(_, d)| d);
            conflicts.push(Conflict {
                device: device.to_string(),
                workload: AGENT_UPDATE.to_string(),
                winner: winner.to_string(),
                loser: offer.deployment.to_string(),
            });
            false
        });
        if excluded.len() < offer.workloads.len() || update.is_some() {
            deployments.push(Deployment {
                name: offer.deployment.to_string(),
                revision: offer.revision,
                rollback_window: offer.rollback_window,
                workloads: offer.workloads.to_vec(),
                update: update.cloned(),
                excluded,
                signatures: offer.signatures.to_vec(),
            });
        }
    }
    (deployments, conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, image: &str) -> WorkloadSpec {
        toml::from_str(&format!("name = \"{name}\"\nimage = \"{image}\"\n")).unwrap()
    }

    #[test]
    fn two_deployments_merge_and_a_shared_workload_goes_to_the_higher_priority() {
        let base = [workload("metrics", "node-exporter:1"), workload("logs", "fluent-bit:2")];
        let app = [workload("cam", "cam:7"), workload("logs", "app-logs:1")];
        let offer = |deployment, priority, workloads| Offer {
            deployment,
            priority,
            revision: 3,
            rollback_window: Duration::from_secs(60),
            workloads,
            update: None,
            signatures: &[],
        };
        let (deployments, conflicts) = merge("cam-1", vec![offer("app", 10, &app[..]), offer("base", 0, &base[..])]);
        let names: Vec<(&str, Vec<&str>)> = deployments
            .iter()
            .map(|d| (d.name.as_str(), d.active_workloads().map(|w| w.name.as_str()).collect()))
            .collect();
        assert_eq!(names, [("app", vec!["cam", "logs"]), ("base", vec!["metrics"])]);
        assert_eq!(
            conflicts,
            [Conflict { device: "cam-1".into(), workload: "logs".into(), winner: "app".into(), loser: "base".into() }]
        );
        // Equal priorities: the name that sorts first wins, whatever the order given.
        let (_, conflicts) = merge("cam-1", vec![offer("base", 0, &base[..]), offer("app", 0, &app[..])]);
        assert_eq!((conflicts[0].winner.as_str(), conflicts[0].loser.as_str()), ("app", "base"));
    }

    #[test]
    fn the_loser_keeps_its_workloads_and_signatures_with_the_lost_ones_excluded() {
        let base = [workload("metrics", "node-exporter:1"), workload("logs", "fluent-bit:2")];
        let app = [workload("logs", "app-logs:1")];
        let signatures = [Signature { keyid: "k".into(), sig: "s".into() }];
        let offer = |deployment, priority, workloads| Offer {
            deployment,
            priority,
            revision: 2,
            rollback_window: Duration::from_secs(60),
            workloads,
            update: None,
            signatures: &signatures[..],
        };
        let (deployments, _) = merge("d", vec![offer("app", 1, &app[..]), offer("base", 0, &base[..])]);
        let base_deployment = &deployments[1];
        assert_eq!(base_deployment.workloads, base);
        assert_eq!(base_deployment.excluded, ["logs"]);
        assert_eq!(base_deployment.signatures, signatures);
        assert!(deployments[0].excluded.is_empty());
        let state = outpost_proto::DesiredState { version: 1, generation: 1, deployments };
        state.validate().expect("a name in two deployments, excluded from one, is valid");
    }

    #[test]
    fn a_deployment_left_with_no_workloads_is_left_out() {
        let only = [workload("logs", "fluent-bit:2")];
        let offer = |deployment, priority| Offer {
            deployment,
            priority,
            revision: 1,
            rollback_window: Duration::from_secs(60),
            workloads: &only[..],
            update: None,
            signatures: &[],
        };
        let (deployments, conflicts) = merge("d", vec![offer("a", 1), offer("b", 0)]);
        assert_eq!(deployments.len(), 1);
        assert_eq!(conflicts.len(), 1);
    }

    #[test]
    fn an_agent_update_goes_to_the_device_alone_and_two_updates_conflict_over_its_one_agent() {
        let app = [workload("cam", "cam:7")];
        let (v2, v3) = (
            AgentUpdate { target: "edge-agent-2".into(), version: "2".into() },
            AgentUpdate { target: "edge-agent-3".into(), version: "3".into() },
        );
        let offer = |deployment, priority, workloads, update| Offer {
            deployment,
            priority,
            revision: 1,
            rollback_window: Duration::from_secs(60),
            workloads,
            update,
            signatures: &[],
        };
        let (deployments, conflicts) = merge(
            "d",
            vec![
                offer("app", 0, &app[..], None),
                offer("agent", 0, &[][..], Some(&v2)),
                offer("canary", 5, &[][..], Some(&v3)),
            ],
        );
        let names: Vec<(&str, Option<&str>)> =
            deployments.iter().map(|d| (d.name.as_str(), d.update.as_ref().map(|u| u.version.as_str()))).collect();
        assert_eq!(names, [("canary", Some("3")), ("app", None)]);
        let expected = Conflict {
            device: "d".into(),
            workload: AGENT_UPDATE.into(),
            winner: "canary".into(),
            loser: "agent".into(),
        };
        assert_eq!(conflicts, [expected]);
        outpost_proto::DesiredState { version: 1, generation: 1, deployments }.validate().unwrap();
    }
}
