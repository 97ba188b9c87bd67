//! Address management as pure functions over what is already taken. The store makes the
//! choices stick (each address is a create-if-absent key). Subnets and VNIs are the lowest
//! free candidate; a task's address is the next free one after the last handed out in its
//! subnet (serial, wrapping round at the end), so that a freed address comes back only
//! after every other one has been used: a node still removing the address's old holder
//! from its kernel must not meet its new holder at once (Docker's swarm allocates
//! serially for the same reason).

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use thiserror::Error;

/// VNIs below 4096 collide with VLAN ids in tooling, so Docker starts overlays at 4096.
pub const FIRST_VNI: u32 = 4096;
/// The VXLAN header carries 24 bits of VNI.
pub const MAX_VNI: u32 = (1 << 24) - 1;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("subnet {0} is too small: a network needs at least a /30")]
    TooSmall(Ipv4Network),
    #[error("subnet {0} is not a network address (host bits set); did you mean {1}?")]
    HostBits(String, Ipv4Network),
    #[error("subnet {0} overlaps {1} ({2})")]
    Overlap(Ipv4Network, Ipv4Network, String),
    #[error("gateway {0} is not a usable host address of subnet {1}")]
    GatewayOutside(Ipv4Addr, Ipv4Network),
    #[error(
        "address pool {0} has no free /{1} subnet left: widen --address-pool, or give the \
         network a --subnet outside it"
    )]
    PoolExhausted(Ipv4Network, u8),
    #[error("subnet {0} has no free address left")]
    SubnetExhausted(Ipv4Network),
    #[error("no free VXLAN network identifier left")]
    VniExhausted,
}

/// Parses a user's CIDR and insists it is a network address, so `10.1.2.3/24` is refused
/// rather than silently widened.
pub fn parse_subnet(text: &str) -> Result<Ipv4Network, String> {
    let net: Ipv4Network = text
        .parse()
        .map_err(|e| format!("invalid subnet {text:?}: {e}"))?;
    let canonical = Ipv4Network::new(net.network(), net.prefix())
        .map_err(|e| format!("invalid subnet {text:?}: {e}"))?;
    if canonical.ip() != net.ip() {
        return Err(IpamError::HostBits(text.to_string(), canonical).to_string());
    }
    check_size(net).map_err(|e| e.to_string())?;
    if let Some((range, what)) = RESERVED_RANGES
        .iter()
        .find(|(r, _)| r.parse::<Ipv4Network>().is_ok_and(|r| overlaps(r, net)))
    {
        return Err(format!(
            "subnet {net} overlaps {range} ({what}), which no network may use"
        ));
    }
    Ok(net)
}

/// Ranges a network's tasks must never hold: packets to them never reach a task, or
/// mean something else to every host.
const RESERVED_RANGES: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, with the broadcast address"),
];

fn check_size(net: Ipv4Network) -> Result<(), IpamError> {
    if net.prefix() > 30 {
        return Err(IpamError::TooSmall(net));
    }
    Ok(())
}

/// Whether two networks share any address.
pub fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Refuses `subnet` if it overlaps any of `taken` (each with a label for the message).
pub fn check_free(subnet: Ipv4Network, taken: &[(Ipv4Network, String)]) -> Result<(), IpamError> {
    check_size(subnet)?;
    for (other, owner) in taken {
        if overlaps(subnet, *other) {
            return Err(IpamError::Overlap(subnet, *other, owner.clone()));
        }
    }
    Ok(())
}

/// The first `/size` subnet of `pool` that overlaps nothing in `taken`.
pub fn allocate_subnet(
    pool: Ipv4Network,
    size: u8,
    taken: &[(Ipv4Network, String)],
) -> Result<Ipv4Network, IpamError> {
    let exhausted = IpamError::PoolExhausted(pool, size);
    if size < pool.prefix() || size > 30 {
        return Err(exhausted);
    }
    let step = 1u64 << (32 - size);
    let start = u64::from(u32::from(pool.network()));
    let end = start + (1u64 << (32 - pool.prefix()));
    let mut at = start;
    while at < end {
        let candidate =
            Ipv4Network::new(Ipv4Addr::from(at as u32), size).map_err(|_| exhausted.clone())?;
        if let Some((other, _)) = taken.iter().find(|(o, _)| overlaps(candidate, *o)) {
            // Skip past whichever of the two is larger, keeping alignment to `size`.
            let other_end = u64::from(u32::from(other.broadcast())) + 1;
            at = (at + step).max(other_end.div_ceil(step) * step);
            continue;
        }
        return Ok(candidate);
    }
    Err(exhausted)
}

