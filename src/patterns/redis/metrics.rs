//! The ambassador's own counters and their Prometheus text form (`--metrics-listen`, `/metrics`).
//! All counters are relaxed atomics bumped once per pipelined batch, not per command.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::topology::Topology;

/// Upper bounds (seconds) of the round-trip histogram.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Per-upstream counters.
#[derive(Default)]
pub struct UpStats {
    pub commands: AtomicU64,
    /// Of `commands`, the reads this server answered as a replica.
    pub replica_reads: AtomicU64,
    /// Failed TLS handshakes (certificate not trusted, wrong name, client certificate refused).
    pub tls_errors: AtomicU64,
    /// Error replies the upstream sent (passed through verbatim).
    pub error_replies: AtomicU64,
    /// Errors the ambassador answered for it (unreachable, connection lost).
    pub failures: AtomicU64,
    /// Reads retried on the master after this replica's connection broke.
    pub retried: AtomicU64,
    pub connects: AtomicU64,
    pub pool_reused: AtomicU64,
    pub latency: Histogram,
}

/// Ambassador-wide counters.
#[derive(Default)]
pub struct Metrics {
    pub clients_active: AtomicU64,
    pub clients_total: AtomicU64,
    pub clients_rejected: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub refused_commands: AtomicU64,
    pub reads_on_master: AtomicU64,
    pub clients_output_limit: AtomicU64,
    /// Transactions (`MULTI`/`WATCH`) the master changed under, answered with `EXECABORT`.
    pub transactions_broken: AtomicU64,
}

