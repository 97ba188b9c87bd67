//! The node's view of the desired state: read from the store once, then kept current by
//! the store's change feed, one key at a time, in revision order. Every reader (the API,
//! the reconciler, the DNS and load-balancer tables) takes a snapshot from here for the
//! price of a pointer, instead of reading the whole state from the store per change:
//! what makes a change cost the size of the change, not the size of the cluster.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::identity::Guard;
use crate::state::{Error, Result, State};
use crate::store::{Change, Store, FEED_CAPACITY, ROOT};

/// A revision the view passed on to its readers, with the keys that changed since the
/// one before (`None`: the view listed the store again, anything may have changed).
#[derive(Debug, Clone)]
pub struct Update {
    pub state: Arc<State>,
    pub changed: Option<Arc<[String]>>,
}

/// How long a reader waits for the view to reach a revision it knows was committed
/// before it reads the store itself (a watch that stalled must not stall writes). A
/// write's own revision comes through the feed within milliseconds; a CI run saw the
/// feed of a netd just restarted stall for 10 s, and each of its two start-up writes
/// waited the 5 s this was then, which kept the node away past its lease for 11 s.
const CATCH_UP: Duration = Duration::from_secs(2);
/// Pause between attempts to list the store again after a failed one.
const RETRY: Duration = Duration::from_millis(500);

pub struct View {
    store: Arc<dyn Store>,
    /// The node whose view this is, if any: see [`own`].
    local: Option<String>,
    /// The node's record of its store (see [`crate::identity`]), and why the view holds
    /// its last good state instead of the store's newest, if it does.
    guard: Option<Arc<Guard>>,
    refused: Arc<Mutex<Option<String>>>,
    current: watch::Sender<Arc<State>>,
    updates: broadcast::Sender<Update>,
    feeder: JoinHandle<()>,
}

impl Drop for View {
    fn drop(&mut self) {
        self.feeder.abort();
    }
}

impl View {
    /// Lists the store once and follows its change feed from there: the cluster as the
    /// store says, with no node of its own (tools, tests).
    pub async fn open(store: Arc<dyn Store>) -> Result<Arc<View>> {
        View::open_as(store, None, None).await
    }

    /// The view of node `local`'s daemon: as [`View::open`], except that `local` always
    /// counts as alive in it (see [`own`]), and that with a `guard` a store its record
    /// does not accept is refused (an error here; later, the view holds).
    pub async fn open_as(
        store: Arc<dyn Store>,
        local: Option<String>,
        guard: Option<Arc<Guard>>,
    ) -> Result<Arc<View>> {
        // Subscribe before listing: a change committed in between is in the feed, and
        // one already in the list is skipped by its revision.
        let feed = store.subscribe();
        let first = own(State::load(store.as_ref()).await?, local.as_deref());
        if let Some(g) = &guard {
            if let Some(why) = g.refuses(&first) {
                return Err(Error::StoreRefused(why));
            }
            g.took(&first);
        }
        let (current, _) = watch::channel(Arc::new(first.clone()));
        let (updates, _) = broadcast::channel(FEED_CAPACITY);
        let refused = Arc::new(Mutex::new(None));
        let feeder = tokio::spawn(feed_view(
            store.clone(),
            Following {
                local: local.clone(),
                guard: guard.clone(),
                refused: refused.clone(),
            },
            feed,
            first,
            current.clone(),
            updates.clone(),
        ));
        Ok(Arc::new(View {
            store,
            local,
            guard,
            refused,
            current,
            updates,
            feeder,
        }))
    }