/// Host addresses of a subnet: everything but the network and broadcast addresses.
fn hosts(subnet: Ipv4Network) -> impl Iterator<Item = Ipv4Addr> {
    let first = u32::from(subnet.network()) + 1;
    let last = u32::from(subnet.broadcast()).saturating_sub(1);
    (first..=last).map(Ipv4Addr::from)
}

/// The gateway a network gets when the user names none: its first host address.
pub fn default_gateway(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// The address of a node's ingress sandbox on its gwbridge: the last host of the
/// subnet, reserved like the gateway (every allocation on a gwbridge counts it as used).
pub fn ingress_sbox_address(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.broadcast()) - 1)
}

/// The ingress sandbox's second address on the gwbridge, the one below
/// [`ingress_sbox_address`]: the node sends it the flows its XDP fast path picked a local
/// task for, and the sandbox balances those over the local tasks only, so that the two
/// together keep one exact rotation.
pub fn ingress_sbox_local_address(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.broadcast()) - 2)
}

pub fn check_gateway(subnet: Ipv4Network, gateway: Ipv4Addr) -> Result<(), IpamError> {
    if hosts(subnet).any(|h| h == gateway) {
        Ok(())
    } else {
        Err(IpamError::GatewayOutside(gateway, subnet))
    }
}

/// The first host address of `subnet` after `after` (the last one handed out) that is
/// not in `used`, wrapping round to the bottom; without `after`, or with one outside the
/// subnet, the lowest. The gateway belongs in `used`.
pub fn allocate_ip(
    subnet: Ipv4Network,
    after: Option<Ipv4Addr>,
    used: impl Fn(&Ipv4Addr) -> bool,
) -> Result<Ipv4Addr, IpamError> {
    let first = u32::from(subnet.network()) + 1;
    let last = u32::from(subnet.broadcast()).saturating_sub(1);
    let start = after
        .map(u32::from)
        .filter(|a| (first..=last).contains(a))
        .map_or(first, |a| if a == last { first } else { a + 1 });
    (start..=last)
        .chain(first..start)
        .map(Ipv4Addr::from)
        .find(|ip| !used(ip))
        .ok_or(IpamError::SubnetExhausted(subnet))
}

