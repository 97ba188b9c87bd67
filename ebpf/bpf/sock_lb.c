// SPDX-License-Identifier: GPL-2.0
/* Socket-level load balancing for service VIPs (east-west), the way Cilium's socket LB
 * does it: a task's connect() to VIP:port is rewritten to BACKEND:port before the kernel
 * routes anything, so no packet ever carries the VIP and no per-packet NAT or conntrack
 * is needed. UDP datagrams sent to a VIP are rewritten per flow (socket + VIP), and their
 * answers are rewritten back so a recvfrom() sees the VIP it asked.
 *
 * The hooks sit on a cgroup and therefore see every socket of every process under it;
 * they act only for sockets whose network namespace netd manages (netd_netns, keyed by
 * netns cookie), which is what keeps several netd nodes on one machine apart.
 *
 * Every map is pinned by name under the node's directory (/sys/fs/bpf/netd/NODE/), so
 * a restarted netd finds the same maps, and the pinned links keep the programs attached
 * while no netd runs. */

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "netd_maps.h"

#define SYS_PROCEED 1
#define SYS_REJECT 0

/* Network namespaces of the tasks this node's netd serves (value unused). */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} netd_netns SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct netd_vip_key);
	__type(value, struct netd_vip_value);
} netd_vips SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct netd_backend_key);
	__type(value, struct netd_backend_value);
} netd_backends SEC(".maps");

/* Next round-robin slot per service. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u32);
} netd_rr SEC(".maps");

/* The networks of every task namespace: (cookie, network) -> 1. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct netd_netns_net);
	__type(value, __u8);
} netd_netns_nets SEC(".maps");

/* The network of every VIP address (network byte order) -> netd's network number. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u32);
} netd_vip_nets SEC(".maps");

/* Backend -> VIP per socket, for recvmsg4 and getpeername4. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct netd_revnat_key);
	__type(value, struct netd_revnat_value);
} netd_revnat SEC(".maps");

/* UDP flow affinity: (socket, VIP, port) -> backend address. */
struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct netd_revnat_key);
	__type(value, struct netd_backend_value);
} netd_udp_flows SEC(".maps");

struct {
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct netd_counter_key);
	__type(value, struct netd_counter);
} netd_counters SEC(".maps");

static __always_inline int managed(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);

	return bpf_map_lookup_elem(&netd_netns, &cookie) != NULL;
}

/* The VIP entry for this destination: exact (addr, port, proto) first, then the
 * whole-address wildcard (port 0, proto 0), which is what a service VIP is: any port
 * goes to the same port on a backend, as Docker's VIPs do. */
static __always_inline struct netd_vip_value *find_vip(struct netd_vip_key *k)
{
	struct netd_vip_value *v = bpf_map_lookup_elem(&netd_vips, k);
	struct netd_vip_key any = { .addr = k->addr };

	return v ? v : bpf_map_lookup_elem(&netd_vips, &any);
}

/* Whether the socket's task is on the network of `vip`: a task that learned another
 * network's VIP is refused, not sent to a backend it has no business with. A VIP without
 * a recorded network is refused too (netd records it before the VIP itself). */
static __always_inline int on_vip_network(struct bpf_sock_addr *ctx, __u32 vip)
{
	__u32 *net = bpf_map_lookup_elem(&netd_vip_nets, &vip);
	struct netd_netns_net k = {};

	if (!net)
		return 0;
	k.cookie = bpf_get_netns_cookie(ctx);
	k.network = *net;
	return bpf_map_lookup_elem(&netd_netns_nets, &k) != NULL;
}

/* user_port holds the port in network byte order in its low 16 bits. */
static __always_inline struct netd_vip_key vip_key_of(struct bpf_sock_addr *ctx)
{
	struct netd_vip_key k = {
		.addr = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
	};
	return k;
}

