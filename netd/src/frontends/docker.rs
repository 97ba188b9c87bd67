//! Docker's network and IPAM plugin protocols (legacy socket plugins, driver name
//! `netd`), served by the daemon with `--docker-plugin`: `docker network create -d netd
//! --ipam-driver netd` makes (or adopts) a netd network, and `docker run --network` makes
//! the container a task of a netd service. Every request is turned into calls of netd's
//! own API (in process, through the same router the socket serves), so Docker's
//! containers get exactly what `netd task attach` gives; what the plugin must remember
//! between Docker's calls is kept in the daemon's store (a binding per Docker network,
//! an address reservation per endpoint), never in the plugin.
//!
//! What Docker 20.10 does, and what follows from it (docs/docker-plugin-notes.md has the
//! source references):
//! - Docker sends no network name and no container identity to plugins, so the netd
//!   network and service come from driver options (`-o netd.network=NAME -o
//!   netd.service=NAME`); a netd network with the same subnet is adopted without them.
//!   One container can pick another service with `docker network connect --driver-opt
//!   netd.service=NAME`.
//! - Docker's IPAM asks for a container's address before the container exists: netd
//!   reserves it (owner `docker`), the endpoint claims it (owner `docker:ENDPOINT`), and the
//!   task attach at Join takes it over.
//! - At Join the container's namespace does not exist yet: Docker moves the interface
//!   itself when it starts the container. The task is attached with `handoff`: netd
//!   leaves the first endpoint's container side in the node namespace for Docker and
//!   finishes the task (egress, DNS, VIPs) once the namespace is there.
//! - Docker's own resolver takes 127.0.0.11:53 in its containers and forwards what it
//!   does not know to the daemon's `--dns`: `dockerd --dns 127.0.0.12` sends it to netd,
//!   which answers there too in containers Docker made.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::State as AxState;
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::client::encode_component;
use crate::naming;
use crate::netns;
use crate::reconcile::Reconciler;

/// Where Docker looks for a plugin named `netd` (hard-coded in Docker).
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/netd.sock";
/// Docker's driver option naming the netd network (Docker does not tell plugins the name).
pub const OPT_NETWORK: &str = "netd.network";
/// Docker's driver option naming the netd service the network's containers join.
pub const OPT_SERVICE: &str = "netd.service";
/// The binding namespace of this front end in the store.
const FRONTEND: &str = "docker";
/// Task labels by which the plugin finds its tasks again.
pub const LABEL_ENDPOINT: &str = "docker.endpoint_id";
pub const LABEL_NETWORK: &str = "docker.network_id";
/// Docker's option key of a gateway request in RequestAddress.
const GATEWAY_REQUEST: &str = "com.docker.network.gateway";

/// The plugin's state: netd's API router (called in process) and the reconciler, to
/// finish a task as soon as Docker has made its namespace.
#[derive(Clone)]
pub struct Plugin {
    api: Router,
    reconciler: Arc<Reconciler>,
}

/// The process at the other end of the plugin socket: dockerd. Its mount namespace is
/// where Docker's sandbox keys (the containers' namespace files) are mounted.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pid: Option<i32>,
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Peer {
            pid: stream.io().peer_cred().ok().and_then(|c| c.pid()),
        }
    }
}

/// A failed call, as Docker reads it: the network driver's `Err`, the IPAM driver's
/// `Error` (both are set, so either side shows the sentence).
struct DockerError(String);

impl IntoResponse for DockerError {
    fn into_response(self) -> Response {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"Err": self.0, "Error": self.0})),
        )
            .into_response()
    }
}

type Reply = Result<Json<Value>, DockerError>;

/// A netd API call that failed: its status and sentence.
#[derive(Debug)]
struct ApiFailure {
    status: u16,
    message: String,
}

impl From<ApiFailure> for DockerError {
    fn from(f: ApiFailure) -> Self {
        DockerError(format!("netd: {}", f.message))
    }
}

