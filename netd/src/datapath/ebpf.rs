//! The eBPF datapath: netd-ebpf's `sock_lb` programs on the cgroup v2 root, so they see
//! every socket on the machine, acting only for the network namespaces of this node's
//! tasks (their netns cookies in `netd_netns`). A task's connect() to a VIP is rewritten
//! to a backend before any packet exists; see ebpf/bpf/sock_lb.c.
//!
//! Everything lives under /sys/fs/bpf/netd/NODE/: the maps (pinned by name) and one link
//! per program (`link_PROGRAM`). The pins keep programs and maps alive while netd is
//! down or restarting; a restarted netd loads the object against the same maps and
//! leaves the pinned links as they are. The programs are attached while the node has
//! tasks and removed with the last one (the pin directory goes with them).
//!
//! A backend change takes a fresh *slot*: the new backend list is written under it, then
//! the VIP's single map value is swapped to point at it, then the old slot is deleted.
//! A connect() sees the old list or the new one, never a mix and never an empty one.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::writes::{self, Kind};
use anyhow::{anyhow, Context, Result};
use async_trait::async_trait;
use aya::maps::{HashMap, MapData, PerCpuHashMap};
use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr};
use aya::Ebpf;
use netd_ebpf::maps::{
    BackendKey, BackendValue, Counter, CounterKey, NetnsNet, RevNatKey, VipKey, VipValue,
};
use serde_json::json;

use super::{Counters, Datapath, DatapathStatus, LbTable, Mode, SandboxLb, VipEntry};
use crate::model::Task;
use crate::netns::{self, Netns};

/// Where every node's pins live; each node has its own directory below.
pub const PIN_ROOT: &str = "/sys/fs/bpf/netd";

pub fn pin_dir(node: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(node)
}

fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

/// The cgroup v2 mount: the root every socket of the machine is under.
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .context("no cgroup2 mount: socket load balancing needs cgroup v2 (give --cgroup)")
}

pub struct EbpfDatapath {
    dir: PathBuf,
    cgroup: PathBuf,
    requested: Mode,
    reason: String,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    loaded: Option<Loaded>,
    /// The last table asked for: programmed when the programs are (re)attached. None
    /// until the first one arrives, so a restart never programs an empty table over
    /// the pinned one.
    want: Option<LbTable>,
    /// Netns file (device, inode) -> netns cookie: a cookie never changes for a live
    /// namespace, and asking for it costs a thread.
    cookies: StdHashMap<(u64, u64), u64>,
    /// The maps may differ from `want` anywhere (just loaded, or a pass failed): the
    /// next step programs the whole table.
    unsure: bool,
}

/// The object loaded against the pinned maps, and what the maps hold.
struct Loaded {
    obj: Ebpf,
    netns: HashMap<MapData, u64, u8>,
    vips: HashMap<MapData, VipKey, VipValue>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
    rr: HashMap<MapData, u32, u32>,
    counters: PerCpuHashMap<MapData, CounterKey, Counter>,
    /// VIP -> its network's number; (task netns cookie, network number) present: a VIP
    /// is balanced only for tasks on its network.
    vip_nets: HashMap<MapData, u32, u32>,
    netns_nets: HashMap<MapData, NetnsNet, u8>,
    /// A UDP socket's backend per VIP and port (its affinity), kept by the program.
    udp_flows: HashMap<MapData, RevNatKey, BackendValue>,
    /// VIP -> what the maps hold for it: kept here so that a change compares in memory
    /// and writes only what differs (no map read per VIP).
    slots: BTreeMap<Ipv4Addr, Programmed>,
    /// VIP -> the slot it switched away from last (slot, its backends' count), kept
    /// until the VIP's next switch: a connect() that read the VIP's old value a moment
    /// before a switch still finds that slot's backends. Freed at once, such a connect
    /// could find none and be refused (the program rejects a VIP without a backend).
    retired: BTreeMap<Ipv4Addr, (u32, usize)>,
    next_slot: u32,
    /// The task namespaces and their networks as the maps hold them after the last
    /// [`Loaded::set_netns`] (None: not known, read the maps).
    netns_set: Option<(BTreeSet<u64>, BTreeSet<NetnsNet>)>,
}

