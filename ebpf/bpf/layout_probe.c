/* Built and run by build.rs with the host compiler: prints the C layout of every shared
 * struct as Rust constants, so a test can hold the #[repr(C)] mirrors to it. */
#include <stddef.h>
#include <stdio.h>

#include "netd_maps.h"

#define SIZE(t) printf("pub const %s_SIZE: usize = %zu;\n", #t, sizeof(struct t))
#define OFF(t, f) printf("pub const %s_%s: usize = %zu;\n", #t, #f, offsetof(struct t, f))

int main(void)
{
	SIZE(netd_vip_key);
	OFF(netd_vip_key, addr);
	OFF(netd_vip_key, port);
	OFF(netd_vip_key, proto);
	SIZE(netd_vip_value);
	OFF(netd_vip_value, service);
	OFF(netd_vip_value, count);
	SIZE(netd_backend_key);
	OFF(netd_backend_key, service);
	OFF(netd_backend_key, index);
	SIZE(netd_backend_value);
	OFF(netd_backend_value, addr);
	SIZE(netd_netns_net);
	OFF(netd_netns_net, cookie);
	OFF(netd_netns_net, network);
	SIZE(netd_revnat_key);
	OFF(netd_revnat_key, cookie);
	OFF(netd_revnat_key, addr);
	OFF(netd_revnat_key, port);
	SIZE(netd_revnat_value);
	OFF(netd_revnat_value, vip);
	OFF(netd_revnat_value, port);
	SIZE(netd_counter_key);
	OFF(netd_counter_key, vip);
	OFF(netd_counter_key, backend);
	SIZE(netd_counter);
	OFF(netd_counter, connections);
	SIZE(netd_ingress_config);
	OFF(netd_ingress_config, node_ip);
	OFF(netd_ingress_config, ingress_ip);
	OFF(netd_ingress_config, vni);
	OFF(netd_ingress_config, vxlan_port);
	OFF(netd_ingress_config, overlay_mtu);
	OFF(netd_ingress_config, flags);
	OFF(netd_ingress_config, ingress_mask);
	SIZE(netd_port_key);
	OFF(netd_port_key, port);
	OFF(netd_port_key, proto);
	SIZE(netd_port_value);
	OFF(netd_port_value, slot);
	OFF(netd_port_value, count);
	OFF(netd_port_value, target_port);
	SIZE(netd_mesh_backend);
	OFF(netd_mesh_backend, addr);
	OFF(netd_mesh_backend, vtep);
	SIZE(netd_flow_key);
	OFF(netd_flow_key, addr);
	OFF(netd_flow_key, port_a);
	OFF(netd_flow_key, port_b);
	OFF(netd_flow_key, proto);
	SIZE(netd_flow_tuple);
	OFF(netd_flow_tuple, src);
	OFF(netd_flow_tuple, dst);
	OFF(netd_flow_tuple, sport);
	OFF(netd_flow_tuple, dport);
	OFF(netd_flow_tuple, proto);
	SIZE(netd_flow_fwd);
	OFF(netd_flow_fwd, backend);
	OFF(netd_flow_fwd, vtep);
	OFF(netd_flow_fwd, snat_port);
	OFF(netd_flow_fwd, target_port);
	OFF(netd_flow_fwd, flags);
	SIZE(netd_flow_rev);
	OFF(netd_flow_rev, client);
	OFF(netd_flow_rev, client_port);
	OFF(netd_flow_rev, published_port);
	SIZE(netd_return_config);
	OFF(netd_return_config, net);
	OFF(netd_return_config, mask);
	SIZE(netd_return_flow);
	OFF(netd_return_flow, mac);
	OFF(netd_return_flow, port);
	OFF(netd_return_flow, flags);
	OFF(netd_return_flow, seen);
	SIZE(netd_return_origin);
	OFF(netd_return_origin, client);
	OFF(netd_return_origin, task);
	OFF(netd_return_origin, client_port);
	OFF(netd_return_origin, task_port);
	OFF(netd_return_origin, mac);
	OFF(netd_return_origin, proto);
	SIZE(netd_xdp_stats);
	OFF(netd_xdp_stats, forwarded);
	OFF(netd_xdp_stats, returned);
	OFF(netd_xdp_stats, passed);
	OFF(netd_xdp_stats, dropped);
	return 0;
}
