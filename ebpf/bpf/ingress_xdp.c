// SPDX-License-Identifier: GPL-2.0
/* The routing mesh's fast path, on the node's underlay interface (Katran's shape).
 *
 * A packet to NODE_IP:PUBLISHED (TCP or UDP) of a published port: pick a backend task
 * round-robin, translate the packet as the kernel path would, wrap it in VXLAN towards
 * the task's node (ingress VNI) and send it straight back out. The task's answer comes
 * back in VXLAN to this node's VTEP: unwrap it, restore NODE_IP:PUBLISHED -> client,
 * send it out. The kernel stack never sees either direction.
 *
 * The translation, by the config's NETD_MESH_CLIENT_SOURCE (decided per flow, when it
 * opens, and kept in its flags):
 * - client source (the default): the destination becomes the task's ingress address and
 *   the target port; the source stays the client's (its port too, unless the task
 *   already sees a flow of this node from that client address and port: then one from
 *   the translation range). The inner frame goes to the task, from this node's ingress
 *   MAC: the program on the task's port (task_port.c) remembers that MAC per flow and
 *   sends the task's answers back to it, in VXLAN, with the client as their inner
 *   destination;
 * - snat: the source becomes the node's ingress address and a port of the translation
 *   range, and the frame goes to the task itself, which answers that address.
 * Either way the task's answer is found by its inner 4-tuple (netd_flow_tuple).
 *
 * Flow state, in two tables of two LRU maps each (forward: client 4-tuple -> task and
 * translation port; reverse: task side -> client), as conntrack's "assured" flag works:
 * a new flow enters the unconfirmed table (netd_flows_fwd_new, netd_flows_rev_new) and
 * moves to the established one (netd_flows_fwd, netd_flows_rev) once it is confirmed:
 * the task answered through here and the client then sent again. TCP: the task's
 * SYN-ACK came back (its sequence number is kept on the unconfirmed entry) and the
 * client sent an ACK without SYN or RST whose ack_seq is that number + 1, which a client
 * that spoofs its source address never sees. UDP has no sequence numbers, so its rule
 * is weaker: any datagram, after the task answered, from the same client 4-tuple. So a
 * flood of new flows that are never answered, or TCP flows whose handshake is not
 * completed by the address they came from (spoofed SYNs, with blind ACKs or without),
 * churns only the unconfirmed table and never evicts an established flow; UDP flows
 * from spoofed sources the task answers to, each sent twice, are confirmed and can.
 * A UDP flow to a task on this node (the kernel path's: XDP never sees its answers) is
 * confirmed by the client's second datagram; a TCP one needs no entry at all (a TCP
 * packet of no flow XDP knows goes to the kernel anyway). A SYN always makes a new pick,
 * and a client's RST forgets the flow, so a client that reuses its port never lands on a
 * stale entry. The two maps of a table evict apart, so each client packet checks that
 * its flow's reverse half is still there and leads back to it (in either table), and a
 * flow without it is forgotten (counted lost): no two of XDP's flows ever look alike to
 * a task (one reverse tuple, one flow). An answer whose forward half is gone goes to the
 * kernel path.
 *
 * A task's answer is taken only from the VTEP of the task's node (the outer IPv4 source
 * the flow's forward half holds): this program runs before nftables, whose rule that
 * drops VXLAN from non-members never sees what XDP takes, so without the check any host
 * could inject answers into a client's flow by guessing a translation port.
 *
 * Before a packet is translated it is checked as the receiving kernel would check it:
 * IPv4, header checksum, total length within the frame, a TCP data offset or UDP length
 * within the packet, and for a task's answer the VXLAN header and the outer lengths. A
 * malformed packet goes to the kernel path, which drops and counts it.
 *
 * Left to the kernel path (XDP_PASS): flows to a task on this node (its answer reaches
 * the ingress sandbox over the bridge, not through here), packets of flows this program
 * did not start, IP options, fragments. Ports: translating to the node's address, XDP
 * uses 32768-65535 and the kernel path's ingress sandbox masquerades to 1024-32767, so
 * the two never share one. Keeping the client's address, both keep the client's port:
 * one client port to two published ports of this node that lead to one task and target
 * port, one flow on each path, look alike to the task's node (its sandbox merges them;
 * documented, not handled). */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "netd_maps.h"

#define AF_INET 2
#define VXLAN_FLAG_VNI 0x08000000
/* Outer Ethernet + IPv4 + UDP + VXLAN headers: what encapsulation adds. */
#define ENCAP_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) + 8)
/* The overlay's MTU when the config does not say (an underlay of 1500). */
#define DEFAULT_OVERLAY_MTU 1450
/* IPv4 and TCP headers without options: an MSS is the MTU less these. */
#define TCPIP_HEADERS 40
#define SNAT_FIRST 32768
#define SNAT_TRIES 8

/* How long a UDP flow may go without a packet, in NETD_FLOW_SEEN units (2^30 ns): about
 * 120 s, the kernel path's conntrack timeout for an answered UDP flow. The loader may
 * set it otherwise (netd-ebpf's IngressOptions; its UDP_IDLE_UNITS names this default). */
volatile const __u32 udp_idle_units = 112;

struct vxlanhdr {
	__be32 flags;
	__be32 vni;
};

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct netd_ingress_config);
} netd_ingress_cfg SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct netd_port_key);
	__type(value, struct netd_port_value);
} netd_ports SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct netd_backend_key);
	__type(value, struct netd_mesh_backend);
} netd_mesh_backends SEC(".maps");

