// SPDX-License-Identifier: GPL-2.0
/* The routing mesh's fast path, on the node's underlay interface (Katran's shape).
 *
 * A packet to NODE_IP:PUBLISHED (TCP or UDP) of a published port: pick a backend task
 * round-robin, translate the packet as the kernel path would (source -> the node's
 * ingress address and a port of its own, destination -> the task's ingress address and
 * the target port), wrap it in VXLAN towards the task's node (ingress VNI) and send it
 * straight back out. The task's answer comes back in VXLAN to this node's VTEP: unwrap
 * it, restore NODE_IP:PUBLISHED -> client, send it out. The kernel stack never sees
 * either direction.
 *
 * Flow state: a forward map (client 4-tuple -> task, translation port) and a reverse
 * map (task side -> client), both LRU. A SYN always makes a new pick, and a client's RST
 * forgets the flow, so a client that reuses its port never lands on a stale entry.
 *
 * Left to the kernel path (XDP_PASS): flows to a task on this node (its answer reaches
 * the ingress sandbox over the bridge, not through here), packets of flows this program
 * did not start, IP options, fragments. Ports: XDP translates to 32768-65535, the kernel
 * path's ingress sandbox masquerades to 1024-32767, so the two never share one. */

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
/* The largest frame the underlay carries (MTU 1500 + Ethernet header). */
#define UNDERLAY_FRAME 1514
/* MSS inside the overlay: MTU 1450 - 40 bytes of IPv4 and TCP headers. */
#define OVERLAY_MSS 1410
#define SNAT_FIRST 32768
#define SNAT_TRIES 8

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

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct netd_flow_key);
	__type(value, struct netd_flow_fwd);
} netd_flows_fwd SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct netd_flow_key);
	__type(value, struct netd_flow_rev);
} netd_flows_rev SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct netd_xdp_stats);
} netd_xdp_stats SEC(".maps");

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

