//! StatsD mapping rules in statsd_exporter's format (`--statsd.mapping-config`), with its
//! matching semantics, so an existing mapping file carries over unchanged:
//!
//! - `match` is a glob (`*` is one whole dot-separated component) or, with `match_type: regex`,
//!   an unanchored regular expression. Glob rules are always tried before regex rules. Among
//!   globs the first matching rule in file order wins; with `defaults.glob_disable_ordering`
//!   the most specific one does (at each component from the left, a literal beats `*`). Regex
//!   rules are tried in file order.
//! - `name` and `labels` take `$1` / `${1}` (globs) or the regex's groups (`$0`, `$name`). The
//!   name is escaped as statsd_exporter escapes it. Without a matching rule the StatsD name is
//!   escaped (`a.b-c` → `a_b_c`).
//! - `match_metric_type`, `action: drop`, `honor_labels`, `help`, `scale`, `ttl`,
//!   `observer_type` (or its old name `timer_type`) with `histogram_options` (or `buckets`)
//!   and `summary_options` (or `quantiles`), and the same `defaults`.
//!
//! Options that cannot apply here are accepted and reported in [`Mapper::warnings`] (logged to
//! the container log): native histograms (the text formats carry classic buckets only), and
//! options of the other observer type. One deliberate difference: a timer with no
//! `observer_type` anywhere becomes a histogram (statsd_exporter's default is a summary); set
//! `defaults: {observer_type: summary}` for statsd_exporter's behaviour.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use super::statsd::{escape_name, Kind};
use crate::patterns::flags;

pub const DEFAULT_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// statsd_exporter's (and client_golang's) summary defaults.
pub const DEFAULT_QUANTILES: [(f64, f64); 3] = [(0.5, 0.05), (0.9, 0.01), (0.99, 0.001)];
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);
pub const DEFAULT_AGE_BUCKETS: u32 = 5;
pub const DEFAULT_BUF_CAP: u32 = 500;

/// Why a mapping file was refused.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("not a valid mapping file")]
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

fn invalid(at: &str, message: impl Into<String>) -> MappingError {
    MappingError::Invalid {
        at: at.to_string(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- the file

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    mappings: Vec<Rule>,
}

/// A Go `time.Duration` in YAML: a string (`1m30s`) or a number of nanoseconds (`0`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum GoDuration {
    Nanos(u64),
    Text(String),
}

/// A label value as YAML may write it (`code: 200` is a string to statsd_exporter).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Text(s) => s.clone(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Defaults {
    observer_type: Option<String>,
    /// statsd_exporter's old name for `observer_type`.
    timer_type: Option<String>,
    match_type: Option<String>,
    #[serde(default)]
    glob_disable_ordering: bool,
    ttl: Option<GoDuration>,
    summary_options: Option<SummaryYaml>,
    histogram_options: Option<HistogramYaml>,
    /// Old form of `histogram_options.buckets`.
    buckets: Option<Vec<f64>>,
    /// Old form of `summary_options.quantiles`.
    quantiles: Option<Vec<QuantileYaml>>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct HistogramYaml {
    #[serde(default)]
    buckets: Vec<f64>,
    native_histogram_bucket_factor: Option<f64>,
    native_histogram_max_buckets: Option<u32>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct SummaryYaml {
    #[serde(default)]
    quantiles: Vec<QuantileYaml>,
    max_age: Option<GoDuration>,
    age_buckets: Option<u32>,
    buf_cap: Option<u32>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct QuantileYaml {
    quantile: f64,
    #[serde(default)]
    error: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(rename = "match")]
    pattern: String,
    name: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, Scalar>>,
    #[serde(default)]
    honor_labels: bool,
    match_type: Option<String>,
    match_metric_type: Option<String>,
    observer_type: Option<String>,
    timer_type: Option<String>,
    help: Option<String>,
    action: Option<String>,
    ttl: Option<GoDuration>,
    summary_options: Option<SummaryYaml>,
    histogram_options: Option<HistogramYaml>,
    scale: Option<f64>,
    buckets: Option<Vec<f64>>,
    quantiles: Option<Vec<QuantileYaml>>,
}

// ---------------------------------------------------------------- what a rule decides

/// A summary's options: quantiles (with their allowed error), the sliding window and its
/// age buckets, and statsd_exporter's stream buffer size (the samples one age bucket keeps
/// exactly before it samples).
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryOpts {
    pub quantiles: Vec<(f64, f64)>,
    pub max_age: Duration,
    pub age_buckets: u32,
    pub buf_cap: u32,
}

/// How observations (timers, histograms, distributions) are exposed.
#[derive(Debug, Clone, PartialEq)]
pub enum Observer {
    Histogram(Arc<[f64]>),
    Summary(Arc<SummaryOpts>),
}

/// Series options a rule (or the defaults, for unmatched names) sets.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub observer: Observer,
    /// `None`: the adapter's `--statsd.ttl`; `Some(None)`: never expires; `Some(Some(d))`.
    pub ttl: Option<Option<Duration>>,
    pub help: Option<String>,
    pub scale: Option<f64>,
    /// The sample's own tags win over the rule's labels.
    pub honor_labels: bool,
}

/// What the mapping says about one StatsD metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub name: String,
    /// Sorted by name.
    pub labels: Vec<(String, String)>,
    pub settings: Arc<Settings>,
    /// A rule matched (`false`: the escaped StatsD name with the defaults).
    pub matched: bool,
}

