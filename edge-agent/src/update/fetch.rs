//! The signed way in: TUF metadata from `{hub-http}/v1/tuf/`, the artifact
//! from `{hub-http}/v1/artifacts/sha256:<hex>`, into the inactive slot.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ota::metadata::RoleType;
use ota::verify::{max_size, TrustedState, VerifyError};
use ota::{Digest, Download, DownloadError, RetryPolicy, Slot, SlotBackend, SlotError};

use outpost_proto::{AgentUpdate, UpdateOrigin};

use super::{AgentSlots, Pending, BOOTLIMIT};
use crate::config::Config;
use crate::store::{Store, StoreError};
use crate::trust::{trusted_state, TrustError};

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("no hub-http is configured: set hub-http (e.g. \"http://hub.local:8080\") to update from the hub")]
    NoHub,
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("request to {url} failed: {source}; check hub-http and the link")]
    Request { url: String, source: reqwest::Error },
    #[error("{url} is not there (HTTP 404): the hub publishes no update metadata there; check hub-http")]
    Missing { url: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: reqwest::StatusCode },
    #[error("{url} sent more than {cap} bytes, over the cap for its role; refused unread")]
    TooLarge { url: String, cap: u64 },
    #[error("the update metadata was refused: {0}")]
    Verify(#[from] VerifyError),
    #[error("target {name:?} has a malformed sha256 {sha256:?}; the repository must publish it again")]
    BadDigest { name: String, sha256: String },
    #[error("the download failed: {0}")]
    Download(#[from] DownloadError),
    #[error("installing into the agent's slot failed: {0}")]
    Slot(#[from] SlotError),
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the repository's target {name:?} is version {found}, and the deployment asks for {wanted}: publish the target and sign the deployment for the same version")]
    VersionMismatch { name: String, found: String, wanted: String },
}

impl UpdateError {
    /// Whether trying again later may succeed: the link or the hub was down.
    /// Everything else is a verdict on what was published.
    pub fn is_transient(&self) -> bool {
        match self {
            UpdateError::Request { .. } | UpdateError::Status { .. } => true,
            UpdateError::Download(e) => matches!(
                e,
                DownloadError::Request { .. }
                    | DownloadError::Status { .. }
                    | DownloadError::EndedEarly { .. }
                    | DownloadError::GaveUp { .. }
                    | DownloadError::Io { .. }
            ),
            UpdateError::Io { .. } | UpdateError::Store(_) => true,
            _ => false,
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError {
    let path = path.to_path_buf();
    move |source| UpdateError::Io { action, path, source }
}

/// An update written to the inactive slot, waiting for a restart into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub target: String,
    pub version: String,
    pub slot: Slot,
}

/// A target that verified metadata vouch for, and the client that got them.
struct Verified {
    client: reqwest::Client,
    target: ota::metadata::Target,
    sha256: Digest,
}

/// What a deployment's agent update came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Installed(Installed),
    /// The running binary is the target already: nothing to install.
    AlreadyRunning {
        version: String,
    },
}

/// What the update flow needs from the configuration.
#[derive(Debug, Clone)]
pub struct Updater {
    /// `http://host:port`, no trailing slash.
    pub hub_http: String,
    pub hardware: String,
    /// The operator's root.json, read when the store has no root yet.
    pub trust_root: PathBuf,
    pub agent: AgentSlots,
    pub max_bytes_per_sec: Option<u64>,
}

impl Updater {
    pub fn from_config(config: &Config, agent: AgentSlots) -> Self {
        Self {
            hub_http: config.hub_http.trim_end_matches('/').to_string(),
            hardware: config.hardware.clone(),
            trust_root: config.trust_root.clone(),
            agent,
            max_bytes_per_sec: (config.update_bandwidth.0 > 0).then_some(config.update_bandwidth.0),
        }
    }

    /// Verifies the metadata, downloads target `name` and writes it to the
    /// inactive slot; `running_binary` fills slot A first when no update was
    /// ever installed, so there is a slot to fall back to. The restart into
    /// the new slot is the caller's.
    pub async fn update(&self, store: &Store, name: &str, running_binary: &Path) -> Result<Installed, UpdateError> {
        let verified = self.verified_target(store, name).await?;
        self.download_and_install(verified, name, None, running_binary).await
    }

    /// A deployment's agent update: as [`Updater::update`], but the target
    /// must be the version the signed deployment names, and a running binary
    /// that already is the target is left alone.
    pub async fn update_for(
        &self,
        store: &Store,
        update: &AgentUpdate,
        from: UpdateOrigin,
        running_binary: &Path,
    ) -> Result<Outcome, UpdateError> {
        let name = update.target.as_str();
        let verified = self.verified_target(store, name).await?;
        let target = &verified.target;
        if update.version != target.version {
            return Err(UpdateError::VersionMismatch {
                name: name.into(),
                found: target.version.clone(),
                wanted: update.version.clone(),
            });
        }
        let running = running_binary.to_path_buf();
        let (digest, _) = tokio::task::spawn_blocking(move || file_digest(&running)).await.map_err(|e| {
            UpdateError::Io { action: "hash", path: running_binary.to_path_buf(), source: std::io::Error::other(e) }
        })??;
        if digest == verified.sha256 {
            return Ok(Outcome::AlreadyRunning { version: target.version.clone() });
        }
        self.download_and_install(verified, name, Some(from), running_binary).await.map(Outcome::Installed)
    }

    /// Target `name` for this hardware, from freshly verified metadata.
    async fn verified_target(&self, store: &Store, name: &str) -> Result<Verified, UpdateError> {
        if self.hub_http.is_empty() {
            return Err(UpdateError::NoHub);
        }
        // Before downloading: an update on trial holds the other slot.
        if let Some(env) = self.agent.env()? {
            env.inactive()?;
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|source| UpdateError::Request { url: self.hub_http.clone(), source })?;
        let state = self.refresh_metadata(&client, store).await?;
        let target = state.target(name, &self.hardware)?.clone();
        let sha256 = Digest::from_hex(&target.sha256)
            .map_err(|_| UpdateError::BadDigest { name: name.into(), sha256: target.sha256.clone() })?;
        Ok(Verified { client, target, sha256 })
    }

    /// Downloads the verified target and writes it to the inactive slot,
    /// noting it as pending for the agent that boots into it.
    async fn download_and_install(
        &self,
        verified: Verified,
        name: &str,
        from: Option<UpdateOrigin>,
        running_binary: &Path,
    ) -> Result<Installed, UpdateError> {
        let Verified { client, target, sha256 } = verified;
        let downloads = self.agent.download_dir();
        std::fs::create_dir_all(&downloads).map_err(io_error("create", &downloads))?;
        let download = Download {
            url: format!("{}/v1/artifacts/sha256:{}", self.hub_http, target.sha256),
            dest: downloads.join(&target.sha256),
            length: target.length,
            sha256,
            max_bytes_per_sec: self.max_bytes_per_sec,
        };
        ota::fetch(&client, &download, RetryPolicy::default()).await?;

        let agent = self.agent.clone();
        let running_binary = running_binary.to_path_buf();
        let dest = download.dest.clone();
        let slot = tokio::task::spawn_blocking(move || install(&agent, &running_binary, &dest, target.length, &sha256))
            .await
            .map_err(|e| UpdateError::Io {
                action: "install",
                path: download.dest.clone(),
                source: std::io::Error::other(e),
            })??;
        let _ = std::fs::remove_file(&download.dest);
        let pending =
            Pending { target: name.into(), version: target.version.clone(), slot, failures: Vec::new(), from };
        let pending_path = self.agent.pending_path();
        self.agent.set_pending(&pending).map_err(io_error("write", &pending_path))?;
        Ok(Installed { target: name.into(), version: target.version, slot })
    }

    /// Walks the TUF order from the trusted root and saves the versions after
    /// each role, so a later run (or a restarted agent) never accepts older.
    async fn refresh_metadata(&self, client: &reqwest::Client, store: &Store) -> Result<TrustedState, UpdateError> {
        let mut state = trusted_state(store, &self.trust_root)?;
        loop {
            let next = state.root().version + 1;
            let Some(bytes) = self.get(client, &format!("{next}.root.json"), RoleType::Root).await? else {
                break;
            };
            state.update_root(&bytes)?;
            // Each root as it is trusted: a later one failing keeps this one.
            store.set_trust(Some(&bytes), &state.versions())?;
        }
        let now = SystemTime::now();
        let timestamp = self.required(client, "timestamp.json", RoleType::Timestamp).await?;
        state.update_timestamp(&timestamp, now)?;
        store.set_trust(None, &state.versions())?;
        let snapshot = self.required(client, "snapshot.json", RoleType::Snapshot).await?;
        state.update_snapshot(&snapshot, now)?;
        store.set_trust(None, &state.versions())?;
        let targets = self.required(client, "targets.json", RoleType::Targets).await?;
        state.update_targets(&targets, now)?;
        store.set_trust(None, &state.versions())?;
        Ok(state)
    }

    async fn required(&self, client: &reqwest::Client, file: &str, role: RoleType) -> Result<Vec<u8>, UpdateError> {
        let url = || format!("{}/v1/tuf/{file}", self.hub_http);
        self.get(client, file, role).await?.ok_or_else(|| UpdateError::Missing { url: url() })
    }

    /// One metadata file, read up to its role's cap; `None` for a 404 (the
    /// next root not existing ends the rotations).
    async fn get(&self, client: &reqwest::Client, file: &str, role: RoleType) -> Result<Option<Vec<u8>>, UpdateError> {
        let url = format!("{}/v1/tuf/{file}", self.hub_http);
        let request_error = |source| UpdateError::Request { url: url.clone(), source };
        let mut response = client.get(&url).send().await.map_err(request_error)?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(UpdateError::Status { url, status });
        }
        let cap = max_size(role);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request_error)? {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > cap {
                return Err(UpdateError::TooLarge { url, cap });
            }
        }
        Ok(Some(body))
    }
}

/// Fills slot A from the running binary if no update was ever installed,
/// then writes the verified download to the inactive slot.
fn install(
    agent: &AgentSlots,
    running_binary: &Path,
    image: &Path,
    length: u64,
    sha256: &Digest,
) -> Result<Slot, UpdateError> {
    if agent.env()?.is_none() {
        // Two passes over the file rather than all of it in memory.
        let (digest, len) = file_digest(running_binary)?;
        let mut file = std::fs::File::open(running_binary).map_err(io_error("open", running_binary))?;
        agent.slots.write_slot(Slot::A, &mut file, len, &digest)?;
        agent.slots.write_env(&ota::BootEnv::new(Slot::A, BOOTLIMIT))?;
    }
    let mut file = std::fs::File::open(image).map_err(io_error("open", image))?;
    Ok(ota::install_update(&agent.slots, &mut file, length, sha256)?)
}

fn file_digest(path: &Path) -> Result<(Digest, u64), UpdateError> {
    let file = std::fs::File::open(path).map_err(io_error("open", path))?;
    let mut hashing = ota::HashingReader::new(file);
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(io_error("read", path))?;
    Ok(hashing.finish())
}
