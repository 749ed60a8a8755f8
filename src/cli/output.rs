//! How objects are shown to people: `get` tables (kubectl's columns), `describe`, ages.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::model::deployment::{revision_of, Deployment, ReplicaSet};
use crate::model::{Event, Node, Pod};

/// `5s`, `3m`, `2h`, `4d`, as kubectl prints ages.
pub fn age(ts: Option<DateTime<Utc>>) -> String {
    let Some(ts) = ts else {
        return "<unknown>".into();
    };
    let s = (Utc::now() - ts).num_seconds().max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// The STATUS column: a waiting/terminated reason when there is one, else the phase.
pub fn pod_status(p: &Pod) -> String {
    if p.metadata.deletion_timestamp.is_some() {
        return "Terminating".into();
    }
    let Some(st) = &p.status else {
        return "Pending".into();
    };
    for (i, c) in st.init_container_statuses.iter().enumerate() {
        if let Some(t) = &c.state.terminated {
            if t.exit_code != 0 {
                return format!("Init:{}", t.reason.clone().unwrap_or("Error".into()));
            }
        }
        if let Some(w) = &c.state.waiting {
            if let Some(r) = &w.reason {
                if r != "PodInitializing" && r != "ContainerCreating" {
                    return format!("Init:{r}");
                }
            }
            return format!("Init:{}/{}", i, st.init_container_statuses.len());
        }
    }
    let mut reason = None;
    for c in &st.container_statuses {
        if let Some(w) = &c.state.waiting {
            if let Some(r) = &w.reason {
                reason = Some(r.clone());
            }
        } else if let Some(t) = &c.state.terminated {
            if reason.is_none() || t.exit_code != 0 {
                reason = Some(
                    t.reason
                        .clone()
                        .unwrap_or_else(|| format!("ExitCode:{}", t.exit_code)),
                );
            }
        }
    }
    let any_running = st
        .container_statuses
        .iter()
        .any(|c| c.state.running.is_some());
    match reason {
        Some(r) if !any_running || r == "CrashLoopBackOff" || st.phase.is_terminal() => r,
        _ => format!("{:?}", st.phase),
    }
}

fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut w = vec![0; cols];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == cols {
                    c.clone()
                } else {
                    format!("{c:<width$}", width = w[i])
                }
            })
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

