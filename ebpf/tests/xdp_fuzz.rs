//! `ingress_xdp` run through BPF_PROG_TEST_RUN on crafted and malformed frames: a seeded
//! pseudo-random corpus (valid Ethernet/IPv4/TCP/UDP/VXLAN frames, then truncated,
//! given lying lengths, options, fragment bits, bad TCP offsets and UDP lengths, short
//! inner frames, random bytes), the documented rules, the regressions the fuzzing found,
//! the flow tables' resistance to floods (unconfirmed flows never evict confirmed ones,
//! blind ACKs confirm nothing) and the reply path's source check (answers only from the
//! flow's VTEP).
//!
//! Needs root. Each test runs on a thread of its own inside a network namespace of its
//! own (unshared, so it goes with the thread): a veth whose end `fz0` holds the node's
//! address and permanent neighbours for the other node's VTEP and the client, so that
//! the program's `bpf_fib_lookup` finds a route and a neighbour as on a real node and a
//! good frame really comes back as XDP_TX. The maps are pinned in a directory of the
//! test's own under the bpffs, removed at the end (also on panic).
//!
//! Addresses: the node 198.18.0.11, the other node (VTEP) 198.18.0.12, the client
//! 198.18.0.100, the node's ingress address 198.19.255.11, the other node's 198.19.255.12,
//! tasks 198.19.255.21/22 (on the other node) and .31 (on this node); a host that is no
//! VTEP of any task, 198.18.0.66, forges answers.
//!
//! The harness runs the program as netd configures it by default, flows keeping the
//! client's address (`--mesh-source client`); the tests whose names say `snat` run it as
//! `--mesh-source snat` does. The checks of a wrapped or unwrapped frame follow the
//! harness's setting.

mod common;
use common::{checksum, mac_of};

use std::cell::Cell;
use std::collections::HashMap as Map;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::Xdp;
use aya::{Ebpf, TestRun, TestRunOptions};
use netd_ebpf::maps::{
    BackendKey, FlowFwd, FlowFwdNew, FlowKey, FlowRev, FlowTuple, IngressConfig, MeshBackend,
    PortKey, PortValue, XdpStats, FLOWS_BAD_ACK, FLOWS_CONFIRMED, FLOWS_COUNTERS, FLOWS_EXPIRED,
    FLOWS_ICMP_RELAYED, FLOWS_LOST, FLOWS_OPENED, FLOWS_REFUSED, FLOWS_TOO_BIG, FLOWS_WRONG_VTEP,
    FLOW_ANSWERED, FLOW_CLIENT, FLOW_KERNEL, MESH_CLIENT_SOURCE,
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const VTEP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// A host of the underlay that is no task's VTEP.
const FORGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 66);
/// A router between the node and the client.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const INGRESS: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 11);
/// The other node's ingress address (its sandbox's MAC is no answer's to this node).
const OTHER_SANDBOX: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 12);
const TASKS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 19, 255, 21),
    Ipv4Addr::new(198, 19, 255, 22),
];
const LOCAL_TASK: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 31);
const NODE_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x12, 0, 11];
const VTEP_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x12, 0, 12];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x12, 0, 100];
const VNI: u32 = 4096;
const VXLAN_PORT: u16 = 4789;
/// TCP to both remote tasks.
const TCP_PORT: u16 = 4567;
/// UDP to the first remote task.
const UDP_PORT: u16 = 4568;
/// TCP and UDP to the local task only (the kernel path's).
const LOCAL_PORT: u16 = 4569;
/// UDP to the first remote task as well, on the same target port as UDP_PORT.
const UDP_PORT_TOO: u16 = 4570;
const TARGET: u16 = 80;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ETH: usize = 14;
const ETH_ALEN: usize = 6;
/// What encapsulation adds: outer Ethernet, IPv4, UDP and VXLAN headers.
const ENCAP: usize = 14 + 20 + 8 + 8;
const OVERLAY_MSS: u16 = 1410;

// ---- the harness: a namespace, the program, its maps ----

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Harness {
    obj: Ebpf,
    ifindex: u32,
    _dir: PinDir,
}

thread_local! {
    /// Whether the harness on this thread keeps the client's address (its config's
    /// MESH_CLIENT_SOURCE): what check_wrapped expects.
    static CLIENT_SOURCE: Cell<bool> = const { Cell::new(true) };
}

fn client_source() -> bool {
    CLIENT_SOURCE.with(Cell::get)
}

/// Runs `f` on a thread of its own in a fresh network namespace with the program
/// loaded and its maps filled; `flow_entries` sizes the flow tables.
fn with_harness<T: Send + 'static>(
    name: &str,
    flow_entries: Option<u32>,
    f: impl FnOnce(&mut Harness) -> T + Send + 'static,
) -> T {
    let options = netd_ebpf::IngressOptions {
        flow_entries,
        ..Default::default()
    };
    with_harness_options(name, options, f)
}

/// As [`with_harness`], the program run as `--mesh-source snat` configures it.
fn with_snat_harness(name: &str, f: fn(&mut Harness)) {
    with_harness(name, None, move |h| {
        h.snat();
        f(h)
    });
}

/// As [`with_harness`], the program loaded with `options`.
fn with_harness_options<T: Send + 'static>(
    name: &str,
    options: netd_ebpf::IngressOptions,
    f: impl FnOnce(&mut Harness) -> T + Send + 'static,
) -> T {
    let name = name.to_string();
    let thread = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare a network namespace (needs root)");
        let ifindex = wire();
        netd_ebpf::ensure_bpffs().expect("bpffs");
        let dir = PinDir(
            std::path::Path::new(netd_ebpf::BPFFS)
                .join(format!("netdtest-xdpfuzz-{name}-{}", std::process::id())),
        );
        let mut obj = netd_ebpf::load_ingress_xdp_with(&dir.0, &options)
            .expect("parse ingress_xdp.o and create its maps");
        let prog: &mut Xdp = obj
            .program_mut(netd_ebpf::INGRESS_XDP_PROGRAM)
            .expect("program in the object")
            .try_into()
            .expect("an XDP program");
        prog.load().expect("the verifier accepts netd_ingress");
        let mut h = Harness {
            obj,
            ifindex,
            _dir: dir,
        };
        h.program();
        f(&mut h)
    });
    match thread.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The namespace's wire: veth fz0 (the node's address and MAC) to fz1, forwarding on
/// (bpf_fib_lookup refuses to route from an interface that does not forward), and
/// permanent neighbours for the VTEP and the client. Returns fz0's index.
fn wire() -> u32 {
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let steps = [
        "link set lo up".to_string(),
        "link add fz0 type veth peer name fz1".to_string(),
        format!("link set fz0 address {}", mac(NODE_MAC)),
        format!("addr add {NODE}/24 dev fz0"),
        "link set fz0 up".to_string(),
        "link set fz1 up".to_string(),
        format!(
            "neigh replace {VTEP} lladdr {} dev fz0 nud permanent",
            mac(VTEP_MAC)
        ),
        format!(
            "neigh replace {CLIENT} lladdr {} dev fz0 nud permanent",
            mac(CLIENT_MAC)
        ),
    ];
    for step in steps {
        // A child inherits the network namespace of the thread that starts it.
        let out = Command::new("ip")
            .args(step.split(' '))
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // /proc/sys/net is the reading thread's namespace's.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("forwarding on");
    let name = std::ffi::CString::new("fz0").expect("name");
    // SAFETY: a NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index != 0, "fz0 has no index");
    index
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

impl Harness {
    /// The config as netd writes it, for an overlay of `overlay_mtu` (0: the config of a
    /// netd that did not say), keeping the client's address or not as the thread's
    /// [`CLIENT_SOURCE`] says.
    fn configure(&mut self, overlay_mtu: u16) {
        let mut cfg: Array<_, IngressConfig> =
            Array::try_from(self.obj.map_mut("netd_ingress_cfg").expect("cfg map")).expect("cfg");
        cfg.set(
            0,
            IngressConfig {
                node_ip: be(NODE),
                ingress_ip: be(INGRESS),
                vni: VNI,
                vxlan_port: VXLAN_PORT.to_be(),
                overlay_mtu,
                flags: if client_source() {
                    MESH_CLIENT_SOURCE
                } else {
                    0
                },
                ingress_mask: 0xffff_ff00u32.to_be(),
            },
            0,
        )
        .expect("write config");
    }

    /// Runs the program as `--mesh-source snat` configures it from now on.
    fn snat(&mut self) {
        CLIENT_SOURCE.with(|c| c.set(false));
        self.program();
    }

    /// Config, published ports and backends, as netd writes them (a 1500-byte underlay).
    fn program(&mut self) {
        self.configure(1500 - ENCAP as u16);
        let mut backends: HashMap<_, BackendKey, MeshBackend> =
            HashMap::try_from(self.obj.map_mut("netd_mesh_backends").expect("backends"))
                .expect("backends");
        let slots: [(u32, Vec<(Ipv4Addr, Ipv4Addr)>); 3] = [
            (1, vec![(TASKS[0], VTEP), (TASKS[1], VTEP)]),
            (2, vec![(TASKS[0], VTEP)]),
            (3, vec![(LOCAL_TASK, NODE)]),
        ];
        for (slot, list) in &slots {
            for (i, (addr, vtep)) in list.iter().enumerate() {
                backends
                    .insert(
                        BackendKey {
                            service: *slot,
                            index: i as u32,
                        },
                        MeshBackend {
                            addr: be(*addr),
                            vtep: be(*vtep),
                        },
                        0,
                    )
                    .expect("write backend");
            }
        }
        let mut rr: HashMap<_, u32, u32> =
            HashMap::try_from(self.obj.map_mut("netd_mesh_rr").expect("rr")).expect("rr");
        for (slot, _) in &slots {
            rr.insert(slot, 0, 0).expect("write rr");
        }
        let mut ports: HashMap<_, PortKey, PortValue> =
            HashMap::try_from(self.obj.map_mut("netd_ports").expect("ports")).expect("ports");
        for (proto, port, slot, count) in [
            (TCP, TCP_PORT, 1, 2),
            (UDP, UDP_PORT, 2, 1),
            (UDP, UDP_PORT_TOO, 2, 1),
            (TCP, LOCAL_PORT, 3, 1),
            (UDP, LOCAL_PORT, 3, 1),
        ] {
            ports
                .insert(
                    PortKey {
                        port: port.to_be(),
                        proto,
                        pad: 0,
                    },
                    PortValue {
                        slot,
                        count,
                        target_port: TARGET.to_be(),
                        pad: 0,
                    },
                    0,
                )
                .expect("write port");
        }
    }

    /// One BPF_PROG_TEST_RUN of `frame` arriving on fz0: the verdict and the frame as
    /// the program left it, or the kernel's error.
    fn run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>), std::io::Error> {
        let prog: &Xdp = self
            .obj
            .program(netd_ebpf::INGRESS_XDP_PROGRAM)
            .expect("program")
            .try_into()
            .expect("XDP");
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex (offsets into the frame; data_end is its length).
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.ifindex.to_ne_bytes());
        let mut out = vec![0u8; 4096];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        };
        match prog.test_run(opts) {
            Ok(r) => {
                out.truncate(r.data_size_out as usize);
                Ok((r.return_value, out))
            }
            Err(aya::programs::ProgramError::SyscallError(e)) => Err(e.io_error),
            Err(e) => panic!("test_run: {e}"),
        }
    }

    fn stats(&self) -> XdpStats {
        let m: PerCpuArray<_, XdpStats> =
            PerCpuArray::try_from(self.obj.map("netd_xdp_stats").expect("stats")).expect("stats");
        let mut s = XdpStats::default();
        for c in m.get(&0, 0).expect("read stats").iter() {
            s.forwarded += c.forwarded;
            s.returned += c.returned;
            s.passed += c.passed;
            s.dropped += c.dropped;
        }
        s
    }

    fn flow_stat(&self, which: u32) -> u64 {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.obj.map("netd_xdp_flow_stats").expect("flow stats"))
                .expect("flow stats");
        m.get(&which, 0).expect("read flow stats").iter().sum()
    }

    /// The established forward map, `netd_flows_fwd`.
    fn fwd_map(&self, name: &str) -> HashMap<&MapData, FlowKey, FlowFwd> {
        HashMap::try_from(self.obj.map(name).expect("flow map")).expect("flow map")
    }

    /// The unconfirmed forward map, `netd_flows_fwd_new`.
    fn new_map(&self) -> HashMap<&MapData, FlowKey, FlowFwdNew> {
        HashMap::try_from(self.obj.map("netd_flows_fwd_new").expect("flow map")).expect("flow map")
    }

    fn rev_map(&self, name: &str) -> HashMap<&MapData, FlowTuple, FlowRev> {
        HashMap::try_from(self.obj.map(name).expect("flow map")).expect("flow map")
    }

    fn rev_map_mut(&mut self, name: &str) -> HashMap<&mut MapData, FlowTuple, FlowRev> {
        HashMap::try_from(self.obj.map_mut(name).expect("flow map")).expect("flow map")
    }

    fn fwd_map_mut(&mut self, name: &str) -> HashMap<&mut MapData, FlowKey, FlowFwd> {
        HashMap::try_from(self.obj.map_mut(name).expect("flow map")).expect("flow map")
    }

    /// Runs `frame`, which must come back as XDP_TX; the frame sent.
    fn tx(&self, frame: &[u8], what: &str) -> Vec<u8> {
        let (verdict, out) = self.run(frame).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(verdict, XDP_TX, "{what}: verdict\n{}", hex(frame));
        out
    }
}

