//! Batching for netd's WireGuard: the kernel's segmentation offloads on both sides of
//! it, so that one system call moves many packets instead of one.
//!
//! Out: the sealed datagrams of one read burst that go to one peer leave in one
//! `sendmsg` with `UDP_SEGMENT` (UDP GSO, [`gso_runs`]): one buffer of equal-sized
//! datagrams (the last may be shorter), which the kernel cuts only where it must (a
//! veth underlay carries it whole).
//!
//! In: the socket has `UDP_GRO` on, so such a run arrives whole again, with its segment
//! size beside it ([`recv_gro`]). What the datagrams hold, once opened, are VXLAN packets
//! of one stream. [`Coalescer`] joins the TCP segments inside them back into one TCP
//! super-packet in one VXLAN packet and `ndwg` (a TAP device) takes it with a
//! virtio-net header naming it a UDP tunnel super-packet (`GSO_UDP_TUNNEL | TCPV4`):
//! the VXLAN device takes it whole, as it takes what its own GRO joined, and the task's
//! TCP receives 64 KB at a time, as on a plain overlay, with no layer below it cutting
//! and joining again. Other datagrams of one stream and one size become one UDP
//! super-packet (`GSO_UDP_L4`), which the kernel cuts at its UDP layer.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{self, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn};

/// `struct virtio_net_hdr_v1_hash_tunnel`: what `ndwg` puts before every packet it
/// hands over and wants before every packet it takes (the device is opened with
/// `IFF_VNET_HDR` and this header size): the plain header's 10 bytes, the number of
/// buffers (2), the hash fields (8), and the offsets of a UDP tunnel packet's outer UDP
/// and inner IP headers (4).
pub const VNET_HDR_LEN: usize = 24;
const VNET_F_NEEDS_CSUM: u8 = 1;
/// The outer UDP checksum of a tunnel super-packet is the reader's to fill in.
const VNET_F_UDP_TUNNEL_CSUM: u8 = 8;
const VNET_GSO_NONE: u8 = 0;
const VNET_GSO_TCPV4: u8 = 1;
const VNET_GSO_UDP_L4: u8 = 5;
const VNET_GSO_ECN: u8 = 0x80;
/// An IPv4 UDP tunnel (VXLAN) around the inner packet the low bits name.
const VNET_GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
/// What `TUNSETOFFLOAD` offers for `ndwg`: finishing checksums, TCPv4 super-packets,
/// and those inside a UDP tunnel, with or without an outer UDP checksum
/// (`TUN_F_UDP_TUNNEL_GSO` and `_CSUM`, Linux 6.17).
pub const TUN_OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | 0x080 | 0x100;
/// The most segments one UDP GSO buffer may hold (the kernel's `UDP_MAX_SEGMENTS` in
/// the kernels before 6.9; later ones take 128).
pub const MAX_SEGMENTS: usize = 64;
/// The most bytes one IPv4 packet (and so one UDP GSO buffer) may hold.
pub const MAX_IP_PACKET: usize = 65535;
const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
/// VXLAN's header and the inner Ethernet header, between the outer UDP header and the
/// inner IP header.
const VXLAN_AND_ETHERNET: usize = 8 + 14;

/// `ndwg` is a TAP device: every frame has an Ethernet header before its IP packet
/// (the kernel takes a UDP tunnel super-packet from a writer only with one).
pub const ETHERNET: usize = 14;
/// `ndwg`'s own address (netd sets it; the device has no ARP, so the kernel sends every
/// frame to it): what a frame netd writes is addressed to, or the kernel drops it as
/// another host's.
pub const DEVICE_MAC: [u8; 6] = [0x02, 0x6e, 0x77, 0x00, 0x00, 0x01];
/// The source of the frames netd writes (no device has it).
const PEER_MAC: [u8; 6] = [0x02, 0x6e, 0x77, 0x00, 0x00, 0x02];
const ETHERTYPE_IPV4: u16 = 0x0800;

/// The IP packet of a frame read from `ndwg` (after its virtio-net header `hdr`), and
/// the header with its offsets moved to count from that packet: what [`unpack`] takes.
/// None for a frame that holds no IPv4 packet or whose offsets point into the Ethernet
/// header.
pub fn strip_ethernet<'a>(frame: &'a mut [u8], hdr: &VnetHdr) -> Option<(&'a mut [u8], VnetHdr)> {
    if frame.len() < ETHERNET || be16(frame, 12) != ETHERTYPE_IPV4 {
        return None;
    }
    Some((&mut frame[ETHERNET..], hdr.unframed()?))
}

/// The virtio-net header of a packet, as far as netd reads or writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    /// A UDP tunnel super-packet's outer UDP header and inner IP header.
    pub outer_th_offset: u16,
    pub inner_nh_offset: u16,
}

impl VnetHdr {
    /// The plain fields are in the host's byte order (a TUN device's default), the
    /// tunnel's little-endian.
    pub fn decode(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            outer_th_offset: le(20),
            inner_nh_offset: le(22),
        })
    }

    pub fn encode(&self, b: &mut [u8]) {
        b[..VNET_HDR_LEN].fill(0);
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b[20..22].copy_from_slice(&self.outer_th_offset.to_le_bytes());
        b[22..24].copy_from_slice(&self.inner_nh_offset.to_le_bytes());
    }

    fn needs_csum(&self) -> bool {
        self.flags & VNET_F_NEEDS_CSUM != 0
    }

    /// The header of a frame's IP packet: the offsets it uses counted from the packet,
    /// not from the Ethernet header before it (those it does not use are 0 and stay
    /// so). None if one points into the Ethernet header.
    fn unframed(&self) -> Option<VnetHdr> {
        let e = ETHERNET as u16;
        let moved = |at: u16, used: bool| if used { at.checked_sub(e) } else { Some(at) };
        let gso = self.gso_type != VNET_GSO_NONE;
        let tunnel = self.gso_type & VNET_GSO_UDP_TUNNEL_IPV4 != 0;
        Some(VnetHdr {
            hdr_len: moved(self.hdr_len, gso)?,
            csum_start: moved(self.csum_start, self.needs_csum())?,
            outer_th_offset: moved(self.outer_th_offset, tunnel)?,
            inner_nh_offset: moved(self.inner_nh_offset, tunnel)?,
            ..*self
        })
    }
}

/// The Internet checksum's running sum of `data` (big-endian 32-bit words, which
/// fold to the same sum as 16-bit ones; an odd tail padded), added to `sum`; fold it
/// with [`fold`].
pub fn sum(data: &[u8], mut sum: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum + u64::from(u32::from_be_bytes(tail))
}

