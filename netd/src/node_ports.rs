//! The ports the node itself serves (sshd, etcd, netd's own API, the VXLAN socket). A
//! published port takes every packet to that port on every node's addresses, so
//! publishing one of these would cut the node off from its own service (or hand ssh
//! traffic to a task): refused unless the caller forces it.

use std::collections::BTreeSet;

use crate::model::{PortSpec, Protocol};

/// TCP sockets in LISTEN, and bound UDP sockets, of the caller's network namespace (netd
/// runs in the node's).
pub fn listening() -> BTreeSet<(Protocol, u16)> {
    let mut out = BTreeSet::new();
    for (file, proto) in [
        ("/proc/net/tcp", Protocol::Tcp),
        ("/proc/net/tcp6", Protocol::Tcp),
        ("/proc/net/udp", Protocol::Udp),
        ("/proc/net/udp6", Protocol::Udp),
    ] {
        if let Ok(text) = std::fs::read_to_string(file) {
            out.extend(parse(&text, proto).into_iter().map(|p| (proto, p)));
        }
    }
    out
}

/// TCP socket state LISTEN, and UDP's "unconnected" state (a bound server socket), in
/// /proc/net/{tcp,udp}[6].
const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

/// The local ports of one /proc/net table's serving sockets.
fn parse(text: &str, proto: Protocol) -> BTreeSet<u16> {
    let serving = match proto {
        Protocol::Tcp => TCP_LISTEN,
        Protocol::Udp => UDP_UNCONNECTED,
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            // sl local_address rem_address st ...
            let local = cols.nth(1)?;
            let state = cols.nth(1)?;
            if state != serving {
                return None;
            }
            let port = local.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// The first of `publish` that the node serves itself (from `served`), as an error a
/// user can act on.
pub fn check(publish: &[PortSpec], served: &BTreeSet<(Protocol, u16)>) -> Result<(), String> {
    match publish
        .iter()
        .find(|p| served.contains(&(p.protocol, p.published)))
    {
        Some(p) => Err(format!(
            "port {}/{} is served by the node itself (sshd, etcd, netd's API or VXLAN): \
             publishing it would take it over on every node; force it to publish anyway",
            p.published,
            p.protocol.as_str()
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PublishMode;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0B0012C6:094B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0B0012C6:C350 020012C6:094B 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:12B5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4 2 0000000000000000 0
  101: 0B0012C6:A000 030012C6:0035 01 00000000:00000000 00:00000000 00000000     0        0 5 2 0000000000000000 0
";

    #[test]
    fn listening_sockets_not_connections() {
        // sshd on 22 and etcd on 2379 listen; the connection from port 50000 does not.
        assert_eq!(parse(TCP, Protocol::Tcp), BTreeSet::from([22, 2379]));
        // VXLAN's 4789 is bound; a connected client socket is not serving.
        assert_eq!(parse(UDP, Protocol::Udp), BTreeSet::from([4789]));
        assert!(parse("garbage\nmore garbage", Protocol::Tcp).is_empty());
    }

    #[test]
    fn a_served_port_is_refused_by_name() {
        let served = BTreeSet::from([(Protocol::Tcp, 22), (Protocol::Udp, 4789)]);
        let port = |published, protocol| PortSpec {
            published,
            target: 80,
            protocol,
            mode: PublishMode::Ingress,
        };
        assert!(check(&[port(8080, Protocol::Tcp)], &served).is_ok());
        // The same number over the other protocol is free.
        assert!(check(&[port(22, Protocol::Udp)], &served).is_ok());
        let err = check(
            &[port(8080, Protocol::Tcp), port(22, Protocol::Tcp)],
            &served,
        )
        .unwrap_err();
        assert!(
            err.starts_with("port 22/tcp is served by the node"),
            "{err}"
        );
    }
}
