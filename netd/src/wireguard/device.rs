//! netd's userspace WireGuard: `ndwg` (a TUN device) on one side, a UDP socket on the
//! underlay on the other, and one boringtun `Tunn` per peer node in between.
//!
//! Out: a packet read from `ndwg` is an encrypted overlay's VXLAN packet, addressed to
//! a peer node's underlay address; that address picks the peer, whose `Tunn` seals it.
//! In: a datagram from a peer node's address is opened by that peer's `Tunn` (a replayed,
//! altered or foreign one is refused and counted); what it holds goes to `ndwg` only if
//! it is a VXLAN packet from that node's own address to this node, to the sealed port.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;

use super::keys::{self, NodeKey};
use super::{IFNAME, SEALED_VXLAN_PORT};
use crate::datapath::tun::{self, Tun};
use crate::netlink;
use crate::netns::{self, Netns};

/// How often every peer's timers run (handshakes, re-keys, keepalives).
const TICK: Duration = Duration::from_millis(250);
/// The largest packet `ndwg` hands over, and the largest datagram taken in.
const MAX_PACKET: usize = 65535;

/// A node this one exchanges encrypted overlay traffic with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    pub name: String,
    pub address: Ipv4Addr,
    pub public_key: String,
}

struct Peer {
    name: String,
    public: [u8; 32],
    tunn: Mutex<Tunn>,
}

/// Datagrams and packets refused, by reason (what `netd status` shows).
#[derive(Default)]
struct Dropped {
    /// From an address that is no peer node's.
    unknown_sender: AtomicU64,
    /// A data message whose counter was seen before, or is older than the window (a
    /// replay).
    replayed: AtomicU64,
    /// A message that fails its authentication (altered, or sealed with another key).
    not_authentic: AtomicU64,
    /// Anything else boringtun refused (malformed, wrong index, expired session).
    invalid: AtomicU64,
    /// Opened, but not a VXLAN packet from the sender's own address to this node.
    wrong_inner: AtomicU64,
    /// A packet from `ndwg` for an address that is no peer node's.
    no_peer: AtomicU64,
}

/// What `netd status` shows of the encryption.
#[derive(Debug, Serialize)]
pub struct Status {
    pub implementation: &'static str,
    pub why: String,
    pub interface: &'static str,
    pub port: u16,
    pub public_key: String,
    pub peers: Vec<PeerStatus>,
    pub dropped: HashMap<&'static str, u64>,
    pub sealed: u64,
    pub opened: u64,
}

#[derive(Debug, Serialize)]
pub struct PeerStatus {
    pub node: String,
    pub address: Ipv4Addr,
    /// Seconds since the last completed handshake (none yet: null).
    pub last_handshake_s: Option<f64>,
    pub tx_bytes: usize,
    pub rx_bytes: usize,
}

/// The running userspace WireGuard of this node.
pub struct Sealer {
    tun: Tun,
    sock: UdpSocket,
    port: u16,
    me: Ipv4Addr,
    secret: StaticSecret,
    public_text: String,
    why: String,
    peers: RwLock<HashMap<Ipv4Addr, Arc<Peer>>>,
    next_index: AtomicU64,
    dropped: Dropped,
    sealed: AtomicU64,
    opened: AtomicU64,
}

impl Sealer {
    /// Brings up `ndwg` (MTU `mtu`) in the daemon's netns and the socket on `port`, and
    /// starts serving them. `me`: this node's underlay address; `why`: why userspace.
    pub async fn start(
        key: NodeKey,
        me: Ipv4Addr,
        port: u16,
        mtu: u32,
        why: String,
    ) -> Result<Arc<Sealer>> {
        let fd = tun::open(IFNAME).with_context(|| format!("open TUN device {IFNAME}"))?;
        let tun = Tun::new(fd).context("serve the TUN device")?;
        configure_interface(mtu).await?;
        let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
            .await
            .with_context(|| format!("bind the WireGuard port {port}"))?;
        let sealer = Arc::new(Sealer {
            tun,
            sock,
            port,
            me,
            public_text: key.public_text(),
            secret: key.secret,
            why,
            peers: RwLock::new(HashMap::new()),
            // A random start: after a restart, a peer's packets of the sessions before
            // do not meet a reused index (they are refused as unknown, not as forged).
            next_index: AtomicU64::new(u64::from(rand::random::<u32>() & 0xff_ffff)),
            dropped: Dropped::default(),
            sealed: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        });
        tokio::spawn(sealer.clone().outbound());
        tokio::spawn(sealer.clone().inbound());
        tokio::spawn(sealer.clone().timers());
        Ok(sealer)
    }

