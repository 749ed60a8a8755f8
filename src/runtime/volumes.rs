//! Pod volumes on the node: `emptyDir` directories under the pod's directory, `hostPath`
//! checked or created, each container's mounts resolved to host directories, and the usage of
//! size-limited `emptyDir`s.
//!
//! A `subPath` is never joined to the volume's path as text: the directory a pod member can
//! write may hold symlinks (a guest's `path_symlink`, a container's `ln -s / esc`) that would
//! lead the host anywhere. It is opened component by component beneath the volume with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` (missing
//! directories made with `mkdirat` beneath the parent's descriptor), a sub-path crossing any
//! symlink is refused, and what was opened is bind-mounted from `/proc/self/fd/<fd>` onto a
//! node-private mount point, `<pod-dir>/volume-subpaths/<volume>/<container>/<index>` (as
//! kubelet did for CVE-2017-1002101). That mount point is what Docker and the WASM pre-open
//! get: no path a pod member can change is resolved again. Those mounts are removed when the
//! pod's worker ends and before a pod directory is deleted ([`remove_pod_dir`]).
//! Without the privilege to mount (not root), a sub-path is still refused when any component
//! is a symlink, and its path is handed on: a member swapping a component for a symlink
//! between the check and the container's start is the residual race of that mode.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::executor::{ExecError, Mount};
use crate::model::pod::{Container, Pod};
use crate::model::quantity::parse_bytes;

/// `<pods-dir>/<uid>/volumes/<name>` for emptyDirs.
pub fn empty_dir_path(pod_dir: &Path, name: &str) -> PathBuf {
    pod_dir.join("volumes").join(name)
}

/// `<pods-dir>/<uid>/volume-subpaths`: the node-private mount points of resolved sub-paths.
pub fn subpaths_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join("volume-subpaths")
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

/// The host directories a container sees, from its volumeMounts. Sub-paths are opened beneath
/// their volume and bind-mounted onto the container's node-private mount points.
pub fn mounts(pod: &Pod, c: &Container, pod_dir: &Path) -> Result<Vec<Mount>, ExecError> {
    let mut out = Vec::new();
    for (idx, m) in c.volume_mounts.iter().enumerate() {
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
        let read_only = m.read_only.unwrap_or(false);
        if let Some(sp) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            let target = subpath_target(pod_dir, &v.name, &c.name, idx)?;
            host = mount_subpath(&host, sp, &target, read_only).map_err(|e| {
                ExecError::Config(format!(
                    "volumeMount {:?} of container {:?}: subPath {sp:?} of volume {:?}: {e}",
                    m.mount_path, c.name, v.name
                ))
            })?;
        }
        out.push(Mount {
            host_path: host,
            guest_path: m.mount_path.clone(),
            read_only,
        });
    }
    Ok(out)
}

/// `<pod-dir>/volume-subpaths/<volume>/<container>/<index>`; names are DNS labels by
/// validation, checked again here since they become path components.
fn subpath_target(
    pod_dir: &Path,
    volume: &str,
    container: &str,
    idx: usize,
) -> Result<PathBuf, ExecError> {
    for n in [volume, container] {
        if n.is_empty() || n == "." || n == ".." || n.contains('/') || n.contains('\0') {
            return Err(ExecError::Config(format!(
                "name {n:?} cannot name a sub-path mount point"
            )));
        }
    }
    Ok(subpaths_dir(pod_dir)
        .join(volume)
        .join(container)
        .join(idx.to_string()))
}

/// Why a sub-path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SubPathError {
    #[error("component {0:?} is a symbolic link; a subPath may not cross symlinks")]
    Symlink(String),
    #[error("component {0:?} leads outside the volume")]
    Escapes(String),
    #[error("component {0:?} is not a directory")]
    NotDirectory(String),
    #[error("{0:?} is neither a directory nor a regular file")]
    Unsupported(String),
    #[error("invalid component {0:?}: must be a relative path without '..'")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SubPathError {
    let what = what.into();
    move |source| SubPathError::Io { what, source }
}

/// Set once the node found it may not mount (not root): sub-paths are then checked and handed
/// on by path.
static NO_MOUNT: AtomicBool = AtomicBool::new(false);

