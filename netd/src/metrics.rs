//! `/metrics` in Prometheus's text format, encoded by the `prometheus` crate. Most
//! figures live where they are counted (the datapaths' eBPF maps and tables, the DNS's
//! atomics, the view) and are read when Prometheus scrapes, into a [`Scrape`]; what only
//! the daemon sees pass by (API requests, reconcile steps) is counted here, in
//! [`record`]. Names and labels follow Prometheus's conventions: `netd_` first, base
//! units (seconds), `_total` on counters, and labels whose values are bounded by the
//! cluster's own objects (services, networks, backends), never by clients.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// What the daemon counts as requests and steps go by.
pub struct Recorder {
    api: IntCounterVec,
    reconcile: HistogramVec,
    reconcile_errors: IntCounterVec,
}

static RECORDER: LazyLock<Recorder> = LazyLock::new(|| Recorder {
    api: IntCounterVec::new(
        Opts::new(
            "netd_api_requests_total",
            "API requests answered, by route (its pattern), method and status code.",
        ),
        &["route", "method", "code"],
    )
    .expect("a valid metric"),
    reconcile: HistogramVec::new(
        HistogramOpts::new(
            "netd_reconcile_duration_seconds",
            "Reconcile steps and how long each took, by scope (a change's, or the whole node's).",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["scope"],
    )
    .expect("a valid metric"),
    reconcile_errors: IntCounterVec::new(
        Opts::new(
            "netd_reconcile_errors_total",
            "Errors reconcile steps reported, by kind (node-level, or one task's).",
        ),
        &["kind"],
    )
    .expect("a valid metric"),
});

/// Counting as things happen.
pub mod record {
    use super::*;

    /// An API request answered with `code`; `route` is the matched pattern
    /// (`/v1/tasks/{id}`), or `unmatched`.
    pub fn api_request(route: &str, method: &str, code: u16) {
        RECORDER
            .api
            .with_label_values(&[route, method, &code.to_string()])
            .inc();
    }

    /// One reconcile step: how long it took, whether it visited the whole node, and
    /// the errors it reported.
    pub fn reconcile_step(took: Duration, whole: bool, node_errors: usize, task_errors: usize) {
        let scope = if whole { "node" } else { "change" };
        RECORDER
            .reconcile
            .with_label_values(&[scope])
            .observe(took.as_secs_f64());
        for (kind, n) in [("node", node_errors), ("task", task_errors)] {
            RECORDER
                .reconcile_errors
                .with_label_values(&[kind])
                .inc_by(n as u64);
        }
    }
}

/// One VIP backend's connection count, as this node's datapath counted them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipBackend {
    pub service: String,
    pub network: String,
    pub vip: Ipv4Addr,
    pub backend: Ipv4Addr,
    pub connections: u64,
}

/// The XDP fast path's counters (absent while it is not loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// Packets by what the program did with them.
    pub packets: Vec<(&'static str, u64)>,
    /// Dropped packets by reason.
    pub drops: Vec<(&'static str, u64)>,
    /// Flows it took (new flows entered into its tables).
    pub flows: u64,
}

/// Everything a scrape shows, read by the daemon just before (see `web`); a plain value,
/// so that the exposition is a pure function of it.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub node: String,
    pub version: &'static str,
    pub datapath: String,
    pub vip_backends: Vec<VipBackend>,
    pub xdp: Option<XdpCounters>,
    /// Published-port flows the kernel path took in the ingress sandbox (None: no
    /// sandbox on this node).
    pub kernel_mesh_flows: Option<u64>,
    pub dns: netd_dns::stats::Snapshot,
    /// Revisions: the view's, its DNS and load-balancer tables', the kernel's (the last
    /// finished reconcile step's), and the newest change the store's watch delivered
    /// (None: a store without a watch, the local one).
    pub state_revision: u64,
    pub tables_revision: u64,
    pub applied_revision: u64,
    pub store_newest_revision: Option<u64>,
    /// Tasks of the cluster by state, endpoints by state (a task's one per network).
    pub tasks: BTreeMap<&'static str, u64>,
    pub endpoints: BTreeMap<&'static str, u64>,
    pub kernel_writes: Vec<(String, u64)>,
}

/// A family being built: name, help, type, samples.
struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(kind);
        Family(f)
    }

    fn labelled(labels: &[(&str, &str)]) -> Metric {
        let mut m = Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        m
    }

    /// A sample of a counter or gauge family.
    fn sample(mut self, labels: &[(&str, &str)], value: f64) -> Family {
        let mut m = Family::labelled(labels);
        if self.0.get_field_type() == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        self.0.mut_metric().push(m);
        self
    }
}