/// A running sum folded into 16 bits (not complemented).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Writes the checksum a packet read with `NEEDS_CSUM` still lacks: the sum from
/// `csum_start` to the end, which the field at `csum_start + csum_offset` (holding the
/// pseudo-header's sum) is part of. False if the offsets do not fit the packet.
pub fn finish_checksum(packet: &mut [u8], hdr: &VnetHdr) -> bool {
    if !hdr.needs_csum() {
        return true;
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return false;
    }
    let c = !fold(sum(&packet[start..], 0));
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Sets the IPv4 header at `ip` (its length `ihl`): total length `len`, identification
/// `id`, and the checksum of the result.
fn rewrite_ipv4(p: &mut [u8], ip: usize, ihl: usize, len: usize, id: u16) {
    put16(p, ip + 2, len as u16);
    put16(p, ip + 4, id);
    put16(p, ip + 10, 0);
    let c = !fold(sum(&p[ip..ip + ihl], 0));
    put16(p, ip + 10, c);
}

/// Why a packet read from `ndwg` was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpack {
    /// A super-packet of a kind the device was not offered (only TCPv4 in a UDP
    /// tunnel over IPv4 is).
    Unsupported,
    /// Headers or offsets that do not fit the packet.
    Malformed,
}

/// Appends the packets `packet` (read from `ndwg` with `hdr`) stands for to `out`, each
/// one's end into `ends`: the packet itself (its checksum finished if it was left to
/// the reader), or the pieces of a VXLAN super-packet cut as the kernel would have cut
/// them: every piece the headers again, with the outer and inner IPv4 lengths,
/// identifications and checksums, the outer UDP length, and the TCP sequence number,
/// flags (FIN and PSH on the last piece only, CWR on the first) and checksum of its
/// own. Returns how many.
pub fn unpack(
    packet: &mut [u8],
    hdr: &VnetHdr,
    out: &mut Vec<u8>,
    ends: &mut Vec<usize>,
) -> Result<usize, Unpack> {
    let gso = hdr.gso_type & !VNET_GSO_ECN;
    if gso == VNET_GSO_NONE {
        if !finish_checksum(packet, hdr) {
            return Err(Unpack::Malformed);
        }
        out.extend_from_slice(packet);
        ends.push(out.len());
        return Ok(1);
    }
    if gso != VNET_GSO_UDP_TUNNEL_IPV4 | VNET_GSO_TCPV4 {
        return Err(Unpack::Unsupported);
    }
    let p = &*packet;
    // Outer IPv4, then UDP at outer_th_offset, VXLAN and Ethernet, inner IPv4 at
    // inner_nh_offset, then TCP.
    let outer_ihl = usize::from(p.first().ok_or(Unpack::Malformed)? & 0x0f) * 4;
    let udp = usize::from(hdr.outer_th_offset);
    let inner = usize::from(hdr.inner_nh_offset);
    if outer_ihl < IPV4_HEADER || udp != outer_ihl || inner != udp + UDP_HEADER + VXLAN_AND_ETHERNET
    {
        return Err(Unpack::Malformed);
    }
    let inner_ihl = usize::from(p.get(inner).ok_or(Unpack::Malformed)? & 0x0f) * 4;
    let tcp = inner + inner_ihl;
    let doff = usize::from(p.get(tcp + 12).ok_or(Unpack::Malformed)? >> 4) * 4;
    let headers = tcp + doff;
    let mss = usize::from(hdr.gso_size);
    if inner_ihl < IPV4_HEADER || doff < 20 || headers > p.len() || mss == 0 {
        return Err(Unpack::Malformed);
    }
    let (outer_id, inner_id) = (be16(p, 4), be16(p, inner + 4));
    let seq = u32::from_be_bytes([p[tcp + 4], p[tcp + 5], p[tcp + 6], p[tcp + 7]]);
    let flags = p[tcp + 13];
    let outer_csum = hdr.flags & VNET_F_UDP_TUNNEL_CSUM != 0;
    let payload = &p[headers..];
    let pieces = payload.len().div_ceil(mss);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let start = out.len();
        out.extend_from_slice(&p[..headers]);
        out.extend_from_slice(chunk);
        let s = &mut out[start..];
        let len = s.len();
        rewrite_ipv4(s, 0, outer_ihl, len, outer_id.wrapping_add(i as u16));
        put16(s, udp + 4, (len - udp) as u16);
        rewrite_ipv4(
            s,
            inner,
            inner_ihl,
            len - inner,
            inner_id.wrapping_add(i as u16),
        );
        let seq_i = seq.wrapping_add((i * mss) as u32);
        s[tcp + 4..tcp + 8].copy_from_slice(&seq_i.to_be_bytes());
        let mut f = flags;
        if i + 1 < pieces {
            f &= !0x09; // FIN, PSH: the last piece's
        }
        if i > 0 {
            f &= !0x80; // CWR: the first piece's
        }
        s[tcp + 13] = f;
        // TCP checksum: the pseudo-header (addresses, protocol, TCP length) and the
        // segment.
        put16(s, tcp + 16, 0);
        let pseudo = sum(&s[inner + 12..inner + 20], 6 + (len - tcp) as u64);
        let c = !fold(sum(&s[tcp..], pseudo));
        put16(s, tcp + 16, c);
        if outer_csum {
            // None (0, RFC 768): the packet is sealed whole, and WireGuard's tag
            // authenticates every byte of it end to end; a checksum would cost a pass
            // over each piece and add nothing.
            put16(s, udp + 6, 0);
        }
        ends.push(out.len());
    }
    Ok(pieces)
}

/// Splits `lens` (the sizes of consecutive datagrams to one peer) into runs one
/// `UDP_SEGMENT` send can carry: every datagram the size of the run's first but the
/// last, which may be smaller; at most [`MAX_SEGMENTS`] and [`MAX_IP_PACKET`] less the
/// headers. Returns (first, past the last) index pairs covering `lens` in order.
pub fn gso_runs(lens: &[usize]) -> Vec<(usize, usize)> {
    let mut runs = vec![];
    let mut start = 0;
    while start < lens.len() {
        let size = lens[start];
        let mut bytes = size;
        let mut end = start + 1;
        while end < lens.len()
            && end - start < MAX_SEGMENTS
            && lens[end] <= size
            && lens[end] > 0
            && bytes + lens[end] <= MAX_IP_PACKET - IPV4_HEADER - UDP_HEADER
        {
            bytes += lens[end];
            end += 1;
            if lens[end - 1] < size {
                break;
            }
        }
        runs.push((start, end));
        start = end;
    }
    runs
}

/// What makes two VXLAN packets of one stream: the addresses, the ports, and the IPv4
/// header fields every piece of a super-packet gets from its first (type of service,
/// time to live, don't-fragment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamKey {
    addrs: [u8; 8],
    ports: [u8; 4],
    tos: u8,
    ttl: u8,
    df: bool,
}

/// The key of an IPv4 UDP packet that can be part of a super-packet: no IP options, not
/// a fragment, lengths that agree with the packet, some payload. None: it goes alone.
fn stream_key(p: &[u8]) -> Option<StreamKey> {
    if p.len() <= IPV4_HEADER + UDP_HEADER || p[0] != 0x45 || p[9] != 17 {
        return None;
    }
    // Flags and fragment offset at 6..8: only DF (0x4000) may be set.
    let frag = be16(p, 6);
    if frag & !0x4000 != 0 {
        return None;
    }
    let total = usize::from(be16(p, 2));
    let udp_len = usize::from(be16(p, 24));
    if total != p.len() || udp_len != p.len() - IPV4_HEADER {
        return None;
    }
    let mut addrs = [0u8; 8];
    addrs.copy_from_slice(&p[12..20]);
    let mut ports = [0u8; 4];
    ports.copy_from_slice(&p[20..24]);
    Some(StreamKey {
        addrs,
        ports,
        tos: p[1],
        ttl: p[8],
        df: frag & 0x4000 != 0,
    })
}