/// Open `sub` beneath `volume` without following any symlink, and make what was opened
/// visible at `target` (a node-private mount point). Returns the path to hand to the runtime.
fn mount_subpath(
    volume: &Path,
    sub: &str,
    target: &Path,
    read_only: bool,
) -> Result<PathBuf, SubPathError> {
    let root = open_path(volume, libc::O_DIRECTORY)
        .map_err(io_err(format!("opening volume {}", volume.display())))?;
    let (fd, is_dir) = open_beneath(&root, sub)?;
    if NO_MOUNT.load(Ordering::Relaxed) {
        return Ok(volume.join(normalized(sub)));
    }
    // The mount point's parents: node-private (0700), never inside a volume.
    let parent = target.parent().expect("target has parents");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(io_err(format!("creating {}", parent.display())))?;
    unmount_all_at(target);
    prepare_target(target, is_dir)?;
    let src = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    let dst = cstr(target.as_os_str())?;
    // SAFETY: both paths are NUL-terminated CStrings alive for the call; null fstype and data
    // are allowed for MS_BIND.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
            if !NO_MOUNT.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    error = %e,
                    "cannot bind-mount sub-paths (not privileged): sub-paths are checked for \
                     symlinks and passed by path"
                );
            }
            return Ok(volume.join(normalized(sub)));
        }
        return Err(SubPathError::Io {
            what: format!("bind-mounting it on {}", target.display()),
            source: e,
        });
    }
    // Runtimes enforce `readOnly` themselves (Docker `:ro`, read-only pre-opens); the mount is
    // made read-only as well where the kernel allows it.
    if read_only {
        // SAFETY: `dst` is a live CString; null source, fstype and data are allowed for a remount.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            tracing::debug!(error = %e, target = %target.display(), "read-only remount");
        }
    }
    Ok(target.to_path_buf())
}

/// The mount point must be of the source's kind: a directory or an empty file.
fn prepare_target(target: &Path, is_dir: bool) -> Result<(), SubPathError> {
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() == is_dir && !m.file_type().is_symlink() => return Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(io_err(format!("replacing {}", target.display())))?;
    if is_dir {
        std::fs::DirBuilder::new().mode(0o700).create(target)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .map(drop)
    }
    .map_err(io_err(format!("creating {}", target.display())))
}

/// `a//b/./c/` → `a/b/c` (components already checked by [`open_beneath`]).
fn normalized(sub: &str) -> PathBuf {
    sub.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

fn cstr(s: &OsStr) -> Result<CString, SubPathError> {
    CString::new(s.as_bytes()).map_err(|_| SubPathError::Invalid(s.to_string_lossy().into()))
}

/// `open(path, O_PATH | extra)`, following the path as given (node-made or the user's hostPath).
fn open_path(path: &Path, extra: i32) -> io::Result<OwnedFd> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `p` is a NUL-terminated CString alive for the call.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | extra) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open (>= 0) and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct open_how` of linux/openat2.h.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Open one component beneath `dir`, never through a symlink: `openat2` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`; on kernels without it
/// (< 5.6), `openat(O_NOFOLLOW)` of the single component, which is as strict for one name.
fn open_component(dir: RawFd, name: &CString) -> io::Result<OwnedFd> {
    static NO_OPENAT2: AtomicBool = AtomicBool::new(false);
    let flags = libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let how = OpenHow {
            flags: flags as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH
                | libc::RESOLVE_NO_SYMLINKS
                | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: `name` is a live CString and `how` a repr(C) open_how whose size is passed with it;
        // the kernel only reads them.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                name.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: openat2 returned a new descriptor (>= 0) owned by nothing else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(e);
        }
        NO_OPENAT2.store(true, Ordering::Relaxed);
    }
    // SAFETY: `dir` is an open descriptor of the caller and `name` a live CString.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat (>= 0) and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: `stat` is a plain C struct of integers, valid when all zero.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the call and `st` a writable stat the kernel fills.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Walk `sub` beneath the volume's descriptor, creating missing directories (0755, as kubelet)
/// with `mkdirat` on the parent's descriptor. Returns the final descriptor (`O_PATH`) and
/// whether it is a directory. Any symlink on the way is refused.
fn open_beneath(root: &OwnedFd, sub: &str) -> Result<(OwnedFd, bool), SubPathError> {
    let mut cur = root
        .try_clone()
        .map_err(io_err("duplicating the volume's descriptor"))?;
    let mut is_dir = true;
    let mut walked = PathBuf::new();
    for comp in sub.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if comp == ".." || comp.contains('\0') {
            return Err(SubPathError::Invalid(comp.to_string()));
        }
        if !is_dir {
            return Err(SubPathError::NotDirectory(walked.display().to_string()));
        }
        walked.push(comp);
        let shown = walked.display().to_string();
        let name = CString::new(comp).expect("checked for NUL");
        let mut tries = 0;
        let next = loop {
            tries += 1;
            match open_component(cur.as_raw_fd(), &name) {
                Ok(fd) => break fd,
                Err(e) => match e.raw_os_error() {
                    Some(libc::ELOOP) => return Err(SubPathError::Symlink(shown)),
                    Some(libc::EXDEV) => return Err(SubPathError::Escapes(shown)),
                    Some(libc::ENOTDIR) => return Err(SubPathError::NotDirectory(shown)),
                    Some(libc::ENOENT) if tries < 4 => {
                        // SAFETY: `cur` is an open directory descriptor and `name` a live CString.
                        let r = unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) };
                        if r != 0 {
                            let e = io::Error::last_os_error();
                            if e.raw_os_error() != Some(libc::EEXIST) {
                                return Err(SubPathError::Io {
                                    what: format!("creating {shown}"),
                                    source: e,
                                });
                            }
                        }
                    }
                    _ => {
                        return Err(SubPathError::Io {
                            what: format!("opening {shown}"),
                            source: e,
                        })
                    }
                },
            }
        };
        let st = fstat(&next).map_err(io_err(format!("inspecting {shown}")))?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => is_dir = true,
            libc::S_IFREG => is_dir = false,
            // O_NOFOLLOW without openat2 opens a symlink itself (O_PATH): refuse it here.
            libc::S_IFLNK => return Err(SubPathError::Symlink(shown)),
            _ => return Err(SubPathError::Unsupported(shown)),
        }
        cur = next;
    }
    Ok((cur, is_dir))
}

