//! Health checks (`service create --health-cmd`). The node that runs a task probes it
//! from inside the task's own namespace, at the task's address on its first service
//! network: what a client on that network reaches, without any firewall of the node in
//! between. The verdict goes to the store (`taskhealth/ID`) only when it changes, and
//! every node's tables follow it like any change: an unhealthy task leaves new picks and
//! DNS answers everywhere (see [`crate::state::State::in_service`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::model::{self, HealthCheck, Probe, Task, GWBRIDGE};
use crate::netns::{self, Netns};
use crate::state::{self, State, TaskHealth};
use crate::view::View;

/// How often the prober wakes to see which probes are due.
const TICK: Duration = Duration::from_millis(250);
/// The longest a probe may take.
const MAX_PROBE_TIME: Duration = Duration::from_secs(5);

/// Where a check reaches task `t`: its address on its first service network.
fn target(t: &Task) -> Option<Ipv4Addr> {
    t.endpoints
        .iter()
        .find(|e| e.network != GWBRIDGE && e.network != state::INGRESS)
        .map(|e| e.ip)
}

/// One probe, from a thread inside the task's namespace.
async fn probe(netns: &str, ip: Ipv4Addr, check: Probe, within: Duration) -> Result<()> {
    let ns = Netns::Path(PathBuf::from(netns));
    netns::run_in(&ns, move || match check {
        Probe::Tcp { port } => {
            TcpStream::connect_timeout(&SocketAddr::from((ip, port)), within)
                .with_context(|| format!("tcp {ip}:{port}"))?;
            Ok(())
        }
        Probe::Http { port, path } => http_get(SocketAddr::from((ip, port)), &path, within),
    })
    .await
}

