//! The in-process backend of the client seam: the server's own store, without HTTP or JSON
//! encoding on the way, so the embedded node of `kapsel serve` / `kapsel up` runs as fast as
//! when it held the store itself. A watch filters the store's per-kind fan-out by namespace and
//! selector as it streams. Modules are read from the server's module store.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::Value;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use super::{Client, ClientError, ClientWatch, ModuleBody, Selector, WatchItem};
use crate::model::Kind;
use crate::modules::{Digest, ModuleError, ModuleStore};
use crate::store::{Store, WatchFrom};

/// A [`Client`] over the server's store.
#[derive(Clone)]
pub struct LocalClient {
    store: Arc<dyn Store>,
    modules: Option<Arc<ModuleStore>>,
}

impl LocalClient {
    pub fn shared(store: Arc<dyn Store>) -> Arc<dyn Client> {
        Arc::new(LocalClient {
            store,
            modules: None,
        })
    }

    /// Over the server's store and its module store.
    pub fn with_modules(store: Arc<dyn Store>, modules: Arc<ModuleStore>) -> Arc<dyn Client> {
        Arc::new(LocalClient {
            store,
            modules: Some(modules),
        })
    }
}

#[async_trait]
impl Client for LocalClient {
    async fn get(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Result<Option<Arc<Value>>, ClientError> {
        Ok(self.store.get(kind, ns, name)?)
    }

    async fn create(&self, kind: Kind, obj: Value) -> Result<Value, ClientError> {
        Ok(self.store.create(kind, obj).await?)
    }

    async fn replace(&self, kind: Kind, obj: Value) -> Result<Value, ClientError> {
        Ok(self.store.update(kind, obj).await?)
    }

    async fn replace_status(&self, kind: Kind, obj: Value) -> Result<Value, ClientError> {
        // The node sends the object it read with its new status: in-process, that is a
        // compare-and-swap replace of the whole object.
        Ok(self.store.update(kind, obj).await?)
    }

    async fn delete(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        rv: Option<u64>,
    ) -> Result<(), ClientError> {
        self.store.delete(kind, ns, name, rv).await?;
        Ok(())
    }

    async fn watch(
        &self,
        kind: Kind,
        ns: Option<&str>,
        selector: Selector,
    ) -> Result<ClientWatch, ClientError> {
        let mut w = self.store.watch(kind, ns, WatchFrom::Current)?;
        let initial = std::mem::take(&mut w.initial)
            .into_iter()
            .filter(|ev| selector.matches(&ev.object))
            .collect();
        let live = std::mem::replace(&mut w.live, tokio::sync::broadcast::channel(1).1);
        let live = BroadcastStream::new(live)
            .filter_map(move |r| {
                let item = match r {
                    Ok(ev) if w.wants(&ev) && selector.matches(&ev.object) => {
                        Some(WatchItem::Event(ev))
                    }
                    Ok(_) => None,
                    Err(BroadcastStreamRecvError::Lagged(_)) => Some(WatchItem::Resync),
                };
                futures::future::ready(item)
            })
            .boxed();
        Ok(ClientWatch { initial, live })
    }

    async fn get_module(&self, digest: &Digest) -> Result<ModuleBody, ClientError> {
        let not_found = || ClientError::NotFound {
            kind: "module",
            name: digest.to_string(),
        };
        let store = self.modules.as_ref().ok_or_else(not_found)?;
        match store.open_module(digest).await {
            Ok((size, file)) => Ok(ModuleBody {
                size: Some(size),
                stream: tokio_util::io::ReaderStream::with_capacity(file, 256 << 10).boxed(),
            }),
            Err(ModuleError::NotFound(_)) => Err(not_found()),
            Err(e) => Err(ClientError::Unavailable(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::RedbStore;
    use serde_json::json;

    fn pod(name: &str, node: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "default"},
               "spec": {"nodeName": node, "containers": []}})
    }

    #[tokio::test]
    async fn a_node_watch_sees_only_its_pods_and_cas_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = RedbStore::open(dir.path()).unwrap();
        let c = LocalClient::shared(store);
        c.create(Kind::Pod, pod("a", "n1")).await.unwrap();
        c.create(Kind::Pod, pod("b", "n2")).await.unwrap();
        let mut w = c
            .watch(Kind::Pod, None, Selector::NodeName("n1".into()))
            .await
            .unwrap();
        assert_eq!(w.initial.len(), 1);
        assert_eq!(w.initial[0].object["metadata"]["name"], "a");
        c.create(Kind::Pod, pod("c", "n2")).await.unwrap();
        c.create(Kind::Pod, pod("d", "n1")).await.unwrap();
        match w.live.next().await {
            Some(WatchItem::Event(ev)) => assert_eq!(ev.object["metadata"]["name"], "d"),
            other => panic!("expected pod d, got {other:?}"),
        }
        // A write based on an old read is a conflict.
        let cur = c.get(Kind::Pod, "default", "a").await.unwrap().unwrap();
        c.replace(Kind::Pod, (*cur).clone()).await.unwrap();
        let stale = c.replace(Kind::Pod, (*cur).clone()).await;
        assert!(matches!(stale, Err(ClientError::Conflict(_))), "{stale:?}");
    }
}
