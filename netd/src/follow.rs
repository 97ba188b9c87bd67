//! The node's tables that follow the store on their own: the embedded DNS records and
//! the load balancer's backends. A write through the API waits (briefly) until every
//! live node reports that its tables and its kernel hold the write's revision, so a name,
//! a backend or a new task's reachability is in force cluster-wide when the write is
//! acknowledged.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::datapath::{Datapath, LbTable};
use crate::dns::Dns;
use crate::state::State;
use crate::store::{Store, ROOT};
use crate::view::View;

/// Where each node reports the store revision its tables hold. Outside `/netd/` on
/// purpose: nobody watches it, so reports cause no reconcile.
const APPLIED: &str = "/netd-applied/";
/// The reports live on the node's lease (the TTL given here is only used if the report
/// comes first).
const APPLIED_TTL: Duration = Duration::from_secs(10);
/// How soon a report the store refused is sent again.
const REPORT_RETRY: Duration = Duration::from_secs(1);
/// How long a write waits for the other nodes' tables to catch up before it answers anyway.
const CLUSTER_WAIT: Duration = Duration::from_secs(2);

/// What one change touched, in the terms of the tables that follow it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// Services whose record or VIP entries may have changed.
    pub services: BTreeSet<String>,
    /// Tasks whose record may have changed.
    pub tasks: BTreeSet<String>,
}

impl Touched {
    /// From the store keys one revision changed, with the states before and after.
    pub fn of(prev: &State, next: &State, keys: &[String]) -> Touched {
        let mut t = Touched::default();
        for k in keys {
            let Some(rest) = k.strip_prefix(ROOT) else {
                continue;
            };
            let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
            match kind {
                "services" => {
                    t.services.insert(name.to_string());
                    // Its tasks come and go with it (orphans).
                    t.tasks.extend(prev.task_ids_of(name));
                    t.tasks.extend(next.task_ids_of(name));
                }
                // A task's node reported it up (or not), healthy (or not): its VIPs
                // and its service's names follow.
                "taskstatus" | "taskhealth" => {
                    for st in [prev, next] {
                        if let Some(task) = st.any_task(name) {
                            t.services.insert(task.service.clone());
                        }
                    }
                    t.tasks.insert(name.to_string());
                }
                "tasks" => {
                    t.tasks.insert(name.to_string());
                    for st in [prev, next] {
                        if let Some(task) = st.any_task(name) {
                            t.services.insert(task.service.clone());
                        }
                    }
                }
                // A node up or down: its tasks join or leave their VIPs.
                "alive" => {
                    for st in [prev, next] {
                        t.services.extend(
                            st.tasks
                                .values()
                                .filter(|task| task.node == name)
                                .map(|task| task.service.clone()),
                        );
                    }
                }
                _ => {}
            }
        }
        t
    }
}

