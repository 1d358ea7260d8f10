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

use std::collections::{BTreeMap, BTreeSet};

use outpost_proto::federation::{HeldNotice, HoldAction, SiteHold, Upward};
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

/// The parent's deployments as the site's holds let them through to one
/// device, and the parent revisions held back (name -> revision). A hold
/// covers the revisions the site had when it was made; under it a device
/// never goes forward: a pause keeps the revision it was given (none if it
/// had none), a rollback gives it the hold's revision. Going back is always
/// let through. A revision the site no longer has is let through as it is.
pub fn hold_back(
    parent: &[Deployment],
    holds: &BTreeMap<String, SiteHold>,
    passed: &BTreeMap<String, u64>,
    kept: impl Fn(&str, u64) -> Option<Deployment>,
) -> (Vec<Deployment>, BTreeMap<String, u64>) {
    let mut through = Vec::new();
    let mut held = BTreeMap::new();
    for d in parent {
        let Some(hold) = holds.get(&d.name).filter(|h| d.revision <= h.covers) else {
            through.push(d.clone());
            continue;
        };
        let ceiling = match hold.action {
            HoldAction::Pause => passed.get(&d.name).copied(),
            HoldAction::Rollback { to } => Some(to),
        };
        match ceiling {
            Some(ceiling) if d.revision <= ceiling => through.push(d.clone()),
            Some(ceiling) => match kept(&d.name, ceiling) {
                Some(older) => {
                    held.insert(d.name.clone(), d.revision);
                    through.push(older);
                }
                None => through.push(d.clone()),
            },
            None => {
                held.insert(d.name.clone(), d.revision);
            }
        }
    }
    (through, held)
}

/// Recomposes a device's desired state from its two sources and the site's
/// holds, and stores it under the next site generation when it changed.
/// The generation written, if any. The caller holds `store.composing()`.
fn recompose(store: &Store, device: &str) -> Result<Option<u64>, StoreError> {
    let mut parent = store.source(device, true)?.unwrap_or_default();
    let local = store.source(device, false)?.unwrap_or_default();
    let holds = store.site_holds()?;
    let (through, held) = hold_back(&parent.deployments, &holds, &parent.passed, |name, revision| {
        store.parent_revision(name, revision).ok().flatten()
    });
    tell_holds(store, device, &parent.held, &held, &holds)?;
    parent.passed = through.iter().map(|d| (d.name.clone(), d.revision)).collect();
    parent.held = held;
    let deployments = compose(&Source { deployments: through, ..parent.clone() }, &local);
    let stored = store.desired(device)?;
    // A new parent generation is passed on even when the composition is the
    // same, so that the device acknowledges it and the parent counts it.
    let parent_known = parent.generations.last().is_some_and(|(_, g)| *g == parent.generation);
    if stored.as_ref().is_some_and(|s| s.deployments == deployments) && parent_known {
        store.put_source(device, true, &parent)?;
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

/// Queues for the parent what changed in what the site holds back from a
/// device: the parent counts a paused device as waiting for its site, and a
/// device rolled back on site as failed.
fn tell_holds(
    store: &Store,
    device: &str,
    before: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
    holds: &BTreeMap<String, SiteHold>,
) -> Result<(), StoreError> {
    let at = crate::sync::now_ms();
    for (name, &revision) in before.iter().filter(|(name, r)| now.get(*name) != Some(r)) {
        let notice = HeldNotice { deployment: name.clone(), revision, hold: None, reason: None };
        store.push_upward(device, Upward::Held(notice), at)?;
    }
    for (name, &revision) in now.iter().filter(|(name, r)| before.get(*name) != Some(r)) {
        let hold = &holds[name];
        let notice =
            HeldNotice { deployment: name.clone(), revision, hold: Some(hold.action), reason: hold.reason.clone() };
        store.push_upward(device, Upward::Held(notice), at)?;
    }
    Ok(())
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
    let _composing = store.composing();
    let mut source = store.source(device, parent)?.unwrap_or_default();
    for d in &deployments {
        let before = source.deployments.iter().find(|old| old.name == d.name);
        if before != Some(d) {
            source.changed_at.insert(d.name.clone(), now);
        }
        if parent {
            store.keep_parent_revision(d)?;
        }
    }
    source.changed_at.retain(|name, _| deployments.iter().any(|d| &d.name == name));
    source.generation = generation;
    source.deployments = deployments;
    store.put_source(device, parent, &source)?;
    recompose(store, device)
}

/// Why a hold cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error(
        "this site hub has received no deployment {0:?} from its parent: `hub deployments` at the parent lists them"
    )]
    Unknown(String),
    #[error("the site has no revision {to} of {name:?} to roll back to; it has {have:?}")]
    NoSuchRevision { name: String, to: u64, have: Vec<u64> },
    #[error("the site has no revision of {0:?} before its newest to roll back to: name one with --revision")]
    NothingBefore(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an operator on site asks of one of the parent's rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldRequest {
    Pause,
    /// To this revision, or the one before the newest the site received.
    Rollback(Option<u64>),
}

