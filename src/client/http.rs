//! The HTTP backend of the client seam: what `kapsel agent` uses to reach a control plane on
//! another machine. Objects travel as the API's JSON; a watch is a list (with its
//! `resourceVersion`) followed by the API's streamed watch from that revision, so nothing falls
//! between them. When the stream ends or breaks, the watch yields [`WatchItem::Resync`] and
//! ends: the caller lists again, as client-go's reflector does. Over `https://` (a cluster
//! listener) it trusts only the cluster CA and presents the node's client certificate; plain
//! `http://` with an optional bearer token stays for the loopback API.
//!
//! At most [`MAX_IN_FLIGHT`] requests (watch streams and Lease renewals aside) are in flight
//! at once: a node starting a hundred pods then reuses a few kept-alive connections instead of
//! opening (and TLS-handshaking) one per pod worker, and a hundred nodes stay far below the
//! server's connection cap.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{Client, ClientError, ClientWatch, ModuleBody, Selector, WatchItem};
use crate::model::Kind;
use crate::modules::Digest;
use crate::store::{EventType, WatchEvent};

/// Requests (other than watch streams) one client has in flight at once; the connection
/// pool keeps at least this many idle connections.
pub const MAX_IN_FLIGHT: usize = 16;

/// A [`Client`] talking to a Kapsel API server.
pub struct HttpClient {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
    slots: tokio::sync::Semaphore,
}

impl HttpClient {
    /// `base`: `http(s)://HOST:PORT` of the API server; `token`: sent as a bearer token.
    pub fn shared(base: &str, token: Option<String>) -> Result<Arc<dyn Client>, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(32)
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Unavailable(format!("http client: {e}")))?;
        Ok(Arc::new(HttpClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            token,
            slots: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        }))
    }

    /// `base`: `https://HOST:PORT` of a cluster listener; the node's certificate and the
    /// cluster CA from its join ([`crate::pki::join`]).
    pub fn shared_tls(
        base: &str,
        creds: &crate::pki::join::NodeCredentials,
    ) -> Result<Arc<dyn Client>, ClientError> {
        let http = creds
            .http_client()
            .map_err(|e| ClientError::Unavailable(format!("TLS client: {e}")))?;
        Ok(Arc::new(HttpClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            token: None,
            slots: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        }))
    }

    fn collection(kind: Kind, ns: Option<&str>) -> String {
        let group = match kind.api_version() {
            "v1" => "/api/v1".to_string(),
            gv => format!("/apis/{gv}"),
        };
        match (kind.namespaced(), ns) {
            (true, Some(ns)) => format!("{group}/namespaces/{ns}/{}", kind.resource()),
            _ => format!("{group}/{}", kind.resource()),
        }
    }

    fn object(kind: Kind, ns: &str, name: &str) -> String {
        let ns = if ns.is_empty() { "default" } else { ns };
        format!("{}/{name}", Self::collection(kind, Some(ns)))
    }

    fn key(obj: &Value) -> (String, String) {
        let m = &obj["metadata"];
        (
            m["namespace"].as_str().unwrap_or_default().to_string(),
            m["name"].as_str().unwrap_or_default().to_string(),
        )
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send()
            .await
            .map_err(|e| ClientError::Unavailable(format!("{}: {e}", self.base)))
    }

    /// Send a request and read its answer, holding one of the [`MAX_IN_FLIGHT`] slots.
    async fn call(
        &self,
        kind: Kind,
        name: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        // The heartbeat never waits behind pod traffic. (The semaphore is never closed.)
        let _slot = if kind == Kind::Lease {
            None
        } else {
            self.slots.acquire().await.ok()
        };
        let resp = self.send(method, path, body).await?;
        Self::answer(kind, name, resp).await
    }

    /// The body of a 2xx answer, or the error its `Status` names.
    async fn answer(kind: Kind, name: &str, resp: reqwest::Response) -> Result<Value, ClientError> {
        let code = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if code.is_success() {
            return Ok(body);
        }
        let message = body["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {code}"));
        Err(match code {
            StatusCode::NOT_FOUND => ClientError::NotFound {
                kind: kind.name(),
                name: name.to_string(),
            },
            StatusCode::CONFLICT if body["reason"] == "AlreadyExists" => {
                ClientError::AlreadyExists {
                    kind: kind.name(),
                    name: name.to_string(),
                }
            }
            StatusCode::CONFLICT => ClientError::Conflict(message),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ClientError::Forbidden(message),
            c if c.is_client_error() => ClientError::Invalid(message),
            _ => ClientError::Unavailable(message),
        })
    }
}

