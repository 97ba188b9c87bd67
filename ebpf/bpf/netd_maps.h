/* Map layouts shared by netd's eBPF programs and its Rust loader (ebpf/src/maps.rs
 * mirrors every struct with #[repr(C)]; a test compares sizes and offsets against
 * what the C compiler makes of this file). Every field is explicitly sized and padded
 * so both sides agree without relying on implicit padding. Addresses and ports are in
 * network byte order, as the kernel hands them to the hooks. */
#ifndef NETD_MAPS_H
#define NETD_MAPS_H

#include <linux/types.h>

/* A service address: VIP, port, L4 protocol (IPPROTO_TCP / IPPROTO_UDP). Port 0 with
 * protocol 0 is the whole VIP: any port, to the same port on the backend. */
struct netd_vip_key {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* What a VIP balances to: `count` backends at netd_backend_key{service, 0..count}.
 * Replaced as one value, so a reader never sees a count without its backends. */
struct netd_vip_value {
	__u32 service;
	__u32 count;
};

struct netd_backend_key {
	__u32 service;
	__u32 index;
};

struct netd_backend_value {
	__u32 addr;
	__u32 pad;
};

/* A task namespace (its cookie) is on a network (netd's 32-bit network number): only
 * such a task's connections to that network's VIPs are balanced. */
struct netd_netns_net {
	__u64 cookie;
	__u32 network;
	__u32 pad;
};

/* Reverse translation for unconnected UDP: the socket, and the backend it sent to. */
struct netd_revnat_key {
	__u64 cookie;
	__u32 addr;
	__u16 port;
	__u16 pad;
};

struct netd_revnat_value {
	__u32 vip;
	__u16 port;
	__u16 pad;
};

/* Counters are kept per VIP and backend address, not per slot, so they survive the
 * slot swap of a backend change. */
struct netd_counter_key {
	__u32 vip;
	__u32 backend;
};

/* Per-backend counter (per CPU): connections (TCP connects and new UDP flows). */
struct netd_counter {
	__u64 connections;
};

/* ---- ingress_xdp: the routing mesh's fast path on the node's underlay interface ---- */

/* The node's facts (array, one entry). Addresses in network byte order. */
struct netd_ingress_config {
	__u32 node_ip;    /* underlay address: the VTEP, and where published ports answer */
	__u32 ingress_ip; /* the node's address on the ingress network (its isbox's) */
	__u32 vni;        /* the ingress network's VNI, host byte order */
	__u16 vxlan_port; /* network byte order */
	/* The largest IP packet the overlay carries (--underlay-mtu - 50), host byte order;
	 * 0 (a config an older netd wrote): 1450. */
	__u16 overlay_mtu;
	__u32 flags; /* NETD_MESH_* */
	/* The ingress network's netmask (network byte order; 0: unknown): no client is on
	 * it, so a frame to an address there is no answer to a client. */
	__u32 ingress_mask;
};

/* New flows keep the client's address (netd's --mesh-source client): only the
 * destination is translated, and the program on the task's port (task_port.c) sends the
 * task's answers back here. Without it, new flows are translated to the node's ingress
 * address (--mesh-source snat). */
#define NETD_MESH_CLIENT_SOURCE 1

/* A published port (network byte order) and its L4 protocol. */
struct netd_port_key {
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* Where a published port goes: `count` backends at netd_backend_key{slot, 0..count}
 * (values struct netd_mesh_backend), on `target_port` (network byte order). Replaced
 * as one value, like a VIP's. */
struct netd_port_value {
	__u32 slot;
	__u32 count;
	__u16 target_port;
	__u16 pad;
};

/* A task behind a published port: its address on the ingress network and the VTEP of
 * its node. */
struct netd_mesh_backend {
	__u32 addr;
	__u32 vtep;
};

/* The forward key of a flow: {client, client port, published port, protocol}. The same
 * layouts serve both flow tables: established (netd_flows_fwd, netd_flows_rev) and
 * unconfirmed (netd_flows_fwd_new, netd_flows_rev_new), see ingress_xdp.c. */
struct netd_flow_key {
	__u32 addr;
	__u16 port_a;
	__u16 port_b;
	__u8 proto;
	__u8 pad[3];
};

/* The reverse key of a flow: the task's answer as it arrives, inner source and
 * destination. src:sport is the task and its target port; dst:dport the client's side as
 * the task saw it: the node's ingress address and a translation port (snat), or the
 * client's address and its port, or one from the translation range when two flows would
 * otherwise look alike to the task (client source). */
struct netd_flow_tuple {
	__u32 src;
	__u32 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

#define NETD_FLOW_KERNEL 1 /* the flow belongs to the kernel path: pass it */
/* Bits 8-31 of a flow's flags: when a packet of it was last seen (either way), in units
 * of 2^30 ns (about 1.07 s), modulo 2^24: UDP flows idle longer than the program's
 * udp_idle_units are forgotten. Kept in the flags so that the value's layout (pinned by
 * older netds) stays as it was; a flow an older netd made reads as seen long ago. */
#define NETD_FLOW_SEEN_SHIFT 8
#define NETD_FLOW_SEEN_MASK 0xffffff
/* Unconfirmed, and the task answered through XDP from the flow's VTEP: for TCP its
 * SYN-ACK (whose sequence number is then in netd_flow_fwd_new.isn), for UDP any
 * datagram. */
#define NETD_FLOW_ANSWERED 2
/* The flow keeps the client's address (NETD_MESH_CLIENT_SOURCE when it was opened):
 * snat_port is the port the task sees the client on. */
#define NETD_FLOW_CLIENT 4
/* Established, and a FIN of it passed (either way): netd's sweep removes the flow once
 * it has been quiet for longer than a closing connection's timers run. */
#define NETD_FLOW_FIN 8
/* Unconfirmed, and the client's ACK of the task's SYN-ACK came while the established
 * table was full: its later packets retry the move without checking the ACK again. */
#define NETD_FLOW_ACKED 16

/* The value of netd_flows_fwd. Its layout must not change: an older netd may have
 * pinned the map (aya reuses a pinned map by name without checking its layout). */
struct netd_flow_fwd {
	__u32 backend;
	__u32 vtep; /* the task's node: a reply must come from it (outer IPv4 source) */
	__u16 snat_port; /* the reverse key's dport */
	__u16 target_port;
	__u32 flags;
};

/* The value of netd_flows_fwd_new: an unconfirmed flow's forward half, the established
 * layout and what confirming it takes. `isn`: the sequence number of the task's SYN-ACK
 * as it lies in the packet (network byte order), set with NETD_FLOW_ANSWERED; a TCP flow
 * is confirmed only by a client ACK whose ack_seq is isn + 1. 0 and unused for UDP. The
 * loader (ebpf/src/lib.rs) re-creates a pin of this map that has an older value size. */
struct netd_flow_fwd_new {
	struct netd_flow_fwd fwd;
	__u32 isn;
};

/* layout_probe.c does not list netd_flow_fwd_new yet: its layout is pinned down here
 * and by the same numbers in maps.rs's test. */
_Static_assert(sizeof(struct netd_flow_fwd_new) == 20, "netd_flow_fwd_new: 20 bytes");
_Static_assert(__builtin_offsetof(struct netd_flow_fwd_new, isn) == 16,
	       "netd_flow_fwd_new: isn at 16");

/* The value of netd_flows_rev and netd_flows_rev_new (a fixed layout, as
 * netd_flow_fwd's). */
struct netd_flow_rev {
	__u32 client;
	__u16 client_port;
	__u16 published_port;
};

/* Packet counters of the fast path (per CPU), by what happened. */
struct netd_xdp_stats {
	__u64 forwarded;
	__u64 returned;
	__u64 passed;
	__u64 dropped;
};

/* Flow counters of the fast path: netd_xdp_flow_stats is a per-CPU array of __u64
 * indexed by these (an array, not a struct, so that a counter can be added without
 * changing its value layout; a pin with fewer entries than NETD_FLOWS_COUNTERS, an older
 * netd's, is re-created by the loader). */
#define NETD_FLOWS_OPENED 0     /* new flows, entered into the unconfirmed tables */
#define NETD_FLOWS_CONFIRMED 1  /* flows promoted into the established tables */
#define NETD_FLOWS_REFUSED 2    /* new flows without a free translation port: kernel path */
#define NETD_FLOWS_LOST 3       /* flows found without their reverse half: forgotten */
#define NETD_FLOWS_WRONG_VTEP 4 /* answers from an outer source not the flow's VTEP: dropped */
#define NETD_FLOWS_BAD_ACK 5    /* client ACKs of an answered TCP flow not acking its SYN-ACK */
#define NETD_FLOWS_EXPIRED 6    /* UDP flows forgotten after udp_idle_units without a packet */
#define NETD_FLOWS_TOO_BIG 7    /* client packets too big for the overlay (DF: ICMP sent back) */
#define NETD_FLOWS_ICMP_RELAYED 8 /* ICMP errors about a flow's packets to the client: to the task */
#define NETD_FLOWS_NO_ROUTE 9   /* packets dropped: no route or neighbour for the next hop yet */
#define NETD_FLOWS_COUNTERS 10

/* ---- task_port: the routing mesh's way back, on a published task's port ---- */

/* The ingress network (array, one entry; network byte order): a frame to the task from
 * an address on it (a node's ingress address under SNAT) is no client's. mask 0: not
 * configured yet, every frame passes untouched. */
struct netd_return_config {
	__u32 net;
	__u32 mask;
};

/* netd_return_flows is keyed by struct netd_flow_tuple as the task's answer carries it:
 * src:sport the task and its port, dst:dport the client and the port the task sees. */

/* Where a flow's answers go: the MAC of the ingress sandbox that brought the flow (its
 * inner source MAC, a node's mac_for(ingress address)), and the client's own port when
 * the task sees another one (a clash, below). `seen`: bpf_ktime_get_ns() of the flow's
 * last packet either way, for netd's sweep. */
struct netd_return_flow {
	__u8 mac[6];
	__u16 port;
	__u32 flags; /* NETD_RETURN_* */
	__u32 pad;
	__u64 seen;
};

#define NETD_RETURN_CLOSING 1 /* a TCP FIN or RST went by: forgotten soon after */

/* A flow whose client port the task sees as another one (netd_return_ports), by what
 * arrives: two nodes brought one client address and port to one task and port. */
struct netd_return_origin {
	__u32 client;
	__u32 task;
	__u16 client_port;
	__u16 task_port;
	__u8 mac[6];
	__u8 proto;
	__u8 pad;
};

/* The later fragments of a task's fragmented answer (netd_return_frags), by the IP
 * header fields that tie them to the first one, which carried the ports. */
struct netd_return_frag_key {
	__u32 src;
	__u32 dst;
	__u16 id;
	__u8 proto;
	__u8 pad;
};

/* Counters of the way back (per-CPU array of __u64, indexed by these). */
#define NETD_RETURN_RECORDED 0 /* flows remembered (their first packet to the task) */
#define NETD_RETURN_REMAPPED 1 /* of them, flows given another client port (a clash) */
#define NETD_RETURN_RETURNED 2 /* answers sent to the node that brought their flow */
#define NETD_RETURN_NO_PORT 3  /* new flows dropped: no free port for a clash */
/* TCP packets, not a SYN, of a flow the port does not know whose key another flow
 * holds: dropped (the task has no such connection; it would only answer with a reset) */
#define NETD_RETURN_STRAY 4
#define NETD_RETURN_COUNTERS 5

#endif
