//! Fleet deployments: apply, list, show, delete, revisions, and the rollout's
//! pause, resume, abort and rollback. Each change is stored, then the
//! rollout engine runs a pass, so the answer shows its effect.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use outpost_proto::fleet::{valid_name, DeploymentSpec, DeploymentStatus};
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::rollout::pin::{self, PinError};
use crate::rollout::{policy, DeploymentRecord, NotNow, Revision};

pub(super) async fn list(State(state): State<AppState>) -> Result<Json<Vec<DeploymentStatus>>, ApiError> {
    Ok(Json(state.engine.statuses().await?))
}

pub(super) async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DeploymentStatus>, ApiError> {
    check_name(&name)?;
    state.engine.status(&name).await?.map(Json).ok_or_else(|| no_deployment(&name))
}

/// Stores the spec as a new revision (unless it is the newest already) and starts its rollout.
pub(super) async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<DeploymentStatus>, ApiError> {
    check_name(&name)?;
    let mut spec: DeploymentSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the deployment is not valid JSON of a deployment: {e}")))?;
    if spec.name != name {
        return Err(ApiError::BadRequest(format!(
            "the deployment is named {:?}, not {name:?} as in the URL",
            spec.name
        )));
    }
    spec.validate().map_err(|e| ApiError::BadRequest(format!("deployment {name:?}: {e}")))?;
    policy::admit(&state.admission.policy, &spec)
        .map_err(|refusal| ApiError::Forbidden(format!("deployment {name:?} refused: {refusal}")))?;
    // Pinned before storing, so a tag that moves later changes no revision.
    pin::pin_images(&mut spec, &state.admission.registries).await.map_err(|e| match e {
        PinError::InvalidReference { .. } | PinError::NotFound { .. } => {
            ApiError::BadRequest(format!("deployment {name:?}: {e}"))
        }
        PinError::Unresolved { .. } => ApiError::Upstream(format!("deployment {name:?}: {e}")),
    })?;
    let now = crate::sync::now_ms();
    let new = state.store.update_deployment(&name, |old| {
        let (record, new) = DeploymentRecord::apply(old, spec.clone(), now);
        (Some(record), new)
    })?;
    state.store.flush().await?;
    if new {
        tracing::info!(deployment = %name, "an operator applied a new revision");
    }
    state.engine.pass().await?;
    state.engine.status(&name).await?.map(Json).ok_or_else(|| no_deployment(&name))
}

/// Removes the deployment: its workloads go from every device.
pub(super) async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    let existed = state.store.update_deployment(&name, |old| (None, old.is_some()))?;
    if !existed {
        return Err(no_deployment(&name));
    }
    state.store.flush().await?;
    state.engine.pass().await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn revisions(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Revision>>, ApiError> {
    check_name(&name)?;
    let record = state.store.deployment(&name)?.ok_or_else(|| no_deployment(&name))?;
    Ok(Json(record.revisions))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RollbackBody {
    revision: Option<u64>,
}

pub(super) async fn rollout_action(
    State(state): State<AppState>,
    Path((name, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<DeploymentStatus>, ApiError> {
    check_name(&name)?;
    let to = if body.is_empty() {
        None
    } else {
        let body: RollbackBody = serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("the body takes {{\"revision\": N}}, or nothing: {e}")))?;
        body.revision
    };
    if to.is_some() && action != "rollback" {
        return Err(ApiError::BadRequest(format!("{action} takes no body")));
    }
    let now = crate::sync::now_ms();
    let change: fn(&mut DeploymentRecord, Option<u64>, u64) -> Result<(), NotNow> = match action.as_str() {
        "pause" => |record, _, now| record.pause(now),
        "resume" => |record, _, now| record.resume(now),
        "abort" => |record, _, now| record.abort(now),
        "rollback" => |record, to, now| record.rollback(to, now),
        _ => {
            return Err(ApiError::NotFound(format!(
                "no rollout action {action:?}: pause, resume, abort or rollback (see docs/hub-api.md)"
            )))
        }
    };
    let outcome = state.store.update_deployment(&name, |old| match old {
        None => (None, Err(no_deployment(&name))),
        Some(mut record) => match change(&mut record, to, now) {
            Ok(()) => (Some(record), Ok(())),
            Err(NotNow(why)) => (Some(record), Err(ApiError::Conflict(why))),
        },
    })?;
    outcome?;
    state.store.flush().await?;
    tracing::info!(deployment = %name, "an operator asked the rollout to {action}");
    state.engine.pass().await?;
    state.engine.status(&name).await?.map(Json).ok_or_else(|| no_deployment(&name))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "deployment name {name:?} is not valid: use letters, digits, `.`, `_` and `-`"
        )))
    }
}

fn no_deployment(name: &str) -> ApiError {
    ApiError::NotFound(format!("no deployment {name:?}: `hub deployments` lists them"))
}