pub fn pods_table(pods: &[Pod], wide: bool, all_ns: bool) -> String {
    let mut head = vec![];
    if all_ns {
        head.push("NAMESPACE");
    }
    head.extend(["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    if wide {
        head.extend(["IP", "NODE"]);
    }
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for p in pods {
        let st = p.status.clone().unwrap_or_default();
        let ready = st.container_statuses.iter().filter(|c| c.ready).count();
        let restarts: i64 = st.container_statuses.iter().map(|c| c.restart_count).sum();
        let mut r = vec![];
        if all_ns {
            r.push(p.ns().to_string());
        }
        r.extend([
            p.name().to_string(),
            format!("{ready}/{}", p.spec.containers.len()),
            pod_status(p),
            restarts.to_string(),
            age(p.metadata.creation_timestamp),
        ]);
        if wide {
            r.push(st.pod_ip.clone().unwrap_or("<none>".into()));
            r.push(p.spec.node_name.clone().unwrap_or("<none>".into()));
        }
        rows.push(r);
    }
    table(rows)
}

pub fn nodes_table(nodes: &[Node], wide: bool) -> String {
    let mut head = vec![
        "NAME", "STATUS", "RUNTIMES", "CPU", "MEMORY", "PODS", "AGE", "VERSION",
    ];
    if wide {
        head.extend(["INTERNAL-IP", "OS-ARCH"]);
    }
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for n in nodes {
        let st = n.status.clone().unwrap_or_default();
        let info = st.node_info.clone().unwrap_or_default();
        let status = n.status_text();
        let mut r = vec![
            n.metadata.name.clone(),
            status,
            info.runtimes.join(","),
            st.allocatable.get("cpu").cloned().unwrap_or_default(),
            st.allocatable.get("memory").cloned().unwrap_or_default(),
            st.allocatable.get("pods").cloned().unwrap_or_default(),
            age(n.metadata.creation_timestamp),
            info.kubelet_version.clone(),
        ];
        if wide {
            r.push(
                st.addresses
                    .iter()
                    .find(|a| a.type_ == "InternalIP")
                    .map(|a| a.address.clone())
                    .unwrap_or_default(),
            );
            r.push(format!("{}/{}", info.operating_system, info.architecture));
        }
        rows.push(r);
    }
    table(rows)
}

pub fn events_table(events: &[Event]) -> String {
    let mut rows = vec![vec![
        "LAST SEEN".to_string(),
        "TYPE".into(),
        "REASON".into(),
        "OBJECT".into(),
        "MESSAGE".into(),
    ]];
    for e in events {
        rows.push(vec![
            age(e.last_timestamp),
            e.type_.clone(),
            e.reason.clone(),
            format!(
                "{}/{}",
                e.involved_object.kind.to_lowercase(),
                e.involved_object.name
            ),
            e.message.clone(),
        ]);
    }
    table(rows)
}

fn state_lines(out: &mut String, label: &str, s: &crate::model::ContainerState) {
    if let Some(r) = &s.running {
        out.push_str(&format!(
            "    {label}:\tRunning\n      Started:\t{}\n",
            fmt_ts(r.started_at)
        ));
    } else if let Some(t) = &s.terminated {
        out.push_str(&format!(
            "    {label}:\tTerminated\n      Reason:\t{}\n      Exit Code:\t{}\n",
            t.reason.clone().unwrap_or_default(),
            t.exit_code
        ));
        if let Some(m) = &t.message {
            out.push_str(&format!("      Message:\t{}\n", m.replace('\n', "\n\t\t")));
        }
        out.push_str(&format!(
            "      Started:\t{}\n      Finished:\t{}\n",
            fmt_ts(t.started_at),
            fmt_ts(t.finished_at)
        ));
    } else if let Some(w) = &s.waiting {
        out.push_str(&format!(
            "    {label}:\tWaiting\n      Reason:\t{}\n",
            w.reason.clone().unwrap_or_default()
        ));
        if let Some(m) = &w.message {
            out.push_str(&format!("      Message:\t{m}\n"));
        }
    }
}

fn fmt_ts(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc2822())
        .unwrap_or_else(|| "<unknown>".into())
}

