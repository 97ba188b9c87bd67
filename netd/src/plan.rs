//! What this node's kernel, load balancer and DNS listeners should hold, computed from the
//! desired state alone: no kernel, no store, no clock. The reconciler hands each part to
//! the applier of its concern (`reconcile::{links, firewall, mesh}`, the datapath, the
//! DNS); what an applier could not do (a sandbox that failed, a task that is not up) is
//! the only input a later part takes from the kernel, through the functions that take
//! the step's outcome ([`NodePlan::node_ruleset`], [`NodePlan::guards`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;

use crate::datapath::xdp::{MeshPort, MeshTable};
use crate::datapath::{LbTable, SandboxLb};
use crate::ipam;
use crate::mesh_return::{MeshSource, TaskReturn};
use crate::model::{Driver, Endpoint, Network, PortSpec, Protocol, PublishMode, Task, GWBRIDGE};
use crate::naming::{self, GWBRIDGE_IF, SANDBOX_BRIDGE};
use crate::netlink::Peer;
use crate::netns::{self, Netns};
use crate::nftables::{BridgeRules, MeshSandbox, PortGuard, PortRule, Ruleset, SandboxGuards};
use crate::state::{State, INGRESS};

/// This node's fixed settings, from the daemon's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub gwbridge_subnet: Ipv4Network,
    pub vxlan_port: u16,
    /// Underlay MTU minus the 50 bytes of VXLAN encapsulation.
    pub overlay_mtu: u32,
    pub bridge_mtu: u32,
    /// `--allow-tasks-to-node`: see [`Ruleset::tasks_reach_node`].
    pub tasks_reach_node: bool,
    /// The store's endpoints, which tasks must not reach.
    pub protected: Vec<std::net::SocketAddrV4>,
    /// `--mesh-source`: whether this node's ingress sandbox keeps the client's address.
    pub mesh_source: MeshSource,
    /// This node's WireGuard for encrypted overlays, or why it has none (an encrypted
    /// overlay's sandbox is then refused with that reason).
    pub wireguard: Result<Wireguard, String>,
    /// The nodes' lease TTL (`--lease-ttl`): also the grace the mesh flows of a node
    /// whose lease ended get before they go (see [`ingress_sandboxes`]).
    pub lease_ttl: std::time::Duration,
}

impl NodeConfig {
    /// The MTU of overlay `net` on this node: less for an encrypted one, whose packets
    /// also carry WireGuard's headers.
    pub fn network_mtu(&self, net: &Network) -> u32 {
        match &self.wireguard {
            Ok(w) if net.encrypted => w.overlay_mtu,
            _ => self.overlay_mtu,
        }
    }
}

/// What the kernel side of encrypted overlays needs of this node's WireGuard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wireguard {
    /// Where WireGuard listens: the firewall takes it only from member nodes.
    pub port: u16,
    /// The node's underlay address: the encrypted VXLAN devices' source.
    pub address: Ipv4Addr,
    /// The MTU of an encrypted overlay (its tasks' interfaces).
    pub overlay_mtu: u32,
}

/// Where a task endpoint's host-side veth lives and what it plugs into.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attachment {
    pub parent: Netns,
    pub bridge: String,
    pub mtu: u32,
    /// Ports of the gwbridge are isolated from each other: egress only.
    pub isolated: bool,
}

/// A bridge in the node's namespace: a bridge-driver network's, or the gwbridge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeBridge {
    pub ifname: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

/// An overlay network this node carries: its sandbox and the remote tasks in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OverlayPlan {
    pub network: Network,
    pub sandbox: Netns,
    pub peers: Vec<Peer>,
}

/// One endpoint of a local task and where it plugs in (None: its network is gone).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Leg {
    pub endpoint: Endpoint,
    pub attachment: Option<Attachment>,
}

/// A local task and its legs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskPlan {
    pub task: Task,
    pub legs: Vec<Leg>,
    /// A published task's way back to mesh clients (both modes: a cluster may mix them).
    pub mesh_return: Option<TaskReturn>,
}

/// The node's ingress sandbox: built like a task (see [`ingress_sandbox_task`]), with the
/// DNAT of the routing mesh's kernel path in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressPlan {
    pub network: Network,
    /// None until the node has its address on the ingress network (a node that joined
    /// after the network was made asks for one first).
    pub sandbox: Option<TaskPlan>,
    /// The sandbox's second address on the gwbridge, where the XDP fast path's
    /// leftovers arrive.
    pub local_address: Ipv4Addr,
    pub rules: Ruleset,
}

/// What nothing may sweep: endpoint links per namespace, sandboxes, bridges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Wanted {
    pub links: BTreeMap<Netns, BTreeSet<String>>,
    pub sandboxes: BTreeSet<String>,
    pub bridges: BTreeSet<String>,
    pub gwbridge: bool,
    /// The local tasks' ids (what the applier may remember things about).
    pub tasks: BTreeSet<String>,
    /// Task sides waiting in the node's namespace for their runtime (filled by the step:
    /// which tasks are pending is the kernel's answer).
    pub waiting: BTreeSet<String>,
}

/// What a step after a change needs to look at: the parts of the node's kernel that the
/// change between two states can touch. A step that only adds or removes tasks visits
/// those tasks and the overlays they are on (their sandboxes, peers and port security),
/// not every task and overlay of the node. An error from [`Scope::between`] means
/// everything, and says why (a change to networks, nodes or their liveness, or
/// load-balancer addresses reaches every overlay).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Tasks added, removed or changed, and tasks the last step left failed or pending
    /// (see [`Scope::retry`]).
    pub tasks: BTreeSet<String>,
    /// Networks (names) of those tasks, before and after.
    pub networks: BTreeSet<String>,
    /// Whether one of the changed tasks is or was on this node (what the sweep removes
    /// or keeps follows only from those).
    pub local: bool,
}

impl Scope {
    /// The scope of the change from `prev` to `next` for node `node`.
    pub fn between(prev: &State, next: &State, node: &str) -> Result<Scope, &'static str> {
        use imbl::ordmap::DiffItem;
        // Each a walk of what differs only (the maps share what did not change).
        if prev.networks.diff(&next.networks).next().is_some() {
            return Err("networks changed");
        }
        if prev.nodes.diff(&next.nodes).next().is_some() || prev.alive != next.alive {
            return Err("nodes changed");
        }
        if prev.lb_addrs.diff(&next.lb_addrs).next().is_some() {
            return Err("load-balancer addresses changed");
        }
        let mut scope = Scope::default();
        // A service that publishes other ports changes its tasks' way back (the UDP
        // ports their replies leave from).
        for item in prev.services.diff(&next.services) {
            let (name, changed) = match item {
                DiffItem::Add(name, _) | DiffItem::Remove(name, _) => (name, true),
                DiffItem::Update { old, new } => (new.0, old.1.publish != new.1.publish),
            };
            if changed {
                for t in next.tasks_of(name) {
                    scope.tasks.insert(t.id.clone());
                    scope.local |= t.node == node;
                }
            }
        }
        for item in prev.tasks.diff(&next.tasks) {
            let tasks: Vec<&Task> = match item {
                DiffItem::Add(_, t) | DiffItem::Remove(_, t) => vec![t],
                DiffItem::Update { old, new } => vec![old.1, new.1],
            };
            for t in tasks {
                scope.tasks.insert(t.id.clone());
                scope
                    .networks
                    .extend(t.endpoints.iter().map(|e| e.network.clone()));
                scope.local |= t.node == node;
            }
        }
        Ok(scope)
    }

    /// Adds tasks a step must visit again whatever changed (their last try failed, or
    /// they wait for their runtime), and the overlays they are on in `st` (what failed
    /// may be there).
    pub fn retry<'a>(&mut self, st: &State, tasks: impl IntoIterator<Item = &'a String>) {
        for id in tasks {
            if let Some(t) = st.tasks.get(id) {
                self.networks
                    .extend(t.endpoints.iter().map(|e| e.network.clone()));
            }
            self.tasks.insert(id.clone());
        }
    }
}

