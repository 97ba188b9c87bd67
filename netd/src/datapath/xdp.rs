//! The routing mesh's fast path: netd-ebpf's `ingress_xdp` on the node's underlay
//! interface (the one holding its advertised address). It takes every flow to a
//! published port in ingress mode whose task runs on another node, translates it as the
//! kernel path would (keeping the client's address with `--mesh-source client`: the
//! frame goes to the task from this node's ingress MAC, and the program on the task's
//! port sends the answers back here, datapath/task_port.rs), and sends it over VXLAN without the kernel stack; a router's ICMP errors about a flow go
//! on to its task (`icmp_relayed`); see ebpf/bpf/ingress_xdp.c. Flows to local tasks, and everything when XDP cannot be
//! attached, take the kernel path (nftables in the node and its ingress sandbox).
//!
//! Pins live in /sys/fs/bpf/netd-xdp/NODE/ (maps by name, `link_netd_ingress`): the
//! program keeps working while netd restarts, and goes with the routing mesh.
//!
//! Flow state is two tables of two maps each (netd_ebpf::INGRESS_XDP_FLOW_MAPS): new
//! flows enter the unconfirmed table (LRU maps) and move to the established one (plain
//! hashes, which never evict: netd's sweep removes their closed and idle flows, see
//! [`FlowMaps::sweep`]) once the client
//! sends again after the task answered (from its node's VTEP: answers from any other
//! outer source are dropped). TCP needs the client's ACK of the task's SYN-ACK (ack_seq
//! = its ISN + 1), which a spoofed source never sees; UDP, which has no sequence numbers,
//! only needs a second datagram from the same 4-tuple after the answer. So floods of
//! spoofed SYNs (with blind ACKs or without) or of datagrams nobody sends twice never
//! touch the established table; spoofed UDP flows that the task answers and that are
//! sent twice are confirmed and take room in it (never an entry in use). `netd status` counts flows opened, confirmed, refused (no
//! free port that keeps the flow apart from the others), lost (a flow found with its reverse half evicted: forgotten),
//! answers from a wrong VTEP (dropped) and bad ACKs (a client ACK that does not
//! acknowledge the task's SYN-ACK: not confirmed). Each map holds 131072 flows;
//! `NETD_XDP_FLOW_ENTRIES=N` in the daemon's environment makes them N each when netd
//! creates them (the lab's flood test uses a small table; maps already pinned keep their
//! size).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{links::FdLink, Xdp, XdpMode};
use aya::Ebpf;
use netd_ebpf::maps::{
    BackendKey, FlowFwd, FlowFwdNew, FlowKey, FlowRev, FlowTuple, IngressConfig, MeshBackend,
    PortKey, PortValue, XdpStats, FLOWS_BAD_ACK, FLOWS_CONFIRMED, FLOWS_EXPIRED,
    FLOWS_ICMP_RELAYED, FLOWS_LOST, FLOWS_NO_ROUTE, FLOWS_OPENED, FLOWS_REFUSED, FLOWS_TOO_BIG,
    FLOWS_WRONG_VTEP, FLOW_CLIENT, FLOW_FIN, FLOW_KERNEL, FLOW_SEEN_MASK, FLOW_SEEN_SHIFT,
    MESH_CLIENT_SOURCE,
};
use serde::Serialize;
use serde_json::{json, Value};

use super::ebpf::{drop_slot, slot_backends, take_map};

/// `--xdp`: where the fast path may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Setting {
    /// Native where the driver takes it, else generic.
    Auto,
    Native,
    Generic,
    /// Kernel path only.
    Off,
}

impl FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Setting::Auto),
            "native" => Ok(Setting::Native),
            "generic" => Ok(Setting::Generic),
            "off" => Ok(Setting::Off),
            other => Err(format!(
                "unknown --xdp {other:?}: use auto, native, generic or off"
            )),
        }
    }
}

/// A published port as the fast path balances it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPort {
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub port: u16,
    pub target_port: u16,
    /// Each task's ingress address and its node's VTEP, in round-robin order.
    pub backends: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Ingress addresses of tasks being drained or failing their health check: out of
    /// the picks, their flows kept.
    pub draining: Vec<Ipv4Addr>,
}

/// Everything the fast path needs from the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshTable {
    pub node_ip: Ipv4Addr,
    pub ingress_ip: Ipv4Addr,
    /// The ingress network's prefix length.
    pub ingress_prefix: u8,
    pub vni: u32,
    pub vxlan_port: u16,
    /// The largest IP packet the overlay carries (`--underlay-mtu` less VXLAN's 50
    /// bytes): the MSS clamp and the size limit of wrapped datagrams follow it.
    pub overlay_mtu: u16,
    /// New flows keep the client's address (`--mesh-source client`).
    pub client_source: bool,
    pub ports: Vec<MeshPort>,
}

