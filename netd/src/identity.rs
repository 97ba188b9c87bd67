//! Which store a node follows. The sweep removes every kernel object the store does not
//! name, so a node pointed at an emptied, replaced or rolled-back store would tear down
//! every sandbox and endpoint it runs: all its tasks off the network at once. The store
//! carries a cluster identity (`/netd/cluster`, a random id its first node writes), and
//! each node keeps a record of the identity it followed and the highest revision it
//! took on (`/run/netd/NODE/store.json`: gone with a reboot, as is the kernel state it
//! protects). A state whose identity differs from the record, that has none while the
//! record has one, or (on etcd) whose revision is below the record's, is not taken on:
//! at start the daemon refuses to run (`--adopt-store` takes such a store on
//! deliberately), and while running its view holds the last good state (the data plane
//! keeps working, API writes answer 503) until netd restarts. A `local:` store's
//! revision is not checked: its ephemeral keys live in memory only, so its revision on
//! disk may be below one the node saw, and nothing restores a directory from a backup
//! behind netd's back the way an etcd is restored.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::state::State;

/// How often the record's revision is written at most: what a restart checks against.
/// A rollback of less than this (or to a revision the node never recorded) is not
/// told from a store that moved on.
const RECORD_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    cluster: String,
    revision: u64,
}

/// The node's record of its store, and the rule above.
pub struct Guard {
    path: PathBuf,
    /// Whether a lower revision counts as a rollback (etcd's; see the module).
    revisions: bool,
    record: Mutex<Option<Record>>,
    written: Mutex<Option<Instant>>,
}

impl Guard {
    /// The record at `path`, if any (none: the first state is taken on as it is);
    /// `revisions`: whether a revision below the record's is refused.
    pub fn open(path: &Path, revisions: bool) -> std::io::Result<Guard> {
        let record = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Guard {
            path: path.to_path_buf(),
            revisions,
            record: Mutex::new(record),
            written: Mutex::new(None),
        })
    }

    /// Forgets the record: the next state is taken on whatever it holds (`--adopt-store`).
    pub fn adopt(&self) {
        if let Ok(mut r) = self.record.lock() {
            *r = None;
        }
    }

    /// Why `st` must not be taken on; None if it may.
    pub fn refuses(&self, st: &State) -> Option<String> {
        let record = self.record.lock().ok()?.clone()?;
        match &st.cluster {
            None => Some(format!(
                "the store holds no cluster identity ({}cluster) at revision {}, while this \
                 node followed cluster {} up to revision {}: the store was emptied or is \
                 another one",
                crate::store::ROOT,
                st.revision,
                record.cluster,
                record.revision
            )),
            Some(id) if *id != record.cluster => Some(format!(
                "the store is cluster {id}, while this node followed cluster {}: it was \
                 replaced",
                record.cluster
            )),
            Some(_) if self.revisions && st.revision < record.revision => Some(format!(
                "the store is at revision {}, below the {} this node already followed: it \
                 was rolled back",
                st.revision, record.revision
            )),
            Some(_) => None,
        }
    }

    /// Notes that `st` was taken on: the record follows its identity at once, its
    /// revision at most every [`RECORD_EVERY`].
    pub fn took(&self, st: &State) {
        let Some(cluster) = st.cluster.clone() else {
            return;
        };
        let Ok(mut record) = self.record.lock() else {
            return;
        };
        let Ok(mut written) = self.written.lock() else {
            return;
        };
        let new_cluster = record.as_ref().is_none_or(|r| r.cluster != cluster);
        let due = written.is_none_or(|w| w.elapsed() >= RECORD_EVERY);
        let revision = record
            .as_ref()
            .filter(|r| r.cluster == cluster)
            .map_or(st.revision, |r| r.revision.max(st.revision));
        *record = Some(Record { cluster, revision });
        if !(new_cluster || due) {
            return;
        }
        if let Some(r) = record.as_ref() {
            match write(&self.path, r) {
                Ok(()) => *written = Some(Instant::now()),
                Err(e) => tracing::warn!("record of the store at {}: {e}", self.path.display()),
            }
        }
    }
}

/// Replaces the file whole (a crash leaves the old record or the new one).
fn write(path: &Path, r: &Record) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(r)?)?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(cluster: Option<&str>, revision: u64) -> State {
        let mut st = State::default();
        st.cluster = cluster.map(str::to_string);
        st.revision = revision;
        st
    }

    #[test]
    fn a_replaced_emptied_or_rolled_back_store_is_refused_and_the_record_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1/store.json");
        let g = Guard::open(&path, true).unwrap();
        // No record: anything is taken on (a new node, an upgrade, a reboot).
        assert_eq!(g.refuses(&state(None, 3)), None);
        g.took(&state(Some("a"), 40));
        assert_eq!(g.refuses(&state(Some("a"), 40)), None);
        assert_eq!(g.refuses(&state(Some("a"), 41)), None);
        // The record is on disk at once for a new identity: a restart finds it.
        let again = Guard::open(&path, true).unwrap();
        for (st, why) in [
            (state(None, 1), "emptied"),
            (state(Some("b"), 90), "replaced"),
            (state(Some("a"), 39), "rolled back"),
        ] {
            let refused = again.refuses(&st).expect(why);
            assert!(refused.contains(why), "{refused}");
        }
        // The revision follows, on disk at most every few seconds.
        again.took(&state(Some("a"), 100));
        assert!(again.refuses(&state(Some("a"), 99)).is_some());
        // --adopt-store: the next state is taken on, and becomes the record.
        again.adopt();
        assert_eq!(again.refuses(&state(Some("b"), 2)), None);
        again.took(&state(Some("b"), 2));
        let third = Guard::open(&path, true).unwrap();
        assert!(third.refuses(&state(Some("a"), 100)).is_some());
        assert_eq!(third.refuses(&state(Some("b"), 2)), None);
        // A local store's revision is not checked, its identity is.
        let local = Guard::open(&path, false).unwrap();
        assert_eq!(local.refuses(&state(Some("b"), 1)), None);
        assert!(local.refuses(&state(Some("a"), 100)).is_some());
    }

    #[test]
    fn an_unreadable_record_counts_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.json");
        std::fs::write(&path, b"{not json").unwrap();
        let g = Guard::open(&path, true).unwrap();
        assert_eq!(g.refuses(&state(None, 1)), None);
    }
}
