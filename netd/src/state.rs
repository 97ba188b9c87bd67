//! Typed operations on the desired state. Each operation reads the whole state at one
//! revision, validates the request against it, and commits its writes in one transaction
//! whose compares fail if anything it relied on changed meanwhile; then it starts over.
//! Uniqueness (names, addresses, VNIs) rests on create-if-absent keys, so it holds for
//! any number of concurrent writers, on one node or many.
//!
//! Key layout (all under `/netd/`):
//! - `networks/NAME`, `services/NAME`, `tasks/ID`, `nodes/NAME`: JSON records
//! - `tasknames/NAME`: the id of the task with that name
//! - `ipam/NETWORK-ID/IP`, `gwipam/NODE/IP`, `vni/VNI`: who holds an address or a VNI
//! - `ipamnext/NETWORK-ID`, `gwipamnext/NODE`: the last address handed out in that
//!   subnet, where the next search starts (see [`Serial`])
//! - `ports/PROTO-PORT`: the service that publishes a port (one per cluster)
//! - `lbaddr/NETWORK-ID/NODE`: the node's own address on an overlay, for a datapath
//!   that translates client addresses (userspace); released with the network
//! - `meta/networks`: rewritten by every network create/rm and compared by service
//!   create, so a network cannot vanish under a service being created on it
//! - `alive/NODE`: ephemeral (an etcd lease): present while the node's daemon lives
//! - `taskstatus/ID`: written by the task's node after each reconcile that changed it,
//!   so any node's API can tell whether a task's interfaces are up
//! - `taskhealth/ID`: written by the task's node when its health check's verdict changes
//! - `cluster/id`: the cluster's identity, written once (see [`crate::identity`])

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ipam::{self, IpamError};
use crate::model::{
    self, Drain, Driver, Endpoint, EndpointMode, HealthCheck, Network, Node, PortSpec, PublishMode,
    Service, Task, GWBRIDGE,
};
use crate::store::{Compare, Event, KeyValue, Op, Snapshot, Store, StoreError, MAX_TXN_OPS, ROOT};
use crate::view::View;
use imbl::{OrdMap, OrdSet};
const META_NETWORKS: &str = "/netd/meta/networks";
/// Names netd uses itself.
const RESERVED_NETWORKS: &[&str] = &[GWBRIDGE, "ingress", "host", "none"];
const MAX_RETRIES: usize = 32;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store is too busy: gave up after {MAX_RETRIES} conflicting attempts")]
    Contention,
    #[error("{0}")]
    Kernel(String),
    /// The store is not the one this node follows (see [`crate::identity`]).
    #[error("{0}")]
    StoreRefused(String),
}

impl Error {
    /// Whether trying again later may succeed: the store unreachable or too busy, as
    /// opposed to a request it refused.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store(e) => e.is_transient(),
            Error::Contention => true,
            _ => false,
        }
    }
}