/// The text of `/metrics` for `s`, with what the daemon recorded.
pub fn render(s: &Scrape) -> prometheus::Result<String> {
    let mut families = families(s);
    for c in [
        &RECORDER.api as &dyn Collector,
        &RECORDER.reconcile,
        &RECORDER.reconcile_errors,
    ] {
        families.extend(c.collect());
    }
    // An empty family (no sample yet) is left out: the format has nothing to say of it.
    families.retain(|f| !f.get_metric().is_empty());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    prometheus::TextEncoder::new().encode_to_string(&families)
}

fn families(s: &Scrape) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE};
    let mut out = vec![];
    out.push(
        Family::new(
            "netd_build_info",
            "This netd: its version and node, and the VIP datapath in use (always 1).",
            GAUGE,
        )
        .sample(
            &[
                ("version", s.version),
                ("node", &s.node),
                ("datapath", &s.datapath),
            ],
            1.0,
        )
        .0,
    );

    let mut vips = Family::new(
        "netd_vip_backend_connections_total",
        "Connections (and UDP flows) this node's tasks opened to a VIP, by the backend picked.",
        COUNTER,
    );
    for b in &s.vip_backends {
        vips = vips.sample(
            &[
                ("service", &b.service),
                ("network", &b.network),
                ("vip", &b.vip.to_string()),
                ("backend", &b.backend.to_string()),
            ],
            b.connections as f64,
        );
    }
    out.push(vips.0);

    let mut flows = Family::new(
        "netd_mesh_flows_total",
        "Flows to published ports this node took as an ingress node, by path (XDP fast path, kernel path).",
        COUNTER,
    );
    if let Some(x) = &s.xdp {
        flows = flows.sample(&[("path", "xdp")], x.flows as f64);
        let mut packets = Family::new(
            "netd_xdp_packets_total",
            "Packets the XDP fast path handled, by action.",
            COUNTER,
        );
        for (action, n) in &x.packets {
            packets = packets.sample(&[("action", action)], *n as f64);
        }
        out.push(packets.0);
        let mut drops = Family::new(
            "netd_xdp_drops_total",
            "Packets the XDP fast path dropped, by reason.",
            COUNTER,
        );
        for (reason, n) in &x.drops {
            drops = drops.sample(&[("reason", reason)], *n as f64);
        }
        out.push(drops.0);
    }
    if let Some(n) = s.kernel_mesh_flows {
        flows = flows.sample(&[("path", "kernel")], n as f64);
    }
    out.push(flows.0);

    out.extend(dns_families(&s.dns));

    let revisions = [
        (
            "netd_state_revision",
            "The store revision this node's view holds.",
            s.state_revision,
        ),
        (
            "netd_tables_revision_lag",
            "Revisions the DNS and load-balancer tables are behind the view.",
            s.state_revision.saturating_sub(s.tables_revision),
        ),
        (
            "netd_kernel_revision_lag",
            "Revisions the kernel (the last finished reconcile step) is behind the view.",
            s.state_revision.saturating_sub(s.applied_revision),
        ),
    ];
    for (name, help, v) in revisions {
        out.push(Family::new(name, help, GAUGE).sample(&[], v as f64).0);
    }
    if let Some(newest) = s.store_newest_revision {
        out.push(
            Family::new(
                "netd_store_watch_lag_revisions",
                "Revisions between the newest change the store's watch delivered and the view (a stalled watch shows none: see netd_state_revision across nodes).",
                GAUGE,
            )
            .sample(&[], newest.saturating_sub(s.state_revision) as f64)
            .0,
        );
    }

    let mut tasks = Family::new("netd_tasks", "Tasks of the cluster by state.", GAUGE);
    for (state, n) in &s.tasks {
        tasks = tasks.sample(&[("state", state)], *n as f64);
    }
    out.push(tasks.0);
    let mut eps = Family::new(
        "netd_endpoints",
        "Task endpoints (one per network a task is on) by state: in service, or why not.",
        GAUGE,
    );
    for (state, n) in &s.endpoints {
        eps = eps.sample(&[("state", state)], *n as f64);
    }
    out.push(eps.0);

    let mut writes = Family::new(
        "netd_kernel_writes_total",
        "Changes this netd made to the kernel since it started, by kind.",
        COUNTER,
    );
    for (kind, n) in &s.kernel_writes {
        writes = writes.sample(&[("kind", kind)], *n as f64);
    }
    out.push(writes.0);
    out
}

