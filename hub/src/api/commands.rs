//! Operators' commands to a device, and the logs devices send back.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use outpost_proto::sync::Command;
use serde::{Deserialize, Serialize};

use super::{check_id, no_device, ApiError, AppState};
use crate::logs::LogsReply;
use crate::registry;

/// What `POST .../commands` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSent {
    /// The command's id, which the device's reply carries.
    pub id: u64,
}

/// Numbers the command, makes the number durable (a reply never matches an
/// older command's), then has it published. 202: the device acts on it when
/// it gets it.
pub(super) async fn post(
    State(state): State<AppState>,
    Path(id): Path<String>,
    command: Result<Json<Command>, JsonRejection>,
) -> Result<(StatusCode, Json<CommandSent>), ApiError> {
    let Json(command) = command.map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be a command: {{\"command\": \"restart-workload\", \"name\": ...}} or {{\"command\": \
             \"send-logs\", \"name\": ..., \"tail\": N}}: {}",
            e.body_text()
        ))
    })?;
    let message = registry::command(&state.store, &id, command)?;
    state.store.flush().await?;
    let sent = CommandSent { id: message.id };
    state.publisher.command(&id, message);
    Ok((StatusCode::ACCEPTED, Json(sent)))
}

/// The newest logs the device sent for the workload.
pub(super) async fn logs(
    State(state): State<AppState>,
    Path((id, workload)): Path<(String, String)>,
) -> Result<Json<LogsReply>, ApiError> {
    check_id(&id)?;
    if state.store.device(&id)?.is_none() {
        return Err(no_device(&id));
    }
    let replies = state.logs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match replies.get(&id, &workload) {
        Some(reply) => Ok(Json(reply.clone())),
        None => Err(ApiError::NotFound(format!(
            "device {id:?} has sent no logs of {workload:?} lately: ask with `send-logs` (`hub logs {id} {workload}`)"
        ))),
    }
}
