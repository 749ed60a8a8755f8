//! Semantic validation of objects beyond their schema: names, references between fields,
//! quantities. Every error names the field path, as Kubernetes' `field.ErrorList` does.

use std::collections::BTreeSet;

use super::pod::{Container, Pod, RestartPolicy};
use super::quantity::{parse_bytes, parse_millicpu};

/// One invalid field: `spec.containers[0].image: Required value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// A DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (labels joined by dots, at most 253 characters).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label name part: at most 63 characters, alphanumerics with `-`, `_`, `.` inside.
fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain (Kubernetes' qualified name).
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if !is_dns_subdomain(p) {
            return Err("the prefix must be a DNS subdomain (e.g. example.com)".into());
        }
    }
    if !is_label_name(name) {
        return Err("a label key's name must be 63 characters or less, alphanumerics with '-', '_' or '.' between (e.g. 'app' or 'example.com/zone')".into());
    }
    Ok(())
}

/// A label value: empty, or a label name part.
pub fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err("a label value must be empty or 63 characters or less, alphanumerics with '-', '_' or '.' between".into())
    }
}

pub fn validate_object_name(name: &str, field: &str, errs: &mut Vec<FieldError>) {
    if name.is_empty() {
        errs.push(err(field, "Required value: name is required"));
    } else if !is_dns_subdomain(name) {
        errs.push(err(
            field,
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        ));
    }
}

