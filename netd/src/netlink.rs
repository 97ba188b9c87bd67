//! Small, idempotent rtnetlink operations: each "ensure" reads the kernel first and changes
//! only what differs, so applying the same desired state twice touches nothing. Every
//! function works on a handle already bound to the right namespace (see `netns`).

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::model::format_mac;
use crate::writes::{self, Kind};
use anyhow::{Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::rule::{RuleAction, RuleMessage, RulePortRange};
use netlink_packet_route::AddressFamily;
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

/// What netd needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
    pub controller: Option<u32>,
    pub mtu: u32,
    pub up: bool,
    pub mac: Vec<u8>,
    pub alias: Option<String>,
    /// Bridge port flag: an isolated port cannot forward to another isolated port.
    pub isolated: bool,
    /// The link resolves no neighbours (`IFF_NOARP`): every frame goes to its own
    /// address.
    pub noarp: bool,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            controller: None,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            noarp: msg.header.flags.contains(LinkFlags::Noarp),
            mac: vec![],
            alias: None,
            isolated: false,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Controller(c) => link.controller = Some(c),
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::Address(a) => link.mac = a,
                LinkAttribute::IfAlias(a) => link.alias = Some(a),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(kind_name(&k)),
                            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                                link.isolated = port
                                    .iter()
                                    .any(|p| matches!(p, InfoBridgePort::Isolated(true)));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub async fn links(handle: &Handle) -> Result<Vec<Link>> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("list links")?;
    Ok(msgs.into_iter().map(Link::from_message).collect())
}

/// One link by name, asked of the kernel directly (no dump of every link).
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>> {
    let mut found = handle.link().get().match_name(name.to_string()).execute();
    match found.try_next().await {
        Ok(msg) => Ok(msg.map(Link::from_message)),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.map(|c| c.get()) == Some(-libc::ENODEV) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("look up link {name}")),
    }
}

pub async fn require_link(handle: &Handle, name: &str) -> Result<Link> {
    link_by_name(handle, name)
        .await?
        .with_context(|| format!("link {name} vanished"))
}

pub async fn delete_link(handle: &Handle, index: u32) -> Result<()> {
    wrote();
    handle
        .link()
        .del(index)
        .execute()
        .await
        .with_context(|| format!("delete link #{index}"))
}

async fn set(handle: &Handle, msg: LinkMessage, what: &str) -> Result<()> {
    wrote();
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .with_context(|| what.to_string())
}

pub async fn set_up(handle: &Handle, link: &Link) -> Result<()> {
    if !link.up {
        set(
            handle,
            LinkUnspec::new_with_index(link.index).up().build(),
            &format!("set {} up", link.name),
        )
        .await?;
    }
    Ok(())
}

pub async fn set_mtu(handle: &Handle, link: &Link, mtu: u32) -> Result<()> {
    if link.mtu != mtu {
        set(
            handle,
            LinkUnspec::new_with_index(link.index).mtu(mtu).build(),
            &format!("set mtu {mtu} on {}", link.name),
        )
        .await?;
    }
    Ok(())
}

/// Turns neighbour resolution off on `link`: a TAP device whose reader is netd
/// itself has no neighbours to ask, and the kernel addresses every frame to the
/// device's own MAC.
pub async fn set_noarp(handle: &Handle, link: &Link) -> Result<()> {
    if !link.noarp {
        set(
            handle,
            LinkUnspec::new_with_index(link.index).arp(false).build(),
            &format!("set {} noarp", link.name),
        )
        .await?;
    }
    Ok(())
}

/// Enslaves `link` to `controller`; returns whether it had to (the link's cached port
/// attributes are then stale).
pub async fn set_controller(handle: &Handle, link: &Link, controller: u32) -> Result<bool> {
    if link.controller == Some(controller) {
        return Ok(false);
    }
    set(
        handle,
        LinkUnspec::new_with_index(link.index)
            .controller(controller)
            .build(),
        &format!("enslave {} to #{controller}", link.name),
    )
    .await?;
    Ok(true)
}