/// Mount points at or under `dir` in this process's mount namespace, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(&dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    out.dedup();
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmount everything stacked on `target` (lazily: a runtime may still hold it open).
fn unmount_all_at(target: &Path) {
    let Ok(t) = cstr(target.as_os_str()) else {
        return;
    };
    for _ in 0..64 {
        // SAFETY: `t` is a NUL-terminated CString alive for the call.
        if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
            break;
        }
    }
}

/// Unmount every sub-path mount of the pod (its containers are stopped). Returns how many
/// mount points are still mounted.
pub fn unmount_subpaths(pod_dir: &Path) -> usize {
    unmount_under(&subpaths_dir(pod_dir))
}

fn unmount_under(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    for m in mounts_under(dir) {
        unmount_all_at(&m);
    }
    mounts_under(dir).len()
}

/// Remove a pod's directory: first unmount whatever is mounted beneath it (sub-paths), and
/// refuse to delete through a mount that is still there (it could be a hostPath's content).
pub fn remove_pod_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let left = unmount_under(dir);
    if left > 0 {
        return Err(io::Error::other(format!(
            "{left} mount(s) under {} could not be unmounted",
            dir.display()
        )));
    }
    std::fs::remove_dir_all(dir)
}

/// An emptyDir with a `sizeLimit`: its name, directory, limit in bytes and as written.
#[derive(Debug, Clone)]
pub struct SizeLimited {
    pub name: String,
    pub path: PathBuf,
    pub limit: u64,
    pub limit_text: String,
}

/// The pod's emptyDirs that have a `sizeLimit`.
pub fn size_limited(pod: &Pod, pod_dir: &Path) -> Vec<SizeLimited> {
    pod.spec
        .volumes
        .iter()
        .filter_map(|v| {
            let q = v.empty_dir.as_ref()?.size_limit.as_ref()?;
            let text = q.as_string();
            let limit = parse_bytes(&text).ok()?;
            Some(SizeLimited {
                name: v.name.clone(),
                path: empty_dir_path(pod_dir, &v.name),
                limit,
                limit_text: text,
            })
        })
        .collect()
}

/// Bytes allocated under `dir`, as `du` counts them: symlinks not followed, other file systems
/// not entered, hard-linked files counted once.
pub fn usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let dev = top.dev();
    let mut total = top.blocks() * 512;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.dev() != dev {
                continue;
            }
            if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// The first size-limited emptyDir over its limit, as kubelet words the eviction.
pub fn over_limit(vols: &[SizeLimited]) -> Option<String> {
    vols.iter().find_map(|v| {
        (usage(&v.path) > v.limit).then(|| {
            format!(
                "Usage of EmptyDir volume {:?} exceeds the limit {:?}.",
                v.name, v.limit_text
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_beneath_and_refuses_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let vol = t.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::os::unix::fs::symlink("../../../../..", vol.join("esc")).unwrap();
        std::fs::create_dir(vol.join("d")).unwrap();
        std::os::unix::fs::symlink("/", vol.join("d/abs")).unwrap();
        let root = open_path(&vol, libc::O_DIRECTORY).unwrap();
        assert!(matches!(
            open_beneath(&root, "esc"),
            Err(SubPathError::Symlink(p)) if p == "esc"
        ));
        assert!(matches!(
            open_beneath(&root, "esc/etc"),
            Err(SubPathError::Symlink(_))
        ));
        assert!(matches!(
            open_beneath(&root, "d/abs/etc"),
            Err(SubPathError::Symlink(p)) if p == "d/abs"
        ));
        assert!(matches!(
            open_beneath(&root, "a/../.."),
            Err(SubPathError::Invalid(_))
        ));
        let (_, dir) = open_beneath(&root, "a//b/./c").unwrap();
        assert!(dir);
        assert!(vol.join("a/b/c").is_dir());
        std::fs::write(vol.join("f"), "x").unwrap();
        let (_, dir) = open_beneath(&root, "f").unwrap();
        assert!(!dir);
        assert!(matches!(
            open_beneath(&root, "f/g"),
            Err(SubPathError::NotDirectory(_))
        ));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
    }

    #[test]
    fn usage_counts_allocated_bytes_once() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), vec![1u8; 256 << 10]).unwrap();
        std::fs::hard_link(t.path().join("a"), t.path().join("b")).unwrap();
        std::os::unix::fs::symlink("/usr", t.path().join("l")).unwrap();
        let u = usage(t.path());
        assert!(u >= 256 << 10, "{u}");
        assert!(u < 1 << 20, "{u}");
    }
}
