//! Devices held for approval (`unknown-devices = "hold"`): list, approve, reject.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{check_id, ApiError, AppState};
use crate::store::PendingDevice;

pub(super) async fn list(State(state): State<AppState>) -> Result<Json<Vec<PendingDevice>>, ApiError> {
    Ok(Json(state.store.pending()?))
}

/// From now on the device connects with the token it presented last.
pub(super) async fn approve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PendingDevice>, ApiError> {
    check_id(&id)?;
    let approved = state.store.approve(&id)?.ok_or_else(|| not_pending(&id))?;
    state.store.flush().await?;
    tracing::info!(device = %id, "an operator approved a device");
    Ok(Json(approved))
}

/// Forgets the request; the device stays refused, and is held again if it
/// tries again.
pub(super) async fn reject(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    if !state.store.reject(&id)? {
        return Err(not_pending(&id));
    }
    Ok(StatusCode::NO_CONTENT)
}

fn not_pending(id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no device {id:?} waits for approval: `hub pending` lists those that do (with unknown-devices = \"hold\")"
    ))
}
