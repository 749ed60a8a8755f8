//! Node-name bindings: the first key that joins under a node name owns it (k3s keeps a node
//! password hash per name for the same purpose). A later join under that name with another
//! key is refused (403), so a holder of the token cannot take over a node. Kept in
//! `<data-dir>/pki/node-keys.json` (0600) as name → sha256 of the key's SubjectPublicKeyInfo.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{io_err, write_private, PkiError};

/// What a name is bound to when the server's own embedded node holds it: no key may join as it.
pub const EMBEDDED: &str = "embedded-node";

pub struct NodeBindings {
    path: PathBuf,
    keys: Mutex<BTreeMap<String, String>>,
}

/// The answer to a join under a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Binding {
    /// The name was free and is now bound to the key.
    New,
    /// The name was bound to this key already (a node re-joining).
    Same,
    /// Another key holds the name.
    Taken,
}

impl NodeBindings {
    pub fn open(path: &Path) -> Result<NodeBindings, PkiError> {
        let keys = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| PkiError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io_err(path)(e)),
        };
        Ok(NodeBindings {
            path: path.to_path_buf(),
            keys: Mutex::new(keys),
        })
    }

    /// Bind `name` to `key_hash` if free; first use wins.
    pub fn bind(&self, name: &str, key_hash: &str) -> Result<Binding, PkiError> {
        let mut keys = self.keys.lock().unwrap();
        match keys.get(name) {
            Some(k) if super::ct_eq(k.as_bytes(), key_hash.as_bytes()) => Ok(Binding::Same),
            Some(_) => Ok(Binding::Taken),
            None => {
                keys.insert(name.to_string(), key_hash.to_string());
                // Reservations are the server's of this start, not kept.
                let kept: BTreeMap<&String, &String> = keys
                    .iter()
                    .filter(|(_, k)| k.as_str() != EMBEDDED)
                    .collect();
                let data = serde_json::to_vec_pretty(&kept).expect("bindings serialize");
                if let Err(e) = write_private(&self.path, &data) {
                    keys.remove(name);
                    return Err(e);
                }
                Ok(Binding::New)
            }
        }
    }

    /// Reserve `name` for the server's own node (not persisted: it is the server's each start).
    pub fn reserve(&self, name: &str) {
        self.keys
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| EMBEDDED.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_key_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node-keys.json");
        let b = NodeBindings::open(&p).unwrap();
        assert_eq!(b.bind("a", "k1").unwrap(), Binding::New);
        assert_eq!(b.bind("a", "k1").unwrap(), Binding::Same);
        assert_eq!(b.bind("a", "k2").unwrap(), Binding::Taken);
        b.reserve("server");
        assert_eq!(b.bind("server", "k1").unwrap(), Binding::Taken);
        assert_eq!(b.bind("b", "k1").unwrap(), Binding::New);
        let again = NodeBindings::open(&p).unwrap();
        assert_eq!(again.bind("a", "k2").unwrap(), Binding::Taken);
        assert_eq!(
            again.bind("server", "k1").unwrap(),
            Binding::New,
            "reservations are not kept"
        );
    }
}
