// SPDX-License-Identifier: GPL-2.0
/* The routing mesh's way back, on the port of a published task in the ingress network's
 * sandbox (TC, both directions; netd --mesh-source client).
 *
 * A mesh flow reaches the task with the client's own address as its source, in a frame
 * whose source MAC is the ingress sandbox of the node that took it (XDP's inner frame,
 * or isbox(A) routing onto the ingress network: mac_for(A_ing) either way). The task
 * answers the client through its own node's ingress sandbox (its policy route), which
 * knows nothing of the flow. So:
 * - towards the task (netd_to_task, the port's egress): remember the flow, keyed as the
 *   task's answer will carry it, with the sending sandbox's MAC;
 * - from the task (netd_from_task, the port's ingress, before the bridge decides): an
 *   answer of a remembered flow gets that MAC as its destination, so the bridge sends
 *   it over VXLAN to the node that took the flow, which undoes its translation (XDP's
 *   reply(), or isbox(A)'s and node A's conntrack) and the client hears back from the
 *   address it dialled.
 * No conntrack and no other namespace on the way, either direction.
 *
 * Clashes: one client address and port can reach one task and port through two nodes
 * (a client dialling two nodes from one port, two clients behind one NAT). The task
 * would see one flow. The second gets a client port of 32768-65535 on its way in
 * (netd_return_ports, by what arrives, sending sandbox included), and its answers get
 * the client's own port back on their way out: the address is always kept, the port
 * changes only when it must. A closed flow's key (a FIN or RST went by) is free for
 * the next connection, from wherever it comes.
 *
 * Fragments: the first carries the ports and is handled like a whole packet; a task's
 * fragmented answer leaves the flow's MAC for its later fragments (netd_return_frags,
 * by IP id), which get it too.
 *
 * What is not a client's passes untouched: frames from an address on the ingress network
 * (a node's, under SNAT), anything but IPv4 TCP and UDP without IP options.
 * An answer of no remembered flow goes where the task sent it (its node's ingress
 * sandbox: flows its own node took). netd sweeps idle and closed flows, and a task's or
 * a node's flows when it goes (datapath/task_port.rs). */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "netd_maps.h"

/* Offsets in the frame, IPv4 without options (the only packets taken). */
#define L3_OFF sizeof(struct ethhdr)
#define L4_OFF (L3_OFF + sizeof(struct iphdr))
#define SPORT_OFF L4_OFF
#define DPORT_OFF (L4_OFF + 2)
#define TCP_CSUM_OFF (L4_OFF + 16) /* struct tcphdr.check */
#define UDP_CSUM_OFF (L4_OFF + 6)  /* struct udphdr.len, then .check */
#define PORT_FIRST 32768
#define PORT_TRIES 8

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct netd_return_config);
} netd_return_cfg SEC(".maps");

/* A plain hash, not LRU: a flow is never evicted for newer ones, so an idle connection
 * keeps its way back under any load; netd's sweep removes closed and idle flows
 * (netd/src/datapath/task_port.rs). While it is full a new flow is not recorded (its
 * answers cannot go back: that connection fails, no open one does). */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, struct netd_flow_tuple);
	__type(value, struct netd_return_flow);
} netd_return_flows SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct netd_return_origin);
	__type(value, __u32); /* the port the task sees (network byte order) */
} netd_return_ports SEC(".maps");

/* A task's fragmented answer: the flow's MAC for the fragments after the first. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct netd_return_frag_key);
	__type(value, struct netd_return_flow);
} netd_return_frags SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NETD_RETURN_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} netd_return_stats SEC(".maps");

/* What a frame carries that the way back needs (addresses and ports as in the frame). */
struct packet {
	__u8 src_mac[6];
	__u8 proto;
	__u8 tcp_flags; /* byte 13 of the TCP header: CWR ECE URG ACK PSH RST SYN FIN */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__be16 id;   /* the IP id, which ties fragments together */
	__u8 first;  /* the first fragment of a fragmented packet */
	__u8 pad;
};

/* What parse() found. */
enum kind {
	OTHER,    /* not the way back's: passes untouched */
	PORTS,    /* TCP or UDP with its ports: a whole packet or the first fragment */
	FRAGMENT, /* a later fragment: addresses and id only */
};

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&netd_return_stats, &which);

	if (c)
		*c += 1;
}