impl From<IpamError> for Error {
    fn from(e: IpamError) -> Self {
        match e {
            IpamError::PoolExhausted(..)
            | IpamError::SubnetExhausted(_)
            | IpamError::VniExhausted => Error::Exhausted(e.to_string()),
            IpamError::Overlap(..) => Error::Conflict(e.to_string()),
            _ => Error::Invalid(e.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The addresses one transaction hands out, each the next free one after the last its
/// subnet gave ([`ipam::allocate_ip`]). The subnet's cursor (its last address) moves in
/// the same transaction, once however many addresses it gave. It is written without a
/// compare: it only says where to start looking. What keeps an address to one holder is
/// the create-if-absent on its `ipam/` key; two writers that moved one cursor at once
/// leave the later one's, and neither waits for the other.
#[derive(Default)]
struct Serial {
    /// Cursor key -> the last address handed out in this transaction.
    moved: BTreeMap<String, Ipv4Addr>,
}

/// The cursor key of a network's subnet.
fn network_cursor(net: &Network) -> String {
    key("ipamnext", &net.id)
}

/// The cursor key of a node's gwbridge subnet.
fn gwbridge_cursor(node: &str) -> String {
    key("gwipamnext", node)
}

impl Serial {
    /// The next free address of `subnet` (whose cursor key is `cursor`), which belongs
    /// to `owner` (a network, a node's gwbridge): when none is left, the error says
    /// whose subnet is full.
    fn take(
        &mut self,
        st: &State,
        owner: &str,
        cursor: String,
        subnet: Ipv4Network,
        used: &OrdSet<Ipv4Addr>,
    ) -> Result<Ipv4Addr> {
        let after = self
            .moved
            .get(&cursor)
            .or_else(|| st.cursors.get(&cursor))
            .copied();
        let ip = ipam::allocate_ip(subnet, after, |ip| used.contains(ip)).map_err(|e| match e {
            IpamError::SubnetExhausted(s) => {
                Error::Exhausted(format!("{owner} ({s}) has no free address left"))
            }
            other => other.into(),
        })?;
        self.moved.insert(cursor, ip);
        Ok(ip)
    }

    /// The next free address of network `net` (see [`Serial::take`]).
    fn take_on(&mut self, st: &State, net: &Network, used: &OrdSet<Ipv4Addr>) -> Result<Ipv4Addr> {
        self.take(
            st,
            &format!("network {:?}", net.name),
            network_cursor(net),
            net.subnet,
            used,
        )
    }

    /// The transaction's writes of the cursors it moved.
    fn finish(self, ops: &mut Vec<Op>) {
        for (k, ip) in self.moved {
            ops.push(Op::Put(k, encode(&ip)));
        }
    }
}

/// Address configuration of this daemon, from its command line.
#[derive(Debug, Clone)]
pub struct Pools {
    pub pool: Ipv4Network,
    pub size: u8,
    /// Subnet of the `ingress` network, made when the first node starts (Docker:
    /// 10.0.0.0/24).
    pub ingress: Ipv4Network,
    /// Whether the `ingress` network is made encrypted (`--ingress-encrypted`, Docker's
    /// `docker network create --ingress --opt encrypted`): what published ports carry
    /// between nodes is then sealed too. Only its maker's setting counts.
    pub ingress_encrypted: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: String,
    #[serde(default)]
    pub driver: Option<Driver>,
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub attachable: bool,
    #[serde(default)]
    pub internal: bool,
    /// Its traffic between nodes is encrypted (Docker's `--opt encrypted`).
    #[serde(default)]
    pub encrypted: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCreate {
    pub name: String,
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub endpoint_mode: Option<EndpointMode>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub publish: Vec<PortSpec>,
    /// Publish ports the node serves itself (see [`crate::node_ports`]).
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub health: Option<HealthCheck>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskAttach {
    pub service: String,
    pub netns: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    /// Attach on this one of the service's networks only (a CNI config names one
    /// network); default: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The interface name of the endpoint on `network` (or on the service's first
    /// network); the task's other interfaces take the next free `ethN`. Default `eth0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Host-mode ports that come with this task (CNI `portMappings`). Ports belong to
    /// services, as in Swarm: one the service lacks is added to it in this transaction
    /// and stays published (where its tasks run) until the service is removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<PortSpec>,
    /// The address of the endpoint on `network`, reserved before (see
    /// [`reserve_address`]); the reservation becomes the task's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// The runtime moves the first endpoint's task side into the namespace itself, which
    /// may not exist yet (Docker's plugin protocol): see [`Task::handoff`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
}

/// The whole desired state at one store revision, with each key's revision for compares.
/// Its maps are persistent (`imbl`): a copy shares everything with the original, so the
/// node's view ([`crate::view::View`]) hands a snapshot to every reader for the price of
/// a pointer, and applies one change in O(log n).
#[derive(Debug, Clone, Default)]
pub struct State {
    pub revision: u64,
    pub networks: OrdMap<String, Network>,
    pub services: OrdMap<String, Service>,
    pub tasks: OrdMap<String, Task>,
    pub nodes: OrdMap<String, Node>,
    /// Network id -> addresses held in it.
    pub ipam: OrdMap<String, OrdSet<Ipv4Addr>>,
    /// Node name -> gwbridge addresses held on it.
    pub gwipam: OrdMap<String, OrdSet<Ipv4Addr>>,
    /// The last address handed out in each subnet (`ipamnext/NETWORK-ID`,
    /// `gwipamnext/NODE`): where the next search for a free one starts (see
    /// [`Serial`]).
    cursors: OrdMap<String, Ipv4Addr>,
    pub vnis: OrdSet<u32>,
    /// Network id -> node -> that node's load-balancer address on the network.
    pub lb_addrs: OrdMap<String, OrdMap<String, Ipv4Addr>>,
    /// The cluster's identity (`cluster/id`, written once by its first node): what tells
    /// a node that its store was emptied or replaced (see [`crate::identity`]).
    pub cluster: Option<String>,
    /// Nodes whose daemon holds its liveness lease (in a node's own view, that node
    /// always: see `view::own`).
    pub alive: OrdSet<String>,
    /// The node whose view this is has no lease in the store (it counts itself alive
    /// all the same): what `node ls` shows.
    pub own_lease_lapsed: bool,
    /// Task id -> what its node last reported.
    pub task_status: OrdMap<String, TaskStatus>,
    /// Task id -> what its health check found (tasks of services with a check).
    pub task_health: OrdMap<String, TaskHealth>,
    /// (network id, address) -> who reserved it before any task holds it (a runtime
    /// whose IPAM hands out addresses before the container exists: Docker's).
    pub reservations: OrdMap<(String, Ipv4Addr), String>,
    /// Front end -> its id -> what it bound there (Docker: a Docker network id -> the
    /// netd network and service its containers join).
    pub bindings: OrdMap<String, OrdMap<String, serde_json::Value>>,
    /// Who holds each address key (`ipam/…`, `gwipam/…`): `task:ID`, `vip:NAME`,
    /// `lb:NODE`, `gateway`, or a reservation. A task's release deletes only the keys
    /// that are still its own.
    holders: OrdMap<String, String>,
    /// Tasks whose service is gone: a `service rm` committed, and its tasks wait for
    /// [`collect_garbage`]. Every reader already treats them as gone (they are not in
    /// `tasks`); their addresses stay held until they are released.
    pub orphans: OrdMap<String, Task>,
    /// Service name -> the ids of its tasks (orphans included): what keeps a service's
    /// backends and names a lookup, not a scan of every task.
    by_service: OrdMap<String, OrdSet<String>>,
    /// Task name -> task id (`tasknames/`).
    task_names: OrdMap<String, String>,
    /// The tasks being drained: what the drain finisher looks at, without a scan of
    /// every task.
    draining: OrdSet<String>,
    /// The services that publish a port: what the mesh and the node's firewall go
    /// through, without a scan of every service.
    publishing: OrdSet<String>,
    revs: OrdMap<String, u64>,
}

/// What a task's health check found, as its node reports it (`taskhealth/ID`, written on
/// a change only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskHealth {
    pub healthy: bool,
    /// Since when (seconds since the epoch).
    pub since: u64,
    /// The last failed probe's error, if the last probe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// How a task's node sees it after its last reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// `None` when every interface of the task is configured.
    pub error: Option<String>,
    /// Its runtime has not taken its first endpoint yet (see [`Task::handoff`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

impl TaskStatus {
    /// Its node reported every interface working: the task may take connections.
    pub fn up(&self) -> bool {
        self.error.is_none() && !self.pending
    }
}

fn key(kind: &str, name: &str) -> String {
    format!("{ROOT}{kind}/{name}")
}

fn decode<T: DeserializeOwned>(k: &str, v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| {
        Error::Store(StoreError::Corrupt {
            path: k.to_string(),
            reason: e.to_string(),
        })
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

impl State {
    /// Reads the whole state from the store. The daemon does this once (its view then
    /// follows the change feed); the CLI's direct reads and tests use it as is.
    pub async fn load(store: &dyn Store) -> Result<State> {
        State::from_snapshot(store.list(ROOT).await?)
    }

    /// The state a snapshot of every key under `/netd/` describes.
    pub fn from_snapshot(snap: Snapshot) -> Result<State> {
        let mut st = State::default();
        for kv in &snap.kvs {
            st.put(kv)?;
        }
        st.revision = snap.revision;
        Ok(st)
    }

    /// Applies one committed change (from the store's change feed). A value that does
    /// not decode is an error and leaves the state as it was.
    pub fn apply(&mut self, event: &Event) -> Result<()> {
        match event {
            Event::Put(kv) => {
                self.put(kv)?;
                self.revision = self.revision.max(kv.mod_revision);
            }
            Event::Delete { key, revision } => {
                self.delete(key);
                self.revision = self.revision.max(*revision);
            }
        }
        Ok(())
    }

    fn put(&mut self, kv: &KeyValue) -> Result<()> {
        let (k, v) = (kv.key.as_str(), kv.value.as_slice());
        let Some(rest) = k.strip_prefix(ROOT) else {
            return Ok(());
        };
        let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
        // Decode first: a bad value must change nothing.
        enum Value {
            Network(Network),
            Service(Service),
            Task(Task),
            Node(Node),
            Holder(String),
            Addr(Ipv4Addr),
            Status(TaskStatus),
            Health(TaskHealth),
            Binding(serde_json::Value),
            Id(String),
            Other,
        }
        let value = match kind {
            "networks" => Value::Network(decode(k, v)?),
            "services" => Value::Service(decode(k, v)?),
            "tasks" => Value::Task(decode(k, v)?),
            "nodes" => Value::Node(decode(k, v)?),
            "ipam" | "gwipam" => Value::Holder(decode(k, v)?),
            "lbaddr" | "ipamnext" | "gwipamnext" => Value::Addr(decode(k, v)?),
            "taskstatus" => Value::Status(decode(k, v)?),
            "taskhealth" => Value::Health(decode(k, v)?),
            "bindings" => Value::Binding(decode(k, v)?),
            "tasknames" | "cluster" => Value::Id(decode(k, v)?),
            _ => Value::Other,
        };
        self.delete(k);
        let name = name.to_string();
        match value {
            Value::Network(n) => {
                self.networks.insert(name, n);
            }
            Value::Service(svc) => {
                // Its orphans come back: a service of that name exists again.
                for id in self.by_service.get(&name).cloned().unwrap_or_default() {
                    if let Some(t) = self.orphans.remove(&id) {
                        self.tasks.insert(id, t);
                    }
                }
                if !svc.publish.is_empty() {
                    self.publishing.insert(name.clone());
                }
                self.services.insert(name, svc);
            }
            // Its key is its id.
            Value::Task(t) => self.insert_task(t),
            Value::Node(n) => {
                self.nodes.insert(name, n);
            }
            Value::Holder(holder) => {
                if let Some((owner, ip)) = name.split_once('/') {
                    if let Ok(ip) = ip.parse() {
                        if kind == "ipam" {
                            if let Some(r) = holder.strip_prefix(RESERVED) {
                                self.reservations
                                    .insert((owner.to_string(), ip), r.to_string());
                            }
                        }
                        self.holders.insert(k.to_string(), holder);
                        let map = if kind == "ipam" {
                            &mut self.ipam
                        } else {
                            &mut self.gwipam
                        };
                        map.entry(owner.to_string()).or_default().insert(ip);
                    }
                }
            }
            Value::Addr(addr) if kind != "lbaddr" => {
                self.cursors.insert(k.to_string(), addr);
            }
            Value::Addr(addr) => {
                if let Some((net, node)) = name.split_once('/') {
                    self.lb_addrs
                        .entry(net.to_string())
                        .or_default()
                        .insert(node.to_string(), addr);
                }
            }
            Value::Status(status) => {
                self.task_status.insert(name, status);
            }
            Value::Health(health) => {
                self.task_health.insert(name, health);
            }
            Value::Binding(b) => {
                if let Some((frontend, id)) = name.split_once('/') {
                    self.bindings
                        .entry(frontend.to_string())
                        .or_default()
                        .insert(id.to_string(), b);
                }
            }
            Value::Id(id) if kind == "cluster" => self.cluster = Some(id),
            Value::Id(id) => {
                self.task_names.insert(name, id);
            }
            Value::Other => match kind {
                "vni" => {
                    if let Ok(vni) = name.parse() {
                        self.vnis.insert(vni);
                    }
                }
                "alive" => {
                    self.alive.insert(name);
                }
                _ => {}
            },
        }
        self.revs.insert(k.to_string(), kv.mod_revision);
        Ok(())
    }

    /// Forgets `k` and everything derived from it.
    fn delete(&mut self, k: &str) {
        let Some(rest) = k.strip_prefix(ROOT) else {
            return;
        };
        if self.revs.remove(k).is_none() {
            return;
        }
        let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
        match kind {
            "networks" => {
                self.networks.remove(name);
            }
            "services" => {
                self.services.remove(name);
                self.publishing.remove(name);
                // Its tasks become orphans until they are collected.
                for id in self.by_service.get(name).cloned().unwrap_or_default() {
                    if let Some(t) = self.tasks.remove(&id) {
                        self.orphans.insert(id, t);
                    }
                }
            }
            "tasks" => {
                self.draining.remove(name);
                let gone = self
                    .tasks
                    .remove(name)
                    .or_else(|| self.orphans.remove(name));
                if let Some(t) = gone {
                    if let Some(ids) = self.by_service.get_mut(&t.service) {
                        ids.remove(name);
                        if ids.is_empty() {
                            self.by_service.remove(&t.service);
                        }
                    }
                }
            }
            "nodes" => {
                self.nodes.remove(name);
            }
            "ipam" | "gwipam" => {
                self.holders.remove(k);
                if let Some((owner, ip)) = name.split_once('/') {
                    if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                        if kind == "ipam" {
                            self.reservations.remove(&(owner.to_string(), ip));
                        }
                        let map = if kind == "ipam" {
                            &mut self.ipam
                        } else {
                            &mut self.gwipam
                        };
                        if let Some(set) = map.get_mut(owner) {
                            set.remove(&ip);
                            if set.is_empty() {
                                map.remove(owner);
                            }
                        }
                    }
                }
            }
            "lbaddr" => {
                if let Some((net, node)) = name.split_once('/') {
                    if let Some(m) = self.lb_addrs.get_mut(net) {
                        m.remove(node);
                        if m.is_empty() {
                            self.lb_addrs.remove(net);
                        }
                    }
                }
            }
            "vni" => {
                if let Ok(vni) = name.parse::<u32>() {
                    self.vnis.remove(&vni);
                }
            }
            "ipamnext" | "gwipamnext" => {
                self.cursors.remove(k);
            }
            "alive" => {
                self.alive.remove(name);
            }
            "taskstatus" => {
                self.task_status.remove(name);
            }
            "taskhealth" => {
                self.task_health.remove(name);
            }
            "bindings" => {
                if let Some((frontend, id)) = name.split_once('/') {
                    if let Some(m) = self.bindings.get_mut(frontend) {
                        m.remove(id);
                        if m.is_empty() {
                            self.bindings.remove(frontend);
                        }
                    }
                }
            }
            "tasknames" => {
                self.task_names.remove(name);
            }
            "cluster" => self.cluster = None,
            _ => {}
        }
    }

    /// Adds a service record as its store key would (for states built by hand in tests of
    /// pure logic).
    pub fn insert_service(&mut self, svc: Service) {
        if !svc.publish.is_empty() {
            self.publishing.insert(svc.name.clone());
        }
        self.services.insert(svc.name.clone(), svc);
    }

    /// Adds a task record as its store key would (for states built by hand in tests of
    /// pure logic); its service decides whether it is live or an orphan.
    pub fn insert_task(&mut self, t: Task) {
        self.by_service
            .entry(t.service.clone())
            .or_default()
            .insert(t.id.clone());
        if t.draining.is_some() {
            self.draining.insert(t.id.clone());
        }
        if self.services.contains_key(&t.service) {
            self.tasks.insert(t.id.clone(), t);
        } else {
            self.orphans.insert(t.id.clone(), t);
        }
    }

    /// Whether task `id`'s node reported it up (see [`TaskStatus::up`]): only then does
    /// it join its service's VIPs and published ports, so no connection is sent to a
    /// task whose interfaces are not there yet.
    pub fn task_up(&self, id: &str) -> bool {
        self.task_status.get(id).is_some_and(TaskStatus::up)
    }

    /// The revision task `id`'s record was last written at (its drain's, for a draining
    /// task).
    pub fn task_revision(&self, id: &str) -> Option<u64> {
        self.revs.get(&key("tasks", id)).copied()
    }

    /// Every key the state holds (full keys, under `/netd/`), in key order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.revs.keys().map(String::as_str)
    }

    /// The tasks being drained (not their orphans: those go with their service).
    pub fn draining(&self) -> impl Iterator<Item = &Task> + '_ {
        self.draining.iter().filter_map(|id| self.tasks.get(id))
    }

    /// Whether task `t` takes new connections and is named in its service's DNS answers:
    /// its node is alive, its node reported it up, and it is not draining.
    pub fn in_service(&self, t: &Task) -> bool {
        self.node_alive(&t.node) && self.task_up(&t.id) && t.draining.is_none() && self.healthy(t)
    }

    /// Whether task `t` is out of new picks while the connections and UDP flows it has
    /// keep reaching it: its node is alive and reported it up, and it is draining or
    /// failing its health check (not a task still starting: it never had a pick). A task that fails a probe still answers what it has
    /// (kube-proxy keeps a not-ready endpoint's TCP connections the same way); cutting
    /// them would fail requests a task was serving.
    pub fn keeps_flows(&self, t: &Task) -> bool {
        let failing = !self.healthy(t) && self.task_health.contains_key(&t.id);
        self.node_alive(&t.node) && self.task_up(&t.id) && (t.draining.is_some() || failing)
    }

    /// Whether task `t` passes its service's health check: always without one; with
    /// one, once its node reported a success and until it reports it unhealthy.
    pub fn healthy(&self, t: &Task) -> bool {
        let checked = self
            .services
            .get(&t.service)
            .is_some_and(|s| s.health.is_some());
        !checked || self.task_health.get(&t.id).is_some_and(|h| h.healthy)
    }

    /// The services that publish ports.
    pub fn publishing(&self) -> impl Iterator<Item = &Service> + '_ {
        self.publishing.iter().filter_map(|n| self.services.get(n))
    }

    /// The tasks of `service` (not its orphans), by id.
    pub fn tasks_of<'a>(&'a self, service: &str) -> impl Iterator<Item = &'a Task> + 'a {
        self.by_service
            .get(service)
            .into_iter()
            .flat_map(|ids| ids.iter())
            .filter_map(|id| self.tasks.get(id))
    }

    /// The ids of `service`'s tasks and orphans.
    pub fn task_ids_of(&self, service: &str) -> OrdSet<String> {
        self.by_service.get(service).cloned().unwrap_or_default()
    }

    /// The task a store key is about, live or orphaned.
    pub fn any_task(&self, id: &str) -> Option<&Task> {
        self.tasks.get(id).or_else(|| self.orphans.get(id))
    }

    /// A compare that holds only if `key` is as this snapshot saw it.
    fn unchanged(&self, key: &str) -> Compare {
        match self.revs.get(key) {
            Some(rev) => Compare::Revision(key.to_string(), *rev),
            None => Compare::Absent(key.to_string()),
        }
    }

    /// The `ingress` network: there from the first node's start (see [`ensure_ingress`]),
    /// with every node's ingress sandbox on it.
    pub fn ingress(&self) -> Option<&Network> {
        self.networks.get(INGRESS)
    }

    pub fn node_alive(&self, name: &str) -> bool {
        self.alive.contains(name)
    }

    pub fn network(&self, name: &str) -> Result<&Network> {
        self.networks
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("network {name:?} not found")))
    }

    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("service {name:?} not found")))
    }

    /// Finds a task by id, unique id prefix, or name.
    pub fn task(&self, id_or_name: &str) -> Result<&Task> {
        if let Some(t) = self.tasks.get(id_or_name) {
            return Ok(t);
        }
        if let Some(t) = self
            .task_names
            .get(id_or_name)
            .and_then(|id| self.tasks.get(id))
        {
            return Ok(t);
        }
        let by_prefix: Vec<_> = self
            .tasks
            .values()
            .filter(|t| !id_or_name.is_empty() && t.id.starts_with(id_or_name))
            .collect();
        match by_prefix.as_slice() {
            [t] => Ok(t),
            [] => Err(Error::NotFound(format!("task {id_or_name:?} not found"))),
            _ => Err(Error::Invalid(format!(
                "task id prefix {id_or_name:?} is ambiguous"
            ))),
        }
    }

    /// Every subnet in use, labelled for error messages (networks and node gwbridges).
    fn taken_subnets(&self) -> Vec<(Ipv4Network, String)> {
        let mut taken: Vec<_> = self
            .networks
            .values()
            .map(|n| (n.subnet, format!("network {}", n.name)))
            .collect();
        for node in self.nodes.values() {
            let label = format!("the gwbridge of node {}", node.name);
            if !taken.iter().any(|(s, _)| *s == node.gwbridge_subnet) {
                taken.push((node.gwbridge_subnet, label));
            }
        }
        taken
    }
}

