//! A bounded load for users and for the lab's tests (`netd-bench load`): requests to a
//! published port, a VIP or any address, from a namespace if asked, counting every
//! failure by kind instead of stopping at the first, and which backend answered each
//! request (the `Hostname:` of a whoami-style answer, when there is one).
//!
//! Targets: `tcp://ADDR:PORT` (a request is a connect), `http://ADDR:PORT[/PATH]` (a GET,
//! over keep-alive connections unless `new_connections`), `udp://ADDR:PORT` (a datagram
//! and its answer, from one socket per connection).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The longest a load may run, whatever it is asked.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// How long a connect or an answer may take before it counts as a timeout, unless the
/// spec says otherwise.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// Latencies kept for the percentiles at most (a uniform sample beyond).
const MAX_SAMPLES: usize = 200_000;
/// Outcomes a recording run keeps at most (the first ones asked on each connection).
const MAX_OUTCOMES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Http(SocketAddr, String),
    Udp(SocketAddr),
}

impl std::str::FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Target> {
        let (scheme, rest) = s
            .split_once("://")
            .with_context(|| format!("{s:?}: expected tcp://, http:// or udp://ADDR:PORT"))?;
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("{addr:?} is not IP:PORT"))?;
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            bail!("path {path:?} has spaces or control characters");
        }
        match scheme {
            "tcp" => Ok(Target::Tcp(addr)),
            "http" => Ok(Target::Http(addr, path.to_string())),
            "udp" => Ok(Target::Udp(addr)),
            other => bail!("unknown scheme {other:?}: tcp, http or udp"),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub target: Target,
    /// Concurrent connections (UDP: sockets), each its own thread.
    pub connections: usize,
    /// Requests per second over all connections (None: as fast as answers come).
    pub rate: Option<f64>,
    pub duration: Duration,
    /// A new TCP connection per request (HTTP); TCP targets always connect anew.
    pub new_connections: bool,
    /// The network namespace (under /run/netns) the load leaves from.
    pub netns: Option<String>,
    /// How long a connect or an answer may take before the request counts as timed out
    /// (a test of a restart waits as long as a resolver would).
    pub timeout: Duration,
    /// The most requests the run makes, shared evenly by the connections (None: as
    /// many as the duration allows).
    pub max_requests: Option<u64>,
    /// Connection `i` goes to `spread[i % len]` instead of the target's address: one
    /// load over several servers (the tasks a balancer would spread it over, to compare
    /// with it). Empty: every connection to the target.
    pub spread: Vec<SocketAddr>,
    /// The client ends each new connection itself, with a reset, right after its answer
    /// (SO_LINGER 0): neither side keeps a TIME_WAIT, so thousands of connections a
    /// second do not use up the client's ports.
    pub reset_close: bool,
    /// Keep every request's outcome in the report ([`Report::outcomes`]), for a test
    /// that asks which requests were in flight at a given moment.
    pub record: bool,
}

