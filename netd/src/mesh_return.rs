//! The routing mesh's way back inside a task, so that a task behind a published port can
//! see its client's own address (`--mesh-source client`, docs/architecture.md "Source
//! address"): a mesh flow reaches the task with the client's address as its source, and
//! the task's answers must leave by its ingress leg (where the program on its port,
//! datapath/task_port.rs, sends each to the node that took the flow), not by its
//! default route. The task's rules and table, computed here without a kernel;
//! `reconcile::links` writes them.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnetwork::Ipv4Network;

use crate::netlink::{Rule, RuleSelector, TableRoute};

/// Where a published task's replies go: its own node's ingress sandbox.
pub const TASK_TABLE: u32 = 0x6e64;
/// The preferences of netd's policy-routing rules, in tasks and ingress sandboxes.
pub const PREFS: RangeInclusive<u32> = 30000..=30999;
/// The kernel's main routing table.
const MAIN_TABLE: u32 = 254;

/// Whether routing table `table` is one older netds filled in the ingress sandbox (a
/// route per remote published task, `0x6e65`; a table per node mark, `0x6e64xxxx`, for
/// the flows a remote task's answers took through there): an upgraded node empties them.
pub fn sandbox_table(table: u32) -> bool {
    table == 0x6e65 || table & 0xffff_0000 == 0x6e64_0000
}

/// A rule at `pref` that looks up `table` (None: drops).
fn rule(pref: u32, selector: RuleSelector, table: Option<u32>) -> Rule {
    Rule {
        pref,
        selector,
        table,
        suppress_default: false,
    }
}

/// Who a task behind a published port sees as its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum MeshSource {
    /// The client's own address and port (the port changes only when two flows would
    /// otherwise look the same to the task).
    #[default]
    Client,
    /// The ingress node's address on the ingress network, as Docker Swarm does (the
    /// kernel path masquerades in the ingress sandbox). Kept for comparison.
    Snat,
}

/// A published task's leg on the ingress network and where its mesh replies go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskReturn {
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Network,
    /// The ingress sandbox of the task's node.
    pub gateway: Ipv4Addr,
    /// The service's UDP target ports published in ingress mode: a server bound to
    /// 0.0.0.0 picks its reply's source by route, before any rule on its address could
    /// apply, so datagrams from these ports take the table too.
    pub udp_ports: Vec<u16>,
}

impl TaskReturn {
    /// First the task's own routes but its default (its networks' subnets: an answer
    /// to a peer on another network or to a node's ingress address goes there as
    /// before), then packets from the task's ingress address (and UDP from its
    /// published target ports) look up [`TASK_TABLE`]. Nothing else of the task
    /// changes: its own connections leave by its default route, DNS stays local.
    pub fn rules(&self) -> Vec<Rule> {
        let own_subnets = Rule {
            suppress_default: true,
            ..rule(*PREFS.start(), RuleSelector::All, Some(MAIN_TABLE))
        };
        let from_ingress = RuleSelector::From(self.ip);
        let mut rules = vec![
            own_subnets,
            rule(PREFS.start() + 1, from_ingress, Some(TASK_TABLE)),
        ];
        rules.extend(self.udp_ports.iter().enumerate().map(|(i, p)| {
            let pref = PREFS.start() + 2 + i as u32;
            rule(pref, RuleSelector::UdpSport(*p), Some(TASK_TABLE))
        }));
        rules.truncate(PREFS.count());
        rules
    }

    /// [`TASK_TABLE`]: the ingress subnet on the link (answers to a node's ingress
    /// address, as under SNAT, go there directly) and everything else through the
    /// node's ingress sandbox, from the task's ingress address.
    pub fn routes(&self, oif: u32) -> Vec<TableRoute> {
        vec![
            TableRoute {
                dst: self.subnet.network(),
                prefix: self.subnet.prefix(),
                gateway: None,
                oif,
                src: None,
            },
            TableRoute {
                dst: Ipv4Addr::UNSPECIFIED,
                prefix: 0,
                gateway: Some(self.gateway),
                oif,
                src: Some(self.ip),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_task_returns_through_its_nodes_sandbox_from_its_ingress_address() {
        let t = TaskReturn {
            ifname: "eth1".into(),
            ip: ip("198.19.0.9"),
            subnet: "198.19.0.0/24".parse().unwrap(),
            gateway: ip("198.19.0.2"),
            udp_ports: vec![53, 80],
        };
        let rules = t.rules();
        assert_eq!(rules.len(), 4);
        assert_eq!(
            (rules[0].selector, rules[0].table, rules[0].suppress_default),
            (RuleSelector::All, Some(254), true),
            "the task's own subnets first, not its default route"
        );
        assert_eq!(rules[1].selector, RuleSelector::From(ip("198.19.0.9")));
        assert_eq!(rules[3].selector, RuleSelector::UdpSport(80));
        assert!(rules[1..].iter().all(|r| r.table == Some(TASK_TABLE)));
        assert!(rules.iter().all(|r| PREFS.contains(&r.pref)));
        let routes = t.routes(7);
        assert_eq!(routes[0].gateway, None, "the ingress subnet on the link");
        assert_eq!(
            (routes[1].prefix, routes[1].gateway, routes[1].src),
            (0, Some(ip("198.19.0.2")), Some(ip("198.19.0.9")))
        );
    }

    #[test]
    fn an_upgraded_sandbox_empties_the_tables_older_netds_made() {
        assert!(sandbox_table(0x6e65) && sandbox_table(0x6e64_0003));
        assert!(!sandbox_table(TASK_TABLE) && !sandbox_table(254));
    }
}