/// What a committed operation returns, with the store revision of its write: the API
/// waits for every node to have seen that revision before it answers.
#[derive(Debug, Clone)]
pub struct Committed<T> {
    pub value: T,
    pub revision: u64,
}

impl<T> std::ops::Deref for Committed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// Runs `attempt` until its transaction commits; `attempt` returns the writes to make and
/// the value to hand back once they stick.
/// The state comes from the node's view; a compare that fails means the store moved on,
/// so the next attempt waits for the view to move past what it saw. Once a write sticks,
/// the view holds it before this returns: whoever asked reads their own write.
/// Refuses a write to a store the node's view refused (see [`crate::identity`]): a
/// write computed from the last good state must not land in an emptied, replaced or
/// rolled-back store.
fn writable(view: &View) -> Result<()> {
    match view.refused() {
        Some(why) => Err(Error::StoreRefused(why)),
        None => Ok(()),
    }
}

async fn commit<T, F>(view: &View, mut attempt: F) -> Result<Committed<T>>
where
    F: FnMut(&State) -> Result<(Vec<Compare>, Vec<Op>, T)>,
{
    writable(view)?;
    let mut state = view.state();
    for _ in 0..MAX_RETRIES {
        let (compares, ops, value) = attempt(&state)?;
        match view.store().txn(compares, ops).await? {
            Some(revision) => {
                view.at_least(revision).await?;
                return Ok(Committed { value, revision });
            }
            None => state = view.at_least(state.revision + 1).await?,
        }
    }
    Err(Error::Contention)
}

/// The cluster's identity: the store's, or a new one if it has none yet (the first node
/// of a cluster, or the first after an upgrade).
pub async fn ensure_cluster_id(view: &View) -> Result<String> {
    if let Some(id) = view.state().cluster.clone() {
        return Ok(id);
    }
    let id = model::random_id(16);
    commit(view, |st| {
        let k = key("cluster", "id");
        match &st.cluster {
            Some(have) => Ok((vec![], vec![], have.clone())),
            None => Ok((
                vec![st.unchanged(&k)],
                vec![Op::Put(k, encode(&id))],
                id.clone(),
            )),
        }
    })
    .await
    .map(|c| c.value)
}

pub async fn register_node(view: &View, node: Node) -> Result<()> {
    commit(view, |st| {
        let k = key("nodes", &node.name);
        if let Some(old) = st.nodes.get(&node.name) {
            // Keep the gwbridge subnet stable: tasks already hold addresses in it.
            if old.gwbridge_subnet != node.gwbridge_subnet
                && st.gwipam.get(&node.name).is_some_and(|s| !s.is_empty())
            {
                return Err(Error::Conflict(format!(
                    "node {} has tasks on gwbridge subnet {}; it cannot change to {}",
                    node.name, old.gwbridge_subnet, node.gwbridge_subnet
                )));
            }
        }
        // A node's gwbridge subnet is taken like a network's: a network made at the same
        // moment must see it (one shared key, not a compare per node in every create).
        Ok((
            vec![st.unchanged(&k), st.unchanged(META_NETWORKS)],
            vec![
                Op::Put(k, encode(&node)),
                Op::Put(META_NETWORKS.into(), encode(&st.revision)),
            ],
            (),
        ))
    })
    .await
    .map(|_| ())
}

/// Publishes node `name`'s WireGuard keys: `public`, and `next` while it rotates to it.
pub async fn publish_node_keys(
    view: &View,
    name: &str,
    public: String,
    next: Option<String>,
) -> Result<()> {
    commit(view, |st| {
        let k = key("nodes", name);
        let mut node = st
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("node {name:?} not found")))?;
        node.public_key = Some(public.clone());
        node.next_public_key = next.clone();
        Ok((vec![st.unchanged(&k)], vec![Op::Put(k, encode(&node))], ()))
    })
    .await
    .map(|_| ())
}

/// Announces that this node's daemon is up, for as long as it lives (see `alive/`).
pub async fn announce_alive(store: &dyn Store, node: &str, ttl: std::time::Duration) -> Result<()> {
    let since = encode(&model::now_secs());
    Ok(store.put_ephemeral(&key("alive", node), since, ttl).await?)
}

/// The nodes whose daemon holds its liveness lease, read from `alive/` alone (cheap
/// enough to poll, unlike a whole-state read).
pub async fn alive_nodes(store: &dyn Store) -> Result<BTreeSet<String>> {
    let prefix = key("alive", "");
    Ok(store
        .list(&prefix)
        .await?
        .kvs
        .into_iter()
        .map(|kv| kv.key[prefix.len()..].to_string())
        .collect())
}

/// Records what this node's reconcile made of its tasks, for the ones whose status
/// changed. A task removed meanwhile gets no status (the compare on its record fails).
/// Returns the revision of the last status written, if any.
pub async fn publish_task_status(
    view: &View,
    st: &State,
    changed: Vec<(String, TaskStatus)>,
) -> Result<Option<u64>> {
    writable(view)?;
    let store = view.store();
    let mut last = None;
    for (id, status) in changed {
        let tk = key("tasks", &id);
        if !st.tasks.contains_key(&id) {
            continue;
        }
        let written = store
            .txn(
                vec![st.unchanged(&tk)],
                vec![Op::Put(key("taskstatus", &id), encode(&status))],
            )
            .await?;
        last = written.or(last);
    }
    Ok(last)
}

pub async fn create_network(
    view: &View,
    pools: &Pools,
    req: NetworkCreate,
) -> Result<Committed<Network>> {
    model::validate_dns_label("network", &req.name).map_err(Error::Invalid)?;
    if RESERVED_NETWORKS.contains(&req.name.as_str()) {
        return Err(Error::Invalid(format!(
            "network name {:?} is reserved by netd",
            req.name
        )));
    }
    let driver = req.driver.unwrap_or(Driver::Overlay);
    if req.encrypted && driver != Driver::Overlay {
        return Err(Error::Invalid(
            "--opt encrypted is for overlay networks: a bridge network's traffic never \
             leaves its node"
                .into(),
        ));
    }
    let subnet = match &req.subnet {
        Some(s) => Some(ipam::parse_subnet(s).map_err(Error::Invalid)?),
        None => None,
    };
    let gateway: Option<Ipv4Addr> = match &req.gateway {
        Some(g) => Some(
            g.parse()
                .map_err(|_| Error::Invalid(format!("invalid gateway address {g:?}")))?,
        ),
        None => None,
    };
    if gateway.is_some() && subnet.is_none() {
        return Err(Error::Invalid("--gateway needs --subnet".into()));
    }
    if let (Some(subnet), Some(gw)) = (subnet, gateway) {
        ipam::check_gateway(subnet, gw)?;
    }
    let id = model::random_id(12);
    commit(view, |st| {
        if st.networks.contains_key(&req.name) {
            return Err(Error::Conflict(format!(
                "network {:?} already exists",
                req.name
            )));
        }
        let spec = NetworkSpec {
            id: &id,
            name: &req.name,
            driver,
            subnet,
            gateway,
            attachable: req.attachable,
            internal: req.internal,
            encrypted: req.encrypted,
        };
        let mut compares = vec![st.unchanged(META_NETWORKS)];
        let mut ops = vec![Op::Put(META_NETWORKS.into(), encode(&st.revision))];
        let net = network_ops(st, pools, &spec, &mut compares, &mut ops)?;
        Ok((compares, ops, net))
    })
    .await
}

/// What a new network is made of, before the store has seen it.
struct NetworkSpec<'a> {
    id: &'a str,
    name: &'a str,
    driver: Driver,
    subnet: Option<Ipv4Network>,
    gateway: Option<Ipv4Addr>,
    attachable: bool,
    internal: bool,
    encrypted: bool,
}

/// The writes that create network `spec` (subnet, gateway, VNI), for one transaction.
fn network_ops(
    st: &State,
    pools: &Pools,
    spec: &NetworkSpec,
    compares: &mut Vec<Compare>,
    ops: &mut Vec<Op>,
) -> Result<Network> {
    let taken = st.taken_subnets();
    let subnet = match spec.subnet {
        Some(s) => {
            ipam::check_free(s, &taken)?;
            s
        }
        None => ipam::allocate_subnet(pools.pool, pools.size, &taken)?,
    };
    let gateway = spec
        .gateway
        .unwrap_or_else(|| ipam::default_gateway(subnet));
    let vni = match spec.driver {
        Driver::Overlay => Some(ipam::allocate_vni(|v| st.vnis.contains(v))?),
        Driver::Bridge => None,
    };
    let net = Network {
        id: spec.id.to_string(),
        name: spec.name.to_string(),
        driver: spec.driver,
        subnet,
        gateway,
        vni,
        attachable: spec.attachable,
        internal: spec.internal,
        created_at: model::now_secs(),
        encrypted: spec.encrypted,
    };
    let nk = key("networks", &net.name);
    let gk = key("ipam", &format!("{}/{gateway}", net.id));
    compares.push(Compare::Absent(nk.clone()));
    compares.push(Compare::Absent(gk.clone()));
    ops.push(Op::Put(nk, encode(&net)));
    ops.push(Op::Put(gk, b"\"gateway\"".to_vec()));
    if let Some(v) = vni {
        let vk = key("vni", &v.to_string());
        compares.push(Compare::Absent(vk.clone()));
        ops.push(Op::Put(vk, encode(&net.name)));
    }
    // The node gwbridges are part of `taken`: a node registering its gwbridge subnet
    // concurrently bumps META_NETWORKS, which every caller compares.
    Ok(net)
}

pub async fn remove_network(view: &View, name: &str) -> Result<Committed<Network>> {
    let removed = commit(view, |st| {
        let net = st.network(name)?.clone();
        if let Some(svc) = st
            .services
            .values()
            .find(|s| s.networks.contains(&net.name))
        {
            return Err(Error::InUse(format!(
                "network {name:?} is in use by service {:?}; remove the service first",
                svc.name
            )));
        }
        if let Some(t) = st
            .tasks
            .values()
            .find(|t| t.endpoints.iter().any(|e| e.network == net.name))
        {
            return Err(Error::InUse(format!(
                "network {name:?} still has task {:?} attached",
                t.name
            )));
        }
        // The network is gone with this transaction; its addresses (gateway,
        // reservations, nodes' LB addresses: any number) are keyed by its id, which no
        // later network has, and are released after it.
        let nk = key("networks", name);
        let mut ops = vec![
            Op::Delete(nk.clone()),
            Op::Put(META_NETWORKS.into(), encode(&st.revision)),
        ];
        if let Some(v) = net.vni {
            ops.push(Op::Delete(key("vni", &v.to_string())));
        }
        Ok((
            vec![st.unchanged(&nk), st.unchanged(META_NETWORKS)],
            ops,
            net,
        ))
    })
    .await?;
    release_later(view).await;
    Ok(removed)
}

/// The network that carries published ports in ingress mode between nodes.
pub const INGRESS: &str = "ingress";
/// Networks one service may be on: an attach on a node that needs LB addresses takes up
/// to 4 compares and 4 writes per network in its one transaction, plus one of each per
/// port the task brings (host mode, up to [`MAX_SERVICE_PORTS`]), and 7 more: 22 keep
/// the largest attach within etcd's default of 128 (see `create_service`).
pub const MAX_SERVICE_NETWORKS: usize = 22;
/// Ports one service may publish, its own and those its tasks bring (host mode).
pub const MAX_SERVICE_PORTS: usize = 32;