// ---- frames ----

fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

/// The options of a Linux SYN: MSS 1460, SACK permitted, timestamps, window scale.
const SYN_OPTIONS: [u8; 20] = [
    2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
];

struct Seg<'a> {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    options: &'a [u8],
    payload: &'a [u8],
}

fn tcp(s: &Seg) -> Vec<u8> {
    let doff = (20 + s.options.len()) / 4;
    let mut t = Vec::new();
    t.extend_from_slice(&s.sport.to_be_bytes());
    t.extend_from_slice(&s.dport.to_be_bytes());
    t.extend_from_slice(&0x1000_0000u32.to_be_bytes()); // seq
    let ack = if s.flags & ACK != 0 {
        0x2000_0000u32
    } else {
        0
    };
    t.extend_from_slice(&ack.to_be_bytes());
    t.push((doff as u8) << 4);
    t.push(s.flags);
    t.extend_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    t.extend_from_slice(s.options);
    t.extend_from_slice(s.payload);
    let c = checksum(&[&pseudo(&s.src.octets(), &s.dst.octets(), TCP, t.len()), &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8], sum: bool) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    if sum {
        let mut c = checksum(&[&pseudo(&src.octets(), &dst.octets(), UDP, u.len()), &u]);
        if c == 0 {
            c = 0xffff;
        }
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    u
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&0x1234u16.to_be_bytes()); // id
    ip.extend_from_slice(&0x4000u16.to_be_bytes()); // DF: not a fragment
    ip.push(64);
    ip.push(proto);
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(l4);
    ip
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A client's frame to the node.
fn client_frame(src: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    ethernet(NODE_MAC, CLIENT_MAC, 0x0800, &ipv4(src, NODE, proto, l4))
}

fn syn(sport: u16, dport: u16) -> Vec<u8> {
    client_frame(
        CLIENT,
        TCP,
        &tcp(&Seg {
            src: CLIENT,
            dst: NODE,
            sport,
            dport,
            flags: SYN,
            options: &SYN_OPTIONS,
            payload: &[],
        }),
    )
}

fn segment(src: Ipv4Addr, sport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(
        src,
        TCP,
        &tcp(&Seg {
            src,
            dst: NODE,
            sport,
            dport: TCP_PORT,
            flags,
            options: &[],
            payload,
        }),
    )
}

fn datagram(src: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    client_frame(src, UDP, &udp(src, NODE, sport, dport, payload, true))
}

/// A VXLAN frame from the other node to this one carrying `inner` (an Ethernet frame).
fn vxlan(inner: &[u8], vni: u32) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&0x0800_0000u32.to_be_bytes());
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    let u = udp(VTEP, NODE, 51000, VXLAN_PORT, &payload, false);
    ethernet(NODE_MAC, VTEP_MAC, 0x0800, &ipv4(VTEP, NODE, UDP, &u))
}

/// VXLAN frame `f` as another host would send it: outer IPv4 source `src` (header
/// checksum fixed; the outer UDP checksum is none).
fn from_outer(mut f: Vec<u8>, src: Ipv4Addr) -> Vec<u8> {
    f[ETH + 12..ETH + 16].copy_from_slice(&src.octets());
    fix_ip(&mut f, ETH);
    f
}

/// The sequence number of every segment `tcp` builds: the task's ISN in its SYN-ACKs.
const TASK_ISN: u32 = 0x1000_0000;

/// Sets the sequence and/or acknowledgement number of the TCP segment whose IPv4 header
/// (20 bytes) is at `ip` in `f`, with the TCP checksum.
fn set_seq_ack(f: &mut [u8], ip: usize, seq: Option<u32>, ack: Option<u32>) {
    let t = ip + 20;
    if let Some(seq) = seq {
        f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    }
    if let Some(ack) = ack {
        f[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
    }
    f[t + 16..t + 18].copy_from_slice(&[0, 0]);
    let tot = u16_at(f, ip + 2) as usize;
    let c = checksum(&[
        &pseudo(&f[ip + 12..ip + 16], &f[ip + 16..ip + 20], TCP, tot - 20),
        &f[t..ip + tot],
    ]);
    f[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
}

/// The client's segment (from CLIENT:`sport`) with acknowledgement number `ack`.
fn segment_acking(sport: u16, flags: u8, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = segment(CLIENT, sport, flags, payload);
    set_seq_ack(&mut f, ETH, None, Some(ack));
    f
}

/// The task's SYN-ACK in TCP flow `f`, with sequence number `isn`.
fn syn_ack(f: &Flow, isn: u32) -> Vec<u8> {
    let mut a = answer(f, SYN | ACK, b"");
    set_seq_ack(&mut a, ENCAP + ETH, Some(isn), None);
    a
}

/// A flow as the program translated it: the task side, the client as the task sees it
/// (`seen`: the node's ingress address, or the client's own; `snat_port`: its port),
/// and the client side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    proto: u8,
    task: Ipv4Addr,
    seen: Ipv4Addr,
    snat_port: u16,
    client: Ipv4Addr,
    client_port: u16,
    published: u16,
}

/// The task's answer in flow `f`: TCP with `flags`, or a UDP datagram.
fn answer(f: &Flow, flags: u8, payload: &[u8]) -> Vec<u8> {
    let l4 = if f.proto == TCP {
        tcp(&Seg {
            src: f.task,
            dst: f.seen,
            sport: TARGET,
            dport: f.snat_port,
            flags,
            options: if flags & SYN != 0 {
                &SYN_OPTIONS[..4]
            } else {
                &[]
            },
            payload,
        })
    } else {
        udp(f.task, f.seen, TARGET, f.snat_port, payload, true)
    };
    // To this node's ingress sandbox, as the task (snat) or its node's sandbox (client
    // source) sends it.
    let inner = ethernet(
        mac_of(INGRESS),
        mac_of(f.task),
        0x0800,
        &ipv4(f.task, f.seen, f.proto, &l4),
    );
    vxlan(&inner, VNI)
}

impl Flow {
    /// The client side of the flow: (protocol, client, client port, published port).
    fn key(&self) -> (u8, Ipv4Addr, u16, u16) {
        (self.proto, self.client, self.client_port, self.published)
    }
}

/// A well-formed ICMP error to the node quoting a packet it sent (IP header without
/// options, both ports): the quoted packet's (protocol, destination, destination port,
/// source port), its flow's key.
fn icmp_of(f: &[u8]) -> Option<(u8, Ipv4Addr, u16, u16)> {
    if !is_ipv4(f) || f.len() < ETH + 20 || f[ETH] != 0x45 || f[ETH + 9] != 1 {
        return None;
    }
    let tot = u16_at(f, ETH + 2) as usize;
    if checksum(&[&f[ETH..ETH + 20]]) != 0 || tot < 20 + 8 + 24 || ETH + tot > f.len() {
        return None;
    }
    let q = ETH + 28;
    if ip_at(f, ETH + 16) != NODE || f[q] != 0x45 || ip_at(f, q + 12) != NODE {
        return None;
    }
    Some((
        f[q + 9],
        ip_at(f, q + 16),
        u16_at(f, q + 22),
        u16_at(f, q + 20),
    ))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---- the test's own parser: what is well-formed, and what must come out ----

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn ip_at(b: &[u8], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3])
}

/// An IPv4 packet at `off` in `f`, as the kernel would take it: IPv4, header without
/// options, not a fragment, the header checksum right, the total length at least the
/// header and within the frame, and a TCP header (data offset 5 or more, within the
/// packet) or a UDP one (length 8 or more, within the packet). Returns (total length,
/// protocol).
fn well_formed_ip(f: &[u8], off: usize) -> Option<(usize, u8)> {
    if f.len() < off + 20 || f[off] != 0x45 {
        return None;
    }
    let tot = u16_at(f, off + 2) as usize;
    if u16_at(f, off + 6) & 0x3fff != 0 || checksum(&[&f[off..off + 20]]) != 0 {
        return None;
    }
    if tot < 20 || off + tot > f.len() {
        return None;
    }
    let proto = f[off + 9];
    let l4 = off + 20;
    match proto {
        TCP => {
            let doff = (f.get(l4 + 12)? >> 4) as usize * 4;
            (tot >= 40 && doff >= 20 && doff <= tot - 20).then_some((tot, proto))
        }
        UDP => {
            let len = u16_at(f, l4 + 4) as usize;
            (tot >= 28 && len >= 8 && len <= tot - 20).then_some((tot, proto))
        }
        _ => None,
    }
}

/// Whether the TCP/UDP checksum of the packet at `off` (well-formed) is right (a UDP
/// checksum of 0 is "none" and counts as right).
fn l4_checksum_ok(f: &[u8], off: usize) -> bool {
    let tot = u16_at(f, off + 2) as usize;
    let proto = f[off + 9];
    let l4 = &f[off + 20..off + tot];
    if proto == UDP {
        if u16_at(l4, 6) == 0 {
            return true;
        }
        let len = u16_at(l4, 4) as usize;
        return checksum(&[
            &pseudo(&f[off + 12..off + 16], &f[off + 16..off + 20], UDP, len),
            &l4[..len],
        ]) == 0;
    }
    checksum(&[
        &pseudo(
            &f[off + 12..off + 16],
            &f[off + 16..off + 20],
            proto,
            l4.len(),
        ),
        l4,
    ]) == 0
}

fn is_ipv4(f: &[u8]) -> bool {
    f.len() >= ETH + 20 && u16_at(f, 12) == 0x0800
}

fn published(proto: u8, port: u16) -> bool {
    matches!(
        (proto, port),
        (TCP, TCP_PORT)
            | (UDP, UDP_PORT)
            | (UDP, UDP_PORT_TOO)
            | (TCP, LOCAL_PORT)
            | (UDP, LOCAL_PORT)
    )
}

/// A well-formed request to a published port: (protocol, destination port).
fn request_of(f: &[u8]) -> Option<(u8, u16)> {
    if !is_ipv4(f) {
        return None;
    }
    let (_, proto) = well_formed_ip(f, ETH)?;
    if ip_at(f, ETH + 16) != NODE {
        return None;
    }
    let dport = u16_at(f, ETH + 22);
    if proto == UDP && dport == VXLAN_PORT {
        return None;
    }
    published(proto, dport).then_some((proto, dport))
}

/// A well-formed VXLAN frame to the node carrying a well-formed IPv4 packet to the
/// node's ingress address within the outer packet: the inner packet's offset.
fn reply_of(f: &[u8]) -> Option<usize> {
    if !is_ipv4(f) {
        return None;
    }
    let (outer, proto) = well_formed_ip(f, ETH)?;
    if proto != UDP || ip_at(f, ETH + 16) != NODE || u16_at(f, ETH + 22) != VXLAN_PORT {
        return None;
    }
    let ulen = u16_at(f, ETH + 24) as usize;
    let vx = ETH + 28;
    let inner_ip = vx + 8 + ETH;
    if f.len() < inner_ip
        || u32::from_be_bytes([f[vx], f[vx + 1], f[vx + 2], f[vx + 3]]) != 0x0800_0000
    {
        return None;
    }
    if u32::from_be_bytes([f[vx + 4], f[vx + 5], f[vx + 6], f[vx + 7]]) != VNI << 8
        || u16_at(f, vx + 8 + 12) != 0x0800
    {
        return None;
    }
    let (inner, _) = well_formed_ip(f, inner_ip)?;
    // The inner packet lies within the outer UDP datagram.
    if 8 + 8 + ETH + inner > ulen || ulen > outer - 20 {
        return None;
    }
    (ip_at(f, inner_ip + 16) == INGRESS || f[vx + 8..vx + 14] == mac_of(INGRESS))
        .then_some(inner_ip)
}

