//! Packet work of the userspace datapath, on raw IPv4 packets as a TUN device hands them
//! over: parse and validate with etherparse, rewrite addresses and ports in place with
//! RFC 1624 incremental checksum updates (etherparse has no mutable headers), and build
//! the refusals (TCP RST, ICMP port unreachable) for a VIP without backends.
//!
//! Offsets: IPv4 source address at 12, destination at 16, header checksum at 10; the
//! L4 header starts at IHL*4, with source port at +0 and destination port at +2; the
//! checksum is at +16 for TCP and +6 for UDP (where 0 means "no checksum").

use std::net::Ipv4Addr;

use etherparse::{Ipv4HeaderSlice, PacketBuilder, TcpHeaderSlice, UdpHeaderSlice};
use thiserror::Error;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// Why a packet was not handled; every one is counted as a drop, none panics.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Reject {
    #[error("not a valid IPv4 packet: {0}")]
    Malformed(String),
    #[error("fragment (the userspace datapath does not reassemble)")]
    Fragment,
    #[error("protocol {0} is not balanced")]
    Protocol(u8),
}

/// The addressing of a TCP or UDP packet, and what the translation needs of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    /// TCP flags of this packet (0 for UDP).
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    pub seq: u32,
    /// Offset of the L4 header in the packet.
    l4: usize,
    /// Length of the L4 payload, for building a RST.
    payload_len: usize,
}

/// Parses `pkt` as an unfragmented IPv4 TCP or UDP packet whose headers fit in it.
pub fn parse(pkt: &[u8]) -> Result<Flow, Reject> {
    let ip = Ipv4HeaderSlice::from_slice(pkt).map_err(|e| Reject::Malformed(e.to_string()))?;
    let total = ip.total_len() as usize;
    if total > pkt.len() || total < ip.slice().len() {
        return Err(Reject::Malformed(format!(
            "total length {total} does not match the {} bytes received",
            pkt.len()
        )));
    }
    if ip.is_fragmenting_payload() {
        return Err(Reject::Fragment);
    }
    let l4 = ip.slice().len();
    let body = &pkt[l4..total];
    let proto = ip.protocol().0;
    let (sport, dport, syn, ack, fin, rst, seq, hdr) = match proto {
        TCP => {
            let t =
                TcpHeaderSlice::from_slice(body).map_err(|e| Reject::Malformed(e.to_string()))?;
            (
                t.source_port(),
                t.destination_port(),
                t.syn(),
                t.ack(),
                t.fin(),
                t.rst(),
                t.sequence_number(),
                t.slice().len(),
            )
        }
        UDP => {
            let u =
                UdpHeaderSlice::from_slice(body).map_err(|e| Reject::Malformed(e.to_string()))?;
            (
                u.source_port(),
                u.destination_port(),
                false,
                false,
                false,
                false,
                0,
                8,
            )
        }
        other => return Err(Reject::Protocol(other)),
    };
    Ok(Flow {
        proto,
        src: ip.source_addr(),
        sport,
        dst: ip.destination_addr(),
        dport,
        syn,
        ack,
        fin,
        rst,
        seq,
        l4,
        payload_len: body.len() - hdr,
    })
}

/// RFC 1624 (eqn. 3): HC' = ~(~HC + ~m + m'), for one 16-bit word changing m -> m'.
fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn csum_replace_addr(check: u16, old: Ipv4Addr, new: Ipv4Addr) -> u16 {
    let (o, n) = (old.octets(), new.octets());
    let c = csum_replace(
        check,
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([n[0], n[1]]),
    );
    csum_replace(
        c,
        u16::from_be_bytes([o[2], o[3]]),
        u16::from_be_bytes([n[2], n[3]]),
    )
}

fn get16(pkt: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([pkt[at], pkt[at + 1]])
}