impl Spec {
    /// One keep-alive connection to `target` for 10 s, with the default timeout.
    pub fn new(target: Target) -> Spec {
        Spec {
            target,
            connections: 1,
            rate: None,
            duration: Duration::from_secs(10),
            new_connections: false,
            netns: None,
            timeout: TIMEOUT,
            max_requests: None,
            spread: vec![],
            reset_close: false,
            record: false,
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Failure {
    Refused,
    Reset,
    Timeout,
    Other,
}

impl Failure {
    fn of(e: &std::io::Error) -> Failure {
        match e.kind() {
            ErrorKind::ConnectionRefused => Failure::Refused,
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => Failure::Reset,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::Timeout,
            _ => Failure::Other,
        }
    }
}

/// What a run (or the run so far) did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub target: String,
    pub requests: u64,
    pub elapsed_s: f64,
    pub per_second: f64,
    pub latency_ms: Latency,
    pub failures: BTreeMap<Failure, u64>,
    /// Failures by kind in each second of the run that had any, by when the request
    /// was asked (second -> kind -> n).
    pub failures_per_second: BTreeMap<u64, BTreeMap<Failure, u64>>,
    /// Answers per backend (the answer's `Hostname:`).
    pub backends: BTreeMap<String, u64>,
    /// Answers per backend in each second of the run, by when the request was asked
    /// (second -> backend -> n): where the load went as tasks came and went.
    pub backends_per_second: BTreeMap<u64, BTreeMap<String, u64>>,
    pub first_failure: Option<String>,
    /// Every request's outcome, in the order asked (only when the spec records them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outcomes: Vec<Outcome>,
    /// The latency sample the percentiles come from (for a bench's own statistics).
    #[serde(skip)]
    pub samples: Vec<Duration>,
}

/// One request: when it was asked (seconds since the start), how long it took, and
/// why it failed if it did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub asked_s: f64,
    pub took_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Report {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// An error naming how many of the run's requests failed, when, and the first
    /// failure, if any did (what every zero-failure test asserts).
    pub fn no_failures(&self, what: &str) -> anyhow::Result<()> {
        if self.failed() > 0 {
            anyhow::bail!(
                "{what}: {} of {} requests failed ({:?} by second); the first: {}",
                self.failed(),
                self.failed() + self.requests,
                self.failures_per_second,
                self.first_failure.as_deref().unwrap_or("?")
            );
        }
        Ok(())
    }

    /// Failures by kind as text (`refused 2, timeout 1`), empty without any.
    pub fn kinds(by: &BTreeMap<Failure, u64>) -> String {
        let kinds: Vec<String> = by.iter().map(|(k, n)| format!("{k:?} {n}")).collect();
        kinds.join(", ").to_lowercase()
    }

    /// Answers per backend in the whole seconds of the run within `from..to` (seconds
    /// since the start, by when the request was asked).
    pub fn backends_within(&self, from: f64, to: f64) -> BTreeMap<String, u64> {
        let mut by = BTreeMap::new();
        for (s, m) in &self.backends_per_second {
            if (*s as f64) >= from && (*s + 1) as f64 <= to {
                for (b, n) in m {
                    *by.entry(b.clone()).or_insert(0) += n;
                }
            }
        }
        by
    }

    /// Failures of the requests asked in the whole seconds from `from` (since the
    /// start) on.
    pub fn failed_from(&self, from: f64) -> u64 {
        self.failures_per_second
            .iter()
            .filter(|(s, _)| **s as f64 >= from)
            .flat_map(|(_, by)| by.values())
            .sum()
    }
}

/// What the workers share: each worker counts into its own tally (no lock is contended
/// at tens of thousands of requests a second); a report merges them.
struct Shared {
    start: Instant,
    stop: Arc<AtomicBool>,
    until: Instant,
    tallies: Vec<Mutex<Tally>>,
}

#[derive(Default)]
struct Tally {
    requests: u64,
    latencies: Vec<Duration>,
    seen: u64,
    failures: BTreeMap<Failure, u64>,
    per_second: BTreeMap<u64, BTreeMap<Failure, u64>>,
    backends: BTreeMap<String, u64>,
    backends_per_second: BTreeMap<u64, BTreeMap<String, u64>>,
    first: Option<(Instant, String)>,
    outcomes: Vec<Outcome>,
    /// When the worker ended (None: still running).
    ended: Option<Instant>,
}

/// One worker's handle on the shared state.
struct Counter<'a> {
    shared: &'a Shared,
    tally: &'a Mutex<Tally>,
    /// Latencies this worker keeps at most (its share of `MAX_SAMPLES`).
    samples: usize,
    record: bool,
}

impl Counter<'_> {
    fn done(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed) || Instant::now() >= self.shared.until
    }

    fn second(&self, asked: Instant) -> u64 {
        asked.saturating_duration_since(self.shared.start).as_secs()
    }

    fn outcome(
        &self,
        t: &mut Tally,
        asked: Instant,
        took: Duration,
        failed: Option<(Failure, &str)>,
    ) {
        if self.record && t.outcomes.len() < MAX_OUTCOMES / self.shared.tallies.len() {
            t.outcomes.push(Outcome {
                asked_s: asked
                    .saturating_duration_since(self.shared.start)
                    .as_secs_f64(),
                took_s: took.as_secs_f64(),
                failure: failed.map(|(k, _)| k),
                error: failed.map(|(_, e)| e.to_string()),
            });
        }
    }

    fn ok(&self, asked: Instant, backend: Option<String>) {
        let took = asked.elapsed();
        let second = self.second(asked);
        let Ok(mut t) = self.tally.lock() else { return };
        t.requests += 1;
        t.seen += 1;
        if t.latencies.len() < self.samples {
            t.latencies.push(took);
        } else {
            // Reservoir sampling: every latency has the same chance to be kept.
            let seen = t.seen;
            let i = (seen.wrapping_mul(0x9E37_79B9_7F4A_7C15) % seen) as usize;
            if i < self.samples {
                t.latencies[i] = took;
            }
        }
        if let Some(b) = backend {
            *t.backends_per_second
                .entry(second)
                .or_default()
                .entry(b.clone())
                .or_insert(0) += 1;
            *t.backends.entry(b).or_insert(0) += 1;
        }
        self.outcome(&mut t, asked, took, None);
    }

    fn failed(&self, asked: Instant, kind: Failure, what: String) {
        let took = asked.elapsed();
        let second = self.second(asked);
        let Ok(mut t) = self.tally.lock() else { return };
        *t.failures.entry(kind).or_insert(0) += 1;
        *t.per_second
            .entry(second)
            .or_default()
            .entry(kind)
            .or_insert(0) += 1;
        self.outcome(&mut t, asked, took, Some((kind, &what)));
        t.first.get_or_insert((asked, what));
    }

    fn end(&self) {
        if let Ok(mut t) = self.tally.lock() {
            t.ended = Some(Instant::now());
        }
    }
}

