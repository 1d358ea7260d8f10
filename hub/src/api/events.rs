//! A device's events, oldest first.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use outpost_proto::Event;
use serde::Deserialize;

use super::{check_id, no_device, ApiError, AppState};

const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// Only events numbered above this.
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

pub(super) async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Vec<Event>>, ApiError> {
    check_id(&id)?;
    let Query(query) = query.map_err(|e| {
        ApiError::BadRequest(format!("the query takes `after` and `limit`, both numbers: {}", e.body_text()))
    })?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be between 1 and {MAX_LIMIT}")));
    }
    if state.store.device(&id)?.is_none() {
        return Err(no_device(&id));
    }
    Ok(Json(state.store.events(&id, query.after, limit)?))
}