/// Sets a bridge port's isolation (Docker's icc=false for the gwbridge, done by the
/// bridge itself: isolated ports only talk to the bridge and non-isolated ports).
pub async fn set_isolated(handle: &Handle, link: &Link, isolated: bool) -> Result<()> {
    if link.isolated != isolated {
        wrote();
        handle
            .link()
            .set_port(LinkBridgePort::new(link.index).isolated(isolated).build())
            .execute()
            .await
            .with_context(|| format!("set isolated={isolated} on {}", link.name))?;
    }
    Ok(())
}

/// Moves a link into the namespace open at `ns`; it keeps its name and loses its addresses.
pub async fn move_to_netns(handle: &Handle, link: &Link, ns: BorrowedFd<'_>) -> Result<()> {
    set(
        handle,
        LinkUnspec::new_with_index(link.index)
            .setns_by_fd(ns.as_raw_fd())
            .build(),
        &format!("move {} to another netns", link.name),
    )
    .await
}

/// Renames a link and sets its MAC, MTU and alias in one go; the link must be down.
pub async fn configure_down(
    handle: &Handle,
    link: &Link,
    name: &str,
    mac: [u8; 6],
    mtu: u32,
    alias: &str,
) -> Result<()> {
    set(
        handle,
        LinkUnspec::new_with_index(link.index)
            .down()
            .name(name)
            .address(mac.to_vec())
            .mtu(mtu)
            .alias(alias)
            .build(),
        &format!("configure {} as {name}", link.name),
    )
    .await
}

/// A bridge with `name`, the given MTU and MAC, up; created if absent.
pub async fn ensure_bridge(handle: &Handle, name: &str, mtu: u32) -> Result<Link> {
    let link = match link_by_name(handle, name).await? {
        Some(l) => l,
        None => {
            wrote();
            handle
                .link()
                .add(LinkBridge::new(name).mtu(mtu).build())
                .execute()
                .await
                .with_context(|| format!("create bridge {name}"))?;
            require_link(handle, name).await?
        }
    };
    set_mtu(handle, &link, mtu).await?;
    set_up(handle, &link).await?;
    Ok(link)
}

/// A veth pair made with each end directly in its namespace (`None`: the handle's own),
/// as `ip link add A netns X type veth peer B netns Y` does. Moving an existing device
/// between namespaces waits for the network stack to quiesce (an RCU grace period),
/// which made the two moves per endpoint most of an attach's cost.
pub async fn create_veth_in(
    handle: &Handle,
    name: &str,
    name_ns: Option<BorrowedFd<'_>>,
    peer: &str,
    peer_ns: Option<BorrowedFd<'_>>,
) -> Result<()> {
    let mut peer_msg = LinkMessage::default();
    peer_msg
        .attributes
        .push(LinkAttribute::IfName(peer.to_string()));
    if let Some(fd) = peer_ns {
        peer_msg
            .attributes
            .push(LinkAttribute::NetNsFd(fd.as_raw_fd()));
    }
    let mut builder = LinkVeth::new(name, peer);
    if let Some(fd) = name_ns {
        builder = builder.setns_by_fd(fd.as_raw_fd());
    }
    let mut msg = builder.build();
    for attr in msg.attributes.iter_mut() {
        if let LinkAttribute::LinkInfo(infos) = attr {
            for info in infos.iter_mut() {
                if let LinkInfo::Data(InfoData::Veth(v)) = info {
                    *v = InfoVeth::Peer(peer_msg.clone());
                }
            }
        }
    }
    wrote();
    handle
        .link()
        .add(msg)
        .execute()
        .await
        .with_context(|| format!("create veth {name}/{peer}"))
}

