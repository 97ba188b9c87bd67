//! `netd-bench ingress`: new connections per second, keep-alive requests per second and
//! p99 latency from a client on the underlay to a node that runs none of the service's
//! tasks, through netd's routing mesh (its XDP fast path on n3, its kernel path on n4;
//! both keep the client's address, and n6 and n7 run them as `--mesh-source snat`),
//! side by side with the same client connecting straight to the same tasks (the
//! service's host-mode port on their nodes: the limit), HAProxy on n3, and nftables DNAT
//! with masquerade on n3. HAProxy and nftables balance to the nodes that run tasks, onto
//! that host-mode port (the usual way to put either in front of Swarm nodes). The floor
//! of every path through a second node is measured too: a client whose connections
//! straight to the tasks are routed both ways through n4, plain IP forwarding. Also UDP
//! through the published port on both paths: round trips per second, and the rate at
//! which the ingress node forwards a one-way flood offered at the same rate to each.
//! Ratios are medians of the ratios of runs of the same round.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netd_bench::load;
use netd_bench::plot::{bar_chart, Panel};
use netd_bench::report::{
    conn_req_cells, header, machine, median, median_run, ms, paired_ratio, plot_beside, quantile,
    write_results,
};
use netd_lab::{underlay_ip, Lab};

const MESH_PORT: u16 = 4567;
const HOST_PORT: u16 = 4577;
const HAPROXY_PORT: u16 = 4587;
const NFT_PORT: u16 = 4597;
const UDP_PORT: u16 = 4568;
const DIRECT_HOST: u8 = 50;
const VXLAN_PORT: u16 = 4789;
/// The source port of the flood's one flow.
const FLOOD_PORT: u16 = 40000;
/// The nftables table that counts and drops VXLAN datagrams at n1 and n2 during a flood.
const SINK: &str = "netdbench_sink";
const CLIENT_HOST: u8 = 100;
/// The client of the floor path, whose routes go through n4.
const ROUTED_HOST: u8 = 101;
const MAX_OPS: u64 = 2_000_000;

struct Path_ {
    label: &'static str,
    /// The client's namespace.
    from: String,
    /// Client thread `i` connects to `addrs[i % len]`.
    addrs: Vec<SocketAddr>,
    conns: Vec<load::Run>,
    reqs: Vec<load::Run>,
}

/// What the figures mean, as every results file says it.
const READING: &str = "\n**Reading.** The limit is a client connecting straight to the \
tasks: the service's host-mode port on each task's own node (one DNAT, no overlay), the \
client's threads spread over both nodes as the mesh spreads its connections. Every other path \
crosses an ingress node (n3 to n7) first, then the overlay (netd's mesh) or the \
underlay (HAProxy, nftables: onto the same host-mode ports) to a node that runs tasks. \
The lab's underlay is veth, made to act like a wire (full checksums on every frame; an \
XDP program on the far end of n5's veth so that frames native XDP sends back reach the \
hub: see `Lab`). On a veth, native XDP is the slower mode: the driver copies each frame \
into a page of its own and hands what XDP sends back to the peer's NAPI, while generic XDP \
runs the same program on the packet in line; netd's `auto` takes generic there, native on \
a NIC. Client, servers and all the network namespaces share the machine's 2 CPUs, so \
every figure is the whole system's: what the mesh saves on the ingress node is diluted \
by what client, task node and task spend on every connection. The UDP forwarding rate \
isolates the ingress node: the client floods the published port from CPU 0 at the same \
offered rate for every path, the ingress node's interface is polled on CPU 1, and n1 and \
n2 count (and drop) the VXLAN datagrams that arrive for the tasks at their interface's \
netdev ingress hook, the same way for every path. A path that forwards all it is offered \
kept up: its figure is a lower bound, and its ratio to a path that did not is one too. The \
floor path measures what crossing a second node costs by itself on this machine: the \
limit's own connections, routed both ways through n4 with no translation and no program; \
the mesh's ratio to it is what the mesh itself costs.";