pub async fn create_service(
    view: &View,
    pools: &Pools,
    req: ServiceCreate,
) -> Result<Committed<Service>> {
    model::validate_dns_label("service", &req.name).map_err(Error::Invalid)?;
    for a in &req.aliases {
        model::validate_dns_label("alias", a).map_err(Error::Invalid)?;
    }
    if req.networks.is_empty() {
        return Err(Error::Invalid(format!(
            "service {:?} needs at least one --network",
            req.name
        )));
    }
    // One attach allocates on every network of its service, one create a VIP on each and
    // a key per port, all in one transaction: bounded so that it fits etcd's defaults.
    if req.networks.len() > MAX_SERVICE_NETWORKS || req.publish.len() > MAX_SERVICE_PORTS {
        return Err(Error::Invalid(format!(
            "service {:?}: at most {MAX_SERVICE_NETWORKS} networks and \
             {MAX_SERVICE_PORTS} published ports",
            req.name
        )));
    }
    let mut seen = BTreeSet::new();
    for n in &req.networks {
        if !seen.insert(n) {
            return Err(Error::Invalid(format!("network {n:?} given twice")));
        }
        // Docker refuses it too: its tasks' leg on it comes with the service's ports.
        if n == INGRESS {
            return Err(Error::Invalid(format!(
                "service {:?}: network {INGRESS:?} carries the routing mesh; a service is \
                 on it by publishing a port in ingress mode, not by naming it",
                req.name
            )));
        }
    }
    let mode = req.endpoint_mode.unwrap_or(EndpointMode::Vip);
    check_publish(&req.publish, mode)?;
    if let Some(h) = &req.health {
        h.probe().map_err(Error::Invalid)?;
    }
    let id = model::random_id(12);
    let ingress_id = model::random_id(12);
    commit(view, |st| {
        if st.services.contains_key(&req.name) {
            return Err(Error::Conflict(format!(
                "service {:?} already exists",
                req.name
            )));
        }
        // Orphans are recognised by their service's name: a new service of that name
        // would adopt them.
        if st.orphans.values().any(|t| t.service == req.name) {
            return Err(Error::Conflict(format!(
                "the tasks of an earlier service {:?} are still being released; try again \
                 in a moment",
                req.name
            )));
        }
        if let Some((p, other)) = req.publish.iter().find_map(|p| {
            st.services
                .values()
                .find(|s| {
                    s.publish
                        .iter()
                        .any(|q| q.published == p.published && q.protocol == p.protocol)
                })
                .map(|s| (p, s))
        }) {
            return Err(Error::Conflict(format!(
                "port {}/{} is already published by service {:?}",
                p.published,
                p.protocol.as_str(),
                other.name
            )));
        }
        let sk = key("services", &req.name);
        let mut compares = vec![Compare::Absent(sk.clone()), st.unchanged(META_NETWORKS)];
        let mut ops = vec![];
        // A published port is the cluster's: two services racing for it must not both win.
        for p in &req.publish {
            let pk = key("ports", &format!("{}-{}", p.protocol.as_str(), p.published));
            compares.push(Compare::Absent(pk.clone()));
            ops.push(Op::Put(pk, encode(&req.name)));
        }
        if req.publish.iter().any(|p| p.mode == PublishMode::Ingress)
            && !st.networks.contains_key(INGRESS)
        {
            ingress_ops(st, pools, &ingress_id, &mut compares, &mut ops)?;
        }
        no_publish_if_internal(st, &req.name, &req.networks, &req.publish)?;
        let mut vips = BTreeMap::new();
        let mut serial = Serial::default();
        for n in &req.networks {
            let net = st.network(n)?;
            compares.push(st.unchanged(&key("networks", n)));
            if mode == EndpointMode::Vip {
                let used = st.ipam.get(&net.id).cloned().unwrap_or_default();
                let vip = serial.take_on(st, net, &used)?;
                let ik = key("ipam", &format!("{}/{vip}", net.id));
                compares.push(Compare::Absent(ik.clone()));
                ops.push(Op::Put(ik, encode(&format!("vip:{}", req.name))));
                vips.insert(n.clone(), vip);
            }
        }
        serial.finish(&mut ops);
        let svc = Service {
            id: id.clone(),
            name: req.name.clone(),
            networks: req.networks.clone(),
            endpoint_mode: mode,
            aliases: req.aliases.clone(),
            publish: req.publish.clone(),
            vips,
            created_at: model::now_secs(),
            health: req.health.clone(),
        };
        ops.push(Op::Put(sk, encode(&svc)));
        Ok((compares, ops, svc))
    })
    .await
}

/// Published ports of one request: each port once, a target port, and ingress mode
/// only with a VIP (as Docker refuses ingress ports on dnsrr services).
fn check_publish(publish: &[PortSpec], mode: EndpointMode) -> Result<()> {
    let mut seen = BTreeSet::new();
    for p in publish {
        if p.published == 0 || p.target == 0 {
            return Err(Error::Invalid(format!(
                "publish {}:{}: ports must be from 1 to 65535",
                p.published, p.target
            )));
        }
        if !seen.insert((p.published, p.protocol.as_str())) {
            return Err(Error::Invalid(format!(
                "port {}/{} is published twice",
                p.published,
                p.protocol.as_str()
            )));
        }
        if p.mode == PublishMode::Ingress && mode == EndpointMode::Dnsrr {
            return Err(Error::Invalid(format!(
                "port {} is published in ingress mode, which needs --endpoint-mode vip \
                 (use mode=host with dnsrr)",
                p.published
            )));
        }
    }
    Ok(())
}

/// Makes the `ingress` network exist from the moment `node` joins (Docker makes it at
/// `swarm init`), and gives `node` its address on it. The first node to start creates it,
/// with an address for every node known then; two starting at once race on the
/// network's key, and the loser only adds its address.
pub async fn ensure_ingress(view: &View, pools: &Pools, node: &str) -> Result<()> {
    let id = model::random_id(12);
    commit(view, |st| {
        if st.networks.contains_key(INGRESS) {
            return Ok((vec![], vec![], ()));
        }
        let mut compares = vec![st.unchanged(META_NETWORKS)];
        let mut ops = vec![];
        ingress_ops(st, pools, &id, &mut compares, &mut ops)?;
        Ok((compares, ops, ()))
    })
    .await?;
    commit(view, |st| {
        let net = st.network(INGRESS)?;
        let mut compares = vec![st.unchanged(&key("networks", INGRESS))];
        let mut ops = vec![];
        let taken = st.ipam.get(&net.id).cloned().unwrap_or_default();
        let mut serial = Serial::default();
        lb_address_ops(st, node, net, &taken, &mut serial, &mut compares, &mut ops)?;
        serial.finish(&mut ops);
        Ok((compares, ops, ()))
    })
    .await?;
    Ok(())
}

/// The writes that make the `ingress` network: at a node's start, or with the first
/// service that publishes in ingress mode if it could not be made then. Each node takes
/// its own address on it (its ingress sandbox's) in a transaction of its own
/// ([`ensure_ingress`], or its reconcile), so the network costs the same however many
/// nodes there are.
fn ingress_ops(
    st: &State,
    pools: &Pools,
    id: &str,
    compares: &mut Vec<Compare>,
    ops: &mut Vec<Op>,
) -> Result<()> {
    let spec = NetworkSpec {
        id,
        name: INGRESS,
        driver: Driver::Overlay,
        subnet: Some(pools.ingress),
        gateway: None,
        attachable: false,
        internal: false,
        encrypted: pools.ingress_encrypted,
    };
    network_ops(st, pools, &spec, compares, ops)?;
    ops.push(Op::Put(META_NETWORKS.into(), encode(&st.revision)));
    Ok(())
}

/// The store writes that release everything a task holds: its records, and the address
/// keys that are still its own (a network removed and made again under the same name,
/// or a node's gwbridge, may have handed the same address to someone else since).
fn task_release_ops(st: &State, task: &Task) -> Vec<Op> {
    let mut ops = vec![
        Op::Delete(key("tasks", &task.id)),
        Op::Delete(key("tasknames", &task.name)),
        Op::Delete(key("taskstatus", &task.id)),
        Op::Delete(key("taskhealth", &task.id)),
    ];
    let mine = format!("task:{}", task.id);
    for ep in &task.endpoints {
        let k = if ep.network == GWBRIDGE {
            key("gwipam", &format!("{}/{}", task.node, ep.ip))
        } else if let Some(net) = st.networks.get(&ep.network) {
            key("ipam", &format!("{}/{}", net.id, ep.ip))
        } else {
            continue;
        };
        if st.holders.get(&k) == Some(&mine) {
            ops.push(Op::Delete(k));
        }
    }
    ops
}

/// Removes a service and detaches all its tasks (as `docker service rm` does). The
/// service, its ports and its VIPs go in one transaction, which is the moment every
/// reader stops seeing its tasks too ([`State::orphans`]); the tasks are released after,
/// in transactions etcd takes at its defaults, however many there are.
pub async fn remove_service(view: &View, name: &str) -> Result<Committed<Service>> {
    let removed = commit(view, |st| {
        let svc = st.service(name)?.clone();
        let sk = key("services", name);
        let compares = vec![st.unchanged(&sk)];
        let mut ops = vec![Op::Delete(sk)];
        for p in &svc.publish {
            ops.push(Op::Delete(key(
                "ports",
                &format!("{}-{}", p.protocol.as_str(), p.published),
            )));
        }
        for (net, vip) in &svc.vips {
            if let Some(n) = st.networks.get(net) {
                ops.push(Op::Delete(key("ipam", &format!("{}/{vip}", n.id))));
            }
        }
        Ok((compares, ops, svc))
    })
    .await?;
    release_later(view).await;
    Ok(removed)
}

/// What [`collect_garbage`] releases in one transaction, and how many records.
fn garbage_batch(st: &State) -> (Vec<Compare>, Vec<Op>, usize) {
    let mut compares = vec![];
    let mut ops: Vec<Op> = vec![];
    let mut count = 0;
    for t in st.orphans.values() {
        let release = task_release_ops(st, t);
        if ops.len() + release.len() > MAX_TXN_OPS || compares.len() == MAX_TXN_OPS {
            return (compares, ops, count);
        }
        compares.push(st.unchanged(&key("tasks", &t.id)));
        ops.extend(release);
        count += 1;
    }
    // Addresses and LB addresses of networks that are gone (by id: never reused).
    let live: BTreeSet<&str> = st.networks.values().map(|n| n.id.as_str()).collect();
    let gone_ipam = st
        .ipam
        .iter()
        .filter(|(id, _)| !live.contains(id.as_str()))
        .flat_map(|(id, ips)| ips.iter().map(move |ip| key("ipam", &format!("{id}/{ip}"))));
    let gone_lb = st
        .lb_addrs
        .iter()
        .filter(|(id, _)| !live.contains(id.as_str()))
        .flat_map(|(id, nodes)| {
            nodes
                .keys()
                .map(move |node| key("lbaddr", &format!("{id}/{node}")))
        });
    let gone_cursors = st.cursors.keys().filter(|k| {
        k.strip_prefix(ROOT)
            .and_then(|r| r.strip_prefix("ipamnext/"))
            .is_some_and(|id| !live.contains(id))
    });
    for k in gone_ipam.chain(gone_lb).chain(gone_cursors.cloned()) {
        if ops.len() == MAX_TXN_OPS {
            break;
        }
        ops.push(Op::Delete(k));
        count += 1;
    }
    (compares, ops, count)
}

/// After a removal committed: release what hung on it now. A failure here does not undo
/// or fail the removal (it is done); the daemons' periodic collection finishes the work.
async fn release_later(view: &View) {
    if let Err(e) = collect_garbage(view).await {
        tracing::warn!("release what a removal left (will retry): {e}");
    }
}

/// Releases what a removal left for later: the tasks of removed services (with their
/// addresses and names) and the addresses of removed networks, a bounded transaction at
/// a time. Idempotent, and safe on any node at once (a task changed under a batch fails
/// its compare and is read again); run after every removal and at a daemon's start, which
/// finishes the work of a remover that died half-way. Returns how many records it freed.
pub async fn collect_garbage(view: &View) -> Result<usize> {
    writable(view)?;
    let mut freed = 0;
    let mut misses = 0;
    let mut st = view.state();
    loop {
        let (compares, ops, count) = garbage_batch(&st);
        if count == 0 {
            return Ok(freed);
        }
        st = match view.store().txn(compares, ops).await? {
            Some(revision) => {
                freed += count;
                view.at_least(revision).await?
            }
            None => {
                misses += 1;
                if misses >= MAX_RETRIES {
                    return Err(Error::Contention);
                }
                view.at_least(st.revision + 1).await?
            }
        };
    }
}

