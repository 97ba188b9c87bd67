//! The HTTP/JSON API under `/v1/`. A request travels: handler -> `state` (validate and
//! commit to the store) -> `reconcile` (make the kernel match) -> response. The handler
//! waits for the reconcile so that when `task attach` returns, the task's interfaces work.
//! Every error is `{ "error": ..., "code": ... }` with a 4xx status for bad requests, and
//! a rejected request has changed nothing.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::datapath::Datapath;
use crate::model::{Protocol, Task};
use crate::netns;
use crate::reconcile::{Reconciler, Report};
use crate::state::{self, Error, NetworkCreate, Pools, ServiceCreate, State, TaskAttach};
use crate::store::Store;

pub struct Daemon {
    pub store: Arc<dyn Store>,
    /// The node's in-memory view of the desired state: what every read answers from.
    pub view: Arc<crate::view::View>,
    /// The revision this node's DNS and load-balancer tables hold (see `follow`).
    pub followed: tokio::sync::watch::Receiver<u64>,
    pub dns: Arc<crate::dns::Dns>,
    pub node: String,
    pub pools: Pools,
    pub reconciler: Arc<Reconciler>,
    pub datapath: Arc<dyn Datapath>,
    pub api: String,
    /// What changed in the cluster, for `/v1/events`.
    pub events: Arc<crate::events::Events>,
    /// This node's WireGuard for encrypted overlays, or why it has none.
    pub encryption: Result<Arc<crate::wireguard::device::Sealer>, String>,
}

type Ctx = AxState<Arc<Daemon>>;

/// An API error: HTTP status, a stable machine code, and a sentence for the user.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match &e {
            Error::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::InUse(_) => (StatusCode::CONFLICT, "in_use"),
            Error::Exhausted(_) => (StatusCode::CONFLICT, "exhausted"),
            Error::Unsupported(_) => (StatusCode::BAD_REQUEST, "unsupported"),
            Error::Contention => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            // etcd unreachable or busy: try again later.
            Error::Store(s) if s.is_transient() => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            Error::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store"),
            Error::StoreRefused(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_refused"),
            Error::Kernel(_) => (StatusCode::INTERNAL_SERVER_ERROR, "kernel"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.message, "code": self.code })),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Parses a JSON body strictly (unknown fields are errors, via `deny_unknown_fields`).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid request body: {e}"),
        )
    })
}

/// The node's view of the state: a snapshot that already holds every write this node
/// acknowledged (writes wait for their revision to reach the view).
async fn load(d: &Daemon) -> Result<Arc<State>, ApiError> {
    Ok(d.view.state())
}

/// After a write at `revision`: this node's kernel, DNS and load balancer match it (a
/// reconcile step), and every other live node's too (bounded wait), so the caller's next
/// query or connection anywhere in the cluster sees the change. Also the nodes that had
/// not confirmed it when the wait ran out ([`answer`] says so).
async fn settle(
    d: &Daemon,
    revision: u64,
) -> Result<(crate::reconcile::Report, Vec<String>), ApiError> {
    let report = converge_to(d, revision).await?;
    let late = await_others(d, revision).await;
    Ok((report, late))
}

/// Waits (bounded) until every node's DNS, load balancer and kernel applied `revision`
/// (this node's tables, the other live nodes' reports); the nodes that had not by then.
async fn await_others(d: &Daemon, revision: u64) -> Vec<String> {
    let mut late = vec![];
    if !crate::follow::await_local(&d.followed, revision).await {
        tracing::warn!(revision, "this node's DNS and load balancer are late");
        late.push(d.node.clone());
    }
    let others = crate::follow::await_cluster(d.store.as_ref(), &d.node, revision).await;
    if !others.is_empty() {
        tracing::warn!(
            revision,
            nodes = ?others,
            "live nodes did not confirm the change in their tables and kernel in time"
        );
    }
    late.extend(others);
    late
}

/// The answer to a write: `status` with `value`, unless some node had not applied it when
/// the API stopped waiting: then 202 Accepted, and `value` gains `pending` (those nodes;
/// they apply it when they catch up, nothing is lost), so a caller never takes an
/// unconfirmed change for one in force everywhere.
fn answer(status: StatusCode, mut value: Value, late: Vec<String>) -> Response {
    if late.is_empty() {
        return (status, Json(value)).into_response();
    }
    if let Some(o) = value.as_object_mut() {
        o.insert("pending".into(), json!(late));
    }
    (StatusCode::ACCEPTED, Json(value)).into_response()
}

/// The kernel work behind a request failed: a 500 with the reason.
fn kernel_error(e: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "kernel",
        format!("{e:#}"),
    )
}

