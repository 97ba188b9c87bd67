//! netd's userspace WireGuard: `ndwg` (a TAP device) on one side, a UDP socket on the
//! underlay on the other, and boringtun `Tunn`s per peer node in between: one per pair
//! of this node's static keys and the peer's (one pair, two while either rotates).
//!
//! Out: a packet read from `ndwg` is an encrypted overlay's VXLAN packet, addressed to
//! a peer node's underlay address; that address picks the peer, whose newest tunnel with
//! a session up seals it. In: a datagram from a peer node's address is opened by the
//! tunnel its receiver index names (a replayed, altered or foreign one is refused and
//! counted); what it holds goes to `ndwg` only if it is a VXLAN packet from that node's
//! own address to this node, to the sealed port.
//!
//! Key rotation ([`Sealer::rotate`], `netd node rotate-key`): the node publishes a next
//! key beside its key; each peer adds a tunnel to it, opens its session, and moves its
//! traffic there once the session is up; the node then makes the next key its key and
//! drops the old key's tunnels, which nothing uses any more. No packet waits for a
//! handshake on the way.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::PublicKey;
use serde::Serialize;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;

use super::keys::{self, NodeKey};
use super::offload;
use super::{IFNAME, SEALED_VXLAN_PORT};
use crate::datapath::tun::{self, Tun};
use crate::fdstore::OWN_NETNS;
use crate::netlink;
use crate::netns::{self, Netns};
use crate::state;
use crate::view::View;

/// How often every peer's timers run (handshakes, re-keys, keepalives).
const TICK: Duration = Duration::from_millis(250);
/// The largest IP packet `ndwg` hands over (its frame has an Ethernet header more), and
/// the largest datagram taken in.
const MAX_PACKET: usize = 65535;
/// How long a session lives without a new handshake (WireGuard's REJECT_AFTER_TIME).
const SESSION_LIFE: Duration = Duration::from_secs(180);
/// The longest a key rotation waits for the peers to move to the new key.
const ROTATE_LIMIT: Duration = Duration::from_secs(30);
/// How many packets one wakeup reads from `ndwg`, or datagram reads from the socket.
const BATCH: usize = 64;
/// The most bytes one wakeup reads from `ndwg` (a few super-packets): what the cut and
/// sealed copies of one batch hold.
const READ_BUDGET: usize = 256 << 10;
/// A handshake initiation's size: the most a seal adds to an empty packet.
const HANDSHAKE_LEN: usize = 148;
/// The socket's buffers: a few runs of 64 KB each way.
const SOCKET_BUFFER: usize = 4 << 20;
/// The fd store's kind for `ndwg`'s descriptor.
pub const HELD_KIND: &str = "wireguard";
/// The fd store's id for it: the TAP device with the virtio-net header (netds before
/// this one held a TUN device as `ndwg` and `ndwg.vnet`: it is let go, not taken, and
/// the device made anew).
const HELD_ID: &str = "ndwg.tap";
/// How `ndwg` is opened: a TAP device (the kernel takes a UDP tunnel super-packet only
/// with an Ethernet header) with the virtio-net header.
const DEVICE_MODE: tun::Mode = tun::Mode {
    tap: true,
    vnet_hdr: true,
};

/// A node this one exchanges encrypted overlay traffic with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    pub name: String,
    pub address: Ipv4Addr,
    /// The port its WireGuard listens on (its `--wireguard-port`); None from a netd that
    /// did not say (before nodes published it): this node's own.
    pub port: Option<u16>,
    pub public_key: String,
    /// The key the node rotates to, while it does.
    pub next_public_key: Option<String>,
}

/// One Noise session pair between one of this node's static keys and one of a peer's:
/// one per pair while either side rotates, else the one.
struct Tunnel {
    /// This node's public key and the peer's.
    mine: [u8; 32],
    theirs: [u8; 32],
    /// The top 24 bits of every index this tunnel's sessions use (boringtun's `index`):
    /// what a message's receiver index names.
    base: u32,
    tunn: Tunn,
    /// Not greeted yet: a new tunnel opens its session at the next tick, unasked. A
    /// restarted netd has no session, while its peers still seal for the one before:
    /// a task there answering a connection that sends nothing more (a request sent,
    /// its answer awaited) would have its answers refused here until the peer's own
    /// timers gave up on that session (15 s and more). The handshake moves the peer to
    /// the new session at once (its keepalive confirms it).
    greet: bool,
}

impl Tunnel {
    /// Whether a session is up (a handshake completed within a session's lifetime).
    fn live(&self) -> bool {
        self.tunn.stats().0.is_some_and(|d| d < SESSION_LIFE)
    }
}

struct Peer {
    name: String,
    address: Ipv4Addr,
    /// Its WireGuard port (it may change with the node's record: a restart with
    /// another `--wireguard-port`).
    port: AtomicU16,
    state: Mutex<PeerState>,
}

impl Peer {
    /// Where its WireGuard listens: what this node sends it goes there.
    fn endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.address, self.port.load(Ordering::Relaxed))
    }
}

#[derive(Default)]
struct PeerState {
    /// The peer's keys: its current one, then the one it rotates to.
    theirs: Vec<[u8; 32]>,
    /// This node's key it rotates to, if it does.
    mine_next: Option<[u8; 32]>,
    tunnels: Vec<Tunnel>,
}

impl PeerState {
    /// How far tunnel `t` is on the way to the new keys: one for this node's next key,
    /// one for the peer's.
    fn rank(&self, t: &Tunnel) -> u8 {
        u8::from(Some(t.mine) == self.mine_next) + u8::from(self.theirs.get(1) == Some(&t.theirs))
    }