/// `into`'s counts plus `from`'s.
fn add<K: Ord + Clone>(into: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>) {
    for (k, n) in from {
        *into.entry(k.clone()).or_insert(0) += n;
    }
}

impl Shared {
    fn report(&self, target: &str) -> Report {
        let mut all = Tally::default();
        let mut ended = Some(self.start);
        for tally in &self.tallies {
            let Ok(t) = tally.lock() else { continue };
            all.requests += t.requests;
            all.latencies.extend_from_slice(&t.latencies);
            add(&mut all.failures, &t.failures);
            add(&mut all.backends, &t.backends);
            for (s, by) in &t.per_second {
                add(all.per_second.entry(*s).or_default(), by);
            }
            for (s, by) in &t.backends_per_second {
                add(all.backends_per_second.entry(*s).or_default(), by);
            }
            if let Some(f) = &t.first {
                if all.first.as_ref().is_none_or(|(at, _)| f.0 < *at) {
                    all.first = Some(f.clone());
                }
            }
            all.outcomes.extend_from_slice(&t.outcomes);
            ended = ended.zip(t.ended).map(|(a, b)| a.max(b));
        }
        // The run's time ends with its last worker (a report after the end does not
        // stretch it).
        let elapsed = ended
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.start)
            .as_secs_f64();
        all.outcomes.sort_by(|a, b| a.asked_s.total_cmp(&b.asked_s));
        let samples = all.latencies.clone();
        let mut lat = all.latencies;
        lat.sort();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            lat[i].as_secs_f64() * 1000.0
        };
        Report {
            target: target.to_string(),
            requests: all.requests,
            elapsed_s: elapsed,
            per_second: all.requests as f64 / elapsed.max(1e-9),
            latency_ms: Latency {
                p50: pct(0.50),
                p99: pct(0.99),
                max: lat.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            },
            failures: all.failures,
            failures_per_second: all.per_second,
            backends: all.backends,
            backends_per_second: all.backends_per_second,
            first_failure: all.first.map(|(_, w)| w),
            outcomes: all.outcomes,
            samples,
        }
    }
}

/// A running load: [`Running::stop`] ends it early and gives the report.
pub struct Running {
    shared: Arc<Shared>,
    target: String,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// The report so far (for a progress line).
    pub fn progress(&self) -> Report {
        self.shared.report(&self.target)
    }

    /// When the load began: the zero of the report's seconds.
    pub fn started(&self) -> Instant {
        self.shared.start
    }

    pub fn finished(&self) -> bool {
        self.workers.iter().all(|w| w.is_finished())
    }

