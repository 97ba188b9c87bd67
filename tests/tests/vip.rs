//! Service VIP load balancing in the lab, the same suite on both datapaths: whoami
//! tasks behind a VIP, a client task connecting to it with real sockets. Round-robin
//! evenness, UDP, answers from the VIP, scale up and down, refusal without backends,
//! restart with open connections, and (on three nodes) a lost node.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::{connect_from, field, http_get, in_netns, udp_ask_from, Lab, LEASE_TTL_SECS};
use serde_json::Value;

const PORT: u16 = 80;
const SUBNET: &str = "198.19.20.0/24";

fn vip_of(lab: &Lab, service: &str) -> Result<Ipv4Addr> {
    let v = lab.cli_json(0, &["service", "inspect", service])?;
    v["vips"]["front"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no VIP on front: {v}"))
}

/// A lab with network `front` (made with `opts`), service `web` with `backends` whoami
/// tasks spread over the nodes round-robin, and a client task `cli` (service `client`)
/// on node 1.
fn setup(tag: &str, nodes: usize, datapath: &str, backends: usize, opts: &[&str]) -> Result<Lab> {
    let mut lab = Lab::build(tag, nodes, nodes > 1, datapath)?;
    let mut create = vec!["network", "create", "front", "--subnet", SUBNET];
    create.extend_from_slice(opts);
    lab.cli(0, &create)?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    lab.cli(0, &["service", "create", "client", "--network", "front"])?;
    for i in 0..backends {
        let node = lab.nodes[i % nodes].name.clone();
        lab.attach_whoami(0, "web", &format!("w{i}"), Some(&node))?;
    }
    lab.attach_whoami(0, "client", "cli", None)?;
    let status = lab.cli_json(0, &["status"])?;
    let active = status["datapath"]["active"].as_str().unwrap_or_default();
    if active != datapath {
        bail!("asked for datapath {datapath}, node 1 runs {active}: {status}");
    }
    Ok(lab)
}

/// `n` sequential new connections from `cli` to the VIP; the whoami name of each answer.
/// Each connection also checks that the client's socket sees the VIP as its peer.
fn round(lab: &Lab, vip: Ipv4Addr, n: usize) -> Result<Vec<String>> {
    let client = lab.ns("cli");
    let mut out = vec![];
    for _ in 0..n {
        let mut s = connect_from(&client, SocketAddr::from((vip, PORT)))?;
        let peer = s.peer_addr()?;
        if peer != SocketAddr::from((vip, PORT)) {
            bail!("the client's socket sees {peer}, not the VIP");
        }
        let body = http_get(&mut s)?;
        out.push(field(&body, "Hostname").context("whoami name")?.to_string());
    }
    Ok(out)
}

/// Asserts the round-robin promise: after every round of `per_round` connections, no
/// backend is more than one connection ahead of another; returns the totals.
fn assert_even(
    lab: &Lab,
    vip: Ipv4Addr,
    expected: &[&str],
    rounds: usize,
) -> Result<BTreeMap<String, usize>> {
    let mut counts: BTreeMap<String, usize> = expected.iter().map(|b| (b.to_string(), 0)).collect();
    for r in 0..rounds {
        for name in round(lab, vip, expected.len())? {
            match counts.get_mut(&name) {
                Some(c) => *c += 1,
                None => bail!("connection reached {name}, which is not a backend now: {counts:?}"),
            }
        }
        let (min, max) = (
            counts.values().min().copied().unwrap_or(0),
            counts.values().max().copied().unwrap_or(0),
        );
        if max - min > 1 || min < r {
            bail!("uneven after round {}: {counts:?}", r + 1);
        }
    }
    Ok(counts)
}

/// A TCP connect from `cli` that must fail at once (no backends), not hang.
fn assert_refused(lab: &Lab, vip: Ipv4Addr) -> Result<()> {
    let client = lab.ns("cli");
    let (tcp, udp) = in_netns(&client, move || {
        let start = Instant::now();
        let tcp =
            TcpStream::connect_timeout(&SocketAddr::from((vip, PORT)), Duration::from_secs(5))
                .map(|_| ())
                .map_err(|e| (e.kind(), start.elapsed()));
        // A connected UDP socket hears the refusal (EPERM at once or ICMP unreachable).
        let udp = (|| -> std::io::Result<()> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.connect((vip, PORT))?;
            s.send(b"who")?;
            let mut buf = [0u8; 64];
            s.recv(&mut buf).map(|_| ())
        })()
        .map_err(|e| e.kind());
        Ok((tcp, udp))
    })?;
    match tcp {
        Ok(()) => bail!("a connection to a VIP without backends succeeded"),
        Err((ErrorKind::TimedOut, t)) => {
            bail!("a connection to a VIP without backends hung ({t:?})")
        }
        Err((kind, t)) if t < Duration::from_secs(2) => {
            eprintln!("refused in {t:?}: {kind:?}");
        }
        Err((kind, t)) => bail!("refusal took {t:?} ({kind:?})"),
    }
    match udp {
        Ok(()) => bail!("UDP to a VIP without backends got an answer"),
        Err(ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            bail!("UDP to a VIP without backends was not refused")
        }
        Err(_) => Ok(()),
    }
}

