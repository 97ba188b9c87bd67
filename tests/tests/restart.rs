//! A node's netd killed with -9 and started again while clients use everything it
//! serves there: names (dig over UDP and TCP in a task, as glibc asks), a VIP (new connections from a
//! task) and a published port (new connections from a host on the underlay). No request
//! may fail, and the new netd must find the node right: its first step writes nothing
//! to the kernel. On both datapaths. (The same at 10,000 services is a phase of
//! `netd-bench scale`.)
//!
//! What kill -9 can lose: a query or packet the killed netd had read but not yet
//! answered or forwarded. The clients' retries (a resolver's second try, TCP's
//! retransmission) reach the new netd, which is why the clients here wait as real ones
//! do instead of giving up at the first timeout.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use netd_lab::{diff_lines, dig_once, load, Lab, LEASE_TTL_SECS};

const PUBLISHED: u16 = 4567;
const OUTSIDE_HOST: u8 = 100;
/// Networks besides `front`, each with services and a task on the restarted node (so
/// the restart finds sandboxes, peers and VIPs of many networks).
const OTHER_NETWORKS: usize = 6;
const SERVICES_PER_NETWORK: usize = 8;
/// Longest a client waits to connect, and then for the answer (a resolver gives up on
/// a server after 10 s: 2 tries of 5 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the clients run, and most requests each makes.
const LOAD_LIMIT: Duration = Duration::from_secs(60);
const MAX_REQUESTS: usize = 5000;

/// One request's outcome: when it started, how long it took, what went wrong.
struct Outcome {
    start: Instant,
    took: Duration,
    error: Option<String>,
}

/// A client asking again and again until told to stop (the resolver's: `dig` in a task,
/// which the load engine does not speak).
struct Client {
    what: &'static str,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Outcome>>,
}

impl Client {
    fn start(
        what: &'static str,
        mut ask: impl FnMut(usize) -> Result<()> + Send + 'static,
    ) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + LOAD_LIMIT;
            let mut out = vec![];
            for i in 0..MAX_REQUESTS {
                if flag.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let start = Instant::now();
                let error = ask(i).err().map(|e| format!("{e:#}"));
                out.push(Outcome {
                    start,
                    took: start.elapsed(),
                    error,
                });
            }
            out
        });
        Client { what, stop, thread }
    }

    fn finish(self) -> Result<(&'static str, Vec<Outcome>)> {
        self.stop.store(true, Ordering::Relaxed);
        let out = self
            .thread
            .join()
            .map_err(|_| anyhow!("{} client panicked", self.what))?;
        Ok((self.what, out))
    }
}

/// HTTP GETs, each over a new connection, one after the other from `netns` to `addr`
/// (`netd-bench load`'s engine, recording every request's outcome).
fn http_client(what: &'static str, netns: &str, addr: SocketAddr) -> Result<HttpClient> {
    let running = load::start(&load::Spec {
        duration: LOAD_LIMIT,
        new_connections: true,
        netns: Some(netns.to_string()),
        timeout: REQUEST_TIMEOUT,
        max_requests: Some(MAX_REQUESTS as u64),
        record: true,
        ..load::Spec::new(load::Target::Http(addr, "/".into()))
    })?;
    Ok(HttpClient { what, running })
}

struct HttpClient {
    what: &'static str,
    running: load::Running,
}

impl HttpClient {
    fn finish(self) -> Result<(&'static str, Vec<Outcome>)> {
        let started = self.running.started();
        let report = self.running.stop();
        let secs = Duration::from_secs_f64;
        let outcomes = report
            .outcomes
            .into_iter()
            .map(|o| Outcome {
                start: started + secs(o.asked_s),
                took: secs(o.took_s),
                error: o.error,
            })
            .collect();
        Ok((self.what, outcomes))
    }
}

/// How long the killed netd stays down.
#[derive(Clone, Copy, PartialEq)]
enum Down {
    /// 1.5 s: every client asks while no netd runs.
    Briefly,
    /// Longer than the node's lease: the other node sees it lost (its tasks leave the
    /// picks) and then back. What runs in the kernel (the eBPF VIP, the XDP mesh, the
    /// overlay to the other node) must serve throughout; DNS, which netd answers itself,
    /// is not asked (a resolver gives up after 10 s).
    PastTheLease,
}

