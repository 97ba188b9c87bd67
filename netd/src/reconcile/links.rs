//! The links applier: bridges, overlay sandboxes and their VXLAN peers, task endpoints
//! (veth pairs, addresses, routes), the ingress sandbox's plumbing, and the sweep of
//! every netd-named link nothing wants. All through netlink, one socket per namespace
//! ([`netns::NetlinkPool`]), each operation reading the kernel first and changing only
//! what differs.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;

use super::Links;
use crate::datapath::task_port::TaskPorts;
use crate::mesh_return;
use crate::model::{Endpoint, Task};
use crate::naming::{self, GWBRIDGE_IF, SANDBOX_BRIDGE, SANDBOX_VXLAN};
use crate::netlink::{self, Link};
use crate::netns::{self, Netns};
use crate::plan::{
    Attachment, IngressPlan, NodeBridge, NodeConfig, OverlayPlan, TaskPlan, Wanted,
    ISBOX_INGRESS_IF,
};
use crate::state::INGRESS;

pub struct KernelLinks {
    cfg: NodeConfig,
    /// One netlink socket per namespace the node works in, kept between steps.
    netlink: std::sync::Arc<netns::NetlinkPool>,
    /// Handed-over tasks whose runtime has finished with their interface: not asked
    /// of the kernel again every step.
    handed: std::sync::Mutex<BTreeSet<String>>,
    /// The namespaces no task may have (the node's, the machine's, netd's own), read once
    /// per step, when its first task needs work.
    not_tasks: std::sync::Mutex<Option<netns::NotTasks>>,
    /// What steps applied and found right, by part ("task ID", "sandbox NS", ...): the
    /// fingerprint of the plan's part and of the namespaces it lives in. A step after a
    /// change skips a part whose fingerprint is unchanged, so its netlink traffic follows
    /// the change, not the node's size; the periodic step (`checked`) redoes everything
    /// and repairs what someone changed behind netd's back.
    done: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Whether the current step is a checked one.
    checked: std::sync::atomic::AtomicBool,
    /// The identity of each namespace the current step read (see [`Self::ns_ids`]).
    ns_seen: std::sync::Mutex<std::collections::HashMap<PathBuf, (u64, u64)>>,
    /// The mesh's way back on published tasks' ports.
    ports: std::sync::Arc<TaskPorts>,
}

impl KernelLinks {
    pub fn new(
        cfg: NodeConfig,
        netlink: std::sync::Arc<netns::NetlinkPool>,
        ports: std::sync::Arc<TaskPorts>,
    ) -> Self {
        KernelLinks {
            ports,
            cfg,
            netlink,
            handed: Default::default(),
            not_tasks: Default::default(),
            done: Default::default(),
            checked: Default::default(),
            ns_seen: Default::default(),
        }
    }

    /// Runs `work` unless part `key` was done for the same fingerprint (and this step is
    /// not a checked one): a hash of `part` and of the identity of each of `namespaces`.
    /// Remembers the fingerprint (with the namespaces read again after the work: it may
    /// make them) when it succeeds. None when skipped.
    async fn unless_done<T>(
        &self,
        key: String,
        part: &impl std::fmt::Debug,
        namespaces: &[&Netns],
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<Option<T>> {
        let checked = self.checked.load(std::sync::atomic::Ordering::Relaxed);
        let part = text_hash(part);
        let before = self.ns_ids(namespaces, false).map(|ids| part ^ ids);
        let done = |d: &std::collections::HashMap<String, u64>| d.get(&key).copied();
        if !checked && before.is_some() && self.done.lock().ok().and_then(|d| done(&d)) == before {
            return Ok(None);
        }
        if let Ok(mut d) = self.done.lock() {
            d.remove(&key);
        }
        let out = work.await?;
        let after = self.ns_ids(namespaces, true).map(|ids| part ^ ids);
        if let (Some(after), Ok(mut d)) = (after, self.done.lock()) {
            d.insert(key, after);
        }
        Ok(Some(out))
    }

    /// A hash of the identity (device, inode) of each of `namespaces`; None if one does
    /// not exist. Within a step each namespace is read once (many tasks plug into one
    /// sandbox) unless `fresh`: after a part's work, which may have made it anew.
    fn ns_ids(&self, namespaces: &[&Netns], fresh: bool) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut seen = self.ns_seen.lock().ok()?;
        for ns in namespaces {
            let id = match ns {
                Netns::Home => (0, 0),
                Netns::Path(p) => match seen.get(p).filter(|_| !fresh) {
                    Some(id) => *id,
                    None => match netns::file_id(p) {
                        Some(id) => *seen.entry(p.clone()).insert_entry(id).get(),
                        None => {
                            seen.remove(p);
                            return None;
                        }
                    },
                },
            };
            id.hash(&mut h);
        }
        Some(h.finish())
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
}

#[async_trait]
impl Links for KernelLinks {
    fn begin(&self, checked: bool) {
        // Read again at the step's first task that needs work (most steps have none).
        if let Ok(mut n) = self.not_tasks.lock() {
            *n = None;
        }
        if let Ok(mut seen) = self.ns_seen.lock() {
            seen.clear();
        }
        self.checked
            .store(checked, std::sync::atomic::Ordering::Relaxed);
        if checked {
            if let Ok(mut d) = self.done.lock() {
                d.clear();
            }
        }
    }

