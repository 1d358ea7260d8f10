//! Enrollment: an operator asks the hub for a one-time token for a device
//! (`hub enroll-token DEVICE`, `POST /v1/devices/{id}/enroll-token` on the
//! operators' API); the device sends it with a CSR for a key it made itself
//! to `POST /v1/enroll` on the enrollment listener (`enroll-listen`, HTTPS),
//! and gets its certificate (common name = its id) and the hub's CA
//! certificate. Only the token's sha256 is stored; a token serves once
//! (taken from the store whatever the outcome) and expires.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::broker::token_sha256;
use crate::pki::{Ca, PkiError};
use crate::registry::valid_device_id;
use crate::store::{EnrollToken, Store, StoreError};
use crate::sync::{now_ms, HUB_CLIENT_ID};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "the enrollment token is unknown, already used or expired: ask the operator for a new one \
         (`hub enroll-token DEVICE`)"
    )]
    BadToken,
    #[error("device id {0:?} is not valid: use letters, digits, `.`, `_` and `-`, and not the hub's own id")]
    InvalidId(String),
    #[error(
        "enrollment is off on this hub: set enroll-listen in its configuration (docs/identity.md), \
         or provision the device with `hub issue-cert`"
    )]
    Off,
    #[error("the system's random number generator failed: no token was made")]
    Random,
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `POST /v1/devices/{id}/enroll-token` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct NewToken {
    pub device: String,
    pub token: String,
    /// Unix milliseconds.
    pub expires: u64,
}

/// The body of `POST /v1/enroll`.
#[derive(Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    /// PKCS#10, PEM.
    pub csr: String,
}

/// What `POST /v1/enroll` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Enrolled {
    pub device: String,
    /// The device's certificate, PEM.
    pub cert: String,
    /// The hub CA's certificate, PEM: the device trusts the hub by it.
    pub ca: String,
}

/// Makes a token for `device`, usable once within `ttl`.
pub fn new_token(store: &Store, device: &str, ttl: Duration, now: u64) -> Result<NewToken, EnrollError> {
    if !valid_device_id(device) || device == HUB_CLIENT_ID {
        return Err(EnrollError::InvalidId(device.to_string()));
    }
    let token = crate::random_token().map_err(|_| EnrollError::Random)?;
    let expires = now.saturating_add(ttl.as_millis() as u64);
    store.put_enroll_token(&token_sha256(&token), &EnrollToken { device: device.to_string(), expires })?;
    Ok(NewToken { device: device.to_string(), token, expires })
}

/// Takes the token and signs the CSR for the device it names.
pub fn redeem(store: &Store, ca: &Ca, request: &EnrollRequest, now: u64) -> Result<Enrolled, EnrollError> {
    let Some(token) = store.take_enroll_token(&token_sha256(&request.token))? else {
        warn!("refused an enrollment: unknown or already used token");
        return Err(EnrollError::BadToken);
    };
    if token.expires <= now {
        warn!(device = token.device, "refused an enrollment: the token expired");
        return Err(EnrollError::BadToken);
    }
    let cert = ca.issue_device_cert(&token.device, &request.csr)?;
    info!(device = token.device, "enrolled a device: it has its certificate");
    Ok(Enrolled { device: token.device, cert, ca: ca.cert_pem().to_string() })
}

#[derive(Clone)]
struct OperatorState {
    store: Store,
    ttl: Duration,
    enabled: bool,
}

/// The operators' side, merged into their API.
pub fn operator_router(store: Store, ttl: Duration, enabled: bool) -> Router {
    Router::new().route("/v1/devices/{id}/enroll-token", post(create_token)).with_state(OperatorState {
        store,
        ttl,
        enabled,
    })
}

async fn create_token(
    State(state): State<OperatorState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<NewToken>), EnrollError> {
    if !state.enabled {
        return Err(EnrollError::Off);
    }
    let token = new_token(&state.store, &id, state.ttl, now_ms())?;
    state.store.flush().await?;
    info!(device = %id, "an operator made an enrollment token");
    Ok((StatusCode::CREATED, Json(token)))
}