/// Checks the frame a well-formed request (`input`) became: one VXLAN packet to the
/// other node, outer headers right (lengths, IPv4 checksum, VNI), the inner packet the
/// input translated to a task. Returns the flow it shows.
fn check_wrapped(input: &[u8], out: &[u8], what: &str) -> Flow {
    let ctx = || format!("{what}\n in: {}\nout: {}", hex(input), hex(out));
    assert_eq!(out.len(), input.len() + ENCAP, "length: {}", ctx());
    assert_eq!(&out[0..6], &VTEP_MAC, "outer destination MAC: {}", ctx());
    assert_eq!(&out[6..12], &NODE_MAC, "outer source MAC: {}", ctx());
    assert_eq!(u16_at(out, 12), 0x0800, "outer ethertype: {}", ctx());
    let o = ETH;
    let inner_tot = u16_at(input, ETH + 2) as usize;
    assert_eq!(out[o], 0x45, "outer version/IHL: {}", ctx());
    let outer_tot = u16_at(out, o + 2) as usize;
    assert_eq!(
        outer_tot,
        20 + 8 + 8 + ETH + inner_tot,
        "outer length: {}",
        ctx()
    );
    // Bytes past the outer packet: the input's own Ethernet padding, nothing else.
    assert_eq!(
        out.len() - ETH - outer_tot,
        input.len() - ETH - inner_tot,
        "trailing bytes: {}",
        ctx()
    );
    assert_eq!(
        checksum(&[&out[o..o + 20]]),
        0,
        "outer IPv4 checksum: {}",
        ctx()
    );
    assert_eq!(
        u16_at(out, o + 6) & 0x3fff,
        0,
        "outer fragment bits: {}",
        ctx()
    );
    assert!(out[o + 8] > 0, "outer TTL: {}", ctx());
    assert_eq!(out[o + 9], UDP, "outer protocol: {}", ctx());
    assert_eq!(ip_at(out, o + 12), NODE, "outer source: {}", ctx());
    assert_eq!(ip_at(out, o + 16), VTEP, "outer destination: {}", ctx());
    let u = o + 20;
    assert!(u16_at(out, u) >= 0xc000, "outer UDP source port: {}", ctx());
    assert_eq!(u16_at(out, u + 2), VXLAN_PORT, "outer UDP port: {}", ctx());
    assert_eq!(
        u16_at(out, u + 4) as usize,
        outer_tot - 20,
        "outer UDP length: {}",
        ctx()
    );
    assert_eq!(
        u16_at(out, u + 6),
        0,
        "outer UDP checksum (none): {}",
        ctx()
    );
    let vx = u + 8;
    assert_eq!(
        &out[vx..vx + 8],
        &[8, 0, 0, 0, 0, 0x10, 0, 0],
        "VXLAN header: {}",
        ctx()
    );
    let ie = vx + 8;
    let inner = &out[ie..];
    let task = ip_at(inner, ETH + 16);
    assert!(TASKS.contains(&task), "inner destination {task}: {}", ctx());
    // The frame goes to the task itself, from this node's ingress MAC (which the task's
    // port remembers, keeping the client's address, to send the answers back here).
    let seen = if client_source() {
        ip_at(input, ETH + 12)
    } else {
        INGRESS
    };
    assert_eq!(
        &inner[0..6],
        &mac_of(task),
        "inner destination MAC: {}",
        ctx()
    );
    assert_eq!(
        &inner[6..12],
        &mac_of(INGRESS),
        "inner source MAC: {}",
        ctx()
    );
    assert_eq!(ip_at(inner, ETH + 12), seen, "inner source: {}", ctx());
    assert!(
        well_formed_ip(inner, ETH).is_some(),
        "inner packet not well-formed: {}",
        ctx()
    );
    if l4_checksum_ok(input, ETH) {
        assert!(l4_checksum_ok(inner, ETH), "inner L4 checksum: {}", ctx());
    }
    let proto = input[ETH + 9];
    let snat_port = u16_at(inner, ETH + 20);
    // The client's own port, unless the task would see two flows alike (then one of the
    // translation range, as for snat).
    assert!(
        snat_port >= 32768 || (client_source() && snat_port == u16_at(input, ETH + 20)),
        "translation port {snat_port}: {}",
        ctx()
    );
    assert_eq!(u16_at(inner, ETH + 22), TARGET, "target port: {}", ctx());
    // Everything else is the input's: IP header but addresses and checksum, L4 but
    // ports and checksum (and a SYN's MSS, clamped to what fits the overlay).
    let i = ETH;
    let same = |a: std::ops::Range<usize>| assert_eq!(&inner[a.clone()], &input[a], "{}", ctx());
    same(i..i + 10);
    let l4 = i + 20;
    let check = if proto == TCP { l4 + 16 } else { l4 + 6 };
    same(l4 + 4..check);
    let mut rest_in = input[check + 2..].to_vec();
    let rest_out = &inner[check + 2..];
    if proto == TCP
        && input[l4 + 13] & (SYN | ACK | RST) == SYN
        && input[l4 + 12] >> 4 >= 6
        && rest_in[2..4] == [2, 4]
        && u16_at(&rest_in, 4) > OVERLAY_MSS
    {
        rest_in[4..6].copy_from_slice(&OVERLAY_MSS.to_be_bytes());
    }
    assert_eq!(rest_out, &rest_in[..], "payload: {}", ctx());
    Flow {
        proto,
        task,
        seen,
        snat_port,
        client: ip_at(input, ETH + 12),
        client_port: u16_at(input, ETH + 20),
        published: u16_at(input, ETH + 22),
    }
}

/// Checks the frame a well-formed reply of flow `f` (`input`) became: the inner packet,
/// unwrapped, from the node's published port to the client, with right checksums.
fn check_unwrapped(input: &[u8], out: &[u8], f: &Flow, what: &str) {
    let ctx = || format!("{what} {f:?}\n in: {}\nout: {}", hex(input), hex(out));
    assert_eq!(out.len() + ENCAP, input.len(), "length: {}", ctx());
    assert_eq!(&out[0..6], &CLIENT_MAC, "destination MAC: {}", ctx());
    assert_eq!(&out[6..12], &NODE_MAC, "source MAC: {}", ctx());
    assert!(
        well_formed_ip(out, ETH).is_some(),
        "not well-formed: {}",
        ctx()
    );
    assert_eq!(ip_at(out, ETH + 12), NODE, "source: {}", ctx());
    assert_eq!(ip_at(out, ETH + 16), f.client, "destination: {}", ctx());
    assert_eq!(u16_at(out, ETH + 20), f.published, "source port: {}", ctx());
    assert_eq!(
        u16_at(out, ETH + 22),
        f.client_port,
        "destination port: {}",
        ctx()
    );
    if l4_checksum_ok(input, ENCAP + ETH) {
        assert!(l4_checksum_ok(out, ETH), "L4 checksum: {}", ctx());
    }
}

// ---- a seeded generator ----

/// SplitMix64: small, seeded, the same sequence everywhere.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The seed of the corpus (NETD_XDP_FUZZ_SEED overrides it, to explore further).
fn seed() -> u64 {
    std::env::var("NETD_XDP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e65_7464_7864_7000)
}

/// Rewrites the IPv4 header checksum at `off` (if the header is there).
fn fix_ip(f: &mut [u8], off: usize) {
    if f.len() >= off + 20 {
        f[off + 10] = 0;
        f[off + 11] = 0;
        let ihl = ((f[off] & 0x0f) as usize * 4).clamp(20, f.len() - off);
        let c = checksum(&[&f[off..off + ihl]]);
        f[off + 10..off + 12].copy_from_slice(&c.to_be_bytes());
    }
}

/// Inserts `n` 4-byte words of IP options (NOPs, then an end of list) at `off`, with the
/// lengths and checksum fixed: a packet that is well-formed but for its options.
fn with_options(f: &[u8], off: usize, words: usize) -> Vec<u8> {
    let mut g = f[..off + 20].to_vec();
    let mut opts = vec![1u8; words * 4];
    opts[words * 4 - 1] = 0;
    g.extend_from_slice(&opts);
    g.extend_from_slice(&f[off + 20..]);
    g[off] = 0x40 | (5 + words) as u8;
    let tot = u16_at(&g, off + 2) as usize + words * 4;
    g[off + 2..off + 4].copy_from_slice(&(tot as u16).to_be_bytes());
    fix_ip(&mut g, off);
    g
}

/// What a case is, for the message of a failed assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Valid,
    Truncated,
    Ihl,
    Options,
    Fragment,
    TotLen,
    Version,
    TcpOffset,
    UdpLength,
    Flipped,
    Random,
    ShortInner,
    InnerLie,
    VxlanHeader,
}

/// The base frames: valid requests of every kind, and answers of the flows opened.
fn base(rng: &mut Rng, flows: &[Flow]) -> Vec<u8> {
    let port = rng.range(1024, 65535) as u16;
    let n = rng.range(0, 64);
    let payload = rng.bytes(n);
    match rng.below(10) {
        9 if !flows.is_empty() => {
            // A router's error about what the node sent a flow's client.
            let f = flows[rng.below(flows.len())];
            let l4 = udp(NODE, f.client, f.published, f.client_port, &payload, true);
            let kind = [(3, 4), (11, 0), (3, 1)][rng.below(3)];
            icmp_error(
                kind,
                &ipv4(NODE, f.client, f.proto, &l4),
                rng.range(20, 100),
            )
        }
        0 => syn(port, TCP_PORT),
        1 => segment(CLIENT, port, ACK | PSH, &payload),
        2 => datagram(CLIENT, port, UDP_PORT, &payload),
        3 => datagram(CLIENT, port, LOCAL_PORT, &payload),
        4 => syn(port, [LOCAL_PORT, 22, TCP_PORT][rng.below(3)]),
        5 => client_frame(
            CLIENT,
            UDP,
            &udp(CLIENT, NODE, port, UDP_PORT, &payload, false),
        ),
        _ if !flows.is_empty() => {
            let f = flows[rng.below(flows.len())];
            let flags = [SYN | ACK, ACK, ACK | PSH, FIN | ACK, RST][rng.below(5)];
            answer(&f, flags, &payload)
        }
        _ => segment(CLIENT, port, [ACK, RST, FIN | ACK][rng.below(3)], &payload),
    }
}

