//! The adapter's series store and its exposition (Prometheus text 0.0.4 and OpenMetrics 1.0).
//!
//! One family per metric name with one type and one set of label names. A sample that would
//! change a family's type or label names, or add a series past `--max-series`, is dropped and
//! counted (and logged once per family): the registry never fails a scrape. Series untouched
//! for their TTL are removed.
//!
//! Summaries keep the observations of a sliding window (`max_age`, in `age_buckets` slices):
//! each slice keeps its observations exactly up to `buf_cap` of them, then a uniform sample of
//! that size, and the quantiles are computed over the live slices at scrape time. `_sum` and
//! `_count` cover all time, as in client_golang.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::mapping::SummaryOpts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamKind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl FamKind {
    fn name(self) -> &'static str {
        match self {
            FamKind::Counter => "counter",
            FamKind::Gauge => "gauge",
            FamKind::Histogram => "histogram",
            FamKind::Summary => "summary",
            FamKind::Untyped => "untyped",
        }
    }
}

/// What a sample does to its series.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    Add(f64),
    Set(f64),
    Observe(f64),
    /// A set member: the series' value is the number of distinct members.
    Member(&'a str),
}

struct Hist {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// One slice of a summary's window.
struct AgeSlice {
    start: Instant,
    /// Observations kept (all of them up to `buf_cap`, then a uniform sample).
    kept: Vec<f64>,
    /// Observations seen in this slice.
    seen: u64,
}

struct Summ {
    slices: VecDeque<AgeSlice>,
    sum: f64,
    count: u64,
    /// xorshift state for the sampling.
    rng: u64,
}

impl Summ {
    fn new() -> Self {
        Summ {
            slices: VecDeque::new(),
            sum: 0.0,
            count: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn observe(&mut self, v: f64, o: &SummaryOpts, now: Instant) {
        let slice = o.max_age / o.age_buckets.max(1);
        while self
            .slices
            .front()
            .is_some_and(|s| now.duration_since(s.start) >= o.max_age)
        {
            self.slices.pop_front();
        }
        if self
            .slices
            .back()
            .is_none_or(|s| now.duration_since(s.start) >= slice)
        {
            self.slices.push_back(AgeSlice {
                start: now,
                kept: Vec::new(),
                seen: 0,
            });
        }
        let cap = o.buf_cap.max(1) as u64;
        let rng = &mut self.rng;
        let s = self.slices.back_mut().expect("a slice was just pushed");
        s.seen += 1;
        if (s.kept.len() as u64) < cap {
            s.kept.push(v);
        } else {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            let j = *rng % s.seen;
            if j < cap {
                s.kept[j as usize] = v;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// The quantiles over the live window (`NaN` when it holds no observation).
    fn quantiles(&self, o: &SummaryOpts, now: Instant) -> Vec<f64> {
        let mut pts: Vec<(f64, f64)> = Vec::new();
        for s in &self.slices {
            if now.duration_since(s.start) >= o.max_age || s.kept.is_empty() {
                continue;
            }
            let w = s.seen as f64 / s.kept.len() as f64;
            pts.extend(s.kept.iter().map(|v| (*v, w)));
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total: f64 = pts.iter().map(|p| p.1).sum();
        o.quantiles
            .iter()
            .map(|(q, _)| {
                if pts.is_empty() {
                    return f64::NAN;
                }
                // The smallest observation whose cumulative weight reaches q of the total.
                let want = q * total;
                let mut cum = 0.0;
                for (v, w) in &pts {
                    cum += w;
                    if cum >= want - 1e-9 {
                        return *v;
                    }
                }
                pts[pts.len() - 1].0
            })
            .collect()
    }
}

struct Series {
    value: f64,
    hist: Option<Box<Hist>>,
    summ: Option<Box<Summ>>,
    members: Option<HashSet<String>>,
    touched: Instant,
    ttl: Option<Duration>,
}

struct Family {
    kind: FamKind,
    help: Option<String>,
    label_names: Vec<String>,
    buckets: Vec<f64>,
    summary: Option<Arc<SummaryOpts>>,
    /// Rendered label set (`a="x",b="y"`) → series.
    series: HashMap<String, Series>,
}

/// The adapter's own counters.
#[derive(Default)]
pub struct Stats {
    pub statsd_packets: AtomicU64,
    pub statsd_lines: AtomicU64,
    pub statsd_malformed: AtomicU64,
    pub statsd_dropped_by_rule: AtomicU64,
    pub type_conflicts: AtomicU64,
    pub label_conflicts: AtomicU64,
    pub cardinality_dropped: AtomicU64,
    pub expired: AtomicU64,
    pub lines_matched: AtomicU64,
    pub prom_malformed: AtomicU64,
    pub config_reloads_ok: AtomicU64,
    pub config_reloads_failed: AtomicU64,
    /// source name → (scrapes ok, scrapes failed)
    pub scrapes: Mutex<BTreeMap<String, (u64, u64)>>,
}

pub type LogFn = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

pub struct Registry {
    fams: Mutex<BTreeMap<String, Family>>,
    total: AtomicU64,
    pub stats: Stats,
    pub max_series: usize,
    pub default_ttl: Option<Duration>,
    warned: Mutex<HashSet<String>>,
    log: LogFn,
}

/// Per-update options from a mapping rule or a source.
#[derive(Clone, Default)]
pub struct Opts<'a> {
    pub buckets: &'a [f64],
    /// A summary family's options (with [`FamKind::Summary`]).
    pub summary: Option<&'a Arc<SummaryOpts>>,
    pub ttl: Option<Duration>,
    pub help: Option<&'a str>,
}

fn escape_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// One sample line: `NAME+SUFFIX{LABELS} VALUE` (no braces without labels).
fn write_sample(out: &mut String, name: &str, suffix: &str, labels: &str, v: f64) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() {
        out.push('{');
        out.push_str(labels);
        out.push('}');
    }
    out.push(' ');
    fmt_value(v, out);
    out.push('\n');
}

/// The start of a sample with one more label: `NAME+SUFFIX{LABELS,KEY="`; the caller writes
/// the label's value and closes it.
fn open_with_label(out: &mut String, name: &str, suffix: &str, labels: &str, key: &str) {
    out.push_str(name);
    out.push_str(suffix);
    out.push('{');
    out.push_str(labels);
    if !labels.is_empty() {
        out.push(',');
    }
    out.push_str(key);
    out.push_str("=\"");
}

fn fmt_value(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{v}");
    }
}

impl Registry {
    pub fn new(max_series: usize, default_ttl: Option<Duration>, log: LogFn) -> Self {
        Registry {
            fams: Mutex::new(BTreeMap::new()),
            total: AtomicU64::new(0),
            stats: Stats::default(),
            max_series,
            default_ttl,
            warned: Mutex::new(HashSet::new()),
            log,
        }
    }

    fn warn_once(&self, key: String, msg: impl FnOnce() -> String) {
        if self.warned.lock().unwrap().insert(key) {
            (self.log)(&format!("metrics-adapter: {}\n", msg()));
        }
    }

    pub fn series_count(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Apply one sample. `labels` need not be sorted; names must be valid.
    pub fn update(&self, name: &str, kind: FamKind, labels: &[(String, String)], op: Op, o: &Opts) {
        let mut fams = self.fams.lock().unwrap();
        self.update_locked(&mut fams, name, kind, labels, op, o);
    }

    /// Apply many samples under one lock (a StatsD datagram, a scrape).
    pub fn batch<R>(&self, f: impl FnOnce(&mut Batch<'_>) -> R) -> R {
        let mut fams = self.fams.lock().unwrap();
        let mut b = Batch {
            reg: self,
            fams: &mut fams,
        };
        f(&mut b)
    }

    fn update_locked(
        &self,
        fams: &mut BTreeMap<String, Family>,
        name: &str,
        kind: FamKind,
        labels: &[(String, String)],
        op: Op,
        o: &Opts,
    ) {
        let mut sorted: Vec<&(String, String)> = labels.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let fam = match fams.get_mut(name) {
            Some(f) => f,
            None => {
                if self.total.load(Ordering::Relaxed) as usize >= self.max_series {
                    self.stats
                        .cardinality_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    self.warn_once(format!("card:{name}"), || {
                        format!(
                            "series limit (--max-series {}) reached: dropping new series of {name}",
                            self.max_series
                        )
                    });
                    return;
                }
                fams.entry(name.to_string()).or_insert(Family {
                    kind,
                    help: o.help.map(str::to_string),
                    label_names: sorted.iter().map(|(k, _)| k.clone()).collect(),
                    buckets: if kind == FamKind::Histogram {
                        o.buckets.to_vec()
                    } else {
                        Vec::new()
                    },
                    summary: if kind == FamKind::Summary {
                        o.summary.cloned()
                    } else {
                        None
                    },
                    series: HashMap::new(),
                })
            }
        };
        if fam.kind != kind {
            self.stats.type_conflicts.fetch_add(1, Ordering::Relaxed);
            let had = fam.kind;
            self.warn_once(format!("type:{name}"), || {
                format!(
                    "{name} is a {}, dropping samples that would make it a {}",
                    had.name(),
                    kind.name()
                )
            });
            return;
        }
        if fam.label_names.len() != sorted.len()
            || fam
                .label_names
                .iter()
                .zip(&sorted)
                .any(|(a, (b, _))| a != b)
        {
            self.stats.label_conflicts.fetch_add(1, Ordering::Relaxed);
            let had = fam.label_names.join(",");
            let now: Vec<&str> = sorted.iter().map(|(k, _)| k.as_str()).collect();
            self.warn_once(format!("labels:{name}"), || {
                format!(
                    "{name} has labels [{had}], dropping samples with labels [{}]",
                    now.join(",")
                )
            });
            return;
        }
        let mut key = String::with_capacity(32);
        for (i, (k, v)) in sorted.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            key.push_str(k);
            key.push_str("=\"");
            escape_value(v, &mut key);
            key.push('"');
        }
        let now = Instant::now();
        let ttl = o.ttl.or(self.default_ttl);
        let s = match fam.series.get_mut(&key) {
            Some(s) => s,
            None => {
                if self.total.load(Ordering::Relaxed) as usize >= self.max_series {
                    self.stats
                        .cardinality_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    self.warn_once(format!("card:{name}"), || {
                        format!(
                            "series limit (--max-series {}) reached: dropping new series of {name}",
                            self.max_series
                        )
                    });
                    return;
                }
                self.total.fetch_add(1, Ordering::Relaxed);
                fam.series.entry(key).or_insert(Series {
                    value: 0.0,
                    hist: (kind == FamKind::Histogram).then(|| {
                        Box::new(Hist {
                            counts: vec![0; fam.buckets.len()],
                            sum: 0.0,
                            count: 0,
                        })
                    }),
                    summ: (kind == FamKind::Summary).then(|| Box::new(Summ::new())),
                    members: None,
                    touched: now,
                    ttl,
                })
            }
        };
        s.touched = now;
        s.ttl = ttl;
        match op {
            Op::Add(v) => s.value += v,
            Op::Set(v) => s.value = v,
            Op::Observe(v) => {
                if let Some(h) = s.hist.as_mut() {
                    if let Some(i) = fam.buckets.iter().position(|b| v <= *b) {
                        h.counts[i] += 1;
                    }
                    h.sum += v;
                    h.count += 1;
                } else if let (Some(sm), Some(so)) = (s.summ.as_mut(), fam.summary.as_ref()) {
                    sm.observe(v, so, now);
                }
            }
            Op::Member(m) => {
                let set = s.members.get_or_insert_with(Default::default);
                if set.len() < 100_000 {
                    set.insert(m.to_string());
                }
                s.value = set.len() as f64;
            }
        }
    }

    /// Remove series not updated within their TTL.
    pub fn expire(&self) {
        let now = Instant::now();
        let mut fams = self.fams.lock().unwrap();
        let mut removed = 0u64;
        for f in fams.values_mut() {
            f.series.retain(|_, s| {
                let keep = s.ttl.is_none_or(|t| now.duration_since(s.touched) < t);
                if !keep {
                    removed += 1;
                }
                keep
            });
        }
        fams.retain(|_, f| !f.series.is_empty());
        if removed > 0 {
            self.total.fetch_sub(removed, Ordering::Relaxed);
            self.stats.expired.fetch_add(removed, Ordering::Relaxed);
        }
    }

    /// The latest value of every series: (name, labels rendered, value). Histograms give their
    /// count and sum as `name_count`/`name_sum`.
    pub fn snapshot(&self) -> Vec<(String, String, f64)> {
        let fams = self.fams.lock().unwrap();
        let mut out = Vec::new();
        for (name, f) in fams.iter() {
            for (labels, s) in &f.series {
                let count_sum = match (&s.hist, &s.summ) {
                    (Some(h), _) => Some((h.count, h.sum)),
                    (_, Some(sm)) => Some((sm.count, sm.sum)),
                    _ => None,
                };
                match count_sum {
                    Some((count, sum)) => {
                        out.push((format!("{name}_count"), labels.clone(), count as f64));
                        out.push((format!("{name}_sum"), labels.clone(), sum));
                    }
                    None => out.push((name.clone(), labels.clone(), s.value)),
                }
            }
        }
        out
    }

    /// Exposition: Prometheus text (0.0.4), or OpenMetrics 1.0 with `openmetrics`.
    pub fn render(&self, openmetrics: bool) -> String {
        let fams = self.fams.lock().unwrap();
        let now = Instant::now();
        let mut out =
            String::with_capacity(64 * (self.total.load(Ordering::Relaxed) as usize + 64));
        for (name, f) in fams.iter() {
            // OpenMetrics: a counter family is named without `_total`, its samples with it.
            let (fam_name, sample_name) = if openmetrics && f.kind == FamKind::Counter {
                let base = name.strip_suffix("_total").unwrap_or(name);
                (base.to_string(), format!("{base}_total"))
            } else {
                (name.clone(), name.clone())
            };
            if let Some(h) = &f.help {
                out.push_str("# HELP ");
                out.push_str(&fam_name);
                out.push(' ');
                out.push_str(&h.replace('\\', "\\\\").replace('\n', "\\n"));
                out.push('\n');
            }
            let kind = if openmetrics && f.kind == FamKind::Untyped {
                "unknown"
            } else {
                f.kind.name()
            };
            let _ = writeln!(out, "# TYPE {fam_name} {kind}");
            let mut keys: Vec<&String> = f.series.keys().collect();
            keys.sort();
            for k in keys {
                let s = &f.series[k];
                if let (Some(sm), Some(so)) = (&s.summ, &f.summary) {
                    for ((q, _), v) in so.quantiles.iter().zip(sm.quantiles(so, now)) {
                        open_with_label(&mut out, name, "", k, "quantile");
                        fmt_value(*q, &mut out);
                        out.push_str("\"} ");
                        fmt_value(v, &mut out);
                        out.push('\n');
                    }
                    write_sample(&mut out, name, "_sum", k, sm.sum);
                    write_sample(&mut out, name, "_count", k, sm.count as f64);
                    continue;
                }
                match &s.hist {
                    Some(h) => {
                        let mut cum = 0;
                        for (i, b) in f.buckets.iter().enumerate() {
                            cum += h.counts[i];
                            open_with_label(&mut out, name, "_bucket", k, "le");
                            fmt_value(*b, &mut out);
                            let _ = writeln!(out, "\"}} {cum}");
                        }
                        open_with_label(&mut out, name, "_bucket", k, "le");
                        let _ = writeln!(out, "+Inf\"}} {}", h.count);
                        write_sample(&mut out, name, "_sum", k, h.sum);
                        write_sample(&mut out, name, "_count", k, h.count as f64);
                    }
                    None => write_sample(&mut out, &sample_name, "", k, s.value),
                }
            }
        }
        drop(fams);
        self.render_own(&mut out, openmetrics);
        if openmetrics {
            out.push_str("# EOF\n");
        }
        out
    }

    fn render_own(&self, out: &mut String, om: bool) {
        let st = &self.stats;
        let c = |out: &mut String, name: &str, help: &str, v: u64| {
            let (fam, sample) = if om {
                (
                    name.strip_suffix("_total").unwrap_or(name).to_string(),
                    name.to_string(),
                )
            } else {
                (name.to_string(), name.to_string())
            };
            let _ = writeln!(
                out,
                "# HELP {fam} {help}\n# TYPE {fam} counter\n{sample} {v}"
            );
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters: [(&str, &str, &AtomicU64); 10] = [
            (
                "kapsel_adapter_statsd_packets_total",
                "StatsD datagrams received.",
                &st.statsd_packets,
            ),
            (
                "kapsel_adapter_statsd_lines_total",
                "StatsD lines parsed.",
                &st.statsd_lines,
            ),
            (
                "kapsel_adapter_statsd_malformed_lines_total",
                "StatsD lines that did not parse (dropped).",
                &st.statsd_malformed,
            ),
            (
                "kapsel_adapter_statsd_dropped_by_rule_total",
                "StatsD samples dropped by an action: drop rule.",
                &st.statsd_dropped_by_rule,
            ),
            (
                "kapsel_adapter_type_conflicts_total",
                "Samples dropped because their family has another type.",
                &st.type_conflicts,
            ),
            (
                "kapsel_adapter_label_conflicts_total",
                "Samples dropped because their family has other label names.",
                &st.label_conflicts,
            ),
            (
                "kapsel_adapter_cardinality_dropped_total",
                "Samples dropped at the --max-series limit.",
                &st.cardinality_dropped,
            ),
            (
                "kapsel_adapter_series_expired_total",
                "Series removed after their TTL.",
                &st.expired,
            ),
            (
                "kapsel_adapter_prometheus_malformed_lines_total",
                "Lines of scraped Prometheus text that did not parse (skipped).",
                &st.prom_malformed,
            ),
            (
                "kapsel_adapter_line_matches_total",
                "Lines of text sources that matched a rule.",
                &st.lines_matched,
            ),
        ];
        for (name, help, v) in counters {
            c(out, name, help, l(v));
        }
        let _ = writeln!(out, "# HELP kapsel_adapter_config_reloads_total Configuration reloads by result.\n# TYPE kapsel_adapter_config_reloads{} counter", if om { "" } else { "_total" });
        let _ = writeln!(
            out,
            "kapsel_adapter_config_reloads_total{{result=\"success\"}} {}",
            l(&st.config_reloads_ok)
        );
        let _ = writeln!(
            out,
            "kapsel_adapter_config_reloads_total{{result=\"failure\"}} {}",
            l(&st.config_reloads_failed)
        );
        let _ = writeln!(out, "# HELP kapsel_adapter_scrapes_total Pulls of JSON, Prometheus and file sources by result.\n# TYPE kapsel_adapter_scrapes{} counter", if om { "" } else { "_total" });
        for (src, (ok, bad)) in st.scrapes.lock().unwrap().iter() {
            let mut s = String::new();
            escape_value(src, &mut s);
            let _ = writeln!(
                out,
                "kapsel_adapter_scrapes_total{{source=\"{s}\",result=\"success\"}} {ok}"
            );
            let _ = writeln!(
                out,
                "kapsel_adapter_scrapes_total{{source=\"{s}\",result=\"failure\"}} {bad}"
            );
        }
        let _ = writeln!(out, "# HELP kapsel_adapter_series Series held.\n# TYPE kapsel_adapter_series gauge\nkapsel_adapter_series {}", self.series_count());
    }

    pub fn scrape_result(&self, source: &str, ok: bool) {
        let mut m = self.stats.scrapes.lock().unwrap();
        let e = m.entry(source.to_string()).or_default();
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
}

/// Updates under one lock.
pub struct Batch<'r> {
    reg: &'r Registry,
    fams: &'r mut BTreeMap<String, Family>,
}

impl Batch<'_> {
    pub fn update(
        &mut self,
        name: &str,
        kind: FamKind,
        labels: &[(String, String)],
        op: Op,
        o: &Opts,
    ) {
        self.reg.update_locked(self.fams, name, kind, labels, op, o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn reg(max: usize) -> Registry {
        Registry::new(max, None, Arc::new(|_: &str| {}))
    }

    #[test]
    fn renders_both_formats_and_counts_conflicts() {
        let r = reg(10);
        let l = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        r.update(
            "hits_total",
            FamKind::Counter,
            &l("route", "/a\"b"),
            Op::Add(2.0),
            &Opts::default(),
        );
        r.update(
            "hits_total",
            FamKind::Counter,
            &l("route", "/a\"b"),
            Op::Add(1.0),
            &Opts::default(),
        );
        r.update(
            "hits_total",
            FamKind::Gauge,
            &l("route", "/a"),
            Op::Set(1.0),
            &Opts::default(),
        );
        r.update(
            "hits_total",
            FamKind::Counter,
            &l("path", "/a"),
            Op::Add(1.0),
            &Opts::default(),
        );
        let b = [0.1, 1.0];
        let o = Opts {
            buckets: &b,
            ..Default::default()
        };
        r.update("lat_seconds", FamKind::Histogram, &[], Op::Observe(0.5), &o);
        r.update("lat_seconds", FamKind::Histogram, &[], Op::Observe(5.0), &o);
        let t = r.render(false);
        assert!(
            t.contains("# TYPE hits_total counter\nhits_total{route=\"/a\\\"b\"} 3\n"),
            "{t}"
        );
        assert!(t.contains("lat_seconds_bucket{le=\"0.1\"} 0\nlat_seconds_bucket{le=\"1\"} 1\nlat_seconds_bucket{le=\"+Inf\"} 2\nlat_seconds_sum 5.5\nlat_seconds_count 2\n"), "{t}");
        assert!(t.contains("kapsel_adapter_type_conflicts_total 1"));
        assert!(t.contains("kapsel_adapter_label_conflicts_total 1"));
        let om = r.render(true);
        assert!(
            om.contains("# TYPE hits counter\nhits_total{route=\"/a\\\"b\"} 3\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"));
        // Cardinality.
        let r = reg(2);
        for i in 0..5 {
            r.update(
                "g",
                FamKind::Gauge,
                &l("i", &i.to_string()),
                Op::Set(1.0),
                &Opts::default(),
            );
        }
        assert_eq!(r.series_count(), 2);
        assert_eq!(r.stats.cardinality_dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn summaries_give_quantiles_over_their_window() {
        let r = reg(10);
        let so = Arc::new(SummaryOpts {
            quantiles: vec![(0.5, 0.05), (0.9, 0.01), (0.99, 0.001)],
            max_age: Duration::from_secs(600),
            age_buckets: 5,
            buf_cap: 50,
        });
        let o = Opts {
            summary: Some(&so),
            ..Default::default()
        };
        let l = vec![("route".to_string(), "/a".to_string())];
        for v in 1..=100 {
            r.update("lat", FamKind::Summary, &l, Op::Observe(v as f64), &o);
        }
        let t = r.render(false);
        assert!(t.contains("# TYPE lat summary\n"), "{t}");
        let q = |q: &str| -> f64 {
            let p = format!("lat{{route=\"/a\",quantile=\"{q}\"}} ");
            t.lines()
                .find_map(|l| l.strip_prefix(&p))
                .unwrap_or_else(|| panic!("{p} in {t}"))
                .parse()
                .unwrap()
        };
        // 100 observations, 50 kept (a uniform sample): within a few ranks.
        assert!((40.0..=60.0).contains(&q("0.5")), "{t}");
        assert!((80.0..=100.0).contains(&q("0.9")), "{t}");
        assert!(
            t.contains("lat_sum{route=\"/a\"} 5050\nlat_count{route=\"/a\"} 100\n"),
            "{t}"
        );
        // Exact below buf_cap, and an empty window is NaN.
        let r = reg(10);
        let so = Arc::new(SummaryOpts {
            quantiles: vec![(0.5, 0.05)],
            max_age: Duration::from_millis(30),
            age_buckets: 3,
            buf_cap: 500,
        });
        let o = Opts {
            summary: Some(&so),
            ..Default::default()
        };
        for v in [3.0, 1.0, 2.0] {
            r.update("s", FamKind::Summary, &[], Op::Observe(v), &o);
        }
        assert!(r.render(false).contains("s{quantile=\"0.5\"} 2\n"));
        std::thread::sleep(Duration::from_millis(40));
        let t = r.render(false);
        assert!(
            t.contains("s{quantile=\"0.5\"} NaN\ns_sum 6\ns_count 3\n"),
            "{t}"
        );
    }

    #[test]
    fn series_expire_after_their_ttl() {
        let r = reg(10);
        let o = Opts {
            ttl: Some(Duration::from_millis(1)),
            ..Default::default()
        };
        r.update("g", FamKind::Gauge, &[], Op::Set(1.0), &o);
        r.update("keep", FamKind::Gauge, &[], Op::Set(1.0), &Opts::default());
        std::thread::sleep(Duration::from_millis(5));
        r.expire();
        let t = r.render(false);
        assert!(!t.contains("\ng 1"));
        assert!(t.contains("keep 1"));
        assert_eq!(r.series_count(), 1);
    }
}