/// The lowest VNI from 4096 up that is not in `used`.
pub fn allocate_vni(used: impl Fn(&u32) -> bool) -> Result<u32, IpamError> {
    (FIRST_VNI..=MAX_VNI)
        .find(|v| !used(v))
        .ok_or(IpamError::VniExhausted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn subnets_in_special_ranges_are_refused() {
        for bad in [
            "127.0.0.0/24",
            "224.1.0.0/16",
            "0.0.0.0/24",
            "169.254.1.0/24",
            "240.0.0.0/24",
            "0.0.0.0/0",
        ] {
            let e = parse_subnet(bad).unwrap_err();
            assert!(e.contains("which no network may use"), "{bad}: {e}");
        }
        assert!(parse_subnet("198.19.0.0/24").is_ok());
    }

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_come_from_the_pool_in_order_and_skip_taken_ones() {
        let pool = net("10.0.0.0/8");
        let mut taken = vec![];
        let a = allocate_subnet(pool, 24, &taken).unwrap();
        assert_eq!(a, net("10.0.0.0/24"));
        taken.push((a, "a".into()));
        taken.push((net("10.0.1.128/25"), "user".into()));
        let b = allocate_subnet(pool, 24, &taken).unwrap();
        assert_eq!(b, net("10.0.2.0/24"));
        // A big taken block is skipped in one go.
        taken.push((net("10.0.0.0/12"), "big".into()));
        assert_eq!(
            allocate_subnet(pool, 24, &taken).unwrap(),
            net("10.16.0.0/24")
        );
    }

    #[test]
    fn pool_exhaustion_is_reported() {
        let pool = net("198.19.0.0/23");
        let taken = vec![
            (net("198.19.0.0/24"), "a".into()),
            (net("198.19.1.0/24"), "b".into()),
        ];
        assert_eq!(
            allocate_subnet(pool, 24, &taken),
            Err(IpamError::PoolExhausted(pool, 24))
        );
    }

    #[test]
    fn overlap_is_refused_both_ways() {
        let taken = vec![(net("198.19.0.0/24"), "front".into())];
        assert!(check_free(net("198.19.0.128/25"), &taken).is_err());
        assert!(check_free(net("198.19.0.0/16"), &taken).is_err());
        assert!(check_free(net("198.19.1.0/24"), &taken).is_ok());
    }

    #[test]
    fn parse_rejects_host_bits_and_tiny_subnets() {
        assert!(parse_subnet("198.19.0.0/24").is_ok());
        assert!(parse_subnet("198.19.0.5/24")
            .unwrap_err()
            .contains("198.19.0.0/24"));
        assert!(parse_subnet("198.19.0.0/31").is_err());
        assert!(parse_subnet("nonsense").is_err());
        assert!(parse_subnet("198.19.0.0/33").is_err());
    }

    #[test]
    fn addresses_are_unique_and_freed_ones_come_back_last() {
        let subnet = net("198.19.0.0/29"); // hosts .1 - .6
        let host = |n| Ipv4Addr::new(198, 19, 0, n);
        let mut used = BTreeSet::from([default_gateway(subnet)]);
        let mut got = vec![];
        let mut last = None;
        while let Ok(ip) = allocate_ip(subnet, last, |ip| used.contains(ip)) {
            assert!(used.insert(ip), "{ip} handed out twice");
            got.push(ip);
            last = Some(ip);
        }
        assert_eq!(got, (2..=6).map(host).collect::<Vec<_>>());
        assert_eq!(
            allocate_ip(subnet, last, |ip| used.contains(ip)),
            Err(IpamError::SubnetExhausted(subnet))
        );
        // Freed: .3, then .5. After .6 the search wraps round and finds .3 first.
        used.remove(&host(3));
        used.remove(&host(5));
        assert_eq!(
            allocate_ip(subnet, last, |ip| used.contains(ip)),
            Ok(host(3))
        );
        // After .3, .5 comes before a wrap: a freed address waits its turn.
        assert_eq!(
            allocate_ip(subnet, Some(host(3)), |ip| used.contains(ip)),
            Ok(host(5))
        );
    }

    #[test]
    fn a_released_address_is_not_the_next_one() {
        let subnet = net("198.19.0.0/24");
        let host = |n| Ipv4Addr::new(198, 19, 0, n);
        // .1 the gateway, .2 to .7 held, .4 just released by a task; .7 handed out last.
        let used: BTreeSet<Ipv4Addr> = [1, 2, 3, 5, 6, 7].map(host).into();
        assert_eq!(
            allocate_ip(subnet, Some(host(7)), |ip| used.contains(ip)),
            Ok(host(8))
        );
        // Without a history (a new network): the lowest free one.
        assert_eq!(
            allocate_ip(subnet, None, |ip| used.contains(ip)),
            Ok(host(4))
        );
        // A last address outside the subnet (a network made anew): from the bottom.
        assert_eq!(
            allocate_ip(subnet, Some(Ipv4Addr::new(10, 0, 0, 9)), |ip| used
                .contains(ip)),
            Ok(host(4))
        );
        // The last host handed out: the next search starts at the bottom again.
        assert_eq!(
            allocate_ip(subnet, Some(host(254)), |ip| used.contains(ip)),
            Ok(host(4))
        );
    }

    #[test]
    fn gateway_must_be_a_host_of_the_subnet() {
        let subnet = net("198.19.0.0/24");
        assert!(check_gateway(subnet, Ipv4Addr::new(198, 19, 0, 254)).is_ok());
        assert!(check_gateway(subnet, Ipv4Addr::new(198, 19, 0, 0)).is_err());
        assert!(check_gateway(subnet, Ipv4Addr::new(198, 19, 0, 255)).is_err());
        assert!(check_gateway(subnet, Ipv4Addr::new(198, 19, 1, 1)).is_err());
    }

    #[test]
    fn vnis_start_at_4096() {
        let mut used = BTreeSet::new();
        assert_eq!(allocate_vni(|v| used.contains(v)).unwrap(), 4096);
        used.insert(4096);
        used.insert(4098);
        assert_eq!(allocate_vni(|v| used.contains(v)).unwrap(), 4097);
    }
}