/* Next round-robin position per port slot. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} netd_mesh_rr SEC(".maps");

/* The established (confirmed) flows. The loader may size the four flow maps otherwise
 * (netd-ebpf's load_ingress_xdp_sized, for tests that overflow them). Plain hashes, not
 * LRU: an established flow is never evicted for newer ones, so an idle connection
 * survives any load (an LRU map dropped the least recently used entry, which an idle
 * connection is, once closed connections had filled it). netd's sweep removes closed
 * and idle flows (netd/src/datapath/xdp.rs); while the tables are full, new flows stay
 * in the unconfirmed ones, which forward them as well. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, struct netd_flow_key);
	__type(value, struct netd_flow_fwd);
} netd_flows_fwd SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, struct netd_flow_tuple);
	__type(value, struct netd_flow_rev);
} netd_flows_rev SEC(".maps");

/* The unconfirmed flows: what a flood of new flows churns. The forward half's value
 * begins with the established one's (struct netd_flow_fwd) and adds the SYN-ACK's
 * sequence number. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct netd_flow_key);
	__type(value, struct netd_flow_fwd_new);
} netd_flows_fwd_new SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct netd_flow_tuple);
	__type(value, struct netd_flow_rev);
} netd_flows_rev_new SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct netd_xdp_stats);
} netd_xdp_stats SEC(".maps");

/* Flow counters, indexed by NETD_FLOWS_*. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NETD_FLOWS_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} netd_xdp_flow_stats SEC(".maps");

enum outcome { FORWARDED, RETURNED, PASSED, DROPPED };

static __always_inline int count(enum outcome o, int verdict)
{
	__u32 zero = 0;
	struct netd_xdp_stats *s = bpf_map_lookup_elem(&netd_xdp_stats, &zero);

	if (s) {
		if (o == FORWARDED)
			s->forwarded++;
		else if (o == RETURNED)
			s->returned++;
		else if (o == PASSED)
			s->passed++;
		else
			s->dropped++;
	}
	return verdict;
}

/* Counts a flow event (NETD_FLOWS_*). */
static __always_inline void flow_event(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&netd_xdp_flow_stats, &which);

	if (n)
		(*n)++;
}

/* Now, as a flow's last-seen stamp (see NETD_FLOW_SEEN_SHIFT). */
static __always_inline __u32 seen_now(void)
{
	return (__u32)(bpf_ktime_get_ns() >> 30) & NETD_FLOW_SEEN_MASK;
}

/* `flags` with its last-seen stamp set to `now`. */
static __always_inline __u32 seen_at(__u32 flags, __u32 now)
{
	return (flags & ((1 << NETD_FLOW_SEEN_SHIFT) - 1)) | (now << NETD_FLOW_SEEN_SHIFT);
}

/* Whether a UDP flow with `flags` has gone without a packet for longer than allowed
 * (modulo the stamp's range, so a wrap of the clock's units is no expiry). A stamp ahead
 * of `now` (another CPU's packet, stamped after this one read the clock) is fresh: read
 * as most of the range, it would make the flow look idle and pick again. */
static __always_inline int idle_udp(__u8 proto, __u32 flags, __u32 now)
{
	__u32 seen = flags >> NETD_FLOW_SEEN_SHIFT;
	__u32 quiet = (now - seen) & NETD_FLOW_SEEN_MASK;

	if (quiet > NETD_FLOW_SEEN_MASK / 2)
		return 0;
	return proto == IPPROTO_UDP && quiet > udp_idle_units;
}

/* An established flow's packet (`f` in the map): its stamp moves on, written only when
 * it changed, with a compare-and-swap: a plain store could undo the FIN bit the other
 * direction set meanwhile (closing()); a lost race leaves the stamp to the next packet.
 * Unconfirmed entries keep the stamp of their making. */
static __always_inline void seen(struct netd_flow_fwd *f, __u32 now)
{
	__u32 old = f->flags;

	if ((old >> NETD_FLOW_SEEN_SHIFT) != now)
		__sync_val_compare_and_swap(&f->flags, old, seen_at(old, now));
}

/* A FIN of established flow `f` passed (either way): the connection is closing, and
 * netd's sweep removes the flow once it has been quiet for a while. */
static __always_inline void closing(struct netd_flow_fwd *f)
{
	if (!(f->flags & NETD_FLOW_FIN))
		__sync_fetch_and_or(&f->flags, NETD_FLOW_FIN);
}

/* ---- checksums (RFC 1624: HC' = ~(~HC + ~m + m')) ---- */

static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* One 16-bit word of the summed data changes from `old` to `new` (both as they lie in
 * memory, like the checksum itself). */
static __always_inline void csum_replace2(__u16 *check, __u16 old, __u16 new)
{
	*check = fold((__u16)~*check + (__u16)~old + (__u32)new);
}

static __always_inline void csum_replace4(__u16 *check, __u32 old, __u32 new)
{
	csum_replace2(check, (__u16)old, (__u16)new);
	csum_replace2(check, (__u16)(old >> 16), (__u16)(new >> 16));
}

/* The checksum of a 20-byte IPv4 header as it stands: what belongs in `check` when
 * that field is 0, and 0 when the header and its checksum agree. */
static __always_inline __u16 ip_header_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return fold(sum);
}

/* Writes a whole 20-byte IPv4 header: no options, no fragment, TTL 64, `len` bytes
 * long (host order), its checksum. */
static __always_inline void ip_header(struct iphdr *ip, __u8 tos, __u32 len, __u8 proto,
				      __be32 saddr, __be32 daddr)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = tos;
	ip->tot_len = bpf_htons(len);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = 64;
	ip->protocol = proto;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = 0;
	ip->check = ip_header_checksum(ip);
}

/* ---- what the receiving kernel would accept ---- */

/* Whether the IPv4 packet at `ip` (its 20-byte header in bounds, without options) is
 * one the kernel's IP layer takes: version 4, header checksum right, total length at
 * least the header and within the frame (the frame may go on: Ethernet padding). */
static __always_inline int ip_whole(struct iphdr *ip, void *end)
{
	__u32 len = bpf_ntohs(ip->tot_len);

	if (ip->version != 4 || len < sizeof(*ip) || (void *)ip + len > end)
		return 0;
	return ip_header_checksum(ip) == 0;
}

/* Whether the TCP or UDP header behind `ip` (a packet ip_whole accepted) is in bounds
 * and fits the packet as the kernel checks it: a TCP data offset of 5 words or more,
 * all within the packet; a UDP length of 8 or more, within the packet (a shorter one
 * is fine: the kernel trims the packet to it). */
static __always_inline int l4_fits(struct iphdr *ip, void *end)
{
	__u32 room = bpf_ntohs(ip->tot_len) - sizeof(*ip); /* the IP payload's length */
	struct tcphdr *tcp = (void *)(ip + 1);
	struct udphdr *udp = (void *)(ip + 1);

	if (ip->protocol == IPPROTO_TCP)
		return (void *)(tcp + 1) <= end && tcp->doff >= 5 && tcp->doff * 4 <= room;
	if (ip->protocol == IPPROTO_UDP)
		return (void *)(udp + 1) <= end && bpf_ntohs(udp->len) >= sizeof(*udp) &&
		       bpf_ntohs(udp->len) <= room;
	return 0;
}

/* Whether a VXLAN packet to this node is whole: its outer IPv4 packet as ip_whole, and
 * its UDP datagram within that packet and long enough for the VXLAN and inner Ethernet
 * headers and the inner IPv4 packet (`inner_len` bytes) behind them. */
