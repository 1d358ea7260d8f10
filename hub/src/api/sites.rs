//! Site hubs below this one (docs/federation.md): when each last synced,
//! whether its link is up, and its devices with how stale their views are.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};

/// A site as the API shows it. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteView {
    pub id: String,
    pub online: bool,
    pub last_sync: Option<u64>,
    /// The highest item of the site's queue stored here.
    pub acked_seq: u64,
    pub devices: Vec<SiteDevice>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteDevice {
    pub id: String,
    pub online: bool,
    /// When the site last heard from the device, as far as this hub knows.
    pub last_seen: Option<u64>,
    /// Desired-state generation held here, and the one the device stored.
    pub desired_generation: Option<u64>,
    pub generation: Option<u64>,
    /// Deployment revisions sent to the device that it has not stored yet
    /// (`name@revision`): what waits for the site's link.
    pub not_received: Vec<String>,
    /// Revisions the site holds back from the device, and why
    /// (`app@3: paused at site rig-7`).
    pub held: Vec<String>,
}

pub(super) async fn list(State(state): State<AppState>) -> Result<Json<Vec<SiteView>>, ApiError> {
    let devices = state.store.devices()?;
    let mut sites = Vec::new();
    for site in state.store.site_records()? {
        let mut of_site = Vec::new();
        for d in devices.iter().filter(|d| d.site.as_deref() == Some(site.id.as_str())) {
            of_site.push(SiteDevice {
                id: d.id.clone(),
                online: d.online,
                last_seen: d.last_seen,
                desired_generation: state.store.desired(&d.id)?.map(|s| s.generation),
                generation: d.generation,
                not_received: d
                    .rollouts
                    .iter()
                    .filter(|(_, sent)| d.generation.is_none_or(|g| g < sent.generation))
                    .map(|(name, sent)| format!("{name}@{}", sent.revision))
                    .collect(),
                held: d
                    .rollouts
                    .iter()
                    .filter_map(|(name, sent)| Some(format!("{name}@{}: {}", sent.revision, sent.held.as_ref()?)))
                    .collect(),
            });
        }
        sites.push(SiteView {
            id: site.id,
            online: site.online,
            last_sync: site.last_sync,
            acked_seq: site.acked_seq,
            devices: of_site,
        });
    }
    Ok(Json(sites))
}