const ROOT: &str = "/sys/fs/bpf/netd-xdp";

/// The environment variable that sizes the flow maps when netd creates them (for tests
/// that overflow them; see the module's documentation).
pub const FLOW_ENTRIES_ENV: &str = "NETD_XDP_FLOW_ENTRIES";

/// Seconds a UDP flow of the fast path may go without a packet (the program's own is
/// about 120 s, as the kernel path's conntrack keeps an answered UDP flow): for tests
/// that watch flows expire, as [`FLOW_ENTRIES_ENV`] is.
pub const UDP_IDLE_ENV: &str = "NETD_XDP_UDP_IDLE_SECS";

/// A positive number from environment variable `var`, if it is set; `what` names the
/// unit in the error.
fn env_count(var: &str, what: &str) -> Result<Option<u32>> {
    let Some(v) = std::env::var_os(var) else {
        return Ok(None);
    };
    match v.to_str().and_then(|s| s.trim().parse::<u32>().ok()) {
        Some(n) if n > 0 => Ok(Some(n)),
        _ => Err(anyhow!("{var}={v:?}: not a number of {what} (1 or more)")),
    }
}

/// Seconds an established TCP flow a FIN of which passed may stay quiet before the
/// sweep removes it (120 by default: longer than Linux's FIN_WAIT2 and TIME_WAIT, 60 s
/// each, so a closing connection's last packets still find their flow): for tests that
/// watch closed flows go, as [`FLOW_ENTRIES_ENV`] is.
pub const CLOSED_ENV: &str = "NETD_XDP_CLOSED_SECS";

/// How long an established TCP flow without a FIN may stay quiet before the sweep
/// removes it: a client gone without a word. Five days, the kernel conntrack's
/// established timeout, which the kernel path keeps.
pub(crate) const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(5 * 24 * 3600);

/// What [`FlowMaps::sweep`] removes: quiet times in the program's units (2^30 ns).
struct Quiet {
    closed: u32,
    tcp: u32,
    udp: u32,
}

impl Quiet {
    fn from_env() -> Result<Quiet> {
        let closed = env_count(CLOSED_ENV, "seconds")?.unwrap_or(120);
        let udp = udp_idle()?.map_or(netd_ebpf::UDP_IDLE_UNITS, netd_ebpf::seen_units);
        Ok(Quiet {
            closed: netd_ebpf::seen_units(std::time::Duration::from_secs(closed.into())),
            tcp: netd_ebpf::seen_units(TCP_IDLE),
            udp,
        })
    }
}

/// How long a flow stamped `seen` has been quiet at `now` (both in the program's units,
/// modulo their range). A stamp ahead of `now` (a packet since the clock was read: the
/// walk of a large table can outlast a unit) is no time at all, not most of the range:
/// read as the latter, every flow seen during the walk was removed as long quiet.
fn quiet_for(now: u32, seen: u32) -> u32 {
    let q = now.wrapping_sub(seen) & FLOW_SEEN_MASK;
    if q > FLOW_SEEN_MASK / 2 {
        0
    } else {
        q
    }
}

/// Now, in the program's units of its flows' last-seen stamps (bpf_ktime_get_ns, the
/// monotonic clock, >> 30).
fn seen_now() -> Result<u32> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .context("read the monotonic clock")?;
    let ns = t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64;
    Ok((ns >> 30) as u32 & FLOW_SEEN_MASK)
}

/// The idle time from [`UDP_IDLE_ENV`], if it is set.
fn udp_idle() -> Result<Option<std::time::Duration>> {
    Ok(env_count(UDP_IDLE_ENV, "seconds")?.map(|n| std::time::Duration::from_secs(n.into())))
}

/// The flow maps' size from [`FLOW_ENTRIES_ENV`], if it is set.
fn flow_entries() -> Result<Option<u32>> {
    env_count(FLOW_ENTRIES_ENV, "flow entries")
}

pub struct XdpMesh {
    setting: Setting,
    dir: PathBuf,
    /// Where the attach mode is remembered across restarts (bpffs holds no files).
    mode_file: PathBuf,
    inner: Mutex<Inner>,
    /// The highest `other` drop count `/metrics` showed (see [`XdpMesh::metrics`]).
    other_drops: AtomicU64,
    /// The `no_route` drops already seen by [`XdpMesh::dropped_for_want_of_neighbours`].
    no_route_seen: AtomicU64,
    /// Next hops the kernel was asked to resolve for the fast path (see
    /// [`XdpMesh::unresolved_next_hops`]).
    neighbours_asked: AtomicU64,
}