static __always_inline int vxlan_whole(struct iphdr *oip, struct udphdr *oudp, __u32 inner_len,
				       void *end)
{
	__u32 ulen = bpf_ntohs(oudp->len);

	if (!ip_whole(oip, end))
		return 0;
	return ulen <= bpf_ntohs(oip->tot_len) - sizeof(*oip) &&
	       ulen >= sizeof(*oudp) + sizeof(struct vxlanhdr) + sizeof(struct ethhdr) + inner_len;
}

/* Rewrites the addressing of an IPv4 TCP/UDP packet whose headers are in bounds, with
 * both checksums (the L4 one covers the addresses through its pseudo-header). `l4_check`
 * is NULL for a UDP packet sent without checksum. */
static __always_inline void translate(struct iphdr *ip, __be16 *ports, __u16 *l4_check,
				      __be32 saddr, __be16 sport, __be32 daddr, __be16 dport)
{
	csum_replace4(&ip->check, ip->saddr, saddr);
	csum_replace4(&ip->check, ip->daddr, daddr);
	if (l4_check) {
		csum_replace4(l4_check, ip->saddr, saddr);
		csum_replace4(l4_check, ip->daddr, daddr);
		csum_replace2(l4_check, ports[0], sport);
		csum_replace2(l4_check, ports[1], dport);
		if (*l4_check == 0 && ip->protocol == IPPROTO_UDP)
			*l4_check = 0xffff;
	}
	ip->saddr = saddr;
	ip->daddr = daddr;
	ports[0] = sport;
	ports[1] = dport;
}

/* netd's MAC for an address on an overlay: 02:42 and the four address bytes. */
static __always_inline void mac_for(__u8 *mac, __be32 addr)
{
	__u8 *a = (__u8 *)&addr;

	mac[0] = 0x02;
	mac[1] = 0x42;
	mac[2] = a[0];
	mac[3] = a[1];
	mac[4] = a[2];
	mac[5] = a[3];
}

/* Whether `mac` is netd's MAC for `addr` (see mac_for). */
static __always_inline int is_mac_for(const __u8 *mac, __be32 addr)
{
	const __u8 *a = (const __u8 *)&addr;

	return mac[0] == 0x02 && mac[1] == 0x42 && mac[2] == a[0] && mac[3] == a[1] &&
	       mac[4] == a[2] && mac[5] == a[3];
}

/* Fills the Ethernet addresses towards `dst` from the kernel's FIB and neighbours, and
 * sends the frame: back out the same interface, or to the one the route names. */
static __always_inline int send(struct xdp_md *ctx, struct ethhdr *eth, __be32 src, __be32 dst,
				enum outcome o)
{
	struct bpf_fib_lookup p = {};

	p.family = AF_INET;
	p.ipv4_src = src;
	p.ipv4_dst = dst;
	p.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &p, sizeof(p), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		flow_event(NETD_FLOWS_NO_ROUTE);
		return count(DROPPED, XDP_DROP); /* no route or no neighbour yet: TCP retries */
	}
	__builtin_memcpy(eth->h_dest, p.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p.smac, ETH_ALEN);
	if (p.ifindex == ctx->ingress_ifindex)
		return count(o, XDP_TX);
	return count(o, bpf_redirect(p.ifindex, 0));
}

/* ---- flow tables ---- */

/* Where a flow is: in no table (XDP has none: the kernel path takes the packet), in
 * the established table, or in the unconfirmed one. */
enum table { NO_FLOW, ESTABLISHED, UNCONFIRMED };

/* The reverse key of forward flow fk -> f: the task's answer, from {task, target port}
 * to the client's side as the task sees it (see struct netd_flow_tuple). */
static __always_inline struct netd_flow_tuple reverse_key(struct netd_ingress_config *cfg,
							  struct netd_flow_fwd *f,
							  struct netd_flow_key *fk)
{
	struct netd_flow_tuple rk = {
		.src = f->backend,
		.dst = (f->flags & NETD_FLOW_CLIENT) ? fk->addr : cfg->ingress_ip,
		.sport = f->target_port,
		.dport = f->snat_port,
		.proto = fk->proto,
	};

	return rk;
}

/* Whether reverse half `r` leads back to client key `fk`. */
static __always_inline int rev_is(struct netd_flow_rev *r, struct netd_flow_key *fk)
{
	return r->client == fk->addr && r->client_port == fk->port_a &&
	       r->published_port == fk->port_b;
}

/* Whether forward half fk -> f is the flow of reverse key `rk` (XDP's, with the same
 * task side and client side as the task sees them), not a newer flow of the same client
 * 4-tuple. */
static __always_inline int fwd_is(struct netd_ingress_config *cfg, struct netd_flow_fwd *f,
				  struct netd_flow_key *fk, struct netd_flow_tuple *rk)
{
	struct netd_flow_tuple mine;

	if (f->flags & NETD_FLOW_KERNEL)
		return 0;
	mine = reverse_key(cfg, f, fk);
	return mine.src == rk->src && mine.dst == rk->dst && mine.sport == rk->sport &&
	       mine.dport == rk->dport;
}

/* Forgets the flow of client key `fk` in one table (its forward and reverse maps), if
 * it is there: the reverse half first, which frees the translation port. Both forward
 * maps' values begin with a struct netd_flow_fwd, which is all this reads. */
static __always_inline void forget(struct netd_ingress_config *cfg, void *fwd_map, void *rev_map,
				   struct netd_flow_key *fk)
{
	struct netd_flow_fwd *f = bpf_map_lookup_elem(fwd_map, fk);
	struct netd_flow_tuple rk;

	if (!f)
		return;
	if (!(f->flags & NETD_FLOW_KERNEL)) {
		rk = reverse_key(cfg, f, fk);
		bpf_map_delete_elem(rev_map, &rk);
	}
	bpf_map_delete_elem(fwd_map, fk);
}

/* A new flow to published port `pv`: its backend into `out` and, for a remote one, the
 * reverse half with a port that makes it unique (with the client's address kept, the
 * client's own port first), both into the unconfirmed table. Returns 0 when there is
 * nothing to send it to. */
static __always_inline int new_flow(struct netd_ingress_config *cfg, struct netd_port_value *pv,
				    struct netd_flow_key *fk, struct netd_flow_fwd *out)
{
	struct netd_backend_key bk = {};
	struct netd_flow_fwd_new n = {};
	struct netd_mesh_backend *b;
	int client = cfg->flags & NETD_MESH_CLIENT_SOURCE;
	__u32 *next;

