//! StatsD mapping rules in statsd_exporter's format (`--statsd.mapping-config`): glob or regex
//! matches that rename a dotted StatsD name and pull labels out of it, pick the observer type
//! and histogram buckets, set a TTL, or drop the metric. Without a matching rule a name is
//! escaped (`a.b.c` → `a_b_c`), as statsd_exporter does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use crate::patterns::gitsync::parse_go_duration;

use super::statsd::{escape_name, Kind};

pub const DEFAULT_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    mappings: Vec<Rule>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Defaults {
    observer_type: Option<String>,
    buckets: Option<Vec<f64>>,
    histogram_options: Option<HistOpts>,
    ttl: Option<String>,
    match_type: Option<String>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct HistOpts {
    buckets: Vec<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(rename = "match")]
    pattern: String,
    name: Option<String>,
    #[serde(default)]
    labels: HashMap<String, String>,
    match_type: Option<String>,
    match_metric_type: Option<String>,
    observer_type: Option<String>,
    timer_type: Option<String>,
    buckets: Option<Vec<f64>>,
    histogram_options: Option<HistOpts>,
    ttl: Option<String>,
    action: Option<String>,
    help: Option<String>,
}

/// What a rule says about one StatsD metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub buckets: Vec<f64>,
    pub ttl: Option<Duration>,
    pub help: Option<String>,
}

struct Compiled {
    re: Regex,
    name: Option<String>,
    labels: Vec<(String, String)>,
    metric_type: Option<Kind>,
    buckets: Vec<f64>,
    ttl: Option<Duration>,
    drop: bool,
    help: Option<String>,
}

/// A compiled mapping configuration with a cache of recent decisions.
pub struct Mapper {
    rules: Vec<Compiled>,
    default_buckets: Vec<f64>,
    default_ttl: Option<Duration>,
    cache: Mutex<HashMap<(String, u8), Option<Mapped>>>,
}

const CACHE_MAX: usize = 50_000;