/// The most addresses one look at the flow tables returns: a flood of new (spoofed)
/// clients must not turn into as many ARP requests; established clients come first.
const MAX_UNRESOLVED: usize = 1024;

#[derive(Default)]
struct Inner {
    loaded: Option<Loaded>,
    interface: Option<String>,
    mode: Option<String>,
    error: Option<String>,
}

struct Loaded {
    obj: Ebpf,
    cfg: Array<MapData, IngressConfig>,
    ports: HashMap<MapData, PortKey, PortValue>,
    backends: HashMap<MapData, BackendKey, MeshBackend>,
    rr: HashMap<MapData, u32, u32>,
    stats: PerCpuArray<MapData, XdpStats>,
    /// Flow counters, indexed by netd_ebpf::maps::FLOWS_*.
    flow_stats: PerCpuArray<MapData, u64>,
    /// The flow tables (established and unconfirmed), for removing the flows of a task
    /// that left its port.
    flows: FlowMaps,
    /// Flows removed because their task left (since this netd started).
    flows_removed: u64,
    /// What the sweep removes, and how many flows it removed (since this netd started).
    quiet: Quiet,
    flows_swept: u64,
    /// Port -> (slot, value, backends) as programmed.
    slots: BTreeMap<(u8, u16), (u32, PortValue, Vec<MeshBackend>)>,
    /// (protocol, port, backend) of the tasks being drained as last synced: their flows
    /// go when they leave this list.
    draining: BTreeSet<(u8, u16, u32)>,
    next_slot: u32,
    /// The pinned link runs this object's program (attached or checked by this netd).
    linked: bool,
}

/// The fast path's flow tables (see ebpf/bpf/ingress_xdp.c): forward halves keyed by
/// the client's side, reverse halves by the task's answer.
struct FlowMaps {
    fwd: HashMap<MapData, FlowKey, FlowFwd>,
    fwd_new: HashMap<MapData, FlowKey, FlowFwdNew>,
    rev: HashMap<MapData, FlowTuple, FlowRev>,
    rev_new: HashMap<MapData, FlowTuple, FlowRev>,
    /// Reverse halves the last sweep found without their forward half: the next sweep
    /// removes those it finds so again (a flow being confirmed has its reverse half in
    /// place a moment before its forward half).
    orphans: std::collections::HashSet<FlowTuple>,
}

impl FlowMaps {
    /// Removes the flows of the tasks in `left` ((protocol, published port, task address
    /// as in the maps)), both halves in both tables, so that none steers a client's next
    /// packet to a task that is gone (the program then picks anew); how many flows. A
    /// walk of the tables, done only when a task leaves a port.
    fn forget(&mut self, left: &BTreeSet<(u8, u16, u32)>) -> u64 {
        let gone =
            |proto: u8, port: u16, task: u32| left.contains(&(proto, u16::from_be(port), task));
        let fwd: Vec<FlowKey> = self
            .fwd
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, f)| gone(k.proto, k.port_b, f.backend))
            .map(|(k, _)| k)
            .collect();
        let fwd_new: Vec<FlowKey> = self
            .fwd_new
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, n)| gone(k.proto, k.port_b, n.fwd.backend))
            .map(|(k, _)| k)
            .collect();
        let removed = fwd.iter().filter(|k| self.fwd.remove(k).is_ok()).count()
            + fwd_new
                .iter()
                .filter(|k| self.fwd_new.remove(k).is_ok())
                .count();
        // The reverse halves (keyed by the task's answer; the published port is in the
        // value), also those whose forward half was evicted before.
        for map in [&mut self.rev, &mut self.rev_new] {
            let stale: Vec<FlowTuple> = map
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(k, v)| gone(k.proto, v.published_port, k.src))
                .map(|(k, _)| k)
                .collect();
            for k in &stale {
                let _ = map.remove(k);
            }
        }
        removed as u64
    }
}