	if (pv->count == 0)
		return 0;
	next = bpf_map_lookup_elem(&netd_mesh_rr, &pv->slot);
	bk.service = pv->slot;
	bk.index = next ? __sync_fetch_and_add(next, 1) % pv->count : 0;
	b = bpf_map_lookup_elem(&netd_mesh_backends, &bk);
	if (!b)
		return 0;
	out->backend = b->addr;
	out->vtep = b->vtep;
	out->target_port = pv->target_port;
	out->snat_port = 0;
	out->flags = seen_at(0, seen_now());
	if (b->vtep == cfg->node_ip) {
		/* A task on this node: the kernel path's flow. A UDP one is remembered, so that
		 * its next datagrams follow the first one there. */
		out->flags |= NETD_FLOW_KERNEL;
		if (fk->proto == IPPROTO_UDP) {
			n.fwd = *out;
			bpf_map_update_elem(&netd_flows_fwd_new, fk, &n, BPF_ANY);
			flow_event(NETD_FLOWS_OPENED);
		}
		return 1;
	}
	if (client)
		out->flags |= NETD_FLOW_CLIENT;
	for (int i = 0; i < SNAT_TRIES; i++) {
		struct netd_flow_tuple rk;
		struct netd_flow_rev rv = {
			.client = fk->addr,
			.client_port = fk->port_a,
			.published_port = fk->port_b,
		};

		/* The port is taken in the unconfirmed map, then looked for in the established
		 * one: a flow being confirmed meanwhile enters the established map before it
		 * leaves the unconfirmed one, so either the insertion fails or the look-up
		 * sees it. */
		if (client && i == 0)
			out->snat_port = fk->port_a;
		else
			out->snat_port = bpf_htons(SNAT_FIRST + (bpf_get_prandom_u32() % SNAT_FIRST));
		rk = reverse_key(cfg, out, fk);
		if (bpf_map_update_elem(&netd_flows_rev_new, &rk, &rv, BPF_NOEXIST))
			continue;
		if (bpf_map_lookup_elem(&netd_flows_rev, &rk)) {
			bpf_map_delete_elem(&netd_flows_rev_new, &rk);
			continue;
		}
		n.fwd = *out;
		bpf_map_update_elem(&netd_flows_fwd_new, fk, &n, BPF_ANY);
		flow_event(NETD_FLOWS_OPENED);
		return 1;
	}
	flow_event(NETD_FLOWS_REFUSED);
	return 0;
}

/* Moves unconfirmed flow fk -> f (reverse half rk -> rv, unless it is the kernel's)
 * into the established table: into it first, then out of the unconfirmed one, so that
 * a translation port in use is always in one of the reverse maps (new_flow relies on
 * it). Returns 0 if the established table refused it. */
static __always_inline int confirm(struct netd_flow_key *fk, struct netd_flow_fwd *f,
				   struct netd_flow_tuple *rk, struct netd_flow_rev *rv)
{
	int kernel = f->flags & NETD_FLOW_KERNEL;

	if (!kernel && bpf_map_update_elem(&netd_flows_rev, rk, rv, BPF_ANY))
		return 0;
	if (bpf_map_update_elem(&netd_flows_fwd, fk, f, BPF_ANY)) {
		/* Full: no half of it stays behind in a table nothing evicts from. */
		if (!kernel)
			bpf_map_delete_elem(&netd_flows_rev, rk);
		return 0;
	}
	if (!kernel)
		bpf_map_delete_elem(&netd_flows_rev_new, rk);
	bpf_map_delete_elem(&netd_flows_fwd_new, fk);
	flow_event(NETD_FLOWS_CONFIRMED);
	return 1;
}

/* Whether a TCP ACK with `ack_seq` (as in the packet) acknowledges the task's SYN-ACK
 * of unconfirmed flow `n`: ack_seq == ISN + 1, in sequence space (mod 2^32). */
static __always_inline int acks_syn_ack(struct netd_flow_fwd_new *n, __be32 ack_seq)
{
	return bpf_ntohl(ack_seq) == bpf_ntohl(n->isn) + 1;
}

/* The client acknowledged the task's SYN-ACK of unconfirmed flow `fk`, but the
 * established table was full: its later ACKs (which acknowledge more) retry the move
 * without the check, and are not counted as blind ones. */
static __always_inline void acked(struct netd_flow_key *fk)
{
	struct netd_flow_fwd_new *m = bpf_map_lookup_elem(&netd_flows_fwd_new, fk);

	if (m)
		__sync_fetch_and_or(&m->fwd.flags, NETD_FLOW_ACKED);
}

/* A packet of unconfirmed flow fk -> n (a copy). Its reverse half must still be there
 * and still this flow's: the two maps evict apart, and a lone forward half would send
 * the client's packets from a translation port that may be another flow's by now (such
 * a flow is lost: forgotten, NO_FLOW). Once the task has answered (or, for the kernel's
 * flows, at once), a packet that `confirms` moves the flow to the established table; a
 * TCP one only if it acknowledges the task's SYN-ACK (`ack_seq`, as in the packet): a
 * blind ACK from a spoofed source leaves the flow unconfirmed, counted. */
static __always_inline enum table unconfirmed(struct netd_ingress_config *cfg,
					      struct netd_flow_key *fk,
					      struct netd_flow_fwd_new *n, int confirms,
					      __be32 ack_seq)
{
	struct netd_flow_tuple rk = reverse_key(cfg, &n->fwd, fk);
	struct netd_flow_rev rv = {};
	struct netd_flow_rev *r;

	if (!(n->fwd.flags & NETD_FLOW_KERNEL)) {
		r = bpf_map_lookup_elem(&netd_flows_rev_new, &rk);
		if (!r || !rev_is(r, fk)) {
			bpf_map_delete_elem(&netd_flows_fwd_new, fk);
			flow_event(NETD_FLOWS_LOST);
			return NO_FLOW;
		}
		if (!(n->fwd.flags & NETD_FLOW_ANSWERED))
			return UNCONFIRMED;
		rv = *r;
		if (confirms && fk->proto == IPPROTO_TCP && !(n->fwd.flags & NETD_FLOW_ACKED) &&
		    !acks_syn_ack(n, ack_seq)) {
			flow_event(NETD_FLOWS_BAD_ACK);
			return UNCONFIRMED;
		}
	}
	if (confirms && confirm(fk, &n->fwd, &rk, &rv))
		return ESTABLISHED;
	if (confirms && fk->proto == IPPROTO_TCP && !(n->fwd.flags & NETD_FLOW_ACKED))
		acked(fk);
	return UNCONFIRMED;
}