fn counters(lab: &Lab) -> Result<Value> {
    let v = lab.cli_json(0, &["service", "inspect", "web"])?;
    Ok(v["load_balancer"]["vips"][0].clone())
}

fn suite_one_node(datapath: &str, tag: &str) -> Result<()> {
    let mut lab = setup(tag, 1, datapath, 5, &[])?;
    let vip = vip_of(&lab, "web")?;
    let all = ["w0", "w1", "w2", "w3", "w4"];

    // Round-robin over 5 backends, even within one per round.
    assert_even(&lab, vip, &all, 3)?;
    let c = counters(&lab)?;
    let total = c["connections"].as_u64().unwrap_or(0);
    if total < 15 || c["backends"].as_array().map(Vec::len) != Some(5) {
        bail!("counters do not show the 15 connections over 5 backends: {c}");
    }

    // UDP: a recvfrom() sees the VIP as the source of the answer.
    let (answer, from) = udp_ask_from(&lab.ns("cli"), SocketAddr::from((vip, PORT)))?;
    if from != SocketAddr::from((vip, PORT)) || field(&answer, "Hostname").is_none() {
        bail!("UDP answer {answer:?} came from {from}, not the VIP");
    }

    // An established connection, kept across everything below.
    let mut kept = connect_from(&lab.ns("cli"), SocketAddr::from((vip, PORT)))?;
    let kept_backend = field(&http_get(&mut kept)?, "Hostname")
        .context("name")?
        .to_string();

    // A UDP socket that keeps sending to the VIP, bound to a backend other than the
    // kept connection's.
    let to_vip = SocketAddr::from((vip, PORT));
    let ask = |s: &UdpSocket| -> Result<String> {
        s.send_to(b"who", to_vip)?;
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf).context("UDP answer")?;
        if from != to_vip {
            bail!("UDP answer from {from}, not the VIP");
        }
        let body = String::from_utf8_lossy(&buf[..n]).into_owned();
        Ok(field(&body, "Hostname").context("name")?.to_string())
    };
    let (sender, removed) = (0..10)
        .find_map(|_| {
            let s = in_netns(&lab.ns("cli"), || {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                Ok(s)
            })
            .ok()?;
            let backend = ask(&s).ok()?;
            let name = all.iter().copied().find(|b| *b == backend)?;
            (name != kept_backend).then_some((s, name))
        })
        .context("a UDP socket bound to a backend other than the kept connection's")?;

    // Scale down: a removed backend gets no new connection once detach returns; the
    // kept connection (to a remaining backend) is undisturbed, and the UDP socket that
    // reached the removed backend reaches another one with its next datagram.
    lab.cli(0, &["task", "detach", removed])?;
    let remaining: Vec<&str> = all.iter().copied().filter(|b| *b != removed).collect();
    assert_even(&lab, vip, &remaining, 2)?;
    http_get(&mut kept).context("the kept connection after a scale-down")?;
    let now = ask(&sender).context("the UDP socket after its backend left")?;
    if !remaining.contains(&now.as_str()) {
        bail!("the UDP socket still reaches {now} after it was detached");
    }

    // Scale up: the new task joins the rotation at once.
    lab.attach_whoami(0, "web", "w5", None)?;
    let mut grown = remaining.clone();
    grown.push("w5");
    assert_even(&lab, vip, &grown, 2)?;

    // Restart (kill -9): established connections and new ones work afterwards; with
    // eBPF also while no netd runs (pinned programs and maps).
    lab.stop_daemon(0, true)?;
    if datapath == "ebpf" {
        http_get(&mut kept).context("the kept connection while netd is down")?;
        round(&lab, vip, 5).context("new connections while netd is down")?;
    }
    lab.start_daemon(0)?;
    http_get(&mut kept).context("the kept connection after a netd restart")?;
    assert_even(&lab, vip, &grown, 1)?;

    // A service without tasks refuses at once.
    lab.cli(0, &["service", "create", "empty", "--network", "front"])?;
    assert_refused(&lab, vip_of(&lab, "empty")?)?;

    // Everything goes: nothing netd attached stays behind.
    drop(kept);
    for s in ["web", "client", "empty"] {
        lab.cli(0, &["service", "rm", s])?;
    }
    lab.cli(0, &["network", "rm", "front"])?;
    let pins = Path::new("/sys/fs/bpf/netd").join(&lab.nodes[0].name);
    if pins.exists() {
        bail!("{} is left after the last task went", pins.display());
    }
    // Only the node's standing ingress plumbing stays: the ingress network's sandbox and
    // the node's ingress sandbox.
    let ingress_id = lab
        .cli_json(0, &["network", "ls"])?
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == "ingress")
        .and_then(|n| n["id"].as_str().map(str::to_string))
        .context("the ingress network")?;
    let node = &lab.nodes[0].name;
    let standing = [
        format!("netd-{node}-{ingress_id}"),
        format!("netd-{node}-isbox"),
    ];
    let sandboxes = netd_lab::run(std::process::Command::new("ip").args(["netns", "list"]))?;
    let left: Vec<String> = String::from_utf8_lossy(&sandboxes.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|l| l.starts_with(&format!("netd-{node}")) && !standing.iter().any(|s| s == l))
        .map(str::to_string)
        .collect();
    if !left.is_empty() {
        bail!("sandboxes left: {left:?}");
    }
    Ok(())
}

