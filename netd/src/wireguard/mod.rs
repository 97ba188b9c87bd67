//! Encrypted overlays (`network create --opt encrypted`): WireGuard between nodes.
//!
//! Each node has one WireGuard interface, [`IFNAME`], in its own netns. An encrypted
//! overlay's VXLAN device sends on [`SEALED_VXLAN_PORT`] instead of the plain port: the
//! node's firewall marks what goes to that port ([`MARK`]), and a routing rule sends
//! marked packets into `ndwg` (or drops them when its route is gone), so every
//! encapsulated packet the device makes (IPv4 / UDP / VXLAN / the task's frame,
//! addressed to the peer node's underlay address) goes through WireGuard. There, netd's userspace WireGuard ([`device`], boringtun's Noise IK and
//! ChaCha20-Poly1305) seals it for the node it is addressed to and sends it from
//! [`DEFAULT_PORT`] on the underlay. The receiving node opens it, checks that the packet
//! inside comes from the sending node's own underlay address and goes to the sealed
//! VXLAN port, and writes it to its `ndwg`, from where the kernel hands it to the VXLAN
//! device. The node's firewall accepts the sealed VXLAN port only from `ndwg`, so a
//! VXLAN packet for an encrypted network cannot be injected from the underlay.
//!
//! Plain overlays (UDP 4789) and traffic inside a node are untouched; UDP 4790 is the
//! encrypted overlays' own on every node. Keys: [`keys`].

pub mod device;
pub mod keys;
pub mod offload;

/// The node's WireGuard interface.
pub const IFNAME: &str = "ndwg";
/// The UDP port the encrypted overlays' VXLAN devices use (the plain ones use
/// `--vxlan-port`, 4789): only ever seen inside `ndwg`.
pub const SEALED_VXLAN_PORT: u16 = 4790;
/// The default of `--wireguard-port`, the UDP port a node takes WireGuard messages on
/// (one above WireGuard's own default, which a host may use for its own tunnels); each
/// node publishes its own in its node record.
pub const DEFAULT_PORT: u16 = 51821;
/// The mark netd's node firewall puts on what the encrypted overlays' VXLAN devices
/// send ("nw" and 1), and the routing table ("nw") that mark looks up: its one route
/// goes into [`IFNAME`].
pub const MARK: u32 = 0x6e77_0001;
pub const TABLE: u32 = 0x6e77;
/// `ndwg`'s own address (/32, link-local, "nw" again): the kernel's reverse-path check
/// drops whatever arrives on a device without an address unless the check is off, and a
/// host's `net.ipv4.conf.all.rp_filter=1` would turn it on for `ndwg` too (the kernel
/// takes the larger of `all` and the device's). With an address, `ndwg`'s loose check
/// (2) lets in what it opens, whatever `all` says.
pub const LINK_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 110, 119);
/// The preference of the rule that sends marked packets to [`TABLE`], and (one above)
/// of the one that drops them when the table has no route (outside the range of the
/// mesh's rules, `mesh_return::PREFS`).
pub const RULE_PREF: u32 = 31000;
/// What WireGuard adds to a packet on the underlay: IPv4 (20) + UDP (8) + its message
/// header and tag (32). wg-quick's 80 (1420 on 1500) leaves room for an IPv6 underlay;
/// netd's underlay is IPv4 only. No more for padding: WireGuard pads to a multiple of
/// 16 only as far as the tunnel's MTU (boringtun pads none), so a sealed packet is at
/// most the tunnel's MTU and 32 bytes.
pub const OVERHEAD: u32 = 60;
/// What VXLAN adds: outer IPv4 (20) + UDP (8) + VXLAN (8) + the inner Ethernet header
/// (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Why this node runs netd's own WireGuard: whether the kernel has WireGuard (a
/// `wireguard` link made and removed at once tells), and what that means.
pub async fn why_userspace() -> String {
    const PROBE: &str = "ndwgprobe";
    let made = crate::netns::with_netlink(&crate::netns::Netns::Home, |h| async move {
        let made = h
            .link()
            .add(rtnetlink::LinkWireguard::new(PROBE).build())
            .execute()
            .await;
        if made.is_ok() {
            if let Some(l) = crate::netlink::link_by_name(&h, PROBE).await? {
                crate::netlink::delete_link(&h, l.index).await?;
            }
        }
        Ok(made.map_err(|e| e.to_string()))
    })
    .await;
    match made {
        Ok(Ok(())) => "the kernel has WireGuard, but netd drives only its own (userspace) \
                       implementation so far"
            .into(),
        Ok(Err(e)) => format!("the kernel has no WireGuard (a wireguard link: {e})"),
        Err(e) => format!("the kernel's WireGuard could not be probed: {e:#}"),
    }
}

/// The MTU of `ndwg` on an underlay of `underlay_mtu`.
pub fn tunnel_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(OVERHEAD)
}

/// The MTU of an encrypted overlay (its tasks' interfaces) on an underlay of
/// `underlay_mtu`.
pub fn overlay_mtu(underlay_mtu: u32) -> u32 {
    tunnel_mtu(underlay_mtu).saturating_sub(VXLAN_OVERHEAD)
}

/// Whether an encrypted overlay fits an underlay of `underlay_mtu`: its tasks must get
/// IPv4's minimum of 68 bytes once WireGuard and VXLAN took theirs; else why not (the
/// node then runs without encrypted overlays, and `netd status` says this).
pub fn fits_underlay(underlay_mtu: u32) -> Result<(), String> {
    const IPV4_MIN_MTU: u32 = 68;
    let least = IPV4_MIN_MTU + OVERHEAD + VXLAN_OVERHEAD;
    if underlay_mtu < least {
        return Err(format!(
            "--underlay-mtu {underlay_mtu} leaves an encrypted overlay {} bytes, less than \
             IPv4's {IPV4_MIN_MTU}: encrypted overlays need an underlay MTU of at least {least}",
            overlay_mtu(underlay_mtu)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_underlay_too_small_for_an_encrypted_overlay_says_how_small() {
        assert_eq!(fits_underlay(178), Ok(()));
        assert_eq!(overlay_mtu(178), 68);
        let e = fits_underlay(177).unwrap_err();
        assert!(e.contains("leaves an encrypted overlay 67 bytes"), "{e}");
        assert!(e.contains("at least 178"), "{e}");
        assert!(fits_underlay(118).is_err());
    }

    #[test]
    fn an_encrypted_overlay_leaves_room_for_both_headers() {
        // 1500 on the wire: 1440 in the tunnel, 1390 for a task.
        assert_eq!(tunnel_mtu(1500), 1440);
        assert_eq!(overlay_mtu(1500), 1390);
        assert_eq!(overlay_mtu(100), 0);
    }
}
