//! The agent's side of joining (k3s's flow): with a `K10<CA sha256>::<id>.<secret>` token it
//! fetches the server's `/cacerts` without verifying the server, checks the CA's sha256
//! against the token — a mismatch stops it before any secret is sent — then, over TLS
//! verified by that CA, sends the token and a CSR for a key it made to `POST
//! /v1-kapsel/join`, and keeps the signed client certificate in `<data-dir>/pki/`
//! (`node.key` 0600, `node.crt`, `ca.crt`). Later starts use the certificate and need no token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::{ca::node_of_certificate, ca::rustls_pemfile_der, sha256_hex, write_private};
use super::{JoinToken, PkiError};

/// The join endpoint's path.
pub const JOIN_PATH: &str = "/v1-kapsel/join";

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "refusing to join {server}: its CA certificate has sha256 {got}, but the token expects {want} \
         (a wrong server, or someone in between); the token was not sent"
    )]
    CaMismatch {
        server: String,
        got: String,
        want: String,
    },
    #[error("the token has no CA hash: use the K10… token from `kapsel token create` or the server's <data-dir>/token")]
    NoCaHash,
    #[error("joining {server} needs a token (--token or KAPSEL_TOKEN): this data directory has no node certificate yet")]
    NoToken { server: String },
    #[error("the server refused the token (401): {0}")]
    Unauthorized(String),
    #[error("the server refused the join (403): {0}")]
    Forbidden(String),
    #[error("cannot reach {server}: {source}")]
    Unreachable {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected answer from {server}: {message}")]
    Protocol { server: String, message: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// What a joined node authenticates with.
#[derive(Debug, Clone)]
pub struct NodeCredentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl NodeCredentials {
    /// A reqwest client that trusts only the cluster CA and presents the node certificate.
    pub fn http_client(&self) -> Result<reqwest::Client, reqwest::Error> {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?;
        let id =
            reqwest::Identity::from_pem(format!("{}{}", self.cert_pem, self.key_pem).as_bytes())?;
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(id)
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(32)
            .tcp_keepalive(Duration::from_secs(30))
            .build()
    }
}

struct Files {
    key: PathBuf,
    cert: PathBuf,
    ca: PathBuf,
}

fn files(data_dir: &Path) -> Files {
    let d = data_dir.join("pki");
    Files {
        key: d.join("node.key"),
        cert: d.join("node.crt"),
        ca: d.join("ca.crt"),
    }
}

/// The credentials kept from an earlier join as `node_name`, if any (and if they still match
/// the token's CA when a token is given).
fn stored(data_dir: &Path, node_name: &str, token: Option<&JoinToken>) -> Option<NodeCredentials> {
    let f = files(data_dir);
    let c = NodeCredentials {
        ca_pem: std::fs::read_to_string(&f.ca).ok()?,
        cert_pem: std::fs::read_to_string(&f.cert).ok()?,
        key_pem: std::fs::read_to_string(&f.key).ok()?,
    };
    let der = rustls_pemfile_der(&c.cert_pem)?;
    if node_of_certificate(&der).as_deref() != Some(node_name) {
        return None;
    }
    if let Some(h) = token.and_then(|t| t.ca_hash.as_deref()) {
        if sha256_hex(c.ca_pem.as_bytes()) != h {
            return None;
        }
    }
    Some(c)
}

/// The node's credentials for `server`: kept ones, or a fresh join with `token`.
pub async fn credentials(
    server: &str,
    token: Option<&str>,
    data_dir: &Path,
    node_name: &str,
) -> Result<NodeCredentials, JoinError> {
    let token: Option<JoinToken> = token.map(str::parse).transpose()?;
    if let Some(c) = stored(data_dir, node_name, token.as_ref()) {
        return Ok(c);
    }
    let token = token.ok_or_else(|| JoinError::NoToken {
        server: server.to_string(),
    })?;
    let want = token.ca_hash.clone().ok_or(JoinError::NoCaHash)?;
    let server = server.trim_end_matches('/');
    let unreachable = |source| JoinError::Unreachable {
        server: server.to_string(),
        source,
    };

    // 1. The CA, fetched without verifying the server, then checked against the token.
    let insecure = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(unreachable)?;
    let resp = insecure
        .get(format!("{server}/cacerts"))
        .send()
        .await
        .map_err(unreachable)?;
    if !resp.status().is_success() {
        return Err(JoinError::Protocol {
            server: server.to_string(),
            message: format!("GET /cacerts: HTTP {}", resp.status()),
        });
    }
    let ca_pem = resp.text().await.map_err(unreachable)?;
    let got = sha256_hex(ca_pem.as_bytes());
    if !super::ct_eq(got.as_bytes(), want.as_bytes()) {
        return Err(JoinError::CaMismatch {
            server: server.to_string(),
            got,
            want,
        });
    }

    // 2. A key and a CSR; the token goes only over TLS verified by that CA.
    super::private_dir(&data_dir.join("pki"))?;
    let f = files(data_dir);
    let key = match std::fs::read_to_string(&f.key)
        .ok()
        .and_then(|p| rcgen::KeyPair::from_pem(&p).ok())
    {
        Some(k) => k,
        None => {
            let k = rcgen::KeyPair::generate().map_err(PkiError::from)?;
            write_private(&f.key, k.serialize_pem().as_bytes())?;
            k
        }
    };
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(PkiError::from)?;
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(unreachable)?;
    let verified = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(unreachable)?;
    let resp = verified
        .post(format!("{server}{JOIN_PATH}"))
        .bearer_auth(format!("{}.{}", token.id, token.secret))
        .json(&json!({"nodeName": node_name, "csr": csr}))
        .send()
        .await
        .map_err(unreachable)?;
    let code = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let message = body["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {code}"));
    match code.as_u16() {
        200 | 201 => {}
        401 => return Err(JoinError::Unauthorized(message)),
        403 => return Err(JoinError::Forbidden(message)),
        _ => {
            return Err(JoinError::Protocol {
                server: server.to_string(),
                message,
            })
        }
    }
    let cert_pem = body["certificate"]
        .as_str()
        .ok_or_else(|| JoinError::Protocol {
            server: server.to_string(),
            message: "the join answer has no certificate".into(),
        })?
        .to_string();
    write_private(&f.ca, ca_pem.as_bytes())?;
    write_private(&f.cert, cert_pem.as_bytes())?;
    Ok(NodeCredentials {
        ca_pem,
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}