#[derive(Clone)]
struct DeviceState {
    store: Store,
    ca: Arc<Ca>,
}

/// The devices' side: the only route of the enrollment listener.
pub fn device_router(store: Store, ca: Arc<Ca>) -> Router {
    Router::new().route("/v1/enroll", post(enroll)).with_state(DeviceState { store, ca })
}

async fn enroll(
    State(state): State<DeviceState>,
    Json(request): Json<EnrollRequest>,
) -> Result<Json<Enrolled>, EnrollError> {
    let enrolled = redeem(&state.store, &state.ca, &request, now_ms())?;
    // The token is gone for good before the device learns it worked.
    state.store.flush().await?;
    Ok(Json(enrolled))
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for EnrollError {
    fn into_response(self) -> Response {
        let status = match &self {
            EnrollError::BadToken => StatusCode::FORBIDDEN,
            EnrollError::InvalidId(_) | EnrollError::Pki(PkiError::Csr(_) | PkiError::DeviceId(_)) => {
                StatusCode::BAD_REQUEST
            }
            EnrollError::Off => StatusCode::CONFLICT,
            EnrollError::Random | EnrollError::Pki(_) | EnrollError::Store(_) => {
                tracing::error!("enrollment failed: {self}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(ErrorBody { error: self.to_string() })).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
    }

    fn hub() -> (tempfile::TempDir, Store, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let ca = Ca::open_or_create(&dir.path().join("pki")).unwrap();
        (dir, store, ca)
    }

    #[test]
    fn a_token_enrolls_its_device_once() {
        let (_dir, store, ca) = hub();
        let token = new_token(&store, "pump-3", Duration::from_secs(60), 1_000).unwrap();
        assert_eq!(token.expires, 61_000);
        let request = EnrollRequest { token: token.token.clone(), csr: csr() };
        let enrolled = redeem(&store, &ca, &request, 2_000).unwrap();
        assert_eq!(enrolled.device, "pump-3");
        assert_eq!(enrolled.ca, ca.cert_pem());
        assert!(matches!(redeem(&store, &ca, &request, 2_000), Err(EnrollError::BadToken)), "used twice");
    }

    #[test]
    fn an_expired_unknown_or_misused_token_enrolls_nothing() {
        let (_dir, store, ca) = hub();
        let token = new_token(&store, "pump-3", Duration::from_secs(60), 1_000).unwrap();
        let request = EnrollRequest { token: token.token, csr: csr() };
        assert!(matches!(redeem(&store, &ca, &request, 61_000), Err(EnrollError::BadToken)), "expired");
        let request = EnrollRequest { token: "guess".into(), csr: csr() };
        assert!(matches!(redeem(&store, &ca, &request, 0), Err(EnrollError::BadToken)));
        // A broken CSR uses the token up too: the device asks for a new one.
        let token = new_token(&store, "pump-3", Duration::from_secs(60), 0).unwrap();
        let request = EnrollRequest { token: token.token, csr: "junk".into() };
        assert!(matches!(redeem(&store, &ca, &request, 0), Err(EnrollError::Pki(PkiError::Csr(_)))));
        assert!(matches!(redeem(&store, &ca, &request, 0), Err(EnrollError::BadToken)));
    }

    #[test]
    fn only_valid_device_ids_get_tokens_and_tokens_are_stored_hashed() {
        let (_dir, store, _ca) = hub();
        assert!(matches!(new_token(&store, "a/b", Duration::from_secs(1), 0), Err(EnrollError::InvalidId(_))));
        assert!(matches!(new_token(&store, HUB_CLIENT_ID, Duration::from_secs(1), 0), Err(EnrollError::InvalidId(_))));
        let token = new_token(&store, "pump-3", Duration::from_secs(1), 0).unwrap();
        assert!(store.take_enroll_token(&token.token).unwrap().is_none(), "not stored in clear");
        assert!(store.take_enroll_token(&token_sha256(&token.token)).unwrap().is_some());
    }
}
