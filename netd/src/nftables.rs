//! The node's nftables rules: masquerade for egress, the isolation rules that keep
//! tasks from reaching each other through the gwbridge or across bridge networks, and
//! the DNAT of published ports (the kernel path of the routing mesh, in the node's
//! namespace and in its ingress sandbox).
//!
//! The whole ruleset is rendered from desired state and put in force in one `nft -f`
//! transaction, which fills netd's chains anew without ever removing one that is hooked
//! ([`in_place`]). Its hash is stored as the comment of a table of its own (`netd_tag`),
//! so a reconcile that would render the same rules reads the comment and changes nothing
//! (a restart must not touch the kernel). netd owns the tables named `netd` and
//! `netd_tag` and nothing else.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use ipnetwork::Ipv4Network;

mod table_tag;

pub const TABLE: &str = "netd";

/// One node-local bridge whose traffic needs rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BridgeRules {
    pub ifname: String,
    pub subnet: Ipv4Network,
    /// Internal networks have no egress and no route to anything else.
    pub internal: bool,
}

/// A published port: connections to a local address of the namespace on `port` go to
/// one of `targets` on `target_port`, round-robin (`numgen inc`). Without targets there
/// is no rule, and the kernel refuses the port itself (RST, ICMP port unreachable).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// "tcp" or "udp".
    pub proto: &'static str,
    pub port: u16,
    pub targets: Vec<std::net::Ipv4Addr>,
    pub target_port: u16,
    /// Only packets that came in on this interface (so only in prerouting): the flows
    /// the XDP fast path left to the kernel take a path of their own.
    pub iif: Option<String>,
    /// Only packets to this one of the namespace's addresses, not to any local one.
    pub daddr: Option<std::net::Ipv4Addr>,
}

impl PortRule {
    /// A rule for packets to any local address, from anywhere.
    pub fn new(
        proto: &'static str,
        port: u16,
        targets: Vec<std::net::Ipv4Addr>,
        target_port: u16,
    ) -> Self {
        PortRule {
            proto,
            port,
            targets,
            target_port,
            iif: None,
            daddr: None,
        }
    }

    fn render(&self) -> Option<String> {
        let to = match self.targets.as_slice() {
            [] => return None,
            [one] => format!("{one}"),
            many => {
                let map: Vec<String> = many
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("{i} : {t}"))
                    .collect();
                format!(
                    "numgen inc mod {} map {{ {} }} ",
                    many.len(),
                    map.join(", ")
                )
            }
        };
        let iif = match &self.iif {
            Some(i) => format!("iifname \"{i}\" "),
            None => String::new(),
        };
        let daddr = match self.daddr {
            Some(a) => format!("ip daddr {a}"),
            None => "fib daddr type local".into(),
        };
        Some(format!(
            "{iif}{daddr} {} dport {} counter name \"{PORT_FLOWS}\" dnat to {to}:{}",
            self.proto, self.port, self.target_port
        ))
    }
}

/// Everything the node's rules depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Ruleset {
    /// The gwbridge, when some local task uses it.
    pub gwbridge: Option<BridgeRules>,
    /// The bridge-driver networks present on this node.
    pub bridges: Vec<BridgeRules>,
    /// Published ports answered in this namespace.
    pub ports: Vec<PortRule>,
    /// Interfaces whose outgoing traffic is masqueraded to their address (the ingress
    /// sandbox's leg on the ingress network).
    pub masquerade_out: Vec<String>,
    /// The VXLAN port, where this namespace carries overlays: their datagrams are never
    /// translated, so conntrack only costs them time (they are untracked).
    pub untracked_udp: Option<u16>,
    /// With `untracked_udp`: the underlay addresses VXLAN is accepted from (the other
    /// live nodes); datagrams from anywhere else are counted ([`VXLAN_FOREIGN`]) and
    /// dropped before the VXLAN device sees them (CVE-2023-28840's class: whoever can
    /// send UDP 4789 must not inject frames into a network).
    pub vxlan_members: Vec<std::net::Ipv4Addr>,
    /// The WireGuard port, when this node runs WireGuard for encrypted overlays: taken
    /// only from `vxlan_members`; the encrypted overlays' VXLAN port only from the
    /// WireGuard interface (what reached it any other way was never sealed), and what
    /// the encrypted overlays' VXLAN devices send is marked to be routed into it (see
    /// [`crate::wireguard`]).
    pub wireguard_port: Option<u16>,
    /// Tasks (on the gwbridge and bridge networks) may open connections to the node
    /// itself (`--allow-tasks-to-node`). When false, a new connection from a task to any
    /// of the node's addresses, or to one of `protected` (the store), is counted
    /// ([`TASK_TO_NODE`]) and dropped: whoever runs in a task must not reach etcd, the
    /// API or ssh just because the node routes its egress.
    pub tasks_reach_node: bool,
    /// Services beyond the node that tasks must not reach (etcd's endpoints).
    pub protected: Vec<std::net::SocketAddrV4>,
    /// An ingress sandbox's forward rules for the mesh (see [`crate::mesh_return`]).
    pub mesh_sandbox: Option<MeshSandbox>,
}

/// The ingress sandbox's guards: routed back onto the ingress network, no new flow
/// passes (a task never reaches another task through the mesh; a remote task's flows go
/// straight to it, not through here); routed out towards the node, a new flow must come
/// from a local published task (a datagram from its published UDP port, which its rule
/// sends here), and leaves masqueraded, as egress.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MeshSandbox {
    /// The sandbox's leg on the ingress network.
    pub ifname: String,
    /// The sandbox's leg towards the node.
    pub egress_if: String,
    pub local_tasks: Vec<std::net::Ipv4Addr>,
}