impl Plugin {
    pub fn new(api: Router, reconciler: Arc<Reconciler>) -> Self {
        Plugin { api, reconciler }
    }

    /// One request to netd's API, in process.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiFailure> {
        let fail = |message: String| ApiFailure {
            status: 500,
            message,
        };
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(payload))
            .map_err(|e| fail(format!("build request {path}: {e}")))?;
        let resp = match self.api.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await
            .map_err(|e| fail(format!("read the answer of {path}: {e}")))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status >= 400 {
            return Err(ApiFailure {
                status,
                message: value["error"]
                    .as_str()
                    .unwrap_or("request failed")
                    .to_string(),
            });
        }
        Ok(value)
    }

    /// The netd network and service bound to Docker network `id`.
    async fn binding(&self, id: &str) -> Result<(String, String), DockerError> {
        let b = self
            .call(
                Method::GET,
                &format!("/v1/bindings/{FRONTEND}/{}", encode_component(id)),
                None,
            )
            .await
            .map_err(|_| {
                DockerError(format!(
                    "netd does not know Docker network {id}: it was made before netd served \
                     the plugin; remove it and create it again"
                ))
            })?;
        let field = |k: &str| b[k].as_str().unwrap_or_default().to_string();
        Ok((field("network"), field("service")))
    }

    /// The netd network with `subnet`, if one exists.
    async fn network_with_subnet(&self, subnet: &str) -> Result<Option<Value>, DockerError> {
        let nets = self.call(Method::GET, "/v1/networks", None).await?;
        Ok(nets
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["subnet"].as_str() == Some(subnet))
            .cloned())
    }
}

/// The plugin's routes; served on the plugin socket with [`Peer`] as connect info.
pub fn router(plugin: Plugin) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/NetworkDriver.GetCapabilities", post(capabilities))
        .route("/NetworkDriver.CreateNetwork", post(create_network))
        .route("/NetworkDriver.DeleteNetwork", post(delete_network))
        .route("/NetworkDriver.CreateEndpoint", post(create_endpoint))
        .route("/NetworkDriver.DeleteEndpoint", post(delete_endpoint))
        .route("/NetworkDriver.EndpointOperInfo", post(oper_info))
        .route("/NetworkDriver.Join", post(join))
        .route("/NetworkDriver.Leave", post(nothing))
        .route("/NetworkDriver.ProgramExternalConnectivity", post(nothing))
        .route("/NetworkDriver.RevokeExternalConnectivity", post(nothing))
        .route("/NetworkDriver.DiscoverNew", post(nothing))
        .route("/NetworkDriver.DiscoverDelete", post(nothing))
        .route("/IpamDriver.GetCapabilities", post(ipam_capabilities))
        .route("/IpamDriver.GetDefaultAddressSpaces", post(address_spaces))
        .route("/IpamDriver.RequestPool", post(request_pool))
        .route("/IpamDriver.ReleasePool", post(nothing))
        .route("/IpamDriver.RequestAddress", post(request_address))
        .route("/IpamDriver.ReleaseAddress", post(release_address))
        .fallback(|| async {
            DockerError("netd's Docker plugin does not implement this call".into())
        })
        .with_state(plugin)
}

/// Docker sends no Content-Type and sometimes no body: parse whatever came, as JSON.
fn parse(bytes: &Bytes) -> Result<Value, DockerError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| DockerError(format!("netd: bad request body: {e}")))
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

async fn activate() -> Json<Value> {
    Json(json!({"Implements": ["NetworkDriver", "IpamDriver"]}))
}

/// Local scope: each dockerd keeps its own record of the network (there is no Docker
/// cluster store); the netd network behind it is the cluster's.
async fn capabilities() -> Json<Value> {
    Json(json!({"Scope": "local", "ConnectivityScope": "local"}))
}

async fn nothing() -> Json<Value> {
    Json(json!({}))
}

