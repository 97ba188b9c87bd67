//! `netd-bench observe`: what serving `/metrics` and the live view costs the data plane.
//! DNS queries per second (dnsperf, one hot name) and VIP new connections per second
//! (the load engine) from a task, with nobody watching, against the same loads while a
//! Prometheus-like client scrapes `/metrics` of both nodes every second and a view is
//! open on node 1 (its event stream held, `/view/counters` read every second and
//! `/view/state` read again on every event, as the page does). Runs alternate in time and
//! the ratios are the medians of the pairs' ratios.
//!
//! The watcher is emulated with plain HTTP requests rather than a browser: a headless
//! Chromium on this 2-CPU machine would spend CPU of its own on rendering, which is
//! the browser's cost, not netd's.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netd_bench::load;
use netd_bench::report::{header, machine, median, write_results};
use netd_lab::{in_netns, Lab};

const HTTP_PORT: u16 = 9440;
const WATCHER_HOST: u8 = 103;
const MAX_CONNS: u64 = 2_000_000;

/// One GET over a new connection; the body's length.
fn get(addr: SocketAddr, path: &str) -> Result<usize> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: netd\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = vec![];
    s.read_to_end(&mut body)?;
    anyhow::ensure!(body.starts_with(b"HTTP/1.1 200"), "GET {path}: not 200");
    Ok(body.len())
}

/// What the watcher did in one run.
#[derive(Default)]
struct Watched {
    scrapes: AtomicU64,
    scrape_bytes: AtomicU64,
    view_reads: AtomicU64,
    events: AtomicU64,
    errors: AtomicU64,
}