/// An address a task held on a network and holds no more (the task went, or left that
/// network): flows translated to it must go with it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoneEndpoint {
    pub ip: Ipv4Addr,
    pub network: String,
    /// The node the task ran on (a gwbridge address is only unique on its node).
    pub node: String,
}

/// What went between two states: the endpoints of tasks, and the endpoints of tasks whose
/// node's lease ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gone {
    pub endpoints: BTreeSet<GoneEndpoint>,
    /// The tasks stay in the store, out of every pick, and their node may only be cut off
    /// from etcd: their established connections stay, but a flow that never got an
    /// answer must go, or a client that reuses its port meets the dead task again.
    pub lost: BTreeSet<GoneEndpoint>,
}

impl Gone {
    pub fn between(prev: &State, next: &State) -> Gone {
        Gone {
            endpoints: gone_endpoints(prev, next),
            lost: lost_endpoints(prev, next),
        }
    }
}

/// The endpoints, in `next`, of the tasks on nodes alive in `prev` and not in `next` (a
/// walk of the tasks only when a node was lost).
pub fn lost_endpoints(prev: &State, next: &State) -> BTreeSet<GoneEndpoint> {
    let lost: BTreeSet<&String> = prev.alive.iter().filter(|n| !next.node_alive(n)).collect();
    if lost.is_empty() {
        return BTreeSet::new();
    }
    next.tasks
        .values()
        .filter(|t| lost.contains(&t.node))
        .flat_map(|t| {
            t.endpoints.iter().map(|e| GoneEndpoint {
                ip: e.ip,
                network: e.network.clone(),
                node: t.node.clone(),
            })
        })
        .collect()
}

/// The ingress sandboxes' addresses of the nodes whose lease ended (`lost`) and of all
/// nodes (`all`). The flows a lost node brought to this node's tasks stay for a grace:
/// the node may be restarting past its lease or cut off from etcd only, and its
/// connections resume when it is back (datapath/task_port.rs).
pub fn ingress_sandboxes(st: &State) -> IngressSandboxes {
    let mut out = IngressSandboxes::default();
    let Some(net) = st.ingress() else {
        return out;
    };
    for (node, a) in st.lb_addrs.get(&net.id).into_iter().flat_map(|m| m.iter()) {
        out.all.insert(*a);
        if !st.node_alive(node) {
            out.lost.insert(*a);
        }
    }
    out
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct IngressSandboxes {
    pub all: BTreeSet<Ipv4Addr>,
    pub lost: BTreeSet<Ipv4Addr>,
}

/// The endpoints of `prev` that `next` no longer has (a walk of the tasks that differ).
pub fn gone_endpoints(prev: &State, next: &State) -> BTreeSet<GoneEndpoint> {
    use imbl::ordmap::DiffItem;
    let mut gone = BTreeSet::new();
    for item in prev.tasks.diff(&next.tasks) {
        let (old, new) = match item {
            DiffItem::Remove(_, t) => (t, None),
            DiffItem::Update { old, new } => (old.1, Some(new.1)),
            DiffItem::Add(..) => continue,
        };
        for e in &old.endpoints {
            let kept = new.is_some_and(|n| {
                n.node == old.node
                    && n.endpoints
                        .iter()
                        .any(|x| x.ip == e.ip && x.network == e.network)
            });
            if !kept {
                gone.insert(GoneEndpoint {
                    ip: e.ip,
                    network: e.network.clone(),
                    node: old.node.clone(),
                });
            }
        }
    }
    gone
}

/// Whether `scope` (None: everything) covers overlay network `name`.
pub fn in_scope_network(scope: Option<&Scope>, name: &str) -> bool {
    scope.is_none_or(|s| s.networks.contains(name))
}

/// Everything this node should hold, from one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub node: String,
    pub bridges: Vec<NodeBridge>,
    /// Whether the node needs its gwbridge (a local task uses it, or the mesh does).
    pub gwbridge: bool,
    pub overlays: Vec<OverlayPlan>,
    pub tasks: Vec<TaskPlan>,
    pub ingress: Option<IngressPlan>,
    /// The XDP fast path's table: None while nothing is published in ingress mode or
    /// the node lacks an address, VNI or ingress address.
    pub mesh: Option<MeshTable>,
    /// The overlays' VIPs, for a datapath that routes them into the sandboxes.
    pub lb_sandboxes: Vec<SandboxLb>,
    /// Overlays whose sandbox lacks this node's load-balancer address (only a
    /// translating datapath needs one).
    pub lb_addresses_missing: Vec<String>,
    pub vxlan_members: Vec<Ipv4Addr>,
    pub wanted: Wanted,
    cfg: NodeConfig,
    published: Vec<Published>,
    /// Bridge-driver networks (their isolation and masquerade rules).
    bridge_networks: Vec<Network>,
    /// Every node's address on the ingress network: what its tasks may talk to there.
    ingress_lb_addrs: Vec<Ipv4Addr>,
}

/// A published port as the node's own ruleset answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Published {
    spec: PortSpec,
    /// Host mode: this node's tasks of the service, with their gwbridge address.
    local: Vec<(String, Ipv4Addr)>,
}