/// What this run's floor says (`floor`: floor / straight; `mesh`: XDP mesh / floor; new
/// connections/s, each the median of the rounds' ratios).
fn floor_reading(floor: f64, mesh: f64) -> String {
    let mesh_said = if mesh < 0.97 {
        format!(
            "the XDP mesh cost {:.0} % more than the floor, its own translation and overlay",
            (1.0 / mesh - 1.0) * 100.0
        )
    } else if mesh <= 1.03 {
        "the XDP mesh ran at the floor (within the 3 % this lab's rounds differ by): \
         what it adds is lost in the noise"
            .to_string()
    } else {
        format!(
            "the XDP mesh ran {:.0} % faster than the floor: XDP sends a packet on \
             before the forwarding node's stack sees it, which the floor's plain \
             forwarding does not",
            (mesh - 1.0) * 100.0
        )
    };
    let floor_said = if floor < 1.0 {
        format!(
            "crossing a second node by itself cost {:.0} % of the straight path's new \
             connections/s",
            (1.0 - floor) * 100.0
        )
    } else {
        "crossing a second node by itself cost nothing measurable".to_string()
    };
    format!(
        " In this run {floor_said} (floor / straight = {floor:.2}×), and {mesh_said} \
         (XDP mesh / floor = {mesh:.2}×).\n\n"
    )
}

/// How much longer one connection takes at `rate` than at `base` (both per second), in
/// µs.
fn per_connection_us(rate: f64, base: f64) -> f64 {
    (1.0 / rate.max(1e-9) - 1.0 / base.max(1e-9)) * 1e6
}

/// What the nodes' `netd status` says of their mesh (the ingress nodes' paths, the task
/// nodes' way back), for a run that failed on `label`.
fn mesh_state(lab: &Lab, label: &str) -> String {
    let mut out = format!("{label} failed; the nodes' routing mesh:");
    for i in 0..lab.nodes.len() {
        let mesh = lab
            .cli_json(i, &["status"])
            .map(|s| s["routing_mesh"].to_string())
            .unwrap_or_else(|e| format!("{e:#}"));
        out.push_str(&format!("\n{}: {mesh}", lab.nodes[i].name));
        // XDP addresses its frames from the neighbour table: an entry that failed
        // drops every flow to that node.
        if let Ok(o) = lab.exec_in(&lab.nodes[i].netns, &["ip", "neigh", "show", "dev", "eth0"]) {
            let neigh = String::from_utf8_lossy(&o.stdout).replace('\n', "; ");
            out.push_str(&format!("\n{} neighbours: {neigh}", lab.nodes[i].name));
        }
    }
    out
}

/// The Ethernet address of `netns`'s eth0.
fn mac_of(lab: &Lab, netns: &str) -> Result<[u8; 6]> {
    let o = lab.exec_in(netns, &["ip", "-j", "link", "show", "eth0"])?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("ip -j link")?;
    let text = v[0]["address"].as_str().context("no address on eth0")?;
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).with_context(|| format!("MAC {text}"))?;
    }
    Ok(mac)
}

/// Starts counting (and dropping) the VXLAN datagrams arriving at `netns`'s eth0.
fn sink_on(lab: &Lab, netns: &str) -> Result<()> {
    nft(
        lab,
        netns,
        &format!(
            "table netdev {SINK} {{\n chain vxlan {{\n  type filter hook ingress device \
             \"eth0\" priority 0;\n  udp dport {VXLAN_PORT} counter drop\n }}\n}}\n"
        ),
    )
}

/// Stops the sink in `netns`; returns how many datagrams it took.
fn sink_off(lab: &Lab, netns: &str) -> Result<u64> {
    let o = lab.exec_in(netns, &["nft", "list", "table", "netdev", SINK])?;
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    nft(lab, netns, &format!("delete table netdev {SINK}"))?;
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no counter in the sink of {netns}: {text}"))
}

/// The kernel threads that poll devices (threaded NAPI), by pid.
fn napi_threads() -> Result<BTreeSet<i32>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.starts_with("napi/") {
            out.insert(pid);
        }
    }
    Ok(out)
}

