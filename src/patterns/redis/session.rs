//! One client connection.
//!
//! Two halves run joined in one task. The **reader** parses what the client sends, decides
//! per command where it goes (a healthy replica for reads, the master for everything else and
//! for anything that touches connection state), appends it to that upstream connection's
//! output, and writes each upstream once per client read, so pipelining survives. For every
//! run of commands it queues an [`Entry`] that says which connection owes how many replies.
//! The **writer** walks those entries in order, copies each reply frame from the right
//! upstream to the client, and flushes when it would otherwise wait: replies always come
//! back in the order the client sent the commands, even when they were split across servers.
//!
//! Each client has its own upstream connections (taken from, and returned to, a per-server
//! pool of clean idle ones), so `MULTI`, `WATCH`, blocking commands and scripts run exactly as
//! against Redis directly. `SELECT`/`AUTH`/`HELLO` go to the master and are mirrored on the
//! replica connection; until the replica has accepted them, reads stay on the master.
//! `SUBSCRIBE`, `MONITOR` and `CLIENT TRACKING ON` turn the session into a raw pipe to the
//! master. A replica connection that breaks has its unanswered reads retried on the master.
//!
//! Memory per client is bounded: at most `--max-inflight-batches` client reads are queued
//! before the reader stops reading, and a slow client stops the writer, which stops reading the
//! upstreams (TCP back-pressure).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};

use super::commands::{classify, Class};
use super::metrics::Metrics;
use super::mux::{MuxCtx, MuxReq, Owed, Reply};
use super::resp::{self, Limits};
use super::topology::{Topology, Upstream, View};

/// What every session shares.
pub struct Shared {
    pub topo: Arc<Topology>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// The ambassador's own `AUTH` for upstreams, if configured.
    pub auth: Option<Bytes>,
    pub mux: MuxCtx,
}

/// Reader/writer handshake for leaving the shared connections: the reader waits until every
/// request it put on them has been answered, so no command overtakes another.
struct SessionSync {
    answered: AtomicU64,
    notify: Notify,
    /// Reply bytes the shared connections delivered that are not yet written to the client.
    owed: Arc<Owed>,
}

/// One multiplexed request of a batch: its answer, and for reads the commands themselves, so
/// they can be retried on the master if the replica fails.
struct MuxSlot {
    rx: oneshot::Receiver<Reply>,
    up: Arc<Upstream>,
    n: u32,
    retry: Option<Bytes>,
    data: Option<Bytes>,
}

const SLOT_MASTER: usize = 0;
const MAX_BATCH_COMMANDS: usize = 256;
const SLOT_REPLICA: usize = 1;

type ConnId = u32;

/// State of one upstream connection both halves can see.
#[derive(Default)]
struct ConnShared {
    dead: AtomicBool,
    /// ≥ 0: mirrored session-state commands not yet answered; −1: the server refused them.
    mirror: AtomicI32,
}

/// Reader side of an upstream connection.
struct WConn {
    id: ConnId,
    up: Arc<Upstream>,
    replica: bool,
    w: OwnedWriteHalf,
    sh: Arc<ConnShared>,
    out: BytesMut,
    cmds: u64,
    /// Carries session state (not returned to the pool).
    stateful: bool,
}

/// Writer side of an upstream connection.
struct RConn {
    id: ConnId,
    up: Arc<Upstream>,
    replica: bool,
    r: OwnedReadHalf,
    buf: BytesMut,
    sh: Arc<ConnShared>,
    /// Session-state commands this connection accepted, replayed on a fallback connection.
    state_cmds: Vec<Bytes>,
    failed: Option<String>,
}

enum Entry {
    Open(Box<RConn>),
    /// Forward `n` replies; `retry`: where these (read) commands sit in the batch's replica chunk.
    Replies {
        conn: ConnId,
        n: u32,
        retry: Option<Range<usize>>,
    },
    /// Consume `n` replies the client never asked for (credentials, mirrored state).
    Mirror {
        conn: ConnId,
        n: u32,
        cmds: Vec<Bytes>,
    },
    /// Forward `n` replies from the batch's multiplexed request in `slot`.
    MuxReplies {
        slot: usize,
        n: u32,
    },
    Local(Bytes),
    Pipe {
        conn: ConnId,
    },
    Retire {
        conn: ConnId,
    },
    Close,
}

struct Batch {
    sent: Instant,
    entries: Vec<Entry>,
    replica_chunk: Option<Bytes>,
    mux: [Option<MuxSlot>; 2],
}