impl FlowMaps {
    /// Removes what the established table's plain hashes would otherwise keep for
    /// ever: TCP flows a FIN of which passed, quiet for `quiet.closed`; TCP flows quiet
    /// for `quiet.tcp`; UDP flows quiet for longer than the program's idle time (which
    /// it only ever noticed on the client's next datagram); and reverse halves that lead
    /// to no forward half. `now` in the program's units, `ingress_ip` as in its config.
    /// Walks of both established maps: every [`SWEEP_EVERY`]. How many flows went.
    fn sweep(&mut self, now: u32, ingress_ip: u32, quiet: &Quiet) -> u64 {
        let stale: Vec<(FlowKey, FlowFwd)> = self
            .fwd
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, f)| {
                let q = quiet_for(now, f.flags >> FLOW_SEEN_SHIFT);
                match k.proto {
                    TCP => (f.flags & FLOW_FIN != 0 && q > quiet.closed) || q > quiet.tcp,
                    _ => q > quiet.udp,
                }
            })
            .collect();
        let mut removed = 0;
        for (k, f) in &stale {
            // Unless a packet moved it on since the walk, or the client's next SYN made
            // a new flow under its key.
            if self.fwd.get(k, 0).ok().as_ref() != Some(f) {
                continue;
            }
            if f.flags & FLOW_KERNEL == 0 {
                let _ = self.rev.remove(&reverse_key(ingress_ip, k, f));
            }
            if self.fwd.remove(k).is_ok() {
                removed += 1;
            }
        }
        let orphans: std::collections::HashSet<FlowTuple> = self
            .rev
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(rk, rv)| {
                let fk = FlowKey {
                    addr: rv.client,
                    port_a: rv.client_port,
                    port_b: rv.published_port,
                    proto: rk.proto,
                    pad: [0; 3],
                };
                !self
                    .fwd
                    .get(&fk, 0)
                    .is_ok_and(|f| reverse_key(ingress_ip, &fk, &f) == *rk)
            })
            .map(|(rk, _)| rk)
            .collect();
        for rk in orphans.intersection(&self.orphans) {
            let _ = self.rev.remove(rk);
        }
        self.orphans = orphans;
        removed
    }
}

/// How often the established flow tables are swept ([`FlowMaps::sweep`]).
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

const TCP: u8 = 6;