    /// The tunnel to seal with: the newest pair of keys that has a session up (so a
    /// rotation moves traffic only once the new session works), else the pair of
    /// current keys, whose `encapsulate` queues the packet and starts a handshake.
    fn outbound(&mut self) -> Option<&mut Tunnel> {
        // No rotation on either side: the one pair of current keys (no session check on
        // every packet).
        if self.tunnels.len() == 1 {
            return self.tunnels.first_mut();
        }
        let live = (0..self.tunnels.len())
            .filter(|i| self.tunnels[*i].live())
            .max_by_key(|i| self.rank(&self.tunnels[*i]));
        let i =
            live.or_else(|| (0..self.tunnels.len()).find(|i| self.rank(&self.tunnels[*i]) == 0))?;
        self.tunnels.get_mut(i)
    }

    /// The tunnels a datagram may be for: the one its receiver index names (every data
    /// message: nothing allocated on that path), or (a handshake initiation, which
    /// names none) every one, newest keys first.
    fn candidates(&self, datagram: &[u8]) -> Candidates {
        match receiver_index(datagram) {
            Some(idx) => Candidates::Named(self.tunnels.iter().position(|t| t.base == idx >> 8)),
            None => {
                let mut all: Vec<usize> = (0..self.tunnels.len()).collect();
                all.sort_by_key(|i| std::cmp::Reverse(self.rank(&self.tunnels[*i])));
                Candidates::All(all)
            }
        }
    }
}

/// What [`PeerState::candidates`] finds: tunnel indexes, in the order to try them.
#[derive(Debug)]
enum Candidates {
    Named(Option<usize>),
    All(Vec<usize>),
}

