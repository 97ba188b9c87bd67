//! The read-only HTTP listener of `netd daemon --http ADDR` (off by default): what
//! Prometheus scrapes (`/metrics`), a liveness answer (`/healthz`) and the live view of
//! the cluster (`/`: a page, its script and style, built into the binary so that it
//! works without any internet access, and the JSON and event stream it follows under
//! `/view/`). Only GET routes: nothing served here can change the node or the cluster,
//! so it may listen where the API (a Unix socket by default) may not.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::{Daemon, TaskState};
use crate::metrics::{self, Scrape, VipBackend};
use crate::state::State;
use serde_json::{json, Value};

/// The media type of Prometheus's text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX)))
        .route(
            "/view.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route("/view.css", get(|| asset("text/css; charset=utf-8", STYLE)))
        .route("/view/state", get(view_state))
        .route("/view/counters", get(view_counters))
        .route("/view/events", get(view_events))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(d)
}

/// Serves `router(d)` on `addr` (a TCP address) until the process ends.
pub async fn serve(addr: std::net::SocketAddr, d: Arc<Daemon>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--http {addr}: {e}"))?;
    tracing::info!(%addr, "serving /metrics, /healthz and the live view at /");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(d)).await {
            tracing::error!("--http listener: {e}");
        }
    });
    Ok(())
}

const INDEX: &str = include_str!("view_assets/index.html");
const SCRIPT: &str = include_str!("view_assets/view.js");
const STYLE: &str = include_str!("view_assets/view.css");

async fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// What the view draws: nodes, services (VIPs, published ports, backends) and tasks
/// (node, state, health, addresses), from the node's view of the state.
async fn view_state(AxState(d): AxState<Arc<Daemon>>) -> axum::Json<Value> {
    let st = d.view.state();
    let report = d.reconciler.last_report();
    let nodes: Vec<Value> = st
        .nodes
        .values()
        .map(|n| json!({"name": n.name, "address": n.address, "ready": st.node_alive(&n.name)}))
        .collect();
    let services: Vec<Value> = st
        .services
        .values()
        .map(|s| {
            let tasks: Vec<&crate::model::Task> = st.tasks_of(&s.name).collect();
            let mut tasks = tasks;
            tasks.sort_by(|a, b| a.name.cmp(&b.name));
            let backends: Vec<Value> = tasks
                .iter()
                .flat_map(|t| {
                    t.endpoints
                        .iter()
                        .filter(|e| s.vips.contains_key(&e.network))
                        .map(|e| json!({"task": t.name, "address": e.ip}))
                })
                .collect();
            let publish: Vec<String> = s
                .publish
                .iter()
                .map(|p| {
                    let host = matches!(p.mode, crate::model::PublishMode::Host);
                    let mode = if host { ",host" } else { "" };
                    format!("{}:{}/{}{mode}", p.published, p.target, p.protocol.as_str())
                })
                .collect();
            json!({
                "name": s.name,
                "vips": s.vips.iter().map(|(n, v)| json!({"network": n, "vip": v})).collect::<Vec<_>>(),
                "publish": publish,
                "tasks": tasks.iter().map(|t| &t.name).collect::<Vec<_>>(),
                "backends": backends,
            })
        })
        .collect();
    let tasks: Vec<Value> = st
        .tasks
        .values()
        .map(|t| {
            let addresses: Vec<String> = t
                .endpoints
                .iter()
                .filter(|e| e.network != crate::model::GWBRIDGE)
                .map(|e| e.ip.to_string())
                .collect();
            json!({
                "id": t.id,
                "name": t.name,
                "service": t.service,
                "node": t.node,
                "state": TaskState::of(&d.node, &st, &report, t).label(),
                "health": crate::api::health_text(&st, t),
                "addresses": addresses,
            })
        })
        .collect();
    axum::Json(json!({
        "node": d.node,
        "revision": st.revision,
        "nodes": nodes,
        "services": services,
        "tasks": tasks,
    }))
}

/// This node's datapath's connection counts, per VIP and backend.
async fn view_counters(AxState(d): AxState<Arc<Daemon>>) -> axum::Json<Value> {
    axum::Json(json!(d.datapath.counters()))
}

/// The cluster's events as server-sent events (what a browser's `EventSource` reads),
/// from now on; a client that fell behind gets a message that makes it read the state
/// again.
async fn view_events(AxState(d): AxState<Arc<Daemon>>) -> Response {
    let Ok((_, feed)) = d
        .events
        .since(u64::MAX - 1, &crate::events::Filter::default())
    else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    // A first comment, so the browser knows the stream is open at once.
    let hello = futures::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(
        ": netd events\n\n",
    ))]);
    let live = futures::stream::unfold(feed, |mut feed| async move {
        let data = match feed.recv().await {
            Ok(e) => serde_json::to_string(&e).unwrap_or_default(),
            // Some were missed: any message makes the page read the state again.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => "{\"lagged\":true}".into(),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(Bytes::from(format!("data: {data}\n\n"))), feed))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(futures::StreamExt::chain(hello, live)),
    )
        .into_response()
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