impl MeshSandbox {
    /// Lines of the forward chain and the nat postrouting chain.
    fn render(&self) -> [Vec<String>; 2] {
        let (i, o) = (&self.ifname, &self.egress_if);
        // New flows only: a reply to a client that came in from the node is no new flow.
        let nat = vec![format!("iifname \"{i}\" oifname \"{o}\" masquerade")];
        let mut forward = vec![
            // Nothing conntrack cannot place goes out towards the node (a task's RST of a
            // flow the ingress node already forgot, sent back here): NAT skips such a
            // packet, so it would leave with a task's or a client's address.
            format!("iifname \"{i}\" oifname \"{o}\" ct state invalid counter drop"),
            format!("iifname \"{i}\" oifname \"{i}\" ct state new counter drop"),
        ];
        forward.push(if self.local_tasks.is_empty() {
            format!("iifname \"{i}\" oifname \"{o}\" ct state new counter drop")
        } else {
            let tasks: Vec<String> = self.local_tasks.iter().map(|t| t.to_string()).collect();
            format!(
                "iifname \"{i}\" oifname \"{o}\" ct state new ip saddr != {{ {} }} counter drop",
                tasks.join(", ")
            )
        });
        [forward, nat]
    }
}

/// The named counter of VXLAN datagrams dropped because a non-member sent them.
pub const VXLAN_FOREIGN: &str = "vxlan_foreign";
/// The named counter of new connections from tasks to the node or the store, dropped.
pub const TASK_TO_NODE: &str = "task_to_node";
/// The named counter of packets from the gwbridge whose source is not of its subnet,
/// dropped: the backstop that keeps a client's address (which the routing mesh carries
/// inside the ingress network and sandboxes) from leaving the node unencapsulated.
pub const MESH_FOREIGN_SRC: &str = "mesh_foreign_src";
/// The named counter of flows to published ports the table translated (a nat chain
/// sees a flow's first packet only): in the ingress sandbox, the kernel path's flows.
pub const PORT_FLOWS: &str = "port_flows";

impl Ruleset {
    pub fn is_empty(&self) -> bool {
        self.gwbridge.is_none()
            && self.bridges.is_empty()
            && self.ports.is_empty()
            && self.masquerade_out.is_empty()
            && self.untracked_udp.is_none()
            && self.mesh_sandbox.is_none()
    }

