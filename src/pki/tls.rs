//! rustls configurations: the cluster listener's (serving certificate; client certificates
//! verified against the cluster CA when presented, optional so `/cacerts` and the join endpoint
//! answer before a node has one), and the crypto provider every TLS user in the process shares.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;

use super::{ClusterCa, PkiError};

/// The process's crypto provider (ring); installing it twice is harmless.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The cluster listener's TLS configuration.
pub fn server_config(ca: &ClusterCa) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.serving_chain[1].clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let chain: Vec<CertificateDer<'static>> = ca.serving_chain.clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca.serving_key.clone()));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
