//! Pod watches of nodes, routed by node: every agent watches the pods bound to it
//! (`fieldSelector=spec.nodeName=<node>`), and with a hundred agents a pod's change would wake a
//! hundred watch streams to be filtered away by ninety-nine of them. [`PodsByNode`] holds one
//! subscription to the store's pod events and hands each event only to the watches of the node
//! named in the pod's `spec.nodeName` (a kubelet's `spec.nodeName` index in the API server's
//! watch cache plays the same part).
//!
//! Consistency is that of a plain watch: a watch registers here *before* it takes the store's
//! snapshot (or history), then skips routed events at or below the snapshot's revision. Events
//! committed before the registration are in the snapshot; events after it are routed to it, in
//! revision order. A watch whose buffer fills up (a client not reading) is ended, as a lagging
//! plain watch is; the client lists and watches again. If the router itself falls behind the
//! store's live channel, every routed watch is ended and the router subscribes afresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::model::Kind;
use crate::store::{Store, WatchEvent, WatchFrom};

/// Events buffered per routed watch before it is ended as too slow.
const BUFFER: usize = 8192;

type Senders = HashMap<u64, mpsc::Sender<WatchEvent>>;

/// The router (see the module docs). Started on first use.
pub struct PodsByNode {
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: bool,
    next_id: u64,
    by_node: HashMap<String, Senders>,
}

impl PodsByNode {
    pub fn new(store: Arc<dyn Store>, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(PodsByNode {
            store,
            shutdown,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The node a field selector asks for, when it asks for exactly one node's pods
    /// (`spec.nodeName=N` or `spec.nodeName==N`, nothing else).
    pub fn selected_node(field_selector: Option<&str>) -> Option<&str> {
        let sel = field_selector?.trim();
        if sel.contains(',') {
            return None;
        }
        let (k, v) = sel.split_once("==").or_else(|| sel.split_once('='))?;
        if k.trim() != "spec.nodeName" {
            return None;
        }
        let v = v.trim();
        (!v.is_empty()).then_some(v)
    }

    /// Route `node`'s pod events to a new receiver, from now on.
    pub fn register(self: &Arc<Self>, node: &str) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(BUFFER);
        let start = {
            let mut inner = self.inner.lock().unwrap();
            inner.next_id += 1;
            let id = inner.next_id;
            inner
                .by_node
                .entry(node.to_string())
                .or_default()
                .insert(id, tx);
            !std::mem::replace(&mut inner.running, true)
        };
        if start {
            // Subscribed before this returns: the registration above sees every event
            // committed from here on.
            match self.store.watch(Kind::Pod, None, WatchFrom::Current) {
                Ok(w) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.route(w.live).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch router could not subscribe");
                    let mut inner = self.inner.lock().unwrap();
                    inner.running = false;
                    inner.by_node.clear();
                }
            }
        }
        rx
    }

    async fn route(self: Arc<Self>, mut live: tokio::sync::broadcast::Receiver<WatchEvent>) {
        loop {
            let ev = tokio::select! {
                ev = live.recv() => ev,
                _ = self.shutdown.cancelled() => Err(RecvError::Closed),
            };
            match ev {
                Ok(ev) => {
                    if ev.kind != Kind::Pod {
                        continue;
                    }
                    let Some(node) = ev.object["spec"]["nodeName"].as_str() else {
                        continue;
                    };
                    let mut inner = self.inner.lock().unwrap();
                    let Some(watches) = inner.by_node.get_mut(node) else {
                        continue;
                    };
                    // A closed or full watch is dropped (a full one ends: its client re-lists).
                    watches.retain(|_, tx| tx.try_send(ev.clone()).is_ok());
                    if watches.is_empty() {
                        inner.by_node.remove(node);
                    }
                }
                Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {
                    // Every routed watch ends (their clients list and watch again); the next
                    // registration subscribes afresh.
                    let mut inner = self.inner.lock().unwrap();
                    inner.by_node.clear();
                    inner.running = false;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_node_selector_is_routed() {
        let f = PodsByNode::selected_node;
        assert_eq!(f(Some("spec.nodeName=a")), Some("a"));
        assert_eq!(f(Some("spec.nodeName==a")), Some("a"));
        assert_eq!(f(Some(" spec.nodeName = a ")), Some("a"));
        assert_eq!(f(Some("spec.nodeName!=a")), None);
        assert_eq!(f(Some("spec.nodeName=")), None);
        assert_eq!(f(Some("spec.nodeName=a,metadata.name=p")), None);
        assert_eq!(f(Some("metadata.name=p")), None);
        assert_eq!(f(None), None);
    }
}
