//! One reconcile step turns the kernel of this node into what the store says it should
//! be. The kernel is the source of truth for what exists: every step reads links,
//! addresses, routes, namespaces and nftables, changes only what differs, then sweeps the
//! netd-named objects nothing desires. Running it twice changes nothing the second time,
//! which is what lets netd restart (even after `kill -9`) without touching live traffic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;
use tokio::sync::Mutex;

use crate::datapath::xdp::{MeshPort, MeshTable, XdpMesh};
use crate::datapath::{Datapath, LbTable, SandboxLb};
use crate::dns::Dns;
use crate::ipam;
use crate::model::{Driver, Endpoint, Network, PortSpec, PublishMode, Task, GWBRIDGE};
use crate::naming::{self, GWBRIDGE_IF, SANDBOX_BRIDGE, SANDBOX_VXLAN};
use crate::netlink::{self, Link, Peer};
use crate::netns::{self, Netns};
use crate::nftables::{self, BridgeRules, PortGuard, PortRule, Ruleset};
use crate::state::{self, State, TaskStatus, INGRESS};
use crate::view::View;

/// This node's fixed settings, from the daemon's command line.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub gwbridge_subnet: Ipv4Network,
    pub vxlan_port: u16,
    /// Underlay MTU minus the 50 bytes of VXLAN encapsulation.
    pub overlay_mtu: u32,
    pub bridge_mtu: u32,
    /// `--allow-tasks-to-node`: see [`nftables::Ruleset::tasks_reach_node`].
    pub tasks_reach_node: bool,
    /// The store's endpoints, which tasks must not reach.
    pub protected: Vec<std::net::SocketAddrV4>,
}

/// A named counter of the node's netd table, plus what the tables it replaced had counted.
async fn counted(name: &'static str, replaced: &std::sync::atomic::AtomicU64) -> u64 {
    let now = tokio::task::spawn_blocking(move || nftables::counter(name))
        .await
        .ok()
        .flatten()
        .unwrap_or(0);
    now + replaced.load(std::sync::atomic::Ordering::Relaxed)
}

/// What the last reconcile could not do, per task id; surfaced by `netd task ls`.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub task_errors: BTreeMap<String, String>,
    pub errors: Vec<String>,
    /// Tasks whose runtime has not made their namespace yet (see [`Task::handoff`]):
    /// their first endpoint waits in the node's namespace for the runtime to take it.
    pub pending: BTreeSet<String>,
}

pub struct Reconciler {
    view: Arc<View>,
    cfg: NodeConfig,
    /// The embedded DNS: its table follows every step, and every local task gets its
    /// listener here.
    dns: Option<Arc<Dns>>,
    /// VIP load balancing: its table follows every step, and its node-side objects (hooks,
    /// TUN devices) follow the local tasks and sandboxes.
    datapath: Option<Arc<dyn Datapath>>,
    /// The routing mesh's XDP fast path on the underlay interface.
    xdp: Option<Arc<XdpMesh>>,
    /// One step at a time: two concurrent steps would race to create the same objects.
    step: Mutex<()>,
    last: std::sync::Mutex<Report>,
    /// VXLAN datagrams from non-members dropped by node rulesets that were replaced since
    /// start (each new ruleset counts from zero).
    vxlan_foreign: std::sync::atomic::AtomicU64,
    /// The same for tasks' connections to the node or the store.
    task_to_node: std::sync::atomic::AtomicU64,
    /// The nftables tag last applied per (namespace inode, table): a step started by a
    /// change trusts it and spawns no `nft` for a table whose rules did not change; the
    /// periodic step reads the kernel again (and repairs drift), as does any step for a
    /// namespace made anew (a new inode).
    nft_tags: std::sync::Mutex<HashMap<(u64, &'static str), String>>,
    /// The store revision the last finished step applied.
    applied: std::sync::atomic::AtomicU64,
    /// Handed-over tasks whose runtime has finished with their interface: not asked
    /// of the kernel again every step.
    handed: std::sync::Mutex<BTreeSet<String>>,
    /// One netlink socket per namespace the node works in, kept between steps.
    netlink: netns::NetlinkPool,
}

/// Where a task endpoint's host-side veth lives and what it plugs into.
#[derive(Debug, Clone)]
struct Attachment {
    parent: Netns,
    bridge: String,
    mtu: u32,
    /// Ports of the gwbridge are isolated from each other: egress only.
    isolated: bool,
}

impl Reconciler {
    pub fn new(
        view: Arc<View>,
        cfg: NodeConfig,
        dns: Option<Arc<Dns>>,
        datapath: Option<Arc<dyn Datapath>>,
        xdp: Option<Arc<XdpMesh>>,
    ) -> Self {
        Reconciler {
            view,
            cfg,
            dns,
            datapath,
            xdp,
            step: Mutex::new(()),
            last: std::sync::Mutex::new(Report::default()),
            vxlan_foreign: std::sync::atomic::AtomicU64::new(0),
            task_to_node: std::sync::atomic::AtomicU64::new(0),
            nft_tags: std::sync::Mutex::new(HashMap::new()),
            applied: std::sync::atomic::AtomicU64::new(0),
            handed: std::sync::Mutex::new(BTreeSet::new()),
            netlink: netns::NetlinkPool::new(),
        }
    }

    /// Whether table `table` in `ns` is known to hold `tag` already (only trusted when
    /// the step does not read the kernel anyway).
    fn nft_known(&self, ns: &Netns, table: &'static str, tag: &str, checked: bool) -> bool {
        if checked {
            return false;
        }
        let Some(ino) = netns_inode(ns) else {
            return false;
        };
        self.nft_tags
            .lock()
            .map(|m| m.get(&(ino, table)).map(String::as_str) == Some(tag))
            .unwrap_or(false)
    }

    fn nft_applied(&self, ns: &Netns, table: &'static str, tag: String) {
        if let (Some(ino), Ok(mut m)) = (netns_inode(ns), self.nft_tags.lock()) {
            m.insert((ino, table), tag);
        }
    }