/// A GET answered 2xx or 3xx.
fn http_get(to: SocketAddr, path: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut s = TcpStream::connect_timeout(&to, within).with_context(|| format!("http {to}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_write_timeout(Some(left()))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: netd-health\r\nConnection: close\r\n\r\n",
        to.ip()
    )?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        s.set_read_timeout(Some(left()))?;
        let n = s
            .read(&mut buf)
            .with_context(|| format!("http {to}{path}: no answer"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    match status {
        Some(200..=399) => Ok(()),
        Some(code) => bail!("http {to}{path}: status {code}"),
        None => bail!("http {to}{path}: not an HTTP answer"),
    }
}

/// What the prober keeps per task.
struct Tracked {
    next: Instant,
    /// Failed probes in a row.
    failures: u32,
    /// The verdict in the store (None: none yet).
    published: Option<bool>,
    running: bool,
}

/// The verdict after one probe's `result`, if it changes what is published: healthy at
/// the first success, unhealthy at the `retries`-th failure in a row.
fn verdict(tr: &mut Tracked, retries: u32, result: &Result<()>) -> Option<bool> {
    match result {
        Ok(()) => {
            tr.failures = 0;
            (tr.published != Some(true)).then_some(true)
        }
        Err(_) => {
            tr.failures = tr.failures.saturating_add(1);
            (tr.failures >= retries && tr.published != Some(false)).then_some(false)
        }
    }
}

/// The tasks this node probes: its own, up, not draining, of a service with a check.
fn checked<'a>(st: &'a State, node: &'a str) -> Vec<(&'a Task, &'a HealthCheck)> {
    st.tasks
        .values()
        .filter(|t| t.node == node && t.draining.is_none() && st.task_up(&t.id))
        .filter_map(|t| Some((t, st.services.get(&t.service)?.health.as_ref()?)))
        .collect()
}

/// Probes this node's checked tasks for the daemon's life.
pub async fn probe_tasks(view: Arc<View>, node: String) {
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Result<()>)>();
    let mut revision = u64::MAX;
    let mut due: Vec<(Task, HealthCheck)> = vec![];
    loop {
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            Some((id, result)) = done_rx.recv() => {
                let st = view.state();
                let Some(tr) = tracked.get_mut(&id) else { continue };
                tr.running = false;
                let Some((t, check)) = st.tasks.get(&id).and_then(|t| {
                    Some((t, st.services.get(&t.service)?.health.as_ref()?))
                }) else {
                    continue;
                };
                let Some(healthy) = verdict(tr, check.retries, &result) else { continue };
                let health = TaskHealth {
                    healthy,
                    since: model::now_secs(),
                    detail: result.err().map(|e| format!("{e:#}")),
                };
                // Not written (the task changed meanwhile, or the store refused): tried
                // again after the next probe.
                match state::publish_task_health(&view, &st, &id, &health).await {
                    Ok(Some(_)) => {
                        tr.published = Some(healthy);
                        tracing::info!(task = t.name, healthy, detail = health.detail, "health");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(task = t.name, "publish health: {e}"),
                }
                continue;
            }
        }
        let st = view.state();
        if st.revision != revision {
            revision = st.revision;
            due = checked(&st, &node)
                .into_iter()
                .map(|(t, c)| (t.clone(), c.clone()))
                .collect();
            tracked.retain(|id, _| due.iter().any(|(t, _)| &t.id == id));
            for (t, _) in &due {
                tracked.entry(t.id.clone()).or_insert_with(|| Tracked {
                    next: Instant::now(),
                    failures: 0,
                    published: st.task_health.get(&t.id).map(|h| h.healthy),
                    running: false,
                });
            }
        }
        let now = Instant::now();
        for (t, check) in &due {
            let Some(tr) = tracked.get_mut(&t.id) else {
                continue;
            };
            if tr.running || tr.next > now {
                continue;
            }
            let (Ok(p), Some(ip)) = (check.probe(), target(t)) else {
                continue;
            };
            let interval = Duration::from_secs(check.interval);
            tr.next = now + interval;
            tr.running = true;
            let (tx, id, netns) = (done_tx.clone(), t.id.clone(), t.netns.clone());
            let within = interval.min(MAX_PROBE_TIME);
            tokio::spawn(async move {
                let result = probe(&netns, ip, p, within).await;
                let _ = tx.send((id, result));
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(published: Option<bool>) -> Tracked {
        Tracked {
            next: Instant::now(),
            failures: 0,
            published,
            running: false,
        }
    }

    #[test]
    fn healthy_at_the_first_success_unhealthy_at_the_nth_failure_in_a_row() {
        let fail = || -> Result<()> { Err(anyhow::anyhow!("refused")) };
        let mut tr = tracked(None);
        assert_eq!(verdict(&mut tr, 3, &Ok(())), Some(true));
        tr.published = Some(true);
        assert_eq!(verdict(&mut tr, 3, &Ok(())), None);
        assert_eq!(verdict(&mut tr, 3, &fail()), None);
        assert_eq!(verdict(&mut tr, 3, &fail()), None);
        // A success in between starts the count over.
        assert_eq!(verdict(&mut tr, 3, &Ok(())), None);
        assert_eq!(verdict(&mut tr, 3, &fail()), None);
        assert_eq!(verdict(&mut tr, 3, &fail()), None);
        assert_eq!(verdict(&mut tr, 3, &fail()), Some(false));
        tr.published = Some(false);
        assert_eq!(verdict(&mut tr, 3, &fail()), None);
        assert_eq!(verdict(&mut tr, 3, &Ok(())), Some(true));
        // A task never healthy yet is reported unhealthy after the retries too.
        let mut new = tracked(None);
        assert_eq!(verdict(&mut new, 1, &fail()), Some(false));
    }

    #[test]
    fn checks_parse_or_say_why_not() {
        let check = |cmd: &str| HealthCheck {
            cmd: cmd.into(),
            interval: 5,
            retries: 3,
        };
        assert_eq!(check("tcp:80").probe(), Ok(Probe::Tcp { port: 80 }));
        assert_eq!(
            check("http:8080/healthz").probe(),
            Ok(Probe::Http {
                port: 8080,
                path: "/healthz".into()
            })
        );
        assert_eq!(
            check("http:80").probe(),
            Ok(Probe::Http {
                port: 80,
                path: "/".into()
            })
        );
        for bad in [
            "tcp:0",
            "tcp:http",
            "udp:53",
            "80",
            "http:80/a b",
            "tcp:70000",
        ] {
            assert!(check(bad).probe().is_err(), "{bad}");
        }
        let mut c = check("tcp:80");
        c.interval = 0;
        assert!(c.probe().unwrap_err().contains("interval"));
        c.interval = 5;
        c.retries = 0;
        assert!(c.probe().unwrap_err().contains("retries"));
    }
}
