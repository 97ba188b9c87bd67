//! The routing mesh's way back, so that a task behind a published port sees its client's
//! own address (`--mesh-source client`, docs/architecture.md "Source address"). No
//! ingress sandbox masquerades; instead every mesh packet to or from a task passes
//! through the ingress sandbox of the task's own node, whose conntrack remembers per flow
//! which node took it (a zone for the flow's original tuple and a mark, both from the
//! source MAC of that node's sandbox), and the mark picks a table whose one route leads
//! back to that node. What must be written where, computed here without a kernel;
//! `reconcile::links` writes the rules and routes, `nftables` the zone and mark rules.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnetwork::Ipv4Network;

use crate::netlink::{Rule, RuleSelector, TableRoute};

/// Where a published task's replies go: its own node's ingress sandbox.
pub const TASK_TABLE: u32 = 0x6e64;
/// A table older netds filled (remote published tasks, each through the ingress sandbox
/// of its node): still netd's, so that an upgraded node empties it.
pub const REMOTE_TASKS_TABLE: u32 = 0x6e65;
/// A flow's mark and the table of its way back: this base ORed with the id of the node
/// that took it.
pub const MARK_BASE: u32 = 0x6e64_0000;
/// The bits of [`MARK_BASE`]: a mark under it whose node has no table (gone) is dropped.
pub const MARK_MASK: u32 = 0xffff_0000;
/// The preferences of netd's policy-routing rules, in tasks and ingress sandboxes.
pub const PREFS: RangeInclusive<u32> = 30000..=30999;
const LAST_PREF: u32 = 30999;
/// The kernel's main routing table.
const MAIN_TABLE: u32 = 254;

/// Whether routing table `table` is one of the ingress sandbox's (emptied when nothing
/// wants it: a gone node's).
pub fn sandbox_table(table: u32) -> bool {
    table == REMOTE_TASKS_TABLE || table & MARK_MASK == MARK_BASE
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

/// A node's id in marks, zones and table numbers: its ingress address's offset in the
/// ingress subnet. None outside the subnet or beyond 16 bits (an ingress subnet larger
/// than /16 leaves its upper addresses without a way back).
pub fn node_id(subnet: Ipv4Network, addr: Ipv4Addr) -> Option<u16> {
    if !subnet.contains(addr) {
        return None;
    }
    let offset = u32::from(addr) - u32::from(subnet.network());
    u16::try_from(offset).ok().filter(|id| *id > 0)
}

/// The mark (and table) of flows taken by node `id`.
pub fn mark(id: u16) -> u32 {
    MARK_BASE | u32::from(id)
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

/// The ingress sandbox's share of the way back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SandboxReturn {
    /// Every other live node's ingress sandbox address, with its id: the flows it took
    /// are marked with its id, and their replies go back to it.
    pub nodes: Vec<(Ipv4Addr, u16)>,
}

impl SandboxReturn {
    /// A table per node mark (one preference for all: the marks never overlap, and a
    /// node joining or leaving touches its own rule only), then a blackhole for marks of
    /// nodes that are gone (their replies must not leave by the default route with a
    /// client's address).
    pub fn rules(&self) -> Vec<Rule> {
        let mut rules: Vec<Rule> = self
            .nodes
            .iter()
            .map(|(_, id)| {
                let selector = RuleSelector::Mark(mark(*id), u32::MAX);
                rule(PREFS.start() + 1, selector, Some(mark(*id)))
            })
            .collect();
        let gone = RuleSelector::Mark(MARK_BASE, MARK_MASK);
        rules.push(rule(LAST_PREF, gone, None));
        rules
    }

    /// Each node's table (its ingress sandbox as the default route).
    pub fn tables(&self, oif: u32) -> Vec<(u32, Vec<TableRoute>)> {
        let via = |dst, prefix, gateway| TableRoute {
            dst,
            prefix,
            gateway: Some(gateway),
            oif,
            src: None,
        };
        self.nodes
            .iter()
            .map(|(addr, id)| (mark(*id), vec![via(Ipv4Addr::UNSPECIFIED, 0, *addr)]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn node_ids_are_offsets_in_the_ingress_subnet() {
        let net: Ipv4Network = "198.19.0.0/16".parse().unwrap();
        assert_eq!(node_id(net, ip("198.19.0.2")), Some(2));
        assert_eq!(node_id(net, ip("198.19.1.3")), Some(259));
        assert_eq!(node_id(net, ip("198.19.0.0")), None, "the network address");
        assert_eq!(node_id(net, ip("198.18.0.2")), None, "outside");
        let wide: Ipv4Network = "198.18.0.0/15".parse().unwrap();
        assert_eq!(node_id(wide, ip("198.19.0.1")), None, "beyond 16 bits");
        assert_eq!(mark(259), 0x6e64_0103);
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
    fn a_sandbox_sends_each_reply_back_to_the_node_that_took_it() {
        let s = SandboxReturn {
            nodes: vec![(ip("198.19.0.3"), 3), (ip("198.19.0.4"), 4)],
        };
        let rules = s.rules();
        assert_eq!(
            rules[0].selector,
            RuleSelector::Mark(0x6e64_0003, u32::MAX),
            "node 3's flows"
        );
        assert_eq!(rules[0].table, Some(0x6e64_0003));
        assert_eq!(
            rules[0].pref, rules[1].pref,
            "node rules share a preference"
        );
        let last = rules.last().unwrap();
        assert_eq!(
            (last.selector, last.table),
            (RuleSelector::Mark(MARK_BASE, MARK_MASK), None),
            "a gone node's mark is dropped, after the live ones"
        );
        let tables = s.tables(5);
        assert_eq!(tables[1].0, 0x6e64_0004);
        assert_eq!(tables[1].1[0].gateway, Some(ip("198.19.0.4")));
        assert!(tables.iter().all(|(t, _)| sandbox_table(*t)));
        assert!(
            sandbox_table(REMOTE_TASKS_TABLE),
            "emptied after an upgrade"
        );
        assert!(!sandbox_table(TASK_TABLE) && !sandbox_table(254));
    }
}
