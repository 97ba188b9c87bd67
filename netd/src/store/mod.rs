//! The desired state lives behind one key-value trait shaped like etcd v3: prefix reads
//! at a revision, and transactions that commit only if every compare still holds. That
//! shape is what lets two writers (two nodes, or two API requests) race safely: the loser
//! re-reads and tries again, so an address or a VNI is never handed out twice.

pub mod etcd;
pub mod local;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::broadcast;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store file {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("store {0} is locked by another netd daemon")]
    Locked(String),
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error(
        "unsupported store {0:?}: use local:DIR or etcd[+https]://[USER@]HOST:PORT[,HOST:PORT...]"
    )]
    Unsupported(String),
    #[error("store: {0}")]
    Config(String),
    #[error(
        "a transaction of {compares} compares and {ops} operations is more than etcd takes \
         at its defaults ({MAX_TXN_OPS} each): a bug in netd, please report it"
    )]
    TooBig { compares: usize, ops: usize },
}

/// etcd's default `--max-txn-ops`: the most compares, and the most operations, one
/// transaction may carry. Both stores refuse more, so a caller that would need more
/// fails in every test instead of on an operator's etcd.
pub const MAX_TXN_OPS: usize = 128;

/// Refuses a transaction etcd would refuse at its defaults.
pub fn check_txn_size(compares: &[Compare], ops: &[Op]) -> Result<(), StoreError> {
    if compares.len() > MAX_TXN_OPS || ops.len() > MAX_TXN_OPS {
        return Err(StoreError::TooBig {
            compares: compares.len(),
            ops: ops.len(),
        });
    }
    Ok(())
}

impl StoreError {
    /// Whether waiting may help: etcd unreachable or busy, as opposed to etcd refusing
    /// (a wrong password, a role without access) or a mistake in the spec.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Etcd { source, .. } => match source.as_ref() {
                etcd_client::Error::GRpcStatus(s) => !matches!(
                    s.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                        | tonic::Code::FailedPrecondition
                ),
                _ => true,
            },
            _ => false,
        }
    }
}

/// Every key netd writes lives under this prefix (etcd watches it).
pub const ROOT: &str = "/netd/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last write to this key; never 0 for a key that exists.
    pub mod_revision: u64,
}

/// A condition a transaction needs to hold at commit time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist (create-if-absent).
    Absent(String),
    /// The key exists and was last written at this revision (unchanged since read).
    Revision(String, u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

/// One committed change to one key, as the change feed tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, revision: u64 },
}

/// What the change feed announces: the events of one revision (every key one
/// transaction wrote, in order), or that events were lost (etcd compacted the history a
/// resumed watch needed) and a reader must list again.
#[derive(Debug, Clone)]
pub enum Change {
    Events(u64, Arc<[Event]>),
    Resync(u64),
}

impl Change {
    pub fn revision(&self) -> u64 {
        match self {
            Change::Events(r, _) | Change::Resync(r) => *r,
        }
    }
}

/// How many changes a slow receiver may fall behind before it must list again.
pub const FEED_CAPACITY: usize = 4096;

/// A consistent read of every key under a prefix.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: u64,
    pub kvs: Vec<KeyValue>,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Every key under `prefix`, in key order, read at one revision.
    async fn list(&self, prefix: &str) -> Result<Snapshot, StoreError>;
    /// Applies `ops` atomically if all `compares` hold; `Ok(None)` means a compare
    /// failed and nothing was written. `Ok(Some(revision))` (the revision of this write)
    /// is returned only once the write is durable.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<Option<u64>, StoreError>;
    /// Every committed change under `/netd/`, in revision order, from the moment of the
    /// call: what keeps a node's in-memory view ([`crate::view::View`]) current without
    /// reading the whole state again. A receiver that lags must list again.
    fn subscribe(&self) -> broadcast::Receiver<Change>;
    /// Publishes `key` for as long as this process lives and reaches the store: when the
    /// process dies the key vanishes `ttl` later by itself (an etcd lease). This is how
    /// the other nodes learn that a node is down.
    async fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Removes this process's ephemeral keys at once (a graceful stop announces itself
    /// instead of waiting out the TTL).
    async fn withdraw_ephemeral(&self) -> Result<(), StoreError>;
    /// Whether other nodes share this store (etcd), as opposed to one node's own.
    fn shared(&self) -> bool;
    /// The revision of the newest change the feed passed on, for a view to tell how far
    /// it is behind (None: a store whose feed is its own writes).
    fn delivered_revision(&self) -> Option<u64> {
        None
    }
    /// A description for `netd status`.
    fn describe(&self) -> String;
}