static __always_inline void count(__u32 vip, __u32 backend)
{
	struct netd_counter_key ck = { .vip = vip, .backend = backend };
	struct netd_counter *c = bpf_map_lookup_elem(&netd_counters, &ck);

	if (!c) {
		struct netd_counter zero = {};

		bpf_map_update_elem(&netd_counters, &ck, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&netd_counters, &ck);
		if (!c)
			return;
	}
	__sync_fetch_and_add(&c->connections, 1);
}

/* Picks the next backend of `v` round-robin; 0 if it has none. */
static __always_inline __u32 pick(struct netd_vip_value *v, struct netd_backend_key *bk)
{
	__u32 count = v->count;
	__u32 *next;
	struct netd_backend_value *b;

	if (count == 0)
		return 0;
	next = bpf_map_lookup_elem(&netd_rr, &v->service);
	bk->service = v->service;
	bk->index = next ? __sync_fetch_and_add(next, 1) % count : 0;
	b = bpf_map_lookup_elem(&netd_backends, bk);
	return b ? b->addr : 0;
}

static __always_inline void remember(struct bpf_sock_addr *ctx, __u32 backend,
				     struct netd_vip_key *vip)
{
	struct netd_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = backend,
		.port = vip->port,
	};
	struct netd_revnat_value rv = { .vip = vip->addr, .port = vip->port };

	bpf_map_update_elem(&netd_revnat, &rk, &rv, BPF_ANY);
}

SEC("cgroup/connect4")
int netd_connect4(struct bpf_sock_addr *ctx)
{
	struct netd_vip_key k;
	struct netd_vip_value *v;
	struct netd_backend_key bk = {};
	__u32 backend;

	if (!managed(ctx))
		return SYS_PROCEED;
	k = vip_key_of(ctx);
	v = find_vip(&k);
	if (!v)
		return SYS_PROCEED;
	if (!on_vip_network(ctx, k.addr))
		return SYS_REJECT;
	backend = pick(v, &bk);
	if (!backend)
		return SYS_REJECT; /* a service without tasks refuses at once */
	ctx->user_ip4 = backend;
	count(k.addr, backend);
	remember(ctx, backend, &k);
	return SYS_PROCEED;
}

SEC("cgroup/sendmsg4")
int netd_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct netd_vip_key k;
	struct netd_vip_value *v;
	struct netd_backend_key bk = {};
	struct netd_backend_value *flow;
	struct netd_revnat_key fk;
	__u32 backend;

	if (!managed(ctx))
		return SYS_PROCEED;
	k = vip_key_of(ctx);
	v = find_vip(&k);
	if (!v)
		return SYS_PROCEED;
	if (!on_vip_network(ctx, k.addr))
		return SYS_REJECT;
	fk.cookie = bpf_get_socket_cookie(ctx);
	fk.addr = k.addr;
	fk.port = k.port;
	fk.pad = 0;
	flow = bpf_map_lookup_elem(&netd_udp_flows, &fk);
	if (flow) {
		backend = flow->addr;
	} else {
		struct netd_backend_value nf = {};

		backend = pick(v, &bk);
		if (!backend)
			return SYS_REJECT;
		nf.addr = backend;
		bpf_map_update_elem(&netd_udp_flows, &fk, &nf, BPF_ANY);
		count(k.addr, backend);
	}
	ctx->user_ip4 = backend;
	remember(ctx, backend, &k);
	return SYS_PROCEED;
}

/* Answers from a backend to a socket that sent to a VIP come "from" the VIP. */
static __always_inline int reverse(struct bpf_sock_addr *ctx)
{
	struct netd_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	struct netd_revnat_value *rv = bpf_map_lookup_elem(&netd_revnat, &rk);

	if (rv) {
		ctx->user_ip4 = rv->vip;
		ctx->user_port = rv->port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/recvmsg4")
int netd_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse(ctx);
}

SEC("cgroup/getpeername4")
int netd_getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse(ctx);
}

char LICENSE[] SEC("license") = "GPL";
