//! The cluster store: etcd v3. Every node's netd reads and writes the same key space,
//! so allocations race through etcd's transactions (compare on create/mod revision) and
//! each node learns about the others' changes through one watch on `/netd/`.
//!
//! Liveness: a node's ephemeral keys are bound to one lease per TTL (the node's
//! `alive` key to `--lease-ttl`, its applied revision to a shorter one), each kept alive
//! by a background task. If the daemon dies, etcd deletes the keys when their lease's
//! TTL runs out and the watchers on every other node see it; if etcd itself was away
//! longer than a TTL, its keeper grants a new lease of the same TTL and puts its keys
//! again.
//!
//! Reconnection is tonic's: the client keeps its endpoints and redials, calls fail fast
//! (per-request timeout) while etcd is unreachable, the watch re-subscribes from the last
//! revision it saw, so no change is missed across an etcd restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::{broadcast, Mutex};
use tokio::task::JoinHandle;

use super::{Change, Compare, Event, KeyValue, Op, Snapshot, Store, StoreError, ROOT};

/// How long one etcd call may take before it fails (etcd down, partitioned).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts to re-establish the watch or the lease.
const RETRY: Duration = Duration::from_millis(500);

fn etcd_err(op: &'static str) -> impl FnOnce(etcd_client::Error) -> StoreError {
    move |source| StoreError::Etcd {
        op,
        source: Box::new(source),
    }
}

/// Ephemeral keys and the lease they are bound to (None until granted, or after it
/// expired and before the keeper granted a new one).
#[derive(Default)]
struct Lease {
    id: Option<i64>,
    ttl: i64,
    keys: BTreeMap<String, Vec<u8>>,
}

/// A lease and the task that keeps it alive.
type KeptLease = (Arc<Mutex<Lease>>, JoinHandle<()>);

pub struct EtcdStore {
    client: Client,
    spec: EtcdSpec,
    changes: broadcast::Sender<Change>,
    /// One lease per TTL (seconds), with its keeper: a key put with another TTL must
    /// not change the lease the others are bound to.
    leases: Mutex<BTreeMap<i64, KeptLease>>,
    watcher: JoinHandle<()>,
    /// The revision of the newest change the watch passed on (see
    /// [`Store::delivered_revision`]).
    delivered: Arc<std::sync::atomic::AtomicU64>,
}

/// Keys per page of a prefix read: a few hundred kilobytes of netd's records, well
/// inside a gRPC message.
const LIST_PAGE: i64 = 1000;

/// The first key after every key that starts with `prefix` (etcd's range end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Where etcd is and how netd proves who it is: whoever can write the store chooses the
/// namespaces every node enters as root, so a shared etcd should require TLS and a
/// password (or client certificates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    /// The URLs tonic dials (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// User name and password of etcd's authentication.
    pub user: Option<(String, String)>,
}

/// The files of a TLS connection to etcd (`--store-ca --store-cert --store-key`).
#[derive(Debug, Clone, Default)]
pub struct StoreTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl StoreTls {
    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// tonic's TLS options: the CA is required (netd trusts no system roots for its
    /// store), a client certificate optional but whole.
    fn options(&self) -> Result<etcd_client::TlsOptions, StoreError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| StoreError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        let ca = self.ca.as_deref().ok_or_else(|| {
            StoreError::Config("a TLS store (etcd+https://) needs --store-ca".into())
        })?;
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::Config(
                    "--store-cert and --store-key go together".into(),
                ))
            }
        }
        Ok(tls)
    }
}