/// A VXLAN device as Docker's overlay driver makes it: fixed VNI and UDP port, no
/// learning (remote endpoints are programmed from cluster state), ARP proxy on.
pub async fn create_vxlan(
    handle: &Handle,
    name: &str,
    vni: u32,
    port: u16,
    local: Option<Ipv4Addr>,
    mtu: u32,
) -> Result<()> {
    wrote();
    let mut vxlan = LinkVxlan::new(name, vni)
        .port(port)
        .learning(false)
        .proxy(true)
        .l2miss(true)
        .l3miss(true);
    if let Some(local) = local {
        vxlan = vxlan.local(local);
    }
    handle
        .link()
        .add(vxlan.mtu(mtu).build())
        .execute()
        .await
        .with_context(|| format!("create vxlan {name} (VNI {vni}, port {port})"))
}

pub async fn ipv4_addresses(handle: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
    let msgs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .context("list addresses")?;
    let mut out = vec![];
    for m in msgs {
        // The kernel may answer for other links despite the filter on older versions.
        if m.header.index != index {
            continue;
        }
        for a in m.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                out.push((ip, m.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// Makes `ip/prefix` present on the link (other addresses are left alone).
pub async fn ensure_address(handle: &Handle, link: &Link, ip: Ipv4Addr, prefix: u8) -> Result<()> {
    if ipv4_addresses(handle, link.index)
        .await?
        .contains(&(ip, prefix))
    {
        return Ok(());
    }
    wrote();
    handle
        .address()
        .add(link.index, IpAddr::V4(ip), prefix)
        .execute()
        .await
        .with_context(|| format!("add {ip}/{prefix} to {}", link.name))
}

/// An IPv4 route of the main table, as netd reads them.
struct MainRoute {
    dst: Option<Ipv4Addr>,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
}

/// The destinations of the main table's routes that are not the default route, each
/// with the name of its output link (what a new network's subnet must not overlap).
pub async fn routed_prefixes(handle: &Handle) -> Result<Vec<(ipnetwork::Ipv4Network, String)>> {
    let names: std::collections::HashMap<u32, String> = links(handle)
        .await?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    Ok(main_routes(handle)
        .await?
        .into_iter()
        .filter(|r| r.prefix > 0)
        .filter_map(|r| {
            let net = ipnetwork::Ipv4Network::new(r.dst?, r.prefix).ok()?;
            let dev = r
                .oif
                .and_then(|i| names.get(&i).cloned())
                .unwrap_or_default();
            Some((net, dev))
        })
        .collect())
}

/// Every IPv4 route of the namespace, of every table.
async fn route_dump(handle: &Handle) -> Result<Vec<RouteMessage>> {
    handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .context("list routes")
}

async fn main_routes(handle: &Handle) -> Result<Vec<MainRoute>> {
    Ok(route_dump(handle)
        .await?
        .into_iter()
        .filter(|r| r.header.table == 254)
        .map(|r| {
            let mut route = MainRoute {
                dst: None,
                prefix: r.header.destination_prefix_length,
                gateway: None,
                oif: None,
            };
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    _ => {}
                }
            }
            route
        })
        .collect())
}

/// The gateway of the IPv4 default route in the main table, with its output interface.
pub async fn default_route(handle: &Handle) -> Result<Option<(Ipv4Addr, Option<u32>)>> {
    Ok(main_routes(handle)
        .await?
        .into_iter()
        .filter(|r| r.prefix == 0)
        .find_map(|r| Some((r.gateway?, r.oif))))
}

/// Sets the default route via `gateway` on `link`, unless it is already so.
pub async fn ensure_default_route(handle: &Handle, link: &Link, gateway: Ipv4Addr) -> Result<()> {
    if default_route(handle).await? == Some((gateway, Some(link.index))) {
        return Ok(());
    }
    wrote();
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .output_interface(link.index)
                .build(),
        )
        .replace()
        .execute()
        .await
        .with_context(|| format!("default route via {gateway} dev {}", link.name))
}

/// The /32 routes of the main table that leave through link `index`.
pub async fn host_routes_via(handle: &Handle, index: u32) -> Result<Vec<Ipv4Addr>> {
    Ok(main_routes(handle)
        .await?
        .into_iter()
        .filter(|r| r.prefix == 32 && r.oif == Some(index))
        .filter_map(|r| r.dst)
        .collect())
}

/// Exactly `dsts` as /32 routes through `link`: missing ones added, others removed.
pub async fn ensure_host_routes(handle: &Handle, link: &Link, dsts: &[Ipv4Addr]) -> Result<()> {
    let present = host_routes_via(handle, link.index).await?;
    for d in dsts.iter().filter(|d| !present.contains(d)) {
        wrote();
        handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(*d, 32)
                    .output_interface(link.index)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .with_context(|| format!("route {d}/32 dev {}", link.name))?;
    }
    for d in present.iter().filter(|d| !dsts.contains(d)) {
        wrote();
        handle
            .route()
            .del(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(*d, 32)
                    .output_interface(link.index)
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("remove route {d}/32 dev {}", link.name))?;
    }
    Ok(())
}

/// Sets the MAC of a link (a bridge keeps an address set this way).
pub async fn ensure_mac(handle: &Handle, link: &Link, mac: [u8; 6]) -> Result<()> {
    if link.mac == mac {
        return Ok(());
    }
    set(
        handle,
        LinkUnspec::new_with_index(link.index)
            .address(mac.to_vec())
            .build(),
        &format!("set MAC of {}", link.name),
    )
    .await
}

/// A remote task as the overlay's VXLAN device must know it: its address, its MAC, and
/// the underlay address of the node (VTEP) it lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub vtep: Ipv4Addr,
}