/// The cluster suite, on a network made with `opts` (`--opt encrypted`: the same
/// behaviour, with every packet between nodes sealed by WireGuard).
fn suite_cluster(datapath: &str, tag: &str, opts: &[&str]) -> Result<()> {
    // Backends w0..w4 on n1, n2, n3, n1, n2; the client on n1.
    let mut lab = setup(tag, 3, datapath, 5, opts)?;
    let sealed = |lab: &Lab| -> Result<u64> {
        Ok(lab.cli_json(0, &["status"])?["encryption"]["sealed"]
            .as_u64()
            .unwrap_or(0))
    };
    let sealed_before = sealed(&lab)?;
    let vip = vip_of(&lab, "web")?;
    let all = ["w0", "w1", "w2", "w3", "w4"];
    assert_even(&lab, vip, &all, 2)?;
    let (answer, from) = udp_ask_from(&lab.ns("cli"), SocketAddr::from((vip, PORT)))?;
    if from != SocketAddr::from((vip, PORT)) || field(&answer, "Hostname").is_none() {
        bail!("UDP answer {answer:?} came from {from}, not the VIP");
    }

    // Over an encrypted network the connections to n2's and n3's tasks went sealed.
    if opts.contains(&"encrypted") && sealed(&lab)? < sealed_before + 20 {
        bail!(
            "n1 sealed {} packets for the whole round",
            sealed(&lab)? - sealed_before
        );
    }

    // Detach a task on n3 through n1's API: gone from n1's rotation on return.
    lab.cli(0, &["task", "detach", "w2"])?;
    let four = ["w0", "w1", "w3", "w4"];
    assert_even(&lab, vip, &four, 2)?;

    // Lose n2 (kill -9): within the lease TTL its tasks leave every VIP.
    lab.stop_daemon(1, true)?;
    let deadline = Instant::now() + Duration::from_secs(LEASE_TTL_SECS + 10);
    loop {
        let seen = round(&lab, vip, 4);
        if let Ok(names) = &seen {
            if names.iter().all(|n| n == "w0" || n == "w3") {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("n2's tasks still get connections: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_even(&lab, vip, &["w0", "w3"], 2)?;
    Ok(())
}

#[test]
fn vip_one_node_ebpf() -> Result<()> {
    suite_one_node("ebpf", "ve1")
}

#[test]
fn vip_one_node_userspace() -> Result<()> {
    suite_one_node("userspace", "vu1")
}

#[test]
fn vip_cluster_ebpf() -> Result<()> {
    suite_cluster("ebpf", "ve3", &[])
}

#[test]
fn vip_cluster_userspace() -> Result<()> {
    suite_cluster("userspace", "vu3", &[])
}

#[test]
fn vip_cluster_ebpf_encrypted() -> Result<()> {
    suite_cluster("ebpf", "vx3", &["--opt", "encrypted"])
}

#[test]
fn vip_cluster_userspace_encrypted() -> Result<()> {
    suite_cluster("userspace", "vy3", &["--opt", "encrypted"])
}

/// `--datapath auto` on a kernel that refuses eBPF (here: bpf(2) denied by seccomp)
/// runs the userspace datapath, says why in `netd status`, and balances all the same.
#[test]
fn auto_falls_back_to_userspace_when_the_kernel_refuses_ebpf() -> Result<()> {
    let mut lab = Lab::build("vfb", 1, false, "auto")?;
    lab.stop_daemon(0, false)?;
    lab.deny_bpf = true;
    lab.start_daemon(0)?;
    let status = lab.cli_json(0, &["status"])?;
    let dp = &status["datapath"];
    let reason = dp["reason"].as_str().unwrap_or_default();
    if dp["active"] != "userspace" || dp["requested"] != "auto" || !reason.contains("not permitted")
    {
        bail!("expected a fallback to userspace with the kernel's reason: {dp}");
    }
    lab.cli(0, &["network", "create", "front", "--subnet", SUBNET])?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    lab.cli(0, &["service", "create", "client", "--network", "front"])?;
    lab.attach_whoami(0, "web", "w0", None)?;
    lab.attach_whoami(0, "web", "w1", None)?;
    lab.attach_whoami(0, "client", "cli", None)?;
    let vip = vip_of(&lab, "web")?;
    assert_even(&lab, vip, &["w0", "w1"], 2)?;
    Ok(())
}
