//! The kernel's verifier accepts every program of netd's eBPF objects (loading needs
//! root; nothing is attached; the maps are pinned in a directory of the test's own,
//! removed at the end).

use aya::programs::CgroupSockAddr;
use netd_ebpf::{SOCK_LB_MAPS, SOCK_LB_PROGRAMS};

struct PinDir(std::path::PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn sock_lb_programs_pass_the_verifier() {
    netd_ebpf::ensure_bpffs().expect("bpffs");
    let dir = PinDir(
        std::path::Path::new(netd_ebpf::BPFFS)
            .join(format!("netdtest-verifier-{}", std::process::id())),
    );
    let mut obj = netd_ebpf::load_sock_lb(&dir.0).expect("parse sock_lb.o and create its maps");
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
    for map in SOCK_LB_MAPS {
        assert!(obj.map(map).is_some(), "map {map} missing");
        assert!(dir.0.join(map).exists(), "map {map} is not pinned");
    }
}

#[test]
fn ingress_xdp_passes_the_verifier() {
    netd_ebpf::ensure_bpffs().expect("bpffs");
    let dir = PinDir(
        std::path::Path::new(netd_ebpf::BPFFS)
            .join(format!("netdtest-xdpverifier-{}", std::process::id())),
    );
    let mut obj = netd_ebpf::load_ingress_xdp(&dir.0).expect("parse ingress_xdp.o");
    let prog: &mut aya::programs::Xdp = obj
        .program_mut(netd_ebpf::INGRESS_XDP_PROGRAM)
        .expect("program in the object")
        .try_into()
        .expect("an XDP program");
    if let Err(e) = prog.load() {
        panic!(
            "the verifier refused {}: {e:?}",
            netd_ebpf::INGRESS_XDP_PROGRAM
        );
    }
    for map in netd_ebpf::INGRESS_XDP_MAPS {
        assert!(dir.0.join(map).exists(), "map {map} is not pinned");
    }
}

#[test]
fn the_labs_wire_peer_passes_the_verifier() {
    let mut obj = aya::Ebpf::load(netd_ebpf::WIRE_PEER).expect("parse wire_peer.o");
    let prog: &mut aya::programs::Xdp = obj
        .program_mut("netd_wire_peer")
        .expect("program in the object")
        .try_into()
        .expect("an XDP program");
    if let Err(e) = prog.load() {
        panic!("the verifier refused netd_wire_peer: {e:?}");
    }
}

/// The id of the map pinned at `pin`.
fn pinned_id(pin: &std::path::Path) -> u32 {
    aya::maps::MapInfo::from_pin(pin)
        .unwrap_or_else(|e| panic!("{}: {e}", pin.display()))
        .id()
}

/// A restarted netd loads its objects again over the pins of the one before: the flow
/// tables of the right type and shape are kept (a flow in them outlives the restart),
/// not made afresh as an older netd's LRU tables are.
#[test]
fn loading_again_keeps_the_pinned_flow_tables() {
    netd_ebpf::ensure_bpffs().expect("bpffs");
    let xdp = PinDir(
        std::path::Path::new(netd_ebpf::BPFFS)
            .join(format!("netdtest-xdpkeep-{}", std::process::id())),
    );
    let port = PinDir(
        std::path::Path::new(netd_ebpf::BPFFS)
            .join(format!("netdtest-portkeep-{}", std::process::id())),
    );
    let first = netd_ebpf::load_ingress_xdp(&xdp.0).expect("load ingress_xdp");
    let first_port = netd_ebpf::load_task_port(&port.0).expect("load task_port");
    let pins = [
        xdp.0.join("netd_flows_fwd"),
        xdp.0.join("netd_flows_rev"),
        port.0.join("netd_return_flows"),
    ];
    let ids: Vec<u32> = pins.iter().map(|p| pinned_id(p)).collect();
    drop((first, first_port));
    let _again = netd_ebpf::load_ingress_xdp(&xdp.0).expect("load ingress_xdp again");
    let _again_port = netd_ebpf::load_task_port(&port.0).expect("load task_port again");
    let again: Vec<u32> = pins.iter().map(|p| pinned_id(p)).collect();
    assert_eq!(ids, again, "pinned flow tables were made afresh: {pins:?}");
}
