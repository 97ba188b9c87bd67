//! The userspace datapath: where the kernel refuses the eBPF programs (or with
//! `--datapath userspace`), netd itself moves VIP traffic.
//!
//! In each overlay sandbox of this node, a TUN device `lb0` (see [`super::tun`]) owns the
//! network's VIPs and this node's load-balancer address on the network (/32 routes), and
//! `br0` answers ARP for them (proxy_arp). A task's packet to a VIP therefore reaches the
//! sandbox, which forwards it into `lb0`; netd translates it (client -> the node's LB
//! address and a port of its own, VIP -> a backend, round-robin per new flow) and writes
//! it back, and the sandbox forwards it to the backend, locally or over VXLAN. The
//! backend answers the LB address; that comes back through `lb0` the same way, and netd
//! restores VIP -> client. So the client sees the VIP, as with eBPF; unlike eBPF, the
//! backend sees the node's LB address instead of the client's (full NAT, as Docker's
//! ingress does).
//!
//! Other nodes reach a node's LB address like a task: `br0` carries its MAC, and the
//! cluster programs it into every sandbox's VXLAN tables (plan::remote_peers).
//! The TUN devices are persistent, their descriptors held by the fd store while netd
//! restarts (packets queue on them instead of being dropped), and the flows journaled
//! (conntrack), so a restarted netd picks up established connections where the last one
//! stopped, and the connections opened while it was away.
//!
//! Hardened as a NAT facing untrusted tasks must be (see conntrack): only the flow's
//! backend address and port can answer it, ports on the LB address are random, and each
//! sandbox's table has a maximum size (`--userspace-conntrack-max`): new flows beyond it
//! are refused as by a VIP without backends and counted in `netd status`
//! (`flows_refused_full`), established ones are never evicted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use async_trait::async_trait;
use serde_json::json;

use super::tun::{self, Tun};
use crate::fdstore::{FdStore, Handover, Held, Key};

use super::conntrack::{Conntrack, Outbound};
use super::nat;
use super::{Counters, Datapath, DatapathStatus, LbTable, Mode, SandboxLb};
use crate::model::{mac_for_ip, Task};
use crate::naming::{SANDBOX_BRIDGE, SANDBOX_TUN};
use crate::netlink;
use crate::netns;

/// Where each node keeps its conntrack journals: /run survives a crash of netd, not a
/// reboot (which ends every connection anyway).
pub const RUN_ROOT: &str = "/run/netd";

/// What every sandbox's packet loop reads.
#[derive(Default)]
struct Shared {
    table: RwLock<LbTable>,
    /// Next round-robin position per VIP.
    rr: Mutex<HashMap<Ipv4Addr, usize>>,
    counters: Mutex<Counters>,
    dropped: AtomicU64,
    translated: AtomicU64,
    /// New flows refused because their sandbox's table was full (all sandboxes).
    refused_full: AtomicU64,
    /// Bumped by every change of the table: a packet loop that sees it move forgets
    /// its UDP flows to backends that left.
    generation: AtomicU64,
}

impl Shared {
    /// The next backend of `vip`, round-robin; None if it has none.
    fn pick(&self, vip: Ipv4Addr) -> Option<Ipv4Addr> {
        let table = self.table.read().ok()?;
        let backends = &table.vips.get(&vip)?.backends;
        if backends.is_empty() {
            return None;
        }
        let mut rr = self.rr.lock().ok()?;
        let next = rr.entry(vip).or_default();
        let b = backends[*next % backends.len()];
        *next = next.wrapping_add(1);
        Some(b)
    }

    /// Whether `backend` still serves `vip`.
    fn serves(&self, vip: Ipv4Addr, backend: Ipv4Addr) -> bool {
        self.table
            .read()
            .map(|t| t.vips.get(&vip).is_some_and(|e| e.keeps(&backend)))
            .unwrap_or(true)
    }