    async fn bridges(&self, bridges: &[NodeBridge]) -> Result<()> {
        self.unless_done(
            "bridges".into(),
            &bridges,
            &[&Netns::Home],
            self.ensure_bridges(bridges),
        )
        .await
        .map(|_| ())
    }

    async fn sandbox(&self, o: &OverlayPlan) -> Result<bool> {
        let key = format!("sandbox {:?}", o.sandbox);
        self.unless_done(key, &o.network, &[&o.sandbox], self.ensure_sandbox(o))
            .await
            .map(|done| done.is_some())
    }

    async fn peers(&self, o: &OverlayPlan) -> Result<usize> {
        let key = format!("peers {:?}", o.sandbox);
        Ok(self
            .unless_done(key, &o.peers, &[&o.sandbox], self.ensure_peers(o))
            .await?
            .unwrap_or(0))
    }

    async fn task(&self, t: &TaskPlan) -> Result<()> {
        let key = format!("task {}", t.task.id);
        let namespaces = task_namespaces(t);
        let namespaces: Vec<&Netns> = namespaces.iter().collect();
        self.unless_done(key, t, &namespaces, self.ensure_task(t))
            .await
            .map(|_| ())
    }

    async fn handoff(&self, t: &TaskPlan) -> Result<bool> {
        if self.handed_over(&t.task).await {
            return Ok(true);
        }
        self.ensure_handoff(t).await?;
        Ok(false)
    }

    async fn ingress_sandbox(&self, i: &IngressPlan, t: &TaskPlan) -> Result<()> {
        let namespaces = task_namespaces(t);
        let namespaces: Vec<&Netns> = namespaces.iter().collect();
        self.unless_done(
            "ingress sandbox".into(),
            &(t, &i.local_address),
            &namespaces,
            self.ensure_ingress_sandbox(i, t),
        )
        .await
        .map(|_| ())
    }

    async fn sweep(&self, w: &Wanted) -> Result<()> {
        self.unless_done("sweep".into(), w, &[], self.ensure_swept(w))
            .await
            .map(|_| ())
    }

    fn keep_sockets(&self, keep: &BTreeSet<Netns>) {
        self.netlink
            .retain(|ns| matches!(ns, Netns::Home) || keep.contains(ns));
    }

    fn sockets(&self) -> usize {
        self.netlink.len()
    }
}

impl KernelLinks {
    async fn ensure_bridges(&self, bridges: &[NodeBridge]) -> Result<()> {
        if bridges.is_empty() {
            return Ok(());
        }
        let want: Vec<NodeBridge> = bridges.to_vec();
        let mtu = self.cfg.bridge_mtu;
        let names: Vec<String> = want.iter().map(|b| b.ifname.clone()).collect();
        self.netlink
            .with(&Netns::Home, move |h| async move {
                for b in want {
                    let br = netlink::ensure_bridge(&h, &b.ifname, mtu).await?;
                    netlink::ensure_address(&h, &br, b.gateway, b.prefix).await?;
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
                netns::disable_ipv6(name)?;
            }
            Ok(())
        })
        .await
    }

