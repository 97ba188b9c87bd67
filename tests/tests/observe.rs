//! Seeing the cluster: `netd daemon --http ADDR` serves `/metrics` in Prometheus's text
//! format (which `promtool check metrics` accepts), `/healthz`, and nothing that changes
//! anything; a real Prometheus scraping two nodes sees netd's counters rise under load
//! (VIP connections per backend, DNS queries, published-port flows, API requests).

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::{debian_tool, load, Lab};
use serde_json::Value;

const HTTP_PORT: u16 = 9440;
const PROM_HOST: u8 = 101;
const PUBLISHED: u16 = 4567;

/// `curl` from `netns`: (HTTP status, body).
fn curl(lab: &Lab, netns: &str, args: &[&str]) -> Result<(u16, String)> {
    let mut full = vec!["curl", "-s", "-m", "5", "-w", "\n%{http_code}"];
    full.extend_from_slice(args);
    let out = lab.exec_in(netns, &full)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code
        .trim()
        .parse()
        .with_context(|| format!("curl {args:?}: {text:?} {out:?}"))?;
    Ok((code, body.to_string()))
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool_check(text: &str) -> Result<()> {
    let promtool = debian_tool("/usr/bin/promtool", "prometheus")?;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run promtool")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics: {}{}\non:\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A Prometheus in `netns`, scraping `targets` every second, answering on
/// 127.0.0.1:9090 there; its data under the lab's directory.
fn start_prometheus(lab: &mut Lab, netns: &str, targets: &[String]) -> Result<()> {
    let prometheus = debian_tool("/usr/bin/prometheus", "prometheus")?;
    let dir = lab.dir.join("prometheus");
    std::fs::create_dir_all(dir.join("data"))?;
    let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
         scrape_configs:\n  - job_name: netd\n    static_configs:\n      - targets: [{}]\n",
        list.join(", ")
    );
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, config)?;
    let args = [
        format!("--config.file={}", file.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        "--web.listen-address=127.0.0.1:9090".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn_in(netns, &prometheus, &args)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while curl(lab, netns, &["http://127.0.0.1:9090/-/ready"])?.0 != 200 {
        if Instant::now() > deadline {
            bail!("Prometheus did not become ready in 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The value of PromQL `expr` now, in Prometheus in `netns` (None: no series).
fn query(lab: &Lab, netns: &str, expr: &str) -> Result<Option<f64>> {
    let q = format!("query={expr}");
    let (code, body) = curl(
        lab,
        netns,
        &[
            "-G",
            "http://127.0.0.1:9090/api/v1/query",
            "--data-urlencode",
            &q,
        ],
    )?;
    if code != 200 {
        bail!("query {expr}: {code} {body}");
    }
    let v: Value = serde_json::from_str(&body).with_context(|| format!("query {expr}: {body}"))?;
    let Some(first) = v["data"]["result"].as_array().and_then(|r| r.first()) else {
        return Ok(None);
    };
    let value = first["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("query {expr}: {body}"))?;
    Ok(Some(value))
}

/// Waits until PromQL `expr` is at least `want` (Prometheus scrapes every second).
fn reaches(lab: &Lab, netns: &str, expr: &str, want: f64) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = query(lab, netns, expr)?.unwrap_or(0.0);
        if got >= want {
            return Ok(got);
        }
        if Instant::now() > deadline {
            bail!("{expr} = {got}, not {want} or more within 20 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// New connections (one GET each) from `netns` to `to`, `n` of them; none may fail.
fn connections(netns: &str, to: SocketAddr, n: u64) -> Result<()> {
    let report = load::run(
        &load::Spec {
            connections: 2,
            duration: Duration::from_secs(30),
            new_connections: true,
            netns: Some(netns.to_string()),
            max_requests: Some(n),
            ..load::Spec::new(load::Target::Http(to, "/".into()))
        },
        |_| {},
    )?;
    if report.failed() > 0 || report.requests != n {
        bail!("load to {to}: {report:?}");
    }
    Ok(())
}

#[test]
fn metrics_pass_promtool_and_a_real_prometheus_sees_them_rise_under_load() -> Result<()> {
    let http = format!("0.0.0.0:{HTTP_PORT}");
    let mut lab = Lab::cluster_with("obm", 2, &["--http", &http])?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.60.0/24"],
    )?;
    let publish = format!("{PUBLISHED}:80");
    lab.cli(
        0,
        &[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--publish",
            &publish,
        ],
    )?;
    let (n1, n2) = (lab.nodes[0].name.clone(), lab.nodes[1].name.clone());
    lab.attach_whoami(0, "web", "a", Some(&n1))?;
    lab.attach_whoami(0, "web", "b", Some(&n2))?;
    let client = lab.add_client("client", "front", 0)?;
    let prom = lab.add_host("prom", PROM_HOST)?;
    let node_ip = lab.nodes[0].ip;
    let base = format!("http://{node_ip}:{HTTP_PORT}");

    // The exposition passes Prometheus's own linter, and names what it should.
    let (code, text) = curl(&lab, &prom, &[&format!("{base}/metrics")])?;
    assert_eq!(code, 200, "{text}");
    promtool_check(&text)?;
    for family in [
        "netd_build_info",
        "netd_dns_query_duration_seconds",
        "netd_reconcile_duration_seconds",
        "netd_api_requests_total",
        "netd_tasks",
        "netd_endpoints",
        "netd_store_watch_lag_revisions",
        "netd_kernel_writes_total",
    ] {
        let head = format!("# TYPE {family} ");
        assert!(text.contains(&head), "no {family} in:\n{text}");
    }
    // a, b and the client, once both nodes reported them up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !curl(&lab, &prom, &[&format!("{base}/metrics")])?
        .1
        .contains(r#"netd_tasks{state="running"} 3"#)
    {
        if Instant::now() > deadline {
            bail!("netd_tasks never counted 3 running tasks");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Read-only: no other method, no API there.
    let (code, _) = curl(&lab, &prom, &["-X", "POST", &format!("{base}/metrics")])?;
    assert_eq!(code, 405, "POST /metrics");
    let (code, _) = curl(&lab, &prom, &[&format!("{base}/v1/tasks")])?;
    assert_eq!(code, 404, "the API is not served on --http");
    let (code, body) = curl(&lab, &prom, &[&format!("{base}/healthz")])?;
    assert_eq!((code, body.trim()), (200, "ok"));

    // A real Prometheus scraping both nodes every second.
    let targets: Vec<String> = lab
        .nodes
        .iter()
        .map(|n| format!("{}:{HTTP_PORT}", n.ip))
        .collect();
    start_prometheus(&mut lab, &prom, &targets)?;
    reaches(&lab, &prom, "sum(up{job=\"netd\"})", 2.0)?;
    let vip_conns = "sum(netd_vip_backend_connections_total{service=\"web\"})";
    let dns_a = "sum(netd_dns_queries_total{type=\"A\",result=\"noerror\"})";
    let mesh = format!("sum(netd_mesh_flows_total{{instance=\"{node_ip}:{HTTP_PORT}\"}})");
    let tasks_ls = "sum(netd_api_requests_total{route=\"/v1/tasks\",method=\"GET\",code=\"200\"})";
    let before: Vec<f64> = [vip_conns, dns_a, &mesh, tasks_ls]
        .iter()
        .map(|e| Ok(query(&lab, &prom, e)?.unwrap_or(0.0)))
        .collect::<Result<_>>()?;

    // Load: 300 connections through the VIP from the client task, 20 names asked
    // there, 100 connections through n1's published port, 3 `task ls`.
    let vip = lab.vip(0, "web", "front")?;
    connections(&client, SocketAddr::from((vip, 80)), 300)?;
    for _ in 0..20 {
        let answer = lab.dig_short(&client, "web")?;
        assert_eq!(answer, vec![vip.to_string()]);
    }
    connections(&prom, SocketAddr::from((node_ip, PUBLISHED)), 100)?;
    for _ in 0..3 {
        lab.cli(0, &["task", "ls"])?;
    }

    // Each counter rose by at least what was done (the client's node counts its VIP
    // connections; each dig is one A query; the mesh counts each flow once, on
    // whichever path took it).
    for (expr, was, did) in [
        (vip_conns, before[0], 300.0),
        (dns_a, before[1], 20.0),
        (mesh.as_str(), before[2], 100.0),
        (tasks_ls, before[3], 3.0),
    ] {
        reaches(&lab, &prom, expr, was + did)?;
    }
    // The picks are spread over both backends, and Prometheus sees each one.
    let per_backend = "count(netd_vip_backend_connections_total{service=\"web\"} > 50)";
    reaches(&lab, &prom, per_backend, 2.0)?;
    // DNS latency is a histogram Prometheus can take quantiles of.
    let p99 =
        "histogram_quantile(0.99, sum(rate(netd_dns_query_duration_seconds_bucket[1m])) by (le))";
    let q = query(&lab, &prom, p99)?.context("no DNS latency quantile")?;
    assert!(q > 0.0 && q < 1.0, "DNS p99 {q} s");
    Ok(())
}

/// A `netd events` process, its lines read as they come; killed when dropped.
struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<Value>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Follower {
    fn start(lab: &Lab, i: usize, args: &[&str]) -> Result<Follower> {
        let mut child = lab.cli_spawn(i, args)?;
        let out = child.stdout.take().context("netd events' stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Follower {
            child,
            lines,
            seen: vec![],
        })
    }

    /// Waits until an event `(type, action, name)` came, within 30 s.
    fn expect(&mut self, kind: &str, action: &str, name: &str) -> Result<Value> {
        let matches = |v: &Value| v["type"] == kind && v["action"] == action && v["name"] == name;
        if let Some(v) = self.seen.iter().find(|v| matches(v)) {
            return Ok(v.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!(
                    "no {kind} {action} {name} event within 30 s; saw: {:?}",
                    self.seen
                )
            })?;
            let v: Value = serde_json::from_str(&line).with_context(|| format!("{line:?}"))?;
            self.seen.push(v.clone());
            if matches(&v) {
                return Ok(v);
            }
        }
    }
}

/// `netd events` tells a task's whole life and a node's going down and coming back, as
/// they happen, one JSON object per line; `--since` replays what was kept, `--filter`
/// keeps a kind, and a bad filter is refused with the reason.
#[test]
fn netd_events_tells_what_changed_as_it_happens() -> Result<()> {
    let mut lab = Lab::build("obe", 2, true, "auto")?;
    let since = lab.cli_json(0, &["status"])?["state"]["revision"]
        .as_u64()
        .context("status without a revision")?
        .to_string();
    let mut f = Follower::start(&lab, 0, &["--output", "json", "events", "--since", &since])?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.61.0/24"],
    )?;
    lab.cli(
        0,
        &[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--health-cmd",
            "http:80/health",
            "--health-interval",
            "1",
            "--health-retries",
            "1",
        ],
    )?;
    let n2 = lab.nodes[1].name.clone();
    lab.attach_whoami(0, "web", "a", Some(&n2))?;
    let created = f.expect("network", "create", "front")?;
    assert_eq!(created["attributes"]["subnet"], "198.19.61.0/24");
    f.expect("service", "create", "web")?;
    let task = f.expect("task", "create", "a")?;
    assert_eq!(task["attributes"]["node"], n2.as_str());
    assert_eq!(task["attributes"]["service"], "web");
    f.expect("task", "healthy", "a")?;
    let a_ip = lab.task_ip(0, "a", "front")?;
    let a_ns = lab.ns("a");
    let set = |code: u16| -> Result<()> {
        let url = format!("http://{a_ip}/health?set={code}");
        let out = lab.exec_in(&a_ns, &["curl", "-sf", "-m", "3", &url])?;
        anyhow::ensure!(out.status.success(), "curl {url}: {out:?}");
        Ok(())
    };
    set(503)?;
    let sick = f.expect("task", "unhealthy", "a")?;
    assert!(
        sick["attributes"]["detail"].as_str().is_some(),
        "an unhealthy event says why: {sick}"
    );
    set(200)?;
    // Healthy again: a second healthy event, after the unhealthy one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while f
        .seen
        .iter()
        .filter(|v| v["action"] == "healthy" && v["name"] == "a")
        .count()
        < 2
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "a never healthy again: {:?}",
            f.seen
        );
        if let Ok(line) = f.lines.recv_timeout(Duration::from_millis(500)) {
            f.seen.push(serde_json::from_str(&line)?);
        }
    }
    lab.cli(0, &["task", "detach", "a", "--drain", "10"])?;
    f.expect("task", "draining", "a")?;
    f.expect("task", "remove", "a")?;

    // A node killed: down once its lease runs out, ready when its netd is back.
    lab.stop_daemon(1, true)?;
    f.expect("node", "down", &n2)?;
    lab.start_daemon(1)?;
    f.expect("node", "ready", &n2)?;
    let revisions: Vec<u64> = f
        .seen
        .iter()
        .filter_map(|v| v["revision"].as_u64())
        .collect();
    assert!(
        revisions.windows(2).all(|w| w[0] <= w[1]),
        "events out of revision order: {revisions:?}"
    );
    drop(f);

    // Replayed from the start, services only: the one service, nothing else.
    let mut g = Follower::start(
        &lab,
        0,
        &[
            "--output",
            "json",
            "events",
            "--since",
            &since,
            "--filter",
            "type=service",
        ],
    )?;
    g.expect("service", "create", "web")?;
    std::thread::sleep(Duration::from_millis(500));
    while let Ok(line) = g.lines.try_recv() {
        g.seen.push(serde_json::from_str(&line)?);
    }
    assert!(
        g.seen.iter().all(|v| v["type"] == "service"),
        "a service filter let through: {:?}",
        g.seen
    );
    // A filter naming no kind is refused, with the kinds there are.
    let e = lab
        .cli(0, &["events", "--filter", "type=bogus"])
        .expect_err("a bad filter is refused");
    assert!(e.to_string().contains("unknown event type"), "{e:#}");
    Ok(())
}