/* Whether established flow fk -> f (a copy) still has its reverse half, leading back to
 * it. The two maps evict apart, and a lone forward half would send the client's packets
 * from a translation port that new_flow may have given to another flow by now: such a
 * flow is lost (its forward half forgotten). The kernel's flows have no reverse half. */
static __always_inline int established(struct netd_ingress_config *cfg, struct netd_flow_key *fk,
				       struct netd_flow_fwd *f)
{
	struct netd_flow_tuple rk = reverse_key(cfg, f, fk);
	struct netd_flow_rev *r;

	if (f->flags & NETD_FLOW_KERNEL)
		return 1;
	r = bpf_map_lookup_elem(&netd_flows_rev, &rk);
	if (r && rev_is(r, fk))
		return 1;
	bpf_map_delete_elem(&netd_flows_fwd, fk);
	flow_event(NETD_FLOWS_LOST);
	return 0;
}

/* The flow of client key `fk` (a copy into `f`) and where it is: established;
 * unconfirmed (and maybe confirmed by this packet, which `confirms` or not; a TCP one's
 * `ack_seq` as in the packet); or new. A SYN always opens a new one. */
static __always_inline enum table flow_of(struct netd_ingress_config *cfg,
					  struct netd_port_value *pv, struct netd_flow_key *fk,
					  int syn, int confirms, __be32 ack_seq,
					  struct netd_flow_fwd *f)
{
	struct netd_flow_fwd_new *n;
	struct netd_flow_fwd_new copy;
	struct netd_flow_fwd *e;
	enum table t;
	__u32 now;

	if (syn) {
		/* A new connection on a 4-tuple seen before (the client reused its port, as
		 * Katran does: a SYN is always a new pick). The old flow's translation port is
		 * freed now, so the two maps of a table, which evict apart, never disagree
		 * about it. */
		forget(cfg, &netd_flows_fwd, &netd_flows_rev, fk);
		forget(cfg, &netd_flows_fwd_new, &netd_flows_rev_new, fk);
		return new_flow(cfg, pv, fk, f) ? UNCONFIRMED : NO_FLOW;
	}
	now = seen_now();
	e = bpf_map_lookup_elem(&netd_flows_fwd, fk);
	if (e && idle_udp(fk->proto, e->flags, now)) {
		/* The client comes back after a silence: a new flow, a new pick (the task may
		 * have gone meanwhile, as conntrack's entry would have). */
		forget(cfg, &netd_flows_fwd, &netd_flows_rev, fk);
		flow_event(NETD_FLOWS_EXPIRED);
		e = NULL;
	}
	if (e) {
		seen(e, now);
		*f = *e;
		if (established(cfg, fk, f))
			return ESTABLISHED;
	}
	n = bpf_map_lookup_elem(&netd_flows_fwd_new, fk);
	if (n && idle_udp(fk->proto, n->fwd.flags, now)) {
		forget(cfg, &netd_flows_fwd_new, &netd_flows_rev_new, fk);
		flow_event(NETD_FLOWS_EXPIRED);
		n = NULL;
	}
	if (n) {
		copy = *n;
		*f = copy.fwd;
		t = unconfirmed(cfg, fk, &copy, confirms, ack_seq);
		if (t != NO_FLOW)
			return t;
	}
	/* Only a flow's first packet opens it: any other TCP packet is the kernel path's. */
	if (fk->proto == IPPROTO_TCP)
		return NO_FLOW;
	return new_flow(cfg, pv, fk, f) ? UNCONFIRMED : NO_FLOW;
}

/* The task answered unconfirmed flow `n` (from its VTEP): marks it, for the client's
 * next packet to confirm the flow. A TCP flow is answered by the task's SYN-ACK only
 * (`syn_ack`), whose sequence number `seq` (as in the packet) is kept first: the
 * client's ACK must acknowledge it. */
static __always_inline void answered(struct netd_flow_fwd_new *n, __u8 proto, int syn_ack,
				     __be32 seq)
{
	if (n->fwd.flags & NETD_FLOW_ANSWERED)
		return;
	if (proto == IPPROTO_TCP) {
		if (!syn_ack)
			return;
		n->isn = seq;
	}
	/* An atomic (and full barrier) after the ISN's store, so the flag never shows
	 * without it. */
	__sync_fetch_and_or(&n->fwd.flags, NETD_FLOW_ANSWERED);
}

/* The largest IP packet the overlay carries: what the underlay carries less VXLAN's
 * 50 bytes (netd writes it from --underlay-mtu). */
static __always_inline __u32 overlay_mtu(const struct netd_ingress_config *cfg)
{
	return cfg->overlay_mtu ? cfg->overlay_mtu : DEFAULT_OVERLAY_MTU;
}

/* IPv4's "don't fragment" bit in frag_off (host order). */
#define IP_DONT_FRAGMENT 0x4000

/* The ICMP header of a "fragmentation needed" error (RFC 1191): linux/icmp.h cannot be
 * included here, it pulls in the C library's headers. */
struct frag_needed_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 unused;
	__be16 mtu;
};
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4
#define ICMP_TIME_EXCEEDED 11

/* What an ICMP error quotes of the packet it is about: its IP header (no options reach
 * here) and the first 8 bytes behind it (the ports). */
#define ICMP_QUOTE (sizeof(struct iphdr) + 8)
/* The error's whole frame: Ethernet, IPv4 and ICMP headers, then the quote. */
#define ICMP_FRAME (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct frag_needed_hdr) + \
		    ICMP_QUOTE)

/* A client's packet too big for the overlay with DF set: answered, as a router on the
 * path would, with ICMP "fragmentation needed" (type 3, code 4) from the node's address,
 * naming the overlay's MTU, so that the client's path MTU drops; the packet itself goes
 * nowhere. The frame is turned into the answer in place: the headers are prepended (the
 * packet's own Ethernet header, which they cover, is not needed: send() looks the MACs
 * up), so the quoted IP header is where the packet's was, and the tail is cut. */