/// `etcd://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT…]`, or `etcd+https://…` for TLS.
/// `password` (from `NETD_STORE_PASSWORD`) is used when the URL names a user without one,
/// which keeps the password out of the process list.
pub fn parse_spec(spec: &str, password: Option<&str>) -> Result<EtcdSpec, StoreError> {
    let unsupported = || StoreError::Unsupported(redact(spec));
    let (scheme, rest) = if let Some(r) = spec.strip_prefix("etcd://") {
        ("http", r)
    } else if let Some(r) = spec.strip_prefix("etcd+https://") {
        ("https", r)
    } else {
        return Err(unsupported());
    };
    let (user, list) = match rest.rsplit_once('@') {
        Some((userinfo, list)) => {
            let (name, pass) = match userinfo.split_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (userinfo, password),
            };
            let pass = pass.ok_or_else(|| {
                StoreError::Config(format!(
                    "store user {name:?} has no password: give USER:PASSWORD@ or NETD_STORE_PASSWORD"
                ))
            })?;
            if name.is_empty() {
                return Err(unsupported());
            }
            (Some((name.to_string(), pass.to_string())), list)
        }
        None => (None, rest),
    };
    let hosts: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let valid = |e: &&str| {
        e.rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    };
    if hosts.is_empty() || !hosts.iter().all(valid) {
        return Err(unsupported());
    }
    Ok(EtcdSpec {
        endpoints: hosts.iter().map(|h| format!("{scheme}://{h}")).collect(),
        user,
    })
}

/// `spec` without the password of its user, for logs and errors (a spec is printed when
/// it fails, which is when a wrong password is likeliest).
pub fn redact(spec: &str) -> String {
    let Some((scheme, rest)) = spec.split_once("://") else {
        return spec.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}@{hosts}")
        }
        None => spec.to_string(),
    }
}

/// `host:port` of an endpoint URL.
pub fn host_port(endpoint: &str) -> &str {
    endpoint
        .split_once("://")
        .map(|(_, hp)| hp)
        .unwrap_or(endpoint)
}

impl EtcdStore {
    /// Connects and checks that etcd answers, so a wrong address fails at start with a
    /// clear error instead of at the first request. `--store-ca` alone upgrades an
    /// `etcd://` spec to TLS.
    pub async fn connect(mut spec: EtcdSpec, tls: &StoreTls) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let https = spec.endpoints.iter().any(|e| e.starts_with("https://"));
        if https || !tls.is_empty() {
            options = options.with_tls(tls.options()?);
            for e in &mut spec.endpoints {
                if let Some(hp) = e.strip_prefix("http://") {
                    *e = format!("https://{hp}");
                }
            }
        }
        if spec.user.is_some() && !spec.endpoints.iter().any(|e| e.starts_with("https://")) {
            tracing::warn!("the store's password goes to etcd in clear: use etcd+https://");
        }
        if let Some((name, password)) = &spec.user {
            // etcd's tokens expire (simple tokens after 5 minutes idle): log in again
            // instead of failing every call from then on.
            options = options
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let mut client = Client::connect(&spec.endpoints, Some(options))
            .await
            .map_err(etcd_err("connect"))?;
        let status = client.status().await.map_err(etcd_err("status"))?;
        let revision = status.header().map(|h| h.revision()).unwrap_or(0);
        let (changes, _) = broadcast::channel(super::FEED_CAPACITY);
        let delivered = Arc::new(std::sync::atomic::AtomicU64::new(revision as u64));
        let watcher = tokio::spawn(watch_changes(
            client.clone(),
            changes.clone(),
            revision,
            delivered.clone(),
        ));
        Ok(EtcdStore {
            client,
            spec,
            changes,
            leases: Mutex::new(BTreeMap::new()),
            watcher,
            delivered,
        })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.watcher.abort();
        if let Ok(leases) = self.leases.try_lock() {
            for (_, keeper) in leases.values() {
                keeper.abort();
            }
        }
    }
}

