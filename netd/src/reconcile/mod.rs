//! One reconcile step turns the kernel of this node into what the store says it should
//! be. The kernel is the source of truth for what exists: every step reads links,
//! addresses, routes, namespaces and nftables, changes only what differs, then sweeps the
//! netd-named objects nothing desires. Running it twice changes nothing the second time,
//! which is what lets netd restart (even after `kill -9`) without touching live traffic.
//!
//! A step is a pure plan ([`crate::plan::NodePlan`]: what should be, from the state)
//! handed to one applier per concern, each behind a small trait so that the sequencing
//! here can be tested with fakes: [`Links`] (bridges, sandboxes, peers, endpoints,
//! sweep), [`Firewall`] (nftables), [`Mesh`] (the XDP fast path), the VIP datapath
//! ([`Datapath`]) and the DNS listeners ([`Listeners`]). The step writes nothing to the
//! store but one thing: a node that lacks its own address on a network asks for it.

mod firewall;
mod links;
mod mesh;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use async_trait::async_trait;
use tokio::sync::Mutex;

pub use self::firewall::KernelFirewall;
pub use self::links::KernelLinks;
pub use self::mesh::KernelMesh;
use crate::datapath::task_port::TaskPorts;
use crate::datapath::xdp::{MeshTable, XdpMesh};
use crate::datapath::Datapath;
use crate::dns::Dns;
use crate::model::Task;
use crate::naming;
use crate::netns::{self, Netns};
use crate::nftables::{Ruleset, SandboxGuards};
pub use crate::plan::NodeConfig;
use crate::plan::{
    in_scope_network, Gone, IngressPlan, NodeBridge, NodePlan, OverlayPlan, Scope, TaskPlan, Wanted,
};
use crate::state::{self, State, TaskStatus, INGRESS};
use crate::view::View;

/// Links in the node's namespaces: what [`KernelLinks`] does with netlink.
#[async_trait]
pub trait Links: Send + Sync {
    /// Called first in every step (a kernel applier reads what it needs once per step).
    /// `checked`: the periodic step, which must trust nothing it remembers.
    fn begin(&self, _checked: bool) {}
    /// The node's bridges, with their gateway addresses; forwarding on.
    async fn bridges(&self, bridges: &[NodeBridge]) -> Result<()>;
    /// An overlay's sandbox: its namespace, bridge and VXLAN device.
    /// Whether it did work (made or remade the sandbox: the tasks plugged into it are
    /// plugged again).
    async fn sandbox(&self, o: &OverlayPlan) -> Result<bool>;
    /// The remote tasks of an overlay on its VXLAN device; how many entries changed.
    async fn peers(&self, o: &OverlayPlan) -> Result<usize>;
    /// A task's endpoints, loopback and default route.
    async fn task(&self, t: &TaskPlan) -> Result<()>;
    /// A handed-over task: true once its runtime took its first endpoint (then it is
    /// plumbed like any task), false while that endpoint waits for the runtime.
    async fn handoff(&self, t: &TaskPlan) -> Result<bool>;
    /// The node's ingress sandbox, plumbed as task `t`.
    async fn ingress_sandbox(&self, i: &IngressPlan, t: &TaskPlan) -> Result<()>;
    /// Removes the netd-named links and sandboxes `w` does not want.
    async fn sweep(&self, w: &Wanted) -> Result<()>;
    /// Lets go of what the applier holds for namespaces not in `keep`.
    fn keep_sockets(&self, _keep: &BTreeSet<Netns>) {}
    /// Netlink sockets held open (for `netd status`).
    fn sockets(&self) -> usize {
        0
    }
}

/// nftables tables: what [`KernelFirewall`] does.
#[async_trait]
pub trait Firewall: Send + Sync {
    /// The node's own table. `checked`: read the kernel, trust nothing remembered.
    async fn node(&self, rules: Ruleset, checked: bool) -> Result<()>;
    /// The table of another namespace (the ingress sandbox's).
    async fn namespace(&self, ns: &Netns, rules: Ruleset, checked: bool) -> Result<()>;
    /// The port security of an overlay sandbox.
    async fn guards(&self, ns: &Netns, guards: SandboxGuards, checked: bool) -> Result<()>;
    async fn vxlan_foreign_dropped(&self) -> u64 {
        0
    }
    /// Flows to published ports the table of `ns` translated since netd started (None:
    /// no such table).
    async fn port_flows(&self, _ns: &Netns) -> Option<u64> {
        None
    }
    async fn task_to_node_dropped(&self) -> u64 {
        0
    }
    /// Packets from the gwbridge with a source not of it, dropped (the mesh's backstop).
    async fn mesh_foreign_src_dropped(&self) -> u64 {
        0
    }
    /// Deletes the tracked flows of `ns` that were translated to one of `to` (tasks that
    /// went away); how many.
    async fn forget_flows(&self, _ns: &Netns, _to: Vec<Ipv4Addr>) -> Result<u64> {
        Ok(0)
    }
    /// Deletes the tracked flows of `ns` translated to one of `to` (tasks of a lost node)
    /// that no connection depends on: unanswered TCP handshakes and UDP flows; how many.
    async fn forget_unanswered(&self, _ns: &Netns, _to: Vec<Ipv4Addr>) -> Result<u64> {
        Ok(0)
    }
    /// Deletes the tracked flows of `ns` translated to an address of `within` that is not
    /// in `keep` (after a restart: the tasks that went while no netd watched); how many.
    async fn forget_flows_except(
        &self,
        _ns: &Netns,
        _within: ipnetwork::Ipv4Network,
        _keep: BTreeSet<Ipv4Addr>,
    ) -> Result<u64> {
        Ok(0)
    }
    /// Tracked flows deleted since netd started.
    fn flows_removed(&self) -> u64 {
        0
    }
}

/// The routing mesh's fast path: what [`KernelMesh`] does.
#[async_trait]
pub trait Mesh: Send + Sync {
    /// Runs the fast path for `table` (None: removes it); the interface it runs on.
    async fn sync(&self, table: Option<&MeshTable>) -> Result<Option<String>>;
    /// The interface the fast path runs on now (None: not running).
    fn running_on(&self) -> Option<String> {
        None
    }
    fn status(&self) -> serde_json::Value;
    /// Flows removed because their task left its port, since netd started.
    fn flows_removed(&self) -> u64 {
        0
    }
    /// The fast path's counters for `/metrics` (None: not loaded).
    fn metrics(&self) -> Option<crate::metrics::XdpCounters> {
        None
    }
}