fn dns_families(d: &netd_dns::stats::Snapshot) -> Vec<MetricFamily> {
    use MetricType::COUNTER;
    let mut queries = Family::new(
        "netd_dns_queries_total",
        "Queries the embedded DNS answered, by type and result (the answer's RCODE; dropped: no answer).",
        COUNTER,
    );
    for (ty, result, n) in &d.queries {
        queries = queries.sample(&[("type", ty), ("result", result)], *n as f64);
    }
    let mut latency = Family::new(
        "netd_dns_query_duration_seconds",
        "Time from a query's arrival to its answer (forwarded names: with the upstream's).",
        MetricType::HISTOGRAM,
    );
    if let Some(count) = d.latency_buckets.last() {
        let mut h = Histogram::default();
        h.set_sample_count(*count);
        h.set_sample_sum(d.latency_sum_seconds);
        h.set_bucket(
            netd_dns::stats::BUCKETS
                .iter()
                .zip(&d.latency_buckets)
                .map(|(bound, n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(*bound);
                    b.set_cumulative_count(*n);
                    b
                })
                .collect(),
        );
        let mut m = Metric::default();
        m.set_histogram(h);
        latency.0.mut_metric().push(m);
    }
    let forwards = Family::new(
        "netd_dns_upstream_forwards_total",
        "Names the embedded DNS had to forward to the node's resolvers (those refused at once as busy included).",
        COUNTER,
    )
    .sample(&[], d.forwards as f64);
    let failures = Family::new(
        "netd_dns_upstream_failures_total",
        "Forwards that got no upstream answer, by reason (busy: refused at once, every slot in use; failed: no usable answer in time).",
        COUNTER,
    )
    .sample(&[("reason", "busy")], d.forward_busy as f64)
    .sample(&[("reason", "failed")], d.forward_failed as f64);
    vec![queries.0, latency.0, forwards.0, failures.0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape() -> Scrape {
        Scrape {
            node: "n1".into(),
            version: "0.1.0",
            datapath: "ebpf".into(),
            vip_backends: vec![VipBackend {
                service: "web".into(),
                network: "front".into(),
                vip: "198.19.0.2".parse().unwrap(),
                backend: "198.19.0.3".parse().unwrap(),
                connections: 7,
            }],
            xdp: Some(XdpCounters {
                packets: vec![("forwarded", 10), ("dropped", 2)],
                drops: vec![("too_big", 1), ("other", 1)],
                flows: 4,
            }),
            kernel_mesh_flows: Some(3),
            state_revision: 50,
            tables_revision: 48,
            applied_revision: 50,
            store_newest_revision: Some(53),
            tasks: [("running", 2), ("draining", 1)].into_iter().collect(),
            endpoints: [("in_service", 2)].into_iter().collect(),
            kernel_writes: vec![("netlink".into(), 12)],
            ..Scrape::default()
        }
    }

    /// The exposition names every figure with its labels, in the text format, and
    /// what the daemon recorded shows up beside the scraped values.
    #[test]
    fn a_scrape_renders_in_the_text_format_with_its_labels() {
        record::api_request("/v1/tasks/{id}", "GET", 404);
        record::reconcile_step(Duration::from_millis(3), false, 0, 1);
        let dns = netd_dns::stats::Stats::default();
        dns.query(
            &[0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1],
            Some(&[0, 1, 0x81, 0x83]),
            Duration::from_micros(30),
        );
        let text = render(&Scrape {
            dns: dns.snapshot(),
            ..scrape()
        })
        .unwrap();
        for line in [
            "# TYPE netd_vip_backend_connections_total counter",
            r#"netd_vip_backend_connections_total{service="web",network="front",vip="198.19.0.2",backend="198.19.0.3"} 7"#,
            r#"netd_mesh_flows_total{path="xdp"} 4"#,
            r#"netd_mesh_flows_total{path="kernel"} 3"#,
            r#"netd_xdp_drops_total{reason="too_big"} 1"#,
            r#"netd_dns_queries_total{type="A",result="nxdomain"} 1"#,
            "# TYPE netd_dns_query_duration_seconds histogram",
            r#"netd_dns_query_duration_seconds_bucket{le="0.000025"} 0"#,
            r#"netd_dns_query_duration_seconds_bucket{le="0.00005"} 1"#,
            r#"netd_dns_query_duration_seconds_bucket{le="+Inf"} 1"#,
            "netd_dns_query_duration_seconds_count 1",
            "netd_tables_revision_lag 2",
            "netd_store_watch_lag_revisions 3",
            r#"netd_tasks{state="draining"} 1"#,
            r#"netd_api_requests_total{code="404",method="GET",route="/v1/tasks/{id}"} 1"#,
            r#"netd_reconcile_errors_total{kind="task"} 1"#,
            r#"netd_reconcile_duration_seconds_count{scope="change"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }

    /// Without an XDP program or a store that tells its newest revision, their
    /// families are absent rather than zero.
    #[test]
    fn what_is_not_there_is_not_shown() {
        let text = render(&Scrape {
            xdp: None,
            store_newest_revision: None,
            ..scrape()
        })
        .unwrap();
        assert!(!text.contains("netd_xdp_"), "{text}");
        assert!(!text.contains("netd_store_watch_lag_revisions"), "{text}");
        assert!(text.contains(r#"netd_mesh_flows_total{path="kernel"} 3"#));
    }
}
