//! The HTTP API for operators (axum): JSON in and out, described in
//! docs/hub-api.md. Every error is a status and `{ "error": "..." }` that
//! says what is wrong.

mod commands;
mod deployments;
mod desired;
mod devices;
mod events;
mod holds;
mod pending;
mod sites;

use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

pub use commands::CommandSent;
pub use devices::DeviceView;
pub use holds::HoldView;

use crate::logs::SharedReplies;
use crate::registry::{valid_device_id, CommandError, DesiredError, LabelsError};
use std::sync::Arc;

use crate::rollout::engine::Engine;
use crate::rollout::pin::Registries;
use crate::rollout::policy::Policy;
use crate::store::{Store, StoreError};
use crate::sync::Publisher;

#[derive(Clone)]
struct AppState {
    store: Store,
    publisher: Publisher,
    logs: SharedReplies,
    engine: Engine,
    admission: Arc<Admission>,
    /// Set on a site hub: wakes the link to the parent when something was queued for it.
    upward: Option<Arc<tokio::sync::Notify>>,
}

/// What a deployment must pass before it is stored.
pub(crate) struct Admission {
    /// The operator's root, from `trust-root`: signed deployments are checked against it.
    pub trust: Option<ota::metadata::Root>,
    pub policy: Policy,
    pub registries: Registries,
    /// Set on a site hub: its id at its parent. Desired states set by hand
    /// are refused there: the site composes the parent's deployments with
    /// its own (docs/federation.md), and a hand-set state would be neither.
    pub site_hub: Option<String>,
}

impl Admission {
    /// Refuses a site-local change on a site hub, saying why and what to do.
    fn refuse_on_site(&self, what: &str) -> Result<(), ApiError> {
        match &self.site_hub {
            Some(site) => Err(ApiError::Conflict(format!(
                "this is the site hub of {site:?}: {what} come from its parent and its site-local deployments; \
                 apply a deployment here (`hub apply`) or at the parent hub (docs/federation.md)"
            ))),
            None => Ok(()),
        }
    }
}

pub(crate) fn router(
    store: Store,
    publisher: Publisher,
    logs: SharedReplies,
    engine: Engine,
    admission: Admission,
    upward: Option<Arc<tokio::sync::Notify>>,
) -> Router {
    Router::new()
        .route("/v1/devices", get(devices::list))
        .route("/v1/devices/{id}", get(devices::show))
        .route("/v1/devices/{id}/labels", axum::routing::put(devices::put_labels))
        .route("/v1/devices/{id}/desired", get(desired::get).put(desired::put))
        .route("/v1/devices/{id}/events", get(events::list))
        .route("/v1/devices/{id}/commands", post(commands::post))
        .route("/v1/devices/{id}/logs/{workload}", get(commands::logs))
        .route("/v1/deployments", get(deployments::list))
        .route("/v1/deployments/{name}", get(deployments::show).put(deployments::put).delete(deployments::delete))
        .route("/v1/deployments/{name}/revisions", get(deployments::revisions))
        .route("/v1/deployments/{name}/rollout/{action}", post(deployments::rollout_action))
        .route("/v1/sites", get(sites::list))
        .route("/v1/site-holds", get(holds::list))
        .route("/v1/site-holds/{name}", axum::routing::put(holds::put).delete(holds::delete))
        .route("/v1/pending-devices", get(pending::list))
        .route("/v1/pending-devices/{id}", axum::routing::delete(pending::reject))
        .route("/v1/pending-devices/{id}/approve", axum::routing::post(pending::approve))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(AppState { store, publisher, logs, engine, admission: Arc::new(admission), upward })
}

#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Refused by the hub's admission policy.
    #[error("{0}")]
    Forbidden(String),
    /// A registry the hub asked failed.
    #[error("{0}")]
    Upstream(String),
    #[error("{0}")]
    WrongMethod(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::WrongMethod(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Store(e) => {
                tracing::error!("API request failed: {e}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(ErrorBody { error: self.to_string() })).into_response()
    }
}

impl From<DesiredError> for ApiError {
    fn from(e: DesiredError) -> Self {
        match e {
            DesiredError::InvalidId(_) | DesiredError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            DesiredError::NotNewer { .. } => ApiError::Conflict(e.to_string()),
            DesiredError::Store(e) => ApiError::Store(e),
        }
    }
}

impl From<LabelsError> for ApiError {
    fn from(e: LabelsError) -> Self {
        match e {
            LabelsError::InvalidId(_) | LabelsError::InvalidKey(_) => ApiError::BadRequest(e.to_string()),
            LabelsError::Store(e) => ApiError::Store(e),
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::InvalidId(_)
            | CommandError::NoWorkload
            | CommandError::Tail(_)
            | CommandError::FullReport => ApiError::BadRequest(e.to_string()),
            CommandError::UnknownDevice(_) => ApiError::NotFound(e.to_string()),
            CommandError::Store(e) => ApiError::Store(e),
        }
    }
}

/// Refuses an id that no device can have, before looking it up.
fn check_id(id: &str) -> Result<(), ApiError> {
    if valid_device_id(id) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!("device id {id:?} is not valid: use letters, digits, `.`, `_` and `-`")))
    }
}

fn no_device(id: &str) -> ApiError {
    ApiError::NotFound(format!("no device {id:?}: it has not connected, and has no labels or desired state"))
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no endpoint {method} {}: see docs/hub-api.md", uri.path()))
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::WrongMethod(format!("{method} is not allowed on {}: see docs/hub-api.md", uri.path()))
}
