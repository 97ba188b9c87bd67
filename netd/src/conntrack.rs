//! The kernel path's flow state: connection tracking in netd's namespaces. A flow that
//! the ingress sandbox translated to a task keeps its translation as long as the client
//! keeps sending (a UDP client's socket does so for ever), so when the task goes away
//! its entries would keep steering the client's packets to an address nobody answers.
//! netd deletes them, as kube-proxy does for UDP endpoints that leave.
//!
//! Through Debian's `conntrack` tool, run in the namespace (as netd runs `nft`): a
//! delete is a dump and one message per entry in any case, and the tool's filters are
//! the kernel's.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Deletes the entries of the current namespace whose answers come from `addr` (the
/// flows translated to it); how many.
pub fn forget_replies_from(addr: Ipv4Addr) -> Result<u64> {
    forget(&["--reply-src", &addr.to_string()])
}

/// Deletes the entries of the current namespace translated to `addr` that no
/// connection depends on: TCP handshakes it never answered, and UDP flows; how many.
pub fn forget_unanswered_by(addr: Ipv4Addr) -> Result<u64> {
    let addr = addr.to_string();
    let tcp = forget(&["-p", "tcp", "--state", "SYN_SENT", "--reply-src", &addr])?;
    Ok(tcp + forget(&["-p", "udp", "--reply-src", &addr])?)
}

/// `conntrack -D` with `filter`; how many entries it deleted.
fn forget(filter: &[&str]) -> Result<u64> {
    let out = Command::new("conntrack")
        .arg("-D")
        .args(filter)
        .output()
        .context("run conntrack (is the conntrack package installed?)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It exits 1 when it deleted nothing; the count it prints tells the two apart from
    // a failure.
    match deleted_count(&stderr) {
        Some(n) => {
            crate::writes::count(crate::writes::Kind::Conntrack, n);
            Ok(n)
        }
        None => bail!(
            "conntrack -D {} failed: {}",
            filter.join(" "),
            stderr.trim()
        ),
    }
}

/// The addresses that answer the current namespace's tracked flows (each entry's reply
/// source), with how many entries each.
pub fn reply_sources() -> Result<Vec<(Ipv4Addr, u64)>> {
    let out = Command::new("conntrack")
        .args(["-L"])
        .output()
        .context("run conntrack (is the conntrack package installed?)")?;
    if !out.status.success() {
        bail!(
            "conntrack -L failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_reply_sources(&String::from_utf8_lossy(&out.stdout)))
}

/// "… N flow entries have been deleted." → N.
fn deleted_count(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let (before, _) = l.split_once(" flow entries have been deleted")?;
        before.rsplit(' ').next()?.parse().ok()
    })
}

/// The reply source of each entry of a `conntrack -L` listing (the second `src=` of a
/// line: the first is the original direction's), counted.
fn parse_reply_sources(listing: &str) -> Vec<(Ipv4Addr, u64)> {
    let mut counts = std::collections::BTreeMap::new();
    for line in listing.lines() {
        let reply = line
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("src="))
            .nth(1)
            .and_then(|a| a.parse::<Ipv4Addr>().ok());
        if let Some(a) = reply {
            *counts.entry(a).or_insert(0u64) += 1;
        }
    }
    counts.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deleted_count_is_read_from_the_tools_summary() {
        let out = "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n";
        assert_eq!(deleted_count(out), Some(3));
        let none = "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n";
        assert_eq!(deleted_count(none), Some(0));
        assert_eq!(
            deleted_count("conntrack v1.4.7 (conntrack-tools): Operation not permitted\n"),
            None
        );
    }

    #[test]
    fn reply_sources_are_the_second_source_of_each_entry() {
        let listing = "\
udp      17 29 src=198.18.203.100 dst=172.18.0.2 sport=40000 dport=4568 src=198.19.40.3 dst=198.19.255.2 sport=80 dport=1024 mark=0 use=1
tcp      6 431999 ESTABLISHED src=198.18.203.100 dst=172.18.0.2 sport=40001 dport=4567 src=198.19.40.3 dst=198.19.255.2 sport=80 dport=1025 [ASSURED] mark=0 use=1
udp      17 20 src=198.18.203.101 dst=172.18.0.2 sport=40002 dport=4568 src=198.19.40.4 dst=198.19.255.2 sport=80 dport=1026 mark=0 use=1
icmp     1 29 src=198.18.203.100 dst=172.18.0.2 type=8 code=0 id=7
garbage src=not-an-address src=also-not
";
        assert_eq!(
            parse_reply_sources(listing),
            vec![
                (Ipv4Addr::new(198, 19, 40, 3), 2),
                (Ipv4Addr::new(198, 19, 40, 4), 1)
            ]
        );
    }
}
