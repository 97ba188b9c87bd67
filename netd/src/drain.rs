//! Finishes graceful detaches (`task detach --drain`). The drain itself is a write: the
//! task record says `draining`, which takes it out of every node's new-connection picks
//! and DNS answers at once, while the flows it has keep working (see
//! [`crate::datapath::VipEntry::draining`]). What is left is to remove the task when it
//! has nothing left to serve, and that only its own node can see: its namespace's
//! inbound TCP connections (on a port it listens on, in any state but closed and
//! TIME-WAIT; its own connections out do not count) and the UDP datagrams it still
//! receives (UDP has no connections: a task that received none for [`QUIET`] has no
//! flow left; that count is the namespace's, so a task busy with UDP of its own, DNS
//! lookups say, drains until it is quiet or its deadline). At the deadline the task goes whatever it still has. A task whose node is
//! down is removed by any node once its deadline is [`OVERDUE`] past.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::model::{self, Task};
use crate::netns::{self, Netns};
use crate::state;
use crate::view::View;

/// How often draining tasks are looked at.
const TICK: Duration = Duration::from_secs(1);
/// How long a task with no TCP connection must receive no UDP datagram before it
/// counts as having no UDP flow either.
pub const QUIET: Duration = Duration::from_secs(3);
/// How far past its deadline a drain may be before a node other than the task's removes
/// the task (its own node is down, or cannot).
const OVERDUE: u64 = 30;

/// What a task's namespace still carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// Inbound TCP connections not closed or in TIME-WAIT.
    pub connections: usize,
    /// UDP datagrams its sockets received, since the namespace exists.
    pub received: u64,
}

/// Counts the inbound connections in `/proc/net/tcp` and `tcp6` tables: sockets on a
/// local port that a listening socket (state 0A) has, in a state that still carries a
/// connection (everything but TIME_WAIT 06 and CLOSE 07).
pub fn inbound_connections(tables: &[&str]) -> usize {
    // (local port in hex, state) of every socket.
    let sockets: Vec<(&str, &str)> = tables
        .iter()
        .flat_map(|t| t.lines().skip(1))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let local = w.nth(1)?;
            let state = w.nth(1)?;
            Some((local.rsplit(':').next()?, state))
        })
        .collect();
    let listening: std::collections::BTreeSet<&str> = sockets
        .iter()
        .filter(|(_, st)| *st == "0A")
        .map(|(port, _)| *port)
        .collect();
    sockets
        .iter()
        .filter(|(port, st)| listening.contains(port) && !matches!(*st, "0A" | "06" | "07"))
        .count()
}

/// The UDP datagrams delivered to sockets (`Udp: InDatagrams`), from `/proc/net/snmp`:
/// a header line of names and a line of values per protocol.
pub fn udp_received(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter_map(|l| l.strip_prefix("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InDatagrams")
        .and_then(|(_, v)| v.parse().ok())
}

/// Reads what the namespace at `path` still carries, from a thread inside it (a thread's
/// `/proc/thread-self/net` is its namespace's); None if nothing is at `path` any more
/// (its runtime deleted it).
async fn activity(path: &str) -> Result<Option<Activity>> {
    if let Err(e) = std::fs::metadata(path) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(None);
        }
    }
    let ns = Netns::Path(PathBuf::from(path));
    netns::run_in(&ns, || {
        let read = |f: &str| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                .with_context(|| format!("read /proc/thread-self/net/{f}"))
        };
        let tcp = read("tcp")?;
        // Absent when the kernel has no IPv6; a dual-stack socket's IPv4 peers are here.
        let tcp6 = read("tcp6").unwrap_or_default();
        let connections = inbound_connections(&[&tcp, &tcp6]);
        Ok(Some(Activity {
            connections,
            received: udp_received(&read("snmp")?).context("no Udp counters in snmp")?,
        }))
    })
    .await
}

/// Why a draining task is done (None: it is not yet).
fn done(
    t: &Task,
    now: u64,
    seen: Result<Option<Activity>>,
    quiet_since: &mut HashMap<String, (u64, Instant)>,
) -> Option<String> {
    let until = t.draining?.until;
    if now >= until {
        return Some("its drain time is up".into());
    }
    let a = match seen {
        Ok(Some(a)) => a,
        // Its runtime deleted it: nothing is left to serve.
        Ok(None) => return Some("its namespace is gone".into()),
        // Not readable now (no thread, no descriptor): the next tick tries again, and
        // the deadline holds.
        Err(e) => {
            tracing::debug!(task = t.name, "drain: {e:#}");
            return None;
        }
    };
    let entry = quiet_since
        .entry(t.id.clone())
        .or_insert((a.received, Instant::now()));
    if entry.0 != a.received {
        *entry = (a.received, Instant::now());
    }
    (a.connections == 0 && entry.1.elapsed() >= QUIET)
        .then(|| "its connections are gone".to_string())
}