/// Runs a reconcile step so the kernel matches what was just committed.
/// As [`converge`], for a write committed at `revision`: a step that started after it
/// (the one its change event began) is enough.
async fn converge_to(d: &Daemon, revision: u64) -> Result<crate::reconcile::Report, ApiError> {
    d.reconciler.run_for(revision).await.map_err(kernel_error)
}

async fn converge(d: &Daemon) -> Result<crate::reconcile::Report, ApiError> {
    d.reconciler.run_once().await.map_err(kernel_error)
}

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/events", get(events))
        .route("/v1/nodes", get(nodes))
        .route("/v1/node/rotate-key", axum::routing::post(rotate_key))
        .route("/v1/networks", get(network_ls).post(network_create))
        .route(
            "/v1/networks/{name}",
            get(network_inspect).delete(network_rm),
        )
        .route("/v1/services", get(service_ls).post(service_create))
        .route(
            "/v1/services/{name}",
            get(service_inspect).delete(service_rm),
        )
        .route("/v1/tasks", get(task_ls).post(task_attach))
        .route("/v1/tasks/{id}", get(task_inspect).delete(task_detach))
        .route("/v1/tasks/{id}/check", get(task_check))
        .route(
            "/v1/networks/{name}/reservations",
            axum::routing::post(reserve),
        )
        .route(
            "/v1/networks/{name}/reservations/{ip}",
            axum::routing::delete(release),
        )
        .route("/v1/reservations/{owner}", get(reservation))
        .route("/v1/subnets/free", get(free_subnet))
        .route(
            "/v1/bindings/{frontend}/{id}",
            get(binding_get).put(binding_put).delete(binding_delete),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .layer(axum::middleware::from_fn(read_whole_body))
        .layer(axum::middleware::from_fn(count_request))
        .with_state(d)
}

/// The most a request body may hold (axum's own default for its body extractors).
const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// Reads a request's whole body before its handler runs. A handler that takes no body
/// (`rotate-key`) would otherwise leave bytes that arrived after the head unread, and
/// closing a connection with unread bytes resets it: the client lost the answer of a
/// request that was carried out (seen in CI when the CLI's body came a moment after its
/// head).
async fn read_whole_body(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(bytes) => {
            next.run(axum::extract::Request::from_parts(parts, bytes.into()))
                .await
        }
        Err(e) => {
            let too_large = e
                .into_inner()
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("a request body holds at most {BODY_LIMIT} bytes"),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the request body could not be read to its end",
                )
            }
            .into_response()
        }
    }
}

/// Counts each request for `/metrics` by its route's pattern (not its path: an id in
/// it would make a label per task), its method and its status.
async fn count_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    // A client names the method: only the ones the API knows are labels of their own.
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        _ => "other",
    };
    let resp = next.run(req).await;
    crate::metrics::record::api_request(&route, method, resp.status().as_u16());
    resp
}