impl NodePlan {
    /// The plan of node `cfg.name` for state `st`. `translating`: the datapath needs the
    /// node's own address on each overlay (userspace).
    pub fn from_state(st: &State, cfg: &NodeConfig, translating: bool) -> NodePlan {
        let node = cfg.name.as_str();
        let local: Vec<&Task> = st.tasks.values().filter(|t| t.node == node).collect();
        let ingress_net = st.ingress();
        let gwbridge = ingress_net.is_some()
            || local
                .iter()
                .any(|t| t.endpoints.iter().any(|e| e.network == GWBRIDGE));
        let mut bridges: Vec<NodeBridge> = st
            .networks
            .values()
            .filter(|n| n.driver == Driver::Bridge)
            .map(|n| NodeBridge {
                ifname: naming::bridge_if(&n.id),
                gateway: n.gateway,
                prefix: n.subnet.prefix(),
            })
            .collect();
        if gwbridge {
            let s = cfg.gwbridge_subnet;
            bridges.push(NodeBridge {
                ifname: GWBRIDGE_IF.into(),
                gateway: ipam::default_gateway(s),
                prefix: s.prefix(),
            });
        }
        let mut overlay_nets: BTreeMap<&str, &Network> = local
            .iter()
            .flat_map(|t| t.endpoints.iter())
            .filter_map(|e| st.networks.get(&e.network))
            .filter(|n| n.driver == Driver::Overlay)
            .map(|n| (n.id.as_str(), n))
            .collect();
        if let Some(net) = ingress_net {
            overlay_nets.insert(net.id.as_str(), net);
        }
        let names: Vec<&str> = overlay_nets.values().map(|n| n.name.as_str()).collect();
        let mut peers = remote_peers_of(st, node, &names);
        let overlays: Vec<OverlayPlan> = overlay_nets
            .values()
            .map(|n| OverlayPlan {
                network: (*n).clone(),
                sandbox: Netns::named(&naming::sandbox_netns(node, &n.id)),
                peers: peers.remove(n.name.as_str()).unwrap_or_default(),
            })
            .collect();
        let tasks: Vec<TaskPlan> = local.iter().map(|t| task_plan(st, cfg, t)).collect();
        let ingress = ingress_net.map(|net| IngressPlan {
            network: net.clone(),
            sandbox: ingress_sandbox_task(st, cfg, net).map(|t| task_plan(st, cfg, &t)),
            local_address: ipam::ingress_sbox_local_address(cfg.gwbridge_subnet),
            rules: Ruleset {
                ports: ingress_ports(
                    st,
                    Some((node, ipam::ingress_sbox_local_address(cfg.gwbridge_subnet))),
                ),
                masquerade_out: match cfg.mesh_source {
                    MeshSource::Snat => vec![ISBOX_INGRESS_IF.into()],
                    MeshSource::Client => vec![],
                },
                mesh_sandbox: mesh_sandbox(st, cfg, net),
                ..Default::default()
            },
        });
        let mesh = ingress
            .as_ref()
            .filter(|i| i.sandbox.is_some())
            .and_then(|i| mesh_table(st, cfg, &i.network));
        // The ingress network carries no VIP: the routing mesh balances it.
        // Only a translating datapath routes VIPs into the sandboxes (a walk of every
        // service: not done for the others).
        let mut vips = if translating {
            LbTable::vips_by_network(st)
        } else {
            BTreeMap::new()
        };
        let lb_addr = |net: &Network| st.lb_addrs.get(&net.id).and_then(|m| m.get(node)).copied();
        let vip_overlays: Vec<&Network> = overlay_nets
            .values()
            .filter(|n| n.name != INGRESS)
            .copied()
            .collect();
        let lb_addresses_missing = if translating {
            vip_overlays
                .iter()
                .filter(|n| lb_addr(n).is_none())
                .map(|n| n.name.clone())
                .collect()
        } else {
            vec![]
        };
        let lb_sandboxes = vip_overlays
            .iter()
            .filter(|n| !translating || lb_addr(n).is_some())
            .map(|n| SandboxLb {
                network: n.name.clone(),
                netns: Netns::named(&naming::sandbox_netns(node, &n.id)),
                vips: vips.remove(&n.name).unwrap_or_default(),
                lb_addr: lb_addr(n),
            })
            .collect();
        let published = st
            .publishing()
            .flat_map(|svc| {
                svc.publish.iter().map(move |p| Published {
                    spec: *p,
                    local: match p.mode {
                        PublishMode::Ingress => vec![],
                        PublishMode::Host => st
                            .tasks_of(&svc.name)
                            .filter(|t| t.node == node)
                            .flat_map(|t| {
                                t.endpoints
                                    .iter()
                                    .filter(|e| e.network == GWBRIDGE)
                                    .map(|e| (t.id.clone(), e.ip))
                            })
                            .collect(),
                    },
                })
            })
            .collect();
        let mut wanted = Wanted {
            sandboxes: overlay_nets
                .keys()
                .map(|id| naming::sandbox_netns(node, id))
                .collect(),
            bridges: st
                .networks
                .values()
                .filter(|n| n.driver == Driver::Bridge)
                .map(|n| naming::bridge_if(&n.id))
                .collect(),
            gwbridge,
            tasks: local.iter().map(|t| t.id.clone()).collect(),
            ..Default::default()
        };
        if ingress_net.is_some() {
            wanted.sandboxes.insert(naming::ingress_sbox_netns(node));
        }
        let isbox = ingress.as_ref().and_then(|i| i.sandbox.as_ref());
        for t in tasks.iter().chain(isbox) {
            for leg in &t.legs {
                if let Some(a) = &leg.attachment {
                    wanted
                        .links
                        .entry(a.parent.clone())
                        .or_default()
                        .insert(naming::endpoint_if(&leg.endpoint.id));
                }
            }
        }
        let ingress_lb_addrs = ingress_net
            .and_then(|n| st.lb_addrs.get(&n.id))
            .map(|m| m.values().copied().collect())
            .unwrap_or_default();
        NodePlan {
            node: node.to_string(),
            bridge_networks: st
                .networks
                .values()
                .filter(|n| n.driver == Driver::Bridge)
                .cloned()
                .collect(),
            ingress_lb_addrs,
            bridges,
            gwbridge,
            overlays,
            tasks,
            ingress,
            mesh,
            lb_sandboxes,
            lb_addresses_missing,
            vxlan_members: vxlan_members(st, node),
            wanted,
            cfg: cfg.clone(),
            published,
        }
    }

    /// The node's own ruleset once the step knows which tasks are `up`, whether the
    /// ingress sandbox is (`mesh`) and where the XDP fast path runs.
    pub fn node_ruleset(
        &self,
        up: &BTreeSet<String>,
        mesh: bool,
        xdp_iface: Option<&str>,
    ) -> Ruleset {
        let gw = self.cfg.gwbridge_subnet;
        let mut ports = vec![];
        for p in &self.published {
            let s = &p.spec;
            let (targets, target_port) = match s.mode {
                PublishMode::Ingress if mesh => {
                    // What the fast path left to the kernel goes to the sandbox's local
                    // address: a flow it picked a local task for.
                    if let Some(i) = xdp_iface {
                        ports.push(PortRule {
                            iif: Some(i.to_string()),
                            ..PortRule::new(
                                s.protocol.as_str(),
                                s.published,
                                vec![ipam::ingress_sbox_local_address(gw)],
                                s.published,
                            )
                        });
                    }
                    (vec![ipam::ingress_sbox_address(gw)], s.published)
                }
                PublishMode::Ingress => continue,
                PublishMode::Host => {
                    let mut ips: Vec<Ipv4Addr> = p
                        .local
                        .iter()
                        .filter(|(id, _)| up.contains(id))
                        .map(|(_, ip)| *ip)
                        .collect();
                    ips.sort();
                    (ips, s.target)
                }
            };
            ports.push(PortRule::new(
                s.protocol.as_str(),
                s.published,
                targets,
                target_port,
            ));
        }
        Ruleset {
            ports,
            masquerade_out: vec![],
            untracked_udp: (!self.overlays.is_empty()).then_some(self.cfg.vxlan_port),
            vxlan_members: self.vxlan_members.clone(),
            wireguard_port: self.cfg.wireguard.as_ref().ok().map(|w| w.port),
            tasks_reach_node: self.cfg.tasks_reach_node,
            protected: self.cfg.protected.clone(),
            mesh_sandbox: None,
            gwbridge: self.gwbridge.then(|| BridgeRules {
                ifname: GWBRIDGE_IF.into(),
                subnet: gw,
                internal: false,
            }),
            bridges: self
                .bridge_networks
                .iter()
                .map(|n| BridgeRules {
                    ifname: naming::bridge_if(&n.id),
                    subnet: n.subnet,
                    internal: n.internal,
                })
                .collect(),
        }
    }