/// The static entries on a VXLAN device: FDB `MAC -> VTEP` (flag `self`, as `bridge fdb
/// add ... self permanent` makes) and permanent neighbours `IP -> MAC` (the device answers
/// ARP for them itself, with its `proxy` flag).
#[derive(Debug, Default)]
struct VxlanEntries {
    fdb: Vec<(NeighbourMessage, [u8; 6], Ipv4Addr)>,
    neigh: Vec<(NeighbourMessage, Ipv4Addr, Vec<u8>)>,
}

async fn vxlan_entries(handle: &Handle, index: u32) -> Result<VxlanEntries> {
    let mut out = VxlanEntries::default();
    for family in [AddressFamily::Bridge, AddressFamily::Inet] {
        let msgs: Vec<NeighbourMessage> = handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .context("dump neighbours")?;
        for msg in msgs {
            if msg.header.ifindex != index || msg.header.state != NeighbourState::Permanent {
                continue;
            }
            let mut lladdr = None;
            let mut dst = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::LinkLayerAddress(a) => lladdr = Some(a.clone()),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
                    // In an AF_BRIDGE (FDB) message the parser cannot tell the VTEP's
                    // family from the header, so it comes as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    _ => {}
                }
            }
            let (Some(lladdr), Some(dst)) = (lladdr, dst) else {
                continue;
            };
            if family == AddressFamily::Bridge {
                if let Ok(mac) = <[u8; 6]>::try_from(lladdr.as_slice()) {
                    if msg.header.flags.contains(NeighbourFlags::Own) {
                        out.fdb.push((msg, mac, dst));
                    }
                }
            } else {
                out.neigh.push((msg, dst, lladdr));
            }
        }
    }
    Ok(out)
}

/// The next hop towards `dst` (the gateway of its route, or `dst` itself on a link)
/// and the interface it is on: the kernel's own route lookup.
pub async fn next_hop(handle: &Handle, dst: Ipv4Addr) -> Result<(Ipv4Addr, u32)> {
    let mut found = handle
        .route()
        .get(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, 32)
                .build(),
        )
        .execute();
    let route = found
        .try_next()
        .await
        .with_context(|| format!("route to {dst}"))?
        .with_context(|| format!("no route to {dst}"))?;
    let (mut via, mut oif) = (dst, None);
    for a in &route.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => via = *ip,
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let oif = oif.with_context(|| format!("the route to {dst} names no interface"))?;
    Ok((via, oif))
}

