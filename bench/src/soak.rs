//! `netd-bench soak --minutes N`: a 3-node cluster on etcd under a steady load through a
//! VIP and through the routing mesh while tasks come and go for N minutes: every few
//! seconds a new task is attached on another node and the oldest one is detached with a
//! drain (a rolling replace that never ends). Reports the failed requests (target 0),
//! each netd's RSS at the start and the end (target: flat), and what is left behind
//! once every task, service and network is removed again, against the cluster as it
//! was before any (kernel objects, eBPF and XDP map entries, conntrack entries naming a
//! task address; target 0). Not part of the test suite: it runs for half an hour.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_bench::report::{header, machine, write_results};
use netd_lab::{diff_lines, load, Lab};
use serde_json::Value;

const TASKS: usize = 6;
const PUBLISHED: u16 = 4567;
const CLIENT_HOST: u8 = 100;
/// Requests per second of each load (VIP, mesh).
const RATE: f64 = 200.0;
/// How long a closed connection's conntrack entry may live (TIME-WAIT) before what is
/// left counts as left behind.
const SETTLE: Duration = Duration::from_secs(130);

fn rss(lab: &Lab) -> Result<Vec<u64>> {
    (0..lab.nodes.len())
        .map(|i| crate::scale::rss_kib(lab.daemon_pid(i).context("a node's daemon")?))
        .collect()
}

/// The map entries netd's status counts on node `i`: (what, how many).
fn map_entries(lab: &Lab, i: usize) -> Result<Vec<(String, u64)>> {
    let st = lab.cli_json(i, &["status"])?;
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let d = &st["datapath"]["detail"];
    let x = &st["routing_mesh"]["xdp"]["flow_entries"];
    Ok(vec![
        ("eBPF VIPs".into(), n(&d["vips"])),
        ("eBPF UDP affinities".into(), n(&d["udp_flows"])),
        ("eBPF counters".into(), n(&d["counters"])),
        (
            "XDP flows".into(),
            n(&x["established"]) + n(&x["unconfirmed"]),
        ),
        (
            "way-back flows".into(),
            n(&st["routing_mesh"]["way_back"]["flows"]),
        ),
    ])
}

/// Conntrack entries naming a task address (198.19.0.0/16) in the lab's namespaces.
fn conntrack_of_tasks(lab: &Lab) -> Result<u64> {
    let ns_of_lab = lab.ns("");
    let prefix = ns_of_lab.trim_end_matches('-');
    let mut count = 0;
    for e in std::fs::read_dir("/run/netns")?.flatten() {
        let ns = e.file_name().to_string_lossy().into_owned();
        if !ns.contains(prefix) {
            continue;
        }
        let o = lab.exec_in(&ns, &["conntrack", "-L"])?;
        count += String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("=198.19."))
            .count() as u64;
    }
    Ok(count)
}

/// Kernel objects of every node (links, addresses, routes, FDB and neighbour entries,
/// rules, pins), as one listing per node.
fn kernel(lab: &Lab) -> Result<Vec<String>> {
    (0..lab.nodes.len())
        .map(|i| lab.kernel_snapshot(i))
        .collect()
}

