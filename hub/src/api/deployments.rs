//! Fleet deployments: apply, list, show, delete, revisions, and the rollout's
//! pause, resume, abort and rollback. Each change is stored, then the
//! rollout engine runs a pass, so the answer shows its effect.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use outpost_proto::fleet::{valid_name, DeploymentSpec, DeploymentStatus};
use outpost_proto::Signature;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::rollout::pin::{self, PinError};
use crate::rollout::{self, policy, DeploymentRecord, NotNow, Revision};

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

/// A signed apply: the spec, and the operator's signatures over its
/// deployment as revision `revision`, the one the hub will assign.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedApply {
    spec: DeploymentSpec,
    revision: u64,
    signatures: Vec<Signature>,
}

/// A signed apply's revision and signatures.
type Signing = (u64, Vec<Signature>);

/// The body is a spec (unsigned), or `{"spec", "revision", "signatures"}`.
fn parse_apply(body: &[u8]) -> Result<(DeploymentSpec, Option<Signing>), ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the deployment is not valid JSON: {e}")))?;
    if value.get("spec").is_some() {
        let signed: SignedApply = serde_json::from_value(value)
            .map_err(|e| ApiError::BadRequest(format!("the signed deployment is not valid: {e}")))?;
        return Ok((signed.spec, Some((signed.revision, signed.signatures))));
    }
    let spec = serde_json::from_value(value)
        .map_err(|e| ApiError::BadRequest(format!("the deployment is not valid JSON of a deployment: {e}")))?;
    Ok((spec, None))
}

/// Stores the spec as a new revision (unless it is the newest already) and starts its rollout.
pub(super) async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<DeploymentStatus>, ApiError> {
    check_name(&name)?;
    let (mut spec, signed) = parse_apply(&body)?;
    if spec.name != name {
        return Err(ApiError::BadRequest(format!(
            "the deployment is named {:?}, not {name:?} as in the URL",
            spec.name
        )));
    }
    spec.validate().map_err(|e| ApiError::BadRequest(format!("deployment {name:?}: {e}")))?;
    policy::admit(&state.admission.policy, &spec)
        .map_err(|refusal| ApiError::Forbidden(format!("deployment {name:?} refused: {refusal}")))?;
    match &signed {
        // The hub must not change a signed document, so it cannot pin it: the CLI pins before signing.
        Some((revision, signatures)) => {
            if let Some(w) = spec.workloads.iter().find(|w| !ota::deployment::pinned(&w.image)) {
                return Err(ApiError::BadRequest(format!(
                    "deployment {name:?}: workload {:?} image {:?} is not pinned by digest, and the hub cannot pin \
                     a signed deployment without breaking its signature: pin it before signing (`hub apply --key` \
                     does)",
                    w.name, w.image
                )));
            }
            if let Some(root) = &state.admission.trust {
                let deployment = rollout::deployment(&spec, *revision, signatures.clone());
                ota::verify_deployment(&deployment, root)
                    .map_err(|e| ApiError::BadRequest(format!("{e}; devices would refuse it: sign it again")))?;
            }
        }
        // Pinned before storing, so a tag that moves later changes no revision.
        None => pin::pin_images(&mut spec, &state.admission.registries).await.map_err(|e| match e {
            PinError::InvalidReference { .. } | PinError::NotFound { .. } => {
                ApiError::BadRequest(format!("deployment {name:?}: {e}"))
            }
            PinError::Unresolved { .. } => ApiError::Upstream(format!("deployment {name:?}: {e}")),
        })?,
    }
    let now = crate::sync::now_ms();
    let outcome = state.store.update_deployment(&name, |old| {
        let signatures = match &signed {
            None => Vec::new(),
            Some((revision, signatures)) => {
                // The same spec again is the newest revision; any other is the next one.
                let expected = match &old {
                    Some(record) if record.newest().spec == spec => record.newest().revision,
                    _ => DeploymentRecord::next_revision(old.as_ref()),
                };
                if *revision != expected {
                    let error = ApiError::Conflict(format!(
                        "deployment {name:?}: the signatures are for revision {revision}, but this spec would be \
                         revision {expected}: the deployment moved on meanwhile; sign it again (`hub apply --key` \
                         reads the newest revision)"
                    ));
                    return (old, Err(error));
                }
                signatures.clone()
            }
        };
        let (record, new) = DeploymentRecord::apply(old, spec.clone(), signatures, now);
        (Some(record), Ok(new))
    })?;
    let new = outcome?;
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
    let parents = state.admission.site_hub.is_some() && !state.store.parent_revision_numbers(&name)?.is_empty();
    let outcome = state.store.update_deployment(&name, |old| match old {
        None if parents => (
            None,
            Err(ApiError::NotFound(format!(
                "{name:?} is the parent hub's deployment: at this site, hold its rollout with `hub hold pause {name}` \
             or `hub hold rollback {name}` (docs/federation.md)"
            ))),
        ),
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

pub(super) fn check_name(name: &str) -> Result<(), ApiError> {
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
