//! The node's tables that follow the store on their own: the embedded DNS records and
//! the load balancer's backends. A write through the API waits (briefly) until every
//! live node reports that its tables hold the write's revision, so a name or a backend
//! change is in force cluster-wide when the write is acknowledged.

use std::sync::Arc;
use std::time::Duration;

use crate::datapath::{Datapath, LbTable};
use crate::dns::Dns;
use crate::state::State;
use crate::store::Store;

/// Where each node reports the store revision its tables hold. Outside `/netd/` on
/// purpose: nobody watches it, so reports cause no reconcile.
const APPLIED: &str = "/netd-applied/";
/// The reports live on the node's lease (the TTL given here is only used if the report
/// comes first).
const APPLIED_TTL: Duration = Duration::from_secs(10);
/// How long a write waits for the other nodes' tables to catch up before it answers anyway.
const CLUSTER_WAIT: Duration = Duration::from_secs(2);

/// Follows the store on its own, so a change reaches the DNS records and the VIP
/// backends without waiting for a reconcile step of the kernel (which may be busy with
/// something slower). In a cluster, it then tells the others which revision its tables
/// hold (`applied/`, outside the watched prefix, so the report itself wakes no one).
pub async fn follow(
    store: Arc<dyn Store>,
    node: String,
    dns: Arc<Dns>,
    datapath: Arc<dyn Datapath>,
) {
    let mut changes = store.subscribe();
    let mut reported = 0;
    loop {
        match State::load(store.as_ref()).await {
            Ok(st) => {
                dns.sync_table(&st);
                // A revision the load balancer could not take is not reported as held.
                let applied = datapath
                    .apply(&LbTable::from_state(&st))
                    .inspect_err(|e| tracing::warn!("load balancer: {e:#}"))
                    .is_ok();
                if applied && store.shared() && st.revision > reported {
                    let key = format!("{APPLIED}{node}");
                    let value = st.revision.to_string().into_bytes();
                    match store.put_ephemeral(&key, value, APPLIED_TTL).await {
                        Ok(()) => reported = st.revision,
                        Err(e) => tracing::debug!("report applied revision: {e}"),
                    }
                }
            }
            Err(e) => tracing::debug!("follow: read desired state: {e}"),
        }
        match changes.recv().await {
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Waits (at most `CLUSTER_WAIT`) until every other live node reports tables at
/// `revision` or later; false if one did not. Nothing to wait for on a store of one
/// node.
pub async fn await_cluster(store: &dyn Store, local: &str, revision: u64) -> bool {
    if !store.shared() {
        return true;
    }
    let deadline = tokio::time::Instant::now() + CLUSTER_WAIT;
    loop {
        let caught_up = async {
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
                    .iter()
                    .filter(|n| n.as_str() != local)
                    .all(|n| at(n) >= revision),
            )
        }
        .await;
        if caught_up == Some(true) {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