    fn is_vip(&self, addr: Ipv4Addr) -> bool {
        self.table
            .read()
            .map(|t| t.vips.contains_key(&addr))
            .unwrap_or(false)
    }

    fn count(&self, vip: Ipv4Addr, backend: Ipv4Addr) {
        if let Ok(mut c) = self.counters.lock() {
            *c.entry(vip).or_default().entry(backend).or_default() += 1;
        }
    }

    /// Counts a packet written back to the TUN device (translated, or a refusal of a VIP
    /// without backends); returns it.
    fn sent<'a>(&self, out: &'a [u8]) -> Option<&'a [u8]> {
        self.translated.fetch_add(1, Ordering::Relaxed);
        Some(out)
    }

    /// Counts a packet dropped; returns nothing to write back.
    fn dropped<'a>(&self) -> Option<&'a [u8]> {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// What one sandbox's packet loop reports to `netd status`.
#[derive(Default)]
struct SandboxStats {
    flows: AtomicU64,
    /// New flows refused because the table was full of established flows.
    refused_full: AtomicU64,
    /// Unconfirmed flows dropped to make room for new ones.
    early_drops: AtomicU64,
}

/// One sandbox's TUN device and the task serving it.
struct Running {
    sandbox: SandboxLb,
    stats: Arc<SandboxStats>,
    task: tokio::task::JoinHandle<()>,
    /// Under which key the fd store holds the device's descriptor (None: it does not).
    held: Option<Key>,
}

/// What the fd store calls a sandbox's TUN descriptor (its id: the network).
pub const HELD_KIND: &str = "tun";

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct UserspaceDatapath {
    run_dir: PathBuf,
    mtu: u32,
    /// Flows each sandbox's conntrack table holds at most.
    conntrack_max: usize,
    requested: Mode,
    reason: String,
    shared: Arc<Shared>,
    running: tokio::sync::Mutex<BTreeMap<String, Running>>,
    /// Where the TUN descriptors outlive this netd (by network), and what the netd
    /// before left there.
    handover: Option<Handover>,
}

fn now_secs() -> u64 {
    crate::model::now_secs()
}

impl UserspaceDatapath {
    /// `conntrack_max`: flows each sandbox's table holds at most (per network, so a
    /// flood on one network does not refuse the flows of another).
    pub fn new(
        node: &str,
        mtu: u32,
        requested: Mode,
        reason: String,
        conntrack_max: usize,
        tuns: Option<(Arc<FdStore>, Held)>,
    ) -> Result<Self> {
        Ok(UserspaceDatapath {
            handover: tuns.map(|(store, held)| Handover::new(store, HELD_KIND, held)),
            run_dir: Path::new(RUN_ROOT).join(node),
            mtu,
            conntrack_max,
            requested,
            reason,
            shared: Arc::new(Shared::default()),
            running: tokio::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// Opens (or re-opens, after a restart) the sandbox's TUN device and configures the
    /// sandbox around it.
    async fn start(&self, sb: &SandboxLb) -> Result<Running> {
        let lb = sb
            .lb_addr
            .with_context(|| format!("no load-balancer address on network {}", sb.network))?;
        let path = match &sb.netns {
            netns::Netns::Path(p) => Some(p.display().to_string()),
            netns::Netns::Home => None,
        };
        let (fd, held) = match self.take_left(&sb.network, path.as_deref()) {
            Some((key, fd)) => (fd, Some(key)),
            None => {
                // The device is made in the sandbox; its descriptor is served by the
                // daemon's runtime.
                let fd = netns::run_in(&sb.netns, || {
                    tun::open(SANDBOX_TUN, tun::Mode::TUN)
                        .map_err(|e| anyhow!("create TUN {SANDBOX_TUN}: {e}"))
                })
                .await?;
                let held = path.and_then(|p| self.hold(&sb.network, &p, &fd));
                (fd, held)
            }
        };
        let started = self.serve_tun(sb, lb, fd).await;
        if started.is_err() {
            self.release(held.as_ref());
        }
        let (stats, task) = started?;
        tracing::info!(network = sb.network, %lb, "userspace load balancer serving");
        Ok(Running {
            sandbox: sb.clone(),
            stats,
            task,
            held,
        })
    }

    /// Configures the sandbox around the device and starts its packet loop.
    async fn serve_tun(
        &self,
        sb: &SandboxLb,
        lb: Ipv4Addr,
        fd: OwnedFd,
    ) -> Result<(Arc<SandboxStats>, tokio::task::JoinHandle<()>)> {
        let tun = Tun::new(fd).context("serve the TUN device")?;
        self.configure(sb).await?;
        let path = self.run_dir.join(format!("conntrack-{}", sb.network));
        let ct = Conntrack::open(&path, now_secs(), self.conntrack_max).with_context(|| {
            format!(
                "conntrack table of network {} (journal {})",
                sb.network,
                path.display()
            )
        })?;
        let stats = Arc::new(SandboxStats {
            flows: AtomicU64::new(ct.len() as u64),
            refused_full: AtomicU64::new(0),
            early_drops: AtomicU64::new(0),
        });
        let task = tokio::spawn(serve(
            tun,
            lb,
            ct,
            self.shared.clone(),
            stats.clone(),
            sb.network.clone(),
        ));
        Ok((stats, task))
    }

    /// The TUN descriptor the netd before left for `network`, if it is still that
    /// sandbox's device (else the store closes it).
    fn take_left(&self, network: &str, netns: Option<&str>) -> Option<(Key, OwnedFd)> {
        tun::take_held(
            self.handover.as_ref()?,
            network,
            netns?,
            SANDBOX_TUN,
            tun::Mode::TUN,
        )
    }

    /// Gives the fd store a duplicate of the sandbox's TUN descriptor.
    fn hold(&self, network: &str, netns: &str, fd: &OwnedFd) -> Option<Key> {
        self.handover.as_ref()?.hold(network, netns, &[fd.as_fd()])
    }

    /// Tells the fd store to close what it holds under `key`.
    fn release(&self, key: Option<&Key>) {
        if let Some(h) = &self.handover {
            h.release(key);
        }
    }

    /// Routes, ARP answers, forwarding and the bridge MAC of the sandbox.
    async fn configure(&self, sb: &SandboxLb) -> Result<()> {
        let lb = sb.lb_addr.context("no load-balancer address")?;
        let mut dsts = sb.vips.clone();
        dsts.push(lb);
        let mtu = self.mtu;
        netns::with_netlink(&sb.netns, move |h| async move {
            let tun = netlink::require_link(&h, SANDBOX_TUN).await?;
            netlink::set_mtu(&h, &tun, mtu).await?;
            netlink::set_up(&h, &tun).await?;
            netlink::ensure_host_routes(&h, &tun, &dsts).await?;
            // Other nodes send to the LB address with this MAC (their VXLAN tables).
            let br = netlink::require_link(&h, SANDBOX_BRIDGE).await?;
            netlink::ensure_mac(&h, &br, mac_for_ip(lb)).await
        })
        .await?;
        netns::run_in(&sb.netns, || {
            netns::write_sysctl("net.ipv4.ip_forward", "1")?;
            // br0 answers ARP for what is routed into lb0: the VIPs and the LB address.
            netns::write_sysctl("net.ipv4.conf.br0.proxy_arp", "1")?;
            // ... at once: broadcast requests are otherwise answered after up to 0.8 s.
            netns::write_sysctl("net.ipv4.neigh.br0.proxy_delay", "0")?;
            netns::write_sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            netns::write_sysctl(&format!("net.ipv4.conf.{SANDBOX_TUN}.rp_filter"), "0")
        })
        .await
    }
}

/// Handles one packet from the TUN device in place; returns what to write back (the
/// packet itself, a refusal, or nothing), having counted it.
fn handle<'a>(
    pkt: &'a mut [u8],
    lb: Ipv4Addr,
    ct: &mut Conntrack,
    shared: &Shared,
    stats: &SandboxStats,
    refusal: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    let f = match nat::parse(pkt) {
        Ok(f) => f,
        Err(e) => {
            // ICMP among them: errors a backend sends about a flow are not relayed.
            tracing::trace!("userspace datapath drops a packet: {e}");
            return shared.dropped();
        }
    };
    let now = now_secs();
    if f.dst == lb {
        // Only the flow's backend address and port reach its client; another host, or
        // the backend from another port, guessing the LB port gets nothing through.
        let Some(k) = ct.inbound(&f, now) else {
            tracing::trace!(
                "userspace datapath drops {}:{} -> {}:{}: not an answer to a flow",
                f.src,
                f.sport,
                f.dst,
                f.dport
            );
            return shared.dropped();
        };
        nat::rewrite(pkt, &f, k.vip, k.vport, k.client, k.cport);
        return shared.sent(pkt);
    }
    if !shared.is_vip(f.dst) {
        return shared.dropped();
    }
    match ct.outbound(&f, now, || shared.pick(f.dst)) {
        Outbound::Translate {
            backend,
            lport,
            new,
        } => {
            if new {
                shared.count(f.dst, backend);
            }
            nat::rewrite(pkt, &f, lb, lport, backend, f.dport);
            shared.sent(pkt)
        }
        Outbound::NoBackend => match nat::refusal(pkt, &f) {
            Some(r) => {
                *refusal = r;
                shared.sent(refusal.as_slice())
            }
            None => shared.dropped(),
        },
        Outbound::Full => {
            // Refused as a VIP without backends refuses (RST, port unreachable): the
            // client fails at once instead of retrying into a full table; the answer
            // is no bigger than a minimal SYN or datagram plus 28 bytes, as any closed
            // port's. Counted apart, neither translated nor dropped.
            stats.refused_full.fetch_add(1, Ordering::Relaxed);
            shared.refused_full.fetch_add(1, Ordering::Relaxed);
            match nat::refusal(pkt, &f) {
                Some(r) => {
                    *refusal = r;
                    Some(refusal.as_slice())
                }
                None => shared.dropped(),
            }
        }
        Outbound::Drop => shared.dropped(),
    }
}

/// How often a full table is reported in the log, at most.
const FULL_WARN_INTERVAL: Duration = Duration::from_secs(60);

async fn serve(
    tun: Tun,
    lb: Ipv4Addr,
    mut ct: Conntrack,
    shared: Arc<Shared>,
    stats: Arc<SandboxStats>,
    network: String,
) {
    let mut buf = vec![0u8; 65536];
    let mut refusal = Vec::new();
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    let mut failures = 0;
    // Refusals already reported, and when.
    let mut warned = (0, None::<Instant>);
    let mut seen_generation = shared.generation.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            r = tun.recv(&mut buf) => {
                let n = match r {
                    Ok(n) => {
                        failures = 0;
                        n
                    }
                    Err(e) => {
                        // A device that keeps failing is gone (its sandbox was removed
                        // under us): end, and let the next reconcile step open it anew.
                        failures += 1;
                        tracing::warn!("TUN read: {e}");
                        if failures >= 10 {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // The table changed: UDP flows and unanswered handshakes to backends
                // that left make a new pick with their next packet (a socket that keeps
                // sending, or a client port that comes round again, would keep reaching
                // a gone backend); established TCP connections keep theirs.
                let generation = shared.generation.load(Ordering::Relaxed);
                if generation != seen_generation {
                    seen_generation = generation;
                    ct.forget_left(|vip, backend| !shared.serves(vip, backend));
                }
                if let Some(out) = handle(&mut buf[..n], lb, &mut ct, &shared, &stats, &mut refusal) {
                    if let Err(e) = tun.send(out).await {
                        tracing::debug!("TUN write: {e}");
                    }
                }
            }
            _ = expiry.tick() => {
                ct.expire(now_secs());
                let refused = stats.refused_full.load(Ordering::Relaxed);
                if refused > warned.0 && warned.1.is_none_or(|t| t.elapsed() >= FULL_WARN_INTERVAL) {
                    tracing::warn!(
                        network,
                        max = ct.max(),
                        "userspace conntrack table full: {} new flows refused since the last report \
                         (raise --userspace-conntrack-max if this is not a flood)",
                        refused - warned.0
                    );
                    warned = (refused, Some(Instant::now()));
                }
            }
        }
        stats.flows.store(ct.len() as u64, Ordering::Relaxed);
        stats.early_drops.store(ct.early_drops(), Ordering::Relaxed);
    }
}

#[async_trait]
impl Datapath for UserspaceDatapath {
    fn apply(&self, table: &LbTable, touched: Option<&BTreeSet<Ipv4Addr>>) -> Result<()> {
        let mut t = self
            .shared
            .table
            .write()
            .map_err(|_| anyhow!("LB table poisoned"))?;
        let differs = match touched {
            Some(vips) => vips.iter().any(|v| t.vips.get(v) != table.vips.get(v)),
            None => *t != *table,
        };
        if !differs {
            return Ok(());
        }
        // One swap (a pointer's worth: the table is persistent): a packet sees the old
        // table or the new one.
        *t = table.clone();
        drop(t);
        self.shared.generation.fetch_add(1, Ordering::Relaxed);
        let keep = |vip: &Ipv4Addr, per: &mut BTreeMap<Ipv4Addr, u64>| {
            let Some(e) = table.vips.get(vip) else {
                return false;
            };
            per.retain(|b, _| e.keeps(b));
            true
        };
        if let Ok(mut c) = self.shared.counters.lock() {
            match touched {
                Some(vips) => {
                    for vip in vips {
                        if let Some(per) = c.get_mut(vip) {
                            if !keep(vip, per) {
                                c.remove(vip);
                            }
                        }
                    }
                }
                None => c.retain(|vip, per| keep(vip, per)),
            }
        }
        Ok(())
    }

    async fn resume(&self, sandboxes: &[SandboxLb]) {
        let mut running = self.running.lock().await;
        for sb in sandboxes {
            let held = self
                .handover
                .as_ref()
                .is_some_and(|h| h.left_for(&sb.network));
            if !held || running.contains_key(&sb.network) {
                continue;
            }
            match self.start(sb).await {
                Ok(r) => {
                    running.insert(sb.network.clone(), r);
                }
                Err(e) => tracing::warn!(network = sb.network, "resume the load balancer: {e:#}"),
            }
        }
    }

    async fn sync_local(
        &self,
        _tasks: &[&Task],
        sandboxes: &[SandboxLb],
    ) -> Result<BTreeMap<String, String>> {
        let mut running = self.running.lock().await;
        let gone: Vec<String> = running
            .keys()
            .filter(|net| !sandboxes.iter().any(|s| &s.network == *net))
            .cloned()
            .collect();
        for net in gone {
            if let Some(r) = running.remove(&net) {
                self.release(r.held.as_ref());
            }
        }
        let mut errors = vec![];
        for sb in sandboxes {
            let same = running
                .get(&sb.network)
                .filter(|r| !r.task.is_finished())
                .map(|r| &r.sandbox);
            let result = match same {
                Some(old) if old == sb => Ok(()),
                Some(old) if old.netns == sb.netns && old.lb_addr == sb.lb_addr => {
                    // Only the VIPs changed: routes, not the device.
                    self.configure(sb).await.map(|_| {
                        if let Some(r) = running.get_mut(&sb.network) {
                            r.sandbox = sb.clone();
                        }
                    })
                }
                _ => {
                    if let Some(old) = running.remove(&sb.network) {
                        self.release(old.held.as_ref());
                    }
                    self.start(sb).await.map(|r| {
                        running.insert(sb.network.clone(), r);
                    })
                }
            };
            if let Err(e) = result {
                errors.push(format!("load balancer of network {}: {e:#}", sb.network));
            }
        }
        // What the netd before left for sandboxes this node no longer serves goes now.
        if let Some(h) = &self.handover {
            h.release_unclaimed();
        }
        if errors.is_empty() {
            Ok(BTreeMap::new())
        } else {
            Err(anyhow!(errors.join("; ")))
        }
    }

    fn needs_lb_addresses(&self) -> bool {
        true
    }

    fn counters(&self) -> Counters {
        self.shared
            .counters
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    fn status(&self) -> DatapathStatus {
        let sandboxes: Vec<serde_json::Value> = self
            .running
            .try_lock()
            .map(|r| {
                r.values()
                    .map(|r| {
                        json!({
                            "network": r.sandbox.network,
                            "lb_address": r.sandbox.lb_addr,
                            "vips": r.sandbox.vips,
                            "flows": r.stats.flows.load(Ordering::Relaxed),
                            "flows_refused_full": r.stats.refused_full.load(Ordering::Relaxed),
                            "unconfirmed_flows_dropped": r.stats.early_drops.load(Ordering::Relaxed),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        DatapathStatus {
            requested: self.requested,
            active: "userspace".into(),
            reason: self.reason.clone(),
            detail: json!({
                "device": SANDBOX_TUN,
                "sandboxes": sandboxes,
                "packets_translated": self.shared.translated.load(Ordering::Relaxed),
                "packets_dropped": self.shared.dropped.load(Ordering::Relaxed),
                // Flows per sandbox at most, and new flows refused for that.
                "conntrack_max": self.conntrack_max,
                "flows_refused_full": self.shared.refused_full.load(Ordering::Relaxed),
                "journal": self.run_dir,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::conntrack::tests::{tcp_packet, udp_packet};
    use crate::datapath::VipEntry;
    use etherparse::PacketBuilder;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const C: &str = "198.18.9.2";
    const VIP: &str = "198.18.9.200";
    const B: &str = "198.18.9.7";
    const LB: &str = "198.18.9.250";
    const STRANGER: &str = "198.18.9.66";

    fn shared() -> Shared {
        let s = Shared::default();
        let vip = a(VIP);
        s.table.write().unwrap().vips.insert(
            vip,
            VipEntry {
                service: "web".into(),
                network: "front".into(),
                vip,
                backends: vec![a(B)],
                draining: vec![],
            },
        );
        s
    }

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: &str) -> Vec<u8> {
        tcp_packet(src, sport, dst, dport, flags, b"data")
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
        udp_packet(src, sport, dst, dport)
    }

    /// What the datapath writes back for `pkt`, parsed; None for nothing.
    fn run(
        mut pkt: Vec<u8>,
        ct: &mut Conntrack,
        sh: &Shared,
        st: &SandboxStats,
    ) -> Option<(nat::Flow, Vec<u8>)> {
        let mut refusal = vec![];
        let out = handle(&mut pkt, a(LB), ct, sh, st, &mut refusal)?.to_vec();
        Some((nat::parse(&out).ok()?, out))
    }

    /// A TCP connection from `C:cport` through the VIP, handshake done; its LB port.
    fn connect(ct: &mut Conntrack, sh: &Shared, st: &SandboxStats, cport: u16) -> u16 {
        let (out, _) = run(tcp(C, cport, VIP, 80, "S"), ct, sh, st).unwrap();
        assert_eq!((out.src, out.dst, out.dport), (a(LB), a(B), 80));
        let lport = out.sport;
        let (back, _) = run(tcp(B, 80, LB, lport, "SA"), ct, sh, st).unwrap();
        assert_eq!(
            (back.src, back.sport, back.dst, back.dport),
            (a(VIP), 80, a(C), cport)
        );
        run(tcp(C, cport, VIP, 80, "A"), ct, sh, st).unwrap();
        lport
    }

    /// Whatever reaches the LB address from anywhere but the flow's backend and port is
    /// dropped and counted, for every port a stranger may try; so is an ICMP error
    /// about the flow, even from the backend (ICMP is not relayed).
    #[test]
    fn only_the_backend_reaches_the_client_and_guesses_are_counted_drops() {
        let (sh, st) = (shared(), SandboxStats::default());
        let mut ct = Conntrack::seeded(16, 9);
        let lport = connect(&mut ct, &sh, &st, 40000);
        let before = sh.dropped.load(Ordering::Relaxed);
        for p in 0..=u16::MAX {
            assert!(run(tcp(STRANGER, 80, LB, p, "A"), &mut ct, &sh, &st).is_none());
        }
        for (src, sport) in [(STRANGER, 80), (B, 81), (C, 80)] {
            assert!(run(tcp(src, sport, LB, lport, "R"), &mut ct, &sh, &st).is_none());
            assert!(run(udp(src, sport, LB, lport), &mut ct, &sh, &st).is_none());
        }
        let mut icmp = vec![];
        let quote = tcp(a(LB).to_string().as_str(), lport, B, 80, "A");
        PacketBuilder::ipv4(a(B).octets(), a(LB).octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut icmp, &quote[..28])
            .unwrap();
        let mut refusal = vec![];
        assert!(handle(&mut icmp, a(LB), &mut ct, &sh, &st, &mut refusal).is_none());
        assert_eq!(
            sh.dropped.load(Ordering::Relaxed) - before,
            65536 + 6 + 1,
            "every guess counted"
        );
        // The flow is undisturbed (the forged RSTs did not close it).
        let (back, _) = run(tcp(B, 80, LB, lport, "A"), &mut ct, &sh, &st).unwrap();
        assert_eq!((back.dst, back.dport), (a(C), 40000));
        assert_eq!(ct.expire(now_secs() + 600), 0);
    }

    /// A table full of established flows refuses new flows (a RST for a SYN, port
    /// unreachable for UDP) and counts them, while an established flow keeps
    /// translating both ways.
    #[test]
    fn a_full_table_refuses_and_counts_new_flows() {
        let (sh, st) = (shared(), SandboxStats::default());
        let mut ct = Conntrack::seeded(4, 9);
        let lport = connect(&mut ct, &sh, &st, 40000);
        for p in 1..=3 {
            connect(&mut ct, &sh, &st, 40000 + p);
        }
        let (rst, _) = run(tcp(STRANGER, 4, VIP, 80, "S"), &mut ct, &sh, &st).unwrap();
        assert!(rst.rst);
        assert_eq!(
            (rst.src, rst.sport, rst.dst, rst.dport),
            (a(VIP), 80, a(STRANGER), 4)
        );
        let mut pkt = udp(STRANGER, 5, VIP, 53);
        let mut refusal = vec![];
        let icmp = handle(&mut pkt, a(LB), &mut ct, &sh, &st, &mut refusal)
            .unwrap()
            .to_vec();
        assert_eq!(icmp[9], 1, "ICMP");
        assert_eq!(st.refused_full.load(Ordering::Relaxed), 2);
        assert_eq!(sh.refused_full.load(Ordering::Relaxed), 2);
        assert_eq!(ct.len(), 4);
        // The established flow, both ways.
        let (out, _) = run(tcp(C, 40000, VIP, 80, "A"), &mut ct, &sh, &st).unwrap();
        assert_eq!((out.sport, out.dst), (lport, a(B)));
        let (back, _) = run(tcp(B, 80, LB, lport, "A"), &mut ct, &sh, &st).unwrap();
        assert_eq!((back.src, back.dst, back.dport), (a(VIP), a(C), 40000));
        // A refused flow took no round-robin turn and counts no connection.
        assert_eq!(sh.counters.lock().unwrap()[&a(VIP)][&a(B)], 4);
    }
}