/* Reads the frame into `p` (see enum kind): IPv4 TCP or UDP without options. */
static __always_inline enum kind parse(struct __sk_buff *skb, struct packet *p)
{
	/* The TCP header up to its flags byte (13), or a UDP header: 14 bytes past L4. */
	__u32 need = L4_OFF + 14;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	__u8 *l4;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return OTHER;
	if (data + need > end) {
		/* Headers not in the linear part (or a short packet: then the pull fails
		 * and the checks below decide). */
		bpf_skb_pull_data(skb, need);
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
	}
	eth = data;
	ip = data + L3_OFF;
	l4 = data + L4_OFF;
	if ((void *)l4 > end)
		return OTHER;
	if (ip->version != 4 || ip->ihl != 5 ||
	    (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP))
		return OTHER;
	__builtin_memcpy(p->src_mac, eth->h_source, ETH_ALEN);
	p->proto = ip->protocol;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->id = ip->id;
	p->tcp_flags = 0;
	/* Fragment offset (low 13 bits) and "more fragments" (0x2000). */
	if (ip->frag_off & bpf_htons(0x1fff))
		return FRAGMENT;
	p->first = (ip->frag_off & bpf_htons(0x2000)) != 0;
	if ((void *)(l4 + sizeof(struct udphdr)) > end)
		return OTHER;
	if (ip->protocol == IPPROTO_TCP) {
		if ((void *)(l4 + 14) > end)
			return OTHER;
		p->tcp_flags = l4[13];
	}
	p->sport = ((__be16 *)l4)[0];
	p->dport = ((__be16 *)l4)[1];
	return PORTS;
}

/* Rewrites the port at `off` (SPORT_OFF or DPORT_OFF) from `from` to `to`, and the L4
 * checksum with it (a UDP checksum of 0, none, stays 0). 0 on success. */
static __always_inline int set_port(struct __sk_buff *skb, struct packet *p, __u32 off,
				    __be16 from, __be16 to)
{
	__u32 csum_off = p->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF;
	__u64 flags = sizeof(__u16);

	if (p->proto == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, csum_off, from, to, flags))
		return -1;
	return bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0);
}

/* A packet of flow `f` went by: when, and whether TCP is closing it (a SYN opens it
 * again: the client reused its port). */
