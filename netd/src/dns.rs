//! Wires the embedded DNS (`netd-dns`) to netd: the record table follows the store (one
//! service or task record at a time), and every local task gets its own UDP and TCP
//! sockets at 127.0.0.11:53, bound inside its namespace by a short-lived thread and then
//! served by the daemon's runtime. No process or thread per task.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use netd_dns::server::{self, Listener, Shared, DNS_ADDR};
use netd_dns::table::{Mode, Port, ServiceRecord, Table, TaskRecord, Ttls};
use netd_dns::upstream::Upstream;
use serde::Serialize;

use crate::model::{EndpointMode, Protocol, Task, GWBRIDGE};
use crate::netns::{self, Netns};
use crate::state::State;
use crate::store::Store;

/// Settings of the embedded DNS, from the daemon's flags and the node's resolv.conf.
#[derive(Debug, Clone, Serialize)]
pub struct DnsConfig {
    pub upstream: Vec<SocketAddr>,
    pub search: Vec<String>,
    pub vip_ttl: u32,
    pub task_ttl: u32,
}

/// Where each node reports the store revision its DNS table holds. Outside `/netd/` on
/// purpose: nobody watches it, so reports cause no reconcile.
const APPLIED: &str = "/netd-applied/";
/// The reports live on the node's lease (the TTL given here is only used if the report
/// comes first).
const APPLIED_TTL: Duration = Duration::from_secs(10);
/// How long a write waits for the other nodes' DNS to catch up before it answers anyway.
const CLUSTER_WAIT: Duration = Duration::from_secs(2);

pub struct Dns {
    cfg: DnsConfig,
    shared: Arc<Shared>,
    /// Task id -> its listener and the namespace it was opened in.
    listeners: std::sync::Mutex<HashMap<String, (Listener, String)>>,
}

fn service_record(svc: &crate::model::Service) -> ServiceRecord {
    ServiceRecord {
        name: svc.name.clone(),
        aliases: svc.aliases.clone(),
        mode: match svc.endpoint_mode {
            EndpointMode::Vip => Mode::Vip,
            EndpointMode::Dnsrr => Mode::Dnsrr,
        },
        networks: svc
            .networks
            .iter()
            .map(|n| (n.clone(), svc.vips.get(n).copied()))
            .collect(),
        ports: svc
            .publish
            .iter()
            .map(|p| Port {
                port: p.target,
                udp: p.protocol == Protocol::Udp,
            })
            .collect(),
    }
}

fn task_record(t: &Task) -> TaskRecord {
    TaskRecord {
        id: t.id.clone(),
        name: t.name.clone(),
        service: t.service.clone(),
        addrs: t
            .endpoints
            .iter()
            .filter(|e| e.network != GWBRIDGE)
            .map(|e| (e.network.clone(), e.ip))
            .collect(),
    }
}