/// One mutation of `f`: the frame and what was done.
fn mutate(rng: &mut Rng, mut f: Vec<u8>) -> (Vec<u8>, Kind) {
    // Which IPv4 header to work on: the outer one, or a VXLAN frame's inner one.
    let vx = f.len() > ENCAP + ETH + 20 && u16_at(&f, ETH + 22) == VXLAN_PORT;
    let ip = if vx && rng.chance(60) {
        ENCAP + ETH
    } else {
        ETH
    };
    let fix = rng.chance(70);
    let kind = match rng.below(13) {
        0 => return (f, Kind::Valid),
        1 => {
            let n = rng.below(f.len());
            f.truncate(n);
            Kind::Truncated
        }
        2 => {
            f[ip] = 0x40 | [0, 1, 2, 3, 4, 6, 7, 8, 15][rng.below(9)];
            Kind::Ihl
        }
        3 => return (with_options(&f, ip, rng.range(1, 10)), Kind::Options),
        4 => {
            let mut frag = u16_at(&f, ip + 6) & 0x4000;
            match rng.below(3) {
                0 => frag |= 0x2000,
                1 => frag |= rng.range(1, 0x1fff) as u16,
                _ => frag |= 0x2000 | rng.range(1, 0x1fff) as u16,
            }
            f[ip + 6..ip + 8].copy_from_slice(&frag.to_be_bytes());
            Kind::Fragment
        }
        5 => {
            let tot = u16_at(&f, ip + 2) as usize;
            let lie = match rng.below(4) {
                0 => tot + rng.range(1, 64),
                1 => 0xffff,
                2 => rng.below(tot),
                _ => rng.below(48),
            };
            f[ip + 2..ip + 4].copy_from_slice(&(lie as u16).to_be_bytes());
            Kind::TotLen
        }
        6 => {
            f[ip] = (f[ip] & 0x0f) | ([0u8, 1, 6, 15][rng.below(4)] << 4);
            Kind::Version
        }
        7 if f[ip + 9] == TCP && f.len() >= ip + 34 => {
            let tot = u16_at(&f, ip + 2) as usize;
            let doff = if rng.chance(50) {
                rng.below(5)
            } else {
                ((tot - 20) / 4 + rng.range(1, 4)).min(15)
            };
            f[ip + 32] = (doff as u8) << 4 | (f[ip + 32] & 0x0f);
            Kind::TcpOffset
        }
        8 if f[ip + 9] == UDP && f.len() >= ip + 28 => {
            let len = u16_at(&f, ip + 24) as usize;
            let lie = match rng.below(3) {
                0 => rng.below(8),
                1 => len + rng.range(1, 300),
                _ => rng.range(8, len.max(8)),
            };
            f[ip + 24..ip + 26].copy_from_slice(&(lie as u16).to_be_bytes());
            Kind::UdpLength
        }
        9 => {
            for _ in 0..rng.range(1, 8) {
                let i = rng.below(f.len());
                f[i] = rng.next() as u8;
            }
            Kind::Flipped
        }
        10 => {
            let n = rng.range(14, 200);
            let mut g = rng.bytes(n);
            if rng.chance(70) {
                g[12] = 8;
                g[13] = 0;
            }
            if rng.chance(50) && g.len() >= 34 {
                g[14] = 0x45;
                g[30..34].copy_from_slice(&NODE.octets());
                g[23] = [TCP, UDP][rng.below(2)];
                if rng.chance(50) && g.len() >= 38 {
                    let p = [TCP_PORT, UDP_PORT, VXLAN_PORT, LOCAL_PORT][rng.below(4)];
                    g[36..38].copy_from_slice(&p.to_be_bytes());
                }
                fix_ip(&mut g, ETH);
            }
            return (g, Kind::Random);
        }
        11 if vx => {
            // The outer headers say the datagram ends early inside the inner frame.
            let keep = rng.below(ETH + 40);
            f.truncate(ENCAP + keep);
            let outer = (f.len() - ETH) as u16;
            f[ETH + 2..ETH + 4].copy_from_slice(&outer.to_be_bytes());
            f[ETH + 24..ETH + 26].copy_from_slice(&(outer - 20).to_be_bytes());
            Kind::ShortInner
        }
        12 if vx => {
            // Outer lengths shorter than the inner packet claims.
            let outer = u16_at(&f, ETH + 2) - rng.range(1, 30) as u16;
            f[ETH + 2..ETH + 4].copy_from_slice(&outer.to_be_bytes());
            if rng.chance(50) {
                f[ETH + 24..ETH + 26].copy_from_slice(&(outer - 20).to_be_bytes());
            }
            fix_ip(&mut f, ETH);
            return (f, Kind::InnerLie);
        }
        _ if vx => {
            let i = ETH + 28 + rng.below(8);
            f[i] ^= 1 << rng.below(8);
            Kind::VxlanHeader
        }
        _ => return (f, Kind::Valid),
    };
    if fix {
        fix_ip(&mut f, ip);
    }
    (f, kind)
}

/// IP options or a fragment (in the frame's first IPv4 header, or in a VXLAN frame's
/// inner one): what the program must hand to the kernel whole.
fn options_or_fragment(f: &[u8]) -> bool {
    let at = |off: usize| {
        f.len() >= off + 20
            && f[off] >> 4 == 4
            && (f[off] & 0x0f != 5 || u16_at(f, off + 6) & 0x3fff != 0)
    };
    if !is_ipv4(f) {
        return false;
    }
    if at(ETH) {
        return true;
    }
    // The inner header only decides once the outer one leads to this node's VXLAN
    // port with the ingress VNI and an IPv4 inner frame.
    well_formed_ip(f, ETH).is_some()
        && ip_at(f, ETH + 16) == NODE
        && f[ETH + 9] == UDP
        && u16_at(f, ETH + 22) == VXLAN_PORT
        && f.len() >= ENCAP + ETH + 20
        && f[ETH + 28..ETH + 36] == [8, 0, 0, 0, 0, 0x10, 0, 0]
        && u16_at(f, ETH + 36 + 12) == 0x0800
        && ip_at(f, ENCAP + ETH + 16) == INGRESS
        && at(ENCAP + ETH)
}

/// What the run of one case must satisfy. `flows`: the task side -> the flow, of every
/// flow the program showed it opened.
fn check_case(
    h: &Harness,
    frame: &[u8],
    kind: Kind,
    flows: &mut Map<(u8, Ipv4Addr, Ipv4Addr, u16), Flow>,
    tally: &mut [u64; 5],
) {
    let what = format!("{kind:?} case");
    let r = h.run(frame);
    if frame.len() < ETH {
        // The kernel refuses a frame shorter than an Ethernet header before the program
        // runs at all.
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            other => panic!("{what} of {} bytes: {other:?}", frame.len()),
        }
    }
    let (verdict, out) =
        r.unwrap_or_else(|e| panic!("{what}: test run failed: {e}\n{}", hex(frame)));
    assert_ne!(verdict, XDP_ABORTED, "{what}: XDP_ABORTED\n{}", hex(frame));
    assert!(
        [XDP_DROP, XDP_PASS, XDP_TX].contains(&verdict),
        "{what}: verdict {verdict}\n{}",
        hex(frame)
    );
    tally[verdict as usize] += 1;
    if options_or_fragment(frame) {
        assert_eq!(
            verdict,
            XDP_PASS,
            "{what}: IP options and fragments go to the kernel\n{}",
            hex(frame)
        );
    }
    if verdict != XDP_TX {
        return;
    }
    if let Some((proto, port)) = request_of(frame) {
        assert!(
            port != LOCAL_PORT,
            "{what}: a flow of the local task sent out\n{}",
            hex(frame)
        );
        let f = check_wrapped(frame, &out, &what);
        assert_eq!((f.proto, f.published), (proto, port));
        flows.insert((f.proto, f.task, f.seen, f.snat_port), f);
        return;
    }
    if let Some(k) = icmp_of(frame) {
        // The flow the program holds for that client side now (a SYN may have made a
        // new pick for it since an older flow was seen).
        let (est, new) = tables(h, &flow_key(k.1, k.2, k.3, k.0));
        let now = est.or(new);
        let f = flows.values().find(|f| {
            f.key() == k
                && now
                    .is_some_and(|n| n.backend == be(f.task) && n.snat_port == f.snat_port.to_be())
        });
        let Some(f) = f else {
            panic!(
                "{what}: XDP_TX for an ICMP error of no flow\n{}",
                hex(frame)
            );
        };
        check_relayed(frame, &out, f, &what);
        return;
    }
    let Some(inner) = reply_of(frame) else {
        panic!(
            "{what}: XDP_TX for a frame that is neither a well-formed request nor a \
             well-formed reply\n{}",
            hex(frame)
        );
    };
    let key = (
        frame[inner + 9],
        ip_at(frame, inner + 12),
        ip_at(frame, inner + 16),
        u16_at(frame, inner + 22),
    );
    let Some(f) = flows.get(&key) else {
        panic!("{what}: XDP_TX for a reply of no flow\n{}", hex(frame));
    };
    assert_eq!(
        u16_at(frame, inner + 20),
        TARGET,
        "{what}: reply from another port"
    );
    check_unwrapped(frame, &out, f, &what);
}

// ---- the tests ----

/// 20k frames from a fixed seed: every base frame truncated at every length, then
/// random mutations. Prints the seed and the tally.
#[test]
fn malformed_frames_never_abort_and_only_good_ones_are_sent() {
    with_harness("corpus", None, corpus);
}

/// The same with the program translating flows to the node's ingress address.
#[test]
fn malformed_frames_never_abort_and_only_good_ones_are_sent_snat() {
    with_snat_harness("corpus-snat", corpus);
}

fn corpus(h: &mut Harness) {
    {
        let seed = seed();
        let mut rng = Rng(seed);
        let mut flows: Map<(u8, Ipv4Addr, Ipv4Addr, u16), Flow> = Map::new();
        let mut tally = [0u64; 5];
        let before = h.stats();
        let start = std::time::Instant::now();

        // Flows to answer, opened for real: a SYN and a datagram must be sent out.
        for i in 0..4u16 {
            for frame in [
                syn(40000 + i, TCP_PORT),
                datagram(CLIENT, 40000 + i, UDP_PORT, b"q"),
            ] {
                let out = h.tx(&frame, "a valid request");
                let f = check_wrapped(&frame, &out, "a valid request");
                flows.insert((f.proto, f.task, f.seen, f.snat_port), f);
                tally[XDP_TX as usize] += 1;
                // Its answer comes back out to the client.
                let reply = answer(&f, SYN | ACK, b"");
                let back = h.tx(&reply, "the answer of a flow");
                check_unwrapped(&reply, &back, &f, "the answer of a flow");
                tally[XDP_TX as usize] += 1;
            }
        }
        let known: Vec<Flow> = flows.values().copied().collect();

        // Every base frame truncated at every length, 0 to whole.
        let mut cases = 0usize;
        let bases: Vec<Vec<u8>> = (0..12).map(|_| base(&mut rng, &known)).collect();
        for b in &bases {
            for n in 0..=b.len() {
                check_case(
                    h,
                    &b[..n],
                    if n == b.len() {
                        Kind::Valid
                    } else {
                        Kind::Truncated
                    },
                    &mut flows,
                    &mut tally,
                );
                cases += 1;
            }
        }
        while cases < 20_000 {
            let known: Vec<Flow> = flows.values().copied().collect();
            let b = base(&mut rng, &known);
            let (frame, kind) = mutate(&mut rng, b);
            check_case(h, &frame, kind, &mut flows, &mut tally);
            cases += 1;
        }
        let after = h.stats();
        let sent = (after.forwarded - before.forwarded) + (after.returned - before.returned);
        assert_eq!(
            sent, tally[XDP_TX as usize],
            "forwarded + returned vs XDP_TX verdicts"
        );
        assert_eq!(
            after.dropped - before.dropped,
            tally[XDP_DROP as usize],
            "dropped vs XDP_DROP verdicts"
        );
        eprintln!(
            "seed {seed:#x}: {cases} frames in {:?}: {} dropped, {} passed, {} sent",
            start.elapsed(),
            tally[XDP_DROP as usize],
            tally[XDP_PASS as usize],
            tally[XDP_TX as usize]
        );
    }
}

// ---- the documented rules ----

/// IP options and fragments go to the kernel whole, in both directions; DF alone is not
/// a fragment.
#[test]
fn ip_options_and_fragments_go_to_the_kernel() {
    with_harness("rules", None, |h| {
        let s = syn(41000, TCP_PORT);
        for words in [1, 4, 10] {
            let f = with_options(&s, ETH, words);
            assert_eq!(
                h.run(&f).expect("run").0,
                XDP_PASS,
                "{words} words of options"
            );
        }
        for frag in [0x2000u16, 0x0001, 0x2000 | 0x00b9, 0x4000 | 0x0010, 0x6000] {
            let mut f = s.clone();
            f[ETH + 6..ETH + 8].copy_from_slice(&frag.to_be_bytes());
            fix_ip(&mut f, ETH);
            assert_eq!(
                h.run(&f).expect("run").0,
                XDP_PASS,
                "fragment bits {frag:#x}"
            );
        }
        let mut df = datagram(CLIENT, 41000, UDP_PORT, b"x");
        df[ETH + 6..ETH + 8].copy_from_slice(&0x4000u16.to_be_bytes());
        fix_ip(&mut df, ETH);
        let out = h.tx(&df, "DF alone");
        let flow = check_wrapped(&df, &out, "DF alone");
        // The task's answer: with options or as a fragment, the kernel's.
        let a = answer(&flow, 0, b"answer");
        let mut inner_frag = a.clone();
        inner_frag[ENCAP + ETH + 6] |= 0x20;
        fix_ip(&mut inner_frag, ENCAP + ETH);
        assert_eq!(
            h.run(&inner_frag).expect("run").0,
            XDP_PASS,
            "inner fragment"
        );
        let mut outer_frag = a.clone();
        outer_frag[ETH + 6] |= 0x20;
        fix_ip(&mut outer_frag, ETH);
        assert_eq!(
            h.run(&outer_frag).expect("run").0,
            XDP_PASS,
            "outer fragment"
        );
        let mut opts = with_options(&a, ENCAP + ETH, 2);
        // The outer lengths grow with the inner packet.
        let grow = |f: &mut Vec<u8>, at: usize, by: u16| {
            let v = u16_at(f, at) + by;
            f[at..at + 2].copy_from_slice(&v.to_be_bytes());
        };
        grow(&mut opts, ETH + 2, 8);
        grow(&mut opts, ETH + 24, 8);
        fix_ip(&mut opts, ETH);
        assert_eq!(h.run(&opts).expect("run").0, XDP_PASS, "inner options");
        // And unchanged, the answer comes back out.
        let back = h.tx(&a, "the answer");
        check_unwrapped(&a, &back, &flow, "the answer");
    });
}