async fn oper_info() -> Json<Value> {
    Json(json!({"Value": {}}))
}

/// `docker network create -d netd [-o netd.network=NAME] [-o netd.service=NAME]`: adopts
/// the netd network named (or with the same subnet), or creates it; makes the service if
/// it does not exist; binds the Docker network id to both.
async fn create_network(AxState(p): AxState<Plugin>, bytes: Bytes) -> Reply {
    let req = parse(&bytes)?;
    let id = text(&req, "NetworkID");
    let opts = &req["Options"]["com.docker.network.generic"];
    let internal = req["Options"]["com.docker.network.internal"]
        .as_bool()
        .unwrap_or(false);
    let pool = req["IPv4Data"][0]["Pool"].as_str().map(String::from);
    let gateway = req["IPv4Data"][0]["Gateway"]
        .as_str()
        .map(|g| g.split('/').next().unwrap_or_default().to_string());
    let named = opts[OPT_NETWORK].as_str().map(String::from);
    let existing = match &named {
        Some(n) => match p
            .call(
                Method::GET,
                &format!("/v1/networks/{}", encode_component(n)),
                None,
            )
            .await
        {
            Ok(v) => Some(v),
            Err(f) if f.status == 404 => None,
            Err(f) => return Err(f.into()),
        },
        None => match &pool {
            Some(s) => p.network_with_subnet(s).await?,
            None => None,
        },
    };
    let network = match existing {
        Some(net) => {
            if let Some(s) = &pool {
                if net["subnet"].as_str() != Some(s.as_str()) {
                    return Err(DockerError(format!(
                        "netd network {} has subnet {}, not {s}",
                        net["name"], net["subnet"]
                    )));
                }
            }
            text(&net, "name").to_string()
        }
        None => {
            let Some(name) = named else {
                return Err(DockerError(format!(
                    "netd needs the network's name (Docker does not tell plugins): add \
                     -o {OPT_NETWORK}=NAME -o {OPT_SERVICE}=SERVICE"
                )));
            };
            let body =
                json!({"name": name, "subnet": pool, "gateway": gateway, "internal": internal});
            p.call(Method::POST, "/v1/networks", Some(body)).await?;
            name
        }
    };
    let Some(service) = opts[OPT_SERVICE].as_str().map(String::from) else {
        return Err(DockerError(format!(
            "netd needs the service this network's containers join: add -o {OPT_SERVICE}=NAME"
        )));
    };
    match p
        .call(
            Method::GET,
            &format!("/v1/services/{}", encode_component(&service)),
            None,
        )
        .await
    {
        Ok(svc) => {
            let on = svc["networks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|n| n == &json!(network));
            if !on {
                return Err(DockerError(format!(
                    "netd service {service} is not on network {network}"
                )));
            }
        }
        Err(f) if f.status == 404 => {
            let body = json!({"name": service, "networks": [network]});
            p.call(Method::POST, "/v1/services", Some(body)).await?;
        }
        Err(f) => return Err(f.into()),
    }
    let binding = json!({"network": network, "service": service});
    p.call(
        Method::PUT,
        &format!("/v1/bindings/{FRONTEND}/{}", encode_component(id)),
        Some(binding),
    )
    .await?;
    Ok(Json(json!({})))
}

/// `docker network rm`: forgets the binding. The netd network is the cluster's (other
/// nodes' Docker networks and netd's own tasks may use it): `netd network rm` removes it.
async fn delete_network(AxState(p): AxState<Plugin>, bytes: Bytes) -> Reply {
    let req = parse(&bytes)?;
    let id = text(&req, "NetworkID");
    p.call(
        Method::DELETE,
        &format!("/v1/bindings/{FRONTEND}/{}", encode_component(id)),
        None,
    )
    .await?;
    Ok(Json(json!({})))
}

/// Where an endpoint's own service choice is kept, from CreateEndpoint to Join.
fn endpoint_binding(endpoint: &str) -> String {
    format!("/v1/bindings/{FRONTEND}/ep-{}", encode_component(endpoint))
}

fn owner(endpoint: &str) -> String {
    format!("{FRONTEND}:{endpoint}")
}

/// The endpoint claims the address Docker's IPAM call reserved for it. netd derives a
/// task's MAC from its address, so Docker is given that MAC.
async fn create_endpoint(AxState(p): AxState<Plugin>, bytes: Bytes) -> Reply {
    let req = parse(&bytes)?;
    let (network, _) = p.binding(text(&req, "NetworkID")).await?;
    let endpoint = text(&req, "EndpointID");
    let address = text(&req["Interface"], "Address");
    let ip: Ipv4Addr = address
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            DockerError(format!(
                "netd: the endpoint has no IPv4 address ({address:?})"
            ))
        })?;
    if !text(&req["Interface"], "MacAddress").is_empty() {
        return Err(DockerError(
            "netd derives a container's MAC from its address: drop --mac-address".into(),
        ));
    }
    // `docker network connect --driver-opt netd.service=NAME` picks the service of this
    // one container (Docker 20.10's `run --network` has no per-container options).
    if let Some(service) = req["Options"][OPT_SERVICE].as_str() {
        let b = json!({"service": service});
        p.call(Method::PUT, &endpoint_binding(endpoint), Some(b))
            .await?;
    }
    let body = json!({"address": ip, "owner": owner(endpoint)});
    p.call(
        Method::POST,
        &format!("/v1/networks/{}/reservations", encode_component(&network)),
        Some(body),
    )
    .await?;
    let mac = crate::model::format_mac(&crate::model::mac_for_ip(ip));
    Ok(Json(json!({"Interface": {"MacAddress": mac}})))
}