/// Follows every change under `/netd/` from `revision` on and passes each revision's
/// events on. After a broken stream it resumes from the last revision seen, so nothing is
/// missed; only when etcd compacted that history away does it announce a resync.
async fn watch_changes(
    client: Client,
    tx: broadcast::Sender<Change>,
    mut revision: i64,
    delivered: Arc<std::sync::atomic::AtomicU64>,
) {
    loop {
        let mut c = client.clone();
        // A store that went back in time (emptied, replaced, restored from a backup)
        // would never send what follows `revision`, or send another history as if it
        // did: the readers list it again, and the view decides whether to take it on
        // (identity.rs).
        let now = c
            .get(
                ROOT,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .ok()
            .and_then(|r| r.header().map(|h| h.revision()));
        if let Some(now) = now.filter(|now| *now < revision) {
            tracing::error!(was = revision, now, "the store's revision went back");
            revision = now;
            let _ = tx.send(Change::Resync(revision as u64));
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        match c.watch(ROOT, Some(options)).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            // History before our revision was compacted away: start
                            // from now, and tell readers to list again.
                            tracing::warn!(reason = resp.cancel_reason(), "etcd watch canceled");
                            if let Some(h) = resp.header() {
                                revision = revision.max(h.revision());
                            }
                            let _ = tx.send(Change::Resync(revision as u64));
                            break;
                        }
                        for (rev, events) in by_revision(resp.events()) {
                            revision = revision.max(rev as i64);
                            let _ = tx.send(Change::Events(rev, events.into()));
                            delivered.store(rev, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("etcd watch: {e}");
                        break;
                    }
                }
            },
            Err(e) => tracing::debug!("etcd watch: {e}"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Groups a watch response's events by revision (etcd sends a transaction's events
/// together, in order, and never splits one revision across responses).
fn by_revision(events: &[etcd_client::Event]) -> Vec<(u64, Vec<Event>)> {
    let mut out: Vec<(u64, Vec<Event>)> = vec![];
    for e in events {
        let Some(kv) = e.kv() else { continue };
        let Ok(key) = kv.key_str() else { continue };
        let rev = kv.mod_revision() as u64;
        let event = match e.event_type() {
            etcd_client::EventType::Put => Event::Put(KeyValue {
                key: key.to_string(),
                value: kv.value().to_vec(),
                mod_revision: rev,
            }),
            etcd_client::EventType::Delete => Event::Delete {
                key: key.to_string(),
                revision: rev,
            },
        };
        match out.last_mut() {
            Some((r, evs)) if *r == rev => evs.push(event),
            _ => out.push((rev, vec![event])),
        }
    }
    out
}

async fn grant_and_put(client: &Client, lease: &mut Lease) -> Result<i64, StoreError> {
    let mut c = client.clone();
    let id = c
        .lease_grant(lease.ttl, None)
        .await
        .map_err(etcd_err("lease grant"))?
        .id();
    for (k, v) in &lease.keys {
        c.put(
            k.as_str(),
            v.clone(),
            Some(PutOptions::new().with_lease(id)),
        )
        .await
        .map_err(etcd_err("put ephemeral key"))?;
    }
    lease.id = Some(id);
    Ok(id)
}

/// Keeps the lease alive at a third of its TTL; re-grants it if etcd let it expire.
async fn keep_lease(client: Client, lease: Arc<Mutex<Lease>>) {
    loop {
        let (id, ttl) = {
            let mut l = lease.lock().await;
            let ttl = l.ttl;
            match l.id {
                Some(id) => (id, ttl),
                None => match grant_and_put(&client, &mut l).await {
                    Ok(id) => {
                        tracing::info!("etcd lease re-granted; ephemeral keys restored");
                        (id, ttl)
                    }
                    Err(e) => {
                        drop(l);
                        tracing::warn!("{e}");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                },
            }
        };
        let period = Duration::from_millis((ttl.max(1) as u64) * 1000 / 3);
        let mut c = client.clone();
        match c.lease_keep_alive(id).await {
            Ok((mut keeper, mut stream)) => loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(period, stream.message()).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => {
                        tracing::warn!("etcd lease {id:x} expired");
                        lease.lock().await.id = None;
                        break;
                    }
                    _ => break,
                }
                tokio::time::sleep(period).await;
            },
            Err(e) => tracing::debug!("etcd lease keep-alive: {e}"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[async_trait]
impl Store for EtcdStore {
    /// Page by page (at the first page's revision, so the pages form one snapshot): a
    /// cluster's whole state can be more than one gRPC message may carry.
    async fn list(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let mut c = self.client.clone();
        let end = prefix_end(prefix);
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0u64;
        let mut kvs = vec![];
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision != 0 {
                options = options.with_revision(revision as i64);
            }
            let resp = c
                .get(from.clone(), Some(options))
                .await
                .map_err(etcd_err("range"))?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0) as u64;
            }
            for kv in resp.kvs() {
                let key = kv.key_str().map_err(|e| StoreError::Corrupt {
                    path: String::from_utf8_lossy(kv.key()).into_owned(),
                    reason: e.to_string(),
                })?;
                kvs.push(KeyValue {
                    key: key.to_string(),
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision() as u64,
                });
            }
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => {
                    // The next page starts just after the last key.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(Snapshot { revision, kvs }),
            }
        }
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<Option<u64>, StoreError> {
        super::check_txn_size(&compares, &ops)?;
        let when: Vec<EtcdCompare> = compares
            .into_iter()
            .map(|c| match c {
                // A key that never existed (or was deleted) has create revision 0.
                Compare::Absent(k) => EtcdCompare::create_revision(k, CompareOp::Equal, 0),
                Compare::Revision(k, rev) => {
                    EtcdCompare::mod_revision(k, CompareOp::Equal, rev as i64)
                }
            })
            .collect();
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|o| match o {
                Op::Put(k, v) => TxnOp::put(k, v, None),
                Op::Delete(k) => TxnOp::delete(k, None),
            })
            .collect();
        let mut c = self.client.clone();
        let resp = c
            .txn(Txn::new().when(when).and_then(then))
            .await
            .map_err(etcd_err("txn"))?;
        // The header's revision is the store's after this transaction: the write's own.
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0) as u64;
        Ok(resp.succeeded().then_some(revision))
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let ttl = ttl.as_secs().max(2) as i64;
        let lease = {
            let mut leases = self.leases.lock().await;
            // A key put again with another TTL leaves its old lease's keys (the keeper
            // would put it back there after a re-grant).
            for (other, (l, _)) in leases.iter() {
                if *other != ttl {
                    l.lock().await.keys.remove(key);
                }
            }
            let (lease, _) = leases.entry(ttl).or_insert_with(|| {
                let lease = Arc::new(Mutex::new(Lease {
                    ttl,
                    ..Lease::default()
                }));
                let keeper = tokio::spawn(keep_lease(self.client.clone(), lease.clone()));
                (lease, keeper)
            });
            lease.clone()
        };
        let mut l = lease.lock().await;
        l.keys.insert(key.to_string(), value.clone());
        match l.id {
            Some(id) => {
                let mut c = self.client.clone();
                c.put(key, value, Some(PutOptions::new().with_lease(id)))
                    .await
                    .map_err(etcd_err("put ephemeral key"))?;
            }
            None => {
                grant_and_put(&self.client, &mut l).await?;
            }
        }
        Ok(())
    }

    async fn withdraw_ephemeral(&self) -> Result<(), StoreError> {
        let leases = std::mem::take(&mut *self.leases.lock().await);
        for (_, (lease, keeper)) in leases {
            keeper.abort();
            let mut l = lease.lock().await;
            l.keys.clear();
            if let Some(id) = l.id.take() {
                let mut c = self.client.clone();
                c.lease_revoke(id).await.map_err(etcd_err("lease revoke"))?;
            }
        }
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn delivered_revision(&self) -> Option<u64> {
        Some(self.delivered.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The spec without the password.
    fn describe(&self) -> String {
        let tls = self
            .spec
            .endpoints
            .iter()
            .any(|e| e.starts_with("https://"));
        let hosts: Vec<&str> = self.spec.endpoints.iter().map(|e| host_port(e)).collect();
        let user = match &self.spec.user {
            Some((name, _)) => format!("{name}@"),
            None => String::new(),
        };
        let scheme = if tls { "etcd+https" } else { "etcd" };
        format!("{scheme}://{user}{}", hosts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key put with a short TTL (the applied revision's) must not shorten the lease of
    /// the others (the node's `alive` key, `--lease-ttl`): once etcd lost the lease
    /// (revoked here, as an expiry during an outage would), the keeper brings the key
    /// back under a lease of its own TTL.
    #[test]
    fn each_ephemeral_key_keeps_its_own_ttl_across_a_regrant() {
        crate::store::testing::run_etcd(|_| async move {
            let holder = crate::store::testing::connect_etcd().await.unwrap();
            let alive = "/netd/alive/n1";
            holder
                .put_ephemeral(alive, b"{}".to_vec(), Duration::from_secs(30))
                .await
                .unwrap();
            holder
                .put_ephemeral("/netd/applied/n1", b"1".to_vec(), Duration::from_secs(3))
                .await
                .unwrap();
            let mut c = holder.client.clone();
            let lease_of = |kvs: &[etcd_client::KeyValue]| kvs.first().map(|kv| kv.lease());
            let first = c.get(alive, None).await.unwrap();
            let id = lease_of(first.kvs()).expect("the alive key");
            c.lease_revoke(id).await.unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let id = loop {
                let now = c.get(alive, None).await.unwrap();
                match lease_of(now.kvs()) {
                    Some(new) if new != id && new != 0 => break new,
                    _ => {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "the alive key never came back after its lease was lost"
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            let ttl = c.lease_time_to_live(id, None).await.unwrap();
            assert_eq!(
                ttl.granted_ttl(),
                30,
                "the alive key's lease after a re-grant"
            );
        });
    }

    #[test]
    fn endpoints_are_parsed_and_bad_specs_refused() {
        let plain = parse_spec("etcd://198.18.0.2:2379,198.18.0.3:2379", None).unwrap();
        assert_eq!(
            plain.endpoints,
            vec!["http://198.18.0.2:2379", "http://198.18.0.3:2379"]
        );
        assert_eq!(plain.user, None);
        for bad in [
            "etcd://",
            "etcd://host",
            "etcd://host:notaport",
            "etcd://:2379",
            "etcd+https://@198.18.0.2:2379",
            "https://198.18.0.2:2379",
        ] {
            assert!(parse_spec(bad, Some("pw")).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn passwords_never_reach_a_message() {
        assert_eq!(
            redact("etcd+https://netd:s3cr:t@198.18.0.2:2379"),
            "etcd+https://netd@198.18.0.2:2379"
        );
        assert_eq!(redact("etcd://198.18.0.2:2379"), "etcd://198.18.0.2:2379");
        let err = parse_spec("etcd://netd:pw@", None).unwrap_err().to_string();
        assert!(!err.contains("pw"), "{err}");
    }

    #[test]
    fn range_ends_follow_the_prefix() {
        assert_eq!(prefix_end("/netd/"), b"/netd0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn tls_and_users_in_the_spec() {
        let s = parse_spec("etcd+https://netd:s3cr:t@198.18.0.2:2379", None).unwrap();
        assert_eq!(s.endpoints, vec!["https://198.18.0.2:2379"]);
        assert_eq!(s.user, Some(("netd".into(), "s3cr:t".into())));
        // The password from the environment when the URL has none.
        let s = parse_spec("etcd://netd@198.18.0.2:2379", Some("env-pw")).unwrap();
        assert_eq!(s.user, Some(("netd".into(), "env-pw".into())));
        let err = parse_spec("etcd://netd@198.18.0.2:2379", None).unwrap_err();
        assert!(err.to_string().contains("NETD_STORE_PASSWORD"), "{err}");
        // TLS without a CA, or half a client identity, is refused before dialling.
        let err = StoreTls::default().options().unwrap_err();
        assert!(err.to_string().contains("--store-ca"), "{err}");
        let half = StoreTls {
            ca: Some("/dev/null".into()),
            cert: Some("/dev/null".into()),
            key: None,
        };
        assert!(half.options().unwrap_err().to_string().contains("together"));
    }
}
