//! `sock_lb` doing its job in a real kernel: the programs attached to a cgroup made for
//! the test, its maps filled by hand as netd will fill them, and real clients (python3
//! sockets, started inside that cgroup and a test namespace) connecting to a VIP that no
//! interface carries. Two backends live on the namespace's loopback, each server saying
//! which address it is.
//!
//! Everything is made by the test and removed at the end (also on failure): the
//! namespace, the cgroup, the programs (detached when the object drops).

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use aya::maps::HashMap;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use netd_ebpf::maps::{BackendKey, BackendValue, NetnsNet, VipKey, VipValue};
use netd_ebpf::SOCK_LB_PROGRAMS;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 6, 1);
const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 5, 1), Ipv4Addr::new(198, 18, 5, 2)];
const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

struct Fixture {
    netns: String,
    cgroup: PathBuf,
    pins: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip {args:?} failed");
}

fn enter(netns: &str) {
    let f = File::open(format!("/run/netns/{netns}")).expect("open netns");
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Servers on each backend address (TCP and UDP port 80), answering with that address.
fn serve_backends(netns: &str) {
    for addr in BACKENDS {
        let ns = netns.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            enter(&ns);
            let tcp = TcpListener::bind((addr, 80)).expect("bind tcp");
            let udp = UdpSocket::bind((addr, 80)).expect("bind udp");
            tx.send(()).expect("ready");
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(addr.to_string().as_bytes(), from);
                }
            });
            for conn in tcp.incoming().flatten() {
                let mut conn = conn;
                let mut buf = [0u8; 64];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(addr.to_string().as_bytes());
            }
        });
        rx.recv().expect("backend started");
    }
}

/// The netns cookie of `netns`.
fn netns_cookie(netns: &str) -> u64 {
    let ns = netns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        netd_ebpf::current_netns_cookie().expect("netns cookie")
    })
    .join()
    .expect("cookie thread")
}

/// Runs python3 `code` inside the test's namespace and cgroup; (success, stdout).
fn client(fx: &Fixture, code: &str) -> (bool, String) {
    let netns = File::open(format!("/run/netns/{}", fx.netns)).expect("netns");
    let procs = CString::new(fx.cgroup.join("cgroup.procs").display().to_string()).expect("path");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", code]);
    // SAFETY: only setns(2), open(2), write(2) and close(2) run between fork and exec,
    // on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    let out = cmd.output().expect("run python3");
    let mut text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        // What went wrong, for the caller to tell one refusal from another.
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), text)
}

const TCP_GET: &str = "import socket\n\
s = socket.create_connection(('198.18.6.1', 80), timeout=2)\n\
s.sendall(b'hi')\n\
print(s.recv(64).decode(), s.getpeername()[0])";

const UDP_ASK: &str = "import socket\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
s.settimeout(2)\n\
s.sendto(b'hi', ('198.18.6.1', 80))\n\
data, src = s.recvfrom(64)\n\
print(data.decode(), src[0])";

