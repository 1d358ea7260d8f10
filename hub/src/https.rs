//! HTTPS for the hub's axum routers (the operators' API with `http-tls`, the
//! enrollment listener): rustls with the hub's server certificate, hyper's
//! connection builder, one task per connection.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{crypto, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("cannot read the hub's server certificate or key {path:?}: {message}")]
    Pem { path: std::path::PathBuf, message: String },
    #[error("the hub's server certificate does not suit TLS: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
}

/// A TLS acceptor with the certificate and key in these PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, HttpsError> {
    let pem = |path: &Path, e: tokio_rustls::rustls::pki_types::pem::Error| HttpsError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem(cert, e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e))?;
    // The provider named: reqwest and rumqttc bring rustls with providers of their own.
    let config = ServerConfig::builder_with_provider(Arc::new(crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` over TLS until `stopping` turns true; connections under
/// way are dropped then.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, app: Router, mut stopping: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!("cannot accept an HTTPS connection: {e}");
                    continue;
                }
            },
            _ = stopping.wait_for(|stop| *stop) => break,
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        connections.spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                debug!(%peer, "HTTPS connection ended: {e}");
            }
        });
        // Reaps the finished ones.
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}
