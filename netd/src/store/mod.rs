//! The desired state lives behind one key-value trait shaped like etcd v3: prefix reads
//! at a revision, and transactions that commit only if every compare still holds. That
//! shape is what lets two writers (two nodes, or two API requests) race safely: the loser
//! re-reads and tries again, so an address or a VNI is never handed out twice.

pub mod local;

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
    #[error("unsupported store {0:?}: use local:DIR")]
    Unsupported(String),
}

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
    /// Applies `ops` atomically if all `compares` hold; `Ok(false)` means a compare
    /// failed and nothing was written. `Ok(true)` is returned only once the write is
    /// durable.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, StoreError>;
    /// Fires (with the new revision) after every committed change, so watchers can
    /// re-read; a lagging receiver only needs to re-read once.
    fn subscribe(&self) -> broadcast::Receiver<u64>;
    /// A description for `netd status`.
    fn describe(&self) -> String;
}

/// Opens the store named on the command line (`local:DIR`).
pub fn open(spec: &str) -> Result<Box<dyn Store>, StoreError> {
    if let Some(dir) = spec.strip_prefix("local:") {
        return Ok(Box::new(local::LocalStore::open(dir.as_ref())?));
    }
    Err(StoreError::Unsupported(spec.to_string()))
}