/// Opens the store named on the command line (`local:DIR` or `etcd[+https]://…`, with
/// the TLS files and password of an etcd that asks for them).
pub async fn open(
    spec: &str,
    tls: &etcd::StoreTls,
    password: Option<&str>,
) -> Result<Box<dyn Store>, StoreError> {
    if let Some(dir) = spec.strip_prefix("local:") {
        return Ok(Box::new(local::LocalStore::open(dir.as_ref())?));
    }
    let etcd = etcd::parse_spec(spec, password)?;
    Ok(Box::new(etcd::EtcdStore::connect(etcd, tls).await?))
}

/// The contract of [`Store`], run against both backends.
#[cfg(test)]
mod tests {
    use super::testing::{store_test, SharedStore};
    use super::*;

    /// A key just past the prefix `/netd/big/` (`/netd/big0`), which a read of the prefix
    /// must not return.
    async fn put_outside(s: &SharedStore) {
        assert!(s
            .txn(vec![], vec![put("/netd/big0", "no")])
            .await
            .unwrap()
            .is_some());
    }

    fn put(k: &str, v: &str) -> Op {
        Op::Put(k.into(), v.as_bytes().to_vec())
    }

    async fn values(store: &SharedStore, prefix: &str) -> Vec<(String, String)> {
        let snap = store.list(prefix).await.unwrap();
        snap.kvs
            .into_iter()
            .map(|kv| (kv.key, String::from_utf8(kv.value).unwrap()))
            .collect()
    }

