//! Pulled sources, from `--config FILE`:
//! - `json`: HTTP endpoints returning JSON, mapped by path rules (like json_exporter);
//! - `prometheus`: other containers' Prometheus text endpoints, re-exposed with relabeling;
//! - `lines`: text files (a status file in a shared volume, a log) mapped by regex rules.
//!
//! Each source reports its scrapes as success or failure in the adapter's own metrics; a
//! failing source never stops the others.

use std::collections::HashMap;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use super::mapping::valid_label_name;
use super::registry::{FamKind, Op, Opts, Registry};
use crate::patterns::flags;

/// Why a `--config` file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    #[error("not a valid sources file")]
    Yaml(#[source] serde_norway::Error),
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
    #[error("{at}: invalid regex {pattern:?}")]
    Regex {
        at: String,
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

fn invalid(at: &str, message: impl Into<String>) -> SourcesError {
    SourcesError::Invalid {
        at: at.to_string(),
        message: message.into(),
    }
}

fn regex(at: String, pattern: &str) -> Result<Regex, SourcesError> {
    Regex::new(pattern).map_err(|source| SourcesError::Regex {
        at,
        pattern: pattern.to_string(),
        source,
    })
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct SourcesFile {
    #[serde(default)]
    pub json: Vec<JsonSource>,
    #[serde(default)]
    pub prometheus: Vec<PromSource>,
    #[serde(default)]
    pub lines: Vec<LineSource>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct JsonSource {
    pub name: String,
    pub url: String,
    #[serde(default = "default_interval")]
    pub interval: String,
    pub metrics: Vec<JsonMetric>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct JsonMetric {
    pub name: String,
    /// `$.a.b` for one value; with `values`, `$.list[*]` selects objects.
    pub path: String,
    #[serde(default = "default_gauge", rename = "type")]
    pub kind: String,
    pub help: Option<String>,
    /// label → static text, or `{.field}` relative to the selected object.
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// suffix → `{.field}` (relative) or a number: one metric `<name>_<suffix>` per entry.
    #[serde(default)]
    pub values: HashMap<String, String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PromSource {
    pub name: String,
    pub url: String,
    #[serde(default = "default_interval")]
    pub interval: String,
    /// Prepended to every metric name.
    #[serde(default)]
    pub prefix: String,
    /// Added to every series (overriding the same label from the source).
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// Only metric names matching this regex are kept.
    pub keep: Option<String>,
    /// Metric names matching this regex are dropped.
    pub drop: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct LineSource {
    pub name: String,
    /// A path inside the adapter container's volume mounts.
    pub file: String,
    /// `snapshot`: the whole file is re-read every interval (a status file);
    /// `tail`: only appended lines are read (a log).
    #[serde(default = "default_snapshot")]
    pub mode: String,
    #[serde(default = "default_interval")]
    pub interval: String,
    pub rules: Vec<LineRule>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct LineRule {
    pub regex: String,
    pub name: String,
    #[serde(default = "default_gauge", rename = "type")]
    pub kind: String,
    /// `$group` or `${group}`; counters default to 1 per matching line.
    pub value: Option<String>,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    pub help: Option<String>,
}

fn default_interval() -> String {
    "5s".into()
}
fn default_gauge() -> String {
    "gauge".into()
}
fn default_snapshot() -> String {
    "snapshot".into()
}

fn kind_of(w: &str, k: &str) -> Result<FamKind, SourcesError> {
    match k {
        "gauge" => Ok(FamKind::Gauge),
        "counter" => Ok(FamKind::Counter),
        "untyped" => Ok(FamKind::Untyped),
        o => Err(invalid(
            w,
            format!("type must be gauge, counter or untyped, got {o:?}"),
        )),
    }
}

fn interval(w: &str, s: &str) -> Result<Duration, SourcesError> {
    let d = flags::duration(s).map_err(|e| invalid(w, format!("interval: {e}")))?;
    if d < Duration::from_millis(100) {
        return Err(invalid(w, "interval must be at least 100ms"));
    }
    Ok(d)
}

/// A line rule's compiled regex and metric type.
pub type LineRegex = (Regex, FamKind);

/// A checked configuration, ready to run.
pub struct Compiled {
    pub json: Vec<(JsonSource, Duration, Vec<FamKind>)>,
    pub prom: Vec<(PromSource, Duration, Option<Regex>, Option<Regex>)>,
    pub lines: Vec<(LineSource, Duration, Vec<LineRegex>)>,
}

/// Parse and check `--config` YAML; errors name the source and field.
pub fn compile(yaml: &str) -> Result<Compiled, SourcesError> {
    let f: SourcesFile = serde_norway::from_str::<Option<SourcesFile>>(yaml)
        .map_err(SourcesError::Yaml)?
        .unwrap_or_default();
    let mut c = Compiled {
        json: vec![],
        prom: vec![],
        lines: vec![],
    };
    for (i, s) in f.json.iter().enumerate() {
        let w = format!("json[{i}] ({})", s.name);
        let mut kinds = Vec::new();
        for (j, m) in s.metrics.iter().enumerate() {
            let wm = format!("{w}.metrics[{j}] ({})", m.name);
            kinds.push(kind_of(&wm, &m.kind)?);
            if !m.path.starts_with('$') {
                return Err(invalid(
                    &wm,
                    format!("path must start with $, got {:?}", m.path),
                ));
            }
            for k in m.labels.keys() {
                if !valid_label_name(k) {
                    return Err(invalid(&wm, format!("invalid label name {k:?}")));
                }
            }
        }
        c.json.push((s.clone(), interval(&w, &s.interval)?, kinds));
    }
    for (i, s) in f.prometheus.iter().enumerate() {
        let w = format!("prometheus[{i}] ({})", s.name);
        let re = |r: &Option<String>, f: &str| {
            r.as_deref()
                .map(|r| regex(format!("{w}: {f}"), r))
                .transpose()
        };
        c.prom.push((
            s.clone(),
            interval(&w, &s.interval)?,
            re(&s.keep, "keep")?,
            re(&s.drop, "drop")?,
        ));
    }
    for (i, s) in f.lines.iter().enumerate() {
        let w = format!("lines[{i}] ({})", s.name);
        if !["snapshot", "tail"].contains(&s.mode.as_str()) {
            return Err(invalid(
                &w,
                format!("mode must be snapshot or tail, got {:?}", s.mode),
            ));
        }
        let mut rules = Vec::new();
        for (j, r) in s.rules.iter().enumerate() {
            let wr = format!("{w}.rules[{j}]");
            let re = regex(wr.clone(), &r.regex)?;
            let k = kind_of(&wr, &r.kind)?;
            if k != FamKind::Counter && r.value.is_none() {
                return Err(invalid(&wr, format!("a {} needs value: $group", r.kind)));
            }
            rules.push((re, k));
        }
        c.lines.push((s.clone(), interval(&w, &s.interval)?, rules));
    }
    Ok(c)
}

// ---------------------------------------------------------------- JSON

/// Select values by a JSONPath subset: `$`, `.key`, `['key']`, `[n]`, `[*]`.
pub fn select<'v>(root: &'v serde_json::Value, path: &str) -> Vec<&'v serde_json::Value> {
    let mut cur = vec![root];
    let p = path.trim_start_matches('$');
    let mut i = 0;
    let b = p.as_bytes();
    while i < b.len() {
        let mut next = Vec::new();
        if b[i] == b'.' {
            let start = i + 1;
            let mut end = start;
            while end < b.len() && b[end] != b'.' && b[end] != b'[' {
                end += 1;
            }
            let key = &p[start..end];
            for v in &cur {
                if key == "*" {
                    match v {
                        serde_json::Value::Object(m) => next.extend(m.values()),
                        serde_json::Value::Array(a) => next.extend(a.iter()),
                        _ => {}
                    }
                } else if let Some(x) = v.get(key) {
                    next.push(x);
                }
            }
            i = end;
        } else if b[i] == b'[' {
            let Some(close) = p[i..].find(']') else {
                return vec![];
            };
            let inner = p[i + 1..i + close].trim_matches(|c| c == '\'' || c == '"');
            for v in &cur {
                if inner == "*" {
                    if let serde_json::Value::Array(a) = v {
                        next.extend(a.iter());
                    } else if let serde_json::Value::Object(m) = v {
                        next.extend(m.values());
                    }
                } else if let Ok(n) = inner.parse::<usize>() {
                    if let Some(x) = v.get(n) {
                        next.push(x);
                    }
                } else if let Some(x) = v.get(inner) {
                    next.push(x);
                }
            }
            i += close + 1;
        } else {
            return vec![];
        }
        cur = next;
    }
    cur
}

fn as_number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// `{.field}` templates relative to `obj`, or static text.
fn template(t: &str, obj: &serde_json::Value) -> String {
    let mut out = String::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let path = format!("${}", &rest[open + 1..open + close]);
        if let Some(v) = select(obj, &path).first() {
            match v {
                serde_json::Value::String(s) => out.push_str(s),
                other => out.push_str(&other.to_string()),
            }
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// Apply one JSON document to the registry. Returns how many samples were set.
pub fn apply_json(
    reg: &Registry,
    src: &JsonSource,
    kinds: &[FamKind],
    doc: &serde_json::Value,
    ttl: Option<Duration>,
) -> usize {
    let mut n = 0;
    reg.batch(|b| {
        for (m, kind) in src.metrics.iter().zip(kinds) {
            let o = Opts {
                help: m.help.as_deref(),
                ttl,
                ..Default::default()
            };
            for obj in select(doc, &m.path) {
                let labels: Vec<(String, String)> = m
                    .labels
                    .iter()
                    .map(|(k, t)| (k.clone(), template(t, obj)))
                    .collect();
                if m.values.is_empty() {
                    if let Some(v) = as_number(obj) {
                        b.update(&m.name, *kind, &labels, Op::Set(v), &o);
                        n += 1;
                    }
                } else {
                    for (suffix, t) in &m.values {
                        let v = t
                            .parse::<f64>()
                            .ok()
                            .or_else(|| template(t, obj).parse().ok());
                        if let Some(v) = v {
                            b.update(
                                &format!("{}_{suffix}", m.name),
                                *kind,
                                &labels,
                                Op::Set(v),
                                &o,
                            );
                            n += 1;
                        }
                    }
                }
            }
        }
    });
    n
}

// ---------------------------------------------------------------- Prometheus text

/// One sample of the text format: name, labels, value.
pub type PromSample = (String, Vec<(String, String)>, f64);

/// Parse Prometheus text exposition; malformed lines are skipped and counted.
pub fn parse_prom(text: &str) -> (Vec<PromSample>, HashMap<String, String>, usize) {
    let mut types = HashMap::new();
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((n, t)) = rest.split_once(' ') {
                types.insert(n.to_string(), t.trim().to_string());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        match parse_prom_line(line) {
            Some(s) => out.push(s),
            None => bad += 1,
        }
    }
    (out, types, bad)
}

fn parse_prom_line(line: &str) -> Option<PromSample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let mut i = 1;
        let b = rest.as_bytes();
        loop {
            while i < b.len() && (b[i] == b',' || b[i] == b' ') {
                i += 1;
            }
            if i >= b.len() {
                return None;
            }
            if b[i] == b'}' {
                i += 1;
                break;
            }
            let eq = rest[i..].find('=')? + i;
            let key = rest[i..eq].trim().to_string();
            if b.get(eq + 1) != Some(&b'"') {
                return None;
            }
            let mut j = eq + 2;
            let mut val = String::new();
            while j < b.len() && b[j] != b'"' {
                if b[j] == b'\\' && j + 1 < b.len() {
                    let next = rest[j + 1..].chars().next()?;
                    val.push(if next == 'n' { '\n' } else { next });
                    j += 1 + next.len_utf8();
                } else {
                    let ch = rest[j..].chars().next()?;
                    val.push(ch);
                    j += ch.len_utf8();
                }
            }
            if j >= b.len() {
                return None;
            }
            labels.push((key, val));
            i = j + 1;
        }
        rest = &rest[i..];
    }
    let mut parts = rest.split_whitespace();
    let v = parts.next()?;
    let v = match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some((name.to_string(), labels, v))
}

/// Re-expose a scraped text page. Returns samples applied.
pub fn apply_prom(
    reg: &Registry,
    src: &PromSource,
    keep: Option<&Regex>,
    drop_re: Option<&Regex>,
    text: &str,
    ttl: Option<Duration>,
) -> usize {
    let (samples, types, bad) = parse_prom(text);
    if bad > 0 {
        reg.stats
            .prom_malformed
            .fetch_add(bad as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let mut n = 0;
    reg.batch(|b| {
        for (name, mut labels, v) in samples {
            if keep.is_some_and(|k| !k.is_match(&name))
                || drop_re.is_some_and(|d| d.is_match(&name))
            {
                continue;
            }
            // Histogram and summary parts are re-exposed as their own series (untyped).
            let base = types.get(&name).map(String::as_str);
            let kind = match base {
                Some("counter") => FamKind::Counter,
                Some("gauge") => FamKind::Gauge,
                _ => FamKind::Untyped,
            };
            for (k, v) in &src.labels {
                labels.retain(|(lk, _)| lk != k);
                labels.push((k.clone(), v.clone()));
            }
            b.update(
                &format!("{}{name}", src.prefix),
                kind,
                &labels,
                Op::Set(v),
                &Opts {
                    ttl,
                    ..Default::default()
                },
            );
            n += 1;
        }
    });
    n
}

// ---------------------------------------------------------------- lines

/// Apply regex rules to lines of text. Returns lines that matched a rule.
pub fn apply_lines(
    reg: &Registry,
    src: &LineSource,
    rules: &[(Regex, FamKind)],
    text: &str,
) -> usize {
    let mut matched = 0;
    reg.batch(|b| {
        for line in text.lines() {
            for ((re, kind), r) in rules.iter().zip(&src.rules) {
                let Some(caps) = re.captures(line) else {
                    continue;
                };
                let expand = |t: &str| {
                    let mut s = String::new();
                    caps.expand(t, &mut s);
                    s
                };
                let labels: Vec<(String, String)> = r
                    .labels
                    .iter()
                    .map(|(k, t)| (k.clone(), expand(t)))
                    .collect();
                let v = match &r.value {
                    Some(t) => match expand(t).trim().parse::<f64>() {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                    None => 1.0,
                };
                let op = if *kind == FamKind::Counter {
                    Op::Add(v)
                } else {
                    Op::Set(v)
                };
                let o = Opts {
                    help: r.help.as_deref(),
                    ..Default::default()
                };
                b.update(&r.name, *kind, &labels, op, &o);
                matched += 1;
                break;
            }
        }
    });
    reg.stats
        .lines_matched
        .fetch_add(matched as u64, std::sync::atomic::Ordering::Relaxed);
    matched
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn jsonpath_and_templates() {
        let doc: serde_json::Value = serde_json::json!({
            "uptime": 12.5,
            "queues": [{"name": "a", "depth": 3, "ok": true}, {"name": "b", "depth": "7"}],
        });
        assert_eq!(select(&doc, "$.uptime")[0], &serde_json::json!(12.5));
        assert_eq!(select(&doc, "$.queues[*].depth").len(), 2);
        assert_eq!(select(&doc, "$.queues[1].name")[0], "b");
        assert_eq!(select(&doc, "$['uptime']").len(), 1);
        assert!(select(&doc, "$.nope.x").is_empty());
        assert_eq!(template("q-{.name}", &doc["queues"][0]), "q-a");
        let reg = Registry::new(100, None, Arc::new(|_: &str| {}));
        let src: JsonSource = serde_norway::from_str(
            "name: app\nurl: http://x\nmetrics:\n- {name: app_uptime_seconds, path: $.uptime}\n- name: app_queue\n  path: $.queues[*]\n  labels: {queue: '{.name}'}\n  values: {depth: '{.depth}'}\n",
        )
        .unwrap();
        assert_eq!(
            apply_json(&reg, &src, &[FamKind::Gauge, FamKind::Gauge], &doc, None),
            3
        );
        let t = reg.render(false);
        assert!(t.contains("app_uptime_seconds 12.5"));
        assert!(t.contains("app_queue_depth{queue=\"b\"} 7"), "{t}");
    }

    #[test]
    fn prom_text_parse_and_relabel() {
        let text = "# TYPE http_requests_total counter\nhttp_requests_total{code=\"200\",path=\"/a \\\"q\\\"\"} 1027 1395066363000\nbad line {\nup 1\n";
        let (s, types, bad) = parse_prom(text);
        assert_eq!(bad, 1);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].1[1].1, "/a \"q\"");
        assert_eq!(types["http_requests_total"], "counter");
        let reg = Registry::new(100, None, Arc::new(|_: &str| {}));
        let src: PromSource = serde_norway::from_str(
            "name: web\nurl: http://x\nprefix: web_\nlabels: {source: web}\n",
        )
        .unwrap();
        apply_prom(
            &reg,
            &src,
            None,
            Some(&Regex::new("^up$").unwrap()),
            text,
            None,
        );
        let t = reg.render(false);
        assert!(t.contains("# TYPE web_http_requests_total counter"), "{t}");
        assert!(t.contains("source=\"web\""));
        assert!(!t.contains("web_up"));
    }

    #[test]
    fn line_rules_and_config_errors() {
        let c = compile("lines:\n- name: status\n  file: /data/status\n  rules:\n  - {regex: '^queue (?P<q>\\w+) depth (?P<d>\\d+)$', name: queue_depth, value: '$d', labels: {queue: '$q'}}\n  - {regex: 'ERROR', name: errors_total, type: counter}\n").unwrap();
        let (src, _, rules) = &c.lines[0];
        let reg = Registry::new(100, None, Arc::new(|_: &str| {}));
        let n = apply_lines(
            &reg,
            src,
            rules,
            "queue a depth 4\nnoise\nERROR x\nERROR y\n",
        );
        assert_eq!(n, 3);
        let t = reg.render(false);
        assert!(t.contains("queue_depth{queue=\"a\"} 4"));
        assert!(t.contains("errors_total 2"));
        for (yaml, want) in [
            (
                "lines:\n- {name: s, file: /x, rules: [{regex: '(', name: a, value: '$1'}]}\n",
                "lines[0] (s).rules[0]: invalid regex",
            ),
            (
                "lines:\n- {name: s, file: /x, mode: follow, rules: []}\n",
                "mode must be snapshot or tail",
            ),
            (
                "json:\n- {name: j, url: http://x, metrics: [{name: a, path: 'a.b'}]}\n",
                "path must start with $",
            ),
            (
                "json:\n- {name: j, url: http://x, interval: 1ms, metrics: []}\n",
                "at least 100ms",
            ),
            (
                "prometheus:\n- {name: p, url: http://x, keep: '['}\n",
                "keep: invalid regex",
            ),
            ("bogus: 1\n", "bogus"),
        ] {
            let e = compile(yaml)
                .err()
                .map(|e| super::super::error_chain(&e))
                .unwrap_or_default();
            assert!(e.contains(want), "{yaml:?} → {e}");
        }
    }

    /// Property: the text parsers never panic on arbitrary input.
    #[test]
    fn fuzz_parsers() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let chars: Vec<char> = "a_{}=\",\\ 1.5e+Inf#\nTYPE[]*$.'é".chars().collect();
        let doc = serde_json::json!({"a": [{"b": 1}, {"b": "x"}], "c": {"d": true}});
        for _ in 0..100_000 {
            let len = (next() % 30) as usize;
            let s: String = (0..len)
                .map(|_| chars[(next() % chars.len() as u64) as usize])
                .collect();
            let _ = parse_prom(&s);
            let _ = select(&doc, &format!("${s}"));
            let _ = template(&s, &doc);
        }
    }
}
