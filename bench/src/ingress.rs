//! `netd-bench ingress`: new connections per second, keep-alive requests per second and
//! p99 latency from a client on the underlay to a node that runs none of the service's
//! tasks, through netd's routing mesh (its XDP fast path on n3, its kernel path on n4),
//! side by side with the same client talking to a server directly (the limit), HAProxy
//! on n3, and nftables DNAT + masquerade on n3. HAProxy and nftables balance to the nodes
//! that run tasks, onto a host-mode port (the usual way to put either in front of Swarm
//! nodes). Also UDP round trips per second through the published port on both paths.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netd_bench::load;
use netd_bench::plot::{bar_chart, Panel};
use netd_bench::report::{conn_req_cells, header, machine, median_run, ms, quantile};
use netd_lab::{underlay_ip, Lab};

const MESH_PORT: u16 = 4567;
const HOST_PORT: u16 = 4577;
const HAPROXY_PORT: u16 = 4587;
const NFT_PORT: u16 = 4597;
const UDP_PORT: u16 = 4568;
const DIRECT_HOST: u8 = 50;
const CLIENT_HOST: u8 = 100;
const MAX_OPS: u64 = 2_000_000;

struct Path_ {
    label: &'static str,
    addr: SocketAddr,
    conns: Vec<load::Run>,
    reqs: Vec<load::Run>,
}

/// What the figures mean, as every results file says it.
const READING: &str = "\n**Reading.** Every path but `direct` crosses the ingress node and \
then the overlay or the underlay to another node. The lab's underlay is veth, where netd \
runs XDP in generic mode (native XDP_TX on a veth needs a program on the peer, which is not \
the node's): the XDP program still replaces the node's and the ingress sandbox's netfilter, \
routing and VXLAN work, but the packet has already become an skb. On a NIC with native XDP \
the fast path skips that too.\n\n";

