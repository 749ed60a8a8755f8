//! What an idle node process keeps resident: the agent's thread and allocator budget, and the
//! release of the binary's start-up code once the node has joined.
//!
//! An idle `kapsel agent` owns little memory of its own (a few MiB); most of its RSS is pages of
//! the `kapsel` binary itself, mapped by fault-around (64 KiB windows, or whole large folios of
//! the page cache on recent kernels) around everything start-up touched once (command-line
//! parsing, the TLS join, the key and CSR, registration). Those pages stay mapped for the life
//! of the process though they are never run again.
//! [`release_startup_pages`] drops this process's mappings of the binary's read-only pages
//! (they stay in the page cache, shared); the few the idle node still runs (Lease renewal,
//! watches, the tunnel) fault back in on their next use, cheaply, from the page cache.

use std::io::BufRead;

/// Tokio worker threads of a `kapsel agent`'s control runtime: its work is HTTP to the control
/// plane and the pods' bookkeeping; WASM guests run on the WASM executor's own runtime.
pub const AGENT_WORKER_THREADS: usize = 2;

/// Limit glibc's malloc to two arenas (it makes up to 8 per core, one per thread that meets
/// contention, each keeping its own free memory): the agent's few threads share them.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Drop this process's page-table entries for the read-only, file-backed mappings of its own
/// executable (code and constants) that hold no private copy. Returns the bytes released from
/// RSS. A mapping with anonymous pages (the relocated `.data.rel.ro`, the writable data) is
/// left alone: its contents are not the file's.
pub fn release_startup_pages() -> std::io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy().into_owned();
    let smaps = std::io::BufReader::new(std::fs::File::open("/proc/self/smaps")?);
    // (start, end, read-only mapping of the executable), then its Rss and Anonymous.
    let mut current: Option<(usize, usize, bool)> = None;
    let mut rss_kib = 0u64;
    let mut candidates = Vec::new();
    for line in smaps.lines() {
        let line = line?;
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                let perms = f.next().unwrap_or("");
                // offset, device, inode, then the path (which may contain spaces).
                let path = f.skip(3).collect::<Vec<_>>().join(" ");
                let read_only = perms.starts_with('r') && !perms.contains('w');
                current = Some((a, b, read_only && path == exe));
                continue;
            }
        }
        match first {
            "Rss:" => rss_kib = f.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "Anonymous:" => {
                let anon: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(1);
                if let Some((a, b, true)) = current.take() {
                    if anon == 0 && rss_kib > 0 {
                        candidates.push((a, b, rss_kib));
                    }
                }
            }
            _ => {}
        }
    }
    let mut released = 0;
    for (a, b, kib) in candidates {
        // SAFETY: a private, read-only mapping of the executable with no anonymous page: every
        // page is the file's, and re-reading it on the next access gives the same bytes.
        let r = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        released += kib * 1024;
    }
    Ok(released)
}