/// Serve one client until it leaves or `stop` fires.
pub async fn run(
    stream: TcpStream,
    shared: Arc<Shared>,
    stop: tokio_util::sync::CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let cap = shared.topo.cfg.max_inflight_batches;
    let (tx, rx) = mpsc::channel::<Batch>(cap);
    let sync = Arc::new(SessionSync {
        answered: AtomicU64::new(0),
        notify: Notify::new(),
        owed: Arc::new(Owed {
            bytes: Default::default(),
            limit: shared.topo.cfg.max_client_output,
            kill: tokio_util::sync::CancellationToken::new(),
        }),
    });
    let kill = sync.owed.kill.clone();
    let mut reader = Reader::new(shared.clone(), sync.clone());
    let mut writer = Writer::new(shared.clone(), sync);
    let work = async {
        let (rd, wr) = tokio::join!(reader.run(r, tx), writer.run(rx, w));
        (rd, wr)
    };
    let (clean_reader, clean_writer) = tokio::select! {
        r = work => r,
        _ = stop.cancelled() => return,
        // A client that stops reading while it keeps sending: replies pile up here, not in
        // Redis. Past the limit it is disconnected, as Redis does with
        // `client-output-buffer-limit`; dropping the session frees what it held.
        _ = kill.cancelled() => {
            shared.metrics.clients_output_limit.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                limit = shared.topo.cfg.max_client_output,
                "redis-ambassador: client disconnected: more than --max-client-output-bytes of replies waiting"
            );
            return;
        }
    };
    // Return clean connections to the pool.
    if clean_reader && clean_writer {
        for wc in reader.conns.drain(..) {
            if wc.stateful
                || wc.sh.dead.load(Ordering::Relaxed)
                || wc.sh.mirror.load(Ordering::Relaxed) != 0
            {
                continue;
            }
            if let Some(pos) = writer.conns.iter().position(|c| c.id == wc.id) {
                let rc = writer.conns.swap_remove(pos);
                if rc.failed.is_none() && rc.buf.is_empty() {
                    if let Ok(s) = rc.r.reunite(wc.w) {
                        rc.up.put_idle(s);
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------ reader

struct Reader {
    shared: Arc<Shared>,
    conns: Vec<WConn>,
    next_id: ConnId,
    view: Arc<View>,
    in_multi: bool,
    watching: bool,
    last_write: Option<Instant>,
    /// SELECT / AUTH / HELLO as sent, keyed by command name, replayed on new connections.
    state_cmds: Vec<(String, Bytes)>,
    rr: usize,
    /// Connections no longer used for new commands. They stay open (a half-close could make
    /// the server drop replies still owed) until the session ends.
    retired: Vec<WConn>,
    /// Stateless so far: commands go over the shared multiplexed connections.
    dedicated: bool,
    submitted: u64,
    sync: Arc<SessionSync>,
    mux_bufs: [BytesMut; 2],
}

enum Target {
    Conn(usize),
    Error(String),
}

impl Reader {
    fn new(shared: Arc<Shared>, sync: Arc<SessionSync>) -> Self {
        let view = shared.topo.view();
        Reader {
            shared,
            conns: Vec::new(),
            next_id: 0,
            view,
            in_multi: false,
            watching: false,
            last_write: None,
            state_cmds: Vec::new(),
            rr: 0,
            retired: Vec::new(),
            dedicated: false,
            submitted: 0,
            sync,
            mux_bufs: [BytesMut::new(), BytesMut::new()],
        }
    }

    /// Index of a live connection to `up`, opening one if needed.
    async fn conn_for(
        &mut self,
        up: &Arc<Upstream>,
        replica: bool,
        entries: &mut Vec<Entry>,
    ) -> Result<usize, String> {
        if let Some(i) = self
            .conns
            .iter()
            .position(|c| Arc::ptr_eq(&c.up, up) && c.replica == replica)
        {
            if !self.conns[i].sh.dead.load(Ordering::Relaxed) {
                return Ok(i);
            }
            let c = self.conns.swap_remove(i);
            self.retire(c, entries);
        }
        let topo = &self.shared.topo;
        let (stream, fresh) = match up.take_idle() {
            Some(s) => (s, false),
            None => (
                up.connect(topo.cfg.connect_timeout, topo.epoch).await?,
                true,
            ),
        };
        let (r, w) = stream.into_split();
        let id = self.next_id;
        self.next_id += 1;
        let sh = Arc::new(ConnShared::default());
        let mut out = BytesMut::with_capacity(16 * 1024);
        let mut prelude = Vec::new();
        if fresh {
            if let Some(a) = &self.shared.auth {
                out.extend_from_slice(a);
                prelude.push(a.clone());
            }
        }
        let mut replay = Vec::new();
        for (_, cmd) in &self.state_cmds {
            out.extend_from_slice(cmd);
            replay.push(cmd.clone());
        }
        let stateful = !replay.is_empty();
        entries.push(Entry::Open(Box::new(RConn {
            id,
            up: up.clone(),
            replica,
            r,
            buf: BytesMut::with_capacity(16 * 1024),
            sh: sh.clone(),
            state_cmds: Vec::new(),
            failed: None,
        })));
        let n = (prelude.len() + replay.len()) as u32;
        if n > 0 {
            sh.mirror.store(n as i32, Ordering::Relaxed);
            // Credentials are not session state: only the replayed commands are recorded.
            entries.push(Entry::Mirror {
                conn: id,
                n: prelude.len() as u32,
                cmds: Vec::new(),
            });
            if !replay.is_empty() {
                entries.push(Entry::Mirror {
                    conn: id,
                    n: replay.len() as u32,
                    cmds: replay,
                });
            }
        }
        self.conns.push(WConn {
            id,
            up: up.clone(),
            replica,
            w,
            sh,
            out,
            cmds: 0,
            stateful,
        });
        Ok(self.conns.len() - 1)
    }

    async fn master(&mut self, entries: &mut Vec<Entry>) -> Target {
        let up = self.view.master.clone();
        match self.conn_for(&up, false, entries).await {
            Ok(i) => Target::Conn(i),
            Err(e) => Target::Error(format!("ERR kapsel ambassador: master {} {e}", up.shown())),
        }
    }

    /// Follow a new topology: drop connections to servers that lost their role, unless the
    /// session's state lives on them (a transaction, a WATCH).
    fn follow_view(&mut self, entries: &mut Vec<Entry>) {
        let gen = self.shared.topo.generation();
        if gen == self.view.generation {
            return;
        }
        self.view = self.shared.topo.view();
        let view = self.view.clone();
        let pinned = self.in_multi || self.watching;
        let mut i = 0;
        while i < self.conns.len() {
            let c = &self.conns[i];
            let keep = if c.replica {
                view.replicas.iter().any(|r| Arc::ptr_eq(r, &c.up))
            } else {
                pinned || Arc::ptr_eq(&view.master, &c.up)
            };
            if keep {
                i += 1;
            } else {
                let c = self.conns.swap_remove(i);
                self.retire(c, entries);
            }
        }
    }

    fn retire(&mut self, c: WConn, entries: &mut Vec<Entry>) {
        entries.push(Entry::Retire { conn: c.id });
        self.retired.push(c);
    }

    /// Read the client until it closes. Returns whether the session ended cleanly (EOF with
    /// nothing pending), which lets its connections go back to the pool.
    async fn run(&mut self, mut client: OwnedReadHalf, tx: mpsc::Sender<Batch>) -> bool {
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
        let mut args: Vec<Range<usize>> = Vec::with_capacity(8);
        let limits = self.shared.limits;
        let ryw = self.shared.topo.cfg.read_your_writes;
        let mut skip_read = false;
        loop {
            if rbuf.capacity() - rbuf.len() < 4096 {
                rbuf.reserve(16 * 1024);
            }
            if !std::mem::take(&mut skip_read) {
                match client.read_buf(&mut rbuf).await {
                    Ok(0) | Err(_) => return rbuf.is_empty(),
                    Ok(_) => {}
                }
            }
            let sent = Instant::now();
            let mut entries: Vec<Entry> = Vec::with_capacity(4);
            self.follow_view(&mut entries);
            // One replica per client read: batches stay one write, load spreads over reads.
            let replica = if self.view.replicas.is_empty() {
                None
            } else {
                self.rr = self.rr.wrapping_add(1);
                Some(self.view.replicas[self.rr % self.view.replicas.len()].clone())
            };
            let mut replica_conn: Option<ConnId> = None;
            let mut pos = 0;
            let mut end_after: Option<EndKind> = None;
            let mut mux_n = [0u32; 2];
            let mut switch = false;
            let mut parsed = 0usize;
            while pos < rbuf.len() {
                // Bounded batches: a client that sends a huge pipeline has it worked through
                // (and its replies owed) a slice at a time.
                if parsed >= MAX_BATCH_COMMANDS {
                    skip_read = true;
                    break;
                }
                let req = match resp::parse_request(&rbuf[pos..], &limits, &mut args) {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        self.shared
                            .metrics
                            .protocol_errors
                            .fetch_add(1, Ordering::Relaxed);
                        entries.push(Entry::Local(Bytes::from(resp::error_reply(&format!(
                            "ERR {e}"
                        )))));
                        entries.push(Entry::Close);
                        end_after = Some(EndKind::Close);
                        break;
                    }
                };
                let raw = pos..pos + req.consumed;
                pos += req.consumed;
                if args.is_empty() {
                    continue;
                }
                parsed += 1;
                let base = raw.start;
                let arg = |i: usize| &rbuf[base + args[i].start..base + args[i].end];
                let rest: Vec<&[u8]> = if args.len() > 1 && needs_rest(arg(0)) {
                    (1..args.len()).map(arg).collect()
                } else {
                    Vec::new()
                };
                let class = classify(arg(0), &rest);
                if !self.dedicated {
                    let shared_ok = match class {
                        Class::Read => true,
                        Class::Write => !own_connection(arg(0)),
                        _ => false,
                    };
                    if !shared_ok && !matches!(class, Class::Quit | Class::Refused) {
                        // Connection state from here on: leave the shared connections once
                        // everything sent on them is answered, then carry on from this command.
                        pos = raw.start;
                        switch = true;
                        break;
                    }
                    if shared_ok {
                        let recent_write = !ryw.is_zero()
                            && self
                                .last_write
                                .is_some_and(|w| sent.duration_since(w) < ryw);
                        let slot = if class == Class::Read && replica.is_some() && !recent_write {
                            SLOT_REPLICA
                        } else {
                            if class == Class::Read {
                                self.shared
                                    .metrics
                                    .reads_on_master
                                    .fetch_add(1, Ordering::Relaxed);
                            } else if !ryw.is_zero() {
                                self.last_write = Some(sent);
                            }
                            SLOT_MASTER
                        };
                        if req.inline {
                            let a: Vec<&[u8]> = (0..args.len()).map(arg).collect();
                            let mut v = Vec::new();
                            resp::encode_command(&mut v, &a);
                            self.mux_bufs[slot].extend_from_slice(&v);
                        } else {
                            self.mux_bufs[slot].extend_from_slice(&rbuf[raw.clone()]);
                        }
                        mux_n[slot] += 1;
                        push_mux(&mut entries, slot);
                        continue;
                    }
                }
                let name_upper = || String::from_utf8_lossy(arg(0)).to_ascii_uppercase();
                // The bytes to forward: verbatim, or re-encoded from an inline command.
                let fwd: Bytes = if req.inline {
                    let a: Vec<&[u8]> = (0..args.len()).map(arg).collect();
                    let mut v = Vec::new();
                    resp::encode_command(&mut v, &a);
                    Bytes::from(v)
                } else {
                    Bytes::new()
                };
                let cmd: &[u8] = if req.inline { &fwd } else { &rbuf[raw.clone()] };
                match class {
                    Class::Read => {
                        let to_master = self.in_multi
                            || self.watching
                            || (!ryw.is_zero()
                                && self
                                    .last_write
                                    .is_some_and(|w| sent.duration_since(w) < ryw));
                        let mut target = None;
                        if !to_master {
                            if let Some(up) = &replica {
                                if let Ok(i) = self.conn_for(up, true, &mut entries).await {
                                    if self.conns[i].sh.mirror.load(Ordering::Acquire) == 0 {
                                        target = Some(i);
                                    }
                                }
                            }
                        }
                        match target {
                            Some(i) => {
                                let c = &mut self.conns[i];
                                let start = c.out.len();
                                c.out.extend_from_slice(cmd);
                                c.cmds += 1;
                                let end = c.out.len();
                                replica_conn = Some(c.id);
                                push_replies(&mut entries, c.id, Some(start..end));
                            }
                            None => {
                                self.shared
                                    .metrics
                                    .reads_on_master
                                    .fetch_add(1, Ordering::Relaxed);
                                let t = self.master(&mut entries).await;
                                self.forward(t, &mut entries, cmd);
                            }
                        }
                    }
                    Class::Write => {
                        let t = self.master(&mut entries).await;
                        if let Target::Conn(i) = &t {
                            let n = arg(0);
                            if n.eq_ignore_ascii_case(b"CLIENT")
                                || n.eq_ignore_ascii_case(b"READONLY")
                                || n.eq_ignore_ascii_case(b"READWRITE")
                            {
                                self.conns[*i].stateful = true;
                            }
                        }
                        self.forward(t, &mut entries, cmd);
                        if !ryw.is_zero() {
                            self.last_write = Some(sent);
                        }
                    }
                    Class::SessionState => {
                        let cmd = Bytes::copy_from_slice(cmd);
                        let t = self.master(&mut entries).await;
                        if let Target::Conn(i) = &t {
                            self.conns[*i].stateful = true;
                        }
                        self.forward(t, &mut entries, &cmd);
                        for c in self.conns.iter_mut().filter(|c| c.replica) {
                            if c.sh.dead.load(Ordering::Relaxed) {
                                continue;
                            }
                            c.out.extend_from_slice(&cmd);
                            c.stateful = true;
                            c.sh.mirror.fetch_add(1, Ordering::AcqRel);
                            entries.push(Entry::Mirror {
                                conn: c.id,
                                n: 1,
                                cmds: vec![cmd.clone()],
                            });
                        }
                        let key = name_upper();
                        self.state_cmds.retain(|(k, _)| *k != key);
                        self.state_cmds.push((key, cmd));
                    }
                    Class::Multi | Class::Watch => {
                        let t = self.master(&mut entries).await;
                        if let Target::Conn(i) = &t {
                            self.conns[*i].stateful = true;
                        }
                        self.forward(t, &mut entries, cmd);
                        if class == Class::Multi {
                            self.in_multi = true;
                        } else {
                            self.watching = true;
                        }
                    }
                    Class::EndTx | Class::Unwatch => {
                        let t = self.master(&mut entries).await;
                        self.forward(t, &mut entries, cmd);
                        if class == Class::EndTx {
                            self.in_multi = false;
                        }
                        self.watching = false;
                    }
                    Class::Reset => {
                        let t = self.master(&mut entries).await;
                        self.forward(t, &mut entries, cmd);
                        self.in_multi = false;
                        self.watching = false;
                        self.state_cmds.clear();
                        let mut i = 0;
                        while i < self.conns.len() {
                            if self.conns[i].replica {
                                let mut c = self.conns.swap_remove(i);
                                // Reads of this batch it still carries are sent first.
                                if replica_conn == Some(c.id) {
                                    replica_conn = None;
                                }
                                if write_conn(&mut c).await.is_err() {
                                    c.sh.dead.store(true, Ordering::Relaxed);
                                }
                                self.retire(c, &mut entries);
                            } else {
                                i += 1;
                            }
                        }
                    }
                    Class::Refused => {
                        self.shared
                            .metrics
                            .refused_commands
                            .fetch_add(1, Ordering::Relaxed);
                        entries.push(Entry::Local(Bytes::from(resp::error_reply(&format!(
                            "ERR kapsel ambassador: '{}' is not supported here: the ambassador matches every reply to its command",
                            String::from_utf8_lossy(cmd).split("\r\n").filter(|l| !l.is_empty() && !l.starts_with(['*', '$'])).collect::<Vec<_>>().join(" ")
                        )))));
                    }
                    Class::Quit => {
                        entries.push(Entry::Local(Bytes::from_static(b"+OK\r\n")));
                        entries.push(Entry::Close);
                        end_after = Some(EndKind::Close);
                        break;
                    }
                    Class::Pipe => {
                        match self.master(&mut entries).await {
                            Target::Conn(i) => {
                                let c = &mut self.conns[i];
                                c.out.extend_from_slice(cmd);
                                c.cmds += 1;
                                entries.push(Entry::Pipe { conn: c.id });
                                end_after = Some(EndKind::Pipe(i));
                            }
                            Target::Error(e) => {
                                entries.push(Entry::Local(Bytes::from(resp::error_reply(&e))));
                                continue;
                            }
                        }
                        break;
                    }
                }
            }
            // Write every upstream once for this client read.
            let mut replica_chunk = None;
            for c in self.conns.iter_mut() {
                if c.out.is_empty() {
                    continue;
                }
                if c.cmds > 0 {
                    c.up.stats.commands.fetch_add(c.cmds, Ordering::Relaxed);
                    c.cmds = 0;
                }
                let chunk = c.out.split().freeze();
                if c.w.write_all(&chunk).await.is_err() {
                    c.sh.dead.store(true, Ordering::Relaxed);
                }
                if Some(c.id) == replica_conn {
                    replica_chunk = Some(chunk);
                }
            }
            // Hand the shared connections their part of this client read.
            let mut mux: [Option<MuxSlot>; 2] = [None, None];
            for slot in [SLOT_MASTER, SLOT_REPLICA] {
                let n = mux_n[slot];
                if n == 0 {
                    continue;
                }
                let up = if slot == SLOT_MASTER {
                    self.view.master.clone()
                } else {
                    replica.clone().expect("replica slot has a replica")
                };
                let cmds = self.mux_bufs[slot].split().freeze();
                if self.mux_bufs[slot].capacity() < 4096 {
                    self.mux_bufs[slot].reserve(16 * 1024);
                }
                let (rtx, rrx) = oneshot::channel();
                up.stats.commands.fetch_add(n as u64, Ordering::Relaxed);
                let retry = (slot == SLOT_REPLICA).then(|| cmds.clone());
                up.submit(
                    MuxReq {
                        cmds,
                        n,
                        reply: rtx,
                        owed: Some(self.sync.owed.clone()),
                    },
                    &self.shared.mux,
                );
                self.submitted += 1;
                mux[slot] = Some(MuxSlot {
                    rx: rrx,
                    up,
                    n,
                    retry,
                    data: None,
                });
            }
            rbuf.advance(pos);
            if tx
                .send(Batch {
                    sent,
                    entries,
                    replica_chunk,
                    mux,
                })
                .await
                .is_err()
            {
                return false;
            }
            if switch {
                loop {
                    let notified = self.sync.notify.notified();
                    if self.sync.answered.load(Ordering::Acquire) >= self.submitted {
                        break;
                    }
                    notified.await;
                }
                self.dedicated = true;
                skip_read = true;
                continue;
            }
            match end_after {
                None => {}
                Some(EndKind::Close) => return false,
                Some(EndKind::Pipe(i)) => {
                    // From here on the client and the master talk directly.
                    let c = &mut self.conns[i];
                    if !rbuf.is_empty() && c.w.write_all(&rbuf).await.is_err() {
                        return false;
                    }
                    let _ = tokio::io::copy(&mut client, &mut c.w).await;
                    let _ = c.w.shutdown().await;
                    return false;
                }
            }
        }
    }

    fn forward(&mut self, t: Target, entries: &mut Vec<Entry>, bytes: &[u8]) {
        match t {
            Target::Conn(i) => {
                let c = &mut self.conns[i];
                c.out.extend_from_slice(bytes);
                c.cmds += 1;
                push_replies(entries, c.id, None);
            }
            Target::Error(e) => {
                self.view
                    .master
                    .stats
                    .failures
                    .fetch_add(1, Ordering::Relaxed);
                entries.push(Entry::Local(Bytes::from(resp::error_reply(&e))));
            }
        }
    }
}

enum EndKind {
    Close,
    Pipe(usize),
}

async fn write_conn(c: &mut WConn) -> std::io::Result<()> {
    if c.cmds > 0 {
        c.up.stats.commands.fetch_add(c.cmds, Ordering::Relaxed);
        c.cmds = 0;
    }
    if !c.out.is_empty() {
        let chunk = c.out.split();
        c.w.write_all(&chunk).await?;
    }
    Ok(())
}

/// Commands that block or act on their own connection, which a shared connection cannot carry.
fn own_connection(name: &[u8]) -> bool {
    const OWN: &[&[u8]] = &[
        b"BLPOP",
        b"BRPOP",
        b"BRPOPLPUSH",
        b"BLMOVE",
        b"BLMPOP",
        b"BZPOPMIN",
        b"BZPOPMAX",
        b"BZMPOP",
        b"XREAD",
        b"XREADGROUP",
        b"WAIT",
        b"WAITAOF",
        b"CLIENT",
        b"READONLY",
        b"READWRITE",
        b"ASKING",
        b"SWAPDB",
    ];
    OWN.iter().any(|o| name.eq_ignore_ascii_case(o))
}

fn push_mux(entries: &mut Vec<Entry>, slot: usize) {
    if let Some(Entry::MuxReplies { slot: s, n }) = entries.last_mut() {
        if *s == slot {
            *n += 1;
            return;
        }
    }
    entries.push(Entry::MuxReplies { slot, n: 1 });
}

/// Only a few commands are classified by their arguments; skip collecting them otherwise.
fn needs_rest(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"CLIENT") || name.eq_ignore_ascii_case(b"XREAD")
}

fn push_replies(entries: &mut Vec<Entry>, conn: ConnId, retry: Option<Range<usize>>) {
    if let Some(Entry::Replies {
        conn: c,
        n,
        retry: r,
    }) = entries.last_mut()
    {
        if *c == conn {
            match (r.as_mut(), &retry) {
                (None, None) => {
                    *n += 1;
                    return;
                }
                (Some(prev), Some(new)) if prev.end == new.start => {
                    prev.end = new.end;
                    *n += 1;
                    return;
                }
                _ => {}
            }
        }
    }
    entries.push(Entry::Replies { conn, n: 1, retry });
}

// ------------------------------------------------------------------------------------ writer

struct Writer {
    shared: Arc<Shared>,
    sync: Arc<SessionSync>,
    conns: Vec<RConn>,
    out: Vec<u8>,
}

impl Writer {
    fn new(shared: Arc<Shared>, sync: Arc<SessionSync>) -> Self {
        Writer {
            shared,
            sync,
            conns: Vec::new(),
            out: Vec::with_capacity(16 * 1024),
        }
    }

    async fn flush(&mut self, client: &mut OwnedWriteHalf) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let ok = client.write_all(&self.out).await.is_ok();
        self.out.clear();
        ok
    }

    /// Returns whether every owed reply was delivered.
    async fn run(&mut self, mut rx: mpsc::Receiver<Batch>, mut client: OwnedWriteHalf) -> bool {
        loop {
            let batch = match rx.try_recv() {
                Ok(b) => b,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !self.flush(&mut client).await {
                        return false;
                    }
                    match rx.recv().await {
                        Some(b) => b,
                        None => return true,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    let ok = self.flush(&mut client).await;
                    let _ = client.shutdown().await;
                    return ok;
                }
            };
            let mut mux = batch.mux;
            let used = mux.iter().filter(|m| m.is_some()).count() as u64;
            for e in batch.entries {
                match e {
                    Entry::MuxReplies { slot, n } => {
                        let Some(m) = mux[slot].as_mut() else {
                            continue;
                        };
                        if m.data.is_none() {
                            let r = match m.rx.try_recv() {
                                Ok(r) => r,
                                Err(oneshot::error::TryRecvError::Empty) => {
                                    if !self.flush(&mut client).await {
                                        return false;
                                    }
                                    (&mut m.rx)
                                        .await
                                        .unwrap_or_else(|_| Err("request dropped".into()))
                                }
                                Err(_) => Err("request dropped".into()),
                            };
                            m.up.stats.latency.observe(batch.sent.elapsed());
                            m.data = Some(match r {
                                Ok(b) => b,
                                Err(why) => self.mux_failed(m, why).await,
                            });
                        }
                        let data = m.data.as_mut().expect("set above");
                        let mut total = 0;
                        for _ in 0..n {
                            match resp::scan_frame(&data[total..]) {
                                Ok(Some(len)) => total += len,
                                _ => break,
                            }
                        }
                        self.out.extend_from_slice(&data[..total]);
                        data.advance(total);
                        // Only the shared connections add to the account, only this removes.
                        let owed = &self.sync.owed.bytes;
                        owed.fetch_sub(total.min(owed.load(Ordering::Relaxed)), Ordering::Relaxed);
                    }
                    Entry::Open(c) => self.conns.push(*c),
                    Entry::Local(b) => self.out.extend_from_slice(&b),
                    Entry::Retire { conn } => self.conns.retain(|c| c.id != conn),
                    Entry::Mirror { conn, n, cmds } => {
                        let Some(i) = self.conns.iter().position(|c| c.id == conn) else {
                            continue;
                        };
                        for k in 0..n {
                            match self.next_frame(i, &mut client).await {
                                Ok(len) => {
                                    let c = &mut self.conns[i];
                                    let err = resp::is_error(&c.buf[..len]);
                                    c.buf.advance(len);
                                    if err {
                                        c.sh.mirror.store(-1, Ordering::Release);
                                    } else if c.sh.mirror.load(Ordering::Acquire) > 0 {
                                        c.sh.mirror.fetch_sub(1, Ordering::AcqRel);
                                    }
                                    if let Some(cmd) = cmds.get(k as usize) {
                                        c.state_cmds.push(cmd.clone());
                                    }
                                }
                                Err(_) => {
                                    self.conns[i].sh.mirror.store(-1, Ordering::Release);
                                    break;
                                }
                            }
                        }
                    }
                    Entry::Replies { conn, n, retry } => {
                        let Some(i) = self.conns.iter().position(|c| c.id == conn) else {
                            continue;
                        };
                        let mut done = 0u32;
                        while done < n {
                            match self.next_frame(i, &mut client).await {
                                Ok(len) => {
                                    let c = &mut self.conns[i];
                                    let frame = &c.buf[..len];
                                    if resp::is_error(frame) {
                                        c.up.stats.error_replies.fetch_add(1, Ordering::Relaxed);
                                    }
                                    self.out.extend_from_slice(frame);
                                    c.buf.advance(len);
                                    done += 1;
                                }
                                Err(why) => {
                                    let left = n - done;
                                    let c = &self.conns[i];
                                    let retried = match (&retry, &batch.replica_chunk) {
                                        (Some(r), Some(chunk)) if c.replica => {
                                            let cmds = chunk.slice(r.clone());
                                            let state = c.state_cmds.clone();
                                            let up = c.up.clone();
                                            self.retry_on_master(&cmds, done, left, &state)
                                                .await
                                                .map(|_| {
                                                    up.stats
                                                        .retried
                                                        .fetch_add(left as u64, Ordering::Relaxed);
                                                })
                                                .is_ok()
                                        }
                                        _ => false,
                                    };
                                    if !retried {
                                        let c = &self.conns[i];
                                        c.up.stats
                                            .failures
                                            .fetch_add(left as u64, Ordering::Relaxed);
                                        let msg = resp::error_reply(&format!(
                                            "ERR kapsel ambassador: {} {} {why}",
                                            if c.replica { "replica" } else { "master" },
                                            c.up.shown()
                                        ));
                                        for _ in 0..left {
                                            self.out.extend_from_slice(&msg);
                                        }
                                    }
                                    break;
                                }
                            }
                        }
                        if let Some(c) = self.conns.get(i) {
                            c.up.stats.latency.observe(batch.sent.elapsed());
                        }
                    }
                    Entry::Pipe { conn } => {
                        if !self.flush(&mut client).await {
                            return false;
                        }
                        let Some(i) = self.conns.iter().position(|c| c.id == conn) else {
                            return false;
                        };
                        let mut c = self.conns.swap_remove(i);
                        if !c.buf.is_empty() && client.write_all(&c.buf).await.is_err() {
                            return false;
                        }
                        let _ = tokio::io::copy(&mut c.r, &mut client).await;
                        let _ = client.shutdown().await;
                        return false;
                    }
                    Entry::Close => {
                        let _ = self.flush(&mut client).await;
                        let _ = client.shutdown().await;
                        return false;
                    }
                }
            }
            if used > 0 {
                self.sync.answered.fetch_add(used, Ordering::AcqRel);
                self.sync.notify.notify_one();
            }
        }
    }

    /// A shared connection failed a request: reads are retried on the master; everything else
    /// gets an error per command (the commands may or may not have run, as with a dropped
    /// connection to Redis itself).
    async fn mux_failed(&mut self, m: &MuxSlot, why: String) -> Bytes {
        if let Some(cmds) = &m.retry {
            let master = self.shared.topo.view().master.clone();
            let (tx, rx) = oneshot::channel();
            master.submit(
                MuxReq {
                    cmds: cmds.clone(),
                    n: m.n,
                    reply: tx,
                    owed: None,
                },
                &self.shared.mux,
            );
            if let Ok(Ok(b)) = rx.await {
                m.up.stats.retried.fetch_add(m.n as u64, Ordering::Relaxed);
                return b;
            }
        }
        m.up.stats.failures.fetch_add(m.n as u64, Ordering::Relaxed);
        let role = if m.retry.is_some() {
            "replica"
        } else {
            "master"
        };
        let msg = resp::error_reply(&format!(
            "ERR kapsel ambassador: {role} {} {why}",
            m.up.shown()
        ));
        let mut v = Vec::with_capacity(msg.len() * m.n as usize);
        for _ in 0..m.n {
            v.extend_from_slice(&msg);
        }
        Bytes::from(v)
    }

    /// Length of the next complete reply frame at the front of connection `i`'s buffer,
    /// flushing the client before waiting for it.
    async fn next_frame(&mut self, i: usize, client: &mut OwnedWriteHalf) -> Result<usize, String> {
        loop {
            let c = &mut self.conns[i];
            if let Some(why) = &c.failed {
                return Err(why.clone());
            }
            match resp::scan_frame(&c.buf) {
                Ok(Some(len)) => return Ok(len),
                Ok(None) => {}
                Err(e) => {
                    let why = format!("sent a malformed reply ({e})");
                    c.failed = Some(why.clone());
                    c.sh.dead.store(true, Ordering::Relaxed);
                    return Err(why);
                }
            }
            if !self.out.is_empty() {
                // Don't hold finished replies back while waiting for the next one.
                let _ = client.write_all(&self.out).await;
                self.out.clear();
            }
            let c = &mut self.conns[i];
            if c.buf.capacity() - c.buf.len() < 4096 {
                c.buf.reserve(16 * 1024);
            }
            let why = match c.r.read_buf(&mut c.buf).await {
                Ok(0) => "closed the connection".to_string(),
                Err(e) => format!("connection lost: {e}"),
                Ok(_) => continue,
            };
            c.failed = Some(why.clone());
            c.sh.dead.store(true, Ordering::Relaxed);
            return Err(why);
        }
    }

    /// Re-run reads a broken replica connection still owed, on a fresh master connection with
    /// the session's state replayed. Appends the replies to the client output.
    async fn retry_on_master(
        &mut self,
        cmds: &Bytes,
        skip: u32,
        count: u32,
        state: &[Bytes],
    ) -> Result<(), String> {
        let topo = self.shared.topo.clone();
        let master = topo.view().master.clone();
        let mut s = master.connect(topo.cfg.connect_timeout, topo.epoch).await?;
        // Skip the commands that were answered before the connection broke.
        let mut args = Vec::new();
        let mut off = 0;
        for _ in 0..skip {
            match resp::parse_request(&cmds[off..], &self.shared.limits, &mut args) {
                Ok(Some(r)) => off += r.consumed,
                _ => return Err("cannot re-read owed commands".into()),
            }
        }
        let mut out = Vec::new();
        let mut silent = 0;
        if let Some(a) = &self.shared.auth {
            out.extend_from_slice(a);
            silent += 1;
        }
        for st in state {
            out.extend_from_slice(st);
            silent += 1;
        }
        out.extend_from_slice(&cmds[off..]);
        let work = async {
            s.write_all(&out).await.map_err(|e| e.to_string())?;
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let mut replies = Vec::new();
            let mut got = 0;
            while got < silent + count {
                match resp::scan_frame(&buf).map_err(|e| e.to_string())? {
                    Some(len) => {
                        let f = buf.split_to(len);
                        if got >= silent {
                            replies.extend_from_slice(&f);
                        }
                        got += 1;
                    }
                    None => {
                        if s.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                            return Err("master closed the connection".to_string());
                        }
                    }
                }
            }
            Ok(replies)
        };
        let replies = tokio::time::timeout(Duration::from_secs(5), work)
            .await
            .map_err(|_| "master did not answer the retried reads".to_string())??;
        self.out.extend_from_slice(&replies);
        Ok(())
    }
}
