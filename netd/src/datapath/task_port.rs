//! The routing mesh's way back: netd-ebpf's `task_port` on the port of every published
//! task in the ingress network's sandbox (TC, both directions). A flow that keeps the
//! client's address reaches the task straight from the node that took it (its XDP or
//! its ingress sandbox); the program remembers that node's sandbox MAC per flow and
//! sends the task's answers back to it, giving a second flow with the same client
//! address and port another port (ebpf/bpf/task_port.c). No conntrack and no other
//! namespace on the way.
//!
//! Pins live in /sys/fs/bpf/netd-mesh/NODE/ (maps by name). The filters belong to the
//! ports: they stay while netd restarts (a restarted netd puts its own program in) and
//! go with the port. The flows have owners: a task that goes takes its flows, a node
//! whose lease ended takes the flows it brought once it has stayed lost for a grace
//! ([`TaskPorts::forget_lost`]), and idle ones expire ([`TaskPorts::sweep`]), all
//! counted in `netd status`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use ipnetwork::Ipv4Network;
use netd_ebpf::maps::{
    FlowTuple, ReturnConfig, ReturnFlow, ReturnOrigin, RETURN_CLOSING, RETURN_NO_PORT,
    RETURN_RECORDED, RETURN_REMAPPED, RETURN_RETURNED, RETURN_STRAY,
};
use serde_json::{json, Value};

use super::ebpf::take_map;

const ROOT: &str = "/sys/fs/bpf/netd-mesh";
/// The filters' place on a port: one of netd's per direction, replaced in place.
const PRIORITY: u16 = TaskPorts::PRIORITY;
const HANDLE: u16 = 1;
/// A closed TCP flow (FIN or RST seen) is forgotten this long after its last packet.
const CLOSED_IDLE: Duration = Duration::from_secs(60);
/// UDP flows: as the kernel path's conntrack (an answered flow) and XDP.
const UDP_IDLE: Duration = Duration::from_secs(120);
/// TCP flows: the ingress sandboxes' conntrack timeout for established flows, and a
/// little more.
pub(crate) const TCP_IDLE: Duration = Duration::from_secs(7200 + 240);
/// How often at most a step walks the flows for idle ones.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// netd's side of `task_port`, loaded the first time a port needs it.
pub struct TaskPorts {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    loaded: Option<Loaded>,
    /// Flows removed with their task or node, and expired idle ones, since netd started.
    removed: u64,
    expired: u64,
    last_sweep: Option<Instant>,
    lost: Lost,
    /// The ports this netd put the programs on: (namespace, name, index). Only asked
    /// when the maps are new (a port that runs the same code may run it on the maps
    /// before, unless this netd put it there).
    attached: std::collections::HashSet<(String, String, u32)>,
}

struct Loaded {
    obj: Ebpf,
    cfg: Array<MapData, ReturnConfig>,
    flows: HashMap<MapData, FlowTuple, ReturnFlow>,
    ports: HashMap<MapData, ReturnOrigin, u32>,
    stats: PerCpuArray<MapData, u64>,
    config: Option<ReturnConfig>,
    /// The maps were made by this load (none was pinned): a program found on a port
    /// runs on other maps, whatever its code, and is replaced.
    fresh: bool,
    /// The kernel's tags of the loaded programs, as a port's filters report them:
    /// [from the task (ingress), to the task (egress)].
    tags: [u64; 2],
}

impl Loaded {
    fn load(dir: &std::path::Path) -> Result<Self> {
        netd_ebpf::ensure_bpffs()?;
        let fresh = !dir.join("netd_return_flows").exists();
        let mut obj = netd_ebpf::load_task_port(dir)
            .with_context(|| format!("load task_port with maps in {}", dir.display()))?;
        let mut tags = [0; 2];
        let names = [netd_ebpf::TASK_PORT_FROM_TASK, netd_ebpf::TASK_PORT_TO_TASK];
        for (i, name) in names.into_iter().enumerate() {
            let prog: &mut SchedClassifier = obj
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()
                .with_context(|| name.to_string())?;
            prog.load()
                .with_context(|| format!("the kernel refused {name}"))?;
            tags[i] = prog
                .info()
                .with_context(|| format!("describe {name}"))?
                .tag();
        }
        let cfg: Array<MapData, ReturnConfig> = take_map(&mut obj, "netd_return_cfg")?;
        let config = cfg.get(&0, 0).ok().filter(|c| c.mask != 0);
        Ok(Loaded {
            cfg,
            flows: take_map(&mut obj, "netd_return_flows")?,
            ports: take_map(&mut obj, "netd_return_ports")?,
            stats: take_map(&mut obj, "netd_return_stats")?,
            config,
            fresh,
            tags,
            obj,
        })
    }