    pub fn hash_hex(&self) -> String {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// The `nft -f` script that makes netd's `ip` table hold this ruleset
    /// ([`in_place`]).
    pub fn render(&self) -> String {
        let tag = self.hash_hex();
        let mut nat = vec![];
        let mut forward = vec![];
        let dnat: Vec<String> = self.ports.iter().filter_map(PortRule::render).collect();
        // The node's own connections have no input interface.
        let dnat_output: Vec<String> = self
            .ports
            .iter()
            .filter(|p| p.iif.is_none())
            .filter_map(PortRule::render)
            .collect();
        // Ports below 32768: the XDP fast path translates to 32768-65535 on the same
        // address, and the two must never pick one port for two flows.
        // Not what the interface itself brought (another node's flow that a sandbox in
        // client mode routes through this one to a local task keeps its client).
        for i in &self.masquerade_out {
            nat.push(format!(
                "iifname != \"{i}\" oifname \"{i}\" meta l4proto {{ tcp, udp }} masquerade to :1024-32767"
            ));
            nat.push(format!("iifname != \"{i}\" oifname \"{i}\" masquerade"));
        }
        let all: Vec<&BridgeRules> = self.gwbridge.iter().chain(self.bridges.iter()).collect();
        for b in &all {
            if !b.internal {
                nat.push(format!(
                    "ip saddr {} oifname != \"{}\" masquerade",
                    b.subnet, b.ifname
                ));
            }
        }
        let mut input = vec![];
        if !self.tasks_reach_node {
            for b in &all {
                let i = &b.ifname;
                for p in &self.protected {
                    forward.push(format!(
                        "iifname \"{i}\" ip daddr {} tcp dport {} counter name \"{TASK_TO_NODE}\" drop",
                        p.ip(),
                        p.port()
                    ));
                }
                // Answers to the node's own connections, and ICMP (errors, ping of the
                // gateway), still come in.
                input.push(format!(
                    "iifname \"{i}\" ct state established,related accept"
                ));
                input.push(format!("iifname \"{i}\" meta l4proto icmp accept"));
                input.push(format!(
                    "iifname \"{i}\" counter name \"{TASK_TO_NODE}\" drop"
                ));
            }
        }
        if let Some(gw) = &self.gwbridge {
            // Docker's icc=false for the gwbridge: tasks use it for egress only, never to
            // reach each other routed through the node. (Bridged between ports, the
            // bridge itself stops them: its ports are isolated.)
            forward.push(format!("iifname \"{0}\" oifname \"{0}\" drop", gw.ifname));
            // Everything the node forwards from the gwbridge comes from an address of
            // it: tasks' egress, answers of published ports (the ingress sandbox's
            // included, after its DNAT is undone), what the sandbox masquerades. A
            // client-addressed packet here is a fault: counted, never sent on.
            forward.push(format!(
                "iifname \"{}\" ip saddr != {} counter name \"{MESH_FOREIGN_SRC}\" drop",
                gw.ifname, gw.subnet
            ));
        }
        // No routed path between two netd bridges (gwbridge included): networks are
        // isolated from one another as in Docker.
        for a in &all {
            for b in &all {
                if a.ifname != b.ifname {
                    forward.push(format!(
                        "iifname \"{}\" oifname \"{}\" drop",
                        a.ifname, b.ifname
                    ));
                }
            }
            if a.internal {
                forward.push(format!("iifname \"{0}\" oifname != \"{0}\" drop", a.ifname));
                forward.push(format!("oifname \"{0}\" iifname != \"{0}\" drop", a.ifname));
            }
        }
        let sealed: Vec<u16> = self
            .wireguard_port
            .map(|p| vec![crate::wireguard::SEALED_VXLAN_PORT, p])
            .unwrap_or_default();
        let raw: Vec<String> = self
            .untracked_udp
            .iter()
            .chain(&sealed)
            .map(|p| format!("udp dport {p} notrack"))
            .collect();
        // What this node's WireGuard sends goes to each peer's own port (nodes may
        // differ): untracked by the port it leaves from.
        let raw_output: Vec<String> = raw
            .iter()
            .cloned()
            .chain(
                self.wireguard_port
                    .map(|p| format!("udp sport {p} notrack")),
            )
            .collect();
        // What an encrypted overlay's VXLAN device sends goes into WireGuard, or nowhere:
        // without a running WireGuard (it failed at this start) it is dropped, never
        // sent in the clear.
        let sealed_port = crate::wireguard::SEALED_VXLAN_PORT;
        let route = vec![match self.wireguard_port {
            Some(_) => format!(
                "udp dport {sealed_port} meta mark set {:#x}",
                crate::wireguard::MARK
            ),
            None => format!("udp dport {sealed_port} drop"),
        }];
        let [mesh_forward, mesh_nat] = self
            .mesh_sandbox
            .as_ref()
            .map(MeshSandbox::render)
            .unwrap_or_default();
        forward.extend(mesh_forward);
        nat.extend(mesh_nat);
        input.extend(
            self.untracked_udp
                .iter()
                .chain(self.wireguard_port.as_ref())
                .map(|p| match self.vxlan_members.as_slice() {
                    [] => format!("udp dport {p} counter name \"{VXLAN_FOREIGN}\" drop"),
                    members => format!(
                        "udp dport {p} ip saddr != {{ {} }} counter name \"{VXLAN_FOREIGN}\" drop",
                        members
                            .iter()
                            .map(|m| m.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }),
        );
        // Whether or not WireGuard runs: an encrypted overlay's VXLAN is taken from it
        // only.
        input.push(format!(
            "udp dport {sealed_port} iifname != \"{}\" counter name \"{VXLAN_FOREIGN}\" drop",
            crate::wireguard::IFNAME
        ));
        let chains: [(&str, &str, &[String]); 8] = [
            ("prerouting", "nat hook prerouting priority dstnat", &dnat),
            ("output", "nat hook output priority -100", &dnat_output),
            ("postrouting", "nat hook postrouting priority srcnat", &nat),
            ("forward", "filter hook forward priority filter", &forward),
            (
                "raw_prerouting",
                "filter hook prerouting priority raw",
                &raw,
            ),
            ("raw_output", "filter hook output priority raw", &raw_output),
            ("route_output", "route hook output priority mangle", &route),
            ("input", "filter hook input priority filter", &input),
        ];
        let counters = [VXLAN_FOREIGN, TASK_TO_NODE, MESH_FOREIGN_SRC, PORT_FLOWS];
        in_place(TABLE_IP, &chains, &counters, &tag)
    }
}

/// Where the tag of an `ip` ruleset is kept (its table's comment), beside the table:
/// the kernel does not change an existing table's comment. A change of the chains
/// `render` makes must rename it: a table whose tag is not found here is made anew.
const TAG_TABLE_IP: &str = "netd_tag";
const TABLE_IP: [&str; 2] = ["ip", TABLE];

/// The `nft -f` script that makes table `family name` hold exactly `chains` (name,
/// hook, rules) and the named `counters`, without ever removing a chain that is hooked:
/// the table and its chains are made if missing, every chain is flushed and filled
/// again in the same transaction, and the tag table is made anew with `tag`.
///
/// Why not delete the table and make it again (what netd did): during that
/// transaction both tables' chains hang on the same hooks, and a packet evaluated by
/// the new chain just before the commit (its rules not in force yet) and by the old
/// one just after (its rules gone) matches neither. A connection's first packet then
/// gets no DNAT at all: a published port's SYN reached the ingress sandbox itself,
/// which answered it with a RST (a refused connection during a rolling update). One
/// chain flushed and filled in one transaction is evaluated whole in one generation.
fn in_place(
    [family, name]: [&str; 2],
    chains: &[(&str, &str, &[String])],
    counters: &[&str],
    tag: &str,
) -> String {
    let mut out = format!("table {family} {name} {{\n");
    for (chain, hook, _) in chains {
        out.push_str(&format!(
            "\tchain {chain} {{\n\t\ttype {hook}; policy accept;\n\t}}\n"
        ));
    }
    for c in counters {
        out.push_str(&format!("\tcounter {c} {{\n\t}}\n"));
    }
    out.push_str("}\n");
    for (chain, _, _) in chains {
        out.push_str(&format!("flush chain {family} {name} {chain}\n"));
    }
    out.push_str(&format!("table {family} {name} {{\n"));
    for (chain, _, rules) in chains {
        out.push_str(&format!("\tchain {chain} {{\n"));
        for r in rules.iter() {
            out.push_str(&format!("\t\t{r}\n"));
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    out.push_str(&format!(
        "add table {family} {TAG_TABLE_IP}\ndelete table {family} {TAG_TABLE_IP}\n\
         table {family} {TAG_TABLE_IP} {{\n\tcomment \"netd:{tag}\"\n}}\n"
    ));
    out
}

/// The script that removes netd's `ip` table and its tag.
fn removal() -> String {
    format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\n\
         add table ip {TAG_TABLE_IP}\ndelete table ip {TAG_TABLE_IP}\n"
    )
}

fn nft(script: &str) -> Result<String> {
    crate::writes::count(crate::writes::Kind::Nftables, 1);
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft (is the nftables package installed?)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())
        .context("write to nft")?;
    let out = child.wait_with_output().context("wait for nft")?;
    if !out.status.success() {
        bail!(
            "nft failed: {}\nscript:\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The comment of table `[FAMILY, NAME]` ("" for none), None if there is no such
/// table: read over netlink (no process), or by `nft` where that fails.
fn comment_of(table: &[&str]) -> Result<Option<String>> {
    if let ([family, name], Some(f)) = (table, table.first().and_then(|f| table_tag::family(f))) {
        match table_tag::table_comment(f, name) {
            Ok(comment) => return Ok(comment),
            Err(e) => tracing::debug!("read table {family} {name} over netlink: {e}"),
        }
    }
    let out = Command::new("nft")
        .args(["list", "table"])
        .args(table)
        .output()
        .context("run nft list")?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(Some(
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("comment \"")
                    .and_then(|s| s.strip_suffix('"'))
            })
            .unwrap_or("")
            .to_string(),
    ))
}

/// The hash tag a table's comment holds (`netd:TAG`), if the table exists and has one.
fn current_tag(table: &[&str]) -> Result<Option<String>> {
    Ok(comment_of(table)?.and_then(|c| c.strip_prefix("netd:").map(str::to_string)))
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub changed: bool,
    /// The [`VXLAN_FOREIGN`] count of the table it removed (a table made again starts
    /// counting from zero, so the caller keeps the sum; an update keeps the counters).
    pub vxlan_foreign_before: u64,
    /// The same for [`TASK_TO_NODE`].
    pub task_to_node_before: u64,
    /// The same for [`MESH_FOREIGN_SRC`].
    pub mesh_foreign_src_before: u64,
    /// The same for [`PORT_FLOWS`].
    pub port_flows_before: u64,
}

/// Makes the kernel's netd tables match `rules` (removing them when there are none).
/// Runs in the caller's netns (nft inherits it).
pub fn apply(rules: &Ruleset) -> Result<Applied> {
    let current = current_tag(&["ip", TAG_TABLE_IP])?;
    let table = comment_of(&TABLE_IP)?.is_some();
    let unchanged = if rules.is_empty() {
        current.is_none() && !table
    } else {
        table && current.as_deref() == Some(rules.hash_hex().as_str())
    };
    if unchanged {
        return Ok(Applied::default());
    }
    // A table without a tag beside it was made by a netd before `in_place`, whose
    // chains may differ: made anew, once.
    let anew = rules.is_empty() || (table && current.is_none());
    // The counters go only with the table (an update keeps them counting).
    let before = |name| match (table, anew) {
        (true, true) => counter(name).unwrap_or(0),
        _ => 0,
    };
    let (vxlan_foreign_before, task_to_node_before) = (before(VXLAN_FOREIGN), before(TASK_TO_NODE));
    let mesh_foreign_src_before = before(MESH_FOREIGN_SRC);
    let port_flows_before = before(PORT_FLOWS);
    if rules.is_empty() {
        nft(&removal())?;
    } else if anew {
        nft(&format!("{}{}", removal(), rules.render()))?;
    } else {
        nft(&rules.render())?;
    }
    Ok(Applied {
        changed: true,
        vxlan_foreign_before,
        task_to_node_before,
        mesh_foreign_src_before,
        port_flows_before,
    })
}

/// Packets counted so far by netd's named counter `name` in this netns (None: no such
/// counter).
pub fn counter(name: &str) -> Option<u64> {
    let out = Command::new("nft")
        .args(["list", "counter", "ip", TABLE, name])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_packets(&String::from_utf8_lossy(&out.stdout))
}

/// The `packets N` of an `nft list counter` answer.
fn parse_packets(text: &str) -> Option<u64> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// One task port of a bridge (the host side of an endpoint) and the only addresses that
/// may come in through it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortGuard {
    pub ifname: String,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    /// The port may only talk to [`SandboxGuards::mesh`] (a task's leg on the ingress
    /// network: that network carries the routing mesh, not traffic between tasks).
    pub confined: bool,
    /// The port is a router's (the node's ingress sandbox): it forwards packets of
    /// other sources (the mesh's clients), so only its MAC and ARP are checked.
    pub router: bool,
}

/// Everything a sandbox's bridge table enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SandboxGuards {
    pub ports: Vec<PortGuard>,
    /// The addresses confined ports may send to and ask ARP for: the ingress sandboxes
    /// of every node (Docker's ingress network lets any published task reach any other
    /// published task, of any service and network; netd's does not).
    pub mesh: Vec<std::net::Ipv4Addr>,
}

impl SandboxGuards {
    fn sorted(&self) -> SandboxGuards {
        let mut s = self.clone();
        s.ports.sort();
        s.mesh.sort();
        s.mesh.dedup();
        s
    }

    /// The tag of these guards (in any order), as their table's comment holds it.
    pub fn tag(&self) -> String {
        let mut h = DefaultHasher::new();
        self.sorted().hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// The bridge-family table of a sandbox: a frame from a task port whose source MAC
    /// or IP is not the task's, an ARP message claiming another address, or anything but
    /// IPv4 and ARP, is dropped at the port (as a switch's port security does); a
    /// confined port's frames to anything but the mesh are dropped too. Both the forward
    /// hook (to other ports and the VXLAN device) and the input hook (to the sandbox
    /// itself) jump to the same rules. Each check is one set lookup keyed by the input
    /// port, so a frame costs the same whatever the number of tasks (a rule per port made
    /// every frame walk them all).
    fn render(&self, tag: &str) -> String {
        let join = |items: Vec<String>| items.join(", ");
        let each = |f: &dyn Fn(&PortGuard) -> String| join(self.ports.iter().map(f).collect());
        let ports = each(&|g| format!("\"{}\"", g.ifname));
        let macs = each(&|g| format!("\"{}\" . {}", g.ifname, g.mac));
        let hosts = each(&|g| format!("\"{}\" . {} . {}", g.ifname, g.mac, g.ip));
        let addrs = each(&|g| format!("\"{}\" . {}", g.ifname, g.ip));
        let confined: Vec<String> = self
            .ports
            .iter()
            .filter(|g| g.confined)
            .map(|g| format!("\"{}\"", g.ifname))
            .collect();
        let confinement = if confined.is_empty() || self.mesh.is_empty() {
            String::new()
        } else {
            let mesh = join(self.mesh.iter().map(|a| a.to_string()).collect());
            // Frames go to the sandboxes' MACs, whatever their IP destination: a task's
            // answer to a mesh client carries the client's address.
            let mesh_macs = join(
                self.mesh
                    .iter()
                    .map(|a| crate::model::format_mac(&crate::model::mac_for_ip(*a)))
                    .collect(),
            );
            format!(
                "\tset confined {{\n\t\ttype ifname\n\t\telements = {{ {} }}\n\t}}\n\
                 \tset mesh {{\n\t\ttype ipv4_addr\n\t\telements = {{ {mesh} }}\n\t}}\n\
                 \tset mesh_macs {{\n\t\ttype ether_addr\n\t\telements = {{ {mesh_macs} }}\n\t}}\n\
                 \tchain confine {{\n\
                 \t\tether type ip ether daddr != @mesh_macs counter drop\n\
                 \t\tether type arp arp daddr ip != @mesh counter drop\n\
                 \t}}\n",
                join(confined)
            )
        };
        let routers: Vec<String> = self
            .ports
            .iter()
            .filter(|g| g.router)
            .map(|g| format!("\"{}\"", g.ifname))
            .collect();
        let (routers_set, routers_return) = if routers.is_empty() {
            (String::new(), "")
        } else {
            (
                format!(
                    "\tset routers {{\n\t\ttype ifname\n\t\telements = {{ {} }}\n\t}}\n",
                    join(routers)
                ),
                "\t\tiifname @routers return\n",
            )
        };
        let jump_confine = if confinement.is_empty() {
            ""
        } else {
            "\t\tiifname @confined jump confine\n"
        };
        format!(
            "add table bridge {TABLE}\ndelete table bridge {TABLE}\n\
             table bridge {TABLE} {{\n\tcomment \"netd:{tag}\"\n\
             \tset ports {{\n\t\ttype ifname\n\t\telements = {{ {ports} }}\n\t}}\n\
             \tset macs {{\n\t\ttype ifname . ether_addr\n\t\telements = {{ {macs} }}\n\t}}\n\
             \tset addrs {{\n\t\ttype ifname . ipv4_addr\n\t\telements = {{ {addrs} }}\n\t}}\n\
             \tset hosts {{\n\t\ttype ifname . ether_addr . ipv4_addr\n\t\telements = {{ {hosts} }}\n\t}}\n\
             {confinement}{routers_set}\
             \tchain ports {{\n\
             \t\tiifname != @ports return\n\
             \t\tiifname . ether saddr != @macs counter drop\n\
             \t\tether type != {{ ip, arp }} counter drop\n\
             \t\tether type arp iifname . arp saddr ether . arp saddr ip != @hosts counter drop\n\
             {routers_return}\
             \t\tether type ip iifname . ip saddr != @addrs counter drop\n\
             {jump_confine}\
             \t}}\n\
             \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tjump ports\n\t}}\n\
             \tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\t\tjump ports\n\t}}\n}}\n"
        )
    }
}

/// Makes the caller's netns hold exactly `guards` (no table without any port). Returns
/// whether anything changed.
pub fn apply_guards(guards: &SandboxGuards) -> Result<bool> {
    let sorted = guards.sorted();
    let tag = sorted.tag();
    let current = current_tag(&["bridge", TABLE])?;
    if sorted.ports.is_empty() {
        if current.is_none() {
            return Ok(false);
        }
        nft(&format!(
            "add table bridge {TABLE}\ndelete table bridge {TABLE}\n"
        ))?;
        return Ok(true);
    }
    if current.as_deref() == Some(tag.as_str()) {
        return Ok(false);
    }
    nft(&sorted.render(&tag))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(name: &str, subnet: &str, internal: bool) -> BridgeRules {
        BridgeRules {
            ifname: name.into(),
            subnet: subnet.parse().unwrap(),
            internal,
        }
    }

    /// The handle of netd's ip table and of each of its chains (`nft -a`): a table
    /// made anew gets another (tables count per namespace, chains per table).
    fn table_handles() -> Vec<String> {
        let out = Command::new("nft")
            .args(["-a", "list", "table", "ip", TABLE])
            .output()
            .expect("run nft (package nftables)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                l.starts_with("chain ") || l.starts_with("table ")
            })
            .map(|l| l.trim().to_string())
            .collect()
    }

    /// Against the kernel, in a namespace of its own (root and `nft` needed, as for the
    /// lab): a new ruleset replaces the rules of the chains already hooked, never the
    /// chains themselves (see [`in_place`]); the tag says which ruleset is in force, the
    /// same ruleset again changes nothing, and no ruleset removes both tables.
    #[test]
    fn a_new_ruleset_fills_the_chains_in_place() {
        let port = |target: &str| Ruleset {
            ports: vec![PortRule::new(
                "tcp",
                4567,
                vec![target.parse().unwrap()],
                80,
            )],
            ..Default::default()
        };
        let got = std::thread::spawn(move || -> Result<_, String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare a network namespace (needs root): {e}"))?;
            let (a, b) = (port("198.19.1.1"), port("198.19.1.2"));
            apply(&a).map_err(|e| format!("{e:#}"))?;
            let handles = table_handles();
            let b_applied = apply(&b).map_err(|e| format!("{e:#}"))?.changed;
            let listing = Command::new("nft")
                .args(["list", "chain", "ip", TABLE, "prerouting"])
                .output()
                .map_err(|e| e.to_string())?;
            let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
            let tag = current_tag(&["ip", TAG_TABLE_IP]).map_err(|e| e.to_string())?;
            let again = apply(&b).map_err(|e| format!("{e:#}"))?.changed;
            let after = table_handles();
            apply(&Ruleset::default()).map_err(|e| format!("{e:#}"))?;
            let gone = (
                comment_of(&TABLE_IP).map_err(|e| e.to_string())?,
                comment_of(&["ip", TAG_TABLE_IP]).map_err(|e| e.to_string())?,
            );
            Ok((
                handles,
                after,
                b_applied,
                listing,
                tag,
                again,
                gone,
                b.hash_hex(),
            ))
        })
        .join()
        .unwrap();
        let (handles, after, b_applied, listing, tag, again, gone, b_tag) = got.unwrap();
        assert_eq!(handles.len(), 9, "{handles:?}");
        assert!(handles[0].contains("# handle"), "{handles:?}");
        assert_eq!(handles, after, "the table was made anew");
        assert!(b_applied);
        assert!(
            listing.contains("198.19.1.2") && !listing.contains("198.19.1.1"),
            "{listing}"
        );
        assert_eq!(tag, Some(b_tag));
        assert!(!again, "the same ruleset again changed the table");
        assert_eq!(gone, (None, None));
    }

    /// Against the kernel: a table an older netd made (its tag its own comment, a chain
    /// netd makes no more) is made anew, once; a tag whose table went is no table.
    #[test]
    fn a_table_of_an_older_netd_is_made_anew() {
        let rules = Ruleset {
            ports: vec![PortRule::new(
                "tcp",
                4567,
                vec!["198.19.1.2".parse().unwrap()],
                80,
            )],
            ..Default::default()
        };
        let got = std::thread::spawn(move || -> Result<_, String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare a network namespace (needs root): {e}"))?;
            let nft_run = |script: &str| -> Result<(), String> {
                let o = Command::new("nft")
                    .arg(script)
                    .output()
                    .map_err(|e| format!("run nft (package nftables): {e}"))?;
                o.status
                    .success()
                    .then_some(())
                    .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
            };
            nft_run(
                "table ip netd { comment \"netd:old\" ; chain mangle_prerouting { type filter hook prerouting priority mangle ; policy accept ; } ; }",
            )?;
            apply(&rules).map_err(|e| format!("{e:#}"))?;
            let upgraded = table_handles();
            let again = apply(&rules).map_err(|e| format!("{e:#}"))?.changed;
            nft_run("delete table ip netd")?;
            let remade = apply(&rules).map_err(|e| format!("{e:#}"))?.changed;
            let there = comment_of(&TABLE_IP).map_err(|e| e.to_string())?.is_some();
            Ok((upgraded, again, remade, there))
        })
        .join()
        .unwrap();
        let (upgraded, again, remade, there) = got.unwrap();
        assert_eq!(upgraded.len(), 9, "{upgraded:?}");
        assert!(
            !upgraded.iter().any(|c| c.contains("mangle_prerouting")),
            "{upgraded:?}"
        );
        assert!(!again, "made anew more than once");
        assert!(
            remade && there,
            "a tag without its table kept the table away"
        );
    }