    /// Makes the peers exactly `nodes` (this node left out): a new node gets a `Tunn`, a
    /// node whose key changed a new one, a node gone loses its own.
    pub fn set_peers(&self, nodes: &[PeerNode]) {
        let Ok(mut peers) = self.peers.write() else {
            return;
        };
        let mut wanted: HashMap<Ipv4Addr, (&PeerNode, [u8; 32])> = HashMap::new();
        for n in nodes.iter().filter(|n| n.address != self.me) {
            match keys::decode_public(&n.public_key) {
                Ok(k) => {
                    wanted.insert(n.address, (n, *k.as_bytes()));
                }
                Err(e) => tracing::warn!(node = n.name, "its WireGuard key: {e:#}"),
            }
        }
        peers.retain(|addr, p| wanted.get(addr).is_some_and(|(_, k)| *k == p.public));
        for (addr, (n, key)) in wanted {
            if peers.contains_key(&addr) {
                continue;
            }
            let index = self.next_index.fetch_add(1, Ordering::Relaxed) as u32 & 0xff_ffff;
            let tunn = Tunn::new(
                self.secret.clone(),
                PublicKey::from(key),
                None,
                None,
                index,
                None,
            );
            tracing::info!(node = n.name, %addr, "WireGuard peer");
            peers.insert(
                addr,
                Arc::new(Peer {
                    name: n.name.clone(),
                    public: key,
                    tunn: Mutex::new(tunn),
                }),
            );
        }
    }

    fn peer(&self, addr: Ipv4Addr) -> Option<Arc<Peer>> {
        self.peers.read().ok()?.get(&addr).cloned()
    }

    fn all_peers(&self) -> Vec<(Ipv4Addr, Arc<Peer>)> {
        self.peers
            .read()
            .map(|p| p.iter().map(|(a, p)| (*a, p.clone())).collect())
            .unwrap_or_default()
    }

    async fn send_to(&self, datagram: &[u8], addr: Ipv4Addr) {
        let to = SocketAddrV4::new(addr, self.port);
        if let Err(e) = self.sock.send_to(datagram, to).await {
            tracing::debug!(%to, "WireGuard send: {e}");
        }
    }