/// `builtins`: the pod's `/builtins` (the status of its built-in pattern containers).
pub fn describe_pod(p: &Pod, events: &[Event], builtins: &serde_json::Value) -> String {
    let mut o = String::new();
    let st = p.status.clone().unwrap_or_default();
    o.push_str(&format!("Name:\t{}\nNamespace:\t{}\n", p.name(), p.ns()));
    o.push_str(&format!(
        "Node:\t{}\n",
        p.spec.node_name.clone().unwrap_or("<none>".into())
    ));
    o.push_str(&format!("Start Time:\t{}\n", fmt_ts(st.start_time)));
    let labels: Vec<String> = p
        .metadata
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    o.push_str(&format!(
        "Labels:\t{}\n",
        if labels.is_empty() {
            "<none>".into()
        } else {
            labels.join(",")
        }
    ));
    o.push_str(&format!("Status:\t{}\n", pod_status(p)));
    o.push_str(&format!(
        "IP:\t{}\n",
        st.pod_ip.clone().unwrap_or("<none>".into())
    ));
    o.push_str(&format!("Restart Policy:\t{:?}\n", p.restart_policy()));
    for (title, specs, statuses) in [
        (
            "Init Containers",
            &p.spec.init_containers,
            &st.init_container_statuses,
        ),
        ("Containers", &p.spec.containers, &st.container_statuses),
    ] {
        if specs.is_empty() {
            continue;
        }
        o.push_str(&format!("{title}:\n"));
        for c in specs.iter() {
            o.push_str(&format!("  {}:\n    Image:\t{}\n", c.name, c.image));
            if let Some(kind) = c.image.strip_prefix("builtin/") {
                o.push_str(&format!("    Built-in:\t{kind}\n"));
            }
            if let Some(s) = statuses.iter().find(|s| s.name == c.name) {
                if let Some(id) = &s.container_id {
                    o.push_str(&format!("    Container ID:\t{id}\n"));
                }
                state_lines(&mut o, "State", &s.state);
                if !s.last_state.is_empty() {
                    state_lines(&mut o, "Last State", &s.last_state);
                }
                o.push_str(&format!(
                    "    Ready:\t{}\n    Restart Count:\t{}\n",
                    s.ready, s.restart_count
                ));
            }
            if !c.command.is_empty() {
                o.push_str(&format!("    Command:\t{}\n", c.command.join(" ")));
            }
            if !c.args.is_empty() {
                o.push_str(&format!("    Args:\t{}\n", c.args.join(" ")));
            }
            if let Some(r) = &c.resources {
                for (k, m) in [("Limits", &r.limits), ("Requests", &r.requests)] {
                    if !m.is_empty() {
                        o.push_str(&format!("    {k}:\n"));
                        for (n, q) in m {
                            o.push_str(&format!("      {n}:\t{}\n", q.as_string()));
                        }
                    }
                }
            }
            if !c.ports.is_empty() {
                let ports: Vec<String> = c
                    .ports
                    .iter()
                    .map(|p| format!("{}/TCP", p.container_port))
                    .collect();
                o.push_str(&format!("    Ports:\t{}\n", ports.join(", ")));
            }
            if !c.env.is_empty() {
                o.push_str("    Environment:\n");
                for e in &c.env {
                    o.push_str(&format!(
                        "      {}:\t{}\n",
                        e.name,
                        e.value.clone().unwrap_or_else(|| "<from field>".into())
                    ));
                }
            }
            if !c.volume_mounts.is_empty() {
                o.push_str("    Mounts:\n");
                for m in &c.volume_mounts {
                    o.push_str(&format!(
                        "      {} from {} ({})\n",
                        m.mount_path,
                        m.name,
                        if m.read_only.unwrap_or(false) {
                            "ro"
                        } else {
                            "rw"
                        }
                    ));
                }
            }
        }
    }
    pattern_components(&mut o, p, builtins);
    if !st.conditions.is_empty() {
        o.push_str("Conditions:\n  Type\tStatus\n");
        for c in &st.conditions {
            o.push_str(&format!("  {}\t{}\n", c.type_, c.status));
        }
    }
    if !p.spec.volumes.is_empty() {
        o.push_str("Volumes:\n");
        for v in &p.spec.volumes {
            let kind = if v.empty_dir.is_some() {
                "EmptyDir (a temporary directory that shares a pod's lifetime)".to_string()
            } else if let Some(h) = &v.host_path {
                format!("HostPath ({})", h.path)
            } else {
                String::new()
            };
            o.push_str(&format!("  {}:\n    Type:\t{kind}\n", v.name));
        }
    }
    events_section(&mut o, events);
    tabs_to_columns(&o)
}

