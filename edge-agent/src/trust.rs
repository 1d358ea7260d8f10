//! The device's trust in its operator: nothing is stored to run unless a
//! threshold of the root's `deployments` keys signed each of its deployments.
//!
//! The root is the store's (`Store::trusted_root`, which later roots rotate),
//! seeded on first use from the config's `trust-root` file once that root is
//! seen to sign itself. Without one, new desired states are refused, while the
//! stored one keeps running: a cold boot with no network must still work.

use std::path::{Path, PathBuf};

use ota::metadata::Root;
use ota::{DeploymentError, TrustedState, VerifyError};
use outpost_proto::DesiredState;

use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "no trusted root to verify deployments and updates with: the store has none and trust-root {path:?} cannot be read \
         ({source}); write the operator's root.json there (made with `ota new-root`, see docs/trust.md) or point \
         `trust-root` in the agent's config at it"
    )]
    NoRoot { path: PathBuf, source: std::io::Error },
    #[error("trust-root {path:?} is not a root that signs itself: {source}")]
    BadRoot { path: PathBuf, source: VerifyError },
    #[error("the trusted root in the store is unusable: {0}")]
    StoredRoot(VerifyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Refused(#[from] DeploymentError),
}

/// What the device trusts, for deployments and updates alike: the store's
/// root (the newest rotated to) and versions, or the first time the root at
/// `path`, checked to sign itself and stored for next time.
pub fn trusted_state(store: &Store, path: &Path) -> Result<TrustedState, TrustError> {
    let versions = store.trusted_versions()?;
    if let Some(bytes) = store.trusted_root()? {
        return TrustedState::new(&bytes, versions).map_err(TrustError::StoredRoot);
    }
    let bytes = std::fs::read(path).map_err(|source| TrustError::NoRoot { path: path.to_owned(), source })?;
    let state =
        TrustedState::new(&bytes, versions).map_err(|source| TrustError::BadRoot { path: path.to_owned(), source })?;
    store.set_trust(Some(&bytes), &state.versions())?;
    tracing::info!(root = %path.display(), version = state.root().version, "trusted the operator's root");
    Ok(state)
}

/// The root deployments are verified against (see [`trusted_state`]).
pub fn trusted_root(store: &Store, path: &Path) -> Result<Root, TrustError> {
    Ok(trusted_state(store, path)?.root().clone())
}

/// Verifies every deployment of `state` against the trusted root.
pub fn verify(store: &Store, trust_root: &Path, state: &DesiredState) -> Result<(), TrustError> {
    let root = trusted_root(store, trust_root)?;
    ota::verify_desired(state, &root)?;
    Ok(())
}