/// The reverse key of established flow `k` -> `f` (ingress_xdp.c's `reverse_key`): the
/// task's answer, from its address and target port to the client's side as the task
/// sees it.
fn reverse_key(ingress_ip: u32, k: &FlowKey, f: &FlowFwd) -> FlowTuple {
    FlowTuple {
        src: f.backend,
        dst: if f.flags & FLOW_CLIENT != 0 {
            k.addr
        } else {
            ingress_ip
        },
        sport: f.target_port,
        dport: f.snat_port,
        proto: k.proto,
        pad: [0; 3],
    }
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

impl Loaded {
    fn load(dir: &Path) -> Result<Self> {
        let options = netd_ebpf::IngressOptions {
            flow_entries: flow_entries()?,
            udp_idle: udp_idle()?,
        };
        let mut obj = netd_ebpf::load_ingress_xdp_with(dir, &options)
            .with_context(|| format!("load ingress_xdp with maps in {}", dir.display()))?;
        let prog: &mut Xdp = obj
            .program_mut(netd_ebpf::INGRESS_XDP_PROGRAM)
            .context("program netd_ingress missing")?
            .try_into()
            .context("netd_ingress")?;
        prog.load().context("the kernel refused netd_ingress")?;
        let mut l = Loaded {
            cfg: take_map(&mut obj, "netd_ingress_cfg")?,
            ports: take_map(&mut obj, "netd_ports")?,
            backends: take_map(&mut obj, "netd_mesh_backends")?,
            rr: take_map(&mut obj, "netd_mesh_rr")?,
            stats: take_map(&mut obj, "netd_xdp_stats")?,
            flow_stats: take_map(&mut obj, "netd_xdp_flow_stats")?,
            flows: FlowMaps {
                fwd: take_map(&mut obj, "netd_flows_fwd")?,
                fwd_new: take_map(&mut obj, "netd_flows_fwd_new")?,
                rev: take_map(&mut obj, "netd_flows_rev")?,
                rev_new: take_map(&mut obj, "netd_flows_rev_new")?,
                orphans: Default::default(),
            },
            flows_removed: 0,
            quiet: Quiet::from_env()?,
            flows_swept: 0,
            obj,
            slots: BTreeMap::new(),
            draining: BTreeSet::new(),
            next_slot: 1,
            linked: false,
        };
        // After a restart: what the pinned maps hold, so unchanged ports stay untouched.
        let ports: Vec<(PortKey, PortValue)> = l.ports.iter().filter_map(|r| r.ok()).collect();
        for (k, v) in ports {
            let backends = slot_backends(&l.backends, v.slot, v.count);
            l.slots
                .insert((k.proto, u16::from_be(k.port)), (v.slot, v, backends));
            l.next_slot = l.next_slot.max(v.slot.wrapping_add(1));
        }
        Ok(l)
    }

    /// Attaches to `ifname` unless the pinned link is there; returns the mode used.
    /// `auto` takes generic mode on a veth: native XDP_TX on a veth hands frames to the
    /// peer's XDP, and without a program there (the peer is not netd's) they are lost.
    /// A pinned link that runs other code (the netd before was another version) gets
    /// this netd's program, atomically.
    fn attach(
        &mut self,
        dir: &Path,
        ifname: &str,
        kind: Option<&str>,
        setting: Setting,
    ) -> Result<Option<String>> {
        let pin = dir.join("link_netd_ingress");
        let prog: &mut Xdp = self
            .obj
            .program_mut(netd_ebpf::INGRESS_XDP_PROGRAM)
            .context("program netd_ingress missing")?
            .try_into()
            .context("netd_ingress")?;
        if pin.exists() {
            if self.linked {
                return Ok(None);
            }
            match netd_ebpf::relink::relink_xdp(prog, &pin) {
                Ok(replaced) => {
                    if replaced {
                        tracing::info!(link = %pin.display(), "XDP link runs this netd's program now");
                    }
                    self.linked = true;
                    return Ok(None);
                }
                // A link that cannot take the program (its interface went away, the link
                // was detached) would fail every step from here on: drop the pin, which
                // releases the link, and attach afresh below.
                Err(e) => {
                    tracing::warn!(link = %pin.display(), error = %e, "XDP link unusable; attaching anew");
                    std::fs::remove_file(&pin)
                        .with_context(|| format!("remove the unusable link {}", pin.display()))?;
                }
            }
        }
        let modes: &[(XdpMode, &str)] = match setting {
            Setting::Native => &[(XdpMode::Driver, "native")],
            Setting::Generic => &[(XdpMode::Skb, "generic")],
            _ if kind == Some("veth") => &[(XdpMode::Skb, "generic")],
            _ => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        };
        let mut last = None;
        for (mode, name) in modes {
            match prog.attach(ifname, *mode) {
                Ok(id) => {
                    let link = FdLink::try_from(prog.take_link(id)?)
                        .map_err(|e| anyhow!("XDP link is not an fd link: {e}"))?;
                    link.pin(&pin)
                        .with_context(|| format!("pin {}", pin.display()))?;
                    self.linked = true;
                    return Ok(Some(name.to_string()));
                }
                Err(e) => last = Some(format!("{name}: {e}")),
            }
        }
        Err(anyhow!(
            "attach XDP to {ifname}: {}",
            last.unwrap_or_default()
        ))
    }

    fn program(&mut self, t: &MeshTable) -> Result<()> {
        let cfg = IngressConfig {
            node_ip: be(t.node_ip),
            ingress_ip: be(t.ingress_ip),
            vni: t.vni,
            vxlan_port: t.vxlan_port.to_be(),
            overlay_mtu: t.overlay_mtu,
            flags: if t.client_source {
                MESH_CLIENT_SOURCE
            } else {
                0
            },
            ingress_mask: u32::MAX
                .checked_shl(32 - u32::from(t.ingress_prefix.min(32)))
                .unwrap_or(0)
                .to_be(),
        };
        self.cfg.set(0, cfg, 0).context("write ingress config")?;
        let draining: BTreeSet<(u8, u16, u32)> = t
            .ports
            .iter()
            .flat_map(|p| p.draining.iter().map(|a| (p.proto, p.port, be(*a))))
            .collect();
        let want: BTreeMap<(u8, u16), (PortValue, Vec<MeshBackend>)> = t
            .ports
            .iter()
            .map(|p| {
                let backends = p
                    .backends
                    .iter()
                    .map(|(addr, vtep)| MeshBackend {
                        addr: be(*addr),
                        vtep: be(*vtep),
                    })
                    .collect::<Vec<_>>();
                let value = PortValue {
                    slot: 0,
                    count: backends.len() as u32,
                    target_port: p.target_port.to_be(),
                    pad: 0,
                };
                ((p.proto, p.port), (value, backends))
            })
            .collect();
        // Backends that leave a port (or go with it): their flows go too, once the port
        // no longer picks them; a draining one's stay until it leaves the draining list.
        let mut left: BTreeSet<(u8, u16, u32)> = BTreeSet::new();
        for (k, (_, _, old)) in &self.slots {
            let now = want.get(k).map(|(_, b)| b.as_slice()).unwrap_or_default();
            left.extend(
                old.iter()
                    .filter(|b| !now.iter().any(|n| n.addr == b.addr))
                    .map(|b| (k.0, k.1, b.addr))
                    .filter(|f| !draining.contains(f)),
            );
        }
        left.extend(self.draining.difference(&draining).filter(|f| {
            let now = want
                .get(&(f.0, f.1))
                .map(|(_, b)| b.as_slice())
                .unwrap_or_default();
            !now.iter().any(|n| n.addr == f.2)
        }));
        self.draining = draining;
        let gone: Vec<(u8, u16)> = self
            .slots
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            crate::writes::count(crate::writes::Kind::Bpf, 1);
            let _ = self.ports.remove(&port_key(k));
            if let Some((slot, _, old)) = self.slots.remove(&k) {
                drop_slot(&mut self.backends, &mut self.rr, slot, old.len());
            }
        }
        for (k, (value, backends)) in want {
            if let Some((_, v, b)) = self.slots.get(&k) {
                // Same backends, same target: nothing to switch.
                if v.count == value.count && v.target_port == value.target_port && *b == backends {
                    continue;
                }
            }
            // A fresh slot, then one switch of the port's value, as for VIPs.
            crate::writes::count(crate::writes::Kind::Bpf, 1);
            let slot = self.next_slot;
            self.next_slot = self.next_slot.wrapping_add(1).max(1);
            for (i, b) in backends.iter().enumerate() {
                self.backends
                    .insert(
                        BackendKey {
                            service: slot,
                            index: i as u32,
                        },
                        b,
                        0,
                    )
                    .context("write mesh backend")?;
            }
            self.rr.insert(slot, 0, 0).context("mesh round-robin")?;
            let value = PortValue { slot, ..value };
            self.ports
                .insert(port_key(k), value, 0)
                .context("switch published port")?;
            if let Some((old, _, b)) = self.slots.insert(k, (slot, value, backends)) {
                drop_slot(&mut self.backends, &mut self.rr, old, b.len());
            }
        }
        if !left.is_empty() {
            let removed = self.flows.forget(&left);
            crate::writes::count(crate::writes::Kind::Bpf, removed);
            self.flows_removed += removed;
            if removed > 0 {
                tracing::info!(removed, "XDP flows of tasks that left removed");
            }
        }
        Ok(())
    }

    fn stats(&self) -> XdpStats {
        let mut s = XdpStats::default();
        if let Ok(per_cpu) = self.stats.get(&0, 0) {
            for c in per_cpu.iter() {
                s.forwarded += c.forwarded;
                s.returned += c.returned;
                s.passed += c.passed;
                s.dropped += c.dropped;
            }
        }
        s
    }

    /// The flow counters, summed over CPUs (a counter the pinned map lacks reads 0).
    fn flow_stats(&self) -> FlowStats {
        let sum = |i: u32| -> u64 {
            self.flow_stats
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        FlowStats {
            opened: sum(FLOWS_OPENED),
            confirmed: sum(FLOWS_CONFIRMED),
            refused: sum(FLOWS_REFUSED),
            lost: sum(FLOWS_LOST),
            wrong_vtep: sum(FLOWS_WRONG_VTEP),
            bad_ack: sum(FLOWS_BAD_ACK),
            expired: sum(FLOWS_EXPIRED),
            too_big: sum(FLOWS_TOO_BIG),
            icmp_relayed: sum(FLOWS_ICMP_RELAYED),
            no_route: sum(FLOWS_NO_ROUTE),
        }
    }
}

/// What happened to the fast path's flows (see ebpf/bpf/netd_maps.h, NETD_FLOWS_*).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct FlowStats {
    /// New flows, entered into the unconfirmed table.
    opened: u64,
    /// Flows moved to the established table.
    confirmed: u64,
    /// New flows without a free translation port (left to the kernel path).
    refused: u64,
    /// Flows (of either table) found with their reverse half evicted: forgotten (left to
    /// the kernel path, or reopened).
    lost: u64,
    /// Answers of an XDP flow whose outer (VXLAN) source was not the VTEP of the flow's
    /// task: dropped, never unwrapped (forged, or sent from another address of the
    /// task's node).
    wrong_vtep: u64,
    /// Client ACKs of an answered, unconfirmed TCP flow that did not acknowledge the
    /// task's SYN-ACK (blind ACKs from spoofed sources): forwarded, not confirmed.
    bad_ack: u64,
    /// UDP flows forgotten after going idle (the client's next datagram picks anew).
    expired: u64,
    /// Client packets too big for the overlay: with DF set answered with ICMP
    /// "fragmentation needed" (the overlay's MTU), without it dropped.
    too_big: u64,
    /// ICMP errors to the node about a flow's packets to its client (a router's
    /// "fragmentation needed" on the client's side), sent on to the task.
    icmp_relayed: u64,
    /// Packets dropped for want of a route or a neighbour entry for their next hop.
    no_route: u64,
}

