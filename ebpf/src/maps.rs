//! Rust mirrors of bpf/netd_maps.h, for reading and writing the maps from netd. Same
//! field order, same explicit padding; `layouts_match_the_c_header` holds them to what
//! the C compiler makes of the header. Addresses and ports in network byte order.

/// A service address: VIP, port, protocol (6 TCP, 17 UDP).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// The backends of a VIP: `count` entries of [`BackendKey`] `{service, 0..count}`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VipValue {
    pub service: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service: u32,
    pub index: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendValue {
    pub addr: u32,
    pub pad: u32,
}

/// A task namespace (its cookie) on a network (netd's network number, see
/// `network_number` in netd's eBPF datapath).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsNet {
    pub cookie: u64,
    pub network: u32,
    pub pad: u32,
}

/// A socket (its cookie) and the backend it talks to.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RevNatValue {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
}

/// Counters are per VIP and backend address, so they outlive a backend change.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub vip: u32,
    pub backend: u32,
}

/// Per backend, per CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub connections: u64,
}

/// The node's facts for `ingress_xdp` (one entry).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngressConfig {
    pub node_ip: u32,
    pub ingress_ip: u32,
    /// Host byte order.
    pub vni: u32,
    pub vxlan_port: u16,
    /// The largest IP packet the overlay carries, host byte order (0: 1450).
    pub overlay_mtu: u16,
    /// [`MESH_CLIENT_SOURCE`] or 0.
    pub flags: u32,
    /// The ingress network's netmask, network byte order (0: unknown).
    pub ingress_mask: u32,
}

/// [`IngressConfig::flags`]: new flows keep the client's address (netd's `--mesh-source
/// client`); the program on the task's port (`task_port`) sends their answers back.
pub const MESH_CLIENT_SOURCE: u32 = 1;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// A published port's backends (`count` at [`BackendKey`] `{slot, 0..count}`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortValue {
    pub slot: u32,
    pub count: u32,
    pub target_port: u16,
    pub pad: u16,
}

/// A task behind a published port: its ingress address and its node's VTEP.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshBackend {
    pub addr: u32,
    pub vtep: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr: u32,
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// The reverse key of a flow (`netd_flows_rev`, `netd_flows_rev_new`): the task's answer
/// as it arrives, {task, client side as the task sees it} (network byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// [`FlowFwd::flags`]: the flow belongs to the kernel path (XDP passes it on).
pub const FLOW_KERNEL: u32 = 1;
/// [`FlowFwd::flags`]: an unconfirmed flow whose task answered through XDP from the
/// flow's VTEP (TCP: its SYN-ACK, whose sequence number is in [`FlowFwdNew::isn`]; UDP:
/// any datagram). The client's next packet confirms it (TCP: an ACK of that SYN-ACK).
pub const FLOW_ANSWERED: u32 = 2;
/// [`FlowFwd::flags`]: the flow keeps the client's address ([`MESH_CLIENT_SOURCE`] when
/// it opened); [`FlowFwd::snat_port`] is the port the task sees the client on.
pub const FLOW_CLIENT: u32 = 4;
/// [`FlowFwd::flags`]: an established flow a FIN of which passed (either way): netd's
/// sweep removes it once it has been quiet for a while.
pub const FLOW_FIN: u32 = 8;
/// [`FlowFwd::flags`] of an unconfirmed flow: the client acknowledged the task's SYN-ACK
/// while the established table was full; its later packets retry the move unchecked.
pub const FLOW_ACKED: u32 = 16;
/// [`FlowFwd::flags`] bits 8-31: when the flow last saw a packet, in units of 2^30 ns
/// modulo 2^24 (ebpf/bpf/netd_maps.h, `NETD_FLOW_SEEN_SHIFT`).
pub const FLOW_SEEN_SHIFT: u32 = 8;
/// The range of that stamp.
pub const FLOW_SEEN_MASK: u32 = 0xff_ffff;

/// The value of `netd_flows_fwd` (and the start of `netd_flows_fwd_new`'s). Its layout
/// must not change: an older netd may have pinned the map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowFwd {
    pub backend: u32,
    /// The task's node: the only outer source its answers are taken from.
    pub vtep: u32,
    /// The port the task sees the client on (the translation port, or with
    /// [`FLOW_CLIENT`] the client's own unless two flows would look alike).
    pub snat_port: u16,
    pub target_port: u16,
    pub flags: u32,
}

/// The value of `netd_flows_fwd_new`: an unconfirmed flow's forward half and the
/// sequence number of the task's SYN-ACK as it lies in the packet (network byte order;
/// set with [`FLOW_ANSWERED`], 0 for UDP). A TCP flow is confirmed only by an ACK of
/// ISN + 1.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowFwdNew {
    pub fwd: FlowFwd,
    pub isn: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowRev {
    pub client: u32,
    pub client_port: u16,
    pub published_port: u16,
}