/// The three metric types statsd_exporter matches on (`match_metric_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MType {
    Counter = 0,
    Gauge = 1,
    Observer = 2,
}

fn mtype(k: Kind) -> MType {
    match k {
        Kind::Counter => MType::Counter,
        Kind::Gauge | Kind::Set => MType::Gauge,
        Kind::Timer => MType::Observer,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Lit(String),
    Star,
}

/// A glob template: text and capture references (`$1` → index 0).
#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Cap(usize),
}

#[derive(Debug)]
enum Matcher {
    Glob { segs: Vec<Seg>, name: Vec<Piece> },
    Regex { re: Regex, name: String },
}

#[derive(Debug)]
struct Compiled {
    matcher: Matcher,
    /// label → (regex template, glob template)
    labels: Vec<(String, String, Vec<Piece>)>,
    metric_type: Option<MType>,
    drop: bool,
    settings: Arc<Settings>,
}

#[derive(Clone)]
enum Slot {
    Unknown,
    Known(Option<Arc<Mapped>>),
}

/// A compiled mapping configuration with a cache of recent decisions.
pub struct Mapper {
    globs: Vec<Compiled>,
    regexes: Vec<Compiled>,
    unordered: bool,
    fallback: Arc<Settings>,
    cache: Mutex<HashMap<Box<str>, [Slot; 3]>>,
    /// Accepted options that cannot apply, and rules that can never match: for the log.
    pub warnings: Vec<String>,
    /// How many rules the file has.
    pub rules: usize,
}

const CACHE_MAX: usize = 50_000;

// statsd_exporter's checks: a glob's first component cannot start with a digit, later ones
// can; `*` is a whole component. A name is a Prometheus name with `$n` references.
static GLOB_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(\*|[a-zA-Z_][a-zA-Z0-9_\-]*)(\.\*|\.[a-zA-Z0-9_][a-zA-Z0-9_\-]*)*$").unwrap()
});
static NAME_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([a-zA-Z_]|\$\{?\d+\}?)([a-zA-Z0-9_]|\$\{?\d+\}?)*$").unwrap());