/// One VIP as programmed.
#[derive(Debug, Clone)]
struct Programmed {
    slot: u32,
    /// Its network's number in `netd_vip_nets` (None: none there).
    net: Option<u32>,
    backends: Vec<Ipv4Addr>,
    /// Out of picks, flows kept (see [`VipEntry::draining`]).
    draining: Vec<Ipv4Addr>,
}

impl Programmed {
    /// The backends whose flows stay.
    fn kept(&self) -> Vec<Ipv4Addr> {
        self.backends
            .iter()
            .chain(&self.draining)
            .copied()
            .collect()
    }
}

fn vip_key(vip: Ipv4Addr) -> VipKey {
    // Port 0, protocol 0: the whole address (any port to the same port on a backend).
    VipKey {
        addr: u32::from(vip).to_be(),
        ..Default::default()
    }
}

/// A network's number in the eBPF maps: FNV-1a of its name (the maps hold numbers, and
/// both sides of a lookup derive them from the same name).
fn network_number(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn be(addr: Ipv4Addr) -> u32 {
    u32::from(addr).to_be()
}

fn from_be(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr))
}

/// Takes map `name` out of a loaded object as the typed map `T`.
pub(super) fn take_map<T>(obj: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let map = obj
        .take_map(name)
        .with_context(|| format!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

impl Loaded {
    /// Loads the object against the pins in `dir` and reads back what the maps hold
    /// (after a restart: the slots a previous netd programmed).
    fn load(dir: &Path) -> Result<Self> {
        // Links pinned without their maps run programs against maps nobody can reach
        // any more: replace them.
        if !dir.join("netd_vips").exists() {
            for name in netd_ebpf::SOCK_LB_PROGRAMS {
                let _ = std::fs::remove_file(link_pin(dir, name));
            }
        }
        let mut obj = netd_ebpf::load_sock_lb(dir)
            .with_context(|| format!("load sock_lb with maps in {}", dir.display()))?;
        for name in netd_ebpf::SOCK_LB_PROGRAMS {
            let prog: &mut CgroupSockAddr = obj
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()
                .with_context(|| format!("program {name}"))?;
            prog.load()
                .with_context(|| format!("the kernel refused program {name}"))?;
        }
        let mut l = Loaded {
            netns: take_map(&mut obj, "netd_netns")?,
            vips: take_map(&mut obj, "netd_vips")?,
            backends: take_map(&mut obj, "netd_backends")?,
            rr: take_map(&mut obj, "netd_rr")?,
            counters: take_map(&mut obj, "netd_counters")?,
            vip_nets: take_map(&mut obj, "netd_vip_nets")?,
            netns_nets: take_map(&mut obj, "netd_netns_nets")?,
            udp_flows: take_map(&mut obj, "netd_udp_flows")?,
            obj,
            slots: BTreeMap::new(),
            retired: BTreeMap::new(),
            next_slot: 1,
            netns_set: None,
        };
        let entries: Vec<(VipKey, VipValue)> = l.vips.iter().filter_map(|r| r.ok()).collect();
        for (k, v) in entries {
            let backends = slot_backends(&l.backends, v.service, v.count)
                .into_iter()
                .map(|b| from_be(b.addr))
                .collect();
            let programmed = Programmed {
                slot: v.service,
                net: l.vip_nets.get(&k.addr, 0).ok(),
                backends,
                draining: vec![],
            };
            l.slots.insert(from_be(k.addr), programmed);
            l.next_slot = l.next_slot.max(v.service.wrapping_add(1));
        }
        l.free_unreferenced_slots();
        Ok(l)
    }

    /// Attaches every program to `cgroup` unless its pinned link is there already.
    fn attach(&mut self, dir: &Path, cgroup: &Path) -> Result<()> {
        let cg = File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
        for name in netd_ebpf::SOCK_LB_PROGRAMS {
            let pin = link_pin(dir, name);
            if pin.exists() {
                continue;
            }
            let prog: &mut CgroupSockAddr = self
                .obj
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()
                .with_context(|| format!("program {name}"))?;
            // A bpf_link attachment always coexists with others on the cgroup (several
            // nodes, other tools); the kernel refuses flags on it, hence `Single`.
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
            let link = FdLink::try_from(prog.take_link(id)?)
                .map_err(|e| anyhow!("link of {name} is not an fd link: {e}"))?;
            link.pin(&pin)
                .with_context(|| format!("pin link {}", pin.display()))?;
        }
        Ok(())
    }

    /// Programs `table` for the VIPs in `touched` (all when None); unchanged VIPs are
    /// left alone (their round-robin position too).
    fn program(&mut self, table: &LbTable, touched: Option<&BTreeSet<Ipv4Addr>>) -> Result<usize> {
        let all: BTreeSet<Ipv4Addr>;
        let vips = match touched {
            Some(t) => t,
            None => {
                all = self
                    .slots
                    .keys()
                    .chain(table.vips.keys())
                    .copied()
                    .collect();
                &all
            }
        };
        let mut changed = 0;
        for vip in vips {
            let done = match table.vips.get(vip) {
                Some(entry) => self.program_vip(*vip, entry)?,
                None => self.remove_vip(*vip)?,
            };
            changed += usize::from(done);
        }
        if touched.is_none() {
            self.forget_unkept(table);
        }
        Ok(changed)
    }

    /// After a full pass (a start, a follower that fell behind): UDP affinities and
    /// counters of backends that no VIP keeps, however they were left behind (a drained
    /// task that went while netd was down: the drain is not in the pinned maps). A walk
    /// of both maps.
    fn forget_unkept(&mut self, table: &LbTable) {
        let kept = |vip: u32, backend: u32| {
            table
                .vips
                .get(&from_be(vip))
                .is_some_and(|e| e.keeps(&from_be(backend)))
        };
        let flows: Vec<RevNatKey> = self
            .udp_flows
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, v)| !kept(k.addr, v.addr))
            .map(|(k, _)| k)
            .collect();
        let counters: Vec<CounterKey> = self
            .counters
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !kept(k.vip, k.backend))
            .collect();
        let mut removed = 0;
        for k in flows {
            removed += u64::from(self.udp_flows.remove(&k).is_ok());
        }
        for k in counters {
            removed += u64::from(self.counters.remove(&k).is_ok());
        }
        if removed > 0 {
            crate::writes::count(crate::writes::Kind::Bpf, removed);
            tracing::info!(
                removed,
                "eBPF flows and counters of backends that left removed"
            );
        }
    }

    /// The slots no VIP refers to (what the netd before had retired when it stopped):
    /// unreachable, so freeing them changes nothing any program does.
    fn free_unreferenced_slots(&mut self) {
        let used: BTreeSet<u32> = self.slots.values().map(|p| p.slot).collect();
        let backends: Vec<BackendKey> = self
            .backends
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !used.contains(&k.service))
            .collect();
        for k in backends {
            let _ = self.backends.remove(&k);
        }
        let rr: Vec<u32> = self
            .rr
            .keys()
            .filter_map(|k| k.ok())
            .filter(|s| !used.contains(s))
            .collect();
        for s in rr {
            let _ = self.rr.remove(&s);
        }
    }

    /// Keeps the backends of `old` (the slot `vip` switched away from) until the VIP's
    /// next switch, and frees the ones kept before. Its round-robin position goes at once
    /// (the program starts at index 0 without one), so the retired slots cost no entry of
    /// the smaller round-robin map.
    fn retire(&mut self, vip: Ipv4Addr, old: (u32, usize)) {
        let _ = self.rr.remove(&old.0);
        if let Some((slot, count)) = self.retired.insert(vip, old) {
            drop_slot(&mut self.backends, &mut self.rr, slot, count);
        }
    }

    /// Takes a VIP out of the maps; false if it was not there.
    fn remove_vip(&mut self, vip: Ipv4Addr) -> Result<bool> {
        let Some(old) = self.slots.remove(&vip) else {
            return Ok(false);
        };
        self.vips
            .remove(&vip_key(vip))
            .or_else(ignore_missing)
            .with_context(|| format!("remove VIP {vip}"))?;
        self.vip_nets
            .remove(&be(vip))
            .or_else(ignore_missing)
            .with_context(|| format!("remove the network of VIP {vip}"))?;
        drop_slot(
            &mut self.backends,
            &mut self.rr,
            old.slot,
            old.backends.len(),
        );
        if let Some((slot, count)) = self.retired.remove(&vip) {
            drop_slot(&mut self.backends, &mut self.rr, slot, count);
        }
        self.drop_counters(vip, &old.kept(), &[]);
        self.forget_udp_flows(vip, &old.kept(), &[]);
        Ok(true)
    }

    /// Programs one VIP's backends in a fresh slot and switches the VIP to it; false if
    /// the maps hold them already.
    fn program_vip(&mut self, vip: Ipv4Addr, entry: &VipEntry) -> Result<bool> {
        // The VIP's network first: a connect() that finds the VIP finds its network.
        let net = network_number(&entry.network);
        let old = self.slots.get(&vip).cloned();
        if old.as_ref().and_then(|o| o.net) != Some(net) {
            self.vip_nets
                .insert(be(vip), net, 0)
                .with_context(|| format!("record the network of VIP {vip}"))?;
            if let Some(p) = self.slots.get_mut(&vip) {
                p.net = Some(net);
            }
        }
        let old_kept = old.as_ref().map(Programmed::kept).unwrap_or_default();
        let new_kept: Vec<Ipv4Addr> = entry
            .backends
            .iter()
            .chain(&entry.draining)
            .copied()
            .collect();
        if old.as_ref().map(|o| &o.backends) == Some(&entry.backends) {
            // Only who is draining may differ: a task whose drain ended leaves for good.
            self.drop_counters(vip, &old_kept, &new_kept);
            self.forget_udp_flows(vip, &old_kept, &new_kept);
            if let Some(p) = self.slots.get_mut(&vip) {
                p.draining = entry.draining.clone();
            }
            return Ok(old.and_then(|o| o.net) != Some(net));
        }
        let slot = self.next_slot;
        self.next_slot = self.next_slot.wrapping_add(1).max(1);
        for (i, b) in entry.backends.iter().enumerate() {
            let key = BackendKey {
                service: slot,
                index: i as u32,
            };
            let value = BackendValue {
                addr: be(*b),
                pad: 0,
            };
            self.backends
                .insert(key, value, 0)
                .with_context(|| format!("write backend {b} of VIP {vip}"))?;
        }
        self.rr
            .insert(slot, 0, 0)
            .with_context(|| format!("round-robin slot of VIP {vip}"))?;
        let value = VipValue {
            service: slot,
            count: entry.backends.len() as u32,
        };
        // The switch: one map update, seen whole by every later connect().
        self.vips
            .insert(vip_key(vip), value, 0)
            .with_context(|| format!("switch VIP {vip}"))?;
        if let Some(old) = old {
            self.retire(vip, (old.slot, old.backends.len()));
            self.drop_counters(vip, &old_kept, &new_kept);
            self.forget_udp_flows(vip, &old_kept, &new_kept);
        }
        let programmed = Programmed {
            slot,
            net: Some(net),
            backends: entry.backends.clone(),
            draining: entry.draining.clone(),
        };
        self.slots.insert(vip, programmed);
        Ok(true)
    }

    /// UDP sockets' affinities to backends that left the VIP go with them (after the
    /// switch, so no new datagram picks one): a socket that keeps sending would
    /// otherwise keep reaching a backend that is gone; its next datagram makes a new
    /// pick. A walk of the map, only when a backend leaves.
    fn forget_udp_flows(&mut self, vip: Ipv4Addr, old: &[Ipv4Addr], new: &[Ipv4Addr]) {
        let left: BTreeSet<u32> = old
            .iter()
            .filter(|b| !new.contains(b))
            .map(|b| be(*b))
            .collect();
        if left.is_empty() {
            return;
        }
        let stale: Vec<RevNatKey> = self
            .udp_flows
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, v)| k.addr == be(vip) && left.contains(&v.addr))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            if self.udp_flows.remove(&k).is_ok() {
                crate::writes::count(crate::writes::Kind::Bpf, 1);
            }
        }
    }

    /// Counters of backends that left the VIP go with them.
    fn drop_counters(&mut self, vip: Ipv4Addr, old: &[Ipv4Addr], new: &[Ipv4Addr]) {
        for b in old.iter().filter(|b| !new.contains(b)) {
            let _ = self.counters.remove(&CounterKey {
                vip: be(vip),
                backend: be(*b),
            });
        }
    }

    /// The task namespaces the hooks act for, and the networks each is on.
    fn set_netns(&mut self, cookies: &[u64], nets: &BTreeSet<NetnsNet>) -> Result<()> {
        // What the last call left: no map walk (two syscalls a key) when nothing changed.
        let want = (
            cookies.iter().copied().collect::<BTreeSet<u64>>(),
            nets.clone(),
        );
        if self.netns_set.as_ref() == Some(&want) {
            return Ok(());
        }
        self.netns_set = None;
        let mut changed = 0u64;
        let present: Vec<u64> = self.netns.keys().filter_map(|k| k.ok()).collect();
        for c in &present {
            if !cookies.contains(c) {
                self.netns.remove(c).or_else(ignore_missing)?;
                changed += 1;
            }
        }
        for c in cookies {
            if !present.contains(c) {
                self.netns.insert(c, 1, 0).context("add task netns")?;
                changed += 1;
            }
        }
        let present: BTreeSet<NetnsNet> = self.netns_nets.keys().filter_map(|k| k.ok()).collect();
        for k in present.difference(nets) {
            self.netns_nets.remove(k).or_else(ignore_missing)?;
            changed += 1;
        }
        for k in nets.difference(&present) {
            self.netns_nets
                .insert(k, 1, 0)
                .context("record a task namespace's network")?;
            changed += 1;
        }
        writes::count(Kind::Bpf, changed);
        if changed > 0 {
            tracing::info!(changed, "eBPF task namespaces updated");
        }
        self.netns_set = Some(want);
        Ok(())
    }

    fn counters(&self) -> Counters {
        let mut out = Counters::new();
        for (k, per_cpu) in self.counters.iter().filter_map(|r| r.ok()) {
            let total = per_cpu.iter().map(|c| c.connections).sum();
            out.entry(from_be(k.vip))
                .or_default()
                .insert(from_be(k.backend), total);
        }
        out
    }
}