#[test]
fn vip_connections_are_balanced_round_robin_and_answers_come_from_the_vip() {
    let fx = Fixture {
        netns: format!("netdtest-lb-{:08x}", rand_suffix()),
        cgroup: PathBuf::from(CGROUP_ROOT).join(format!("netdtest-lb-{:08x}", rand_suffix())),
        pins: PathBuf::from(netd_ebpf::BPFFS).join(format!("netdtest-lb-{:08x}", rand_suffix())),
    };
    netd_ebpf::ensure_bpffs().expect("bpffs");
    ip(&["netns", "add", &fx.netns]);
    ip(&["-n", &fx.netns, "link", "set", "lo", "up"]);
    for b in BACKENDS {
        ip(&[
            "-n",
            &fx.netns,
            "addr",
            "add",
            &format!("{b}/32"),
            "dev",
            "lo",
        ]);
    }
    std::fs::create_dir(&fx.cgroup).expect("create test cgroup");
    serve_backends(&fx.netns);

    let mut obj = netd_ebpf::load_sock_lb(&fx.pins).expect("load sock_lb.o");
    let cgroup = File::open(&fx.cgroup).expect("open cgroup");
    for name in SOCK_LB_PROGRAMS {
        let prog: &mut CgroupSockAddr = obj
            .program_mut(name)
            .expect("program")
            .try_into()
            .expect("cgroup sock_addr");
        prog.load().expect("verifier");
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .expect("attach");
    }
    let mut netns: HashMap<_, u64, u8> =
        HashMap::try_from(obj.take_map("netd_netns").expect("netd_netns")).expect("map");
    let cookie = netns_cookie(&fx.netns);
    netns.insert(cookie, 1, 0).expect("add netns");
    // The VIP's network (number 7), and the client namespace on it.
    let mut vip_nets: HashMap<_, u32, u32> =
        HashMap::try_from(obj.take_map("netd_vip_nets").expect("netd_vip_nets")).expect("map");
    vip_nets
        .insert(u32::from(VIP).to_be(), 7, 0)
        .expect("add the VIP's network");
    let mut netns_nets: HashMap<_, NetnsNet, u8> =
        HashMap::try_from(obj.take_map("netd_netns_nets").expect("netd_netns_nets")).expect("map");
    let on_net = NetnsNet {
        cookie,
        network: 7,
        pad: 0,
    };
    netns_nets
        .insert(on_net, 1, 0)
        .expect("add the netns' network");
    let mut vips: HashMap<_, VipKey, VipValue> =
        HashMap::try_from(obj.take_map("netd_vips").expect("netd_vips")).expect("map");
    let mut backends: HashMap<_, BackendKey, BackendValue> =
        HashMap::try_from(obj.take_map("netd_backends").expect("netd_backends")).expect("map");
    let mut rr: HashMap<_, u32, u32> =
        HashMap::try_from(obj.take_map("netd_rr").expect("netd_rr")).expect("map");
    for (i, b) in BACKENDS.iter().enumerate() {
        backends
            .insert(
                BackendKey {
                    service: 1,
                    index: i as u32,
                },
                BackendValue {
                    addr: u32::from(*b).to_be(),
                    pad: 0,
                },
                0,
            )
            .expect("add backend");
    }
    rr.insert(1, 0, 0).expect("rr slot");
    // The whole VIP (any port, any protocol), as netd will program a service.
    let whole_vip = VipKey {
        addr: u32::from(VIP).to_be(),
        ..VipKey::default()
    };
    vips.insert(
        whole_vip,
        VipValue {
            service: 1,
            count: 2,
        },
        0,
    )
    .expect("add vip");

    // TCP: four connections to the VIP land on .1, .2, .1, .2, and the socket's peer
    // name is the VIP the client asked for.
    let mut answered = vec![];
    for _ in 0..4 {
        let (ok, out) = client(&fx, TCP_GET);
        assert!(ok, "TCP client failed: {out}");
        let (backend, peer) = out.split_once(' ').expect("two words");
        assert_eq!(peer, VIP.to_string(), "getpeername shows the backend");
        answered.push(backend.to_string());
    }
    assert_eq!(answered[0], answered[2]);
    assert_eq!(answered[1], answered[3]);
    assert_ne!(answered[0], answered[1], "not round-robin: {answered:?}");

    // UDP: the answer comes from the VIP (recvfrom), whichever backend sent it.
    let (ok, out) = client(&fx, UDP_ASK);
    assert!(ok, "UDP client failed: {out}");
    let (backend, src) = out.split_once(' ').expect("two words");
    assert!(BACKENDS.iter().any(|b| b.to_string() == backend), "{out}");
    assert_eq!(src, VIP.to_string(), "recvfrom shows the backend");

    // No backends: refused at once, no waiting for a timeout.
    vips.insert(
        whole_vip,
        VipValue {
            service: 1,
            count: 0,
        },
        0,
    )
    .expect("empty vip");
    // Off the VIP's network: refused at once, though the VIP has backends again.
    vips.insert(
        whole_vip,
        VipValue {
            service: 1,
            count: 2,
        },
        0,
    )
    .expect("vip again");
    netns_nets.remove(&on_net).expect("leave the network");
    let (ok, out) = client(&fx, TCP_GET);
    assert!(!ok, "a task off the VIP's network reached it: {out}");
    assert!(out.contains("PermissionError"), "refused otherwise: {out}");
    netns_nets
        .insert(on_net, 1, 0)
        .expect("back on the network");
    vips.insert(
        whole_vip,
        VipValue {
            service: 1,
            count: 0,
        },
        0,
    )
    .expect("empty vip again");
    let start = Instant::now();
    let (ok, _) = client(&fx, TCP_GET);
    assert!(!ok, "a VIP without backends accepted a connection");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        start.elapsed()
    );
    // Other addresses are untouched.
    let (ok, out) = client(
        &fx,
        "import socket\ns = socket.create_connection(('198.18.5.2', 80), timeout=2)\n\
         s.sendall(b'hi')\nprint(s.recv(64).decode())",
    );
    assert!(ok && out == "198.18.5.2", "direct connect: {out}");
    drop(obj);
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ std::process::id())
        .unwrap_or(0)
}