/// The embedded DNS's listeners: one in every task that is up.
#[async_trait]
pub trait Listeners: Send + Sync {
    /// Serves exactly `tasks`; the ones it could not serve, with why.
    async fn serve(&self, tasks: &[&Task]) -> BTreeMap<String, String>;
    /// After a restart, before the first step: serves those of `tasks` whose sockets
    /// the netd before left open (and nothing else).
    async fn resume(&self, _tasks: &[&Task]) {}
}

#[async_trait]
impl Listeners for Dns {
    async fn serve(&self, tasks: &[&Task]) -> BTreeMap<String, String> {
        self.sync_listeners(tasks).await
    }
    async fn resume(&self, tasks: &[&Task]) {
        self.resume_held(tasks).await
    }
}

/// The appliers a reconciler drives.
pub struct Appliers {
    pub links: Arc<dyn Links>,
    pub firewall: Arc<dyn Firewall>,
    pub mesh: Option<Arc<dyn Mesh>>,
    pub dns: Option<Arc<dyn Listeners>>,
    pub datapath: Option<Arc<dyn Datapath>>,
    /// The mesh's way back on published tasks' ports (its flows go with their task or
    /// node, and expire).
    pub way_back: Option<Arc<TaskPorts>>,
}

/// What the last reconcile could not do, per task id; surfaced by `netd task ls`.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub task_errors: BTreeMap<String, String>,
    pub errors: Vec<String>,
    /// Tasks whose runtime has not made their namespace yet (see [`Task::handoff`]):
    /// their first endpoint waits in the node's namespace for the runtime to take it.
    pub pending: BTreeSet<String>,
    /// How long each part of the step took, in step order (`netd status` shows the last
    /// step's: where a slow step spends its time).
    pub phases: Vec<(&'static str, Duration)>,
    /// What the step visited: the whole node (and why) or the parts a change touched.
    pub scope: String,
}

/// Splits a step's time into its parts.
struct Phases {
    mark: std::time::Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn start() -> Self {
        Phases {
            mark: std::time::Instant::now(),
            done: vec![],
        }
    }

    /// Ends part `name` (begun where the last one ended).
    fn end(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((name, now - self.mark));
        self.mark = now;
    }
}

impl Report {
    /// The tasks of `plan` without an error so far in this step.
    fn up<'a>(&self, plan: &'a NodePlan) -> Vec<&'a Task> {
        plan.tasks
            .iter()
            .map(|t| &t.task)
            .filter(|t| !self.task_errors.contains_key(&t.id) && !self.pending.contains(&t.id))
            .collect()
    }
}

/// How long without a change before a due checked step runs.
const CHECK_QUIET: Duration = Duration::from_secs(1);
/// How long past its due time a stream of changes may put off the checked step.
const CHECK_PUT_OFF: Duration = Duration::from_secs(50);

pub struct Reconciler {
    view: Arc<View>,
    cfg: NodeConfig,
    appliers: Appliers,
    /// One step at a time: two concurrent steps would race to create the same objects.
    step: Mutex<()>,
    last: std::sync::Mutex<Report>,
    /// The store revision the last finished step applied: the API waits on it for this
    /// node, and the node reports it (with its tables') to the others.
    applied: tokio::sync::watch::Sender<u64>,
    /// The store revision of the last task status this node published.
    status_revision: std::sync::atomic::AtomicU64,
    /// Steps run since the daemon started.
    steps: std::sync::atomic::AtomicU64,
    /// How long the last step took, µs.
    last_step_us: std::sync::atomic::AtomicU64,
    /// The state the last step worked from: the next one after a change visits what
    /// differs from it ([`Scope`]).
    stepped: std::sync::Mutex<Option<Arc<State>>>,
}

impl Reconciler {
    /// A reconciler of this node's kernel (netlink, nftables, XDP).
    pub fn new(
        view: Arc<View>,
        cfg: NodeConfig,
        dns: Option<Arc<Dns>>,
        datapath: Option<Arc<dyn Datapath>>,
        xdp: Option<Arc<XdpMesh>>,
    ) -> Self {
        let netlink = Arc::new(netns::NetlinkPool::new());
        let way_back = Arc::new(TaskPorts::new(&cfg.name));
        let appliers = Appliers {
            links: Arc::new(KernelLinks::new(
                cfg.clone(),
                netlink.clone(),
                way_back.clone(),
            )),
            way_back: Some(way_back),
            firewall: Arc::new(KernelFirewall::new()),
            mesh: xdp.map(|x| Arc::new(KernelMesh::new(x, netlink)) as Arc<dyn Mesh>),
            dns: dns.map(|d| d as Arc<dyn Listeners>),
            datapath,
        };
        Reconciler::with_appliers(view, cfg, appliers)
    }

