//! Wires the embedded DNS (`netd-dns`) to netd: the record table follows the store (one
//! service or task record at a time), and every local task gets its own UDP and TCP
//! sockets at 127.0.0.11:53, bound inside its namespace by a short-lived thread and then
//! served by the daemon's runtime. No process or thread per task.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use netd_dns::server::{self, Listener, Shared, DNS_ADDR};
use netd_dns::table::{Mode, Port, ServiceRecord, Table, TaskRecord, Ttls};
use netd_dns::upstream::Upstream;
use serde::Serialize;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::fdstore::{self, FdStore, Held, Key};
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
    listeners: std::sync::Mutex<HashMap<String, Served>>,
    handover: Handover,
}

/// One task's DNS sockets being served.
struct Served {
    /// Kept for its drop, which stops serving.
    _serving: Vec<Listener>,
    netns: String,
    /// The namespace's (device, inode) at that path when the sockets were opened: a
    /// namespace made anew at the same path is another one.
    ns_id: Option<(u64, u64)>,
    /// Under which key the fd store holds duplicates (None: it does not).
    held: Option<Key>,
}

/// Whether the namespace a listener serves is no longer the one at its path (a runtime
/// deleted it and made another of the same name): its sockets, and the fd store's
/// copies, would keep the old one alive and leave the new one without DNS.
fn replaced(s: &Served) -> bool {
    netns::file_id(Path::new(&s.netns)) != s.ns_id
}

/// Sockets that outlive this netd (see [`crate::fdstore`]), or why they do not.
type Handover = std::result::Result<fdstore::Handover, String>;

/// What the fd store calls a task's DNS sockets.
const HELD_KIND: &str = "dns";

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

fn task_record(st: &State, t: &Task) -> TaskRecord {
    TaskRecord {
        id: t.id.clone(),
        name: t.name.clone(),
        service: t.service.clone(),
        addrs: named_addrs(t),
        // Out of its service's answers while draining or failing its health check
        // (a node that is down keeps its tasks' names: it may be back in seconds).
        serving: t.draining.is_none() && st.healthy(t),
    }
}