/// `Pattern components:`: each built-in container's own status (git-sync's last synced commit,
/// the ambassador's master, the adapter's series), or why there is none.
fn pattern_components(o: &mut String, p: &Pod, builtins: &serde_json::Value) {
    let names: Vec<&str> = p
        .spec
        .init_containers
        .iter()
        .chain(p.spec.containers.iter())
        .filter(|c| c.image.starts_with("builtin/"))
        .map(|c| c.name.as_str())
        .collect();
    if names.is_empty() {
        return;
    }
    o.push_str("Pattern components:\n");
    for name in names {
        let b = &builtins[name];
        let Some(fields) = b["fields"].as_array() else {
            o.push_str(&format!("  {name}:\t<not running on this node>\n"));
            continue;
        };
        o.push_str(&format!(
            "  {name}:\n    Built-in:\t{}\n",
            b["kind"].as_str().unwrap_or_default()
        ));
        for f in fields {
            o.push_str(&format!(
                "    {}:\t{}\n",
                f["name"].as_str().unwrap_or_default(),
                f["value"].as_str().unwrap_or_default().replace('\n', " ")
            ));
        }
    }
}

/// The `Events:` part of `describe`.
fn events_section(o: &mut String, events: &[Event]) {
    o.push_str("Events:");
    if events.is_empty() {
        o.push_str("\t<none>\n");
    } else {
        o.push('\n');
        let mut rows = vec![vec![
            "  Type".to_string(),
            "Reason".into(),
            "Age".into(),
            "From".into(),
            "Message".into(),
        ]];
        for e in events {
            let count = if e.count > 1 {
                format!(" (x{})", e.count)
            } else {
                String::new()
            };
            rows.push(vec![
                format!("  {}", e.type_),
                e.reason.clone(),
                format!("{}{count}", age(e.last_timestamp)),
                e.source
                    .as_ref()
                    .map(|s| s.component.clone())
                    .unwrap_or_default(),
                e.message.clone(),
            ]);
        }
        o.push_str(&table(rows));
    }
}

pub fn describe_node(n: &Node, pods: &[Pod]) -> String {
    let mut o = String::new();
    let st = n.status.clone().unwrap_or_default();
    o.push_str(&format!("Name:\t{}\n", n.metadata.name));
    o.push_str(&format!("Ready:\t{}\n", n.is_ready()));
    o.push_str(&format!("Status:\t{}\n", n.status_text()));
    if let Some(c) = n.ready_condition() {
        if let Some(r) = &c.reason {
            o.push_str(&format!("Ready Reason:\t{r}\n"));
        }
    }
    if n.spec.taints.is_empty() {
        o.push_str("Taints:\t<none>\n");
    }
    for (i, t) in n.spec.taints.iter().enumerate() {
        let label = if i == 0 { "Taints:" } else { "" };
        let v = t
            .value
            .as_deref()
            .map(|v| format!("={v}"))
            .unwrap_or_default();
        o.push_str(&format!("{label}\t{}{v}:{:?}\n", t.key, t.effect));
    }
    o.push_str("Capacity:\n");
    for (k, v) in &st.capacity {
        o.push_str(&format!("  {k}:\t{v}\n"));
    }
    o.push_str("Allocatable:\n");
    for (k, v) in &st.allocatable {
        o.push_str(&format!("  {k}:\t{v}\n"));
    }
    if let Some(i) = &st.node_info {
        o.push_str(&format!(
            "System Info:\n  Runtimes:\t{}\n  Container Runtime:\t{}\n  Agent:\t{}\n  OS/Arch:\t{}/{}\n",
            i.runtimes.join(", "),
            i.container_runtime_version,
            i.kubelet_version,
            i.operating_system,
            i.architecture
        ));
    }
    o.push_str(&format!("Pods:\t{}\n", pods.len()));
    for p in pods {
        o.push_str(&format!("  {}/{}\t{}\n", p.ns(), p.name(), pod_status(p)));
    }
    tabs_to_columns(&o)
}

