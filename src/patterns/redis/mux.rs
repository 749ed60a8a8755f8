//! Multiplexed upstream connections: many clients' stateless commands share one connection per
//! server, the way twemproxy does it, so one `write` to Redis carries the commands of every
//! client that was ready, and one `read` brings back all their replies.
//!
//! A request is a run of complete commands from one client plus how many replies it owes; the
//! answer is those replies' bytes, in one piece, through a oneshot. Requests are written in
//! arrival order, and Redis answers a connection in order, so a FIFO of pending requests is all
//! the bookkeeping there is. If the connection breaks, every pending request gets the error and
//! the next request reconnects (failing fast while the server is known to be down).
//!
//! A `READONLY` reply means the server this ambassador takes for the master was demoted: the
//! topology is asked to refresh at once instead of at the next health check.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::conn::{UpRead, UpWrite};
use super::error::UpstreamError;
use super::resp;
use super::topology::Upstream;

pub type Reply = Result<Bytes, UpstreamError>;

pub struct MuxReq {
    pub cmds: Bytes,
    pub n: u32,
    pub reply: oneshot::Sender<Reply>,
    /// The client's account of reply bytes delivered but not yet written to it.
    pub owed: Option<Arc<Owed>>,
}

/// Reply bytes a client has waiting in the ambassador, and what happens past its limit.
pub struct Owed {
    pub bytes: std::sync::atomic::AtomicUsize,
    pub limit: usize,
    /// Cancelled when `bytes` passes `limit`: the session ends and its buffers are freed.
    pub kill: CancellationToken,
}

type PendingReq = (u32, oneshot::Sender<Reply>, Option<Arc<Owed>>);

type Pending = Arc<(Mutex<VecDeque<PendingReq>>, Notify)>;

/// Settings a multiplexer needs from the ambassador.
#[derive(Clone)]
pub struct MuxCtx {
    pub auth: Option<Bytes>,
    pub connect_timeout: std::time::Duration,
    pub epoch: std::time::Instant,
    pub stop: CancellationToken,
    /// Wakes the topology for an early refresh.
    pub refresh: Arc<Notify>,
}

/// Serve requests for `up` until `stop` or until every sender is gone.
pub async fn run(up: Arc<Upstream>, mut rx: mpsc::UnboundedReceiver<MuxReq>, ctx: MuxCtx) {
    let mut carry: Option<MuxReq> = None;
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => tokio::select! {
                _ = ctx.stop.cancelled() => return,
                r = rx.recv() => match r { Some(r) => r, None => return },
            },
        };
        let stream = match up.connect(ctx.connect_timeout, ctx.epoch).await {
            Ok(s) => s,
            Err(e) => {
                // Fail what is queued now; later requests try again (fast while down).
                let _ = first.reply.send(Err(e.clone()));
                while let Ok(r) = rx.try_recv() {
                    let _ = r.reply.send(Err(e.clone()));
                }
                continue;
            }
        };
        let (mut r, mut w) = stream.into_split();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        if let Some(a) = &ctx.auth {
            if let Err(e) = authenticate(&mut r, &mut w, &mut buf, a).await {
                let _ = first.reply.send(Err(e));
                continue;
            }
        }
        let pending: Pending = Arc::new((Mutex::new(VecDeque::new()), Notify::new()));
        let why = tokio::select! {
            biased;
            e = write_loop(first, &mut rx, w, pending.clone()) => match e {
                Some(e) => e,
                None => return,
            },
            e = read_loop(&up, r, buf, pending.clone(), &ctx.refresh) => e,
            _ = ctx.stop.cancelled() => return,
        };
        let mut q = pending.0.lock().unwrap();
        for (_, tx, _) in q.drain(..) {
            let _ = tx.send(Err(why.clone()));
        }
        drop(q);
        carry = None;
    }
}

async fn authenticate(
    r: &mut UpRead,
    w: &mut UpWrite,
    buf: &mut BytesMut,
    auth: &[u8],
) -> Result<(), UpstreamError> {
    w.write_all(auth).await.map_err(UpstreamError::lost)?;
    loop {
        if let Some(len) = resp::scan_frame(buf).map_err(UpstreamError::Malformed)? {
            let f = buf.split_to(len);
            if resp::is_error(&f) {
                return Err(UpstreamError::AuthRefused(
                    String::from_utf8_lossy(&f[1..]).trim_end().to_string(),
                ));
            }
            return Ok(());
        }
        if r.read_buf(buf).await.map_err(UpstreamError::lost)? == 0 {
            return Err(UpstreamError::Closed);
        }
    }
}

/// Gather whatever requests are ready, write them in one go. `None`: no more senders.
async fn write_loop(
    first: MuxReq,
    rx: &mut mpsc::UnboundedReceiver<MuxReq>,
    mut w: UpWrite,
    pending: Pending,
) -> Option<UpstreamError> {
    let mut wbuf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut batch: Vec<MuxReq> = vec![first];
    loop {
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        {
            let mut q = pending.0.lock().unwrap();
            for r in batch.drain(..) {
                wbuf.extend_from_slice(&r.cmds);
                q.push_back((r.n, r.reply, r.owed));
            }
        }
        pending.1.notify_one();
        if let Err(e) = w.write_all(&wbuf).await {
            return Some(UpstreamError::lost(e));
        }
        wbuf.clear();
        match rx.recv().await {
            Some(r) => batch.push(r),
            None => return None,
        }
    }
}

/// Hand each pending request its replies, in order.
async fn read_loop(
    up: &Upstream,
    mut r: UpRead,
    mut buf: BytesMut,
    pending: Pending,
    refresh: &Notify,
) -> UpstreamError {
    loop {
        let head = loop {
            let notified = pending.1.notified();
            if let Some(h) = pending.0.lock().unwrap().pop_front() {
                break h;
            }
            notified.await;
        };
        let (n, tx, owed) = head;
        let mut total = 0usize;
        let mut got = 0u32;
        while got < n {
            match resp::scan_frame(&buf[total..]) {
                Ok(Some(len)) => {
                    if resp::is_error(&buf[total..total + len]) {
                        up.stats
                            .error_replies
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if buf[total..].starts_with(b"-READONLY") {
                            refresh.notify_one();
                        }
                    }
                    total += len;
                    got += 1;
                }
                Ok(None) => {
                    if buf.capacity() - buf.len() < 8192 {
                        buf.reserve(64 * 1024);
                    }
                    let why = match r.read_buf(&mut buf).await {
                        Ok(0) => UpstreamError::Closed,
                        Err(e) => UpstreamError::lost(e),
                        Ok(_) => continue,
                    };
                    let _ = tx.send(Err(why.clone()));
                    return why;
                }
                Err(e) => {
                    let why = UpstreamError::Malformed(e);
                    let _ = tx.send(Err(why.clone()));
                    return why;
                }
            }
        }
        if let Some(o) = owed {
            let before = o
                .bytes
                .fetch_add(total, std::sync::atomic::Ordering::Relaxed);
            if before + total > o.limit {
                o.kill.cancel();
            }
        }
        let _ = tx.send(Ok(buf.split_to(total).freeze()));
    }
}
