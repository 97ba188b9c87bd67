//! The userspace datapath: where the kernel refuses the eBPF programs (or with
//! `--datapath userspace`), netd itself moves VIP traffic.
//!
//! In each overlay sandbox of this node, a TUN device `lb0` (tokio-tun) owns the
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
//! cluster programs it into every sandbox's VXLAN tables (reconcile::remote_peers).
//! The TUN devices are persistent and the flows journaled (conntrack), so a restarted
//! netd picks up established connections where the last one stopped.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use async_trait::async_trait;
use serde_json::json;
use tokio_tun::Tun;

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
}

/// One sandbox's TUN device and the task serving it.
struct Running {
    sandbox: SandboxLb,
    flows: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct UserspaceDatapath {
    run_dir: PathBuf,
    mtu: u32,
    requested: Mode,
    reason: String,
    shared: Arc<Shared>,
    running: tokio::sync::Mutex<BTreeMap<String, Running>>,
}

fn now_secs() -> u64 {
    crate::model::now_secs()
}

impl UserspaceDatapath {
    pub fn new(node: &str, mtu: u32, requested: Mode, reason: String) -> Result<Self> {
        Ok(UserspaceDatapath {
            run_dir: Path::new(RUN_ROOT).join(node),
            mtu,
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
        let rt = tokio::runtime::Handle::current();
        let mtu = self.mtu;
        let tun = netns::run_in(&sb.netns, move || {
            // The device is made in this thread's netns (the sandbox); its fd is served
            // by the daemon's runtime.
            let _rt = rt.enter();
            let mut queues = Tun::builder()
                .name(SANDBOX_TUN)
                .mtu(mtu as i32)
                .persist()
                .up()
                .build()
                .map_err(|e| anyhow!("create TUN {SANDBOX_TUN}: {e}"))?;
            queues.pop().context("tokio-tun returned no queue")
        })
        .await?;
        self.configure(sb).await?;
        let path = self.run_dir.join(format!("conntrack-{}", sb.network));
        let ct = Conntrack::open(&path, now_secs())
            .with_context(|| format!("conntrack journal {}", path.display()))?;
        let flows = Arc::new(AtomicU64::new(ct.len() as u64));
        let task = tokio::spawn(serve(tun, lb, ct, self.shared.clone(), flows.clone()));
        tracing::info!(network = sb.network, %lb, "userspace load balancer serving");
        Ok(Running {
            sandbox: sb.clone(),
            flows,
            task,
        })
    }

    /// Routes, ARP answers, forwarding and the bridge MAC of the sandbox.
    async fn configure(&self, sb: &SandboxLb) -> Result<()> {
        let lb = sb.lb_addr.context("no load-balancer address")?;
        let mut dsts = sb.vips.clone();
        dsts.push(lb);
        netns::with_netlink(&sb.netns, move |h| async move {
            let tun = netlink::require_link(&h, SANDBOX_TUN).await?;
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
/// packet itself, a refusal, or nothing).
fn handle<'a>(
    pkt: &'a mut [u8],
    lb: Ipv4Addr,
    ct: &mut Conntrack,
    shared: &Shared,
    refusal: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    let f = match nat::parse(pkt) {
        Ok(f) => f,
        Err(e) => {
            tracing::trace!("userspace datapath drops a packet: {e}");
            return None;
        }
    };
    let now = now_secs();
    if f.dst == lb {
        let k = ct.inbound(&f, now)?;
        nat::rewrite(pkt, &f, k.vip, k.vport, k.client, k.cport);
        return Some(pkt);
    }
    if !shared.is_vip(f.dst) {
        return None;
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
            Some(pkt)
        }
        Outbound::NoBackend => {
            *refusal = nat::refusal(pkt, &f)?;
            Some(refusal.as_slice())
        }
        Outbound::Drop => None,
    }
}

async fn serve(
    tun: Tun,
    lb: Ipv4Addr,
    mut ct: Conntrack,
    shared: Arc<Shared>,
    flows: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 65536];
    let mut refusal = Vec::new();
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    let mut failures = 0;
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
                match handle(&mut buf[..n], lb, &mut ct, &shared, &mut refusal) {
                    Some(out) => {
                        shared.translated.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = tun.send(out).await {
                            tracing::debug!("TUN write: {e}");
                        }
                    }
                    None => {
                        shared.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = expiry.tick() => {
                ct.expire(now_secs());
            }
        }
        flows.store(ct.len() as u64, Ordering::Relaxed);
    }
}

#[async_trait]
impl Datapath for UserspaceDatapath {
    fn apply(&self, table: &LbTable) -> Result<()> {
        let mut t = self
            .shared
            .table
            .write()
            .map_err(|_| anyhow!("LB table poisoned"))?;
        if *t != *table {
            // One swap: a packet sees the old table or the new one.
            *t = table.clone();
            if let Ok(mut c) = self.shared.counters.lock() {
                c.retain(|vip, per| {
                    let Some(e) = table.vips.get(vip) else {
                        return false;
                    };
                    per.retain(|b, _| e.backends.contains(b));
                    true
                });
            }
        }
        Ok(())
    }

    async fn sync_local(
        &self,
        _tasks: &[&Task],
        sandboxes: &[SandboxLb],
    ) -> Result<BTreeMap<String, String>> {
        let mut running = self.running.lock().await;
        running.retain(|net, _| sandboxes.iter().any(|s| &s.network == net));
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
                    running.remove(&sb.network);
                    self.start(sb).await.map(|r| {
                        running.insert(sb.network.clone(), r);
                    })
                }
            };
            if let Err(e) = result {
                errors.push(format!("load balancer of network {}: {e:#}", sb.network));
            }
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
                            "flows": r.flows.load(Ordering::Relaxed),
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
                "journal": self.run_dir,
            }),
        }
    }
}
