//! VIP load balancing. Both datapaths ([`ebpf`]: socket-level, in the kernel;
//! [`userspace`]: a TUN device and netd's own NAT) consume the same [`LbTable`],
//! computed here from the desired state, so they balance the same backends in the same
//! order. A VIP balances over the tasks of live nodes only: losing a node withdraws its
//! tasks from every VIP within the lease TTL.

pub mod conntrack;
pub mod ebpf;
pub mod nat;
pub mod task_port;
pub mod tun;
pub mod userspace;
pub mod xdp;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result};
use async_trait::async_trait;
use serde::Serialize;

use crate::fdstore::{FdStore, Held};
use crate::model::{EndpointMode, Service, Task};
use crate::netns::Netns;
use crate::state::State;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Auto,
    Ebpf,
    Userspace,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "ebpf" => Ok(Mode::Ebpf),
            "userspace" => Ok(Mode::Userspace),
            other => Err(format!(
                "unknown datapath {other:?}: use auto, ebpf or userspace"
            )),
        }
    }
}

/// One VIP and the task IPs behind it, in a stable order (the round-robin order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VipEntry {
    pub service: String,
    pub network: String,
    pub vip: Ipv4Addr,
    /// Where new connections and new UDP flows go.
    pub backends: Vec<Ipv4Addr>,
    /// Tasks being drained or failing their health check ([`State::keeps_flows`]): out
    /// of new picks, while the connections and UDP flows they already have keep
    /// reaching them (a datapath forgets nothing of theirs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<Ipv4Addr>,
}

impl VipEntry {
    /// Whether flows to `backend` stay: it is a backend, or being drained.
    pub fn keeps(&self, backend: &Ipv4Addr) -> bool {
        self.backends.contains(backend) || self.draining.contains(backend)
    }
}

/// The load-balancing state every datapath reads. A persistent map: the datapaths keep a
/// copy for the price of a pointer, and a change touches only its VIPs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LbTable {
    pub vips: imbl::OrdMap<Ipv4Addr, VipEntry>,
}

impl LbTable {
    pub fn from_state(st: &State) -> Self {
        let mut vips = imbl::OrdMap::new();
        for svc in st.services.values() {
            for e in LbTable::entries_of(st, svc) {
                vips.insert(e.vip, e);
            }
        }
        LbTable { vips }
    }

    /// The VIPs of one service with their backends (the tasks of live nodes), from its
    /// own tasks only: the cost of a service's entry does not grow with the cluster.
    pub fn entries_of(st: &State, svc: &Service) -> Vec<VipEntry> {
        if svc.endpoint_mode != EndpointMode::Vip {
            return vec![];
        }
        svc.vips
            .iter()
            .map(|(network, vip)| {
                let on_network = |ts: &mut dyn Iterator<Item = &crate::model::Task>| {
                    let mut ips: Vec<Ipv4Addr> = ts
                        .flat_map(|t| t.endpoints.iter())
                        .filter(|e| &e.network == network)
                        .map(|e| e.ip)
                        .collect();
                    ips.sort();
                    ips
                };
                let backends = on_network(&mut st.tasks_of(&svc.name).filter(|t| st.in_service(t)));
                let draining =
                    on_network(&mut st.tasks_of(&svc.name).filter(|t| st.keeps_flows(t)));
                VipEntry {
                    service: svc.name.clone(),
                    network: network.clone(),
                    vip: *vip,
                    backends,
                    draining,
                }
            })
            .collect()
    }

    /// Brings the entries of `services` from `prev` to `next`; returns the VIPs whose
    /// entry may have changed (what a datapath must look at).
    pub fn update(
        &mut self,
        prev: &State,
        next: &State,
        services: &BTreeSet<String>,
    ) -> BTreeSet<Ipv4Addr> {
        let mut touched = BTreeSet::new();
        for name in services {
            if let Some(old) = prev.services.get(name) {
                for vip in old.vips.values() {
                    if self.vips.get(vip).is_some_and(|e| &e.service == name) {
                        self.vips.remove(vip);
                        touched.insert(*vip);
                    }
                }
            }
            if let Some(svc) = next.services.get(name) {
                for e in LbTable::entries_of(next, svc) {
                    touched.insert(e.vip);
                    self.vips.insert(e.vip, e);
                }
            }
        }
        touched
    }