/// Has the kernel resolve neighbour `via` on interface `oif`: `RTM_NEWNEIGH` with
/// `NTF_USE` starts an ARP exchange (or a probe of an entry it has), as the kernel's
/// own output would, without sending anything else. For the XDP fast path, which reads
/// the neighbour table and cannot fill it.
pub async fn resolve_neighbour(handle: &Handle, oif: u32, via: Ipv4Addr) -> Result<()> {
    handle
        .neighbours()
        .add(oif, IpAddr::V4(via))
        .state(NeighbourState::None)
        .flags(NeighbourFlags::Use)
        .replace()
        .execute()
        .await
        .with_context(|| format!("resolve neighbour {via}"))
}

/// Makes the static FDB and neighbour entries of VXLAN device `vxlan` exactly `peers`:
/// adds what is missing, replaces what points elsewhere, deletes the rest. Returns how
/// many entries it changed.
pub async fn ensure_vxlan_peers(handle: &Handle, vxlan: &Link, peers: &[Peer]) -> Result<usize> {
    let have = vxlan_entries(handle, vxlan.index).await?;
    let mut changed = 0;
    for p in peers {
        if !have.fdb.iter().any(|(_, m, d)| *m == p.mac && *d == p.vtep) {
            wrote();
            handle
                .neighbours()
                .add_bridge(vxlan.index, &p.mac)
                .destination(IpAddr::V4(p.vtep))
                .flags(NeighbourFlags::Own)
                .replace()
                .execute()
                .await
                .with_context(|| {
                    format!("fdb {} -> {} on {}", format_mac(&p.mac), p.vtep, vxlan.name)
                })?;
            changed += 1;
        }
        if !have
            .neigh
            .iter()
            .any(|(_, ip, m)| *ip == p.ip && m.as_slice() == p.mac)
        {
            wrote();
            handle
                .neighbours()
                .add(vxlan.index, IpAddr::V4(p.ip))
                .link_layer_address(&p.mac)
                .replace()
                .execute()
                .await
                .with_context(|| format!("neighbour {} on {}", p.ip, vxlan.name))?;
            changed += 1;
        }
    }
    for (msg, mac, _) in have.fdb {
        if !peers.iter().any(|p| p.mac == mac) {
            wrote();
            handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .with_context(|| format!("delete fdb {}", format_mac(&mac)))?;
            changed += 1;
        }
    }
    for (msg, ip, _) in have.neigh {
        if !peers.iter().any(|p| p.ip == ip) {
            wrote();
            handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .with_context(|| format!("delete neighbour {ip}"))?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Counts one rtnetlink request that changes the kernel (see [`crate::writes`]).
fn wrote() {
    writes::count(Kind::Netlink, 1);
}

/// A policy-routing rule of netd's (the routing mesh's way back to the ingress node that
/// took a flow: docs/architecture.md, "Source address"). netd's rules have preferences
/// in a range netd owns, so netd tells its rules from anyone else's by that alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub pref: u32,
    pub selector: RuleSelector,
    /// The table looked up; None: the packet is dropped (blackhole).
    pub table: Option<u32>,
    /// A default route found in the table does not count (`suppress_prefixlength 0`):
    /// the table's more specific routes win, its default falls through.
    pub suppress_default: bool,
}

/// What a [`Rule`] matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleSelector {
    /// Every packet.
    All,
    /// Packets from this address (a /32).
    From(Ipv4Addr),
    /// UDP datagrams from this source port.
    UdpSport(u16),
    /// Packets whose mark, under the mask (the second), is the first.
    Mark(u32, u32),
}

impl Rule {
    /// The rule a kernel message describes, when it is one netd could have written.
    fn from_message(msg: &RuleMessage) -> Option<Rule> {
        use netlink_packet_route::rule::RuleAttribute as A;
        let (mut pref, mut table) = (None, u32::from(msg.header.table));
        let mut suppress_default = false;
        let (mut from, mut mark, mut mask, mut udp, mut sport) = (None, None, None, false, None);
        for a in &msg.attributes {
            match a {
                A::Priority(p) => pref = Some(*p),
                A::Table(t) => table = *t,
                A::Source(IpAddr::V4(ip)) if msg.header.src_len == 32 => from = Some(*ip),
                A::FwMark(m) => mark = Some(*m),
                A::FwMask(m) => mask = Some(*m),
                A::IpProtocol(netlink_packet_route::IpProtocol::Udp) => udp = true,
                A::SourcePortRange(r) if r.start == r.end => sport = Some(r.start),
                A::SuppressPrefixLen(0) => suppress_default = true,
                _ => {}
            }
        }
        let selector = match (from, mark, udp, sport) {
            (None, None, false, None) => RuleSelector::All,
            (Some(ip), None, false, None) => RuleSelector::From(ip),
            (None, Some(m), false, None) => RuleSelector::Mark(m, mask.unwrap_or(u32::MAX)),
            (None, None, true, Some(p)) => RuleSelector::UdpSport(p),
            _ => return None,
        };
        let table = match msg.header.action {
            RuleAction::ToTable => Some(table),
            RuleAction::Blackhole => None,
            _ => return None,
        };
        Some(Rule {
            pref: pref?,
            selector,
            table,
            suppress_default,
        })
    }
}

/// Exactly `wanted` among the IPv4 rules whose preference is in `prefs`: missing ones
/// added first, then others (whoever wrote them) removed, so that no packet meets
/// neither. Returns how many changed.
pub async fn ensure_rules(
    handle: &Handle,
    prefs: std::ops::RangeInclusive<u32>,
    wanted: &[Rule],
) -> Result<usize> {
    use netlink_packet_route::rule::RuleAttribute as A;
    let dump: Vec<RuleMessage> = handle
        .rule()
        .get(rtnetlink::IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .context("list rules")?;
    let mut present = vec![];
    let mut unwanted = vec![];
    for msg in dump {
        let pref = msg.attributes.iter().find_map(|a| match a {
            A::Priority(p) => Some(*p),
            _ => None,
        });
        if !pref.is_some_and(|p| prefs.contains(&p)) {
            continue;
        }
        match Rule::from_message(&msg) {
            Some(r) if wanted.contains(&r) && !present.contains(&r) => present.push(r),
            other => unwanted.push((other, pref, msg)),
        }
    }
    let mut changed = 0;
    for r in wanted.iter().filter(|r| !present.contains(r)) {
        let mut add = handle.rule().add().v4().priority(r.pref);
        add = match r.table {
            Some(t) => add.table_id(t).action(RuleAction::ToTable),
            None => add.action(RuleAction::Blackhole),
        };
        if r.suppress_default {
            add.message_mut().attributes.push(A::SuppressPrefixLen(0));
        }
        add = match r.selector {
            RuleSelector::All => add,
            RuleSelector::From(ip) => add.source_prefix(ip, 32),
            RuleSelector::Mark(m, mask) => {
                add.message_mut().attributes.push(A::FwMask(mask));
                add.fw_mark(m)
            }
            RuleSelector::UdpSport(p) => {
                let attrs = &mut add.message_mut().attributes;
                attrs.push(A::IpProtocol(netlink_packet_route::IpProtocol::Udp));
                attrs.push(A::SourcePortRange(RulePortRange { start: p, end: p }));
                add
            }
        };
        wrote();
        changed += 1;
        add.execute().await.with_context(|| format!("rule {r:?}"))?;
    }
    for (rule, pref, msg) in unwanted {
        wrote();
        changed += 1;
        handle
            .rule()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("remove rule {rule:?} (pref {pref:?})"))?;
    }
    Ok(changed)
}

/// A route of one of netd's own tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRoute {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    /// Reached through this neighbour (taken as on-link), else directly.
    pub gateway: Option<Ipv4Addr>,
    /// The link's index.
    pub oif: u32,
    /// The source address of packets the host itself sends this way.
    pub src: Option<Ipv4Addr>,
}