    /// Port security of overlay `o`'s sandbox: the local tasks' ports there (and the
    /// ingress sandbox's, when it is `isbox_up`).
    pub fn guards(&self, o: &OverlayPlan, isbox_up: bool) -> SandboxGuards {
        let isbox = self
            .ingress
            .as_ref()
            .and_then(|i| i.sandbox.as_ref())
            .filter(|_| isbox_up)
            .map(|t| &t.task);
        let ingress = o.network.name == INGRESS;
        let ports = self
            .tasks
            .iter()
            .map(|t| &t.task)
            .chain(isbox)
            .flat_map(|t| {
                // On the ingress network, a task talks to the ingress sandboxes only, and
                // the ingress sandbox routes the mesh's clients.
                let confined = ingress && !t.service.is_empty();
                let router = ingress && t.service.is_empty();
                t.endpoints.iter().map(move |e| (e, confined, router))
            })
            .filter(|(e, _, _)| e.network == o.network.name)
            .map(|(e, confined, router)| PortGuard {
                ifname: naming::endpoint_if(&e.id),
                mac: crate::model::format_mac(&crate::model::mac_for_ip(e.ip)),
                ip: e.ip,
                confined,
                router,
            })
            .collect();
        let mesh = if ingress {
            self.ingress_lb_addrs.clone()
        } else {
            vec![]
        };
        SandboxGuards { ports, mesh }
    }
}

/// Where an endpoint plugs in on node `cfg.name` (None: its network is gone).
pub fn attachment(st: &State, cfg: &NodeConfig, ep: &Endpoint) -> Option<Attachment> {
    if ep.network == GWBRIDGE {
        return Some(Attachment {
            parent: Netns::Home,
            bridge: GWBRIDGE_IF.into(),
            mtu: cfg.bridge_mtu,
            isolated: true,
        });
    }
    let net = st.networks.get(&ep.network)?;
    Some(match net.driver {
        Driver::Overlay => Attachment {
            parent: Netns::named(&naming::sandbox_netns(&cfg.name, &net.id)),
            bridge: SANDBOX_BRIDGE.into(),
            mtu: cfg.network_mtu(net),
            isolated: false,
        },
        Driver::Bridge => Attachment {
            parent: Netns::Home,
            bridge: naming::bridge_if(&net.id),
            mtu: cfg.bridge_mtu,
            isolated: false,
        },
    })
}

fn task_plan(st: &State, cfg: &NodeConfig, t: &Task) -> TaskPlan {
    TaskPlan {
        mesh_return: task_return(st, cfg, t),
        task: t.clone(),
        legs: t
            .endpoints
            .iter()
            .map(|e| Leg {
                endpoint: e.clone(),
                attachment: attachment(st, cfg, e),
            })
            .collect(),
    }
}

/// The ingress sandbox as a task with two endpoints: `eth0` on the ingress network (the
/// node's ingress address, which connections from the mesh come from) and `eth1` on the
/// gwbridge (where the node sends published-port traffic), with its default route back
/// through the node. None until the node has its ingress address.
pub fn ingress_sandbox_task(st: &State, cfg: &NodeConfig, net: &Network) -> Option<Task> {
    let node = &cfg.name;
    let addr = st
        .lb_addrs
        .get(&net.id)
        .and_then(|m| m.get(node))
        .copied()?;
    let name = naming::ingress_sbox_netns(node);
    let gw = cfg.gwbridge_subnet;
    let leg = |id: &str, network: &str, ip: Ipv4Addr, prefix: u8, ifname: &str| Endpoint {
        id: id.into(),
        network: network.into(),
        ip,
        prefix,
        mac: crate::model::format_mac(&crate::model::mac_for_ip(ip)),
        ifname: ifname.into(),
    };
    let [on_ingress, on_gwbridge] = naming::INGRESS_SBOX_ENDPOINTS;
    Some(Task {
        id: name.clone(),
        name: name.clone(),
        service: String::new(),
        node: node.clone(),
        netns: Path::new(netns::NETNS_DIR)
            .join(&name)
            .display()
            .to_string(),
        endpoints: vec![
            leg(
                on_ingress,
                INGRESS,
                addr,
                net.subnet.prefix(),
                ISBOX_INGRESS_IF,
            ),
            leg(
                on_gwbridge,
                GWBRIDGE,
                ipam::ingress_sbox_address(gw),
                gw.prefix(),
                naming::INGRESS_SBOX_GWBRIDGE_IF,
            ),
        ],
        default_gateway: Some(ipam::default_gateway(gw)),
        labels: Default::default(),
        handoff: false,
        draining: None,
        created_at: 0,
    })
}

/// The ingress sandbox's leg on the ingress network.
pub const ISBOX_INGRESS_IF: &str = "eth0";

/// This node's ingress sandbox address on `net`.
fn own_sandbox_address(st: &State, cfg: &NodeConfig, net: &Network) -> Option<Ipv4Addr> {
    st.lb_addrs
        .get(&net.id)
        .and_then(|m| m.get(&cfg.name))
        .copied()
}

/// A local task's way back to mesh clients: a task of a service that publishes a port
/// in ingress mode, with its leg on the ingress network, answers through this node's
/// ingress sandbox (see [`crate::mesh_return`]).
fn task_return(st: &State, cfg: &NodeConfig, t: &Task) -> Option<TaskReturn> {
    if t.service.is_empty() {
        return None;
    }
    let net = st.ingress()?;
    let ep = t.endpoints.iter().find(|e| e.network == INGRESS)?;
    let svc = st.services.get(&t.service);
    let mut udp_ports: Vec<u16> = svc
        .into_iter()
        .flat_map(|s| s.publish.iter())
        .filter(|p| p.mode == PublishMode::Ingress && p.protocol == Protocol::Udp)
        .map(|p| p.target)
        .collect();
    udp_ports.sort_unstable();
    udp_ports.dedup();
    Some(TaskReturn {
        ifname: ep.ifname.clone(),
        ip: ep.ip,
        subnet: net.subnet,
        gateway: own_sandbox_address(st, cfg, net)?,
        udp_ports,
    })
}

/// The ingress sandbox's guards for the mesh (once it has its address): what may leave
/// it towards the node (the local published tasks' own flows).
fn mesh_sandbox(st: &State, cfg: &NodeConfig, net: &Network) -> Option<MeshSandbox> {
    own_sandbox_address(st, cfg, net)?;
    let mut local_tasks = vec![];
    for (_, backends) in ingress_backends(st) {
        local_tasks.extend(
            backends
                .into_iter()
                .filter(|(node, _)| *node == cfg.name)
                .map(|(_, ip)| ip),
        );
    }
    local_tasks.sort_unstable();
    local_tasks.dedup();
    Some(MeshSandbox {
        ifname: ISBOX_INGRESS_IF.into(),
        egress_if: naming::INGRESS_SBOX_GWBRIDGE_IF.into(),
        local_tasks,
    })
}