/// Records a task attachment. `local_node` is the daemon's own node; the kernel work is
/// done by the reconciler of the task's node.
pub async fn attach_task(
    view: &View,
    local_node: &str,
    req: TaskAttach,
) -> Result<Committed<Task>> {
    if let Some(n) = &req.name {
        model::validate_dns_label("task", n).map_err(Error::Invalid)?;
    }
    if !req.netns.starts_with('/') {
        return Err(Error::Invalid(format!(
            "--netns must be an absolute path, got {:?}",
            req.netns
        )));
    }
    if let Some(i) = &req.ifname {
        model::validate_ifname(i).map_err(Error::Invalid)?;
    }
    model::validate_labels(&req.labels).map_err(Error::Invalid)?;
    if let Some(p) = req.publish.iter().find(|p| p.mode != PublishMode::Host) {
        return Err(Error::Invalid(format!(
            "port {}/{} comes with a task, so it is published in host mode only \
             (publish ingress-mode ports with the service)",
            p.published,
            p.protocol.as_str()
        )));
    }
    check_publish(&req.publish, EndpointMode::Dnsrr)?;
    let node_name = req.node.clone().unwrap_or_else(|| local_node.to_string());
    let id = model::random_id(16);
    commit(view, |st| {
        let svc = st.service(&req.service)?;
        let node = st.nodes.get(&node_name).ok_or_else(|| {
            Error::NotFound(format!("node {node_name:?} is not part of this cluster"))
        })?;
        if !st.node_alive(&node_name) {
            return Err(Error::Conflict(format!(
                "node {node_name:?} is down: its daemon does not hold its lease"
            )));
        }
        if let Some(other) = st
            .tasks
            .values()
            .find(|t| t.node == node_name && t.netns == req.netns)
        {
            return Err(Error::Conflict(format!(
                "netns {} is already attached as task {:?}",
                req.netns, other.name
            )));
        }
        let networks: Vec<&String> = match &req.network {
            None => svc.networks.iter().collect(),
            Some(n) => {
                // Another network than the service's only if it is attachable (Docker's
                // rule for containers that are not the service's).
                if !svc.networks.contains(n) && !st.network(n)?.attachable {
                    return Err(Error::Invalid(format!(
                        "service {:?} is not on network {n:?} (its networks: {}), and {n:?} \
                         is not attachable",
                        svc.name,
                        svc.networks.join(", ")
                    )));
                }
                vec![n]
            }
        };
        let name = match &req.name {
            Some(n) => n.clone(),
            // Task names (orphans' too) are an index: the first free slot is a lookup
            // per slot, not a scan of every task.
            None => (1..)
                .map(|i| format!("{}-{i}", svc.name))
                .find(|n| !st.task_names.contains_key(n))
                .unwrap_or_default(),
        };
        let holder = st.task_names.get(&name);
        if holder.is_some_and(|id| st.tasks.contains_key(id)) {
            return Err(Error::Conflict(format!("task name {name:?} is taken")));
        }
        if holder.is_some_and(|id| st.orphans.contains_key(id)) {
            return Err(Error::Conflict(format!(
                "task name {name:?} belongs to a task of a removed service that is still \
                 being released; try again in a moment"
            )));
        }
        let tk = key("tasks", &id);
        let nk = key("tasknames", &name);
        let mut compares = vec![
            Compare::Absent(tk.clone()),
            Compare::Absent(nk.clone()),
            st.unchanged(&key("services", &svc.name)),
            st.unchanged(&key("nodes", &node_name)),
        ];
        let mut ops = vec![Op::Put(nk, encode(&id))];
        publish_with_task(st, svc, &req.publish, &mut compares, &mut ops)?;
        if (req.address.is_some() || req.handoff) && networks.len() != 1 {
            return Err(Error::Invalid(
                "an address or a handed-over interface needs exactly one network".into(),
            ));
        }
        let mut legs: Vec<(&str, Ipv4Addr, u8)> = vec![];
        let mut default_gateway = None;
        let mut needs_gwbridge = false;
        let mut serial = Serial::default();
        for netname in networks {
            let net = st.network(netname)?;
            compares.push(st.unchanged(&key("networks", netname)));
            let used = st.ipam.get(&net.id).cloned().unwrap_or_default();
            let ip = match req.address {
                Some(ip) => {
                    if !st.reservations.contains_key(&(net.id.clone(), ip)) {
                        return Err(Error::Conflict(format!(
                            "address {ip} on network {netname:?} is not reserved for a task"
                        )));
                    }
                    ip
                }
                None => serial.take_on(st, net, &used)?,
            };
            let ik = key("ipam", &format!("{}/{ip}", net.id));
            compares.push(st.unchanged(&ik));
            ops.push(Op::Put(ik, encode(&format!("task:{id}"))));
            if !net.internal {
                match net.driver {
                    // A bridge network gives egress itself, as Docker's bridge does.
                    Driver::Bridge if default_gateway.is_none() => {
                        default_gateway = Some(net.gateway)
                    }
                    Driver::Overlay => needs_gwbridge = true,
                    Driver::Bridge => {}
                }
            }
            let mut taken = used.clone();
            taken.insert(ip);
            if node.lb_addresses && net.driver == Driver::Overlay {
                lb_address_ops(
                    st,
                    &node_name,
                    net,
                    &taken,
                    &mut serial,
                    &mut compares,
                    &mut ops,
                )?;
            }
            legs.push((netname, ip, net.subnet.prefix()));
        }
        // Tasks of a service with ingress-mode ports sit on the ingress network too:
        // that is where every node's ingress sandbox reaches them.
        if svc.publish.iter().any(|p| p.mode == PublishMode::Ingress) {
            let net = st.network(INGRESS)?;
            compares.push(st.unchanged(&key("networks", INGRESS)));
            let used = st.ipam.get(&net.id).cloned().unwrap_or_default();
            let ip = serial.take_on(st, net, &used)?;
            let ik = key("ipam", &format!("{}/{ip}", net.id));
            compares.push(Compare::Absent(ik.clone()));
            ops.push(Op::Put(ik, encode(&format!("task:{id}"))));
            legs.push((INGRESS, ip, net.subnet.prefix()));
            needs_gwbridge = true;
        }
        if default_gateway.is_none() && needs_gwbridge {
            let subnet = node.gwbridge_subnet;
            let gw = ipam::default_gateway(subnet);
            let mut used = st.gwipam.get(&node_name).cloned().unwrap_or_default();
            used.insert(gw);
            used.insert(ipam::ingress_sbox_address(subnet));
            used.insert(ipam::ingress_sbox_local_address(subnet));
            let ip = serial.take(
                st,
                &format!("the gwbridge of node {node_name:?}"),
                gwbridge_cursor(&node_name),
                subnet,
                &used,
            )?;
            let ik = key("gwipam", &format!("{node_name}/{ip}"));
            compares.push(Compare::Absent(ik.clone()));
            ops.push(Op::Put(ik, encode(&format!("task:{id}"))));
            legs.push((GWBRIDGE, ip, subnet.prefix()));
            default_gateway = Some(gw);
        }
        serial.finish(&mut ops);
        let ifnames = interface_names(legs.len(), req.ifname.as_deref().unwrap_or("eth0"));
        let endpoints = legs
            .iter()
            .zip(ifnames)
            .map(|((network, ip, prefix), ifname)| endpoint(network, *ip, *prefix, ifname))
            .collect();
        let task = Task {
            id: id.clone(),
            name,
            service: svc.name.clone(),
            node: node_name.clone(),
            netns: req.netns.clone(),
            endpoints,
            default_gateway,
            labels: req.labels.clone(),
            handoff: req.handoff,
            draining: None,
            created_at: model::now_secs(),
        };
        ops.push(Op::Put(tk, encode(&task)));
        Ok((compares, ops, task))
    })
    .await
}

/// Interface names for `count` endpoints: the first is `first`, the others the lowest
/// free `ethN` (so `net1` as the first gives `net1, eth0, eth1`, `eth0` gives `eth0, eth1`).
fn interface_names(count: usize, first: &str) -> Vec<String> {
    let mut names = vec![first.to_string()];
    let mut n = 0;
    while names.len() < count {
        let candidate = format!("eth{n}");
        if candidate != first {
            names.push(candidate);
        }
        n += 1;
    }
    names.truncate(count);
    names
}

/// An internal network has no way in or out; a published port on every node would be one
/// (the mesh or a host port), so a service that lives only on internal networks publishes
/// nothing.
fn no_publish_if_internal(
    st: &State,
    service: &str,
    networks: &[String],
    publish: &[PortSpec],
) -> Result<()> {
    let all_internal = networks
        .iter()
        .all(|n| st.network(n).is_ok_and(|net| net.internal));
    if publish.is_empty() || !all_internal {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "service {service:?} is only on --internal networks, which have no way in: it \
         cannot publish ports (attach it to a non-internal network too)"
    )))
}

/// Adds to `svc` the host-mode ports a task brings that it does not publish yet. The same
/// port with the same target is already there; anything else holding the port is a
/// conflict.
fn publish_with_task(
    st: &State,
    svc: &Service,
    publish: &[PortSpec],
    compares: &mut Vec<Compare>,
    ops: &mut Vec<Op>,
) -> Result<()> {
    no_publish_if_internal(st, &svc.name, &svc.networks, publish)?;
    let mut updated = svc.clone();
    for p in publish {
        let same_port = |q: &&PortSpec| q.published == p.published && q.protocol == p.protocol;
        if let Some(q) = svc.publish.iter().find(same_port) {
            if q != p {
                return Err(Error::Conflict(format!(
                    "service {:?} publishes port {}/{} as {}:{} in {} mode already",
                    svc.name,
                    p.published,
                    p.protocol.as_str(),
                    q.published,
                    q.target,
                    if q.mode == PublishMode::Host {
                        "host"
                    } else {
                        "ingress"
                    },
                )));
            }
            continue;
        }
        if let Some(other) = st
            .services
            .values()
            .find(|s| s.name != svc.name && s.publish.iter().any(|q| same_port(&q)))
        {
            return Err(Error::Conflict(format!(
                "port {}/{} is already published by service {:?}",
                p.published,
                p.protocol.as_str(),
                other.name
            )));
        }
        let pk = key("ports", &format!("{}-{}", p.protocol.as_str(), p.published));
        compares.push(Compare::Absent(pk.clone()));
        ops.push(Op::Put(pk, encode(&svc.name)));
        updated.publish.push(*p);
    }
    if updated.publish.len() > MAX_SERVICE_PORTS {
        return Err(Error::Invalid(format!(
            "service {:?} would publish {} ports: at most {MAX_SERVICE_PORTS}",
            svc.name,
            updated.publish.len()
        )));
    }
    if updated.publish.len() != svc.publish.len() {
        ops.push(Op::Put(key("services", &svc.name), encode(&updated)));
    }
    Ok(())
}

/// Reserves `node`'s load-balancer address on overlay `net` unless it has one; `taken`
/// holds the addresses this transaction already hands out.
fn lb_address_ops(
    st: &State,
    node: &str,
    net: &Network,
    taken: &OrdSet<Ipv4Addr>,
    serial: &mut Serial,
    compares: &mut Vec<Compare>,
    ops: &mut Vec<Op>,
) -> Result<()> {
    let lk = key("lbaddr", &format!("{}/{node}", net.id));
    if st
        .lb_addrs
        .get(&net.id)
        .is_some_and(|m| m.contains_key(node))
    {
        compares.push(st.unchanged(&lk));
        return Ok(());
    }
    let ip = serial.take_on(st, net, taken)?;
    let ik = key("ipam", &format!("{}/{ip}", net.id));
    compares.push(Compare::Absent(ik.clone()));
    compares.push(Compare::Absent(lk.clone()));
    ops.push(Op::Put(ik, encode(&format!("lb:{node}"))));
    ops.push(Op::Put(lk, encode(&ip)));
    Ok(())
}