fn port_key((proto, port): (u8, u16)) -> PortKey {
    PortKey {
        port: port.to_be(),
        proto,
        pad: 0,
    }
}

impl XdpMesh {
    pub fn new(node: &str, setting: Setting) -> Self {
        XdpMesh {
            setting,
            dir: Path::new(ROOT).join(node),
            mode_file: Path::new(super::userspace::RUN_ROOT)
                .join(node)
                .join("xdp-mode"),
            inner: Mutex::new(Inner::default()),
            other_drops: AtomicU64::new(0),
            no_route_seen: AtomicU64::new(0),
            neighbours_asked: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| anyhow!("XDP state poisoned"))
    }

    /// Runs the fast path for `table` on `ifname`, or removes it (no mesh, or `--xdp
    /// off`). A failure leaves the kernel path in charge and is kept for `netd status`.
    pub fn sync(
        &self,
        ifname: Option<&str>,
        kind: Option<&str>,
        table: Option<&MeshTable>,
    ) -> Result<()> {
        let mut inner = self.lock()?;
        let (Some(ifname), Some(table), false) = (ifname, table, self.setting == Setting::Off)
        else {
            inner.loaded = None;
            inner.mode = None;
            if self.dir.exists() {
                tracing::info!("removing the XDP fast path");
                std::fs::remove_dir_all(&self.dir)
                    .with_context(|| format!("remove {}", self.dir.display()))?;
            }
            let _ = std::fs::remove_file(&self.mode_file);
            return Ok(());
        };
        let result = (|| -> Result<()> {
            netd_ebpf::ensure_bpffs()?;
            if inner.loaded.is_none() {
                inner.loaded = Some(Loaded::load(&self.dir)?);
            }
            let l = inner.loaded.as_mut().context("XDP object not loaded")?;
            l.program(table)?;
            if let Some(mode) = l.attach(&self.dir, ifname, kind, self.setting)? {
                if let Some(d) = self.mode_file.parent() {
                    std::fs::create_dir_all(d)?;
                }
                std::fs::write(&self.mode_file, &mode)?;
                tracing::info!(ifname, mode, "XDP fast path attached");
            }
            Ok(())
        })();
        inner.interface = Some(ifname.to_string());
        inner.mode = std::fs::read_to_string(&self.mode_file).ok();
        inner.error = result.as_ref().err().map(|e| format!("{e:#}"));
        result
    }