    /// The VIPs on each network (what the userspace datapath routes into its sandbox).
    pub fn vips_by_network(st: &State) -> BTreeMap<String, Vec<Ipv4Addr>> {
        let mut by = BTreeMap::<String, Vec<Ipv4Addr>>::new();
        for svc in st.services.values() {
            if svc.endpoint_mode != EndpointMode::Vip {
                continue;
            }
            for (network, vip) in &svc.vips {
                by.entry(network.clone()).or_default().push(*vip);
            }
        }
        by
    }
}

/// Connections per VIP and backend, as the datapath counted them on this node.
pub type Counters = BTreeMap<Ipv4Addr, BTreeMap<Ipv4Addr, u64>>;

/// One overlay sandbox of this node, as the datapath may need it: the userspace datapath
/// routes the network's VIPs to its TUN device there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLb {
    pub network: String,
    pub netns: Netns,
    pub vips: Vec<Ipv4Addr>,
    /// This node's own address on the network, which the userspace datapath translates
    /// client addresses to (so answers come back through it).
    pub lb_addr: Option<Ipv4Addr>,
}

/// What a datapath implementation must do; implemented by the eBPF and userspace paths.
#[async_trait]
pub trait Datapath: Send + Sync {
    /// Makes the datapath balance exactly `table` from now on. Each VIP switches from its
    /// old backends to its new ones in one step; unchanged VIPs are not touched.
    /// `touched` names the only VIPs that may differ from the table applied before (a
    /// change's), `None` that any may (a first or a full pass).
    fn apply(&self, table: &LbTable, touched: Option<&BTreeSet<Ipv4Addr>>) -> Result<()>;
    /// Brings the node-side kernel objects to what `tasks` (this node's tasks that are up)
    /// and `sandboxes` need; returns the tasks it could not serve, with why.
    async fn sync_local(
        &self,
        tasks: &[&Task],
        sandboxes: &[SandboxLb],
    ) -> Result<BTreeMap<String, String>>;
    /// After a restart, before the first step: serves at once the `sandboxes` whose
    /// devices the netd before left running (and nothing else).
    async fn resume(&self, _sandboxes: &[SandboxLb]) {}
    fn counters(&self) -> Counters;
    /// Whether the node needs an address of its own on each overlay (the userspace
    /// datapath translates client addresses to it).
    fn needs_lb_addresses(&self) -> bool {
        false
    }
    /// For `netd status`.
    fn status(&self) -> DatapathStatus;
}

#[derive(Debug, Clone, Serialize)]
pub struct DatapathStatus {
    pub requested: Mode,
    /// The datapath in use: ebpf or userspace.
    pub active: String,
    pub reason: String,
    /// Implementation details (pin directory, cgroup, TUN devices, flow count).
    pub detail: serde_json::Value,
}

/// Lets the fd store close descriptors nothing will serve.
fn release(tuns: Option<(Arc<FdStore>, Held)>) {
    if let Some((store, held)) = tuns {
        crate::fdstore::Handover::new(store, userspace::HELD_KIND, held).release_unclaimed();
    }
}

