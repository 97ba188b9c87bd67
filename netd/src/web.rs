//! The read-only HTTP listener of `netd daemon --http ADDR` (off by default): what
//! Prometheus scrapes (`/metrics`) and a liveness answer (`/healthz`). Only GET routes:
//! nothing served here can change the node or the cluster, so it may listen where the
//! API (a Unix socket by default) may not.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::extract::State as AxState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::{Daemon, TaskState};
use crate::metrics::{self, Scrape, VipBackend};
use crate::state::State;

/// The media type of Prometheus's text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(d)
}

/// Serves `router(d)` on `addr` (a TCP address) until the process ends.
pub async fn serve(addr: std::net::SocketAddr, d: Arc<Daemon>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--http {addr}: {e}"))?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(d)).await {
            tracing::error!("--http listener: {e}");
        }
    });
    Ok(())
}

/// 200 while the daemon serves and its view follows the store; 503 with the reason
/// when the view holds a store it refused (see `identity`).
async fn healthz(AxState(d): AxState<Arc<Daemon>>) -> Response {
    match d.view.refused() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn serve_metrics(AxState(d): AxState<Arc<Daemon>>) -> Response {
    let scrape = gather(&d).await;
    match metrics::render(&scrape) {
        Ok(text) => ([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encode metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// Reads every figure `/metrics` shows: counters the datapaths and the DNS keep, the
/// view's state and revisions. Costs one walk of the services (to name each VIP) and of
/// the tasks, and one `nft` read in the ingress sandbox; nothing on the packet path.
async fn gather(d: &Daemon) -> Scrape {
    let st = d.view.state();
    let report = d.reconciler.last_report();
    let (tasks, endpoints) = states(&d.node, &st, &report);
    Scrape {
        node: d.node.clone(),
        version: env!("CARGO_PKG_VERSION"),
        datapath: d.datapath.status().active.to_string(),
        vip_backends: vip_backends(&st, d.datapath.counters()),
        xdp: d.reconciler.xdp_metrics(),
        kernel_mesh_flows: d.reconciler.kernel_mesh_flows().await,
        dns: d.dns.stats(),
        state_revision: st.revision,
        tables_revision: *d.followed.borrow(),
        applied_revision: *d.reconciler.applied().borrow(),
        store_newest_revision: d.store.delivered_revision(),
        tasks,
        endpoints,
        kernel_writes: crate::writes::snapshot()
            .into_iter()
            .map(|(k, v)| (k, v.as_u64().unwrap_or(0)))
            .collect(),
    }
}

/// The datapath's connection counts, each named by its VIP's service and network.
fn vip_backends(st: &State, counters: crate::datapath::Counters) -> Vec<VipBackend> {
    let named: HashMap<Ipv4Addr, (&str, &str)> = st
        .services
        .values()
        .flat_map(|s| {
            s.vips
                .iter()
                .map(move |(net, vip)| (*vip, (s.name.as_str(), net.as_str())))
        })
        .collect();
    let mut out = vec![];
    for (vip, backends) in counters {
        let Some((service, network)) = named.get(&vip) else {
            continue; // a VIP removed since it was counted
        };
        for (backend, connections) in backends {
            out.push(VipBackend {
                service: service.to_string(),
                network: network.to_string(),
                vip,
                backend,
                connections,
            });
        }
    }
    out
}

type Counts = BTreeMap<&'static str, u64>;

/// Tasks by state, and endpoints by whether they take new connections (and if not,
/// why): what `task ls` shows, counted.
fn states(node: &str, st: &State, report: &crate::reconcile::Report) -> (Counts, Counts) {
    let (mut tasks, mut endpoints) = (Counts::new(), Counts::new());
    for t in st.tasks.values() {
        *tasks
            .entry(TaskState::of(node, st, report, t).label())
            .or_insert(0) += 1;
        let why = if st.in_service(t) {
            "in_service"
        } else if !st.node_alive(&t.node) || !st.task_up(&t.id) {
            "down"
        } else if t.draining.is_some() {
            "draining"
        } else if st.task_health.contains_key(&t.id) {
            "unhealthy"
        } else {
            "starting"
        };
        *endpoints.entry(why).or_insert(0) += t.endpoints.len() as u64;
    }
    (tasks, endpoints)
}