/// What the fast path did with packets (per CPU).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpStats {
    pub forwarded: u64,
    pub returned: u64,
    pub passed: u64,
    pub dropped: u64,
}

/// Indexes of `netd_xdp_flow_stats` (a per-CPU array of u64): new flows (entered into
/// the unconfirmed tables), confirmed flows (moved to the established ones), refused
/// flows (no free translation port: left to the kernel path), lost flows (a flow of
/// either table found without its reverse half, evicted apart: forgotten), answers from
/// an outer source other than the flow's VTEP (dropped), client ACKs of an answered
/// unconfirmed TCP flow that do not acknowledge the task's SYN-ACK (not promoted).
pub const FLOWS_OPENED: u32 = 0;
pub const FLOWS_CONFIRMED: u32 = 1;
pub const FLOWS_REFUSED: u32 = 2;
pub const FLOWS_LOST: u32 = 3;
pub const FLOWS_WRONG_VTEP: u32 = 4;
pub const FLOWS_BAD_ACK: u32 = 5;
/// UDP flows forgotten after going without a packet for the program's idle time.
pub const FLOWS_EXPIRED: u32 = 6;
/// Client packets too big for the overlay: with DF answered by ICMP "fragmentation
/// needed" naming the overlay's MTU, without it dropped.
pub const FLOWS_TOO_BIG: u32 = 7;
/// ICMP errors to the node about a flow's packets to its client (a router's
/// "fragmentation needed"): sent on to the task, as the task's own packet quoted.
pub const FLOWS_ICMP_RELAYED: u32 = 8;
/// Packets dropped because their next hop had no route or no neighbour entry yet.
pub const FLOWS_NO_ROUTE: u32 = 9;
/// The number of flow counters (the entries of `netd_xdp_flow_stats`).
pub const FLOWS_COUNTERS: u32 = 10;

// SAFETY: plain #[repr(C)] integers with explicit padding fields: every bit pattern is a
// valid value and there are no implicit padding bytes.
unsafe impl aya::Pod for VipKey {}
unsafe impl aya::Pod for VipValue {}
unsafe impl aya::Pod for BackendKey {}
unsafe impl aya::Pod for BackendValue {}
unsafe impl aya::Pod for RevNatKey {}
unsafe impl aya::Pod for NetnsNet {}
unsafe impl aya::Pod for RevNatValue {}
unsafe impl aya::Pod for CounterKey {}
unsafe impl aya::Pod for IngressConfig {}
unsafe impl aya::Pod for PortKey {}
unsafe impl aya::Pod for PortValue {}
unsafe impl aya::Pod for MeshBackend {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for FlowTuple {}
unsafe impl aya::Pod for FlowFwd {}
unsafe impl aya::Pod for FlowFwdNew {}
unsafe impl aya::Pod for FlowRev {}
unsafe impl aya::Pod for XdpStats {}
unsafe impl aya::Pod for Counter {}

/// The ingress network, as `task_port` reads it (`netd_return_cfg`, network byte
/// order; mask 0: not configured, nothing is remembered).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReturnConfig {
    pub net: u32,
    pub mask: u32,
}

/// Where a flow's answers go (`netd_return_flows`, keyed by [`FlowTuple`] as the task's
/// answer carries it): the MAC of the ingress sandbox that brought the flow, and the
/// client's own port (network byte order) when the task sees another one.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReturnFlow {
    pub mac: [u8; 6],
    pub port: u16,
    pub flags: u32,
    pub pad: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the flow's last packet.
    pub seen: u64,
}

/// [`ReturnFlow::flags`]: a TCP FIN or RST went by.
pub const RETURN_CLOSING: u32 = 1;

/// A flow the task sees on another client port (`netd_return_ports`), by what arrives.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ReturnOrigin {
    pub client: u32,
    pub task: u32,
    pub client_port: u16,
    pub task_port: u16,
    pub mac: [u8; 6],
    pub proto: u8,
    pub pad: u8,
}

/// Indexes of `netd_return_stats` (a per-CPU array of `u64`).
pub const RETURN_RECORDED: u32 = 0;
pub const RETURN_REMAPPED: u32 = 1;
pub const RETURN_RETURNED: u32 = 2;
pub const RETURN_NO_PORT: u32 = 3;
pub const RETURN_STRAY: u32 = 4;
pub const RETURN_COUNTERS: u32 = 5;

