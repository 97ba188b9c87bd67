//! The embedded single-node store: the whole key space in memory, written to one JSON file
//! on every commit. A commit is durable before it is acknowledged: write a temp file,
//! fsync it, rename it over the old one, fsync the directory. A `kill -9` at any point
//! leaves either the old or the new file, never a torn one. The state of one node is
//! small (kilobytes), so rewriting it whole is cheaper than a log to maintain.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Mutex};

use super::{Change, Compare, Event, KeyValue, Op, Snapshot, Store, StoreError};

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Entry {
    /// Values are JSON documents themselves; kept as text so the file is readable.
    value: String,
    rev: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Data {
    revision: u64,
    keys: BTreeMap<String, Entry>,
    /// Keys that live only as long as this process (node liveness); never written out.
    #[serde(skip)]
    ephemeral: BTreeMap<String, Entry>,
}

impl Data {
    fn get(&self, key: &str) -> Option<&Entry> {
        self.keys.get(key).or_else(|| self.ephemeral.get(key))
    }
}

pub struct LocalStore {
    dir: PathBuf,
    data: Mutex<Data>,
    changes: broadcast::Sender<Change>,
    /// Held for the life of the store: a second daemon on the same directory would
    /// overwrite our commits.
    _lock: File,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl LocalStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(StoreError::Locked(dir.display().to_string()));
        }
        let path = dir.join(STATE_FILE);
        let data = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Data::default(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        // A temp file left by a crash mid-commit was never acknowledged: drop it.
        let _ = fs::remove_file(dir.join(format!("{STATE_FILE}.tmp")));
        let (changes, _) = broadcast::channel(super::FEED_CAPACITY);
        Ok(LocalStore {
            dir: dir.to_path_buf(),
            data: Mutex::new(data),
            changes,
            _lock: lock,
        })
    }

    fn persist(&self, data: &Data) -> Result<(), StoreError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(data).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        file.write_all(&bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }
}

fn holds(data: &Data, cmp: &Compare) -> bool {
    match cmp {
        Compare::Absent(k) => data.get(k).is_none(),
        Compare::Revision(k, rev) => data.get(k).map(|e| e.rev) == Some(*rev),
    }
}

#[async_trait]
impl Store for LocalStore {
    async fn list(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let data = self.data.lock().await;
        let mut kvs: Vec<KeyValue> = [&data.keys, &data.ephemeral]
            .into_iter()
            .flat_map(|m| {
                m.range(prefix.to_string()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
            })
            .map(|(k, e)| KeyValue {
                key: k.clone(),
                value: e.value.clone().into_bytes(),
                mod_revision: e.rev,
            })
            .collect();
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Snapshot {
            revision: data.revision,
            kvs,
        })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<Option<u64>, StoreError> {
        super::check_txn_size(&compares, &ops)?;
        let mut data = self.data.lock().await;
        if !compares.iter().all(|c| holds(&data, c)) {
            return Ok(None);
        }
        // Apply to a copy first: if the disk write fails, memory must not run ahead of
        // what is durable.
        let revision = data.revision + 1;
        let mut next = Data {
            revision,
            keys: data.keys.clone(),
            ephemeral: data.ephemeral.clone(),
        };
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    let value = String::from_utf8(v).map_err(|e| StoreError::Corrupt {
                        path: k.clone(),
                        reason: format!("value is not UTF-8: {e}"),
                    })?;
                    events.push(Event::Put(KeyValue {
                        key: k.clone(),
                        value: value.clone().into_bytes(),
                        mod_revision: revision,
                    }));
                    next.keys.insert(
                        k,
                        Entry {
                            value,
                            rev: revision,
                        },
                    );
                }
                Op::Delete(k) => {
                    // Like etcd: deleting a missing key is no event.
                    let was = next.keys.remove(&k).or_else(|| next.ephemeral.remove(&k));
                    if was.is_some() {
                        events.push(Event::Delete { key: k, revision });
                    }
                }
            }
        }
        self.persist(&next)?;
        *data = next;
        let _ = self.changes.send(Change::Events(revision, events.into()));
        Ok(Some(revision))
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        _ttl: Duration,
    ) -> Result<(), StoreError> {
        let value = String::from_utf8(value).map_err(|e| StoreError::Corrupt {
            path: key.to_string(),
            reason: format!("value is not UTF-8: {e}"),
        })?;
        let mut data = self.data.lock().await;
        data.revision += 1;
        let rev = data.revision;
        let event = Event::Put(KeyValue {
            key: key.to_string(),
            value: value.clone().into_bytes(),
            mod_revision: rev,
        });
        data.ephemeral.insert(key.to_string(), Entry { value, rev });
        let _ = self.changes.send(Change::Events(rev, Arc::from([event])));
        Ok(())
    }

    async fn withdraw_ephemeral(&self) -> Result<(), StoreError> {
        let mut data = self.data.lock().await;
        if data.ephemeral.is_empty() {
            return Ok(());
        }
        data.revision += 1;
        let revision = data.revision;
        let events: Vec<Event> = std::mem::take(&mut data.ephemeral)
            .into_keys()
            .map(|key| Event::Delete { key, revision })
            .collect();
        let _ = self.changes.send(Change::Events(revision, events.into()));
        Ok(())
    }

    fn shared(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("local:{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Op {
        Op::Put(k.into(), v.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn commits_survive_reopen_and_ephemeral_keys_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LocalStore::open(dir.path()).unwrap();
            assert!(s.txn(vec![], vec![put("/a", "1")]).await.unwrap().is_some());
            assert!(s
                .txn(vec![], vec![put("/a", "3"), put("/b", "x")])
                .await
                .unwrap()
                .is_some());
            s.put_ephemeral("/alive", b"1".to_vec(), Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(s.list("/").await.unwrap().kvs.len(), 3);
        }
        let s = LocalStore::open(dir.path()).unwrap();
        let snap = s.list("/").await.unwrap();
        let got: Vec<_> = snap
            .kvs
            .iter()
            .map(|kv| {
                (
                    kv.key.as_str(),
                    String::from_utf8(kv.value.clone()).unwrap(),
                )
            })
            .collect();
        assert_eq!(got, vec![("/a", "3".to_string()), ("/b", "x".to_string())]);
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _s = LocalStore::open(dir.path()).unwrap();
        assert!(matches!(
            LocalStore::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
    }

    #[tokio::test]
    async fn a_corrupt_file_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(
            LocalStore::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
