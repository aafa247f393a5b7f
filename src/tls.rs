//! TLS for the public listener, for deployments without a TLS-terminating proxy.
//!
//! The certificate and key are read from PEM files at start and again on
//! SIGHUP. A reload swaps the configuration used for *new* handshakes only, so
//! Sinch's open keep-alive connection is never dropped; a reload that fails
//! keeps the current certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Reads a certificate chain and key into a rustls server config (HTTP/2 and
/// HTTP/1.1 offered by ALPN).
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|err| format!("cannot read certificate {}: {err}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|err| format!("bad PEM in certificate {}: {err}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("no certificate found in {}", cert.display()));
    }
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|err| format!("cannot read private key {}: {err}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|err| format!("TLS setup failed: {err}"))?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)
            .map_err(|err| {
                format!(
                    "certificate {} and key {} do not make a TLS identity: {err}",
                    cert.display(),
                    key.display()
                )
            })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The current TLS configuration, replaceable while connections are served.
pub struct TlsReloader {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsReloader {
    /// Loads the files once; fails like [`load_server_config`].
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<TlsReloader, String> {
        let config = load_server_config(&cert, &key)?;
        Ok(TlsReloader {
            cert,
            key,
            current: RwLock::new(config),
        })
    }

    /// An acceptor for one new connection, with the certificate current now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// Re-reads the files; on error the current certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = load_server_config(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }
}
