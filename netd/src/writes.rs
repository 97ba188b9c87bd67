//! Counts what netd changes in the kernel, by kind, since it started. A restarted netd
//! that finds everything right must not change anything; `netd status` shows these
//! counters so that a user (and the tests) can see that it did not.

use std::sync::atomic::{AtomicU64, Ordering};

/// What was written.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// An rtnetlink request that adds, changes or removes a link, address, route or
    /// neighbour entry.
    Netlink,
    /// An nftables ruleset loaded (`nft -f`).
    Nftables,
    /// A sysctl written (one whose value differed).
    Sysctl,
    /// An eBPF/XDP map change: a VIP or published port switched to new backends or
    /// removed, or a task namespace's entry added or removed.
    Bpf,
    /// A DNS socket bound in a task namespace (not one taken over from the netd before).
    DnsSocket,
    /// A connection-tracking entry deleted (a flow to a task that went away).
    Conntrack,
}

const KINDS: [(Kind, &str); 6] = [
    (Kind::Netlink, "netlink"),
    (Kind::Nftables, "nftables"),
    (Kind::Sysctl, "sysctl"),
    (Kind::Bpf, "bpf"),
    (Kind::DnsSocket, "dns_sockets"),
    (Kind::Conntrack, "conntrack"),
];

static COUNTS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Records `n` writes of `kind`.
pub fn count(kind: Kind, n: u64) {
    COUNTS[kind as usize].fetch_add(n, Ordering::Relaxed);
}

/// Every kind's count, for `netd status`.
pub fn snapshot() -> serde_json::Map<String, serde_json::Value> {
    KINDS
        .iter()
        .map(|(k, name)| {
            (
                name.to_string(),
                COUNTS[*k as usize].load(Ordering::Relaxed).into(),
            )
        })
        .collect()
}
