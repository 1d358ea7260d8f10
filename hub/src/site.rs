//! A site hub's devices have two sources of desired state: the parent's
//! deployments (upstream.rs) and the site's own, applied on site while the
//! WAN may be down (the rollout engine). The site composes them and numbers
//! the result itself (docs/federation.md, "Site-local deployments"):
//!
//! - a deployment name only one source has comes from it;
//! - a name both have comes from the one that changed it last: what the
//!   cloud changed after the site acted wins, and a site-local deployment
//!   the cloud does not know stays until the site removes it;
//! - a workload name in both goes to the parent's deployment; the site's
//!   lists it as excluded (its signature does not cover `excluded`).
//!
//! Devices see only the site's generations; reports and events going up
//! carry the parent's generation that the site's one held, so the parent's
//! rollouts count what the device really has.

use std::collections::BTreeSet;

use outpost_proto::federation::Upward;
use outpost_proto::{Deployment, DesiredState, EventKind};

use crate::store::{Source, Store, StoreError};

/// Site generations remembered per device for translating reports up.
const GENERATIONS_KEPT: usize = 64;

/// The deployments a device runs: the rule above, as a pure function.
pub fn compose(parent: &Source, local: &Source) -> Vec<Deployment> {
    let local_wins = |name: &str| {
        let local_at = local.changed_at.get(name).copied().unwrap_or(0);
        let parent_at = parent.changed_at.get(name).copied().unwrap_or(0);
        local_at > parent_at
    };
    let mut deployments: Vec<Deployment> = parent
        .deployments
        .iter()
        .filter(|d| !local.deployments.iter().any(|l| l.name == d.name && local_wins(&l.name)))
        .cloned()
        .collect();
    let parents: BTreeSet<String> =
        deployments.iter().flat_map(|d| d.active_workloads().map(|w| w.name.clone())).collect();
    for d in &local.deployments {
        if parent.deployments.iter().any(|p| p.name == d.name) && !local_wins(&d.name) {
            continue;
        }
        let mut d = d.clone();
        for w in &d.workloads {
            if parents.contains(&w.name) && !d.excluded.contains(&w.name) {
                d.excluded.push(w.name.clone());
            }
        }
        if d.active_workloads().next().is_some() || d.update.is_some() {
            deployments.push(d);
        }
    }
    deployments
}

/// Recomposes a device's desired state from its two sources and stores it
/// under the next site generation when it changed. The generation written,
/// if any.
pub fn recompose(store: &Store, device: &str) -> Result<Option<u64>, StoreError> {
    let mut parent = store.source(device, true)?.unwrap_or_default();
    let local = store.source(device, false)?.unwrap_or_default();
    let deployments = compose(&parent, &local);
    let stored = store.desired(device)?;
    // A new parent generation is passed on even when the composition is the
    // same, so that the device acknowledges it and the parent counts it.
    let parent_known = parent.generations.last().is_some_and(|(_, g)| *g == parent.generation);
    if stored.as_ref().is_some_and(|s| s.deployments == deployments) && parent_known {
        return Ok(None);
    }
    let generation = stored.map_or(1, |s| s.generation + 1);
    let state = DesiredState { version: outpost_proto::desired::DESIRED_STATE_VERSION, generation, deployments };
    store.put_desired(device, &state)?;
    parent.generations.push((generation, parent.generation));
    let excess = parent.generations.len().saturating_sub(GENERATIONS_KEPT);
    parent.generations.drain(..excess);
    store.put_source(device, true, &parent)?;
    Ok(Some(generation))
}

/// Replaces one source of a device's desired state, noting when each of its
/// deployment names changed, then recomposes.
pub fn set_source(
    store: &Store,
    device: &str,
    parent: bool,
    generation: u64,
    deployments: Vec<Deployment>,
    now: u64,
) -> Result<Option<u64>, StoreError> {
    let mut source = store.source(device, parent)?.unwrap_or_default();
    for d in &deployments {
        let before = source.deployments.iter().find(|old| old.name == d.name);
        if before != Some(d) {
            source.changed_at.insert(d.name.clone(), now);
        }
    }
    source.changed_at.retain(|name, _| deployments.iter().any(|d| &d.name == name));
    source.generation = generation;
    source.deployments = deployments;
    store.put_source(device, parent, &source)?;
    recompose(store, device)
}