/// The `count` backends a slot holds, as a previous netd wrote them (VIPs and published
/// ports both keep their backends as `{slot, index}` entries).
pub(super) fn slot_backends<V: aya::Pod>(
    map: &HashMap<MapData, BackendKey, V>,
    slot: u32,
    count: u32,
) -> Vec<V> {
    (0..count)
        .filter_map(|i| {
            map.get(
                &BackendKey {
                    service: slot,
                    index: i,
                },
                0,
            )
            .ok()
        })
        .collect()
}

/// Removes a slot's backends and round-robin position (after its switch).
pub(super) fn drop_slot<V: aya::Pod>(
    backends: &mut HashMap<MapData, BackendKey, V>,
    rr: &mut HashMap<MapData, u32, u32>,
    slot: u32,
    count: usize,
) {
    for i in 0..count {
        let _ = backends.remove(&BackendKey {
            service: slot,
            index: i as u32,
        });
    }
    let _ = rr.remove(&slot);
}

/// A map entry that is already gone is what removing it wanted.
fn ignore_missing(e: aya::maps::MapError) -> Result<(), aya::maps::MapError> {
    match e {
        aya::maps::MapError::KeyNotFound => Ok(()),
        e => Err(e),
    }
}

/// The netns cookie of `ns`, as `bpf_get_netns_cookie` reports it for sockets there.
async fn netns_cookie(ns: &Netns) -> Result<u64> {
    netns::run_in(ns, || Ok(netd_ebpf::current_netns_cookie()?)).await
}