impl Candidates {
    fn as_slice(&self) -> &[usize] {
        match self {
            Candidates::Named(one) => one.as_slice(),
            Candidates::All(all) => all,
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

#[cfg(test)]
impl PartialEq<Vec<usize>> for Candidates {
    fn eq(&self, other: &Vec<usize>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

/// Whether WireGuard message `m` is a transport data message holding a packet (type 4,
/// little-endian, in its first byte; more than the 32 bytes of header and tag, which
/// alone are a keepalive).
fn is_data(m: &[u8]) -> bool {
    m.first() == Some(&4) && m.len() > 32
}

/// The receiver index of a WireGuard message (little-endian, after the 4-byte type):
/// at bytes 8..12 of a handshake response (behind the sender's), at 4..8 of a cookie
/// reply or a data message; None for a handshake initiation or anything too short.
fn receiver_index(m: &[u8]) -> Option<u32> {
    let at = match m.first()? {
        2 => 8,
        3 | 4 => 4,
        _ => return None,
    };
    let b = m.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// This node's static keys: its current one, and the next while it rotates.
struct OwnKeys {
    current: NodeKey,
    next: Option<NodeKey>,
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
    /// Opened, but `ndwg` refused to take it.
    not_written: AtomicU64,
}

/// What `netd status` shows of the encryption.
#[derive(Debug, Serialize)]
pub struct Status {
    pub implementation: &'static str,
    pub why: String,
    pub interface: &'static str,
    pub port: u16,
    pub public_key: String,
    /// The key this node rotates to, while it does.
    pub next_public_key: Option<String>,
    pub peers: Vec<PeerStatus>,
    pub dropped: HashMap<&'static str, u64>,
    /// Packets sealed into data messages (handshakes not counted).
    pub sealed: u64,
    pub opened: u64,
    /// Key rotations this node completed since it started.
    pub rotations: u64,
    /// `ndwg`'s descriptor came from the netd before, through the fd store: what the
    /// encrypted overlays sent while no netd ran waited in its queue.
    pub device_taken_over: bool,
    /// `ndwg` hands over VXLAN super-packets (up to 64 KB), which netd cuts and seals
    /// (Linux 6.17's `TUN_F_UDP_TUNNEL_GSO`); else the kernel cuts them first.
    pub super_packets: bool,
    /// The datagrams of one read go to a peer in one send (UDP GSO).
    pub udp_gso: bool,
    /// The TCP segments a peer sent go into `ndwg` joined again, as TCP super-packets
    /// in one VXLAN packet (Linux 6.17's UDP tunnel offload on a TAP device); false once
    /// the kernel refused one: then as UDP super-packets the kernel cuts.
    pub tcp_joins: bool,
    /// Times one of its loops panicked and was started again (0 unless netd has a bug).
    pub loop_restarts: u64,
}

#[derive(Debug, Serialize)]
pub struct PeerStatus {
    pub node: String,
    pub address: Ipv4Addr,
    /// The port its WireGuard listens on, which this node sends to.
    pub port: u16,
    /// Seconds since the last completed handshake of any of its sessions (none yet:
    /// null).
    pub last_handshake_s: Option<f64>,
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    /// Sessions to it: two while either side rotates its key.
    pub tunnels: usize,
}

/// What `netd node rotate-key` reports.
#[derive(Debug, Serialize)]
pub struct Rotated {
    pub previous_public_key: String,
    pub public_key: String,
    /// Peer nodes, and how many of them sent over a session to the new key before the
    /// old one was dropped (a peer that sent nothing meanwhile had nothing to lose).
    pub peers: usize,
    pub moved: usize,
    pub seconds: f64,
}

/// The running userspace WireGuard of this node.
pub struct Sealer {
    tun: Tun,
    sock: UdpSocket,
    port: u16,
    me: Ipv4Addr,
    keys: RwLock<OwnKeys>,
    /// Where the node's key is kept (a rotation writes the new one there).
    key_path: PathBuf,
    why: String,
    peers: RwLock<HashMap<Ipv4Addr, Arc<Peer>>>,
    next_index: AtomicU64,
    dropped: Dropped,
    sealed: AtomicU64,
    opened: AtomicU64,
    /// Held by the rotation under way (one at a time).
    rotating: Mutex<()>,
    rotations: AtomicU64,
    device_taken_over: bool,
    /// Whether sends still use UDP GSO (off once the kernel said it has none).
    gso: AtomicBool,
    /// Whether what one read opened is written into `ndwg` joined (off once the kernel
    /// refused a UDP super-packet).
    joins: AtomicBool,
    /// Whether the TCP segments in it are joined (off once the kernel refused a TCP
    /// super-packet).
    tcp_joins: AtomicBool,
    /// Whether `ndwg` hands over VXLAN super-packets (the kernel took
    /// `TUN_F_UDP_TUNNEL_GSO`), which netd cuts itself.
    super_packets: bool,
    /// Packets read from `ndwg` that could not be cut ([`offload::Unpack`]).
    unsupported: AtomicU64,
    /// Times one of its loops stopped (a panic) and was started again.
    loop_restarts: Arc<AtomicU64>,
}

impl Sealer {
    /// Brings up `ndwg` (MTU `mtu`) in the daemon's netns and the socket on `port`, and
    /// starts serving them. `me`: this node's underlay address; `key_path`: where `key`
    /// is kept; `why`: why userspace; `handover`: the fd store's `ndwg` entry (see
    /// [`open_device`]).
    pub async fn start(
        key: NodeKey,
        key_path: PathBuf,
        me: Ipv4Addr,
        port: u16,
        mtu: u32,
        why: String,
        handover: Option<&crate::fdstore::Handover>,
    ) -> Result<Arc<Sealer>> {
        let (fd, device_taken_over, held) = open_device(handover).await?;
        let serving = async {
            let super_packets =
                tun::set_offloads(fd.as_fd(), offload::VNET_HDR_LEN, offload::TUN_OFFLOADS)
                    .with_context(|| format!("set up {IFNAME}'s virtio-net header"))?;
            let tun = Tun::new(fd).context("serve the TUN device")?;
            configure_interface(mtu).await?;
            let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
                .await
                .with_context(|| format!("bind the WireGuard port {port}"))?;
            if let Err(e) = offload::enable_gro(sock.as_fd()) {
                // Slower (a datagram per read), not wrong.
                tracing::warn!("no UDP_GRO on the WireGuard socket: {e}");
            }
            offload::set_buffers(sock.as_fd(), SOCKET_BUFFER);
            anyhow::Ok((tun, sock, super_packets))
        };
        let (tun, sock, super_packets) = match serving.await {
            Ok(s) => s,
            Err(e) => {
                // No WireGuard on this node: the store must not keep a device nothing serves.
                if let Some(h) = handover {
                    h.release(held.as_ref());
                }
                return Err(e);
            }
        };
        let sealer = Arc::new(Sealer {
            tun,
            sock,
            port,
            me,
            keys: RwLock::new(OwnKeys {
                current: key,
                next: None,
            }),
            key_path,
            why,
            peers: RwLock::new(HashMap::new()),
            // A random start: after a restart, a peer's packets of the sessions before
            // do not meet a reused index (they are refused as unknown, not as forged).
            next_index: AtomicU64::new(u64::from(rand::random::<u32>() & 0xff_ffff)),
            dropped: Dropped::default(),
            sealed: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            rotating: Mutex::new(()),
            rotations: AtomicU64::new(0),
            device_taken_over,
            gso: AtomicBool::new(true),
            joins: AtomicBool::new(true),
            tcp_joins: AtomicBool::new(true),
            super_packets,
            unsupported: AtomicU64::new(0),
            loop_restarts: Arc::new(AtomicU64::new(0)),
        });
        // A loop that panics (a packet it mishandles) runs again: else that direction of
        // every encrypted overlay would stop while the node goes on.
        use crate::supervise::keep_running;
        let (restarts, s) = (sealer.loop_restarts.clone(), sealer.clone());
        keep_running(
            "WireGuard's ndwg -> peers loop",
            restarts.clone(),
            move || s.clone().outbound(),
        );
        let s = sealer.clone();
        keep_running(
            "WireGuard's peers -> ndwg loop",
            restarts.clone(),
            move || s.clone().inbound(),
        );
        let s = sealer.clone();
        keep_running("WireGuard's timers", restarts, move || s.clone().timers());
        Ok(sealer)
    }

    /// Makes the peers exactly `nodes` (this node left out), each with a tunnel per
    /// pair of this node's keys and its own: a new node or key gets a tunnel, a node
    /// gone or a key retired loses its own; sessions of keys that stay are kept.
    pub async fn set_peers(&self, nodes: &[PeerNode]) {
        let mut wanted: HashMap<Ipv4Addr, (&PeerNode, Vec<[u8; 32]>)> = HashMap::new();
        for n in nodes.iter().filter(|n| n.address != self.me) {
            let mut keys = vec![];
            for k in std::iter::once(&n.public_key).chain(n.next_public_key.iter()) {
                match keys::decode_public(k) {
                    Ok(k) => keys.push(*k.as_bytes()),
                    Err(e) => tracing::warn!(node = n.name, "its WireGuard key: {e:#}"),
                }
            }
            if !keys.is_empty() {
                wanted.insert(n.address, (n, keys));
            }
        }
        let mut add = vec![];
        if let Ok(mut peers) = self.peers.write() {
            peers.retain(|addr, _| wanted.contains_key(addr));
            for (addr, (n, _)) in &wanted {
                let port = n.port.unwrap_or(self.port);
                let peer = peers.entry(*addr).or_insert_with(|| {
                    tracing::info!(node = n.name, %addr, port, "WireGuard peer");
                    Arc::new(Peer {
                        name: n.name.clone(),
                        address: *addr,
                        port: AtomicU16::new(port),
                        state: Mutex::new(PeerState::default()),
                    })
                });
                peer.port.store(port, Ordering::Relaxed);
                add.push((peer.clone(), wanted[addr].1.clone()));
            }
        }
        for (peer, theirs) in add {
            let mut st = peer.state.lock().await;
            st.theirs = theirs;
            self.retunnel(&mut st);
        }
    }

    /// Makes `st`'s tunnels one per pair of this node's keys and the peer's.
    fn retunnel(&self, st: &mut PeerState) {
        let Ok(keys) = self.keys.read() else {
            return;
        };
        let mine: Vec<&NodeKey> = std::iter::once(&keys.current)
            .chain(keys.next.as_ref())
            .collect();
        st.mine_next = keys.next.as_ref().map(|k| *k.public.as_bytes());
        let theirs = st.theirs.clone();
        st.tunnels.retain(|t| {
            mine.iter().any(|k| *k.public.as_bytes() == t.mine) && theirs.contains(&t.theirs)
        });
        for k in mine {
            for th in &theirs {
                if st
                    .tunnels
                    .iter()
                    .any(|t| t.mine == *k.public.as_bytes() && t.theirs == *th)
                {
                    continue;
                }
                let base = self.next_index.fetch_add(1, Ordering::Relaxed) as u32 & 0xff_ffff;
                let tunn = Tunn::new(
                    k.secret.clone(),
                    PublicKey::from(*th),
                    None,
                    None,
                    base,
                    None,
                );
                st.tunnels.push(Tunnel {
                    mine: *k.public.as_bytes(),
                    theirs: *th,
                    base,
                    tunn,
                    // Not for this node's own next key, which no peer has read yet: the
                    // peer opens that session itself once it reads the key.
                    greet: st.mine_next != Some(*k.public.as_bytes()),
                });
            }
        }
    }

    /// [`Sealer::retunnel`] for every peer (this node's keys changed).
    async fn retunnel_all(&self) {
        for (_, peer) in self.all_peers() {
            let mut st = peer.state.lock().await;
            self.retunnel(&mut st);
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

    fn public_text(&self) -> (String, Option<String>) {
        self.keys
            .read()
            .map(|k| {
                (
                    k.current.public_text(),
                    k.next.as_ref().map(NodeKey::public_text),
                )
            })
            .unwrap_or_default()
    }

    async fn send_to(&self, datagram: &[u8], to: SocketAddrV4) {
        if let Err(e) = self.sock.send_to(datagram, to).await {
            tracing::debug!(%to, "WireGuard send: {e}");
        }
    }

    /// Sends `buf`, datagrams of `segment` bytes each (the last may be shorter), to
    /// `to` in one system call where the kernel takes UDP GSO, else one by one.
    async fn send_run(&self, buf: &[u8], segment: usize, to: SocketAddrV4) {
        let one_call = segment == buf.len() || self.gso.load(Ordering::Relaxed);
        if one_call {
            let sent = loop {
                let r = self
                    .sock
                    .async_io(Interest::WRITABLE, || {
                        offload::send_segments(self.sock.as_fd(), to, buf, segment)
                    })
                    .await;
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            match sent {
                Ok(_) => return,
                // The underlay's route or device has no UDP GSO: one by one from now on.
                Err(e)
                    if segment < buf.len()
                        && matches!(e.raw_os_error(), Some(libc::EIO | libc::EOPNOTSUPP)) =>
                {
                    tracing::warn!(%to, "WireGuard sends without UDP GSO: {e}");
                    self.gso.store(false, Ordering::Relaxed);
                }
                // This run only (a segment over the path's MTU, say): one by one.
                Err(e) if segment < buf.len() && e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(%to, "a UDP GSO send refused: {e}");
                }
                Err(e) => {
                    tracing::debug!(%to, "WireGuard send: {e}");
                    return;
                }
            }
        }
        for d in buf.chunks(segment) {
            self.send_to(d, to).await;
        }
    }

    /// `ndwg` -> a peer: seals each packet for the node it is addressed to. Every packet
    /// waiting is read at once, and what goes to one peer leaves in as few sends as
    /// UDP GSO allows ([`offload::gso_runs`]).
    async fn outbound(self: Arc<Self>) {
        let mut bufs: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| vec![0u8; offload::VNET_HDR_LEN + offload::ETHERNET + MAX_PACKET])
            .collect();
        let mut lens = [0usize; BATCH];
        // The sealed datagrams of one batch, back to back, and each one's peer and end.
        let mut sealed: Vec<u8> = Vec::with_capacity(2 * READ_BUDGET);
        let mut ends: Vec<(SocketAddrV4, usize)> = Vec::with_capacity(BATCH);
        // The packets read, cut where they were super-packets, back to back.
        let mut plain: Vec<u8> = Vec::with_capacity(2 * READ_BUDGET);
        let mut plain_ends: Vec<usize> = Vec::with_capacity(BATCH);
        loop {
            let n = match self.tun.recv_many(&mut bufs, &mut lens, READ_BUDGET).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("read {IFNAME}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            sealed.clear();
            ends.clear();
            plain.clear();
            plain_ends.clear();
            for (buf, len) in bufs.iter_mut().zip(lens).take(n) {
                let Some(b) = buf.get_mut(..len) else {
                    continue;
                };
                let (head, frame) = b.split_at_mut(offload::VNET_HDR_LEN.min(b.len()));
                let Some(hdr) = offload::VnetHdr::decode(head) else {
                    continue;
                };
                // Not IPv4: the kernel's own chatter on the link (nothing routed
                // into ndwg is other than the encrypted overlays' VXLAN); offsets
                // into the Ethernet header: not a frame netd can cut.
                let Some((packet, hdr)) = offload::strip_ethernet(frame, &hdr) else {
                    tracing::debug!(
                        "a frame from {IFNAME} without an IPv4 packet, or with offsets \
                         into its Ethernet header ({hdr:?})"
                    );
                    continue;
                };
                if let Err(e) = offload::unpack(packet, &hdr, &mut plain, &mut plain_ends) {
                    self.unsupported.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("a packet from {IFNAME} not taken: {e:?} ({hdr:?})");
                }
            }
            // The packets, each with its destination; consecutive ones to one peer are
            // sealed under one lock of its state.
            let mut packets = Vec::with_capacity(plain_ends.len());
            let mut start = 0;
            for &end in &plain_ends {
                let packet = &plain[start..end];
                start = end;
                // IPv4 only: the destination address is at bytes 16..20 of its header.
                if packet.len() < 20 || packet[0] >> 4 != 4 {
                    continue;
                }
                let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
                packets.push((dst, packet));
            }
            for run in packets.chunk_by(|a, b| a.0 == b.0) {
                self.seal_run(run, &mut sealed, &mut ends).await;
            }
            // Consecutive datagrams to one peer, in runs UDP GSO takes.
            let mut i = 0;
            while i < ends.len() {
                let dst = ends[i].0;
                let mut j = i;
                while j < ends.len() && ends[j].0 == dst {
                    j += 1;
                }
                let start_of = |k: usize| if k == 0 { 0 } else { ends[k - 1].1 };
                let lens: Vec<usize> = (i..j).map(|k| ends[k].1 - start_of(k)).collect();
                for (a, b) in offload::gso_runs(&lens) {
                    let buf = &sealed[start_of(i + a)..ends[i + b - 1].1];
                    self.send_run(buf, lens[a], dst).await;
                }
                i = j;
            }
        }
    }

    /// Seals `run` (packets, each to the same peer's address) onto the end of `sealed`,
    /// each one's peer and end into `ends` (what has nothing to send yet, as a packet
    /// the tunnel queues behind its handshake, adds nothing).
    async fn seal_run(
        &self,
        run: &[(Ipv4Addr, &[u8])],
        sealed: &mut Vec<u8>,
        ends: &mut Vec<(SocketAddrV4, usize)>,
    ) {
        let Some(&(dst, _)) = run.first() else {
            return;
        };
        let no_peer = || {
            self.dropped
                .no_peer
                .fetch_add(run.len() as u64, Ordering::Relaxed);
        };
        let Some(peer) = self.peer(dst) else {
            return no_peer();
        };
        let mut st = peer.state.lock().await;
        let Some(t) = st.outbound() else {
            return no_peer();
        };
        let to = peer.endpoint();
        for (_, packet) in run {
            let start = sealed.len();
            // Room for a data message (the packet, its header and tag: 32 bytes more)
            // or a handshake initiation, whichever the tunnel makes.
            sealed.resize(start + packet.len() + HANDSHAKE_LEN, 0);
            let len = match t.tunn.encapsulate(packet, &mut sealed[start..]) {
                TunnResult::WriteToNetwork(d) => {
                    // A data message holds the packet (else a handshake initiation
                    // goes first and the tunnel queued the packet behind it).
                    if is_data(d) {
                        self.sealed.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(d.len())
                }
                TunnResult::Err(e) => {
                    tracing::debug!(node = peer.name, "seal: {e:?}");
                    None
                }
                _ => None,
            };
            sealed.truncate(start + len.unwrap_or(0));
            if let Some(len) = len {
                ends.push((to, start + len));
            }
        }
    }

    /// A peer -> `ndwg`: opens each datagram with the sending node's tunnel its
    /// receiver index names (a handshake initiation: the one whose key it was made for).
    /// A run of datagrams joined by `UDP_GRO` comes in one read; the VXLAN packets they
    /// hold go into `ndwg` joined again where they are of one stream
    /// ([`offload::Coalescer`]).
    async fn inbound(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut out = vec![0u8; MAX_PACKET];
        let mut joined = offload::Coalescer::default();
        loop {
            let first = self
                .sock
                .async_io(Interest::READABLE, || {
                    offload::recv_gro(self.sock.as_fd(), &mut buf)
                })
                .await;
            match first {
                Ok((n, from, segment)) => {
                    self.take_in(&buf[..n], from, segment, &mut out, &mut joined)
                        .await;
                }
                Err(e) => {
                    tracing::warn!("WireGuard receive: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            // Then what else waits, before the joined packets go (a stream's run split
            // over reads joins again).
            for _ in 1..BATCH {
                let next = self.sock.try_io(Interest::READABLE, || {
                    offload::recv_gro(self.sock.as_fd(), &mut buf)
                });
                match next {
                    Ok((n, from, segment)) => {
                        self.take_in(&buf[..n], from, segment, &mut out, &mut joined)
                            .await;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("WireGuard receive: {e}");
                        break;
                    }
                }
            }
            self.flush(&mut joined).await;
        }
    }

    /// What one read brought from `from`: one datagram, or a run of datagrams of
    /// `segment` bytes each (the last may be shorter).
    async fn take_in(
        &self,
        data: &[u8],
        from: Option<SocketAddrV4>,
        segment: Option<usize>,
        out: &mut [u8],
        joined: &mut offload::Coalescer,
    ) {
        let Some(from) = from else {
            return;
        };
        let Some(peer) = self.peer(*from.ip()) else {
            self.dropped.unknown_sender.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // All of a read is from one peer: its state is locked once for it.
        let mut st = peer.state.lock().await;
        for datagram in data.chunks(segment.unwrap_or(data.len()).max(1)) {
            self.open(&mut st, &peer, from, datagram, out, joined).await;
        }
    }

    /// Opens one datagram from `peer` (its state `st`), sent from `from`: what it holds
    /// joins `joined`, an answer it asks for (a handshake's) is sent back there.
    async fn open(
        &self,
        st: &mut PeerState,
        peer: &Peer,
        from: SocketAddrV4,
        datagram: &[u8],
        out: &mut [u8],
        joined: &mut offload::Coalescer,
    ) {
        let candidates = st.candidates(datagram);
        let candidates = candidates.as_slice();
        let Some(&last) = candidates.last() else {
            self.dropped.invalid.fetch_add(1, Ordering::Relaxed);
            return;
        };
        for &i in candidates {
            let t = &mut st.tunnels[i];
            let mut result = t.tunn.decapsulate(Some(peer.address.into()), datagram, out);
            // An initiation made for another of this node's keys (its MAC fails), or
            // from another of the peer's keys (the MAC is this node's key's, the
            // sender's key is not the tunnel's): the next tunnel.
            if i != last
                && matches!(
                    result,
                    TunnResult::Err(WireGuardError::InvalidMac | WireGuardError::WrongKey)
                )
            {
                continue;
            }
            // A handshake answered: what was queued behind it goes too. Both go where the
            // handshake came from (authenticated: WireGuard's own rule), which is the
            // peer's port even before its new node record (a restart on another port)
            // reaches this node.
            loop {
                match result {
                    TunnResult::WriteToNetwork(d) => {
                        if is_data(d) {
                            self.sealed.fetch_add(1, Ordering::Relaxed);
                        }
                        self.send_to(d, from).await;
                        result = t.tunn.decapsulate(None, &[], out);
                        continue;
                    }
                    TunnResult::WriteToTunnelV4(p, src) => {
                        if src != peer.address || !is_sealed_vxlan(p, src, self.me) {
                            self.dropped.wrong_inner.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.opened.fetch_add(1, Ordering::Relaxed);
                            if !joined.add(p) {
                                self.flush(joined).await;
                                joined.add(p);
                            }
                            if !self.joins.load(Ordering::Relaxed) {
                                self.flush(joined).await;
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
            break;
        }
    }

    /// Writes what `joined` holds into `ndwg`.
    async fn flush(&self, joined: &mut offload::Coalescer) {
        let Some((packet, pieces)) = joined.finish() else {
            return;
        };
        match self.tun.send(packet).await {
            Ok(_) => {}
            Err(e) if pieces > 1 && e.raw_os_error() == Some(libc::EINVAL) => {
                // This kernel's TAP takes no TCP super-packet in a UDP tunnel from its
                // writer (before Linux 6.17, or the offload was refused): UDP
                // super-packets from now on. None at all (before 6.2): each packet
                // alone. This one's pieces go one by one.
                if joined.joins_segments() {
                    tracing::warn!(
                        "{IFNAME} refused a TCP super-packet ({e}): UDP ones from now on"
                    );
                    self.tcp_joins.store(false, Ordering::Relaxed);
                    joined.tcp = false;
                } else {
                    tracing::warn!(
                        "{IFNAME} refused a UDP super-packet ({e}): packets go one by one"
                    );
                    self.joins.store(false, Ordering::Relaxed);
                }
                for piece in joined.pieces() {
                    if let Err(e) = self.tun.send(&piece).await {
                        self.dropped.not_written.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("write {IFNAME}: {e}");
                    }
                }
            }
            Err(e) => {
                self.dropped
                    .not_written
                    .fetch_add(pieces as u64, Ordering::Relaxed);
                tracing::debug!("write {IFNAME}: {e}");
            }
        }
        joined.clear();
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

    /// Every tunnel's timers: handshakes when due, re-keys, keepalives; and, to a peer
    /// that rotates its key, the handshake that opens a session to its next key (this
    /// node's traffic moves there once it is up).
    async fn timers(self: Arc<Self>) {
        let mut out = vec![0u8; 256];
        loop {
            tokio::time::sleep(TICK).await;
            for (_, peer) in self.all_peers() {
                let to = peer.endpoint();
                let mut st = peer.state.lock().await;
                let their_next = st.theirs.get(1).copied();
                for t in st.tunnels.iter_mut() {
                    if let TunnResult::WriteToNetwork(d) = t.tunn.update_timers(&mut out) {
                        self.send_to(d, to).await;
                    }
                    let greet = std::mem::take(&mut t.greet);
                    if (greet || Some(t.theirs) == their_next) && !t.live() {
                        if let TunnResult::WriteToNetwork(d) =
                            t.tunn.format_handshake_initiation(&mut out, false)
                        {
                            self.send_to(d, to).await;
                        }
                    }
                }
            }
        }
    }

    /// Replaces this node's static key without dropping traffic: a new key, published
    /// as the node's next one; every peer opens a session to it (see
    /// [`Sealer::timers`]) and moves its traffic there once it is up ([`PeerState::
    /// outbound`]); once each peer sent over it (or `ROTATE_LIMIT` passed: a peer that
    /// sent nothing meanwhile had nothing to lose), the new key is written to the key
    /// file, published as the node's key, and the old one's sessions go.
    pub async fn rotate(&self, view: &View, node: &str) -> Result<Rotated> {
        let _one = self
            .rotating
            .try_lock()
            .map_err(|_| anyhow::anyhow!("a key rotation is already under way on this node"))?;
        let began = std::time::Instant::now();
        let next = NodeKey::generate();
        let (previous, _) = self.public_text();
        let next_text = next.public_text();
        let next_public = *next.public.as_bytes();
        if let Ok(mut k) = self.keys.write() {
            k.next = Some(next.clone());
        }
        self.retunnel_all().await;
        if let Err(e) =
            state::publish_node_keys(view, node, previous.clone(), Some(next_text.clone())).await
        {
            self.abandon_rotation(view, node, &previous).await;
            return Err(anyhow::Error::from(e).context("publish the next key"));
        }
        let (moved, peers) = loop {
            let (moved, peers) = self.moved_to(next_public).await;
            if moved == peers || began.elapsed() > ROTATE_LIMIT {
                break (moved, peers);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // What a peer sent over the old session just before it moved is still on its way.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Err(e) = keys::store(&self.key_path, &next) {
            self.abandon_rotation(view, node, &previous).await;
            return Err(e.context("keep the new key"));
        }
        let published = state::publish_node_keys(view, node, next_text.clone(), None).await;
        if let Ok(mut k) = self.keys.write() {
            k.current = next;
            k.next = None;
        }
        self.retunnel_all().await;
        self.rotations.fetch_add(1, Ordering::Relaxed);
        published.context(
            "publish the new key (the node uses it; the others find it when it restarts)",
        )?;
        tracing::info!(moved, peers, "WireGuard key rotated");
        Ok(Rotated {
            previous_public_key: previous,
            public_key: next_text,
            peers,
            moved,
            seconds: began.elapsed().as_secs_f64(),
        })
    }

    /// Goes back to the current key alone: the next one's tunnels go, and the record
    /// names no next key (a failure there is logged: the peers' tunnels to a next key
    /// the node no longer has stay unused, as they never get a session up).
    async fn abandon_rotation(&self, view: &View, node: &str, current: &str) {
        if let Ok(mut k) = self.keys.write() {
            k.next = None;
        }
        self.retunnel_all().await;
        if let Err(e) = state::publish_node_keys(view, node, current.to_string(), None).await {
            tracing::warn!("withdraw the next WireGuard key from the node's record: {e}");
        }
    }

    /// How many peers sent over a session to this node's key `next`, of how many.
    async fn moved_to(&self, next: [u8; 32]) -> (usize, usize) {
        let peers = self.all_peers();
        let mut moved = 0;
        for (_, p) in &peers {
            let st = p.state.lock().await;
            if st
                .tunnels
                .iter()
                .any(|t| t.mine == next && t.tunn.stats().2 > 0)
            {
                moved += 1;
            }
        }
        (moved, peers.len())
    }

    pub async fn status(&self) -> Status {
        let mut peers = vec![];
        for (address, p) in self.all_peers() {
            let st = p.state.lock().await;
            let stats: Vec<_> = st.tunnels.iter().map(|t| t.tunn.stats()).collect();
            peers.push(PeerStatus {
                node: p.name.clone(),
                address,
                port: p.port.load(Ordering::Relaxed),
                last_handshake_s: stats
                    .iter()
                    .filter_map(|s| s.0)
                    .min()
                    .map(|d| d.as_secs_f64()),
                tx_bytes: stats.iter().map(|s| s.1).sum(),
                rx_bytes: stats.iter().map(|s| s.2).sum(),
                tunnels: st.tunnels.len(),
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
            ("not_cut", &self.unsupported),
            ("not_written", &d.not_written),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect();
        let (public_key, next_public_key) = self.public_text();
        Status {
            implementation: "userspace (boringtun)",
            why: self.why.clone(),
            interface: IFNAME,
            port: self.port,
            public_key,
            next_public_key,
            peers,
            dropped,
            sealed: self.sealed.load(Ordering::Relaxed),
            opened: self.opened.load(Ordering::Relaxed),
            rotations: self.rotations.load(Ordering::Relaxed),
            device_taken_over: self.device_taken_over,
            super_packets: self.super_packets,
            tcp_joins: self.tcp_joins.load(Ordering::Relaxed),
            udp_gso: self.gso.load(Ordering::Relaxed),
            loop_restarts: self.loop_restarts.load(Ordering::Relaxed),
        }
    }
}

/// `ndwg`'s descriptor: the one the netd before left in the fd store, if it is still
/// `ndwg`'s (the device persists, and what the encrypted overlays sent while no netd
/// ran waits in its queue for this one to seal), else opened now and handed to the
/// store for the next netd. A TUN device takes one descriptor at a time: the store's
/// copy of another must be closed before the device is opened again.
///
/// Also whether it was taken over, and the store's key for it.
async fn open_device(
    handover: Option<&crate::fdstore::Handover>,
) -> Result<(std::os::fd::OwnedFd, bool, Option<crate::fdstore::Key>)> {
    use std::os::fd::AsFd;
    if let Some(h) = handover {
        if let Some((key, fd)) = tun::take_held(h, HELD_ID, OWN_NETNS, IFNAME, DEVICE_MODE) {
            tracing::info!("{IFNAME} taken over from the netd before");
            return Ok((fd, true, Some(key)));
        }
        h.release_unclaimed();
    }
    let mut opened = tun::open(IFNAME, DEVICE_MODE);
    // A TUN device an older netd left: made anew as a TAP device (the encrypted
    // overlays' packets are dropped meanwhile, by rule 31001: none in the clear).
    // Anything else of that name stays, and netd says why it cannot open it.
    let refused = matches!(&opened, Err(e) if e.raw_os_error() == Some(libc::EINVAL));
    if refused && delete_tun_device().await? {
        tracing::info!("{IFNAME} was a TUN device of an older netd: made anew as a TAP device");
        opened = tun::open(IFNAME, DEVICE_MODE);
    }
    let fd = opened.with_context(|| format!("open TAP device {IFNAME}"))?;
    let key = handover.and_then(|h| h.hold(HELD_ID, OWN_NETNS, &[fd.as_fd()]));
    Ok((fd, false, key))
}

/// Deletes `ndwg` if it is a TUN/TAP device (its routes go with it;
/// `configure_interface` puts them back); whether it did.
async fn delete_tun_device() -> Result<bool> {
    netns::with_netlink(&Netns::Home, |h| async move {
        match netlink::link_by_name(&h, IFNAME).await? {
            Some(link) if link.kind.as_deref() == Some("tun") => {
                netlink::delete_link(&h, link.index).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    })
    .await
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

/// `ndwg` up at `mtu`, without IPv6 (it carries IPv4 VXLAN only), with its MAC
/// ([`offload::DEVICE_MAC`], which the frames netd writes are addressed to) and no ARP
/// (the kernel addresses every frame to that MAC, asking no one), its link address and
/// loose reverse-path filtering: what it delivers comes from peers'
/// underlay addresses, which the routes put on the underlay interface (a strict check
/// would drop it; see [`super::LINK_ADDRESS`]). What the firewall marks (the encrypted
/// overlays' VXLAN) is routed into it.
async fn configure_interface(mtu: u32) -> Result<()> {
    // Before it is up: IPv6 would greet the link (router solicitations, MLD) first.
    netns::disable_ipv6(IFNAME)?;
    netns::with_netlink(&Netns::Home, move |h| async move {
        let link = netlink::require_link(&h, IFNAME).await?;
        netlink::set_mtu(&h, &link, mtu).await?;
        netlink::ensure_mac(&h, &link, offload::DEVICE_MAC).await?;
        netlink::set_noarp(&h, &link).await?;
        netlink::ensure_address(&h, &link, super::LINK_ADDRESS, 32).await?;
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
    netns::write_sysctl(&format!("net.ipv4.conf.{IFNAME}.rp_filter"), "2")
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
    fn a_message_names_its_tunnel_by_its_receiver_index() {
        // Initiation (type 1): none; response (2): bytes 8..12; cookie (3), data (4): 4..8.
        let mut m = vec![0u8; 32];
        m[0] = 1;
        assert_eq!(receiver_index(&m), None);
        m[0] = 2;
        m[8..12].copy_from_slice(&0x0012_3405u32.to_le_bytes());
        assert_eq!(receiver_index(&m), Some(0x0012_3405));
        m[0] = 4;
        m[4..8].copy_from_slice(&0x00ab_cd01u32.to_le_bytes());
        assert_eq!(receiver_index(&m), Some(0x00ab_cd01));
        assert_eq!(receiver_index(&m[..6]), None, "cut short");
        assert_eq!(receiver_index(&[]), None);
    }

    #[test]
    fn only_a_data_message_with_a_packet_counts_as_sealed() {
        let mut m = vec![0u8; 33];
        m[0] = 4;
        assert!(is_data(&m));
        assert!(!is_data(&m[..32]), "a keepalive: header and tag alone");
        m[0] = 1;
        assert!(!is_data(&m), "a handshake initiation");
        assert!(!is_data(&[]));
    }

    fn tunnel(mine: &NodeKey, theirs: &NodeKey, base: u32) -> Tunnel {
        Tunnel {
            mine: *mine.public.as_bytes(),
            theirs: *theirs.public.as_bytes(),
            base,
            tunn: Tunn::new(mine.secret.clone(), theirs.public, None, None, base, None),
            greet: false,
        }
    }

    #[test]
    fn traffic_stays_on_the_current_keys_until_a_newer_session_is_up() {
        let (me, me_next, peer) = (
            NodeKey::generate(),
            NodeKey::generate(),
            NodeKey::generate(),
        );
        let mut st = PeerState {
            theirs: vec![*peer.public.as_bytes()],
            mine_next: Some(*me_next.public.as_bytes()),
            tunnels: vec![tunnel(&me_next, &peer, 7), tunnel(&me, &peer, 9)],
        };
        assert_eq!(st.rank(&st.tunnels[0]), 1);
        assert_eq!(st.rank(&st.tunnels[1]), 0);
        // No session yet anywhere: the current pair, which starts the handshake.
        assert_eq!(st.outbound().map(|t| t.base), Some(9));
        // An initiation (no index) is tried on the newest pair first.
        let mut init = vec![0u8; 148];
        init[0] = 1;
        assert_eq!(st.candidates(&init), vec![0, 1]);
        // A data message goes to the tunnel its index names, or none.
        let mut data = vec![0u8; 32];
        data[0] = 4;
        data[4..8].copy_from_slice(&((9u32 << 8) | 3).to_le_bytes());
        assert_eq!(st.candidates(&data), vec![1]);
        data[4..8].copy_from_slice(&(5u32 << 8).to_le_bytes());
        assert!(st.candidates(&data).is_empty());
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