fn mesh_table(st: &State, cfg: &NodeConfig, net: &Network) -> Option<MeshTable> {
    if net.encrypted {
        // XDP puts its own VXLAN header on and sends the frame out of the node's
        // interface: it would pass the sealing by. The kernel path, through the ingress
        // sandbox's VXLAN, is sealed like any encrypted overlay's.
        return None;
    }
    let ports = mesh_ports(st);
    if ports.is_empty() {
        // No program on the interface while nothing is published.
        return None;
    }
    let addrs = st.lb_addrs.get(&net.id)?;
    Some(MeshTable {
        node_ip: st.nodes.get(&cfg.name)?.address?,
        ingress_ip: *addrs.get(&cfg.name)?,
        ingress_prefix: net.subnet.prefix(),
        vni: net.vni?,
        vxlan_port: cfg.vxlan_port,
        overlay_mtu: u16::try_from(cfg.overlay_mtu).unwrap_or(u16::MAX),
        client_source: cfg.mesh_source == MeshSource::Client,
        ports,
    })
}

/// Each ingress-mode published port with what it balances over: the service's tasks on
/// live nodes, as (node, ingress address), in address order. Both paths of the mesh
/// rotate over exactly this list.
fn ingress_backends(st: &State) -> Vec<(&PortSpec, Vec<(&str, Ipv4Addr)>)> {
    let mut out = vec![];
    for svc in st.publishing() {
        for p in svc
            .publish
            .iter()
            .filter(|p| p.mode == PublishMode::Ingress)
        {
            let mut backends: Vec<(&str, Ipv4Addr)> = st
                .tasks_of(&svc.name)
                .filter(|t| st.in_service(t))
                .filter_map(|t| {
                    let ep = t.endpoints.iter().find(|e| e.network == INGRESS)?;
                    Some((t.node.as_str(), ep.ip))
                })
                .collect();
            backends.sort_by_key(|(_, ip)| *ip);
            out.push((p, backends));
        }
    }
    out
}

/// The ingress addresses of `svc`'s tasks being drained or failing their health check
/// on live nodes ([`State::keeps_flows`]): out of the mesh's picks, while the flows they
/// have stay theirs.
fn ingress_draining(st: &State, svc: &str) -> Vec<Ipv4Addr> {
    st.tasks_of(svc)
        .filter(|t| st.keeps_flows(t))
        .filter_map(|t| t.endpoints.iter().find(|e| e.network == INGRESS))
        .map(|e| e.ip)
        .collect()
}

/// What the ingress sandbox balances: each ingress-mode port onto the ingress addresses
/// of the service's tasks on live nodes, wherever they run. With `local` (this node, the
/// sandbox's local address), what arrives at that address goes to the node's own tasks
/// only: the XDP fast path already picked a local one (see [`NodePlan::node_ruleset`]).
pub fn ingress_ports(st: &State, local: Option<(&str, Ipv4Addr)>) -> Vec<PortRule> {
    let mut rules = vec![];
    for (p, backends) in ingress_backends(st) {
        let addrs = |on: Option<&str>| -> Vec<Ipv4Addr> {
            backends
                .iter()
                .filter(|(node, _)| on.is_none_or(|n| *node == n))
                .map(|(_, ip)| *ip)
                .collect()
        };
        let proto = p.protocol.as_str();
        if let Some((node, addr)) = local {
            rules.push(PortRule {
                daddr: Some(addr),
                ..PortRule::new(proto, p.published, addrs(Some(node)), p.target)
            });
        }
        rules.push(PortRule::new(proto, p.published, addrs(None), p.target));
    }
    rules
}

/// What the XDP fast path balances: the same ports and tasks as [`ingress_ports`], with
/// the VTEP of each task's node.
pub fn mesh_ports(st: &State) -> Vec<MeshPort> {
    ingress_backends(st)
        .into_iter()
        .map(|(p, backends)| MeshPort {
            proto: match p.protocol {
                Protocol::Tcp => 6,
                Protocol::Udp => 17,
            },
            port: p.published,
            target_port: p.target,
            backends: backends
                .into_iter()
                .filter_map(|(node, ip)| Some((ip, st.nodes.get(node)?.address?)))
                .collect(),
            draining: st
                .publishing()
                .find(|s| s.publish.contains(p))
                .map(|s| ingress_draining(st, &s.name))
                .unwrap_or_default(),
        })
        .collect()
}

/// The underlay addresses VXLAN may come from: the other live nodes'.
fn vxlan_members(st: &State, local: &str) -> Vec<Ipv4Addr> {
    let mut members: Vec<Ipv4Addr> = st
        .nodes
        .values()
        .filter(|n| n.name != local && st.node_alive(&n.name))
        .filter_map(|n| n.address)
        .collect();
    members.sort();
    members.dedup();
    members
}

/// The tasks of other nodes on overlay `network`, as this node's VXLAN device must know
/// them. Tasks of a node that is down (no lease) or that announced no underlay address are
/// left out: their traffic would go nowhere, and leaving them out is what withdraws them.
#[cfg(test)]
pub fn remote_peers(st: &State, local_node: &str, network: &str) -> Vec<Peer> {
    remote_peers_of(st, local_node, &[network])
        .remove(network)
        .unwrap_or_default()
}