impl EbpfDatapath {
    /// Checks that the kernel takes the programs (loading them against the node's pins);
    /// the error says why not, for `auto` to fall back with.
    pub fn open(
        node: &str,
        cgroup: Option<PathBuf>,
        requested: Mode,
        reason: &str,
    ) -> Result<Self> {
        netd_ebpf::ensure_bpffs()?;
        let cgroup = match cgroup {
            Some(c) => c,
            None => cgroup2_root()?,
        };
        let dir = pin_dir(node);
        let loaded = Loaded::load(&dir)?;
        let dp = EbpfDatapath {
            dir,
            cgroup,
            requested,
            reason: reason.into(),
            inner: Mutex::new(Inner {
                loaded: Some(loaded),
                ..Default::default()
            }),
        };
        Ok(dp)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| anyhow!("eBPF datapath state poisoned"))
    }

    /// Detaches the programs and removes every pin: the node has no task left.
    fn teardown(&self, inner: &mut Inner) -> Result<()> {
        inner.loaded = None;
        if self.dir.exists() {
            tracing::info!(dir = %self.dir.display(), "no local task: detaching the eBPF load balancer");
            std::fs::remove_dir_all(&self.dir)
                .with_context(|| format!("remove pins in {}", self.dir.display()))?;
        }
        Ok(())
    }
}