/// Removes this node's draining tasks once they are done, and anyone's whose drain is
/// long overdue. Runs for the daemon's life.
pub async fn finish_drains(view: Arc<View>, node: String) {
    let mut quiet_since: HashMap<String, (u64, Instant)> = HashMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        let st = view.state();
        let now = model::now_secs();
        quiet_since.retain(|id, _| st.draining().any(|t| &t.id == id));
        let draining: Vec<Task> = st.draining().cloned().collect();
        // What every node applied, read once per tick (only while this node drains).
        let everywhere_at = if draining.iter().any(|t| t.node == node) {
            crate::follow::applied_everywhere(view.store()).await
        } else {
            None
        };
        for t in draining {
            let why = if t.node == node {
                // Its connections count only once no node picks it any more: a node that
                // has not applied the drain still sends it new connections, which may
                // all be over at the moment of a look.
                let written = st.task_revision(&t.id).unwrap_or(0);
                let everywhere = everywhere_at.is_some_and(|at| at >= written);
                let overdue = t.draining.is_some_and(|d| now >= d.until);
                if !everywhere && !overdue {
                    quiet_since.remove(&t.id);
                    continue;
                }
                done(&t, now, activity(&t.netns).await, &mut quiet_since)
            } else {
                t.draining
                    .filter(|d| now >= d.until.saturating_add(OVERDUE))
                    .map(|_| format!("its drain is overdue and node {} did not end it", t.node))
            };
            let Some(why) = why else {
                continue;
            };
            match state::detach_task(&view, &t.id).await {
                Ok(_) => tracing::info!(task = t.name, "drained: {why}"),
                Err(state::Error::NotFound(_)) => {}
                Err(e) => tracing::warn!(task = t.name, "end of drain ({why}): {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0A130A03:0050 0A130A02:A2C4 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0A130A03:0050 0A130A02:A2C6 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   3: 0A130A03:0050 0A130A02:A2C8 08 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
   4: 0A130A03:9C40 0A130A09:1538 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF0000030A130A:1F90 0000000000000000FFFF0000020A130A:C350 01 00000000:00000000 00:00000000 00000000     0        0 6 1 0000000000000000 20 4 30 10 -1
";
    const SNMP: &str = "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens
Tcp: 1 200 120000 -1 3 5
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 742 3 0 700 0 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 0 0 0 0 0
";

    #[test]
    fn connections_are_inbound_sockets_but_listeners_and_time_wait() {
        // LISTEN and TIME_WAIT do not count; ESTABLISHED and CLOSE_WAIT on port 80 do,
        // the task's own connection out (from port 0x9C40) does not.
        assert_eq!(inbound_connections(&[TCP]), 2);
        // A dual-stack listener's IPv4 peer is in tcp6.
        assert_eq!(inbound_connections(&[TCP, TCP6]), 3);
        assert_eq!(inbound_connections(&[TCP.lines().next().unwrap_or("")]), 0);
        assert_eq!(udp_received(SNMP), Some(742));
        assert_eq!(udp_received("Tcp: A\nTcp: 1\n"), None);
    }

    fn task(until: u64) -> Task {
        Task {
            id: "t1".into(),
            name: "web-1".into(),
            service: "web".into(),
            node: "n1".into(),
            netns: "/run/netns/t1".into(),
            endpoints: vec![],
            default_gateway: None,
            labels: Default::default(),
            handoff: false,
            created_at: 0,
            draining: Some(model::Drain { since: 0, until }),
        }
    }

    #[test]
    fn a_drain_ends_when_connections_and_packets_stop_or_at_its_deadline() {
        let mut quiet = HashMap::new();
        let busy = Activity {
            connections: 1,
            received: 5,
        };
        let t = task(100);
        assert_eq!(done(&t, 50, Ok(Some(busy)), &mut quiet), None);
        // No connection, but packets still arrive (a UDP flow): not done.
        let udp = |received| Activity {
            connections: 0,
            received,
        };
        assert_eq!(done(&t, 50, Ok(Some(udp(6))), &mut quiet), None);
        assert_eq!(done(&t, 51, Ok(Some(udp(7))), &mut quiet), None);
        // Quiet, but not for long enough yet.
        assert_eq!(done(&t, 51, Ok(Some(udp(7))), &mut quiet), None);
        // Quiet long enough.
        if let Some(e) = quiet.get_mut("t1") {
            e.1 = e.1.checked_sub(QUIET).expect("an uptime longer than QUIET");
        }
        assert!(done(&t, 52, Ok(Some(udp(7))), &mut quiet).is_some());
        // The deadline ends it whatever it carries.
        assert!(done(&t, 100, Ok(Some(busy)), &mut quiet).is_some_and(|w| w.contains("time is up")));
        // A namespace that is gone has nothing to serve; one that could not be read now
        // is looked at again.
        assert!(done(&t, 50, Ok(None), &mut quiet).is_some());
        assert_eq!(
            done(&t, 50, Err(anyhow::anyhow!("EMFILE")), &mut quiet),
            None
        );
    }
}