/// Parse a glob template as statsd_exporter does: `$` then an optional `{`, a run of
/// `[A-Za-z0-9_$]`, an optional `}`. A run that is a number from 1 to `captures` refers to
/// that capture; any other run (`$1_foo`, `$0`, `$9` of two captures) becomes empty text.
fn glob_template(t: &str, captures: usize) -> Vec<Piece> {
    let b = t.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
    let mut out = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let mut j = i + 1;
            if j < b.len() && b[j] == b'{' && j + 1 < b.len() && word(b[j + 1]) {
                j += 1;
            }
            let start = j;
            while j < b.len() && word(b[j]) {
                j += 1;
            }
            if j > start {
                let run = &t[start..j];
                if j < b.len() && b[j] == b'}' {
                    j += 1;
                }
                if let Ok(n) = run.parse::<usize>() {
                    if (1..=captures).contains(&n) {
                        if !text.is_empty() {
                            out.push(Piece::Text(std::mem::take(&mut text)));
                        }
                        out.push(Piece::Cap(n - 1));
                    }
                }
                i = j;
                continue;
            }
        }
        // A char boundary: `$` and ASCII are one byte; copy whole chars otherwise.
        let ch = t[i..].chars().next().unwrap_or('\0');
        text.push(ch);
        i += ch.len_utf8().max(1);
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    out
}

fn format_glob(t: &[Piece], caps: &[&str]) -> String {
    let mut s = String::new();
    for p in t {
        match p {
            Piece::Text(x) => s.push_str(x),
            Piece::Cap(i) => s.push_str(caps.get(*i).copied().unwrap_or("")),
        }
    }
    s
}

fn glob_match<'a>(segs: &[Seg], fields: &[&'a str], caps: &mut Vec<&'a str>) -> bool {
    caps.clear();
    if segs.len() != fields.len() {
        return false;
    }
    for (s, f) in segs.iter().zip(fields) {
        match s {
            Seg::Star => caps.push(f),
            Seg::Lit(l) if l == f => {}
            Seg::Lit(_) => return false,
        }
    }
    true
}

/// `a` is more specific than `b` (same length): at the first component where they differ in
/// kind, `a` has a literal and `b` a `*`.
fn more_specific(a: &[Seg], b: &[Seg]) -> bool {
    for (x, y) in a.iter().zip(b) {
        match (x, y) {
            (Seg::Lit(_), Seg::Star) => return true,
            (Seg::Star, Seg::Lit(_)) => return false,
            _ => {}
        }
    }
    false
}

/// `a` matches every name `b` matches.
fn covers(a: &[Seg], b: &[Seg]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Seg::Star, _) => true,
            (Seg::Lit(l), Seg::Lit(m)) => l == m,
            (Seg::Lit(_), Seg::Star) => false,
        })
}

fn valid_buckets(at: &str, b: &[f64]) -> Result<(), MappingError> {
    if b.windows(2).any(|w| w[0] >= w[1]) || b.iter().any(|x| !x.is_finite()) {
        return Err(invalid(
            at,
            format!("buckets must be finite and strictly increasing, got {b:?}"),
        ));
    }
    Ok(())
}

fn duration(
    at: &str,
    field: &str,
    d: &Option<GoDuration>,
) -> Result<Option<Duration>, MappingError> {
    match d {
        None => Ok(None),
        Some(GoDuration::Nanos(n)) => Ok(Some(Duration::from_nanos(*n))),
        Some(GoDuration::Text(t)) => flags::duration(t)
            .map(Some)
            .map_err(|e| invalid(at, format!("{field}: {e}"))),
    }
}

fn observer_kind(at: &str, field: &str, v: &Option<String>) -> Result<Option<bool>, MappingError> {
    // Some(true): histogram; Some(false): summary.
    match v.as_deref() {
        None | Some("") => Ok(None),
        Some("histogram") => Ok(Some(true)),
        Some("summary") => Ok(Some(false)),
        Some(o) => Err(invalid(
            at,
            format!("{field} must be histogram or summary, got {o:?}"),
        )),
    }
}

