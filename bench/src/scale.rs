//! `netd-bench scale`: what netd costs as the cluster grows (issue 14, point 5). A
//! 3-node lab cluster on etcd grows from 10 services to 1,000 and 10,000 through the
//! API, then shrinks back to 10; at every step the same probes run: attach→reachable
//! from another node, one backend change until every node balances to it, DNS queries/s
//! and VIP new connections/s from a task, each daemon's RSS, etcd's keys and size. At the
//! largest step the same VIP load also goes through a kube-proxy-style nftables ruleset
//! holding every service, side by side with netd's eBPF path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use netd::client::Client;
use netd_bench::load;
use netd_bench::plot::{bar_chart, Panel};
use netd_bench::report::{header, machine, median, ms, plot_beside, quantile, write_results};
use netd_lab::{field, http_request, in_netns, Lab, ETCD_HOST};
use serde_json::{json, Value};

/// The overlay every service and task is on. A /17: the lab's pool is 198.19.0.0/16 with
/// its ingress network at 198.19.255.0/24, and 198.18.0.0/16 holds the underlay and the
/// gwbridges, so no /16 of 198.18.0.0/15 is free; 32,766 addresses hold 10,000 VIPs and
/// the tasks.
const NETWORK: &str = "scale";
const SUBNET: &str = "198.19.0.0/17";
/// The nftables path's service addresses start here: inside the overlay's subnet (so
/// on-link for a task), above anything IPAM hands out at 10,000 services, held by
/// nobody. IPAM hands out addresses serially from the bottom of a new subnet, so this
/// holds while the bench's allocations (VIPs and tasks, about 10,500 over the whole
/// run, released ones included) stay below the 16,383 addresses under it.
const NFT_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 64, 0);
/// Where the nftables path's other services point (never connected to).
const NFT_FILLER_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 112, 0);
const PORT: u16 = 80;
/// Probe services (VIP mode), each with BACKENDS whoami tasks.
const PROBES: usize = 10;
const BACKENDS: usize = 10;
/// Filler services that get one task (an empty namespace) each.
const FILLER_TASKS: usize = 400;
/// Concurrent API clients while the cluster grows or shrinks.
const API_THREADS: usize = 4;
/// Client threads of the VIP load.
const LOAD_THREADS: usize = 2;
const MAX_CONNS: u64 = 2_000_000;
/// Longest one batch of API operations may take.
const FILL_LIMIT: Duration = Duration::from_secs(1200);
/// Longest a probe waits for a task or a backend change.
const PROBE_LIMIT: Duration = Duration::from_secs(5);
/// The client task on each node (c1 on n1, ...), and the nftables comparison's client.
const CLIENTS: [&str; 3] = ["c1", "c2", "c3"];
const NFT_CLIENT: &str = "nc";
const CLIENT_SERVICE: &str = "clients";
/// Tasks attached at once (and detached again) at every step, to service `burst`: the
/// task attaches/s of a step of any size (a step's growth attaches none past 1,000).
const BURST: usize = 60;
const BURST_SERVICE: &str = "burst";
/// The kinds of kernel write counted per change (`netd status` → `reconcile.kernel_writes`).
const WRITE_KINDS: [&str; 6] = [
    "netlink",
    "bpf",
    "nftables",
    "conntrack",
    "dns_sockets",
    "sysctl",
];
/// How long the nodes get to apply the burst's detaches before the next probe.
const BURST_SETTLE: Duration = Duration::from_secs(3);

pub struct Opts {
    pub scales: Vec<usize>,
    pub rounds: usize,
    pub seconds: u64,
    pub samples: usize,
    pub out: PathBuf,
    /// Seconds the whole run may take.
    pub time_limit: u64,
}

/// One API call of a batch.
struct Req {
    api: usize,
    method: &'static str,
    path: String,
    body: Option<Value>,
}

/// A batch of API calls: what, how many, how long.
struct Batch {
    what: String,
    count: usize,
    took: Duration,
    /// Each call's time, in request order.
    calls: Vec<Duration>,
}