    /// Whether a handed-over task's runtime has set up its interface (remembered once
    /// it has).
    async fn handed_over(&self, task: &Task) -> bool {
        if self.handed.lock().is_ok_and(|h| h.contains(&task.id)) {
            return true;
        }
        let done = runtime_done(task).await;
        if done {
            if let Ok(mut h) = self.handed.lock() {
                h.insert(task.id.clone());
            }
        }
        done
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// VXLAN datagrams dropped on this node because a host that is not a live member of
    /// the cluster sent them (since netd started), for `netd status`.
    pub async fn vxlan_foreign_dropped(&self) -> u64 {
        counted(nftables::VXLAN_FOREIGN, &self.vxlan_foreign).await
    }

    /// New connections from tasks to this node or the store, dropped (since netd
    /// started), for `netd status`.
    pub async fn task_to_node_dropped(&self) -> u64 {
        counted(nftables::TASK_TO_NODE, &self.task_to_node).await
    }

    /// The XDP fast path, for `netd status`.
    pub fn xdp_status(&self) -> serde_json::Value {
        self.xdp
            .as_ref()
            .map(|x| x.status())
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn last_report(&self) -> Report {
        self.last.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Re-runs whenever the store changes, and every `interval` to repair drift (those
    /// steps read every table back from the kernel).
    pub async fn run_forever(self: Arc<Self>, interval: Duration) {
        let mut changes = self.view.watch();
        let mut checked = true;
        loop {
            if let Err(e) = self.run(checked).await {
                tracing::warn!("reconcile: {e:#}");
            }
            checked = tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    false
                }
                _ = tokio::time::sleep(interval) => true,
            };
        }
    }

    /// One step, after a change: tables known to be right are not read back.
    pub async fn run_once(&self) -> Result<Report> {
        self.run(false).await
    }

    /// Makes the kernel match a state at `revision` or later: a step that began after a
    /// write (the one its change event started) serves the caller who made it, instead of
    /// a second one behind it.
    pub async fn run_for(&self, revision: u64) -> Result<Report> {
        let _guard = self.step.lock().await;
        if self.applied.load(std::sync::atomic::Ordering::Acquire) >= revision {
            return Ok(self.last_report());
        }
        self.run_locked(false).await
    }

    async fn run(&self, checked: bool) -> Result<Report> {
        let _guard = self.step.lock().await;
        self.run_locked(checked).await
    }

    /// One step; the caller holds the step lock.
    async fn run_locked(&self, checked: bool) -> Result<Report> {
        let st = self.view.state();
        let report = self.step(&st, checked).await;
        self.close_unwanted_sockets(&st);
        if let Ok(mut last) = self.last.lock() {
            *last = report.clone();
        }
        self.applied
            .store(st.revision, std::sync::atomic::Ordering::Release);
        let changed: Vec<(String, TaskStatus)> = st
            .tasks
            .values()
            .filter(|t| t.node == self.cfg.name)
            .map(|t| {
                let status = TaskStatus {
                    error: report.task_errors.get(&t.id).cloned(),
                };
                (t.id.clone(), status)
            })
            .filter(|(id, status)| st.task_status.get(id) != Some(status))
            .collect();
        if let Err(e) = state::publish_task_status(self.view.store(), &st, changed).await {
            tracing::warn!("publish task status: {e}");
        }
        for (task, e) in &report.task_errors {
            tracing::warn!(task, "{e}");
        }
        for e in &report.errors {
            tracing::warn!("{e}");
        }
        Ok(report)
    }

    /// Lets go of the netlink sockets of namespaces this node has no use for any more (a
    /// detached task's, a removed network's sandbox): a socket would keep its namespace,
    /// and the interfaces in it, alive.
    fn close_unwanted_sockets(&self, st: &State) {
        let node = &self.cfg.name;
        let mut keep: BTreeSet<Netns> = st
            .tasks
            .values()
            .filter(|t| &t.node == node)
            .map(|t| Netns::Path(PathBuf::from(&t.netns)))
            .collect();
        keep.extend(
            st.networks
                .values()
                .map(|n| Netns::named(&naming::sandbox_netns(node, &n.id))),
        );
        keep.insert(Netns::named(&naming::ingress_sbox_netns(node)));
        self.netlink
            .retain(|ns| matches!(ns, Netns::Home) || keep.contains(ns));
    }

    /// Open netlink sockets (one per namespace the node works in).
    pub fn netlink_sockets(&self) -> usize {
        self.netlink.len()
    }

    fn attachment(&self, st: &State, ep: &Endpoint) -> Option<Attachment> {
        if ep.network == GWBRIDGE {
            return Some(Attachment {
                parent: Netns::Home,
                bridge: GWBRIDGE_IF.into(),
                mtu: self.cfg.bridge_mtu,
                isolated: true,
            });
        }
        let net = st.networks.get(&ep.network)?;
        Some(match net.driver {
            Driver::Overlay => Attachment {
                parent: Netns::named(&naming::sandbox_netns(&self.cfg.name, &net.id)),
                bridge: SANDBOX_BRIDGE.into(),
                mtu: self.cfg.overlay_mtu,
                isolated: false,
            },
            Driver::Bridge => Attachment {
                parent: Netns::Home,
                bridge: naming::bridge_if(&net.id),
                mtu: self.cfg.bridge_mtu,
                isolated: false,
            },
        })
    }

    async fn step(&self, st: &State, checked: bool) -> Report {
        let mut report = Report::default();
        let node = &self.cfg.name;
        let tasks: Vec<&Task> = st.tasks.values().filter(|t| &t.node == node).collect();
        // The routing mesh runs on every node while a service publishes in ingress mode.
        let ingress = st.ingress();
        let needs_gwbridge = ingress.is_some()
            || tasks
                .iter()
                .any(|t| t.endpoints.iter().any(|e| e.network == GWBRIDGE));
        let bridges: Vec<&Network> = st
            .networks
            .values()
            .filter(|n| n.driver == Driver::Bridge)
            .collect();
        let mut overlays: BTreeMap<&str, &Network> = tasks
            .iter()
            .flat_map(|t| t.endpoints.iter())
            .filter_map(|e| st.networks.get(&e.network))
            .filter(|n| n.driver == Driver::Overlay)
            .map(|n| (n.id.as_str(), n))
            .collect();
        if let Some(net) = ingress {
            overlays.insert(net.id.as_str(), net);
        }

        // 1. Node-level bridges, then the overlay sandboxes the local tasks need.
        if let Err(e) = self.ensure_node_bridges(needs_gwbridge, &bridges).await {
            report.errors.push(format!("node bridges: {e:#}"));
        }
        let mut broken_sandboxes = BTreeSet::new();
        for net in overlays.values() {
            if let Err(e) = self.ensure_sandbox(net).await {
                report
                    .errors
                    .push(format!("sandbox of network {}: {e:#}", net.name));
                broken_sandboxes.insert(net.name.clone());
            }
        }

        // 2. Remote tasks on those overlays, reachable through their node's VTEP.
        for net in overlays.values() {
            if broken_sandboxes.contains(&net.name) {
                continue;
            }
            let peers = remote_peers(st, node, &net.name);
            if let Err(e) = self.ensure_peers(net, peers).await {
                report
                    .errors
                    .push(format!("remote tasks of network {}: {e:#}", net.name));
            }
        }

        // 3. Task endpoints.
        let not_tasks = netns::NotTasks::read();
        if let Ok(mut handed) = self.handed.lock() {
            handed.retain(|id| tasks.iter().any(|t| &t.id == id));
        }
        for task in &tasks {
            if let Some(bad) = task
                .endpoints
                .iter()
                .find(|e| broken_sandboxes.contains(&e.network))
            {
                report.task_errors.insert(
                    task.id.clone(),
                    format!("sandbox of network {} is not ready", bad.network),
                );
                continue;
            }
            if task.handoff && !self.handed_over(task).await {
                match self.ensure_handoff(st, task).await {
                    Ok(()) => {
                        report.pending.insert(task.id.clone());
                    }
                    Err(e) => {
                        report.task_errors.insert(task.id.clone(), format!("{e:#}"));
                    }
                }
                continue;
            }
            // A namespace that is not a task's (the node's, netd's own) is never plumbed:
            // an attach through another node's API only meets this check here.
            if let Err(e) = not_tasks.check(Path::new(&task.netns)) {
                report.task_errors.insert(task.id.clone(), e);
                continue;
            }
            if let Err(e) = self.ensure_task(st, task).await {
                report.task_errors.insert(task.id.clone(), format!("{e:#}"));
            }
        }

        // 3b. The ingress sandbox: the node's leg on the ingress network.
        let mut isbox = None;
        if let Some(net) = ingress {
            if broken_sandboxes.contains(&net.name) {
                report
                    .errors
                    .push("ingress sandbox: the ingress network's sandbox is not ready".into());
            } else {
                match self.ensure_ingress_sbox(st, net).await {
                    Ok(t) => isbox = Some(t),
                    Err(e) => report.errors.push(format!("ingress sandbox: {e:#}")),
                }
            }
        }

        // 4. The embedded DNS in every task that is up (and in no other).
        if let Some(dns) = &self.dns {
            let up = tasks_up(&tasks, &report);
            report.task_errors.extend(dns.sync_listeners(&up).await);
        }

        // 5. VIP load balancing for the tasks that are up.
        if let Some(dp) = &self.datapath {
            let up = tasks_up(&tasks, &report);
            // The ingress network carries no VIP: the routing mesh balances it (below).
            let sandboxes: Vec<&Network> = overlays
                .values()
                .filter(|n| !broken_sandboxes.contains(&n.name) && n.name != INGRESS)
                .copied()
                .collect();
            match self.sync_datapath(dp.as_ref(), st, &up, &sandboxes).await {
                Ok(errors) => report.task_errors.extend(errors),
                Err(e) => report.errors.push(format!("load balancer: {e:#}")),
            }
        }

        // 6. The fast path in front of the kernel path (or gone with the mesh) first: the
        // node's rules send what it leaves to the kernel on a path of their own.
        let mut xdp_iface = None;
        if let Some(x) = &self.xdp {
            match self.sync_xdp(x, st, isbox.as_ref().and(ingress)).await {
                Ok(i) => xdp_iface = i,
                Err(e) => report
                    .errors
                    .push(format!("XDP fast path (kernel path in use): {e:#}")),
            }
        }
        // Node firewall: masquerade, isolation and published ports; the ingress
        // sandbox's DNAT onto the service's tasks.
        let rules = Ruleset {
            ports: self.node_ports(st, &tasks, &report, isbox.is_some(), xdp_iface.as_deref()),
            masquerade_out: vec![],
            untracked_udp: (!overlays.is_empty()).then_some(self.cfg.vxlan_port),
            vxlan_members: vxlan_members(st, node),
            tasks_reach_node: self.cfg.tasks_reach_node,
            protected: self.cfg.protected.clone(),
            gwbridge: needs_gwbridge.then(|| BridgeRules {
                ifname: GWBRIDGE_IF.into(),
                subnet: self.cfg.gwbridge_subnet,
                internal: false,
            }),
            bridges: bridges
                .iter()
                .map(|n| BridgeRules {
                    ifname: naming::bridge_if(&n.id),
                    subnet: n.subnet,
                    internal: n.internal,
                })
                .collect(),
        };
        let tag = rules.hash_hex();
        let result = if self.nft_known(&Netns::Home, "ip", &tag, checked) {
            Ok(Ok(nftables::Applied::default()))
        } else {
            tokio::task::spawn_blocking(move || nftables::apply(&rules)).await
        };
        match result {
            Ok(Ok(applied)) => {
                self.nft_applied(&Netns::Home, "ip", tag);
                self.vxlan_foreign.fetch_add(
                    applied.vxlan_foreign_before,
                    std::sync::atomic::Ordering::Relaxed,
                );
                self.task_to_node.fetch_add(
                    applied.task_to_node_before,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            Ok(Err(e)) => report.errors.push(format!("nftables: {e:#}")),
            Err(e) => report.errors.push(format!("nftables: {e}")),
        }
        if let Some(t) = &isbox {
            let local = ipam::ingress_sbox_local_address(self.cfg.gwbridge_subnet);
            let rules = Ruleset {
                ports: ingress_ports(st, Some((&self.cfg.name, local))),
                masquerade_out: vec![t.endpoints[0].ifname.clone()],
                ..Default::default()
            };
            let ns = Netns::Path(PathBuf::from(&t.netns));
            let tag = rules.hash_hex();
            if !self.nft_known(&ns, "ip", &tag, checked) {
                match netns::run_in(&ns, move || nftables::apply(&rules)).await {
                    Ok(_) => self.nft_applied(&ns, "ip", tag),
                    Err(e) => report
                        .errors
                        .push(format!("ingress sandbox nftables: {e:#}")),
                }
            }
        }

        // 6b. Port security in every overlay sandbox: a task's port lets in only its own
        // MAC and address.
        for net in overlays.values() {
            if broken_sandboxes.contains(&net.name) {
                continue;
            }
            let guards = port_guards(st, net, tasks.iter().copied().chain(isbox.as_ref()));
            let ns = Netns::named(&naming::sandbox_netns(node, &net.id));
            let tag = guards.tag();
            if self.nft_known(&ns, "bridge", &tag, checked) {
                continue;
            }
            match netns::run_in(&ns, move || nftables::apply_guards(&guards)).await {
                Ok(_) => self.nft_applied(&ns, "bridge", tag),
                Err(e) => report
                    .errors
                    .push(format!("port security of network {}: {e:#}", net.name)),
            }
        }

        // 7. Sweep what nothing desires any more.
        let mut wanted: BTreeMap<Netns, BTreeSet<String>> = BTreeMap::new();
        for task in tasks.iter().copied().chain(isbox.as_ref()) {
            for ep in &task.endpoints {
                if let Some(a) = self.attachment(st, ep) {
                    wanted
                        .entry(a.parent)
                        .or_default()
                        .insert(naming::endpoint_if(&ep.id));
                }
            }
        }
        let mut wanted_sandboxes: BTreeSet<String> = overlays
            .keys()
            .map(|id| naming::sandbox_netns(node, id))
            .collect();
        if ingress.is_some() {
            wanted_sandboxes.insert(naming::ingress_sbox_netns(node));
        }
        let wanted_bridges: BTreeSet<String> =
            bridges.iter().map(|n| naming::bridge_if(&n.id)).collect();
        // The task sides that wait for their runtime stay in the node's namespace.
        let waiting: BTreeSet<String> = tasks
            .iter()
            .filter(|t| report.pending.contains(&t.id))
            .filter_map(|t| t.endpoints.first())
            .map(|ep| naming::task_tmp_if(&ep.id))
            .collect();
        if let Err(e) = self
            .sweep(
                &wanted,
                &wanted_sandboxes,
                &wanted_bridges,
                needs_gwbridge,
                &waiting,
            )
            .await
        {
            report.errors.push(format!("sweep: {e:#}"));
        }
        report
    }

    /// The ingress sandbox, built like a task with two endpoints: `eth0` on the ingress
    /// network (the node's ingress address, which connections from the mesh come from)
    /// and `eth1` on the gwbridge (where the node sends published-port traffic), with
    /// its default route back through the node.
    async fn ensure_ingress_sbox(&self, st: &State, net: &Network) -> Result<Task> {
        let node = &self.cfg.name;
        let Some(addr) = st.lb_addrs.get(&net.id).and_then(|m| m.get(node)).copied() else {
            // A node that joined after the ingress network was made.
            state::ensure_lb_addresses(&self.view, node, &[INGRESS.to_string()]).await?;
            anyhow::bail!("waiting for this node's address on the ingress network");
        };
        let name = naming::ingress_sbox_netns(node);
        let create = name.clone();
        tokio::task::spawn_blocking(move || netns::create_named(&create))
            .await
            .map_err(|e| anyhow!("{e}"))??;
        let gw = self.cfg.gwbridge_subnet;
        let leg = |id: &str, network: &str, ip: Ipv4Addr, prefix: u8, ifname: &str| Endpoint {
            id: id.into(),
            network: network.into(),
            ip,
            prefix,
            mac: crate::model::format_mac(&crate::model::mac_for_ip(ip)),
            ifname: ifname.into(),
        };
        let [on_ingress, on_gwbridge] = naming::INGRESS_SBOX_ENDPOINTS;
        let task = Task {
            id: name.clone(),
            name: name.clone(),
            service: String::new(),
            node: node.clone(),
            netns: Path::new(netns::NETNS_DIR)
                .join(&name)
                .display()
                .to_string(),
            endpoints: vec![
                leg(on_ingress, INGRESS, addr, net.subnet.prefix(), "eth0"),
                leg(
                    on_gwbridge,
                    GWBRIDGE,
                    crate::ipam::ingress_sbox_address(gw),
                    gw.prefix(),
                    "eth1",
                ),
            ],
            default_gateway: Some(crate::ipam::default_gateway(gw)),
            labels: Default::default(),
            handoff: false,
            created_at: 0,
        };
        self.ensure_task(st, &task).await?;
        let local = ipam::ingress_sbox_local_address(gw);
        self.netlink
            .with(&Netns::named(&name), move |h| async move {
                let eth1 = netlink::require_link(&h, "eth1").await?;
                netlink::ensure_address(&h, &eth1, local, gw.prefix()).await
            })
            .await?;
        netns::run_in(&Netns::named(&name), || {
            netns::write_sysctl("net.ipv4.ip_forward", "1")
        })
        .await?;
        Ok(task)
    }

    /// Returns the interface the fast path runs on, if it does.
    async fn sync_xdp(
        &self,
        x: &XdpMesh,
        st: &State,
        ingress: Option<&Network>,
    ) -> Result<Option<String>> {
        let node = &self.cfg.name;
        // No program on the interface while nothing is published.
        let ports = mesh_ports(st);
        let table = ingress.filter(|_| !ports.is_empty()).and_then(|net| {
            Some(MeshTable {
                node_ip: st.nodes.get(node)?.address?,
                ingress_ip: *st.lb_addrs.get(&net.id)?.get(node)?,
                vni: net.vni?,
                vxlan_port: self.cfg.vxlan_port,
                ports,
            })
        });
        let ifname = match &table {
            Some(t) => {
                let ip = t.node_ip;
                self.netlink
                    .with(&Netns::Home, move |h| async move {
                        for l in netlink::links(&h).await? {
                            if netlink::ipv4_addresses(&h, l.index)
                                .await?
                                .iter()
                                .any(|(a, _)| *a == ip)
                            {
                                return Ok(Some((l.name, l.kind)));
                            }
                        }
                        Ok(None)
                    })
                    .await?
            }
            None => None,
        };
        if let Some(t) = &table {
            warm_neighbours(t);
        }
        let (ifname, kind) = ifname.unzip();
        x.sync(ifname.as_deref(), kind.flatten().as_deref(), table.as_ref())?;
        Ok(ifname.filter(|_| x.attached()))
    }

    /// Published ports answered in the node's namespace: ingress mode goes to the
    /// ingress sandbox (same port); host mode to this node's own tasks of the service
    /// (their gwbridge address, the target port), and is absent where none runs. What
    /// came in on `xdp_iface` and reaches the kernel is a flow the fast path picked a
    /// local task for: it goes to the sandbox's address for local tasks.
    fn node_ports(
        &self,
        st: &State,
        tasks: &[&Task],
        report: &Report,
        mesh: bool,
        xdp_iface: Option<&str>,
    ) -> Vec<PortRule> {
        let up = tasks_up(tasks, report);
        let mut rules = vec![];
        for svc in st.services.values() {
            for p in &svc.publish {
                let gw = self.cfg.gwbridge_subnet;
                let (targets, target_port) = match p.mode {
                    PublishMode::Ingress if mesh => {
                        if let Some(i) = xdp_iface {
                            rules.push(PortRule {
                                iif: Some(i.to_string()),
                                ..PortRule::new(
                                    p.protocol.as_str(),
                                    p.published,
                                    vec![ipam::ingress_sbox_local_address(gw)],
                                    p.published,
                                )
                            });
                        }
                        (vec![ipam::ingress_sbox_address(gw)], p.published)
                    }
                    PublishMode::Ingress => continue,
                    PublishMode::Host => {
                        let mut ips: Vec<Ipv4Addr> = up
                            .iter()
                            .filter(|t| t.service == svc.name)
                            .flat_map(|t| t.endpoints.iter())
                            .filter(|e| e.network == GWBRIDGE)
                            .map(|e| e.ip)
                            .collect();
                        ips.sort();
                        (ips, p.target)
                    }
                };
                rules.push(PortRule::new(
                    p.protocol.as_str(),
                    p.published,
                    targets,
                    target_port,
                ));
            }
        }
        rules
    }

    async fn sync_datapath(
        &self,
        dp: &dyn Datapath,
        st: &State,
        up: &[&Task],
        overlays: &[&Network],
    ) -> Result<BTreeMap<String, String>> {
        let node = &self.cfg.name;
        // The table itself follows the store in `follow`; the step needs its VIPs only.
        let mut vips = LbTable::vips_by_network(st);
        let lb_addr = |net: &Network| st.lb_addrs.get(&net.id).and_then(|m| m.get(node)).copied();
        if dp.needs_lb_addresses() && overlays.iter().any(|n| lb_addr(n).is_none()) {
            // Tasks attached before this node used a translating datapath: reserve its
            // addresses now; the store change brings another step that uses them.
            let names: Vec<String> = overlays.iter().map(|n| n.name.clone()).collect();
            state::ensure_lb_addresses(&self.view, node, &names).await?;
        }
        let sandboxes: Vec<SandboxLb> = overlays
            .iter()
            .filter(|n| !dp.needs_lb_addresses() || lb_addr(n).is_some())
            .map(|n| SandboxLb {
                network: n.name.clone(),
                netns: Netns::named(&naming::sandbox_netns(node, &n.id)),
                vips: vips.remove(&n.name).unwrap_or_default(),
                lb_addr: lb_addr(n),
            })
            .collect();
        dp.sync_local(up, &sandboxes).await
    }

    async fn ensure_node_bridges(&self, gwbridge: bool, bridges: &[&Network]) -> Result<()> {
        let mut want: Vec<(String, Ipv4Addr, u8)> = bridges
            .iter()
            .map(|n| (naming::bridge_if(&n.id), n.gateway, n.subnet.prefix()))
            .collect();
        if gwbridge {
            let s = self.cfg.gwbridge_subnet;
            want.push((
                GWBRIDGE_IF.into(),
                crate::ipam::default_gateway(s),
                s.prefix(),
            ));
        }
        if want.is_empty() {
            return Ok(());
        }
        let mtu = self.cfg.bridge_mtu;
        let names: Vec<String> = want.iter().map(|(n, _, _)| n.clone()).collect();
        self.netlink
            .with(&Netns::Home, move |h| async move {
                for (name, gw, prefix) in want {
                    let br = netlink::ensure_bridge(&h, &name, mtu).await?;
                    netlink::ensure_address(&h, &br, gw, prefix).await?;
                }
                Ok(())
            })
            .await?;
        netns::run_in(&Netns::Home, move || {
            // Egress from the bridges is routed by the node.
            netns::write_sysctl("net.ipv4.ip_forward", "1")?;
            // netd's networks are IPv4: a bridge with an IPv6 link-local address would
            // give tasks a way to the node's services around the IPv4 rules that keep
            // them out (`tasks_reach_node`).
            for name in &names {
                // (No such directory: the kernel has no IPv6 at all.)
                if Path::new(&format!("/proc/sys/net/ipv6/conf/{name}")).exists() {
                    netns::write_sysctl(&format!("net.ipv6.conf.{name}.disable_ipv6"), "1")?;
                }
            }
            Ok(())
        })
        .await
    }

    /// The sandbox of an overlay network: a netns holding `br0` (the gateway) and
    /// `vxlan0`, created in the node netns so its UDP socket lives on the underlay.
    async fn ensure_sandbox(&self, net: &Network) -> Result<()> {
        let name = naming::sandbox_netns(&self.cfg.name, &net.id);
        let create_name = name.clone();
        tokio::task::spawn_blocking(move || netns::create_named(&create_name))
            .await
            .map_err(|e| anyhow!("{e}"))??;
        let sandbox = Netns::named(&name);
        // The sandbox is a switch: netd filters nothing in it.
        netns::run_in(&sandbox, netns::bridge_netfilter_off).await?;
        let mtu = self.cfg.overlay_mtu;
        let (gw, prefix) = (net.gateway, net.subnet.prefix());
        let has_vxlan = self
            .netlink
            .with(&sandbox, move |h| async move {
                if let Some(lo) = netlink::link_by_name(&h, "lo").await? {
                    netlink::set_up(&h, &lo).await?;
                }
                let br = netlink::ensure_bridge(&h, SANDBOX_BRIDGE, mtu).await?;
                netlink::ensure_address(&h, &br, gw, prefix).await?;
                Ok(netlink::link_by_name(&h, SANDBOX_VXLAN).await?.is_some())
            })
            .await?;
        if !has_vxlan {
            let vni = net.vni.context("overlay network without a VNI")?;
            let tmp = naming::vxlan_tmp_if(&net.id);
            let port = self.cfg.vxlan_port;
            let fd = sandbox.open()?.context("sandbox netns file")?;
            self.netlink
                .with(&Netns::Home, move |h| async move {
                    if let Some(stale) = netlink::link_by_name(&h, &tmp).await? {
                        netlink::delete_link(&h, stale.index).await?;
                    }
                    netlink::create_vxlan(&h, &tmp, vni, port, mtu).await?;
                    let link = netlink::require_link(&h, &tmp).await?;
                    netlink::move_to_netns(&h, &link, fd.as_fd()).await
                })
                .await?;
            let tmp = naming::vxlan_tmp_if(&net.id);
            self.netlink
                .with(&sandbox, move |h| async move {
                    let link = netlink::require_link(&h, &tmp).await?;
                    h.link()
                        .set(
                            rtnetlink::LinkUnspec::new_with_index(link.index)
                                .name(SANDBOX_VXLAN)
                                .build(),
                        )
                        .execute()
                        .await
                        .context("rename vxlan")?;
                    Ok(())
                })
                .await?;
        }
        self.netlink
            .with(&sandbox, move |h| async move {
                let br = netlink::require_link(&h, SANDBOX_BRIDGE).await?;
                let vx = netlink::require_link(&h, SANDBOX_VXLAN).await?;
                netlink::set_controller(&h, &vx, br.index).await?;
                netlink::set_up(&h, &vx).await
            })
            .await
    }

    async fn ensure_peers(&self, net: &Network, peers: Vec<Peer>) -> Result<()> {
        let sandbox = Netns::named(&naming::sandbox_netns(&self.cfg.name, &net.id));
        let changed = self
            .netlink
            .with(&sandbox, move |h| async move {
                let vx = netlink::require_link(&h, SANDBOX_VXLAN).await?;
                netlink::ensure_vxlan_peers(&h, &vx, &peers).await
            })
            .await?;
        if changed > 0 {
            tracing::info!(network = net.name, changed, "remote task entries updated");
        }
        Ok(())
    }

    async fn ensure_task(&self, st: &State, task: &Task) -> Result<()> {
        let task_ns = PathBuf::from(&task.netns);
        netns::check_netns_path(&task_ns).map_err(|e| anyhow!("{e}"))?;
        let task_ns = Netns::Path(task_ns);
        for (i, ep) in task.endpoints.iter().enumerate() {
            let a = self
                .attachment(st, ep)
                .with_context(|| format!("network {} of endpoint {} is gone", ep.network, ep.id))?;
            // A runtime that took the first endpoint over named it itself.
            let keep_name = task.handoff && i == 0;
            self.ensure_endpoint(&task_ns, ep, &a, keep_name)
                .await
                .with_context(|| format!("endpoint {} on {}", ep.ifname, ep.network))?;
        }
        let endpoints = task.endpoints.clone();
        let gateway = task.default_gateway;
        self.netlink
            .with(&task_ns, move |h| async move {
                if let Some(lo) = netlink::link_by_name(&h, "lo").await? {
                    netlink::set_up(&h, &lo).await?;
                }
                if let Some(gw) = gateway {
                    let ep = endpoints
                        .iter()
                        .find(|e| Ipv4Network::new(e.ip, e.prefix).is_ok_and(|n| n.contains(gw)))
                        .context("no endpoint reaches the default gateway")?;
                    let link = netlink::require_link(&h, &ep.ifname).await?;
                    netlink::ensure_default_route(&h, &link, gw).await?;
                }
                Ok(())
            })
            .await
    }

    async fn ensure_endpoint(
        &self,
        task_ns: &Netns,
        ep: &Endpoint,
        a: &Attachment,
        keep_name: bool,
    ) -> Result<()> {
        self.ensure_pair(Some(task_ns), ep, a).await?;
        self.plug_host_side(ep, a).await?;
        let ep = ep.clone();
        let mtu = a.mtu;
        self.netlink
            .with(task_ns, move |h| async move {
                configure_task_side(&h, &ep, mtu, keep_name).await
            })
            .await
    }

    /// The veth pair of an endpoint, made unless its host side exists: the host side
    /// where its bridge is, the task side in `task_ns` (or in the node netns, under its
    /// temporary name, for a runtime to take), each made in place (see
    /// [`netlink::create_veth_in`]).
    async fn ensure_pair(
        &self,
        task_ns: Option<&Netns>,
        ep: &Endpoint,
        a: &Attachment,
    ) -> Result<()> {
        let host_if = naming::endpoint_if(&ep.id);
        let exists = {
            let host_if = host_if.clone();
            self.netlink
                .with(&a.parent, move |h| async move {
                    Ok(netlink::link_by_name(&h, &host_if).await?.is_some())
                })
                .await?
        };
        if exists {
            return Ok(());
        }
        let tmp = naming::task_tmp_if(&ep.id);
        let task_fd = match task_ns {
            Some(ns) => Some(ns.open()?.context("task netns")?),
            None => None,
        };
        let parent_fd = a.parent.open()?;
        self.netlink
            .with(&Netns::Home, move |h| async move {
                for stale in [&host_if, &tmp] {
                    if let Some(l) = netlink::link_by_name(&h, stale).await? {
                        netlink::delete_link(&h, l.index).await?;
                    }
                }
                netlink::create_veth_in(
                    &h,
                    &host_if,
                    parent_fd.as_ref().map(|f| f.as_fd()),
                    &tmp,
                    task_fd.as_ref().map(|f| f.as_fd()),
                )
                .await
            })
            .await
    }

    /// The host side of an endpoint: MTU, on its bridge, isolation, up.
    async fn plug_host_side(&self, ep: &Endpoint, a: &Attachment) -> Result<()> {
        let host_if = naming::endpoint_if(&ep.id);
        let (bridge, mtu, isolated) = (a.bridge.clone(), a.mtu, a.isolated);
        self.netlink
            .with(&a.parent, move |h| async move {
                let br = netlink::require_link(&h, &bridge).await?;
                let l = netlink::require_link(&h, &host_if).await?;
                netlink::set_mtu(&h, &l, mtu).await?;
                // Port flags only exist once the link is enslaved: read it again if it just was.
                let l = if netlink::set_controller(&h, &l, br.index).await? {
                    netlink::require_link(&h, &host_if).await?
                } else {
                    l
                };
                netlink::set_isolated(&h, &l, isolated).await?;
                netlink::set_up(&h, &l).await
            })
            .await
    }

    /// A handed-over task whose namespace does not exist yet: its first endpoint's pair,
    /// with the task side waiting in the node netns under its temporary name, already
    /// carrying its MAC, MTU and alias (the runtime moves it, names it and addresses it;
    /// netd finds it again by the alias).
    async fn ensure_handoff(&self, st: &State, task: &Task) -> Result<()> {
        let ep = task.endpoints.first().context("a task without endpoints")?;
        let a = self
            .attachment(st, ep)
            .with_context(|| format!("network {} of endpoint {} is gone", ep.network, ep.id))?;
        self.ensure_pair(None, ep, &a).await?;
        self.plug_host_side(ep, &a).await?;
        let (tmp, alias, mac, mtu) = (
            naming::task_tmp_if(&ep.id),
            naming::endpoint_alias(&ep.id),
            crate::model::mac_for_ip(ep.ip),
            a.mtu,
        );
        self.netlink
            .with(&Netns::Home, move |h| async move {
                // Already taken by the runtime: nothing to prepare.
                let Some(link) = netlink::link_by_name(&h, &tmp).await? else {
                    return Ok(());
                };
                if link.mac != mac
                    || link.mtu != mtu
                    || link.alias.as_deref() != Some(alias.as_str())
                {
                    netlink::configure_down(&h, &link, &tmp, mac, mtu, &alias).await?;
                }
                Ok(())
            })
            .await
    }

    async fn sweep(
        &self,
        wanted: &BTreeMap<Netns, BTreeSet<String>>,
        wanted_sandboxes: &BTreeSet<String>,
        wanted_bridges: &BTreeSet<String>,
        gwbridge: bool,
        waiting: &BTreeSet<String>,
    ) -> Result<()> {
        let prefix = naming::sandbox_prefix(&self.cfg.name);
        let existing = tokio::task::spawn_blocking(move || netns::list_named(&prefix))
            .await
            .map_err(|e| anyhow!("{e}"))??;
        for name in existing {
            if !wanted_sandboxes.contains(&name) {
                tracing::info!("removing sandbox {name}");
                tokio::task::spawn_blocking(move || netns::delete_named(&name))
                    .await
                    .map_err(|e| anyhow!("{e}"))??;
                continue;
            }
            let ns = Netns::named(&name);
            let keep = wanted.get(&ns).cloned().unwrap_or_default();
            self.netlink
                .with(&ns, move |h| async move {
                    sweep_links(&h, |l| {
                        l.name.starts_with(naming::ENDPOINT_PREFIX) && !keep.contains(&l.name)
                    })
                    .await
                })
                .await?;
        }
        let keep = wanted.get(&Netns::Home).cloned().unwrap_or_default();
        let bridges = wanted_bridges.clone();
        let waiting = waiting.clone();
        self.netlink
            .with(&Netns::Home, move |h| async move {
                sweep_links(&h, |l| {
                    let n = l.name.as_str();
                    (n.starts_with(naming::ENDPOINT_PREFIX) && !keep.contains(n))
                        || (n.starts_with(naming::TASK_TMP_PREFIX) && !waiting.contains(n))
                        || n.starts_with(naming::VXLAN_TMP_PREFIX)
                        || (n.starts_with(naming::BRIDGE_PREFIX) && !bridges.contains(n))
                        || (n == GWBRIDGE_IF && !gwbridge)
                })
                .await
            })
            .await
    }
}

/// Each ingress-mode published port with what it balances over: the service's tasks on
/// live nodes, as (node, ingress address), in address order. Both paths of the mesh
/// rotate over exactly this list.
fn ingress_backends(st: &State) -> Vec<(&PortSpec, Vec<(&str, Ipv4Addr)>)> {
    let mut out = vec![];
    for svc in st.services.values() {
        for p in svc
            .publish
            .iter()
            .filter(|p| p.mode == PublishMode::Ingress)
        {
            let mut backends: Vec<(&str, Ipv4Addr)> = st
                .tasks_of(&svc.name)
                .filter(|t| st.node_alive(&t.node))
                .filter_map(|t| {
                    let ep = t.endpoints.iter().find(|e| e.network == INGRESS)?;
                    Some((t.node.as_str(), ep.ip))
                })
                .collect();
            backends.sort_by_key(|(_, ip)| *ip);
            out.push((p, backends));
        }
    }
    out
}

/// What the ingress sandbox balances: each ingress-mode port onto the ingress addresses
/// of the service's tasks on live nodes, wherever they run. With `local` (this node, the
/// sandbox's local address), what arrives at that address goes to the node's own tasks
/// only: the XDP fast path already picked a local one (see [`Reconciler::node_ports`]).
pub fn ingress_ports(st: &State, local: Option<(&str, Ipv4Addr)>) -> Vec<PortRule> {
    let mut rules = vec![];
    for (p, backends) in ingress_backends(st) {
        let addrs = |on: Option<&str>| -> Vec<Ipv4Addr> {
            backends
                .iter()
                .filter(|(node, _)| on.is_none_or(|n| *node == n))
                .map(|(_, ip)| *ip)
                .collect()
        };
        let proto = p.protocol.as_str();
        if let Some((node, addr)) = local {
            rules.push(PortRule {
                daddr: Some(addr),
                ..PortRule::new(proto, p.published, addrs(Some(node)), p.target)
            });
        }
        rules.push(PortRule::new(proto, p.published, addrs(None), p.target));
    }
    rules
}

/// XDP takes the Ethernet address of another node's VTEP from the kernel's neighbour
/// table and cannot resolve one itself: a datagram to each VTEP's discard port makes the
/// kernel resolve (and refresh) them. Sent from the node's own namespace.
fn warm_neighbours(t: &MeshTable) {
    let Ok(sock) = std::net::UdpSocket::bind((t.node_ip, 0)) else {
        return;
    };
    let vteps: BTreeSet<Ipv4Addr> = t
        .ports
        .iter()
        .flat_map(|p| p.backends.iter().map(|(_, v)| *v))
        .filter(|v| *v != t.node_ip)
        .collect();
    for v in vteps {
        let _ = sock.send_to(&[], (v, 9));
    }
}

/// What the XDP fast path balances: the same ports and tasks as [`ingress_ports`], with
/// the VTEP of each task's node.
pub fn mesh_ports(st: &State) -> Vec<MeshPort> {
    ingress_backends(st)
        .into_iter()
        .map(|(p, backends)| MeshPort {
            proto: match p.protocol {
                crate::model::Protocol::Tcp => 6,
                crate::model::Protocol::Udp => 17,
            },
            port: p.published,
            target_port: p.target,
            backends: backends
                .into_iter()
                .filter_map(|(node, ip)| Some((ip, st.nodes.get(node)?.address?)))
                .collect(),
        })
        .collect()
}

/// The inode of a namespace's file: a namespace made anew has another.
fn netns_inode(ns: &Netns) -> Option<u64> {
    let path = match ns {
        Netns::Home => std::path::Path::new("/proc/self/ns/net"),
        Netns::Path(p) => p.as_path(),
    };
    std::fs::metadata(path)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// The underlay addresses VXLAN may come from: the other live nodes'.
fn vxlan_members(st: &State, local: &str) -> Vec<Ipv4Addr> {
    let mut members: Vec<Ipv4Addr> = st
        .nodes
        .values()
        .filter(|n| n.name != local && st.node_alive(&n.name))
        .filter_map(|n| n.address)
        .collect();
    members.sort();
    members.dedup();
    members
}

/// The task ports of overlay `network` and what may come in through each: the host side
/// of every endpoint there, with its task's MAC and address.
fn port_guards<'a>(
    st: &State,
    network: &Network,
    tasks: impl Iterator<Item = &'a Task>,
) -> nftables::SandboxGuards {
    let ingress = network.name == INGRESS;
    let ports = tasks
        .flat_map(|t| {
            // On the ingress network, a task talks to the ingress sandboxes only.
            let confined = ingress && !t.service.is_empty();
            t.endpoints.iter().map(move |e| (e, confined))
        })
        .filter(|(e, _)| e.network == network.name)
        .map(|(e, confined)| PortGuard {
            ifname: naming::endpoint_if(&e.id),
            mac: crate::model::format_mac(&crate::model::mac_for_ip(e.ip)),
            ip: e.ip,
            confined,
        })
        .collect();
    let mesh = if ingress {
        st.lb_addrs
            .get(&network.id)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    } else {
        vec![]
    };
    nftables::SandboxGuards { ports, mesh }
}

/// The tasks without an error so far in this step.
fn tasks_up<'a>(tasks: &[&'a Task], report: &Report) -> Vec<&'a Task> {
    tasks
        .iter()
        .filter(|t| !report.task_errors.contains_key(&t.id) && !report.pending.contains(&t.id))
        .copied()
        .collect()
}

/// The tasks of other nodes on overlay `network`, as this node's VXLAN device must know
/// them. Tasks of a node that is down (no lease) or that announced no underlay address are
/// left out: their traffic would go nowhere, and leaving them out is what withdraws them.
pub fn remote_peers(st: &State, local_node: &str, network: &str) -> Vec<Peer> {
    let mut peers: Vec<Peer> = st
        .tasks
        .values()
        .filter(|t| t.node != local_node && st.node_alive(&t.node))
        .filter_map(|t| {
            let vtep = st.nodes.get(&t.node)?.address?;
            Some(
                t.endpoints
                    .iter()
                    .filter(|e| e.network == network)
                    .map(move |e| Peer {
                        ip: e.ip,
                        mac: crate::model::mac_for_ip(e.ip),
                        vtep,
                    }),
            )
        })
        .flatten()
        .collect();
    // Other nodes' load-balancer addresses answer like tasks (userspace datapath).
    let lb = st
        .networks
        .get(network)
        .and_then(|n| st.lb_addrs.get(&n.id))
        .into_iter()
        .flatten()
        .filter(|(n, _)| n.as_str() != local_node && st.node_alive(n))
        .filter_map(|(n, ip)| {
            Some(Peer {
                ip: *ip,
                mac: crate::model::mac_for_ip(*ip),
                vtep: st.nodes.get(n)?.address?,
            })
        });
    peers.extend(lb);
    peers.sort();
    peers
}

async fn sweep_links(h: &Handle, stale: impl Fn(&Link) -> bool) -> Result<()> {
    for l in netlink::links(h).await? {
        if stale(&l) {
            tracing::info!("removing stale link {}", l.name);
            netlink::delete_link(h, l.index).await?;
        }
    }
    Ok(())
}

/// Whether the runtime of a handed-over task has finished with the interface it was
/// given: it sits in the task's namespace, up, with its address (Docker moves, renames,
/// addresses and raises it in that order; touching it before would race with it).
async fn runtime_done(task: &Task) -> bool {
    let path = PathBuf::from(&task.netns);
    let Some(ep) = task.endpoints.first().cloned() else {
        return false;
    };
    if netns::check_netns_path(&path).is_err() {
        return false;
    }
    let alias = naming::endpoint_alias(&ep.id);
    netns::with_netlink(&Netns::Path(path), move |h| async move {
        let links = netlink::links(&h).await?;
        let Some(link) = links
            .iter()
            .find(|l| l.alias.as_deref() == Some(alias.as_str()))
        else {
            return Ok(false);
        };
        Ok(link.up
            && netlink::ipv4_addresses(&h, link.index)
                .await?
                .contains(&(ep.ip, ep.prefix)))
    })
    .await
    .unwrap_or(false)
}

/// Names, addresses and brings up the task's end of an endpoint, found by its alias (it
/// keeps that across renames) or by its temporary name right after creation. Nothing is
/// touched when it is already right: bringing a link down would cut live connections.
async fn configure_task_side(h: &Handle, ep: &Endpoint, mtu: u32, keep_name: bool) -> Result<()> {
    let alias = naming::endpoint_alias(&ep.id);
    let tmp = naming::task_tmp_if(&ep.id);
    let links = netlink::links(h).await?;
    let link = links
        .iter()
        .find(|l| l.alias.as_deref() == Some(alias.as_str()))
        .or_else(|| links.iter().find(|l| l.name == tmp))
        .with_context(|| format!("the task side of endpoint {} is missing", ep.id))?
        .clone();
    let mac = crate::model::mac_for_ip(ep.ip);
    let name = if keep_name {
        link.name.clone()
    } else {
        ep.ifname.clone()
    };
    let configured = link.name == name
        && link.mac == mac
        && link.mtu == mtu
        && link.alias.as_deref() == Some(alias.as_str());
    let link = if configured {
        link
    } else {
        if let Some(clash) = links
            .iter()
            .find(|l| l.name == name && l.index != link.index)
        {
            anyhow::bail!(
                "the task netns already has an interface named {} (#{})",
                clash.name,
                clash.index
            );
        }
        netlink::configure_down(h, &link, &name, mac, mtu, &alias).await?;
        netlink::require_link(h, &name).await?
    };
    netlink::ensure_address(h, &link, ep.ip, ep.prefix).await?;
    netlink::set_up(h, &link).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Node;

    /// Service `web` on `front`, publishing `ports`: the service of [`task`]'s tasks.
    fn web(ports: &[&str]) -> crate::model::Service {
        crate::model::Service {
            id: "s1".into(),
            name: "web".into(),
            networks: vec!["front".into()],
            endpoint_mode: crate::model::EndpointMode::Vip,
            aliases: vec![],
            publish: ports
                .iter()
                .map(|p| crate::model::parse_publish(p).unwrap())
                .collect(),
            vips: Default::default(),
            created_at: 0,
        }
    }

    fn task(id: &str, node: &str, eps: &[(&str, &str)]) -> Task {
        Task {
            id: id.into(),
            name: id.into(),
            service: "web".into(),
            node: node.into(),
            netns: format!("/run/netns/{id}"),
            endpoints: eps
                .iter()
                .enumerate()
                .map(|(i, (net, ip))| Endpoint {
                    id: format!("{id}{i}"),
                    network: net.to_string(),
                    ip: ip.parse().unwrap(),
                    prefix: 24,
                    mac: String::new(),
                    ifname: format!("eth{i}"),
                })
                .collect(),
            default_gateway: None,
            labels: Default::default(),
            handoff: false,
            created_at: 0,
        }
    }

    fn node(name: &str, addr: Option<&str>) -> Node {
        Node {
            name: name.into(),
            address: addr.map(|a| a.parse().unwrap()),
            gwbridge_subnet: "198.18.1.0/24".parse().unwrap(),
            started_at: 0,
            lb_addresses: false,
        }
    }

    #[test]
    fn peers_are_the_live_remote_tasks_of_the_network() {
        let mut st = State::default();
        st.services.insert("web".into(), web(&[]));
        for (n, a) in [
            ("n1", Some("198.18.0.11")),
            ("n2", Some("198.18.0.12")),
            ("n3", Some("198.18.0.13")),
            ("n4", None),
        ] {
            st.nodes.insert(n.into(), node(n, a));
        }
        st.alive = ["n1", "n2", "n4"].iter().map(|s| s.to_string()).collect();
        for t in [
            task("a", "n1", &[("front", "198.19.0.2")]),
            task(
                "b",
                "n2",
                &[("front", "198.19.0.3"), ("back", "198.19.1.3")],
            ),
            task("c", "n2", &[("back", "198.19.1.4")]),
            // n3 is down, n4 never said where it is: neither is reachable.
            task("d", "n3", &[("front", "198.19.0.5")]),
            task("e", "n4", &[("front", "198.19.0.6")]),
        ] {
            st.insert_task(t);
        }
        let peers = remote_peers(&st, "n1", "front");
        assert_eq!(
            peers,
            vec![Peer {
                ip: "198.19.0.3".parse().unwrap(),
                mac: [0x02, 0x42, 198, 19, 0, 3],
                vtep: "198.18.0.12".parse().unwrap(),
            }]
        );
        let back: Vec<Ipv4Addr> = remote_peers(&st, "n1", "back")
            .iter()
            .map(|p| p.ip)
            .collect();
        assert_eq!(
            back,
            [
                "198.19.1.3".parse::<Ipv4Addr>().unwrap(),
                "198.19.1.4".parse().unwrap()
            ]
        );
        // A node never peers with its own tasks.
        assert!(remote_peers(&st, "n2", "back").is_empty());
    }

    #[test]
    fn the_mesh_balances_each_published_port_over_the_tasks_of_live_nodes() {
        let mut st = State::default();
        for (n, a) in [
            ("n1", "198.18.0.11"),
            ("n2", "198.18.0.12"),
            ("n3", "198.18.0.13"),
        ] {
            st.nodes.insert(n.into(), node(n, Some(a)));
        }
        st.alive = ["n1", "n3"].iter().map(|s| s.to_string()).collect();
        st.services.insert(
            "web".into(),
            web(&["4567:80", "4568:53/udp", "4570:80,mode=host"]),
        );
        for t in [
            task(
                "a",
                "n1",
                &[("front", "198.19.0.2"), (INGRESS, "198.19.255.2")],
            ),
            task(
                "b",
                "n3",
                &[("front", "198.19.0.3"), (INGRESS, "198.19.255.3")],
            ),
            // n2 is down: its task leaves the mesh.
            task(
                "c",
                "n2",
                &[("front", "198.19.0.4"), (INGRESS, "198.19.255.4")],
            ),
        ] {
            st.insert_task(t);
        }
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        // The kernel path (the ingress sandbox): ingress-mode ports only, target ports.
        let rules = ingress_ports(&st, None);
        assert_eq!(rules.len(), 2);
        assert_eq!(
            (rules[0].proto, rules[0].port, rules[0].target_port),
            ("tcp", 4567, 80)
        );
        assert_eq!(
            (rules[1].proto, rules[1].port, rules[1].target_port),
            ("udp", 4568, 53)
        );
        for r in &rules {
            assert_eq!(r.targets, vec![a("198.19.255.2"), a("198.19.255.3")]);
            assert_eq!((r.daddr, &r.iif), (None, &None));
        }
        // With the sandbox's local address: first a rule for it onto n1's own tasks.
        let local = a("198.18.1.253");
        let rules = ingress_ports(&st, Some(("n1", local)));
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0].daddr, Some(local));
        assert_eq!(rules[0].targets, vec![a("198.19.255.2")]);
        assert_eq!(rules[1].daddr, None);
        assert_eq!(rules[1].targets.len(), 2);
        // A node without tasks of its own has no local rule's targets.
        assert!(ingress_ports(&st, Some(("n2", local)))[0]
            .targets
            .is_empty());
        // The fast path: the same tasks, with their nodes' VTEPs.
        let mesh = mesh_ports(&st);
        assert_eq!(mesh.len(), 2);
        assert_eq!((mesh[0].proto, mesh[1].proto), (6, 17));
        assert_eq!(
            mesh[0].backends,
            vec![
                (a("198.19.255.2"), a("198.18.0.11")),
                (a("198.19.255.3"), a("198.18.0.13"))
            ]
        );
    }
}