/// Without a route or a neighbour for the other node (bpf_fib_lookup fails) a request
/// is dropped and counted (the client retries), never sent with wrong addresses.
#[test]
fn without_a_neighbour_a_request_is_dropped_and_counted() {
    with_harness("noneigh", None, |h| {
        let out = Command::new("ip")
            .args(["neigh", "del", &VTEP.to_string(), "dev", "fz0"])
            .output()
            .expect("ip neigh del");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let before = h.stats();
        assert_eq!(h.run(&syn(41001, TCP_PORT)).expect("run").0, XDP_DROP);
        let after = h.stats();
        assert_eq!(after.dropped - before.dropped, 1);
        assert_eq!(after.forwarded, before.forwarded);
    });
}

/// The MSS of a wrapped SYN (TCP options right after a 20-byte TCP header).
fn wrapped_mss(out: &[u8]) -> u16 {
    let opt = ENCAP + ETH + 20 + 20;
    assert_eq!(
        &out[opt..opt + 2],
        &[2, 4],
        "MSS option first: {}",
        hex(out)
    );
    u16_at(out, opt + 2)
}

/// The MSS clamp and the largest datagram wrapped follow the overlay MTU netd writes
/// (from `--underlay-mtu`), not a 1500-byte underlay; a config without one means 1450.
#[test]
fn the_mss_clamp_and_the_size_limit_follow_the_overlay_mtu() {
    with_harness("mtu", None, |h| {
        // A datagram whose IP packet is `size` bytes long.
        let sized =
            |sport: u16, size: usize| datagram(CLIENT, sport, UDP_PORT, &vec![7; size - 28]);
        let mut sport = 41200;
        let mut next = || {
            sport += 1;
            sport
        };
        for (mtu, mss) in [(1350u16, 1310u16), (0, 1410), (1450, 1410), (8950, 1460)] {
            h.configure(mtu);
            let what = format!("overlay MTU {mtu}");
            let out = h.tx(&syn(next(), TCP_PORT), &what);
            assert_eq!(wrapped_mss(&out), mss, "{what}");
            assert!(
                l4_checksum_ok(&out[ENCAP..], ETH),
                "{what}: inner TCP checksum after the clamp"
            );
            let most = if mtu == 0 { 1450 } else { mtu.min(2000) } as usize;
            h.tx(
                &sized(next(), most),
                &format!("{what}: a datagram of {most} bytes"),
            );
            if mtu <= 1450 {
                // One byte too big, DF set: the client hears "fragmentation needed".
                let big = sized(next(), most + 1);
                let out = h.tx(&big, &format!("{what}: a DF datagram one byte too big"));
                check_frag_needed(&big, &out, most as u16, &what);
                // Without DF: dropped, counted.
                let mut big = sized(next(), most + 1);
                big[ETH + 6..ETH + 8].copy_from_slice(&[0, 0]);
                fix_ip(&mut big, ETH);
                let before = h.stats();
                let (verdict, _) = h.run(&big).expect("run");
                assert_eq!(verdict, XDP_DROP, "{what}: a datagram one byte too big");
                assert_eq!(h.stats().dropped, before.dropped + 1, "{what}: counted");
            }
        }
        assert_eq!(h.flow_stat(FLOWS_TOO_BIG), 6, "too big, counted");
    });
}

/// `out` is the ICMP "fragmentation needed" a router would send the client about its
/// packet `input`: from the node's address, naming `mtu`, quoting the packet's IP header
/// and first 8 bytes, with right checksums.
fn check_frag_needed(input: &[u8], out: &[u8], mtu: u16, what: &str) {
    let ctx = || format!("{what}\n in: {}\nout: {}", hex(input), hex(out));
    assert_eq!(out.len(), ETH + 20 + 8 + 28, "length: {}", ctx());
    assert_eq!(&out[0..6], &CLIENT_MAC, "destination MAC: {}", ctx());
    assert_eq!(out[ETH], 0x45, "IPv4, no options: {}", ctx());
    assert_eq!(
        u16_at(out, ETH + 2),
        20 + 8 + 28,
        "IP total length: {}",
        ctx()
    );
    assert_eq!(
        checksum(&[&out[ETH..ETH + 20]]),
        0,
        "IP checksum: {}",
        ctx()
    );
    assert_eq!(out[ETH + 9], 1, "protocol ICMP: {}", ctx());
    assert_eq!(ip_at(out, ETH + 12), NODE, "source: {}", ctx());
    assert_eq!(ip_at(out, ETH + 16), CLIENT, "destination: {}", ctx());
    let icmp = &out[ETH + 20..];
    assert_eq!((icmp[0], icmp[1]), (3, 4), "type and code: {}", ctx());
    assert_eq!(u16_at(icmp, 6), mtu, "next-hop MTU: {}", ctx());
    assert_eq!(checksum(&[icmp]), 0, "ICMP checksum: {}", ctx());
    assert_eq!(&icmp[8..], &input[ETH..ETH + 28], "the quote: {}", ctx());
}

// ---- regressions: what the fuzzing found the program sending on ----

/// Runs `frame` and wants it handed to the kernel.
fn passed(h: &Harness, frame: &[u8], what: &str) {
    let (verdict, _) = h.run(frame).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(verdict, XDP_PASS, "{what}\n{}", hex(frame));
}

/// A request whose IPv4 total length claims more than the frame holds (truncated on the
/// way, or lying) was wrapped with outer lengths that claimed the same.
#[test]
fn regression_a_request_longer_than_its_frame_is_not_wrapped() {
    with_harness("reg-totlen", None, |h| {
        let s = syn(41100, TCP_PORT);
        passed(h, &s[..s.len() - 1], "a SYN one byte short");
        let mut f = datagram(CLIENT, 41100, UDP_PORT, b"payload");
        f[ETH + 2..ETH + 4].copy_from_slice(&0xffffu16.to_be_bytes());
        fix_ip(&mut f, ETH);
        passed(h, &f, "a total length of 65535");
        let mut f = datagram(CLIENT, 41101, UDP_PORT, b"payload");
        f[ETH + 2..ETH + 4].copy_from_slice(&12u16.to_be_bytes());
        fix_ip(&mut f, ETH);
        passed(h, &f, "a total length shorter than the IP header");
    });
}

/// An Ethernet frame typed IPv4 whose header says another version was taken for IPv4.
#[test]
fn regression_an_ip_version_other_than_4_is_passed() {
    with_harness("reg-version", None, |h| {
        for v in [0u8, 6, 15] {
            let mut f = syn(41200, TCP_PORT);
            f[ETH] = (v << 4) | 5;
            fix_ip(&mut f, ETH);
            passed(h, &f, &format!("IP version {v}"));
        }
    });
}

/// A wrong IPv4 header checksum (the kernel drops such a packet) was forwarded, with a
/// checksum updated to stay as wrong.
#[test]
fn regression_a_bad_ip_header_checksum_is_passed() {
    with_harness("reg-ipsum", None, |h| {
        let mut f = syn(41300, TCP_PORT);
        f[ETH + 10] ^= 0x40;
        passed(h, &f, "a bad header checksum");
    });
}

/// TCP data offsets below 5 words, or past the packet, were forwarded.
#[test]
fn regression_a_bad_tcp_data_offset_is_passed() {
    with_harness("reg-doff", None, |h| {
        for doff in [0u8, 4, 11, 15] {
            let mut f = syn(41400, TCP_PORT);
            f[ETH + 32] = (doff << 4) | (f[ETH + 32] & 0x0f);
            passed(h, &f, &format!("data offset {doff} (the header holds 10)"));
        }
    });
}

/// UDP lengths below the header or past the packet were forwarded.
#[test]
fn regression_a_bad_udp_length_is_passed() {
    with_harness("reg-ulen", None, |h| {
        for len in [0u16, 7, 16, 300] {
            let mut f = datagram(CLIENT, 41500, UDP_PORT, b"payload"); // length 15
            f[ETH + 24..ETH + 26].copy_from_slice(&len.to_be_bytes());
            passed(h, &f, &format!("UDP length {len} of 15"));
        }
    });
}

/// A task's answer cut short (the frame, or the outer lengths, end inside the inner
/// packet), or with a VXLAN header without the VNI flag, was unwrapped and sent.
#[test]
fn regression_a_short_or_odd_vxlan_answer_is_not_unwrapped() {
    with_harness("reg-vxlan", None, |h| {
        let req = datagram(CLIENT, 41600, UDP_PORT, b"q");
        let out = h.tx(&req, "a request");
        let flow = check_wrapped(&req, &out, "a request");
        let a = answer(&flow, 0, b"a longer answer");
        passed(h, &a[..a.len() - 1], "an answer one byte short");
        let mut f = a.clone();
        let outer = u16_at(&f, ETH + 2) - 4;
        f[ETH + 2..ETH + 4].copy_from_slice(&outer.to_be_bytes());
        f[ETH + 24..ETH + 26].copy_from_slice(&(outer - 20).to_be_bytes());
        fix_ip(&mut f, ETH);
        passed(h, &f, "outer lengths ending inside the inner packet");
        let mut f = a.clone();
        let ulen = u16_at(&f, ETH + 24) - 4;
        f[ETH + 24..ETH + 26].copy_from_slice(&ulen.to_be_bytes());
        passed(h, &f, "an outer UDP length ending inside the inner packet");
        let mut f = a.clone();
        f[ETH + 28] = 0x0a;
        passed(h, &f, "VXLAN flags 0x0a");
        let mut f = a.clone();
        f[ETH + 28] = 0;
        passed(h, &f, "VXLAN flags without the VNI flag");
        let mut f = a.clone();
        f[ETH + 10] ^= 1;
        passed(h, &f, "a bad outer header checksum");
        // The same answer whole comes back out.
        let back = h.tx(&a, "the answer");
        check_unwrapped(&a, &back, &flow, "the answer");
    });
}

// ---- the flow tables under a flood ----

fn flow_key(src: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        addr: be(src),
        port_a: sport.to_be(),
        port_b: dport.to_be(),
        proto,
        pad: [0; 3],
    }
}

fn rev_key(f: &Flow) -> FlowTuple {
    FlowTuple {
        src: be(f.task),
        dst: be(f.seen),
        sport: TARGET.to_be(),
        dport: f.snat_port.to_be(),
        proto: f.proto,
        pad: [0; 3],
    }
}

/// Where the flow of `key` is: (established, unconfirmed) forward halves.
fn tables(h: &Harness, key: &FlowKey) -> (Option<FlowFwd>, Option<FlowFwd>) {
    (
        h.fwd_map("netd_flows_fwd").get(key, 0).ok(),
        h.new_map().get(key, 0).ok().map(|n| n.fwd),
    )
}

/// A TCP connection's handshake from CLIENT:`sport` through the program: SYN, the
/// task's SYN-ACK, the client's ACK. Returns the flow.
fn handshake(h: &Harness, sport: u16) -> Flow {
    let s = syn(sport, TCP_PORT);
    let flow = check_wrapped(&s, &h.tx(&s, "SYN"), "SYN");
    let key = flow_key(CLIENT, sport, TCP_PORT, TCP);
    let (est, new) = tables(h, &key);
    assert!(
        est.is_none() && new.is_some(),
        "a SYN opens an unconfirmed flow"
    );
    let sa = answer(&flow, SYN | ACK, b"");
    check_unwrapped(&sa, &h.tx(&sa, "SYN-ACK"), &flow, "SYN-ACK");
    let (est, _) = tables(h, &key);
    assert!(est.is_none(), "an answer alone confirms nothing");
    let new = h.new_map().get(&key, 0).ok();
    assert!(
        new.is_some_and(|n| n.fwd.flags & FLOW_ANSWERED != 0 && n.isn == TASK_ISN.to_be()),
        "the answer is marked, its ISN kept: {new:?}"
    );
    let ack = segment_acking(sport, ACK, TASK_ISN.wrapping_add(1), b"");
    let out = h.tx(&ack, "ACK");
    assert_eq!(
        check_wrapped(&ack, &out, "ACK"),
        flow,
        "the ACK follows the SYN"
    );
    let (est, new) = tables(h, &key);
    assert!(
        est.is_some() && new.is_none(),
        "the client's ACK confirms the flow"
    );
    assert!(
        h.rev_map("netd_flows_rev").get(&rev_key(&flow), 0).is_ok()
            && h.rev_map("netd_flows_rev_new")
                .get(&rev_key(&flow), 0)
                .is_err(),
        "the reverse half moves with it"
    );
    flow
}