impl Batch {
    fn per_second(&self) -> f64 {
        self.count as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

/// Runs `reqs` on API_THREADS client threads (blocking HTTP over each node's unix
/// socket, one connection per call); returns the answers in order and the time taken.
/// Answers, total time, and each call's own time (in request order).
type Answers = (Vec<Value>, Duration, Vec<Duration>);

fn run_requests(apis: &[String], reqs: Vec<Req>, what: &str, deadline: Instant) -> Result<Answers> {
    let n = reqs.len();
    let reqs = Arc::new(reqs);
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let apis = Arc::new(apis.to_vec());
    let start = Instant::now();
    let deadline = deadline.min(start + FILL_LIMIT);
    let workers: Vec<_> = (0..API_THREADS)
        .map(|_| {
            let (reqs, next, stop, apis) = (reqs.clone(), next.clone(), stop.clone(), apis.clone());
            let what = what.to_string();
            std::thread::spawn(move || -> Result<Vec<(usize, Value, Duration)>> {
                let clients: Vec<Client> = apis.iter().map(|a| Client::new(a)).collect();
                let mut answers = vec![];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(r) = reqs.get(i) else {
                        return Ok(answers);
                    };
                    if stop.load(Ordering::Relaxed) {
                        bail!("{what}: stopped after another client's failure");
                    }
                    if Instant::now() > deadline {
                        stop.store(true, Ordering::Relaxed);
                        bail!(
                            "{what}: not done within {} s ({i} of {n})",
                            FILL_LIMIT.as_secs()
                        );
                    }
                    let t = Instant::now();
                    let v = clients[r.api]
                        .request(r.method, &r.path, r.body.as_ref())
                        .with_context(|| format!("{what}: {} {}", r.method, r.path));
                    match v {
                        Ok(v) => answers.push((i, v, t.elapsed())),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    if (i + 1) % 1000 == 0 {
                        eprintln!(
                            "  {what}: {} of {n} after {:.1} s",
                            i + 1,
                            start.elapsed().as_secs_f64()
                        );
                    }
                }
            })
        })
        .collect();
    let mut all = vec![Value::Null; n];
    let mut took = vec![Duration::ZERO; n];
    let mut first_err = None;
    for w in workers {
        match w
            .join()
            .map_err(|_| anyhow!("API client thread panicked"))?
        {
            Ok(answers) => {
                for (i, v, d) in answers {
                    all[i] = v;
                    took[i] = d;
                }
            }
            Err(e) => {
                // The failure itself, rather than another thread's "stopped" after it.
                let follow_up = format!("{e}").contains("stopped after another");
                if first_err.is_none() || !follow_up {
                    first_err = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok((all, start.elapsed(), took))
}

fn filler(i: usize) -> String {
    format!("f{i}")
}

/// Networks besides NETWORK, for the fillers: 99 /24s above the overlay's /17.
const OTHER_NETWORKS: usize = 99;

fn other_network(n: usize) -> String {
    format!("net{n:02}")
}

/// The network of filler `i`: the fillers go round the 100 networks (so the first
/// FILLER_TASKS fillers' tasks put a sandbox of every network on every node).
fn filler_network(i: usize) -> String {
    match i % (OTHER_NETWORKS + 1) {
        0 => NETWORK.to_string(),
        n => other_network(n - 1),
    }
}

fn probe(s: usize) -> String {
    format!("probe{s}")
}

/// A task's address on the bench's network, from its record.
fn task_ip(task: &Value) -> Result<Ipv4Addr> {
    task["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["network"] == NETWORK))
        .and_then(|e| e["ip"].as_str())
        .with_context(|| format!("task without an address on {NETWORK}: {task}"))?
        .parse()
        .context("task address")
}

fn attach_req(api: usize, node: &str, service: &str, name: &str, netns: &str) -> Req {
    Req {
        api,
        method: "POST",
        path: "/v1/tasks".into(),
        body: Some(json!({"service": service, "netns": netns, "name": name, "node": node})),
    }
}

fn detach_req(api: usize, name: &str) -> Req {
    Req {
        api,
        method: "DELETE",
        path: format!("/v1/tasks/{name}"),
        body: None,
    }
}

/// What one step measured.
#[derive(Default)]
struct Stage {
    label: String,
    services: usize,
    batches: Vec<Batch>,
    attach_call: Vec<Duration>,
    reach: Vec<Duration>,
    reach_miss: usize,
    /// Samples whose first connect failed (refused, unreachable or timed out).
    reach_retried: usize,
    /// n2's last reconcile step after each attach→reachable sample.
    n2_step: Vec<Duration>,
    /// The same steps part by part (`reconcile.last_step_phases_ms`).
    n2_phases: BTreeMap<String, Vec<Duration>>,
    /// What those steps visited (`reconcile.last_step_scope`), counted.
    n2_scopes: BTreeMap<String, usize>,
    change: Vec<Duration>,
    change_call: Vec<Duration>,
    change_miss: usize,
    /// Samples where some node did not balance to the new backend yet when the call
    /// returned.
    change_late: usize,
    /// How long after the call returned the last node got the new backend (0: before).
    change_after: Vec<Duration>,
    /// Connections to the VIP that failed (refused, timed out, reset) while probing.
    change_failed: usize,
    dns: Vec<f64>,
    dns_lost: u64,
    vip: Vec<f64>,
    /// Each round's control, run right after netd's on the same client: unbound's
    /// queries/s for the same query file, and new connections/s straight to one of
    /// probe0's tasks (the machine's drift between steps minutes apart moves both).
    dns_control: Vec<f64>,
    vip_control: Vec<f64>,
    /// VmRSS of each node's daemon, KiB.
    rss: Vec<u64>,
    /// Each node's netd CPU (its own and its children's, such as `nft`) per second of a
    /// window with no load and no API call: the cost of its periodic work.
    idle_cpu: Vec<f64>,
    /// n2's periodic checked step seen at rest: how long it took and its largest parts.
    n2_checked: Option<(Duration, Vec<(String, Duration)>)>,
    etcd_rss: u64,
    etcd_keys: u64,
    etcd_db: u64,
    etcd_db_in_use: u64,
    phases: Vec<(String, Duration)>,
    /// Kernel writes per attach→reachable sample (an attach and a detach), by kind: on
    /// n1 (the task's node) and n2 (another node).
    writes: BTreeMap<String, (f64, f64)>,
}

/// The median over rounds of `figure / control` (each pair from one round).
fn median_ratio(figure: &[f64], control: &[f64]) -> f64 {
    let ratios: Vec<f64> = figure
        .iter()
        .zip(control)
        .map(|(f, c)| f / c.max(1e-12))
        .collect();
    median(&ratios)
}

impl Stage {
    /// netd's DNS rate per unbound's, paired by round.
    fn dns_per_control(&self) -> f64 {
        median_ratio(&self.dns, &self.dns_control)
    }

    /// The VIP's new connections/s per those straight to a task, paired by round.
    fn vip_per_control(&self) -> f64 {
        median_ratio(&self.vip, &self.vip_control)
    }

    /// One batch of API calls: its rate for the table, its time for the phases.
    fn record(
        &mut self,
        what: &str,
        phase: String,
        n: usize,
        took: Duration,
        calls: Vec<Duration>,
    ) {
        self.batches.push(Batch {
            what: what.into(),
            count: n,
            took,
            calls,
        });
        self.phases.push((phase, took));
    }

    fn rate(&self, prefix: &str) -> Option<f64> {
        self.batches
            .iter()
            .find(|b| b.what.starts_with(prefix))
            .map(Batch::per_second)
    }
}

/// The cluster as it stands.
struct World {
    lab: Lab,
    apis: Vec<String>,
    nodes: Vec<String>,
    /// Probe services and the clients' service exist, their tasks are attached.
    base: bool,
    fillers: usize,
    /// Namespaces made for filler tasks (kept when detached, for a later growth).
    filler_ns: BTreeMap<usize, String>,
    /// Filler tasks attached.
    filler_attached: usize,
    /// Namespaces made for the burst's tasks.
    burst_ns: Vec<String>,
    /// Probe service → (VIP, whoami backends' addresses).
    probes: Vec<(Ipv4Addr, Vec<Ipv4Addr>)>,
    /// The whole run stops (and tears down) after this.
    deadline: Instant,
}

impl World {
    fn check_time(&self, what: &str) -> Result<()> {
        if Instant::now() > self.deadline {
            bail!("out of time (--time-limit) before {what}");
        }
        Ok(())
    }
}

impl World {
    fn services(&self) -> usize {
        self.fillers + if self.base { PROBES } else { 0 }
    }

    /// Creates the probe services, the clients' service and their tasks (the first time),
    /// and fillers up to `fillers`, with a task for each of the first FILLER_TASKS.
    fn grow(&mut self, fillers: usize, st: &mut Stage) -> Result<()> {
        let mut creates = vec![];
        let mut names = vec![];
        if !self.base {
            names.extend((0..PROBES).map(probe));
            names.push(CLIENT_SERVICE.into());
            names.push(BURST_SERVICE.into());
        }
        for (k, name) in names.iter().enumerate() {
            creates.push(Req {
                api: k % self.apis.len(),
                method: "POST",
                path: "/v1/services".into(),
                body: Some(json!({"name": name, "networks": [NETWORK]})),
            });
        }
        for i in self.fillers..fillers {
            creates.push(Req {
                api: i % self.apis.len(),
                method: "POST",
                path: "/v1/services".into(),
                body: Some(json!({"name": filler(i), "networks": [filler_network(i)]})),
            });
        }
        if !creates.is_empty() {
            let n = creates.len();
            eprintln!("creating {n} services");
            let (answers, took, calls) =
                run_requests(&self.apis, creates, "service create", self.deadline)?;
            if !self.base {
                for v in answers.iter().take(PROBES) {
                    let vip = v["vips"][NETWORK]
                        .as_str()
                        .with_context(|| format!("service without a VIP: {v}"))?
                        .parse()
                        .context("VIP")?;
                    self.probes.push((vip, vec![]));
                }
            }
            st.record(
                "service create",
                format!("create {n} services"),
                n,
                took,
                calls,
            );
        }

        // Namespaces first (not timed), then the attaches.
        let t = Instant::now();
        let mut attaches = vec![];
        // (probe index) for each whoami attach, to record its address.
        let mut whoami_of = vec![];
        if !self.base {
            for s in 0..PROBES {
                for k in 0..BACKENDS {
                    let tag = format!("p{s}b{k}");
                    let path = self.lab.whoami_task(&tag, PORT)?;
                    let node = (s + k) % self.nodes.len();
                    attaches.push(attach_req(node, &self.nodes[node], &probe(s), &tag, &path));
                    whoami_of.push(Some(s));
                }
            }
            for (i, c) in CLIENTS.iter().enumerate() {
                let path = self.lab.add_task_netns(c)?.1;
                attaches.push(attach_req(i, &self.nodes[i], CLIENT_SERVICE, c, &path));
                whoami_of.push(None);
            }
            let path = self.lab.add_task_netns(NFT_CLIENT)?.1;
            attaches.push(attach_req(
                0,
                &self.nodes[0],
                CLIENT_SERVICE,
                NFT_CLIENT,
                &path,
            ));
            whoami_of.push(None);
        }
        let first = self.filler_attached;
        let last = fillers.min(FILLER_TASKS);
        for i in first..last {
            let tag = format!("ft{i}");
            let path = match self.filler_ns.get(&i) {
                Some(p) => p.clone(),
                None => {
                    let p = self.lab.add_task_netns(&tag)?.1;
                    self.filler_ns.insert(i, p.clone());
                    p
                }
            };
            let node = i % self.nodes.len();
            attaches.push(attach_req(node, &self.nodes[node], &filler(i), &tag, &path));
            whoami_of.push(None);
        }
        st.phases
            .push(("make task namespaces (not timed)".into(), t.elapsed()));
        if !attaches.is_empty() {
            let n = attaches.len();
            eprintln!("attaching {n} tasks");
            let (answers, took, calls) =
                run_requests(&self.apis, attaches, "task attach", self.deadline)?;
            for (v, of) in answers.iter().zip(&whoami_of) {
                if let Some(s) = of {
                    self.probes[*s].1.push(task_ip(v)?);
                }
            }
            st.record("task attach", format!("attach {n} tasks"), n, took, calls);
        }
        if !self.base {
            // The clients' own ARP retry timer (1 s by default) would otherwise dominate
            // the first connection to a new task.
            for c in CLIENTS.iter().chain([&NFT_CLIENT]) {
                let ns = self.lab.ns(c);
                self.lab.exec_in(
                    &ns,
                    &["sysctl", "-qw", "net.ipv4.neigh.eth0.retrans_time_ms=10"],
                )?;
            }
        }
        self.base = true;
        self.filler_attached = self.filler_attached.max(last);
        self.fillers = self.fillers.max(fillers);
        Ok(())
    }

    /// Detaches the tasks of fillers from `fillers` on and removes those services.
    fn shrink(&mut self, fillers: usize, st: &mut Stage) -> Result<()> {
        let detaches: Vec<Req> = (fillers..self.filler_attached)
            .map(|i| detach_req(i % self.nodes.len(), &format!("ft{i}")))
            .collect();
        if !detaches.is_empty() {
            let n = detaches.len();
            eprintln!("detaching {n} tasks");
            let (_, took, calls) =
                run_requests(&self.apis, detaches, "task detach", self.deadline)?;
            st.record("task detach", format!("detach {n} tasks"), n, took, calls);
            self.filler_attached = fillers.min(self.filler_attached);
        }
        let removes: Vec<Req> = (fillers..self.fillers)
            .map(|i| Req {
                api: i % self.apis.len(),
                method: "DELETE",
                path: format!("/v1/services/{}", filler(i)),
                body: None,
            })
            .collect();
        if !removes.is_empty() {
            let n = removes.len();
            eprintln!("removing {n} services");
            let (_, took, calls) = run_requests(&self.apis, removes, "service rm", self.deadline)?;
            st.record("service rm", format!("remove {n} services"), n, took, calls);
        }
        self.fillers = fillers;
        Ok(())
    }
}

/// Attach→reachable: a whoami task attached on n1 through n1's API, first reached (TCP
/// connect) from the client task on n2; detached again between samples.
fn attach_reachable(w: &mut World, samples: usize, st: &mut Stage) -> Result<()> {
    let before = (kernel_writes(&w.apis[0])?, kernel_writes(&w.apis[1])?);
    attach_reachable_samples(w, samples, st)?;
    let after = (kernel_writes(&w.apis[0])?, kernel_writes(&w.apis[1])?);
    let per = |a: &Value, b: &Value, kind: &str| {
        (a[kind].as_u64().unwrap_or(0) as f64 - b[kind].as_u64().unwrap_or(0) as f64)
            / samples.max(1) as f64
    };
    for kind in WRITE_KINDS {
        st.writes.insert(
            kind.to_string(),
            (
                per(&after.0, &before.0, kind),
                per(&after.1, &before.1, kind),
            ),
        );
    }
    Ok(())
}

/// A node's kernel writes by kind since its netd started (`netd status`).
fn kernel_writes(api: &str) -> Result<Value> {
    Ok(Client::new(api).get("/v1/status")?["reconcile"]["kernel_writes"].clone())
}

/// The samples of [`attach_reachable`].
fn attach_reachable_samples(w: &mut World, samples: usize, st: &mut Stage) -> Result<()> {
    let path = format!("/run/netns/{}", w.lab.ns("samp"));
    let client = Client::new(&w.apis[0]);
    let from = w.lab.ns(CLIENTS[1]);
    for k in 0..samples {
        let t = Instant::now();
        let v = client
            .post(
                "/v1/tasks",
                &json!({"service": probe(0), "netns": path, "name": "samp", "node": w.nodes[0]}),
            )
            .context("attach the sample task")?;
        st.attach_call.push(t.elapsed());
        let addr = SocketAddr::from((task_ip(&v)?, PORT));
        match load::first_connect(&from, addr, PROBE_LIMIT)? {
            Some((d, attempts)) => {
                st.reach.push(d);
                st.reach_retried += usize::from(attempts > 1);
            }
            None => st.reach_miss += 1,
        }
        // The step on n2 that programmed the new task (its last one by now).
        let n2 = Client::new(&w.apis[1]).get("/v1/status")?;
        if let Some(ms) = n2["reconcile"]["last_step_ms"].as_f64() {
            st.n2_step.push(Duration::from_secs_f64(ms / 1000.0));
        }
        if let Some(scope) = n2["reconcile"]["last_step_scope"].as_str() {
            *st.n2_scopes.entry(scope.to_string()).or_default() += 1;
        }
        for (part, ms) in n2["reconcile"]["last_step_phases_ms"]
            .as_object()
            .into_iter()
            .flatten()
        {
            if let Some(ms) = ms.as_f64() {
                st.n2_phases
                    .entry(part.clone())
                    .or_default()
                    .push(Duration::from_secs_f64(ms / 1000.0));
            }
        }
        client
            .delete("/v1/tasks/samp")
            .context("detach the sample task")?;
        if !load::until_unreachable(&from, addr, PROBE_LIMIT)? {
            bail!("sample {k}: task still reachable 5 s after detach");
        }
    }
    Ok(())
}

/// [`BURST`] tasks attached to `burst` at once through the 3 nodes' APIs (4 client
/// threads), then detached at once: the step's task attaches/s and detaches/s, at any
/// size (the namespaces, made once, are not timed).
fn attach_burst(w: &mut World, st: &mut Stage) -> Result<()> {
    while w.burst_ns.len() < BURST {
        let tag = format!("bu{}", w.burst_ns.len());
        let path = w.lab.add_task_netns(&tag)?.1;
        w.burst_ns.push(path);
    }
    let n = w.nodes.len();
    let attaches = (0..BURST)
        .map(|i| {
            attach_req(
                i % n,
                &w.nodes[i % n],
                BURST_SERVICE,
                &format!("bu{i}"),
                &w.burst_ns[i],
            )
        })
        .collect();
    let (_, took, calls) = run_requests(&w.apis, attaches, "task attach", w.deadline)?;
    st.record(
        "burst attach",
        format!("attach {BURST} tasks at once"),
        BURST,
        took,
        calls,
    );
    let detaches = (0..BURST)
        .map(|i| detach_req(i % n, &format!("bu{i}")))
        .collect();
    let (_, took, calls) = run_requests(&w.apis, detaches, "task detach", w.deadline)?;
    st.record(
        "burst detach",
        format!("detach {BURST} tasks at once"),
        BURST,
        took,
        calls,
    );
    // The other nodes apply the detaches in steps of their own: not during the probes
    // that follow (their steps and kernel writes are measured).
    std::thread::sleep(BURST_SETTLE);
    Ok(())
}

/// Connects to `vip` from `netns` again and again until whoami `name` answers; the time
/// since `t0` (None if it never did within PROBE_LIMIT).
fn until_backend(
    netns: &str,
    vip: SocketAddr,
    name: &'static str,
    t0: Instant,
) -> Result<(Option<Duration>, usize)> {
    in_netns(netns, move || {
        let mut buf = Vec::with_capacity(4096);
        let mut failed = 0;
        for _ in 0..100_000 {
            if t0.elapsed() > PROBE_LIMIT {
                break;
            }
            match TcpStream::connect_timeout(&vip, Duration::from_millis(200)) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    match http_request(&mut s, &mut buf) {
                        Ok(body) => {
                            let text = String::from_utf8_lossy(&buf[body]);
                            if field(&text, "Hostname") == Some(name) {
                                return Ok((Some(t0.elapsed()), failed));
                            }
                        }
                        Err(_) => failed += 1,
                    }
                }
                Err(_) => failed += 1,
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok((None, failed))
    })
}

/// One backend change: a whoami task attached to probe1 through n1's API while the
/// client task on every node connects to probe1's VIP until the new task answers; the
/// time from the call's start until the last node did.
fn backend_change(w: &mut World, samples: usize, st: &mut Stage) -> Result<()> {
    let path = format!("/run/netns/{}", w.lab.ns("nb"));
    let client = Client::new(&w.apis[0]);
    let vip = SocketAddr::from((w.probes[1].0, PORT));
    for _ in 0..samples {
        let t0 = Instant::now();
        let probers: Vec<_> = CLIENTS
            .iter()
            .map(|c| {
                let ns = w.lab.ns(c);
                std::thread::spawn(move || until_backend(&ns, vip, "nb", t0))
            })
            .collect();
        let call = client.post(
            "/v1/tasks",
            &json!({"service": probe(1), "netns": path, "name": "nb", "node": w.nodes[0]}),
        );
        let returned = t0.elapsed();
        let mut seen = vec![];
        for p in probers {
            let (at, failed) = p.join().map_err(|_| anyhow!("prober panicked"))??;
            st.change_failed += failed;
            seen.push(at);
        }
        call.context("attach the new backend")?;
        st.change_call.push(returned);
        if seen.iter().all(Option::is_some) {
            let last = seen.iter().flatten().max().copied().unwrap_or_default();
            if last > returned {
                st.change_late += 1;
            }
            st.change_after.push(last.saturating_sub(returned));
            st.change.push(last);
        } else {
            st.change_miss += 1;
        }
        client
            .delete("/v1/tasks/nb")
            .context("detach the new backend")?;
    }
    Ok(())
}

const NETD_DNS: &str = "127.0.0.11";
/// unbound in the first client's namespace: the DNS rounds' control.
const CONTROL_DNS: &str = "127.0.0.12";

/// Starts unbound in `netns` on [`CONTROL_DNS`] (once per run) with the names of the
/// query file as local data (a VIP for each probe, its 10 tasks for `tasks.`, NXDOMAIN
/// for the missing names), and waits until it answers.
fn control_dns(w: &mut World, netns: &str, queries: &Path) -> Result<()> {
    let dir = w.lab.dir.join("bench-scale-unbound");
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    let mut conf = format!(
        "server:\n  interface: {CONTROL_DNS}\n  port: 53\n  access-control: 127.0.0.0/8 allow\n  \
         do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{}\"\n  \
         pidfile: \"\"\n  use-syslog: no\n  num-threads: 1\n",
        dir.display()
    );
    for (s, (vip, tasks)) in w.probes.iter().enumerate() {
        let name = probe(s);
        writeln!(conf, "  local-zone: \"{name}.\" static")?;
        writeln!(conf, "  local-data: \"{name}. 600 IN A {vip}\"")?;
        for t in tasks {
            writeln!(conf, "  local-data: \"tasks.{name}. 600 IN A {t}\"")?;
        }
        writeln!(conf, "  local-zone: \"nosuch{s}.\" always_nxdomain")?;
    }
    let file = dir.join("unbound.conf");
    std::fs::write(&file, conf)?;
    w.lab.spawn_in(
        netns,
        Path::new("unbound"),
        &["-d", "-c", &file.display().to_string()],
    )?;
    let first = std::fs::read_to_string(queries)?;
    let name = first
        .split_whitespace()
        .next()
        .context("an empty query file")?;
    for _ in 0..100 {
        let answer = w
            .lab
            .dig(netns, &[&format!("@{CONTROL_DNS}"), "+short", name])
            .unwrap_or_default();
        if !answer.trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("unbound (Debian package unbound) did not answer {name} on {CONTROL_DNS} in 10 s")
}

/// dnsperf from `netns` against `server`; (queries/s, queries lost).
fn dnsperf(
    lab: &Lab,
    netns: &str,
    queries: &Path,
    seconds: u64,
    server: &str,
) -> Result<(f64, u64)> {
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
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figure = |label: &str| crate::dns::dnsperf_figure(&text, label);
    let qps = figure("Queries per second:").with_context(|| {
        format!(
            "dnsperf (Debian package dnsperf) printed no rate: {text:.2000}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((qps, figure("Queries lost:").unwrap_or(0.0) as u64))
}

/// VmRSS of process `pid`, KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS for {pid}"))
}

/// A POST to the lab etcd's JSON gateway (curl, from node n1's namespace).
fn etcd_call(lab: &Lab, path: &str, body: &Value) -> Result<Value> {
    let url = format!("http://{}:2379/v3/{path}", netd_lab::underlay_ip(ETCD_HOST));
    let out = lab.exec_in(
        &lab.nodes[0].netns,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-X",
            "POST",
            "-d",
            &body.to_string(),
            &url,
        ],
    )?;
    if !out.status.success() {
        bail!("etcd {path}: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("etcd {path}: not JSON"))
}

/// A number etcd's gateway gives as a string (int64 in JSON).
fn etcd_num(v: &Value, key: &str) -> u64 {
    match &v[key] {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// A quiet window long enough for every node's periodic checked step (`--resync`, 30 s).
const IDLE_WINDOW: Duration = Duration::from_secs(32);

/// CPU seconds process `pid` and its reaped children used so far.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after its ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after the command.
    let ticks: u64 = fields
        .get(11..15)
        .context("short /proc/PID/stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

fn memory(w: &World, st: &mut Stage) -> Result<()> {
    let mut pids = vec![];
    for i in 0..w.nodes.len() {
        let pid = w
            .lab
            .daemon_pid(i)
            .with_context(|| format!("netd on {} is not running", w.nodes[i]))?;
        st.rss.push(rss_kib(pid)?);
        pids.push(pid);
    }
    let before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect::<Result<_>>()?;
    let t = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let secs = t.elapsed().as_secs_f64();
    for (pid, b) in pids.iter().zip(before) {
        st.idle_cpu.push((cpu_secs(*pid)? - b) / secs);
    }
    // The window covers a periodic checked step of every node: n2's, if nothing ran
    // after it, says where that CPU goes.
    let n2 = Client::new(&w.apis[1]).get("/v1/status")?;
    let r = &n2["reconcile"];
    if r["last_step_scope"]
        .as_str()
        .is_some_and(|s| s.contains("periodic check"))
    {
        let secs = |v: &Value| Duration::from_secs_f64(v.as_f64().unwrap_or(0.0) / 1000.0);
        let mut parts: Vec<(String, Duration)> = r["last_step_phases_ms"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), secs(v)))
            .collect();
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
        parts.truncate(4);
        st.n2_checked = Some((secs(&r["last_step_ms"]), parts));
    }
    if let Some(pid) = w.lab.etcd_pid() {
        st.etcd_rss = rss_kib(pid)?;
    }
    let count = etcd_call(
        &w.lab,
        "kv/range",
        &json!({"key": netd_lab::base64_encode(b"/netd/"),
                "range_end": netd_lab::base64_encode(b"/netd0"), "count_only": true}),
    )?;
    st.etcd_keys = etcd_num(&count, "count");
    let status = etcd_call(&w.lab, "maintenance/status", &json!({}))?;
    st.etcd_db = etcd_num(&status, "dbSize");
    st.etcd_db_in_use = etcd_num(&status, "dbSizeInUse");
    Ok(())
}

/// Every probe's measurements at the cluster's current size.
fn measure(w: &mut World, o: &Opts, queries: &Path, st: &mut Stage) -> Result<()> {
    st.services = w.services();
    eprintln!("== {} services: probes", st.services);
    w.check_time("the probes")?;
    attach_burst(w, st)?;
    let t = Instant::now();
    attach_reachable(w, o.samples, st)?;
    st.phases
        .push(("attach→reachable samples".into(), t.elapsed()));
    w.check_time("the backend changes")?;
    let t = Instant::now();
    backend_change(w, o.samples, st)?;
    st.phases
        .push(("backend change samples".into(), t.elapsed()));
    let t = Instant::now();
    let c1 = w.lab.ns(CLIENTS[0]);
    let vip = SocketAddr::from((w.probes[0].0, PORT));
    let direct = SocketAddr::from((*w.probes[0].1.first().context("probe0 has no task")?, PORT));
    control_dns(w, &c1, queries)?;
    let connections = |to: SocketAddr| -> Result<f64> {
        let run = load::new_connections(
            &c1,
            to,
            LOAD_THREADS,
            Duration::from_secs(o.seconds),
            MAX_CONNS,
        )?;
        Ok(run.per_second())
    };
    for round in 0..o.rounds {
        w.check_time("a DNS and VIP round")?;
        eprintln!(
            "  round {}: DNS, unbound, VIP, straight to a task",
            round + 1
        );
        let (qps, lost) = dnsperf(&w.lab, &c1, queries, o.seconds, NETD_DNS)?;
        st.dns.push(qps);
        st.dns_lost += lost;
        st.dns_control
            .push(dnsperf(&w.lab, &c1, queries, o.seconds, CONTROL_DNS)?.0);
        st.vip.push(connections(vip)?);
        st.vip_control.push(connections(direct)?);
    }
    st.phases.push(("DNS and VIP rounds".into(), t.elapsed()));
    memory(w, st)
}

/// How long the restart phase's load runs, and when in it n1's netd is killed.
const RESTART_LOAD: Duration = Duration::from_secs(12);
const RESTART_AFTER: Duration = Duration::from_secs(3);
/// dnsperf's timeout for a query (a resolver's first try).
const DNS_TIMEOUT_SECS: u64 = 5;

/// What a kill -9 and restart of n1's netd did to the clients and to the kernel.
struct RestartRun {
    services: usize,
    networks: usize,
    tasks: usize,
    /// From the kill until the new netd's API answered (after its first step).
    down: Duration,
    dns_qps: f64,
    dns_sent: u64,
    dns_lost: u64,
    /// The VIP load's connections, and why it stopped early (a failed connection).
    vip_conns: u64,
    vip_failure: Option<String>,
    vip_max: Duration,
    /// The new netd's kernel writes by kind, and its steps, just after it came up.
    writes: Value,
    steps: u64,
    /// Its DNS: tasks served, and of them from the sockets the fd store kept.
    dns_tasks: u64,
    dns_held: u64,
    /// Lines of n1's kernel listing that differ after the restart.
    kernel_diff: usize,
}

/// Kills n1's netd (SIGKILL) and starts it again while c1 on n1 asks netd's DNS
/// (dnsperf) and connects to probe0's VIP; then compares n1's kernel with before.
fn restart(w: &mut World, queries: &Path) -> Result<RestartRun> {
    let c1 = w.lab.ns(CLIENTS[0]);
    let before = w.lab.kernel_snapshot(0)?;
    let dns = {
        let (c1, queries) = (c1.clone(), queries.display().to_string());
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &c1,
                    "dnsperf",
                    "-s",
                    "127.0.0.11",
                    "-d",
                    &queries,
                ])
                .args(["-l", &RESTART_LOAD.as_secs().to_string()])
                .args(["-t", &DNS_TIMEOUT_SECS.to_string()])
                .output()
        })
    };
    let vip = SocketAddr::from((w.probes[0].0, PORT));
    let load = {
        let c1 = c1.clone();
        std::thread::spawn(move || load::new_connections(&c1, vip, 1, RESTART_LOAD, MAX_CONNS))
    };
    std::thread::sleep(RESTART_AFTER);
    let killed = Instant::now();
    w.lab.stop_daemon(0, true)?;
    w.lab.start_daemon(0)?;
    let down = killed.elapsed();
    let status = w.lab.cli_json(0, &["status"])?;
    let dns_out = dns
        .join()
        .map_err(|_| anyhow!("dnsperf thread panicked"))?
        .context("run dnsperf")?;
    let text = String::from_utf8_lossy(&dns_out.stdout);
    let figure = |label: &str| crate::dns::dnsperf_figure(&text, label);
    let dns_qps = figure("Queries per second:")
        .with_context(|| format!("dnsperf printed no rate: {text:.2000}"))?;
    let (vip_conns, vip_failure, vip_max) =
        match load.join().map_err(|_| anyhow!("load thread panicked"))? {
            Ok(run) => (
                run.requests,
                None,
                run.latencies.iter().max().copied().unwrap_or_default(),
            ),
            Err(e) => (0, Some(format!("{e:#}")), Duration::ZERO),
        };
    let after = w.lab.kernel_snapshot(0)?;
    let kernel_diff = netd_lab::diff_lines(&before, &after).lines().count();
    let tasks = w.lab.cli_json(0, &["task", "ls"])?;
    Ok(RestartRun {
        services: w.services(),
        networks: OTHER_NETWORKS + 1,
        tasks: tasks.as_array().map(|a| a.len()).unwrap_or(0),
        down,
        dns_qps,
        dns_sent: figure("Queries sent:").unwrap_or(0.0) as u64,
        dns_lost: figure("Queries lost:").unwrap_or(0.0) as u64,
        vip_conns,
        vip_failure,
        vip_max,
        writes: status["reconcile"]["kernel_writes"].clone(),
        steps: status["reconcile"]["steps"].as_u64().unwrap_or(0),
        dns_tasks: status["dns"]["tasks_served"].as_u64().unwrap_or(0),
        dns_held: status["dns"]["handover"]["tasks_held"]
            .as_u64()
            .unwrap_or(0),
        kernel_diff,
    })
}

fn restart_section(md: &mut String, r: &RestartRun) -> Result<()> {
    writeln!(
        md,
        "\n## Restart at {} services\n\nWith {} services, {} networks and {} tasks in the \
         cluster, n1's netd is killed (SIGKILL) {} s into a {} s load from the client task \
         c1 on n1 and started again at once: dnsperf against 127.0.0.11 (the same query \
         mix, {DNS_TIMEOUT_SECS} s timeout, a resolver's first try) and new connections to \
         probe0's VIP (one thread, each connect has a 3 s timeout; the first failure stops \
         it). Then n1's kernel (links, addresses, routes, VXLAN entries of every sandbox \
         and task namespace, the nftables ruleset without its counters, the BPF pins) is \
         listed again and compared with the listing from before.\n",
        thousands(r.services),
        thousands(r.services),
        r.networks,
        r.tasks,
        RESTART_AFTER.as_secs(),
        RESTART_LOAD.as_secs()
    )?;
    let writes: Vec<String> = r
        .writes
        .as_object()
        .map(|o| o.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    writeln!(
        md,
        "| figure | value |\n|---|---|\n\
         | kill → the new netd's API answers (its first step done) | {} |\n\
         | DNS queries sent / lost | {} / {} ({:.0} queries/s over the whole load) |\n\
         | VIP new connections | {} ({}) , slowest {} |\n\
         | the new netd's kernel writes when its API answered | {} |\n\
         | its steps by then | {} |\n\
         | local tasks whose DNS sockets came from the fd store | {} of {} |\n\
         | lines of n1's kernel listing changed | {} |",
        ms(r.down),
        r.dns_sent,
        r.dns_lost,
        r.dns_qps,
        r.vip_conns,
        r.vip_failure
            .as_deref()
            .map(|e| format!("stopped by a failure: {e}"))
            .unwrap_or_else(|| "none failed".into()),
        ms(r.vip_max),
        writes.join(", "),
        r.steps,
        r.dns_held,
        r.dns_tasks,
        r.kernel_diff
    )?;
    Ok(())
}

/// The nftables path: kube-proxy's nftables mode in the client's namespace, one map
/// `address . protocol . port → goto chain` holding every service, a chain per service
/// that DNATs to `numgen random` over its backends.
fn nft_ruleset(services: usize, backends: &[Ipv4Addr]) -> Result<(String, Ipv4Addr)> {
    let addr = |base: Ipv4Addr, i: usize| -> Result<Ipv4Addr> {
        // Skip .0 and .255 of each /24, to keep clear of anything special.
        let off = u32::try_from(i / 254 * 256 + i % 254 + 1).context("address offset")?;
        Ok(Ipv4Addr::from(u32::from(base) + off))
    };
    let mut r = String::from("table ip netdscale {\n");
    let map: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : {b}"))
        .collect();
    let _ = writeln!(
        r,
        "  chain svc0 {{\n    dnat to numgen random mod {} map {{ {} }}\n  }}",
        backends.len(),
        map.join(", ")
    );
    for i in 1..services {
        let _ = writeln!(
            r,
            "  chain svc{i} {{\n    dnat to {}\n  }}",
            addr(NFT_FILLER_BASE, i)?
        );
    }
    r.push_str(
        "  map services {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {\n",
    );
    for i in 0..services {
        let sep = if i + 1 < services { "," } else { "" };
        let _ = writeln!(
            r,
            "      {} . tcp . {PORT} : goto svc{i}{sep}",
            addr(NFT_BASE, i)?
        );
    }
    r.push_str(
        "    }\n  }\n  chain out {\n    type nat hook output priority -100; policy accept;\n    \
         ip daddr . meta l4proto . th dport vmap @services\n  }\n}\n",
    );
    Ok((r, addr(NFT_BASE, 0)?))
}

/// The whoami names reached over `n` sequential connections.
fn reached(netns: &str, addr: SocketAddr, n: usize) -> Result<usize> {
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..n {
        let body = netd_lab::http_get_from(netns, addr)?;
        names.insert(field(&body, "Hostname").context("whoami name")?.to_string());
    }
    Ok(names.len())
}

struct NftRun {
    services: usize,
    load_time: Duration,
    nft: Vec<f64>,
    ebpf: Vec<f64>,
    nft_reached: usize,
    ebpf_reached: usize,
}

fn nft_vs_ebpf(w: &mut World, o: &Opts) -> Result<NftRun> {
    let services = w.services();
    let (rules, nft_vip) = nft_ruleset(services, &w.probes[0].1)?;
    let file = w.lab.dir.join("bench-scale-nft.conf");
    std::fs::write(&file, rules).context("write the nftables ruleset")?;
    let nc = w.lab.ns(NFT_CLIENT);
    let t = Instant::now();
    let out = w
        .lab
        .exec_in(&nc, &["nft", "-f", &file.display().to_string()])?;
    if !out.status.success() {
        bail!("nft -f: {}", String::from_utf8_lossy(&out.stderr));
    }
    let load_time = t.elapsed();
    let nft_addr = SocketAddr::from((nft_vip, PORT));
    let ebpf_addr = SocketAddr::from((w.probes[0].0, PORT));
    let mut run = NftRun {
        services,
        load_time,
        nft: vec![],
        ebpf: vec![],
        nft_reached: reached(&nc, nft_addr, 4 * BACKENDS)?,
        ebpf_reached: reached(&nc, ebpf_addr, 4 * BACKENDS)?,
    };
    let d = Duration::from_secs(o.seconds);
    for round in 0..o.rounds {
        eprintln!("  round {}: nftables, eBPF", round + 1);
        let r = load::new_connections(&nc, nft_addr, LOAD_THREADS, d, MAX_CONNS)?;
        run.nft.push(r.per_second());
        let r = load::new_connections(&nc, ebpf_addr, LOAD_THREADS, d, MAX_CONNS)?;
        run.ebpf.push(r.per_second());
    }
    let out = w
        .lab
        .exec_in(&nc, &["nft", "delete", "table", "ip", "netdscale"])?;
    if !out.status.success() {
        bail!("nft delete: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(run)
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

pub fn run(o: &Opts) -> Result<()> {
    if o.scales.is_empty() || o.scales.iter().any(|s| *s < PROBES) {
        bail!("--scales: each at least {PROBES} (the probe services)");
    }
    let started = Instant::now();
    let lab = Lab::build("bsc", 3, true, "ebpf")?;
    let apis: Vec<String> = lab.nodes.iter().map(|n| n.api()).collect();
    let nodes: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    let mut w = World {
        lab,
        apis,
        nodes,
        base: false,
        fillers: 0,
        filler_ns: BTreeMap::new(),
        filler_attached: 0,
        burst_ns: vec![],
        probes: vec![],
        deadline: started + Duration::from_secs(o.time_limit),
    };
    let client = Client::new(&w.apis[0]);
    client
        .post("/v1/networks", &json!({"name": NETWORK, "subnet": SUBNET}))
        .context("create the network")?;
    for n in 0..OTHER_NETWORKS {
        let subnet = format!("198.19.{}.0/24", 128 + n);
        client
            .post(
                "/v1/networks",
                &json!({"name": other_network(n), "subnet": subnet}),
            )
            .with_context(|| format!("create network {}", other_network(n)))?;
    }
    // The sample tasks of the probes (attached and detached at every step).
    w.lab.whoami_task("samp", PORT)?;
    w.lab.whoami_task("nb", PORT)?;
    let queries = w.lab.dir.join("bench-scale-queries.txt");
    {
        let mut f = std::fs::File::create(&queries).context("write the DNS queries")?;
        for s in 0..PROBES {
            writeln!(f, "{} A\ntasks.{} A\nnosuch{s} A", probe(s), probe(s))?;
        }
    }

    let mut steps: Vec<(String, usize)> = o.scales.iter().map(|s| (thousands(*s), *s)).collect();
    if o.scales.len() > 1 {
        steps.push((format!("{} again", thousands(o.scales[0])), o.scales[0]));
    }
    let biggest = o.scales.iter().copied().max().unwrap_or(PROBES);
    let mut stages = vec![];
    let mut nft = None;
    let mut restarted = None;
    let mut stopped = None;
    for (k, (label, scale)) in steps.iter().enumerate() {
        let mut st = Stage {
            label: label.clone(),
            ..Stage::default()
        };
        let fillers = scale - PROBES;
        eprintln!("== step {label}: {fillers} filler services");
        let step = (|| -> Result<()> {
            if fillers >= w.fillers {
                w.grow(fillers, &mut st)?;
            } else {
                w.shrink(fillers, &mut st)?;
            }
            measure(&mut w, o, &queries, &mut st)?;
            if *scale == biggest && nft.is_none() && k < o.scales.len() {
                w.check_time("nftables vs eBPF")?;
                let t = Instant::now();
                eprintln!("== nftables vs eBPF at {label}");
                nft = Some(nft_vs_ebpf(&mut w, o)?);
                st.phases.push(("nftables vs eBPF".into(), t.elapsed()));
                w.check_time("the restart under load")?;
                let t = Instant::now();
                eprintln!("== restart of n1's netd under load at {label}");
                restarted = Some(restart(&mut w, &queries)?);
                st.phases.push(("restart under load".into(), t.elapsed()));
            }
            Ok(())
        })();
        for (what, d) in &st.phases {
            eprintln!("  {label}: {what}: {:.1} s", d.as_secs_f64());
        }
        if let Err(e) = step {
            let done: Vec<String> = st
                .phases
                .iter()
                .map(|(what, d)| format!("{what} {:.1} s", d.as_secs_f64()))
                .collect();
            stopped = Some((
                e,
                format!("step {label} stopped after: {}", done.join(", ")),
            ));
            break;
        }
        stages.push(st);
    }
    if let Some((e, how)) = stopped {
        // What was measured before the failure, beside the results of the last
        // complete run (which stay as they were).
        if !stages.is_empty() {
            let md = results(
                o,
                &stages,
                nft.as_ref(),
                restarted.as_ref(),
                started.elapsed(),
            )?;
            let partial = o.out.with_extension("partial.md");
            write_results(
                &partial,
                &format!("{md}\n**Incomplete run**: {how}: {e:#}\n"),
                None,
            )?;
        }
        w.lab.teardown();
        return Err(e.context(how));
    }
    let md = results(
        o,
        &stages,
        nft.as_ref(),
        restarted.as_ref(),
        started.elapsed(),
    )?;
    let (svg_path, link) = plot_beside(&o.out)?;
    let svg = plot(&stages, nft.as_ref());
    write_results(&o.out, &format!("{md}\n{link}\n"), Some((&svg_path, &svg)))?;
    w.lab.teardown();
    Ok(())
}

fn plot(stages: &[Stage], nft: Option<&NftRun>) -> String {
    let per_stage = |f: &dyn Fn(&Stage) -> f64| -> Vec<(String, Vec<f64>)> {
        stages
            .iter()
            .map(|s| (s.label.clone(), vec![f(s)]))
            .collect()
    };
    let mut vip = per_stage(&|s| median(&s.vip));
    if let Some(n) = nft {
        vip.push((
            format!("{} (nft)", thousands(n.services)),
            vec![median(&n.ebpf), median(&n.nft)],
        ));
    }
    bar_chart(
        "netd at 10 → 10,000 services (3 nodes, etcd)",
        &["netd", "nftables (kube-proxy mode, every service)"],
        &[
            Panel {
                title: "attach→reachable p99 (ms, lower is better)".into(),
                groups: per_stage(&|s| quantile(&s.reach, 0.99).as_secs_f64() * 1000.0),
            },
            Panel {
                title: "DNS queries/s".into(),
                groups: per_stage(&|s| median(&s.dns)),
            },
            Panel {
                title: "VIP new connections/s".into(),
                groups: vip,
            },
            Panel {
                title: "netd RSS per node (MiB, mean)".into(),
                groups: per_stage(&|s| mib(s.rss.iter().sum::<u64>()) / s.rss.len().max(1) as f64),
            },
        ],
    )
}

fn results(
    o: &Opts,
    stages: &[Stage],
    nft: Option<&NftRun>,
    restarted: Option<&RestartRun>,
    total: Duration,
) -> Result<String> {
    let mut md = header("Scale: 10 → 10,000 services");
    writeln!(
        md,
        "Machine: {}. A 3-node lab cluster on one etcd (every node a network namespace, \
         eBPF datapath), 100 overlay networks: `{NETWORK}` ({SUBNET}: the lab's pool holds \
         its ingress network at 198.19.255.0/24 and 198.18.0.0/16 its underlay and \
         gwbridges, so no /16 is free) with the probes and clients, and {OTHER_NETWORKS} \
         /24s for the fillers, which go round all 100 networks (so the filler tasks put a \
         sandbox of every network on every node). Whole run: {:.0} s.\n",
        machine(),
        total.as_secs_f64()
    )?;
    writeln!(
        md,
        "**What runs.** A task is a network namespace in netd (one task per namespace), so \
         backends are not cheap: the bench uses {} real task namespaces at most. {PROBES} \
         probe services (VIP mode) with {BACKENDS} `netd-lab whoami` backends each, spread \
         over the 3 nodes, are there at every step; one more service holds the client \
         tasks (c1, c2, c3 on n1, n2, n3, and `nc` on n1 for the nftables comparison). \
         Every other service is a filler: the first {FILLER_TASKS} fillers have one task \
         each (an empty namespace: a task needs no server process), all other fillers have \
         no task (a service scaled to zero, which still has a VIP, DNS names and an eBPF \
         map entry). The step's size counts probe and filler services (the clients' \
         service comes on top). The cluster grows through netd's HTTP API on the nodes' \
         unix sockets ({API_THREADS} concurrent client threads, requests spread over the \
         3 nodes, one connection per call as the CLI makes), then shrinks back to the \
         first size (filler tasks detached, filler services removed): the figures at the \
         biggest size are compared with the first step and with the last one, which ran \
         closest in time to it on the same machine (the machine drifts). An attach \
         returns when its task's interfaces work, so attaches/s is the full API call. \
         At every step {BURST} tasks (empty namespaces) are attached at once to one more \
         service, `burst`, and detached again: the step's task attaches/s and \
         detaches/s, whatever its growth attached.\n",
        PROBES * BACKENDS + FILLER_TASKS + CLIENTS.len() + BURST + 3,
    )?;
    writeln!(
        md,
        "**Probes at every step.** *Attach→reachable*: a whoami task attached to probe0 on \
         n1 through n1's API, then the time from the call's return until the client task \
         on n2 first completes a TCP connect to the task's address (attempts every 2 ms, \
         20 ms connect timeout, the client's ARP retry timer at 10 ms), {} samples, the \
         task detached between them (as the overlay bench); *n2's step*: how long n2's last \
         reconcile step took after each sample (`netd status`: `reconcile.last_step_ms`), \
         the one that programmed the task as a VXLAN peer. *Backend change*: a whoami \
         task attached to probe1 through n1's API while the client task on each of the 3 \
         nodes connects to probe1's VIP again and again (every 0.2 ms) until the new task \
         answers; the time from the call's start until the last node got it, {} samples \
         (the task detached between them). *DNS*: dnsperf (100 queries in flight, one \
         client) from c1 against 127.0.0.11 for {} s, asking in turn each probe's name, \
         `tasks.NAME` and a name that does not exist. *VIP*: new connections/s from c1 to \
         probe0's VIP, {LOAD_THREADS} threads each connecting, sending one HTTP GET, \
         reading the answer and closing with a reset, {} s. *Controls*: right after \
         each netd run, the same dnsperf against unbound (one thread, 127.0.0.12 in c1, the \
         same names as local data) and the same connections straight to one of probe0's \
         tasks; the step's figure per its control is the median of the rounds' ratios. \
         Steps run minutes apart, and the machine's speed drifts between them by more than \
         the 5% the targets allow (raw rates of one step differ by up to 15% between runs): \
         the controls drift with it, so the targets are judged on the figures per their \
         control, and the raw ratios are shown beside. DNS, unbound, VIP and straight \
         alternate, {} rounds; the median round counts. *Memory*: VmRSS of each node's netd and of etcd, \
         the number of keys under `/netd/` and etcd's db size (total, and in use: etcd \
         keeps its history, nothing compacts it in the lab) from etcd's own gateway. \
         *CPU at rest*: each netd's CPU time (its own and its reaped children's, such as \
         `nft`) over {} s without load or API calls, per second (100% is one core): the \
         cost of its periodic work, such as the checked step every 30 s (`--resync`).\n",
        o.samples,
        o.samples,
        o.seconds,
        o.seconds,
        o.rounds,
        IDLE_WINDOW.as_secs()
    )?;

    writeln!(md, "## Per step\n")?;
    writeln!(
        md,
        "| step | services | service creates/s | task attaches/s, detaches/s ({BURST} at \
         once) | attach call p50 | attach→reachable p50 | p99 | n2's step p50 | p99 | \
         backend change p50 | p99 | DNS queries/s | per unbound's | VIP new connections/s \
         | per straight to a task's |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let opt = |v: Option<f64>| v.map_or("–".to_string(), |r| format!("{r:.0}"));
    for s in stages {
        let mut reach = format!(
            "{} | {}",
            ms(quantile(&s.reach, 0.5)),
            ms(quantile(&s.reach, 0.99))
        );
        if s.reach_miss > 0 {
            let _ = write!(reach, " ({} not reached in 5 s)", s.reach_miss);
        }
        let _ = write!(
            reach,
            " | {} | {}",
            ms(quantile(&s.n2_step, 0.5)),
            ms(quantile(&s.n2_step, 0.99))
        );
        let mut change = format!(
            "{} | {}",
            ms(quantile(&s.change, 0.5)),
            ms(quantile(&s.change, 0.99))
        );
        if s.change_miss > 0 {
            let _ = write!(change, " ({} not seen in 5 s)", s.change_miss);
        }
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {reach} | {change} | {:.0} | {:.2} | {:.0} | {:.2} |",
            s.label,
            thousands(s.services),
            opt(s.rate("service create")),
            format_args!(
                "{}, {}",
                opt(s.rate("burst attach")),
                opt(s.rate("burst detach"))
            ),
            ms(quantile(&s.attach_call, 0.5)),
            median(&s.dns),
            s.dns_per_control(),
            median(&s.vip),
            s.vip_per_control(),
        )?;
    }
    let lost: u64 = stages.iter().map(|s| s.dns_lost).sum();
    let late: usize = stages.iter().map(|s| s.change_late).sum();
    let changes: usize = stages.iter().map(|s| s.change.len()).sum();
    let call_p99: Vec<String> = stages
        .iter()
        .map(|s| {
            format!(
                "{}: call p99 {}, after it p99 {}, {} failed connections",
                s.label,
                ms(quantile(&s.change_call, 0.99)),
                ms(quantile(&s.change_after, 0.99)),
                s.change_failed
            )
        })
        .collect();
    writeln!(
        md,
        "\nDNS queries lost over all runs: {lost}. Backend changes not yet in force on \
         some node when the API call returned: {late} of {changes}. The change's API call \
         itself, the time from its return until the last node balanced to the new task, \
         and the probers' connections to the VIP that failed (refused, timed out or reset) \
         during the changes, per step: {}.\n",
        call_p99.join("; ")
    )?;
    let retried: Vec<String> = stages
        .iter()
        .map(|s| format!("{}: {} of {}", s.label, s.reach_retried, s.reach.len()))
        .collect();
    writeln!(
        md,
        "Attach→reachable samples whose first connect failed (refused, unreachable or \
         timed out after 20 ms; the next try comes 2 ms later), per step: {}.\n",
        retried.join("; ")
    )?;

    let parts: Vec<String> = stages
        .iter()
        .map(|s| {
            let mut by_p50: Vec<(&String, Duration)> = s
                .n2_phases
                .iter()
                .map(|(part, d)| (part, quantile(d, 0.5)))
                .collect();
            by_p50.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
            let top: Vec<String> = by_p50
                .iter()
                .take(4)
                .map(|(part, d)| format!("{part} {}", ms(*d)))
                .collect();
            let scopes: Vec<String> = s
                .n2_scopes
                .iter()
                .map(|(scope, n)| format!("{n}× {scope}"))
                .collect();
            format!(
                "{}: {} (visited: {})",
                s.label,
                top.join(", "),
                scopes.join(", ")
            )
        })
        .collect();
    writeln!(
        md,
        "n2's step, its four largest parts (p50 over the attach→reachable samples, \
         `netd status` → `reconcile.last_step_phases_ms`) and what it visited \
         (`last_step_scope`), per step: {}.\n",
        parts.join("; ")
    )?;

    // Kernel writes per change, by kind, on the task's node and another.
    writeln!(
        md,
        "**Kernel writes per change** (one attach→reachable sample: an attach and a \
         detach; `netd status` → `reconcile.kernel_writes` before and after the samples, \
         divided by their number), n1 (the task's node) / n2 (another node): the same \
         work at every size is what O(change) means.\n"
    )?;
    writeln!(
        md,
        "| step | services | {} |\n|---|---|{}",
        WRITE_KINDS.join(" | "),
        "---|".repeat(WRITE_KINDS.len())
    )?;
    for s in stages {
        let cells: Vec<String> = WRITE_KINDS
            .iter()
            .map(|k| {
                s.writes
                    .get(*k)
                    .map_or("–".into(), |(a, b)| format!("{a:.1} / {b:.1}"))
            })
            .collect();
        writeln!(
            md,
            "| {} | {} | {} |",
            s.label,
            thousands(s.services),
            cells.join(" | ")
        )?;
    }
    writeln!(md)?;

    writeln!(md, "## API operations\n")?;
    writeln!(
        md,
        "| step | operation | count | time | per second | call p50 | call p99 | call p50, first → last tenth |\n|---|---|---|---|---|---|---|---|"
    )?;
    for s in stages {
        for b in &s.batches {
            let tenth = (b.calls.len() / 10).max(1);
            let head = &b.calls[..tenth.min(b.calls.len())];
            let tail = &b.calls[b.calls.len().saturating_sub(tenth)..];
            writeln!(
                md,
                "| {} | {} | {} | {:.1} s | {:.1} | {} | {} | {} → {} |",
                s.label,
                b.what,
                thousands(b.count),
                b.took.as_secs_f64(),
                b.per_second(),
                ms(quantile(&b.calls, 0.5)),
                ms(quantile(&b.calls, 0.99)),
                ms(quantile(head, 0.5)),
                ms(quantile(tail, 0.5)),
            )?;
        }
    }

    writeln!(md, "\n## Memory and store\n")?;
    writeln!(
        md,
        "| step | services | netd RSS n1, n2, n3 | per 1,000 services (mean, vs the step \
         before) | netd CPU at rest n1, n2, n3 | etcd RSS | etcd keys under /netd/ | etcd db size (in use) |\n\
         |---|---|---|---|---|---|---|---|"
    )?;
    let mean_rss = |s: &Stage| mib(s.rss.iter().sum::<u64>()) / s.rss.len().max(1) as f64;
    let mut slopes = vec![];
    for (k, s) in stages.iter().enumerate() {
        let rss: Vec<String> = s.rss.iter().map(|r| format!("{:.1}", mib(*r))).collect();
        let slope = match k.checked_sub(1).map(|p| &stages[p]) {
            Some(p) if p.services != s.services => {
                let per = (mean_rss(s) - mean_rss(p))
                    / ((s.services as f64 - p.services as f64) / 1000.0);
                slopes.push((p.label.clone(), s.label.clone(), per));
                format!("{per:+.2} MiB")
            }
            _ => "–".into(),
        };
        writeln!(
            md,
            "| {} | {} | {} MiB | {slope} | {} | {:.1} MiB | {} | {:.1} MiB ({:.1} MiB) |",
            s.label,
            thousands(s.services),
            rss.join(", "),
            s.idle_cpu
                .iter()
                .map(|c| format!("{:.0}%", c * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
            mib(s.etcd_rss),
            thousands(s.etcd_keys as usize),
            s.etcd_db as f64 / 1048576.0,
            s.etcd_db_in_use as f64 / 1048576.0
        )?;
    }

    let checked: Vec<String> = stages
        .iter()
        .filter_map(|s| {
            let (took, parts) = s.n2_checked.as_ref()?;
            let parts: Vec<String> = parts
                .iter()
                .map(|(k, d)| format!("{k} {}", ms(*d)))
                .collect();
            Some(format!("{}: {} ({})", s.label, ms(*took), parts.join(", ")))
        })
        .collect();
    if !checked.is_empty() {
        writeln!(
            md,
            "\nn2's periodic checked step (`--resync`, which reads the node's kernel state \
             back) as seen at rest, and its four largest parts, per step: {}.",
            checked.join("; ")
        )?;
    }

    // Ratios at the biggest step against the first and the last.
    let big = stages
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| s.services)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let mut reading = vec![];
    if stages.len() > 1 && big != 0 {
        let b = &stages[big];
        let refs: Vec<&Stage> = if stages.len() > 2 && big != stages.len() - 1 {
            vec![&stages[0], &stages[stages.len() - 1]]
        } else {
            vec![&stages[0]]
        };
        writeln!(md, "\n## {} services against {}\n", b.label, refs[0].label)?;
        writeln!(
            md,
            "| figure | target | {} |\n|---|---|{}",
            refs.iter()
                .map(|r| format!("{} / {}", b.label, r.label))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(refs.len())
        )?;
        let d = |x: Duration| x.as_secs_f64();
        type Figure<'a> = (
            &'a str,
            &'a str,
            Box<dyn Fn(&Stage) -> f64>,
            Option<(bool, f64)>,
        );
        let figures: Vec<Figure> = vec![
            (
                "attach→reachable p50",
                "≤ 1.5×",
                Box::new(move |s: &Stage| d(quantile(&s.reach, 0.5))),
                Some((true, 1.5)),
            ),
            (
                "attach→reachable p99",
                "≤ 1.5×",
                Box::new(move |s: &Stage| d(quantile(&s.reach, 0.99))),
                Some((true, 1.5)),
            ),
            (
                "backend change p99",
                "–",
                Box::new(move |s: &Stage| d(quantile(&s.change, 0.99))),
                None,
            ),
            (
                "attach call p50",
                "–",
                Box::new(move |s: &Stage| d(quantile(&s.attach_call, 0.5))),
                None,
            ),
            (
                "task attaches/s (burst)",
                "–",
                Box::new(|s: &Stage| s.rate("burst attach").unwrap_or(0.0)),
                None,
            ),
            (
                "kernel writes per change on the task's node (all kinds)",
                "–",
                Box::new(|s: &Stage| s.writes.values().map(|(a, _)| a).sum()),
                None,
            ),
            (
                "kernel writes per change on another node (all kinds)",
                "–",
                Box::new(|s: &Stage| s.writes.values().map(|(_, b)| b).sum()),
                None,
            ),
            (
                "DNS queries/s, per unbound's in the same round",
                "≥ 0.95×",
                Box::new(|s: &Stage| s.dns_per_control()),
                Some((false, 0.95)),
            ),
            (
                "DNS queries/s",
                "–",
                Box::new(|s: &Stage| median(&s.dns)),
                None,
            ),
            (
                "VIP new connections/s, per straight to a task's in the same round",
                "≥ 0.95×",
                Box::new(|s: &Stage| s.vip_per_control()),
                Some((false, 0.95)),
            ),
            (
                "VIP new connections/s",
                "–",
                Box::new(|s: &Stage| median(&s.vip)),
                None,
            ),
        ];
        for (name, target, f, limit) in &figures {
            let cells: Vec<String> = refs
                .iter()
                .map(|r| {
                    let ratio = f(b) / f(r).max(1e-12);
                    let mark = limit.map_or(String::new(), |(at_most, l)| {
                        format!(
                            " ({})",
                            verdict(if at_most { ratio <= l } else { ratio >= l })
                        )
                    });
                    format!("{ratio:.2}×{mark}")
                })
                .collect();
            writeln!(md, "| {name} | {target} | {} |", cells.join(" | "))?;
            if limit.is_some() {
                reading.push(format!("{name} {}", cells.join(" and ")));
            }
        }
    }

    if let Some(n) = nft {
        writeln!(
            md,
            "\n## nftables (kube-proxy mode) against netd's eBPF at {} services\n",
            thousands(n.services)
        )?;
        writeln!(
            md,
            "In the client task `nc` on n1: one nftables table as kube-proxy's nftables mode \
             builds it, a verdict map `ip daddr . meta l4proto . th dport` → `goto` a chain \
             per service ({} entries: one per service), the measured service's chain \
             `dnat to numgen random mod {BACKENDS}` over probe0's {BACKENDS} whoami tasks, every \
             other chain a DNAT to an address nobody holds. The services' addresses lie in \
             the overlay's subnet above anything IPAM handed out (on-link, held by nobody). \
             Loaded with one `nft -f` in {:.2} s. The eBPF path is probe0's VIP, to the same \
             {BACKENDS} tasks, from the same client (netd's socket hooks see `nc`'s sockets \
             too, but the nftables addresses are no VIP, so they only miss one hash lookup). \
             New connections as above, {} s, {} rounds alternating, median round.\n",
            thousands(n.services),
            n.load_time.as_secs_f64(),
            o.seconds,
            o.rounds
        )?;
        let ratio = median(&n.ebpf) / median(&n.nft).max(1e-9);
        writeln!(
            md,
            "| path | new connections/s | rounds | backends reached (of {BACKENDS}, over {} connections) |\n|---|---|---|---|\n\
             | nftables, {} services | {:.0} | {} | {} |\n| netd eBPF, {} services | {:.0} | {} | {} |\n\n\
             **eBPF / nftables**: {ratio:.2}×.",
            4 * BACKENDS,
            thousands(n.services),
            median(&n.nft),
            n.nft.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "),
            n.nft_reached,
            thousands(n.services),
            median(&n.ebpf),
            n.ebpf.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "),
            n.ebpf_reached,
        )?;
        reading.push(format!(
            "through nftables with {} services as rules the same client made {:.0} new \
             connections/s against netd eBPF's {:.0} ({ratio:.2}×)",
            thousands(n.services),
            median(&n.nft),
            median(&n.ebpf)
        ));
    }

    if let Some(r) = restarted {
        restart_section(&mut md, r)?;
        reading.push(format!(
            "a kill -9 restart of n1's netd at {} services was answering again after {}, \
             {} of {} DNS queries were lost, the VIP load {} ({} connections), the new \
             netd counted {} kernel writes and {} lines of the kernel's listing changed",
            thousands(r.services),
            ms(r.down),
            r.dns_lost,
            r.dns_sent,
            if r.vip_failure.is_some() {
                "failed"
            } else {
                "had no failure"
            },
            r.vip_conns,
            r.writes
                .as_object()
                .map(|o| o.values().filter_map(|v| v.as_u64()).sum::<u64>())
                .unwrap_or(0),
            r.kernel_diff
        ));
    }

    writeln!(md, "\n## Phase times\n")?;
    writeln!(md, "| step | phase | time |\n|---|---|---|")?;
    for s in stages {
        for (what, d) in &s.phases {
            writeln!(md, "| {} | {what} | {:.1} s |", s.label, d.as_secs_f64())?;
        }
    }

    // The reading, from this run's figures.
    let creates: Vec<String> = stages
        .iter()
        .filter_map(|s| {
            s.rate("service create")
                .filter(|_| {
                    s.batches
                        .iter()
                        .any(|b| b.what == "service create" && b.count >= 100)
                })
                .map(|r| format!("{r:.0}/s growing to {} services", s.label))
        })
        .collect();
    let slope_text: Vec<String> = slopes
        .iter()
        .map(|(a, b, per)| format!("{per:+.2} MiB from {a} to {b}"))
        .collect();
    let last = stages.last().context("no steps")?;
    write!(
        md,
        "\n**Reading** (this run). {}. Service creates (batches of 100 or more): {}. netd's RSS per 1,000 \
         services (mean over the nodes): {}. At {} services etcd held {} keys under \
         /netd/.",
        if reading.is_empty() {
            "Only one step ran, so there is no ratio".to_string()
        } else {
            format!(
                "At the biggest step against the first and the last: {}",
                reading.join("; ")
            )
        },
        if creates.is_empty() {
            "none ran".to_string()
        } else {
            creates.join(", ")
        },
        if slope_text.is_empty() {
            "no change of size".to_string()
        } else {
            slope_text.join(", ")
        },
        thousands(stages[big].services),
        thousands(stages[big].etcd_keys as usize),
    )?;
    writeln!(
        md,
        " Back at {} services the nodes' netd held {} MiB.",
        thousands(last.services),
        last.rss
            .iter()
            .map(|r| format!("{:.1}", mib(*r)))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    Ok(md)
}
