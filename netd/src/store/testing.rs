//! Runs store-level unit tests against both backends: `local:` in a temp dir, and a real
//! etcd started for the test inside a namespace of its own (its loopback is private, so
//! parallel tests never collide and no traffic touches the machine's namespace).
//!
//! `store_test!(name, |store| async move { ... })` defines `name::local` and
//! `name::etcd`, the same body run once against each.

use std::future::Future;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::etcd::EtcdStore;
use super::local::LocalStore;
use super::Store;
use crate::netns::{self, Netns};

pub type SharedStore = Arc<dyn Store>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime")
}

pub fn run_local<F, Fut>(test: F)
where
    F: FnOnce(SharedStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let store: SharedStore = Arc::new(LocalStore::open(dir.path()).expect("open local store"));
    runtime().block_on(test(store));
}

/// An etcd server in a namespace made for it; both go away on drop.
pub struct EtcdServer {
    pub netns: String,
    child: Child,
    _dir: tempfile::TempDir,
}

pub const ETCD_SPEC: &str = "etcd://127.0.0.1:2379";

/// A connection to the test's etcd (plain, no user).
pub async fn connect_etcd() -> Result<EtcdStore, super::StoreError> {
    let spec = super::etcd::parse_spec(ETCD_SPEC, None)?;
    EtcdStore::connect(spec, &Default::default()).await
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        let netns = format!("netdtest-etcd-{:08x}", rand::random::<u32>());
        netns::create_named(&netns).expect("create etcd test netns");
        let dir = tempfile::tempdir().expect("temp dir");
        let file = std::fs::File::open(format!("{}/{netns}", netns::NETNS_DIR)).expect("netns");
        let mut cmd = Command::new("etcd");
        cmd.args([
            "--name",
            "test",
            "--data-dir",
            &dir.path().join("data").display().to_string(),
            "--listen-client-urls",
            "http://127.0.0.1:2379",
            "--advertise-client-urls",
            "http://127.0.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "test=http://127.0.0.1:2380",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only setns(2) runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        // Loopback of a new namespace starts down.
        let ns = Netns::named(&netns);
        runtime()
            .block_on(netns::with_netlink(&ns, |h| async move {
                let lo = crate::netlink::require_link(&h, "lo").await?;
                crate::netlink::set_up(&h, &lo).await
            }))
            .expect("loopback up in etcd netns");
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = netns::delete_named(&netns);
                panic!("start etcd (apt package etcd-server): {e}");
            }
        };
        EtcdServer {
            netns,
            child,
            _dir: dir,
        }
    }

    /// Runs `test` on a thread inside the server's namespace, with a store connected to
    /// it (retrying while etcd starts).
    pub fn run<F, Fut>(&self, test: F)
    where
        F: FnOnce(SharedStore) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let file = std::fs::File::open(format!("{}/{}", netns::NETNS_DIR, self.netns))
            .expect("open etcd netns");
        let worker = std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("enter etcd netns");
            let rt = runtime();
            rt.block_on(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                let store = loop {
                    match connect_etcd().await {
                        Ok(s) => break s,
                        Err(e) if Instant::now() > deadline => panic!("etcd never answered: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                };
                test(Arc::new(store)).await;
            });
        });
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = netns::delete_named(&self.netns);
    }
}

pub fn run_etcd<F, Fut>(test: F)
where
    F: FnOnce(SharedStore) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    EtcdServer::start().run(test);
}

/// One test body, two tests: `NAME::local` and `NAME::etcd`.
macro_rules! store_test {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn local() {
                $crate::store::testing::run_local($body)
            }
            #[test]
            fn etcd() {
                $crate::store::testing::run_etcd($body)
            }
        }
    };
}
pub(crate) use store_test;

/// What a store was asked to do: how many lists (and keys they returned), transactions
/// (and the operations in them). The scale tests compare these between a small and a
/// large cluster.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub lists: usize,
    pub keys_listed: usize,
    pub txns: usize,
    pub ops: usize,
}

/// A store that counts its traffic on the way to another, and can fail some of it as
/// an unreachable etcd would.
pub struct CountingStore {
    inner: SharedStore,
    traffic: std::sync::Mutex<Traffic>,
    failing: std::sync::atomic::AtomicUsize,
}

impl CountingStore {
    pub fn new(inner: SharedStore) -> Self {
        CountingStore {
            inner,
            traffic: Default::default(),
            failing: Default::default(),
        }
    }

    /// The next `n` transactions and ephemeral puts fail as etcd's client fails when etcd
    /// is unavailable (a transient error).
    pub fn fail_next(&self, n: usize) {
        self.failing.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn injected(&self, op: &'static str) -> Result<(), super::StoreError> {
        use std::sync::atomic::Ordering;
        let take = |n: usize| n.checked_sub(1);
        match self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, take)
        {
            Ok(_) => Err(super::StoreError::Etcd {
                op,
                source: Box::new(etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
                    "injected: etcd unavailable",
                ))),
            }),
            Err(_) => Ok(()),
        }
    }

    /// The traffic since the last call.
    pub fn take(&self) -> Traffic {
        self.traffic
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default()
    }

    fn count(&self, f: impl FnOnce(&mut Traffic)) {
        if let Ok(mut t) = self.traffic.lock() {
            f(&mut t);
        }
    }
}

#[async_trait::async_trait]
impl Store for CountingStore {
    async fn list(&self, prefix: &str) -> Result<super::Snapshot, super::StoreError> {
        let snap = self.inner.list(prefix).await?;
        self.count(|t| {
            t.lists += 1;
            t.keys_listed += snap.kvs.len();
        });
        Ok(snap)
    }
    async fn txn(
        &self,
        compares: Vec<super::Compare>,
        ops: Vec<super::Op>,
    ) -> Result<Option<u64>, super::StoreError> {
        self.count(|t| {
            t.txns += 1;
            t.ops += ops.len();
        });
        self.injected("txn")?;
        self.inner.txn(compares, ops).await
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<super::Change> {
        self.inner.subscribe()
    }
    async fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), super::StoreError> {
        self.injected("put")?;
        self.inner.put_ephemeral(key, value, ttl).await
    }
    async fn withdraw_ephemeral(&self) -> Result<(), super::StoreError> {
        self.inner.withdraw_ephemeral().await
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}