impl Metrics {
    pub fn render(&self, topo: &Topology) -> String {
        let mut o = String::with_capacity(4096);
        let view = topo.view();
        let health = topo.health.lock().unwrap().clone();
        let g = |o: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            &mut o,
            "kapsel_ambassador_clients",
            "Client connections open.",
            "gauge",
            self.clients_active.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "kapsel_ambassador_clients_accepted_total",
            "Client connections accepted.",
            "counter",
            self.clients_total.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "kapsel_ambassador_clients_rejected_total",
            "Client connections refused past --max-clients.",
            "counter",
            self.clients_rejected.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "kapsel_ambassador_protocol_errors_total",
            "Clients disconnected for malformed RESP.",
            "counter",
            self.protocol_errors.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "kapsel_ambassador_refused_commands_total",
            "Commands the ambassador refused (CLIENT REPLY).",
            "counter",
            self.refused_commands.load(Ordering::Relaxed),
        );
        g(&mut o, "kapsel_ambassador_reads_on_master_total", "Read batches sent to the master (no healthy replica, a transaction, WATCH or read-your-writes).", "counter", self.reads_on_master.load(Ordering::Relaxed));
        g(
            &mut o,
            "kapsel_ambassador_clients_output_limit_total",
            "Clients disconnected for not reading their replies (--max-client-output-bytes).",
            "counter",
            self.clients_output_limit.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "kapsel_ambassador_transactions_broken_total",
            "Transactions (MULTI/WATCH) the master changed under; their EXEC got -EXECABORT.",
            "counter",
            self.transactions_broken.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "kapsel_ambassador_failovers_total",
            "Master changes followed.",
            "counter",
            topo.failovers.load(Ordering::Relaxed),
        );
        let ups = topo.all_upstreams();
        let role = |addr: &str| {
            if view.master.addr == addr {
                "master"
            } else if view.replicas.iter().any(|r| r.addr == addr) {
                "replica"
            } else {
                "unused"
            }
        };
        let _ = writeln!(o, "# HELP kapsel_ambassador_upstream_up Role of each upstream now (1 for its current role).\n# TYPE kapsel_ambassador_upstream_up gauge");
        for u in &ups {
            if u.addr.is_empty() {
                continue;
            }
            let _ = writeln!(
                o,
                "kapsel_ambassador_upstream_up{{upstream=\"{}\",role=\"{}\"}} 1",
                u.addr,
                role(&u.addr)
            );
        }
        let _ = writeln!(o, "# HELP kapsel_ambassador_replica_healthy Replica health from INFO replication.\n# TYPE kapsel_ambassador_replica_healthy gauge");
        for h in &health {
            let _ = writeln!(
                o,
                "kapsel_ambassador_replica_healthy{{upstream=\"{}\"}} {}",
                h.addr,
                u8::from(h.healthy)
            );
        }
        type Field = fn(&UpStats) -> &AtomicU64;
        let counters: [(&str, &str, Field); 7] = [
            (
                "kapsel_ambassador_upstream_tls_errors_total",
                "Failed TLS handshakes with each upstream (untrusted certificate, wrong name, client certificate refused).",
                |s| &s.tls_errors,
            ),
            (
                "kapsel_ambassador_commands_total",
                "Commands routed to each upstream.",
                |s| &s.commands,
            ),
            (
                "kapsel_ambassador_upstream_error_replies_total",
                "Error replies from each upstream, passed through.",
                |s| &s.error_replies,
            ),
            (
                "kapsel_ambassador_upstream_failures_total",
                "Commands answered with an ambassador error (upstream unreachable or lost).",
                |s| &s.failures,
            ),
            (
                "kapsel_ambassador_reads_retried_total",
                "Reads retried on the master after a replica connection broke.",
                |s| &s.retried,
            ),
            (
                "kapsel_ambassador_upstream_connects_total",
                "Connections opened to each upstream.",
                |s| &s.connects,
            ),
            (
                "kapsel_ambassador_pool_reused_total",
                "Idle pooled connections handed to a new client.",
                |s| &s.pool_reused,
            ),
        ];
        for (name, help, f) in counters {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for u in &ups {
                if u.addr.is_empty() {
                    continue;
                }
                let _ = writeln!(
                    o,
                    "{name}{{upstream=\"{}\"}} {}",
                    u.addr,
                    f(&u.stats).load(Ordering::Relaxed)
                );
            }
        }
        let name = "kapsel_ambassador_upstream_requests_total";
        let _ = writeln!(o, "# HELP {name} Commands each upstream served, by the role it served them in (reads spread over replicas show here).\n# TYPE {name} counter");
        for u in &ups {
            if u.addr.is_empty() {
                continue;
            }
            let reads = u.stats.replica_reads.load(Ordering::Relaxed);
            let all = u.stats.commands.load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "{name}{{upstream=\"{}\",role=\"master\"}} {}\n{name}{{upstream=\"{}\",role=\"replica\"}} {reads}",
                u.addr,
                all.saturating_sub(reads),
                u.addr
            );
        }
        let name = "kapsel_ambassador_upstream_outstanding";
        let _ = writeln!(
            o,
            "# HELP {name} Reads sent to each upstream and not yet answered.\n# TYPE {name} gauge"
        );
        for u in &ups {
            if !u.addr.is_empty() {
                let _ = writeln!(
                    o,
                    "{name}{{upstream=\"{}\"}} {}",
                    u.addr,
                    u.outstanding.load(Ordering::Relaxed)
                );
            }
        }
        let name = "kapsel_ambassador_upstream_roundtrip_seconds";
        let _ = writeln!(o, "# HELP {name} Time from sending a pipelined batch to an upstream to its last reply.\n# TYPE {name} histogram");
        for u in &ups {
            if u.addr.is_empty() {
                continue;
            }
            let h = &u.stats.latency;
            let mut cum = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cum += h.counts[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "{name}_bucket{{upstream=\"{}\",le=\"{b}\"}} {cum}",
                    u.addr
                );
            }
            cum += h.counts[BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "{name}_bucket{{upstream=\"{}\",le=\"+Inf\"}} {cum}",
                u.addr
            );
            let _ = writeln!(
                o,
                "{name}_sum{{upstream=\"{}\"}} {}",
                u.addr,
                h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
            );
            let _ = writeln!(o, "{name}_count{{upstream=\"{}\"}} {cum}", u.addr);
        }
        o
    }
}