    /// Stops the workers (each ends its request under way) and reports.
    pub fn stop(self) -> Report {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// Waits for the run's own end (its duration or request count) and reports.
    pub fn wait(self) -> Report {
        for w in self.workers {
            let _ = w.join();
        }
        self.shared.report(&self.target)
    }
}

/// How a worker asks: its address, and the spec's settings.
#[derive(Clone)]
struct Asking {
    target: Target,
    fresh: bool,
    reset_close: bool,
    timeout: Duration,
    gap: Option<Duration>,
    /// Requests this worker makes at most.
    max: u64,
}

/// Starts `spec` on its threads; it ends by itself after its duration.
pub fn start(spec: &Spec) -> Result<Running> {
    if spec.connections == 0 || spec.connections > 10_000 {
        bail!("--connections must be 1 to 10000");
    }
    if spec.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of requests per second");
    }
    if spec.timeout.is_zero() {
        bail!("--timeout must be more than 0");
    }
    let duration = spec.duration.min(MAX_DURATION);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        start,
        stop: Arc::new(AtomicBool::new(false)),
        until: start + duration,
        tallies: (0..spec.connections)
            .map(|_| Mutex::new(Tally::default()))
            .collect(),
    });
    // Each connection's pace and share: the rate and the count spread over them.
    let n = spec.connections as u64;
    let gap = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.connections as f64 / r));
    // Opened once: a namespace that cannot be opened fails the start, before any worker.
    let netns = match &spec.netns {
        Some(ns) => Some(Arc::new(
            std::fs::File::open(format!("/run/netns/{ns}"))
                .with_context(|| format!("open netns {ns}"))?,
        )),
        None => None,
    };
    let mut workers = vec![];
    for i in 0..spec.connections {
        let target = match spec.spread.get(i % spec.spread.len().max(1)) {
            Some(a) => spec.target.to(*a),
            None => spec.target.clone(),
        };
        let asking = Asking {
            target,
            fresh: spec.new_connections,
            reset_close: spec.reset_close,
            timeout: spec.timeout,
            gap,
            // The first `max % n` connections make one more.
            max: spec
                .max_requests
                .map_or(u64::MAX, |m| m / n + u64::from((i as u64) < m % n)),
        };
        let shared = shared.clone();
        let samples = MAX_SAMPLES / spec.connections;
        let record = spec.record;
        let file = netns.clone();
        workers.push(std::thread::spawn(move || {
            let counter = Counter {
                shared: &shared,
                tally: &shared.tallies[i],
                samples,
                record,
            };
            if let Some(f) = file {
                use std::os::fd::AsFd;
                let entered = nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
                if let Err(e) = entered {
                    let what = format!("enter the namespace: {e}");
                    counter.failed(Instant::now(), Failure::Other, what);
                    counter.end();
                    return;
                }
            }
            worker(&counter, &asking);
            counter.end();
        }));
    }
    Ok(Running {
        shared,
        target: describe(&spec.target),
        workers,
    })
}

/// Runs `spec` to its end, calling `progress` about every second.
pub fn run(spec: &Spec, mut progress: impl FnMut(&Report)) -> Result<Report> {
    let running = start(spec)?;
    let mut next = Instant::now() + Duration::from_secs(1);
    while !running.finished() {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next {
            progress(&running.progress());
            next += Duration::from_secs(1);
        }
    }
    Ok(running.wait())
}

pub fn describe(t: &Target) -> String {
    match t {
        Target::Tcp(a) => format!("tcp://{a}"),
        Target::Http(a, p) => format!("http://{a}{p}"),
        Target::Udp(a) => format!("udp://{a}"),
    }
}

impl Target {
    /// The same request to another address.
    fn to(&self, a: SocketAddr) -> Target {
        match self {
            Target::Tcp(_) => Target::Tcp(a),
            Target::Http(_, p) => Target::Http(a, p.clone()),
            Target::Udp(_) => Target::Udp(a),
        }
    }
}

