//! The kernel's verifier accepts every program of netd's eBPF objects (loading needs
//! root; nothing is attached or pinned, and the loaded programs and maps go away with
//! this process).

use aya::programs::CgroupSockAddr;
use aya::Ebpf;
use netd_ebpf::{SOCK_LB, SOCK_LB_PROGRAMS};

#[test]
fn sock_lb_programs_pass_the_verifier() {
    let mut obj = Ebpf::load(SOCK_LB).expect("parse sock_lb.o and create its maps");
    for name in SOCK_LB_PROGRAMS {
        let prog: &mut CgroupSockAddr = obj
            .program_mut(name)
            .unwrap_or_else(|| panic!("{name} is not in sock_lb.o"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name} is not a cgroup sock_addr program: {e}"));
        if let Err(e) = prog.load() {
            panic!("the verifier refused {name}: {e:?}");
        }
    }
    for map in [
        "netd_netns",
        "netd_vips",
        "netd_backends",
        "netd_rr",
        "netd_revnat",
        "netd_udp_flows",
        "netd_counters",
    ] {
        assert!(obj.map(map).is_some(), "map {map} missing");
    }
}