static __always_inline void touch(struct netd_return_flow *f, struct packet *p)
{
	f->seen = bpf_ktime_get_ns();
	if (p->tcp_flags & (TCP_FIN | TCP_RST))
		f->flags |= NETD_RETURN_CLOSING;
	else if ((p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
		f->flags &= ~NETD_RETURN_CLOSING;
}

/* Whether `f` is the flow of packet `p` from the sandbox whose MAC `p` carries, arriving
 * on client port `port`. */
static __always_inline int same_flow(struct netd_return_flow *f, struct packet *p)
{
	return f->port == p->sport && f->mac[0] == p->src_mac[0] && f->mac[1] == p->src_mac[1] &&
	       f->mac[2] == p->src_mac[2] && f->mac[3] == p->src_mac[3] &&
	       f->mac[4] == p->src_mac[4] && f->mac[5] == p->src_mac[5];
}

/* A new flow that would look like flow `k` to the task: remembered under a port of
 * 32768-65535 the task sees no flow of, its packet rewritten to it. Dropped (counted)
 * when no free port is found. */
static __always_inline int remap(struct __sk_buff *skb, struct packet *p, struct netd_flow_tuple *k,
				 struct netd_return_flow *nf)
{
	struct netd_return_origin o = {
		.client = p->saddr,
		.task = p->daddr,
		.client_port = p->sport,
		.task_port = p->dport,
		.proto = p->proto,
	};
	__u32 port;

	__builtin_memcpy(o.mac, p->src_mac, ETH_ALEN);
	for (int i = 0; i < PORT_TRIES; i++) {
		struct netd_return_flow *held;

		k->dport = bpf_htons(PORT_FIRST + (bpf_get_prandom_u32() % PORT_FIRST));
		if (bpf_map_update_elem(&netd_return_flows, k, nf, BPF_NOEXIST)) {
			/* A closed flow's port is free again. */
			held = bpf_map_lookup_elem(&netd_return_flows, k);
			if (!held || !(held->flags & NETD_RETURN_CLOSING) ||
			    bpf_map_update_elem(&netd_return_flows, k, nf, BPF_ANY))
				continue;
		}
		port = k->dport;
		if (bpf_map_update_elem(&netd_return_ports, &o, &port, BPF_ANY)) {
			bpf_map_delete_elem(&netd_return_flows, k);
			break;
		}
		count(NETD_RETURN_RECORDED);
		count(NETD_RETURN_REMAPPED);
		if (set_port(skb, p, SPORT_OFF, p->sport, k->dport))
			return TC_ACT_SHOT;
		return TC_ACT_OK;
	}
	count(NETD_RETURN_NO_PORT);
	return TC_ACT_SHOT;
}

/* A frame on its way to the task. */
SEC("classifier")
int netd_to_task(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct netd_return_config *cfg = bpf_map_lookup_elem(&netd_return_cfg, &zero);
	struct netd_return_flow nf = {};
	struct netd_flow_tuple k = {};
	struct netd_return_origin o = {};
	struct netd_return_flow *f;
	struct packet p;
	__u32 *port;

	/* A client's later fragments need nothing: the first one carried the flow. */
	if (!cfg || !cfg->mask || parse(skb, &p) != PORTS)
		return TC_ACT_OK;
	/* From the ingress network itself: a node's address (SNAT), no client's. */
	if (!((p.saddr ^ cfg->net) & cfg->mask))
		return TC_ACT_OK;
	/* The key of the task's answer: task:port -> client:the port the task sees. */
	k.src = p.daddr;
	k.dst = p.saddr;
	k.sport = p.dport;
	k.dport = p.sport;
	k.proto = p.proto;
	o.client = p.saddr;
	o.task = p.daddr;
	o.client_port = p.sport;
	o.task_port = p.dport;
	o.proto = p.proto;
	__builtin_memcpy(o.mac, p.src_mac, ETH_ALEN);
	port = bpf_map_lookup_elem(&netd_return_ports, &o);
	if (port) {
		/* A flow the task sees on another port, if it is still remembered. */
		k.dport = (__be16)*port;
		f = bpf_map_lookup_elem(&netd_return_flows, &k);
		if (f && same_flow(f, &p)) {
			touch(f, &p);
			return set_port(skb, &p, SPORT_OFF, p.sport, k.dport) ? TC_ACT_SHOT : TC_ACT_OK;
		}
		bpf_map_delete_elem(&netd_return_ports, &o);
		k.dport = p.sport;
	}
	__builtin_memcpy(nf.mac, p.src_mac, ETH_ALEN);
	nf.port = p.sport;
	nf.seen = bpf_ktime_get_ns();
	f = bpf_map_lookup_elem(&netd_return_flows, &k);
	if (!f) {
		if (bpf_map_update_elem(&netd_return_flows, &k, &nf, BPF_NOEXIST) == 0) {
			count(NETD_RETURN_RECORDED);
			return TC_ACT_OK;
		}
		/* Another CPU remembered a flow under this key meanwhile: this one, or a
		 * clash. */
		f = bpf_map_lookup_elem(&netd_return_flows, &k);
		if (!f)
			return TC_ACT_OK;
	}
	if (same_flow(f, &p)) {
		touch(f, &p);
		return TC_ACT_OK;
	}
	/* Another flow holds the key. Only a new connection may have it: the key of a closed
	 * one (a FIN or RST went by) is taken over, as conntrack lets a SYN reopen a closed
	 * entry (a client reusing its port through another node at once, or churning
	 * through its ports, must not be given another port each time); an open one's is a
	 * clash, and the new connection gets a port of its own. Any other TCP packet is of a
	 * flow the task does not have. */
	if (p.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN) {
		count(NETD_RETURN_STRAY);
		return TC_ACT_SHOT;
	}
	if ((f->flags & NETD_RETURN_CLOSING) &&
	    bpf_map_update_elem(&netd_return_flows, &k, &nf, BPF_ANY) == 0) {
		count(NETD_RETURN_RECORDED);
		return TC_ACT_OK;
	}
	return remap(skb, &p, &k, &nf);
}

/* Sends the frame to MAC `mac`: the Ethernet destination is its first bytes. */
static __always_inline int send_to(struct __sk_buff *skb, __u8 *mac)
{
	if (bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	count(NETD_RETURN_RETURNED);
	return TC_ACT_OK;
}

/* A frame from the task: an answer of a remembered flow goes to the sandbox that brought
 * the flow, with the client's own port; a fragmented one's later fragments follow its
 * first. */
SEC("classifier")
int netd_from_task(struct __sk_buff *skb)
{
	struct netd_return_frag_key fk = {};
	struct netd_flow_tuple k = {};
	struct netd_return_flow *f;
	struct netd_return_flow copy;
	struct packet p;
	enum kind kind = parse(skb, &p);

	if (kind == OTHER)
		return TC_ACT_OK;
	fk.src = p.saddr;
	fk.dst = p.daddr;
	fk.id = p.id;
	fk.proto = p.proto;
	if (kind == FRAGMENT) {
		f = bpf_map_lookup_elem(&netd_return_frags, &fk);
		if (!f)
			return TC_ACT_OK;
		copy = *f;
		return send_to(skb, copy.mac);
	}
	k.src = p.saddr;
	k.dst = p.daddr;
	k.sport = p.sport;
	k.dport = p.dport;
	k.proto = p.proto;
	f = bpf_map_lookup_elem(&netd_return_flows, &k);
	if (!f)
		return TC_ACT_OK;
	touch(f, &p);
	copy = *f;
	if (p.first)
		bpf_map_update_elem(&netd_return_frags, &fk, &copy, BPF_ANY);
	if (copy.port != p.dport && set_port(skb, &p, DPORT_OFF, p.dport, copy.port))
		return TC_ACT_SHOT;
	return send_to(skb, copy.mac);
}

char LICENSE[] SEC("license") = "GPL";
