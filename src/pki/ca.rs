//! The cluster CA: an ECDSA P-256 key and a self-signed CA certificate made on the first
//! start of `serve --cluster-listen` and kept in `<data-dir>/pki/` (`ca.key` 0600, `ca.crt`);
//! the listener's serving certificate (made anew each start for the current names); and node
//! client certificates signed from a node's CSR (CN `system:node:<name>`, O `system:nodes`).

use std::path::Path;

use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};

use super::{io_err, sha256_hex, write_private, PkiError};

/// The organization of node certificates (Kubernetes' group of kubelets).
pub const NODES_GROUP: &str = "system:nodes";
/// A node identity's prefix: `system:node:<name>`.
pub const NODE_PREFIX: &str = "system:node:";

/// The CA and the listener's serving certificate.
pub struct ClusterCa {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The serving certificate chain (leaf, CA) and its key, DER.
    pub serving_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub serving_key: Vec<u8>,
}

/// Validity from yesterday's date to the same day `years` on (as `date_time_ymd` arguments).
fn validity(p: &mut CertificateParams, years: i32) {
    let now = chrono::Utc::now();
    let before = now - chrono::Duration::days(1);
    p.not_before = rcgen::date_time_ymd(
        before.year(),
        before.month() as u8,
        before.day().min(28) as u8,
    );
    p.not_after = rcgen::date_time_ymd(
        now.year() + years,
        now.month() as u8,
        now.day().min(28) as u8,
    );
}

impl ClusterCa {
    /// Load the CA from `dir` or create it; make the serving certificate for `sans`.
    pub fn load_or_create(dir: &Path, sans: &[String]) -> Result<ClusterCa, PkiError> {
        let crt = dir.join("ca.crt");
        let key = dir.join("ca.key");
        let (ca_pem, ca_key) = if crt.exists() && key.exists() {
            let ca_pem = std::fs::read_to_string(&crt).map_err(io_err(&crt))?;
            let key_pem = std::fs::read_to_string(&key).map_err(io_err(&key))?;
            let k = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Corrupt {
                path: key.clone(),
                message: format!("not a private key: {e}"),
            })?;
            (ca_pem, k)
        } else {
            let k = KeyPair::generate()?;
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(
                DnType::CommonName,
                format!("kapsel-cluster-ca@{}", chrono::Utc::now().timestamp()),
            );
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            validity(&mut p, 10);
            let cert = p.self_signed(&k)?;
            write_private(&key, k.serialize_pem().as_bytes())?;
            write_private(&crt, cert.pem().as_bytes())?;
            (cert.pem(), k)
        };
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| PkiError::Corrupt {
            path: crt.clone(),
            message: format!("not a CA certificate: {e}"),
        })?;
        let ca_der = rustls_pemfile_der(&ca_pem).ok_or_else(|| PkiError::Corrupt {
            path: crt.clone(),
            message: "no certificate in the file".into(),
        })?;

        // The serving certificate: the given names and addresses, and the loopback ones.
        let mut names: Vec<String> = sans.iter().map(|s| s.trim().to_string()).collect();
        names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
        names.retain(|n| !n.is_empty());
        names.dedup();
        let mut p = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kapsel-cluster-listener");
        p.distinguished_name = dn;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, 1);
        let sk = KeyPair::generate()?;
        let leaf = p.signed_by(&sk, &issuer)?;
        Ok(ClusterCa {
            ca_pem,
            issuer,
            serving_chain: vec![leaf.der().clone(), ca_der],
            serving_key: sk.serialize_der(),
        })
    }

    /// The CA certificate, PEM (what `/cacerts` serves; its sha256 is in every token).
    pub fn pem(&self) -> &str {
        &self.ca_pem
    }

    /// sha256 hex of [`Self::pem`].
    pub fn hash(&self) -> String {
        sha256_hex(self.ca_pem.as_bytes())
    }

    /// Sign a client certificate for node `name` from a PEM CSR (whose signature proves the
    /// key is held). Only the CSR's public key is used. Returns the certificate PEM and the
    /// sha256 hex of the key's SubjectPublicKeyInfo (what binds the node name).
    pub fn sign_node(&self, name: &str, csr_pem: &str) -> Result<(String, String), PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let key_hash = sha256_hex(&csr.public_key.subject_public_key_info());
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{NODE_PREFIX}{name}"));
        dn.push(DnType::OrganizationName, NODES_GROUP);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, 1);
        let cert = p.signed_by(&csr.public_key, &self.issuer)?;
        Ok((cert.pem(), key_hash))
    }
}

/// The first certificate of a PEM text, DER.
pub fn rustls_pemfile_der(pem: &str) -> Option<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
}

/// The node a verified client certificate names: CN `system:node:<name>` with O
/// `system:nodes`; `None` for any other subject.
pub fn node_of_certificate(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert.subject();
    let cn = subject.iter_common_name().next()?.as_str().ok()?;
    let in_group = subject
        .iter_organization()
        .any(|o| o.as_str().ok() == Some(NODES_GROUP));
    let name = cn.strip_prefix(NODE_PREFIX)?;
    (in_group && !name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_and_signs_node_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(dir.path(), &["node1.example".into()]).unwrap();
        let again = ClusterCa::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(ca.hash(), again.hash(), "the CA is kept across starts");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let (pem, key_hash) = ca.sign_node("edge-1", &csr).unwrap();
        assert_eq!(key_hash, sha256_hex(&key.subject_public_key_info()));
        let der = rustls_pemfile_der(&pem).unwrap();
        assert_eq!(node_of_certificate(&der).as_deref(), Some("edge-1"));
        // The serving certificate is not a node's.
        assert_eq!(node_of_certificate(&ca.serving_chain[0]), None);
        assert!(ca.sign_node("x", "not a csr").is_err());
    }
}
