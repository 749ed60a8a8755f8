//! Authentication and node authorization on the cluster listener (Kubernetes' Node authorizer
//! and NodeRestriction, in one place). The listener puts the connection's [`Peer`] on every
//! request: a verified client certificate `system:node:<name>` makes a node; anything else is
//! anonymous. Anonymous requests reach only `/cacerts`, the join endpoint (which checks its
//! token itself) and the health checks; otherwise 401. A node may:
//!
//! - list and watch pods only with `fieldSelector=spec.nodeName=<self>`, get and delete
//!   (finalize) the pods bound to it, and write their `status`;
//! - get, create and update (PUT) its own Node (and its `status`), nothing of other nodes'; as
//!   Kubernetes' NodeRestriction, it may not change its own `spec.taints` or
//!   `spec.unschedulable` after creation, nor set labels under `node-restriction.kubernetes.io/`
//!   or under `kubernetes.io/` and `k8s.io/` other than the well-known ones
//!   ([`crate::model::node::node_may_set_label`]);
//! - get, create, update and delete its own Lease,
//!   `/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/<self>`;
//! - create, get and update events;
//! - read (`GET` / `HEAD`) a module by digest, `/v1-kapsel/modules/sha256:<hex>`;
//! - open its own node tunnel (`/v1-kapsel/connect`, registered under its certificate's name);
//!
//! and nothing else: 403 with a `Status` naming the identity and the reason. The loopback
//! listener does not go through here: it serves the local user, unauthenticated, as before.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::model::Kind;
use crate::pki::ClusterMetrics;

/// Who is on the other end of a cluster-listener connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Node(String),
    Anonymous,
}

/// Largest body the authorizer reads to check an object's name (Node and Lease creation).
const MAX_CHECKED_BODY: usize = 1 << 20;

/// Paths open to anyone on the cluster listener.
fn public(method: &Method, path: &str) -> bool {
    match path {
        "/cacerts" | "/healthz" | "/readyz" => method == Method::GET,
        crate::pki::join::JOIN_PATH => method == Method::POST,
        _ => false,
    }
}

/// What a node's request needs to be allowed.
#[derive(Debug, PartialEq, Eq)]
pub enum Rule {
    Allow,
    Deny(String),
    /// Allowed if the pod is bound to the node (or does not exist: the handler says 404).
    PodBoundToSelf {
        ns: String,
        name: String,
    },
    /// Allowed if the body's `metadata.name` is the node's name.
    BodyNameIsSelf,
    /// Its own Node, created (`create`) or replaced: NodeRestriction checks the body against
    /// the stored Node.
    OwnNode {
        create: bool,
    },
}

/// Does the field selector restrict to `spec.nodeName=<node>`?
fn selects_node(field_selector: Option<&str>, node: &str) -> bool {
    field_selector
        .unwrap_or("")
        .split(',')
        .any(|term| match term.split_once("!=") {
            Some(_) => false,
            None => term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .map(|(k, v)| k.trim() == "spec.nodeName" && v.trim() == node)
                .unwrap_or(false),
        })
}