/// Gives `node` a load-balancer address on each overlay in `networks` that lacks one (a
/// node that switched to the userspace datapath with tasks already attached).
pub async fn ensure_lb_addresses(
    view: &View,
    node: &str,
    networks: &[String],
) -> Result<Option<u64>> {
    let st = view.state();
    let missing = networks.iter().any(|n| {
        st.networks.get(n).is_some_and(|net| {
            !st.lb_addrs
                .get(&net.id)
                .is_some_and(|m| m.contains_key(node))
        })
    });
    if !missing {
        return Ok(None);
    }
    // Each network takes up to 3 compares and 3 writes: a chunk of 32 fits a transaction
    // at etcd's defaults. The addresses are independent, so chunks need not commit
    // together.
    let mut revision = None;
    for chunk in networks.chunks(32) {
        let done = commit(view, |st| {
            let mut compares = vec![];
            let mut ops = vec![];
            let mut serial = Serial::default();
            for n in chunk {
                let Some(net) = st.networks.get(n) else {
                    continue;
                };
                compares.push(st.unchanged(&key("networks", n)));
                let taken = st.ipam.get(&net.id).cloned().unwrap_or_default();
                lb_address_ops(st, node, net, &taken, &mut serial, &mut compares, &mut ops)?;
            }
            serial.finish(&mut ops);
            Ok((compares, ops, ()))
        })
        .await?;
        revision = Some(done.revision);
    }
    Ok(revision)
}

fn endpoint(network: &str, ip: Ipv4Addr, prefix: u8, ifname: String) -> Endpoint {
    Endpoint {
        id: model::random_id(10),
        network: network.to_string(),
        ip,
        prefix,
        mac: model::format_mac(&model::mac_for_ip(ip)),
        ifname,
    }
}

pub async fn detach_task(view: &View, id_or_name: &str) -> Result<Committed<Task>> {
    commit(view, |st| {
        let task = st.task(id_or_name)?.clone();
        let compares = vec![st.unchanged(&key("tasks", &task.id))];
        let ops = task_release_ops(st, &task);
        Ok((compares, ops, task))
    })
    .await
}

/// Records what task `id`'s health check found (its node, on a change). A task removed
/// meanwhile gets no record (the compare on the task fails).
pub async fn publish_task_health(
    view: &View,
    st: &State,
    id: &str,
    health: &TaskHealth,
) -> Result<Option<u64>> {
    writable(view)?;
    if !st.tasks.contains_key(id) {
        return Ok(None);
    }
    Ok(view
        .store()
        .txn(
            vec![st.unchanged(&key("tasks", id))],
            vec![Op::Put(key("taskhealth", id), encode(health))],
        )
        .await?)
}

/// The longest drain a detach may ask for: a day.
pub const MAX_DRAIN_SECS: u64 = 86_400;

/// Starts a graceful detach of task `id_or_name`: out of new picks and DNS answers on
/// every node at once (the write is acknowledged like any other), removed by its node
/// once its connections are gone or after `seconds`. A drain already under way keeps
/// its start and the earlier of the two deadlines.
pub async fn drain_task(view: &View, id_or_name: &str, seconds: u64) -> Result<Committed<Task>> {
    if seconds > MAX_DRAIN_SECS {
        return Err(Error::Invalid(format!(
            "a drain of {seconds} s is longer than the {MAX_DRAIN_SECS} s netd allows"
        )));
    }
    let now = model::now_secs();
    commit(view, |st| {
        let mut task = st.task(id_or_name)?.clone();
        let until = now.saturating_add(seconds);
        task.draining = Some(match task.draining {
            Some(d) => Drain {
                since: d.since,
                until: d.until.min(until),
            },
            None => Drain { since: now, until },
        });
        let k = key("tasks", &task.id);
        Ok((
            vec![st.unchanged(&k)],
            vec![Op::Put(k, encode(&task))],
            task,
        ))
    })
    .await
}

/// The holder prefix of a reserved address (`ipam/NET/IP` = "reserved:OWNER").
const RESERVED: &str = "reserved:";

/// Reserves an address on `network` for `owner` before any task holds it: Docker's IPAM
/// hands out a container's address before the container exists. `address` picks one
/// (an address already reserved is handed to the new owner); else the next free one. The
/// gateway is answered as is (it is the network's, never a task's).
pub async fn reserve_address(
    view: &View,
    network: &str,
    address: Option<Ipv4Addr>,
    owner: &str,
) -> Result<Committed<(Ipv4Addr, u8)>> {
    model::validate_token("reservation owner", owner).map_err(Error::Invalid)?;
    commit(view, |st| {
        let net = st.network(network)?;
        let used = st.ipam.get(&net.id).cloned().unwrap_or_default();
        let mut serial = Serial::default();
        let ip = match address {
            Some(ip) if ip == net.gateway => {
                return Ok((vec![], vec![], (ip, net.subnet.prefix())))
            }
            Some(ip) => {
                if !net.subnet.contains(ip)
                    || ip == net.subnet.network()
                    || ip == net.subnet.broadcast()
                {
                    return Err(Error::Invalid(format!(
                        "address {ip} is not a host address of network {network:?} ({})",
                        net.subnet
                    )));
                }
                if used.contains(&ip) && !st.reservations.contains_key(&(net.id.clone(), ip)) {
                    return Err(Error::Conflict(format!(
                        "address {ip} on network {network:?} is in use"
                    )));
                }
                ip
            }
            None => serial.take_on(st, net, &used)?,
        };
        let ik = key("ipam", &format!("{}/{ip}", net.id));
        let compares = vec![st.unchanged(&ik), st.unchanged(&key("networks", network))];
        let mut ops = vec![Op::Put(ik, encode(&format!("{RESERVED}{owner}")))];
        serial.finish(&mut ops);
        Ok((compares, ops, (ip, net.subnet.prefix())))
    })
    .await
}

/// Releases a reservation (of `owner`, when given). Returns whether there was one; an
/// address a task holds is left alone (the task's detach frees it).
pub async fn release_address(
    view: &View,
    network: &str,
    ip: Ipv4Addr,
    owner: Option<&str>,
) -> Result<Committed<bool>> {
    commit(view, |st| {
        let net = st.network(network)?;
        let held = st.reservations.get(&(net.id.clone(), ip));
        if held.is_none() || owner.is_some_and(|o| held.map(String::as_str) != Some(o)) {
            return Ok((vec![], vec![], false));
        }
        let ik = key("ipam", &format!("{}/{ip}", net.id));
        Ok((vec![st.unchanged(&ik)], vec![Op::Delete(ik)], true))
    })
    .await
}

impl State {
    /// The network and address reserved by `owner`, if any.
    pub fn reservation_of(&self, owner: &str) -> Option<(&Network, Ipv4Addr)> {
        let ((net_id, ip), _) = self
            .reservations
            .iter()
            .find(|(_, o)| o.as_str() == owner)?;
        let net = self.networks.values().find(|n| &n.id == net_id)?;
        Some((net, *ip))
    }

    /// The next subnet `create_network` would carve from the pool, without taking it
    /// (Docker's IPAM asks for a pool before the network exists).
    pub fn free_subnet(&self, pools: &Pools) -> Result<Ipv4Network> {
        Ok(ipam::allocate_subnet(
            pools.pool,
            pools.size,
            &self.taken_subnets(),
        )?)
    }
}

/// Records what front end `frontend` bound to its own id (`value` None: removes it).
pub async fn bind(
    view: &View,
    frontend: &str,
    id: &str,
    value: Option<&serde_json::Value>,
) -> Result<Committed<()>> {
    model::validate_token("binding front end", frontend).map_err(Error::Invalid)?;
    model::validate_token("binding id", id).map_err(Error::Invalid)?;
    let k = key("bindings", &format!("{frontend}/{id}"));
    let op = match value {
        Some(v) => Op::Put(k, encode(v)),
        None => Op::Delete(k),
    };
    commit(view, |_| Ok((vec![], vec![op.clone()], ()))).await
}