    /// The interface the program runs on now, if the last sync attached it.
    pub fn running_on(&self) -> Option<String> {
        self.lock()
            .ok()
            .filter(|i| i.loaded.is_some() && i.mode.is_some() && i.error.is_none())
            .and_then(|i| i.interface.clone())
    }

    /// Whether the program runs on an interface now (the last sync attached it).
    pub fn attached(&self) -> bool {
        self.running_on().is_some()
    }

    pub fn status(&self) -> Value {
        let Ok(inner) = self.lock() else {
            return json!({"setting": self.setting});
        };
        let stats = inner.loaded.as_ref().map(Loaded::stats);
        let flows = inner.loaded.as_ref().map(Loaded::flow_stats);
        // Walks of the flow maps: status is asked for, not polled.
        let entries = inner.loaded.as_ref().map(|l| {
            let f = &l.flows;
            json!({
                "established": f.fwd.keys().count() + f.rev.keys().count(),
                "unconfirmed": f.fwd_new.keys().count() + f.rev_new.keys().count(),
            })
        });
        json!({
            "setting": self.setting,
            "mode": inner.mode.clone().unwrap_or_else(|| "none".into()),
            "interface": inner.interface,
            "error": inner.error,
            "packets": stats.map(|s| json!({
                "forwarded": s.forwarded,
                "returned": s.returned,
                "passed_to_kernel": s.passed,
                "dropped": s.dropped,
            })),
            "flows": flows,
            "neighbours_asked": self.neighbours_asked.load(Ordering::Relaxed),
            // Closed and idle flows the sweep removed from the established table.
            "flows_swept": inner.loaded.as_ref().map(|l| l.flows_swept),
            // Entries in the flow maps now (each flow has two: one per direction).
            "flow_entries": entries,
        })
    }

    /// The counters `/metrics` shows (None while nothing is loaded). Drops by reason:
    /// each counted reason is one drop (`too_big`: answered with ICMP "fragmentation
    /// needed" when the packet had DF, else dropped outright); `other` is the rest (a
    /// packet cut short, a failed head or tail adjustment). The program counts a reason
    /// before the drop, so the reasons are read first; `other` never goes below what a
    /// scrape showed before (a counter must not).
    pub fn metrics(&self) -> Option<crate::metrics::XdpCounters> {
        let inner = self.lock().ok()?;
        let l = inner.loaded.as_ref()?;
        let f = l.flow_stats();
        let s = l.stats();
        let reasons = [
            ("no_route", f.no_route),
            ("wrong_vtep", f.wrong_vtep),
            ("too_big", f.too_big),
        ];
        let counted: u64 = reasons.iter().map(|(_, n)| n).sum();
        let other = s.dropped.saturating_sub(counted);
        let other = self
            .other_drops
            .fetch_max(other, Ordering::Relaxed)
            .max(other);
        let mut drops = reasons.to_vec();
        drops.push(("other", other));
        Some(crate::metrics::XdpCounters {
            packets: vec![
                ("forwarded", s.forwarded),
                ("returned", s.returned),
                ("passed", s.passed),
                ("dropped", s.dropped),
            ],
            drops,
            flows: f.opened,
        })
    }