/// Gives the ingress node in `netns` a CPU of its own: its underlay interface is polled
/// by a kernel thread (threaded NAPI; GRO turns NAPI on for a veth without XDP), pinned
/// to `cpu`. Everything that interface receives, and what that sends on, runs there.
fn own_cpu(lab: &Lab, netns: &str, cpu: usize) -> Result<()> {
    let before = napi_threads()?;
    let o = lab.exec_in(netns, &["ethtool", "-K", "eth0", "gro", "on"])?;
    if !o.status.success() {
        bail!("ethtool in {netns}: {}", String::from_utf8_lossy(&o.stderr));
    }
    threaded_napi(lab, netns, true)?;
    let new: Vec<i32> = napi_threads()?.difference(&before).copied().collect();
    if new.is_empty() {
        bail!("no NAPI thread appeared for eth0 in {netns}");
    }
    for pid in new {
        load::pin_to_cpu(pid, cpu)?;
    }
    Ok(())
}

/// Threaded NAPI on `netns`'s eth0 on or off; off also turns GRO back off (a veth's
/// default), so the other runs see the interface as it was.
fn threaded_napi(lab: &Lab, netns: &str, on: bool) -> Result<()> {
    let script = if on {
        "echo 1 > /sys/class/net/eth0/threaded"
    } else {
        "echo 0 > /sys/class/net/eth0/threaded && ethtool -K eth0 gro off"
    };
    let o = lab.exec_in(netns, &["sh", "-c", script])?;
    if !o.status.success() {
        bail!(
            "threaded NAPI in {netns}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// Host routes in `netns` to each of `to` via `gateway` (on the underlay).
fn route_through(netns: &str, gateway: Ipv4Addr, to: &[Ipv4Addr]) -> Result<()> {
    for dst in to {
        let (dst, via) = (format!("{dst}/32"), gateway.to_string());
        netd_lab::run(Command::new("ip").args(["-n", netns, "route", "add", &dst, "via", &via]))?;
    }
    Ok(())
}

fn nft(lab: &Lab, netns: &str, script: &str) -> Result<()> {
    let file = lab.dir.join("bench-nft.conf");
    std::fs::write(&file, script)?;
    let o = lab.exec_in(netns, &["nft", "-f", &file.display().to_string()])?;
    if !o.status.success() {
        bail!("nft in {netns}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

pub fn run(
    seconds: u64,
    rounds: usize,
    threads: usize,
    tasks: usize,
    flood_pps: u64,
    out: &Path,
) -> Result<()> {
    // n1, n2 run the tasks; n3 takes connections on the XDP fast path as netd runs it by
    // default (`auto`: generic on a veth), n5 on native XDP, n4 on the kernel path; n6
    // and n7 run the XDP and the kernel path translating to the node's address
    // (`--mesh-source snat`, the mesh before issue 15). The lab is a wire lab (see
    // `Lab`); each node runs only the XDP it is measured with, so no other path pays for
    // a program it does not use.
    let mut lab = Lab::build_with("bing", 7, true, "auto", "native")?;
    for (i, xdp, source) in [
        (0, "off", "client"),
        (1, "off", "client"),
        (2, "auto", "client"),
        (3, "off", "client"),
        (5, "auto", "snat"),
        (6, "off", "snat"),
    ] {
        lab.xdp = xdp.into();
        lab.daemon_args = vec!["--mesh-source".into(), source.into()];
        lab.stop_daemon(i, false)?;
        lab.start_daemon(i)?;
    }
    lab.daemon_args.clear();
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.50.0/24"],
    )?;
    // One service, one set of tasks for every path: the mesh publishes it in ingress
    // mode, and the limit, HAProxy and nftables reach the same tasks through the same
    // service's host-mode port on their nodes.
    let publish = format!("{MESH_PORT}:80");
    let host = format!("{HOST_PORT}:80,mode=host");
    let udp = format!("{UDP_PORT}:80/udp");
    lab.cli(
        0,
        &[
            "service",
            "create",
            "mesh",
            "--network",
            "front",
            "--publish",
            &publish,
            "--publish",
            &udp,
            "--publish",
            &host,
        ],
    )?;
    // The tasks run on n1 and n2; n3 runs none and takes every connection.
    for i in 0..tasks {
        let node = lab.nodes[i % 2].name.clone();
        lab.attach_whoami(0, "mesh", &format!("m{i}"), Some(&node))?;
    }
    let client = lab.add_host("client", CLIENT_HOST)?;
    let routed_client = lab.add_host("routed", ROUTED_HOST)?;
    lab.whoami_host("direct", DIRECT_HOST, 80)?;
    let (n1, n2, n3, n4, n5, n6, n7) = (
        lab.nodes[0].ip,
        lab.nodes[1].ip,
        lab.nodes[2].ip,
        lab.nodes[3].ip,
        lab.nodes[4].ip,
        lab.nodes[5].ip,
        lab.nodes[6].ip,
    );
    let n3ns = lab.nodes[2].netns.clone();

    // HAProxy on n3, layer 4, round-robin over the host-mode ports of n1 and n2.
    let cfg = lab.dir.join("bench-haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\nfrontend mesh\n  bind {n3}:{HAPROXY_PORT}\n  \
             default_backend nodes\nbackend nodes\n  balance roundrobin\n  \
             server n1 {n1}:{HOST_PORT}\n  server n2 {n2}:{HOST_PORT}\n"
        ),
    )?;
    lab.spawn_in(
        &n3ns,
        Path::new("haproxy"),
        &["-db", "-f", &cfg.display().to_string()],
    )?;
    // nftables on n3: DNAT round-robin to the same ports, masquerade so answers return.
    nft(
        &lab,
        &n3ns,
        &format!(
            "table ip netdbench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat;\n    \
             ip daddr {n3} tcp dport {NFT_PORT} dnat to numgen inc mod 2 map {{ 0 : {n1}, 1 : {n2} }} : {HOST_PORT}\n  }}\n  \
             chain post {{\n    type nat hook postrouting priority srcnat;\n    \
             ip daddr {{ {n1}, {n2} }} tcp dport {HOST_PORT} masquerade\n  }}\n}}\n"
        ),
    )?;

    // The floor: a second client whose packets to n1 and n2, and theirs back to it, go
    // through n4 as an IP router does (a host route each way, no redirects), so that
    // the only work added to the straight path is one forwarding node.
    route_through(&routed_client, lab.nodes[3].ip, &[n1, n2])?;
    for i in 0..2 {
        route_through(
            &lab.nodes[i].netns,
            lab.nodes[3].ip,
            &[underlay_ip(ROUTED_HOST)],
        )?;
    }
    for sysctl in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.default.send_redirects=0",
    ] {
        let n4 = &lab.nodes[3].netns;
        netd_lab::run(Command::new("ip").args(["netns", "exec", n4, "sysctl", "-qw", sysctl]))?;
    }
    let mut paths = vec![
        Path_ {
            from: client.clone(),
            label: "straight to the tasks (host-mode ports on n1 and n2)",
            addrs: vec![
                SocketAddr::from((n1, HOST_PORT)),
                SocketAddr::from((n2, HOST_PORT)),
            ],
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            from: client.clone(),
            label: "HAProxy on n3 (L4, round-robin to n1/n2 host ports)",
            addrs: vec![SocketAddr::from((n3, HAPROXY_PORT))],
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            from: client.clone(),
            label: "nftables DNAT + masquerade on n3",
            addrs: vec![SocketAddr::from((n3, NFT_PORT))],
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            from: client.clone(),
            label:
                "netd routing mesh via n3 (XDP fast path, auto: generic; the task sees the client)",
            addrs: vec![SocketAddr::from((n3, MESH_PORT))],
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            from: client.clone(),
            label: "netd routing mesh via n4 (kernel path, --xdp off; the task sees the client)",
            addrs: vec![SocketAddr::from((n4, MESH_PORT))],
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            from: client.clone(),
            label: "netd routing mesh via n5 (XDP fast path, native)",
            addrs: vec![SocketAddr::from((n5, MESH_PORT))],
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            from: client.clone(),
            label: "netd routing mesh via n6 (XDP fast path, auto: generic; --mesh-source snat)",
            addrs: vec![SocketAddr::from((n6, MESH_PORT))],
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            from: client.clone(),
            label: "netd routing mesh via n7 (kernel path, --xdp off; --mesh-source snat)",
            addrs: vec![SocketAddr::from((n7, MESH_PORT))],
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            from: client.clone(),
            label: "reference: a server on the underlay (no cluster, no task)",
            addrs: vec![SocketAddr::from((underlay_ip(DIRECT_HOST), 80))],
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            from: routed_client.clone(),
            label: "floor of any path through a second node: straight to the tasks, routed \
                    both ways through n4 (plain IP forwarding, no translation, no program)",
            addrs: vec![
                SocketAddr::from((n1, HOST_PORT)),
                SocketAddr::from((n2, HOST_PORT)),
            ],
            conns: vec![],
            reqs: vec![],
        },
    ];
    let mut udp_runs: Vec<Vec<load::Run>> = vec![vec![]; 3];
    // Per path: datagrams forwarded per second (counted at n1 and n2) and sent per second.
    let mut flood_runs: Vec<Vec<(f64, f64)>> = vec![vec![]; 3];
    let sinks = [lab.nodes[0].netns.clone(), lab.nodes[1].netns.clone()];
    let udp_targets = [
        (
            "XDP fast path, auto: generic (n3)",
            SocketAddr::from((n3, UDP_PORT)),
            n3ns.clone(),
        ),
        (
            "kernel path (n4)",
            SocketAddr::from((n4, UDP_PORT)),
            lab.nodes[3].netns.clone(),
        ),
        (
            "XDP fast path, native (n5)",
            SocketAddr::from((n5, UDP_PORT)),
            lab.nodes[4].netns.clone(),
        ),
    ];
    // Every path answers before the runs start.
    for p in &paths {
        for addr in &p.addrs {
            let mut ok = false;
            for _ in 0..50 {
                if netd_lab::http_get_from(&p.from, *addr).is_ok() {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok {
                bail!("{} ({addr}) does not answer", p.label);
            }
        }
    }
    for (label, addr, _) in &udp_targets {
        if let Err(e) = netd_lab::udp_ask_from(&client, *addr) {
            return Err(e).with_context(|| format!("UDP through the {label} does not answer"));
        }
    }
    for round in 0..rounds {
        for p in paths.iter_mut() {
            eprintln!("round {}: {}", round + 1, p.label);
            let d = Duration::from_secs(seconds);
            p.conns.push(
                load::new_connections_to(&p.from, &p.addrs, threads, d, MAX_OPS)
                    .with_context(|| mesh_state(&lab, p.label))?,
            );
            p.reqs.push(
                load::http_keepalive_to(&p.from, &p.addrs, threads, d, MAX_OPS)
                    .with_context(|| mesh_state(&lab, p.label))?,
            );
            let failed: u64 = [&p.conns, &p.reqs]
                .iter()
                .filter_map(|runs| runs.last())
                .map(|r| r.failures)
                .sum();
            if failed > 0 {
                eprintln!("{failed} failed; {}", mesh_state(&lab, p.label));
            }
        }
        for (i, (label, addr, ingress)) in udp_targets.iter().enumerate() {
            eprintln!("round {}: UDP, {label}", round + 1);
            let d = Duration::from_secs(seconds);
            udp_runs[i].push(load::udp_round_trips(
                &client,
                *addr,
                threads * 2,
                d,
                MAX_OPS,
            )?);
            eprintln!("round {}: UDP flood, {label}", round + 1);
            for ns in &sinks {
                sink_on(&lab, ns)?;
            }
            // The client sends on CPU 0; the ingress node forwards on CPU 1.
            let sent = own_cpu(&lab, ingress, 1).and_then(|_| {
                let flow = load::RawFlow {
                    src_mac: mac_of(&lab, &client)?,
                    dst_mac: mac_of(&lab, ingress)?,
                    src: SocketAddrV4::new(underlay_ip(CLIENT_HOST), FLOOD_PORT),
                    dst: match addr {
                        SocketAddr::V4(a) => *a,
                        SocketAddr::V6(_) => bail!("IPv4 only"),
                    },
                };
                load::udp_flood(&client, flow, 0, d, MAX_OPS * 10, Some(flood_pps))
            });
            // The sinks go even when the flood failed: they drop all VXLAN.
            threaded_napi(&lab, ingress, false)?;
            let mut forwarded = 0;
            for ns in &sinks {
                forwarded += sink_off(&lab, ns)?;
            }
            let sent = sent?;
            let secs = sent.elapsed.as_secs_f64().max(1e-9);
            flood_runs[i].push((forwarded as f64 / secs, sent.per_second()));
        }
    }

    let mut md = header("Ingress routing mesh");
    writeln!(
        md,
        "Machine: {}. A 7-node lab cluster (etcd); one service with {tasks} whoami tasks on \
         n1 and n2, none on n3 to n7, published three ways: in ingress mode (netd's \
         mesh), in host mode on the tasks' nodes (the limit, HAProxy's and nftables' \
         backends), and UDP in ingress mode, so every path reaches the same tasks. n3 runs \
         the XDP fast path as netd does by default (`--xdp auto`, generic on a veth), n5 \
         runs it native (`--xdp native`), n4 only the kernel path; n1, n2 and n4 run `--xdp \
         off`. Those keep the client's address (`--mesh-source client`, the default); n6 \
         (XDP, auto) and n7 (`--xdp off`) translate to their own (`--mesh-source snat`). The client is a host on the underlay. New connections: {threads} client \
         threads each connect, send one HTTP GET, read the answer and close with a reset, \
         for {seconds} s (the limit's threads go to n1's and n2's host-mode ports in turn: \
         the same tasks the mesh spreads over). Requests: HTTP/1.1 keep-alive GETs over \
         {threads} connections for {seconds} s. Each path ran {rounds} times, alternating \
         round by round; the table shows the median run, the ratios are the median of the \
         ratios of runs of the same round.\n",
        machine()
    )?;
    writeln!(
        md,
        "| path | new connections/s | p99 connect+request | requests/s (keep-alive) | p99 request |\n|---|---|---|---|---|"
    )?;
    let mut cps = vec![];
    let mut rps = vec![];
    for p in &paths {
        let (cells, c, q) = conn_req_cells(&p.conns, &p.reqs);
        writeln!(md, "| {} | {cells} |", p.label)?;
        cps.push(c);
        rps.push(q);
    }
    // A failed connection or request does not end the run: it is counted here.
    let mut failed = vec![];
    for p in &paths {
        let runs = p.conns.iter().chain(&p.reqs);
        let n: u64 = runs.clone().map(|r| r.failures).sum();
        let all: u64 = runs.clone().map(|r| r.requests).sum::<u64>() + n;
        if n > 0 {
            let first = runs.filter_map(|r| r.first_failure.clone()).next();
            failed.push(format!(
                "{}: {n} of {all} ({})",
                p.label,
                first.unwrap_or_default()
            ));
        }
    }
    if failed.is_empty() {
        writeln!(
            md,
            "
No connection or request failed on any path."
        )?;
    } else {
        writeln!(
            md,
            "
Failed connections and requests (all rounds; the run went on): {}.",
            failed.join("; ")
        )?;
    }
    writeln!(
        md,
        "\nUDP through the published port: round trips ({} sockets, one datagram in flight \
         each, request and answer; each round trip is two packets through the ingress node), \
         and a one-way flood of 64-byte datagrams offered at {flood_pps} per second to every \
         path (one flow; ready-made frames through a packet socket, sendmmsg batches of 64, \
         paced, on CPU 0) with what the ingress node forwarded on CPU 1 (its interface \
         polled by a NAPI thread pinned there). Where forwarded equals offered, the path \
         kept up and its rate is a lower bound:\n\n| path | round trips/s | p99 | flood: \
         forwarded/s | flood: sent/s | forwarded / offered |\n|---|---|---|---|---|---|",
        threads * 2
    )?;
    // Per path, per round: forwarded/s.
    let forwarded: Vec<Vec<f64>> = flood_runs
        .iter()
        .map(|runs| runs.iter().map(|(f, _)| *f).collect())
        .collect();
    for (i, (label, _, _)) in udp_targets.iter().enumerate() {
        let r = median_run(&udp_runs[i]);
        let fwd = median(&forwarded[i]);
        let sent = median(&flood_runs[i].iter().map(|(_, s)| *s).collect::<Vec<_>>());
        writeln!(
            md,
            "| {label} | {:.0} | {} | {fwd:.0} | {sent:.0} | {:.2} |",
            r.per_second(),
            ms(quantile(&r.latencies, 0.99)),
            fwd / flood_pps.max(1) as f64
        )?;
    }
    // Ratios of runs of the same round.
    let pair = |a: usize, b: usize, conns: bool| {
        let (pa, pb) = (&paths[a], &paths[b]);
        if conns {
            paired_ratio(&pa.conns, &pb.conns)
        } else {
            paired_ratio(&pa.reqs, &pb.reqs)
        }
    };
    let flood_pair = |a: usize, b: usize| {
        let ratios: Vec<f64> = forwarded[a]
            .iter()
            .zip(&forwarded[b])
            .map(|(x, y)| x / y.max(1e-9))
            .collect();
        median(&ratios)
    };
    writeln!(
        md,
        "\n**Ratios** (median of the rounds' ratios), against the targets: XDP mesh / \
         straight to the tasks = {:.2}× new connections/s, {:.2}× requests/s (target ≥ 0.9× \
         keeping the client's address); \
         XDP mesh / HAProxy = {:.2}× new connections/s (target ≥ 2×); XDP / kernel path = \
         {:.2}× UDP packets forwarded per second at the same offered load (target ≥ 2×), \
         {:.2}× UDP round trips/s. Also: XDP mesh / nftables = {:.2}× new connections/s; \
         kernel-path mesh / straight to the tasks = {:.2}×; native XDP (n5) / straight to \
         the tasks = {:.2}× new connections/s, {:.2}× requests/s; native XDP / kernel path = \
         {:.2}× UDP packets forwarded per second. Keeping the client's address against \
         translating to the node's (target ≥ 0.95×): XDP mesh (n3) / XDP snat mesh (n6) = \
         {:.2}× new connections/s, {:.2}× requests/s; kernel path (n4) / kernel snat (n7) = \
         {:.2}× new connections/s, {:.2}× requests/s. Per new connection, keeping the \
         client's address costs the whole machine {:.0} µs on the XDP path and {:.0} µs on \
         the kernel path (1 / the median rate less 1 / the snat path's). The floor of any \
         path through a second node (straight to the tasks, routed both ways through n4) / \
         straight to the tasks = {:.2}× new connections/s, {:.2}× requests/s; XDP mesh / \
         that floor = {:.2}× new connections/s, {:.2}× requests/s.",
        pair(3, 0, true),
        pair(3, 0, false),
        pair(3, 1, true),
        flood_pair(0, 1),
        paired_ratio(&udp_runs[0], &udp_runs[1]),
        pair(3, 2, true),
        pair(4, 0, true),
        pair(5, 0, true),
        pair(5, 0, false),
        flood_pair(2, 1),
        pair(3, 6, true),
        pair(3, 6, false),
        pair(4, 7, true),
        pair(4, 7, false),
        per_connection_us(cps[3], cps[6]),
        per_connection_us(cps[4], cps[7]),
        pair(9, 0, true),
        pair(9, 0, false),
        pair(3, 9, true),
        pair(3, 9, false),
    )?;
    md.push_str(READING);
    md.push_str(&floor_reading(pair(9, 0, true), pair(3, 9, true)));
    let (svg_path, link) = plot_beside(out)?;
    writeln!(md, "{link}")?;
    let svg = bar_chart(
        "Published port through a node without tasks (higher is better)",
        &[
            "straight to a task",
            "HAProxy",
            "nftables DNAT+masq",
            "netd mesh (XDP, auto)",
            "netd mesh (kernel)",
            "netd mesh (XDP, native)",
            "netd mesh (XDP, snat)",
            "netd mesh (kernel, snat)",
            "server on the underlay",
            "floor: routed via n4",
        ],
        &[
            Panel {
                title: "new connections/s".into(),
                groups: vec![("".into(), cps)],
            },
            Panel {
                title: "keep-alive requests/s".into(),
                groups: vec![("".into(), rps)],
            },
        ],
    );
    write_results(out, &md, Some((&svg_path, &svg)))?;
    lab.teardown();
    Ok(())
}