/// Holds one of the parent's rollouts at this site, then recomposes every
/// device. The hold, and the devices whose desired state changed.
pub fn hold(
    store: &Store,
    name: &str,
    request: HoldRequest,
    reason: Option<String>,
    now: u64,
) -> Result<(SiteHold, Vec<String>), HoldError> {
    let _composing = store.composing();
    let have = store.parent_revision_numbers(name)?;
    let Some(&covers) = have.last() else { return Err(HoldError::Unknown(name.to_string())) };
    let action = match request {
        HoldRequest::Pause => HoldAction::Pause,
        HoldRequest::Rollback(Some(to)) if have.contains(&to) => HoldAction::Rollback { to },
        HoldRequest::Rollback(Some(to)) => return Err(HoldError::NoSuchRevision { name: name.to_string(), to, have }),
        HoldRequest::Rollback(None) => match have.iter().rev().nth(1) {
            Some(&to) => HoldAction::Rollback { to },
            None => return Err(HoldError::NothingBefore(name.to_string())),
        },
    };
    let hold = SiteHold { deployment: name.to_string(), action, covers, reason, at: now };
    store.put_site_hold(&hold)?;
    Ok((hold, recompose_all(store)?))
}

/// Lifts a hold; false when there was none. The devices whose desired state changed.
pub fn release(store: &Store, name: &str) -> Result<Option<Vec<String>>, StoreError> {
    let _composing = store.composing();
    if !store.remove_site_hold(name)? {
        return Ok(None);
    }
    recompose_all(store).map(Some)
}

fn recompose_all(store: &Store) -> Result<Vec<String>, StoreError> {
    let mut changed = Vec::new();
    for device in store.devices()? {
        if store.source(&device.id, true)?.is_some() && recompose(store, &device.id)?.is_some() {
            changed.push(device.id);
        }
    }
    Ok(changed)
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
        Upward::Presence(_) | Upward::Logs(_) | Upward::Held(_) => {}
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
        Source { generation: 5, deployments, changed_at, ..Source::default() }
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

    fn hold(name: &str, action: HoldAction, covers: u64) -> BTreeMap<String, SiteHold> {
        let hold = SiteHold { deployment: name.into(), action, covers, reason: None, at: 0 };
        BTreeMap::from([(name.to_string(), hold)])
    }

    fn kept(name: &str, revision: u64) -> Option<Deployment> {
        (revision <= 3).then(|| deployment(name, revision, &["web"]))
    }

    fn passed(revision: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([("app".to_string(), revision)])
    }

    #[test]
    fn a_paused_deployment_stays_at_the_revision_each_device_was_given_and_newer_devices_get_none() {
        let parent = [deployment("app", 3, &["web"]), deployment("other", 7, &["db"])];
        let holds = hold("app", HoldAction::Pause, 3);
        let (through, held) = hold_back(&parent, &holds, &passed(2), kept);
        assert_eq!(names(&through), [("app".into(), 2), ("other".into(), 7)]);
        assert_eq!(held, BTreeMap::from([("app".to_string(), 3)]));
        let (through, held) = hold_back(&parent, &holds, &BTreeMap::new(), kept);
        assert_eq!(names(&through), [("other".into(), 7)], "a device that never had it gets none");
        assert_eq!(held, BTreeMap::from([("app".to_string(), 3)]));
    }

    #[test]
    fn under_a_hold_going_back_is_let_through() {
        let parent = [deployment("app", 1, &["web"])];
        let (through, held) = hold_back(&parent, &hold("app", HoldAction::Pause, 3), &passed(2), kept);
        assert_eq!((names(&through), held.len()), (vec![("app".into(), 1)], 0));
        let rollback = hold("app", HoldAction::Rollback { to: 2 }, 3);
        let (through, held) = hold_back(&parent, &rollback, &passed(3), kept);
        assert_eq!((names(&through), held.len()), (vec![("app".into(), 1)], 0));
    }

    #[test]
    fn a_site_rollback_gives_every_device_on_a_later_revision_the_holds_revision() {
        let parent = [deployment("app", 3, &["web"])];
        let (through, held) = hold_back(&parent, &hold("app", HoldAction::Rollback { to: 2 }, 3), &passed(3), kept);
        assert_eq!(names(&through), [("app".into(), 2)]);
        assert_eq!(held, BTreeMap::from([("app".to_string(), 3)]));
    }

    #[test]
    fn a_revision_newer_than_the_hold_covers_lifts_it_and_one_the_site_lacks_goes_through() {
        let parent = [deployment("app", 4, &["web"])];
        let (through, held) = hold_back(&parent, &hold("app", HoldAction::Pause, 3), &passed(2), kept);
        assert_eq!((names(&through), held.len()), (vec![("app".into(), 4)], 0), "the cloud changed it after");
        let parent = [deployment("app", 3, &["web"])];
        let (through, _) = hold_back(&parent, &hold("app", HoldAction::Rollback { to: 2 }, 3), &passed(3), |_, _| None);
        assert_eq!(names(&through), [("app".into(), 3)], "nothing to send back instead");
    }

    #[test]
    fn a_site_generation_goes_up_as_the_parent_generation_it_held() {
        let source = Source { generations: vec![(1, 4), (2, 4), (3, 7)], ..Source::default() };
        assert_eq!([1, 2, 3, 9].map(|g| parent_generation(&source, g)), [4, 4, 7, 7]);
        assert_eq!(parent_generation(&source, 0), 0);
    }
}