/// Scrapes `metrics` (every node's) every second and keeps a view open on `view` until
/// `stop`, from namespace `netns`.
fn watch(
    netns: &str,
    metrics: Vec<SocketAddr>,
    view: SocketAddr,
    stop: Arc<AtomicBool>,
    w: Arc<Watched>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = vec![];
    // Prometheus: every target every second.
    {
        let (netns, stop, w) = (netns.to_string(), stop.clone(), w.clone());
        threads.push(std::thread::spawn(move || {
            let _ = in_netns(&netns, move || {
                while !stop.load(Ordering::Relaxed) {
                    let tick = Instant::now();
                    for m in &metrics {
                        match get(*m, "/metrics") {
                            Ok(n) => {
                                w.scrapes.fetch_add(1, Ordering::Relaxed);
                                w.scrape_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(_) => {
                                w.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
                }
                Ok(())
            });
        }));
    }
    // The page: its counters every second, its state on every event.
    {
        let (netns, stop, w) = (netns.to_string(), stop.clone(), w.clone());
        threads.push(std::thread::spawn(move || {
            let _ = in_netns(&netns, move || {
                let mut events = TcpStream::connect(view)?;
                events.set_read_timeout(Some(Duration::from_millis(200)))?;
                write!(events, "GET /view/events HTTP/1.1\r\nHost: netd\r\n\r\n")?;
                let _ = get(view, "/view/state");
                let mut next = Instant::now();
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        match get(view, "/view/counters") {
                            Ok(_) => w.view_reads.fetch_add(1, Ordering::Relaxed),
                            Err(_) => w.errors.fetch_add(1, Ordering::Relaxed),
                        };
                        next += Duration::from_secs(1);
                    }
                    if let Ok(n) = events.read(&mut buf) {
                        let got = buf[..n].windows(6).filter(|x| x == b"data: ").count();
                        if got > 0 {
                            w.events.fetch_add(got as u64, Ordering::Relaxed);
                            let _ = get(view, "/view/state");
                            w.view_reads.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(())
            });
        }));
    }
    threads
}

struct Round {
    dns_qps: f64,
    vip_cps: f64,
}

pub fn run(seconds: u64, rounds: usize, out: &Path) -> Result<()> {
    let http = format!("0.0.0.0:{HTTP_PORT}");
    let mut lab = Lab::cluster_with("bob", 2, &["--http", &http])?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.70.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    for i in 0..4 {
        let node = lab.nodes[i % 2].name.clone();
        lab.attach_whoami(0, "web", &format!("w{i}"), Some(&node))?;
    }
    let client = lab.add_client("client", "front", 0)?;
    let vip = SocketAddr::from((lab.vip(0, "web", "front")?, 80));
    let watcher = lab.add_host("watcher", WATCHER_HOST)?;
    let metrics: Vec<SocketAddr> = lab
        .nodes
        .iter()
        .map(|n| SocketAddr::from((n.ip, HTTP_PORT)))
        .collect();
    let view = metrics[0];
    let queries = lab.dir.join("observe-queries.txt");
    std::fs::write(&queries, "web A\n")?;

    let mut plain = vec![];
    let mut watched = vec![];
    let mut totals = Watched::default();
    for round in 0..rounds {
        // Which goes first alternates, so a drift within a round favours neither.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for observed in order {
            eprintln!("round {}: observed {observed}", round + 1);
            let stop = Arc::new(AtomicBool::new(false));
            let w = Arc::new(Watched::default());
            let threads = if observed {
                watch(&watcher, metrics.clone(), view, stop.clone(), w.clone())
            } else {
                vec![]
            };
            let dns = crate::dns::dnsperf(&lab, &client, "127.0.0.11", &queries, seconds)?;
            let d = Duration::from_secs(seconds);
            let vip_run = load::new_connections(&client, vip, 2, d, MAX_CONNS)
                .context("VIP new connections")?;
            stop.store(true, Ordering::Relaxed);
            for t in threads {
                let _ = t.join();
            }
            for (total, one) in [
                (&mut totals.scrapes, &w.scrapes),
                (&mut totals.scrape_bytes, &w.scrape_bytes),
                (&mut totals.view_reads, &w.view_reads),
                (&mut totals.events, &w.events),
                (&mut totals.errors, &w.errors),
            ] {
                *total.get_mut() += one.load(Ordering::Relaxed);
            }
            let r = Round {
                dns_qps: dns.qps,
                vip_cps: vip_run.per_second(),
            };
            if observed {
                watched.push(r);
            } else {
                plain.push(r);
            }
        }
    }
    let ratio = |f: fn(&Round) -> f64| -> f64 {
        let rs: Vec<f64> = watched
            .iter()
            .zip(&plain)
            .map(|(w, p)| f(w) / f(p).max(1e-9))
            .collect();
        median(&rs)
    };
    let (dns_ratio, vip_ratio) = (ratio(|r| r.dns_qps), ratio(|r| r.vip_cps));
    let mid = |rs: &[Round], f: fn(&Round) -> f64| -> f64 {
        median(&rs.iter().map(f).collect::<Vec<_>>())
    };
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let scrapes = get(&totals.scrapes);

    let mut md = header("What watching costs: /metrics and the live view");
    writeln!(
        md,
        "Machine: {}. Two lab nodes on etcd, each `netd daemon --http 0.0.0.0:{HTTP_PORT}`; \
         service `web` with 4 whoami tasks over both nodes; a client task on node 1. \
         Each round runs dnsperf (one hot name, `web A`, {seconds} s) and then {seconds} s of \
         VIP new connections (2 client threads, one GET each), once with nobody watching \
         and once while a watcher on the underlay scrapes `/metrics` of both nodes every \
         second and keeps node 1's view open (the event stream held, `/view/counters` \
         every second, `/view/state` on every event: what the page asks). {rounds} rounds, \
         the two runs of a round back to back, which goes first alternating; each ratio is \
         the median of the rounds' ratios.\n",
        machine()
    )?;
    writeln!(
        md,
        "| | DNS queries/s (median) | VIP new connections/s (median) |\n|---|---|---|"
    )?;
    writeln!(
        md,
        "| nobody watching | {:.0} | {:.0} |",
        mid(&plain, |r| r.dns_qps),
        mid(&plain, |r| r.vip_cps)
    )?;
    writeln!(
        md,
        "| scraped every second, view open | {:.0} | {:.0} |",
        mid(&watched, |r| r.dns_qps),
        mid(&watched, |r| r.vip_cps)
    )?;
    writeln!(
        md,
        "| **watched / nobody** (target ≥ 0.97×) | **{dns_ratio:.3}×** | **{vip_ratio:.3}×** |\n"
    )?;
    writeln!(
        md,
        "The watcher made {scrapes} scrapes ({:.0} bytes each on average), {} view reads \
         and saw {} events; {} of its requests failed.\n",
        get(&totals.scrape_bytes) as f64 / scrapes.max(1) as f64,
        get(&totals.view_reads),
        get(&totals.events),
        get(&totals.errors),
    )?;
    let verdict = |r: f64| if r >= 0.97 { "meets" } else { "misses" };
    writeln!(
        md,
        "**Reading.** In this run, watching changed DNS queries/s by a factor of \
         {dns_ratio:.3} ({} the 0.97× target) and VIP new connections/s by {vip_ratio:.3} \
         ({} it). A scrape reads counters that already exist (eBPF maps, the DNS's \
         atomics, one `nft` counter) and renders a few kilobytes; the view's reads are \
         the same walk of the view's state; none of it is on a packet's path, so what \
         it costs is CPU time taken from the load's share of the 2 CPUs.",
        verdict(dns_ratio),
        verdict(vip_ratio)
    )?;
    write_results(out, &md, None)
}
