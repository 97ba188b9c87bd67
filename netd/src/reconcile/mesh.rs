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
use crate::datapath::xdp::{MeshTable, XdpMesh};
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
        KernelMesh {
            xdp,
            netlink,
            vteps,
        }
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