pub fn run(seconds: u64, rounds: usize, threads: usize, tasks: usize, out: &Path) -> Result<()> {
    // n1, n2 run the tasks; n3 takes connections on the XDP fast path, n4 on the kernel
    // path (--xdp off).
    let mut lab = Lab::build_with("bing", 4, true, "auto", "auto")?;
    lab.stop_daemon(3, false)?;
    lab.xdp = "off".into();
    lab.start_daemon(3)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.50.0/24"],
    )?;
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
        ],
    )?;
    lab.cli(
        0,
        &[
            "service",
            "create",
            "hostp",
            "--network",
            "front",
            "--publish",
            &host,
        ],
    )?;
    // The tasks run on n1 and n2; n3 runs none and takes every connection.
    for i in 0..tasks {
        let node = lab.nodes[i % 2].name.clone();
        lab.attach_whoami(0, "mesh", &format!("m{i}"), Some(&node))?;
        lab.attach_whoami(0, "hostp", &format!("h{i}"), Some(&node))?;
    }
    let client = lab.add_host("client", CLIENT_HOST)?;
    lab.whoami_host("direct", DIRECT_HOST, 80)?;
    let (n1, n2, n3, n4) = (
        lab.nodes[0].ip,
        lab.nodes[1].ip,
        lab.nodes[2].ip,
        lab.nodes[3].ip,
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
    let rules = lab.dir.join("bench-ingress-nft.conf");
    std::fs::write(
        &rules,
        format!(
            "table ip netdbench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat;\n    \
             ip daddr {n3} tcp dport {NFT_PORT} dnat to numgen inc mod 2 map {{ 0 : {n1}, 1 : {n2} }} : {HOST_PORT}\n  }}\n  \
             chain post {{\n    type nat hook postrouting priority srcnat;\n    \
             ip daddr {{ {n1}, {n2} }} tcp dport {HOST_PORT} masquerade\n  }}\n}}\n"
        ),
    )?;
    let o = lab.exec_in(&n3ns, &["nft", "-f", &rules.display().to_string()])?;
    if !o.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&o.stderr));
    }

    let mut paths = vec![
        Path_ {
            label: "direct (client -> a server on the underlay)",
            addr: SocketAddr::from((underlay_ip(DIRECT_HOST), 80)),
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            label: "HAProxy on n3 (L4, round-robin to n1/n2 host ports)",
            addr: SocketAddr::from((n3, HAPROXY_PORT)),
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            label: "nftables DNAT + masquerade on n3",
            addr: SocketAddr::from((n3, NFT_PORT)),
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            label: "netd routing mesh via n3 (XDP fast path)",
            addr: SocketAddr::from((n3, MESH_PORT)),
            conns: vec![],
            reqs: vec![],
        },
        Path_ {
            label: "netd routing mesh via n4 (kernel path, --xdp off)",
            addr: SocketAddr::from((n4, MESH_PORT)),
            conns: vec![],
            reqs: vec![],
        },
    ];
    let mut udp_runs: Vec<Vec<load::Run>> = vec![vec![], vec![]];
    let udp_targets = [
        ("XDP fast path (n3)", SocketAddr::from((n3, UDP_PORT))),
        ("kernel path (n4)", SocketAddr::from((n4, UDP_PORT))),
    ];
    // Every path answers before the runs start.
    for p in &paths {
        let mut ok = false;
        for _ in 0..50 {
            if netd_lab::http_get_from(&client, p.addr).is_ok() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !ok {
            bail!("{} ({}) does not answer", p.label, p.addr);
        }
    }
    for (label, addr) in &udp_targets {
        if let Err(e) = netd_lab::udp_ask_from(&client, *addr) {
            return Err(e).with_context(|| format!("UDP through the {label} does not answer"));
        }
    }
    for round in 0..rounds {
        for p in paths.iter_mut() {
            eprintln!("round {}: {}", round + 1, p.label);
            let d = Duration::from_secs(seconds);
            p.conns
                .push(load::new_connections(&client, p.addr, threads, d, MAX_OPS)?);
            p.reqs
                .push(load::http_keepalive(&client, p.addr, threads, d, MAX_OPS)?);
        }
        for (i, (label, addr)) in udp_targets.iter().enumerate() {
            eprintln!("round {}: UDP, {label}", round + 1);
            let d = Duration::from_secs(seconds);
            udp_runs[i].push(load::udp_round_trips(
                &client,
                *addr,
                threads * 2,
                d,
                MAX_OPS,
            )?);
        }
    }

    let mut md = header("Ingress routing mesh");
    writeln!(
        md,
        "Machine: {}. A 4-node lab cluster (etcd); {tasks} whoami tasks per service on n1 and \
         n2, none on n3 or n4; n3 runs the XDP fast path (`--xdp auto`: generic mode on \
         this veth underlay), n4 only the kernel path (`--xdp off`). The client is a host on \
         the underlay. New connections: {threads} client threads each connect, send one HTTP \
         GET, read the answer and close with a reset, for {seconds} s. Requests: HTTP/1.1 \
         keep-alive GETs over {threads} connections for {seconds} s. Each path ran {rounds} \
         times, alternating; the table shows the median run.\n",
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
    writeln!(
        md,
        "\nUDP through the published port ({} sockets, one datagram in flight each, \
         request and answer):\n\n| path | round trips/s | p99 |\n|---|---|---|",
        threads * 2
    )?;
    let mut udp = vec![];
    for (i, (label, _)) in udp_targets.iter().enumerate() {
        let r = median_run(&udp_runs[i]);
        writeln!(
            md,
            "| {label} | {:.0} | {} |",
            r.per_second(),
            ms(quantile(&r.latencies, 0.99))
        )?;
        udp.push(r.per_second());
    }
    writeln!(
        md,
        "\n**Ratios** (same run): XDP mesh / direct = {:.2}× new connections/s, {:.2}× \
         requests/s; XDP mesh / HAProxy = {:.2}× new connections/s; XDP mesh / nftables = \
         {:.2}×; kernel-path mesh / direct = {:.2}× new connections/s; XDP / kernel path = \
         {:.2}× UDP round trips/s (each round trip is two packets through the ingress node).",
        cps[3] / cps[0],
        rps[3] / rps[0],
        cps[3] / cps[1],
        cps[3] / cps[2],
        cps[4] / cps[0],
        udp[0] / udp[1].max(1e-9),
    )?;
    md.push_str(READING);
    let svg_path = out.with_extension("svg");
    let svg_name = svg_path
        .file_name()
        .and_then(|f| f.to_str())
        .context("plot file name")?
        .to_string();
    writeln!(md, "Plot: [{svg_name}]({svg_name}).")?;
    let svg = bar_chart(
        "Published port through a node without tasks (higher is better)",
        &[
            "direct",
            "HAProxy",
            "nftables DNAT+masq",
            "netd mesh (kernel)",
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
    print!("{md}");
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(out, md).with_context(|| format!("write {}", out.display()))?;
    std::fs::write(&svg_path, svg).with_context(|| format!("write {}", svg_path.display()))?;
    lab.teardown();
    Ok(())
}