fn quantiles(at: &str, q: &[QuantileYaml]) -> Result<Vec<(f64, f64)>, MappingError> {
    for x in q {
        if !(0.0..=1.0).contains(&x.quantile) || !(0.0..1.0).contains(&x.error) {
            return Err(invalid(
                at,
                format!(
                    "quantile {} (error {}): a quantile is between 0 and 1, its error at least 0 and below 1",
                    x.quantile, x.error
                ),
            ));
        }
    }
    Ok(q.iter().map(|x| (x.quantile, x.error)).collect())
}

/// Buckets of one level: `histogram_options.buckets` or the old top-level `buckets`.
fn level_buckets(
    at: &str,
    h: &Option<HistogramYaml>,
    old: &Option<Vec<f64>>,
) -> Result<Option<Vec<f64>>, MappingError> {
    let new = h
        .as_ref()
        .map(|h| h.buckets.clone())
        .filter(|b| !b.is_empty());
    let old = old.clone().filter(|b| !b.is_empty());
    if new.is_some() && old.is_some() {
        return Err(invalid(
            at,
            "buckets are set both at the top level and in histogram_options; keep one",
        ));
    }
    let b = new.or(old);
    if let Some(b) = &b {
        valid_buckets(at, b)?;
    }
    Ok(b)
}

fn level_quantiles(
    at: &str,
    s: &Option<SummaryYaml>,
    old: &Option<Vec<QuantileYaml>>,
) -> Result<Option<Vec<(f64, f64)>>, MappingError> {
    let new = s
        .as_ref()
        .map(|s| s.quantiles.clone())
        .filter(|q| !q.is_empty());
    let old = old.clone().filter(|q| !q.is_empty());
    if new.is_some() && old.is_some() {
        return Err(invalid(
            at,
            "quantiles are set both at the top level and in summary_options; keep one",
        ));
    }
    new.or(old).map(|q| quantiles(at, &q)).transpose()
}

fn native_warning(at: &str, h: &Option<HistogramYaml>, warnings: &mut Vec<String>) {
    if let Some(h) = h {
        if h.native_histogram_bucket_factor.is_some() || h.native_histogram_max_buckets.is_some() {
            warnings.push(format!(
                "{at}: native_histogram_bucket_factor and native_histogram_max_buckets have no effect: the adapter exposes classic histogram buckets (Prometheus text and OpenMetrics text carry no native histograms)"
            ));
        }
    }
}

impl Mapper {
    /// No rules: every name is escaped; timers become histograms with the default buckets.
    pub fn empty() -> Self {
        Self::parse("").expect("the empty mapping file")
    }