/// Attaches the container as a task of the network's service, with the endpoint's
/// address; its interface waits in the node namespace for Docker to move it in. Docker
/// gets no gateway: netd gives the task its egress (the gwbridge) and default route
/// itself, so Docker adds no docker_gwbridge interface.
async fn join(
    AxState(p): AxState<Plugin>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    bytes: Bytes,
) -> Reply {
    let req = parse(&bytes)?;
    let network_id = text(&req, "NetworkID");
    let endpoint = text(&req, "EndpointID");
    let (network, mut service) = p.binding(network_id).await?;
    if let Ok(b) = p.call(Method::GET, &endpoint_binding(endpoint), None).await {
        service = text(&b, "service").to_string();
    }
    let reserved = p
        .call(
            Method::GET,
            &format!("/v1/reservations/{}", encode_component(&owner(endpoint))),
            None,
        )
        .await?;
    let netns = sandbox_path(peer.pid, text(&req, "SandboxKey"));
    let body = json!({
        "service": service,
        "netns": netns.display().to_string(),
        "network": network,
        "ifname": "eth0",
        "address": reserved["address"],
        "handoff": true,
        "labels": {LABEL_ENDPOINT: endpoint, LABEL_NETWORK: network_id},
    });
    let task = p.call(Method::POST, "/v1/tasks", Some(body)).await?;
    let ep_id = task["endpoints"][0]["id"].as_str().unwrap_or_default();
    let task_id = text(&task, "id").to_string();
    tokio::spawn(finish_when_started(p.reconciler.clone(), netns, task_id));
    Ok(Json(json!({
        "InterfaceName": {"SrcName": naming::task_tmp_if(ep_id), "DstPrefix": "eth"},
        "DisableGatewayService": true,
    })))
}

/// The container's namespace as netd can open it: Docker mounts it at the sandbox key
/// in dockerd's own mount namespace, which `/proc/PID/root` of dockerd reaches from any
/// other (the same file when both share one).
fn sandbox_path(pid: Option<i32>, key: &str) -> PathBuf {
    match pid {
        Some(pid) if Path::new(key).is_absolute() => {
            PathBuf::from(format!("/proc/{pid}/root{key}"))
        }
        _ => PathBuf::from(key),
    }
}