/// Where the inner IPv4 header of a VXLAN packet without IP options starts (outer IPv4,
/// UDP, VXLAN, Ethernet before it), and its TCP header (no inner IP options either).
const INNER_IP: usize = IPV4_HEADER + UDP_HEADER + VXLAN_AND_ETHERNET;
const INNER_TCP: usize = INNER_IP + IPV4_HEADER;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;

/// A TCP segment inside a VXLAN packet, as far as joining it needs: where its payload
/// starts, its sequence number and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    headers: usize,
    seq: u32,
    flags: u8,
}

/// The segment a VXLAN packet carries, if a TCP super-packet can hold it: IPv4 without
/// options or fragments outside and inside, lengths that agree, an ACK with data and no
/// SYN, RST or URG (those go alone, as the kernel's GRO lets them).
fn tcp_segment(p: &[u8]) -> Option<Segment> {
    stream_key(p)?;
    // The inner Ethernet header's type (the two bytes before the inner IP header).
    if p.len() <= INNER_TCP + 20 || be16(p, INNER_IP - 2) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &p[INNER_IP..];
    if ip[0] != 0x45 || ip[9] != 6 || be16(ip, 6) & !0x4000 != 0 {
        return None;
    }
    if usize::from(be16(ip, 2)) != ip.len() {
        return None;
    }
    let doff = usize::from(p[INNER_TCP + 12] >> 4) * 4;
    let headers = INNER_TCP + doff;
    let flags = p[INNER_TCP + 13];
    if doff < 20 || headers >= p.len() {
        return None;
    }
    if flags & TCP_ACK == 0 || flags & (TCP_SYN | TCP_RST | TCP_URG) != 0 {
        return None;
    }
    let seq = &p[INNER_TCP + 4..INNER_TCP + 8];
    Some(Segment {
        headers,
        seq: u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]),
        flags,
    })
}

/// Whether VXLAN packet `p` (without IP options) carries TCP over IPv4.
fn carries_tcp(p: &[u8]) -> bool {
    p.len() > INNER_IP + 9 && be16(p, INNER_IP - 2) == ETHERTYPE_IPV4 && p[INNER_IP + 9] == 6
}

/// The header bytes every piece of a TCP super-packet has of its own: IPv4 length and
/// identification (2..6) and checksum (10..12) outside and inside, UDP length and
/// checksum, TCP sequence number and checksum. (The flags are compared apart.)
const OWN_FIELDS: [(usize, usize); 7] = [
    (2, 6),
    (10, 12),
    (IPV4_HEADER + 4, IPV4_HEADER + 8),
    (INNER_IP + 2, INNER_IP + 6),
    (INNER_IP + 10, INNER_IP + 12),
    (INNER_TCP + 4, INNER_TCP + 8),
    (INNER_TCP + 13, INNER_TCP + 14),
];

/// Whether the headers of two segments (each `headers` long) are of one stream and may
/// be one super-packet: equal but for [`OWN_FIELDS`], the TCP checksum, and the flags
/// PSH, FIN and CWR (the kernel's GRO asks the same: ACK number, window and options
/// equal).
fn same_stream(a: &[u8], b: &[u8], headers: usize) -> bool {
    let csum = (INNER_TCP + 16, INNER_TCP + 18);
    let mut at = 0;
    for (from, to) in OWN_FIELDS.iter().copied().chain([csum]) {
        if a[at..from] != b[at..from] {
            return false;
        }
        at = to;
    }
    let loose = TCP_PSH | TCP_FIN | TCP_CWR;
    a[at..headers] == b[at..headers] && (a[INNER_TCP + 13] ^ b[INNER_TCP + 13]) & !loose == 0
}

/// How the packets pending in a [`Coalescer`] are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Join {
    /// Not at all: one packet, which nothing may join.
    Alone,
    /// UDP datagrams of one stream (the VXLAN packets themselves): the kernel cuts them
    /// at its UDP layer (`GSO_UDP_L4`) and the VXLAN device's GRO joins what they hold.
    Datagrams(StreamKey),
    /// The TCP segments inside: one VXLAN packet holding one TCP super-packet, which
    /// the VXLAN device takes whole as from its own GRO (`GSO_UDP_TUNNEL | TCPV4`).
    /// `next`: the sequence number the next segment must have; `headers` the first's.
    Segments { next: u32, headers: usize },
}

/// Opened VXLAN packets on their way into `ndwg` (a TAP device: each gets an Ethernet
/// header), joined where they are of one stream: the TCP segments inside one into a
/// TCP super-packet in one VXLAN packet, as the kernel's own GRO would have made it
/// (then no layer below the task's socket sees 1390-byte pieces); other datagrams of
/// one stream and one size (the last may be smaller) into a UDP super-packet.
///
/// Unlike the kernel's GRO, the segments' own TCP checksums are not checked before they
/// are joined (that would be another pass over every byte): WireGuard's tag has
/// authenticated every byte end to end, and the checksums were made by the sending
/// node's kernel or its netd's cutting. The joined packet's checksum is left partial,
/// which the receiving stack trusts.
pub struct Coalescer {
    /// The virtio-net header, the Ethernet header, then the first packet's headers and
    /// every payload.
    buf: Vec<u8>,
    join: Join,
    /// The payload size of every piece (the first's).
    size: usize,
    pieces: usize,
    /// A smaller piece, or a TCP segment with PSH or FIN, ended the run.
    closed: bool,
    /// Whether TCP segments are joined (off once the kernel refused such a packet).
    pub tcp: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            buf: Vec::with_capacity(VNET_HDR_LEN + ETHERNET + MAX_IP_PACKET),
            join: Join::Alone,
            size: 0,
            pieces: 0,
            closed: false,
            tcp: true,
        }
    }
}

/// Where the packet starts in a [`Coalescer`]'s buffer.
const FRAMED: usize = VNET_HDR_LEN + ETHERNET;

