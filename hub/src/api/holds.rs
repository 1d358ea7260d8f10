//! On a site hub: an operator's holds on the parent's rollouts
//! (docs/federation.md, "Holding the parent's rollouts on site").

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use outpost_proto::federation::SiteHold;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};
use crate::site::{HoldError, HoldRequest};

/// A hold as the API shows it, with the devices it keeps a revision from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldView {
    #[serde(flatten)]
    pub hold: SiteHold,
    pub devices_held: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HoldBody {
    action: String,
    revision: Option<u64>,
    reason: Option<String>,
}

fn site_hub(state: &AppState) -> Result<(), ApiError> {
    match state.admission.site_hub {
        Some(_) => Ok(()),
        None => Err(ApiError::Conflict(
            "this hub has no parent: its rollouts are its own, pause or roll them back with `hub rollout`".into(),
        )),
    }
}

fn view(state: &AppState, hold: SiteHold) -> Result<HoldView, ApiError> {
    let mut devices_held = Vec::new();
    for device in state.store.devices()? {
        let source = state.store.source(&device.id, true)?;
        if source.is_some_and(|s| s.held.contains_key(&hold.deployment)) {
            devices_held.push(device.id);
        }
    }
    Ok(HoldView { hold, devices_held })
}

pub(super) async fn list(State(state): State<AppState>) -> Result<Json<Vec<HoldView>>, ApiError> {
    site_hub(&state)?;
    let holds = state.store.site_holds()?;
    holds.into_values().map(|hold| view(&state, hold)).collect::<Result<_, _>>().map(Json)
}

pub(super) async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<HoldView>, ApiError> {
    site_hub(&state)?;
    super::deployments::check_name(&name)?;
    let body: HoldBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body takes {{\"action\": \"pause\"}} or {{\"action\": \"rollback\", \"revision\": N}}, \
             each with an optional \"reason\": {e}"
        ))
    })?;
    let request = match (body.action.as_str(), body.revision) {
        ("pause", None) => HoldRequest::Pause,
        ("pause", Some(_)) => return Err(ApiError::BadRequest("pause takes no revision".into())),
        ("rollback", to) => HoldRequest::Rollback(to),
        (other, _) => return Err(ApiError::BadRequest(format!("no hold action {other:?}: pause or rollback"))),
    };
    let store = state.store.clone();
    let now = crate::sync::now_ms();
    let (hold, changed) =
        tokio::task::spawn_blocking(move || crate::site::hold(&store, &name, request, body.reason, now))
            .await
            .expect("a hold does not panic")
            .map_err(|e| match e {
                HoldError::Unknown(_) => ApiError::NotFound(e.to_string()),
                HoldError::NoSuchRevision { .. } | HoldError::NothingBefore(_) => ApiError::Conflict(e.to_string()),
                HoldError::Store(e) => ApiError::Store(e),
            })?;
    tracing::info!(deployment = %hold.deployment, action = ?hold.action, devices = changed.len(),
        "an operator on site holds the parent's rollout");
    publish(&state, &changed).await?;
    view(&state, hold).map(Json)
}

pub(super) async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    site_hub(&state)?;
    super::deployments::check_name(&name)?;
    let store = state.store.clone();
    let released = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || crate::site::release(&store, &name))
            .await
            .expect("a release does not panic")?
    };
    let Some(changed) = released else {
        return Err(ApiError::NotFound(format!("no hold on {name:?} at this site: `hub holds` lists them")));
    };
    tracing::info!(deployment = %name, devices = changed.len(), "an operator on site released the hold");
    publish(&state, &changed).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Flushes, then hands the changed desired states to devices and what the
/// parent should hear to the link.
async fn publish(state: &AppState, changed: &[String]) -> Result<(), ApiError> {
    state.store.flush().await?;
    for device in changed {
        state.publisher.desired_changed(device);
    }
    if let Some(upward) = &state.upward {
        upward.notify_one();
    }
    Ok(())
}