/// The cluster's events as JSON lines (chunked), from the kept ones after `since` (if
/// asked) on, for as long as the client stays; `type=` (repeatable) keeps those kinds.
/// A client too slow for the feed gets a last line with an `error` and the revision to
/// ask again from.
async fn events(
    AxState(d): Ctx,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    use crate::events::{Event, Filter, Gap, KINDS};
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", m);
    let (mut since, mut filter) = (None, Filter::default());
    for (k, v) in query {
        match k.as_str() {
            "since" => {
                since = Some(
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("since {v:?} is not a revision")))?,
                )
            }
            "type" if KINDS.contains(&v.as_str()) => filter.kinds.push(v),
            "type" => {
                return Err(bad(format!(
                    "unknown event type {v:?} ({})",
                    KINDS.join(", ")
                )))
            }
            other => {
                return Err(bad(format!(
                    "unknown events parameter {other:?} (since, type)"
                )))
            }
        }
    }
    // Without `since`: only what happens from now on, as `docker events`.
    let from = since.unwrap_or(u64::MAX);
    let (past, feed) = d.events.since(from.min(u64::MAX - 1), &filter).map_err(|Gap::TooOld(oldest)| {
        ApiError::new(
            StatusCode::GONE,
            "too_old",
            format!("the events asked for are no longer kept: ask with since={oldest} or later (0: all that is kept)"),
        )
    })?;
    let line = |e: &Event| -> Result<Bytes, std::convert::Infallible> {
        let mut s = serde_json::to_string(e).unwrap_or_default();
        s.push('\n');
        Ok(Bytes::from(s))
    };
    // The live feed holds only what came after the replay (both were taken under one
    // lock); a node whose view is behind the client's `since` must not tell again
    // what the client has.
    let floor = since.unwrap_or(0);
    let last = past.last().map_or(floor, |e: &Event| e.revision);
    let past: Vec<_> = past.iter().map(line).collect();
    let live = futures::stream::unfold(Some((feed, filter, last)), move |state| async move {
        let (mut feed, filter, last) = state?;
        loop {
            match feed.recv().await {
                Ok(e) if e.revision > floor && filter.admits(&e) => {
                    let last = e.revision;
                    return Some((line(&e), Some((feed, filter, last))));
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Events of one revision may be split: ask again from the one before.
                    let end = json!({
                        "error": "this client fell behind the event feed; ask again with since",
                        "since": last.saturating_sub(1),
                    });
                    return Some((Ok(Bytes::from(format!("{end}\n"))), None));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let body = futures::StreamExt::chain(futures::stream::iter(past), live);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

async fn status(AxState(d): Ctx) -> ApiResult<Value> {
    let report = d.reconciler.last_report();
    let st = d.view.state();
    // This node's address on the ingress network (its ingress sandbox's): the flows it
    // brings to other nodes' tasks are counted there under it (`way_back.by_sandbox`).
    let ingress_address = st
        .ingress()
        .and_then(|net| st.lb_addrs.get(&net.id))
        .and_then(|m| m.get(&d.node).copied());
    Ok(Json(json!({
        "node": d.node,
        "version": env!("CARGO_PKG_VERSION"),
        "store": d.store.describe(),
        // Why the node's view holds its last good state instead of the store's (an
        // emptied, replaced or rolled-back store: see identity.rs); null when it follows.
        "store_refused": d.view.refused(),
        "api": d.api,
        "datapath": d.datapath.status(),
        "routing_mesh": {
            "kernel_path": "nftables DNAT in the node and its ingress sandbox",
            "ingress_address": ingress_address,
            // Who a task sees as its peer (`--mesh-source`): the client itself, or this
            // node's ingress address (snat); on both paths.
            "source": match d.reconciler.config().mesh_source {
                crate::mesh_return::MeshSource::Client => "client",
                crate::mesh_return::MeshSource::Snat => "snat",
            },
            // Whether the ingress network is encrypted (`--ingress-encrypted`): its flows
            // between nodes are sealed, and the XDP path stays off (it would send them
            // in the clear).
            "encrypted": st.ingress().is_some_and(|n| n.encrypted),
            "xdp": d.reconciler.xdp_status(),
            // The eBPF program on published tasks' ports that sends each flow's answers
            // back to the node that took it (flows, counters, removals).
            "way_back": d.reconciler.way_back_status().await,
            // Packets from the gwbridge with a source not of it: the backstop that no
            // client-addressed packet leaves the node unencapsulated (0 unless a fault).
            "foreign_source_dropped": d.reconciler.mesh_foreign_src_dropped().await,
            // Flows (tracked by the kernel path, and the fast path's) removed because their
            // task went away: none is left steering a client to a task that is gone.
            "flows_removed": {
                "kernel": d.reconciler.flows_removed().0,
                "xdp": d.reconciler.flows_removed().1,
            },
        },
        "dns": {
            "address": netd_dns::server::DNS_ADDR.to_string(),
            "config": d.dns.config(),
            "tasks_served": d.dns.listener_count(),
            // Whether a restart keeps the DNS ports open (see fdstore).
            "handover": d.dns.handover_status(),
            "forward_budget_ms": crate::dns::FORWARD_BUDGET.as_millis() as u64,
            // Upstream answers kept for their TTL.
            "forwarded_answers_cached": d.dns.forward_cache_len(),
        },
        "kernel": kernel_facts(),
        "reconcile": {
            "errors": report.errors,
            "task_errors": report.task_errors,
            // Kept open between steps, one per namespace the node works in.
            "netlink_sockets": d.reconciler.netlink_sockets(),
            // What this netd changed in the kernel since it started, by kind (a restart
            // that finds everything right changes nothing).
            "kernel_writes": crate::writes::snapshot(),
            "steps": d.reconciler.steps(),
            "last_step_ms": d.reconciler.last_step().as_secs_f64() * 1000.0,
            // What it visited: the whole node, or what the change touched.
            "last_step_scope": report.scope,
            // Where that step spent its time, part by part.
            "last_step_phases_ms": report
                .phases
                .iter()
                .map(|(name, d)| (name.to_string(), (d.as_secs_f64() * 1000.0).into()))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
        },
        // The store revision this node's view holds, the one its DNS and load balancer
        // hold, and the one its kernel (links, peers, firewall, mesh) holds: a change is
        // in force on this node once both reach its revision.
        "state": {
            "revision": d.view.state().revision,
            "tables_revision": *d.followed.borrow(),
            "kernel_revision": *d.reconciler.applied().borrow(),
        },
        "overlay": {
            // Accepted only from the other live nodes' underlay addresses.
            "vxlan_from_non_members_dropped": d.reconciler.vxlan_foreign_dropped().await,
        },
        // Encrypted overlays: which WireGuard, why, its peers and what it refused.
        "encryption": match &d.encryption {
            Ok(sealer) => serde_json::to_value(sealer.status().await).unwrap_or_default(),
            Err(why) => json!({"implementation": "none", "why": why}),
        },
        "tasks": {
            // New connections from tasks to the node itself or the store, refused.
            "to_node_dropped": d.reconciler.task_to_node_dropped().await,
        },
    })))
}

/// What the kernel offers that later datapaths depend on, as found at run time.
fn kernel_facts() -> Value {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "release": release,
        "btf": std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        "bpffs_mounted": std::fs::read_to_string("/proc/mounts")
            .map(|m| m.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf")))
            .unwrap_or(false),
        "cgroup2": std::path::Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists()
            || std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
    })
}

/// Replaces this node's WireGuard key without dropping traffic (see
/// `wireguard::device::Sealer::rotate`); answers once the other nodes moved to the new
/// key (or 30 s passed).
async fn rotate_key(AxState(d): Ctx) -> ApiResult<Value> {
    let sealer = d.encryption.as_ref().map_err(|why| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_encryption",
            format!("this node runs no WireGuard, so it has no key to rotate: {why}"),
        )
    })?;
    // Its own task: a client that goes away mid-rotation must not cut it short.
    let (sealer, view, node) = (sealer.clone(), d.view.clone(), d.node.clone());
    let rotated = tokio::spawn(async move { sealer.rotate(&view, &node).await })
        .await
        .map_err(|e| kernel_error(anyhow::anyhow!("the key rotation ended: {e}")))?;
    match rotated {
        Ok(r) => Ok(Json(json!(r))),
        // The store's own errors keep their status (etcd away: 503).
        Err(e) => match e.downcast::<state::Error>() {
            Ok(se) => Err(se.into()),
            Err(e) if format!("{e}").contains("already under way") => Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{e:#}"),
            )),
            Err(e) => Err(kernel_error(e)),
        },
    }
}

async fn nodes(AxState(d): Ctx) -> ApiResult<Value> {
    let st = load(&d).await?;
    let nodes: Vec<Value> = st
        .nodes
        .values()
        .map(|n| {
            json!({
                "name": n.name,
                "address": n.address,
                "gwbridge_subnet": n.gwbridge_subnet,
                // Alive while its daemon holds its lease (etcd) or runs (local store).
                // A node whose lease lapsed is down for the cluster, also on itself
                // (where it still serves its own tasks).
                "status": if st.node_alive(&n.name) && !(n.name == d.node && st.own_lease_lapsed) {
                    "ready"
                } else {
                    "down"
                },
                "tasks": st.tasks.values().filter(|t| t.node == n.name).count(),
                // Its WireGuard keys (encrypted overlays): what the others seal for.
                "public_key": n.public_key,
                "next_public_key": n.next_public_key,
            })
        })
        .collect();
    Ok(Json(json!(nodes)))
}

async fn network_ls(AxState(d): Ctx) -> ApiResult<Value> {
    let st = load(&d).await?;
    Ok(Json(json!(st.networks.values().collect::<Vec<_>>())))
}

async fn network_inspect(AxState(d): Ctx, Path(name): Path<String>) -> ApiResult<Value> {
    let st = load(&d).await?;
    let net = st.network(&name)?;
    let mut v = json!(net);
    let tasks: Vec<Value> = st
        .tasks
        .values()
        .flat_map(|t| {
            t.endpoints
                .iter()
                .filter(|e| e.network == name)
                .map(move |e| json!({"task": t.name, "node": t.node, "ip": e.ip, "mac": e.mac}))
        })
        .collect();
    v["tasks"] = json!(tasks);
    Ok(Json(v))
}

async fn network_create(AxState(d): Ctx, bytes: Bytes) -> Result<Response, ApiError> {
    let req: NetworkCreate = body(&bytes)?;
    if let Some(subnet) = req
        .subnet
        .as_deref()
        .and_then(|s| s.parse::<ipnetwork::Ipv4Network>().ok())
    {
        check_not_routed(subnet).await?;
    }
    let net = state::create_network(&d.view, &d.pools, req).await?;
    let (_, late) = settle(&d, net.revision).await?;
    Ok(answer(StatusCode::CREATED, json!(net.value), late))
}

/// A network's subnet must not overlap what this node already routes (its underlay, other
/// hosts' networks): its tasks would shadow them. netd's own links (bridges, gwbridge)
/// are left to the store's own overlap check, which names the network.
async fn check_not_routed(subnet: ipnetwork::Ipv4Network) -> Result<(), ApiError> {
    let routed = netns::with_netlink(&netns::Netns::Home, |h| async move {
        crate::netlink::routed_prefixes(&h).await
    })
    .await
    .map_err(kernel_error)?;
    let ours = |dev: &str| dev.starts_with("nd") || dev == crate::naming::GWBRIDGE_IF;
    if let Some((net, dev)) = routed
        .iter()
        .find(|(net, dev)| !ours(dev) && crate::ipam::overlaps(*net, subnet))
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("subnet {subnet} overlaps {net}, which this node routes via {dev}"),
        ));
    }
    Ok(())
}