/// Data both ways on `flow` (TCP from CLIENT:`sport`): it still has its task and port.
fn exchange_tcp(h: &Harness, flow: &Flow, sport: u16) {
    let d = segment(CLIENT, sport, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(
        check_wrapped(&d, &h.tx(&d, "data"), "data"),
        *flow,
        "the client's data takes its flow"
    );
    let a = answer(flow, ACK | PSH, b"HTTP/1.1 200 OK\r\n\r\n");
    check_unwrapped(&a, &h.tx(&a, "the task's data"), flow, "the task's data");
}

const FLOOD_TABLE: u32 = 64;

/// How many entries a forward flow map holds.
fn entries(h: &Harness, name: &str) -> usize {
    if name == "netd_flows_fwd_new" {
        return h.new_map().keys().count();
    }
    h.fwd_map(name).keys().count()
}

/// A flood of spoofed SYNs (16 times the table), each answered by the task as a real
/// one would be, after a connection was established: the connection keeps its
/// translation, and no flow of the flood reaches the established table.
#[test]
fn an_established_tcp_flow_survives_a_syn_flood() {
    with_harness("synflood", Some(FLOOD_TABLE), |h| {
        let flow = handshake(h, 42000);
        let opened = h.flow_stat(FLOWS_OPENED);
        let mut rng = Rng(7);
        let n = 16 * FLOOD_TABLE as usize;
        for _ in 0..n {
            let src = Ipv4Addr::from(
                u32::from(Ipv4Addr::new(198, 18, 128, 0)) + rng.below(1 << 15) as u32,
            );
            let port = rng.range(1024, 65535) as u16;
            let f = client_frame(
                src,
                TCP,
                &tcp(&Seg {
                    src,
                    dst: NODE,
                    sport: port,
                    dport: TCP_PORT,
                    flags: SYN,
                    options: &SYN_OPTIONS,
                    payload: &[],
                }),
            );
            let spoofed = check_wrapped(&f, &h.tx(&f, "a flood SYN"), "a flood SYN");
            // The task's SYN-ACK: no neighbour for the spoofed source, so it is dropped
            // on the way out, but it has marked the flow answered.
            let sa = answer(&spoofed, SYN | ACK, b"");
            assert_eq!(h.run(&sa).expect("run").0, XDP_DROP, "a SYN-ACK to nowhere");
        }
        assert_eq!(
            h.flow_stat(FLOWS_OPENED) - opened,
            n as u64,
            "every SYN opened a flow"
        );
        assert_eq!(
            h.flow_stat(FLOWS_CONFIRMED),
            1,
            "only the real connection is confirmed"
        );
        assert_eq!(
            entries(h, "netd_flows_fwd"),
            1,
            "the flood stays out of the established table"
        );
        assert!(entries(h, "netd_flows_fwd_new") <= FLOOD_TABLE as usize);
        exchange_tcp(h, &flow, 42000);
    });
}

/// A flood of datagrams from random ports (16 times the table) after a UDP flow was
/// confirmed (the client sent again after the task answered): the flow keeps its
/// translation.
#[test]
fn an_established_udp_flow_survives_a_datagram_flood() {
    with_harness("udpflood", Some(FLOOD_TABLE), |h| {
        let key = flow_key(CLIENT, 43000, UDP_PORT, UDP);
        let q = datagram(CLIENT, 43000, UDP_PORT, b"one");
        let flow = check_wrapped(&q, &h.tx(&q, "a datagram"), "a datagram");
        // The client sends again before any answer: still unconfirmed.
        let q2 = datagram(CLIENT, 43000, UDP_PORT, b"two");
        assert_eq!(check_wrapped(&q2, &h.tx(&q2, "again"), "again"), flow);
        assert!(
            matches!(tables(h, &key), (None, Some(_))),
            "unconfirmed before an answer"
        );
        let a = answer(&flow, 0, b"answer");
        check_unwrapped(&a, &h.tx(&a, "the answer"), &flow, "the answer");
        let q3 = datagram(CLIENT, 43000, UDP_PORT, b"three");
        assert_eq!(
            check_wrapped(&q3, &h.tx(&q3, "after the answer"), "after"),
            flow
        );
        assert!(matches!(tables(h, &key), (Some(_), None)), "confirmed");
        let mut rng = Rng(8);
        let mut ports: Vec<u16> = (1024..=65535).filter(|p| *p != 43000).collect();
        for i in 0..16 * FLOOD_TABLE as usize {
            let j = i + rng.below(ports.len() - i);
            ports.swap(i, j);
            let f = datagram(CLIENT, ports[i], UDP_PORT, b"flood");
            let other = check_wrapped(&f, &h.tx(&f, "a flood datagram"), "a flood datagram");
            // The task answers every one; the flooder never sends again from that port.
            let a = answer(&other, 0, b"answer");
            check_unwrapped(&a, &h.tx(&a, "an answer"), &other, "an answer");
        }
        assert_eq!(
            h.flow_stat(FLOWS_CONFIRMED),
            1,
            "only the real flow is confirmed"
        );
        assert_eq!(
            entries(h, "netd_flows_fwd"),
            1,
            "the flood stays out of the established table"
        );
        let q4 = datagram(CLIENT, 43000, UDP_PORT, b"four");
        assert_eq!(
            check_wrapped(&q4, &h.tx(&q4, "after the flood"), "after the flood"),
            flow,
            "the flow keeps its task and translation port"
        );
        let a = answer(&flow, 0, b"answer");
        check_unwrapped(
            &a,
            &h.tx(&a, "the answer"),
            &flow,
            "the answer after the flood",
        );
    });
}

/// A flow to the node's own task (the kernel path's): TCP leaves no entry, UDP is
/// confirmed by the client's second datagram (XDP never sees the answers).
#[test]
fn the_kernel_paths_flows_are_passed_and_a_udp_one_is_confirmed_by_the_client() {
    with_harness("kernelflows", Some(FLOOD_TABLE), |h| {
        passed(h, &syn(44000, LOCAL_PORT), "a SYN to the local task");
        let key = flow_key(CLIENT, 44000, LOCAL_PORT, TCP);
        assert!(
            matches!(tables(h, &key), (None, None)),
            "no entry for a local TCP flow"
        );
        let key = flow_key(CLIENT, 44000, LOCAL_PORT, UDP);
        passed(h, &datagram(CLIENT, 44000, LOCAL_PORT, b"1"), "a datagram");
        let (est, new) = tables(h, &key);
        assert!(est.is_none() && new.is_some_and(|f| f.flags & FLOW_KERNEL != 0));
        passed(
            h,
            &datagram(CLIENT, 44000, LOCAL_PORT, b"2"),
            "the next one",
        );
        assert!(
            matches!(tables(h, &key), (Some(_), None)),
            "confirmed by the client"
        );
    });
}

/// A client's RST forgets an established flow; a SYN on its 4-tuple makes a new pick.
#[test]
fn a_reset_or_a_new_syn_ends_an_established_flow() {
    with_harness("reset", None, |h| {
        let flow = handshake(h, 45000);
        let key = flow_key(CLIENT, 45000, TCP_PORT, TCP);
        let rst = segment(CLIENT, 45000, RST, b"");
        assert_eq!(check_wrapped(&rst, &h.tx(&rst, "RST"), "RST"), flow);
        assert!(
            matches!(tables(h, &key), (None, None)),
            "the RST forgets the flow"
        );
        assert!(h.rev_map("netd_flows_rev").get(&rev_key(&flow), 0).is_err());
        passed(
            h,
            &segment(CLIENT, 45000, ACK, b""),
            "a segment after the RST",
        );
        let again = handshake(h, 45000);
        let s = syn(45000, TCP_PORT);
        let newer = check_wrapped(&s, &h.tx(&s, "SYN again"), "SYN again");
        assert!(
            matches!(tables(h, &key), (None, Some(_))),
            "a new pick, unconfirmed"
        );
        assert!(
            h.rev_map("netd_flows_rev")
                .get(&rev_key(&again), 0)
                .is_err(),
            "the old translation port is freed"
        );
        assert_ne!(newer.task, again.task, "round-robin: the next task");
    });
}

/// The flow counters: opened, confirmed (and none lost or refused here).
/// A UDP flow that goes without a packet either way for longer than the idle time is
/// forgotten: the client's next datagram opens a new flow (a new pick), counted expired.
/// One whose client keeps sending, or whose task keeps answering, keeps its flow.
#[test]
fn an_idle_udp_flow_expires_and_a_busy_one_does_not() {
    let options = netd_ebpf::IngressOptions {
        udp_idle: Some(std::time::Duration::from_secs(1)),
        ..Default::default()
    };
    with_harness_options("udpidle", options, |h| {
        let key = flow_key(CLIENT, 47000, UDP_PORT, UDP);
        let ask = |h: &Harness, what: &str| {
            let q = datagram(CLIENT, 47000, UDP_PORT, what.as_bytes());
            check_wrapped(&q, &h.tx(&q, what), what)
        };
        let tell = |h: &Harness, flow: &Flow, what: &str| {
            let a = answer(flow, 0, what.as_bytes());
            check_unwrapped(&a, &h.tx(&a, what), flow, what);
        };
        let flow = ask(h, "one");
        tell(h, &flow, "the answer");
        assert_eq!(ask(h, "two"), flow);
        assert!(matches!(tables(h, &key), (Some(_), None)), "confirmed");
        // Units of the stamp are 2^30 ns: a flow is idle once two of them passed without
        // a packet, so every half second keeps it, and 3 s of silence does not.
        let pause = || std::thread::sleep(std::time::Duration::from_millis(500));
        for i in 0..6 {
            pause();
            assert_eq!(ask(h, &format!("busy client {i}")), flow);
        }
        for i in 0..6 {
            pause();
            tell(h, &flow, &format!("busy task {i}"));
        }
        assert_eq!(ask(h, "after the task talked"), flow);
        assert_eq!(h.flow_stat(FLOWS_EXPIRED), 0, "a busy flow expired");
        std::thread::sleep(std::time::Duration::from_secs(3));
        ask(h, "after a silence");
        assert_eq!(h.flow_stat(FLOWS_EXPIRED), 1, "the idle flow was kept");
        assert_eq!(h.flow_stat(FLOWS_OPENED), 2);
        assert!(
            matches!(tables(h, &key), (None, Some(_))),
            "the silence ends in a new, unconfirmed flow"
        );
    });
}

#[test]
fn flow_counters_count() {
    with_harness("counters", None, |h| {
        handshake(h, 46000);
        let s = syn(46001, TCP_PORT);
        h.tx(&s, "SYN");
        assert_eq!(h.flow_stat(FLOWS_OPENED), 2);
        assert_eq!(h.flow_stat(FLOWS_CONFIRMED), 1);
        assert_eq!(h.flow_stat(FLOWS_LOST), 0);
        assert_eq!(h.flow_stat(FLOWS_REFUSED), 0);
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(h.obj.map("netd_xdp_flow_stats").expect("map")).expect("map");
        assert_eq!(m.len(), FLOWS_COUNTERS);
    });
}

// ---- answers only from the flow's VTEP ----

/// XDP runs before nftables, whose rule against VXLAN from non-members never sees what
/// XDP takes: an answer naming a flow of XDP's (its task, target and translation port)
/// from an outer source that is not the VTEP of the flow's task is dropped and counted,
/// never unwrapped, and marks nothing; the same answer from the VTEP goes through. For
/// an unconfirmed and an established TCP flow and a UDP one.
#[test]
fn a_forged_reply_from_a_non_vtep_source_is_dropped_and_counted() {
    with_harness("forged", None, |h| {
        let refused = |h: &Harness, frame: &[u8], n: u64, what: &str| {
            let before = h.stats();
            let (verdict, _) = h.run(frame).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(verdict, XDP_DROP, "{what}: not unwrapped\n{}", hex(frame));
            let after = h.stats();
            assert_eq!(after.returned, before.returned, "{what}: nothing returned");
            assert_eq!(after.dropped - before.dropped, 1, "{what}: counted dropped");
            assert_eq!(h.flow_stat(FLOWS_WRONG_VTEP), n, "{what}: counted");
        };
        // An unconfirmed TCP flow: a forged SYN-ACK neither goes out nor marks it.
        let s = syn(47000, TCP_PORT);
        let flow = check_wrapped(&s, &h.tx(&s, "SYN"), "SYN");
        let key = flow_key(CLIENT, 47000, TCP_PORT, TCP);
        let sa = syn_ack(&flow, 0x5555_0000);
        refused(h, &from_outer(sa.clone(), FORGER), 1, "a forged SYN-ACK");
        // Another member's address is no better than a stranger's.
        refused(
            h,
            &from_outer(sa.clone(), NODE),
            2,
            "a SYN-ACK from this node",
        );
        let n = h.new_map().get(&key, 0).expect("still unconfirmed");
        assert_eq!(
            n.fwd.flags & FLOW_ANSWERED,
            0,
            "a forged answer marks nothing"
        );
        assert_eq!(n.isn, 0, "a forged answer sets no ISN");
        // A client ACK of the forged SYN-ACK confirms nothing.
        let ack = segment_acking(47000, ACK, 0x5555_0001, b"");
        assert_eq!(check_wrapped(&ack, &h.tx(&ack, "ACK"), "ACK"), flow);
        assert!(
            matches!(tables(h, &key), (None, Some(_))),
            "still unconfirmed"
        );
        // The task's own SYN-ACK, from its VTEP.
        check_unwrapped(
            &sa,
            &h.tx(&sa, "the real SYN-ACK"),
            &flow,
            "the real SYN-ACK",
        );
        let ack = segment_acking(47000, ACK, 0x5555_0001, b"");
        assert_eq!(check_wrapped(&ack, &h.tx(&ack, "ACK"), "ACK"), flow);
        assert!(matches!(tables(h, &key), (Some(_), None)), "now confirmed");
        // An established flow: forged data is refused, the task's goes through.
        let data = answer(&flow, ACK | PSH, b"HTTP/1.1 200 OK\r\n\r\n");
        refused(h, &from_outer(data.clone(), FORGER), 3, "forged data");
        check_unwrapped(&data, &h.tx(&data, "the task's data"), &flow, "data");
        // UDP.
        let q = datagram(CLIENT, 47001, UDP_PORT, b"q");
        let uflow = check_wrapped(&q, &h.tx(&q, "a datagram"), "a datagram");
        let a = answer(&uflow, 0, b"answer");
        refused(h, &from_outer(a.clone(), FORGER), 4, "a forged datagram");
        let ukey = flow_key(CLIENT, 47001, UDP_PORT, UDP);
        let n = h.new_map().get(&ukey, 0).expect("unconfirmed");
        assert_eq!(
            n.fwd.flags & FLOW_ANSWERED,
            0,
            "a forged answer marks nothing"
        );
        check_unwrapped(&a, &h.tx(&a, "the task's answer"), &uflow, "the answer");
        assert_eq!(h.flow_stat(FLOWS_WRONG_VTEP), 4);
        // An answer of no flow of XDP's (a port of the kernel path's) is not XDP's to
        // judge: the kernel's, whatever its source.
        let mut other = uflow;
        other.snat_port = 2000;
        passed(h, &from_outer(answer(&other, 0, b"x"), FORGER), "no flow's");
        assert_eq!(h.flow_stat(FLOWS_WRONG_VTEP), 4);
    });
}

// ---- keeping the client's address ----

/// Keeping the client's address, a flow goes to the task from the client's own address
/// and port (and this node's ingress MAC), and the answer the task's port sends back (to
/// this node's ingress MAC, the client as destination) goes out from the published port. A second flow the task could not tell from the first (the same client
/// address and port, task and target port, through another published port) gets a port
/// of the translation range, and each answer finds its own flow.
#[test]
fn a_flow_keeps_the_client_address_and_one_alike_gets_another_port() {
    with_harness("client", None, |h| {
        let q = datagram(CLIENT, 52000, UDP_PORT, b"q");
        let first = check_wrapped(&q, &h.tx(&q, "a datagram"), "a datagram");
        assert_eq!(
            (first.seen, first.snat_port),
            (CLIENT, 52000),
            "the task sees the client itself"
        );
        let (_, new) = tables(h, &flow_key(CLIENT, 52000, UDP_PORT, UDP));
        assert!(
            new.is_some_and(|f| f.flags & FLOW_CLIENT != 0),
            "the flow says it keeps the client's address: {new:?}"
        );
        let q = datagram(CLIENT, 52000, UDP_PORT_TOO, b"q");
        let second = check_wrapped(&q, &h.tx(&q, "a datagram alike"), "a datagram alike");
        assert_eq!((second.task, second.seen), (first.task, CLIENT));
        assert!(
            second.snat_port >= 32768,
            "the second flow alike keeps port {}",
            second.snat_port
        );
        for f in [first, second] {
            let a = answer(&f, 0, b"answer");
            check_unwrapped(&a, &h.tx(&a, "an answer"), &f, "an answer");
        }
        let flow = handshake(h, 52001);
        assert_eq!((flow.seen, flow.snat_port), (CLIENT, 52001));
        exchange_tcp(h, &flow, 52001);
    });
}

/// An answer to a client is this program's only when it is addressed to this node's
/// ingress sandbox (its MAC): the same packet to another MAC is the kernel's.
#[test]
fn answers_need_the_sandbox_mac() {
    with_harness("client-node", None, |h| {
        let q = datagram(CLIENT, 52100, UDP_PORT, b"q");
        let flow = check_wrapped(&q, &h.tx(&q, "a datagram"), "a datagram");
        let mut a = answer(&flow, 0, b"answer");
        // The inner frame follows the outer headers: its destination MAC first.
        a[ENCAP..ENCAP + ETH_ALEN].copy_from_slice(&mac_of(OTHER_SANDBOX));
        passed(h, &a, "an answer to another sandbox's MAC");
        let a = answer(&flow, 0, b"answer");
        check_unwrapped(&a, &h.tx(&a, "an answer"), &flow, "an answer");
    });
}

/// A flow keeps the translation it opened with when netd's setting changes (a restart
/// with another --mesh-source): one translated to the node's ingress address goes on so,
/// both ways, while a new one keeps the client's address.
#[test]
fn a_flow_keeps_its_translation_when_the_setting_changes() {
    with_harness("mixed", None, |h| {
        h.snat();
        let old = handshake(h, 52200);
        assert_eq!(old.seen, INGRESS);
        CLIENT_SOURCE.with(|c| c.set(true));
        h.configure(1500 - ENCAP as u16);
        let d = segment(CLIENT, 52200, ACK | PSH, b"more");
        let out = h.tx(&d, "the old flow's data");
        let inner = ENCAP + ETH;
        assert_eq!(
            (ip_at(&out, inner + 12), u16_at(&out, inner + 20)),
            (INGRESS, old.snat_port),
            "the old flow is still translated to the node's ingress address"
        );
        let a = answer(&old, ACK | PSH, b"reply");
        check_unwrapped(&a, &h.tx(&a, "the old flow's answer"), &old, "answer");
        let new = handshake(h, 52201);
        assert_eq!((new.seen, new.snat_port), (CLIENT, 52201));
    });
}

/// An ICMP error from ROUTER to the node, of `kind` (type, code), quoting `quoted` (an
/// IP packet the node sent), as much of it as `quote` bytes.
fn icmp_error(kind: (u8, u8), quoted: &[u8], quote: usize) -> Vec<u8> {
    let mut icmp = vec![kind.0, kind.1, 0, 0, 0, 0];
    icmp.extend_from_slice(&1300u16.to_be_bytes()); // the next hop's MTU
    icmp.extend_from_slice(&quoted[..quote.min(quoted.len())]);
    let c = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ethernet(NODE_MAC, VTEP_MAC, 0x0800, &ipv4(ROUTER, NODE, 1, &icmp))
}

/// Checks the frame an ICMP error about flow `f` (`input`) became: wrapped towards the
/// task's node like the flow's packets, to the task, its quote the
/// packet as the task sent it, every checksum right.
fn check_relayed(input: &[u8], out: &[u8], f: &Flow, what: &str) {
    let ctx = || format!("{what} {f:?}\n in: {}\nout: {}", hex(input), hex(out));
    assert_eq!(out.len(), input.len() + ENCAP, "length: {}", ctx());
    assert_eq!(ip_at(out, ETH + 16), VTEP, "outer destination: {}", ctx());
    let inner = &out[ENCAP..];
    assert_eq!(
        &inner[0..6],
        &mac_of(f.task),
        "inner destination MAC: {}",
        ctx()
    );
    assert_eq!(
        checksum(&[&inner[ETH..ETH + 20]]),
        0,
        "inner IP checksum: {}",
        ctx()
    );
    // From the router; translated to the node's address, from that address (as
    // conntrack's NAT would have it).
    let from = if client_source() {
        ip_at(input, ETH + 12)
    } else {
        INGRESS
    };
    assert_eq!(ip_at(inner, ETH + 12), from, "inner source: {}", ctx());
    assert_eq!(
        ip_at(inner, ETH + 16),
        f.task,
        "inner destination: {}",
        ctx()
    );
    let icmp = &inner[ETH + 20..ETH + u16_at(inner, ETH + 2) as usize];
    // A wrong checksum stays wrong (the task drops the error), a right one stays right.
    let was = &input[ETH + 20..ETH + u16_at(input, ETH + 2) as usize];
    if checksum(&[was]) == 0 {
        assert_eq!(checksum(&[icmp]), 0, "ICMP checksum: {}", ctx());
    }
    assert_eq!(&icmp[..2], &input[ETH + 20..ETH + 22], "ICMP type and code");
    let q = &icmp[8..];
    if checksum(&[&was[8..28]]) == 0 {
        assert_eq!(checksum(&[&q[..20]]), 0, "quoted IP checksum: {}", ctx());
    }
    assert_eq!(
        (ip_at(q, 12), ip_at(q, 16), u16_at(q, 20), u16_at(q, 22)),
        (f.task, f.seen, TARGET, f.snat_port),
        "the quote as the task sent it: {}",
        ctx()
    );
}

/// ICMP errors about a flow's packets to its client (a router on the client's side:
/// "fragmentation needed", which path MTU discovery needs, or time exceeded) go on to
/// the task, quoting the packet as the task sent it, counted; an error about no flow of
/// XDP's, an echo request, or a quote of another source's packet are the kernel's.
#[test]
fn icmp_errors_about_a_flow_reach_its_task() {
    with_harness("icmp", None, relays_icmp_errors);
}

/// The same, the flows translated to the node's ingress address.
#[test]
fn icmp_errors_about_a_flow_reach_its_task_snat() {
    with_snat_harness("icmp-snat", relays_icmp_errors);
}

fn relays_icmp_errors(h: &mut Harness) {
    let flow = handshake(h, 53000);
    let a = answer(&flow, ACK | PSH, &[7u8; 1200]);
    let sent = h.tx(&a, "the task's data");
    check_unwrapped(&a, &sent, &flow, "the task's data");
    let quoted = &sent[ETH..];
    let mut relayed = 0;
    for (kind, quote) in [((3, 4), 28), ((3, 4), 548), ((11, 0), 28), ((3, 3), 64)] {
        let e = icmp_error(kind, quoted, quote);
        check_relayed(&e, &h.tx(&e, "an ICMP error"), &flow, &format!("{kind:?}"));
        relayed += 1;
        assert_eq!(h.flow_stat(FLOWS_ICMP_RELAYED), relayed);
    }
    let q = datagram(CLIENT, 53001, UDP_PORT, b"q");
    let uflow = check_wrapped(&q, &h.tx(&q, "a datagram"), "a datagram");
    let ua = answer(&uflow, 0, b"answer");
    let usent = h.tx(&ua, "the answer");
    let e = icmp_error((3, 4), &usent[ETH..], 28);
    check_relayed(
        &e,
        &h.tx(&e, "about a datagram"),
        &uflow,
        "about a datagram",
    );
    // Not XDP's: another client port, an echo request, a packet from another source.
    let mut other = quoted.to_vec();
    other[22..24].copy_from_slice(&9u16.to_be_bytes());
    passed(h, &icmp_error((3, 4), &other, 28), "about no flow");
    passed(h, &icmp_error((8, 0), quoted, 28), "an echo request");
    let mut foreign = quoted.to_vec();
    foreign[12..16].copy_from_slice(&FORGER.octets());
    passed(
        h,
        &icmp_error((3, 4), &foreign, 28),
        "quoting another source",
    );
    passed(
        h,
        &icmp_error((3, 4), quoted, 22),
        "a quote without both ports",
    );
    assert_eq!(h.flow_stat(FLOWS_ICMP_RELAYED), relayed + 1);
}

// ---- confirming a TCP flow takes an ACK of the task's SYN-ACK ----

/// An ACK before the task's SYN-ACK, an ACK whose number is not the SYN-ACK's ISN + 1,
/// and a data answer of the task instead of a SYN-ACK, confirm nothing; the ACK of the
/// SYN-ACK does (also when ISN + 1 wraps to 0).
#[test]
fn a_blind_ack_does_not_confirm_a_tcp_flow_and_the_right_one_does() {
    with_harness("blindack", None, |h| {
        for (sport, isn) in [(48000u16, 0x1234_5678u32), (48001, 0xffff_ffff)] {
            let s = syn(sport, TCP_PORT);
            let flow = check_wrapped(&s, &h.tx(&s, "SYN"), "SYN");
            let key = flow_key(CLIENT, sport, TCP_PORT, TCP);
            let right = isn.wrapping_add(1);
            // Before any answer.
            let early = segment_acking(sport, ACK, right, b"");
            assert_eq!(check_wrapped(&early, &h.tx(&early, "early"), "early"), flow);
            assert!(
                matches!(tables(h, &key), (None, Some(_))),
                "not before the answer"
            );
            // The task's data is not a SYN-ACK: no answer yet for TCP.
            let d = answer(&flow, ACK | PSH, b"early data");
            check_unwrapped(&d, &h.tx(&d, "data"), &flow, "data");
            let n = h.new_map().get(&key, 0).expect("unconfirmed");
            assert_eq!(n.fwd.flags & FLOW_ANSWERED, 0, "only a SYN-ACK answers TCP");
            let sa = syn_ack(&flow, isn);
            check_unwrapped(&sa, &h.tx(&sa, "SYN-ACK"), &flow, "SYN-ACK");
            let n = h.new_map().get(&key, 0).expect("unconfirmed");
            assert_eq!(n.isn, isn.to_be(), "the ISN as in the packet");
            let bad_before = h.flow_stat(FLOWS_BAD_ACK);
            let confirmed = h.flow_stat(FLOWS_CONFIRMED);
            // Off by one either way, the right number in the wrong byte order, others.
            let mut wrong = vec![isn, isn.wrapping_add(2), right.swap_bytes(), 0x2000_0000, 0];
            wrong.retain(|a| *a != right);
            for (i, ack) in wrong.iter().copied().enumerate() {
                for flags in [ACK, ACK | PSH] {
                    let f = segment_acking(sport, flags, ack, b"x");
                    let what = format!("ACK {ack:#x}");
                    // Forwarded as the kernel path would (the task's TCP refuses it).
                    assert_eq!(check_wrapped(&f, &h.tx(&f, &what), &what), flow);
                    assert!(
                        matches!(tables(h, &key), (None, Some(_))),
                        "{what} (case {i}) confirms nothing"
                    );
                }
            }
            assert_eq!(
                h.flow_stat(FLOWS_BAD_ACK) - bad_before,
                2 * wrong.len() as u64,
                "every wrong ACK counted"
            );
            // A SYN-ACK again (retransmitted) changes nothing; a RST-less, SYN-less ACK
            // of the right number confirms.
            check_unwrapped(&sa, &h.tx(&sa, "again"), &flow, "SYN-ACK again");
            let ack = segment_acking(sport, ACK, right, b"");
            assert_eq!(check_wrapped(&ack, &h.tx(&ack, "ACK"), "ACK"), flow);
            assert!(
                matches!(tables(h, &key), (Some(_), None)),
                "the right ACK confirms"
            );
            assert_eq!(h.flow_stat(FLOWS_CONFIRMED) - confirmed, 1);
            exchange_tcp(h, &flow, sport);
        }
    });
}

/// A flood (16 times the table) of spoofed SYNs, each answered by the task, each
/// followed by a blind ACK from its spoofed source (a wrong acknowledgement number: the
/// SYN-ACK went to the spoofed address): no flow of the flood is confirmed, and the
/// established connection keeps its translation.
#[test]
fn an_established_tcp_flow_survives_a_flood_of_syns_with_blind_acks() {
    with_harness("blindflood", Some(FLOOD_TABLE), |h| {
        let flow = handshake(h, 49000);
        let mut rng = Rng(9);
        let n = 16 * FLOOD_TABLE as usize;
        for _ in 0..n {
            let src = Ipv4Addr::from(
                u32::from(Ipv4Addr::new(198, 18, 128, 0)) + rng.below(1 << 15) as u32,
            );
            let port = rng.range(1024, 65535) as u16;
            let seg = |flags: u8| {
                client_frame(
                    src,
                    TCP,
                    &tcp(&Seg {
                        src,
                        dst: NODE,
                        sport: port,
                        dport: TCP_PORT,
                        flags,
                        options: if flags & SYN != 0 {
                            &SYN_OPTIONS[..]
                        } else {
                            &[]
                        },
                        payload: &[],
                    }),
                )
            };
            let s = seg(SYN);
            let spoofed = check_wrapped(&s, &h.tx(&s, "a flood SYN"), "a flood SYN");
            let isn = rng.next() as u32;
            let sa = syn_ack(&spoofed, isn);
            assert_eq!(h.run(&sa).expect("run").0, XDP_DROP, "a SYN-ACK to nowhere");
            let mut blind = seg(ACK);
            let mut guess = rng.next() as u32;
            if guess == isn.wrapping_add(1) {
                guess ^= 1;
            }
            set_seq_ack(&mut blind, ETH, Some(0x1000_0001), Some(guess));
            let out = h.tx(&blind, "a blind ACK");
            assert_eq!(check_wrapped(&blind, &out, "a blind ACK"), spoofed);
        }
        assert_eq!(
            h.flow_stat(FLOWS_CONFIRMED),
            1,
            "only the real connection is confirmed"
        );
        assert_eq!(
            entries(h, "netd_flows_fwd"),
            1,
            "the flood stays out of the established table"
        );
        exchange_tcp(h, &flow, 49000);
        assert_eq!(
            h.flow_stat(FLOWS_BAD_ACK),
            n as u64,
            "every blind ACK counted"
        );
    });
}

// ---- both halves of a flow, also when established ----

/// An established flow whose reverse half was evicted (or whose translation port a
/// newer flow holds by now) is forgotten on its next packet, counted lost, and never
/// sends from that port; a reverse half whose forward half is gone unwraps nothing.
#[test]
fn an_established_flow_without_its_reverse_half_is_forgotten() {
    with_harness("halves", None, |h| {
        // TCP, its reverse half gone: the kernel path's from now on.
        let a = handshake(h, 50000);
        let akey = flow_key(CLIENT, 50000, TCP_PORT, TCP);
        h.rev_map_mut("netd_flows_rev")
            .remove(&rev_key(&a))
            .expect("remove the reverse half");
        passed(h, &segment(CLIENT, 50000, ACK | PSH, b"x"), "a lone half");
        assert_eq!(h.flow_stat(FLOWS_LOST), 1);
        assert!(matches!(tables(h, &akey), (None, None)), "forgotten");
        // TCP, its translation port another client's by now.
        let b = handshake(h, 50001);
        let bkey = flow_key(CLIENT, 50001, TCP_PORT, TCP);
        let thief = FlowRev {
            client: be(Ipv4Addr::new(198, 18, 0, 101)),
            client_port: 50001u16.to_be(),
            published_port: TCP_PORT.to_be(),
        };
        h.rev_map_mut("netd_flows_rev")
            .insert(rev_key(&b), thief, 0)
            .expect("another flow on the port");
        passed(h, &segment(CLIENT, 50001, ACK | PSH, b"x"), "a shared port");
        assert_eq!(h.flow_stat(FLOWS_LOST), 2);
        assert!(matches!(tables(h, &bkey), (None, None)), "forgotten");
        assert_eq!(
            h.rev_map("netd_flows_rev").get(&rev_key(&b), 0).ok(),
            Some(thief),
            "the other flow keeps its port"
        );
        // UDP, its reverse half gone: the next datagram opens a new flow.
        let q = datagram(CLIENT, 50002, UDP_PORT, b"1");
        let u = check_wrapped(&q, &h.tx(&q, "a datagram"), "a datagram");
        let r = answer(&u, 0, b"answer");
        check_unwrapped(&r, &h.tx(&r, "the answer"), &u, "the answer");
        let q = datagram(CLIENT, 50002, UDP_PORT, b"2");
        assert_eq!(check_wrapped(&q, &h.tx(&q, "again"), "again"), u);
        let ukey = flow_key(CLIENT, 50002, UDP_PORT, UDP);
        assert!(matches!(tables(h, &ukey), (Some(_), None)), "confirmed");
        h.rev_map_mut("netd_flows_rev")
            .remove(&rev_key(&u))
            .expect("remove the reverse half");
        let opened = h.flow_stat(FLOWS_OPENED);
        let q = datagram(CLIENT, 50002, UDP_PORT, b"3");
        let reopened = check_wrapped(&q, &h.tx(&q, "after"), "after");
        assert_eq!(h.flow_stat(FLOWS_LOST), 3);
        assert_eq!(h.flow_stat(FLOWS_OPENED) - opened, 1, "a new flow");
        assert!(matches!(tables(h, &ukey), (None, Some(_))), "unconfirmed");
        assert!(
            h.rev_map("netd_flows_rev_new")
                .get(&rev_key(&reopened), 0)
                .is_ok(),
            "with a reverse half of its own"
        );
        // A reverse half without its forward half: its answers are not unwrapped.
        let c = handshake(h, 50003);
        let ckey = flow_key(CLIENT, 50003, TCP_PORT, TCP);
        h.fwd_map_mut("netd_flows_fwd")
            .remove(&ckey)
            .expect("remove the forward half");
        passed(
            h,
            &answer(&c, ACK | PSH, b"data"),
            "an answer of a lone half",
        );
    });
}

// ---- maps an older netd pinned ----

/// aya reuses a pinned map by name whatever its shape: the loader makes afresh the
/// maps an older netd pinned in a shape this program cannot use (unconfirmed forward
/// values of 16 bytes, before the SYN-ACK's ISN was kept; 4 flow counters; reverse
/// halves keyed by 12 bytes and a config of 16, before flows kept the client's
/// address), so that the program loads and counts, and keeps the maps whose shape is
/// right, with their flows.
#[test]
fn maps_an_older_netd_pinned_in_another_shape_are_made_afresh() {
    netd_ebpf::ensure_bpffs().expect("bpffs");
    let dir = PinDir(
        std::path::Path::new(netd_ebpf::BPFFS)
            .join(format!("netdtest-xdpfuzz-reshaped-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0).expect("pin dir");
    let old_new = HashMap::<MapData, FlowKey, FlowFwd>::create(64, 0).expect("a map");
    old_new
        .pin(dir.0.join("netd_flows_fwd_new"))
        .expect("pin the old unconfirmed table");
    let old_rev = HashMap::<MapData, FlowKey, FlowRev>::create(64, 0).expect("a map");
    old_rev
        .pin(dir.0.join("netd_flows_rev"))
        .expect("pin the old reverse halves");
    let old_cfg = Array::<MapData, [u32; 4]>::create(1, 0).expect("a map");
    old_cfg
        .pin(dir.0.join("netd_ingress_cfg"))
        .expect("pin the old config");
    let old_stats = PerCpuArray::<MapData, u64>::create(4, 0).expect("a map");
    old_stats
        .pin(dir.0.join("netd_xdp_flow_stats"))
        .expect("pin the old counters");
    let key = flow_key(CLIENT, 51000, TCP_PORT, TCP);
    let kept = FlowFwd {
        backend: be(TASKS[0]),
        vtep: be(VTEP),
        snat_port: 40000u16.to_be(),
        target_port: TARGET.to_be(),
        flags: 0,
    };
    let mut est = HashMap::<MapData, FlowKey, FlowFwd>::create(64, 0).expect("a map");
    est.insert(key, kept, 0).expect("an established flow");
    est.pin(dir.0.join("netd_flows_fwd"))
        .expect("pin the established table");

    let mut obj = netd_ebpf::load_ingress_xdp_sized(&dir.0, Some(64)).expect("load");
    let prog: &mut Xdp = obj
        .program_mut(netd_ebpf::INGRESS_XDP_PROGRAM)
        .expect("program in the object")
        .try_into()
        .expect("an XDP program");
    prog.load()
        .expect("the verifier accepts the program with the maps made afresh");
    let info = |name: &str| aya::maps::MapInfo::from_pin(dir.0.join(name)).expect("pinned");
    assert_eq!(
        info("netd_flows_fwd_new").value_size() as usize,
        std::mem::size_of::<FlowFwdNew>()
    );
    assert_eq!(info("netd_xdp_flow_stats").max_entries(), FLOWS_COUNTERS);
    assert_eq!(
        info("netd_flows_rev").key_size() as usize,
        std::mem::size_of::<FlowTuple>()
    );
    assert_eq!(
        info("netd_ingress_cfg").value_size() as usize,
        std::mem::size_of::<IngressConfig>()
    );
    let m: HashMap<_, FlowKey, FlowFwd> =
        HashMap::try_from(obj.map("netd_flows_fwd").expect("map")).expect("map");
    assert_eq!(
        m.get(&key, 0).ok(),
        Some(kept),
        "a map of the right shape is kept"
    );
}