/// How long after Join netd watches for the container's namespace (Docker starts the
/// container right after; an image pull does not happen between the two).
const START_WAIT: Duration = Duration::from_secs(60);

/// Reconciles as soon as Docker has made the container's namespace and set up the
/// interface it was given, so the task's DNS, egress and VIPs follow within milliseconds
/// rather than at the next resync.
async fn finish_when_started(reconciler: Arc<Reconciler>, netns: PathBuf, task: String) {
    let deadline = tokio::time::Instant::now() + START_WAIT;
    while tokio::time::Instant::now() < deadline {
        if netns::check_netns_path(&netns).is_ok() {
            match reconciler.run_once().await {
                Ok(report) if !report.pending.contains(&task) => return,
                Ok(_) => {}
                Err(e) => tracing::warn!("finish a Docker container's task: {e:#}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(netns = %netns.display(), "Docker did not start the container in time");
}

/// `docker rm` / `network disconnect`: detaches the endpoint's task, or gives back the
/// address of an endpoint that never joined.
async fn delete_endpoint(AxState(p): AxState<Plugin>, bytes: Bytes) -> Reply {
    let req = parse(&bytes)?;
    let endpoint = text(&req, "EndpointID");
    let label = encode_component(&format!("{LABEL_ENDPOINT}={endpoint}"));
    let tasks = p
        .call(Method::GET, &format!("/v1/tasks?label={label}"), None)
        .await?;
    for t in tasks.as_array().into_iter().flatten() {
        let id = encode_component(text(t, "id"));
        match p
            .call(Method::DELETE, &format!("/v1/tasks/{id}"), None)
            .await
        {
            Ok(_) => {}
            Err(f) if f.status == 404 => {}
            Err(f) => return Err(f.into()),
        }
    }
    match p
        .call(Method::DELETE, &endpoint_binding(endpoint), None)
        .await
    {
        Ok(_) => {}
        Err(f) if f.status == 404 => {}
        Err(f) => return Err(f.into()),
    }
    let who = owner(endpoint);
    if let Ok(r) = p
        .call(
            Method::GET,
            &format!("/v1/reservations/{}", encode_component(&who)),
            None,
        )
        .await
    {
        let path = format!(
            "/v1/networks/{}/reservations/{}?owner={}",
            encode_component(text(&r, "network")),
            text(&r, "address"),
            encode_component(&who)
        );
        p.call(Method::DELETE, &path, None).await?;
    }
    Ok(Json(json!({})))
}

async fn ipam_capabilities() -> Json<Value> {
    Json(json!({"RequiresMACAddress": false, "RequiresRequestReplay": false}))
}

async fn address_spaces() -> Json<Value> {
    Json(json!({"LocalDefaultAddressSpace": "netd", "GlobalDefaultAddressSpace": "netd"}))
}

/// A pool is a netd network's subnet: the one asked for, or the subnet the next netd
/// network would get. Nothing is taken yet: CreateNetwork makes (or adopts) the network.
async fn request_pool(AxState(p): AxState<Plugin>, bytes: Bytes) -> Reply {
    let req = parse(&bytes)?;
    if req["V6"].as_bool().unwrap_or(false) {
        return Err(DockerError("netd is IPv4 only: leave out --ipv6".into()));
    }
    if !text(&req, "SubPool").is_empty() {
        return Err(DockerError(
            "netd hands out a network's whole subnet: leave out --ip-range".into(),
        ));
    }
    let (pool, gateway) = match text(&req, "Pool") {
        "" => {
            let free = p.call(Method::GET, "/v1/subnets/free", None).await?;
            (
                text(&free, "subnet").to_string(),
                text(&free, "gateway").to_string(),
            )
        }
        asked => {
            let subnet: ipnetwork::Ipv4Network = asked
                .parse()
                .map_err(|_| DockerError(format!("netd: {asked:?} is not an IPv4 subnet")))?;
            let gw = match p.network_with_subnet(&subnet.to_string()).await? {
                Some(net) => text(&net, "gateway").to_string(),
                None => crate::ipam::default_gateway(subnet).to_string(),
            };
            (subnet.to_string(), gw)
        }
    };
    let prefix = pool.split('/').nth(1).unwrap_or("32");
    Ok(Json(json!({
        "PoolID": pool,
        "Pool": pool,
        "Data": {GATEWAY_REQUEST: format!("{gateway}/{prefix}")},
    })))
}

/// A container's address, reserved in the netd network of the pool; the gateway is the
/// network's own and is answered as it is.
async fn request_address(AxState(p): AxState<Plugin>, bytes: Bytes) -> Reply {
    let req = parse(&bytes)?;
    let pool = text(&req, "PoolID");
    let prefix = pool.split('/').nth(1).unwrap_or("32").to_string();
    let asked = text(&req, "Address");
    if req["Options"]["RequestAddressType"].as_str() == Some(GATEWAY_REQUEST) {
        let gw = match (asked, p.network_with_subnet(pool).await?) {
            ("", Some(net)) => text(&net, "gateway").to_string(),
            ("", None) => {
                let subnet: ipnetwork::Ipv4Network = pool
                    .parse()
                    .map_err(|_| DockerError(format!("netd: bad pool {pool:?}")))?;
                crate::ipam::default_gateway(subnet).to_string()
            }
            (a, _) => a.to_string(),
        };
        return Ok(Json(
            json!({"Address": format!("{gw}/{prefix}"), "Data": {}}),
        ));
    }
    let net = p
        .network_with_subnet(pool)
        .await?
        .ok_or_else(|| DockerError(format!("netd has no network with subnet {pool}")))?;
    let body = json!({
        "address": (!asked.is_empty()).then_some(asked),
        "owner": FRONTEND,
    });
    let r = p
        .call(
            Method::POST,
            &format!(
                "/v1/networks/{}/reservations",
                encode_component(text(&net, "name"))
            ),
            Some(body),
        )
        .await?;
    Ok(Json(
        json!({"Address": format!("{}/{}", text(&r, "address"), r["prefix"]), "Data": {}}),
    ))
}

/// Gives back a reserved address; one a task holds is the task's to free.
async fn release_address(AxState(p): AxState<Plugin>, bytes: Bytes) -> Reply {
    let req = parse(&bytes)?;
    let Some(net) = p.network_with_subnet(text(&req, "PoolID")).await? else {
        return Ok(Json(json!({})));
    };
    let path = format!(
        "/v1/networks/{}/reservations/{}",
        encode_component(text(&net, "name")),
        encode_component(text(&req, "Address")),
    );
    match p.call(Method::DELETE, &path, None).await {
        Ok(_) => Ok(Json(json!({}))),
        Err(f) if f.status == 404 => Ok(Json(json!({}))),
        Err(f) => Err(f.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_keys_are_opened_through_dockerds_root() {
        assert_eq!(
            sandbox_path(Some(42), "/var/run/docker/netns/abc"),
            PathBuf::from("/proc/42/root/var/run/docker/netns/abc")
        );
        assert_eq!(sandbox_path(None, "/x/y"), PathBuf::from("/x/y"));
    }

    #[test]
    fn bodies_docker_sends_empty_or_without_type_parse() {
        assert_eq!(parse(&Bytes::from_static(b"")).ok(), Some(Value::Null));
        assert_eq!(
            parse(&Bytes::from_static(b"{\"a\":1}\n")).ok(),
            Some(json!({"a": 1}))
        );
        assert!(parse(&Bytes::from_static(b"{")).is_err());
    }
}
