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
	return 0;
}