/// The node authorizer's decision for `method path?query` by node `node`.
pub fn rule(node: &str, method: &Method, path: &str, query: &HashMap<String, String>) -> Rule {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get = method == Method::GET;
    let update = method == Method::PUT || method == Method::PATCH;
    let own = |name: &str, what: &str| {
        if name == node {
            Rule::Allow
        } else {
            Rule::Deny(format!(
                "a node may access only its own {what}, not {what} {name:?}"
            ))
        }
    };
    match segs.as_slice() {
        ["healthz"] | ["readyz"] | ["version"] if get => Rule::Allow,
        // Its tunnel: registered under the certificate's name, so only its own.
        ["v1-kapsel", "connect"] if get => Rule::Allow,
        // Pods: list/watch of its own, by field selector.
        ["api", "v1", "pods"] | ["api", "v1", "namespaces", _, "pods"] if get => {
            if selects_node(query.get("fieldSelector").map(String::as_str), node) {
                Rule::Allow
            } else {
                Rule::Deny(format!(
                    "a node may list and watch only the pods bound to it: fieldSelector=spec.nodeName={node} is required"
                ))
            }
        }
        ["api", "v1", "namespaces", ns, "pods", name] if get || method == Method::DELETE => {
            Rule::PodBoundToSelf {
                ns: ns.to_string(),
                name: name.to_string(),
            }
        }
        ["api", "v1", "namespaces", ns, "pods", name, "status"] if update => {
            Rule::PodBoundToSelf {
                ns: ns.to_string(),
                name: name.to_string(),
            }
        }
        ["api", "v1", "namespaces", _, "pods", ..] => Rule::Deny(
            "a node may read, delete and write the status of the pods bound to it, nothing else of pods".into(),
        ),
        // Its own Node.
        ["api", "v1", "nodes"] if method == Method::POST => Rule::OwnNode { create: true },
        ["api", "v1", "nodes", name] | ["api", "v1", "nodes", name, "status"] if get => {
            own(name, "Node")
        }
        ["api", "v1", "nodes", name] | ["api", "v1", "nodes", name, "status"]
            if method == Method::PUT =>
        {
            match own(name, "Node") {
                Rule::Allow => Rule::OwnNode { create: false },
                deny => deny,
            }
        }
        ["api", "v1", "nodes", ..] if method == Method::PATCH => Rule::Deny(
            "a node replaces (PUT) its own Node; it may not patch Nodes".into(),
        ),
        // Its own Lease.
        ["apis", "coordination.k8s.io", "v1", "namespaces", "kube-node-lease", "leases"]
            if method == Method::POST =>
        {
            Rule::BodyNameIsSelf
        }
        ["apis", "coordination.k8s.io", "v1", "namespaces", "kube-node-lease", "leases", name]
            if get || update || method == Method::DELETE =>
        {
            own(name, "Lease")
        }
        // Modules, read by digest (content-addressed: nothing to hide between nodes).
        ["v1-kapsel", "modules", _] if get || method == Method::HEAD => Rule::Allow,
        ["v1-kapsel", "modules", ..] => {
            Rule::Deny("a node may only read modules by digest, not upload or list them".into())
        }
        // Events.
        ["api", "v1", "namespaces", _, "events"] if method == Method::POST => Rule::Allow,
        ["api", "v1", "namespaces", _, "events", _] if get || update => Rule::Allow,
        _ => Rule::Deny(
            "a node may reach only its pods, its Node, its Lease and events".into(),
        ),
    }
}

fn forbidden(
    metrics: Option<&ClusterMetrics>,
    node: &str,
    method: &Method,
    path: &str,
    why: &str,
) -> Response {
    if let Some(m) = metrics {
        ClusterMetrics::inc(&m.forbidden);
    }
    tracing::warn!(node, %method, path, reason = why, "node request forbidden");
    ApiError::Forbidden(format!(
        "User \"system:node:{node}\" cannot {} {path}: {why}",
        method.as_str().to_lowercase()
    ))
    .into_response()
}