/// The task's address on each network where it has a name, in attach order: service
/// networks only, not the node-local gwbridge nor the routing mesh's ingress network
/// (as in Docker).
fn named_addrs(t: &Task) -> Vec<(String, std::net::Ipv4Addr)> {
    t.endpoints
        .iter()
        .filter(|e| e.network != GWBRIDGE && e.network != crate::state::INGRESS)
        .map(|e| (e.network.clone(), e.ip))
        .collect()
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
                stats: Default::default(),
            }),
            cfg,
            listeners: std::sync::Mutex::new(HashMap::new()),
            handover: Err("no fd store".into()),
        }
    }

    /// Keeps this daemon's sockets in `store` from now on, and serves the ones the netd
    /// before left there (`held`) instead of opening new ones, so a restart closes no
    /// port. Call before the first step.
    pub fn hand_over(&mut self, store: Arc<FdStore>, mut held: Held) {
        let mine = fdstore::take(&mut held, HELD_KIND);
        // Entries of a kind no part of this netd uses go.
        fdstore::Handover::new(store.clone(), "other", held).release_unclaimed();
        self.handover = Ok(fdstore::Handover::new(store, HELD_KIND, mine));
    }

    /// Runs without an fd store, and says why in `netd status`.
    pub fn no_hand_over(&mut self, why: String) {
        self.handover = Err(why);
    }

    /// For `netd status`.
    pub fn handover_status(&self) -> serde_json::Value {
        match &self.handover {
            Err(why) => serde_json::json!({"active": false, "reason": why}),
            Ok(h) => serde_json::json!({
                "active": true,
                "store": h.store().describe(),
                "tasks_held": self.listeners.lock().map(|l| l.values().filter(|s| s.held.is_some()).count()).unwrap_or(0),
            }),
        }
    }

    pub fn config(&self) -> &DnsConfig {
        &self.cfg
    }

    pub fn listener_count(&self) -> usize {
        self.listeners.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// What the DNS asked and answered so far (for `/metrics`).
    pub fn stats(&self) -> netd_dns::stats::Snapshot {
        self.shared.stats.snapshot()
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
            table.upsert_task(task_record(st, t));
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
                Some(t) => table.upsert_task(task_record(st, t)),
                None => table.remove_task(id),
            }
        }
    }

    /// Serves DNS in each of `tasks` (local, configured), and stops serving any other.
    /// Returns the tasks it could not serve, with why.
    pub async fn sync_listeners(&self, tasks: &[&Task]) -> BTreeMap<String, String> {
        let mut errors = BTreeMap::new();
        let stale: Vec<(String, Served)> = {
            let Ok(mut l) = self.listeners.lock() else {
                return errors;
            };
            let keep: HashMap<&str, &str> = tasks
                .iter()
                .map(|t| (t.id.as_str(), t.netns.as_str()))
                .collect();
            let stale: Vec<String> = l
                .iter()
                .filter(|(id, s)| keep.get(id.as_str()) != Some(&s.netns.as_str()) || replaced(s))
                .map(|(id, _)| id.clone())
                .collect();
            stale
                .into_iter()
                .filter_map(|id| l.remove(&id).map(|s| (id, s)))
                .collect::<Vec<_>>()
        };
        for (id, served) in stale {
            self.release(served.held.as_ref());
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
                Ok(served) => {
                    if let Ok(mut l) = self.listeners.lock() {
                        l.insert(t.id.clone(), served);
                    }
                }
                Err(e) => {
                    errors.insert(t.id.clone(), format!("dns at {DNS_ADDR}: {e:#}"));
                }
            }
        }
        // What the netd before held for tasks this step does not serve goes now.
        if let Ok(h) = &self.handover {
            h.release_unclaimed();
        }
        errors
    }

    /// Serves those of `tasks` whose sockets the netd before left (see
    /// [`crate::reconcile::Reconciler::resume`]).
    pub async fn resume_held(&self, tasks: &[&Task]) {
        for t in tasks {
            let held = self.handover.as_ref().is_ok_and(|h| h.left_for(&t.id));
            let serving = self
                .listeners
                .lock()
                .map_or(true, |l| l.contains_key(&t.id));
            if !held || serving {
                continue;
            }
            match self.open(t).await {
                Ok(served) => {
                    if let Ok(mut l) = self.listeners.lock() {
                        l.insert(t.id.clone(), served);
                    }
                }
                Err(e) => tracing::warn!(task = t.id, "resume dns: {e:#}"),
            }
        }
    }

    /// Tells the fd store to close what it holds under `key`.
    fn release(&self, key: Option<&Key>) {
        if let Ok(h) = &self.handover {
            h.release(key);
        }
    }

    /// The sockets the netd before left for `t`, if they are still bound where `t`'s
    /// DNS must be.
    fn take_left(&self, t: &Task, addrs: &[SocketAddr]) -> Option<Sockets> {
        let h = self.handover.as_ref().ok()?;
        let (key, fds) = h.take_left(&t.id, &t.netns)?;
        match adopt(fds, addrs) {
            Ok(s) => Some((s, Some(key))),
            Err(e) => {
                tracing::warn!(task = t.id, "the held dns sockets do not fit: {e:#}");
                h.release(Some(&key));
                None
            }
        }
    }

    /// Gives the fd store duplicates of `sockets`, so they outlive this netd.
    fn hold(
        &self,
        t: &Task,
        sockets: &[(std::net::UdpSocket, std::net::TcpListener)],
    ) -> Option<Key> {
        let fds: Vec<BorrowedFd> = sockets
            .iter()
            .flat_map(|(u, l)| [u.as_fd(), l.as_fd()])
            .collect();
        self.handover.as_ref().ok()?.hold(&t.id, &t.netns, &fds)
    }

    async fn open(&self, t: &Task) -> Result<Served> {
        let ns = Netns::Path(PathBuf::from(&t.netns));
        let ns_id = netns::file_id(Path::new(&t.netns));
        // In a Docker container Docker's own resolver takes 127.0.0.11:53 (a DNAT in the
        // container); it forwards what it does not know to the daemon's `--dns`, which
        // points at netd's second address there.
        let addrs: Vec<SocketAddr> = if t.handoff {
            vec![DNS_ADDR, RUNTIME_DNS_ADDR]
        } else {
            vec![DNS_ADDR]
        };
        let (sockets, held) = match self.take_left(t, &addrs) {
            Some(left) => left,
            None => {
                let sockets = netns::run_in(&ns, move || {
                    addrs
                        .iter()
                        .map(|a| {
                            let udp = std::net::UdpSocket::bind(a)
                                .with_context(|| format!("bind udp {a}"))?;
                            let tcp = std::net::TcpListener::bind(a)
                                .with_context(|| format!("bind tcp {a}"))?;
                            Ok((udp, tcp))
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .await?;
                crate::writes::count(crate::writes::Kind::DnsSocket, sockets.len() as u64);
                let held = self.hold(t, &sockets);
                (sockets, held)
            }
        };
        let querier = server::Querier {
            networks: named_addrs(t).into_iter().map(|(n, _)| n).collect(),
            // A task without a default route (only internal networks) has no way out, and
            // its DNS must not be one either.
            forward: t.default_gateway.is_some(),
        };
        let listeners = sockets
            .into_iter()
            .map(|(udp, tcp)| {
                server::listen(self.shared.clone(), querier.clone(), udp, tcp)
                    .map_err(|e| anyhow!("{e}"))
            })
            .collect::<Result<Vec<_>>>();
        match listeners {
            Ok(listeners) => Ok(Served {
                _serving: listeners,
                netns: t.netns.clone(),
                ns_id,
                held,
            }),
            Err(e) => {
                self.release(held.as_ref());
                Err(e)
            }
        }
    }
}

/// A task's DNS sockets (UDP and TCP per address), and their key in the fd store.
type Sockets = (
    Vec<(std::net::UdpSocket, std::net::TcpListener)>,
    Option<Key>,
);

/// Turns held descriptors back into sockets, checking that they are what `addrs` needs:
/// a UDP socket and a listening TCP socket bound to each address, in order.
fn adopt(
    fds: Vec<OwnedFd>,
    addrs: &[SocketAddr],
) -> Result<Vec<(std::net::UdpSocket, std::net::TcpListener)>> {
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    if fds.len() != 2 * addrs.len() {
        return Err(anyhow!(
            "{} descriptors for {} addresses",
            fds.len(),
            addrs.len()
        ));
    }
    let mut fds = fds.into_iter();
    let mut out = vec![];
    for a in addrs {
        let (Some(u), Some(l)) = (fds.next(), fds.next()) else {
            break;
        };
        if getsockopt(&u, sockopt::SockType)? != SockType::Datagram
            || getsockopt(&l, sockopt::SockType)? != SockType::Stream
            || !getsockopt(&l, sockopt::AcceptConn)?
        {
            return Err(anyhow!("not a UDP socket and a TCP listener for {a}"));
        }
        let (udp, tcp) = (std::net::UdpSocket::from(u), std::net::TcpListener::from(l));
        if udp.local_addr()? != *a || tcp.local_addr()? != *a {
            return Err(anyhow!("bound elsewhere than {a}"));
        }
        out.push((udp, tcp));
    }
    Ok(out)
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
