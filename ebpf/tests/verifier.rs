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