    store_test!(
        a_large_prefix_reads_whole_and_at_one_revision,
        |s: SharedStore| async move {
            // More keys than one page of an etcd read, written in transactions etcd takes.
            for batch in 0..20 {
                let ops = (0..125)
                    .map(|i| put(&format!("/netd/big/{batch:02}-{i:03}"), "v"))
                    .collect();
                assert!(s.txn(vec![], ops).await.unwrap().is_some());
            }
            put_outside(&s).await;
            // A writer adds keys that sort after all of those while the read pages
            // through: the read must be one snapshot, holding exactly the keys of its
            // revision.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer = {
                let (s, stop) = (s.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 2000 {
                        let k = format!("/netd/big/zz-{i:05}");
                        let _ = s.txn(vec![], vec![put(&k, "late")]).await;
                        i += 1;
                    }
                })
            };
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let snap = s.list("/netd/big/").await.unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            writer.await.unwrap();
            let after = s.list("/netd/big/").await.unwrap();
            let listed: Vec<&str> = snap.kvs.iter().map(|kv| kv.key.as_str()).collect();
            let at_its_revision: Vec<&str> = after
                .kvs
                .iter()
                .filter(|kv| kv.mod_revision <= snap.revision)
                .map(|kv| kv.key.as_str())
                .collect();
            assert_eq!(listed, at_its_revision, "not one snapshot");
            assert!(listed.len() >= 2500);
            assert!(listed.iter().all(|k| k.starts_with("/netd/big/")));
        }
    );

    store_test!(compares_guard_writes, |s: SharedStore| async move {
        let a = "/netd/t/a".to_string();
        assert!(s
            .txn(vec![Compare::Absent(a.clone())], vec![put(&a, "1")])
            .await
            .unwrap()
            .is_some());
        // Create-if-absent loses the second time, and writes nothing.
        assert!(s
            .txn(vec![Compare::Absent(a.clone())], vec![put(&a, "2")])
            .await
            .unwrap()
            .is_none());
        let rev = s.list(&a).await.unwrap().kvs[0].mod_revision;
        assert!(rev > 0);
        assert!(s
            .txn(
                vec![Compare::Revision(a.clone(), rev)],
                vec![put(&a, "3"), put("/netd/t/b", "x")]
            )
            .await
            .unwrap()
            .is_some());
        // A stale revision loses.
        assert!(s
            .txn(
                vec![Compare::Revision(a.clone(), rev)],
                vec![Op::Delete(a.clone())]
            )
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            values(&s, "/netd/t/").await,
            vec![
                ("/netd/t/a".to_string(), "3".to_string()),
                ("/netd/t/b".to_string(), "x".to_string())
            ]
        );
        // A deleted key is absent again.
        assert!(s
            .txn(vec![], vec![Op::Delete("/netd/t/b".into())])
            .await
            .unwrap()
            .is_some());
        assert!(s
            .txn(
                vec![Compare::Absent("/netd/t/b".into())],
                vec![put("/netd/t/b", "y")]
            )
            .await
            .unwrap()
            .is_some());
    });

    store_test!(
        lists_are_prefix_scoped_sorted_and_consistent,
        |s: SharedStore| async move {
            for k in ["/netd/x/2", "/netd/x/1", "/netd/y/1", "/netd/x10"] {
                assert!(s.txn(vec![], vec![put(k, "v")]).await.unwrap().is_some());
            }
            let snap = s.list("/netd/x/").await.unwrap();
            let keys: Vec<_> = snap.kvs.iter().map(|kv| kv.key.as_str()).collect();
            assert_eq!(keys, vec!["/netd/x/1", "/netd/x/2"]);
            // The snapshot's revision covers every key in it.
            assert!(snap.kvs.iter().all(|kv| kv.mod_revision <= snap.revision));
            assert!(s.list("/netd/z/").await.unwrap().kvs.is_empty());
        }
    );

    /// The next change of the feed whose revision is at least `rev`.
    async fn next_change(rx: &mut broadcast::Receiver<Change>, rev: u64) -> Change {
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match rx.recv().await {
                    Ok(c) if c.revision() >= rev => return c,
                    Ok(_) => continue,
                    Err(e) => panic!("change feed closed: {e}"),
                }
            }
        })
        .await
        .expect("no change announced within 5 s")
    }

    store_test!(watchers_hear_every_write, |s: SharedStore| async move {
        let mut rx = s.subscribe();
        let rev = s
            .txn(vec![], vec![put("/netd/w/a", "1"), put("/netd/w/b", "2")])
            .await
            .unwrap()
            .unwrap();
        let Change::Events(at, events) = next_change(&mut rx, rev).await else {
            panic!("a resync instead of the write's events");
        };
        assert_eq!(at, rev);
        let written: Vec<(String, Vec<u8>, u64)> = events
            .iter()
            .map(|e| match e {
                Event::Put(kv) => (kv.key.clone(), kv.value.clone(), kv.mod_revision),
                Event::Delete { key, .. } => panic!("unexpected delete of {key}"),
            })
            .collect();
        assert_eq!(
            written,
            vec![
                ("/netd/w/a".into(), b"1".to_vec(), rev),
                ("/netd/w/b".into(), b"2".to_vec(), rev)
            ]
        );
        let rev = s
            .txn(vec![], vec![Op::Delete("/netd/w/a".into())])
            .await
            .unwrap()
            .unwrap();
        let Change::Events(_, events) = next_change(&mut rx, rev).await else {
            panic!("a resync instead of the delete");
        };
        assert_eq!(
            events.as_ref(),
            &[Event::Delete {
                key: "/netd/w/a".into(),
                revision: rev
            }]
        );
    });

    store_test!(
        ephemeral_keys_are_listed_and_withdrawn,
        |s: SharedStore| async move {
            s.put_ephemeral("/netd/alive/n1", b"{}".to_vec(), Duration::from_secs(5))
                .await
                .unwrap();
            assert!(s
                .txn(vec![], vec![put("/netd/nodes/n1", "{}")])
                .await
                .unwrap()
                .is_some());
            assert_eq!(values(&s, "/netd/alive/").await.len(), 1);
            // Compares see ephemeral keys like any other.
            assert!(s
                .txn(
                    vec![Compare::Absent("/netd/alive/n1".into())],
                    vec![put("/netd/alive/n1", "x")]
                )
                .await
                .unwrap()
                .is_none());
            s.withdraw_ephemeral().await.unwrap();
            assert!(values(&s, "/netd/alive/").await.is_empty());
            assert_eq!(values(&s, "/netd/nodes/").await.len(), 1);
        }
    );

    /// A broken-and-resumed watch announces a change to make watchers re-read; a watch
    /// that broke on its own (a request timeout, say) would make every node reconcile
    /// for nothing, over and over.
    #[test]
    fn an_idle_watch_stays_quiet() {
        testing::run_etcd(|s: SharedStore| async move {
            let mut rx = s.subscribe();
            // Longer than the per-request timeout of the etcd client.
            tokio::time::sleep(Duration::from_secs(7)).await;
            assert!(
                matches!(rx.try_recv(), Err(broadcast::error::TryRecvError::Empty)),
                "the watch announced a change while nothing changed"
            );
            assert!(s
                .txn(vec![], vec![put("/netd/x", "1")])
                .await
                .unwrap()
                .is_some());
            let heard = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            assert!(matches!(heard, Ok(Ok(_))), "the watch went deaf: {heard:?}");
        });
    }

    /// What makes a dead node show as down: its key outlives it by the TTL only.
    #[test]
    fn an_ephemeral_key_expires_when_its_holder_is_gone() {
        testing::run_etcd(|observer: SharedStore| async move {
            let holder = testing::connect_etcd().await.unwrap();
            holder
                .put_ephemeral("/netd/alive/n2", b"{}".to_vec(), Duration::from_secs(2))
                .await
                .unwrap();
            // Kept alive well past its TTL while the holder lives.
            tokio::time::sleep(Duration::from_secs(4)).await;
            assert_eq!(values(&observer, "/netd/alive/").await.len(), 1);
            drop(holder);
            let gone_by = std::time::Instant::now() + Duration::from_secs(10);
            while !values(&observer, "/netd/alive/").await.is_empty() {
                assert!(
                    std::time::Instant::now() < gone_by,
                    "ephemeral key outlived its holder by 10 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}