impl Coalescer {
    /// Takes `packet` into the pending super-packet; false (nothing taken) if it cannot
    /// join it: write out [`Coalescer::finish`], [`Coalescer::clear`], and add it
    /// again, which always takes it.
    pub fn add(&mut self, packet: &[u8]) -> bool {
        if self.buf.is_empty() {
            self.start(packet);
            return true;
        }
        if self.closed {
            return false;
        }
        // The payload `packet` adds, and the flags it ends the run with.
        let (payload, tail) = match self.join {
            Join::Alone => return false,
            Join::Datagrams(key) => {
                let payload = &packet[(IPV4_HEADER + UDP_HEADER).min(packet.len())..];
                if stream_key(packet) != Some(key) || self.pieces >= MAX_SEGMENTS {
                    return false;
                }
                (payload, 0)
            }
            Join::Segments { next, headers } => {
                let Some(seg) = tcp_segment(packet) else {
                    return false;
                };
                let joins = seg.headers == headers
                    && seg.seq == next
                    && seg.flags & TCP_CWR == 0
                    && same_stream(&self.buf[FRAMED..], packet, headers);
                if !joins {
                    return false;
                }
                // What ends the stream's burst ends the run, and the super-packet
                // carries it (as GRO's does).
                (&packet[seg.headers..], seg.flags & (TCP_PSH | TCP_FIN))
            }
        };
        if payload.len() > self.size || self.buf.len() - FRAMED + payload.len() > MAX_IP_PACKET {
            return false;
        }
        if let Join::Segments { next, headers } = self.join {
            self.join = Join::Segments {
                next: next.wrapping_add(payload.len() as u32),
                headers,
            };
            self.buf[FRAMED + INNER_TCP + 13] |= tail;
        }
        self.buf.extend_from_slice(payload);
        self.pieces += 1;
        self.closed = tail != 0 || payload.len() < self.size;
        true
    }

    /// A new pending packet: `packet` after its virtio-net and Ethernet headers.
    fn start(&mut self, packet: &[u8]) {
        self.buf.resize(VNET_HDR_LEN, 0);
        self.buf.extend_from_slice(&DEVICE_MAC);
        self.buf.extend_from_slice(&PEER_MAC);
        self.buf.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        self.buf.extend_from_slice(packet);
        self.pieces = 1;
        self.closed = false;
        if let Some(seg) = tcp_segment(packet).filter(|_| self.tcp) {
            let size = packet.len() - seg.headers;
            self.closed = seg.flags & (TCP_PSH | TCP_FIN) != 0;
            let next = seg.seq.wrapping_add(size as u32);
            let headers = seg.headers;
            (self.join, self.size) = (Join::Segments { next, headers }, size);
            return;
        }
        (self.join, self.size) = match stream_key(packet) {
            // A TCP segment that cannot be part of a TCP super-packet (a SYN, say)
            // goes alone, as the kernel's GRO would let it.
            Some(_) if self.tcp && carries_tcp(packet) => (Join::Alone, 0),
            Some(key) => (
                Join::Datagrams(key),
                packet.len() - IPV4_HEADER - UDP_HEADER,
            ),
            None => (Join::Alone, 0),
        };
    }

    /// The pending packet with its virtio-net header, ready to write, and how many
    /// packets it holds; [`Coalescer::clear`] once written. A super-packet has its IPv4
    /// and UDP lengths and its IPv4 checksums set, and the checksum of its UDP (or
    /// inner TCP) left for the kernel (the pseudo-header's sum in place). A TCP
    /// super-packet has no outer UDP checksum (none was on the way either: WireGuard's
    /// tag covered every byte).
    pub fn finish(&mut self) -> Option<(&[u8], usize)> {
        if self.buf.is_empty() {
            return None;
        }
        let pieces = self.pieces;
        let p = &mut self.buf[FRAMED..];
        let total = p.len();
        let hdr = match self.join {
            _ if pieces == 1 => VnetHdr::default(),
            Join::Alone => VnetHdr::default(),
            Join::Datagrams(_) => {
                rewrite_ipv4(p, 0, IPV4_HEADER, total, be16(p, 4));
                let udp_len = (total - IPV4_HEADER) as u16;
                put16(p, 24, udp_len);
                put16(p, 26, fold(sum(&p[12..20], 17 + u64::from(udp_len))));
                VnetHdr {
                    flags: VNET_F_NEEDS_CSUM,
                    gso_type: VNET_GSO_UDP_L4,
                    hdr_len: (ETHERNET + IPV4_HEADER + UDP_HEADER) as u16,
                    gso_size: self.size as u16,
                    csum_start: (ETHERNET + IPV4_HEADER) as u16,
                    csum_offset: 6,
                    ..VnetHdr::default()
                }
            }
            Join::Segments { headers, .. } => {
                rewrite_ipv4(p, 0, IPV4_HEADER, total, be16(p, 4));
                put16(p, IPV4_HEADER + 4, (total - IPV4_HEADER) as u16);
                put16(p, IPV4_HEADER + 6, 0);
                let inner_id = be16(p, INNER_IP + 4);
                rewrite_ipv4(p, INNER_IP, IPV4_HEADER, total - INNER_IP, inner_id);
                let tcp_len = (total - INNER_TCP) as u64;
                let pseudo = fold(sum(&p[INNER_IP + 12..INNER_IP + 20], 6 + tcp_len));
                put16(p, INNER_TCP + 16, pseudo);
                let ecn = if p[INNER_TCP + 13] & TCP_CWR != 0 {
                    VNET_GSO_ECN
                } else {
                    0
                };
                VnetHdr {
                    flags: VNET_F_NEEDS_CSUM,
                    gso_type: VNET_GSO_UDP_TUNNEL_IPV4 | VNET_GSO_TCPV4 | ecn,
                    hdr_len: (ETHERNET + headers) as u16,
                    gso_size: self.size as u16,
                    csum_start: (ETHERNET + INNER_TCP) as u16,
                    csum_offset: 16,
                    outer_th_offset: (ETHERNET + IPV4_HEADER) as u16,
                    inner_nh_offset: (ETHERNET + INNER_IP) as u16,
                }
            }
        };
        hdr.encode(&mut self.buf[..VNET_HDR_LEN]);
        // Nothing joins a finished packet.
        self.closed = true;
        Some((&self.buf, pieces))
    }

    /// Whether the pending packet joins TCP segments (for a caller whose write of it
    /// the kernel refused: the kernel then takes no such packet).
    pub fn joins_segments(&self) -> bool {
        self.pieces > 1 && matches!(self.join, Join::Segments { .. })
    }

    /// The packets a finished super-packet holds, each whole again with its virtio-net
    /// and Ethernet headers: datagrams with their IPv4 length, identification and
    /// checksum, their UDP length and no UDP checksum; TCP segments cut as [`unpack`]
    /// cuts what `ndwg` hands over. What is written instead where the kernel refused
    /// the super-packet.
    pub fn pieces(&self) -> Vec<Vec<u8>> {
        let Some(hdr) = self.buf.get(..VNET_HDR_LEN).and_then(VnetHdr::decode) else {
            return vec![];
        };
        let Some(p) = self.buf.get(FRAMED..) else {
            return vec![];
        };
        let frame = |packet: &[u8]| {
            let mut q = Vec::with_capacity(FRAMED + packet.len());
            q.extend_from_slice(&self.buf[..FRAMED]);
            q[..VNET_HDR_LEN].fill(0);
            q.extend_from_slice(packet);
            q
        };
        if self.pieces <= 1 || self.size == 0 {
            return vec![frame(p)];
        }
        if hdr.gso_type & !VNET_GSO_ECN == VNET_GSO_UDP_TUNNEL_IPV4 | VNET_GSO_TCPV4 {
            // The header as `ndwg` would have handed such a packet over: offsets from
            // the IP header, the inner TCP checksum to finish.
            let (mut out, mut ends) = (vec![], vec![]);
            let cut = hdr
                .unframed()
                .is_some_and(|h| unpack(&mut p.to_vec(), &h, &mut out, &mut ends).is_ok());
            if !cut {
                return vec![];
            }
            let mut start = 0;
            return ends
                .into_iter()
                .map(|end| {
                    let q = frame(&out[start..end]);
                    start = end;
                    q
                })
                .collect();
        }
        let head = IPV4_HEADER + UDP_HEADER;
        if p.len() <= head {
            return vec![frame(p)];
        }
        let id = be16(p, 4);
        p[head..]
            .chunks(self.size)
            .enumerate()
            .map(|(i, payload)| {
                let mut q = frame(&p[..head]);
                q.extend_from_slice(payload);
                let packet = &mut q[FRAMED..];
                let len = packet.len();
                rewrite_ipv4(packet, 0, IPV4_HEADER, len, id.wrapping_add(i as u16));
                put16(packet, 24, (len - IPV4_HEADER) as u16);
                put16(packet, 26, 0);
                q
            })
            .collect()
    }