/// Follows the node's view on its own, so a change reaches the DNS records and the VIP
/// backends without waiting for a reconcile step of the kernel (which may be busy with
/// something slower). Each change updates only what it touched. `local` tells which
/// revision the tables hold (this node's API waits on it; [`report_applied`] tells the
/// other nodes).
pub async fn follow(
    view: Arc<View>,
    dns: Arc<Dns>,
    datapath: Arc<dyn Datapath>,
    local: watch::Sender<u64>,
) {
    let mut updates = view.subscribe();
    let mut st = view.state();
    let mut prev = st.clone();
    // None: compare everything (the first pass, after a lag or a failed apply).
    let mut changed: Option<Arc<[String]>> = None;
    let mut table = LbTable::default();
    loop {
        let touched_vips = match &changed {
            None => {
                dns.sync_table(&st);
                table = LbTable::from_state(&st);
                None
            }
            Some(keys) => {
                let touched = Touched::of(&prev, &st, keys);
                dns.sync_changed(&st, &touched.services, &touched.tasks);
                Some(table.update(&prev, &st, &touched.services))
            }
        };
        // A revision the load balancer could not take is not reported as held.
        let applied = datapath
            .apply(&table, touched_vips.as_ref())
            .inspect_err(|e| tracing::warn!("load balancer: {e:#}"))
            .is_ok();
        if applied {
            local.send_replace(st.revision);
        }
        let full = !applied;
        loop {
            match updates.recv().await {
                Ok(u) if u.state.revision <= st.revision => continue,
                Ok(u) => {
                    prev = std::mem::replace(&mut st, u.state);
                    changed = if full { None } else { u.changed };
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    prev = std::mem::replace(&mut st, view.state());
                    changed = None;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
            break;
        }
    }
}

/// Tells the other nodes (`applied/`, outside the watched prefix, so the report itself
/// wakes no one) the revision this node has in force: the lower of what its DNS and
/// load-balancer tables hold (`tables`, from [`follow`]) and what its kernel holds
/// (`kernel`, from the reconciler). A write on another node waits for it, so that once
/// acknowledged, a new task is not only a backend here but reachable: its VXLAN peer is
/// programmed too. Nothing to report on a store of one node.
pub async fn report_applied(
    store: Arc<dyn Store>,
    node: String,
    mut tables: watch::Receiver<u64>,
    mut kernel: watch::Receiver<u64>,
) {
    if !store.shared() {
        return;
    }
    let key = format!("{APPLIED}{node}");
    let mut reported = 0;
    loop {
        let revision = (*tables.borrow_and_update()).min(*kernel.borrow_and_update());
        let mut failed = false;
        if revision > reported {
            let value = revision.to_string().into_bytes();
            match store.put_ephemeral(&key, value, APPLIED_TTL).await {
                Ok(()) => reported = revision,
                Err(e) => {
                    tracing::debug!("report applied revision: {e}");
                    failed = true;
                }
            }
        }
        // A report the store refused is tried again, changes or not.
        let retry = async {
            if failed {
                tokio::time::sleep(REPORT_RETRY).await
            } else {
                std::future::pending().await
            }
        };
        let woke = tokio::select! {
            r = tables.changed() => r,
            r = kernel.changed() => r,
            () = retry => Ok(()),
        };
        if woke.is_err() {
            return;
        }
    }
}

/// Waits (at most `CLUSTER_WAIT`) until this node's own tables hold `revision`; false if
/// they did not.
pub async fn await_local(local: &watch::Receiver<u64>, revision: u64) -> bool {
    let mut rx = local.clone();
    tokio::time::timeout(CLUSTER_WAIT, rx.wait_for(|r| *r >= revision))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Waits (at most `CLUSTER_WAIT`) until every other live node reports tables and kernel at
/// `revision` or later; the live nodes that did not (sorted; empty: all did). Nothing to
/// wait for on a store of one node. A store that could not be read counts as every node
/// late.
pub async fn await_cluster(store: &dyn Store, local: &str, revision: u64) -> Vec<String> {
    if !store.shared() {
        return vec![];
    }
    let deadline = tokio::time::Instant::now() + CLUSTER_WAIT;
    loop {
        let late = late_nodes(store, Some(local), revision).await;
        match late {
            Some(late) if late.is_empty() => return late,
            _ if tokio::time::Instant::now() > deadline => {
                return late.unwrap_or_else(|| vec!["(the store did not answer)".into()]);
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The live nodes (but `except`) whose reports say their tables and kernel have not
/// applied `revision` yet, sorted; None if the store did not answer. A store no other
/// node shares has none.
async fn late_nodes(store: &dyn Store, except: Option<&str>, revision: u64) -> Option<Vec<String>> {
    let mut late: Vec<String> = applied_by_live(store)
        .await?
        .into_iter()
        .filter(|(n, at)| Some(n.as_str()) != except && *at < revision)
        .map(|(n, _)| n)
        .collect();
    late.sort();
    Some(late)
}

/// The highest revision every live node reported applied (u64::MAX for a store no
/// other node shares); None if the store did not answer. One read for any number of
/// revisions to compare.
pub async fn applied_everywhere(store: &dyn Store) -> Option<u64> {
    let nodes = applied_by_live(store).await?;
    Some(nodes.iter().map(|(_, at)| *at).min().unwrap_or(u64::MAX))
}

/// Each live node with the revision it reported applied (0: none yet); empty for a
/// store no other node shares.
async fn applied_by_live(store: &dyn Store) -> Option<Vec<(String, u64)>> {
    if !store.shared() {
        return Some(vec![]);
    }
    let alive = crate::state::alive_nodes(store).await.ok()?;
    let applied = store.list(APPLIED).await.ok()?;
    let at = |node: &str| {
        applied
            .kvs
            .iter()
            .find(|kv| kv.key[APPLIED.len()..] == *node)
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(
        alive
            .into_iter()
            .map(|n| {
                let a = at(&n);
                (n, a)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{self, fixture, ServiceCreate};

    /// Drives the incremental table with every update of the view, the way `follow`
    /// does, and checks it against the table computed from scratch.
    struct Follower {
        rx: broadcast::Receiver<crate::view::Update>,
        st: Arc<State>,
        table: LbTable,
    }

    impl Follower {
        fn new(view: &View) -> Self {
            let st = view.state();
            Follower {
                rx: view.subscribe(),
                table: LbTable::from_state(&st),
                st,
            }
        }

        async fn catch_up(&mut self, view: &View) {
            let target = view.store().list(ROOT).await.unwrap().revision;
            while self.st.revision < target {
                let u = self.rx.recv().await.unwrap();
                if u.state.revision <= self.st.revision {
                    continue;
                }
                let keys = u.changed.expect("no resync in this test");
                let touched = Touched::of(&self.st, &u.state, &keys);
                let vips = self.table.update(&self.st, &u.state, &touched.services);
                // Only VIPs of the change are touched.
                for vip in &vips {
                    let of_change = [&self.st, &u.state].iter().any(|s| {
                        touched.services.iter().any(|n| {
                            s.services
                                .get(n)
                                .is_some_and(|svc| svc.vips.values().any(|v| v == vip))
                        })
                    });
                    assert!(of_change, "{vip} touched by a change not its own");
                }
                self.st = u.state;
                assert_eq!(
                    self.table,
                    LbTable::from_state(&self.st),
                    "at {}",
                    self.st.revision
                );
            }
        }
    }

    use crate::state::fixture::attach;

    /// Backends over all VIPs of the table.
    fn backends(t: &LbTable) -> usize {
        t.vips.values().map(|e| e.backends.len()).sum()
    }

    #[tokio::test]
    async fn the_table_kept_change_by_change_is_the_table_computed_whole() {
        let (_dir, v) = fixture::setup().await;
        fixture::add_node(&v, "n2").await;
        let mut f = Follower::new(&v);
        fixture::web_on_front(&v).await;
        for name in ["db", "cache"] {
            state::create_service(
                &v,
                &fixture::pools(),
                ServiceCreate {
                    name: name.into(),
                    networks: vec!["front".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        let mut ids = vec![];
        for i in 0..6 {
            let svc = ["web", "db", "cache"][i % 3];
            let node = ["n1", "n2"][i % 2];
            let t = state::attach_task(&v, "n1", attach(svc, &format!("/run/netns/t{i}"), node))
                .await
                .unwrap();
            ids.push(t.id.clone());
            f.catch_up(&v).await;
            let ip = t.endpoints[0].ip;
            assert!(f.table.vips.values().all(|e| !e.backends.contains(&ip)));
            // Its node reports it up: now it is a backend.
            state::fixture::report_up(&v, &[&t.id]).await;
            f.catch_up(&v).await;
            assert!(f.table.vips.values().any(|e| e.backends.contains(&ip)));
        }
        assert_eq!(backends(&f.table), 6);
        state::detach_task(&v, &ids[0]).await.unwrap();
        f.catch_up(&v).await;
        // n2 goes down: its tasks leave every VIP; it comes back: they return.
        let n2 = format!("{ROOT}alive/n2");
        v.store()
            .txn(vec![], vec![crate::store::Op::Delete(n2)])
            .await
            .unwrap();
        f.catch_up(&v).await;
        assert_eq!(backends(&f.table), 2);
        state::announce_alive(v.store(), "n2", Duration::from_secs(10))
            .await
            .unwrap();
        f.catch_up(&v).await;
        state::remove_service(&v, "db").await.unwrap();
        f.catch_up(&v).await;
        state::collect_garbage(&v).await.unwrap();
        f.catch_up(&v).await;
        assert_eq!(f.table.vips.len(), 2);
    }
}