static __always_inline int frag_needed(struct xdp_md *ctx, struct netd_ingress_config *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct frag_needed_hdr *icmp;
	struct ethhdr *eth;
	__be32 client;
	__u32 sum = 0;
	__u16 *w;
	int excess;

	if ((void *)(ip + 1) > end)
		return count(DROPPED, XDP_DROP);
	client = ip->saddr;
	if (bpf_xdp_adjust_head(ctx, -(int)(sizeof(struct iphdr) + sizeof(struct frag_needed_hdr))))
		return count(DROPPED, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	excess = (int)(end - data) - (int)ICMP_FRAME;
	if (excess < 0 || bpf_xdp_adjust_tail(ctx, -excess))
		return count(DROPPED, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	icmp = (void *)(ip + 1);
	if ((void *)icmp + sizeof(*icmp) + ICMP_QUOTE > end)
		return count(DROPPED, XDP_DROP);
	eth->h_proto = bpf_htons(ETH_P_IP);
	/* TOS: internetwork control, as the kernel's own ICMP errors. */
	ip_header(ip, 0xc0, sizeof(*ip) + sizeof(*icmp) + ICMP_QUOTE, IPPROTO_ICMP, cfg->node_ip,
		  client);
	icmp->type = ICMP_DEST_UNREACH;
	icmp->code = ICMP_FRAG_NEEDED;
	icmp->checksum = 0;
	icmp->unused = 0;
	icmp->mtu = bpf_htons(overlay_mtu(cfg));
	/* The checksum covers the ICMP header and the quote: 36 bytes, 18 words. */
	w = (__u16 *)icmp;
#pragma unroll
	for (int i = 0; i < (int)((sizeof(*icmp) + ICMP_QUOTE) / 2); i++)
		sum += w[i];
	icmp->checksum = fold(sum);
	flow_event(NETD_FLOWS_TOO_BIG);
	return send(ctx, eth, cfg->node_ip, client, DROPPED);
}

/* A SYN's MSS, when it is the first option (as Linux sends it), is lowered to what fits
 * the overlay once wrapped: the client then never sends a segment VXLAN cannot carry. */
static __always_inline void clamp_mss(struct tcphdr *tcp, void *end, __u32 mtu)
{
	__u8 *opt = (__u8 *)(tcp + 1);
	__u16 *mss = (__u16 *)(opt + 2);
	__u16 most = mtu > TCPIP_HEADERS ? mtu - TCPIP_HEADERS : 0;
	__u16 want = bpf_htons(most);

	if (tcp->doff < 6 || (void *)(opt + 4) > end)
		return;
	if (opt[0] != 2 || opt[1] != 4 || bpf_ntohs(*mss) <= most)
		return;
	csum_replace2(&tcp->check, *mss, want);
	*mss = want;
}

/* Wraps the frame (an IPv4 packet of `inner_len` bytes behind its Ethernet header) in
 * VXLAN towards `vtep` and sends it: [outer eth | outer ip | udp | vxlan] + the frame,
 * whose Ethernet header becomes the inner one (the MAC of `inner_dest`, the task <- this
 * node's ingress MAC, which tells the task's port who took the flow). `entropy` spreads
 * flows over the outer source port. */
static __always_inline int wrap(struct xdp_md *ctx, struct netd_ingress_config *cfg,
				__be32 inner_dest, __be32 vtep, __u32 inner_len, __u16 entropy)
{
	struct ethhdr *eth, *ieth;
	struct vxlanhdr *vx;
	struct udphdr *oudp;
	struct iphdr *oip;
	void *data, *end;

	if (bpf_xdp_adjust_head(ctx, -(int)ENCAP_LEN))
		return count(DROPPED, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	oip = (void *)(eth + 1);
	oudp = (void *)(oip + 1);
	vx = (void *)(oudp + 1);
	ieth = (void *)(vx + 1);
	if ((void *)(ieth + 1) > end)
		return count(DROPPED, XDP_DROP);
	mac_for(ieth->h_dest, inner_dest);
	mac_for(ieth->h_source, cfg->ingress_ip);
	eth->h_proto = bpf_htons(ETH_P_IP);
	/* Outer IP length: IP + UDP + VXLAN headers and the inner frame (its Ethernet header
	 * included), which happens to equal ENCAP_LEN (the outer Ethernet header is not
	 * counted, the inner one is). */
	ip_header(oip, 0, inner_len + ENCAP_LEN, IPPROTO_UDP, cfg->node_ip, vtep);
	/* Source port: flow entropy in the ephemeral range, as Linux's VXLAN does. */
	oudp->source = bpf_htons(0xc000 | (entropy & 0x3fff));
	oudp->dest = cfg->vxlan_port;
	/* UDP length: its header, VXLAN's, and the whole inner frame. */
	oudp->len = bpf_htons(inner_len + sizeof(struct ethhdr) + 8 + sizeof(struct udphdr));
	oudp->check = 0;
	vx->flags = bpf_htonl(VXLAN_FLAG_VNI);
	vx->vni = bpf_htonl(cfg->vni << 8);
	return send(ctx, eth, cfg->node_ip, vtep, FORWARDED);
}

/* Whom the task of forward flow `f` sees as its client `client`: the client itself when
 * the flow keeps its address, else this node's ingress address. */
static __always_inline __be32 seen_source(struct netd_ingress_config *cfg, struct netd_flow_fwd *f,
					  __be32 client)
{
	return (f->flags & NETD_FLOW_CLIENT) ? client : cfg->ingress_ip;
}

/* An ICMP error to NODE_IP about a packet this node sent a client in an XDP flow: from
 * a router between here and the client ("fragmentation needed", which path MTU discovery
 * needs, or unreachable, time exceeded). Its quote is NODE_IP:published -> client:port;
 * the task sent that packet as task:target -> the address and port it sees. The error
 * goes to the task as the kernel path's conntrack would relate it: outer destination
 * the task (and, translated to the node's address, outer source that address), the
 * quote as the task sent it (the quoted IP header's checksum and the ICMP
 * checksum follow; the quoted transport checksum is left, nobody checks it in an
 * error), wrapped like the flow's packets. Anything else (no flow of XDP's, another
 * type, a quote without its ports): the kernel's. */
static __always_inline int icmp_to_task(struct xdp_md *ctx, struct netd_ingress_config *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	/* Type, code, checksum, then 4 bytes (unused, or the next hop's MTU): the same
	 * 8-byte layout for every error type. */
	struct frag_needed_hdr *icmp = (void *)(ip + 1);
	struct iphdr *qip = (void *)(icmp + 1); /* the quoted packet's IP header */
	__be16 *qports = (__be16 *)(qip + 1);   /* and its ports, the quote's first 4 bytes */
	struct netd_flow_key fk = {};
	struct netd_flow_fwd_new *n;
	struct netd_flow_tuple rk;
	struct netd_flow_rev *r;
	struct netd_flow_fwd *f;
	struct netd_flow_fwd fl;
	__be32 seen;
	__u16 quoted_check;
	void *rev_map;

	if ((void *)(qports + 2) > end)
		return XDP_PASS;
	if (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED)
		return XDP_PASS;
	/* A quote of a later fragment has no ports where they would be. */
	if (qip->version != 4 || qip->ihl != 5 || qip->saddr != cfg->node_ip ||
	    (qip->frag_off & bpf_htons(0x1fff)) ||
	    (qip->protocol != IPPROTO_TCP && qip->protocol != IPPROTO_UDP))
		return XDP_PASS;
	/* The quote's ports within the error's IP packet, not only within the frame. */
	if (!ip_whole(ip, end) || bpf_ntohs(ip->tot_len) > overlay_mtu(cfg) ||
	    bpf_ntohs(ip->tot_len) < (void *)(qports + 2) - (void *)ip)
		return count(PASSED, XDP_PASS);
	fk.addr = qip->daddr;
	fk.port_a = qports[1];
	fk.port_b = qports[0];
	fk.proto = qip->protocol;
	f = bpf_map_lookup_elem(&netd_flows_fwd, &fk);
	rev_map = &netd_flows_rev;
	if (!f) {
		n = bpf_map_lookup_elem(&netd_flows_fwd_new, &fk);
		if (!n)
			return XDP_PASS;
		f = &n->fwd;
		rev_map = &netd_flows_rev_new;
	}
	fl = *f;
	if (fl.flags & NETD_FLOW_KERNEL)
		return XDP_PASS;
	/* Only a flow whose reverse half still leads back to it: a lone forward half's port
	 * may be another flow's by now (as established() and unconfirmed() check). */
	rk = reverse_key(cfg, &fl, &fk);
	r = bpf_map_lookup_elem(rev_map, &rk);
	if (!r || !rev_is(r, &fk))
		return XDP_PASS;
	seen = seen_source(cfg, &fl, fk.addr);
	quoted_check = qip->check;
	csum_replace4(&qip->check, qip->saddr, fl.backend);
	csum_replace4(&qip->check, qip->daddr, seen);
	csum_replace4(&icmp->checksum, qip->saddr, fl.backend);
	csum_replace4(&icmp->checksum, qip->daddr, seen);
	csum_replace2(&icmp->checksum, quoted_check, qip->check);
	csum_replace2(&icmp->checksum, qports[0], fl.target_port);
	csum_replace2(&icmp->checksum, qports[1], fl.snat_port);
	qip->saddr = fl.backend;
	qip->daddr = seen;
	qports[0] = fl.target_port;
	qports[1] = fl.snat_port;
	csum_replace4(&ip->check, ip->daddr, fl.backend);
	ip->daddr = fl.backend;
	if (!(fl.flags & NETD_FLOW_CLIENT)) {
		/* Translated to the node's address, the task hears of it from there, as the
		 * kernel path's conntrack would have it (its NAT rewrites the error's source). */
		csum_replace4(&ip->check, ip->saddr, cfg->ingress_ip);
		ip->saddr = cfg->ingress_ip;
	}
	flow_event(NETD_FLOWS_ICMP_RELAYED);
	return wrap(ctx, cfg, fl.backend, fl.vtep, bpf_ntohs(ip->tot_len), (__u16)(fk.addr ^ fk.port_a));
}

/* Client -> NODE_IP:published. */
static __always_inline int request(struct xdp_md *ctx, struct netd_ingress_config *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	struct udphdr *udp = (void *)(ip + 1);
	__be16 *ports = (__be16 *)(ip + 1); /* source and destination port lead TCP and UDP */
	__u16 *l4_check;
	struct netd_port_key pk = {};
	struct netd_port_value *pv;
	struct netd_flow_key fk = {};
	struct netd_flow_fwd f = {};
	enum table table;
	__be32 source; /* what the task sees as the client */
	__u32 inner_len;
	int tcp_syn = 0;
	int tcp_rst = 0;
	int tcp_fin = 0;
	int confirms = 1; /* UDP: any datagram of the client confirms its (answered) flow */
	__be32 ack_seq = 0;

	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	pk.port = ports[1];
	pk.proto = ip->protocol;
	pv = bpf_map_lookup_elem(&netd_ports, &pk);
	if (!pv)
		return XDP_PASS;
	if (!ip_whole(ip, end) || !l4_fits(ip, end))
		return count(PASSED, XDP_PASS); /* malformed: the kernel drops and counts it */
	if (ip->protocol == IPPROTO_TCP) {
		if ((void *)(tcp + 1) > end) /* l4_fits saw it, the verifier wants it here */
			return XDP_PASS;
		l4_check = &tcp->check;
		tcp_syn = tcp->syn && !tcp->ack && !tcp->rst;
		tcp_rst = tcp->rst;
		tcp_fin = tcp->fin;
		confirms = tcp->ack && !tcp->syn && !tcp->rst;
		ack_seq = tcp->ack_seq;
	} else {
		l4_check = udp->check ? &udp->check : NULL;
	}
	fk.addr = ip->saddr;
	fk.port_a = ports[0];
	fk.port_b = ports[1];
	fk.proto = ip->protocol;
	table = flow_of(cfg, pv, &fk, tcp_syn, confirms, ack_seq, &f);
	if (table == NO_FLOW)
		return count(PASSED, XDP_PASS); /* no backend or port, or not the first packet */
	if (tcp_fin && table == ESTABLISHED) {
		struct netd_flow_fwd *e = bpf_map_lookup_elem(&netd_flows_fwd, &fk);

		if (e)
			closing(e);
	}
	if (f.flags & NETD_FLOW_KERNEL)
		return count(PASSED, XDP_PASS);
	if (tcp_syn)
		clamp_mss(tcp, end, overlay_mtu(cfg));
	inner_len = bpf_ntohs(ip->tot_len);
	if (inner_len > overlay_mtu(cfg)) {
		/* Too big to wrap. With DF the client learns the overlay's MTU; without, the
		 * datagram is dropped (the kernel path would fragment it, but from another
		 * translation port than the flow's: the task would see two clients). */
		if (ip->frag_off & bpf_htons(IP_DONT_FRAGMENT))
			return frag_needed(ctx, cfg);
		flow_event(NETD_FLOWS_TOO_BIG);
		return count(DROPPED, XDP_DROP);
	}
	source = seen_source(cfg, &f, fk.addr);
	translate(ip, ports, l4_check, source, f.snat_port, f.backend, f.target_port);
	__u16 entropy = (__u16)(fk.addr ^ fk.port_a);

	if (tcp_rst) {
		/* The client aborts: this RST is the flow's last packet. */
		if (table == ESTABLISHED)
			forget(cfg, &netd_flows_fwd, &netd_flows_rev, &fk);
		else
			forget(cfg, &netd_flows_fwd_new, &netd_flows_rev_new, &fk);
	}

	return wrap(ctx, cfg, f.backend, f.vtep, inner_len, entropy);
}

/* The forward half of the flow whose reverse half is rk -> r (client key into `fk`):
 * in the established table, else in the unconfirmed one (where it still is while
 * confirm() moves the flow, whose reverse half goes first); NULL if neither holds this
 * flow. `*n` is the unconfirmed entry when the flow is there, else NULL. */
static __always_inline struct netd_flow_fwd *fwd_of(struct netd_ingress_config *cfg,
						    struct netd_flow_tuple *rk,
						    struct netd_flow_rev *r,
						    struct netd_flow_key *fk,
						    struct netd_flow_fwd_new **n)
{
	struct netd_flow_fwd *f;

	fk->addr = r->client;
	fk->port_a = r->client_port;
	fk->port_b = r->published_port;
	fk->proto = rk->proto;
	*n = NULL;
	f = bpf_map_lookup_elem(&netd_flows_fwd, fk);
	if (f && fwd_is(cfg, f, fk, rk))
		return f;
	*n = bpf_map_lookup_elem(&netd_flows_fwd_new, fk);
	if (*n && fwd_is(cfg, &(*n)->fwd, fk, rk))
		return &(*n)->fwd;
	*n = NULL;
	return NULL;
}

/* VXLAN to this node: a task's answer to a flow this program translated? It must come
 * from the VTEP the flow was sent to (outer IPv4 source): anything else that names a
 * flow of XDP's is dropped and counted, never unwrapped. */
static __always_inline int reply(struct xdp_md *ctx, struct netd_ingress_config *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *oip = (void *)(eth + 1);
	struct udphdr *oudp = (void *)(oip + 1);
	struct vxlanhdr *vx = (void *)(oudp + 1);
	struct ethhdr *ieth = (void *)(vx + 1);
	struct iphdr *ip = (void *)(ieth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	struct udphdr *udp = (void *)(ip + 1);
	__be16 *ports = (__be16 *)(ip + 1);
	__u16 *l4_check;
	struct netd_flow_tuple rk = {};
	struct netd_flow_key fk = {};
	struct netd_flow_rev *r;
	struct netd_flow_fwd *f;
	struct netd_flow_fwd_new *n;
	int syn_ack = 0;
	int fin = 0;
	int rst = 0;
	__be32 seq = 0;
	__be32 client;
	__be16 client_port, published_port;

	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	/* Only the VNI flag, as the kernel's VXLAN takes it without extensions; the low
	 * byte of the VNI word is reserved (0). */
	if (vx->flags != bpf_htonl(VXLAN_FLAG_VNI) || vx->vni != bpf_htonl(cfg->vni << 8) ||
	    ieth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	/* For this node's ingress sandbox: to its address (snat), or to a client through it
	 * (the task's port sends a client source flow's answers to its MAC). Not a packet
	 * to a task on the ingress network: that is a flow another node sends here (to this
	 * node's sandbox MAC as well), spared the look-ups. */
	if (ip->daddr != cfg->ingress_ip &&
	    (!is_mac_for(ieth->h_dest, cfg->ingress_ip) ||
	     (cfg->ingress_mask && !((ip->daddr ^ cfg->ingress_ip) & cfg->ingress_mask))))
		return XDP_PASS;
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return XDP_PASS;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	rk.src = ip->saddr;
	rk.dst = ip->daddr;
	rk.sport = ports[0];
	rk.dport = ports[1];
	rk.proto = ip->protocol;
	r = bpf_map_lookup_elem(&netd_flows_rev, &rk);
	if (!r) {
		r = bpf_map_lookup_elem(&netd_flows_rev_new, &rk);
		if (!r)
			return XDP_PASS; /* the kernel path's flow */
	}
	if (!vxlan_whole(oip, oudp, bpf_ntohs(ip->tot_len), end) || !ip_whole(ip, end) ||
	    !l4_fits(ip, end))
		return count(PASSED, XDP_PASS); /* malformed: the kernel drops and counts it */
	client = r->client;
	client_port = r->client_port;
	published_port = r->published_port;
	f = fwd_of(cfg, &rk, r, &fk, &n);
	if (!f)
		return count(PASSED, XDP_PASS); /* a reverse half whose flow is gone */
	if (f->vtep != oip->saddr) {
		/* Not from the task's node: forged (nftables would have dropped a non-member's,
		 * had the packet reached it), or sent from another address of the node. */
		flow_event(NETD_FLOWS_WRONG_VTEP);
		return count(DROPPED, XDP_DROP);
	}
	if (ip->protocol == IPPROTO_TCP) {
		if ((void *)(tcp + 1) > end) /* l4_fits saw it, the verifier wants it here */
			return XDP_PASS;
		l4_check = &tcp->check;
		syn_ack = tcp->syn && tcp->ack && !tcp->rst;
		fin = tcp->fin;
		rst = tcp->rst;
		seq = tcp->seq;
	} else {
		l4_check = udp->check ? &udp->check : NULL;
	}
	if (n) {
		answered(n, ip->protocol, syn_ack, seq);
	} else {
		seen(f, seen_now()); /* an answer keeps an established flow alive too */
		if (fin)
			closing(f);
		/* The task aborts: this RST is the flow's last packet (as a client's is). The
		 * established table never evicts, so nothing else would take it before the
		 * sweep's idle time. */
		if (rst)
			forget(cfg, &netd_flows_fwd, &netd_flows_rev, &fk);
	}
	translate(ip, ports, l4_check, cfg->node_ip, published_port, client, client_port);
	/* Unwrap: the inner frame goes out as it is, with real Ethernet addresses. */
	if (bpf_xdp_adjust_head(ctx, (int)ENCAP_LEN))
		return count(DROPPED, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return count(DROPPED, XDP_DROP);
	return send(ctx, eth, cfg->node_ip, client, RETURNED);
}

SEC("xdp")
int netd_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct netd_ingress_config *cfg;
	__u32 zero = 0;

	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	/* Not IPv4 after all, IP options, or fragments: the kernel path. */
	if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return XDP_PASS;
	cfg = bpf_map_lookup_elem(&netd_ingress_cfg, &zero);
	if (!cfg || ip->daddr != cfg->node_ip)
		return XDP_PASS;
	if (ip->protocol == IPPROTO_UDP && (void *)(udp + 1) <= end && udp->dest == cfg->vxlan_port)
		return reply(ctx, cfg);
	if (ip->protocol == IPPROTO_ICMP)
		return icmp_to_task(ctx, cfg);
	return request(ctx, cfg);
}

char LICENSE[] SEC("license") = "GPL";
