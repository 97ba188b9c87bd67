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

#endif
