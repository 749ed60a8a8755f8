//! Per-container logs: every container's stdout+stderr is appended to
//! `<data-dir>/pods/<uid>/logs/<container>.log`; readers get the tail, followers are woken by
//! a watch channel on each append. Files outlive a crash of the node, so `kapsel logs` still
//! works after a restart. Log files are the node's: created 0600.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Logs past this size are truncated to their last half, so a chatty guest cannot fill the disk.
const MAX_LOG_BYTES: u64 = 16 << 20;

/// One container's log: the file and a counter of bytes appended (followers watch it).
pub struct LogStream {
    path: PathBuf,
    file: Mutex<Option<File>>,
    written: watch::Sender<u64>,
}

impl LogStream {
    fn open(path: PathBuf) -> Arc<Self> {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Arc::new(LogStream {
            path,
            file: Mutex::new(None),
            written: watch::channel(len).0,
        })
    }

    /// Append bytes (the guest's stdout or stderr); never fails the guest.
    pub fn append(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut guard = self.file.lock().unwrap();
        if guard.is_none() {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            *guard = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
                .ok();
        }
        if let Some(f) = guard.as_mut() {
            if f.write_all(bytes).is_ok() {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len > MAX_LOG_BYTES {
                    drop(guard.take());
                    truncate_to_tail(&self.path, MAX_LOG_BYTES / 2);
                }
                self.written.send_modify(|n| *n += bytes.len() as u64);
            }
        }
    }

    /// A line written by Kapsel itself (not the guest), e.g. why a start failed.
    pub fn note(&self, line: &str) {
        self.append(format!("[kapsel] {line}\n").as_bytes());
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }
}

fn truncate_to_tail(path: &Path, keep: u64) {
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(len.saturating_sub(keep))).is_ok()
            && f.read_to_end(&mut buf).is_ok()
        {
            let tmp = path.with_extension("log.tmp");
            let written = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| f.write_all(&buf));
            if written.is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
}

type StreamMap = HashMap<(String, String), Arc<LogStream>>;

/// All log streams of this node, by (pod uid, container).
#[derive(Clone)]
pub struct Logs {
    root: PathBuf,
    streams: Arc<Mutex<StreamMap>>,
}

impl Logs {
    /// `root` is the node's pods directory (`<data-dir>/pods`).
    pub fn new(root: PathBuf) -> Self {
        Logs {
            root,
            streams: Arc::default(),
        }
    }

    pub fn path(&self, pod_uid: &str, container: &str) -> PathBuf {
        self.root
            .join(pod_uid)
            .join("logs")
            .join(format!("{container}.log"))
    }

    pub fn stream(&self, pod_uid: &str, container: &str) -> Arc<LogStream> {
        let mut m = self.streams.lock().unwrap();
        m.entry((pod_uid.to_string(), container.to_string()))
            .or_insert_with(|| LogStream::open(self.path(pod_uid, container)))
            .clone()
    }

    /// Forget a pod's streams (followers see their stream end).
    pub fn forget_pod(&self, pod_uid: &str) {
        self.streams
            .lock()
            .unwrap()
            .retain(|(u, _), _| u != pod_uid);
    }

    /// The last `tail` lines (all when `None`) and the byte offset the read ended at.
    pub fn read(&self, pod_uid: &str, container: &str, tail: Option<usize>) -> (Vec<u8>, u64) {
        let path = self.path(pod_uid, container);
        let data = std::fs::read(&path).unwrap_or_default();
        let end = data.len() as u64;
        let out = match tail {
            None => data,
            Some(n) => tail_lines(&data, n).to_vec(),
        };
        (out, end)
    }

    /// Bytes appended after `offset` (and the new offset).
    pub fn read_from(&self, pod_uid: &str, container: &str, offset: u64) -> (Vec<u8>, u64) {
        let path = self.path(pod_uid, container);
        let Ok(mut f) = File::open(&path) else {
            return (Vec::new(), offset);
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        // Truncated underneath us: start over from the new beginning.
        let start = if len < offset { 0 } else { offset };
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
        let end = start + buf.len() as u64;
        (buf, end)
    }
}

/// The suffix of `data` holding its last `n` lines.
pub fn tail_lines(data: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut count = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            count += 1;
            if count == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail() {
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail_lines(b"a\n", 0), b"");
    }

    #[test]
    fn append_and_follow_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::new(dir.path().to_path_buf());
        let s = logs.stream("u1", "c");
        let rx = s.subscribe();
        s.append(b"one\n");
        s.append(b"two\n");
        assert_eq!(*rx.borrow(), 8);
        let (all, end) = logs.read("u1", "c", None);
        assert_eq!(all, b"one\ntwo\n");
        s.append(b"three\n");
        let (more, _) = logs.read_from("u1", "c", end);
        assert_eq!(more, b"three\n");
        assert_eq!(logs.read("u1", "c", Some(1)).0, b"three\n");
    }
}