impl Dns {
    pub fn new(cfg: DnsConfig) -> Self {
        let table = Table::new(
            Ttls {
                vip: cfg.vip_ttl,
                task: cfg.task_ttl,
            },
            cfg.search.clone(),
        );
        Dns {
            shared: Arc::new(Shared {
                table: RwLock::new(table),
                upstream: Upstream::new(cfg.upstream.clone()),
            }),
            cfg,
            listeners: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &DnsConfig {
        &self.cfg
    }

    pub fn listener_count(&self) -> usize {
        self.listeners.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Brings the record table to `st`: removes what is gone, upserts the rest (an
    /// unchanged record is a no-op). Names on tasks of down nodes stay: the task still
    /// exists, and its node may be back in seconds.
    pub fn sync_table(&self, st: &State) {
        let Ok(mut table) = self.shared.table.write() else {
            return;
        };
        let gone_services: Vec<String> = table
            .service_names()
            .filter(|n| !st.services.contains_key(*n))
            .cloned()
            .collect();
        for n in gone_services {
            table.remove_service(&n);
        }
        let gone_tasks: Vec<String> = table
            .task_ids()
            .filter(|id| !st.tasks.contains_key(*id))
            .cloned()
            .collect();
        for id in gone_tasks {
            table.remove_task(&id);
        }
        for svc in st.services.values() {
            table.upsert_service(service_record(svc));
        }
        for t in st.tasks.values() {
            table.upsert_task(task_record(t));
        }
    }

    /// Follows the store on its own, so a change reaches the table without waiting for
    /// a reconcile step of the kernel (which may be busy with something slower). In a
    /// cluster, it then tells the others which revision its table holds (`applied/`,
    /// outside the watched prefix, so the report itself wakes no one).
    pub async fn follow(self: Arc<Self>, store: Arc<dyn Store>, node: String) {
        let mut changes = store.subscribe();
        let mut reported = 0;
        loop {
            match State::load(store.as_ref()).await {
                Ok(st) => {
                    self.sync_table(&st);
                    if store.shared() && st.revision > reported {
                        let key = format!("{APPLIED}{node}");
                        let value = st.revision.to_string().into_bytes();
                        match store.put_ephemeral(&key, value, APPLIED_TTL).await {
                            Ok(()) => reported = st.revision,
                            Err(e) => tracing::debug!("dns: report applied revision: {e}"),
                        }
                    }
                }
                Err(e) => tracing::debug!("dns: read desired state: {e}"),
            }
            match changes.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Waits (at most `CLUSTER_WAIT`) until every other live node reports a table at
    /// `revision` or later; false if one did not. Nothing to wait for on a store of one
    /// node.
    pub async fn await_cluster(&self, store: &dyn Store, local: &str, revision: u64) -> bool {
        if !store.shared() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + CLUSTER_WAIT;
        loop {
            let caught_up = async {
                let alive = crate::state::alive_nodes(store).await.ok()?;
                let applied = store.list(APPLIED).await.ok()?;
                let at = |node: &str| {
                    applied
                        .kvs
                        .iter()
                        .find(|kv| kv.key[APPLIED.len()..] == *node)
                        .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                Some(
                    alive
                        .iter()
                        .filter(|n| n.as_str() != local)
                        .all(|n| at(n) >= revision),
                )
            }
            .await;
            if caught_up == Some(true) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Serves DNS in each of `tasks` (local, configured), and stops serving any other.
    /// Returns the tasks it could not serve, with why.
    pub async fn sync_listeners(&self, tasks: &[&Task]) -> BTreeMap<String, String> {
        let mut errors = BTreeMap::new();
        let stale: Vec<String> = {
            let Ok(mut l) = self.listeners.lock() else {
                return errors;
            };
            let keep: HashMap<&str, &str> = tasks
                .iter()
                .map(|t| (t.id.as_str(), t.netns.as_str()))
                .collect();
            let stale: Vec<String> = l
                .iter()
                .filter(|(id, (_, ns))| keep.get(id.as_str()) != Some(&ns.as_str()))
                .map(|(id, _)| id.clone())
                .collect();
            for id in &stale {
                l.remove(id);
            }
            stale
        };
        for id in stale {
            tracing::info!(task = id, "dns listener closed");
        }
        for t in tasks {
            let present = self
                .listeners
                .lock()
                .map(|l| l.contains_key(&t.id))
                .unwrap_or(true);
            if present {
                continue;
            }
            match self.open(t).await {
                Ok(listener) => {
                    if let Ok(mut l) = self.listeners.lock() {
                        l.insert(t.id.clone(), (listener, t.netns.clone()));
                    }
                }
                Err(e) => {
                    errors.insert(t.id.clone(), format!("dns at {DNS_ADDR}: {e:#}"));
                }
            }
        }
        errors
    }

    async fn open(&self, t: &Task) -> Result<Listener> {
        let ns = Netns::Path(PathBuf::from(&t.netns));
        let (udp, tcp) = netns::run_in(&ns, || {
            let udp = std::net::UdpSocket::bind(DNS_ADDR).context("bind udp")?;
            let tcp = std::net::TcpListener::bind(DNS_ADDR).context("bind tcp")?;
            Ok((udp, tcp))
        })
        .await?;
        let networks = task_record(t).addrs.into_iter().map(|(n, _)| n).collect();
        server::listen(self.shared.clone(), networks, udp, tcp).map_err(|e| anyhow!("{e}"))
    }
}

/// Reads the node's resolv.conf for defaults (servers and search list).
pub fn node_resolv_conf() -> netd_dns::upstream::ResolvConf {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| netd_dns::upstream::ResolvConf::parse(&t))
        .unwrap_or_default()
}

/// How long a forward may take at most (for `netd status`).
pub const FORWARD_BUDGET: Duration = netd_dns::upstream::TOTAL_BUDGET;