    /// Forgets the packet [`Coalescer::finish`] returned, once written.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pieces = 0;
        self.join = Join::Alone;
    }
}

/// Turns `UDP_GRO` on for `sock`: datagrams of one run arrive as one.
pub fn enable_gro(sock: BorrowedFd) -> io::Result<()> {
    socket::setsockopt(&sock, sockopt::UdpGroSegment, &true).map_err(io::Error::from)
}

/// Asks for `bytes` of receive and send buffer on `sock`, past the host's maximum where
/// netd may (a failure only leaves the default: slower, not wrong).
pub fn set_buffers(sock: BorrowedFd, bytes: usize) {
    if socket::setsockopt(&sock, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = socket::setsockopt(&sock, sockopt::RcvBuf, &bytes);
    }
    if socket::setsockopt(&sock, sockopt::SndBufForce, &bytes).is_err() {
        let _ = socket::setsockopt(&sock, sockopt::SndBuf, &bytes);
    }
}

/// Sends `buf` to `to` as datagrams of `segment` bytes each (the last may be shorter)
/// in one `sendmsg` (UDP GSO); one datagram when `segment` is `buf`'s length.
pub fn send_segments(
    sock: BorrowedFd,
    to: SocketAddrV4,
    buf: &[u8],
    segment: usize,
) -> io::Result<usize> {
    let seg;
    let gso;
    let cmsgs: &[ControlMessage] = if segment < buf.len() {
        seg = u16::try_from(segment)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        gso = [ControlMessage::UdpGsoSegments(&seg)];
        &gso
    } else {
        &[]
    };
    socket::sendmsg(
        sock.as_raw_fd(),
        &[IoSlice::new(buf)],
        cmsgs,
        MsgFlags::empty(),
        Some(&SockaddrIn::from(to)),
    )
    .map_err(io::Error::from)
}