#[async_trait]
impl Client for HttpClient {
    async fn get(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Result<Option<Arc<Value>>, ClientError> {
        match self
            .call(kind, name, Method::GET, &Self::object(kind, ns, name), None)
            .await
        {
            Ok(v) => Ok(Some(Arc::new(v))),
            Err(ClientError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, kind: Kind, obj: Value) -> Result<Value, ClientError> {
        let (ns, name) = Self::key(&obj);
        let ns = (!ns.is_empty()).then_some(ns.as_str()).or(Some("default"));
        self.call(
            kind,
            &name,
            Method::POST,
            &Self::collection(kind, ns),
            Some(&obj),
        )
        .await
    }

    async fn replace(&self, kind: Kind, obj: Value) -> Result<Value, ClientError> {
        let (ns, name) = Self::key(&obj);
        self.call(
            kind,
            &name,
            Method::PUT,
            &Self::object(kind, &ns, &name),
            Some(&obj),
        )
        .await
    }

    async fn replace_status(&self, kind: Kind, obj: Value) -> Result<Value, ClientError> {
        if kind != Kind::Pod {
            // Only pods have a `/status` subresource here; a Node is replaced whole.
            return self.replace(kind, obj).await;
        }
        let (ns, name) = Self::key(&obj);
        let path = format!("{}/status", Self::object(kind, &ns, &name));
        self.call(kind, &name, Method::PUT, &path, Some(&obj)).await
    }

    async fn delete(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        rv: Option<u64>,
    ) -> Result<(), ClientError> {
        let mut opts = json!({"gracePeriodSeconds": 0});
        if let Some(rv) = rv {
            opts["preconditions"] = json!({"resourceVersion": rv.to_string()});
        }
        self.call(
            kind,
            name,
            Method::DELETE,
            &Self::object(kind, ns, name),
            Some(&opts),
        )
        .await
        .map(|_| ())
    }

    async fn watch(
        &self,
        kind: Kind,
        ns: Option<&str>,
        selector: Selector,
    ) -> Result<ClientWatch, ClientError> {
        let mut query = String::new();
        if let Selector::NodeName(n) = &selector {
            query = format!("fieldSelector=spec.nodeName%3D{}", urlencode(n));
        }
        let base = Self::collection(kind, ns);
        let list_path = if query.is_empty() {
            base.clone()
        } else {
            format!("{base}?{query}")
        };
        let list = self.call(kind, "", Method::GET, &list_path, None).await?;
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("0")
            .to_string();
        let initial: Vec<WatchEvent> = list["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|o| selector.matches(o))
                    .map(|o| WatchEvent {
                        type_: EventType::Added,
                        kind,
                        rv: crate::store::object_rv(o).unwrap_or(0),
                        object: Arc::new(o.clone()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let sep = if query.is_empty() { "" } else { "&" };
        let watch_path = format!("{base}?{query}{sep}watch=true&resourceVersion={rv}");
        let resp = self.send(Method::GET, &watch_path, None).await?;
        if !resp.status().is_success() {
            // 410 Gone and friends: the caller lists again.
            let live = futures::stream::iter([WatchItem::Resync]).boxed();
            return Ok(ClientWatch { initial, live });
        }
        let lines = resp.bytes_stream();
        let live = futures::stream::unfold(
            (lines, Vec::<u8>::new(), false),
            move |(mut lines, mut buf, done)| async move {
                if done {
                    return None;
                }
                loop {
                    if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        match parse_event(kind, &line) {
                            Some(ev) => return Some((WatchItem::Event(ev), (lines, buf, false))),
                            None => continue,
                        }
                    }
                    match lines.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        // The stream broke or the server ended it (a slow watcher is cut
                        // off): list again.
                        _ => return Some((WatchItem::Resync, (lines, buf, true))),
                    }
                }
            },
        )
        .boxed();
        Ok(ClientWatch { initial, live })
    }

    async fn get_module(&self, digest: &Digest) -> Result<ModuleBody, ClientError> {
        let path = format!("{}/{digest}", crate::api::modules::MODULES_PATH);
        let resp = self.send(Method::GET, &path, None).await?;
        let code = resp.status();
        if code == StatusCode::NOT_FOUND {
            return Err(ClientError::NotFound {
                kind: "module",
                name: digest.to_string(),
            });
        }
        if !code.is_success() {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            let message = body["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {code}"));
            return Err(match code {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ClientError::Forbidden(message),
                c if c.is_client_error() => ClientError::Invalid(message),
                _ => ClientError::Unavailable(message),
            });
        }
        Ok(ModuleBody {
            size: resp.content_length(),
            stream: resp
                .bytes_stream()
                .map(|r| r.map_err(std::io::Error::other))
                .boxed(),
        })
    }
}

/// One line of the API's watch stream: `{"type": "ADDED", "object": {...}}`.
fn parse_event(kind: Kind, line: &[u8]) -> Option<WatchEvent> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let type_ = match v["type"].as_str()? {
        "ADDED" => EventType::Added,
        "MODIFIED" => EventType::Modified,
        "DELETED" => EventType::Deleted,
        _ => return None,
    };
    let object = v.get("object")?.clone();
    Some(WatchEvent {
        type_,
        kind,
        rv: crate::store::object_rv(&object).unwrap_or(0),
        object: Arc::new(object),
    })
}

/// Percent-encode a field-selector value (node names are DNS labels, but be safe).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_api() {
        assert_eq!(
            HttpClient::object(Kind::Pod, "ns1", "p"),
            "/api/v1/namespaces/ns1/pods/p"
        );
        assert_eq!(HttpClient::object(Kind::Node, "", "n"), "/api/v1/nodes/n");
        assert_eq!(
            HttpClient::collection(Kind::ReplicaSet, Some("x")),
            "/apis/apps/v1/namespaces/x/replicasets"
        );
        assert_eq!(HttpClient::collection(Kind::Pod, None), "/api/v1/pods");
    }

    #[test]
    fn watch_lines_parse() {
        let ev = parse_event(
            Kind::Pod,
            br#"{"type":"MODIFIED","object":{"metadata":{"name":"a","resourceVersion":"7"}}}"#,
        )
        .unwrap();
        assert_eq!(ev.type_, EventType::Modified);
        assert_eq!(ev.rv, 7);
        assert!(parse_event(Kind::Pod, b"{\"type\":\"BOOKMARK\"}").is_none());
    }
}