impl TableRoute {
    fn from_message(msg: &RouteMessage) -> (u32, TableRoute) {
        let mut table = u32::from(msg.header.table);
        let mut r = TableRoute {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: msg.header.destination_prefix_length,
            gateway: None,
            oif: 0,
            src: None,
        };
        for a in &msg.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => r.dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => r.gateway = Some(*ip),
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => r.src = Some(*ip),
                RouteAttribute::Oif(i) => r.oif = *i,
                _ => {}
            }
        }
        (table, r)
    }
}

/// Exactly `wanted` (table, its routes) in every routing table `owned` says is netd's:
/// routes missing added, others removed (a table nothing wants any more is emptied).
/// One dump of the namespace's routes for all of them. Returns how many changed.
pub async fn ensure_tables(
    handle: &Handle,
    owned: impl Fn(u32) -> bool,
    wanted: &[(u32, Vec<TableRoute>)],
) -> Result<usize> {
    use std::collections::{BTreeMap, BTreeSet};
    let dump = route_dump(handle).await?;
    let wanted: BTreeMap<u32, BTreeSet<TableRoute>> = wanted
        .iter()
        .map(|(t, routes)| (*t, routes.iter().copied().collect()))
        .collect();
    let mut present: BTreeSet<(u32, TableRoute)> = BTreeSet::new();
    let mut changed = 0;
    for msg in dump {
        let (table, r) = TableRoute::from_message(&msg);
        if !owned(table) && !wanted.contains_key(&table) {
            continue;
        }
        if wanted.get(&table).is_some_and(|w| w.contains(&r)) && present.insert((table, r)) {
            continue;
        }
        wrote();
        changed += 1;
        handle
            .route()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("remove route {r:?} of table {table}"))?;
    }
    for (table, routes) in &wanted {
        for r in routes.iter().filter(|r| !present.contains(&(*table, **r))) {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(r.dst, r.prefix)
                .output_interface(r.oif)
                .table_id(*table);
            if let Some(gw) = r.gateway {
                b = b.gateway(gw).onlink();
            } else {
                b = b.scope(netlink_packet_route::route::RouteScope::Link);
            }
            if let Some(src) = r.src {
                b = b.pref_source(src);
            }
            wrote();
            changed += 1;
            handle
                .route()
                .add(b.build())
                .replace()
                .execute()
                .await
                .with_context(|| format!("route {r:?} in table {table}"))?;
        }
    }
    Ok(changed)
}