#[async_trait]
impl Datapath for EbpfDatapath {
    fn apply(&self, table: &LbTable, touched: Option<&BTreeSet<Ipv4Addr>>) -> Result<()> {
        let mut inner = self.lock()?;
        inner.want = Some(table.clone());
        let inner = &mut *inner;
        if let Some(l) = inner.loaded.as_mut() {
            // A failed pass leaves the maps unknown: the next pass (this one's retry with
            // the next change, or the next step's) compares them all.
            let touched = touched.filter(|_| !inner.unsure);
            inner.unsure = true;
            let changed = l.program(table, touched)?;
            writes::count(Kind::Bpf, changed as u64);
            inner.unsure = false;
            if changed > 0 {
                tracing::info!(changed, "eBPF load balancer updated");
            }
        }
        Ok(())
    }

    async fn sync_local(
        &self,
        tasks: &[&Task],
        _sandboxes: &[SandboxLb],
    ) -> Result<BTreeMap<String, String>> {
        let mut errors = BTreeMap::new();
        if tasks.is_empty() {
            let mut inner = self.lock()?;
            self.teardown(&mut inner)?;
            return Ok(errors);
        }
        // Cookies first (a thread per unknown namespace), without holding the lock.
        let mut found = vec![];
        let mut nets = BTreeSet::new();
        for t in tasks {
            let meta = match std::fs::metadata(&t.netns) {
                Ok(m) => m,
                Err(e) => {
                    errors.insert(t.id.clone(), format!("netns {}: {e}", t.netns));
                    continue;
                }
            };
            let id = (meta.dev(), meta.ino());
            let known = self.lock()?.cookies.get(&id).copied();
            let cookie = match known {
                Some(c) => c,
                None => match netns_cookie(&Netns::Path(PathBuf::from(&t.netns))).await {
                    Ok(c) => c,
                    Err(e) => {
                        errors.insert(t.id.clone(), format!("netns cookie: {e:#}"));
                        continue;
                    }
                },
            };
            found.push((id, cookie));
            for ep in &t.endpoints {
                nets.insert(NetnsNet {
                    cookie,
                    network: network_number(&ep.network),
                    pad: 0,
                });
            }
        }
        let mut inner = self.lock()?;
        inner.cookies = found.iter().copied().collect();
        if inner.loaded.is_none() {
            inner.loaded = Some(Loaded::load(&self.dir)?);
            inner.unsure = true;
        }
        let want = inner.want.clone();
        let inner = &mut *inner;
        let l = inner.loaded.as_mut().context("eBPF object not loaded")?;
        // Maps first, then the hooks: a hook never runs against half-filled maps. Once
        // programmed whole, the maps follow `apply`'s changes alone.
        if let (Some(want), true) = (want, inner.unsure) {
            l.program(&want, None)?;
            inner.unsure = false;
        }
        let cookies: Vec<u64> = found.iter().map(|(_, c)| *c).collect();
        l.set_netns(&cookies, &nets)?;
        l.attach(&self.dir, &self.cgroup)?;
        Ok(errors)
    }