async fn network_rm(AxState(d): Ctx, Path(name): Path<String>) -> Result<Response, ApiError> {
    let net = state::remove_network(&d.view, &name).await?;
    let (_, late) = settle(&d, net.revision).await?;
    Ok(answer(StatusCode::OK, json!(net.value), late))
}

async fn service_ls(AxState(d): Ctx) -> ApiResult<Value> {
    let st = load(&d).await?;
    let list: Vec<Value> = st
        .services
        .values()
        .map(|s| {
            let mut v = json!(s);
            v["replicas"] = json!(st.tasks_of(&s.name).count());
            v
        })
        .collect();
    Ok(Json(json!(list)))
}

async fn service_inspect(AxState(d): Ctx, Path(name): Path<String>) -> ApiResult<Value> {
    let st = load(&d).await?;
    let svc = st.service(&name)?;
    let mut v = json!(svc);
    let report = d.reconciler.last_report();
    let tasks: Vec<Value> = st
        .tasks_of(&name)
        .map(|t| task_view(&d, &st, &report, t))
        .collect();
    v["tasks"] = json!(tasks);
    v["load_balancer"] = load_balancer_view(&d, &st, svc);
    Ok(Json(v))
}

/// The service's VIPs as this node's datapath balances them, with its connection
/// counters (each node counts the connections its own tasks open).
fn load_balancer_view(d: &Daemon, st: &State, svc: &crate::model::Service) -> Value {
    let entries = crate::datapath::LbTable::entries_of(st, svc);
    let counters = d.datapath.counters();
    let vips: Vec<Value> = svc
        .vips
        .iter()
        .map(|(network, vip)| {
            let per = counters.get(vip);
            let backends: Vec<Value> = entries
                .iter()
                .find(|e| e.vip == *vip)
                .map(|e| e.backends.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|b| {
                    json!({
                        "address": b,
                        "connections": per.and_then(|p| p.get(b)).copied().unwrap_or(0),
                    })
                })
                .collect();
            json!({
                "network": network,
                "vip": vip,
                "connections": per.map(|p| p.values().sum::<u64>()).unwrap_or(0),
                "backends": backends,
            })
        })
        .collect();
    json!({
        "node": d.node,
        "datapath": d.datapath.status().active,
        "vips": vips,
    })
}

