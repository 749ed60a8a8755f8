//! The pod sandbox: one network namespace per pod, shared by every member.
//!
//! A pod with OCI containers gets a Docker infra (pause) container that holds the namespace;
//! its containers join it (`network_mode: container:<infra>`). WASM guests (and, later,
//! built-in components) of a networked pod run on a dedicated thread that entered that
//! namespace with `setns`, so every socket they open lives in the pod's namespace: `localhost`
//! is shared both ways. A WASM-only pod that needs a network gets a fresh namespace of its own
//! (`unshare(CLONE_NEWNET)`, loopback up) — no Docker needed. Without the privilege for that,
//! the pod falls back to the node's network (documented in the README); its components may then
//! not connect to the node's loopback or the API (the socket check in `runtime::wasm`).
//! `hostPort`s are exposed by a small TCP forwarder listening on the node that connects to the
//! port inside the pod's namespace.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::executor::ExecError;

/// How a pod is networked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    /// The pod's own namespace, held by a Docker infra container.
    Infra { container_id: String },
    /// The pod's own namespace, created by Kapsel.
    Own,
    /// The node's network (no privilege to create namespaces).
    Host,
}

/// A live pod sandbox. Dropping it (or `shutdown`) ends its thread and forwarders.
pub struct Sandbox {
    pub mode: NetMode,
    /// The runtime whose thread lives in the pod's namespace: guests and forwarders run here.
    rt: Option<Handle>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Enter {
    Path(PathBuf),
    Unshare,
}

impl Sandbox {
    /// Join the namespace held by the infra container's process.
    pub fn join_infra(container_id: &str, pid: u32) -> Result<Self, ExecError> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let mut s = Self::spawn(Enter::Path(path))?;
        s.mode = NetMode::Infra {
            container_id: container_id.to_string(),
        };
        Ok(s)
    }

    /// A namespace of the pod's own; falls back to the node's network without privilege.
    pub fn own_or_host() -> Self {
        match Self::spawn(Enter::Unshare) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a network namespace; the pod uses the node's network");
                Self::host()
            }
        }
    }

    /// The node's network: no namespace. WASM components then may not connect to the node's
    /// loopback or its API (see `runtime::wasm`).
    pub fn host() -> Self {
        Sandbox {
            mode: NetMode::Host,
            rt: None,
            stop: CancellationToken::new(),
            thread: None,
        }
    }

    fn spawn(enter: Enter) -> Result<Self, ExecError> {
        let stop = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel::<Result<Handle, String>>();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kapsel-pod-net".into())
            .spawn(move || {
                if let Err(e) = enter_netns(&enter) {
                    let _ = tx.send(Err(e));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(token.cancelled());
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| ExecError::Internal(format!("pod network thread: {e}")))?;
        match rx.recv() {
            Ok(Ok(h)) => Ok(Sandbox {
                mode: NetMode::Own,
                rt: Some(h),
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(ExecError::Sandbox(e))
            }
            Err(_) => Err(ExecError::Sandbox("pod network thread died".into())),
        }
    }

    /// Where the pod's guests must run (None: anywhere, the node's network).
    pub fn runtime(&self) -> Option<Handle> {
        self.rt.clone()
    }

    /// Forward `0.0.0.0:host_port` on the node to `127.0.0.1:container_port` in the pod.
    pub async fn expose(&self, host_port: u16, container_port: u16) -> Result<(), ExecError> {
        let Some(rt) = self.rt.clone() else {
            // Node network: the guest itself listens on the node; nothing to forward unless
            // the ports differ, which needs the pod's own namespace.
            if host_port != container_port {
                return Err(ExecError::Sandbox(format!(
                    "hostPort {host_port} → containerPort {container_port} needs a pod network namespace, which this node cannot create"
                )));
            }
            return Ok(());
        };
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", host_port))
            .await
            .map_err(|e| ExecError::Sandbox(format!("hostPort {host_port}: {e}")))?;
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = stop.cancelled() => return,
                };
                let Ok((inbound, _)) = conn else { continue };
                let Ok(inbound) = inbound.into_std() else {
                    continue;
                };
                rt.spawn(async move {
                    let Ok(mut inbound) = tokio::net::TcpStream::from_std(inbound) else {
                        return;
                    };
                    match tokio::net::TcpStream::connect(("127.0.0.1", container_port)).await {
                        Ok(mut up) => {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut up).await;
                        }
                        Err(e) => tracing::debug!(error = %e, container_port, "hostPort forward"),
                    }
                });
            }
        });
        Ok(())
    }

    pub fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn enter_netns(enter: &Enter) -> Result<(), String> {
    match enter {
        Enter::Path(p) => setns(p),
        Enter::Unshare => {
            // SAFETY: unshare takes flags only; it moves this (dedicated sandbox) thread into a new
            // network namespace, which is what the thread is for.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "unshare(CLONE_NEWNET): {}",
                    std::io::Error::last_os_error()
                ));
            }
            loopback_up()
        }
    }
}

fn setns(path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: `f` is open for the call; the calling thread is the pod's own network thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A new network namespace has `lo` down; bring it up.
fn loopback_up() -> Result<(), String> {
    // SAFETY: a socket and ioctls on it with a repr(C) ifreq the kernel reads and writes;
    // the descriptor is closed on every path below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        for (i, b) in b"lo".iter().enumerate() {
            req.name[i] = *b as libc::c_char;
        }
        let r = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            Err(format!(
                "SIOCGIFFLAGS lo: {}",
                std::io::Error::last_os_error()
            ))
        } else {
            req.flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
                Err(format!(
                    "SIOCSIFFLAGS lo: {}",
                    std::io::Error::last_os_error()
                ))
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        r
    }
}