/// Opens the datapath `mode` asks for. `auto` tries eBPF and falls back to userspace when
/// the kernel refuses it, keeping the kernel's reason for `netd status`.
/// `conntrack_max` bounds each userspace conntrack table (unused by eBPF).
/// `tuns`: the fd store and the TUN descriptors the netd before left there; the
/// userspace path serves them again, the eBPF path lets them go.
pub fn open(
    mode: Mode,
    node: &str,
    cgroup: Option<PathBuf>,
    overlay_mtu: u32,
    conntrack_max: usize,
    tuns: Option<(Arc<FdStore>, Held)>,
) -> Result<Arc<dyn Datapath>> {
    let userspace = |reason: String, tuns| -> Result<Arc<dyn Datapath>> {
        Ok(Arc::new(userspace::UserspaceDatapath::new(
            node,
            overlay_mtu,
            mode,
            reason,
            conntrack_max,
            tuns,
        )?))
    };
    match mode {
        Mode::Ebpf => {
            let dp = ebpf::EbpfDatapath::open(node, cgroup, mode, "requested with --datapath ebpf")
                .context("eBPF datapath (--datapath ebpf)")?;
            release(tuns);
            Ok(Arc::new(dp))
        }
        Mode::Userspace => userspace("requested with --datapath userspace".into(), tuns),
        Mode::Auto => {
            match ebpf::EbpfDatapath::open(
                node,
                cgroup,
                mode,
                "the kernel accepted the eBPF programs",
            ) {
                Ok(dp) => {
                    release(tuns);
                    Ok(Arc::new(dp))
                }
                Err(e) => {
                    let reason = format!("eBPF unavailable, using userspace: {e:#}");
                    tracing::warn!("{reason}");
                    userspace(reason, tuns)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{self, fixture, TaskAttach};

    /// Every expiry netd applies to an established TCP flow lets it sit idle for at least
    /// 20 minutes (IPVS's 900 s is what ends Swarm users' idle connections, moby#31208):
    /// the userspace VIP path's conntrack and the way back on published tasks' ports. The
    /// eBPF VIP path keeps no per-flow state for TCP (it translates at connect()), the
    /// XDP mesh expires UDP flows only (`idle_udp` in ingress_xdp.c), and the kernel's
    /// conntrack on the mesh's kernel path is read on live flows in the lab
    /// (zero_drop.rs, `an_idle_connection_...`).
    #[test]
    fn no_timer_of_netd_ends_an_idle_tcp_connection_within_20_minutes() {
        const TWENTY_MINUTES: u64 = 20 * 60;
        // Checked when the tests are built: a shorter timer does not compile.
        const { assert!(conntrack::TCP_ESTABLISHED_TIMEOUT >= TWENTY_MINUTES) };
        const { assert!(task_port::TCP_IDLE.as_secs() >= TWENTY_MINUTES) };
        // The XDP path's sweep of established flows without a FIN.
        const { assert!(xdp::TCP_IDLE.as_secs() >= TWENTY_MINUTES) };
    }

    #[tokio::test]
    async fn the_table_lists_each_vip_with_its_task_ips() {
        let (_dir, s) = fixture::setup().await;
        let svc = fixture::web_on_front(&s).await;
        let mut ips = vec![];
        let mut ids = vec![];
        for i in 0..3 {
            let t = state::attach_task(
                &s,
                "n1",
                TaskAttach {
                    service: "web".into(),
                    netns: format!("/run/netns/t{i}"),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            ips.push(t.endpoints[0].ip);
            ids.push(t.id.clone());
        }
        // Not a backend before its node reported it up.
        let st = State::load(s.store()).await.unwrap();
        assert!(LbTable::from_state(&st).vips[&svc.vips["front"]]
            .backends
            .is_empty());
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        fixture::report_up(&s, &ids).await;
        let st = State::load(s.store()).await.unwrap();
        let table = LbTable::from_state(&st);
        let vip = svc.vips["front"];
        ips.sort();
        assert_eq!(table.vips[&vip].backends, ips);
        assert!(!ips.contains(&vip));
    }

    #[tokio::test]
    async fn tasks_of_a_down_node_leave_every_vip() {
        let (_dir, s) = fixture::setup().await;
        fixture::add_node(&s, "n2").await;
        let svc = fixture::web_on_front(&s).await;
        let mut by_node = vec![];
        for node in ["n1", "n2"] {
            let t = state::attach_task(
                &s,
                "n1",
                TaskAttach {
                    service: "web".into(),
                    netns: format!("/run/netns/{node}"),
                    node: Some(node.into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            by_node.push(t.endpoints[0].ip);
            fixture::report_up(&s, &[&t.id]).await;
        }
        let mut st = State::load(s.store()).await.unwrap();
        let vip = svc.vips["front"];
        assert_eq!(LbTable::from_state(&st).vips[&vip].backends.len(), 2);
        // n2's lease is gone: its task is no backend, although it still exists.
        st.alive.remove("n2");
        assert_eq!(
            LbTable::from_state(&st).vips[&vip].backends,
            vec![by_node[0]]
        );
    }
}
