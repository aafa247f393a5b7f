//! TLS helpers: a throwaway certificate for 127.0.0.1 and a client that
//! trusts only it, so tests prove which certificate the relay serves.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Writes a new self-signed certificate for 127.0.0.1 to `dir/cert.pem` and
/// `dir/key.pem`; returns it for the client's trust store.
pub fn write_certificate(dir: &Path) -> CertificateDer<'static> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("generate a certificate");
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    certified.cert.der().clone()
}

/// A TLS connection to `addr` that trusts only `root`; panics if the
/// handshake fails (say, the server shows another certificate).
pub async fn connect(
    addr: SocketAddr,
    root: &CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(addr).await.expect("connect");
    connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), stream)
        .await
        .expect("TLS handshake with the expected certificate")
}