/// Stores with registered, live nodes, for unit tests of code built on the state.
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;
    use crate::store::local::LocalStore;

    /// Network `front` and service `web` (VIP mode) on it.
    pub async fn web_on_front(s: &View) -> Service {
        create_network(
            s,
            &pools(),
            NetworkCreate {
                name: "front".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        create_service(
            s,
            &pools(),
            ServiceCreate {
                name: "web".into(),
                networks: vec!["front".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .value
    }

    pub fn pools() -> Pools {
        Pools {
            ingress: "198.19.255.0/24".parse().unwrap(),
            pool: "198.19.0.0/16".parse().unwrap(),
            size: 24,
            ingress_encrypted: false,
        }
    }

    /// Registers node `name` (gwbridge 198.18.1.0/24) and marks it alive.
    pub async fn add_node(store: &View, name: &str) {
        register_node(
            store,
            Node {
                name: name.into(),
                address: Some("198.18.0.11".parse().unwrap()),
                gwbridge_subnet: "198.18.1.0/24".parse().unwrap(),
                started_at: 0,
                lb_addresses: false,
                public_key: None,
                next_public_key: None,
                wireguard_port: None,
            },
        )
        .await
        .unwrap();
        announce_alive(store.store(), name, std::time::Duration::from_secs(10))
            .await
            .unwrap();
    }

    /// A view of a local store with node `n1`.
    pub async fn setup() -> (tempfile::TempDir, std::sync::Arc<View>) {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(LocalStore::open(dir.path()).unwrap());
        let view = View::open(store).await.unwrap();
        add_node(&view, "n1").await;
        (dir, view)
    }

    /// Publishes tasks `ids` as up, as their node's reconcile would, and waits for the
    /// view to have it.
    pub async fn report_up(view: &View, ids: &[&str]) {
        let st = view.state();
        let up = ids
            .iter()
            .map(|id| {
                let status = TaskStatus {
                    error: None,
                    pending: false,
                };
                (id.to_string(), status)
            })
            .collect();
        if let Some(rev) = publish_task_status(view, &st, up).await.unwrap() {
            view.at_least(rev).await.unwrap();
        }
    }

    /// An attach of a task of `service` in `netns` on `node`.
    pub fn attach(service: &str, netns: &str, node: &str) -> TaskAttach {
        TaskAttach {
            service: service.into(),
            netns: netns.into(),
            node: Some(node.into()),
            ..Default::default()
        }
    }

    /// A view of a test's store.
    pub async fn view(s: &crate::store::testing::SharedStore) -> std::sync::Arc<View> {
        View::open(s.clone()).await.unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{self, add_node, pools, web_on_front};
    use super::*;
    use crate::store::testing::{store_test, SharedStore};

    fn net(name: &str) -> NetworkCreate {
        NetworkCreate {
            name: name.into(),
            ..Default::default()
        }
    }

    use super::fixture::attach;

    fn backends(st: &State) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
        let t = crate::datapath::LbTable::from_state(st);
        let e = t.vips.values().next().expect("one VIP");
        (e.backends.clone(), e.draining.clone())
    }

    /// A drain takes the task out of new picks (its address moves to the VIP's
    /// `draining`, where flows stay) at once; a second drain keeps the earlier deadline.
    #[tokio::test]
    async fn a_drain_takes_a_task_out_of_service_and_keeps_the_earlier_deadline() {
        let (_dir, v) = fixture::setup().await;
        web_on_front(&v).await;
        let t = attach_task(&v, "n1", attach("web", "/run/netns/a", "n1"))
            .await
            .unwrap();
        fixture::report_up(&v, &[&t.id]).await;
        let ip = t.value.endpoints[0].ip;
        assert_eq!(backends(&v.state()), (vec![ip], vec![]));
        let d = drain_task(&v, &t.name, 30).await.unwrap();
        let until = d.value.draining.expect("draining").until;
        let st = v.state();
        assert!(!st.in_service(&st.tasks[&t.id]));
        assert_eq!(backends(&st), (vec![], vec![ip]));
        assert_eq!(st.draining().count(), 1);
        let later = drain_task(&v, &t.id, 60).await.unwrap();
        assert_eq!(later.value.draining.map(|d| d.until), Some(until));
        let sooner = drain_task(&v, &t.id, 1).await.unwrap();
        assert!(sooner.value.draining.is_some_and(|d| d.until < until));
        let e = drain_task(&v, &t.id, MAX_DRAIN_SECS + 1).await.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        // The end of the drain is the ordinary detach.
        detach_task(&v, &t.id).await.unwrap();
        assert_eq!(backends(&v.state()), (vec![], vec![]));
        assert_eq!(v.state().draining().count(), 0);
    }

    /// A task of a service with a health check is in service only once its node reported
    /// it healthy, and out again when it reports it unhealthy; a bad check is refused.
    #[tokio::test]
    async fn a_checked_task_is_in_service_only_while_healthy() {
        let (_dir, v) = fixture::setup().await;
        web_on_front(&v).await;
        let check = |cmd: &str| ServiceCreate {
            name: "db".into(),
            networks: vec!["front".into()],
            health: Some(HealthCheck {
                cmd: cmd.into(),
                interval: 1,
                retries: 2,
            }),
            ..Default::default()
        };
        let e = create_service(&v, &pools(), check("udp:53"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(!v.state().services.contains_key("db"));
        create_service(&v, &pools(), check("http:80/healthz"))
            .await
            .unwrap();
        let t = attach_task(&v, "n1", attach("db", "/run/netns/d", "n1"))
            .await
            .unwrap();
        fixture::report_up(&v, &[&t.id]).await;
        let in_service = |v: &View| {
            let st = v.state();
            st.in_service(&st.tasks[&t.id])
        };
        assert!(
            !in_service(&v),
            "starting: not before its first probe passed"
        );
        for healthy in [true, false, true] {
            let h = TaskHealth {
                healthy,
                since: 1,
                detail: None,
            };
            let rev = publish_task_health(&v, &v.state(), &t.id, &h)
                .await
                .unwrap()
                .unwrap();
            v.at_least(rev).await.unwrap();
            assert_eq!(in_service(&v), healthy);
            // Failing, it keeps the flows it has: out of picks, into `draining`.
            let lb = crate::datapath::LbTable::from_state(&v.state());
            let e = lb
                .vips
                .values()
                .find(|e| e.service == "db")
                .expect("db's VIP");
            let ip = vec![t.value.endpoints[0].ip];
            let want = if healthy { (ip, vec![]) } else { (vec![], ip) };
            assert_eq!((e.backends.clone(), e.draining.clone()), want);
        }
        // The record goes with the task.
        detach_task(&v, &t.id).await.unwrap();
        assert!(v.state().task_health.is_empty());
    }

    store_test!(
        networks_get_distinct_subnets_and_vnis,
        |s: SharedStore| async move {
            let v = fixture::view(&s).await;
            let s = v.as_ref();
            add_node(s, "n1").await;
            let a = create_network(s, &pools(), net("a")).await.unwrap();
            let b = create_network(s, &pools(), net("b")).await.unwrap();
            assert_ne!(a.subnet, b.subnet);
            assert_eq!(a.vni, Some(4096));
            assert_eq!(b.vni, Some(4097));
            assert_eq!(a.gateway, "198.19.0.1".parse::<Ipv4Addr>().unwrap());
            assert!(matches!(
                create_network(s, &pools(), net("a")).await,
                Err(Error::Conflict(_))
            ));
            // The gwbridge subnet of a node counts as taken.
            let mut r = net("c");
            r.subnet = Some("198.18.1.0/25".into());
            assert!(matches!(
                create_network(s, &pools(), r).await,
                Err(Error::Conflict(_))
            ));
        }
    );

    store_test!(
        removals_of_any_size_fit_etcds_default_transactions,
        |s: SharedStore| async move {
            let v = fixture::view(&s).await;
            let s = v.as_ref();
            add_node(s, "n1").await;
            let mut front = net("front");
            front.subnet = Some("198.19.8.0/22".into());
            create_network(s, &pools(), front.clone()).await.unwrap();
            let svc = ServiceCreate {
                name: "web".into(),
                networks: vec!["front".into()],
                ..Default::default()
            };
            create_service(s, &pools(), svc.clone()).await.unwrap();
            // 150 tasks: releasing them took ~600 operations in one transaction.
            for i in 0..150 {
                attach_task(s, "n1", attach("web", &format!("/run/netns/t{i}"), "n1"))
                    .await
                    .unwrap();
            }
            // 150 reservations on the network.
            for i in 0..150 {
                reserve_address(s, "front", None, &format!("docker:ep{i}"))
                    .await
                    .unwrap();
            }
            remove_service(s, "web").await.unwrap();
            let st = State::load(s.store()).await.unwrap();
            assert!(st.tasks.is_empty() && st.orphans.is_empty());
            let net_id = st.networks["front"].id.clone();
            assert_eq!(st.ipam[&net_id].len(), 151, "gateway and reservations left");
            assert!(st.gwipam.values().all(|a| a.is_empty()));
            remove_network(s, "front").await.unwrap();
            let st = State::load(s.store()).await.unwrap();
            assert!(st.ipam.values().all(|a| a.is_empty()) && st.reservations.is_empty());

            // A remover that died after its first transaction: the tasks are gone for
            // every reader at once, and the next collection releases them.
            create_network(s, &pools(), front).await.unwrap();
            create_service(s, &pools(), svc).await.unwrap();
            for i in 0..3 {
                attach_task(s, "n1", attach("web", &format!("/run/netns/u{i}"), "n1"))
                    .await
                    .unwrap();
            }
            let rev = s
                .store()
                .txn(vec![], vec![Op::Delete(key("services", "web"))])
                .await
                .unwrap()
                .unwrap();
            // A write behind the view's back: wait until the view has it.
            let st = s.at_least(rev).await.unwrap();
            assert!(st.tasks.is_empty());
            assert_eq!(st.orphans.len(), 3);
            // A new service of the same name would adopt them: not until they are gone.
            let again = ServiceCreate {
                name: "web".into(),
                networks: vec!["front".into()],
                ..Default::default()
            };
            assert!(matches!(
                create_service(s, &pools(), again.clone()).await,
                Err(Error::Conflict(_))
            ));
            assert_eq!(collect_garbage(s).await.unwrap(), 3);
            create_service(s, &pools(), again).await.unwrap();
            let st = State::load(s.store()).await.unwrap();
            assert!(st.orphans.is_empty() && st.gwipam.values().all(|a| a.is_empty()));
            assert_eq!(collect_garbage(s).await.unwrap(), 0, "idempotent");
        }
    );

    /// The biggest single calls fit etcd's default transaction: a service on the most
    /// networks with the most ports, made together with the ingress network in a
    /// cluster of several nodes, and a task of it attached on a node that needs an LB
    /// address on every network.
    #[tokio::test]
    async fn the_largest_calls_fit_one_default_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = View::open(std::sync::Arc::new(
            crate::store::local::LocalStore::open(dir.path()).unwrap(),
        ))
        .await
        .unwrap();
        for i in 0..40 {
            register_node(
                &s,
                Node {
                    name: format!("n{i}"),
                    address: Some(format!("198.18.0.{}", 11 + i).parse().unwrap()),
                    gwbridge_subnet: "198.18.1.0/24".parse().unwrap(),
                    started_at: 0,
                    lb_addresses: true,
                    public_key: None,
                    next_public_key: None,
                    wireguard_port: None,
                },
            )
            .await
            .unwrap();
        }
        announce_alive(s.store(), "n1", std::time::Duration::from_secs(10))
            .await
            .unwrap();
        let nets: Vec<String> = (0..MAX_SERVICE_NETWORKS)
            .map(|i| format!("net{i}"))
            .collect();
        for n in &nets {
            create_network(&s, &pools(), net(n)).await.unwrap();
        }
        let publish = (0..MAX_SERVICE_PORTS as u16)
            .map(|i| model::parse_publish(&format!("{}:80", 8000 + i)).unwrap())
            .collect();
        assert!(State::load(s.store()).await.unwrap().ingress().is_none());
        create_service(
            &s,
            &pools(),
            ServiceCreate {
                name: "big".into(),
                networks: nets.clone(),
                publish,
                ..Default::default()
            },
        )
        .await
        .expect("the largest create fits");
        let st = State::load(s.store()).await.unwrap();
        assert!(st.ingress().is_some(), "made with the service");
        attach_task(&s, "n1", attach("big", "/run/netns/big", "n1"))
            .await
            .expect("the largest attach fits");
        // One more network or port is refused up front, with the limit named.
        let mut more = nets.clone();
        more.push("net0b".into());
        let err = create_service(
            &s,
            &pools(),
            ServiceCreate {
                name: "bigger".into(),
                networks: more,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("at most {MAX_SERVICE_NETWORKS} networks")),
            "{err}"
        );
        // A service without ports of its own, whose task brings the most (host mode).
        create_service(
            &s,
            &pools(),
            ServiceCreate {
                name: "bighost".into(),
                networks: nets.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("a create on the most networks fits");
        let mut with_ports = attach("bighost", "/run/netns/bighost", "n1");
        with_ports.publish = (0..MAX_SERVICE_PORTS as u16)
            .map(|i| model::parse_publish(&format!("{}:80,mode=host", 9000 + i)).unwrap())
            .collect();
        attach_task(&s, "n1", with_ports)
            .await
            .expect("the largest attach with host-mode ports fits");
        remove_service(&s, "bighost").await.unwrap();
        remove_service(&s, "big").await.unwrap();
        assert!(State::load(s.store()).await.unwrap().orphans.is_empty());
    }

    store_test!(
        a_transaction_bigger_than_etcds_default_is_refused,
        |s: SharedStore| async move {
            let v = fixture::view(&s).await;
            let s = v.as_ref();
            let ops: Vec<Op> = (0..=MAX_TXN_OPS)
                .map(|i| Op::Put(format!("/netd/x/{i}"), b"1".to_vec()))
                .collect();
            let err = s.store().txn(vec![], ops).await.unwrap_err();
            assert!(err.to_string().contains("128"), "{err}");
            assert!(
                State::load(s.store()).await.unwrap().revs.is_empty(),
                "nothing written"
            );
            let ok: Vec<Op> = (0..MAX_TXN_OPS)
                .map(|i| Op::Put(format!("/netd/x/{i}"), b"1".to_vec()))
                .collect();
            assert!(s.store().txn(vec![], ok).await.unwrap().is_some());
        }
    );

    store_test!(
        concurrent_allocations_never_collide,
        |s: SharedStore| async move {
            for n in ["n1", "n2", "n3"] {
                add_node(&*fixture::view(&s).await, n).await;
            }
            // Networks (subnets and VNIs) created at the same moment.
            let mut nets = vec![];
            for i in 0..6 {
                let s = s.clone();
                nets.push(tokio::spawn(async move {
                    create_network(&*fixture::view(&s).await, &pools(), net(&format!("net{i}")))
                        .await
                        .unwrap()
                }));
            }
            let mut subnets = BTreeSet::new();
            let mut vnis = BTreeSet::new();
            for h in nets {
                let n = h.await.unwrap();
                assert!(subnets.insert(n.subnet), "subnet {} twice", n.subnet);
                assert!(vnis.insert(n.vni), "VNI {:?} twice", n.vni);
            }
            // Services (VIPs) and tasks (task IPs) on three nodes at the same moment.
            let mut svcs = vec![];
            for i in 0..4 {
                let s = s.clone();
                svcs.push(tokio::spawn(async move {
                    create_service(
                        &*fixture::view(&s).await,
                        &pools(),
                        ServiceCreate {
                            name: format!("svc{i}"),
                            networks: vec!["net0".into()],
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap()
                }));
            }
            let mut ips = BTreeSet::new();
            for h in svcs {
                assert!(ips.insert(h.await.unwrap().vips["net0"]), "VIP twice");
            }
            let mut tasks = vec![];
            for i in 0..24 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    let node = format!("n{}", i % 3 + 1);
                    let svc = format!("svc{}", i % 4);
                    attach_task(
                        &*fixture::view(&s).await,
                        "n1",
                        attach(&svc, &format!("/run/netns/x{i}"), &node),
                    )
                    .await
                    .unwrap()
                }));
            }
            let mut names = BTreeSet::new();
            let mut gw: BTreeSet<(String, Ipv4Addr)> = BTreeSet::new();
            for h in tasks {
                let t = h.await.unwrap();
                assert!(
                    ips.insert(t.endpoints[0].ip),
                    "task IP {} twice",
                    t.endpoints[0].ip
                );
                assert!(
                    gw.insert((t.node.clone(), t.endpoints[1].ip)),
                    "gwbridge IP twice"
                );
                assert!(names.insert(t.name.clone()));
            }
            assert_eq!(ips.len(), 28);
        }
    );

    store_test!(
        a_published_port_belongs_to_one_service_and_brings_the_ingress_network,
        |s: SharedStore| async move {
            for n in ["n1", "n2"] {
                add_node(&*fixture::view(&s).await, n).await;
            }
            create_network(&*fixture::view(&s).await, &pools(), net("front"))
                .await
                .unwrap();
            let publish = |p: u16| vec![model::parse_publish(&format!("{p}:80")).unwrap()];
            // Two services race for one port: exactly one gets it.
            let mut racers = vec![];
            for i in 0..4 {
                let s = s.clone();
                let publish = publish(4567);
                racers.push(tokio::spawn(async move {
                    create_service(
                        &*fixture::view(&s).await,
                        &pools(),
                        ServiceCreate {
                            name: format!("web{i}"),
                            networks: vec!["front".into()],
                            publish,
                            ..Default::default()
                        },
                    )
                    .await
                }));
            }
            let mut won = vec![];
            for r in racers {
                match r.await.unwrap() {
                    Ok(svc) => won.push(svc.value.name),
                    Err(Error::Conflict(_)) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            assert_eq!(won.len(), 1, "{won:?}");
            let st = State::load(s.as_ref()).await.unwrap();
            let ingress = st.ingress().expect("the ingress network exists");
            assert_eq!(ingress.subnet, pools().ingress);
            // Each node takes its address on it in its own transaction (its reconcile
            // does, as it finds the sandbox without one).
            for n in ["n1", "n2"] {
                ensure_lb_addresses(&*fixture::view(&s).await, n, &[INGRESS.to_string()])
                    .await
                    .unwrap();
            }
            let st = State::load(s.as_ref()).await.unwrap();
            let ingress = st.ingress().expect("the ingress network exists");
            // Every node has its address on it, distinct.
            let addrs: BTreeSet<Ipv4Addr> = st.lb_addrs[&ingress.id].values().copied().collect();
            assert_eq!(addrs.len(), 2);
            // A task of the service sits on the ingress network too, off the node addresses.
            let t = attach_task(
                &*fixture::view(&s).await,
                "n1",
                attach(&won[0], "/run/netns/a", "n1"),
            )
            .await
            .unwrap();
            let on_ingress: Vec<&Endpoint> = t
                .endpoints
                .iter()
                .filter(|e| e.network == INGRESS)
                .collect();
            assert_eq!(on_ingress.len(), 1);
            assert!(!addrs.contains(&on_ingress[0].ip));
            // Freed by service rm, the port is free at once.
            remove_service(&*fixture::view(&s).await, &won[0])
                .await
                .unwrap();
            create_service(
                &*fixture::view(&s).await,
                &pools(),
                ServiceCreate {
                    name: "again".into(),
                    networks: vec!["front".into()],
                    publish: publish(4567),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
    );

    store_test!(a_down_node_gets_no_tasks, |s: SharedStore| async move {
        add_node(&*fixture::view(&s).await, "n1").await;
        web_on_front(&*fixture::view(&s).await).await;
        register_node(
            &*fixture::view(&s).await,
            Node {
                name: "n2".into(),
                address: None,
                gwbridge_subnet: "198.18.1.0/24".parse().unwrap(),
                started_at: 0,
                lb_addresses: false,
                public_key: None,
                next_public_key: None,
                wireguard_port: None,
            },
        )
        .await
        .unwrap();
        let e = attach_task(
            &*fixture::view(&s).await,
            "n1",
            attach("web", "/run/netns/a", "n2"),
        )
        .await;
        assert!(matches!(e, Err(Error::Conflict(m)) if m.contains("down")));
        assert!(State::load(s.as_ref()).await.unwrap().tasks.is_empty());
        let e = attach_task(
            &*fixture::view(&s).await,
            "n1",
            attach("web", "/run/netns/a", "n9"),
        )
        .await;
        assert!(matches!(e, Err(Error::NotFound(_))));
    });

    store_test!(
        a_network_in_use_cannot_be_removed_and_detach_frees_addresses,
        |s: SharedStore| async move {
            let v = fixture::view(&s).await;
            let s = v.as_ref();
            add_node(s, "n1").await;
            let svc = web_on_front(s).await;
            let t = attach_task(s, "n1", attach("web", "/run/netns/a", "n1"))
                .await
                .unwrap();
            assert_eq!(t.name, "web-1");
            publish_task_status(
                s,
                &State::load(s.store()).await.unwrap(),
                vec![(
                    t.id.clone(),
                    TaskStatus {
                        error: None,
                        pending: false,
                    },
                )],
            )
            .await
            .unwrap();
            assert!(matches!(
                remove_network(s, "front").await,
                Err(Error::InUse(_))
            ));
            let ip = t.endpoints[0].ip;
            assert_ne!(Some(&ip), svc.vips.get("front"));
            detach_task(s, "web-1").await.unwrap();
            let st = State::load(s.store()).await.unwrap();
            assert!(st.task_status.is_empty(), "status outlived its task");
            let t2 = attach_task(s, "n1", attach("web", "/run/netns/b", "n1"))
                .await
                .unwrap();
            // Serial: the next one after the last handed out, not the one just freed.
            assert_ne!(t2.endpoints[0].ip, ip, "a freed address waits its turn");
            assert_eq!(
                u32::from(t2.endpoints[0].ip),
                u32::from(ip) + 1,
                "the next address after the last"
            );
            remove_service(s, "web").await.unwrap();
            let st = State::load(s.store()).await.unwrap();
            assert!(st.tasks.is_empty());
            remove_network(s, "front").await.unwrap();
            let st = State::load(s.store()).await.unwrap();
            assert!(st.ipam.is_empty() && st.gwipam.is_empty() && st.vnis.is_empty());
            // The network's cursor went with its addresses; the node's gwbridge keeps its.
            assert!(
                st.cursors.keys().all(|k| k.contains("/gwipamnext/")),
                "{:?}",
                st.cursors
            );
        }
    );

    #[tokio::test]
    async fn a_full_subnet_or_pool_is_named_and_nothing_half_made_stays() {
        let (_dir, s) = fixture::setup().await;
        let mut tiny = net("tiny");
        tiny.subnet = Some("198.19.9.0/29".into()); // gateway + 5 hosts
        create_network(&s, &pools(), tiny).await.unwrap();
        let svc = ServiceCreate {
            name: "web".into(),
            networks: vec!["tiny".into()],
            ..Default::default()
        };
        create_service(&s, &pools(), svc).await.unwrap(); // the VIP takes one
        for i in 0..4 {
            attach_task(&s, "n1", attach("web", &format!("/run/netns/t{i}"), "n1"))
                .await
                .unwrap();
        }
        let before = State::load(s.store()).await.unwrap();
        let err = attach_task(&s, "n1", attach("web", "/run/netns/t9", "n1"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Exhausted(_)), "{err}");
        assert!(
            err.to_string()
                .contains("network \"tiny\" (198.19.9.0/29) has no free address left"),
            "{err}"
        );
        let after = State::load(s.store()).await.unwrap();
        assert_eq!(after.revision, before.revision, "something was written");
        // A pool with no /24 left names the pool and what to do.
        let small = Pools {
            pool: "198.19.200.0/24".parse().unwrap(),
            size: 24,
            ..pools()
        };
        create_network(&s, &small, net("one")).await.unwrap();
        let err = create_network(&s, &small, net("two")).await.unwrap_err();
        assert!(
            err.to_string().contains("address pool 198.19.200.0/24")
                && err.to_string().contains("--address-pool"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_service_only_on_internal_networks_publishes_nothing() {
        let (_dir, s) = fixture::setup().await;
        let mut sealed = net("sealed");
        sealed.internal = true;
        create_network(&s, &pools(), sealed).await.unwrap();
        create_network(&s, &pools(), net("front")).await.unwrap();
        let port = model::parse_publish("8080:80").unwrap();
        let svc = |name: &str, networks: &[&str]| ServiceCreate {
            name: name.into(),
            networks: networks.iter().map(|n| n.to_string()).collect(),
            publish: vec![port],
            ..Default::default()
        };
        let before = State::load(s.store()).await.unwrap().revision;
        let err = create_service(&s, &pools(), svc("vault", &["sealed"]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--internal"), "{err}");
        assert_eq!(State::load(s.store()).await.unwrap().revision, before);
        // With a way out as well, it may.
        create_service(&s, &pools(), svc("web", &["sealed", "front"]))
            .await
            .unwrap();
        // Nor can a task bring a host port into an internal-only service.
        let mut quiet = svc("quiet", &["sealed"]);
        quiet.publish.clear();
        create_service(&s, &pools(), quiet).await.unwrap();
        let mut req = attach("quiet", "/run/netns/q", "n1");
        req.publish = vec![model::parse_publish("8081:80,mode=host").unwrap()];
        assert!(matches!(
            attach_task(&s, "n1", req).await,
            Err(Error::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn an_attach_can_name_one_network_its_interface_labels_and_host_ports() {
        let (_dir, s) = fixture::setup().await;
        create_network(&s, &pools(), net("front")).await.unwrap();
        create_network(&s, &pools(), net("back")).await.unwrap();
        let svc = ServiceCreate {
            name: "web".into(),
            networks: vec!["front".into(), "back".into()],
            ..Default::default()
        };
        create_service(&s, &pools(), svc).await.unwrap();
        let mut req = attach("web", "/run/netns/a", "n1");
        req.network = Some("back".into());
        req.ifname = Some("net1".into());
        req.labels = BTreeMap::from([("cni.container_id".into(), "c1".into())]);
        req.publish = vec![model::parse_publish("8080:80,mode=host").unwrap()];
        let t = attach_task(&s, "n1", req.clone()).await.unwrap().value;
        let legs: Vec<(&str, &str)> = t
            .endpoints
            .iter()
            .map(|e| (e.network.as_str(), e.ifname.as_str()))
            .collect();
        assert_eq!(legs, [("back", "net1"), (GWBRIDGE, "eth0")]);
        assert_eq!(t.labels["cni.container_id"], "c1");
        let st = State::load(s.store()).await.unwrap();
        assert_eq!(
            st.services["web"].publish, req.publish,
            "the port joined the service"
        );
        // A second task bringing the same port is fine; another target is a conflict.
        let mut again = attach("web", "/run/netns/b", "n1");
        again.publish = req.publish.clone();
        attach_task(&s, "n1", again).await.unwrap();
        let mut other = attach("web", "/run/netns/c", "n1");
        other.publish = vec![model::parse_publish("8080:81,mode=host").unwrap()];
        assert!(matches!(
            attach_task(&s, "n1", other).await,
            Err(Error::Conflict(_))
        ));
        // Refused, changing nothing: a network the service is not on, a bad interface
        // name, an ingress-mode port.
        let before = State::load(s.store()).await.unwrap().revision;
        let mut bad = attach("web", "/run/netns/d", "n1");
        create_network(&s, &pools(), net("other")).await.unwrap();
        bad.network = Some("other".into());
        assert!(matches!(
            attach_task(&s, "n1", bad).await,
            Err(Error::Invalid(_))
        ));
        let mut bad = attach("web", "/run/netns/d", "n1");
        bad.ifname = Some("a/b".into());
        assert!(matches!(
            attach_task(&s, "n1", bad).await,
            Err(Error::Invalid(_))
        ));
        let mut bad = attach("web", "/run/netns/d", "n1");
        bad.publish = vec![model::parse_publish("9090:80").unwrap()];
        assert!(matches!(
            attach_task(&s, "n1", bad).await,
            Err(Error::Invalid(_))
        ));
        let st = State::load(s.store()).await.unwrap();
        assert_eq!(st.tasks.len(), 2);
        assert!(st.revision > before, "only the network create committed");
        assert_eq!(st.services["web"].publish.len(), 1);
        // An attachable network takes a task of a service that is not on it.
        let mut open = net("open");
        open.attachable = true;
        create_network(&s, &pools(), open).await.unwrap();
        let mut guest = attach("web", "/run/netns/e", "n1");
        guest.network = Some("open".into());
        let t = attach_task(&s, "n1", guest).await.unwrap().value;
        assert_eq!(t.endpoints[0].network, "open");
    }

    #[test]
    fn interface_names_skip_the_chosen_one() {
        assert_eq!(interface_names(2, "eth0"), ["eth0", "eth1"]);
        assert_eq!(interface_names(3, "eth1"), ["eth1", "eth0", "eth2"]);
        assert_eq!(interface_names(1, "net9"), ["net9"]);
    }
}