/// [`remote_peers`] of each of `networks`, in one walk of the cluster's tasks (a step
/// plans every overlay of the node: one walk per overlay cost overlays × tasks).
pub fn remote_peers_of<'a>(
    st: &State,
    local_node: &str,
    networks: &[&'a str],
) -> BTreeMap<&'a str, Vec<Peer>> {
    let mut out: BTreeMap<&str, Vec<Peer>> = networks.iter().map(|n| (*n, vec![])).collect();
    // The underlay address of each other live node, looked up once.
    let vteps: BTreeMap<&str, Ipv4Addr> = st
        .nodes
        .values()
        .filter(|n| n.name != local_node && st.node_alive(&n.name))
        .filter_map(|n| Some((n.name.as_str(), n.address?)))
        .collect();
    for t in st.tasks.values() {
        let Some(vtep) = vteps.get(t.node.as_str()) else {
            continue;
        };
        for e in &t.endpoints {
            if let Some(peers) = out.get_mut(e.network.as_str()) {
                peers.push(Peer {
                    ip: e.ip,
                    mac: crate::model::mac_for_ip(e.ip),
                    vtep: *vtep,
                });
            }
        }
    }
    for (network, peers) in out.iter_mut() {
        // Other nodes' load-balancer addresses answer like tasks (userspace datapath).
        let lb = st
            .networks
            .get(*network)
            .and_then(|n| st.lb_addrs.get(&n.id))
            .into_iter()
            .flatten()
            .filter_map(|(n, ip)| {
                Some(Peer {
                    ip: *ip,
                    mac: crate::model::mac_for_ip(*ip),
                    vtep: *vteps.get(n.as_str())?,
                })
            });
        peers.extend(lb);
        peers.sort();
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::Node;
    use imbl::OrdMap;

    /// Service `web` on `front`, publishing `ports`: the service of [`task`]'s tasks.
    fn web(ports: &[&str]) -> crate::model::Service {
        crate::model::Service {
            id: "s1".into(),
            name: "web".into(),
            networks: vec!["front".into()],
            endpoint_mode: crate::model::EndpointMode::Vip,
            aliases: vec![],
            publish: ports
                .iter()
                .map(|p| crate::model::parse_publish(p).unwrap())
                .collect(),
            vips: Default::default(),
            created_at: 0,
            health: None,
        }
    }

    fn task(id: &str, node: &str, eps: &[(&str, &str)]) -> Task {
        Task {
            id: id.into(),
            name: id.into(),
            service: "web".into(),
            node: node.into(),
            netns: format!("/run/netns/{id}"),
            endpoints: eps
                .iter()
                .enumerate()
                .map(|(i, (net, ip))| Endpoint {
                    id: format!("{id}{i}"),
                    network: net.to_string(),
                    ip: ip.parse().unwrap(),
                    prefix: 24,
                    mac: String::new(),
                    ifname: format!("eth{i}"),
                })
                .collect(),
            default_gateway: None,
            labels: Default::default(),
            handoff: false,
            draining: None,
            created_at: 0,
        }
    }

    fn node(name: &str, addr: Option<&str>) -> Node {
        Node {
            name: name.into(),
            address: addr.map(|a| a.parse().unwrap()),
            gwbridge_subnet: "198.18.1.0/24".parse().unwrap(),
            started_at: 0,
            lb_addresses: false,
            public_key: None,
            next_public_key: None,
            wireguard_port: None,
        }
    }

    #[test]
    fn peers_are_the_live_remote_tasks_of_the_network() {
        let mut st = State::default();
        st.insert_service(web(&[]));
        for (n, a) in [
            ("n1", Some("198.18.0.11")),
            ("n2", Some("198.18.0.12")),
            ("n3", Some("198.18.0.13")),
            ("n4", None),
        ] {
            st.nodes.insert(n.into(), node(n, a));
        }
        st.alive = ["n1", "n2", "n4"].iter().map(|s| s.to_string()).collect();
        for t in [
            task("a", "n1", &[("front", "198.19.0.2")]),
            task(
                "b",
                "n2",
                &[("front", "198.19.0.3"), ("back", "198.19.1.3")],
            ),
            task("c", "n2", &[("back", "198.19.1.4")]),
            // n3 is down, n4 never said where it is: neither is reachable.
            task("d", "n3", &[("front", "198.19.0.5")]),
            task("e", "n4", &[("front", "198.19.0.6")]),
        ] {
            st.insert_task(t);
        }
        let peers = remote_peers(&st, "n1", "front");
        assert_eq!(
            peers,
            vec![Peer {
                ip: "198.19.0.3".parse().unwrap(),
                mac: [0x02, 0x42, 198, 19, 0, 3],
                vtep: "198.18.0.12".parse().unwrap(),
            }]
        );
        let back: Vec<Ipv4Addr> = remote_peers(&st, "n1", "back")
            .iter()
            .map(|p| p.ip)
            .collect();
        assert_eq!(
            back,
            [
                "198.19.1.3".parse::<Ipv4Addr>().unwrap(),
                "198.19.1.4".parse().unwrap()
            ]
        );
        // A node never peers with its own tasks.
        assert!(remote_peers(&st, "n2", "back").is_empty());
    }

    #[test]
    fn the_mesh_balances_each_published_port_over_the_tasks_of_live_nodes() {
        let mut st = State::default();
        for (n, a) in [
            ("n1", "198.18.0.11"),
            ("n2", "198.18.0.12"),
            ("n3", "198.18.0.13"),
        ] {
            st.nodes.insert(n.into(), node(n, Some(a)));
        }
        st.alive = ["n1", "n3"].iter().map(|s| s.to_string()).collect();
        st.insert_service(web(&["4567:80", "4568:53/udp", "4570:80,mode=host"]));
        for t in [
            task(
                "a",
                "n1",
                &[("front", "198.19.0.2"), (INGRESS, "198.19.255.2")],
            ),
            task(
                "b",
                "n3",
                &[("front", "198.19.0.3"), (INGRESS, "198.19.255.3")],
            ),
            // n2 is down: its task leaves the mesh.
            task(
                "c",
                "n2",
                &[("front", "198.19.0.4"), (INGRESS, "198.19.255.4")],
            ),
            // Its node has not reported it up (its runtime has not started it).
            task(
                "d",
                "n1",
                &[("front", "198.19.0.5"), (INGRESS, "198.19.255.5")],
            ),
        ] {
            let status = crate::state::TaskStatus {
                error: None,
                pending: t.id == "d",
            };
            st.task_status.insert(t.id.clone(), status);
            st.insert_task(t);
        }
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        // The kernel path (the ingress sandbox): ingress-mode ports only, target ports.
        let rules = ingress_ports(&st, None);
        assert_eq!(rules.len(), 2);
        assert_eq!(
            (rules[0].proto, rules[0].port, rules[0].target_port),
            ("tcp", 4567, 80)
        );
        assert_eq!(
            (rules[1].proto, rules[1].port, rules[1].target_port),
            ("udp", 4568, 53)
        );
        for r in &rules {
            assert_eq!(r.targets, vec![a("198.19.255.2"), a("198.19.255.3")]);
            assert_eq!((r.daddr, &r.iif), (None, &None));
        }
        // With the sandbox's local address: first a rule for it onto n1's own tasks.
        let local = a("198.18.1.253");
        let rules = ingress_ports(&st, Some(("n1", local)));
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0].daddr, Some(local));
        assert_eq!(rules[0].targets, vec![a("198.19.255.2")]);
        assert_eq!(rules[1].daddr, None);
        assert_eq!(rules[1].targets.len(), 2);
        // A node without tasks of its own has no local rule's targets.
        assert!(ingress_ports(&st, Some(("n2", local)))[0]
            .targets
            .is_empty());
        // The fast path: the same tasks, with their nodes' VTEPs.
        let mesh = mesh_ports(&st);
        assert_eq!(mesh.len(), 2);
        assert_eq!((mesh[0].proto, mesh[1].proto), (6, 17));
        assert_eq!(
            mesh[0].backends,
            vec![
                (a("198.19.255.2"), a("198.18.0.11")),
                (a("198.19.255.3"), a("198.18.0.13"))
            ]
        );
    }

    /// The settings of node `name` in these tests (its gwbridge is the fixture's).
    pub(crate) fn cfg(name: &str) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            gwbridge_subnet: "198.18.1.0/24".parse().unwrap(),
            vxlan_port: 4789,
            overlay_mtu: 1450,
            bridge_mtu: 1500,
            tasks_reach_node: false,
            protected: vec![],
            mesh_source: MeshSource::Client,
            wireguard: Ok(Wireguard {
                port: 51821,
                address: "198.18.0.11".parse().unwrap(),
                overlay_mtu: 1390,
            }),
            lease_ttl: std::time::Duration::from_secs(10),
        }
    }

    fn network(name: &str, id: &str, driver: Driver, subnet: &str) -> Network {
        let subnet: Ipv4Network = subnet.parse().unwrap();
        Network {
            id: id.into(),
            name: name.into(),
            driver,
            subnet,
            gateway: ipam::default_gateway(subnet),
            vni: (driver == Driver::Overlay).then_some(4096),
            internal: false,
            attachable: false,
            created_at: 0,
            encrypted: false,
        }
    }

    /// front (overlay), back (overlay), lan (bridge); n1 runs a on front and a gwbridge
    /// leg, n2 runs b on back.
    fn two_nodes() -> State {
        let mut st = State::default();
        for (n, a) in [("n1", "198.18.0.11"), ("n2", "198.18.0.12")] {
            st.nodes.insert(n.into(), node(n, Some(a)));
            st.alive.insert(n.into());
        }
        for n in [
            network("front", "f1", Driver::Overlay, "198.19.0.0/24"),
            network("back", "b1", Driver::Overlay, "198.19.1.0/24"),
            network("lan", "l1", Driver::Bridge, "198.19.2.0/24"),
        ] {
            st.networks.insert(n.name.clone(), n);
        }
        st.insert_service(web(&["4570:80,mode=host", "4567:80"]));
        st.insert_task(task(
            "a",
            "n1",
            &[("front", "198.19.0.2"), (GWBRIDGE, "198.18.1.2")],
        ));
        st.insert_task(task("b", "n2", &[("back", "198.19.1.2")]));
        st
    }

    #[test]
    fn the_endpoints_a_change_took_away_are_gone_and_no_others() {
        let gone = |ip: &str, network: &str, node: &str| GoneEndpoint {
            ip: ip.parse().unwrap(),
            network: network.into(),
            node: node.into(),
        };
        let before = two_nodes();
        assert!(gone_endpoints(&before, &before.clone()).is_empty());
        // A task added takes nothing away.
        let mut after = before.clone();
        after.insert_task(task("c", "n2", &[("front", "198.19.0.3")]));
        assert!(gone_endpoints(&before, &after).is_empty());
        // Removed: every endpoint of it, with the node it ran on.
        assert_eq!(
            gone_endpoints(&before, &{
                let mut st = before.clone();
                st.tasks.remove("a");
                st
            }),
            BTreeSet::from([
                gone("198.19.0.2", "front", "n1"),
                gone("198.18.1.2", GWBRIDGE, "n1"),
            ])
        );
        // Changed: what it no longer holds (an address, or its node: a gwbridge address
        // means something else on another node).
        let mut moved = before.clone();
        moved.insert_task(task(
            "a",
            "n2",
            &[("front", "198.19.0.2"), (GWBRIDGE, "198.18.1.2")],
        ));
        assert_eq!(gone_endpoints(&before, &moved).len(), 2);
        let mut readdressed = before.clone();
        readdressed.insert_task(task(
            "a",
            "n1",
            &[("front", "198.19.0.9"), (GWBRIDGE, "198.18.1.2")],
        ));
        assert_eq!(
            gone_endpoints(&before, &readdressed),
            BTreeSet::from([gone("198.19.0.2", "front", "n1")])
        );
    }

    #[test]
    fn an_ingress_node_whose_lease_ended_is_lost_by_its_ingress_address() {
        let mut st = two_nodes();
        assert_eq!(ingress_sandboxes(&st), IngressSandboxes::default());
        let ingress = network(INGRESS, "i1", Driver::Overlay, "198.19.255.0/24");
        st.networks.insert(INGRESS.into(), ingress);
        let mut lb = OrdMap::new();
        lb.insert("n1".to_string(), "198.19.255.201".parse().unwrap());
        lb.insert("n2".to_string(), "198.19.255.202".parse().unwrap());
        st.lb_addrs.insert("i1".into(), lb);
        let all: BTreeSet<Ipv4Addr> = ["198.19.255.201", "198.19.255.202"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(ingress_sandboxes(&st).all, all);
        assert!(ingress_sandboxes(&st).lost.is_empty());
        st.alive.remove("n2");
        // Its sandbox's address: the MAC its flows arrive from on other nodes.
        let s = ingress_sandboxes(&st);
        assert_eq!(s.all, all);
        assert_eq!(s.lost, BTreeSet::from(["198.19.255.202".parse().unwrap()]));
    }

    #[test]
    fn a_lost_nodes_tasks_are_lost_by_their_endpoints_and_nothing_else() {
        let before = two_nodes();
        assert!(Gone::between(&before, &before.clone()).lost.is_empty());
        let mut after = before.clone();
        after.alive.remove("n2");
        let gone = Gone::between(&before, &after);
        // n2's task b, which stays in the store: lost, not gone.
        assert_eq!(
            gone.lost,
            BTreeSet::from([GoneEndpoint {
                ip: "198.19.1.2".parse().unwrap(),
                network: "back".into(),
                node: "n2".into(),
            }])
        );
        assert!(gone.endpoints.is_empty());
        // Back again, or still lost: nothing more.
        assert!(Gone::between(&after, &before).lost.is_empty());
        assert!(Gone::between(&after, &after.clone()).lost.is_empty());
    }

    #[test]
    fn a_step_after_a_task_change_visits_that_task_and_its_networks_only() {
        let before = two_nodes();
        // Nothing changed: nothing to visit.
        assert_eq!(
            Scope::between(&before, &before.clone(), "n1"),
            Ok(Scope::default())
        );
        // A task on n2 joins `front` and `back`: n1 redoes those overlays' peers, and
        // has no task of its own to visit or sweep.
        let mut after = before.clone();
        after.insert_task(task(
            "c",
            "n2",
            &[("front", "198.19.0.3"), ("back", "198.19.1.3")],
        ));
        let s = Scope::between(&before, &after, "n1").unwrap();
        assert_eq!(s.tasks, BTreeSet::from(["c".to_string()]));
        assert_eq!(
            s.networks,
            BTreeSet::from(["back".to_string(), "front".to_string()])
        );
        assert!(!s.local);
        assert!(in_scope_network(Some(&s), "front"));
        assert!(!in_scope_network(Some(&s), "lan"));
        // For n2 the task is its own: its sweep runs.
        assert!(Scope::between(&before, &after, "n2").unwrap().local);
        // Removed again: the same parts.
        assert_eq!(Scope::between(&after, &before, "n1"), Ok(s));
        // `web` publishes a UDP port more: its tasks' way back changes (the ports their
        // replies leave from), so its tasks are visited, n1's own among them.
        let mut after = before.clone();
        after.insert_service(web(&["4570:80,mode=host", "4567:80", "4568:80/udp"]));
        let s = Scope::between(&before, &after, "n1").unwrap();
        let web_tasks: BTreeSet<String> = before.tasks_of("web").map(|t| t.id.clone()).collect();
        assert!(web_tasks.contains("a"));
        assert_eq!(s.tasks, web_tasks);
        assert!(s.local);
    }

    #[test]
    fn a_change_to_networks_nodes_or_liveness_makes_a_whole_step() {
        let before = two_nodes();
        let mut after = before.clone();
        after.alive.remove("n2");
        assert_eq!(Scope::between(&before, &after, "n1"), Err("nodes changed"));
        let mut after = before.clone();
        after
            .nodes
            .insert("n3".into(), node("n3", Some("198.18.0.13")));
        assert_eq!(Scope::between(&before, &after, "n1"), Err("nodes changed"));
        let mut after = before.clone();
        after.networks.insert(
            "new".into(),
            network("new", "x1", Driver::Overlay, "198.19.3.0/24"),
        );
        assert_eq!(
            Scope::between(&before, &after, "n1"),
            Err("networks changed")
        );
    }

    #[test]
    fn a_node_plans_its_own_tasks_the_overlays_they_use_and_every_bridge() {
        let st = two_nodes();
        let plan = NodePlan::from_state(&st, &cfg("n1"), false);
        assert_eq!(plan.tasks.len(), 1);
        assert_eq!(plan.tasks[0].task.id, "a");
        // Only the overlay its task uses (back is n2's business).
        let overlays: Vec<&str> = plan
            .overlays
            .iter()
            .map(|o| o.network.name.as_str())
            .collect();
        assert_eq!(overlays, vec!["front"]);
        // Every bridge network, and the gwbridge its task uses.
        let bridges: Vec<&str> = plan.bridges.iter().map(|b| b.ifname.as_str()).collect();
        assert_eq!(bridges, vec![naming::bridge_if("l1").as_str(), GWBRIDGE_IF]);
        assert!(plan.gwbridge);
        // Its endpoints plug into the sandbox and the gwbridge, and the sweep keeps them.
        let a = &plan.tasks[0];
        assert_eq!(
            a.legs[0].attachment.as_ref().map(|x| x.parent.clone()),
            Some(Netns::named(&naming::sandbox_netns("n1", "f1")))
        );
        assert!(a.legs[1].attachment.as_ref().is_some_and(|x| x.isolated));
        let kept: BTreeSet<&String> = plan.wanted.links.values().flatten().collect();
        assert_eq!(kept.len(), 2);
        assert_eq!(
            plan.wanted.sandboxes,
            BTreeSet::from([naming::sandbox_netns("n1", "f1")])
        );
        // n2's plan is its own: back, no gwbridge.
        let plan2 = NodePlan::from_state(&st, &cfg("n2"), false);
        assert_eq!(plan2.tasks[0].task.id, "b");
        assert!(!plan2.gwbridge);
        assert_eq!(plan2.overlays[0].network.name, "back");
        // A network that is gone leaves its endpoint without an attachment.
        let mut st = st;
        st.networks.remove("front");
        let plan = NodePlan::from_state(&st, &cfg("n1"), false);
        assert!(plan.tasks[0].legs[0].attachment.is_none());
    }

    #[test]
    fn host_mode_ports_go_to_the_local_tasks_that_are_up() {
        let st = two_nodes();
        let plan = NodePlan::from_state(&st, &cfg("n1"), false);
        let rules = plan.node_ruleset(&BTreeSet::from(["a".to_string()]), false, None);
        // The ingress-mode port has no rule without the mesh; the host one targets a.
        assert_eq!(rules.ports.len(), 1);
        assert_eq!(rules.ports[0].port, 4570);
        assert_eq!(
            rules.ports[0].targets,
            vec!["198.18.1.2".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(rules.ports[0].target_port, 80);
        // a is not up: the port stays, with no target.
        let rules = plan.node_ruleset(&BTreeSet::new(), false, None);
        assert!(rules.ports[0].targets.is_empty());
        // With the mesh (and XDP on eth0): the ingress port goes to the sandbox, and what
        // XDP leaves to the kernel to its local address.
        let rules = plan.node_ruleset(&BTreeSet::new(), true, Some("eth0"));
        let ingress: Vec<&PortRule> = rules.ports.iter().filter(|p| p.port == 4567).collect();
        assert_eq!(ingress.len(), 2);
        assert_eq!(ingress[0].iif.as_deref(), Some("eth0"));
        assert_eq!(
            ingress[0].targets,
            vec![ipam::ingress_sbox_local_address(cfg("n1").gwbridge_subnet)]
        );
        // VXLAN from the other live node only; the bridge network's rules.
        assert_eq!(
            rules.vxlan_members,
            vec!["198.18.0.12".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(rules.untracked_udp, Some(4789));
        assert_eq!(rules.bridges.len(), 1);
    }

    #[test]
    fn the_ingress_sandbox_and_the_mesh_wait_for_the_nodes_ingress_address() {
        let mut st = two_nodes();
        let ingress = network(INGRESS, "i1", Driver::Overlay, "198.19.255.0/24");
        st.networks.insert(INGRESS.into(), ingress);
        let plan = NodePlan::from_state(&st, &cfg("n1"), false);
        let i = plan.ingress.as_ref().unwrap();
        assert!(i.sandbox.is_none());
        assert!(plan.mesh.is_none());
        // The ingress network's sandbox is wanted anyway (the mesh's carrier).
        assert!(plan.overlays.iter().any(|o| o.network.name == INGRESS));
        let mut lb = OrdMap::new();
        lb.insert("n1".to_string(), "198.19.255.201".parse().unwrap());
        lb.insert("n2".to_string(), "198.19.255.202".parse().unwrap());
        st.lb_addrs.insert("i1".into(), lb);
        let plan = NodePlan::from_state(&st, &cfg("n1"), false);
        let sbox = plan.ingress.as_ref().unwrap().sandbox.as_ref().unwrap();
        assert_eq!(
            sbox.task.endpoints[0].ip,
            "198.19.255.201".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            sbox.task.default_gateway,
            Some(ipam::default_gateway(cfg("n1").gwbridge_subnet))
        );
        // web publishes 4567 in ingress mode, but none of its tasks is on ingress yet:
        // the mesh has the port with no backends.
        let mesh = plan.mesh.as_ref().unwrap();
        assert_eq!(mesh.ports.len(), 1);
        assert!(mesh.ports[0].backends.is_empty());
        // Port security on the ingress network: tasks confined, both nodes' addresses
        // are the mesh; the sandbox's own port only once it is up.
        let o = plan
            .overlays
            .iter()
            .find(|o| o.network.name == INGRESS)
            .unwrap();
        assert!(plan.guards(o, false).ports.is_empty());
        let g = plan.guards(o, true);
        assert_eq!(g.ports.len(), 1);
        assert!(!g.ports[0].confined);
        assert_eq!(g.mesh.len(), 2);
        // An encrypted ingress: the same sandbox on the sealed overlay, and no XDP
        // table (XDP would send the mesh's VXLAN in the clear).
        let mut sealed = st.clone();
        let mut net = sealed.networks[INGRESS].clone();
        net.encrypted = true;
        sealed.networks.insert(INGRESS.into(), net);
        let plan = NodePlan::from_state(&sealed, &cfg("n1"), false);
        assert!(plan.ingress.as_ref().unwrap().sandbox.is_some());
        assert!(plan.mesh.is_none());
    }

    #[test]
    fn a_translating_datapath_asks_for_the_nodes_address_on_each_overlay() {
        let st = two_nodes();
        let plan = NodePlan::from_state(&st, &cfg("n1"), true);
        assert_eq!(plan.lb_addresses_missing, vec!["front".to_string()]);
        assert!(plan.lb_sandboxes.is_empty());
        let plan = NodePlan::from_state(&st, &cfg("n1"), false);
        assert!(plan.lb_addresses_missing.is_empty());
        assert_eq!(plan.lb_sandboxes.len(), 1);
    }
}