    fn counters(&self) -> Counters {
        self.lock()
            .ok()
            .and_then(|i| i.loaded.as_ref().map(Loaded::counters))
            .unwrap_or_default()
    }

    fn status(&self) -> DatapathStatus {
        let attached = netd_ebpf::SOCK_LB_PROGRAMS
            .iter()
            .all(|p| link_pin(&self.dir, p).exists());
        // Walks of the flow and counter maps: status is asked for, not polled.
        let (netns, vips, udp_flows, counters) = self
            .lock()
            .ok()
            .and_then(|i| {
                i.loaded.as_ref().map(|l| {
                    (
                        l.netns.keys().count(),
                        l.slots.len(),
                        l.udp_flows.keys().count(),
                        l.counters.keys().count(),
                    )
                })
            })
            .unwrap_or((0, 0, 0, 0));
        DatapathStatus {
            requested: self.requested,
            active: "ebpf".into(),
            reason: self.reason.clone(),
            detail: json!({
                "hooks": "cgroup connect4, sendmsg4, recvmsg4, getpeername4",
                "cgroup": self.cgroup,
                "pins": self.dir,
                "attached": attached,
                "task_namespaces": netns,
                "vips": vips,
                // UDP sockets' backend affinities, and per-backend counters.
                "udp_flows": udp_flows,
                "counters": counters,
            }),
        }
    }
}