    /// The addresses the fast path may have dropped answers to for want of a neighbour
    /// entry (ask [`XdpMesh::dropped_for_want_of_neighbours`] first): the clients of its
    /// flows and the VTEPs of its unconfirmed ones. Blocking (walks of the maps). The
    /// program reads the kernel's neighbour table but cannot fill it, and the node's own
    /// kernel never talks to a client, so an entry collected or flushed would otherwise
    /// stay missing, and every answer to that client dropped, for good (seen in
    /// `netd-bench ingress` with native XDP). The caller has the kernel resolve their
    /// next hops ([`crate::netlink::resolve_neighbour`]).
    pub fn unresolved_next_hops(&self) -> Vec<Ipv4Addr> {
        let Ok(inner) = self.lock() else {
            return vec![];
        };
        let Some(l) = inner.loaded.as_ref() else {
            return vec![];
        };
        let addr = |a: u32| Ipv4Addr::from(u32::from_be(a));
        // Established clients first: they are real (a flood of spoofed sources fills the
        // unconfirmed table, and must not crowd them out of the look).
        let established = l
            .flows
            .fwd
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| addr(k.addr));
        let unconfirmed = l
            .flows
            .fwd_new
            .iter()
            .filter_map(|r| r.ok())
            .flat_map(|(k, n)| [addr(n.fwd.vtep), addr(k.addr)]);
        let mut hops = BTreeSet::new();
        for a in established.chain(unconfirmed) {
            hops.insert(a);
            if hops.len() >= MAX_UNRESOLVED {
                break;
            }
        }
        hops.into_iter().collect()
    }

    /// Whether the fast path dropped packets for want of a neighbour entry since the
    /// last call (a read of one counter): then [`XdpMesh::unresolved_next_hops`] is worth
    /// its walk.
    pub fn dropped_for_want_of_neighbours(&self) -> bool {
        let Ok(inner) = self.lock() else {
            return false;
        };
        let Some(l) = inner.loaded.as_ref() else {
            return false;
        };
        let dropped = l.flow_stats().no_route;
        dropped > self.no_route_seen.swap(dropped, Ordering::Relaxed)
    }

    /// Sweeps the established flow tables ([`FlowMaps::sweep`]); how many flows went.
    /// Blocking (walks of the maps).
    pub fn sweep_flows(&self) -> Result<u64> {
        let mut inner = self.lock()?;
        let Some(l) = inner.loaded.as_mut() else {
            return Ok(0);
        };
        // Without the config the snat flows' reverse keys are unknown: no sweep.
        let ingress_ip = l
            .cfg
            .get(&0, 0)
            .context("read the XDP config for the sweep")?
            .ingress_ip;
        let swept = l.flows.sweep(seen_now()?, ingress_ip, &l.quiet);
        l.flows_swept += swept;
        if swept > 0 {
            tracing::debug!(swept, "closed and idle XDP flows removed");
        }
        Ok(swept)
    }

    /// Counts next hops the caller asked the kernel to resolve (`netd status`).
    pub fn asked_neighbours(&self, n: u64) {
        self.neighbours_asked.fetch_add(n, Ordering::Relaxed);
    }

    /// Flows removed because their task left the port (0 while nothing is loaded).
    pub fn flows_removed(&self) -> u64 {
        self.lock()
            .ok()
            .and_then(|i| i.loaded.as_ref().map(|l| l.flows_removed))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flow stamped after the sweep read the clock is fresh, not quiet for most of
    /// the stamp's range (the sweep removed such live flows, and their clients waited);
    /// stamps before it count as before, across the range's wrap too.
    #[test]
    fn a_flow_seen_since_the_clock_was_read_is_not_quiet() {
        assert_eq!(quiet_for(100, 101), 0, "stamped one unit after now");
        assert_eq!(quiet_for(100, 100), 0);
        assert_eq!(quiet_for(100, 40), 60);
        assert_eq!(quiet_for(2, FLOW_SEEN_MASK), 3, "across the wrap");
        assert_eq!(
            quiet_for(FLOW_SEEN_MASK, 0),
            0,
            "0 is one unit ahead of the last"
        );
        // What the sweep removes: TCP quiet for 5 days (402,000 units) is, just ahead
        // of now is not.
        let five_days = (TCP_IDLE.as_nanos() >> 30) as u32;
        assert!(quiet_for(five_days + 10, 5) > five_days);
        assert!(quiet_for(5, 6) < five_days);
    }
}
