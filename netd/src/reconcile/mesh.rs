//! The routing mesh's fast path applier: finds the underlay interface that holds the
//! node's address and runs the XDP program there for the plan's table (or removes it:
//! nothing published, `--xdp off`). The kernel path (the node's and the ingress
//! sandbox's nftables) is the firewall applier's.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;

use super::Mesh;
use crate::datapath::xdp::{MeshTable, XdpMesh, SWEEP_EVERY};
use crate::netlink;
use crate::netns::{NetlinkPool, Netns};

/// The node's address and the other VTEPs its XDP program sends to.
type Vteps = Option<(Ipv4Addr, BTreeSet<Ipv4Addr>)>;

pub struct KernelMesh {
    xdp: Arc<XdpMesh>,
    netlink: Arc<NetlinkPool>,
    /// What the neighbour warmer keeps resolved (None: no table).
    vteps: Arc<std::sync::Mutex<Vteps>>,
}

/// How often the VTEPs' neighbour entries are refreshed between reconcile steps.
const WARM_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

impl KernelMesh {
    /// Also starts the neighbour warmer: a thread (in the node's namespace, netd's own)
    /// that ends with the applier.
    pub fn new(xdp: Arc<XdpMesh>, netlink: Arc<NetlinkPool>) -> Self {
        let vteps: Arc<std::sync::Mutex<Vteps>> = Arc::default();
        let watched = Arc::downgrade(&vteps);
        let warmer = std::thread::Builder::new()
            .name("netd-neigh".into())
            .spawn(move || loop {
                std::thread::sleep(WARM_EVERY);
                let Some(vteps) = watched.upgrade() else {
                    return;
                };
                let current = vteps.lock().ok().and_then(|v| v.clone());
                if let Some((node_ip, vteps)) = current {
                    warm_neighbours(node_ip, &vteps);
                }
            });
        if let Err(e) = warmer {
            tracing::warn!("no neighbour warmer for the XDP fast path: {e}");
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(tend_fast_path(Arc::downgrade(&xdp), netlink.clone()));
            }
            Err(e) => tracing::warn!("nothing tends the XDP fast path: {e}"),
        }
        KernelMesh {
            xdp,
            netlink,
            vteps,
        }
    }
}

/// How often the fast path's drops for want of a neighbour are checked (a read of one
/// counter): well within a TCP client's first SYN retransmission (1 s), which then gets
/// through.
const RESOLVE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// The least time between two looks at the flow tables for the next hops to resolve.
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Tends the fast path between reconcile steps, until it goes: has the kernel resolve
/// the next hops of its flows whenever it dropped packets for want of a neighbour entry
/// ([`XdpMesh::unresolved_next_hops`]), and sweeps its established flow tables every
/// [`SWEEP_EVERY`] ([`XdpMesh::sweep_flows`]).
async fn tend_fast_path(xdp: std::sync::Weak<XdpMesh>, netlink: Arc<NetlinkPool>) {
    let mut tick = tokio::time::interval(RESOLVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept = std::time::Instant::now();
    let mut looked = std::time::Instant::now() - LOOK_EVERY;
    loop {
        tick.tick().await;
        let Some(xdp) = xdp.upgrade() else {
            return;
        };
        if swept.elapsed() >= SWEEP_EVERY {
            swept = std::time::Instant::now();
            let x = xdp.clone();
            match tokio::task::spawn_blocking(move || x.sweep_flows()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("sweep the XDP flow tables: {e:#}"),
                Err(e) => tracing::warn!("sweep the XDP flow tables: {e}"),
            }
        }
        // At most once a second, and only after drops: a look walks the flow tables (off
        // the async workers).
        if looked.elapsed() < LOOK_EVERY || !xdp.dropped_for_want_of_neighbours() {
            continue;
        }
        let x = xdp.clone();
        let hops = match tokio::task::spawn_blocking(move || x.unresolved_next_hops()).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("look for the XDP path's missing neighbours: {e}");
                continue;
            }
        };
        if hops.is_empty() {
            continue;
        }
        looked = std::time::Instant::now();
        let handle = match netlink.handle(&Netns::Home).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("resolve the XDP path's neighbours: {e:#}");
                continue;
            }
        };
        // Many clients behind one router share their next hop: asked once.
        let mut vias = BTreeSet::new();
        for dst in hops {
            match netlink::next_hop(&handle, dst).await {
                Ok(v) => {
                    vias.insert(v);
                }
                Err(e) => tracing::debug!("{e:#}"),
            }
        }
        let mut asked = 0;
        for (via, oif) in vias {
            match netlink::resolve_neighbour(&handle, oif, via).await {
                Ok(()) => asked += 1,
                Err(e) => tracing::debug!("{e:#}"),
            }
        }
        tracing::info!(
            asked,
            "the XDP path dropped packets for want of a neighbour: resolving its next hops"
        );
        xdp.asked_neighbours(asked);
    }
}

/// The VTEPs of the other nodes that `t` sends flows to.
fn vteps_of(t: &MeshTable) -> BTreeSet<Ipv4Addr> {
    t.ports
        .iter()
        .flat_map(|p| p.backends.iter().map(|(_, v)| *v))
        .filter(|v| *v != t.node_ip)
        .collect()
}

/// XDP takes the Ethernet address of another node's VTEP from the kernel's neighbour
/// table and cannot resolve one itself (it drops what it cannot address): a datagram to
/// each VTEP's discard port makes the kernel resolve (and refresh) them. Sent from the
/// node's own namespace, at every step and every few seconds between: an entry that
/// failed (an ARP exchange lost while a flood filled the link) would otherwise stay
/// failed, and every flow to that node dropped, until the next step.
fn warm_neighbours(node_ip: Ipv4Addr, vteps: &BTreeSet<Ipv4Addr>) {
    let Ok(sock) = std::net::UdpSocket::bind((node_ip, 0)) else {
        return;
    };
    for v in vteps {
        let _ = sock.send_to(&[], (*v, 9));
    }
}

#[async_trait]
impl Mesh for KernelMesh {
    async fn sync(&self, table: Option<&MeshTable>) -> Result<Option<String>> {
        let found = match table {
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
        let vteps = table.map(|t| (t.node_ip, vteps_of(t)));
        if let Some((node_ip, vteps)) = &vteps {
            warm_neighbours(*node_ip, vteps);
        }
        if let Ok(mut v) = self.vteps.lock() {
            *v = vteps;
        }
        let (ifname, kind) = found.unzip();
        self.xdp
            .sync(ifname.as_deref(), kind.flatten().as_deref(), table)?;
        Ok(ifname.filter(|_| self.xdp.attached()))
    }

    fn running_on(&self) -> Option<String> {
        self.xdp.running_on()
    }

    fn status(&self) -> serde_json::Value {
        self.xdp.status()
    }

    fn flows_removed(&self) -> u64 {
        self.xdp.flows_removed()
    }

    fn metrics(&self) -> Option<crate::metrics::XdpCounters> {
        self.xdp.metrics()
    }
}
