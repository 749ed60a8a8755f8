//! Join tokens, as k3s writes them: `K10<sha256 hex of the CA PEM>::<id>.<secret>`. The id
//! (6 characters) names the token in `kapsel token list|delete`; the secret (16 characters) is
//! kept only as its sha256, in `<data-dir>/pki/tokens.json` (0600), with a description and an
//! optional expiry. A token is good for the join endpoint only.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{ct_eq, io_err, sha256_hex, write_private, PkiError};

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
pub const ID_LEN: usize = 6;
pub const SECRET_LEN: usize = 16;

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The CA's sha256 (hex), when the token carries it (`K10…::`).
    pub ca_hash: Option<String>,
    pub id: String,
    pub secret: String,
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(h) = &self.ca_hash {
            write!(f, "K10{h}::")?;
        }
        write!(f, "{}.{}", self.id, self.secret)
    }
}

fn valid_part(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| ALPHABET.contains(&b))
}

impl std::str::FromStr for JoinToken {
    type Err = PkiError;

    /// `K10<64 hex>::<id>.<secret>` or a bare `<id>.<secret>`.
    fn from_str(s: &str) -> Result<Self, PkiError> {
        let s = s.trim();
        let (ca_hash, creds) = match s.strip_prefix("K10") {
            Some(rest) => {
                let (h, c) = rest.split_once("::").ok_or_else(|| {
                    PkiError::BadToken("a K10 token is K10<CA sha256>::<id>.<secret>".into())
                })?;
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(PkiError::BadToken(
                        "the CA hash after K10 must be 64 hex digits (a sha256)".into(),
                    ));
                }
                (Some(h.to_ascii_lowercase()), c)
            }
            None => (None, s),
        };
        let (id, secret) = creds.split_once('.').ok_or_else(|| {
            PkiError::BadToken("the credentials are <id>.<secret> (kapsel token create)".into())
        })?;
        if !valid_part(id, ID_LEN) || !valid_part(secret, SECRET_LEN) {
            return Err(PkiError::BadToken(format!(
                "the credentials are a {ID_LEN}-character id and a {SECRET_LEN}-character secret of [a-z0-9]"
            )));
        }
        Ok(JoinToken {
            ca_hash,
            id: id.into(),
            secret: secret.into(),
        })
    }
}

/// One stored token (the secret only as its hash).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    #[serde(default)]
    pub description: String,
    pub created: DateTime<Utc>,
    #[serde(default)]
    pub expires: Option<DateTime<Utc>>,
}

impl TokenRecord {
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires.map(|e| e <= now).unwrap_or(false)
    }
}

/// The server's tokens, file-backed.
pub struct TokenStore {
    path: PathBuf,
    tokens: Mutex<Vec<TokenRecord>>,
}

fn random_string(len: usize) -> String {
    // uuid v4 draws from the OS's CSPRNG; rejection sampling keeps the alphabet uniform.
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for b in uuid::Uuid::new_v4().into_bytes() {
            if (b as usize) < 252 && out.len() < len {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    out
}

impl TokenStore {
    pub fn open(path: &Path) -> Result<TokenStore, PkiError> {
        let tokens = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| PkiError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(path)(e)),
        };
        Ok(TokenStore {
            path: path.to_path_buf(),
            tokens: Mutex::new(tokens),
        })
    }

    fn save(&self, tokens: &[TokenRecord]) -> Result<(), PkiError> {
        let data = serde_json::to_vec_pretty(tokens).expect("tokens serialize");
        write_private(&self.path, &data)
    }

    /// A new token; returns its id and secret (the secret is not kept).
    pub fn create(
        &self,
        description: &str,
        ttl: Option<std::time::Duration>,
    ) -> Result<(String, String), PkiError> {
        let mut tokens = self.tokens.lock().unwrap();
        let now = Utc::now();
        tokens.retain(|t| !t.expired(now));
        let id = loop {
            let id = random_string(ID_LEN);
            if !tokens.iter().any(|t| t.id == id) {
                break id;
            }
        };
        let secret = random_string(SECRET_LEN);
        tokens.push(TokenRecord {
            id: id.clone(),
            secret_sha256: sha256_hex(secret.as_bytes()),
            description: description.to_string(),
            created: now,
            expires: ttl.map(|d| now + chrono::Duration::from_std(d).unwrap_or_default()),
        });
        self.save(&tokens)?;
        Ok((id, secret))
    }

    /// The tokens not yet expired.
    pub fn list(&self) -> Vec<TokenRecord> {
        let now = Utc::now();
        let tokens = self.tokens.lock().unwrap();
        tokens.iter().filter(|t| !t.expired(now)).cloned().collect()
    }

    /// Remove a token; false when there was none with `id`.
    pub fn delete(&self, id: &str) -> Result<bool, PkiError> {
        let mut tokens = self.tokens.lock().unwrap();
        let before = tokens.len();
        tokens.retain(|t| t.id != id);
        if tokens.len() == before {
            return Ok(false);
        }
        self.save(&tokens)?;
        Ok(true)
    }

    /// Is `id.secret` a live token?
    pub fn verify(&self, id: &str, secret: &str) -> bool {
        let h = sha256_hex(secret.as_bytes());
        let now = Utc::now();
        let tokens = self.tokens.lock().unwrap();
        tokens.iter().any(|t| {
            t.id == id && !t.expired(now) && ct_eq(t.secret_sha256.as_bytes(), h.as_bytes())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_print() {
        let h = "ab".repeat(32);
        let t: JoinToken = format!("K10{h}::abc123.0123456789abcdef").parse().unwrap();
        assert_eq!(t.ca_hash.as_deref(), Some(h.as_str()));
        assert_eq!(t.id, "abc123");
        assert_eq!(t.to_string(), format!("K10{h}::abc123.0123456789abcdef"));
        let bare: JoinToken = "abc123.0123456789abcdef".parse().unwrap();
        assert_eq!(bare.ca_hash, None);
        for bad in [
            "K10abc::abc123.0123456789abcdef",
            "K10",
            "abc123",
            "abc12.0123456789abcdef",
            "ABC123.0123456789abcdef",
            &format!("K10{h}abc123.0123456789abcdef"),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn store_keeps_only_hashes_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let s = TokenStore::open(&path).unwrap();
        let (id, secret) = s.create("test", None).unwrap();
        assert!(s.verify(&id, &secret));
        assert!(!s.verify(&id, "0000000000000000"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&secret), "the secret is stored hashed");
        let (old, old_secret) = s.create("short", Some(std::time::Duration::ZERO)).unwrap();
        assert!(!s.verify(&old, &old_secret), "an expired token is refused");
        let again = TokenStore::open(&path).unwrap();
        assert!(again.verify(&id, &secret));
        assert!(again.delete(&id).unwrap());
        assert!(!again.verify(&id, &secret));
        assert!(!again.delete(&id).unwrap());
    }
}