    pub fn with_appliers(view: Arc<View>, cfg: NodeConfig, appliers: Appliers) -> Self {
        Reconciler {
            view,
            cfg,
            appliers,
            step: Mutex::new(()),
            last: std::sync::Mutex::new(Report::default()),
            applied: tokio::sync::watch::Sender::new(0),
            status_revision: std::sync::atomic::AtomicU64::new(0),
            steps: std::sync::atomic::AtomicU64::new(0),
            last_step_us: std::sync::atomic::AtomicU64::new(0),
            stepped: std::sync::Mutex::new(None),
        }
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// VXLAN datagrams dropped on this node because a host that is not a live member of
    /// the cluster sent them (since netd started), for `netd status`.
    pub async fn vxlan_foreign_dropped(&self) -> u64 {
        self.appliers.firewall.vxlan_foreign_dropped().await
    }

    /// New connections from tasks to this node or the store, dropped (since netd
    /// started), for `netd status`.
    pub async fn task_to_node_dropped(&self) -> u64 {
        self.appliers.firewall.task_to_node_dropped().await
    }

    /// Packets the node dropped because they came from the gwbridge with a source not
    /// of it (see [`crate::nftables::MESH_FOREIGN_SRC`]).
    pub async fn mesh_foreign_src_dropped(&self) -> u64 {
        self.appliers.firewall.mesh_foreign_src_dropped().await
    }

    /// Published-port flows the kernel path took on this node (its ingress sandbox's
    /// translations), for `/metrics`; None without a sandbox.
    pub async fn kernel_mesh_flows(&self) -> Option<u64> {
        let ns = Netns::named(&naming::ingress_sbox_netns(&self.cfg.name));
        self.appliers.firewall.port_flows(&ns).await
    }

    /// The XDP fast path's counters, for `/metrics`.
    pub fn xdp_metrics(&self) -> Option<crate::metrics::XdpCounters> {
        self.appliers.mesh.as_ref().and_then(|m| m.metrics())
    }

    /// The XDP fast path, for `netd status`.
    pub fn xdp_status(&self) -> serde_json::Value {
        self.appliers
            .mesh
            .as_ref()
            .map(|m| m.status())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Open netlink sockets (one per namespace the node works in).
    pub fn netlink_sockets(&self) -> usize {
        self.appliers.links.sockets()
    }

    /// The store revision of the last task status this node published: a task joins
    /// VIPs on every node once that revision is applied there.
    pub fn status_revision(&self) -> u64 {
        self.status_revision
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The store revision of the state the last finished step worked from: everything a
    /// change at or before it needs in this node's kernel (a remote task's VXLAN peer,
    /// say) is in place, or reported as failed.
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Steps run since the daemon started (for `netd status`).
    pub fn steps(&self) -> u64 {
        self.steps.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long the last step took (for `netd status`: a step after a change should
    /// cost the change, not the node).
    pub fn last_step(&self) -> Duration {
        Duration::from_micros(self.last_step_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn last_report(&self) -> Report {
        self.last.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Re-runs whenever the store changes, and every `interval` to repair drift (those
    /// steps read every table back from the kernel).
    pub async fn run_forever(self: Arc<Self>, interval: Duration) {
        let mut changes = self.view.watch();
        let mut checked = true;
        let mut due = tokio::time::Instant::now() + interval;
        let mut last_change = tokio::time::Instant::now();
        loop {
            if let Err(e) = self.run(checked).await {
                tracing::warn!("reconcile: {e:#}");
            }
            if checked {
                due = tokio::time::Instant::now() + interval;
            }
            // The checked step reads the whole node back (hundreds of ms at scale) and
            // holds off every change meanwhile: once due, it waits for a quiet moment,
            // but a stream of changes puts it off by CHECK_PUT_OFF at most (steps after a
            // change visit only what it touched; drift elsewhere is the check's).
            let wake = (last_change + CHECK_QUIET)
                .max(due)
                .min(due + CHECK_PUT_OFF);
            checked = tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    last_change = tokio::time::Instant::now();
                    false
                }
                _ = tokio::time::sleep_until(wake) => true,
            };
        }
    }

    /// After a restart, before the first step: serves at once what the netd before left
    /// open (DNS sockets, TUN devices) for this node's tasks and sandboxes, so that the
    /// gap a restart leaves is the daemon's start, not its first step (which checks every
    /// namespace of the node: seconds at scale).
    pub async fn resume(&self) {
        let st = self.view.state();
        let a = &self.appliers;
        let translating = a.datapath.as_ref().is_some_and(|d| d.needs_lb_addresses());
        let plan = NodePlan::from_state(&st, &self.cfg, translating);
        if let Some(dns) = &a.dns {
            let tasks: Vec<&Task> = plan.tasks.iter().map(|t| &t.task).collect();
            dns.resume(&tasks).await;
        }
        if let Some(dp) = &a.datapath {
            dp.resume(&plan.lb_sandboxes).await;
        }
    }

    /// One step, after a change: tables known to be right are not read back.
    pub async fn run_once(&self) -> Result<Report> {
        self.run(false).await
    }

    /// Makes the kernel match a state at `revision` or later: a step that began after a
    /// write (the one its change event started) serves the caller who made it, instead of
    /// a second one behind it.
    pub async fn run_for(&self, revision: u64) -> Result<Report> {
        let _guard = self.step.lock().await;
        if *self.applied.borrow() >= revision {
            return Ok(self.last_report());
        }
        self.run_locked(false).await
    }

    async fn run(&self, checked: bool) -> Result<Report> {
        let _guard = self.step.lock().await;
        self.run_locked(checked).await
    }

    /// One step; the caller holds the step lock.
    async fn run_locked(&self, checked: bool) -> Result<Report> {
        let st = self.view.state();
        let began = std::time::Instant::now();
        let scope = if checked {
            Err("periodic check")
        } else {
            self.scope(&st)
        };
        // The endpoints that went since the last step (None: none before, as after a
        // restart).
        let prev = self.stepped.lock().ok().and_then(|s| s.clone());
        let gone = prev.map(|p| Gone::between(&p, &st));
        let scoped = began.elapsed();
        let mut report = self
            .step(&st, checked, scope.as_ref().ok(), gone.as_ref())
            .await;
        report.phases.insert(0, ("scope", scoped));
        report.scope = match &scope {
            Ok(s) => format!("{} tasks, {} networks", s.tasks.len(), s.networks.len()),
            Err(why) => format!("whole node ({why})"),
        };
        if let Ok(mut stepped) = self.stepped.lock() {
            *stepped = Some(st.clone());
        }
        self.steps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.last_step_us.store(
            began.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        crate::metrics::record::reconcile_step(
            began.elapsed(),
            scope.is_err(),
            report.errors.len(),
            report.task_errors.len(),
        );
        if let Ok(mut last) = self.last.lock() {
            *last = report.clone();
        }
        self.applied.send_replace(st.revision);
        let changed: Vec<(String, TaskStatus)> = st
            .tasks
            .values()
            .filter(|t| t.node == self.cfg.name)
            .map(|t| {
                let status = TaskStatus {
                    error: report.task_errors.get(&t.id).cloned(),
                    pending: report.pending.contains(&t.id),
                };
                (t.id.clone(), status)
            })
            .filter(|(id, status)| st.task_status.get(id) != Some(status))
            .collect();
        match state::publish_task_status(&self.view, &st, changed).await {
            Ok(Some(revision)) => self
                .status_revision
                .store(revision, std::sync::atomic::Ordering::Release),
            Ok(None) => {}
            Err(e) => tracing::warn!("publish task status: {e}"),
        }
        for (task, e) in &report.task_errors {
            tracing::warn!(task, "{e}");
        }
        for e in &report.errors {
            tracing::warn!("{e}");
        }
        Ok(report)
    }

    /// What a step from `st` must visit after the last one (an error: everything, and
    /// why): what changed since, and what that step could not finish. A step that left a
    /// node-level error is followed by a whole one.
    fn scope(&self, st: &State) -> Result<Scope, &'static str> {
        let prev = self.stepped.lock().ok().and_then(|s| s.clone());
        let prev = prev.ok_or("first step")?;
        let last = self.last_report();
        if !last.errors.is_empty() {
            return Err("the last step failed");
        }
        let mut scope = Scope::between(&prev, st, &self.cfg.name)?;
        scope.retry(st, last.task_errors.keys().chain(&last.pending));
        // Tasks that waited for their runtime may have stopped waiting: the sweep keeps
        // their interfaces in the node's namespace only while they do.
        scope.local |= !last.pending.is_empty();
        Ok(scope)
    }

    /// One step from state `st`, over `scope` (None: every part of the node); `gone`:
    /// the endpoints that went since the last step (None: no step before).
    async fn step(
        &self,
        st: &State,
        checked: bool,
        scope: Option<&Scope>,
        gone: Option<&Gone>,
    ) -> Report {
        let a = &self.appliers;
        let translating = a.datapath.as_ref().is_some_and(|d| d.needs_lb_addresses());
        let mut phases = Phases::start();
        let plan = NodePlan::from_state(st, &self.cfg, translating);
        let mut report = Report::default();
        a.links.begin(checked);
        phases.end("plan");

        // 1. Node-level bridges, then the overlay sandboxes the local tasks need.
        if let Err(e) = a.links.bridges(&plan.bridges).await {
            report.errors.push(format!("node bridges: {e:#}"));
        }
        let mut broken = BTreeSet::new();
        let in_scope = |o: &&OverlayPlan| in_scope_network(scope, &o.network.name);
        let mut remade = BTreeSet::new();
        for o in plan.overlays.iter().filter(in_scope) {
            let net = &o.network.name;
            match a.links.sandbox(o).await {
                Ok(true) => {
                    remade.insert(net.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    report
                        .errors
                        .push(format!("sandbox of network {net}: {e:#}"));
                    broken.insert(net.clone());
                }
            }
        }
        let ready = |o: &&OverlayPlan| !broken.contains(&o.network.name);
        phases.end("sandboxes");

        // 2. Remote tasks on those overlays, reachable through their node's VTEP.
        for o in plan.overlays.iter().filter(ready).filter(in_scope) {
            match a.links.peers(o).await {
                Ok(0) => {}
                Ok(changed) => {
                    tracing::info!(
                        network = o.network.name,
                        changed,
                        "remote task entries updated"
                    )
                }
                Err(e) => report
                    .errors
                    .push(format!("remote tasks of network {}: {e:#}", o.network.name)),
            }
        }
        phases.end("peers");

        // 3. Task endpoints: of the tasks in scope, of a handed-over task until its
        // runtime took it over, and of the tasks plugged into a sandbox made anew.
        let visit = |t: &&TaskPlan| {
            t.task.handoff
                || scope.is_none_or(|s| s.tasks.contains(&t.task.id))
                || t.task.endpoints.iter().any(|e| remade.contains(&e.network))
        };
        for t in plan.tasks.iter().filter(visit) {
            let id = &t.task.id;
            if let Some(bad) = t
                .task
                .endpoints
                .iter()
                .find(|e| broken.contains(&e.network))
            {
                let why = format!("sandbox of network {} is not ready", bad.network);
                report.task_errors.insert(id.clone(), why);
                continue;
            }
            if t.task.handoff {
                match a.links.handoff(t).await {
                    Ok(true) => {}
                    Ok(false) => {
                        report.pending.insert(id.clone());
                        continue;
                    }
                    Err(e) => {
                        report.task_errors.insert(id.clone(), format!("{e:#}"));
                        continue;
                    }
                }
            }
            if let Err(e) = a.links.task(t).await {
                report.task_errors.insert(id.clone(), format!("{e:#}"));
            }
        }
        phases.end("tasks");

        // 3b. The ingress sandbox: the node's leg on the ingress network.
        let isbox_up = self.ingress_sandbox(&plan, &broken, &mut report).await;
        phases.end("ingress_sandbox");

        // The DNS listeners and the VIP hooks serve the node's own tasks that are up: a
        // step in which none of them changed, no sandbox was made anew or failed, and no
        // overlay's VIPs are routed into sandboxes (a translating datapath) leaves them as
        // the last step did (a task whose listener or hook failed there is retried, which
        // makes it a change of its own; so is a handed-over task still waiting for its
        // runtime, which may come up in any step).
        let own_unchanged = !translating
            && remade.is_empty()
            && broken.is_empty()
            && scope.is_some_and(|s| {
                !s.local
                    && !s
                        .tasks
                        .iter()
                        .any(|id| st.tasks.get(id).is_some_and(|t| t.node == self.cfg.name))
            });

        // 4. The embedded DNS in every task that is up (and in no other).
        if let (Some(dns), false) = (&a.dns, own_unchanged) {
            let up = report.up(&plan);
            let errors = dns.serve(&up).await;
            report.task_errors.extend(errors);
        }
        phases.end("dns");

        // 5. VIP load balancing for the tasks that are up.
        if let (Some(dp), false) = (&a.datapath, own_unchanged) {
            if let Err(e) = self
                .load_balancer(dp.as_ref(), &plan, &broken, &mut report)
                .await
            {
                report.errors.push(format!("load balancer: {e:#}"));
            }
        }
        phases.end("load_balancer");

        // 6. The fast path in front of the kernel path (or gone with the mesh) first: the
        // node's rules send what it leaves to the kernel on a path of their own.
        let mut xdp_iface = None;
        if let Some(m) = &a.mesh {
            // A step that failed to check the ingress sandbox (a netlink timeout, say)
            // leaves the fast path as it is: removing it would lose every flow it holds
            // (their answers would then be dropped, and the clients wait) for what the
            // next step most likely finds right. The mesh gone removes it.
            let running = m.running_on().filter(|_| plan.mesh.is_some() && !isbox_up);
            if let Some(iface) = running {
                xdp_iface = Some(iface);
            } else {
                match m.sync(plan.mesh.as_ref().filter(|_| isbox_up)).await {
                    Ok(i) => xdp_iface = i,
                    Err(e) => report
                        .errors
                        .push(format!("XDP fast path (kernel path in use): {e:#}")),
                }
            }
        }
        phases.end("xdp");
        // Node firewall: masquerade, isolation and published ports; the ingress
        // sandbox's DNAT onto the service's tasks.
        let up: BTreeSet<String> = report.up(&plan).iter().map(|t| t.id.clone()).collect();
        let rules = plan.node_ruleset(&up, isbox_up, xdp_iface.as_deref());
        if let Err(e) = a.firewall.node(rules, checked).await {
            report.errors.push(format!("nftables: {e:#}"));
        }
        if let (Some(i), true) = (&plan.ingress, isbox_up) {
            let ns = Netns::named(&naming::ingress_sbox_netns(&self.cfg.name));
            if let Err(e) = a.firewall.namespace(&ns, i.rules.clone(), checked).await {
                report
                    .errors
                    .push(format!("ingress sandbox nftables: {e:#}"));
            }
        }
        phases.end("firewall");

        // 6a. Flows that went with their task: the kernel path's tracked flows translated
        // to it (XDP's own went with the mesh table above).
        if let Err(e) = self.forget_flows(&plan, st, isbox_up, gone).await {
            report.errors.push(format!("flows of gone tasks: {e:#}"));
        }
        if let Err(e) = self.forget_way_back(st, gone).await {
            report.errors.push(format!("flows of the way back: {e:#}"));
        }
        phases.end("flows");

        // 6b. Port security in every overlay sandbox: a task's port lets in only its own
        // MAC and address.
        for o in plan.overlays.iter().filter(ready).filter(in_scope) {
            let guards = plan.guards(o, isbox_up);
            if let Err(e) = a.firewall.guards(&o.sandbox, guards, checked).await {
                report.errors.push(format!(
                    "port security of network {}: {e:#}",
                    o.network.name
                ));
            }
        }
        phases.end("port_security");

        // 7. Sweep what nothing desires any more; the task sides that wait for their
        // runtime stay in the node's namespace. Only the node's own tasks make or free
        // what the sweep removes: a step that touched none of them skips it, and the
        // netlink sockets' check (a stat of every namespace held) with it; a namespace
        // deleted behind netd's back is let go at the next periodic step.
        let sweep = scope.is_none_or(|s| s.local) || !report.pending.is_empty();
        if sweep {
            let mut wanted = plan.wanted.clone();
            wanted.waiting = plan
                .tasks
                .iter()
                .filter(|t| report.pending.contains(&t.task.id))
                .filter_map(|t| t.task.endpoints.first())
                .map(|ep| naming::task_tmp_if(&ep.id))
                .collect();
            if let Err(e) = a.links.sweep(&wanted).await {
                report.errors.push(format!("sweep: {e:#}"));
            }
            // A socket keeps its namespace (and the interfaces in it) alive.
            let mut keep: BTreeSet<Netns> = plan
                .tasks
                .iter()
                .map(|t| Netns::Path(PathBuf::from(&t.task.netns)))
                .collect();
            keep.extend(wanted.sandboxes.iter().map(|n| Netns::named(n)));
            a.links.keep_sockets(&keep);
        }
        phases.end("sweep");
        report.phases = phases.done;
        report
    }

    /// Deletes the tracked flows translated to endpoints that went: in the ingress
    /// sandbox, those to a task's ingress address (cluster-wide unique: from any node),
    /// and the unanswered ones to a lost node's tasks;
    /// in the node's namespace, those to a gwbridge address of the node's own (host-mode
    /// ports). With no step before (a restart), the ingress sandbox's flows to any
    /// address of the ingress network that no task or node holds now.
    async fn forget_flows(
        &self,
        plan: &NodePlan,
        st: &State,
        isbox_up: bool,
        gone: Option<&Gone>,
    ) -> Result<()> {
        let fw = &self.appliers.firewall;
        let isbox = plan
            .ingress
            .as_ref()
            .filter(|_| isbox_up)
            .map(|i| (Netns::named(&naming::ingress_sbox_netns(&self.cfg.name)), i));
        let Some(gone) = gone else {
            if let Some((ns, i)) = isbox {
                let keep: BTreeSet<Ipv4Addr> = st
                    .tasks
                    .values()
                    .flat_map(|t| t.endpoints.iter())
                    .filter(|e| e.network == INGRESS)
                    .map(|e| e.ip)
                    .chain(
                        st.lb_addrs
                            .get(&i.network.id)
                            .into_iter()
                            .flat_map(|m| m.values().copied()),
                    )
                    .collect();
                fw.forget_flows_except(&ns, i.network.subnet, keep).await?;
            }
            return Ok(());
        };
        let to = |network: &str, node: Option<&str>| -> Vec<Ipv4Addr> {
            gone.endpoints
                .iter()
                .filter(|g| g.network == network && node.is_none_or(|n| g.node == n))
                .map(|g| g.ip)
                .collect()
        };
        if let Some((ns, _)) = isbox {
            let to = to(INGRESS, None);
            if !to.is_empty() {
                fw.forget_flows(&ns, to).await?;
            }
            let lost: Vec<Ipv4Addr> = gone
                .lost
                .iter()
                .filter(|g| g.network == INGRESS)
                .map(|g| g.ip)
                .collect();
            if !lost.is_empty() {
                fw.forget_unanswered(&ns, lost).await?;
            }
        }
        let host = to(crate::model::GWBRIDGE, Some(&self.cfg.name));
        if !host.is_empty() {
            fw.forget_flows(&Netns::Home, host).await?;
        }
        Ok(())
    }

    /// The way back's flows that went with their task (with no step before, a restart:
    /// those of tasks and sandboxes that are no more), those of nodes lost for longer
    /// than a lease TTL, and its idle ones: walks of its maps, off the async workers.
    async fn forget_way_back(&self, st: &State, gone: Option<&Gone>) -> Result<()> {
        let Some(ports) = self.appliers.way_back.clone() else {
            return Ok(());
        };
        let sandboxes = crate::plan::ingress_sandboxes(st);
        if st.ingress().is_none() {
            // Its addresses may come back in another ingress network, lost or not.
            ports.note_lost(&sandboxes.lost);
            return Ok(());
        }
        let tasks: BTreeSet<Ipv4Addr> = match gone {
            Some(gone) => gone
                .endpoints
                .iter()
                .filter(|g| g.network == INGRESS)
                .map(|g| g.ip)
                .collect(),
            None => st
                .tasks
                .values()
                .flat_map(|t| t.endpoints.iter())
                .filter(|e| e.network == INGRESS)
                .map(|e| e.ip)
                .collect(),
        };
        let newly_lost = ports.note_lost(&sandboxes.lost);
        let grace = self.cfg.lease_ttl;
        let walk = ports.clone();
        let restart = gone.is_none();
        tokio::task::spawn_blocking(move || {
            if restart {
                walk.forget_except(&tasks, &sandboxes.all)?;
            } else {
                walk.forget(&tasks, &BTreeSet::new())?;
            }
            walk.forget_lost(grace)?;
            walk.sweep()
        })
        .await
        .map_err(|e| anyhow!("{e}"))??;
        if newly_lost {
            // No step may come when its grace ends (a quiet cluster): a wake of its own,
            // which looks at the node's view then (a node back meanwhile is not lost,
            // even if no step has run since).
            let view = self.view.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace + Duration::from_millis(100)).await;
                ports.note_back(&crate::plan::ingress_sandboxes(&view.state()).lost);
                let forgot = tokio::task::spawn_blocking(move || ports.forget_lost(grace)).await;
                if let Ok(Err(e)) = forgot {
                    tracing::warn!("flows of the way back from lost nodes: {e:#}");
                }
            });
        }
        Ok(())
    }

    /// The mesh's way back on this node's published tasks' ports, for `netd status`.
    pub async fn way_back_status(&self) -> serde_json::Value {
        let Some(ports) = self.appliers.way_back.clone() else {
            return serde_json::Value::Null;
        };
        tokio::task::spawn_blocking(move || ports.status())
            .await
            .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
    }

    /// Tracked flows (kernel path) and XDP flows removed because their task went away,
    /// since netd started: for `netd status`.
    pub fn flows_removed(&self) -> (u64, u64) {
        let xdp = self.appliers.mesh.as_ref().map_or(0, |m| m.flows_removed());
        (self.appliers.firewall.flows_removed(), xdp)
    }

    /// Builds the ingress sandbox if the plan has one; whether it is up.
    async fn ingress_sandbox(
        &self,
        plan: &NodePlan,
        broken: &BTreeSet<String>,
        report: &mut Report,
    ) -> bool {
        let Some(i) = &plan.ingress else {
            return false;
        };
        if broken.contains(&i.network.name) {
            report
                .errors
                .push("ingress sandbox: the ingress network's sandbox is not ready".into());
            return false;
        }
        let Some(t) = &i.sandbox else {
            // A node that joined after the ingress network was made.
            let node = &self.cfg.name;
            let why = match state::ensure_lb_addresses(&self.view, node, &[INGRESS.into()]).await {
                Ok(_) => "waiting for this node's address on the ingress network".to_string(),
                Err(e) => format!("{e:#}"),
            };
            report.errors.push(format!("ingress sandbox: {why}"));
            return false;
        };
        match self.appliers.links.ingress_sandbox(i, t).await {
            Ok(()) => true,
            Err(e) => {
                report.errors.push(format!("ingress sandbox: {e:#}"));
                false
            }
        }
    }

    /// The datapath's node-side objects for the tasks that are up and the overlays whose
    /// sandbox is.
    async fn load_balancer(
        &self,
        dp: &dyn Datapath,
        plan: &NodePlan,
        broken: &BTreeSet<String>,
        report: &mut Report,
    ) -> Result<()> {
        if !plan.lb_addresses_missing.is_empty() {
            // Tasks attached before this node used a translating datapath: reserve its
            // addresses now; the store change brings another step that uses them.
            state::ensure_lb_addresses(&self.view, &self.cfg.name, &plan.lb_addresses_missing)
                .await?;
        }
        let sandboxes: Vec<_> = plan
            .lb_sandboxes
            .iter()
            .filter(|s| !broken.contains(&s.network))
            .cloned()
            .collect();
        let up = report.up(plan);
        let errors = dp.sync_local(&up, &sandboxes).await?;
        report.task_errors.extend(errors);
        Ok(())
    }
}

/// The step's sequencing, with fake appliers: what each concern is asked to do, and what
/// a failure in one means for the others.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{fixture, TaskAttach};

    #[derive(Default)]
    struct FakeLinks {
        /// Networks whose sandbox fails.
        broken: BTreeSet<String>,
        /// Networks whose sandbox is made anew at every visit.
        remade: std::sync::Mutex<BTreeSet<String>>,
        tasks: std::sync::Mutex<Vec<String>>,
        /// The networks whose peers a step programmed.
        peers: std::sync::Mutex<Vec<String>>,
        swept: std::sync::Mutex<Option<Wanted>>,
    }

    #[async_trait]
    impl Links for FakeLinks {
        async fn bridges(&self, _: &[NodeBridge]) -> Result<()> {
            Ok(())
        }
        async fn sandbox(&self, o: &OverlayPlan) -> Result<bool> {
            if self.broken.contains(&o.network.name) {
                anyhow::bail!("no sandbox today");
            }
            Ok(self.remade.lock().unwrap().contains(&o.network.name))
        }
        async fn peers(&self, o: &OverlayPlan) -> Result<usize> {
            self.peers.lock().unwrap().push(o.network.name.clone());
            Ok(0)
        }
        async fn task(&self, t: &TaskPlan) -> Result<()> {
            self.tasks.lock().unwrap().push(t.task.name.clone());
            Ok(())
        }
        async fn handoff(&self, _: &TaskPlan) -> Result<bool> {
            Ok(false)
        }
        async fn ingress_sandbox(&self, _: &IngressPlan, _: &TaskPlan) -> Result<()> {
            Ok(())
        }
        async fn sweep(&self, w: &Wanted) -> Result<()> {
            *self.swept.lock().unwrap() = Some(w.clone());
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeFirewall {
        node: std::sync::Mutex<Vec<Ruleset>>,
    }

    #[async_trait]
    impl Firewall for FakeFirewall {
        async fn node(&self, rules: Ruleset, _: bool) -> Result<()> {
            self.node.lock().unwrap().push(rules);
            Ok(())
        }
        async fn namespace(&self, _: &Netns, _: Ruleset, _: bool) -> Result<()> {
            Ok(())
        }
        async fn guards(&self, _: &Netns, _: SandboxGuards, _: bool) -> Result<()> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeDns {
        served: std::sync::Mutex<Vec<String>>,
        /// Steps that asked for the listeners.
        calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl Listeners for FakeDns {
        async fn serve(&self, tasks: &[&Task]) -> BTreeMap<String, String> {
            *self.served.lock().unwrap() = tasks.iter().map(|t| t.name.clone()).collect();
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            BTreeMap::new()
        }
    }

    /// The XDP applier's side: the tables it was asked to run (None: to remove).
    #[derive(Default)]
    struct FakeMesh {
        synced: std::sync::Mutex<Vec<Option<MeshTable>>>,
    }

    #[async_trait]
    impl Mesh for FakeMesh {
        async fn sync(&self, table: Option<&MeshTable>) -> Result<Option<String>> {
            self.synced.lock().unwrap().push(table.cloned());
            Ok(table.map(|_| "eth0".to_string()))
        }
        fn status(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    /// The VIP load balancer's node side: the local tasks it was asked to serve.
    #[derive(Default)]
    struct FakeDatapath {
        local: std::sync::Mutex<Vec<Vec<String>>>,
    }

    #[async_trait]
    impl Datapath for FakeDatapath {
        fn apply(
            &self,
            _: &crate::datapath::LbTable,
            _: Option<&BTreeSet<Ipv4Addr>>,
        ) -> Result<()> {
            Ok(())
        }
        async fn sync_local(
            &self,
            tasks: &[&Task],
            _: &[crate::datapath::SandboxLb],
        ) -> Result<BTreeMap<String, String>> {
            let mut names: Vec<String> = tasks.iter().map(|t| t.name.clone()).collect();
            names.sort();
            self.local.lock().unwrap().push(names);
            Ok(BTreeMap::new())
        }
        fn counters(&self) -> crate::datapath::Counters {
            BTreeMap::new()
        }
        fn status(&self) -> crate::datapath::DatapathStatus {
            crate::datapath::DatapathStatus {
                requested: crate::datapath::Mode::Auto,
                active: "fake".into(),
                reason: String::new(),
                detail: serde_json::Value::Null,
            }
        }
    }

    fn cfg() -> NodeConfig {
        crate::plan::tests::cfg("n1")
    }

    /// Task `name` of `service` attached on `node`, in namespace /run/netns/NAME.
    async fn attach_named(v: &View, service: &str, name: &str, node: &str) {
        let mut req = fixture::attach(service, &format!("/run/netns/{name}"), node);
        req.name = Some(name.into());
        state::attach_task(v, node, req).await.unwrap();
    }

    /// Network `back` and service `api` on it, publishing `publish`.
    async fn api_on_back(v: &View, publish: &[&str]) {
        let pools = fixture::pools();
        let back = state::NetworkCreate {
            name: "back".into(),
            ..Default::default()
        };
        state::create_network(v, &pools, back).await.unwrap();
        let api = state::ServiceCreate {
            name: "api".into(),
            networks: vec!["back".into()],
            publish: publish
                .iter()
                .map(|p| crate::model::parse_publish(p).unwrap())
                .collect(),
            ..Default::default()
        };
        state::create_service(v, &pools, api).await.unwrap();
    }

    #[tokio::test]
    async fn a_task_behind_a_broken_sandbox_is_reported_and_left_out_of_dns_and_ports() {
        let (_dir, v) = fixture::setup().await;
        fixture::web_on_front(&v).await;
        api_on_back(&v, &["8080:80,mode=host"]).await;
        for (svc, name) in [("web", "w1"), ("api", "a1")] {
            state::attach_task(
                &v,
                "n1",
                TaskAttach {
                    service: svc.into(),
                    netns: format!("/run/netns/{name}"),
                    name: Some(name.into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        let links = Arc::new(FakeLinks {
            broken: BTreeSet::from(["back".to_string()]),
            ..Default::default()
        });
        let firewall = Arc::new(FakeFirewall::default());
        let dns = Arc::new(FakeDns::default());
        let step = |links: &Arc<FakeLinks>| {
            let appliers = Appliers {
                links: links.clone(),
                firewall: firewall.clone(),
                mesh: None,
                dns: Some(dns.clone()),
                datapath: None,
                way_back: None,
            };
            Reconciler::with_appliers(v.clone(), cfg(), appliers)
        };
        let report = step(&links).run_once().await.unwrap();
        // The sandbox's failure is the node's error, and its task's.
        assert!(report
            .errors
            .iter()
            .any(|e| e.contains("sandbox of network back")));
        let st = v.state();
        let a1 = st.task("a1").unwrap();
        assert!(report.task_errors[&a1.id].contains("not ready"));
        // The other task is plumbed and served; the broken one is neither.
        assert_eq!(*links.tasks.lock().unwrap(), vec!["w1".to_string()]);
        assert_eq!(*dns.served.lock().unwrap(), vec!["w1".to_string()]);
        // Its host-mode port has no target while it is not up.
        let rules = firewall.node.lock().unwrap().last().cloned().unwrap();
        let port = rules.ports.iter().find(|p| p.port == 8080).unwrap();
        assert!(port.targets.is_empty(), "{port:?}");
        // The sweep still keeps both tasks' links: a failure is no reason to remove.
        let swept = links.swept.lock().unwrap().clone().unwrap();
        let kept: usize = swept.links.values().map(|l| l.len()).sum();
        assert_eq!(kept, 4, "{swept:?}");
        // With the sandbox back, both are up and the port has its target.
        let report = step(&Arc::new(FakeLinks::default()))
            .run_once()
            .await
            .unwrap();
        assert!(
            report.errors.is_empty() && report.task_errors.is_empty(),
            "{report:?}"
        );
        let rules = firewall.node.lock().unwrap().last().cloned().unwrap();
        let port = rules.ports.iter().find(|p| p.port == 8080).unwrap();
        let gw_ip = a1
            .endpoints
            .iter()
            .find(|e| e.network == crate::model::GWBRIDGE)
            .unwrap()
            .ip;
        assert_eq!(port.targets, vec![gw_ip]);
    }

    #[tokio::test]
    async fn a_step_after_a_task_change_visits_that_task_and_its_overlays_only() {
        let (_dir, v) = fixture::setup().await;
        fixture::web_on_front(&v).await;
        fixture::add_node(&v, "n2").await;
        api_on_back(&v, &[]).await;
        for (svc, name) in [("web", "w1"), ("api", "a1")] {
            attach_named(&v, svc, name, "n1").await;
        }
        let links = Arc::new(FakeLinks::default());
        let dns = Arc::new(FakeDns::default());
        let appliers = Appliers {
            links: links.clone(),
            firewall: Arc::new(FakeFirewall::default()),
            mesh: None,
            dns: Some(dns.clone()),
            datapath: None,
            way_back: None,
        };
        let r = Reconciler::with_appliers(v.clone(), cfg(), appliers);
        let visited = |links: &FakeLinks| {
            let mut t = std::mem::take(&mut *links.tasks.lock().unwrap());
            let mut p = std::mem::take(&mut *links.peers.lock().unwrap());
            t.sort();
            p.sort();
            (t, p)
        };
        // The first step visits everything.
        r.run_once().await.unwrap();
        let (tasks, peers) = visited(&links);
        assert_eq!(tasks, vec!["a1".to_string(), "w1".to_string()]);
        assert_eq!(peers, vec!["back".to_string(), "front".to_string()]);
        // A task on n2 joins `front`: n1 redoes front's peers, and no task of its own;
        // its tasks' DNS listeners are left as they are.
        let calls = || dns.calls.load(std::sync::atomic::Ordering::Relaxed);
        let before = calls();
        attach_named(&v, "web", "w2", "n2").await;
        r.run_once().await.unwrap();
        assert_eq!(visited(&links), (vec![], vec!["front".to_string()]));
        assert_eq!(calls(), before, "a remote change asked for the listeners");
        // A task of its own on `back`: that task and back's peers; the DNS still serves
        // every local task.
        attach_named(&v, "api", "a2", "n1").await;
        r.run_once().await.unwrap();
        assert_eq!(
            visited(&links),
            (vec!["a2".to_string()], vec!["back".to_string()])
        );
        assert_eq!(calls(), before + 1);
        assert_eq!(dns.served.lock().unwrap().len(), 3);
        // A sandbox made anew (deleted behind netd's back) in a step for a remote task:
        // the node's own tasks on that network are plugged in again.
        links.remade.lock().unwrap().insert("front".into());
        attach_named(&v, "web", "w3", "n2").await;
        r.run_once().await.unwrap();
        assert_eq!(
            visited(&links),
            (vec!["w1".to_string()], vec!["front".to_string()])
        );
        links.remade.lock().unwrap().clear();
        // The periodic (checked) step visits everything again.
        r.run(true).await.unwrap();
        let (tasks, peers) = visited(&links);
        assert_eq!((tasks.len(), peers.len()), (3, 2));
        // A task of its own that its runtime has not taken over yet may come up in any
        // step: while it waits (pending), a remote change asks for the listeners too.
        let mut req = fixture::attach("web", "/run/netns/h1", "n1");
        req.handoff = true;
        state::attach_task(&v, "n1", req).await.unwrap();
        r.run_once().await.unwrap();
        let before = calls();
        attach_named(&v, "web", "w4", "n2").await;
        r.run_once().await.unwrap();
        assert_eq!(
            calls(),
            before + 1,
            "a step skipped a waiting handoff's listeners"
        );
    }

    /// The mesh and VIP appliers get what the plan says, step by step: the published
    /// port with the local task's ingress address (and XDP's interface reaches the node's
    /// rules), the local tasks that are up; and nothing of a service once it is gone.
    #[tokio::test]
    async fn the_mesh_and_the_load_balancer_get_the_tables_of_the_plan() {
        let (_dir, v) = fixture::setup().await;
        fixture::web_on_front(&v).await;
        api_on_back(&v, &["8080:80"]).await;
        state::ensure_ingress(&v, &fixture::pools(), "n1")
            .await
            .unwrap();
        for (svc, name) in [("web", "w1"), ("api", "a1")] {
            attach_named(&v, svc, name, "n1").await;
        }
        let (mesh, datapath) = (
            Arc::new(FakeMesh::default()),
            Arc::new(FakeDatapath::default()),
        );
        let firewall = Arc::new(FakeFirewall::default());
        let appliers = Appliers {
            links: Arc::new(FakeLinks::default()),
            firewall: firewall.clone(),
            mesh: Some(mesh.clone()),
            dns: Some(Arc::new(FakeDns::default())),
            datapath: Some(datapath.clone()),
            way_back: None,
        };
        let r = Reconciler::with_appliers(v.clone(), cfg(), appliers);
        // The tasks up, as the node's first step reports them.
        let ids: Vec<String> = ["w1", "a1"]
            .iter()
            .map(|n| v.state().task(n).unwrap().id.clone())
            .collect();
        fixture::report_up(&v, &[&ids[0], &ids[1]]).await;
        r.run_once().await.unwrap();
        let a1 = v.state().task("a1").unwrap().clone();
        let ingress_ip = a1
            .endpoints
            .iter()
            .find(|e| e.network == INGRESS)
            .map(|e| e.ip)
            .unwrap();
        let table = mesh
            .synced
            .lock()
            .unwrap()
            .last()
            .cloned()
            .flatten()
            .unwrap();
        assert_eq!(table.ports.len(), 1, "{table:?}");
        assert_eq!(table.ports[0].port, 8080);
        assert_eq!(table.ports[0].target_port, 80);
        assert_eq!(table.ports[0].backends.len(), 1, "{table:?}");
        assert_eq!(table.ports[0].backends[0].0, ingress_ip);
        assert_eq!(
            datapath.local.lock().unwrap().last().unwrap(),
            &vec!["a1".to_string(), "w1".to_string()]
        );
        // XDP runs on eth0: the node's rules leave it the published port there.
        let rules = firewall.node.lock().unwrap().last().cloned().unwrap();
        assert!(
            rules
                .ports
                .iter()
                .any(|p| p.port == 8080 && p.iif.as_deref() == Some("eth0")),
            "{rules:?}"
        );
        // The service goes: its task with it, and nothing is published any more, so the
        // fast path is asked to go too.
        state::remove_service(&v, "api").await.unwrap();
        r.run_once().await.unwrap();
        assert_eq!(mesh.synced.lock().unwrap().last().cloned(), Some(None));
        assert_eq!(
            datapath.local.lock().unwrap().last().unwrap(),
            &vec!["w1".to_string()]
        );
    }
}
