//! A device's desired state.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use outpost_proto::DesiredState;

use super::{check_id, ApiError, AppState};
use crate::registry;

pub(super) async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<DesiredState>, ApiError> {
    check_id(&id)?;
    let desired = state.store.desired(&id)?;
    desired.map(Json).ok_or_else(|| ApiError::NotFound(format!("device {id:?} has no desired state")))
}

/// Stores the state (its generation above the stored one), flushes, then
/// has it published, retained: a device never sees a state the hub could lose.
pub(super) async fn put(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DesiredState>, ApiError> {
    state.admission.refuse_on_site("desired states")?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("the desired state must be UTF-8 JSON".into()))?;
    if !text.trim_start().starts_with('{') {
        return Err(ApiError::BadRequest("the desired state must be a JSON object".into()));
    }
    let desired = DesiredState::parse(text).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if let Some(root) = &state.admission.trust {
        ota::verify_desired(&desired, root)
            .map_err(|e| ApiError::BadRequest(format!("{e}; devices would refuse it: sign it again")))?;
    }
    if let Some(device) = state.store.device(&id)?.filter(|d| !d.rollouts.is_empty()) {
        let names: Vec<&str> = device.rollouts.keys().map(String::as_str).collect();
        return Err(ApiError::Conflict(format!(
            "device {id:?} runs the fleet deployments {}: its desired state is theirs; change them, or the device's labels",
            names.join(", ")
        )));
    }
    registry::set_desired(&state.store, &id, &desired)?;
    state.store.flush().await?;
    state.publisher.desired_changed(&id);
    Ok(Json(desired))
}
