//! The node's view of the desired state: read from the store once, then kept current by
//! the store's change feed, one key at a time, in revision order. Every reader (the API,
//! the reconciler, the DNS and load-balancer tables) takes a snapshot from here for the
//! price of a pointer, instead of reading the whole state from the store per change:
//! what makes a change cost the size of the change, not the size of the cluster.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::state::{Result, State};
use crate::store::{Change, Store, FEED_CAPACITY, ROOT};

/// A revision the view passed on to its readers, with the keys that changed since the
/// one before (`None`: the view listed the store again, anything may have changed).
#[derive(Debug, Clone)]
pub struct Update {
    pub state: Arc<State>,
    pub changed: Option<Arc<[String]>>,
}

/// How long a reader waits for the view to reach a revision it knows was committed
/// before it reads the store itself (a watch that stalled must not stall writes).
const CATCH_UP: Duration = Duration::from_secs(5);
/// Pause between attempts to list the store again after a failed one.
const RETRY: Duration = Duration::from_millis(500);

pub struct View {
    store: Arc<dyn Store>,
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
    /// Lists the store once and follows its change feed from there.
    pub async fn open(store: Arc<dyn Store>) -> Result<Arc<View>> {
        // Subscribe before listing: a change committed in between is in the feed, and
        // one already in the list is skipped by its revision.
        let feed = store.subscribe();
        let first = State::load(store.as_ref()).await?;
        let (current, _) = watch::channel(Arc::new(first.clone()));
        let (updates, _) = broadcast::channel(FEED_CAPACITY);
        let feeder = tokio::spawn(feed_view(
            store.clone(),
            feed,
            first,
            current.clone(),
            updates.clone(),
        ));
        Ok(Arc::new(View {
            store,
            current,
            updates,
            feeder,
        }))
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
        Ok(Arc::new(State::load(self.store.as_ref()).await?))
    }
}

/// Applies the feed to `st` and publishes each revision; lists the store again when the
/// feed says events were lost or this task fell behind it.
async fn feed_view(
    store: Arc<dyn Store>,
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