fn put16(pkt: &mut [u8], at: usize, v: u16) {
    pkt[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Rewrites the source and destination of `pkt` (already parsed as `flow`) to
/// `src:sport -> dst:dport`, keeping the IP and L4 checksums right.
pub fn rewrite(pkt: &mut [u8], flow: &Flow, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) {
    let l4 = flow.l4;
    let ip_check = csum_replace_addr(get16(pkt, 10), flow.src, src);
    let ip_check = csum_replace_addr(ip_check, flow.dst, dst);
    put16(pkt, 10, ip_check);
    pkt[12..16].copy_from_slice(&src.octets());
    pkt[16..20].copy_from_slice(&dst.octets());
    let check_at = l4 + if flow.proto == TCP { 16 } else { 6 };
    let old = get16(pkt, check_at);
    // A UDP checksum of 0 means the sender computed none: leave it so.
    if !(flow.proto == UDP && old == 0) {
        // The pseudo-header holds both addresses; the header holds both ports.
        let mut c = csum_replace_addr(old, flow.src, src);
        c = csum_replace_addr(c, flow.dst, dst);
        c = csum_replace(c, flow.sport, sport);
        c = csum_replace(c, flow.dport, dport);
        if flow.proto == UDP && c == 0 {
            c = 0xffff;
        }
        put16(pkt, check_at, c);
    }
    put16(pkt, l4, sport);
    put16(pkt, l4 + 2, dport);
}

/// What refuses `flow` (sent to a VIP without backends) at once, as a closed port would:
/// a TCP RST for a SYN, an ICMP port unreachable for UDP. None for anything else.
pub fn refusal(pkt: &[u8], flow: &Flow) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(96);
    match flow.proto {
        TCP if flow.syn && !flow.ack && !flow.rst => {
            // The SYN takes one sequence number, plus any data it carried.
            let ack = flow
                .seq
                .wrapping_add(1)
                .wrapping_add(flow.payload_len as u32);
            PacketBuilder::ipv4(flow.dst.octets(), flow.src.octets(), 64)
                .tcp(flow.dport, flow.sport, 0, 0)
                .rst()
                .ack(ack)
                .write(&mut out, &[])
                .ok()?;
            Some(out)
        }
        UDP => {
            // ICMP errors quote the offending IP header and the first 8 bytes after it.
            let quote = &pkt[..(flow.l4 + 8).min(pkt.len())];
            PacketBuilder::ipv4(flow.dst.octets(), flow.src.octets(), 64)
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port,
                ))
                .write(&mut out, quote)
                .ok()?;
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Ipv4Slice, PacketHeaders, TransportHeader};

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn tcp_packet(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        PacketBuilder::ipv4(a("198.18.9.2").octets(), a("198.18.9.200").octets(), 64)
            .tcp(40000, 80, 1234, 64000)
            .syn()
            .write(&mut out, payload)
            .unwrap();
        out
    }

    fn udp_packet(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        PacketBuilder::ipv4(a("198.18.9.2").octets(), a("198.18.9.200").octets(), 64)
            .udp(40000, 53)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    /// Recomputes every checksum from scratch and compares with what the packet holds.
    fn checksums_hold(pkt: &[u8]) {
        let h = PacketHeaders::from_ip_slice(pkt).unwrap();
        let ip = match h.net.unwrap() {
            etherparse::NetHeaders::Ipv4(ip, _) => ip,
            _ => panic!("not ipv4"),
        };
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let payload = Ipv4Slice::from_slice(pkt).unwrap().payload().payload;
        match h.transport.unwrap() {
            TransportHeader::Tcp(t) => {
                let body = &payload[t.header_len()..];
                assert_eq!(t.checksum, t.calc_checksum_ipv4(&ip, body).unwrap());
            }
            TransportHeader::Udp(u) => {
                let body = &payload[8..];
                assert_eq!(u.checksum, u.calc_checksum_ipv4(&ip, body).unwrap());
            }
            _ => panic!("unexpected transport"),
        }
    }

    #[test]
    fn a_rewritten_packet_has_the_new_addressing_and_valid_checksums() {
        for mut pkt in [tcp_packet(b"hello"), udp_packet(b"query"), tcp_packet(b"")] {
            let flow = parse(&pkt).unwrap();
            rewrite(
                &mut pkt,
                &flow,
                a("198.18.9.250"),
                1025,
                a("198.18.9.7"),
                8080,
            );
            let after = parse(&pkt).unwrap();
            assert_eq!(
                (after.src, after.sport, after.dst, after.dport),
                (a("198.18.9.250"), 1025, a("198.18.9.7"), 8080)
            );
            checksums_hold(&pkt);
            // And back again: the reverse translation restores the original bytes.
            rewrite(&mut pkt, &after, flow.src, flow.sport, flow.dst, flow.dport);
            checksums_hold(&pkt);
        }
    }

    #[test]
    fn a_udp_packet_without_checksum_keeps_none() {
        let mut pkt = udp_packet(b"x");
        let l4 = 20;
        pkt[l4 + 6] = 0;
        pkt[l4 + 7] = 0;
        let flow = parse(&pkt).unwrap();
        rewrite(
            &mut pkt,
            &flow,
            a("198.18.9.250"),
            1025,
            a("198.18.9.7"),
            53,
        );
        assert_eq!(&pkt[l4 + 6..l4 + 8], &[0, 0]);
        assert_eq!(parse(&pkt).unwrap().dst, a("198.18.9.7"));
    }

    #[test]
    fn bad_packets_are_refused_with_a_reason_never_a_panic() {
        assert!(matches!(parse(&[]), Err(Reject::Malformed(_))));
        assert!(matches!(parse(&[0x45; 19]), Err(Reject::Malformed(_))));
        let mut short = tcp_packet(b"hello");
        short.truncate(30);
        assert!(matches!(parse(&short), Err(Reject::Malformed(_))));
        let mut frag = udp_packet(b"x");
        frag[6] |= 0x20; // more fragments
        assert_eq!(parse(&frag), Err(Reject::Fragment));
        let mut icmp = vec![];
        PacketBuilder::ipv4([198, 18, 9, 2], [198, 18, 9, 200], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut icmp, &[])
            .unwrap();
        assert_eq!(parse(&icmp), Err(Reject::Protocol(1)));
        // Every truncation of a good packet is handled.
        let good = tcp_packet(b"payload");
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
    }

    #[test]
    fn refusals_are_a_rst_for_a_syn_and_port_unreachable_for_udp() {
        let syn = tcp_packet(b"");
        let flow = parse(&syn).unwrap();
        let rst = refusal(&syn, &flow).unwrap();
        let r = parse(&rst).unwrap();
        assert!(r.rst);
        assert_eq!(
            (r.src, r.sport, r.dst, r.dport),
            (flow.dst, 80, flow.src, 40000)
        );
        checksums_hold(&rst);
        let t = TcpHeaderSlice::from_slice(&rst[20..]).unwrap();
        assert_eq!(t.acknowledgment_number(), 1235);

        let udp = udp_packet(b"q");
        let flow = parse(&udp).unwrap();
        let icmp = refusal(&udp, &flow).unwrap();
        let h = PacketHeaders::from_ip_slice(&icmp).unwrap();
        match h.transport.unwrap() {
            TransportHeader::Icmpv4(i) => assert_eq!(
                i.icmp_type,
                etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port
                )
            ),
            _ => panic!("not icmp"),
        }
        // A packet in the middle of a connection gets nothing.
        let mut data = tcp_packet(b"x");
        data[20 + 13] = 0x10; // ACK only
        let f = parse(&data).unwrap();
        assert!(refusal(&data, &f).is_none());
    }

    /// Whether every checksum of `pkt` is right, or None if it is not a packet whose
    /// checksums can be computed.
    fn checksums_ok(pkt: &[u8]) -> Option<bool> {
        let h = PacketHeaders::from_ip_slice(pkt).ok()?;
        let ip = match h.net? {
            etherparse::NetHeaders::Ipv4(ip, _) => ip,
            _ => return None,
        };
        let payload = Ipv4Slice::from_slice(pkt).ok()?.payload().payload;
        let l4 = match h.transport? {
            TransportHeader::Tcp(t) => {
                let body = payload.get(t.header_len()..)?;
                t.checksum == t.calc_checksum_ipv4(&ip, body).ok()?
            }
            TransportHeader::Udp(u) if u.checksum != 0 => {
                let body = payload.get(8..)?;
                u.checksum == u.calc_checksum_ipv4(&ip, body).ok()?
            }
            TransportHeader::Udp(_) => true,
            _ => return None,
        };
        Some(ip.header_checksum == ip.calc_header_checksum() && l4)
    }

    /// The fuzz target of the userspace datapath's packet path, for a bounded number of
    /// inputs (seeded, so a failure repeats): random bytes, and valid TCP/UDP packets
    /// (with IP options, fragment bits, odd lengths) with random bytes flipped or cut.
    /// Nothing may panic; a packet that parses can be rewritten and refused; a rewrite
    /// keeps checksums that were right right.
    #[test]
    fn random_and_mutated_packets_never_panic_and_rewrites_keep_checksums() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e61_7430);
        let seeds = [
            tcp_packet(b"hello"),
            udp_packet(b"query"),
            tcp_packet(&[7; 1400]),
            udp_packet(b""),
        ];
        for round in 0..100_000 {
            let mut p: Vec<u8> = if round % 4 == 0 {
                let len = rng.random_range(0..120);
                (0..len).map(|_| rng.random()).collect()
            } else {
                let mut p = seeds[round % seeds.len()].clone();
                if rng.random_bool(0.2) {
                    // IP options: IHL 6..15 with the bytes that follow taken as options.
                    p[0] = 0x40 | rng.random_range(6..16);
                }
                for _ in 0..rng.random_range(0..4) {
                    let at = rng.random_range(0..p.len());
                    p[at] = rng.random();
                }
                if rng.random_bool(0.2) {
                    p.truncate(rng.random_range(0..p.len()));
                }
                p
            };
            let Ok(flow) = parse(&p) else { continue };
            let _ = refusal(&p, &flow);
            let before = checksums_ok(&p);
            rewrite(
                &mut p,
                &flow,
                a("198.18.9.250"),
                1025,
                a("198.18.9.7"),
                8080,
            );
            if before == Some(true) {
                assert_eq!(checksums_ok(&p), Some(true), "round {round}: {p:02x?}");
            }
        }
    }
}