/// Align `key:\tvalue` lines into columns.
fn tabs_to_columns(s: &str) -> String {
    let w = s
        .lines()
        .filter_map(|l| l.split_once('\t').map(|(k, _)| k.chars().count()))
        .max()
        .unwrap_or(0);
    s.lines()
        .map(|l| match l.split_once('\t') {
            Some((k, v)) => format!("{k:<w$}  {}", v.replace('\t', " "), w = w),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `-o json|yaml` of one object or a `List`.
pub fn render(v: &Value, format: &str) -> String {
    match format {
        "yaml" => serde_norway::to_string(v).unwrap_or_default(),
        _ => serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
    }
}

/// kubectl's `get deployments` columns (wide adds containers, images, selector).
pub fn deployments_table(ds: &[Deployment], wide: bool) -> String {
    let mut head = vec!["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"];
    if wide {
        head.extend(["CONTAINERS", "IMAGES", "SELECTOR"]);
    }
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for d in ds {
        let st = d.status.clone().unwrap_or_default();
        let mut r = vec![
            d.metadata.name.clone(),
            format!("{}/{}", st.ready_replicas, d.spec.replicas()),
            st.updated_replicas.to_string(),
            st.available_replicas.to_string(),
            age(d.metadata.creation_timestamp),
        ];
        if wide {
            let cs = &d.spec.template.spec.containers;
            r.push(
                cs.iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            r.push(
                cs.iter()
                    .map(|c| c.image.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            r.push(selector_string(&d.spec.selector));
        }
        rows.push(r);
    }
    table(rows)
}

pub fn replicasets_table(rss: &[ReplicaSet], wide: bool) -> String {
    let mut head = vec!["NAME", "DESIRED", "CURRENT", "READY", "AGE"];
    if wide {
        head.extend(["REVISION", "IMAGES"]);
    }
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for rs in rss {
        let st = rs.status.clone().unwrap_or_default();
        let mut r = vec![
            rs.metadata.name.clone(),
            rs.replicas().to_string(),
            st.replicas.to_string(),
            st.ready_replicas.to_string(),
            age(rs.metadata.creation_timestamp),
        ];
        if wide {
            r.push(rs.revision().to_string());
            r.push(
                rs.spec
                    .template
                    .spec
                    .containers
                    .iter()
                    .map(|c| c.image.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        rows.push(r);
    }
    table(rows)
}

fn selector_string(s: &crate::model::deployment::LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in &s.match_expressions {
        parts.push(format!("{} {} ({})", e.key, e.operator, e.values.join(",")));
    }
    parts.join(",")
}

/// `rollout history`: one row per revision, oldest first.
pub fn history_table(rss: &[ReplicaSet]) -> String {
    let mut rows = vec![vec![
        "REVISION".to_string(),
        "REPLICASET".into(),
        "IMAGES".into(),
        "CHANGES".into(),
        "CHANGE-CAUSE".into(),
    ]];
    let mut rss: Vec<&ReplicaSet> = rss.iter().collect();
    rss.sort_by_key(|r| r.revision());
    let mut prev: Option<&ReplicaSet> = None;
    for rs in rss {
        let changes = match prev {
            None => "-".to_string(),
            Some(p) => template_changes(&p.spec.template, &rs.spec.template),
        };
        prev = Some(rs);
        rows.push(vec![
            rs.revision().to_string(),
            rs.metadata.name.clone(),
            rs.spec
                .template
                .spec
                .containers
                .iter()
                .map(|c| c.image.as_str())
                .collect::<Vec<_>>()
                .join(","),
            changes,
            rs.metadata
                .annotations
                .get(crate::model::deployment::CHANGE_CAUSE_ANNOTATION)
                .cloned()
                .unwrap_or_else(|| "<none>".into()),
        ]);
    }
    table(rows)
}

/// What differs from one revision's pod template to the next, shortly: `image worker=b.wasm`,
/// `env VERSION=v2`, `env -CRASH`, `args of worker`, `restarted`, `volumes`.
pub fn template_changes(
    prev: &crate::model::deployment::PodTemplateSpec,
    cur: &crate::model::deployment::PodTemplateSpec,
) -> String {
    use serde_json::Value;
    let mut out: Vec<String> = Vec::new();
    let by_name = |t: &crate::model::deployment::PodTemplateSpec| -> Vec<(String, Value)> {
        t.spec
            .init_containers
            .iter()
            .chain(t.spec.containers.iter())
            .map(|c| (c.name.clone(), serde_json::to_value(c).unwrap_or_default()))
            .collect()
    };
    let (old, new) = (by_name(prev), by_name(cur));
    let find =
        |v: &[(String, Value)], n: &str| v.iter().find(|(k, _)| k == n).map(|(_, c)| c.clone());
    for (name, c) in &new {
        let Some(o) = find(&old, name) else {
            out.push(format!("+container {name}"));
            continue;
        };
        if o["image"] != c["image"] {
            out.push(format!(
                "image {name}={}",
                c["image"].as_str().unwrap_or_default()
            ));
        }
        let env = |v: &Value| -> Vec<(String, String)> {
            v["env"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            let val = match &e["value"] {
                                Value::String(s) => s.clone(),
                                Value::Null => e["valueFrom"].to_string(),
                                other => other.to_string(),
                            };
                            (e["name"].as_str().unwrap_or_default().to_string(), val)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let (eo, en) = (env(&o), env(c));
        for (k, v) in &en {
            if eo.iter().find(|(ok, _)| ok == k).map(|(_, ov)| ov) != Some(v) {
                let v = if v.chars().count() > 24 {
                    format!("{}…", v.chars().take(24).collect::<String>())
                } else {
                    v.clone()
                };
                out.push(format!("env {k}={v}"));
            }
        }
        for (k, _) in &eo {
            if !en.iter().any(|(nk, _)| nk == k) {
                out.push(format!("env -{k}"));
            }
        }
        let (Value::Object(om), Value::Object(nm)) = (&o, c) else {
            continue;
        };
        let mut fields: Vec<&String> = om.keys().chain(nm.keys()).collect();
        fields.sort();
        fields.dedup();
        for f in fields {
            if matches!(f.as_str(), "image" | "env" | "name") {
                continue;
            }
            if om.get(f) != nm.get(f) {
                out.push(format!("{f} of {name}"));
            }
        }
    }
    for (name, _) in &old {
        if find(&new, name).is_none() {
            out.push(format!("-container {name}"));
        }
    }
    let restarted = "kubectl.kubernetes.io/restartedAt";
    if prev.metadata.annotations.get(restarted) != cur.metadata.annotations.get(restarted) {
        out.push("restarted".into());
    }
    let (mut ps, mut cs) = (
        serde_json::to_value(&prev.spec).unwrap_or_default(),
        serde_json::to_value(&cur.spec).unwrap_or_default(),
    );
    for v in [&mut ps, &mut cs] {
        if let Value::Object(m) = v {
            m.remove("containers");
            m.remove("initContainers");
        }
    }
    if let (Value::Object(pm), Value::Object(cm)) = (&ps, &cs) {
        let mut fields: Vec<&String> = pm.keys().chain(cm.keys()).collect();
        fields.sort();
        fields.dedup();
        for f in fields {
            if pm.get(f) != cm.get(f) {
                out.push(f.clone());
            }
        }
    }
    let labels = |t: &crate::model::deployment::PodTemplateSpec| {
        let mut l = t.metadata.labels.clone();
        l.remove(crate::model::deployment::TEMPLATE_HASH_LABEL);
        l
    };
    if labels(prev) != labels(cur) {
        out.push("labels".into());
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(", ")
    }
}

pub fn describe_deployment(d: &Deployment, rss: &[ReplicaSet], events: &[Event]) -> String {
    let mut o = String::new();
    let st = d.status.clone().unwrap_or_default();
    o.push_str(&format!(
        "Name:\t{}\nNamespace:\t{}\nCreationTimestamp:\t{}\n",
        d.metadata.name,
        d.metadata.ns(),
        fmt_ts(d.metadata.creation_timestamp)
    ));
    o.push_str(&format!(
        "Selector:\t{}\n",
        selector_string(&d.spec.selector)
    ));
    o.push_str(&format!(
        "Replicas:\t{} desired | {} updated | {} total | {} available | {} unavailable\n",
        d.spec.replicas(),
        st.updated_replicas,
        st.replicas,
        st.available_replicas,
        st.unavailable_replicas
    ));
    o.push_str(&format!("Revision:\t{}\n", revision_of(&d.metadata)));
    let strat = d.spec.strategy.clone().unwrap_or_default();
    o.push_str(&format!("StrategyType:\t{:?}\n", d.spec.strategy_type()));
    let iop = |v: &Option<crate::model::deployment::IntOrPercent>| match v {
        Some(crate::model::deployment::IntOrPercent::Int(n)) => n.to_string(),
        Some(crate::model::deployment::IntOrPercent::Str(s)) => s.clone(),
        None => "-".into(),
    };
    if let Some(ru) = &strat.rolling_update {
        o.push_str(&format!(
            "RollingUpdateStrategy:\t{} max unavailable, {} max surge\n",
            iop(&ru.max_unavailable),
            iop(&ru.max_surge)
        ));
    }
    if let Some(c) = &strat.canary {
        o.push_str(&format!(
            "CanaryStrategy:\t{} canaries, auto-promote {}, {} max unavailable, {} max surge\n",
            iop(&c.replicas),
            c.auto_promote.unwrap_or(false),
            iop(&c.max_unavailable),
            iop(&c.max_surge)
        ));
    }
    if let Some(c) = &st.canary {
        o.push_str(&format!(
            "Canary:\trevision {}: {}/{} ready, {}\n",
            c.revision,
            c.ready,
            c.desired,
            if c.promoted {
                "promoted"
            } else {
                "waiting for promotion"
            }
        ));
    }
    o.push_str(&format!(
        "MinReadySeconds:\t{}\nProgressDeadlineSeconds:\t{}\nAutoRollback:\t{}\nPaused:\t{}\n",
        d.spec.min_ready(),
        d.spec.progress_deadline(),
        d.spec.auto_rollback.unwrap_or(false),
        d.spec.paused.unwrap_or(false)
    ));
    o.push_str("Pod Template:\n");
    o.push_str(&format!(
        "  Labels:\t{}\n",
        d.spec
            .template
            .metadata
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    ));
    for c in &d.spec.template.spec.containers {
        o.push_str(&format!("  {}:\n    Image:\t{}\n", c.name, c.image));
    }
    if !st.conditions.is_empty() {
        o.push_str("Conditions:\n  Type\tStatus\tReason\n");
        for c in &st.conditions {
            o.push_str(&format!(
                "  {}\t{}\t{}\n",
                c.type_,
                c.status,
                c.reason.clone().unwrap_or_default()
            ));
        }
    }
    let mut rss: Vec<&ReplicaSet> = rss.iter().collect();
    rss.sort_by_key(|r| std::cmp::Reverse(r.revision()));
    let cur = revision_of(&d.metadata);
    let fmt = |r: &ReplicaSet| {
        format!(
            "{} ({}/{} replicas created, revision {})",
            r.metadata.name,
            r.status.as_ref().map(|s| s.replicas).unwrap_or(0),
            r.replicas(),
            r.revision()
        )
    };
    let olds: Vec<String> = rss
        .iter()
        .filter(|r| r.revision() != cur && r.replicas() > 0)
        .map(|r| fmt(r))
        .collect();
    o.push_str(&format!(
        "OldReplicaSets:\t{}\n",
        if olds.is_empty() {
            "<none>".into()
        } else {
            olds.join(", ")
        }
    ));
    o.push_str(&format!(
        "NewReplicaSet:\t{}\n",
        rss.iter()
            .find(|r| r.revision() == cur)
            .map(|r| fmt(r))
            .unwrap_or_else(|| "<none>".into())
    ));
    events_section(&mut o, events);
    tabs_to_columns(&o)
}