    #[test]
    fn an_update_never_removes_netds_table() {
        let s = Ruleset {
            untracked_udp: Some(4789),
            ..Default::default()
        }
        .render();
        assert!(
            !s.lines().any(|l| l == format!("delete table ip {TABLE}")),
            "{s}"
        );
        for chain in ["prerouting", "output", "postrouting", "forward", "input"] {
            assert!(
                s.contains(&format!("flush chain ip {TABLE} {chain}\n")),
                "{s}"
            );
        }
        assert!(
            s.contains(&format!("delete table ip {TAG_TABLE_IP}\n")),
            "{s}"
        );
    }

    #[test]
    fn nothing_leaves_the_gwbridge_with_a_source_not_of_it() {
        let r = Ruleset {
            gwbridge: Some(bridge("netd_gwbridge", "198.18.1.0/24", false)),
            ..Default::default()
        };
        let s = r.render();
        let fwd = &s[s.rfind("chain forward").unwrap()..s.rfind("chain raw_prerouting").unwrap()];
        assert!(fwd.contains(
            r#"iifname "netd_gwbridge" ip saddr != 198.18.1.0/24 counter name "mesh_foreign_src" drop"#
        ));
        assert!(s.contains("counter mesh_foreign_src {"));
    }

    #[test]
    fn tasks_reach_neither_the_node_nor_the_store_unless_allowed() {
        let mut r = Ruleset {
            gwbridge: Some(bridge("netd_gwbridge", "198.18.1.0/24", false)),
            protected: vec!["198.18.0.2:2379".parse().unwrap()],
            ..Default::default()
        };
        let s = r.render();
        let fwd = &s[s.rfind("chain forward").unwrap()..s.rfind("chain raw_prerouting").unwrap()];
        let input = &s[s.rfind("chain input").unwrap()..];
        assert!(fwd.contains(
            r#"iifname "netd_gwbridge" ip daddr 198.18.0.2 tcp dport 2379 counter name "task_to_node" drop"#
        ));
        let accept = input
            .find(r#"iifname "netd_gwbridge" ct state established,related accept"#)
            .expect("answers to the node's own connections");
        let drop = input
            .find(r#"iifname "netd_gwbridge" counter name "task_to_node" drop"#)
            .expect("new connections to the node dropped");
        assert!(accept < drop);
        r.tasks_reach_node = true;
        assert!(!r.render().contains(r#"name "task_to_node" drop"#));
    }

    #[test]
    fn gwbridge_gets_masquerade_and_no_task_to_task_path() {
        let r = Ruleset {
            gwbridge: Some(bridge("netd_gwbridge", "198.18.1.0/24", false)),
            ..Default::default()
        };
        let s = r.render();
        assert!(s.contains("ip saddr 198.18.1.0/24 oifname != \"netd_gwbridge\" masquerade"));
        assert!(s.contains("iifname \"netd_gwbridge\" oifname \"netd_gwbridge\" drop"));
        assert!(s.contains(&format!("comment \"netd:{}\"", r.hash_hex())));
    }

    #[test]
    fn bridges_are_isolated_and_internal_ones_have_no_egress() {
        let r = Ruleset {
            bridges: vec![
                bridge("ndbra", "198.19.0.0/24", false),
                bridge("ndbrb", "198.19.1.0/24", true),
            ],
            ..Default::default()
        };
        let s = r.render();
        assert!(s.contains("iifname \"ndbra\" oifname \"ndbrb\" drop"));
        assert!(s.contains("iifname \"ndbrb\" oifname \"ndbra\" drop"));
        assert!(s.contains("198.19.0.0/24 oifname != \"ndbra\" masquerade"));
        assert!(!s.contains("198.19.1.0/24 oifname"));
        assert!(s.contains("iifname \"ndbrb\" oifname != \"ndbrb\" drop"));
    }

    #[test]
    fn published_ports_are_dnat_round_robin_and_absent_without_targets() {
        let r = Ruleset {
            ports: vec![
                PortRule {
                    iif: Some("eth0".into()),
                    ..PortRule::new("tcp", 4567, vec!["198.18.1.253".parse().unwrap()], 4567)
                },
                PortRule::new(
                    "tcp",
                    4567,
                    vec![
                        "198.19.255.5".parse().unwrap(),
                        "198.19.255.6".parse().unwrap(),
                    ],
                    80,
                ),
                PortRule {
                    daddr: Some("198.18.1.253".parse().unwrap()),
                    ..PortRule::new("udp", 4568, vec!["198.19.255.5".parse().unwrap()], 80)
                },
                PortRule::new("udp", 4568, vec!["198.18.1.254".parse().unwrap()], 4568),
                PortRule::new("tcp", 4569, vec![], 80),
            ],
            masquerade_out: vec!["eth0".into()],
            untracked_udp: Some(4789),
            ..Default::default()
        };
        let s = r.render();
        // Overlay datagrams skip conntrack both ways.
        assert_eq!(s.matches("udp dport 4789 notrack").count(), 2, "{s}");
        let rr = "fib daddr type local tcp dport 4567 counter name \"port_flows\" dnat to numgen inc mod 2 map \
                  { 0 : 198.19.255.5, 1 : 198.19.255.6 } :80";
        // In prerouting (from outside) and output (from the node itself).
        assert_eq!(s.matches(rr).count(), 2, "{s}");
        assert!(s.contains("fib daddr type local udp dport 4568 counter name \"port_flows\" dnat to 198.18.1.254:4568"));
        // Narrowed rules: by input interface in prerouting only, by address in both;
        // each ahead of the port's general rule.
        let by_iif =
            "iifname \"eth0\" fib daddr type local tcp dport 4567 counter name \"port_flows\" dnat to 198.18.1.253:4567";
        assert_eq!(s.matches(by_iif).count(), 1, "{s}");
        let by_addr = "ip daddr 198.18.1.253 udp dport 4568 counter name \"port_flows\" dnat to 198.19.255.5:80";
        assert_eq!(s.matches(by_addr).count(), 2, "{s}");
        let pre = &s[s.rfind("chain prerouting").unwrap()..s.rfind("chain output").unwrap()];
        assert!(pre.find(by_iif).unwrap() < pre.find(rr).unwrap());
        assert!(!s.contains("4569"));
        assert!(s.contains(
            "iifname != \"eth0\" oifname \"eth0\" meta l4proto { tcp, udp } masquerade to :1024-32767"
        ));
    }

    #[test]
    fn vxlan_is_taken_from_members_only_and_counted() {
        let mut r = Ruleset {
            untracked_udp: Some(4789),
            vxlan_members: vec![
                "198.18.0.11".parse().unwrap(),
                "198.18.0.12".parse().unwrap(),
            ],
            ..Default::default()
        };
        let s = r.render();
        let rule = "udp dport 4789 ip saddr != { 198.18.0.11, 198.18.0.12 } \
                    counter name \"vxlan_foreign\" drop";
        assert!(s.contains(rule), "{s}");
        assert!(s.contains("counter vxlan_foreign"));
        // No other live node: no VXLAN is anyone's.
        r.vxlan_members.clear();
        assert!(r
            .render()
            .contains("udp dport 4789 counter name \"vxlan_foreign\" drop"));
        let listed = "table ip netd {\n counter vxlan_foreign {\n packets 7 bytes 700\n }\n}";
        assert_eq!(parse_packets(listed), Some(7));
        assert_eq!(parse_packets("nothing"), None);
    }

    #[test]
    fn encrypted_vxlan_is_sealed_or_dropped_never_sent_or_taken_in_the_clear() {
        let mut r = Ruleset {
            untracked_udp: Some(4789),
            vxlan_members: vec!["198.18.0.12".parse().unwrap()],
            wireguard_port: Some(51821),
            ..Default::default()
        };
        let s = r.render();
        // Out: marked for the route into ndwg. In: only from ndwg; WireGuard from members.
        assert!(s.contains("type route hook output"), "{s}");
        assert!(s.contains("udp dport 4790 meta mark set 0x6e770001"), "{s}");
        assert!(
            s.contains("udp dport 4790 iifname != \"ndwg\" counter name \"vxlan_foreign\" drop"),
            "{s}"
        );
        assert!(
            s.contains(
                "udp dport 51821 ip saddr != { 198.18.0.12 } counter name \"vxlan_foreign\" drop"
            ),
            "{s}"
        );
        assert!(s.contains("udp dport 51821 notrack"), "{s}");
        // Sent to a peer's port, which may be another: untracked by the port it leaves.
        assert!(s.contains("udp sport 51821 notrack"), "{s}");
        // Without a running WireGuard: dropped on the way out, still only from ndwg in.
        r.wireguard_port = None;
        let s = r.render();
        assert!(s.contains("udp dport 4790 drop"), "{s}");
        assert!(!s.contains("meta mark set"), "{s}");
        assert!(s.contains("udp dport 4790 iifname != \"ndwg\""), "{s}");
        assert!(!s.contains("51821"), "{s}");
    }

    #[test]
    fn task_ports_let_only_the_tasks_own_addresses_in() {
        let g = PortGuard {
            ifname: "ndeabc".into(),
            mac: "02:42:c6:13:00:05".into(),
            ip: "198.19.0.5".parse().unwrap(),
            confined: false,
            router: false,
        };
        let guards = SandboxGuards {
            ports: vec![g],
            mesh: vec![],
        };
        let s = guards.render("t");
        for want in [
            "elements = { \"ndeabc\" }",
            "elements = { \"ndeabc\" . 02:42:c6:13:00:05 }",
            "elements = { \"ndeabc\" . 198.19.0.5 }",
            "elements = { \"ndeabc\" . 02:42:c6:13:00:05 . 198.19.0.5 }",
            "iifname != @ports return",
            "iifname . ether saddr != @macs counter drop",
            "ether type != { ip, arp } counter drop",
            "ether type ip iifname . ip saddr != @addrs counter drop",
            "ether type arp iifname . arp saddr ether . arp saddr ip != @hosts counter drop",
        ] {
            assert!(s.contains(want), "{want} missing in {s}");
        }
        assert_eq!(s.matches("jump ports").count(), 2);
        assert!(!s.contains("confine"));
        assert!(!s.contains("routers"));
    }

    #[test]
    fn ingress_task_ports_talk_to_the_mesh_only() {
        let port = |ifname: &str, ip: &str, confined: bool| PortGuard {
            ifname: ifname.into(),
            mac: "02:42:c6:13:ff:05".into(),
            ip: ip.parse().unwrap(),
            confined,
            router: !confined,
        };
        let guards = SandboxGuards {
            ports: vec![
                port("ndetask", "198.19.255.5", true),
                port("ndesbox", "198.19.255.2", false),
            ],
            mesh: vec![
                "198.19.255.3".parse().unwrap(),
                "198.19.255.2".parse().unwrap(),
            ],
        };
        let s = guards.sorted().render("t");
        for want in [
            "set confined {\n\t\ttype ifname\n\t\telements = { \"ndetask\" }",
            "elements = { 198.19.255.2, 198.19.255.3 }",
            "iifname @confined jump confine",
            "elements = { 02:42:c6:13:ff:02, 02:42:c6:13:ff:03 }",
            "ether type ip ether daddr != @mesh_macs counter drop",
            "ether type arp arp daddr ip != @mesh counter drop",
            "set routers {\n\t\ttype ifname\n\t\telements = { \"ndesbox\" }",
        ] {
            assert!(s.contains(want), "{want} missing in {s}");
        }
        // The port checks come first: a confined port still cannot spoof; a router's
        // port is checked for its MAC and ARP only (it forwards clients' packets).
        let at = |what: &str| s.find(what).unwrap();
        assert!(at("ip saddr != @addrs") < at("jump confine"));
        assert!(at("ether saddr != @macs") < at("iifname @routers return"));
        assert!(at("arp saddr ip != @hosts") < at("iifname @routers return"));
        assert!(at("iifname @routers return") < at("ip saddr != @addrs"));
        let mut other = guards.clone();
        other.mesh.pop();
        assert_ne!(guards.tag(), other.tag());
    }

    #[test]
    fn an_ingress_sandbox_passes_only_local_tasks_own_flows_towards_the_node() {
        let sandbox = MeshSandbox {
            ifname: "eth0".into(),
            egress_if: "eth1".into(),
            local_tasks: vec!["198.19.255.5".parse().unwrap()],
        };
        let r = Ruleset {
            mesh_sandbox: Some(sandbox.clone()),
            ..Default::default()
        };
        let s = r.render();
        let chain = |s: &str, name: &str| {
            let at = s.rfind(&format!("chain {name} ")).unwrap();
            s[at..at + s[at..].find("\t}").unwrap()].to_string()
        };
        let forward = chain(&s, "forward");
        assert!(
            forward.contains("iifname \"eth0\" oifname \"eth0\" ct state new counter drop"),
            "no new flow is routed back onto the ingress network"
        );
        assert!(forward.contains(
            "iifname \"eth0\" oifname \"eth1\" ct state new ip saddr != { 198.19.255.5 } counter drop"
        ), "only local tasks' own flows leave towards the node");
        assert!(
            forward.contains("iifname \"eth0\" oifname \"eth1\" ct state invalid counter drop"),
            "nothing conntrack cannot place leaves towards the node"
        );
        assert!(chain(&s, "postrouting").contains("iifname \"eth0\" oifname \"eth1\" masquerade"));
        // Without local tasks nothing from the ingress network leaves.
        let alone = Ruleset {
            mesh_sandbox: Some(MeshSandbox {
                local_tasks: vec![],
                ..sandbox
            }),
            ..Default::default()
        }
        .render();
        assert!(alone.contains("iifname \"eth0\" oifname \"eth1\" ct state new counter drop"));
    }

    #[test]
    fn the_tag_changes_with_the_rules() {
        let a = Ruleset {
            gwbridge: Some(bridge("netd_gwbridge", "198.18.1.0/24", false)),
            ..Default::default()
        };
        let mut b = a.clone();
        b.bridges.push(bridge("ndbrx", "198.19.0.0/24", false));
        assert_ne!(a.hash_hex(), b.hash_hex());
        assert_eq!(a.hash_hex(), a.clone().hash_hex());
    }
}
