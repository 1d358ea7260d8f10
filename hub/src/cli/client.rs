//! The operator commands' client of the hub's HTTP API.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;

use outpost_proto::sync::Command;
use outpost_proto::{DesiredState, Signature};
use reqwest::{RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::api::{CommandSent, DeviceView, HoldView};
use crate::artifacts::BlobInfo;
use crate::enroll::NewToken;
use crate::logs::LogsReply;
use crate::rollout::Revision;
use crate::store::PendingDevice;
use outpost_proto::fleet::{DeploymentSpec, DeploymentStatus};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the hub at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("the hub answered {status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("cannot read the hub's answer: {0}")]
    Answer(reqwest::Error),
}

pub struct ApiClient {
    base: Url,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

impl ApiClient {
    /// `ca`: the hub CA's certificate (PEM), for a hub with `http-tls`.
    pub fn new(base: &str, ca: Option<&Path>) -> anyhow::Result<Self> {
        let base = Url::parse(base).map_err(|e| anyhow::anyhow!("--hub-url {base:?} is not a URL: {e}"))?;
        if base.cannot_be_a_base() {
            anyhow::bail!("--hub-url {base} cannot take a path");
        }
        let mut http = reqwest::Client::builder();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read the hub's CA certificate {ca:?}"))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{ca:?} is not a PEM certificate: `hub ca` on the hub prints it"))?;
            http = http.add_root_certificate(cert);
        }
        Ok(Self { base, http: http.build().context("cannot make the HTTP client")? })
    }

    /// `base/v1/devices/...`, each segment escaped.
    fn url(&self, segments: &[&str]) -> Url {
        self.v1(&[&["devices"], segments].concat())
    }

    /// `base/v1/...`, each segment escaped.
    fn v1(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked in new").pop_if_empty().push("v1").extend(segments);
        url
    }

    async fn send<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T, ClientError> {
        self.checked(request).await?.json().await.map_err(ClientError::Answer)
    }

    async fn send_no_content(&self, request: RequestBuilder) -> Result<(), ClientError> {
        self.checked(request).await.map(drop)
    }

    /// Sends the request; an answer that is not a success becomes an error with the hub's message.
    async fn checked(&self, request: RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let url = self.base.to_string();
        let response = request.send().await.map_err(|source| ClientError::Unreachable { url, source })?;
        let status = response.status();
        if !status.is_success() {
            let message = match response.json::<ErrorBody>().await {
                Ok(body) => body.error,
                Err(_) => "(no error message)".into(),
            };
            return Err(ClientError::Api { status, message });
        }
        Ok(response)
    }

    pub async fn devices(&self) -> Result<Vec<DeviceView>, ClientError> {
        self.send(self.http.get(self.url(&[]))).await
    }

    pub async fn device(&self, id: &str) -> Result<DeviceView, ClientError> {
        self.send(self.http.get(self.url(&[id]))).await
    }

    /// None when the hub has no such device.
    pub async fn find_device(&self, id: &str) -> Result<Option<DeviceView>, ClientError> {
        match self.device(id).await {
            Ok(device) => Ok(Some(device)),
            Err(ClientError::Api { status: StatusCode::NOT_FOUND, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The device's events numbered after `after`, oldest first.
    pub async fn events(&self, id: &str, after: u64) -> Result<Vec<outpost_proto::Event>, ClientError> {
        self.send(self.http.get(self.url(&[id, "events"])).query(&[("after", after)])).await
    }

    pub async fn desired(&self, id: &str) -> Result<DesiredState, ClientError> {
        self.send(self.http.get(self.url(&[id, "desired"]))).await
    }

    pub async fn put_desired(&self, id: &str, state: &DesiredState) -> Result<DesiredState, ClientError> {
        self.send(self.http.put(self.url(&[id, "desired"])).json(state)).await
    }

    /// Sends an operator's command; returns its id.
    pub async fn command(&self, id: &str, command: &Command) -> Result<u64, ClientError> {
        let sent: CommandSent = self.send(self.http.post(self.url(&[id, "commands"])).json(command)).await?;
        Ok(sent.id)
    }

    /// The newest logs reply of the device for the workload; None when the
    /// hub has none (or does not know the device).
    pub async fn logs(&self, id: &str, workload: &str) -> Result<Option<LogsReply>, ClientError> {
        match self.send(self.http.get(self.url(&[id, "logs", workload]))).await {
            Ok(reply) => Ok(Some(reply)),
            Err(ClientError::Api { status: StatusCode::NOT_FOUND, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn apply(&self, spec: &DeploymentSpec) -> Result<DeploymentStatus, ClientError> {
        self.send(self.http.put(self.v1(&["deployments", &spec.name])).json(spec)).await
    }

    /// Applies `spec` signed as revision `revision` (docs/hub-api.md).
    pub async fn apply_signed(
        &self,
        spec: &DeploymentSpec,
        revision: u64,
        signatures: &[Signature],
    ) -> Result<DeploymentStatus, ClientError> {
        let body = serde_json::json!({ "spec": spec, "revision": revision, "signatures": signatures });
        self.send(self.http.put(self.v1(&["deployments", &spec.name])).json(&body)).await
    }

    pub async fn deployments(&self) -> Result<Vec<DeploymentStatus>, ClientError> {
        self.send(self.http.get(self.v1(&["deployments"]))).await
    }

    pub async fn deployment(&self, name: &str) -> Result<DeploymentStatus, ClientError> {
        self.send(self.http.get(self.v1(&["deployments", name]))).await
    }

    pub async fn delete_deployment(&self, name: &str) -> Result<(), ClientError> {
        self.send_no_content(self.http.delete(self.v1(&["deployments", name]))).await
    }

    pub async fn revisions(&self, name: &str) -> Result<Vec<Revision>, ClientError> {
        self.send(self.http.get(self.v1(&["deployments", name, "revisions"]))).await
    }

    /// pause, resume, abort, or rollback (to `revision`, or the one before).
    pub async fn rollout(
        &self,
        name: &str,
        action: &str,
        revision: Option<u64>,
    ) -> Result<DeploymentStatus, ClientError> {
        let request = self.http.post(self.v1(&["deployments", name, "rollout", action]));
        let request = match revision {
            Some(revision) => request.json(&serde_json::json!({ "revision": revision })),
            None => request,
        };
        self.send(request).await
    }

    pub async fn hold(&self, name: &str, body: &serde_json::Value) -> Result<HoldView, ClientError> {
        self.send(self.http.put(self.v1(&["site-holds", name])).json(body)).await
    }

    pub async fn release_hold(&self, name: &str) -> Result<(), ClientError> {
        self.send_no_content(self.http.delete(self.v1(&["site-holds", name]))).await
    }

    pub async fn holds(&self) -> Result<Vec<HoldView>, ClientError> {
        self.send(self.http.get(self.v1(&["site-holds"]))).await
    }

    pub async fn pending(&self) -> Result<Vec<PendingDevice>, ClientError> {
        self.send(self.http.get(self.v1(&["pending-devices"]))).await
    }

    pub async fn approve(&self, id: &str) -> Result<PendingDevice, ClientError> {
        self.send(self.http.post(self.v1(&["pending-devices", id, "approve"]))).await
    }

    pub async fn reject(&self, id: &str) -> Result<(), ClientError> {
        self.send_no_content(self.http.delete(self.v1(&["pending-devices", id]))).await
    }

    pub async fn enroll_token(&self, id: &str) -> Result<NewToken, ClientError> {
        self.send(self.http.post(self.url(&[id, "enroll-token"]))).await
    }

    pub async fn put_labels(&self, id: &str, labels: &BTreeMap<String, String>) -> Result<DeviceView, ClientError> {
        self.send(self.http.put(self.url(&[id, "labels"])).json(labels)).await
    }

    /// Uploads `len` bytes of `file` as the artifact `digest`; the hub checks the digest.
    pub async fn push_artifact(
        &self,
        digest: &ota::Digest,
        file: tokio::fs::File,
        len: u64,
    ) -> Result<(), ClientError> {
        use tokio::io::AsyncReadExt;
        let chunks = futures_util::stream::try_unfold(file, |mut file| async move {
            let mut buf = vec![0u8; 64 << 10];
            let n = file.read(&mut buf).await?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((n > 0).then_some((buf, file)))
        });
        let request = self
            .http
            .put(self.v1(&["artifacts", &digest.to_string()]))
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(chunks));
        self.checked(request).await.map(drop)
    }

    pub async fn artifacts(&self) -> Result<Vec<BlobInfo>, ClientError> {
        self.send(self.http.get(self.v1(&["artifacts"]))).await
    }

    /// Uploads signed metadata as `name` (`targets.json`, `3.root.json`...).
    pub async fn put_tuf(&self, name: &str, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.send_no_content(self.http.put(self.v1(&["tuf", name])).body(bytes)).await
    }
}