impl ReturnOrigin {
    /// The `netd_return_ports` key of remembered flow `key` -> `flow` whose client port
    /// the task sees as another one (`flow.port != key.dport`), as `task_port` makes it:
    /// by what arrives (the client's own port, the sending sandbox's MAC).
    pub fn of(key: &FlowTuple, flow: &ReturnFlow) -> Self {
        ReturnOrigin {
            client: key.dst,
            task: key.src,
            client_port: flow.port,
            task_port: key.sport,
            mac: flow.mac,
            proto: key.proto,
            pad: 0,
        }
    }
}

unsafe impl aya::Pod for ReturnConfig {}
unsafe impl aya::Pod for ReturnFlow {}
unsafe impl aya::Pod for ReturnOrigin {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// What the C compiler made of the header (names as in C).
    #[allow(non_upper_case_globals)]
    mod c {
        include!(concat!(env!("OUT_DIR"), "/layout.rs"));
    }
    use c::*;

    #[test]
    fn layouts_match_the_c_header() {
        assert_eq!(size_of::<VipKey>(), netd_vip_key_SIZE);
        assert_eq!(offset_of!(VipKey, addr), netd_vip_key_addr);
        assert_eq!(offset_of!(VipKey, port), netd_vip_key_port);
        assert_eq!(offset_of!(VipKey, proto), netd_vip_key_proto);
        assert_eq!(size_of::<VipValue>(), netd_vip_value_SIZE);
        assert_eq!(offset_of!(VipValue, service), netd_vip_value_service);
        assert_eq!(offset_of!(VipValue, count), netd_vip_value_count);
        assert_eq!(size_of::<BackendKey>(), netd_backend_key_SIZE);
        assert_eq!(offset_of!(BackendKey, service), netd_backend_key_service);
        assert_eq!(offset_of!(BackendKey, index), netd_backend_key_index);
        assert_eq!(size_of::<BackendValue>(), netd_backend_value_SIZE);
        assert_eq!(offset_of!(BackendValue, addr), netd_backend_value_addr);
        assert_eq!(size_of::<NetnsNet>(), netd_netns_net_SIZE);
        assert_eq!(offset_of!(NetnsNet, cookie), netd_netns_net_cookie);
        assert_eq!(offset_of!(NetnsNet, network), netd_netns_net_network);
        assert_eq!(size_of::<RevNatKey>(), netd_revnat_key_SIZE);
        assert_eq!(offset_of!(RevNatKey, cookie), netd_revnat_key_cookie);
        assert_eq!(offset_of!(RevNatKey, addr), netd_revnat_key_addr);
        assert_eq!(offset_of!(RevNatKey, port), netd_revnat_key_port);
        assert_eq!(size_of::<RevNatValue>(), netd_revnat_value_SIZE);
        assert_eq!(offset_of!(RevNatValue, vip), netd_revnat_value_vip);
        assert_eq!(offset_of!(RevNatValue, port), netd_revnat_value_port);
        assert_eq!(size_of::<CounterKey>(), netd_counter_key_SIZE);
        assert_eq!(offset_of!(CounterKey, vip), netd_counter_key_vip);
        assert_eq!(offset_of!(CounterKey, backend), netd_counter_key_backend);
        assert_eq!(size_of::<Counter>(), netd_counter_SIZE);
        assert_eq!(offset_of!(Counter, connections), netd_counter_connections);
    }

