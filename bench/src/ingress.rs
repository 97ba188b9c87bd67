//! `netd-bench ingress`: new connections per second, keep-alive requests per second and
//! p99 latency from a client on the underlay to a node that runs none of the service's
//! tasks, through netd's routing mesh, side by side with the same client talking to a
//! server directly (the limit), HAProxy on that node, and nftables DNAT + masquerade on
//! that node. HAProxy and nftables balance to the nodes that run tasks, onto a host-mode
//! port (the usual way to put either in front of Swarm nodes).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netd_bench::load;
use netd_bench::plot::{bar_chart, Panel};
use netd_bench::report::{header, machine, ms, quantile};
use netd_lab::{underlay_ip, Lab};

const MESH_PORT: u16 = 4567;
const HOST_PORT: u16 = 4577;
const HAPROXY_PORT: u16 = 4587;
const NFT_PORT: u16 = 4597;
const DIRECT_HOST: u8 = 50;
const CLIENT_HOST: u8 = 100;
const MAX_OPS: u64 = 2_000_000;

struct Path_ {
    label: &'static str,
    addr: SocketAddr,
    conns: Vec<load::Run>,
    reqs: Vec<load::Run>,
}

fn median_by(runs: &[load::Run]) -> &load::Run {
    let mut v: Vec<&load::Run> = runs.iter().collect();
    v.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    v[v.len() / 2]
}

/// What the figures mean, as every results file says it.
const READING: &str = "\n**Reading.** Every path but `direct` crosses the ingress node and \
then the overlay or the underlay to another node. The XDP fast path and its packets-per-second \
comparison are not built yet: netd's figures are its kernel path (nftables DNAT in the node \
and in its ingress sandbox, VXLAN to the task).\n\n";

pub fn run(seconds: u64, rounds: usize, threads: usize, tasks: usize, out: &Path) -> Result<()> {
    let mut lab = Lab::cluster("bing", 3)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.50.0/24"],
    )?;
    let publish = format!("{MESH_PORT}:80");
    let host = format!("{HOST_PORT}:80,mode=host");
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
    let (n1, n2, n3) = (lab.nodes[0].ip, lab.nodes[1].ip, lab.nodes[2].ip);
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
            label: "netd routing mesh via n3 (kernel path)",
            addr: SocketAddr::from((n3, MESH_PORT)),
            conns: vec![],
            reqs: vec![],
        },
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
    for round in 0..rounds {
        for p in paths.iter_mut() {
            eprintln!("round {}: {}", round + 1, p.label);
            let d = Duration::from_secs(seconds);
            p.conns
                .push(load::new_connections(&client, p.addr, threads, d, MAX_OPS)?);
            p.reqs
                .push(load::http_keepalive(&client, p.addr, threads, d, MAX_OPS)?);
        }
    }

    let mut md = header("Ingress routing mesh");
    writeln!(
        md,
        "Machine: {}. A 3-node lab cluster (etcd); {tasks} whoami tasks per service on n1 and \
         n2, none on n3; the client is a host on the underlay and connects to n3. New \
         connections: {threads} client threads each connect, send one HTTP GET, read the \
         answer and close with a reset, for {seconds} s. Requests: HTTP/1.1 keep-alive GETs \
         over {threads} connections for {seconds} s. Each path ran {rounds} times, \
         alternating; the table shows the median run.\n",
        machine()
    )?;
    writeln!(
        md,
        "| path | new connections/s | p99 connect+request | requests/s (keep-alive) | p99 request |\n|---|---|---|---|---|"
    )?;
    let mut cps = vec![];
    let mut rps = vec![];
    for p in &paths {
        let (c, q) = (median_by(&p.conns), median_by(&p.reqs));
        writeln!(
            md,
            "| {} | {:.0} | {} | {:.0} | {} |",
            p.label,
            c.per_second(),
            ms(quantile(&c.latencies, 0.99)),
            q.per_second(),
            ms(quantile(&q.latencies, 0.99)),
        )?;
        cps.push(c.per_second());
        rps.push(q.per_second());
    }
    writeln!(
        md,
        "\n**Ratios** (same run): mesh / direct = {:.2}× new connections/s, {:.2}× \
         requests/s; mesh / HAProxy = {:.2}× new connections/s; mesh / nftables = {:.2}× \
         new connections/s.",
        cps[3] / cps[0],
        rps[3] / rps[0],
        cps[3] / cps[1],
        cps[3] / cps[2],
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