async fn service_create(AxState(d): Ctx, bytes: Bytes) -> Result<Response, ApiError> {
    let req: ServiceCreate = body(&bytes)?;
    // (Reading the node's sockets costs a walk of its socket tables: only for ports.)
    if !req.force && !req.publish.is_empty() {
        crate::node_ports::check(&req.publish, &served_ports(&d))
            .map_err(state::Error::Conflict)?;
    }
    let svc = state::create_service(&d.view, &d.pools, req).await?;
    let (_, late) = settle(&d, svc.revision).await?;
    Ok(answer(StatusCode::CREATED, json!(svc.value), late))
}

/// What this node serves itself: its listening sockets, netd's TCP API, the VXLAN port
/// and the store's endpoints (which may be on this node).
fn served_ports(d: &Daemon) -> std::collections::BTreeSet<(Protocol, u16)> {
    let mut served = crate::node_ports::listening();
    let cfg = d.reconciler.config();
    served.insert((Protocol::Udp, cfg.vxlan_port));
    served.extend(cfg.protected.iter().map(|e| (Protocol::Tcp, e.port())));
    if let Some(port) = d
        .api
        .strip_prefix("tcp:")
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
    {
        served.insert((Protocol::Tcp, port));
    }
    served
}

async fn service_rm(AxState(d): Ctx, Path(name): Path<String>) -> Result<Response, ApiError> {
    let svc = state::remove_service(&d.view, &name).await?;
    let (_, late) = settle(&d, svc.revision).await?;
    Ok(answer(StatusCode::OK, json!(svc.value), late))
}

/// A task as the API shows it: its record plus how its node sees it. For a local task
/// that is `report` (the last reconcile's, read once per request); for a remote one, the
/// status its node published.
/// Where a task stands, as `task ls` shows it and `/metrics` counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    NodeDown,
    Draining,
    /// Attached before its runtime started it: its interfaces wait in the node.
    Waiting,
    /// No node reported it yet.
    Pending,
    Running,
    Error(String),
}