/// One connection's loop.
fn worker(counter: &Counter, how: &Asking) {
    let mut conn: Option<TcpStream> = None;
    let mut udp: Option<UdpSocket> = None;
    let mut buf = Vec::with_capacity(4096);
    let mut next = Instant::now();
    let mut asked_n = 0;
    while !counter.done() && asked_n < how.max {
        if let Some(g) = how.gap {
            // Paced: wait for the next request's time, but not past the run's end (nor
            // much past a stop), and look again before asking.
            let now = Instant::now();
            if next > now {
                let wake = next.min(counter.shared.until);
                std::thread::sleep((wake - now).min(Duration::from_millis(100)));
                continue;
            }
            next = next.max(now) + g;
        }
        asked_n += 1;
        let t = Instant::now();
        let asked = match &how.target {
            Target::Tcp(a) => connect(*a, how.timeout).and_then(|s| closed(s, how.reset_close)),
            Target::Http(a, path) => http(&mut conn, *a, path, how, &mut buf),
            Target::Udp(a) => datagram(&mut udp, *a, how.timeout, &mut buf),
        };
        match asked {
            Ok(backend) => counter.ok(t, backend),
            Err(e) => {
                // Over a new connection or socket next time: a late answer to this one
                // must not pass for the next one's.
                conn = None;
                udp = None;
                let kind = e
                    .downcast_ref::<std::io::Error>()
                    .map_or(Failure::Other, Failure::of);
                counter.failed(t, kind, format!("{e:#}"));
            }
        }
    }
}