static __always_inline __u16 ip_header_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return fold(sum);
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
	if (bpf_fib_lookup(ctx, &p, sizeof(p), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return count(DROPPED, XDP_DROP); /* no route or no neighbour yet: TCP retries */
	__builtin_memcpy(eth->h_dest, p.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p.smac, ETH_ALEN);
	if (p.ifindex == ctx->ingress_ifindex)
		return count(o, XDP_TX);
	return count(o, bpf_redirect(p.ifindex, 0));
}

/* A new flow to published port `pv`: its backend and, for a remote one, the reverse
 * entry with a free translation port. Returns 0 when there is nothing to send it to. */
static __always_inline int new_flow(struct netd_ingress_config *cfg, struct netd_port_value *pv,
				    struct netd_flow_key *fk, struct netd_flow_fwd *out)
{
	struct netd_backend_key bk = {};
	struct netd_mesh_backend *b;
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
	out->flags = 0;
	if (b->vtep == cfg->node_ip) {
		out->flags = NETD_FLOW_KERNEL;
		bpf_map_update_elem(&netd_flows_fwd, fk, out, BPF_ANY);
		return 1;
	}
	for (int i = 0; i < SNAT_TRIES; i++) {
		__u16 port = SNAT_FIRST + (bpf_get_prandom_u32() % SNAT_FIRST);
		struct netd_flow_key rk = {
			.addr = b->addr,
			.port_a = pv->target_port,
			.port_b = bpf_htons(port),
			.proto = fk->proto,
		};
		struct netd_flow_rev rv = {
			.client = fk->addr,
			.client_port = fk->port_a,
			.published_port = fk->port_b,
		};

		if (bpf_map_update_elem(&netd_flows_rev, &rk, &rv, BPF_NOEXIST) == 0) {
			out->snat_port = rk.port_b;
			bpf_map_update_elem(&netd_flows_fwd, fk, out, BPF_ANY);
			return 1;
		}
	}
	return 0;
}

/* The reverse entry of forward flow `f` (with key `fk`), if it has one. */
static __always_inline void forget_reverse(struct netd_flow_fwd *f, struct netd_flow_key *fk)
{
	struct netd_flow_key rk = {
		.addr = f->backend,
		.port_a = f->target_port,
		.port_b = f->snat_port,
		.proto = fk->proto,
	};

	if (!(f->flags & NETD_FLOW_KERNEL))
		bpf_map_delete_elem(&netd_flows_rev, &rk);
}

/* A SYN's MSS, when it is the first option (as Linux sends it), is lowered to what fits
 * the overlay once wrapped: the client then never sends a segment VXLAN cannot carry. */
static __always_inline void clamp_mss(struct tcphdr *tcp, void *end)
{
	__u8 *opt = (__u8 *)(tcp + 1);
	__u16 *mss = (__u16 *)(opt + 2);
	__u16 want = bpf_htons(OVERLAY_MSS);

	if (tcp->doff < 6 || (void *)(opt + 4) > end)
		return;
	if (opt[0] != 2 || opt[1] != 4 || bpf_ntohs(*mss) <= OVERLAY_MSS)
		return;
	csum_replace2(&tcp->check, *mss, want);
	*mss = want;
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
	struct netd_flow_fwd *f, nf;
	struct vxlanhdr *vx;
	struct udphdr *oudp;
	struct iphdr *oip;
	struct ethhdr *ieth;
	__u32 inner_len;
	int tcp_syn = 0;
	int tcp_rst = 0;

	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	if (ip->protocol == IPPROTO_TCP) {
		if ((void *)(tcp + 1) > end)
			return XDP_PASS;
		l4_check = &tcp->check;
		tcp_syn = tcp->syn && !tcp->ack && !tcp->rst;
		tcp_rst = tcp->rst;
	} else if (ip->protocol == IPPROTO_UDP) {
		l4_check = udp->check ? &udp->check : NULL;
	} else {
		return XDP_PASS;
	}
	pk.port = ports[1];
	pk.proto = ip->protocol;
	pv = bpf_map_lookup_elem(&netd_ports, &pk);
	if (!pv)
		return XDP_PASS;
	fk.addr = ip->saddr;
	fk.port_a = ports[0];
	fk.port_b = ports[1];
	fk.proto = ip->protocol;
	f = bpf_map_lookup_elem(&netd_flows_fwd, &fk);
	if (f && tcp_syn) {
		/* A new connection on a 4-tuple seen before (the client reused its port, as
		 * Katran does: a SYN is always a new pick). The old flow's translation port is
		 * freed now, so the two maps, which evict apart, never disagree about it. */
		forget_reverse(f, &fk);
		f = NULL;
	}
	if (!f) {
		/* Only a flow's first packet opens it; anything else is the kernel path's. */
		if (ip->protocol == IPPROTO_TCP && !tcp_syn)
			return count(PASSED, XDP_PASS);
		if (!new_flow(cfg, pv, &fk, &nf))
			return count(PASSED, XDP_PASS); /* no backend: the kernel refuses */
		f = &nf;
	}
	if (f->flags & NETD_FLOW_KERNEL)
		return count(PASSED, XDP_PASS);
	if (tcp_syn)
		clamp_mss(tcp, end);
	inner_len = bpf_ntohs(ip->tot_len);
	if (inner_len + ENCAP_LEN + sizeof(struct ethhdr) > UNDERLAY_FRAME)
		return count(DROPPED, XDP_DROP); /* a UDP datagram too big to wrap */
	translate(ip, ports, l4_check, cfg->ingress_ip, f->snat_port, f->backend, f->target_port);
	__be32 vtep = f->vtep;
	__be32 backend = f->backend;
	__u16 entropy = (__u16)(fk.addr ^ fk.port_a);

	if (tcp_rst) {
		/* The client aborts: this RST is the flow's last packet. */
		forget_reverse(f, &fk);
		bpf_map_delete_elem(&netd_flows_fwd, &fk);
	}

	/* Wrap: [outer eth | outer ip | udp | vxlan] + the frame, whose Ethernet header
	 * becomes the inner one (task MAC <- the node's ingress MAC). */
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
	mac_for(ieth->h_dest, backend);
	mac_for(ieth->h_source, cfg->ingress_ip);
	eth->h_proto = bpf_htons(ETH_P_IP);
	oip->version = 4;
	oip->ihl = 5;
	oip->tos = 0;
	/* Outer IP length: IP + UDP + VXLAN headers and the inner frame (its Ethernet header
	 * included), which happens to equal ENCAP_LEN (the outer Ethernet header is not
	 * counted, the inner one is). */
	oip->tot_len = bpf_htons(inner_len + ENCAP_LEN);
	oip->id = 0;
	oip->frag_off = 0;
	oip->ttl = 64;
	oip->protocol = IPPROTO_UDP;
	oip->saddr = cfg->node_ip;
	oip->daddr = vtep;
	oip->check = 0;
	oip->check = ip_header_checksum(oip);
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

/* VXLAN to this node: a task's answer to a flow this program translated? */
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
	struct netd_flow_key rk = {};
	struct netd_flow_rev *r;
	__be32 client;

	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	if (vx->vni != bpf_htonl(cfg->vni << 8) || ieth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	if (ip->ihl != 5 || ip->daddr != cfg->ingress_ip || (ip->frag_off & bpf_htons(0x3fff)))
		return XDP_PASS;
	if (ip->protocol == IPPROTO_TCP) {
		if ((void *)(tcp + 1) > end)
			return XDP_PASS;
		l4_check = &tcp->check;
	} else if (ip->protocol == IPPROTO_UDP) {
		l4_check = udp->check ? &udp->check : NULL;
	} else {
		return XDP_PASS;
	}
	rk.addr = ip->saddr;
	rk.port_a = ports[0];
	rk.port_b = ports[1];
	rk.proto = ip->protocol;
	r = bpf_map_lookup_elem(&netd_flows_rev, &rk);
	if (!r)
		return XDP_PASS; /* the kernel path's flow (its ports are below SNAT_FIRST) */
	client = r->client;
	translate(ip, ports, l4_check, cfg->node_ip, r->published_port, client, r->client_port);
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
	/* IP options or fragments: the kernel path. */
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return XDP_PASS;
	cfg = bpf_map_lookup_elem(&netd_ingress_cfg, &zero);
	if (!cfg || ip->daddr != cfg->node_ip)
		return XDP_PASS;
	if (ip->protocol == IPPROTO_UDP && (void *)(udp + 1) <= end && udp->dest == cfg->vxlan_port)
		return reply(ctx, cfg);
	return request(ctx, cfg);
}

char LICENSE[] SEC("license") = "GPL";