    /// Why the view holds its last good state rather than the store's (None: it follows
    /// the store).
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().ok()?.clone()
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn store_arc(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The newest state the view holds.
    pub fn state(&self) -> Arc<State> {
        self.current.borrow().clone()
    }

    /// Every revision the view takes on from now, with what changed.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }

    /// Wakes whenever the view's state changes (readers that only need the newest).
    pub fn watch(&self) -> watch::Receiver<Arc<State>> {
        self.current.subscribe()
    }

    /// A state at `revision` or later: the view's once it got there (a write's own
    /// revision arrives through the feed within milliseconds), else one read from the
    /// store, so a stalled feed delays a reader by [`CATCH_UP`] and never blocks it.
    pub async fn at_least(&self, revision: u64) -> Result<Arc<State>> {
        if let Some(why) = self.refused() {
            return Err(Error::StoreRefused(why));
        }
        let mut rx = self.current.subscribe();
        let reached = tokio::time::timeout(CATCH_UP, async {
            let st = rx.wait_for(|st| st.revision >= revision).await.ok()?;
            Some(Arc::clone(&st))
        })
        .await;
        if let Ok(Some(st)) = reached {
            return Ok(st);
        }
        tracing::warn!(
            revision,
            "the store's change feed is late: reading the store"
        );
        let read = own(
            State::load(self.store.as_ref()).await?,
            self.local.as_deref(),
        );
        if let Some(why) = self.guard.as_ref().and_then(|g| g.refuses(&read)) {
            return Err(Error::StoreRefused(why));
        }
        Ok(Arc::new(read))
    }
}

/// The rule for a node's own liveness in its own view: it always holds. The liveness
/// lease tells the *other* nodes whether this one still serves; a lapse of it (etcd
/// unreachable for longer than `--lease-ttl`, a keep-alive lost under load, a restart
/// after the lease ran out) must not make a node take its own running tasks out of its
/// own VIPs, published ports and flows, because its kernel still reaches them: the
/// node's tables keep the last state the cluster agreed on, and only a change the
/// cluster makes (a task detached, another node's lease gone) changes them. Other nodes
/// drop this node's tasks when its lease ends, which is what they must do: they cannot
/// tell a cut-off node from a dead one. So a node cut off from etcd keeps forwarding to
/// every task it can still reach, and the cluster's answer wins once it is back.
fn own(mut st: State, local: Option<&str>) -> State {
    if let Some(local) = local {
        st.own_lease_lapsed = !st.alive.contains(local);
        if st.own_lease_lapsed {
            st.alive.insert(local.to_string());
        }
    }
    st
}

/// What the feeder needs to know about whose view it builds.
struct Following {
    local: Option<String>,
    guard: Option<Arc<Guard>>,
    refused: Arc<Mutex<Option<String>>>,
}

impl Following {
    /// Whether `st` may be published; notes it taken on, or why not. A refusal holds
    /// until netd restarts: a rolled-back store that moves past the recorded revision
    /// would pass the check again while still lacking what was lost.
    fn accepts(&self, st: &State) -> bool {
        let Ok(mut refused) = self.refused.lock() else {
            return false;
        };
        if refused.is_some() {
            return false;
        }
        match self.guard.as_ref().and_then(|g| g.refuses(st)) {
            Some(why) => {
                tracing::error!(
                    "{why}: this node keeps its last good state (its kernel, DNS and load \
                     balancer as they are) and answers API writes with 503 until netd \
                     restarts; start it with --adopt-store to take this store on"
                );
                *refused = Some(why);
                false
            }
            None => {
                if let Some(g) = &self.guard {
                    g.took(st);
                }
                true
            }
        }
    }
}

/// Applies the feed to `st` and publishes each revision; lists the store again when the
/// feed says events were lost or this task fell behind it.
async fn feed_view(
    store: Arc<dyn Store>,
    following: Following,
    mut feed: broadcast::Receiver<Change>,
    mut st: State,
    current: watch::Sender<Arc<State>>,
    updates: broadcast::Sender<Update>,
) {
    loop {
        let change = feed.recv().await;
        let changed = match change {
            Ok(Change::Events(revision, events)) => {
                if revision <= st.revision {
                    continue;
                }
                let mut next = st.clone();
                let mut keys = Vec::with_capacity(events.len());
                for e in events.iter() {
                    if let Err(err) = next.apply(e) {
                        // A value netd cannot read: keep the rest of the revision, and
                        // say which key was skipped (the old value of it stays).
                        tracing::error!("store change at revision {revision}: {err}");
                    }
                    keys.push(match e {
                        crate::store::Event::Put(kv) => kv.key.clone(),
                        crate::store::Event::Delete { key, .. } => key.clone(),
                    });
                }
                next.revision = revision;
                st = next;
                Some(keys.into())
            }
            Ok(Change::Resync(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                st = relist(store.as_ref()).await;
                None
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        st = own(st, following.local.as_deref());
        if !following.accepts(&st) {
            continue;
        }
        let snapshot = Arc::new(st.clone());
        current.send_replace(snapshot.clone());
        let _ = updates.send(Update {
            state: snapshot,
            changed,
        });
    }
}

/// Lists the whole state, retrying until the store answers.
async fn relist(store: &dyn Store) -> State {
    loop {
        match State::load(store).await {
            Ok(st) => return st,
            Err(e) => tracing::warn!("list {ROOT} again: {e}"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{self, fixture, ServiceCreate, TaskAttach};

    fn attach(service: &str, netns: &str) -> TaskAttach {
        TaskAttach {
            service: service.into(),
            netns: netns.into(),
            ..Default::default()
        }
    }

    /// The state the feed built, change by change, is the state a full read finds: same
    /// records, same holders and revisions (so the same compares), same orphans.
    async fn assert_same_as_a_full_read(view: &View) {
        let rev = view.store().list(ROOT).await.unwrap().revision;
        let followed = view.at_least(rev).await.unwrap();
        let read = State::load(view.store()).await.unwrap();
        assert_eq!(format!("{followed:?}"), format!("{read:?}"));
    }

    #[tokio::test]
    async fn the_view_follows_every_kind_of_change_exactly() {
        let (_dir, v) = fixture::setup().await;
        fixture::web_on_front(&v).await;
        assert_same_as_a_full_read(&v).await;
        let mut tasks = vec![];
        for i in 0..4 {
            tasks.push(
                state::attach_task(&v, "n1", attach("web", &format!("/run/netns/t{i}")))
                    .await
                    .unwrap(),
            );
        }
        state::create_service(
            &v,
            &fixture::pools(),
            ServiceCreate {
                name: "db".into(),
                networks: vec!["front".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        state::attach_task(&v, "n1", attach("db", "/run/netns/d0"))
            .await
            .unwrap();
        assert_same_as_a_full_read(&v).await;
        state::detach_task(&v, &tasks[0].id).await.unwrap();
        assert_same_as_a_full_read(&v).await;
        // A removal orphans the service's tasks at once; the collection frees them.
        let view_before = v.state();
        state::remove_service(&v, "web").await.unwrap();
        assert!(view_before.orphans.is_empty());
        assert!(v.state().tasks_of("web").next().is_none());
        assert_same_as_a_full_read(&v).await;
        state::collect_garbage(&v).await.unwrap();
        assert!(v.state().orphans.is_empty());
        assert_eq!(v.state().tasks.len(), 1);
        assert_same_as_a_full_read(&v).await;
        // A node's lease (ephemeral keys) comes and goes through the feed too.
        v.store().withdraw_ephemeral().await.unwrap();
        assert_same_as_a_full_read(&v).await;
        assert!(!v.state().node_alive("n1"));
    }

    /// The rule of [`own`]: a node whose lease lapsed keeps its own tasks in its own
    /// VIPs and published ports; every other node's view drops them.
    #[tokio::test]
    async fn a_lapsed_lease_keeps_a_nodes_own_tasks_in_its_own_tables_only() {
        let (_dir, v) = fixture::setup().await;
        let n1 = View::open_as(v.store_arc(), Some("n1".into()), None)
            .await
            .unwrap();
        fixture::web_on_front(&v).await;
        let t = state::attach_task(&v, "n1", attach("web", "/run/netns/t0"))
            .await
            .unwrap();
        fixture::report_up(&v, &[&t.id]).await;
        let backends = |st: &State| -> usize {
            crate::datapath::LbTable::from_state(st)
                .vips
                .values()
                .map(|e| e.backends.len())
                .sum()
        };
        let rev = v.store().list(ROOT).await.unwrap().revision;
        assert_eq!(backends(&n1.at_least(rev).await.unwrap()), 1);
        // The lease ends (etcd unreachable for longer than its TTL, as the store sees
        // it): the key goes, in every view's feed.
        v.store().withdraw_ephemeral().await.unwrap();
        let rev = v.store().list(ROOT).await.unwrap().revision;
        let others = v.at_least(rev).await.unwrap();
        let own = n1.at_least(rev).await.unwrap();
        assert!(!others.node_alive("n1"));
        assert_eq!(backends(&others), 0, "another node drops n1's task");
        assert!(own.node_alive("n1") && own.own_lease_lapsed);
        assert_eq!(backends(&own), 1, "n1 keeps its own task in its own VIP");
        // A view opened after the lapse (a restart) holds it too.
        let reopened = View::open_as(v.store_arc(), Some("n1".into()), None)
            .await
            .unwrap();
        assert_eq!(backends(&reopened.state()), 1);
    }

    /// An emptied store (every key under /netd/ deleted, as a wiped etcd or a stray
    /// `etcdctl del --prefix` leaves it) is not taken on: the view keeps the last good
    /// state, says why, and writes answer that the store is refused. A restart refuses
    /// it too, unless the record is adopted. Before, the view published the empty state
    /// and the next step swept every sandbox and endpoint of the node.
    #[tokio::test]
    async fn an_emptied_store_is_refused_and_the_last_good_state_is_kept() {
        let (dir, v) = fixture::setup().await;
        let record = dir.path().join("run/n1/store.json");
        let guard = Arc::new(Guard::open(&record, true).unwrap());
        let n1 = View::open_as(v.store_arc(), Some("n1".into()), Some(guard))
            .await
            .unwrap();
        state::ensure_cluster_id(&n1).await.unwrap();
        fixture::web_on_front(&n1).await;
        let good = n1.state();
        assert!(good.cluster.is_some() && good.services.contains_key("web"));
        assert_eq!(n1.refused(), None);
        // Everything under /netd/ goes, in one transaction.
        let keys: Vec<crate::store::Op> = v
            .store()
            .list(ROOT)
            .await
            .unwrap()
            .kvs
            .iter()
            .map(|kv| crate::store::Op::Delete(kv.key.clone()))
            .collect();
        let rev = v.store().txn(vec![], keys).await.unwrap().unwrap();
        // The plain view follows the store; n1's holds.
        assert!(v.at_least(rev).await.unwrap().services.is_empty());
        let err = n1.at_least(rev).await.unwrap_err();
        assert!(matches!(err, Error::StoreRefused(_)), "{err}");
        assert!(n1.refused().unwrap().contains("no cluster identity"));
        let held = n1.state();
        assert!(
            held.services.contains_key("web"),
            "the last good state stays"
        );
        assert!(held.revision < rev);
        // A write through n1 is refused, and says why.
        let e = state::create_service(
            &n1,
            &fixture::pools(),
            ServiceCreate {
                name: "db".into(),
                networks: vec!["front".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::StoreRefused(_)), "{e}");
        // A restart with the record refuses the store; an adopted record takes it on.
        let again = Arc::new(Guard::open(&record, true).unwrap());
        let e = View::open_as(v.store_arc(), Some("n1".into()), Some(again.clone()))
            .await
            .err()
            .expect("refused at start");
        assert!(e.to_string().contains("no cluster identity"), "{e}");
        again.adopt();
        let adopted = View::open_as(v.store_arc(), Some("n1".into()), Some(again))
            .await
            .unwrap();
        assert!(adopted.state().services.is_empty());
    }

    #[tokio::test]
    async fn a_write_is_in_the_view_when_it_returns_and_old_snapshots_stay_whole() {
        let (_dir, v) = fixture::setup().await;
        let before = v.state();
        let svc = fixture::web_on_front(&v).await;
        // Read-your-writes: no wait, no reload.
        assert_eq!(v.state().service("web").unwrap().vips, svc.vips);
        // A reader holding an older snapshot sees it unchanged.
        assert!(before.services.is_empty());
        assert!(before.networks.is_empty());
    }

    #[tokio::test]
    async fn a_bad_value_in_the_feed_changes_nothing_and_the_rest_goes_on() {
        let (_dir, v) = fixture::setup().await;
        fixture::web_on_front(&v).await;
        let rev = v
            .store()
            .txn(
                vec![],
                vec![crate::store::Op::Put(
                    format!("{ROOT}services/web"),
                    b"{not json".to_vec(),
                )],
            )
            .await
            .unwrap()
            .unwrap();
        let st = v.at_least(rev).await.unwrap();
        // The old record stands; the view moved on to the revision.
        assert!(st.services.contains_key("web"));
        assert_eq!(st.revision, rev);
        state::attach_task(&v, "n1", attach("web", "/run/netns/a"))
            .await
            .unwrap_err();
    }
}

/// One change, one small piece of work: the same operation in a small and a large
/// cluster asks the same of the store and touches the same number of table entries.
#[cfg(test)]
mod scale_tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::datapath::LbTable;
    use crate::follow::Touched;
    use crate::state::{self, fixture, ServiceCreate, TaskAttach};
    use crate::store::testing::{CountingStore, Traffic};

    /// Creates services `s{from}..s{to}` on `front`.
    async fn services(v: &View, from: usize, to: usize) {
        for i in from..to {
            state::create_service(
                v,
                &fixture::pools(),
                ServiceCreate {
                    name: format!("s{i}"),
                    networks: vec!["front".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
    }

    /// The store traffic of one service create, one attach and one detach, and the
    /// table entries the attach touched.
    async fn one_of_each(v: &View, counted: &CountingStore, n: usize) -> (Vec<Traffic>, usize) {
        let mut traffic = vec![];
        counted.take();
        services(v, n, n + 1).await;
        traffic.push(counted.take());
        let before = v.state();
        let t = state::attach_task(
            v,
            "n1",
            TaskAttach {
                service: format!("s{n}"),
                netns: format!("/run/netns/x{n}"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        traffic.push(counted.take());
        let after = v.at_least(t.revision).await.unwrap();
        // The keys of the attach, as the feed reports them.
        let keys: Vec<String> = [
            format!("{ROOT}tasks/{}", t.id),
            format!("{ROOT}tasknames/{}", t.name),
        ]
        .into();
        let touched = Touched::of(&before, &after, &keys);
        let mut table = LbTable::from_state(&before);
        let vips = table.update(&before, &after, &touched.services);
        assert_eq!(table, LbTable::from_state(&after));
        state::detach_task(v, &t.id).await.unwrap();
        traffic.push(counted.take());
        (
            traffic,
            vips.len() + touched.tasks.len() + touched.services.len(),
        )
    }

    #[tokio::test]
    async fn a_change_costs_the_same_with_300_services_as_with_10() {
        let dir = tempfile::tempdir().unwrap();
        let local: crate::store::testing::SharedStore =
            Arc::new(crate::store::local::LocalStore::open(dir.path()).unwrap());
        let counted = Arc::new(CountingStore::new(local));
        let v = View::open(counted.clone()).await.unwrap();
        fixture::add_node(&v, "n1").await;
        state::create_network(
            &v,
            &fixture::pools(),
            state::NetworkCreate {
                name: "front".into(),
                subnet: Some("198.19.16.0/20".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        services(&v, 0, 10).await;
        let small = one_of_each(&v, &counted, 10).await;
        services(&v, 11, 300).await;
        let large = one_of_each(&v, &counted, 300).await;
        assert_eq!(small, large, "a change cost more in the larger cluster");
        // No operation reads the whole state: the view has it.
        for t in &large.0 {
            assert_eq!((t.lists, t.keys_listed), (0, 0), "{t:?}");
        }
        let ops: BTreeSet<usize> = large.0.iter().map(|t| t.txns).collect();
        assert_eq!(
            ops,
            BTreeSet::from([1]),
            "one transaction each: {:?}",
            large.0
        );
    }
}