/// `op` again while a signal interrupts it (EINTR): the load's own process gets signals
/// (its children ending), and an interrupted call is not a failed request.
fn retrying<T>(mut op: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn connect(a: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = retrying(|| TcpStream::connect_timeout(&a, timeout))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Closes `s`, with a reset if `reset` (see [`Spec::reset_close`]).
fn closed(s: TcpStream, reset: bool) -> Result<Option<String>> {
    if reset {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger)
            .context("SO_LINGER 0")?;
    }
    Ok(None)
}

/// The `Hostname:` of a whoami-style answer.
fn backend_of(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Hostname: "))
        .map(|h| h.trim().to_string())
}

/// One GET; the connection stays for the next unless `fresh`. A fresh one the server
/// closes after its answer, unless the client resets it itself (`reset_close`).
fn http(
    conn: &mut Option<TcpStream>,
    a: SocketAddr,
    path: &str,
    how: &Asking,
    buf: &mut Vec<u8>,
) -> Result<Option<String>> {
    let mut s = match conn.take() {
        Some(s) => s,
        None => connect(a, how.timeout)?,
    };
    let fresh = how.fresh;
    let close = if fresh && !how.reset_close {
        "close"
    } else {
        "keep-alive"
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {a}\r\nUser-Agent: netd-bench\r\nConnection: {close}\r\n\r\n"
    )?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    let (head, len) = loop {
        let n = retrying(|| s.read(&mut chunk))?;
        if n == 0 {
            return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                .context("an answer without content-length")?;
            break (h + 4, len);
        }
        if buf.len() > 64 * 1024 {
            bail!("an answer head over 64 KiB");
        }
    };
    while buf.len() < head + len {
        let n = retrying(|| s.read(&mut chunk))?;
        if n == 0 {
            return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = std::str::from_utf8(&buf[..head])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(0);
    if !(200..400).contains(&status) {
        bail!("status {status}");
    }
    let backend = backend_of(&buf[head..head + len]);
    if fresh {
        closed(s, how.reset_close)?;
    } else {
        *conn = Some(s);
    }
    Ok(backend)
}

/// One datagram and its answer.
fn datagram(
    sock: &mut Option<UdpSocket>,
    a: SocketAddr,
    timeout: Duration,
    buf: &mut Vec<u8>,
) -> Result<Option<String>> {
    if sock.is_none() {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(timeout))?;
        *sock = Some(s);
    }
    let Some(s) = sock.as_ref() else {
        bail!("no socket");
    };
    retrying(|| s.send_to(b"netd-bench", a))?;
    buf.resize(2048, 0);
    let (n, _) = retrying(|| s.recv_from(buf))?;
    Ok(backend_of(&buf[..n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_or_say_why_not() {
        let a: SocketAddr = "198.18.0.1:80".parse().unwrap();
        assert_eq!(
            "tcp://198.18.0.1:80".parse::<Target>().unwrap(),
            Target::Tcp(a)
        );
        assert_eq!(
            "http://198.18.0.1:80/x?y=1".parse::<Target>().unwrap(),
            Target::Http(a, "/x?y=1".into())
        );
        assert_eq!(
            "http://198.18.0.1:80".parse::<Target>().unwrap(),
            Target::Http(a, "/".into())
        );
        assert_eq!(
            "udp://198.18.0.1:80".parse::<Target>().unwrap(),
            Target::Udp(a)
        );
        for bad in [
            "198.18.0.1:80",
            "ftp://198.18.0.1:80",
            "tcp://host:80",
            "http://198.18.0.1:80/a b",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn io_errors_are_told_apart() {
        use std::io::Error;
        assert_eq!(
            Failure::of(&Error::from(ErrorKind::ConnectionRefused)),
            Failure::Refused
        );
        assert_eq!(
            Failure::of(&Error::from(ErrorKind::ConnectionReset)),
            Failure::Reset
        );
        assert_eq!(
            Failure::of(&Error::from(ErrorKind::UnexpectedEof)),
            Failure::Reset
        );
        assert_eq!(
            Failure::of(&Error::from(ErrorKind::WouldBlock)),
            Failure::Timeout
        );
        assert_eq!(
            Failure::of(&Error::from(ErrorKind::TimedOut)),
            Failure::Timeout
        );
    }

    /// A real server on loopback: answers are counted by backend, a closed port by kind.
    #[test]
    fn a_load_counts_answers_by_backend_and_failures_by_kind() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in server.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = crate::whoami::serve_http(conn, "w1");
                });
            }
        });
        let spec = |target| Spec {
            connections: 2,
            rate: Some(200.0),
            duration: Duration::from_millis(500),
            ..Spec::new(target)
        };
        let r = run(&spec(Target::Http(addr, "/".into())), |_| {}).unwrap();
        assert!(r.requests > 10, "{r:?}");
        assert_eq!(r.failed(), 0, "{r:?}");
        assert_eq!(r.backends.get("w1").copied(), Some(r.requests));
        // A port nobody listens on: every connect refused, counted, none aborts the run.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let r = run(&spec(Target::Tcp(gone)), |_| {}).unwrap();
        assert_eq!(r.requests, 0);
        assert!(
            r.failures.get(&Failure::Refused).copied().unwrap_or(0) > 10,
            "{r:?}"
        );
        assert!(!r.failures_per_second.is_empty());
    }

    /// A whoami server on loopback answering as `name`.
    fn whoami(name: &'static str) -> SocketAddr {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in server.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = crate::whoami::serve_http(conn, name);
                });
            }
        });
        addr
    }

    /// A count bound ends the run at exactly that many requests, spread over the
    /// addresses given (connection i to address i mod n), each connection reset by the
    /// client; a recording run keeps each request's outcome in the order asked.
    #[test]
    fn a_bounded_spread_run_makes_its_count_over_every_address_and_records_it() {
        let (a, b) = (whoami("a"), whoami("b"));
        let spec = Spec {
            connections: 3,
            duration: Duration::from_secs(20),
            new_connections: true,
            max_requests: Some(100),
            spread: vec![a, b],
            reset_close: true,
            record: true,
            ..Spec::new(Target::Http(a, "/".into()))
        };
        let r = run(&spec, |_| {}).unwrap();
        assert_eq!((r.requests, r.failed()), (100, 0), "{r:?}");
        // Connections 0 and 2 to a (34 + 33), connection 1 to b (33).
        assert_eq!(r.backends.get("a"), Some(&67), "{:?}", r.backends);
        assert_eq!(r.backends.get("b"), Some(&33), "{:?}", r.backends);
        assert_eq!(r.outcomes.len(), 100);
        assert!(r.outcomes.windows(2).all(|w| w[0].asked_s <= w[1].asked_s));
        assert!(r.outcomes.iter().all(|o| o.failure.is_none()));
        assert_eq!(r.samples.len(), 100);
    }

    /// A server that takes the connection and never answers: each request counts as a
    /// timeout after the spec's timeout, recorded with its error.
    #[test]
    fn a_silent_server_times_out_after_the_specs_timeout() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = vec![];
            for conn in server.incoming().flatten() {
                held.push(conn);
            }
        });
        let spec = Spec {
            timeout: Duration::from_millis(200),
            max_requests: Some(2),
            record: true,
            ..Spec::new(Target::Http(addr, "/".into()))
        };
        let r = run(&spec, |_| {}).unwrap();
        assert_eq!(r.failures.get(&Failure::Timeout), Some(&2), "{r:?}");
        assert_eq!(r.outcomes.len(), 2);
        for o in &r.outcomes {
            assert_eq!(o.failure, Some(Failure::Timeout));
            assert!(o.took_s >= 0.2, "{o:?}");
            assert!(o.error.is_some());
        }
    }
}
