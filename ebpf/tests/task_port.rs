//! `task_port` (the routing mesh's way back, TC on a published task's port) run through
//! BPF_PROG_TEST_RUN: a flow arriving from one node's ingress sandbox has its answers sent
//! back to that sandbox's MAC; one client address and port arriving from two sandboxes
//! are two flows to the task (the second on another port, its answers restored); what is
//! no client's flow passes untouched; malformed frames change nothing.
//!
//! Needs root (loading programs). Each test pins its maps in a directory of its own under
//! the bpffs, removed at the end (also on panic). Addresses: the ingress network
//! 198.19.0.0/16, the task 198.19.0.21 on this node (B, sandbox 198.19.255.2), nodes A
//! and C (sandboxes 198.19.255.1 and .3), clients 198.18.0.100 and .101.

mod common;
use common::{checksum, mac_of};

use std::net::Ipv4Addr;
use std::path::PathBuf;

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::SchedClassifier;
use aya::{Ebpf, TestRun, TestRunOptions};
use netd_ebpf::maps::{
    FlowTuple, ReturnConfig, ReturnFlow, ReturnOrigin, RETURN_CLOSING, RETURN_NO_PORT,
    RETURN_RECORDED, RETURN_REMAPPED, RETURN_RETURNED, RETURN_STRAY,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const TASK: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
const SANDBOX_A: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const SANDBOX_B: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
const SANDBOX_C: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const TARGET: u16 = 80;
const ETH: usize = 14;
/// The kernel's answer to a test run of a frame it cannot make a packet of.
const EINVAL: i32 = 22;
const L4: usize = ETH + 20;

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Port {
    obj: Ebpf,
    _dir: PinDir,
}

/// The object loaded with its maps pinned in a directory named for `test`, both programs
/// verified, the ingress network configured.
fn port(test: &str) -> Port {
    netd_ebpf::ensure_bpffs().expect("bpffs");
    let dir = PinDir(
        std::path::Path::new(netd_ebpf::BPFFS)
            .join(format!("netdtest-taskport-{test}-{}", std::process::id())),
    );
    let mut obj = netd_ebpf::load_task_port(&dir.0).expect("parse task_port.o");
    for name in [netd_ebpf::TASK_PORT_TO_TASK, netd_ebpf::TASK_PORT_FROM_TASK] {
        let prog: &mut SchedClassifier = obj
            .program_mut(name)
            .expect("program in the object")
            .try_into()
            .expect("a TC program");
        if let Err(e) = prog.load() {
            panic!("the verifier refused {name}: {e:?}");
        }
    }
    let mut cfg: Array<&mut MapData, ReturnConfig> =
        Array::try_from(obj.map_mut("netd_return_cfg").expect("cfg map")).expect("array");
    cfg.set(
        0,
        ReturnConfig {
            net: u32::from(Ipv4Addr::new(198, 19, 0, 0)).to_be(),
            mask: u32::from(Ipv4Addr::new(255, 255, 0, 0)).to_be(),
        },
        0,
    )
    .expect("write config");
    Port { obj, _dir: dir }
}

impl Port {
    /// One run of program `name` on `frame`: the verdict and the frame as it left.
    fn run(&self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(name, frame)
            .unwrap_or_else(|| panic!("the kernel refused a test run of {} bytes", frame.len()))
    }

    /// As [`Self::run`]; None when the kernel refuses to make a packet of `frame` (it
    /// checks an IPv4 frame's header length before any program runs).
    fn try_run(&self, name: &str, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self
            .obj
            .program(name)
            .expect("program")
            .try_into()
            .expect("TC");
        let mut out = vec![0u8; 4096];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        match prog.test_run(opts) {
            Ok(r) => {
                out.truncate(r.data_size_out as usize);
                Some((r.return_value, out))
            }
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(EINVAL) =>
            {
                None
            }
            Err(e) => panic!("test_run: {e}"),
        }
    }

    /// A frame on its way to the task.
    fn reaching_task(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(netd_ebpf::TASK_PORT_TO_TASK, frame)
    }

    /// A frame from the task.
    fn leaving_task(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(netd_ebpf::TASK_PORT_FROM_TASK, frame)
    }

    fn stat(&self, which: u32) -> u64 {
        let m: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.obj.map("netd_return_stats").expect("stats"))
                .expect("per-cpu array");
        m.get(&which, 0).expect("read").iter().sum()
    }

    fn flows(&self) -> Vec<(FlowTuple, ReturnFlow)> {
        let m: HashMap<&MapData, FlowTuple, ReturnFlow> =
            HashMap::try_from(self.obj.map("netd_return_flows").expect("flows")).expect("hash");
        m.iter().filter_map(|r| r.ok()).collect()
    }
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// An Ethernet/IPv4 frame `src_mac` -> `dst_mac` carrying a TCP segment (flags) or, with
/// `udp_sum` Some, a UDP datagram (with or without its checksum).
struct Pkt {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    tcp_flags: u8,
    udp_sum: Option<bool>,
}

fn frame(p: &Pkt) -> Vec<u8> {
    let payload = b"netd-return";
    let (proto, mut l4) = match p.udp_sum {
        None => {
            let mut t = Vec::new();
            t.extend_from_slice(&p.src.1.to_be_bytes());
            t.extend_from_slice(&p.dst.1.to_be_bytes());
            t.extend_from_slice(&[0x10, 0, 0, 0, 0x20, 0, 0, 0]); // seq, ack
            t.extend_from_slice(&[0x50, p.tcp_flags, 0xfa, 0xf0, 0, 0, 0, 0]);
            t.extend_from_slice(payload);
            (TCP, t)
        }
        Some(_) => {
            let mut u = Vec::new();
            u.extend_from_slice(&p.src.1.to_be_bytes());
            u.extend_from_slice(&p.dst.1.to_be_bytes());
            u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            u.extend_from_slice(payload);
            (UDP, u)
        }
    };
    let sum_at = if proto == TCP { 16 } else { 6 };
    if p.udp_sum != Some(false) {
        let c = checksum(&[&pseudo(p.src.0, p.dst.0, proto, l4.len()), &l4]);
        l4[sum_at..sum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&p.src.0.octets());
    ip.extend_from_slice(&p.dst.0.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&p.dst_mac);
    f.extend_from_slice(&p.src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// A client's packet brought to the task by the sandbox at `via`.
fn arriving(via: Ipv4Addr, client: (Ipv4Addr, u16), tcp_flags: u8, udp_sum: Option<bool>) -> Pkt {
    Pkt {
        src_mac: mac_of(via),
        dst_mac: mac_of(TASK),
        src: client,
        dst: (TASK, TARGET),
        tcp_flags,
        udp_sum,
    }
}

/// The task's answer to `client` as the task sends it: to its own node's sandbox.
fn answer(client: (Ipv4Addr, u16), tcp_flags: u8, udp_sum: Option<bool>) -> Pkt {
    Pkt {
        src_mac: mac_of(TASK),
        dst_mac: mac_of(SANDBOX_B),
        src: (TASK, TARGET),
        dst: client,
        tcp_flags,
        udp_sum,
    }
}

fn u16_at(f: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([f[i], f[i + 1]])
}

/// Whether the transport checksum of `f` is right (a UDP checksum of 0 counts as none).
fn l4_sum_ok(f: &[u8]) -> bool {
    let (src, dst) = (ip_at(f, ETH + 12), ip_at(f, ETH + 16));
    let proto = f[ETH + 9];
    if proto == UDP && u16_at(f, L4 + 6) == 0 {
        return true;
    }
    checksum(&[&pseudo(src, dst, proto, f.len() - L4), &f[L4..]]) == 0
}

fn ip_at(f: &[u8], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(f[i], f[i + 1], f[i + 2], f[i + 3])
}

#[test]
fn answers_go_back_to_the_sandbox_that_brought_the_flow() {
    let p = port("back");
    let client = (CLIENT, 40000);
    for (flags, udp) in [(SYN, None), (0, Some(true))] {
        let inbound = frame(&arriving(SANDBOX_A, client, flags, udp));
        let (verdict, out) = p.reaching_task(&inbound);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            out, inbound,
            "a flow's first packet reaches the task unchanged"
        );
        let reply = frame(&answer(client, SYN | ACK, udp));
        let (verdict, out) = p.leaving_task(&reply);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(&out[0..6], &mac_of(SANDBOX_A), "to the sandbox of node A");
        assert_eq!(&out[6..], &reply[6..], "nothing else changes");
    }
    assert_eq!(p.stat(RETURN_RECORDED), 2);
    assert_eq!(p.stat(RETURN_RETURNED), 2);
    assert_eq!(p.stat(RETURN_REMAPPED), 0);
    // The answer of a flow the port never saw goes where the task sent it.
    let stranger = frame(&answer((CLIENT, 40001), ACK, None));
    assert_eq!(p.leaving_task(&stranger), (TC_ACT_OK, stranger));
    assert_eq!(p.stat(RETURN_RETURNED), 2);
}

#[test]
fn one_client_port_through_two_nodes_is_two_flows_to_the_task() {
    let p = port("clash");
    for (client, udp) in [
        ((CLIENT, 40000), None),
        ((CLIENT, 40001), Some(true)),
        ((CLIENT, 40002), Some(false)),
    ] {
        let first = frame(&arriving(SANDBOX_A, client, SYN, udp));
        assert_eq!(p.reaching_task(&first), (TC_ACT_OK, first.clone()));
        let second = frame(&arriving(SANDBOX_C, client, SYN, udp));
        let (verdict, out) = p.reaching_task(&second);
        assert_eq!(verdict, TC_ACT_OK);
        let seen = u16_at(&out, L4);
        assert!(
            seen >= 32768,
            "the second flow's port {seen} is from 32768-65535"
        );
        assert!(l4_sum_ok(&out), "checksum after the port change");
        if udp == Some(false) {
            assert_eq!(u16_at(&out, L4 + 6), 0, "a UDP checksum of 0 stays 0");
        }
        let sum_at = L4 + if udp.is_some() { 6 } else { 16 };
        let blank = |f: &[u8]| {
            let mut f = f.to_vec();
            f[L4..L4 + 2].fill(0);
            f[sum_at..sum_at + 2].fill(0);
            f
        };
        assert_eq!(blank(&out), blank(&second), "only the source port changes");
        // Its next packet gets the same port; the first flow keeps the client's.
        assert_eq!(u16_at(&p.reaching_task(&second).1, L4), seen);
        assert_eq!(p.reaching_task(&first).1, first);
        // Answers: each to its own node, the second with the client's port restored.
        let (_, back) = p.leaving_task(&frame(&answer((CLIENT, seen), ACK, udp)));
        assert_eq!(&back[0..6], &mac_of(SANDBOX_C));
        assert_eq!(u16_at(&back, L4 + 2), client.1);
        assert!(l4_sum_ok(&back), "checksum after the port is restored");
        let (_, back) = p.leaving_task(&frame(&answer(client, ACK, udp)));
        assert_eq!(&back[0..6], &mac_of(SANDBOX_A));
        assert_eq!(u16_at(&back, L4 + 2), client.1);
    }
    assert_eq!(p.stat(RETURN_REMAPPED), 3);
    assert_eq!(p.stat(RETURN_NO_PORT), 0);
}

#[test]
fn a_closed_flows_port_is_free_and_an_open_ones_is_a_clash() {
    let p = port("reused");
    let client = (CLIENT, 40000);
    p.reaching_task(&frame(&arriving(SANDBOX_A, client, SYN, None)));
    p.reaching_task(&frame(&arriving(SANDBOX_A, client, FIN | ACK, None)));
    let closing: Vec<_> = p.flows().into_iter().map(|(_, f)| f.flags).collect();
    assert_eq!(closing, vec![RETURN_CLOSING]);
    // The client reuses its port through node A: the same flow, open again.
    let syn = frame(&arriving(SANDBOX_A, client, SYN, None));
    assert_eq!(p.reaching_task(&syn), (TC_ACT_OK, syn));
    assert_eq!(p.flows()[0].1.flags, 0, "open again");
    p.reaching_task(&frame(&arriving(SANDBOX_A, client, FIN | ACK, None)));
    // Closed again: the client reuses its port through node C, which takes the key over
    // (no other port).
    let syn = frame(&arriving(SANDBOX_C, client, SYN, None));
    assert_eq!(p.reaching_task(&syn), (TC_ACT_OK, syn));
    let (_, back) = p.leaving_task(&frame(&answer(client, SYN | ACK, None)));
    assert_eq!(&back[0..6], &mac_of(SANDBOX_C));
    // While that one is open, the same port through node A is a clash: a port of its
    // own, and the port map says where it came from.
    let (_, out) = p.reaching_task(&frame(&arriving(SANDBOX_A, client, SYN, None)));
    let seen = u16_at(&out, L4);
    assert!(seen >= 32768);
    let ports: HashMap<&MapData, ReturnOrigin, u32> =
        HashMap::try_from(p.obj.map("netd_return_ports").expect("ports")).expect("hash");
    let (k, f) = p
        .flows()
        .into_iter()
        .find(|(k, _)| u16::from_be(k.dport) == seen)
        .expect("the remapped flow");
    assert_eq!(
        ports.get(&ReturnOrigin::of(&k, &f), 0).ok(),
        Some(u32::from(seen.to_be())),
        "netd finds a remapped flow's port entry from the flow (ReturnOrigin::of)"
    );
    // A packet of an open flow from another node, not a SYN: the task has no such
    // connection; dropped, not given a port.
    let stray = frame(&arriving(SANDBOX_C, (CLIENT, 40001), ACK, None));
    p.reaching_task(&frame(&arriving(SANDBOX_A, (CLIENT, 40001), SYN, None)));
    assert_eq!(p.reaching_task(&stray).0, TC_ACT_SHOT);
    assert_eq!(p.stat(RETURN_STRAY), 1);
}

#[test]
fn a_fragmented_answer_goes_back_whole() {
    let p = port("fragments");
    let client = (CLIENT, 40000);
    p.reaching_task(&frame(&arriving(SANDBOX_A, client, 0, Some(true))));
    let whole = frame(&answer(client, 0, Some(true)));
    // The first fragment: "more fragments", offset 0 (the checksum is not re-made: the
    // program does not read it).
    let mut first = whole.clone();
    first[ETH + 6] = 0x20;
    let (verdict, out) = p.leaving_task(&first);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[0..6], &mac_of(SANDBOX_A));
    // A later fragment (offset 8 bytes, same id): no ports, the same way back.
    let mut later = whole[..L4].to_vec();
    later[ETH + 6] = 0x00;
    later[ETH + 7] = 0x01;
    later.extend_from_slice(b"fragment");
    let (verdict, out) = p.leaving_task(&later);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        &out[0..6],
        &mac_of(SANDBOX_A),
        "the later fragment follows the first"
    );
    // Another datagram's later fragment (another id) is not the flow's.
    let mut other = later.clone();
    other[ETH + 4] ^= 0xff;
    assert_eq!(p.leaving_task(&other), (TC_ACT_OK, other.clone()));
}

#[test]
fn what_is_no_clients_flow_passes_untouched() {
    let p = port("untouched");
    // From a node's own ingress address (SNAT): nothing to remember.
    let snat = frame(&Pkt {
        src: (SANDBOX_A, 33000),
        ..arriving(SANDBOX_A, (CLIENT, 0), SYN, None)
    });
    assert_eq!(p.reaching_task(&snat), (TC_ACT_OK, snat));
    // Not TCP or UDP, IP options, fragments, short frames, not IPv4.
    let base = frame(&arriving(SANDBOX_A, (CLIENT, 40000), SYN, None));
    let mut icmp = base.clone();
    icmp[ETH + 9] = 1;
    let mut options = base.clone();
    options[ETH] = 0x46;
    let mut fragment = base.clone();
    fragment[ETH + 6] = 0x20;
    fragment[ETH + 7] = 0x01;
    let mut arp = base.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let short = base[..L4 + 6].to_vec();
    for (what, f) in [
        ("ICMP", icmp),
        ("IP options", options),
        ("a later fragment", fragment),
        ("ARP", arp),
        ("a cut TCP header", short),
    ] {
        assert_eq!(p.reaching_task(&f), (TC_ACT_OK, f.clone()), "{what}");
        assert_eq!(p.leaving_task(&f), (TC_ACT_OK, f.clone()), "{what}");
    }
    assert!(p.flows().is_empty(), "nothing remembered");
    assert_eq!(p.stat(RETURN_RECORDED), 0);
}

#[test]
fn random_frames_change_nothing_and_are_never_dropped() {
    let p = port("random");
    // A seeded xorshift: the same frames every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let base = frame(&arriving(SANDBOX_A, (CLIENT, 40000), SYN, None));
    let mut tried = 0;
    for _ in 0..2000 {
        let len = 14 + (next() % 80) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half of them look like IPv4 from a client, to reach the parser's later checks.
        if next() % 2 == 0 {
            let keep = (len).min(base.len());
            let cut = 14 + (next() as usize % (keep - 13));
            f[..cut].copy_from_slice(&base[..cut]);
        }
        let Some((verdict, out)) = p.try_run(netd_ebpf::TASK_PORT_FROM_TASK, &f) else {
            continue;
        };
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, f, "an answer of no flow is untouched");
        let (verdict, _) = p.reaching_task(&f);
        assert_ne!(verdict, TC_ACT_SHOT, "nothing is dropped without a clash");
        tried += 1;
    }
    assert!(tried > 1000, "only {tried} of 2000 frames made packets");
}
