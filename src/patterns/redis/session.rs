//! One client connection.
//!
//! Two halves run joined in one task, the reader always polled just before the writer, so a
//! batch it hands over (through a [`Handoff`], not a channel) costs no wake-up. The **reader**
//! parses what the client sends, decides per command where it goes (a healthy replica for
//! reads, the master for everything else and for anything that touches connection state),
//! appends it to that upstream connection's output, and writes each upstream once per client
//! read, so pipelining survives. For every run of commands it queues an [`Entry`] that says
//! which connection owes how many replies. The **writer** walks those entries in order, copies
//! each reply frame from the right upstream to the client, and flushes when it would otherwise
//! wait: replies always come back in the order the client sent the commands, even when they
//! were split across servers.
//!
//! Each client has its own upstream connections (taken from, and returned to, a per-server
//! pool of clean idle ones), so `MULTI`, `WATCH`, blocking commands and scripts run exactly as
//! against Redis directly. `SELECT`/`AUTH`/`HELLO` go to the master and are mirrored on the
//! replica connection; until the replica has accepted them, reads stay on the master.
//! `SUBSCRIBE`, `MONITOR` and `CLIENT TRACKING ON` turn the session into a raw pipe to the
//! master. A replica connection that breaks has its unanswered reads retried on the master.
//!
//! Each client read picks one replica for its reads ([`Topology::pick_replica`]: fewest reads
//! in flight, ties by a shared cursor), so a pipelined batch is one write and one-command
//! clients still spread. If the master changes while a session is inside `MULTI` or holds a
//! `WATCH`, the rest of that transaction is answered by the ambassador (`EXEC` with
//! `-EXECABORT ... the Redis master changed during it ...; retry it`) and the next one runs on
//! the new master.
//!
//! The reader's work per client read is split by command class: [`Reader::shared_command`]
//! for stateless sessions, and [`Reader::dispatch`] into `read`, `write`, `session_state`,
//! `transaction`, `reset`, `refuse` and `pipe` for sessions with their own connections.
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
use tokio::sync::{oneshot, Notify};

use super::commands::{classify, Class};
use super::conn::{UpRead, UpWrite};
use super::error::UpstreamError;
use super::metrics::Metrics;
use super::mux::{MuxCtx, MuxReq, Owed, Reply};
use super::resp::{self, Limits};
use super::topology::{InFlight, Topology, Upstream, View};

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
    /// Counts a replica slot's reads as in flight until their replies arrive.
    inflight: Option<InFlight>,
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
    w: UpWrite,
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
    r: UpRead,
    buf: BytesMut,
    sh: Arc<ConnShared>,
    /// Session-state commands this connection accepted, replayed on a fallback connection.
    state_cmds: Vec<Bytes>,
    failed: Option<UpstreamError>,
}

