//! Pod volumes on the node: `emptyDir` directories under the pod's directory, `hostPath`
//! checked or created, and each container's mounts resolved to host directories.

use std::path::{Path, PathBuf};

use super::executor::{ExecError, Mount};
use crate::model::pod::{Container, Pod};

/// `<pods-dir>/<uid>/volumes/<name>` for emptyDirs.
pub fn empty_dir_path(pod_dir: &Path, name: &str) -> PathBuf {
    pod_dir.join("volumes").join(name)
}

/// Create every emptyDir and check every hostPath of the pod.
pub fn setup(pod: &Pod, pod_dir: &Path) -> Result<(), ExecError> {
    for v in &pod.spec.volumes {
        if v.empty_dir.is_some() {
            let p = empty_dir_path(pod_dir, &v.name);
            std::fs::create_dir_all(&p).map_err(|e| {
                ExecError::Config(format!(
                    "volume {:?}: cannot create {}: {e}",
                    v.name,
                    p.display()
                ))
            })?;
        } else if let Some(hp) = &v.host_path {
            let p = Path::new(&hp.path);
            match hp.type_.as_deref() {
                Some("DirectoryOrCreate") => std::fs::create_dir_all(p).map_err(|e| {
                    ExecError::Config(format!(
                        "volume {:?}: cannot create hostPath {}: {e}",
                        v.name, hp.path
                    ))
                })?,
                _ => {
                    if !p.is_dir() {
                        return Err(ExecError::Config(format!(
                            "volume {:?}: hostPath {} is not an existing directory",
                            v.name, hp.path
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The host directories a container sees, from its volumeMounts.
pub fn mounts(pod: &Pod, c: &Container, pod_dir: &Path) -> Result<Vec<Mount>, ExecError> {
    let mut out = Vec::new();
    for m in &c.volume_mounts {
        let v = pod
            .spec
            .volumes
            .iter()
            .find(|v| v.name == m.name)
            .ok_or_else(|| {
                ExecError::Config(format!("volumeMount {:?}: no such volume", m.name))
            })?;
        let mut host = if v.empty_dir.is_some() {
            empty_dir_path(pod_dir, &v.name)
        } else if let Some(hp) = &v.host_path {
            PathBuf::from(&hp.path)
        } else {
            return Err(ExecError::Config(format!(
                "volume {:?} has no source",
                v.name
            )));
        };
        if let Some(sp) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            host = host.join(sp);
            std::fs::create_dir_all(&host)
                .map_err(|e| ExecError::Config(format!("subPath {}: {e}", host.display())))?;
        }
        out.push(Mount {
            host_path: host,
            guest_path: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    Ok(out)
}
