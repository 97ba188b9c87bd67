//! Wires the embedded DNS (`netd-dns`) to netd: the record table follows the store (one
//! service or task record at a time), and every local task gets its own UDP and TCP
//! sockets at 127.0.0.11:53, bound inside its namespace by a short-lived thread and then
//! served by the daemon's runtime. No process or thread per task.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// Settings of the embedded DNS, from the daemon's flags and the node's resolv.conf.
#[derive(Debug, Clone, Serialize)]
pub struct DnsConfig {
    pub upstream: Vec<SocketAddr>,
    pub search: Vec<String>,
    pub vip_ttl: u32,
    pub task_ttl: u32,
    /// `--dns-answer-cache`: see [`netd_dns::server::Shared::answer_cache`].
    pub answer_cache: bool,
}

pub struct Dns {
    cfg: DnsConfig,
    shared: Arc<Shared>,
    /// Task id -> its listener and the namespace it was opened in.
    listeners: std::sync::Mutex<HashMap<String, (Vec<Listener>, String)>>,
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
            // Names live on service networks only, not on the node-local gwbridge nor on
            // the routing mesh's ingress network (as in Docker).
            .filter(|e| e.network != GWBRIDGE && e.network != crate::state::INGRESS)
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
                answer_cache: cfg.answer_cache,
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

    pub fn forward_cache_len(&self) -> usize {
        self.shared.upstream.cached()
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

    /// Brings the records of `services` and `tasks` (a change's) to `st`, and nothing
    /// else: the cost of a change, not of the table.
    pub fn sync_changed(&self, st: &State, services: &BTreeSet<String>, tasks: &BTreeSet<String>) {
        let Ok(mut table) = self.shared.table.write() else {
            return;
        };
        for name in services {
            match st.services.get(name) {
                Some(svc) => table.upsert_service(service_record(svc)),
                None => table.remove_service(name),
            }
        }
        for id in tasks {
            match st.tasks.get(id) {
                Some(t) => table.upsert_task(task_record(t)),
                None => table.remove_task(id),
            }
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

    async fn open(&self, t: &Task) -> Result<Vec<Listener>> {
        let ns = Netns::Path(PathBuf::from(&t.netns));
        // In a Docker container Docker's own resolver takes 127.0.0.11:53 (a DNAT in the
        // container); it forwards what it does not know to the daemon's `--dns`, which
        // points at netd's second address there.
        let addrs: Vec<SocketAddr> = if t.handoff {
            vec![DNS_ADDR, RUNTIME_DNS_ADDR]
        } else {
            vec![DNS_ADDR]
        };
        let sockets = netns::run_in(&ns, move || {
            addrs
                .iter()
                .map(|a| {
                    let udp =
                        std::net::UdpSocket::bind(a).with_context(|| format!("bind udp {a}"))?;
                    let tcp =
                        std::net::TcpListener::bind(a).with_context(|| format!("bind tcp {a}"))?;
                    Ok((udp, tcp))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        let querier = server::Querier {
            networks: task_record(t).addrs.into_iter().map(|(n, _)| n).collect(),
            // A task without a default route (only internal networks) has no way out, and
            // its DNS must not be one either.
            forward: t.default_gateway.is_some(),
        };
        sockets
            .into_iter()
            .map(|(udp, tcp)| {
                server::listen(self.shared.clone(), querier.clone(), udp, tcp)
                    .map_err(|e| anyhow!("{e}"))
            })
            .collect()
    }
}

/// Where netd also answers in a task whose runtime runs a resolver of its own on
/// 127.0.0.11 (Docker): that resolver's upstream, `dockerd --dns 127.0.0.12`.
pub const RUNTIME_DNS_ADDR: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 12)),
    53,
);

/// Reads the node's resolv.conf for defaults (servers and search list).
pub fn node_resolv_conf() -> netd_dns::upstream::ResolvConf {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| netd_dns::upstream::ResolvConf::parse(&t))
        .unwrap_or_default()
}

/// How long a forward may take at most (for `netd status`).
pub const FORWARD_BUDGET: Duration = netd_dns::upstream::TOTAL_BUDGET;