impl TaskState {
    /// `t`'s state: from this node's last step for its own tasks, from the status its
    /// node published for the others.
    pub fn of(node: &str, st: &State, report: &Report, t: &Task) -> TaskState {
        let error = if t.node == node {
            Some(report.task_errors.get(&t.id).cloned())
        } else {
            st.task_status.get(&t.id).map(|s| s.error.clone())
        };
        let waiting = if t.node == node {
            report.pending.contains(&t.id)
        } else {
            st.task_status.get(&t.id).is_some_and(|s| s.pending)
        };
        match error {
            _ if !st.node_alive(&t.node) => TaskState::NodeDown,
            _ if t.draining.is_some() => TaskState::Draining,
            _ if waiting => TaskState::Waiting,
            None => TaskState::Pending,
            Some(None) => TaskState::Running,
            Some(Some(e)) => TaskState::Error(e),
        }
    }

    /// A bounded name, for a metric's label.
    pub fn label(&self) -> &'static str {
        match self {
            TaskState::NodeDown => "node_down",
            TaskState::Draining => "draining",
            TaskState::Waiting | TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Error(_) => "error",
        }
    }

    /// What `task ls` says.
    pub fn text(&self) -> String {
        match self {
            TaskState::NodeDown => "node down".into(),
            TaskState::Draining => "draining".into(),
            TaskState::Waiting => "pending: its runtime has not started it yet".into(),
            TaskState::Pending => "pending".into(),
            TaskState::Running => "running".into(),
            TaskState::Error(e) => format!("error: {e}"),
        }
    }
}

/// What a task's health check says (None: its service has none).
pub fn health_text(st: &State, t: &Task) -> Option<String> {
    let checked = st
        .services
        .get(&t.service)
        .is_some_and(|s| s.health.is_some());
    checked.then(|| match st.task_health.get(&t.id) {
        None => "starting".to_string(),
        Some(h) if h.healthy => "healthy".to_string(),
        Some(h) => match &h.detail {
            Some(d) => format!("unhealthy: {d}"),
            None => "unhealthy".to_string(),
        },
    })
}

fn task_view(d: &Daemon, st: &State, report: &Report, t: &Task) -> Value {
    let mut v = json!(t);
    if let Some(h) = health_text(st, t) {
        v["health"] = json!(h);
    }
    v["state"] = json!(TaskState::of(&d.node, st, report, t).text());
    // Each endpoint's gateway (none on the ingress network, which routes nothing), and
    // what the task's resolv.conf should say: what a runtime needs to describe the
    // attachment (a CNI result) without asking again.
    if let Some(eps) = v["endpoints"].as_array_mut() {
        for (ep, e) in eps.iter_mut().zip(&t.endpoints) {
            let gw = match e.network.as_str() {
                crate::model::GWBRIDGE => t.default_gateway,
                state::INGRESS => None,
                n => st.networks.get(n).map(|net| net.gateway),
            };
            if let Some(gw) = gw {
                ep["gateway"] = json!(gw);
            }
        }
    }
    v["dns"] = json!({
        "nameservers": [netd_dns::server::DNS_ADDR.ip()],
        "search": d.dns.config().search,
    });
    v
}

/// `GET /v1/tasks?label=KEY=VALUE&node=NAME&service=NAME`: every filter must hold (a
/// front end finds its attachments by the labels it gave them).
async fn task_ls(
    AxState(d): Ctx,
    Query(filters): Query<Vec<(String, String)>>,
) -> ApiResult<Value> {
    let mut labels = vec![];
    let (mut node, mut service) = (None, None);
    for (k, v) in &filters {
        match k.as_str() {
            "label" => labels.push(v.split_once('=').ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    format!("label filter {v:?} must be KEY=VALUE"),
                )
            })?),
            "node" => node = Some(v.as_str()),
            "service" => service = Some(v.as_str()),
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    format!("unknown task filter {other:?} (label, node, service)"),
                ))
            }
        }
    }
    let st = load(&d).await?;
    let report = d.reconciler.last_report();
    Ok(Json(json!(st
        .tasks
        .values()
        .filter(|t| node.is_none_or(|n| t.node == n))
        .filter(|t| service.is_none_or(|s| t.service == s))
        .filter(|t| labels
            .iter()
            .all(|(k, v)| t.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|t| task_view(&d, &st, &report, t))
        .collect::<Vec<_>>())))
}