/// `encrypted`: `front` is an encrypted network, whose traffic between the nodes the
/// killed netd itself seals: `ndwg`'s queue, kept by the fd store, holds what the tasks
/// send meanwhile, and the new netd seals it.
fn restart_under_load(tag: &str, datapath: &str, down: Down, encrypted: bool) -> Result<()> {
    let mut lab = Lab::build(tag, 2, true, datapath)?;
    let mut front = vec!["network", "create", "front", "--subnet", "198.19.40.0/24"];
    if encrypted {
        front.extend(["--opt", "encrypted"]);
    }
    lab.cli(0, &front)?;
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
    for i in 0..4 {
        let node = lab.nodes[i % 2].name.clone();
        lab.attach_whoami(0, "web", &format!("w{i}"), Some(&node))?;
    }
    let cli = lab.add_client("cli", "front", 0)?;
    let n1 = lab.nodes[0].name.clone();
    for n in 0..OTHER_NETWORKS {
        let net = format!("net{n}");
        let subnet = format!("198.19.{}.0/24", 50 + n);
        lab.cli(0, &["network", "create", &net, "--subnet", &subnet])?;
        for s in 0..SERVICES_PER_NETWORK {
            lab.cli(
                0,
                &["service", "create", &format!("s{n}x{s}"), "--network", &net],
            )?;
        }
        let (_, path) = lab.add_task_netns(&format!("t{n}"))?;
        let task = format!("t{n}");
        lab.cli(
            0,
            &[
                "task",
                "attach",
                &format!("s{n}x0"),
                "--netns",
                &path,
                "--name",
                &task,
                "--node",
                &n1,
            ],
        )?;
    }
    let vip = lab.vip(0, "web", "front")?;
    let outside = lab.add_host("out", OUTSIDE_HOST)?;
    let node_ip: Ipv4Addr = lab.nodes[0].ip;
    let before = lab.kernel_snapshot(0)?;

    let dns = (down == Down::Briefly).then(|| {
        let (cli, vip) = (cli.clone(), vip.to_string());
        Client::start("dns", move |i| {
            let (answer, _) = dig_once(&cli, "web", i % 2 == 1);
            match answer {
                Ok(a) if a == vec![vip.clone()] => Ok(()),
                other => Err(anyhow!("{other:?}")),
            }
        })
    });
    let to_vip = http_client("vip", &cli, SocketAddr::from((vip, 80)))?;
    let to_mesh = http_client(
        "published port",
        &outside,
        SocketAddr::from((node_ip, PUBLISHED)),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    lab.stop_daemon(0, true)?;
    match down {
        Down::Briefly => std::thread::sleep(Duration::from_millis(1500)),
        Down::PastTheLease => {
            // Until the other node has seen the lease end (and for a second more).
            lab.await_node_status(1, &n1, "down", Duration::from_secs(LEASE_TTL_SECS + 10))?;
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    lab.start_daemon(0)?;
    let started = Instant::now();
    let status = lab.cli_json(0, &["status"])?;
    std::thread::sleep(Duration::from_millis(1000));
    if down == Down::PastTheLease {
        // Until the other node has it back, and the clients have gone through that.
        lab.await_node_status(1, &n1, "ready", Duration::from_secs(LEASE_TTL_SECS + 10))?;
        std::thread::sleep(Duration::from_secs(2));
    }
    let mut results = vec![to_vip.finish()?, to_mesh.finish()?];
    if let Some(dns) = dns {
        results.push(dns.finish()?);
    }

    for (what, outcomes) in &results {
        let failed: Vec<String> = outcomes
            .iter()
            .filter_map(|o| {
                o.error.as_ref().map(|e| {
                    let at = o
                        .start
                        .checked_duration_since(killed)
                        .map_or_else(|| format!("-{:?}", killed - o.start), |d| format!("+{d:?}"));
                    format!(
                        "asked at kill{at} (up at +{:?}), failed after {:?}: {e}",
                        started - killed,
                        o.took
                    )
                })
            })
            .collect();
        assert!(
            failed.is_empty(),
            "{what}: {} of {} requests failed across the restart: {failed:?}\n\
             the restarted netd's datapath: {}\nits log since the restart:\n{}",
            failed.len(),
            outcomes.len(),
            status["datapath"],
            log_since_restart(&lab)
        );
        // A request counts if it was in flight at some moment netd was down: the
        // userspace proxy's held sockets make one asked just before the kill wait out the
        // outage, so a sequential client may ask nothing new until netd is back.
        let while_down = outcomes
            .iter()
            .filter(|o| o.start < started && o.start + o.took > killed)
            .count();
        assert!(
            while_down > 0,
            "{what}: no request in flight while netd was down ({} in all)",
            outcomes.len()
        );
    }
    // The new netd changed nothing: it counts no kernel write, and the kernel reads back
    // as before (counters aside).
    let writes = &status["reconcile"]["kernel_writes"];
    assert!(
        writes
            .as_object()
            .is_some_and(|w| !w.is_empty() && w.values().all(|n| n == 0)),
        "the restarted netd wrote to the kernel: {writes}"
    );
    let after = lab.kernel_snapshot(0)?;
    assert!(
        after == before,
        "the restart changed the kernel:\n{}",
        diff_lines(&before, &after)
    );
    // Every local task's DNS came from the sockets the fd store kept; and ndwg, whose
    // queue held what the tasks sent for n2 meanwhile.
    assert_eq!(
        status["dns"]["handover"]["tasks_held"], status["dns"]["tasks_served"],
        "{status}"
    );
    assert_eq!(
        status["encryption"]["device_taken_over"], true,
        "the restarted netd opened ndwg afresh: {}",
        status["encryption"]
    );
    Ok(())
}

/// Node 0's netd log from its last start (what a failed run needs explained).
fn log_since_restart(lab: &Lab) -> String {
    let log = std::fs::read_to_string(lab.nodes[0].dir.join("netd.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.contains("descriptors kept across restarts"))
        .unwrap_or(0);
    lines[start..]
        .iter()
        .filter(|l| !l.contains("DEBUG"))
        .take(60)
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_killed_netd_restarts_under_load_without_a_failed_request_ebpf() -> Result<()> {
    restart_under_load("rke", "auto", Down::Briefly, false)
}

#[test]
fn a_killed_netd_restarts_under_load_without_a_failed_request_userspace() -> Result<()> {
    restart_under_load("rku", "userspace", Down::Briefly, false)
}

/// Over an encrypted network: the VIP's and the published port's connections to n2's
/// tasks cross sealed, by the netd that is killed.
#[test]
fn a_killed_netd_restarts_under_load_without_a_failed_request_encrypted() -> Result<()> {
    restart_under_load("rkw", "auto", Down::Briefly, true)
}

/// Down for longer than its lease: the kernel's datapaths (eBPF VIP, XDP mesh to both
/// nodes' tasks) serve every request while the other node counts it lost and back.
#[test]
fn a_killed_netd_down_past_its_lease_fails_no_request_of_the_kernel_datapath() -> Result<()> {
    restart_under_load("rkl", "auto", Down::PastTheLease, false)
}
