//! Names of the kernel objects netd owns. Everything netd creates carries a `netd`/`nd`
//! prefix derived from a store id, so the reconciler can find its own objects, tell which
//! desired record each belongs to, and sweep the rest. Interface names must fit in 15
//! bytes (IFNAMSIZ - 1); namespace files are global to the machine, so they also carry the
//! node name (several daemons share one machine in the lab).

/// The node-local egress bridge (Docker's docker_gwbridge).
pub const GWBRIDGE_IF: &str = "netd_gwbridge";
/// Inside an overlay sandbox.
pub const SANDBOX_BRIDGE: &str = "br0";
pub const SANDBOX_VXLAN: &str = "vxlan0";
/// The userspace datapath's TUN device in a sandbox.
pub const SANDBOX_TUN: &str = "lb0";

/// Host-side end of a task endpoint's veth (in the sandbox or the node netns).
pub const ENDPOINT_PREFIX: &str = "nde";
/// Task-side end, before it is moved and renamed; left over only by a crash mid-attach.
pub const TASK_TMP_PREFIX: &str = "ndt";
/// A vxlan device before it is moved into its sandbox.
pub const VXLAN_TMP_PREFIX: &str = "ndvx";
/// A bridge-driver network's bridge.
pub const BRIDGE_PREFIX: &str = "ndbr";
/// The interface alias that marks a task-side interface as netd's (survives renames).
pub const ALIAS_PREFIX: &str = "netd:";

fn short(id: &str) -> &str {
    &id[..id.len().min(10)]
}

pub fn endpoint_if(endpoint_id: &str) -> String {
    format!("{ENDPOINT_PREFIX}{}", short(endpoint_id))
}

pub fn task_tmp_if(endpoint_id: &str) -> String {
    format!("{TASK_TMP_PREFIX}{}", short(endpoint_id))
}

pub fn endpoint_alias(endpoint_id: &str) -> String {
    format!("{ALIAS_PREFIX}{endpoint_id}")
}

pub fn vxlan_tmp_if(network_id: &str) -> String {
    format!("{VXLAN_TMP_PREFIX}{}", short(network_id))
}

pub fn bridge_if(network_id: &str) -> String {
    format!("{BRIDGE_PREFIX}{}", short(network_id))
}

/// Prefix of every sandbox namespace of `node`.
/// Every namespace netd makes (overlay and ingress sandboxes of any node) is named so.
pub const NETNS_PREFIX: &str = "netd-";

pub fn sandbox_prefix(node: &str) -> String {
    format!("{NETNS_PREFIX}{node}-")
}

pub fn sandbox_netns(node: &str, network_id: &str) -> String {
    format!("{}{network_id}", sandbox_prefix(node))
}

/// The node's ingress sandbox (Docker's `ingress-sbox`): where published ports in
/// ingress mode are balanced onto the ingress network.
pub fn ingress_sbox_netns(node: &str) -> String {
    format!("{}isbox", sandbox_prefix(node))
}

/// The ingress sandbox's leg on the gwbridge, towards the node.
pub const INGRESS_SBOX_GWBRIDGE_IF: &str = "eth1";

/// Endpoint ids of the ingress sandbox's two legs (ingress network, gwbridge); the
/// names of their interfaces derive from them as for any endpoint.
pub const INGRESS_SBOX_ENDPOINTS: [&str; 2] = ["isbingress", "isbgwbridg"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_ifnamsiz() {
        let id = "0123456789abcdef";
        for n in [
            endpoint_if(id),
            task_tmp_if(id),
            vxlan_tmp_if(id),
            bridge_if(id),
        ] {
            assert!(n.len() <= 15, "{n}");
        }
        assert!(GWBRIDGE_IF.len() <= 15);
    }
}