/// The axum middleware of the cluster listener's router.
pub async fn middleware(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let metrics = state.cluster.as_deref().map(|c| &c.metrics);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if public(&method, &path) {
        return next.run(req).await;
    }
    let node = match req.extensions().get::<Peer>() {
        Some(Peer::Node(n)) => n.clone(),
        _ => {
            if let Some(m) = metrics {
                ClusterMetrics::inc(&m.unauthenticated);
            }
            return ApiError::Unauthorized(
                "this listener serves nodes: present the node's client certificate (join with `kapsel agent --token`)"
                    .into(),
            )
            .into_response();
        }
    };
    let query: HashMap<String, String> =
        axum::extract::Query::<HashMap<String, String>>::try_from_uri(req.uri())
            .map(|q| q.0)
            .unwrap_or_default();
    match rule(&node, &method, &path, &query) {
        Rule::Allow => next.run(req).await,
        Rule::Deny(why) => forbidden(metrics, &node, &method, &path, &why),
        Rule::PodBoundToSelf { ns, name } => match state.store.get(Kind::Pod, &ns, &name) {
            Ok(Some(p)) if p["spec"]["nodeName"].as_str() != Some(node.as_str()) => forbidden(
                metrics,
                &node,
                &method,
                &path,
                "the pod is not bound to this node",
            ),
            _ => next.run(req).await,
        },
        rule @ (Rule::BodyNameIsSelf | Rule::OwnNode { .. }) => {
            let (parts, body) = req.into_parts();
            let bytes: Bytes = match axum::body::to_bytes(body, MAX_CHECKED_BODY).await {
                Ok(b) => b,
                Err(_) => {
                    return ApiError::BadRequest("request body too large or unreadable".into())
                        .into_response()
                }
            };
            let name = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["metadata"]["name"].as_str().map(str::to_string));
            if name.as_deref() != Some(node.as_str()) {
                return forbidden(
                    metrics,
                    &node,
                    &method,
                    &path,
                    &format!(
                        "a node may create only its own object (metadata.name {node:?}), not {:?}",
                        name.unwrap_or_default()
                    ),
                );
            }
            if let Rule::OwnNode { create } = rule {
                // Undecodable: the handler names the decoding error.
                let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let cur = if create {
                    None
                } else {
                    match state.store.get(Kind::Node, "", &node) {
                        Ok(cur) => cur,
                        Err(e) => return ApiError::from(e).into_response(),
                    }
                };
                if !body.is_null() {
                    if let Err(why) = node_restriction(&body, cur.as_deref()) {
                        return forbidden(metrics, &node, &method, &path, &why);
                    }
                }
            }
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}

/// Kubernetes' NodeRestriction for a node writing its own Node: `cur` is the stored Node
/// (`None`: creation). At creation any taints are fine (`--node-taint`); afterwards the node
/// may not change its taints or `unschedulable`. Labels it adds, changes or removes must be
/// ones a node may set.
pub fn node_restriction(
    body: &serde_json::Value,
    cur: Option<&serde_json::Value>,
) -> Result<(), String> {
    use crate::model::node::node_may_set_label;
    use crate::model::taint::Taint;
    let labels = |v: &serde_json::Value| -> std::collections::BTreeMap<String, String> {
        serde_json::from_value(v["metadata"]["labels"].clone()).unwrap_or_default()
    };
    let new_labels = labels(body);
    let Some(cur) = cur else {
        for k in new_labels.keys() {
            node_may_set_label(k)?;
        }
        return Ok(());
    };
    // A stale write is the handler's to refuse (409), whatever it changes.
    let rv = |v: &serde_json::Value| {
        v["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string)
    };
    if rv(body).is_some() && rv(body) != rv(cur) {
        return Ok(());
    }
    let taints = |v: &serde_json::Value| -> Vec<Taint> {
        serde_json::from_value(v["spec"]["taints"].clone()).unwrap_or_default()
    };
    if taints(body) != taints(cur) {
        return Err("a node may not change its own spec.taints (NodeRestriction)".into());
    }
    let unschedulable =
        |v: &serde_json::Value| v["spec"]["unschedulable"].as_bool().unwrap_or(false);
    if unschedulable(body) != unschedulable(cur) {
        return Err("a node may not change its own spec.unschedulable (NodeRestriction)".into());
    }
    let old_labels = labels(cur);
    for k in new_labels.keys().chain(old_labels.keys()) {
        if new_labels.get(k) != old_labels.get(k) {
            node_may_set_label(k)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_restriction_rules() {
        use serde_json::json;
        let cur = json!({"metadata": {"name": "a", "resourceVersion": "5",
            "labels": {"kubernetes.io/hostname": "a", "node-restriction.kubernetes.io/pool": "x"}},
            "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}});
        // Status and own labels: fine.
        let mut ok = cur.clone();
        ok["metadata"]["labels"]["zone"] = json!("z1");
        ok["status"] = json!({"conditions": []});
        assert_eq!(node_restriction(&ok, Some(&cur)), Ok(()));
        // Taints, cordon and restricted labels: refused.
        let mut t = cur.clone();
        t["spec"]["taints"] = json!([]);
        assert!(node_restriction(&t, Some(&cur))
            .unwrap_err()
            .contains("spec.taints"));
        let mut u = cur.clone();
        u["spec"]["unschedulable"] = json!(true);
        assert!(node_restriction(&u, Some(&cur))
            .unwrap_err()
            .contains("unschedulable"));
        let mut l = cur.clone();
        l["metadata"]["labels"]["node-restriction.kubernetes.io/pool"] = json!("y");
        assert!(node_restriction(&l, Some(&cur)).is_err());
        let mut r = cur.clone();
        r["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("node-restriction.kubernetes.io/pool");
        assert!(node_restriction(&r, Some(&cur)).is_err());
        let mut role = cur.clone();
        role["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = json!("");
        assert!(node_restriction(&role, Some(&cur)).is_err());
        // A stale write goes on to its 409.
        let mut stale = t.clone();
        stale["metadata"]["resourceVersion"] = json!("4");
        assert_eq!(node_restriction(&stale, Some(&cur)), Ok(()));
        // Creation: taints are fine, restricted labels are not.
        assert_eq!(node_restriction(&cur, None).map_err(|_| ()), Err(()));
        let mut create = cur.clone();
        create["metadata"]["labels"] = json!({"kubernetes.io/os": "linux"});
        assert_eq!(node_restriction(&create, None), Ok(()));
    }

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn node_rules() {
        let none = q(&[]);
        let r = |m: Method, p: &str, query: &HashMap<String, String>| rule("a", &m, p, query);
        assert_eq!(
            r(
                Method::GET,
                "/api/v1/pods",
                &q(&[("fieldSelector", "spec.nodeName=a")])
            ),
            Rule::Allow
        );
        assert_eq!(
            r(
                Method::GET,
                "/api/v1/namespaces/x/pods",
                &q(&[
                    ("fieldSelector", "metadata.name=p,spec.nodeName==a"),
                    ("watch", "true")
                ])
            ),
            Rule::Allow
        );
        for sel in [
            "",
            "spec.nodeName=b",
            "spec.nodeName!=a",
            "spec.nodeName=ab",
        ] {
            assert!(
                matches!(
                    r(Method::GET, "/api/v1/pods", &q(&[("fieldSelector", sel)])),
                    Rule::Deny(_)
                ),
                "{sel}"
            );
        }
        assert!(matches!(
            r(Method::GET, "/api/v1/pods", &none),
            Rule::Deny(_)
        ));
        assert_eq!(
            r(Method::PUT, "/api/v1/namespaces/x/pods/p/status", &none),
            Rule::PodBoundToSelf {
                ns: "x".into(),
                name: "p".into()
            }
        );
        assert!(matches!(
            r(Method::PUT, "/api/v1/namespaces/x/pods/p", &none),
            Rule::Deny(_)
        ));
        // The node API's proxies are the users', never a node's; its tunnel is its own.
        for sub in ["log", "metrics", "builtins", "exec"] {
            for m in [Method::GET, Method::POST] {
                assert!(
                    matches!(
                        r(m, &format!("/api/v1/namespaces/x/pods/p/{sub}"), &none),
                        Rule::Deny(_)
                    ),
                    "{sub}"
                );
            }
        }
        assert_eq!(r(Method::GET, "/v1-kapsel/connect", &none), Rule::Allow);
        assert!(matches!(
            r(Method::POST, "/v1-kapsel/connect", &none),
            Rule::Deny(_)
        ));
        assert!(matches!(
            r(Method::POST, "/api/v1/namespaces/x/pods", &none),
            Rule::Deny(_)
        ));
        assert!(matches!(
            r(Method::GET, "/api/v1/namespaces/x/pods/p/log", &none),
            Rule::Deny(_)
        ));
        assert_eq!(r(Method::GET, "/api/v1/nodes/a", &none), Rule::Allow);
        assert_eq!(
            r(Method::PUT, "/api/v1/nodes/a/status", &none),
            Rule::OwnNode { create: false }
        );
        assert!(matches!(
            r(Method::PATCH, "/api/v1/nodes/a", &none),
            Rule::Deny(_)
        ));
        assert!(matches!(
            r(Method::PUT, "/api/v1/nodes/b", &none),
            Rule::Deny(_)
        ));
        assert!(matches!(
            r(Method::GET, "/api/v1/nodes", &none),
            Rule::Deny(_)
        ));
        assert!(matches!(
            r(Method::DELETE, "/api/v1/nodes/a", &none),
            Rule::Deny(_)
        ));
        assert_eq!(
            r(Method::POST, "/api/v1/nodes", &none),
            Rule::OwnNode { create: true }
        );
        let lease = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";
        assert_eq!(r(Method::PUT, &format!("{lease}/a"), &none), Rule::Allow);
        assert!(matches!(
            r(Method::PUT, &format!("{lease}/b"), &none),
            Rule::Deny(_)
        ));
        assert_eq!(r(Method::POST, lease, &none), Rule::BodyNameIsSelf);
        assert_eq!(
            r(Method::POST, "/api/v1/namespaces/x/events", &none),
            Rule::Allow
        );
        assert_eq!(
            r(Method::PUT, "/api/v1/namespaces/x/events/e", &none),
            Rule::Allow
        );
        for (m, p) in [
            (Method::GET, "/api/v1/events"),
            (Method::GET, "/apis/apps/v1/deployments"),
            (Method::POST, "/apis/apps/v1/namespaces/x/deployments"),
            (Method::GET, "/v1-kapsel/tokens"),
            (Method::GET, "/metrics"),
            (Method::PUT, "/v1-kapsel/modules/sha256:ab"),
            (Method::GET, "/v1-kapsel/modules"),
        ] {
            assert!(matches!(r(m, p, &none), Rule::Deny(_)), "{p}");
        }
        assert_eq!(
            r(Method::GET, "/v1-kapsel/modules/sha256:ab", &none),
            Rule::Allow
        );
        assert_eq!(
            r(Method::HEAD, "/v1-kapsel/modules/sha256:ab", &none),
            Rule::Allow
        );
        assert!(public(&Method::GET, "/cacerts"));
        assert!(public(&Method::POST, "/v1-kapsel/join"));
        assert!(!public(&Method::GET, "/api/v1/pods"));
    }
}