/// One `recvmsg` into `buf`: the bytes, the sender, and the size of each datagram in
/// it when it holds a run joined by `UDP_GRO` (None: one datagram).
pub fn recv_gro(
    sock: BorrowedFd,
    buf: &mut [u8],
) -> io::Result<(usize, Option<SocketAddrV4>, Option<usize>)> {
    let mut space = nix::cmsg_space!(libc::c_int);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<SockaddrIn>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let n = msg.bytes;
    let mut segment = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::UdpGroSegments(s) = c {
            segment = usize::try_from(s).ok().filter(|s| *s > 0 && *s < n);
        }
    }
    let from = msg.address.map(|a| SocketAddrV4::new(a.ip(), a.port()));
    Ok((n, from, segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4/UDP packet of `payload` bytes from 198.18.0.12:sport to 198.18.0.11:4790.
    fn vxlan(sport: u16, payload: usize, fill: u8) -> Vec<u8> {
        let total = IPV4_HEADER + UDP_HEADER + payload;
        let mut p = vec![fill; total];
        p[..20].copy_from_slice(&[
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 12, 198, 18, 0, 11,
        ]);
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&4790u16.to_be_bytes());
        p[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
        p[26..28].copy_from_slice(&[0, 0]);
        p
    }

    #[test]
    fn the_checksum_is_the_internet_checksum() {
        // RFC 1071's example words: 0x0001 0xf203 0xf4f5 0xf6f7 sum (folded) to 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        // An odd byte counts as the high half of a word.
        assert_eq!(fold(sum(&[0x12], 0)), 0x1200);
        // A header with its checksum in place sums to 0xffff.
        let mut h = vxlan(1, 10, 0)[..20].to_vec();
        let c = !fold(sum(&h, 0));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(fold(sum(&h, 0)), 0xffff);
    }

    #[test]
    fn a_checksum_left_to_the_reader_is_finished() {
        let mut p = vxlan(1, 100, 7);
        let pseudo = fold(sum(&p[12..20], 17 + 108));
        p[26..28].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        assert!(finish_checksum(&mut p, &hdr));
        // Verified as a receiver does: pseudo-header plus the UDP header and data.
        assert_eq!(fold(sum(&p[20..], sum(&p[12..20], 17 + 108))), 0xffff);
        let far = VnetHdr {
            csum_offset: 200,
            ..hdr
        };
        assert!(!finish_checksum(&mut p, &far), "offset past the end");
        let mut untouched = vxlan(1, 10, 0);
        assert!(finish_checksum(&mut untouched, &VnetHdr::default()));
        assert_eq!(untouched, vxlan(1, 10, 0));
    }

    /// A VXLAN super-packet as `ndwg` hands it over: outer IPv4 198.18.0.11 ->
    /// 198.18.0.12 UDP 4790, VXLAN, Ethernet, inner IPv4 198.19.11.2 -> 198.19.11.3 TCP
    /// with 12 bytes of options, `payload` bytes counting up, flags `flags`.
    fn super_packet(payload: usize, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 8 + 8 + 14 + 20 + 32];
        p[..20].copy_from_slice(&[
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 11, 198, 18, 0, 12,
        ]);
        p[20..24].copy_from_slice(&[0xc0, 0x01, 0x12, 0xb6]);
        p[28] = 0x08; // VXLAN: the VNI is valid
        p[48..50].copy_from_slice(&[0x08, 0x00]); // Ethernet: IPv4
        p[50..70].copy_from_slice(&[
            0x45, 0, 0, 0, 0x00, 0x10, 0x40, 0, 64, 6, 0, 0, 198, 19, 11, 2, 198, 19, 11, 3,
        ]);
        p[70..72].copy_from_slice(&5201u16.to_be_bytes());
        p[72..74].copy_from_slice(&40000u16.to_be_bytes());
        p[74..78].copy_from_slice(&0xffff_ff00u32.to_be_bytes()); // wraps
        p[82] = 8 << 4; // data offset: 32 bytes
        p[83] = flags;
        p.extend((0..payload).map(|i| i as u8));
        p
    }

    fn tunnel_hdr(mss: u16) -> VnetHdr {
        VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: VNET_GSO_UDP_TUNNEL_IPV4 | VNET_GSO_TCPV4,
            hdr_len: 102,
            gso_size: mss,
            csum_start: 70,
            csum_offset: 16,
            outer_th_offset: 20,
            inner_nh_offset: 50,
        }
    }

    #[test]
    fn a_vxlan_super_packet_is_cut_as_the_kernel_would() {
        // FIN, PSH, ACK and CWR on the super-packet.
        let mut p = super_packet(2500, 0x80 | 0x10 | 0x08 | 0x01);
        let (mut out, mut ends) = (vec![], vec![]);
        assert_eq!(
            unpack(&mut p, &tunnel_hdr(1000), &mut out, &mut ends),
            Ok(3)
        );
        assert_eq!(ends, vec![1102, 2204, 2806]);
        let mut start = 0;
        for (i, end) in ends.iter().enumerate() {
            let s = &out[start..*end];
            let len = s.len();
            // Outer IPv4: length, identification counting up, a valid checksum.
            assert_eq!(usize::from(be16(s, 2)), len);
            assert_eq!(be16(s, 4), 0x1234 + i as u16);
            assert_eq!(
                fold(sum(&s[..20], 0)),
                0xffff,
                "outer checksum of piece {i}"
            );
            assert_eq!(usize::from(be16(s, 24)), len - 20, "UDP length");
            // Inner IPv4.
            assert_eq!(usize::from(be16(s, 52)), len - 50);
            assert_eq!(be16(s, 54), 0x10 + i as u16);
            assert_eq!(
                fold(sum(&s[50..70], 0)),
                0xffff,
                "inner checksum of piece {i}"
            );
            // TCP: the sequence number moves by the MSS, and wraps.
            let seq = u32::from_be_bytes([s[74], s[75], s[76], s[77]]);
            assert_eq!(seq, 0xffff_ff00u32.wrapping_add(1000 * i as u32));
            let flags = s[83];
            assert_eq!(flags & 0x10, 0x10, "ACK on every piece");
            assert_eq!(flags & 0x80 != 0, i == 0, "CWR on the first only");
            assert_eq!(flags & 0x09 != 0, i == 2, "FIN and PSH on the last only");
            let pseudo = sum(&s[62..70], 6 + (len - 70) as u64);
            assert_eq!(
                fold(sum(&s[70..], pseudo)),
                0xffff,
                "TCP checksum of piece {i}"
            );
            // The payload, in order.
            let want: Vec<u8> = (i * 1000..(i * 1000 + 1000).min(2500))
                .map(|b| b as u8)
                .collect();
            assert_eq!(&s[102..], &want[..]);
            start = *end;
        }
    }

    #[test]
    fn an_outer_udp_checksum_left_to_the_reader_becomes_none() {
        let mut p = super_packet(1500, 0x10);
        // The pseudo-header's sum, as the kernel leaves it.
        p[26..28].copy_from_slice(&[0x12, 0x34]);
        let hdr = VnetHdr {
            flags: VNET_F_NEEDS_CSUM | VNET_F_UDP_TUNNEL_CSUM,
            ..tunnel_hdr(1000)
        };
        let (mut out, mut ends) = (vec![], vec![]);
        assert_eq!(unpack(&mut p, &hdr, &mut out, &mut ends), Ok(2));
        for piece in [&out[..ends[0]], &out[ends[0]..ends[1]]] {
            assert_eq!(be16(piece, 26), 0);
        }
    }

    #[test]
    fn a_plain_packet_passes_and_odd_ones_are_refused() {
        let (mut out, mut ends) = (vec![], vec![]);
        let mut plain = vxlan(1, 50, 9);
        assert_eq!(
            unpack(&mut plain.clone(), &VnetHdr::default(), &mut out, &mut ends),
            Ok(1)
        );
        assert_eq!((out.as_slice(), ends.as_slice()), (&plain[..], &[78][..]));
        // Offered nothing else: TCPv4 alone, UDP segmentation.
        for gso_type in [VNET_GSO_TCPV4, VNET_GSO_UDP_L4] {
            let hdr = VnetHdr {
                gso_type,
                ..tunnel_hdr(1000)
            };
            assert_eq!(
                unpack(&mut plain, &hdr, &mut out, &mut ends),
                Err(Unpack::Unsupported)
            );
        }
        // Offsets that do not match the packet, no MSS, headers past the end.
        let mut p = super_packet(100, 0x10);
        for hdr in [
            VnetHdr {
                inner_nh_offset: 51,
                ..tunnel_hdr(1000)
            },
            tunnel_hdr(0),
        ] {
            assert_eq!(
                unpack(&mut p, &hdr, &mut out, &mut ends),
                Err(Unpack::Malformed)
            );
        }
        assert_eq!(
            unpack(&mut p[..90], &tunnel_hdr(1000), &mut out, &mut ends),
            Err(Unpack::Malformed)
        );
        assert_eq!(ends.len(), 1, "nothing more taken");
    }

    #[test]
    fn the_virtio_header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 5,
            hdr_len: 28,
            gso_size: 1392,
            csum_start: 20,
            csum_offset: 6,
            outer_th_offset: 20,
            inner_nh_offset: 50,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        h.encode(&mut b);
        assert_eq!(VnetHdr::decode(&b), Some(h));
        assert_eq!(VnetHdr::decode(&b[..23]), None);
    }

    #[test]
    fn runs_for_udp_gso_hold_equal_datagrams_and_a_smaller_last() {
        assert_eq!(gso_runs(&[]), vec![]);
        assert_eq!(gso_runs(&[100]), vec![(0, 1)]);
        // Equal, then a smaller one ends the run; a larger one starts a new run.
        assert_eq!(
            gso_runs(&[100, 100, 100, 60, 100, 200, 200]),
            vec![(0, 4), (4, 5), (5, 7)]
        );
        // At most MAX_SEGMENTS each.
        let many = vec![10; MAX_SEGMENTS * 2 + 1];
        assert_eq!(
            gso_runs(&many),
            vec![
                (0, MAX_SEGMENTS),
                (MAX_SEGMENTS, 2 * MAX_SEGMENTS),
                (2 * MAX_SEGMENTS, 2 * MAX_SEGMENTS + 1)
            ]
        );
        // At most one IPv4 packet's bytes: 45 of 1452 fit in 65507, 46 do not.
        let big = vec![1452; 50];
        assert_eq!(gso_runs(&big), vec![(0, 45), (45, 50)]);
    }

    #[test]
    fn packets_of_one_stream_join_and_the_kernel_gets_what_it_needs() {
        let mut c = Coalescer::default();
        let a = vxlan(5000, 1000, 1);
        let b = vxlan(5000, 1000, 2);
        let last = vxlan(5000, 400, 3);
        assert!(c.add(&a));
        assert!(c.add(&b));
        assert!(c.add(&last));
        // After a smaller one nothing joins.
        assert!(!c.add(&vxlan(5000, 1000, 4)));
        let (out, pieces) = c.finish().expect("a packet");
        assert_eq!(pieces, 3);
        let hdr = VnetHdr::decode(out).expect("header");
        assert_eq!(
            hdr,
            VnetHdr {
                flags: VNET_F_NEEDS_CSUM,
                gso_type: VNET_GSO_UDP_L4,
                hdr_len: 14 + 28,
                gso_size: 1000,
                csum_start: 14 + 20,
                csum_offset: 6,
                ..VnetHdr::default()
            }
        );
        // An Ethernet frame to ndwg's own address.
        let eth = &out[VNET_HDR_LEN..FRAMED];
        assert_eq!(
            (&eth[..6], &eth[12..]),
            (&DEVICE_MAC[..], &[0x08, 0x00][..])
        );
        let p = &out[FRAMED..];
        assert_eq!(p.len(), 28 + 2400);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(fold(sum(&p[..20], 0)), 0xffff, "IPv4 checksum");
        assert_eq!(u16::from_be_bytes([p[24], p[25]]) as usize, p.len() - 20);
        // The UDP check field holds the pseudo-header's sum for the whole length.
        let pseudo = fold(sum(&p[12..20], 17 + (p.len() as u64 - 20)));
        assert_eq!(u16::from_be_bytes([p[26], p[27]]), pseudo);
        // The payloads in order.
        assert!(p[28..1028].iter().all(|b| *b == 1));
        assert!(p[1028..2028].iter().all(|b| *b == 2));
        assert!(p[2028..].iter().all(|b| *b == 3));
        c.clear();
    }

    #[test]
    fn a_refused_super_packet_comes_apart_into_whole_packets() {
        let mut c = Coalescer::default();
        for (payload, fill) in [(1000, 1), (1000, 2), (300, 3)] {
            assert!(c.add(&vxlan(5000, payload, fill)));
        }
        assert!(c.finish().is_some());
        let pieces = c.pieces();
        assert_eq!(pieces.len(), 3);
        for (i, (q, (payload, fill))) in pieces
            .iter()
            .zip([(1000, 1), (1000, 2), (300, 3)])
            .enumerate()
        {
            assert_eq!(VnetHdr::decode(q), Some(VnetHdr::default()));
            let p = &q[FRAMED..];
            assert_eq!(p.len(), 28 + payload);
            assert_eq!(usize::from(be16(p, 2)), p.len());
            assert_eq!(be16(p, 4), 1 + i as u16, "identification");
            assert_eq!(fold(sum(&p[..20], 0)), 0xffff);
            assert_eq!(usize::from(be16(p, 24)), p.len() - 20);
            assert_eq!(be16(p, 26), 0, "no UDP checksum");
            assert!(p[28..].iter().all(|b| *b == fill));
        }
        // A packet alone comes back as it was.
        let mut one = Coalescer::default();
        let a = vxlan(5000, 100, 7);
        assert!(one.add(&a));
        assert!(one.finish().is_some());
        let back = one.pieces();
        assert_eq!(back.len(), 1);
        assert_eq!(&back[0][FRAMED..], &a[..]);
    }

    #[test]
    fn a_packet_alone_goes_unchanged_and_others_do_not_join() {
        let mut c = Coalescer::default();
        let a = vxlan(5000, 1000, 1);
        assert!(c.add(&a));
        // Another stream (source port), a larger packet, a fragment, IP options.
        assert!(!c.add(&vxlan(5001, 1000, 1)));
        assert!(!c.add(&vxlan(5000, 1001, 1)));
        let mut frag = vxlan(5000, 1000, 1);
        frag[6] = 0x20;
        assert!(!c.add(&frag));
        let mut opts = vxlan(5000, 1000, 1);
        opts[0] = 0x46;
        assert!(!c.add(&opts));
        let (out, pieces) = c.finish().expect("a packet");
        assert_eq!(pieces, 1);
        assert_eq!(VnetHdr::decode(out), Some(VnetHdr::default()));
        assert_eq!(&out[FRAMED..], &a[..]);
        c.clear();
        // A packet that cannot join anything still goes, alone.
        assert!(c.add(&frag));
        assert_eq!(
            c.finish().map(|(o, n)| (o.len(), n)),
            Some((FRAMED + frag.len(), 1))
        );
    }

    #[test]
    fn a_super_packet_stays_within_one_ipv4_packet() {
        let mut c = Coalescer::default();
        let mut n = 0;
        while c.add(&vxlan(5000, 1400, 0)) {
            n += 1;
        }
        // 28 + 46 * 1400 = 64428 fits, 47 would not.
        assert_eq!(n, 46);
        let (out, pieces) = c.finish().expect("a packet");
        assert_eq!(pieces, 46);
        assert!(out.len() - FRAMED <= MAX_IP_PACKET);
    }

    /// A TCP segment in a VXLAN packet as a peer sends it: [`super_packet`]'s headers
    /// with `payload` bytes (each `fill`), sequence number `seq`, flags `flags`, and
    /// every length set.
    fn segment(seq: u32, payload: usize, flags: u8, fill: u8) -> Vec<u8> {
        let mut p = super_packet(0, flags);
        p.resize(p.len() + payload, fill);
        let len = p.len();
        put16(&mut p, 2, len as u16);
        put16(&mut p, 24, (len - 20) as u16);
        put16(&mut p, 52, (len - 50) as u16);
        p[74..78].copy_from_slice(&seq.to_be_bytes());
        p
    }

    /// Whether the TCP segment in VXLAN packet `s` has a valid checksum.
    fn tcp_checksum_valid(s: &[u8]) -> bool {
        let pseudo = sum(&s[62..70], 6 + (s.len() - 70) as u64);
        fold(sum(&s[70..], pseudo)) == 0xffff
    }

    #[test]
    fn segments_of_one_stream_become_one_tcp_super_packet_in_one_vxlan_packet() {
        let mut c = Coalescer::default();
        let base = 0xffff_fc00u32; // the sequence numbers wrap on the way
        assert!(c.add(&segment(base, 1000, 0x10, 1)));
        assert!(c.add(&segment(base.wrapping_add(1000), 1000, 0x10, 2)));
        assert!(c.add(&segment(base.wrapping_add(2000), 400, 0x18, 3)));
        // PSH (and a smaller one) ended the run.
        assert!(!c.add(&segment(base.wrapping_add(2400), 1000, 0x10, 4)));
        assert!(c.joins_segments());
        let (out, pieces) = c.finish().expect("a packet");
        assert_eq!(pieces, 3);
        assert_eq!(
            VnetHdr::decode(out),
            Some(VnetHdr {
                flags: VNET_F_NEEDS_CSUM,
                gso_type: VNET_GSO_UDP_TUNNEL_IPV4 | VNET_GSO_TCPV4,
                hdr_len: 14 + 102,
                gso_size: 1000,
                csum_start: 14 + 70,
                csum_offset: 16,
                outer_th_offset: 14 + 20,
                inner_nh_offset: 14 + 50,
            })
        );
        let p = &out[FRAMED..];
        let len = p.len();
        assert_eq!(len, 102 + 2400);
        // Outer IPv4 and UDP: the whole length, a valid checksum, no UDP checksum.
        assert_eq!(usize::from(be16(p, 2)), len);
        assert_eq!(fold(sum(&p[..20], 0)), 0xffff);
        assert_eq!(usize::from(be16(p, 24)), len - 20);
        assert_eq!(be16(p, 26), 0);
        // Inner IPv4: its whole length, a valid checksum, the first's identification.
        assert_eq!(usize::from(be16(p, 52)), len - 50);
        assert_eq!(fold(sum(&p[50..70], 0)), 0xffff);
        assert_eq!(be16(p, 54), 0x10);
        // TCP: the first's sequence number, the last's PSH, and the pseudo-header's
        // sum over the whole TCP length where the kernel finishes the checksum.
        assert_eq!(u32::from_be_bytes([p[74], p[75], p[76], p[77]]), base);
        assert_eq!(p[83], 0x18);
        assert_eq!(be16(p, 86), fold(sum(&p[62..70], 6 + (len - 70) as u64)));
        assert!(p[102..1102].iter().all(|b| *b == 1));
        assert!(p[1102..2102].iter().all(|b| *b == 2));
        assert!(p[2102..].iter().all(|b| *b == 3));

        // Refused by the kernel: the segments again, each whole with valid checksums.
        let pieces = c.pieces();
        assert_eq!(pieces.len(), 3);
        for (i, (q, (payload, fill))) in pieces
            .iter()
            .zip([(1000, 1u8), (1000, 2), (400, 3)])
            .enumerate()
        {
            assert_eq!(VnetHdr::decode(q), Some(VnetHdr::default()));
            let s = &q[FRAMED..];
            assert_eq!(s.len(), 102 + payload);
            assert_eq!(usize::from(be16(s, 2)), s.len());
            assert_eq!(fold(sum(&s[..20], 0)), 0xffff);
            assert_eq!(fold(sum(&s[50..70], 0)), 0xffff);
            let seq = u32::from_be_bytes([s[74], s[75], s[76], s[77]]);
            assert_eq!(seq, base.wrapping_add(1000 * i as u32));
            assert_eq!(s[83] & 0x08 != 0, i == 2, "PSH on the last only");
            assert!(tcp_checksum_valid(s), "TCP checksum of piece {i}");
            assert!(s[102..].iter().all(|b| *b == fill));
        }
    }

    #[test]
    fn segments_the_kernel_would_not_join_stay_apart() {
        let first = segment(1000, 1000, 0x10, 1);
        let next = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = segment(2000, 1000, 0x10, 2);
            f(&mut p);
            p
        };
        let apart: Vec<(&str, Vec<u8>)> = vec![
            ("a gap", segment(2001, 1000, 0x10, 2)),
            ("another ACK number", next(&|p| p[78] ^= 1)),
            ("another window", next(&|p| p[84] ^= 1)),
            ("other options (a timestamp)", next(&|p| p[95] ^= 1)),
            ("another inner source", next(&|p| p[62] ^= 1)),
            ("another VNI", next(&|p| p[33] ^= 1)),
            ("CWR after the first", next(&|p| p[83] |= 0x80)),
            ("RST", next(&|p| p[83] |= 0x04)),
            ("a larger segment", segment(2000, 1001, 0x10, 2)),
        ];
        for (why, p) in apart {
            let mut c = Coalescer::default();
            assert!(c.add(&first));
            assert!(!c.add(&p), "{why} joined");
        }
        // The next segment unchanged joins; a FIN on it joins and ends the run.
        let mut c = Coalescer::default();
        assert!(c.add(&first));
        assert!(c.add(&next(&|p| p[83] |= 0x01)));
        assert!(!c.add(&segment(3000, 1000, 0x10, 3)), "after a FIN");
        let (out, _) = c.finish().expect("a packet");
        assert_eq!(out[FRAMED + 83], 0x11, "the FIN on the super-packet");
        // A SYN, or a segment without data, goes alone: nothing joins it.
        for lone in [segment(1000, 1000, 0x02, 1), segment(1000, 0, 0x10, 1)] {
            let mut c = Coalescer::default();
            assert!(c.add(&lone));
            assert!(!c.add(&segment(1000 + 1000, 1000, 0x10, 2)));
        }
        // With TCP joins off, the same segments join as datagrams (UDP GSO).
        let mut c = Coalescer {
            tcp: false,
            ..Coalescer::default()
        };
        assert!(c.add(&first));
        assert!(c.add(&segment(2000, 1000, 0x10, 2)));
        assert!(!c.joins_segments());
        let (out, _) = c.finish().expect("a packet");
        assert_eq!(
            VnetHdr::decode(out).map(|h| h.gso_type),
            Some(VNET_GSO_UDP_L4)
        );
    }

    #[test]
    fn a_tcp_super_packet_says_ecn_and_stays_within_one_ipv4_packet() {
        // CWR on the first: the super-packet is marked ECN, as GRO marks it.
        let mut c = Coalescer::default();
        assert!(c.add(&segment(1, 1000, 0x90, 1)));
        assert!(c.add(&segment(1001, 1000, 0x10, 2)));
        let (out, _) = c.finish().expect("a packet");
        assert_eq!(
            VnetHdr::decode(out).map(|h| h.gso_type),
            Some(VNET_GSO_UDP_TUNNEL_IPV4 | VNET_GSO_TCPV4 | VNET_GSO_ECN)
        );
        // 102 bytes of headers + 65 * 1000 fit in 65535; a 66th would not.
        let mut c = Coalescer::default();
        let mut n = 0u32;
        while c.add(&segment(1 + n * 1000, 1000, 0x10, 0)) {
            n += 1;
        }
        assert_eq!(n, 65);
        let (out, pieces) = c.finish().expect("a packet");
        assert_eq!((out.len() - FRAMED, pieces), (102 + 65_000, 65));
    }

    #[test]
    fn a_frame_from_the_tap_device_loses_its_ethernet_header() {
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame.extend(super_packet(100, 0x10));
        let framed = VnetHdr {
            hdr_len: 14 + 102,
            csum_start: 14 + 70,
            outer_th_offset: 14 + 20,
            inner_nh_offset: 14 + 50,
            ..tunnel_hdr(1000)
        };
        let (packet, hdr) = strip_ethernet(&mut frame, &framed).expect("IPv4");
        assert_eq!(packet[0], 0x45);
        assert_eq!(hdr, tunnel_hdr(1000));
        // A plain frame: nothing to move; the offsets stay 0.
        let (_, plain) = strip_ethernet(&mut frame, &VnetHdr::default()).expect("IPv4");
        assert_eq!(plain, VnetHdr::default());
        // Offsets into the Ethernet header, another protocol, a short frame.
        let short = VnetHdr {
            csum_start: 10,
            ..framed
        };
        assert!(strip_ethernet(&mut frame, &short).is_none());
        let mut arp = frame.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(strip_ethernet(&mut arp, &framed).is_none());
        assert!(strip_ethernet(&mut frame[..13], &VnetHdr::default()).is_none());
    }
}