/// Validate a pod for creation. Returns every problem found, not just the first.
pub fn validate_pod(pod: &Pod) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if !pod.api_version.is_empty() && pod.api_version != "v1" {
        errs.push(err(
            "apiVersion",
            format!(
                "Unsupported value: {:?}: supported values: \"v1\"",
                pod.api_version
            ),
        ));
    }
    if !pod.kind.is_empty() && pod.kind != "Pod" {
        errs.push(err(
            "kind",
            format!("Unsupported value: {:?}: expected \"Pod\"", pod.kind),
        ));
    }
    validate_object_name(&pod.metadata.name, "metadata.name", &mut errs);
    if let Some(ns) = &pod.metadata.namespace {
        if !is_dns_label(ns) {
            errs.push(err("metadata.namespace", format!("Invalid value: {ns:?}")));
        }
    }
    let spec = &pod.spec;
    if spec.containers.is_empty() {
        errs.push(err(
            "spec.containers",
            "Required value: at least one container",
        ));
    }
    for (i, t) in spec.tolerations.iter().enumerate() {
        for (field, message) in t.validate(&format!("spec.tolerations[{i}]")) {
            errs.push(err(field, format!("Invalid value: {message}")));
        }
    }
    if let Some(a) = &spec.affinity {
        super::affinity::validate_affinity(a, &mut errs);
    }
    super::affinity::validate_spread(&spec.topology_spread_constraints, &mut errs);
    let mut volume_names = BTreeSet::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let f = format!("spec.volumes[{i}]");
        if !is_dns_label(&v.name) {
            errs.push(err(
                format!("{f}.name"),
                format!("Invalid value: {:?}", v.name),
            ));
        }
        if !volume_names.insert(v.name.clone()) {
            errs.push(err(
                format!("{f}.name"),
                format!("Duplicate value: {:?}", v.name),
            ));
        }
        match (&v.empty_dir, &v.host_path) {
            (None, None) => errs.push(err(
                &f,
                "Required value: must specify a volume type (emptyDir or hostPath)",
            )),
            (Some(_), Some(_)) => errs.push(err(
                &f,
                "Forbidden: may not specify more than 1 volume type",
            )),
            (Some(ed), None) => {
                if let Some(q) = &ed.size_limit {
                    if let Err(e) = parse_bytes(&q.as_string()) {
                        errs.push(err(format!("{f}.emptyDir.sizeLimit"), e));
                    }
                }
            }
            (None, Some(hp)) => {
                if !hp.path.starts_with('/') {
                    errs.push(err(
                        format!("{f}.hostPath.path"),
                        format!("Invalid value: {:?}: must be an absolute path", hp.path),
                    ));
                }
                match hp.type_.as_deref() {
                    None | Some("") | Some("Directory") | Some("DirectoryOrCreate") => {}
                    Some(t) => errs.push(err(
                        format!("{f}.hostPath.type"),
                        format!("Unsupported value: {t:?}: supported values: \"\", \"Directory\", \"DirectoryOrCreate\""),
                    )),
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    let groups = [
        ("spec.initContainers", &spec.init_containers, true),
        ("spec.containers", &spec.containers, false),
    ];
    for (group, list, init) in groups {
        for (i, c) in list.iter().enumerate() {
            let f = format!("{group}[{i}]");
            if !names.insert(c.name.clone()) && !c.name.is_empty() {
                errs.push(err(
                    format!("{f}.name"),
                    format!("Duplicate value: {:?}", c.name),
                ));
            }
            validate_container(c, &f, init, &volume_names, &mut errs);
        }
    }
    errs
}

fn validate_container(
    c: &Container,
    f: &str,
    init: bool,
    volumes: &BTreeSet<String>,
    errs: &mut Vec<FieldError>,
) {
    if c.name.is_empty() {
        errs.push(err(format!("{f}.name"), "Required value"));
    } else if !is_dns_label(&c.name) {
        errs.push(err(
            format!("{f}.name"),
            format!(
                "Invalid value: {:?}: must be a DNS-1123 label (lowercase alphanumerics and '-')",
                c.name
            ),
        ));
    }
    if c.image.trim().is_empty() {
        errs.push(err(format!("{f}.image"), "Required value"));
    }
    if c.restart_policy.is_some() && !init {
        errs.push(err(
            format!("{f}.restartPolicy"),
            "Forbidden: may only be set on init containers",
        ));
    }
    if let Some(p) = c.restart_policy {
        if p != RestartPolicy::Always {
            errs.push(err(
                format!("{f}.restartPolicy"),
                "Unsupported value: only \"Always\" (a native sidecar) is supported on init containers",
            ));
        }
    }
    for (j, e) in c.env.iter().enumerate() {
        let ef = format!("{f}.env[{j}]");
        if e.name.is_empty() || e.name.contains('=') {
            errs.push(err(
                format!("{ef}.name"),
                format!("Invalid value: {:?}", e.name),
            ));
        }
        if let Some(vf) = &e.value_from {
            if e.value.is_some() {
                errs.push(err(
                    format!("{ef}.valueFrom"),
                    "Invalid value: may not be specified when `value` is not empty",
                ));
            }
            match &vf.field_ref {
                Some(fr) => {
                    const OK: &[&str] = &[
                        "metadata.name",
                        "metadata.namespace",
                        "metadata.uid",
                        "spec.nodeName",
                        "status.podIP",
                        "status.hostIP",
                    ];
                    if !OK.contains(&fr.field_path.as_str()) {
                        errs.push(err(
                            format!("{ef}.valueFrom.fieldRef.fieldPath"),
                            format!(
                                "Unsupported value: {:?}: supported values: {}",
                                fr.field_path,
                                OK.join(", ")
                            ),
                        ));
                    }
                }
                None => errs.push(err(
                    format!("{ef}.valueFrom"),
                    "Required value: fieldRef (the only supported source)",
                )),
            }
        }
    }
    for (j, p) in c.ports.iter().enumerate() {
        if !(1..=65535).contains(&p.container_port) {
            errs.push(err(
                format!("{f}.ports[{j}].containerPort"),
                format!(
                    "Invalid value: {}: must be between 1 and 65535, inclusive",
                    p.container_port
                ),
            ));
        }
        if let Some(hp) = p.host_port {
            if !(1..=65535).contains(&hp) {
                errs.push(err(
                    format!("{f}.ports[{j}].hostPort"),
                    format!("Invalid value: {hp}: must be between 1 and 65535, inclusive"),
                ));
            }
        }
        if let Some(proto) = &p.protocol {
            if proto != "TCP" && proto != "UDP" {
                errs.push(err(
                    format!("{f}.ports[{j}].protocol"),
                    format!("Unsupported value: {proto:?}: supported values: \"TCP\", \"UDP\""),
                ));
            }
        }
    }
    if let Some(r) = &c.resources {
        for (kind, map) in [("limits", &r.limits), ("requests", &r.requests)] {
            for (k, q) in map {
                let rf = format!("{f}.resources.{kind}.{k}");
                let res = match k.as_str() {
                    "memory" => parse_bytes(&q.as_string()).map(|_| ()),
                    "cpu" => parse_millicpu(&q.as_string()).map(|_| ()),
                    "ephemeral-storage" => parse_bytes(&q.as_string()).map(|_| ()),
                    _ => Err(format!(
                        "Unsupported value: {k:?}: supported resources: \"cpu\", \"memory\", \"ephemeral-storage\""
                    )),
                };
                if let Err(e) = res {
                    errs.push(err(rf, e));
                }
            }
        }
    }
    let mut paths = BTreeSet::new();
    for (j, m) in c.volume_mounts.iter().enumerate() {
        let mf = format!("{f}.volumeMounts[{j}]");
        if !volumes.contains(&m.name) {
            errs.push(err(
                format!("{mf}.name"),
                format!(
                    "Not found: {:?}: no volume of that name in spec.volumes",
                    m.name
                ),
            ));
        }
        if !m.mount_path.starts_with('/') {
            errs.push(err(
                format!("{mf}.mountPath"),
                format!(
                    "Invalid value: {:?}: must be an absolute path",
                    m.mount_path
                ),
            ));
        } else if m.mount_path.split('/').any(|s| s == "..") {
            errs.push(err(
                format!("{mf}.mountPath"),
                format!("Invalid value: {:?}: must not contain '..'", m.mount_path),
            ));
        }
        if !paths.insert(m.mount_path.clone()) {
            errs.push(err(
                format!("{mf}.mountPath"),
                format!("Invalid value: {:?}: must be unique", m.mount_path),
            ));
        }
        if let Some(sp) = &m.sub_path {
            if sp.starts_with('/') || sp.split('/').any(|s| s == "..") {
                errs.push(err(
                    format!("{mf}.subPath"),
                    format!("Invalid value: {sp:?}: must be a relative path without '..'"),
                ));
            }
        }
    }
    if let Some(wd) = &c.working_dir {
        if !wd.starts_with('/') {
            errs.push(err(
                format!("{f}.workingDir"),
                format!("Invalid value: {wd:?}: must be an absolute path"),
            ));
        }
    }
    validate_probes(c, f, init, errs);
}

/// Probes: one handler each, ports that exist, sane timing; none on plain init containers
/// (native sidecars may have them), exec only in OCI containers, HTTP only.
fn validate_probes(c: &Container, f: &str, init: bool, errs: &mut Vec<FieldError>) {
    let sidecar = c.restart_policy == Some(RestartPolicy::Always);
    for (name, p) in [
        ("livenessProbe", &c.liveness_probe),
        ("readinessProbe", &c.readiness_probe),
        ("startupProbe", &c.startup_probe),
    ] {
        let Some(p) = p else { continue };
        let pf = format!("{f}.{name}");
        if init && !sidecar {
            errs.push(err(
                &pf,
                "Forbidden: may not be set for init containers without restartPolicy=Always",
            ));
            continue;
        }
        let n = [
            p.http_get.is_some(),
            p.tcp_socket.is_some(),
            p.exec.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n != 1 {
            errs.push(err(
                &pf,
                "Required value: exactly one of httpGet, tcpSocket, exec",
            ));
        }
        if let Some(e) = &p.exec {
            if c.is_wasm() || c.image.starts_with("builtin/") {
                errs.push(err(
                    format!("{pf}.exec"),
                    "Unsupported: exec probes run only in OCI containers",
                ));
            } else if e.command.is_empty() {
                errs.push(err(format!("{pf}.exec.command"), "Required value"));
            }
        }
        if let Some(h) = &p.http_get {
            validate_probe_port(&h.port, c, &format!("{pf}.httpGet.port"), errs);
            match h.scheme.as_deref() {
                None | Some("HTTP") => {}
                Some("HTTPS") => errs.push(err(
                    format!("{pf}.httpGet.scheme"),
                    "Unsupported value: \"HTTPS\": HTTPS probes are not supported; supported values: \"HTTP\"",
                )),
                Some(s) => errs.push(err(
                    format!("{pf}.httpGet.scheme"),
                    format!("Unsupported value: {s:?}: supported values: \"HTTP\""),
                )),
            }
            if let Some(path) = &h.path {
                if path.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                    errs.push(err(
                        format!("{pf}.httpGet.path"),
                        format!("Invalid value: {path:?}: must not contain whitespace or control characters"),
                    ));
                }
            }
            validate_probe_host(h.host.as_deref(), &format!("{pf}.httpGet.host"), errs);
        }
        if let Some(t) = &p.tcp_socket {
            validate_probe_port(&t.port, c, &format!("{pf}.tcpSocket.port"), errs);
            validate_probe_host(t.host.as_deref(), &format!("{pf}.tcpSocket.host"), errs);
        }
        for (field, v, min) in [
            ("initialDelaySeconds", p.initial_delay_seconds, 0),
            ("periodSeconds", p.period_seconds, 1),
            ("timeoutSeconds", p.timeout_seconds, 1),
            ("successThreshold", p.success_threshold, 1),
            ("failureThreshold", p.failure_threshold, 1),
        ] {
            if let Some(v) = v {
                if v < min {
                    errs.push(err(
                        format!("{pf}.{field}"),
                        format!("Invalid value: {v}: must be greater than or equal to {min}"),
                    ));
                }
            }
        }
        if name != "readinessProbe" {
            if let Some(v) = p.success_threshold {
                if v != 1 {
                    errs.push(err(
                        format!("{pf}.successThreshold"),
                        format!("Invalid value: {v}: must be 1"),
                    ));
                }
            }
        }
    }
}

/// A probe's port: a number in 1..=65535, or the name of one of the container's ports.
fn validate_probe_port(
    port: &serde_json::Value,
    c: &Container,
    field: &str,
    errs: &mut Vec<FieldError>,
) {
    match port {
        serde_json::Value::Number(n) => {
            if !n.as_i64().is_some_and(|p| (1..=65535).contains(&p)) {
                errs.push(err(
                    field,
                    format!("Invalid value: {n}: must be between 1 and 65535, inclusive"),
                ));
            }
        }
        serde_json::Value::String(name) => {
            if !c
                .ports
                .iter()
                .any(|p| p.name.as_deref() == Some(name.as_str()))
            {
                errs.push(err(
                    field,
                    format!("Not found: {name:?}: no port of that name in the container's ports"),
                ));
            }
        }
        other => errs.push(err(
            field,
            format!("Invalid value: {other}: must be a port number or a port name"),
        )),
    }
}

fn validate_probe_host(host: Option<&str>, field: &str, errs: &mut Vec<FieldError>) {
    if let Some(h) = host {
        if h.is_empty() {
            return;
        }
        let ok = h.parse::<std::net::IpAddr>().is_ok()
            || h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            errs.push(err(
                field,
                format!("Invalid value: {h:?}: must be an IP address or a DNS name"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pod::{
        Container, ContainerPort, ExecAction, HttpGetAction, Pod, Probe, TcpSocketAction,
        VolumeMount,
    };

    fn pod() -> Pod {
        let mut p = Pod::default();
        p.metadata.name = "web".into();
        p.spec.containers.push(Container {
            name: "app".into(),
            image: "app.wasm".into(),
            ..Default::default()
        });
        p
    }

    #[test]
    fn good_pod_is_valid() {
        assert!(validate_pod(&pod()).is_empty());
    }

    #[test]
    fn names_the_field() {
        let mut p = pod();
        p.metadata.name = "Web_1".into();
        p.spec.containers[0].image.clear();
        p.spec.containers[0].volume_mounts.push(VolumeMount {
            name: "data".into(),
            mount_path: "data".into(),
            ..Default::default()
        });
        let errs: Vec<String> = validate_pod(&p).iter().map(|e| e.field.clone()).collect();
        assert_eq!(
            errs,
            vec![
                "metadata.name",
                "spec.containers[0].image",
                "spec.containers[0].volumeMounts[0].name",
                "spec.containers[0].volumeMounts[0].mountPath"
            ]
        );
    }

    #[test]
    fn duplicate_container_names() {
        let mut p = pod();
        p.spec.containers.push(p.spec.containers[0].clone());
        let errs = validate_pod(&p);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec.containers[1].name");
    }

    fn tcp_probe(port: serde_json::Value) -> Probe {
        Probe {
            tcp_socket: Some(TcpSocketAction { port, host: None }),
            ..Default::default()
        }
    }

    fn fields(p: &Pod) -> Vec<String> {
        validate_pod(p).iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn probes_need_exactly_one_handler() {
        let mut p = pod();
        p.spec.containers[0].liveness_probe = Some(Probe::default());
        let mut two = tcp_probe(serde_json::json!(80));
        two.exec = Some(ExecAction {
            command: vec!["true".into()],
        });
        p.spec.containers[0].readiness_probe = Some(two);
        let e = fields(&p);
        assert!(e[0].starts_with("spec.containers[0].livenessProbe: Required value"));
        assert!(e[1].starts_with("spec.containers[0].readinessProbe: Required value"));
    }

    #[test]
    fn exec_probes_only_in_oci_containers() {
        let exec = Probe {
            exec: Some(ExecAction {
                command: vec!["true".into()],
            }),
            ..Default::default()
        };
        let mut p = pod();
        p.spec.containers[0].liveness_probe = Some(exec.clone());
        assert_eq!(
            fields(&p),
            vec!["spec.containers[0].livenessProbe.exec: Unsupported: exec probes run only in OCI containers"]
        );
        p.spec.containers[0].image = "builtin/git-sync".into();
        assert_eq!(
            validate_pod(&p)[0].field,
            "spec.containers[0].livenessProbe.exec"
        );
        p.spec.containers[0].image = "busybox".into();
        assert!(validate_pod(&p).is_empty());
        p.spec.containers[0].liveness_probe = Some(Probe {
            exec: Some(ExecAction::default()),
            ..Default::default()
        });
        assert_eq!(
            fields(&p),
            vec!["spec.containers[0].livenessProbe.exec.command: Required value"]
        );
    }

    #[test]
    fn probe_ports_are_numbers_in_range_or_named_ports() {
        let mut p = pod();
        let c = &mut p.spec.containers[0];
        c.ports.push(ContainerPort {
            container_port: 8080,
            name: Some("http".into()),
            ..Default::default()
        });
        c.liveness_probe = Some(tcp_probe(serde_json::json!("http")));
        c.startup_probe = Some(tcp_probe(serde_json::json!(8080)));
        c.readiness_probe = Some(Probe {
            http_get: Some(HttpGetAction {
                port: serde_json::json!("http"),
                path: Some("/healthz".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(validate_pod(&p).is_empty(), "{:?}", validate_pod(&p));
        let c = &mut p.spec.containers[0];
        c.liveness_probe = Some(tcp_probe(serde_json::json!("metrics")));
        c.startup_probe = Some(tcp_probe(serde_json::json!(0)));
        c.readiness_probe = Some(tcp_probe(serde_json::json!(65536)));
        let e = fields(&p);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with(
            "spec.containers[0].livenessProbe.tcpSocket.port: Not found: \"metrics\""
        ));
        assert!(e[1]
            .starts_with("spec.containers[0].readinessProbe.tcpSocket.port: Invalid value: 65536"));
        assert!(
            e[2].starts_with("spec.containers[0].startupProbe.tcpSocket.port: Invalid value: 0")
        );
    }

    #[test]
    fn probe_timing_thresholds_and_scheme() {
        let mut p = pod();
        let c = &mut p.spec.containers[0];
        c.liveness_probe = Some(Probe {
            period_seconds: Some(0),
            initial_delay_seconds: Some(-1),
            success_threshold: Some(2),
            ..tcp_probe(serde_json::json!(80))
        });
        c.readiness_probe = Some(Probe {
            success_threshold: Some(2),
            failure_threshold: Some(0),
            timeout_seconds: Some(0),
            ..tcp_probe(serde_json::json!(80))
        });
        c.startup_probe = Some(Probe {
            http_get: Some(HttpGetAction {
                port: serde_json::json!(80),
                scheme: Some("HTTPS".into()),
                ..Default::default()
            }),
            success_threshold: Some(3),
            ..Default::default()
        });
        let got: Vec<String> = validate_pod(&p).into_iter().map(|e| e.field).collect();
        assert_eq!(
            got,
            vec![
                "spec.containers[0].livenessProbe.initialDelaySeconds",
                "spec.containers[0].livenessProbe.periodSeconds",
                "spec.containers[0].livenessProbe.successThreshold",
                "spec.containers[0].readinessProbe.timeoutSeconds",
                "spec.containers[0].readinessProbe.failureThreshold",
                "spec.containers[0].startupProbe.httpGet.scheme",
                "spec.containers[0].startupProbe.successThreshold",
            ]
        );
    }

    #[test]
    fn probes_on_init_containers_only_for_sidecars() {
        let mut p = pod();
        p.spec.init_containers.push(Container {
            name: "setup".into(),
            image: "busybox".into(),
            readiness_probe: Some(tcp_probe(serde_json::json!(80))),
            ..Default::default()
        });
        assert_eq!(
            fields(&p),
            vec!["spec.initContainers[0].readinessProbe: Forbidden: may not be set for init containers without restartPolicy=Always"]
        );
        p.spec.init_containers[0].restart_policy = Some(RestartPolicy::Always);
        assert!(validate_pod(&p).is_empty());
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("A"));
        assert!(is_dns_subdomain("a.b-c"));
    }
}