/// The parent's generation a site generation held.
fn parent_generation(source: &Source, site_generation: u64) -> u64 {
    source.generations.iter().rev().find(|(site, _)| *site <= site_generation).map_or(0, |(_, parent)| *parent)
}

/// Rewrites the generations a device's message names into the parent's.
pub fn translate(store: &Store, device: &str, message: &mut Upward) -> Result<(), StoreError> {
    let Some(source) = store.source(device, true)? else { return Ok(()) };
    match message {
        Upward::Report(report) => {
            if let Some(g) = report.generation.as_mut() {
                *g = parent_generation(&source, *g);
            }
        }
        Upward::Events(batch) => {
            for event in &mut batch.events {
                if let EventKind::Applied { generation } | EventKind::Refused { generation, .. } = &mut event.kind {
                    *generation = parent_generation(&source, *generation);
                }
            }
        }
        Upward::Presence(_) | Upward::Logs(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn deployment(name: &str, revision: u64, workloads: &[&str]) -> Deployment {
        let workloads =
            workloads.iter().map(|w| toml::from_str(&format!("name = \"{w}\"\nimage = \"i\"\n")).unwrap()).collect();
        Deployment {
            name: name.into(),
            revision,
            rollback_window: std::time::Duration::from_secs(60),
            workloads,
            update: None,
            excluded: Vec::new(),
            signatures: Vec::new(),
        }
    }

    fn source(deployments: Vec<Deployment>, at: u64) -> Source {
        let changed_at = deployments.iter().map(|d| (d.name.clone(), at)).collect::<BTreeMap<_, _>>();
        Source { generation: 5, deployments, changed_at, generations: Vec::new() }
    }

    fn names(deployments: &[Deployment]) -> Vec<(String, u64)> {
        deployments.iter().map(|d| (d.name.clone(), d.revision)).collect()
    }

    #[test]
    fn a_site_local_deployment_the_cloud_does_not_know_runs_beside_the_clouds() {
        let parent = source(vec![deployment("app", 3, &["web"])], 100);
        let local = source(vec![deployment("kiosk", 1, &["screen"])], 50);
        assert_eq!(names(&compose(&parent, &local)), [("app".into(), 3), ("kiosk".into(), 1)]);
    }

    #[test]
    fn a_name_in_both_comes_from_whichever_changed_it_last() {
        let local = source(vec![deployment("app", 9, &["web"])], 200);
        let older_parent = source(vec![deployment("app", 3, &["web"])], 100);
        assert_eq!(names(&compose(&older_parent, &local)), [("app".into(), 9)], "the site acted after the cloud");
        let newer_parent = source(vec![deployment("app", 4, &["web"])], 300);
        assert_eq!(names(&compose(&newer_parent, &local)), [("app".into(), 4)], "the cloud changed it after");
    }

    #[test]
    fn a_workload_in_both_goes_to_the_parent_and_the_site_deployment_excludes_it() {
        let parent = source(vec![deployment("app", 3, &["web"])], 100);
        let local = source(vec![deployment("tools", 1, &["web", "shell"])], 200);
        let composed = compose(&parent, &local);
        assert_eq!(composed[1].excluded, ["web"]);
        let state = DesiredState { version: 1, generation: 1, deployments: composed };
        state.validate().unwrap();
        let only_web = source(vec![deployment("tools", 1, &["web"])], 200);
        assert_eq!(names(&compose(&parent, &only_web)), [("app".into(), 3)], "nothing left of it: left out");
    }

    #[test]
    fn a_site_generation_goes_up_as_the_parent_generation_it_held() {
        let source = Source { generations: vec![(1, 4), (2, 4), (3, 7)], ..Source::default() };
        assert_eq!([1, 2, 3, 9].map(|g| parent_generation(&source, g)), [4, 4, 7, 7]);
        assert_eq!(parent_generation(&source, 0), 0);
    }
}