enum Entry {
    Open(Box<RConn>),
    /// Forward `n` replies; `retry`: where these (read) commands sit in the batch's replica
    /// chunk; `inflight`: replica reads counted in flight until answered.
    Replies {
        conn: ConnId,
        n: u32,
        retry: Option<Range<usize>>,
        inflight: Option<InFlight>,
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
    let handoff = Handoff::new(cap);
    // The output-limit kill is a child of `stop`: one cancellation future serves both.
    let kill = stop.child_token();
    let sync = Arc::new(SessionSync {
        answered: AtomicU64::new(0),
        notify: Notify::new(),
        owed: Arc::new(Owed {
            bytes: Default::default(),
            limit: shared.topo.cfg.max_client_output,
            kill: kill.clone(),
        }),
    });
    let mut reader = Reader::new(shared.clone(), sync.clone());
    let mut writer = Writer::new(shared.clone(), sync);
    let work = reader_then_writer(
        async {
            let clean = reader.run(r, &handoff).await;
            handoff.close();
            clean
        },
        async {
            let clean = writer.run(&handoff, w).await;
            handoff.writer_gone();
            clean
        },
    );
    let (clean_reader, clean_writer) = tokio::select! {
        biased;
        r = work => r,
        _ = kill.cancelled() => {
            if stop.is_cancelled() {
                return;
            }
            // A client that stops reading while it keeps sending: replies pile up here, not
            // in Redis. Past the limit it is disconnected, as Redis does with
            // `client-output-buffer-limit`; dropping the session frees what it held.
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
                    if let Some(s) = rc.r.reunite(wc.w) {
                        rc.up.put_idle(s);
                    }
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------- handoff

/// The reader-to-writer queue of one session, at most `cap` batches long.
///
/// Both halves run in one task, and [`reader_then_writer`] polls the reader first and the
/// writer right after it, every time the task runs. So a batch the reader pushes is seen by the
/// writer in the same run, and a push wakes nobody: with a channel, every client read cost one
/// more run of the task, for nothing. Only a reader waiting for room is woken (by the writer's
/// pop), since it was polled before the pop.
struct Handoff {
    inner: std::sync::Mutex<HandoffInner>,
    cap: usize,
}

struct HandoffInner {
    q: std::collections::VecDeque<Batch>,
    /// The reader is done: nothing more will be pushed.
    closed: bool,
    /// The writer is done: pushes fail.
    writer_gone: bool,
    /// The reader, waiting for room.
    room: Option<std::task::Waker>,
}

// Only ever a return value, moved once: boxing the batch would add an allocation per client read.
#[allow(clippy::large_enum_variant)]
enum Popped {
    Batch(Batch),
    Empty,
    Closed,
}

impl Handoff {
    fn new(cap: usize) -> Self {
        Handoff {
            inner: std::sync::Mutex::new(HandoffInner {
                q: std::collections::VecDeque::with_capacity(cap.min(64)),
                closed: false,
                writer_gone: false,
                room: None,
            }),
            cap: cap.max(1),
        }
    }

    /// Queue a batch, waiting while the queue is full. `Err`: the writer is gone.
    async fn push(&self, batch: Batch) -> Result<(), ()> {
        let mut batch = Some(batch);
        std::future::poll_fn(|cx| {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if g.writer_gone {
                return std::task::Poll::Ready(Err(()));
            }
            if g.q.len() < self.cap {
                g.q.push_back(batch.take().expect("pushed once"));
                return std::task::Poll::Ready(Ok(()));
            }
            g.room = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }

    fn try_pop(&self) -> Popped {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match g.q.pop_front() {
            Some(b) => {
                if let Some(w) = g.room.take() {
                    w.wake();
                }
                Popped::Batch(b)
            }
            None if g.closed => Popped::Closed,
            None => Popped::Empty,
        }
    }

    /// The next batch; `None` once the reader is done and the queue is empty. Registers no
    /// waker: only the reader pushes, and it is polled before the writer in every run.
    async fn pop(&self) -> Option<Batch> {
        std::future::poll_fn(|_| match self.try_pop() {
            Popped::Batch(b) => std::task::Poll::Ready(Some(b)),
            Popped::Closed => std::task::Poll::Ready(None),
            Popped::Empty => std::task::Poll::Pending,
        })
        .await
    }

    fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    }

    fn writer_gone(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.writer_gone = true;
        if let Some(w) = g.room.take() {
            w.wake();
        }
    }
}

/// Run both halves of a session to completion, polling the reader before the writer every
/// time (what [`Handoff`] relies on).
async fn reader_then_writer<R, W>(
    rd: impl std::future::Future<Output = R>,
    wr: impl std::future::Future<Output = W>,
) -> (R, W) {
    let mut rd = std::pin::pin!(rd);
    let mut wr = std::pin::pin!(wr);
    let (mut rd_out, mut wr_out) = (None, None);
    std::future::poll_fn(|cx| {
        if rd_out.is_none() {
            if let std::task::Poll::Ready(v) = rd.as_mut().poll(cx) {
                rd_out = Some(v);
            }
        }
        if wr_out.is_none() {
            if let std::task::Poll::Ready(v) = wr.as_mut().poll(cx) {
                wr_out = Some(v);
            }
        }
        if rd_out.is_some() && wr_out.is_some() {
            std::task::Poll::Ready((
                rd_out.take().expect("checked"),
                wr_out.take().expect("checked"),
            ))
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

// ------------------------------------------------------------------------------------ reader

struct Reader {
    shared: Arc<Shared>,
    conns: Vec<WConn>,
    next_id: ConnId,
    view: Arc<View>,
    in_multi: bool,
    watching: bool,
    /// Set when the master changed while this session was inside `MULTI` or held a `WATCH`:
    /// the transaction cannot complete on the new master, so it is answered with an error and
    /// `EXEC` with `-EXECABORT`; the next transaction goes to the new master.
    tx_broken: Option<String>,
    last_write: Option<Instant>,
    /// SELECT / AUTH / HELLO as sent, keyed by command name, replayed on new connections.
    state_cmds: Vec<(String, Bytes)>,
    /// Connections no longer used for new commands. They stay open (a half-close could make
    /// the server drop replies still owed) until the session ends.
    retired: Vec<WConn>,
    /// Stateless so far: commands go over the shared multiplexed connections.
    dedicated: bool,
    submitted: u64,
    sync: Arc<SessionSync>,
    mux_bufs: [BytesMut; 2],
    /// Argument positions of the command being parsed (kept to reuse its allocation).
    args: Vec<Range<usize>>,
}

enum Target {
    Conn(usize),
    Error(String),
}

/// What one client read turns into, built up command by command.
struct Turn {
    sent: Instant,
    entries: Vec<Entry>,
    /// The replica for this read's reads: chosen at its first read, then kept, so a pipelined
    /// batch stays one write.
    replica: Option<Option<Arc<Upstream>>>,
    /// The dedicated replica connection this turn's reads went on.
    replica_conn: Option<ConnId>,
    mux_n: [u32; 2],
    end: Option<EndKind>,
    /// Stopped at a command that needs connection state: leave the shared connections first.
    switch: bool,
}

/// Whether to go on with the next command of a client read.
enum Step {
    Next,
    Stop,
}

/// What the shared-connection path did with a command.
enum SharedStep {
    /// Queued on a shared connection.
    Queued,
    /// Needs connection state: leave the shared connections, then handle it.
    Leave,
    /// Answered by the ambassador itself (`QUIT`, refused commands): the normal handlers.
    Local,
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
            tx_broken: None,
            last_write: None,
            state_cmds: Vec::new(),
            retired: Vec::new(),
            dedicated: false,
            submitted: 0,
            sync,
            mux_bufs: [BytesMut::new(), BytesMut::new()],
            args: Vec::with_capacity(8),
        }
    }

    /// Read the client until it closes. Returns whether the session ended cleanly (EOF with
    /// nothing pending), which lets its connections go back to the pool.
    async fn run(&mut self, mut client: OwnedReadHalf, tx: &Handoff) -> bool {
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
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
            let mut t = Turn {
                sent: Instant::now(),
                entries: Vec::with_capacity(4),
                replica: None,
                replica_conn: None,
                mux_n: [0; 2],
                end: None,
                switch: false,
            };
            self.follow_view(&mut t.entries);
            let (pos, more) = self.take_commands(&rbuf, &mut t).await;
            skip_read = more;
            let replica_chunk = self.write_upstreams(t.replica_conn).await;
            let mux = self.submit_shared(&mut t);
            rbuf.advance(pos);
            let batch = Batch {
                sent: t.sent,
                entries: t.entries,
                replica_chunk,
                mux,
            };
            if tx.push(batch).await.is_err() {
                return false;
            }
            if t.switch {
                self.leave_shared().await;
                skip_read = true;
                continue;
            }
            match t.end {
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

    /// Parse and route the complete commands at the front of `rbuf` (at most
    /// [`MAX_BATCH_COMMANDS`]). Returns how many bytes were used, and whether more complete
    /// commands may be waiting (so the next turn starts without reading).
    async fn take_commands(&mut self, rbuf: &[u8], t: &mut Turn) -> (usize, bool) {
        let limits = self.shared.limits;
        let mut args = std::mem::take(&mut self.args);
        let mut pos = 0;
        let mut parsed = 0usize;
        let mut more = false;
        while pos < rbuf.len() {
            // Bounded batches: a client that sends a huge pipeline has it worked through (and
            // its replies owed) a slice at a time.
            if parsed >= MAX_BATCH_COMMANDS {
                more = true;
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
                    t.entries
                        .push(Entry::Local(Bytes::from(resp::error_reply(&format!(
                            "ERR {e}"
                        )))));
                    t.entries.push(Entry::Close);
                    t.end = Some(EndKind::Close);
                    break;
                }
            };
            let start = pos;
            pos += req.consumed;
            if args.is_empty() {
                continue;
            }
            parsed += 1;
            let raw = &rbuf[start..pos];
            let arg = |i: usize| &raw[args[i].start..args[i].end];
            // The bytes to forward: verbatim, or re-encoded from an inline command.
            let encoded;
            let cmd: &[u8] = if req.inline {
                let a: Vec<&[u8]> = (0..args.len()).map(arg).collect();
                let mut v = Vec::new();
                resp::encode_command(&mut v, &a);
                encoded = v;
                &encoded
            } else {
                raw
            };
            let name = arg(0);
            let rest: Vec<&[u8]> = if args.len() > 1 && needs_rest(name) {
                (1..args.len()).map(arg).collect()
            } else {
                Vec::new()
            };
            let class = classify(name, &rest);
            if !self.dedicated {
                match self.shared_command(t, class, name, cmd) {
                    SharedStep::Queued => continue,
                    SharedStep::Leave => {
                        // Connection state from here on: leave the shared connections once
                        // everything sent on them is answered, then carry on from this command.
                        pos = start;
                        t.switch = true;
                        break;
                    }
                    SharedStep::Local => {}
                }
            }
            if let Step::Stop = self.dispatch(t, class, name, cmd).await {
                break;
            }
        }
        self.args = args;
        (pos, more)
    }

    fn recent_write(&self, now: Instant) -> bool {
        let ryw = self.shared.topo.cfg.read_your_writes;
        !ryw.is_zero() && self.last_write.is_some_and(|w| now.duration_since(w) < ryw)
    }

    fn note_write(&mut self, now: Instant) {
        if !self.shared.topo.cfg.read_your_writes.is_zero() {
            self.last_write = Some(now);
        }
    }

    /// The replica for this turn's reads (fewest reads in flight, shared tie-breaking cursor).
    fn replica_for<'t>(&self, t: &'t mut Turn) -> Option<&'t Arc<Upstream>> {
        t.replica
            .get_or_insert_with(|| self.shared.topo.pick_replica(&self.view))
            .as_ref()
    }

    /// A stateless session's command: onto a shared connection if it can go there.
    fn shared_command(
        &mut self,
        t: &mut Turn,
        class: Class,
        name: &[u8],
        cmd: &[u8],
    ) -> SharedStep {
        let shared_ok = match class {
            Class::Read => true,
            Class::Write => !own_connection(name),
            Class::Quit | Class::Refused => return SharedStep::Local,
            _ => false,
        };
        if !shared_ok {
            return SharedStep::Leave;
        }
        let slot = if class == Class::Read
            && !self.recent_write(t.sent)
            && self.replica_for(t).is_some()
        {
            SLOT_REPLICA
        } else {
            if class == Class::Read {
                self.shared
                    .metrics
                    .reads_on_master
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                self.note_write(t.sent);
            }
            SLOT_MASTER
        };
        self.mux_bufs[slot].extend_from_slice(cmd);
        t.mux_n[slot] += 1;
        push_mux(&mut t.entries, slot);
        SharedStep::Queued
    }

    /// A command of a session with its own upstream connections, by class.
    async fn dispatch(&mut self, t: &mut Turn, class: Class, name: &[u8], cmd: &[u8]) -> Step {
        if self.tx_broken.is_some() {
            if let Some(step) = self.broken_transaction(t, class, name) {
                return step;
            }
        }
        match class {
            Class::Read => self.read(t, cmd).await,
            Class::Write => self.write(t, name, cmd).await,
            Class::SessionState => self.session_state(t, name, cmd).await,
            Class::Multi | Class::Watch | Class::EndTx | Class::Unwatch => {
                self.transaction(t, class, cmd).await
            }
            Class::Reset => self.reset(t, cmd).await,
            Class::Refused => self.refuse(t, cmd),
            Class::Quit => {
                t.entries.push(Entry::Local(Bytes::from_static(b"+OK\r\n")));
                t.entries.push(Entry::Close);
                t.end = Some(EndKind::Close);
                return Step::Stop;
            }
            Class::Pipe => return self.pipe(t, cmd).await,
        }
        Step::Next
    }

    /// A read: the turn's replica, or the master inside a transaction, under `WATCH`, within
    /// the read-your-writes window, or when no replica connection is ready.
    async fn read(&mut self, t: &mut Turn, cmd: &[u8]) {
        let to_master = self.in_multi || self.watching || self.recent_write(t.sent);
        let mut target = None;
        if !to_master {
            if let Some(up) = self.replica_for(t).cloned() {
                if let Ok(i) = self.conn_for(&up, true, &mut t.entries).await {
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
                t.replica_conn = Some(c.id);
                push_replies(&mut t.entries, c.id, Some((start..end, &c.up)));
            }
            None => {
                self.shared
                    .metrics
                    .reads_on_master
                    .fetch_add(1, Ordering::Relaxed);
                let tg = self.master(&mut t.entries).await;
                self.forward(tg, &mut t.entries, cmd);
            }
        }
    }

    /// Anything that is not a read: the master.
    async fn write(&mut self, t: &mut Turn, name: &[u8], cmd: &[u8]) {
        let tg = self.master(&mut t.entries).await;
        if let Target::Conn(i) = &tg {
            if name.eq_ignore_ascii_case(b"CLIENT")
                || name.eq_ignore_ascii_case(b"READONLY")
                || name.eq_ignore_ascii_case(b"READWRITE")
            {
                self.conns[*i].stateful = true;
            }
        }
        self.forward(tg, &mut t.entries, cmd);
        self.note_write(t.sent);
    }

    /// `SELECT`, `AUTH`, `HELLO`: the master, mirrored on every replica connection, and
    /// remembered to replay on connections opened later.
    async fn session_state(&mut self, t: &mut Turn, name: &[u8], cmd: &[u8]) {
        let cmd = Bytes::copy_from_slice(cmd);
        let tg = self.master(&mut t.entries).await;
        if let Target::Conn(i) = &tg {
            self.conns[*i].stateful = true;
        }
        self.forward(tg, &mut t.entries, &cmd);
        for c in self.conns.iter_mut().filter(|c| c.replica) {
            if c.sh.dead.load(Ordering::Relaxed) {
                continue;
            }
            c.out.extend_from_slice(&cmd);
            c.stateful = true;
            c.sh.mirror.fetch_add(1, Ordering::AcqRel);
            t.entries.push(Entry::Mirror {
                conn: c.id,
                n: 1,
                cmds: vec![cmd.clone()],
            });
        }
        let key = String::from_utf8_lossy(name).to_ascii_uppercase();
        self.state_cmds.retain(|(k, _)| *k != key);
        self.state_cmds.push((key, cmd));
    }

    /// `MULTI`, `WATCH`, `EXEC`/`DISCARD`, `UNWATCH`: the master, tracking the transaction.
    async fn transaction(&mut self, t: &mut Turn, class: Class, cmd: &[u8]) {
        let tg = self.master(&mut t.entries).await;
        if let (Target::Conn(i), Class::Multi | Class::Watch) = (&tg, class) {
            self.conns[*i].stateful = true;
        }
        self.forward(tg, &mut t.entries, cmd);
        match class {
            Class::Multi => self.in_multi = true,
            Class::Watch => self.watching = true,
            Class::EndTx => {
                self.in_multi = false;
                self.watching = false;
            }
            _ => self.watching = false,
        }
    }

    /// The master changed under an open transaction or `WATCH` (see [`Reader::tx_broken`]).
    /// Answers the commands that belong to the broken transaction; `None` lets a command
    /// through to its normal handler (on the new master).
    fn broken_transaction(&mut self, t: &mut Turn, class: Class, name: &[u8]) -> Option<Step> {
        let why = self.tx_broken.clone().unwrap_or_default();
        let reply: Vec<u8> = match class {
            Class::Multi if self.in_multi => resp::error_reply("ERR MULTI calls can not be nested"),
            Class::Multi => {
                self.in_multi = true;
                b"+OK\r\n".to_vec()
            }
            Class::EndTx => {
                let exec = name.eq_ignore_ascii_case(b"EXEC");
                let r = match (exec, self.in_multi) {
                    (true, true) => resp::error_reply(&format!(
                        "EXECABORT Transaction discarded: the Redis master changed during it ({why}); retry it"
                    )),
                    (true, false) => resp::error_reply("ERR EXEC without MULTI"),
                    (false, true) => b"+OK\r\n".to_vec(),
                    (false, false) => resp::error_reply("ERR DISCARD without MULTI"),
                };
                if self.in_multi {
                    self.in_multi = false;
                    self.watching = false;
                    self.tx_broken = None;
                }
                r
            }
            Class::Unwatch if !self.in_multi => {
                self.watching = false;
                self.tx_broken = None;
                b"+OK\r\n".to_vec()
            }
            Class::Reset | Class::Quit => return None,
            _ if self.in_multi => resp::error_reply(&format!(
                "ERR kapsel ambassador: the Redis master changed during this transaction ({why}); EXEC will discard it"
            )),
            _ => return None,
        };
        t.entries.push(Entry::Local(Bytes::from(reply)));
        Some(Step::Next)
    }

    /// `RESET`: the master; the session's mirrored state and replica connections are dropped.
    async fn reset(&mut self, t: &mut Turn, cmd: &[u8]) {
        let tg = self.master(&mut t.entries).await;
        self.forward(tg, &mut t.entries, cmd);
        self.in_multi = false;
        self.watching = false;
        self.tx_broken = None;
        self.state_cmds.clear();
        let mut i = 0;
        while i < self.conns.len() {
            if self.conns[i].replica {
                let mut c = self.conns.swap_remove(i);
                // Reads of this turn it still carries are sent first.
                if t.replica_conn == Some(c.id) {
                    t.replica_conn = None;
                }
                if write_conn(&mut c).await.is_err() {
                    c.sh.dead.store(true, Ordering::Relaxed);
                }
                self.retire(c, &mut t.entries);
            } else {
                i += 1;
            }
        }
    }

    /// `CLIENT REPLY`: refused, since every reply must match its command.
    fn refuse(&mut self, t: &mut Turn, cmd: &[u8]) {
        self.shared
            .metrics
            .refused_commands
            .fetch_add(1, Ordering::Relaxed);
        let shown = String::from_utf8_lossy(cmd)
            .split("\r\n")
            .filter(|l| !l.is_empty() && !l.starts_with(['*', '$']))
            .collect::<Vec<_>>()
            .join(" ");
        t.entries.push(Entry::Local(Bytes::from(resp::error_reply(&format!(
            "ERR kapsel ambassador: '{shown}' is not supported here: the ambassador matches every reply to its command"
        )))));
    }

    /// `SUBSCRIBE`, `MONITOR`, `CLIENT TRACKING ON`: the session becomes a raw pipe to the
    /// master after this command.
    async fn pipe(&mut self, t: &mut Turn, cmd: &[u8]) -> Step {
        match self.master(&mut t.entries).await {
            Target::Conn(i) => {
                let c = &mut self.conns[i];
                c.out.extend_from_slice(cmd);
                c.cmds += 1;
                t.entries.push(Entry::Pipe { conn: c.id });
                t.end = Some(EndKind::Pipe(i));
                Step::Stop
            }
            Target::Error(e) => {
                t.entries
                    .push(Entry::Local(Bytes::from(resp::error_reply(&e))));
                Step::Next
            }
        }
    }

    /// Write every dedicated upstream connection once for this client read. Returns the bytes
    /// sent on the turn's replica connection, to retry its reads on the master if it breaks.
    async fn write_upstreams(&mut self, replica_conn: Option<ConnId>) -> Option<Bytes> {
        let mut replica_chunk = None;
        for c in self.conns.iter_mut() {
            if c.out.is_empty() {
                continue;
            }
            count_commands(c);
            let chunk = c.out.split().freeze();
            if c.w.write_all(&chunk).await.is_err() {
                c.sh.dead.store(true, Ordering::Relaxed);
            }
            if Some(c.id) == replica_conn {
                replica_chunk = Some(chunk);
            }
        }
        replica_chunk
    }

    /// Hand the shared connections their part of this client read.
    fn submit_shared(&mut self, t: &mut Turn) -> [Option<MuxSlot>; 2] {
        let mut mux: [Option<MuxSlot>; 2] = [None, None];
        for slot in [SLOT_MASTER, SLOT_REPLICA] {
            let n = t.mux_n[slot];
            if n == 0 {
                continue;
            }
            let up = if slot == SLOT_MASTER {
                self.view.master.clone()
            } else {
                match &t.replica {
                    Some(Some(up)) => up.clone(),
                    _ => unreachable!("reads go to the replica slot only with a replica"),
                }
            };
            let cmds = self.mux_bufs[slot].split().freeze();
            if self.mux_bufs[slot].capacity() < 4096 {
                self.mux_bufs[slot].reserve(16 * 1024);
            }
            let (rtx, rrx) = oneshot::channel();
            up.stats.commands.fetch_add(n as u64, Ordering::Relaxed);
            let (retry, inflight) = if slot == SLOT_REPLICA {
                up.stats
                    .replica_reads
                    .fetch_add(n as u64, Ordering::Relaxed);
                (Some(cmds.clone()), Some(InFlight::new(&up, n as u64)))
            } else {
                (None, None)
            };
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
                inflight,
            });
        }
        mux
    }

    /// Wait until everything this session put on the shared connections is answered, then
    /// use connections of its own from now on.
    async fn leave_shared(&mut self) {
        loop {
            let notified = self.sync.notify.notified();
            if self.sync.answered.load(Ordering::Acquire) >= self.submitted {
                break;
            }
            notified.await;
        }
        self.dedicated = true;
    }

    /// Index of a live connection to `up`, opening one if needed.
    async fn conn_for(
        &mut self,
        up: &Arc<Upstream>,
        replica: bool,
        entries: &mut Vec<Entry>,
    ) -> Result<usize, UpstreamError> {
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
            Err(e) => Target::Error(format!(
                "ERR kapsel ambassador: master {} {}",
                up.shown(),
                e.line()
            )),
        }
    }

    /// Follow a new topology: drop connections to servers that lost their role. A master
    /// connection that carried an open transaction or `WATCH` marks the transaction broken.
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
                Arc::ptr_eq(&view.master, &c.up)
            };
            if keep {
                i += 1;
                continue;
            }
            let c = self.conns.swap_remove(i);
            if !c.replica && pinned && self.tx_broken.is_none() {
                self.shared
                    .metrics
                    .transactions_broken
                    .fetch_add(1, Ordering::Relaxed);
                self.tx_broken = Some(format!(
                    "failover from {} to {}",
                    c.up.shown(),
                    view.master.shown()
                ));
            }
            self.retire(c, entries);
        }
    }

    fn retire(&mut self, c: WConn, entries: &mut Vec<Entry>) {
        entries.push(Entry::Retire { conn: c.id });
        self.retired.push(c);
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

/// Count what a connection is about to send in the upstream's metrics.
fn count_commands(c: &mut WConn) {
    if c.cmds > 0 {
        c.up.stats.commands.fetch_add(c.cmds, Ordering::Relaxed);
        if c.replica {
            c.up.stats
                .replica_reads
                .fetch_add(c.cmds, Ordering::Relaxed);
        }
        c.cmds = 0;
    }
}

async fn write_conn(c: &mut WConn) -> std::io::Result<()> {
    count_commands(c);
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

/// Owe one more reply from `conn`; for a replica read, where its command sits in the turn's
/// replica chunk and the replica whose in-flight count it adds to.
fn push_replies(
    entries: &mut Vec<Entry>,
    conn: ConnId,
    read: Option<(Range<usize>, &Arc<Upstream>)>,
) {
    if let Some(Entry::Replies {
        conn: c,
        n,
        retry: r,
        inflight,
    }) = entries.last_mut()
    {
        if *c == conn {
            match (r.as_mut(), &read) {
                (None, None) => {
                    *n += 1;
                    return;
                }
                (Some(prev), Some((new, _))) if prev.end == new.start => {
                    prev.end = new.end;
                    *n += 1;
                    if let Some(g) = inflight {
                        g.add(1);
                    }
                    return;
                }
                _ => {}
            }
        }
    }
    let (retry, inflight) = match read {
        Some((range, up)) => (Some(range), Some(InFlight::new(up, 1))),
        None => (None, None),
    };
    entries.push(Entry::Replies {
        conn,
        n: 1,
        retry,
        inflight,
    });
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
    async fn run(&mut self, rx: &Handoff, mut client: OwnedWriteHalf) -> bool {
        loop {
            let batch = match rx.try_pop() {
                Popped::Batch(b) => b,
                Popped::Empty => {
                    if !self.flush(&mut client).await {
                        return false;
                    }
                    match rx.pop().await {
                        Some(b) => b,
                        None => return true,
                    }
                }
                Popped::Closed => {
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
                                    (&mut m.rx).await.unwrap_or(Err(UpstreamError::Dropped))
                                }
                                Err(_) => Err(UpstreamError::Dropped),
                            };
                            m.inflight = None;
                            m.up.stats.latency.observe(batch.sent.elapsed());
                            m.data = Some(match r {
                                Ok(b) => b,
                                Err(why) => self.mux_failed(m, why).await,
                            });
                        }
                        let data = m.data.as_mut().expect("set above");
                        let mut total = 0;
                        if n == m.n {
                            // The slot's only entry: its answer is exactly these n replies.
                            total = data.len();
                        } else {
                            for _ in 0..n {
                                match resp::scan_frame(&data[total..]) {
                                    Ok(Some(len)) => total += len,
                                    _ => break,
                                }
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
                    Entry::Replies {
                        conn,
                        n,
                        retry,
                        inflight: _inflight,
                    } => {
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
                                        // The master was demoted: look again now.
                                        if !c.replica && frame.starts_with(b"-READONLY") {
                                            self.shared.topo.refresh.notify_one();
                                        }
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
                                            "ERR kapsel ambassador: {} {} {}",
                                            if c.replica { "replica" } else { "master" },
                                            c.up.shown(),
                                            why.line()
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
    async fn mux_failed(&mut self, m: &MuxSlot, why: UpstreamError) -> Bytes {
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
            "ERR kapsel ambassador: {role} {} {}",
            m.up.shown(),
            why.line()
        ));
        let mut v = Vec::with_capacity(msg.len() * m.n as usize);
        for _ in 0..m.n {
            v.extend_from_slice(&msg);
        }
        Bytes::from(v)
    }

    /// Length of the next complete reply frame at the front of connection `i`'s buffer,
    /// flushing the client before waiting for it.
    async fn next_frame(
        &mut self,
        i: usize,
        client: &mut OwnedWriteHalf,
    ) -> Result<usize, UpstreamError> {
        loop {
            let c = &mut self.conns[i];
            if let Some(why) = &c.failed {
                return Err(why.clone());
            }
            match resp::scan_frame(&c.buf) {
                Ok(Some(len)) => return Ok(len),
                Ok(None) => {}
                Err(e) => {
                    let why = UpstreamError::Malformed(e);
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
                Ok(0) => UpstreamError::Closed,
                Err(e) => UpstreamError::lost(e),
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
    ) -> Result<(), UpstreamError> {
        let topo = self.shared.topo.clone();
        let master = topo.view().master.clone();
        let mut s = master.connect(topo.cfg.connect_timeout, topo.epoch).await?;
        // Skip the commands that were answered before the connection broke.
        let mut args = Vec::new();
        let mut off = 0;
        for _ in 0..skip {
            match resp::parse_request(&cmds[off..], &self.shared.limits, &mut args) {
                Ok(Some(r)) => off += r.consumed,
                _ => return Err(UpstreamError::Dropped),
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
            s.write_all(&out).await.map_err(UpstreamError::lost)?;
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let mut replies = Vec::new();
            let mut got = 0;
            while got < silent + count {
                match resp::scan_frame(&buf).map_err(UpstreamError::Malformed)? {
                    Some(len) => {
                        let f = buf.split_to(len);
                        if got >= silent {
                            replies.extend_from_slice(&f);
                        }
                        got += 1;
                    }
                    None => {
                        if s.read_buf(&mut buf).await.map_err(UpstreamError::lost)? == 0 {
                            return Err(UpstreamError::Closed);
                        }
                    }
                }
            }
            Ok(replies)
        };
        let replies = tokio::time::timeout(Duration::from_secs(5), work)
            .await
            .map_err(|_| UpstreamError::Timeout(Duration::from_secs(5)))??;
        self.out.extend_from_slice(&replies);
        Ok(())
    }
}