    /// The sandbox of an overlay network: a netns holding `br0` (the gateway) and
    /// `vxlan0`, created in the node netns so its UDP socket lives on the underlay.
    async fn ensure_sandbox(&self, o: &OverlayPlan) -> Result<()> {
        let net = &o.network;
        let name = naming::sandbox_netns(&self.cfg.name, &net.id);
        let create_name = name.clone();
        tokio::task::spawn_blocking(move || netns::create_named(&create_name))
            .await
            .map_err(|e| anyhow!("{e}"))??;
        let sandbox = Netns::named(&name);
        // The sandbox is a switch: netd filters nothing in it.
        netns::run_in(&sandbox, netns::bridge_netfilter_off).await?;
        let mtu = self.cfg.network_mtu(net);
        // An encrypted overlay's VXLAN sends on the sealed port from the node's own
        // address; the node's firewall routes that into WireGuard (crate::wireguard).
        let (port, local) = if net.encrypted {
            let w = self.cfg.wireguard.as_ref().map_err(|why| {
                anyhow!(
                    "network {:?} is encrypted, and this node has no WireGuard: {why}",
                    net.name
                )
            })?;
            (crate::wireguard::SEALED_VXLAN_PORT, Some(w.address))
        } else {
            (self.cfg.vxlan_port, None)
        };
        let (gw, prefix) = (net.gateway, net.subnet.prefix());
        let half_made = naming::vxlan_tmp_if(&net.id);
        let has_vxlan = self
            .netlink
            .with(&sandbox, move |h| async move {
                if let Some(lo) = netlink::link_by_name(&h, "lo").await? {
                    netlink::set_up(&h, &lo).await?;
                }
                let br = netlink::ensure_bridge(&h, SANDBOX_BRIDGE, mtu).await?;
                netlink::ensure_address(&h, &br, gw, prefix).await?;
                // A netd killed between moving the device in and renaming it left it
                // here under its temporary name, holding the VNI and port: without this
                // no new one could be made. It goes, and is made again below.
                if let Some(stale) = netlink::link_by_name(&h, &half_made).await? {
                    tracing::warn!("removing {half_made} left half-made in its sandbox");
                    netlink::delete_link(&h, stale.index).await?;
                }
                Ok(netlink::link_by_name(&h, SANDBOX_VXLAN).await?.is_some())
            })
            .await?;
        if !has_vxlan {
            let vni = net.vni.context("overlay network without a VNI")?;
            let tmp = naming::vxlan_tmp_if(&net.id);
            let fd = sandbox.open()?.context("sandbox netns file")?;
            let h = self.netlink.handle(&Netns::Home).await?;
            if let Some(stale) = netlink::link_by_name(&h, &tmp).await? {
                netlink::delete_link(&h, stale.index).await?;
            }
            // A sandbox of this network removed a moment ago may still be going (the
            // kernel frees a namespace asynchronously), its VXLAN device holding the VNI
            // and port: wait for it rather than fail the step.
            let mut tries = 0;
            while let Err(e) = netlink::create_vxlan(&h, &tmp, vni, port, local, mtu).await {
                tries += 1;
                if tries >= 40 {
                    return Err(e);
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let link = netlink::require_link(&h, &tmp).await?;
            netlink::move_to_netns(&h, &link, fd.as_fd()).await?;
            let tmp = naming::vxlan_tmp_if(&net.id);
            self.netlink
                .with(&sandbox, move |h| async move {
                    let link = netlink::require_link(&h, &tmp).await?;
                    crate::writes::count(crate::writes::Kind::Netlink, 1);
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

    async fn ensure_peers(&self, o: &OverlayPlan) -> Result<usize> {
        let peers = o.peers.clone();
        self.netlink
            .with(&o.sandbox, move |h| async move {
                let vx = netlink::require_link(&h, SANDBOX_VXLAN).await?;
                netlink::ensure_vxlan_peers(&h, &vx, &peers).await
            })
            .await
    }

    async fn ensure_task(&self, t: &TaskPlan) -> Result<()> {
        // A namespace that is not a task's (the node's, netd's own) is never plumbed: an
        // attach through another node's API only meets this check here.
        self.not_tasks
            .lock()
            .map_err(|_| anyhow!("poisoned lock"))?
            .get_or_insert_with(netns::NotTasks::read)
            .check(Path::new(&t.task.netns))
            .map_err(|e| anyhow!("{e}"))?;
        self.plumb(t).await
    }

    async fn ensure_ingress_sandbox(&self, i: &IngressPlan, t: &TaskPlan) -> Result<()> {
        let name = naming::ingress_sbox_netns(&self.cfg.name);
        let create = name.clone();
        tokio::task::spawn_blocking(move || netns::create_named(&create))
            .await
            .map_err(|e| anyhow!("{e}"))??;
        self.plumb(t).await?;
        let (local, prefix) = (i.local_address, self.cfg.gwbridge_subnet.prefix());
        self.netlink
            .with(&Netns::named(&name), move |h| async move {
                let eth1 = netlink::require_link(&h, naming::INGRESS_SBOX_GWBRIDGE_IF).await?;
                netlink::ensure_address(&h, &eth1, local, prefix).await?;
                // Older netds routed remote tasks' answers through here (tables and rules
                // by node mark): an upgraded node has none.
                netlink::ensure_rules(&h, mesh_return::PREFS, &[]).await?;
                netlink::ensure_tables(&h, mesh_return::sandbox_table, &[]).await
            })
            .await?;
        netns::run_in(&Netns::named(&name), || {
            netns::write_sysctl("net.ipv4.ip_forward", "1")?;
            // Mesh packets carry clients' addresses, which the sandbox routes by
            // another leg than the one a task's answers arrive on: none may be refused
            // (rp_filter) or answered with a redirect.
            for dev in ["all", "default", ISBOX_INGRESS_IF] {
                netns::write_sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
                netns::write_sysctl(&format!("net.ipv4.conf.{dev}.send_redirects"), "0")?;
            }
            Ok(())
        })
        .await
    }

    async fn ensure_swept(&self, w: &Wanted) -> Result<()> {
        if let Ok(mut handed) = self.handed.lock() {
            handed.retain(|id| w.tasks.contains(id));
        }
        let (wanted, wanted_sandboxes) = (&w.links, &w.sandboxes);
        let prefix = naming::sandbox_prefix(&self.cfg.name);
        let existing = tokio::task::spawn_blocking(move || netns::list_named(&prefix))
            .await
            .map_err(|e| anyhow!("{e}"))??;
        for name in existing {
            if !wanted_sandboxes.contains(&name) {
                tracing::info!("removing sandbox {name}");
                // Our socket there would keep the namespace (and its VXLAN device) alive.
                self.netlink.forget(&Netns::named(&name));
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
        let bridges = w.bridges.clone();
        let waiting = w.waiting.clone();
        let gwbridge = w.gwbridge;
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

    /// Every endpoint of a task, then its loopback and default route.
    async fn plumb(&self, t: &TaskPlan) -> Result<()> {
        let task = &t.task;
        let task_ns = PathBuf::from(&task.netns);
        netns::check_netns_path(&task_ns).map_err(|e| anyhow!("{e}"))?;
        let task_ns = Netns::Path(task_ns);
        for (i, leg) in t.legs.iter().enumerate() {
            let ep = &leg.endpoint;
            let a = leg
                .attachment
                .as_ref()
                .with_context(|| format!("network {} of endpoint {} is gone", ep.network, ep.id))?;
            // A runtime that took the first endpoint over named it itself.
            let keep_name = task.handoff && i == 0;
            self.ensure_endpoint(&task_ns, ep, a, keep_name)
                .await
                .with_context(|| format!("endpoint {} on {}", ep.ifname, ep.network))?;
            // A published task's port on the ingress network sends its answers back to
            // the node that took each flow.
            if let Some(back) = t.mesh_return.as_ref().filter(|_| ep.network == INGRESS) {
                let (ports, port, subnet) =
                    (self.ports.clone(), naming::endpoint_if(&ep.id), back.subnet);
                let ns = format!("{:?}", a.parent);
                let name = port.clone();
                let (index, tags) = self
                    .netlink
                    .with(&a.parent, move |h| async move {
                        let link = netlink::require_link(&h, &name).await?;
                        let tags = netlink::bpf_filter_tags(&h, link.index, TaskPorts::PRIORITY);
                        Ok((link.index, tags.await?))
                    })
                    .await?;
                if !ports.in_place(&ns, &port, index, subnet, tags)? {
                    netns::run_in(&a.parent, move || ports.attach(&ns, &port, index, tags)).await?;
                }
            }
        }
        let endpoints = task.endpoints.clone();
        let gateway = task.default_gateway;
        let back = t.mesh_return.clone();
        // A task on the ingress network that has no way back planned (its node lacks an
        // ingress address, say) loses rules it had; the ingress sandbox (no service)
        // has its old ones removed by `ensure_ingress_sandbox`. Other tasks never had
        // any: no dump for them.
        let may_have_rules =
            !task.service.is_empty() && task.endpoints.iter().any(|e| e.network == INGRESS);
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
                let task_table = |t: u32| t == mesh_return::TASK_TABLE;
                if let Some(back) = back {
                    let link = netlink::require_link(&h, &back.ifname).await?;
                    let tables = [(mesh_return::TASK_TABLE, back.routes(link.index))];
                    netlink::ensure_tables(&h, task_table, &tables).await?;
                    netlink::ensure_rules(&h, mesh_return::PREFS, &back.rules()).await?;
                } else if may_have_rules {
                    netlink::ensure_rules(&h, mesh_return::PREFS, &[]).await?;
                    netlink::ensure_tables(&h, task_table, &[]).await?;
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
            let Some(ns) = task_ns else {
                return Ok(());
            };
            if task_side_in(&self.netlink, ns, ep).await? {
                return Ok(());
            }
            // The task's namespace was made anew at its path (a runtime deleted it and
            // made another): the old pair's task side is in the old one, which may live
            // on a while. Deleting the host side deletes the pair, and the name is free.
            tracing::info!(
                endpoint = ep.id,
                "the task side is not in the task's namespace: making the pair again"
            );
            let name = host_if.clone();
            self.netlink
                .with(&a.parent, move |h| async move {
                    if let Some(l) = netlink::link_by_name(&h, &name).await? {
                        netlink::delete_link(&h, l.index).await?;
                    }
                    Ok(())
                })
                .await?;
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
    async fn ensure_handoff(&self, t: &TaskPlan) -> Result<()> {
        let leg = t.legs.first().context("a task without endpoints")?;
        let ep = &leg.endpoint;
        let a = leg
            .attachment
            .as_ref()
            .with_context(|| format!("network {} of endpoint {} is gone", ep.network, ep.id))?;
        self.ensure_pair(None, ep, a).await?;
        self.plug_host_side(ep, a).await?;
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

/// Whether the task's end of endpoint `ep` is in `ns`: by its alias, or by its temporary
/// name right after creation (as [`configure_task_side`] finds it).
async fn task_side_in(pool: &netns::NetlinkPool, ns: &Netns, ep: &Endpoint) -> Result<bool> {
    let alias = naming::endpoint_alias(&ep.id);
    let tmp = naming::task_tmp_if(&ep.id);
    pool.with(ns, move |h| async move {
        let links = netlink::links(&h).await?;
        Ok(links
            .iter()
            .any(|l| l.alias.as_deref() == Some(alias.as_str()) || l.name == tmp))
    })
    .await
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

/// A hash of a plan part's text (every field, nested ones too, without a `Hash` for
/// each type).
fn text_hash(part: &impl std::fmt::Debug) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{part:?}").hash(&mut h);
    h.finish()
}

/// The namespaces a task's part lives in: its own and the ones its legs plug into.
fn task_namespaces(t: &TaskPlan) -> Vec<Netns> {
    let mut all = vec![Netns::Path(PathBuf::from(&t.task.netns))];
    all.extend(
        t.legs
            .iter()
            .filter_map(|l| l.attachment.as_ref().map(|a| a.parent.clone())),
    );
    all
}