    /// `ndwg` -> a peer: seals each packet for the node it is addressed to.
    async fn outbound(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut out = vec![0u8; MAX_PACKET + 32];
        loop {
            let n = match self.tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("read {IFNAME}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let packet = &buf[..n];
            // IPv4 only: the destination address is at bytes 16..20 of its header.
            if n < 20 || packet[0] >> 4 != 4 {
                continue;
            }
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            let Some(peer) = self.peer(dst) else {
                self.dropped.no_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut tunn = peer.tunn.lock().await;
            match tunn.encapsulate(packet, &mut out) {
                TunnResult::WriteToNetwork(d) => {
                    self.sealed.fetch_add(1, Ordering::Relaxed);
                    self.send_to(d, dst).await;
                }
                TunnResult::Err(e) => tracing::debug!(node = peer.name, "seal: {e:?}"),
                _ => {}
            }
        }
    }

    /// A peer -> `ndwg`: opens each datagram with the sending node's `Tunn`.
    async fn inbound(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut out = vec![0u8; MAX_PACKET];
        loop {
            let (n, from) = match self.sock.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("WireGuard receive: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let SocketAddr::V4(from) = from else {
                continue;
            };
            let Some(peer) = self.peer(*from.ip()) else {
                self.dropped.unknown_sender.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut tunn = peer.tunn.lock().await;
            let mut result = tunn.decapsulate(Some((*from.ip()).into()), &buf[..n], &mut out);
            // A handshake answered: what was queued behind it goes too.
            loop {
                match result {
                    TunnResult::WriteToNetwork(d) => {
                        self.send_to(d, *from.ip()).await;
                        result = tunn.decapsulate(None, &[], &mut out);
                        continue;
                    }
                    TunnResult::WriteToTunnelV4(p, src) => {
                        if src != *from.ip() || !is_sealed_vxlan(p, src, self.me) {
                            self.dropped.wrong_inner.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.opened.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = self.tun.send(p).await {
                                tracing::debug!("write {IFNAME}: {e}");
                            }
                        }
                    }
                    TunnResult::WriteToTunnelV6(..) => {
                        self.dropped.wrong_inner.fetch_add(1, Ordering::Relaxed);
                    }
                    TunnResult::Err(e) => self.count_refused(&peer.name, e),
                    TunnResult::Done => {}
                }
                break;
            }
        }
    }

    fn count_refused(&self, node: &str, e: WireGuardError) {
        let d = &self.dropped;
        let counter = match e {
            // Seen before, or older than the replay window: a replay either way.
            WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => &d.replayed,
            WireGuardError::InvalidMac | WireGuardError::InvalidAeadTag => &d.not_authentic,
            _ => &d.invalid,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(node, "refused a WireGuard message: {e:?}");
    }

    /// Every peer's timers: handshakes when due, re-keys, keepalives.
    async fn timers(self: Arc<Self>) {
        let mut out = vec![0u8; 256];
        loop {
            tokio::time::sleep(TICK).await;
            for (addr, peer) in self.all_peers() {
                let mut tunn = peer.tunn.lock().await;
                if let TunnResult::WriteToNetwork(d) = tunn.update_timers(&mut out) {
                    self.send_to(d, addr).await;
                }
            }
        }
    }

    pub async fn status(&self) -> Status {
        let mut peers = vec![];
        for (address, p) in self.all_peers() {
            let (since, tx, rx, ..) = p.tunn.lock().await.stats();
            peers.push(PeerStatus {
                node: p.name.clone(),
                address,
                last_handshake_s: since.map(|d| d.as_secs_f64()),
                tx_bytes: tx,
                rx_bytes: rx,
            });
        }
        peers.sort_by(|a, b| a.node.cmp(&b.node));
        let d = &self.dropped;
        let dropped = [
            ("unknown_sender", &d.unknown_sender),
            ("replayed", &d.replayed),
            ("not_authentic", &d.not_authentic),
            ("invalid", &d.invalid),
            ("wrong_inner", &d.wrong_inner),
            ("no_peer", &d.no_peer),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect();
        Status {
            implementation: "userspace (boringtun)",
            why: self.why.clone(),
            interface: IFNAME,
            port: self.port,
            public_key: self.public_text.clone(),
            peers,
            dropped,
            sealed: self.sealed.load(Ordering::Relaxed),
            opened: self.opened.load(Ordering::Relaxed),
        }
    }
}

/// Whether `p` is an IPv4 UDP packet from `src` to `me` on the sealed VXLAN port: the
/// only thing a peer may put into `ndwg`.
fn is_sealed_vxlan(p: &[u8], src: Ipv4Addr, me: Ipv4Addr) -> bool {
    // IPv4 header: version/IHL at 0, protocol at 9, source 12..16, destination 16..20;
    // the UDP header follows it, its destination port at bytes 2..4.
    if p.len() < 20 || p[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if ihl < 20 || p.len() < ihl + 8 || p[9] != 17 {
        return false;
    }
    let from = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let to = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let dport = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
    from == src && to == me && dport == SEALED_VXLAN_PORT
}

/// `ndwg` up at `mtu`, without IPv6 (it carries IPv4 VXLAN only), and without reverse
/// path filtering: what it delivers comes from peers' underlay addresses, which the
/// routes put on the underlay interface, and it holds no address of its own.
/// What the firewall marks (the encrypted overlays' VXLAN) is routed into it.
async fn configure_interface(mtu: u32) -> Result<()> {
    netns::with_netlink(&Netns::Home, move |h| async move {
        let link = netlink::require_link(&h, IFNAME).await?;
        netlink::set_mtu(&h, &link, mtu).await?;
        netlink::set_up(&h, &link).await?;
        // Marked packets look up the table; if its route is gone (ndwg down or
        // deleted), the next rule drops them rather than let the main table send them
        // in the clear.
        let mark = netlink::RuleSelector::Mark(super::MARK, u32::MAX);
        let rules = [
            netlink::Rule {
                pref: super::RULE_PREF,
                selector: mark,
                table: Some(super::TABLE),
                suppress_default: false,
            },
            netlink::Rule {
                pref: super::RULE_PREF + 1,
                selector: mark,
                table: None,
                suppress_default: false,
            },
        ];
        netlink::ensure_rules(&h, super::RULE_PREF..=super::RULE_PREF + 1, &rules).await?;
        let route = netlink::TableRoute {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
            gateway: None,
            oif: link.index,
            src: None,
        };
        netlink::ensure_tables(&h, |t| t == super::TABLE, &[(super::TABLE, vec![route])]).await?;
        Ok(())
    })
    .await?;
    netns::disable_ipv6(IFNAME)?;
    netns::write_sysctl(&format!("net.ipv4.conf.{IFNAME}.rp_filter"), "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vxlan_packet(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 8 + 8];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn only_vxlan_from_the_sender_to_this_node_goes_in() {
        let (peer, me) = (Ipv4Addr::new(198, 18, 0, 12), Ipv4Addr::new(198, 18, 0, 11));
        let ok = vxlan_packet(peer.octets(), me.octets(), SEALED_VXLAN_PORT);
        assert!(is_sealed_vxlan(&ok, peer, me));
        // Another source (a peer speaking for a third node), another destination, the
        // plain VXLAN port or any other, not UDP, cut short: all refused.
        let other = Ipv4Addr::new(198, 18, 0, 13);
        assert!(!is_sealed_vxlan(
            &vxlan_packet(other.octets(), me.octets(), SEALED_VXLAN_PORT),
            peer,
            me
        ));
        assert!(!is_sealed_vxlan(
            &vxlan_packet(peer.octets(), other.octets(), SEALED_VXLAN_PORT),
            peer,
            me
        ));
        assert!(!is_sealed_vxlan(
            &vxlan_packet(peer.octets(), me.octets(), 4789),
            peer,
            me
        ));
        let mut tcp = ok.clone();
        tcp[9] = 6;
        assert!(!is_sealed_vxlan(&tcp, peer, me));
        assert!(!is_sealed_vxlan(&ok[..25], peer, me));
        let mut bad_ihl = ok.clone();
        bad_ihl[0] = 0x4f;
        assert!(!is_sealed_vxlan(&bad_ihl, peer, me));
    }
}