    /// Parse a mapping file's YAML. Errors name the rule (by index and match) and the field.
    pub fn parse(yaml: &str) -> Result<Self, MappingError> {
        let f: File = serde_norway::from_str::<Option<File>>(yaml)
            .map_err(MappingError::Yaml)?
            .unwrap_or_default();
        let mut warnings = Vec::new();
        let d = &f.defaults;
        let dat = "defaults";
        let default_hist = observer_kind(dat, "observer_type", &d.observer_type)?
            .or(observer_kind(dat, "timer_type", &d.timer_type)?);
        let default_buckets: Arc<[f64]> =
            match level_buckets(dat, &d.histogram_options, &d.buckets)? {
                Some(b) => b.into(),
                None => DEFAULT_BUCKETS.to_vec().into(),
            };
        native_warning(dat, &d.histogram_options, &mut warnings);
        let default_quantiles = level_quantiles(dat, &d.summary_options, &d.quantiles)?
            .unwrap_or_else(|| DEFAULT_QUANTILES.to_vec());
        let ds = d.summary_options.clone().unwrap_or_default();
        let default_max_age =
            duration(dat, "summary_options.max_age", &ds.max_age)?.filter(|d| !d.is_zero());
        let default_summary = SummaryOpts {
            quantiles: default_quantiles,
            max_age: default_max_age.unwrap_or(DEFAULT_MAX_AGE),
            age_buckets: ds
                .age_buckets
                .filter(|n| *n > 0)
                .unwrap_or(DEFAULT_AGE_BUCKETS),
            buf_cap: ds.buf_cap.filter(|n| *n > 0).unwrap_or(DEFAULT_BUF_CAP),
        };
        // An explicit `ttl: 0` in the defaults means "never expire", overriding --statsd.ttl.
        let default_ttl = duration(dat, "ttl", &d.ttl)?.map(|t| (!t.is_zero()).then_some(t));
        let default_glob = match d.match_type.as_deref() {
            None | Some("") | Some("glob") => true,
            Some("regex") => false,
            Some(o) => {
                return Err(invalid(
                    dat,
                    format!("match_type must be glob or regex, got {o:?}"),
                ))
            }
        };
        let default_summary = Arc::new(default_summary);
        let fallback = Arc::new(Settings {
            observer: if default_hist == Some(false) {
                Observer::Summary(default_summary.clone())
            } else {
                Observer::Histogram(default_buckets.clone())
            },
            ttl: default_ttl,
            help: None,
            scale: None,
            honor_labels: false,
        });

        let mut globs = Vec::new();
        let mut regexes = Vec::new();
        for (i, r) in f.mappings.iter().enumerate() {
            let at = format!("mappings[{i}] (match {:?})", r.pattern);
            let drop = match r.action.as_deref() {
                None | Some("") | Some("map") => false,
                Some("drop") => true,
                Some(o) => {
                    return Err(invalid(
                        &at,
                        format!("action must be map or drop, got {o:?}"),
                    ))
                }
            };
            let name = r.name.clone().unwrap_or_default();
            if !drop && name.is_empty() {
                return Err(invalid(&at, "name is required (unless action: drop)"));
            }
            if !name.is_empty() && !NAME_RE.is_match(&name) {
                return Err(invalid(
                    &at,
                    format!("name {name:?} is not a metric name (letters, digits and _, not starting with a digit; $1 / ${{1}} for captures)"),
                ));
            }
            let glob = match r.match_type.as_deref() {
                None | Some("") => default_glob,
                Some("glob") => true,
                Some("regex") => false,
                Some(o) => {
                    return Err(invalid(
                        &at,
                        format!("match_type must be glob or regex, got {o:?}"),
                    ))
                }
            };
            let metric_type = match r.match_metric_type.as_deref() {
                None | Some("") => None,
                Some("counter") => Some(MType::Counter),
                Some("gauge") => Some(MType::Gauge),
                Some("observer") | Some("timer") => Some(MType::Observer),
                Some(o) => {
                    return Err(invalid(
                        &at,
                        format!("match_metric_type must be counter, gauge or observer, got {o:?}"),
                    ))
                }
            };
            let mut labels = Vec::new();
            for (k, v) in r.labels.iter().flatten() {
                if !valid_label_name(k) {
                    return Err(invalid(&at, format!("invalid label name {k:?}")));
                }
                labels.push((k.clone(), v.text()));
            }
            // Observer settings.
            let hist = observer_kind(&at, "observer_type", &r.observer_type)?
                .or(observer_kind(&at, "timer_type", &r.timer_type)?)
                .or(default_hist)
                .unwrap_or(true);
            native_warning(&at, &r.histogram_options, &mut warnings);
            let buckets = level_buckets(&at, &r.histogram_options, &r.buckets)?;
            let qs = level_quantiles(&at, &r.summary_options, &r.quantiles)?;
            let has_summary_opts = r.summary_options.is_some() || r.quantiles.is_some();
            let has_hist_opts = r.histogram_options.is_some() || r.buckets.is_some();
            let observer = if hist {
                if has_summary_opts {
                    warnings.push(format!(
                        "{at}: summary_options/quantiles are ignored: this rule's observer_type is histogram"
                    ));
                }
                Observer::Histogram(
                    buckets
                        .map(Into::into)
                        .unwrap_or_else(|| default_buckets.clone()),
                )
            } else {
                if has_hist_opts {
                    warnings.push(format!(
                        "{at}: histogram_options/buckets are ignored: this rule's observer_type is summary"
                    ));
                }
                let so = r.summary_options.clone().unwrap_or_default();
                let own = SummaryOpts {
                    quantiles: qs.unwrap_or_else(|| default_summary.quantiles.clone()),
                    max_age: duration(&at, "summary_options.max_age", &so.max_age)?
                        .filter(|d| !d.is_zero())
                        .unwrap_or(default_summary.max_age),
                    age_buckets: so
                        .age_buckets
                        .filter(|n| *n > 0)
                        .unwrap_or(default_summary.age_buckets),
                    buf_cap: so
                        .buf_cap
                        .filter(|n| *n > 0)
                        .unwrap_or(default_summary.buf_cap),
                };
                if own == *default_summary {
                    Observer::Summary(default_summary.clone())
                } else {
                    Observer::Summary(Arc::new(own))
                }
            };
            if let Some(s) = r.scale {
                if !s.is_finite() {
                    return Err(invalid(
                        &at,
                        format!("scale must be a finite number, got {s}"),
                    ));
                }
            }
            let ttl = match duration(&at, "ttl", &r.ttl)?.filter(|d| !d.is_zero()) {
                Some(t) => Some(Some(t)),
                None => default_ttl,
            };
            let settings = Arc::new(Settings {
                observer,
                ttl,
                help: r.help.clone().filter(|h| !h.is_empty()),
                scale: r.scale,
                honor_labels: r.honor_labels,
            });
            if glob {
                if !GLOB_RE.is_match(&r.pattern) {
                    return Err(invalid(
                        &at,
                        "invalid glob: dot-separated components of letters, digits, _ and -, or a whole component *; the first may not start with a digit",
                    ));
                }
                let segs: Vec<Seg> = r
                    .pattern
                    .split('.')
                    .map(|s| {
                        if s == "*" {
                            Seg::Star
                        } else {
                            Seg::Lit(s.to_string())
                        }
                    })
                    .collect();
                let n = segs.iter().filter(|s| **s == Seg::Star).count();
                globs.push(Compiled {
                    matcher: Matcher::Glob {
                        name: glob_template(&name, n),
                        segs,
                    },
                    labels: labels
                        .into_iter()
                        .map(|(k, v)| {
                            let t = glob_template(&v, n);
                            (k, v, t)
                        })
                        .collect(),
                    metric_type,
                    drop,
                    settings,
                });
            } else {
                let re = Regex::new(&r.pattern).map_err(|e| MappingError::Regex {
                    at: at.clone(),
                    pattern: r.pattern.clone(),
                    source: e,
                })?;
                regexes.push(Compiled {
                    matcher: Matcher::Regex { re, name },
                    labels: labels
                        .into_iter()
                        .map(|(k, v)| (k, v, Vec::new()))
                        .collect(),
                    metric_type,
                    drop,
                    settings,
                });
            }
        }
        // Glob rules that can never match (in file order, an earlier rule covers them).
        if !d.glob_disable_ordering {
            let pats: Vec<(usize, &Compiled)> = f
                .mappings
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    r.match_type
                        .as_deref()
                        .map_or(default_glob, |m| m != "regex")
                })
                .map(|(i, _)| i)
                .zip(globs.iter())
                .collect();
            for (j, (jj, b)) in pats.iter().enumerate() {
                let Matcher::Glob { segs: bs, .. } = &b.matcher else {
                    continue;
                };
                if let Some((ii, _)) = pats[..j].iter().find(|(_, a)| {
                    let Matcher::Glob { segs: as_, .. } = &a.matcher else {
                        return false;
                    };
                    a.metric_type.is_none_or(|t| Some(t) == b.metric_type) && covers(as_, bs)
                }) {
                    warnings.push(format!(
                        "mappings[{jj}] (match {:?}) never matches: mappings[{ii}] (match {:?}) comes first and matches everything it does (list specific matches first, or set defaults.glob_disable_ordering)",
                        f.mappings[*jj].pattern, f.mappings[*ii].pattern
                    ));
                }
            }
        }
        Ok(Mapper {
            rules: f.mappings.len(),
            globs,
            regexes,
            unordered: d.glob_disable_ordering,
            fallback,
            cache: Mutex::new(HashMap::new()),
            warnings,
        })
    }

    /// Map a StatsD name. `None`: dropped by a rule, or the rule made an empty name.
    pub fn map(&self, name: &str, kind: Kind) -> Option<Arc<Mapped>> {
        let t = mtype(kind);
        if let Some(slots) = self.cache.lock().unwrap().get(name) {
            if let Slot::Known(hit) = &slots[t as usize] {
                return hit.clone();
            }
        }
        let result = self.decide(name, t).map(Arc::new);
        let mut c = self.cache.lock().unwrap();
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        let slots = c
            .entry(name.into())
            .or_insert_with(|| [Slot::Unknown, Slot::Unknown, Slot::Unknown]);
        slots[t as usize] = Slot::Known(result.clone());
        result
    }

    fn decide(&self, name: &str, t: MType) -> Option<Mapped> {
        let type_ok = |r: &Compiled| r.metric_type.is_none_or(|m| m == t);
        if !self.globs.is_empty() {
            let fields: Vec<&str> = name.split('.').collect();
            let mut caps = Vec::new();
            let mut best: Option<(&Compiled, Vec<&str>)> = None;
            for r in self.globs.iter().filter(|r| type_ok(r)) {
                let Matcher::Glob { segs, .. } = &r.matcher else {
                    continue;
                };
                if !glob_match(segs, &fields, &mut caps) {
                    continue;
                }
                let better = match &best {
                    None => true,
                    Some((b, _)) => {
                        let Matcher::Glob { segs: bs, .. } = &b.matcher else {
                            continue;
                        };
                        self.unordered && more_specific(segs, bs)
                    }
                };
                if better {
                    best = Some((r, caps.clone()));
                    if !self.unordered {
                        break;
                    }
                }
            }
            if let Some((r, caps)) = best {
                if r.drop {
                    return None;
                }
                let Matcher::Glob { name: nt, .. } = &r.matcher else {
                    return None;
                };
                let labels = r
                    .labels
                    .iter()
                    .map(|(k, _, tpl)| (k.clone(), format_glob(tpl, &caps)))
                    .collect();
                return self.finish(format_glob(nt, &caps), labels, r);
            }
        }
        for r in self.regexes.iter().filter(|r| type_ok(r)) {
            let Matcher::Regex { re, name: nt } = &r.matcher else {
                continue;
            };
            let Some(caps) = re.captures(name) else {
                continue;
            };
            if r.drop {
                return None;
            }
            let expand = |t: &str| {
                let mut s = String::new();
                caps.expand(t, &mut s);
                s
            };
            let labels = r
                .labels
                .iter()
                .map(|(k, v, _)| (k.clone(), expand(v)))
                .collect();
            return self.finish(expand(nt), labels, r);
        }
        Some(Mapped {
            name: escape_name(name),
            labels: Vec::new(),
            settings: self.fallback.clone(),
            matched: false,
        })
    }

    fn finish(
        &self,
        name: String,
        mut labels: Vec<(String, String)>,
        r: &Compiled,
    ) -> Option<Mapped> {
        let name = escape_name(&name);
        if name.is_empty() {
            return None;
        }
        labels.sort();
        Some(Mapped {
            name,
            labels,
            settings: r.settings.clone(),
            matched: true,
        })
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

    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }

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
        assert_eq!(d.settings.ttl, Some(Some(Duration::from_secs(60))));
        let r = m
            .map("foo.bar--baz.status.500.count", Kind::Counter)
            .unwrap();
        assert_eq!(r.name, "request_total");
        assert!(r.labels.contains(&("service".into(), "foo_bar".into())));
        assert!(m.map("junk.x", Kind::Gauge).is_none());
        let l = m.map("api.latency", Kind::Timer).unwrap();
        assert_eq!(l.name, "api_latency_seconds");
        assert_eq!(
            l.settings.observer,
            Observer::Histogram(vec![0.1, 1.0].into())
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
        assert!(Mapper::parse("---\n").unwrap().warnings.is_empty());
    }

    #[test]
    fn glob_ordering_and_templates() {
        // File order: the broader rule first shadows the later one (and a warning says so).
        let m = Mapper::parse(
            "mappings:\n- {match: 'a.*.*', name: broad}\n- {match: 'a.*.c', name: narrow}\n",
        )
        .unwrap();
        assert_eq!(m.map("a.b.c", Kind::Counter).unwrap().name, "broad");
        assert!(m.warnings[0].contains("never matches"), "{:?}", m.warnings);
        // Unordered: the most specific wins, left to right, with backtracking.
        let m = Mapper::parse("defaults: {glob_disable_ordering: true}\nmappings:\n- {match: 'a.*.*', name: broad}\n- {match: 'a.*.c', name: narrow}\n- {match: 'a.x.d', name: exact}\n- {match: 'a.x.*', name: x_any, labels: {v: '${1}_foo'}}\n").unwrap();
        assert_eq!(m.map("a.b.c", Kind::Counter).unwrap().name, "narrow");
        assert_eq!(m.map("a.x.d", Kind::Counter).unwrap().name, "exact");
        let x = m.map("a.x.c", Kind::Counter).unwrap();
        assert_eq!(
            (x.name.as_str(), x.labels[0].1.as_str()),
            ("x_any", "c_foo")
        );
        assert_eq!(m.map("a.b.d", Kind::Counter).unwrap().name, "broad");
        // Templates as statsd_exporter reads them.
        let t = |s: &str, n: usize| format_glob(&glob_template(s, n), &["A", "B"]);
        assert_eq!(t("$1_foo", 2), "");
        assert_eq!(t("${1}_foo", 2), "A_foo");
        assert_eq!(t("$1-$2-$3", 2), "A-B-");
        assert_eq!(t("x$", 2), "x$");
        assert_eq!(t("ünï${2}", 2), "ünïB");
    }

    #[test]
    fn observers_summaries_and_old_names() {
        let m = Mapper::parse(
            "defaults:\n  timer_type: summary\n  quantiles: [{quantile: 0.9, error: 0.01}]\n  ttl: 0\nmappings:\n- {match: 'a.*', name: a, summary_options: {max_age: 30s, age_buckets: 3}}\n- {match: 'b.*', name: b, observer_type: histogram, buckets: [1, 2], histogram_options: {native_histogram_bucket_factor: 1.1}}\n",
        )
        .unwrap();
        let a = m.map("a.x", Kind::Timer).unwrap();
        let Observer::Summary(s) = &a.settings.observer else {
            panic!()
        };
        assert_eq!(s.quantiles, vec![(0.9, 0.01)]);
        assert_eq!(
            (s.max_age, s.age_buckets, s.buf_cap),
            (Duration::from_secs(30), 3, 500)
        );
        assert_eq!(
            a.settings.ttl,
            Some(None),
            "ttl: 0 in defaults: never expires"
        );
        let b = m.map("b.x", Kind::Timer).unwrap();
        assert_eq!(
            b.settings.observer,
            Observer::Histogram(vec![1.0, 2.0].into())
        );
        assert!(
            m.warnings.iter().any(|w| w.contains("native_histogram")),
            "{:?}",
            m.warnings
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
            ("mappings:\n- match: 'a*b'\n  name: x\n", "invalid glob"),
            ("mappings:\n- match: a\n  name: 0x\n", "not a metric name"),
            ("mappings: [\n", "line"),
        ] {
            let e = Mapper::parse(yaml)
                .err()
                .map(|e| chain(&e))
                .unwrap_or_default();
            assert!(e.contains(want), "{yaml:?} → {e}");
        }
    }
}
