//! The embedded, crash-safe default store: redb (a pure-Rust, copy-on-write B-tree with
//! fsync'd commits) under `--data-dir`, an in-memory cache that serves every read, and a single
//! writer thread doing *group commit*: all writes that arrive while a commit is in flight are
//! validated and committed together in the next transaction, so 1,000 concurrent writers cost a
//! handful of fsyncs, and no write is acknowledged before it is durable. Watches are fed after
//! the commit, from the same thread, so a watcher never sees a write that could be lost.
//!
//! Watch history and live streams are kept *per kind*: a kind that churns (pods) cannot push
//! another kind's events (Deployments) out of the history a watch resumes from, nor make a
//! watcher of another kind lag. History is bounded by event count and by (estimated) bytes,
//! per kind and in total, so large objects created and deleted over and over cannot pin
//! memory; a watch from a revision older than its kind's retained history gets `Gone`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, RwLock};

use ::redb::{Database, ReadableTable, TableDefinition};
use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{object_key, object_rv, EventType, Store, StoreError, Watch, WatchEvent, WatchFrom};
use crate::model::Kind;

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Most recent events kept per kind to serve `watch` from a revision.
const HISTORY_EVENTS_PER_KIND: usize = 50_000;
/// Most bytes (estimated in-memory size of the objects) of history kept per kind.
const HISTORY_BYTES_PER_KIND: usize = 32 << 20;
/// Most bytes of history kept over all kinds; over it, the largest kind gives up its oldest.
const HISTORY_BYTES_TOTAL: usize = 64 << 20;
/// Live events buffered per kind for a watcher before it is told it lagged.
const LIVE_CAPACITY: usize = 1 << 16;
/// redb's page cache.
const REDB_CACHE_BYTES: usize = 64 << 20;
/// Most writes folded into one transaction.
const MAX_BATCH: usize = 4096;

type Objects = HashMap<Kind, BTreeMap<(String, String), Arc<Value>>>;

struct State {
    objects: Objects,
    rv: u64,
    history: History,
}

/// Recent committed events, per kind, bounded by count and bytes.
struct History {
    rings: HashMap<Kind, Ring>,
    bytes: usize,
    /// The revision the store was opened at: nothing at or below it is retained.
    floor: u64,
}

#[derive(Default)]
struct Ring {
    events: VecDeque<(WatchEvent, usize)>,
    bytes: usize,
    /// The newest revision of this kind that was dropped (a watch from before it is `Gone`).
    dropped_upto: u64,
}

impl Ring {
    fn pop(&mut self) -> usize {
        match self.events.pop_front() {
            Some((ev, size)) => {
                self.bytes -= size;
                self.dropped_upto = ev.rv;
                size
            }
            None => 0,
        }
    }
}

impl History {
    fn new(floor: u64) -> Self {
        History {
            rings: HashMap::new(),
            bytes: 0,
            floor,
        }
    }

    fn push(&mut self, ev: WatchEvent, size: usize) {
        let ring = self.rings.entry(ev.kind).or_default();
        ring.events.push_back((ev, size));
        ring.bytes += size;
        self.bytes += size;
        while ring.events.len() > HISTORY_EVENTS_PER_KIND
            || (ring.bytes > HISTORY_BYTES_PER_KIND && ring.events.len() > 1)
        {
            self.bytes -= ring.pop();
        }
        while self.bytes > HISTORY_BYTES_TOTAL {
            let Some(largest) = self
                .rings
                .values_mut()
                .filter(|r| !r.events.is_empty())
                .max_by_key(|r| r.bytes)
            else {
                break;
            };
            self.bytes -= largest.pop();
        }
    }

