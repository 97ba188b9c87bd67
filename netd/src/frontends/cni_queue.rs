//! CNI DELs that arrived while the daemon was down. A runtime must be able to delete a
//! container's network when netd is not running (node shutdown, daemon upgrade), and a
//! DEL that fails makes runtimes retry forever or leak. So `netd-cni` records the DEL as a
//! file in a queue directory beside the API socket and reports success; the daemon
//! drains the queue when it starts and every few seconds after (cilium-cni's deletion
//! queue works the same way). A file is removed only once its tasks are detached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::state;
use crate::view::View;

/// Labels by which a CNI attachment is found: one task per (container, interface).
pub const LABEL_CONTAINER: &str = "cni.container_id";
pub const LABEL_IFNAME: &str = "cni.ifname";
/// The name of the CNI network config that made the task (GC is scoped to it).
pub const LABEL_NETWORK: &str = "cni.network";

/// One deferred DEL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedDelete {
    pub container_id: String,
    pub ifname: String,
}

impl QueuedDelete {
    /// The labels of the tasks this DEL removes.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_CONTAINER.to_string(), self.container_id.clone()),
            (LABEL_IFNAME.to_string(), self.ifname.clone()),
        ])
    }
}

/// The queue of the daemon serving `api` (`unix:PATH`): `cni-delete-queue` beside the
/// socket, so daemons with sockets in different directories (the lab's nodes) never
/// share one. None for a TCP API: a plugin on another machine cannot hand files over.
pub fn queue_dir(api: &str) -> Option<PathBuf> {
    let socket = Path::new(api.strip_prefix("unix:")?);
    Some(socket.parent()?.join("cni-delete-queue"))
}

/// Records a DEL for the daemon to finish. The file appears whole (written aside, then
/// renamed), so a daemon draining meanwhile never reads half of it.
pub fn enqueue(dir: &Path, del: &QueuedDelete) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let name = format!(
        "{}-{}.json",
        sanitize(&del.container_id),
        sanitize(&del.ifname)
    );
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let body = serde_json::to_vec(del).context("encode queued DEL")?;
    std::fs::write(&tmp, body).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(path)
}

/// A file name part that cannot climb out of the queue directory.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect()
}

/// Detaches this node's tasks named by each queued DEL, then removes its file. Returns
/// how many tasks were detached. A file that cannot be parsed is moved aside with a
/// `.bad` suffix (and logged) so that it does not block the queue.
pub async fn drain(view: &View, node: &str, dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    let mut files = vec![];
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Ok(0);
    }
    let st = view.state();
    let mut detached = 0;
    for path in files {
        let del: QueuedDelete = match std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice(&b)?))
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("queued CNI DEL {}: {e}; set aside", path.display());
                let _ = std::fs::rename(&path, path.with_extension("bad"));
                continue;
            }
        };
        let labels = del.labels();
        for task in st
            .tasks
            .values()
            .filter(|t| t.node == node && labels.iter().all(|(k, v)| t.labels.get(k) == Some(v)))
        {
            match state::detach_task(view, &task.id).await {
                Ok(_) | Err(state::Error::NotFound(_)) => detached += 1,
                Err(e) => return Err(e).context("detach a task of a queued CNI DEL"),
            }
            tracing::info!(
                task = task.name,
                container = del.container_id,
                "finished a CNI DEL queued while netd was down"
            );
        }
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_sits_beside_a_unix_socket_only() {
        assert_eq!(
            queue_dir("unix:/run/netd/netd.sock"),
            Some(PathBuf::from("/run/netd/cni-delete-queue"))
        );
        assert_eq!(queue_dir("tcp:127.0.0.1:9000"), None);
    }

    #[test]
    fn a_queued_delete_is_one_whole_file_inside_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let del = QueuedDelete {
            container_id: "../../etc/x".into(),
            ifname: "eth0".into(),
        };
        let path = enqueue(dir.path(), &del).unwrap();
        assert_eq!(path.parent(), Some(dir.path()));
        let back: QueuedDelete = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, del);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file stays behind");
    }

    #[tokio::test]
    async fn draining_detaches_only_this_nodes_labelled_tasks_and_empties_the_queue() {
        use crate::state::{attach_task, fixture, TaskAttach};
        let (_dir, s) = fixture::setup().await;
        fixture::add_node(&s, "n2").await;
        fixture::web_on_front(&s).await;
        let del = QueuedDelete {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        for (netns, node) in [("/run/netns/a", "n1"), ("/run/netns/b", "n2")] {
            let req = TaskAttach {
                service: "web".into(),
                netns: netns.into(),
                node: Some(node.into()),
                labels: del.labels(),
                ..Default::default()
            };
            attach_task(&s, "n1", req).await.unwrap();
        }
        let queue = tempfile::tempdir().unwrap();
        enqueue(queue.path(), &del).unwrap();
        std::fs::write(queue.path().join("junk.json"), b"{").unwrap();
        assert_eq!(drain(&s, "n1", queue.path()).await.unwrap(), 1);
        let st = crate::state::State::load(s.store()).await.unwrap();
        let nodes: Vec<&str> = st.tasks.values().map(|t| t.node.as_str()).collect();
        assert_eq!(nodes, ["n2"], "n2's attachment of the same container stays");
        let left: Vec<String> = std::fs::read_dir(queue.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["junk.bad"]);
        assert_eq!(drain(&s, "n1", queue.path()).await.unwrap(), 0);
    }
}
