// SPDX-License-Identifier: GPL-2.0
/* The far end of a veth "wire" in the lab. A veth delivers the frames that the program
 * on its other end sends back with XDP_TX (or redirects to it) only when this end runs
 * an XDP program too; a NIC has no such need. This one lets every frame through. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int netd_wire_peer(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