fn glob_to_regex(glob: &str) -> String {
    let mut re = String::from("^");
    for c in glob.chars() {
        match c {
            '*' => re.push_str("([^.]*)"),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    re
}

fn kind_byte(k: Kind) -> u8 {
    match k {
        Kind::Counter => 0,
        Kind::Gauge => 1,
        Kind::Timer => 2,
        Kind::Set => 3,
    }
}

fn valid_buckets(where_: &str, b: &[f64]) -> Result<(), String> {
    if b.is_empty() || b.windows(2).any(|w| w[0] >= w[1]) || b.iter().any(|x| !x.is_finite()) {
        return Err(format!(
            "{where_}: buckets must be finite and strictly increasing, got {b:?}"
        ));
    }
    Ok(())
}

impl Mapper {
    /// No rules: every name is escaped.
    pub fn empty() -> Self {
        Mapper {
            rules: Vec::new(),
            default_buckets: DEFAULT_BUCKETS.to_vec(),
            default_ttl: None,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Parse a mapping file's YAML. Errors name the rule (by index and match) and the field.
    pub fn parse(yaml: &str) -> Result<Self, String> {
        let f: File = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        let ttl = |w: &str, t: &Option<String>| -> Result<Option<Duration>, String> {
            t.as_deref()
                .map(|v| parse_go_duration(v).map_err(|e| format!("{w}: ttl: {e}")))
                .transpose()
                .map(|d| d.filter(|d| !d.is_zero()))
        };
        let default_buckets = f
            .defaults
            .histogram_options
            .clone()
            .map(|h| h.buckets)
            .or(f.defaults.buckets.clone())
            .unwrap_or_else(|| DEFAULT_BUCKETS.to_vec());
        valid_buckets("defaults", &default_buckets)?;
        if let Some(o) = &f.defaults.observer_type {
            if !["histogram", "summary", ""].contains(&o.as_str()) {
                return Err(format!(
                    "defaults: observer_type must be histogram or summary, got {o:?}"
                ));
            }
        }
        let default_match = f
            .defaults
            .match_type
            .clone()
            .unwrap_or_else(|| "glob".into());
        let mut rules = Vec::new();
        for (i, r) in f.mappings.iter().enumerate() {
            let w = format!("mappings[{i}] (match {:?})", r.pattern);
            let mt = r.match_type.clone().unwrap_or(default_match.clone());
            let re_src = match mt.as_str() {
                "glob" => glob_to_regex(&r.pattern),
                "regex" => r.pattern.clone(),
                other => {
                    return Err(format!(
                        "{w}: match_type must be glob or regex, got {other:?}"
                    ))
                }
            };
            let re = Regex::new(&re_src).map_err(|e| format!("{w}: invalid regex: {e}"))?;
            let drop = match r.action.as_deref() {
                None | Some("map") => false,
                Some("drop") => true,
                Some(o) => return Err(format!("{w}: action must be map or drop, got {o:?}")),
            };
            if !drop && r.name.as_deref().unwrap_or("").is_empty() {
                return Err(format!("{w}: name is required (unless action: drop)"));
            }
            let metric_type = match r.match_metric_type.as_deref() {
                None | Some("") => None,
                Some("counter") => Some(Kind::Counter),
                Some("gauge") => Some(Kind::Gauge),
                Some("observer") | Some("timer") => Some(Kind::Timer),
                Some(o) => {
                    return Err(format!(
                        "{w}: match_metric_type must be counter, gauge or observer, got {o:?}"
                    ))
                }
            };
            if let Some(o) = r.observer_type.as_ref().or(r.timer_type.as_ref()) {
                if !["histogram", "summary", ""].contains(&o.as_str()) {
                    return Err(format!(
                        "{w}: observer_type must be histogram or summary, got {o:?}"
                    ));
                }
            }
            let buckets = r
                .histogram_options
                .clone()
                .map(|h| h.buckets)
                .or(r.buckets.clone())
                .unwrap_or_else(|| default_buckets.clone());
            valid_buckets(&w, &buckets)?;
            let mut labels: Vec<(String, String)> = r
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            for (k, _) in &labels {
                if !valid_label_name(k) {
                    return Err(format!("{w}: invalid label name {k:?}"));
                }
            }
            rules.push(Compiled {
                re,
                name: r.name.clone(),
                labels,
                metric_type,
                buckets,
                ttl: ttl(&w, &r.ttl)?,
                drop,
                help: r.help.clone(),
            });
        }
        Ok(Mapper {
            rules,
            default_buckets,
            default_ttl: ttl("defaults", &f.defaults.ttl)?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Map a StatsD name. `None`: dropped by a rule.
    pub fn map(&self, name: &str, kind: Kind) -> Option<Mapped> {
        if self.rules.is_empty() {
            return Some(Mapped {
                name: escape_name(name),
                labels: Vec::new(),
                buckets: self.default_buckets.clone(),
                ttl: self.default_ttl,
                help: None,
            });
        }
        let key = (name.to_string(), kind_byte(kind));
        if let Some(hit) = self.cache.lock().unwrap().get(&key) {
            return hit.clone();
        }
        let mut result = Some(Mapped {
            name: escape_name(name),
            labels: Vec::new(),
            buckets: self.default_buckets.clone(),
            ttl: self.default_ttl,
            help: None,
        });
        for r in &self.rules {
            if r.metric_type.is_some_and(|t| t != kind) {
                continue;
            }
            let Some(caps) = r.re.captures(name) else {
                continue;
            };
            if r.drop {
                result = None;
                break;
            }
            let mut n = String::new();
            caps.expand(r.name.as_deref().unwrap_or(""), &mut n);
            let labels = r
                .labels
                .iter()
                .map(|(k, v)| {
                    let mut out = String::new();
                    caps.expand(v, &mut out);
                    (k.clone(), out)
                })
                .collect();
            result = Some(Mapped {
                name: escape_name(&n),
                labels,
                buckets: r.buckets.clone(),
                ttl: r.ttl.or(self.default_ttl),
                help: r.help.clone(),
            });
            break;
        }
        let mut c = self.cache.lock().unwrap();
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(key, result.clone());
        result
    }
}

pub fn valid_label_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_regex_drop_and_defaults() {
        let m = Mapper::parse(
            r#"
defaults:
  ttl: 1m
mappings:
- match: "test.dispatcher.*.*.*"
  name: "dispatcher_events_total"
  labels: {processor: "$1", action: "$2", outcome: "$3", job: "test_dispatcher"}
- match: '(.*)\.(.*)--(.*)\.status\.(.*)\.count'
  match_type: regex
  name: "request_total"
  labels: {service: "${1}_${2}", code: "$4"}
- match: "junk.*"
  action: drop
- match: "*.latency"
  match_metric_type: observer
  name: "${1}_latency_seconds"
  histogram_options: {buckets: [0.1, 1]}
"#,
        )
        .unwrap();
        let d = m
            .map("test.dispatcher.FooProcessor.send.success", Kind::Counter)
            .unwrap();
        assert_eq!(d.name, "dispatcher_events_total");
        assert!(d.labels.contains(&("action".into(), "send".into())));
        assert_eq!(d.ttl, Some(Duration::from_secs(60)));
        let r = m
            .map("foo.bar--baz.status.500.count", Kind::Counter)
            .unwrap();
        assert_eq!(r.name, "request_total");
        assert!(r.labels.contains(&("service".into(), "foo_bar".into())));
        assert!(m.map("junk.x", Kind::Gauge).is_none());
        let l = m.map("api.latency", Kind::Timer).unwrap();
        assert_eq!(
            (l.name.as_str(), l.buckets.clone()),
            ("api_latency_seconds", vec![0.1, 1.0])
        );
        // A counter of the same name does not match the observer rule: default escaping.
        assert_eq!(
            m.map("api.latency", Kind::Counter).unwrap().name,
            "api_latency"
        );
        assert_eq!(
            Mapper::empty().map("a.b.c", Kind::Counter).unwrap().name,
            "a_b_c"
        );
    }

    #[test]
    fn bad_rules_are_named() {
        for (yaml, want) in [
            ("mappings:\n- match: 'a.*'\n", "mappings[0]"),
            (
                "mappings:\n- match: '(a'\n  match_type: regex\n  name: x\n",
                "invalid regex",
            ),
            (
                "mappings:\n- match: a\n  name: x\n  buckets: [2, 1]\n",
                "strictly increasing",
            ),
            (
                "mappings:\n- match: a\n  name: x\n  colour: red\n",
                "colour",
            ),
            (
                "mappings:\n- match: a\n  name: x\n  labels: {\"1bad\": v}\n",
                "invalid label name",
            ),
            ("mappings: [\n", "line"),
        ] {
            let e = Mapper::parse(yaml).err().unwrap_or_default();
            assert!(e.contains(want), "{yaml:?} → {e}");
        }
    }
}
