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

pub struct KernelMesh {
    xdp: Arc<XdpMesh>,
    netlink: Arc<NetlinkPool>,
}

impl KernelMesh {
    pub fn new(xdp: Arc<XdpMesh>, netlink: Arc<NetlinkPool>) -> Self {
        KernelMesh { xdp, netlink }
    }
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
        if let Some(t) = table {
            warm_neighbours(t);
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
}