    /// Events of `kind` after `since`, or `Gone` when some of them are no longer retained.
    fn since(
        &self,
        kind: Kind,
        ns: Option<&str>,
        since: u64,
        current: u64,
    ) -> Result<Vec<WatchEvent>, StoreError> {
        if since >= current {
            return Ok(Vec::new());
        }
        let ring = self.rings.get(&kind);
        let dropped = ring.map(|r| r.dropped_upto).unwrap_or(0);
        if since < self.floor || since < dropped {
            return Err(StoreError::Gone(since));
        }
        Ok(ring
            .map(|r| {
                r.events
                    .iter()
                    .map(|(e, _)| e)
                    .filter(|e| e.rv > since && ns.map(|n| e.namespace() == n).unwrap_or(true))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Estimated in-memory size of a JSON value (what history accounting charges for an event).
fn approx_size(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 16,
        Value::String(s) => 24 + s.len(),
        Value::Array(a) => 24 + a.iter().map(approx_size).sum::<usize>(),
        Value::Object(m) => {
            32 + m
                .iter()
                .map(|(k, v)| 48 + k.len() + approx_size(v))
                .sum::<usize>()
        }
    }
}

enum Op {
    Create(Kind, Value),
    Update(Kind, Value),
    Delete(Kind, String, String, Option<u64>),
}

struct Request {
    op: Op,
    /// The stored object: the caller copies it, off the writer thread.
    reply: oneshot::Sender<Result<Arc<Value>, StoreError>>,
}

/// redb-backed [`Store`]. Cheap to share behind an `Arc`.
pub struct RedbStore {
    state: Arc<RwLock<State>>,
    tx: mpsc::UnboundedSender<Request>,
    events: Arc<LiveEvents>,
}

/// One live channel per kind.
struct LiveEvents(HashMap<Kind, broadcast::Sender<WatchEvent>>);

impl LiveEvents {
    fn new() -> Self {
        LiveEvents(
            Kind::ALL
                .iter()
                .map(|k| (*k, broadcast::channel(LIVE_CAPACITY).0))
                .collect(),
        )
    }
    fn sender(&self, kind: Kind) -> &broadcast::Sender<WatchEvent> {
        &self.0[&kind]
    }
}

fn db_key(kind: Kind, ns: &str, name: &str) -> String {
    format!("{}/{}/{}", kind.resource(), ns, name)
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Open (or create) the database in `dir/kapsel.redb` and load every object into memory.
    pub fn open(dir: &Path) -> Result<Arc<Self>, StoreError> {
        std::fs::create_dir_all(dir).map_err(backend)?;
        // Every read is served from the in-memory cache: redb's own page cache only needs to
        // hold what writes touch (its default, 1 GiB, would grow with every large object).
        let db = Database::builder()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(dir.join("kapsel.redb"))
            .map_err(backend)?;
        let mut objects: Objects = HashMap::new();
        let mut rv = 0;
        {
            let w = db.begin_write().map_err(backend)?;
            w.open_table(OBJECTS).map_err(backend)?;
            w.open_table(META).map_err(backend)?;
            w.commit().map_err(backend)?;
        }
        {
            let r = db.begin_read().map_err(backend)?;
            let meta = r.open_table(META).map_err(backend)?;
            if let Some(v) = meta.get("revision").map_err(backend)? {
                rv = v.value();
            }
            let t = r.open_table(OBJECTS).map_err(backend)?;
            for item in t.iter().map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                let key = k.value();
                let mut parts = key.splitn(3, '/');
                let (Some(res), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let Some(kind) = Kind::from_resource(res) else {
                    continue;
                };
                let obj: Value = serde_json::from_slice(v.value()).map_err(backend)?;
                objects
                    .entry(kind)
                    .or_default()
                    .insert((ns.to_string(), name.to_string()), Arc::new(obj));
            }
        }
        let state = Arc::new(RwLock::new(State {
            objects,
            rv,
            history: History::new(rv),
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let events = Arc::new(LiveEvents::new());
        let writer = Writer {
            db,
            state: state.clone(),
            events: events.clone(),
        };
        std::thread::Builder::new()
            .name("kapsel-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(backend)?;
        Ok(Arc::new(RedbStore { state, tx, events }))
    }

    async fn submit(&self, op: Op) -> Result<Value, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { op, reply })
            .map_err(|_| StoreError::Closed)?;
        let stored = rx.await.map_err(|_| StoreError::Closed)??;
        Ok(Arc::unwrap_or_clone(stored))
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn create(&self, kind: Kind, obj: Value) -> Result<Value, StoreError> {
        self.submit(Op::Create(kind, obj)).await
    }
    async fn update(&self, kind: Kind, obj: Value) -> Result<Value, StoreError> {
        self.submit(Op::Update(kind, obj)).await
    }
    async fn delete(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        precondition_rv: Option<u64>,
    ) -> Result<Value, StoreError> {
        self.submit(Op::Delete(kind, ns.into(), name.into(), precondition_rv))
            .await
    }
    fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<Option<Arc<Value>>, StoreError> {
        let st = self.state.read().unwrap();
        Ok(st
            .objects
            .get(&kind)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned())
    }
    fn list(&self, kind: Kind, ns: Option<&str>) -> Result<(Vec<Arc<Value>>, u64), StoreError> {
        let st = self.state.read().unwrap();
        Ok((list_locked(&st, kind, ns), st.rv))
    }
    fn watch(&self, kind: Kind, ns: Option<&str>, from: WatchFrom) -> Result<Watch, StoreError> {
        let st = self.state.read().unwrap();
        // Subscribing under the lock: the writer publishes under the write lock, so nothing
        // falls between the snapshot below and the live stream.
        let live = self.events.sender(kind).subscribe();
        let initial = match from {
            WatchFrom::Current => list_locked(&st, kind, ns)
                .into_iter()
                .map(|o| WatchEvent {
                    type_: EventType::Added,
                    kind,
                    rv: object_rv(&o).unwrap_or(0),
                    object: o,
                })
                .collect(),
            WatchFrom::Revision(since) => st.history.since(kind, ns, since, st.rv)?,
        };
        Ok(Watch {
            initial,
            live,
            kind,
            namespace: ns.map(str::to_string),
            after: st.rv,
        })
    }
    fn revision(&self) -> u64 {
        self.state.read().unwrap().rv
    }
}

impl RedbStore {
    /// Bytes (estimated) of watch history retained, over all kinds.
    pub fn history_bytes(&self) -> usize {
        self.state.read().unwrap().history.bytes
    }
}

fn list_locked(st: &State, kind: Kind, ns: Option<&str>) -> Vec<Arc<Value>> {
    let Some(m) = st.objects.get(&kind) else {
        return Vec::new();
    };
    match ns {
        Some(ns) => m
            .range((ns.to_string(), String::new())..)
            .take_while(|((n, _), _)| n == ns)
            .map(|(_, v)| v.clone())
            .collect(),
        None => m.values().cloned().collect(),
    }
}

/// The single writer: validates a batch against committed + pending state, commits it in one
/// redb transaction, then publishes it to the cache and to watchers, then replies.
struct Writer {
    db: Database,
    state: Arc<RwLock<State>>,
    events: Arc<LiveEvents>,
}

/// A write accepted into the current batch.
struct Pending {
    event: WatchEvent,
    key: (String, String),
    /// What the event costs in history.
    size: usize,
    reply: oneshot::Sender<Result<Arc<Value>, StoreError>>,
}

impl Writer {
    fn run(self, mut rx: mpsc::UnboundedReceiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
    }

    fn commit_batch(&self, batch: Vec<Request>) {
        let mut rv = self.state.read().unwrap().rv;
        // Writes of this batch not yet in the cache: key → Some(obj) or None (deleted).
        let mut overlay: HashMap<(Kind, String, String), Option<Arc<Value>>> = HashMap::new();
        let mut accepted: Vec<Pending> = Vec::new();
        {
            let st = self.state.read().unwrap();
            let current = |overlay: &HashMap<(Kind, String, String), Option<Arc<Value>>>,
                           kind: Kind,
                           ns: &str,
                           name: &str|
             -> Option<Arc<Value>> {
                match overlay.get(&(kind, ns.to_string(), name.to_string())) {
                    Some(v) => v.clone(),
                    None => st
                        .objects
                        .get(&kind)
                        .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
                        .cloned(),
                }
            };
            for Request { op, reply } in batch {
                let res = match op {
                    Op::Create(kind, mut obj) => object_key(&obj).and_then(|(ns, name)| {
                        if current(&overlay, kind, &ns, &name).is_some() {
                            return Err(StoreError::AlreadyExists {
                                kind: kind.name(),
                                name,
                            });
                        }
                        rv += 1;
                        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                        Ok((kind, ns, name, EventType::Added, Arc::new(obj)))
                    }),
                    Op::Update(kind, mut obj) => object_key(&obj).and_then(|(ns, name)| {
                        let Some(cur) = current(&overlay, kind, &ns, &name) else {
                            return Err(StoreError::NotFound {
                                kind: kind.name(),
                                name,
                            });
                        };
                        let cur_rv = object_rv(&cur).unwrap_or(0);
                        if let Some(given) = object_rv(&obj) {
                            if given != cur_rv {
                                return Err(StoreError::Conflict {
                                    kind: kind.name(),
                                    name,
                                    current: cur_rv,
                                    given,
                                });
                            }
                        }
                        rv += 1;
                        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                        Ok((kind, ns, name, EventType::Modified, Arc::new(obj)))
                    }),
                    Op::Delete(kind, ns, name, pre) => match current(&overlay, kind, &ns, &name) {
                        None => Err(StoreError::NotFound {
                            kind: kind.name(),
                            name,
                        }),
                        Some(cur) => {
                            let cur_rv = object_rv(&cur).unwrap_or(0);
                            match pre {
                                Some(given) if given != cur_rv => Err(StoreError::Conflict {
                                    kind: kind.name(),
                                    name,
                                    current: cur_rv,
                                    given,
                                }),
                                _ => {
                                    rv += 1;
                                    let mut last = (*cur).clone();
                                    last["metadata"]["resourceVersion"] =
                                        Value::String(rv.to_string());
                                    Ok((kind, ns, name, EventType::Deleted, Arc::new(last)))
                                }
                            }
                        }
                    },
                };
                match res {
                    Ok((kind, ns, name, type_, obj)) => {
                        let stored = if type_ == EventType::Deleted {
                            None
                        } else {
                            Some(obj.clone())
                        };
                        overlay.insert((kind, ns.clone(), name.clone()), stored);
                        let size = approx_size(&obj);
                        accepted.push(Pending {
                            size,
                            event: WatchEvent {
                                type_,
                                kind,
                                rv,
                                object: obj,
                            },
                            key: (ns, name),
                            reply,
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        if let Err(e) = self.persist(&accepted, rv) {
            tracing::error!(error = %e, "store commit failed");
            for p in accepted {
                let _ = p.reply.send(Err(StoreError::Backend(e.to_string())));
            }
            return;
        }
        let mut st = self.state.write().unwrap();
        st.rv = rv;
        for p in &accepted {
            let m = st.objects.entry(p.event.kind).or_default();
            if p.event.type_ == EventType::Deleted {
                m.remove(&p.key);
            } else {
                m.insert(p.key.clone(), p.event.object.clone());
            }
            st.history.push(p.event.clone(), p.size);
            let _ = self.events.sender(p.event.kind).send(p.event.clone());
        }
        drop(st);
        for p in accepted {
            let _ = p.reply.send(Ok(p.event.object));
        }
    }

    fn persist(&self, accepted: &[Pending], rv: u64) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(backend)?;
        {
            let mut t = w.open_table(OBJECTS).map_err(backend)?;
            for p in accepted {
                let key = db_key(p.event.kind, &p.key.0, &p.key.1);
                if p.event.type_ == EventType::Deleted {
                    t.remove(key.as_str()).map_err(backend)?;
                } else {
                    let bytes = serde_json::to_vec(&*p.event.object).map_err(backend)?;
                    t.insert(key.as_str(), bytes.as_slice()).map_err(backend)?;
                }
            }
            let mut m = w.open_table(META).map_err(backend)?;
            m.insert("revision", rv).map_err(backend)?;
        }
        w.commit().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": {}})
    }

    #[tokio::test]
    async fn create_update_conflict_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let a = s.create(Kind::Pod, pod("a")).await.unwrap();
        assert!(matches!(
            s.create(Kind::Pod, pod("a")).await,
            Err(StoreError::AlreadyExists { .. })
        ));
        let rv1 = object_rv(&a).unwrap();
        let mut b = a.clone();
        b["spec"]["x"] = json!(1);
        let b = s.update(Kind::Pod, b).await.unwrap();
        assert!(object_rv(&b).unwrap() > rv1);
        // A write based on the old version is stale.
        let mut stale = a.clone();
        stale["spec"]["x"] = json!(2);
        assert!(matches!(
            s.update(Kind::Pod, stale).await,
            Err(StoreError::Conflict { .. })
        ));
        s.create(Kind::Pod, pod("c")).await.unwrap();
        s.delete(Kind::Pod, "default", "c", None).await.unwrap();
        drop(s);
        // Give the writer thread a moment to drop the database handle.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let s = loop {
            match RedbStore::open(dir.path()) {
                Ok(s) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        };
        let (items, rv) = s.list(Kind::Pod, Some("default")).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["spec"]["x"], json!(1));
        assert_eq!(rv, 4);
    }

    #[tokio::test]
    async fn watch_sees_committed_writes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        s.create(Kind::Pod, pod("before")).await.unwrap();
        let mut w = s.watch(Kind::Pod, None, WatchFrom::Current).unwrap();
        assert_eq!(w.initial.len(), 1);
        let futs: Vec<_> = (0..100)
            .map(|i| s.create(Kind::Pod, pod(&format!("p{i}"))))
            .collect();
        for r in futures::future::join_all(futs).await {
            r.unwrap();
        }
        let mut last = 0;
        let mut n = 0;
        while n < 100 {
            let ev = w.live.recv().await.unwrap();
            if !w.wants(&ev) {
                continue;
            }
            assert!(ev.rv > last);
            last = ev.rv;
            n += 1;
        }
        let from = s.watch(Kind::Pod, None, WatchFrom::Revision(50)).unwrap();
        assert_eq!(from.initial.len(), 51);
    }

    /// Pods churn through far more than their kind's history; a Deployment watch from before
    /// the churn still resumes (per-kind history), a pod watch from then is told to re-list.
    #[tokio::test]
    async fn a_quiet_kind_resumes_from_a_revision_after_another_kind_churned() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let d = s.create(Kind::Deployment, pod("web")).await.unwrap();
        let r = object_rv(&d).unwrap();
        let mut pod_watch = s.watch(Kind::Pod, None, WatchFrom::Current).unwrap();
        let mut deploy_watch = s.watch(Kind::Deployment, None, WatchFrom::Current).unwrap();
        // 100,000 pod writes after R: 50,000 creates and 50,000 deletes.
        for chunk in 0..25 {
            let names: Vec<String> = (0..2000).map(|i| format!("p{chunk}-{i}")).collect();
            let creates: Vec<_> = names.iter().map(|n| s.create(Kind::Pod, pod(n))).collect();
            for r in futures::future::join_all(creates).await {
                r.unwrap();
            }
            let deletes: Vec<_> = names
                .iter()
                .map(|n| s.delete(Kind::Pod, "default", n, None))
                .collect();
            for r in futures::future::join_all(deletes).await {
                r.unwrap();
            }
        }
        assert!(s.revision() >= r + 100_000);
        let mut d2 = d.clone();
        d2["spec"]["replicas"] = json!(3);
        s.update(Kind::Deployment, d2).await.unwrap();

        let w = s
            .watch(Kind::Deployment, None, WatchFrom::Revision(r))
            .unwrap();
        assert_eq!(w.initial.len(), 1);
        assert_eq!(w.initial[0].type_, EventType::Modified);
        assert_eq!(w.initial[0].object["spec"]["replicas"], json!(3));
        assert!(matches!(
            s.watch(Kind::Pod, None, WatchFrom::Revision(r)),
            Err(StoreError::Gone(_))
        ));
        // A pod watch from a recent revision still resumes.
        let recent = s.revision() - 100;
        let pw = s
            .watch(Kind::Pod, None, WatchFrom::Revision(recent))
            .unwrap();
        assert_eq!(pw.initial.len(), 99);
        // The live Deployment stream never lagged behind the pods: it holds exactly one event.
        let ev = deploy_watch.live.try_recv().unwrap();
        assert!(deploy_watch.wants(&ev) && ev.kind == Kind::Deployment);
        assert!(deploy_watch.live.try_recv().is_err());
        // The pod stream, never drained, did.
        assert!(matches!(
            pod_watch.live.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }

    /// Large objects created and deleted over and over: history stays within its byte budget,
    /// and a watch from a revision whose events were dropped for space gets `Gone`.
    #[tokio::test]
    async fn history_is_bounded_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let big = "x".repeat(1 << 20);
        let start = s.revision();
        for i in 0..100 {
            let mut p = pod("big");
            p["metadata"]["annotations"] = json!({ "blob": big });
            p["metadata"]["labels"] = json!({ "round": i.to_string() });
            s.create(Kind::Pod, p).await.unwrap();
            s.delete(Kind::Pod, "default", "big", None).await.unwrap();
            assert!(
                s.history_bytes() <= HISTORY_BYTES_TOTAL,
                "history holds {} bytes",
                s.history_bytes()
            );
        }
        // 200 MiB went through; at most 32 MiB of pods is kept.
        assert!(s.history_bytes() <= HISTORY_BYTES_PER_KIND + (1 << 16));
        assert!(matches!(
            s.watch(Kind::Pod, None, WatchFrom::Revision(start)),
            Err(StoreError::Gone(_))
        ));
        let w = s
            .watch(Kind::Pod, None, WatchFrom::Revision(s.revision() - 2))
            .unwrap();
        assert_eq!(w.initial.len(), 2);
        assert_eq!(w.initial[1].type_, EventType::Deleted);
        // Other kinds keep their history.
        let n = s.create(Kind::Node, pod("n1")).await.unwrap();
        let nrv = object_rv(&n).unwrap();
        for _ in 0..40 {
            let mut p = pod("big");
            p["metadata"]["annotations"] = json!({ "blob": big });
            s.create(Kind::Pod, p).await.unwrap();
            s.delete(Kind::Pod, "default", "big", None).await.unwrap();
        }
        let w = s
            .watch(Kind::Node, None, WatchFrom::Revision(nrv - 1))
            .unwrap();
        assert_eq!(w.initial.len(), 1);
    }

    #[test]
    fn history_gives_up_the_largest_kind_first() {
        let mut h = History::new(0);
        let ev = |kind, rv| WatchEvent {
            type_: EventType::Added,
            kind,
            rv,
            object: Arc::new(pod("x")),
        };
        h.push(ev(Kind::Node, 1), 1000);
        let mut rv = 1;
        for _ in 0..200 {
            rv += 1;
            h.push(ev(Kind::Pod, rv), 1 << 20);
            rv += 1;
            h.push(ev(Kind::Event, rv), 1 << 19);
        }
        assert!(h.bytes <= HISTORY_BYTES_TOTAL);
        assert_eq!(h.since(Kind::Node, None, 0, rv).unwrap().len(), 1);
        assert!(h.since(Kind::Pod, None, 1, rv).is_err());
        assert!(h.rings[&Kind::Event].bytes > 0);
    }
}
