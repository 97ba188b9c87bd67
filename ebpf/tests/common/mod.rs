//! Helpers the eBPF program tests share: the Internet checksum and netd's MACs.

use std::net::Ipv4Addr;

/// The Internet checksum (RFC 1071) over `parts` taken as one byte string of 16-bit
/// words (an odd part is padded with a zero byte).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for p in parts {
        for w in p.chunks(2) {
            sum += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// netd's MAC for an overlay address: 02:42 and the address's four bytes.
pub fn mac_of(a: Ipv4Addr) -> [u8; 6] {
    let o = a.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}
