//! The embedded DNS against unbound, asked by dnsperf from the same task namespace, on
//! three workloads: one hot name, a mix of distinct cluster names (services, task
//! names, `tasks.`, NXDOMAIN) and a forwarded name; with netd's per-listener answer
//! cache on (as it runs) and off (every query through the record table). Every netd run
//! is paired in time with an unbound run of the same workload, and the ratio is the
//! median of the pairs' ratios.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netd_bench::report::{header, machine, median, ms, quantile, write_results};
use netd_lab::{underlay_ip, Lab, UPSTREAM_DNS_HOST};

/// Services besides `web` (each a VIP record).
const SERVICES: usize = 200;
/// `web`'s tasks besides the client's own (task-name records and `tasks.web`).
const TASKS: usize = 5;
/// Names that do not exist (NXDOMAIN from both servers).
const MISSING: usize = 200;

/// One dnsperf run.
pub(crate) struct DnsRun {
    pub(crate) qps: f64,
    latencies: Vec<Duration>,
    /// Answers other than NOERROR and NXDOMAIN, and queries lost.
    errors: usize,
}

pub(crate) fn dnsperf(
    lab: &Lab,
    netns: &str,
    server: &str,
    queries: &Path,
    seconds: u64,
) -> Result<DnsRun> {
    let out = lab.exec_in(
        netns,
        &[
            "dnsperf",
            "-s",
            server,
            "-d",
            &queries.display().to_string(),
            "-l",
            &seconds.to_string(),
            "-v",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figure = |label: &str| dnsperf_figure(&text, label);
    let qps = figure("Queries per second:")
        .with_context(|| format!("dnsperf printed no rate: {text:.2000}"))?;
    let lost = figure("Queries lost:").unwrap_or(0.0) as usize;
    let mut latencies = vec![];
    let mut errors = lost;
    // Per-query lines: `> NOERROR web A 0.000123`.
    for l in text.lines().filter(|l| l.starts_with("> ")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        if !matches!(w.get(1), Some(&"NOERROR") | Some(&"NXDOMAIN")) {
            errors += 1;
        }
        if let Some(secs) = w.last().and_then(|s| s.parse::<f64>().ok()) {
            latencies.push(Duration::from_secs_f64(secs));
        }
    }
    Ok(DnsRun {
        qps,
        latencies,
        errors,
    })
}

/// The names and addresses both servers answer.
struct Records {
    /// (name, address) of every A record: services' VIPs, task names, `tasks.web`.
    a: Vec<(String, String)>,
    missing: Vec<String>,
}

/// The cluster: network `front`, service `web` with TASKS tasks and the client's task,
/// SERVICES more services. Returns the client task's namespace and the records.
fn cluster(lab: &mut Lab) -> Result<(String, Records)> {
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.8.0/22"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    for i in 0..SERVICES {
        lab.cli(
            0,
            &[
                "service",
                "create",
                &format!("svc{i}"),
                "--network",
                "front",
            ],
        )?;
    }
    let mut names = vec!["q".to_string()];
    names.extend((1..=TASKS).map(|i| format!("web-{i}")));
    for name in &names {
        let path = lab.add_task_netns(name)?.1;
        let v = lab.cli_json(
            0,
            &["task", "attach", "web", "--netns", &path, "--name", name],
        )?;
        if v.get("error").is_some() {
            bail!("attach {name}: {v}");
        }
    }
    let mut a = vec![];
    let services = lab.cli_json(0, &["service", "ls"])?;
    for s in services.as_array().context("service list")? {
        let name = s["name"].as_str().context("service name")?;
        let vip = lab.vip(0, name, "front")?;
        a.push((name.to_string(), vip.to_string()));
    }
    for name in &names {
        let ip = lab.task_ip(0, name, "front")?.to_string();
        a.push((name.clone(), ip.clone()));
        a.push(("tasks.web".into(), ip));
    }
    let missing = (0..MISSING).map(|i| format!("nosuch{i}")).collect();
    Ok((lab.ns("q"), Records { a, missing }))
}

/// unbound in the client's namespace on 127.0.0.12, one thread: the same records as
/// local-data, NXDOMAIN for the missing names, the upstream zone forwarded to the same
/// upstream as netd's.
fn unbound_conf(dir: &Path, r: &Records) -> String {
    let mut conf = format!(
        "server:\n  interface: 127.0.0.12\n  port: 53\n  access-control: 127.0.0.0/8 allow\n  \
         do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{}\"\n  \
         pidfile: \"\"\n  use-syslog: no\n  num-threads: 1\n",
        dir.display()
    );
    let mut zones: Vec<&str> = r.a.iter().map(|(n, _)| n.as_str()).collect();
    zones.sort();
    zones.dedup();
    for z in zones {
        let _ = writeln!(conf, "  local-zone: \"{z}.\" static");
    }
    for (name, ip) in &r.a {
        let _ = writeln!(conf, "  local-data: \"{name}. 600 IN A {ip}\"");
    }
    for m in &r.missing {
        let _ = writeln!(conf, "  local-zone: \"{m}.\" always_nxdomain");
    }
    let _ = write!(
        conf,
        "forward-zone:\n  name: \"{}.\"\n  forward-addr: {}\n",
        netd_lab::UPSTREAM_ZONE,
        underlay_ip(UPSTREAM_DNS_HOST)
    );
    conf
}

/// The query files: (label, path).
fn workloads(dir: &Path, r: &Records) -> Result<Vec<(&'static str, std::path::PathBuf)>> {
    let hot = dir.join("hot.txt");
    std::fs::write(&hot, "web A\n")?;
    // Distinct names, interleaved so that no kind comes in a run of its own.
    let mut names: Vec<String> = vec![];
    let mut a = r.a.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>();
    a.sort();
    a.dedup();
    for i in 0..a.len().max(r.missing.len()) {
        if let Some(n) = a.get(i) {
            names.push(format!("{n} A"));
        }
        if let Some(m) = r.missing.get(i) {
            names.push(format!("{m} A"));
        }
    }
    let mixed = dir.join("names.txt");
    std::fs::write(&mixed, names.join("\n") + "\n")?;
    let forwarded = dir.join("forwarded.txt");
    std::fs::write(
        &forwarded,
        format!("outside.{} A\n", netd_lab::UPSTREAM_ZONE),
    )?;
    Ok(vec![
        ("one hot name (`web`)", hot),
        ("distinct cluster names", mixed),
        ("a forwarded name", forwarded),
    ])
}

/// Waits until `server` answers `name` from `netns`.
fn answers(lab: &Lab, netns: &str, server: &str, name: &str) -> Result<()> {
    for _ in 0..50 {
        let o = lab.exec_in(
            netns,
            &["dig", "+short", "+time=1", "+tries=1", server, name],
        )?;
        if !String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{server} does not answer {name}")
}

struct Row {
    workload: &'static str,
    cache: bool,
    netd: Vec<DnsRun>,
    unbound: Vec<DnsRun>,
}

pub fn run(seconds: u64, rounds: usize, out: &Path) -> Result<()> {
    let mut lab = Lab::start("bdns", 1)?;
    lab.start_upstream_dns()?;
    let (q, records) = cluster(&mut lab)?;
    let dir = lab.dir.join("bench-dns");
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("unbound.conf");
    std::fs::write(&conf, unbound_conf(&dir, &records))?;
    lab.spawn_in(
        &q,
        Path::new("unbound"),
        &["-d", "-c", &conf.display().to_string()],
    )?;
    let loads = workloads(&dir, &records)?;
    let forwarded = format!("outside.{}", netd_lab::UPSTREAM_ZONE);

    let mut rows = vec![];
    for cache in [true, false] {
        if !cache {
            lab.daemon_args = vec!["--dns-answer-cache".into(), "false".into()];
            lab.stop_daemon(0, false)?;
            lab.start_daemon(0)?;
        }
        for server in ["@127.0.0.11", "@127.0.0.12"] {
            answers(&lab, &q, server, "web")?;
            answers(&lab, &q, server, &forwarded)?;
        }
        let mut these: Vec<Row> = loads
            .iter()
            .map(|(workload, _)| Row {
                workload,
                cache,
                netd: vec![],
                unbound: vec![],
            })
            .collect();
        for round in 0..rounds {
            for (row, (workload, file)) in these.iter_mut().zip(&loads) {
                eprintln!("round {}: {workload}, answer cache {cache}", round + 1);
                row.netd
                    .push(dnsperf(&lab, &q, "127.0.0.11", file, seconds)?);
                row.unbound
                    .push(dnsperf(&lab, &q, "127.0.0.12", file, seconds)?);
            }
        }
        rows.extend(these);
    }

    let mut md = header("Embedded DNS vs unbound");
    writeln!(
        md,
        "Machine: {}. One lab node; network `front` with {} services (a VIP each) and \
         service `web` with {} tasks. dnsperf (defaults: 100 queries in flight, one client) \
         runs in a task of `web` for {seconds} s per run against netd (127.0.0.11, the \
         task's own listener) and against unbound (one thread, 127.0.0.12 in the same \
         namespace, the same records as `local-data`, NXDOMAIN zones for the missing \
         names, the upstream zone forwarded to the same upstream unbound as netd's). \
         Workloads: one hot name; {} distinct names in turn (every service, every task \
         name, `tasks.web` with {} addresses, and {MISSING} names that do not exist); one \
         forwarded name (`{forwarded}`: both answer it from their cache of upstream \
         answers after the first query). netd ran with its per-listener answer cache on (as it \
         runs) and off (`--dns-answer-cache false`: every query through the record table); \
         unbound has no such cache for local data. Each netd run is followed by an unbound \
         run of the same workload ({rounds} pairs per row); queries/s and latencies are the \
         median pair's, the ratio is the median of the pairs' ratios. Errors: answers other \
         than NOERROR/NXDOMAIN, and queries lost.\n",
        machine(),
        SERVICES,
        TASKS + 1,
        records.a.len() - TASKS - 1 + MISSING,
        TASKS + 1,
    )?;
    writeln!(
        md,
        "| workload | netd answer cache | netd queries/s | unbound queries/s | netd / unbound \
         | netd p99 | unbound p99 | errors (netd, unbound) |\n|---|---|---|---|---|---|---|---|"
    )?;
    let mut summary = vec![];
    // (workload index, cache) -> ratio, for the reading.
    let mut ratio_of = std::collections::HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        let ratios: Vec<f64> = row
            .netd
            .iter()
            .zip(&row.unbound)
            .map(|(n, u)| n.qps / u.qps.max(1e-9))
            .collect();
        let ratio = median(&ratios);
        ratio_of.insert((i % loads.len(), row.cache), ratio);
        // The pair whose ratio is the median one.
        let mid = ratios
            .iter()
            .position(|r| *r == ratio)
            .unwrap_or(ratios.len() / 2);
        let (n, u) = (&row.netd[mid], &row.unbound[mid]);
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {ratio:.2}× | {} | {} | {}, {} |",
            row.workload,
            if row.cache { "on" } else { "off" },
            n.qps,
            u.qps,
            ms(quantile(&n.latencies, 0.99)),
            ms(quantile(&u.latencies, 0.99)),
            n.errors,
            u.errors
        )?;
        summary.push(format!(
            "{} with the cache {}: {ratio:.2}×",
            row.workload,
            if row.cache { "on" } else { "off" }
        ));
    }
    writeln!(
        md,
        "\n**netd / unbound** (median of paired ratios): {}.",
        summary.join("; ")
    )?;
    let r = |w: usize, cache: bool| ratio_of.get(&(w, cache)).copied().unwrap_or(0.0);
    writeln!(
        md,
        "\n**Reading** (this run). Cluster names: netd answers {:.2}× unbound's rate on the \
         hot name and {:.2}× on the distinct names with its answer cache, {:.2}× and {:.2}× \
         without it, so what it gains or loses against unbound is the record table's own, \
         not the cache's. Forwarded names: {:.2}× (answer cache on) and {:.2}× (off): \
         both servers answer the name from their cache of upstream answers after the \
         first query (netd's is kept for the answer's TTL whatever the per-listener \
         answer cache does), so this row compares the two caches' paths.",
        r(0, true),
        r(1, true),
        r(0, false),
        r(1, false),
        r(2, true),
        r(2, false),
    )?;
    write_results(out, &md, None)?;
    lab.teardown();
    Ok(())
}

/// A figure of dnsperf's summary (`  Queries per second:   12345.6`), by its label.
pub(crate) fn dnsperf_figure(text: &str, label: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
}