/// The tags (the kernel's hash of a program's code) of the BPF filters at `priority` on
/// interface `index`, on its ingress and egress hooks: whether a port already runs a
/// program (a netd before this one attached it), read without changing anything.
pub async fn bpf_filter_tags(
    handle: &Handle,
    index: u32,
    priority: u16,
) -> Result<[Option<u64>; 2]> {
    use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
    let mut tags = [None, None];
    for (i, egress) in [false, true].into_iter().enumerate() {
        let index = i32::try_from(index).context("interface index")?;
        let request = handle.traffic_filter(index).get();
        let request = if egress {
            request.egress()
        } else {
            request.ingress()
        };
        let filters: Vec<_> = match request.execute().try_collect().await {
            Ok(f) => f,
            // No clsact qdisc on the port yet: no filter either.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EINVAL => vec![],
            Err(e) => return Err(e).context("list the port's filters"),
        };
        for f in filters {
            // tcm_info of a filter: its priority in the upper 16 bits.
            if (f.header.info >> 16) as u16 != priority {
                continue;
            }
            for a in &f.attributes {
                if let TcAttribute::Options(options) = a {
                    for o in options {
                        if let TcOption::Bpf(TcFilterBpfOption::ProgTag(tag)) = o {
                            tags[i] = Some(u64::from_be_bytes(*tag));
                        }
                    }
                }
            }
        }
    }
    Ok(tags)
}
