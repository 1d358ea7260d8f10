//! The hub's certificate authority, made at the first start that needs it
//! and kept in `<data-dir>/pki/` (the key 0600): it signs each device's
//! certificate (common name = device id) from the device's CSR, at
//! enrollment or by `hub issue-cert`, and the hub's own server certificate
//! for its TLS listeners. Devices trust the hub by this CA's certificate
//! (`hub ca`), and the hub trusts a device by the same CA.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::registry::valid_device_id;
use crate::sync::HUB_CLIENT_ID;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server.key";
/// Devices stay in the field for years, often without a way to renew.
const DEVICE_VALIDITY: Duration = Duration::days(10 * 365);
const CA_VALIDITY: Duration = Duration::days(30 * 365);
/// A device's clock may lag the hub's.
const BACKDATE: Duration = Duration::hours(1);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {what} {path:?}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error(
        "the hub's CA in {dir:?} cannot be read ({source}); restore it from a backup, or move the \
         directory away to make a new CA and enroll every device again"
    )]
    BadCa { dir: PathBuf, source: rcgen::Error },
    #[error("cannot make a certificate: {0}")]
    Make(#[from] rcgen::Error),
    #[error("the certificate signing request is not valid PEM with a good signature: {0}")]
    Csr(rcgen::Error),
    #[error("{0:?} cannot have a device certificate: device ids are letters, digits, `.`, `_` and `-`, not the hub's own id")]
    DeviceId(String),
}

pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// The CA in `dir`, made there if there is none yet.
    pub fn open_or_create(dir: &Path) -> Result<Self, PkiError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| io_error("create the directory", dir, source))?;
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if cert_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| io_error("read", &cert_path, e))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(|e| io_error("read", &key_path, e))?;
            let bad = |source| PkiError::BadCa { dir: dir.to_owned(), source };
            let key = KeyPair::from_pem(&key_pem).map_err(bad)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(bad)?;
            return Ok(Self { dir: dir.to_owned(), cert_pem, issuer });
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "Outpost hub CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = (now - BACKDATE, now + CA_VALIDITY);
        let cert_pem = params.self_signed(&key)?.pem();
        // The key first: a CA certificate without its key would be unusable.
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&cert_path, cert_pem.as_bytes(), 0o644)?;
        Ok(Self { dir: dir.to_owned(), cert_pem, issuer: Issuer::new(params, key) })
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A client certificate for `device` (its common name), for the key of
    /// `csr_pem`; the CSR's own subject is ignored.
    pub fn issue_device_cert(&self, device: &str, csr_pem: &str) -> Result<String, PkiError> {
        if !valid_device_id(device) || device == HUB_CLIENT_ID {
            return Err(PkiError::DeviceId(device.to_string()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::Csr)?;
        let mut params = leaf_params(device);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = (now - BACKDATE, now + DEVICE_VALIDITY);
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// A new server certificate and key for `names` (DNS names or IP
    /// addresses), written next to the CA; returns their paths. Made at
    /// each start, so a change of names takes effect with a restart.
    pub fn write_server_cert(&self, names: &[String]) -> Result<(PathBuf, PathBuf), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = leaf_params("Outpost hub").distinguished_name;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = (now - BACKDATE, now + DEVICE_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_path, key_path) = (self.dir.join(SERVER_CERT), self.dir.join(SERVER_KEY));
        write_replacing(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_replacing(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok((cert_path, key_path))
    }
}

fn io_error(what: &'static str, path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io { what, path: path.to_owned(), source }
}

fn leaf_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params
}

/// Writes a file that must not exist yet, with `mode` from its creation.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { what: "write", path: path.to_owned(), source };
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io)
}

/// Replaces a file through a temporary one, with `mode` from its creation.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let temporary = path.with_extension("new");
    let _ = std::fs::remove_file(&temporary);
    write_new(&temporary, bytes, mode)?;
    std::fs::rename(&temporary, path).map_err(|source| PkiError::Io { what: "replace", path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(common_name: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn common_name(cert_pem: &str) -> String {
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_string();
        cn
    }

    #[test]
    fn the_ca_is_made_once_and_loaded_after() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let made = Ca::open_or_create(&pki).unwrap();
        let loaded = Ca::open_or_create(&pki).unwrap();
        assert_eq!(made.cert_pem(), loaded.cert_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(pki.join(CA_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_device_certificate_names_the_device_whatever_its_csr_says() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open_or_create(dir.path()).unwrap();
        let cert = ca.issue_device_cert("pump-3", &csr("someone-else")).unwrap();
        assert_eq!(common_name(&cert), "pump-3");
    }

    #[test]
    fn no_certificate_for_an_invalid_id_the_hubs_id_or_a_broken_csr() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open_or_create(dir.path()).unwrap();
        assert!(matches!(ca.issue_device_cert("a/b", &csr("a")), Err(PkiError::DeviceId(_))));
        assert!(matches!(ca.issue_device_cert(HUB_CLIENT_ID, &csr("a")), Err(PkiError::DeviceId(_))));
        assert!(matches!(ca.issue_device_cert("pump-3", "not a CSR"), Err(PkiError::Csr(_))));
        // One character of the signature changed.
        let mut lines: Vec<String> = csr("pump-3").lines().map(String::from).collect();
        let last = lines.len() - 2;
        let flipped = if lines[last].starts_with('A') { "B" } else { "A" };
        lines[last].replace_range(0..1, flipped);
        assert!(matches!(ca.issue_device_cert("pump-3", &lines.join("\n")), Err(PkiError::Csr(_))));
    }
}
