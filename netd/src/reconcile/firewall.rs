//! The firewall applier: the node's nftables table (masquerade, isolation, published
//! ports, VXLAN from members only, tasks kept off the node), the ingress sandbox's DNAT,
//! and the port security of every overlay sandbox. Each `ip` table's rules are filled
//! anew in one transaction, its hooked chains kept (`nftables::in_place`); a sandbox's
//! bridge table is replaced whole; a step after a change trusts the tag it applied last and
//! runs no `nft` for a table whose rules did not change, while the periodic step reads
//! the kernel again and repairs drift. Connection tracking is netfilter's too: the
//! flows translated to a task that went away are deleted here.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, Result};
use async_trait::async_trait;
use ipnetwork::Ipv4Network;

use super::Firewall;
use crate::conntrack;
use crate::netns::{self, Netns};
use crate::nftables::{self, Ruleset, SandboxGuards};

#[derive(Default)]
pub struct KernelFirewall {
    /// The tag last applied per (namespace inode, table).
    tags: std::sync::Mutex<HashMap<(u64, &'static str), String>>,
    /// VXLAN datagrams from non-members dropped by node tables that were removed
    /// since start (a table made again counts from zero).
    vxlan_foreign: AtomicU64,
    /// The same for tasks' connections to the node or the store.
    task_to_node: AtomicU64,
    /// The same for packets from the gwbridge with a foreign source.
    mesh_foreign_src: AtomicU64,
    /// Tracked flows deleted because their task went away.
    flows_removed: AtomicU64,
    /// Published-port flows counted by ingress sandbox tables that were removed since
    /// start.
    port_flows: AtomicU64,
    /// The highest count of them shown: a scrape between a table's removal and the
    /// sum's update must not see the counter go down.
    port_flows_shown: AtomicU64,
}

/// The inode of a namespace's file: a namespace made anew has another.
fn netns_inode(ns: &Netns) -> Option<u64> {
    let path = match ns {
        Netns::Home => std::path::Path::new("/proc/self/ns/net"),
        Netns::Path(p) => p.as_path(),
    };
    std::fs::metadata(path)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// A named counter of the node's netd table, plus what the tables it removed counted.
async fn counted(name: &'static str, replaced: &AtomicU64) -> u64 {
    let now = tokio::task::spawn_blocking(move || nftables::counter(name))
        .await
        .ok()
        .flatten()
        .unwrap_or(0);
    now + replaced.load(Ordering::Relaxed)
}

impl KernelFirewall {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether table `table` in `ns` is known to hold `tag` already (only trusted when
    /// the step does not read the kernel anyway).
    fn known(&self, ns: &Netns, table: &'static str, tag: &str, checked: bool) -> bool {
        if checked {
            return false;
        }
        let Some(ino) = netns_inode(ns) else {
            return false;
        };
        self.tags
            .lock()
            .map(|m| m.get(&(ino, table)).map(String::as_str) == Some(tag))
            .unwrap_or(false)
    }

    fn applied(&self, ns: &Netns, table: &'static str, tag: String) {
        if let (Some(ino), Ok(mut m)) = (netns_inode(ns), self.tags.lock()) {
            m.insert((ino, table), tag);
        }
    }

    /// Runs `forget` for each address of `to` in `ns`, and counts what it deleted.
    async fn forget_each(
        &self,
        ns: &Netns,
        to: Vec<Ipv4Addr>,
        forget: fn(Ipv4Addr) -> Result<u64>,
    ) -> Result<u64> {
        let n = netns::run_in(ns, move || {
            to.iter().map(|a| forget(*a)).sum::<Result<u64>>()
        })
        .await?;
        self.flows_removed.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}

#[async_trait]
impl Firewall for KernelFirewall {
    async fn node(&self, rules: Ruleset, checked: bool) -> Result<()> {
        let tag = rules.hash_hex();
        if self.known(&Netns::Home, "ip", &tag, checked) {
            return Ok(());
        }
        let applied = tokio::task::spawn_blocking(move || nftables::apply(&rules))
            .await
            .map_err(|e| anyhow!("{e}"))??;
        self.applied(&Netns::Home, "ip", tag);
        self.vxlan_foreign
            .fetch_add(applied.vxlan_foreign_before, Ordering::Relaxed);
        self.task_to_node
            .fetch_add(applied.task_to_node_before, Ordering::Relaxed);
        self.mesh_foreign_src
            .fetch_add(applied.mesh_foreign_src_before, Ordering::Relaxed);
        Ok(())
    }

    async fn namespace(&self, ns: &Netns, rules: Ruleset, checked: bool) -> Result<()> {
        let tag = rules.hash_hex();
        if self.known(ns, "ip", &tag, checked) {
            return Ok(());
        }
        let applied = netns::run_in(ns, move || nftables::apply(&rules)).await?;
        self.applied(ns, "ip", tag);
        self.port_flows
            .fetch_add(applied.port_flows_before, Ordering::Relaxed);
        Ok(())
    }

    async fn guards(&self, ns: &Netns, guards: SandboxGuards, checked: bool) -> Result<()> {
        let tag = guards.tag();
        if self.known(ns, "bridge", &tag, checked) {
            return Ok(());
        }
        netns::run_in(ns, move || nftables::apply_guards(&guards)).await?;
        self.applied(ns, "bridge", tag);
        Ok(())
    }

    async fn vxlan_foreign_dropped(&self) -> u64 {
        counted(nftables::VXLAN_FOREIGN, &self.vxlan_foreign).await
    }

    async fn task_to_node_dropped(&self) -> u64 {
        counted(nftables::TASK_TO_NODE, &self.task_to_node).await
    }

    async fn mesh_foreign_src_dropped(&self) -> u64 {
        counted(nftables::MESH_FOREIGN_SRC, &self.mesh_foreign_src).await
    }

    async fn port_flows(&self, ns: &Netns) -> Option<u64> {
        let now = netns::run_in(ns, || Ok(nftables::counter(nftables::PORT_FLOWS)))
            .await
            .ok()
            .flatten()?;
        let total = now + self.port_flows.load(Ordering::Relaxed);
        Some(
            self.port_flows_shown
                .fetch_max(total, Ordering::Relaxed)
                .max(total),
        )
    }

    async fn forget_flows(&self, ns: &Netns, to: Vec<Ipv4Addr>) -> Result<u64> {
        self.forget_each(ns, to, conntrack::forget_replies_from)
            .await
    }

    async fn forget_unanswered(&self, ns: &Netns, to: Vec<Ipv4Addr>) -> Result<u64> {
        self.forget_each(ns, to, conntrack::forget_unanswered_by)
            .await
    }

    async fn forget_flows_except(
        &self,
        ns: &Netns,
        within: Ipv4Network,
        keep: BTreeSet<Ipv4Addr>,
    ) -> Result<u64> {
        let n = netns::run_in(ns, move || {
            conntrack::reply_sources()?
                .into_iter()
                .filter(|(a, _)| within.contains(*a) && !keep.contains(a))
                .map(|(a, _)| conntrack::forget_replies_from(a))
                .sum::<Result<u64>>()
        })
        .await?;
        self.flows_removed.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    fn flows_removed(&self) -> u64 {
        self.flows_removed.load(Ordering::Relaxed)
    }
}