    /// Whether a port's filter in `direction` (0 ingress, 1 egress; `found`, its tag as
    /// the port reports it) runs this code on these maps (`ours`: this netd put it
    /// there, which matters when the maps are new).
    fn runs_ours(&self, direction: usize, found: Option<u64>, ours: bool) -> bool {
        found == Some(self.tags[direction]) && (!self.fresh || ours)
    }

    /// Puts both programs on port `ifname` of the calling thread's namespace, replacing
    /// what netd's place there holds (an older netd's program), except where it runs
    /// the same code on these maps already (`tags`: ingress, egress, as the port's
    /// filters report them; `ours`: this netd put it there); how many filters it wrote.
    fn attach(&mut self, ifname: &str, tags: [Option<u64>; 2], ours: bool) -> Result<u64> {
        let mut written = 0;
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("clsact qdisc on {ifname}")),
        }
        for (i, name, direction) in [
            (0, netd_ebpf::TASK_PORT_FROM_TASK, TcAttachType::Ingress),
            (1, netd_ebpf::TASK_PORT_TO_TASK, TcAttachType::Egress),
        ] {
            if self.runs_ours(i, tags[i], ours) {
                continue;
            }
            let prog: &mut SchedClassifier = self
                .obj
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()
                .with_context(|| name.to_string())?;
            written += 1;
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                handle: TcHandle::new(0, HANDLE),
                ..Default::default()
            });
            let id = match prog.attach_with_options(ifname, direction, options) {
                Ok(id) => id,
                // Ours already (a step before, or a netd before this one): replaced.
                Err(_) => {
                    let link = SchedClassifierLink::attached(
                        ifname,
                        direction,
                        PRIORITY,
                        TcHandle::new(0, HANDLE),
                        None,
                    )
                    .with_context(|| format!("port {ifname}"))?;
                    prog.attach_to_link(link)
                        .with_context(|| format!("put {name} on {ifname}"))?
                }
            };
            // The filter belongs to the port, not to this process: a link dropped with
            // the program would take it off (and the restart would lose its answers).
            let link = prog.take_link(id).context("the filter just attached")?;
            std::mem::forget(link);
        }
        Ok(written)
    }

    fn configure(&mut self, subnet: Ipv4Network) -> Result<()> {
        let want = ReturnConfig {
            net: u32::from(subnet.network()).to_be(),
            mask: u32::from(subnet.mask()).to_be(),
        };
        if self.config != Some(want) {
            self.cfg.set(0, want, 0).context("write netd_return_cfg")?;
            self.config = Some(want);
        }
        Ok(())
    }

    /// Removes the flows `gone` picks (and their port remaps); how many. Each is read
    /// again just before it goes: one a packet refreshed since the walk, or a new flow
    /// that took its key, stays (no compare-and-delete in the kernel: this narrows the
    /// window, a packet in between can still lose its entry, and the next one makes it
    /// anew).
    fn remove(&mut self, gone: impl Fn(&FlowTuple, &ReturnFlow) -> bool) -> u64 {
        let stale: Vec<(FlowTuple, ReturnFlow)> = self
            .flows
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, f)| gone(k, f))
            .collect();
        let mut removed = 0;
        for (k, f) in &stale {
            if self.flows.get(k, 0).ok().as_ref() != Some(f) {
                continue;
            }
            if self.flows.remove(k).is_ok() {
                removed += 1;
            }
            if f.port != k.dport {
                // Only if it still leads to this flow's port: a newer flow of the same
                // origin may have another by now.
                let origin = ReturnOrigin::of(k, f);
                if self.ports.get(&origin, 0).ok() == Some(u32::from(k.dport)) {
                    let _ = self.ports.remove(&origin);
                }
            }
        }
        removed
    }

    fn counter(&self, which: u32) -> u64 {
        self.stats
            .get(&which, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

/// CLOCK_MONOTONIC, as `bpf_ktime_get_ns()` reads it.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Whether flow `f` (protocol `proto`) has been idle past its timeout at `now`.
fn idle(proto: u8, f: &ReturnFlow, now: u64) -> bool {
    let limit = if f.flags & RETURN_CLOSING != 0 {
        CLOSED_IDLE
    } else if proto == libc::IPPROTO_UDP as u8 {
        UDP_IDLE
    } else {
        TCP_IDLE
    };
    now.saturating_sub(f.seen) > limit.as_nanos() as u64
}

/// The ingress sandboxes (by address) of nodes whose lease ended, since when, and
/// whether their flows went. What a lost node brought stays for a grace: a node that
/// restarts past its lease, or whose keep-alives to etcd broke while its links did not,
/// still carries those connections, and a task's answer with no flow would go to its
/// own node, never to the client (the client's next packet would record the flow
/// again, but a client that sent its request and waits sends none). A dead node's flows
/// go after the grace; a new connection never needs that, as a SYN that meets a stale
/// open flow gets a port of its own.
#[derive(Debug, Default)]
struct Lost {
    since: BTreeMap<Ipv4Addr, (Instant, bool)>,
}

impl Lost {
    /// Notes the sandboxes lost `now` (any other came back, or went with its network);
    /// whether one of them is newly lost.
    fn note(&mut self, lost: &BTreeSet<Ipv4Addr>, now: Instant) -> bool {
        self.keep_only(lost);
        let before = self.since.len();
        for a in lost {
            self.since.entry(*a).or_insert((now, false));
        }
        self.since.len() > before
    }

    /// Forgets the sandboxes not in `lost` (they came back), adding none: a sandbox
    /// first seen lost here would get no wake of its own at its grace's end.
    fn keep_only(&mut self, lost: &BTreeSet<Ipv4Addr>) {
        self.since.retain(|a, _| lost.contains(a));
    }

    /// Marks `sandboxes` as not gone after all (their flows' walk failed).
    fn undo(&mut self, sandboxes: &BTreeSet<Ipv4Addr>) {
        for a in sandboxes {
            if let Some((_, gone)) = self.since.get_mut(a) {
                *gone = false;
            }
        }
    }

    /// The sandboxes lost for `grace` or longer at `now` whose flows have not gone yet,
    /// marked gone.
    fn due(&mut self, grace: Duration, now: Instant) -> BTreeSet<Ipv4Addr> {
        let mut due = BTreeSet::new();
        for (a, (since, gone)) in self.since.iter_mut() {
            if !*gone && now.saturating_duration_since(*since) >= grace {
                *gone = true;
                due.insert(*a);
            }
        }
        due
    }
}

impl TaskPorts {
    /// The priority of netd's filters on a port.
    pub const PRIORITY: u16 = 1;

    pub fn new(node: &str) -> Self {
        TaskPorts {
            dir: PathBuf::from(ROOT).join(node),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Loaded, &mut Inner) -> Result<R>) -> Result<R> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned lock"))?;
        let mut loaded = match inner.loaded.take() {
            Some(l) => l,
            None => Loaded::load(&self.dir)?,
        };
        let r = f(&mut loaded, &mut inner);
        inner.loaded = Some(loaded);
        r
    }

    /// Writes the ingress network's `subnet` into the program's config (when it
    /// differs) and tells whether port `ifname` (index `index` in namespace `ns`, the
    /// ingress network's sandbox) already runs the way back (`tags`: its filters', from
    /// [`crate::netlink::bpf_filter_tags`]). Asked every time the port's part is: a
    /// filter removed behind netd's back comes back, a port that is right costs no
    /// thread and no write (a restart changes nothing that is right).
    pub fn in_place(
        &self,
        ns: &str,
        ifname: &str,
        index: u32,
        subnet: Ipv4Network,
        tags: [Option<u64>; 2],
    ) -> Result<bool> {
        let key = (ns.to_string(), ifname.to_string(), index);
        self.with(|l, inner| {
            l.configure(subnet)?;
            let ours = inner.attached.contains(&key);
            Ok(l.runs_ours(0, tags[0], ours) && l.runs_ours(1, tags[1], ours))
        })
        .with_context(|| format!("the mesh's way back on {ifname}"))
    }

    /// Puts the way back on port `ifname` (as [`Self::in_place`] names it) where it is
    /// not in place, in the calling thread's namespace: run it through `netns::run_in`.
    pub fn attach(&self, ns: &str, ifname: &str, index: u32, tags: [Option<u64>; 2]) -> Result<()> {
        let key = (ns.to_string(), ifname.to_string(), index);
        self.with(|l, inner| {
            let written = l.attach(ifname, tags, inner.attached.contains(&key))?;
            crate::writes::count(crate::writes::Kind::Netlink, written);
            if l.fresh {
                inner.attached.insert(key);
            }
            Ok(())
        })
        .with_context(|| format!("the mesh's way back on {ifname}"))
    }

    /// Forgets the flows to `tasks` (ingress addresses of tasks that went) and those
    /// brought by the sandboxes of `nodes` (ingress addresses of nodes lost past their
    /// grace): their answers would go to a task or node that is gone. Nothing to do
    /// before the first port needed the program.
    pub fn forget(&self, tasks: &BTreeSet<Ipv4Addr>, nodes: &BTreeSet<Ipv4Addr>) -> Result<u64> {
        if (tasks.is_empty() && nodes.is_empty()) || !self.active() {
            return Ok(0);
        }
        let tasks: BTreeSet<u32> = tasks.iter().map(|a| u32::from(*a).to_be()).collect();
        let macs: BTreeSet<[u8; 6]> = nodes.iter().map(|a| crate::model::mac_for_ip(*a)).collect();
        self.with(|l, inner| {
            let n = l.remove(|k, f| tasks.contains(&k.src) || macs.contains(&f.mac));
            inner.removed += n;
            Ok(n)
        })
    }

    /// Notes which nodes' ingress sandboxes are lost now (`lost`, by address: their
    /// node's lease ended). Whether one is newly lost: its flows are due for
    /// [`TaskPorts::forget_lost`] a grace later.
    pub fn note_lost(&self, lost: &BTreeSet<Ipv4Addr>) -> bool {
        self.inner
            .lock()
            .is_ok_and(|mut i| i.lost.note(lost, Instant::now()))
    }

    /// Drops from the lost sandboxes those not in `lost` (back since they were noted).
    pub fn note_back(&self, lost: &BTreeSet<Ipv4Addr>) {
        if let Ok(mut i) = self.inner.lock() {
            i.lost.keep_only(lost);
        }
    }

    /// Forgets the flows brought by the sandboxes lost (as last noted) for `grace` or
    /// longer, once each (again at the next call if the walk failed).
    pub fn forget_lost(&self, grace: Duration) -> Result<u64> {
        let lock = || {
            self.inner
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned lock"))
        };
        let due = lock()?.lost.due(grace, Instant::now());
        let forgot = self.forget(&BTreeSet::new(), &due);
        if forgot.is_err() {
            lock()?.lost.undo(&due);
        }
        forgot
    }

    /// After a restart (no step before to tell what went): forgets the flows to tasks
    /// not in `tasks` and those brought by sandboxes not in `nodes` (ingress addresses).
    pub fn forget_except(
        &self,
        tasks: &BTreeSet<Ipv4Addr>,
        nodes: &BTreeSet<Ipv4Addr>,
    ) -> Result<u64> {
        if !self.active() {
            return Ok(0);
        }
        let tasks: BTreeSet<u32> = tasks.iter().map(|a| u32::from(*a).to_be()).collect();
        let macs: BTreeSet<[u8; 6]> = nodes.iter().map(|a| crate::model::mac_for_ip(*a)).collect();
        self.with(|l, inner| {
            let n = l.remove(|k, f| !tasks.contains(&k.src) || !macs.contains(&f.mac));
            inner.removed += n;
            Ok(n)
        })
    }

    /// Forgets idle and closed flows (at most every few seconds: a walk of the map).
    pub fn sweep(&self) -> Result<u64> {
        if !self.active() {
            return Ok(0);
        }
        self.with(|l, inner| {
            if inner.last_sweep.is_some_and(|t| t.elapsed() < SWEEP_EVERY) {
                return Ok(0);
            }
            inner.last_sweep = Some(Instant::now());
            let now = monotonic_ns();
            let n = l.remove(|k, f| idle(k.proto, f, now));
            inner.expired += n;
            Ok(n)
        })
    }

    /// Whether the program is loaded (some port needed it) or its maps are pinned (a
    /// netd before this one loaded it).
    fn active(&self) -> bool {
        self.inner.lock().is_ok_and(|i| i.loaded.is_some()) || self.dir.exists()
    }

    /// `netd status`: `routing_mesh.way_back`.
    pub fn status(&self) -> Value {
        if !self.active() {
            return json!({"loaded": false});
        }
        self.with(|l, inner| {
            // Flows by the ingress sandbox that brought them (its address, from its MAC).
            let mut by_sandbox = std::collections::BTreeMap::<String, u64>::new();
            for (_, f) in l.flows.iter().filter_map(|r| r.ok()) {
                let a = Ipv4Addr::new(f.mac[2], f.mac[3], f.mac[4], f.mac[5]);
                *by_sandbox.entry(a.to_string()).or_default() += 1;
            }
            Ok(json!({
                "loaded": true,
                "flows": by_sandbox.values().sum::<u64>(),
                "by_sandbox": by_sandbox,
                "recorded": l.counter(RETURN_RECORDED),
                "remapped": l.counter(RETURN_REMAPPED),
                "returned": l.counter(RETURN_RETURNED),
                "no_free_port": l.counter(RETURN_NO_PORT),
                "stray": l.counter(RETURN_STRAY),
                "removed": inner.removed,
                "expired": inner.expired,
            }))
        })
        .unwrap_or_else(|e| json!({"loaded": false, "error": format!("{e:#}")}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(flags: u32, seen: u64) -> ReturnFlow {
        ReturnFlow {
            flags,
            seen,
            ..Default::default()
        }
    }

    #[test]
    fn a_lost_sandbox_is_due_once_after_its_grace_unless_it_came_back() {
        let (a, b): (Ipv4Addr, Ipv4Addr) = (
            "198.19.255.2".parse().unwrap(),
            "198.19.255.3".parse().unwrap(),
        );
        let grace = Duration::from_secs(5);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut lost = Lost::default();
        assert!(!lost.note(&BTreeSet::new(), at(0)));
        assert!(lost.note(&BTreeSet::from([a]), at(0)));
        // Still lost: not new, and its grace counts from when it was first lost.
        assert!(!lost.note(&BTreeSet::from([a]), at(3)));
        assert!(lost.due(grace, at(4)).is_empty());
        assert!(lost.note(&BTreeSet::from([a, b]), at(4)));
        assert_eq!(lost.due(grace, at(5)), BTreeSet::from([a]));
        // Once, unless its walk failed.
        assert!(lost.due(grace, at(6)).is_empty());
        lost.undo(&BTreeSet::from([a]));
        assert_eq!(lost.due(grace, at(6)), BTreeSet::from([a]));
        // b came back before its grace ran out: never due.
        assert!(!lost.note(&BTreeSet::from([a]), at(7)));
        assert!(lost.due(grace, at(20)).is_empty());
        // Back, as the wake sees it: gone from the set, and nothing added.
        assert!(lost.note(&BTreeSet::from([a, b]), at(21)));
        lost.keep_only(&BTreeSet::from([b]));
        assert_eq!(lost.due(grace, at(40)), BTreeSet::from([b]));
        lost.keep_only(&BTreeSet::from([a]));
        assert!(lost.since.is_empty());
        // Lost again: a grace of its own.
        assert!(lost.note(&BTreeSet::from([a, b]), at(41)));
        assert!(lost.due(grace, at(45)).is_empty());
        assert_eq!(lost.due(grace, at(46)), BTreeSet::from([a, b]));
    }

    #[test]
    fn flows_expire_by_protocol_and_state() {
        let s = 1_000_000_000u64;
        let now = 10_000 * s;
        let (tcp, udp) = (libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8);
        assert!(!idle(udp, &flow(0, now - 100 * s), now));
        assert!(idle(udp, &flow(0, now - 121 * s), now));
        assert!(
            !idle(tcp, &flow(0, now - 7000 * s), now),
            "an idle connection stays"
        );
        assert!(idle(tcp, &flow(0, now - 7500 * s), now));
        assert!(!idle(tcp, &flow(RETURN_CLOSING, now - 30 * s), now));
        assert!(idle(tcp, &flow(RETURN_CLOSING, now - 61 * s), now));
        assert!(
            !idle(tcp, &flow(0, now + s), now),
            "a packet since the clock was read"
        );
    }
}
