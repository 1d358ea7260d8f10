//! The device's identity for a hub over TLS (docs/identity.md): its own key
//! (made here, never sent, 0600), its certificate signed by the hub's CA
//! (common name = device id), and that CA's certificate, by which the
//! device trusts the hub. `enroll` gets the certificate with a one-time
//! token; at the factory the same three files can be written instead
//! (`hub issue-cert`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{crypto, ClientConfig, RootCertStore};

/// Where the three files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPaths {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
}

impl IdentityPaths {
    /// Under `<data-dir>/identity/`.
    pub fn under(data_dir: &Path) -> Self {
        let dir = data_dir.join("identity");
        Self { key: dir.join("device.key"), cert: dir.join("device.pem"), ca: dir.join("ca.pem") }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {what} {path:?}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error(
        "{path:?} is not a usable PEM {what} ({message}): enroll the device (`edge-agent enroll`) or put \
         the files the operator made for it (`hub issue-cert`) in place"
    )]
    Pem { what: &'static str, path: PathBuf, message: String },
    #[error("cannot make the device's key or certificate request: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the device's certificate or key do not suit TLS: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
    #[error("cannot reach the hub's enrollment at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("the hub refused the enrollment ({status}): {message}")]
    Refused { status: reqwest::StatusCode, message: String },
    #[error("the hub enrolled the device as {0:?}, not as this device's id: check the token and device-id")]
    OtherDevice(String),
}

/// The body of the hub's `POST /v1/enroll`.
#[derive(Serialize)]
struct EnrollRequest<'a> {
    token: &'a str,
    csr: &'a str,
}

#[derive(Deserialize)]
struct Enrolled {
    device: String,
    cert: String,
    ca: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// Makes a new key, sends a CSR for it with `token` to the hub's enrollment
/// URL (`https://host:port`, trusted by `ca_pem`), and writes the key, the
/// certificate and the CA. Nothing is written unless the hub signed.
pub async fn enroll(
    hub_url: &str,
    token: &str,
    ca_pem: &[u8],
    device_id: &str,
    paths: &IdentityPaths,
) -> Result<(), IdentityError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, device_id);
    let csr = params.serialize_request(&key)?.pem()?;

    let url = format!("{}/v1/enroll", hub_url.trim_end_matches('/'));
    let unreachable = |source| IdentityError::Unreachable { url: url.clone(), source };
    let ca = reqwest::Certificate::from_pem(ca_pem).map_err(|e| IdentityError::Pem {
        what: "CA certificate",
        path: paths.ca.clone(),
        message: e.to_string(),
    })?;
    let http = reqwest::Client::builder().add_root_certificate(ca).build().map_err(unreachable)?;
    let response = http.post(&url).json(&EnrollRequest { token, csr: &csr }).send().await.map_err(unreachable)?;
    let status = response.status();
    if !status.is_success() {
        let message = response.json::<ErrorBody>().await.map(|b| b.error).unwrap_or_else(|_| "(no message)".into());
        return Err(IdentityError::Refused { status, message });
    }
    let enrolled: Enrolled = response.json().await.map_err(unreachable)?;
    if enrolled.device != device_id {
        return Err(IdentityError::OtherDevice(enrolled.device));
    }
    for path in [&paths.key, &paths.cert, &paths.ca] {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| IdentityError::Io {
                what: "create the directory",
                path: dir.to_owned(),
                source,
            })?;
        }
    }
    write(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
    write(&paths.cert, enrolled.cert.as_bytes(), 0o644)?;
    write(&paths.ca, enrolled.ca.as_bytes(), 0o644)?;
    Ok(())
}

/// The TLS client configuration for the hub's broker: the hub's CA as the
/// only root, the device's certificate for client authentication.
pub fn client_config(paths: &IdentityPaths) -> Result<Arc<ClientConfig>, IdentityError> {
    let pem = |what, path: &Path, e: tokio_rustls::rustls::pki_types::pem::Error| IdentityError::Pem {
        what,
        path: path.to_owned(),
        message: e.to_string(),
    };
    let certs = |what, path: &Path| {
        CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| pem(what, path, e))
    };
    let mut roots = RootCertStore::empty();
    for ca in certs("CA certificate", &paths.ca)? {
        roots.add(ca)?;
    }
    let chain = certs("device certificate", &paths.cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| pem("device key", &paths.key, e))?;
    // The provider named: other crates bring rustls with providers of their own.
    let config = ClientConfig::builder_with_provider(Arc::new(crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Replaces a file through a temporary one, with `mode` from its creation.
fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let io = |what, source| IdentityError::Io { what, path: path.to_owned(), source };
    let temporary = path.with_extension("new");
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(|e| io("write", e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| io("write", e))?;
    std::fs::rename(&temporary, path).map_err(|e| io("replace", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_identity_files_say_how_to_get_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = client_config(&IdentityPaths::under(dir.path())).unwrap_err().to_string();
        assert!(err.contains("ca.pem") && err.contains("edge-agent enroll"), "{err}");
    }
}