/// `every`: the time between two replacements. Each replacement is written to stderr
/// with its time on the loads' clock (the clock of the report's "failures by the
/// second"), the task's address and node, so that a failure can be laid beside them.
pub fn run(minutes: u64, every: Duration, out: &Path) -> Result<()> {
    let began = Instant::now();
    let mut lab = Lab::cluster("sk", 3)?;
    // The clients' namespaces are there before the baseline (and stay after).
    let (client, path) = lab.add_task_netns("client")?;
    // As a task's: netd brings loopback up at the attach, and leaves it so.
    lab.exec_in(&client, &["ip", "link", "set", "lo", "up"])?;
    let outside = lab.add_host("outside", CLIENT_HOST)?;
    let kernel_before = kernel(&lab)?;
    let maps_before: Vec<Vec<(String, u64)>> = (0..3)
        .map(|i| map_entries(&lab, i))
        .collect::<Result<_>>()?;
    let conntrack_before = conntrack_of_tasks(&lab)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.60.0/24"],
    )?;
    lab.cli(
        0,
        &[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--publish",
            "4567:80",
        ],
    )?;
    let mut live: VecDeque<(String, usize)> = VecDeque::new();
    let mut made = 0usize;
    for i in 0..TASKS {
        let tag = format!("t{made}");
        let node = lab.nodes[i % 3].name.clone();
        lab.attach_whoami(0, "web", &tag, Some(&node))?;
        live.push_back((tag, i % 3));
        made += 1;
    }
    lab.cli(0, &["service", "create", "clients", "--network", "front"])?;
    let n1 = lab.nodes[0].name.clone();
    lab.cli(
        0,
        &[
            "task", "attach", "clients", "--netns", &path, "--name", "client", "--node", &n1,
        ],
    )?;
    let vip = lab.vip(0, "web", "front")?;
    eprintln!("VIP load from netns {client} to {vip}:80");
    let spec = |netns: &str, to: SocketAddr| load::Spec {
        connections: 2,
        rate: Some(RATE),
        duration: Duration::from_secs(minutes * 60 + 60),
        new_connections: true,
        netns: Some(netns.to_string()),
        ..load::Spec::new(load::Target::Http(to, "/".into()))
    };
    std::thread::sleep(Duration::from_secs(2));
    let rss_start = rss(&lab)?;
    let loads_began = Instant::now();
    let at = || loads_began.elapsed().as_secs_f64();
    let vip_load = load::start(&spec(&client, SocketAddr::from((vip, 80))))?;
    let mesh_to = SocketAddr::from((lab.nodes[1].ip, PUBLISHED));
    let mesh_load = load::start(&spec(&outside, mesh_to))?;
    let until = Instant::now() + Duration::from_secs(minutes * 60);
    let mut replaced = 0u64;
    let mut drain_secs: Vec<f64> = vec![];
    let mut last_line = Instant::now();
    while Instant::now() < until {
        let step = Instant::now();
        let Some((old, node)) = live.pop_front() else {
            bail!("no task left");
        };
        // The new one on the next node, so tasks move round the cluster.
        let to = (node + 1) % 3;
        let tag = format!("t{made}");
        made += 1;
        let name = lab.nodes[to].name.clone();
        let attached = lab.attach_whoami(to, "web", &tag, Some(&name))?;
        eprintln!(
            "{:>8.3} s: attached {tag} on {name} at {}",
            at(),
            attached["endpoints"][0]["ip"]
        );
        live.push_back((tag, to));
        lab.cli(to, &["task", "detach", &old, "--drain", "15"])?;
        eprintln!("{:>8.3} s: draining {old}", at());
        let drained = Instant::now();
        loop {
            let tasks = lab.tasks_of(0, "web")?;
            if !tasks.iter().any(|t| t["name"] == old.as_str()) {
                break;
            }
            if drained.elapsed() > Duration::from_secs(30) {
                bail!("task {old} still there 30 s after its drain of 15 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        drain_secs.push(drained.elapsed().as_secs_f64());
        lab.remove_task_netns(&old)?;
        eprintln!("{:>8.3} s: {old} gone, its namespace deleted", at());
        replaced += 1;
        if last_line.elapsed() > Duration::from_secs(60) {
            let (v, m) = (vip_load.progress(), mesh_load.progress());
            eprintln!(
                "{:>5.0} s: {replaced} tasks replaced; VIP {} requests ({} failed), mesh {} ({} failed)",
                began.elapsed().as_secs_f64(),
                v.requests,
                v.failed(),
                m.requests,
                m.failed()
            );
            last_line = Instant::now();
        }
        if let Some(rest) = every.checked_sub(step.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let vip_report = vip_load.stop();
    let mesh_report = mesh_load.stop();
    let rss_end = rss(&lab)?;

    // Everything goes, then the flows' own timers run out.
    for (tag, _) in live.drain(..) {
        lab.cli(0, &["task", "detach", &tag])?;
        lab.remove_task_netns(&tag)?;
    }
    lab.cli(0, &["task", "detach", "client"])?;
    lab.cli(0, &["service", "rm", "web", "clients"])?;
    lab.cli(0, &["network", "rm", "front"])?;
    std::thread::sleep(SETTLE);
    let kernel_after = kernel(&lab)?;
    let maps_after: Vec<Vec<(String, u64)>> = (0..3)
        .map(|i| map_entries(&lab, i))
        .collect::<Result<_>>()?;
    let conntrack_after = conntrack_of_tasks(&lab)?;
    lab.teardown();

    let mut md = header("Soak: tasks replaced under load");
    let _ = writeln!(
        md,
        "Machine: {}. A 3-node lab cluster on etcd (default datapaths: eBPF VIPs, XDP mesh \
         where the veth takes it). Service `web` (6 whoami tasks, published on {PUBLISHED}); \
         every {:.1} s a new task is attached on the next node and the oldest is detached with \
         `--drain 15` (the bench waits until it is gone, then deletes its namespace). Load \
         all the while: {RATE} new connections/s (one HTTP request each) from a client task \
         to the VIP, and as many from a host on the underlay to the published port on n2 \
         (`netd-bench load`'s engine). Whole run: {:.0} s.\n",
        machine(),
        every.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    let _ = writeln!(md, "## Requests\n");
    let _ = writeln!(
        md,
        "| path | requests | failed | by kind | p50 | p99 | max |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for (label, r) in [("VIP", &vip_report), ("published port", &mesh_report)] {
        let kinds = load::Report::kinds(&r.failures);
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.1} ms |",
            r.requests,
            r.failed(),
            if kinds.is_empty() { "–" } else { &kinds },
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.max
        );
    }
    for (label, r) in [("VIP", &vip_report), ("published port", &mesh_report)] {
        if let Some(first) = &r.first_failure {
            let seconds: Vec<String> = r
                .failures_per_second
                .iter()
                .map(|(s, by)| format!("{s} s: {}", load::Report::kinds(by)))
                .collect();
            let _ = writeln!(
                md,
                "\n{label}: the first failure: `{first}`; failures by the second they were \
                 asked in: {}.",
                seconds.join("; ")
            );
        }
    }
    drain_secs.sort_by(f64::total_cmp);
    let median = drain_secs.get(drain_secs.len() / 2).copied().unwrap_or(0.0);
    let max = drain_secs.last().copied().unwrap_or(0.0);
    let _ = writeln!(
        md,
        "\nTasks replaced: {replaced} (each drain took {median:.1} s at the median, {max:.1} s \
         at most, against the 15 s allowed).\n"
    );
    let _ = writeln!(md, "## netd's memory\n");
    let _ = writeln!(md, "| node | RSS at the start | at the end | change |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (i, (a, b)) in rss_start.iter().zip(&rss_end).enumerate() {
        let _ = writeln!(
            md,
            "| n{} | {:.1} MiB | {:.1} MiB | {:+.1} % |",
            i + 1,
            *a as f64 / 1024.0,
            *b as f64 / 1024.0,
            100.0 * (*b as f64 - *a as f64) / (*a as f64).max(1.0)
        );
    }
    let _ = writeln!(
        md,
        "\n## Left behind\n\nOnce every task, both services and the network were removed, \
         and {} s later (closed connections' TIME-WAIT), against the cluster before any:\n",
        SETTLE.as_secs()
    );
    let kernel_left: Vec<String> = kernel_before
        .iter()
        .zip(&kernel_after)
        .map(|(b, a)| diff_lines(b, a))
        .collect();
    let kernel_lines: usize = kernel_left.iter().map(|d| d.lines().count()).sum();
    let _ = writeln!(md, "| what | before | after |");
    let _ = writeln!(md, "|---|---|---|");
    let _ = writeln!(
        md,
        "| kernel objects (lines of the nodes' listings that differ) | – | {kernel_lines} |"
    );
    for (j, (what, _)) in maps_before[0].iter().enumerate() {
        let sum = |m: &Vec<Vec<(String, u64)>>| m.iter().map(|n| n[j].1).sum::<u64>();
        let _ = writeln!(
            md,
            "| {what} | {} | {} |",
            sum(&maps_before),
            sum(&maps_after)
        );
    }
    let _ = writeln!(
        md,
        "| conntrack entries naming a task address | {conntrack_before} | {conntrack_after} |"
    );
    if kernel_lines > 0 {
        let _ = writeln!(md, "\nThe listings' differences:\n\n```");
        for (i, d) in kernel_left.iter().enumerate() {
            let _ = writeln!(md, "# n{}\n{d}", i + 1);
        }
        let _ = writeln!(md, "```");
    }
    write_results(out, &md, None)
}