    #[test]
    fn ingress_layouts_match_the_c_header() {
        assert_eq!(size_of::<IngressConfig>(), netd_ingress_config_SIZE);
        assert_eq!(
            offset_of!(IngressConfig, node_ip),
            netd_ingress_config_node_ip
        );
        assert_eq!(
            offset_of!(IngressConfig, ingress_ip),
            netd_ingress_config_ingress_ip
        );
        assert_eq!(offset_of!(IngressConfig, vni), netd_ingress_config_vni);
        assert_eq!(
            offset_of!(IngressConfig, vxlan_port),
            netd_ingress_config_vxlan_port
        );
        assert_eq!(
            offset_of!(IngressConfig, overlay_mtu),
            netd_ingress_config_overlay_mtu
        );
        assert_eq!(offset_of!(IngressConfig, flags), netd_ingress_config_flags);
        assert_eq!(
            offset_of!(IngressConfig, ingress_mask),
            netd_ingress_config_ingress_mask
        );
        assert_eq!(size_of::<PortKey>(), netd_port_key_SIZE);
        assert_eq!(offset_of!(PortKey, port), netd_port_key_port);
        assert_eq!(offset_of!(PortKey, proto), netd_port_key_proto);
        assert_eq!(size_of::<PortValue>(), netd_port_value_SIZE);
        assert_eq!(offset_of!(PortValue, slot), netd_port_value_slot);
        assert_eq!(offset_of!(PortValue, count), netd_port_value_count);
        assert_eq!(
            offset_of!(PortValue, target_port),
            netd_port_value_target_port
        );
        assert_eq!(size_of::<MeshBackend>(), netd_mesh_backend_SIZE);
        assert_eq!(offset_of!(MeshBackend, addr), netd_mesh_backend_addr);
        assert_eq!(offset_of!(MeshBackend, vtep), netd_mesh_backend_vtep);
        assert_eq!(size_of::<FlowKey>(), netd_flow_key_SIZE);
        assert_eq!(offset_of!(FlowKey, addr), netd_flow_key_addr);
        assert_eq!(offset_of!(FlowKey, port_a), netd_flow_key_port_a);
        assert_eq!(offset_of!(FlowKey, port_b), netd_flow_key_port_b);
        assert_eq!(offset_of!(FlowKey, proto), netd_flow_key_proto);
        assert_eq!(size_of::<FlowTuple>(), netd_flow_tuple_SIZE);
        assert_eq!(offset_of!(FlowTuple, src), netd_flow_tuple_src);
        assert_eq!(offset_of!(FlowTuple, dst), netd_flow_tuple_dst);
        assert_eq!(offset_of!(FlowTuple, sport), netd_flow_tuple_sport);
        assert_eq!(offset_of!(FlowTuple, dport), netd_flow_tuple_dport);
        assert_eq!(offset_of!(FlowTuple, proto), netd_flow_tuple_proto);
        assert_eq!(size_of::<FlowFwd>(), netd_flow_fwd_SIZE);
        assert_eq!(offset_of!(FlowFwd, backend), netd_flow_fwd_backend);
        assert_eq!(offset_of!(FlowFwd, vtep), netd_flow_fwd_vtep);
        assert_eq!(offset_of!(FlowFwd, snat_port), netd_flow_fwd_snat_port);
        assert_eq!(offset_of!(FlowFwd, target_port), netd_flow_fwd_target_port);
        assert_eq!(offset_of!(FlowFwd, flags), netd_flow_fwd_flags);
        // layout_probe.c does not list netd_flow_fwd_new: netd_maps.h holds it to the
        // same numbers with _Static_assert.
        assert_eq!(size_of::<FlowFwdNew>(), 20);
        assert_eq!(offset_of!(FlowFwdNew, fwd), 0);
        assert_eq!(offset_of!(FlowFwdNew, isn), 16);
        assert_eq!(size_of::<FlowRev>(), netd_flow_rev_SIZE);
        assert_eq!(offset_of!(FlowRev, client), netd_flow_rev_client);
        assert_eq!(offset_of!(FlowRev, client_port), netd_flow_rev_client_port);
        assert_eq!(
            offset_of!(FlowRev, published_port),
            netd_flow_rev_published_port
        );
        assert_eq!(size_of::<XdpStats>(), netd_xdp_stats_SIZE);
        assert_eq!(offset_of!(XdpStats, forwarded), netd_xdp_stats_forwarded);
        assert_eq!(offset_of!(XdpStats, returned), netd_xdp_stats_returned);
        assert_eq!(offset_of!(XdpStats, passed), netd_xdp_stats_passed);
        assert_eq!(offset_of!(XdpStats, dropped), netd_xdp_stats_dropped);
        assert_eq!(size_of::<ReturnConfig>(), netd_return_config_SIZE);
        assert_eq!(offset_of!(ReturnConfig, net), netd_return_config_net);
        assert_eq!(offset_of!(ReturnConfig, mask), netd_return_config_mask);
        assert_eq!(size_of::<ReturnFlow>(), netd_return_flow_SIZE);
        assert_eq!(offset_of!(ReturnFlow, mac), netd_return_flow_mac);
        assert_eq!(offset_of!(ReturnFlow, port), netd_return_flow_port);
        assert_eq!(offset_of!(ReturnFlow, flags), netd_return_flow_flags);
        assert_eq!(offset_of!(ReturnFlow, seen), netd_return_flow_seen);
        assert_eq!(size_of::<ReturnOrigin>(), netd_return_origin_SIZE);
        assert_eq!(offset_of!(ReturnOrigin, client), netd_return_origin_client);
        assert_eq!(offset_of!(ReturnOrigin, task), netd_return_origin_task);
        assert_eq!(
            offset_of!(ReturnOrigin, client_port),
            netd_return_origin_client_port
        );
        assert_eq!(
            offset_of!(ReturnOrigin, task_port),
            netd_return_origin_task_port
        );
        assert_eq!(offset_of!(ReturnOrigin, mac), netd_return_origin_mac);
        assert_eq!(offset_of!(ReturnOrigin, proto), netd_return_origin_proto);
    }
}