/// Reads the task's namespace back and lists what differs from its record (CNI CHECK).
/// Only the task's own node can look into its namespace.
async fn task_check(AxState(d): Ctx, Path(id): Path<String>) -> ApiResult<Value> {
    let st = load(&d).await?;
    let task = st.task(&id)?;
    if task.node != d.node {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "wrong_node",
            format!(
                "task {} runs on node {}: ask that node's netd to check it",
                task.name, task.node
            ),
        ));
    }
    let problems = crate::verify::task_problems(task)
        .await
        .map_err(kernel_error)?;
    Ok(Json(json!({
        "task": task.name,
        "ok": problems.is_empty(),
        "problems": problems,
    })))
}

async fn task_inspect(AxState(d): Ctx, Path(id): Path<String>) -> ApiResult<Value> {
    let st = load(&d).await?;
    Ok(Json(task_view(
        &d,
        &st,
        &d.reconciler.last_report(),
        st.task(&id)?,
    )))
}

async fn task_attach(AxState(d): Ctx, bytes: Bytes) -> Result<Response, ApiError> {
    let req: TaskAttach = body(&bytes)?;
    let local = req.node.as_deref().is_none_or(|n| n == d.node);
    // A handed-over task's namespace is made later by its runtime.
    if local && !req.handoff {
        netns::NotTasks::read()
            .check(std::path::Path::new(&req.netns))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", e))?;
    }
    let task = state::attach_task(&d.view, &d.node, req).await?;
    // The revision at which its node reported it up: from then on, VIPs balance to it.
    let (failure, up_at) = if local {
        let report = converge_to(&d, task.revision).await?;
        let failure = report.task_errors.get(&task.id).cloned();
        (failure, d.reconciler.status_revision())
    } else {
        remote_outcome(&d, &task.id).await?
    };
    if let Some(e) = failure {
        // Undo: the caller is told it failed, so nothing may remain of it.
        let _ = state::detach_task(&d.view, &task.id).await;
        let _ = converge(&d).await;
        // The task's node refused its namespace: a bad request, whichever node judged.
        if let Some(why) = e.strip_prefix(netns::REFUSED) {
            return Err(Error::Invalid(format!("attaching task {}: {why}", task.name)).into());
        }
        return Err(Error::Kernel(format!("attaching task {}: {e}", task.name)).into());
    }
    // This node reconciled already (above); only the other nodes are waited for, until
    // their load balancers take the task too.
    let late = await_others(&d, task.revision.max(up_at)).await;
    let st = load(&d).await?;
    let report = d.reconciler.last_report();
    Ok(answer(
        StatusCode::CREATED,
        task_view(&d, &st, &report, &task),
        late,
    ))
}

/// How long `task attach --node OTHER` waits for that node to report the kernel work
/// done. Past it the task stays attached and shows `pending` until the node gets to it.
const REMOTE_ATTACH_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Waits until the task's node published a status for `id`; `Some(error)` if its
/// reconcile failed, with the revision the status was seen at (the task joins VIPs on a
/// node once that revision is applied there). Our own reconcile runs too, so the new
/// task's endpoints are known here when this returns.
async fn remote_outcome(d: &Daemon, id: &str) -> Result<(Option<String>, u64), ApiError> {
    let mut changes = d.view.watch();
    let deadline = tokio::time::Instant::now() + REMOTE_ATTACH_WAIT;
    loop {
        let st = load(d).await?;
        match st.task_status.get(id) {
            Some(status) => {
                converge(d).await?;
                return Ok((status.error.clone(), st.revision));
            }
            None if !st.tasks.contains_key(id) => {
                return Err(Error::NotFound(format!("task {id} was detached meanwhile")).into())
            }
            None => {}
        }
        // Wake on the next change; the short sleep bounds a missed wake-up.
        let wait = tokio::time::sleep(std::time::Duration::from_millis(200));
        if tokio::time::timeout_at(deadline, async {
            tokio::select! {
                _ = changes.changed() => {}
                _ = wait => {}
            }
        })
        .await
        .is_err()
        {
            return Ok((None, 0));
        }
    }
}

/// `DELETE /v1/tasks/ID[?drain=SECONDS]`: detaches the task at once, or with `drain`
/// takes it out of new picks and DNS answers everywhere (acknowledged like any write)
/// and leaves the removal to its node, once its connections are gone or at the deadline.
async fn task_detach(
    AxState(d): Ctx,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let mut drain = None;
    for (k, v) in &q {
        match k.as_str() {
            "drain" => {
                drain = Some(v.parse::<u64>().map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_argument",
                        format!("drain {v:?} is not a number of seconds"),
                    )
                })?)
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    format!("unknown detach parameter {other:?} (drain)"),
                ))
            }
        }
    }
    let task = match drain {
        Some(secs) if secs > 0 => state::drain_task(&d.view, &id, secs).await?,
        _ => state::detach_task(&d.view, &id).await?,
    };
    let (_, late) = settle(&d, task.revision).await?;
    Ok(answer(StatusCode::OK, json!(task.value), late))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveRequest {
    #[serde(default)]
    address: Option<std::net::Ipv4Addr>,
    owner: String,
}

