//! The embedded, crash-safe default store: redb (a pure-Rust, copy-on-write B-tree with
//! fsync'd commits) under `--data-dir`, an in-memory cache that serves every read, and a single
//! writer thread doing *group commit*: all writes that arrive while a commit is in flight are
//! validated and committed together in the next transaction, so 1,000 concurrent writers cost a
//! handful of fsyncs, and no write is acknowledged before it is durable. Watches are fed after
//! the commit, from the same thread, so a watcher never sees a write that could be lost.

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
/// How many recent events are kept to serve `watch` from a revision.
const HISTORY: usize = 50_000;
/// Most writes folded into one transaction.
const MAX_BATCH: usize = 4096;

type Objects = HashMap<Kind, BTreeMap<(String, String), Arc<Value>>>;

struct State {
    objects: Objects,
    rv: u64,
    history: VecDeque<WatchEvent>,
}

enum Op {
    Create(Kind, Value),
    Update(Kind, Value),
    Delete(Kind, String, String, Option<u64>),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Value, StoreError>>,
}

/// redb-backed [`Store`]. Cheap to share behind an `Arc`.
pub struct RedbStore {
    state: Arc<RwLock<State>>,
    tx: mpsc::UnboundedSender<Request>,
    events: broadcast::Sender<WatchEvent>,
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
        let db = Database::create(dir.join("kapsel.redb")).map_err(backend)?;
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
            history: VecDeque::new(),
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1 << 16);
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
        rx.await.map_err(|_| StoreError::Closed)?
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
        let live = self.events.subscribe();
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
            WatchFrom::Revision(since) => {
                let oldest = st.history.front().map(|e| e.rv).unwrap_or(st.rv + 1);
                if since < st.rv && since + 1 < oldest {
                    return Err(StoreError::Gone(since));
                }
                st.history
                    .iter()
                    .filter(|e| {
                        e.rv > since
                            && e.kind == kind
                            && ns.map(|n| e.namespace() == n).unwrap_or(true)
                    })
                    .cloned()
                    .collect()
            }
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
    events: broadcast::Sender<WatchEvent>,
}

/// A write accepted into the current batch.
struct Pending {
    event: WatchEvent,
    key: (String, String),
    reply: oneshot::Sender<Result<Value, StoreError>>,
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
                        accepted.push(Pending {
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
            st.history.push_back(p.event.clone());
            if st.history.len() > HISTORY {
                st.history.pop_front();
            }
            let _ = self.events.send(p.event.clone());
        }
        drop(st);
        for p in accepted {
            let _ = p.reply.send(Ok((*p.event.object).clone()));
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
}
