//! Devices: list, show, labels.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::Json;
use outpost_proto::sync::WorkloadReport;
use serde::{Deserialize, Serialize};

use super::{check_id, no_device, ApiError, AppState};
use crate::registry;
use crate::store::{Device, Refusal};

/// A device as the API shows it. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// Empty until the device reports it.
    pub agent_version: String,
    pub first_seen: Option<u64>,
    pub last_seen: Option<u64>,
    pub online: bool,
    /// The desired-state generation the device reported as stored.
    pub generation: Option<u64>,
    /// The generation of the desired state the hub holds for it.
    pub desired_generation: Option<u64>,
    /// The epoch of the device's store, which `report_seq` and `event_seq` count in; 0 if it sends none.
    pub epoch: u64,
    /// The last report and event sequence numbers the hub stored (and
    /// acknowledged), as the device numbers them in its epoch.
    pub report_seq: u64,
    pub event_seq: u64,
    /// When the device's numbering last started afresh under a new epoch:
    /// its store was wiped or replaced (or its agent upgraded to one with epochs).
    pub store_reset_at: Option<u64>,
    /// True when the hub missed a report and waits for the full report it
    /// asked for: `workloads` may be out of date.
    pub stale: bool,
    pub workloads: Vec<WorkloadReport>,
    /// The last desired state the device refused because its signatures did not verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
    /// The site hub the device is reached through (docs/federation.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Deployments the device reports running that this hub did not send:
    /// applied on site, at the device's site hub.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub site_local: Vec<String>,
}

impl DeviceView {
    fn new(device: Device, desired: Option<&outpost_proto::DesiredState>) -> Self {
        let sent = |name: &str| desired.is_some_and(|s| s.deployment(name).is_some());
        let site_local: std::collections::BTreeSet<String> = device
            .workloads
            .values()
            .filter_map(|w| w.deployment.clone())
            .filter(|name| device.site.is_some() && !sent(name))
            .collect();
        let desired_generation = desired.map(|s| s.generation);
        Self {
            id: device.id,
            labels: device.labels,
            agent_version: device.agent_version,
            first_seen: device.first_seen,
            last_seen: device.last_seen,
            online: device.online,
            generation: device.generation,
            desired_generation,
            epoch: device.epoch,
            report_seq: device.report_seq,
            event_seq: device.event_seq,
            store_reset_at: device.store_reset_at,
            stale: device.stale,
            workloads: device.workloads.into_values().collect(),
            refused: device.refused,
            site: device.site,
            site_local: site_local.into_iter().collect(),
        }
    }
}

fn view(state: &AppState, device: Device) -> Result<DeviceView, ApiError> {
    let desired = state.store.desired(&device.id)?;
    Ok(DeviceView::new(device, desired.as_ref()))
}

pub(super) async fn list(State(state): State<AppState>) -> Result<Json<Vec<DeviceView>>, ApiError> {
    let devices = state.store.devices()?;
    Ok(Json(devices.into_iter().map(|d| view(&state, d)).collect::<Result<_, _>>()?))
}

pub(super) async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<DeviceView>, ApiError> {
    check_id(&id)?;
    let device = state.store.device(&id)?.ok_or_else(|| no_device(&id))?;
    Ok(Json(view(&state, device)?))
}

/// Replaces the labels; creates the device's record if it has not connected yet.
pub(super) async fn put_labels(
    State(state): State<AppState>,
    Path(id): Path<String>,
    labels: Result<Json<BTreeMap<String, String>>, JsonRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let Json(labels) = labels
        .map_err(|e| ApiError::BadRequest(format!("labels must be a JSON object of strings: {}", e.body_text())))?;
    let device = registry::set_labels(&state.store, &id, &labels)?;
    state.store.flush().await?;
    Ok(Json(view(&state, device)?))
}