/// `POST /v1/networks/NAME/reservations`: an address held for a task that does not
/// exist yet (Docker's IPAM answers before the container is made); `task attach` with
/// that `address` takes it over.
async fn reserve(
    AxState(d): Ctx,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let req: ReserveRequest = body(&bytes)?;
    let done = state::reserve_address(&d.view, &name, req.address, &req.owner).await?;
    let (ip, prefix) = done.value;
    Ok((
        StatusCode::CREATED,
        Json(json!({"network": name, "address": ip, "prefix": prefix, "owner": req.owner})),
    )
        .into_response())
}

/// `DELETE /v1/networks/NAME/reservations/IP[?owner=O]`: gives a reserved address back.
async fn release(
    AxState(d): Ctx,
    Path((name, ip)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult<Value> {
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("{ip:?} is not an IPv4 address"),
        )
    })?;
    let owner = q
        .iter()
        .find(|(k, _)| k == "owner")
        .map(|(_, v)| v.as_str());
    let done = state::release_address(&d.view, &name, ip, owner).await?;
    Ok(Json(json!({"released": done.value})))
}

/// `GET /v1/reservations/OWNER`: where `owner`'s reserved address is.
async fn reservation(AxState(d): Ctx, Path(owner): Path<String>) -> ApiResult<Value> {
    let st = load(&d).await?;
    let (net, ip) = st.reservation_of(&owner).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{owner:?} holds no reserved address"),
        )
    })?;
    Ok(Json(
        json!({"network": net.name, "address": ip, "prefix": net.subnet.prefix(), "gateway": net.gateway}),
    ))
}

/// `GET /v1/subnets/free`: the subnet the next network without `--subnet` would get.
async fn free_subnet(AxState(d): Ctx) -> ApiResult<Value> {
    let st = load(&d).await?;
    let subnet = st.free_subnet(&d.pools)?;
    Ok(Json(
        json!({"subnet": subnet, "gateway": crate::ipam::default_gateway(subnet)}),
    ))
}

async fn binding_get(
    AxState(d): Ctx,
    Path((frontend, id)): Path<(String, String)>,
) -> ApiResult<Value> {
    let st = load(&d).await?;
    st.bindings
        .get(&frontend)
        .and_then(|m| m.get(&id))
        .cloned()
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no {frontend} binding {id:?}"),
            )
        })
}

/// `PUT /v1/bindings/FRONTEND/ID`: what a front end keeps about one of its own ids (a
/// Docker network id → netd network and service), so that it keeps nothing itself.
async fn binding_put(
    AxState(d): Ctx,
    Path((frontend, id)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<Value> {
    if bytes.len() > 4096 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "a binding is at most 4 KiB",
        ));
    }
    let value: Value = body(&bytes)?;
    state::bind(&d.view, &frontend, &id, Some(&value)).await?;
    Ok(Json(value))
}

async fn binding_delete(
    AxState(d): Ctx,
    Path((frontend, id)): Path<(String, String)>,
) -> ApiResult<Value> {
    state::bind(&d.view, &frontend, &id, None).await?;
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A handler that takes no body answers a client whose body comes a moment after
    /// its head, and the client reads the answer to its end (without the whole body
    /// read first, the unread bytes reset the connection as it closes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_after_the_head_does_not_reset_the_answer() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path)?;
        let app: Router = Router::new()
            .route(
                "/slow",
                axum::routing::post(|| async {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    "done"
                }),
            )
            .layer(axum::middleware::from_fn(read_whole_body));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let answer = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let mut s = std::os::unix::net::UnixStream::connect(&path)?;
            s.write_all(
                b"POST /slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
            )?;
            std::thread::sleep(std::time::Duration::from_millis(100));
            s.write_all(b"{}")?;
            let mut got = String::new();
            s.read_to_string(&mut got)?;
            Ok(got)
        })
        .await??;
        server.abort();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        Ok(())
    }

    /// A body over the limit is refused with a clear error, before any handler runs.
    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() -> anyhow::Result<()> {
        use tower::ServiceExt;
        let app: Router = Router::new()
            .route("/x", axum::routing::post(|| async { "the handler ran" }))
            .layer(axum::middleware::from_fn(read_whole_body));
        let req =
            axum::http::Request::post("/x")
                .body(axum::body::Body::from(vec![b'x'; BODY_LIMIT + 1]))?;
        let resp = app.oneshot(req).await?;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        Ok(())
    }
}
