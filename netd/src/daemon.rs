//! `netd daemon`: opens the store, registers the node, reconciles the kernel once before
//! serving (so a restarted daemon has checked everything before it answers), then serves
//! the API and keeps reconciling on every store change and on a timer. Kernel objects are
//! left in place on exit: traffic keeps flowing while netd is down or restarting.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use ipnetwork::Ipv4Network;

use crate::api::{self, Daemon};
use crate::datapath::{self, Mode};
use crate::dns::{self, Dns, DnsConfig};
use crate::follow;
use crate::model::{self, Node};
use crate::reconcile::{NodeConfig, Reconciler};
use crate::state::{self, Pools};
use crate::store;
use crate::tls::TlsFiles;
use crate::view::View;

pub const DEFAULT_API: &str = "unix:/run/netd/netd.sock";

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Where desired state lives: local:DIR (embedded, crash-safe, one node) or
    /// etcd://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT...] (a cluster; etcd+https:// for
    /// TLS). The password can come from NETD_STORE_PASSWORD instead.
    #[arg(long, default_value = "local:/var/lib/netd")]
    pub store: String,
    /// Let tasks open connections to this node's own addresses and to the store (by
    /// default they reach neither: only the outside, through the gwbridge).
    #[arg(long)]
    pub allow_tasks_to_node: bool,
    /// CA certificate (PEM) etcd's certificate must be signed by; implies TLS.
    #[arg(long, env = "NETD_STORE_CA")]
    pub store_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd with --client-cert-auth.
    #[arg(long, env = "NETD_STORE_CERT")]
    pub store_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "NETD_STORE_KEY")]
    pub store_key: Option<PathBuf>,
    /// This node's name (a DNS label); defaults to the host name.
    #[arg(long)]
    pub node: Option<String>,
    /// This node's underlay address (its VTEP), announced to the cluster. With an etcd
    /// store it defaults to the source address of the route towards etcd.
    #[arg(long)]
    pub advertise_addr: Option<Ipv4Addr>,
    /// Load-balancing datapath: auto (eBPF where the kernel takes it, else userspace),
    /// ebpf or userspace.
    #[arg(long, default_value = "auto")]
    pub datapath: Mode,
    /// The cgroup v2 directory the eBPF socket hooks attach to; every socket under it
    /// is seen. Default: the cgroup2 mount (the whole machine).
    #[arg(long)]
    pub cgroup: Option<std::path::PathBuf>,
    /// The routing mesh's XDP fast path on the underlay interface: auto (native where
    /// the driver takes it, else generic), native, generic, or off (kernel path only).
    #[arg(long, default_value = "auto")]
    pub xdp: crate::datapath::xdp::Setting,
    /// Who a task behind a published port (ingress mode) sees as its peer: the client
    /// itself (its address, and its port unless two flows would clash), or, as Docker
    /// Swarm does, this node's address on the ingress network (snat, for comparison).
    /// Today's XDP fast path translates flows to remote tasks as snat does in either
    /// setting.
    #[arg(long, default_value = "client")]
    pub mesh_source: crate::mesh_return::MeshSource,
    /// Flows the userspace datapath tracks per overlay network at most; new flows beyond
    /// are refused (established ones are never evicted).
    #[arg(
        long,
        default_value_t = datapath::conntrack::DEFAULT_MAX_FLOWS as u32,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub userspace_conntrack_max: u32,
    /// Pool that network subnets are carved from when none is given (Docker: 10.0.0.0/8).
    #[arg(long, default_value = "10.0.0.0/8")]
    pub address_pool: Ipv4Network,
    /// Prefix length of the subnets carved from the pool.
    #[arg(long, default_value_t = 24)]
    pub pool_size: u8,
    /// Subnet of the `ingress` network (the routing mesh of published ports), made with
    /// the first service that publishes a port in ingress mode (Docker: 10.0.0.0/24).
    #[arg(long, default_value = "10.0.0.0/24")]
    pub ingress_subnet: Ipv4Network,
    /// Make the `ingress` network encrypted (Docker: `docker network create --ingress
    /// --opt encrypted`): published ports' traffic between nodes is sealed with
    /// WireGuard, and the XDP fast path, which would send it in the clear, stays off
    /// (the kernel path carries the mesh). Counts for the node that makes the network.
    #[arg(long)]
    pub ingress_encrypted: bool,
    /// Subnet of this node's gwbridge (Docker's docker_gwbridge: 172.18.0.0/16).
    #[arg(long, default_value = "172.18.0.0/16")]
    pub gwbridge_subnet: Ipv4Network,
    /// UDP port of VXLAN.
    #[arg(long, default_value_t = 4789)]
    pub vxlan_port: u16,
    /// UDP port this node's WireGuard listens on, for encrypted overlays; published in
    /// its node record, so the other nodes send there (nodes may use different ones).
    #[arg(long, default_value_t = crate::wireguard::DEFAULT_PORT)]
    pub wireguard_port: u16,
    /// Where the node keeps what must outlive a reboot: its WireGuard private key
    /// (`DIR/NODE/wireguard.key`, readable by root only).
    #[arg(long, default_value = "/var/lib/netd")]
    pub state_dir: PathBuf,
    /// MTU of the underlay; overlays get 50 bytes less for the VXLAN header, encrypted
    /// ones 110 (WireGuard's 60 more). At least 118, so that an overlay keeps IPv4's
    /// minimum of 68 bytes (and a TCP MSS above 0); encrypted overlays need 178.
    #[arg(
        long,
        default_value_t = 1500,
        value_parser = clap::value_parser!(u32).range(118..=65535)
    )]
    pub underlay_mtu: u32,
    /// Seconds the cluster waits after this daemon dies before marking the node down
    /// and withdrawing its tasks (the etcd lease TTL).
    #[arg(long, default_value_t = 10)]
    pub lease_ttl: u64,
    /// Take the store on even if it is not the one this node followed before (emptied,
    /// replaced or rolled back since): without it such a store is refused, because
    /// taking it on removes every sandbox and endpoint it does not name.
    #[arg(long)]
    pub adopt_store: bool,
    /// Upstream resolvers for names that are not the cluster's (IP or IP:PORT, comma
    /// separated; up to 3). Default: the nameservers of the node's /etc/resolv.conf.
    #[arg(long, value_delimiter = ',')]
    pub dns_upstream: Vec<String>,
    /// Search domains of the tasks (their resolv.conf): `NAME.DOMAIN` of a cluster name
    /// is answered locally, never sent upstream. Default: the node's search list.
    #[arg(long, value_delimiter = ',')]
    pub dns_search: Vec<String>,
    /// TTL of VIP answers (a VIP is stable for the service's life; Docker: 600).
    #[arg(long, default_value_t = 600)]
    pub dns_vip_ttl: u32,
    /// TTL of task-IP answers (`tasks.NAME`, dnsrr, task names).
    #[arg(long, default_value_t = 2)]
    pub dns_task_ttl: u32,
    /// Keep each task listener's answers per request (`false`: every query goes through
    /// the record table; for measuring the lookup itself).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_answer_cache: bool,
    /// Serve Docker's network and IPAM plugin protocols (driver `netd`) on this socket
    /// (default /run/docker/plugins/netd.sock, where dockerd looks for plugins).
    #[arg(long, num_args = 0..=1, default_missing_value = crate::frontends::docker::DEFAULT_SOCKET)]
    pub docker_plugin: Option<std::path::PathBuf>,
    /// Seconds between checked reconciles, which read the whole node back and repair
    /// drift (each waits for a second without changes, 50 s at most). 30 s as
    /// kube-proxy's full sync: the read-back costs the node's size (about 0.5 s of CPU
    /// with 170 tasks and 100 overlays), and every 10 s it took 3% of a core at rest and
    /// slowed DNS by up to 14% while it ran.
    #[arg(long, default_value_t = 30)]
    pub resync: u64,
    /// Serve read-only HTTP here (e.g. 127.0.0.1:9440): `/metrics` for Prometheus and
    /// `/healthz`. Off by default; nothing served there changes anything.
    #[arg(long)]
    pub http: Option<std::net::SocketAddr>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "node".into())
}

/// The store's endpoints tasks must not reach. An endpoint given by name is not
/// protected (nft rules take addresses, and a name may resolve differently later): said
/// at start.
fn protected_endpoints(etcd: Option<&store::etcd::EtcdSpec>) -> Vec<std::net::SocketAddrV4> {
    let Some(spec) = etcd else {
        return vec![];
    };
    spec.endpoints
        .iter()
        .map(|e| store::etcd::host_port(e))
        .filter_map(|hp| match hp.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                tracing::warn!(
                    endpoint = hp,
                    "store endpoint given by name: tasks are not kept from it (give its address)"
                );
                None
            }
        })
        .collect()
}

/// DNS forwards (a socket each, up to 1024 at once), DNS TCP connections and per-task
/// listeners add up on a busy node: take the hard limit of open files, as dockerd and
/// containerd do, instead of the 1024 a shell or an init system's default leaves.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("raise the open-files limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("read the open-files limit: {e}"),
    }
}

/// How often a daemon looks for what removals left to release (normally nothing: the
/// remover releases it at once).
const GARBAGE_INTERVAL: Duration = Duration::from_secs(60);

/// How long a starting daemon waits for an unreachable etcd (a node booting before etcd
/// answers) before it gives up.
const STORE_WAIT: Duration = Duration::from_secs(30);
/// The pause between two tries of a start-up read or write the store failed.
const STORE_RETRY: Duration = Duration::from_secs(1);

async fn open_store(spec: &str, tls: &store::etcd::StoreTls) -> Result<Arc<dyn store::Store>> {
    let deadline = tokio::time::Instant::now() + STORE_WAIT;
    let password = std::env::var("NETD_STORE_PASSWORD").ok();
    loop {
        match store::open(spec, tls, password.as_deref()).await {
            Ok(s) => return Ok(Arc::from(s)),
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::warn!("{e}; retrying");
                tokio::time::sleep(STORE_RETRY).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The start-up writes: the node's record, the ingress network (made by whichever node
/// comes first) and the liveness lease. Each retries what the store may answer during a
/// blip (unreachable, timed out, too busy) until `wait` is up, as [`open_store`] does: a
/// node starting while etcd elects a leader or restarts must not exit on the first error.
async fn join_cluster(
    view: &View,
    me: Node,
    pools: &Pools,
    lease: Duration,
    wait: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    let node = me.name.clone();
    with_retries("the cluster's identity", deadline, || {
        state::ensure_cluster_id(view)
    })
    .await?;
    with_retries("register node", deadline, || {
        state::register_node(view, me.clone())
    })
    .await?;
    // A clash with a network made before (its subnet) leaves the mesh unusable until the
    // user resolves it, not the node.
    if let Err(e) = with_retries("the ingress network", deadline, || {
        state::ensure_ingress(view, pools, &node)
    })
    .await
    {
        tracing::warn!("{e:#}");
    }
    with_retries("announce node liveness", deadline, || {
        state::announce_alive(view.store(), &node, lease)
    })
    .await
}

/// `op` until it succeeds, fails for good, or `deadline` passes.
async fn with_retries<T, F, Fut>(what: &str, deadline: tokio::time::Instant, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = state::Result<T>>,
{
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::warn!("{what}: {e}; retrying");
                tokio::time::sleep(STORE_RETRY).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(what.to_string())),
        }
    }
}

/// The DNS settings: flags first, then the node's resolv.conf.
fn dns_config(args: &DaemonArgs) -> Result<DnsConfig> {
    let node = dns::node_resolv_conf();
    let upstream = if args.dns_upstream.is_empty() {
        node.servers
    } else {
        args.dns_upstream
            .iter()
            .map(|u| {
                u.parse::<SocketAddr>()
                    .or_else(|_| u.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .with_context(|| format!("--dns-upstream {u:?}: not IP or IP:PORT"))
            })
            .collect::<Result<_>>()?
    };
    let search = if args.dns_search.is_empty() {
        node.search
    } else {
        args.dns_search.clone()
    };
    Ok(DnsConfig {
        upstream,
        search,
        vip_ttl: args.dns_vip_ttl,
        task_ttl: args.dns_task_ttl,
        answer_cache: args.dns_answer_cache,
    })
}

/// The address this node's traffic towards `hostport` (etcd's) leaves from: the
/// underlay address other nodes can reach, when `--advertise-addr` is not given. A
/// connected UDP socket only asks the routing table; no packet is sent.
fn source_address_towards(hostport: &str) -> Result<Ipv4Addr> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("bind probe socket")?;
    sock.connect(hostport)
        .with_context(|| format!("no route towards etcd {hostport}: give --advertise-addr"))?;
    match sock.local_addr().context("probe socket address")?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_loopback() => Ok(ip),
        other => bail!(
            "the route towards etcd {hostport} leaves from {other}, which other nodes \
             cannot reach: give --advertise-addr"
        ),
    }
}

pub async fn run(args: DaemonArgs, api_spec: &str, tls: &TlsFiles) -> Result<()> {
    let api = ApiSpec::parse(api_spec, tls)?;
    raise_open_files_limit();
    let node = args.node.clone().unwrap_or_else(hostname);
    model::validate_dns_label("node", &node).map_err(anyhow::Error::msg)?;
    if args.pool_size < args.address_pool.prefix() || args.pool_size > 30 {
        bail!(
            "--pool-size {} does not fit in --address-pool {}",
            args.pool_size,
            args.address_pool
        );
    }
    let store_tls = store::etcd::StoreTls {
        ca: args.store_ca.clone(),
        cert: args.store_cert.clone(),
        key: args.store_key.clone(),
    };
    let store = open_store(&args.store, &store_tls)
        .await
        .with_context(|| format!("open store {}", store::etcd::redact(&args.store)))?;
    // From here on, every read of the desired state is the view's (read once, then
    // kept by the store's change feed).
    let guard = Arc::new(
        crate::identity::Guard::open(
            &Path::new(crate::datapath::userspace::RUN_ROOT)
                .join(&node)
                .join("store.json"),
            store.shared(),
        )
        .context("the node's record of its store")?,
    );
    if args.adopt_store {
        guard.adopt();
    }
    let view = with_retries(
        "read the desired state",
        tokio::time::Instant::now() + STORE_WAIT,
        || View::open_as(store.clone(), Some(node.clone()), Some(guard.clone())),
    )
    .await?;
    // Graceful detaches end on the task's node (see drain.rs).
    tokio::spawn(crate::drain::finish_drains(view.clone(), node.clone()));
    // Health checks of this node's tasks (see health.rs).
    tokio::spawn(crate::health::probe_tasks(view.clone(), node.clone()));
    // Finish what a remover that died (or failed) half-way left, now and from time to
    // time (see state::collect_garbage).
    let collector = view.clone();
    tokio::spawn(async move {
        loop {
            match state::collect_garbage(&collector).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "released what earlier removals left"),
                Err(e) => tracing::warn!("release what earlier removals left: {e}"),
            }
            tokio::time::sleep(GARBAGE_INTERVAL).await;
        }
    });
    // Where etcd is (None for a local store), without the password: for the address
    // this node announces and the endpoints tasks must not reach.
    let etcd = store::etcd::parse_spec(&args.store, Some("")).ok();
    let address = match args.advertise_addr {
        Some(a) => Some(a),
        None => etcd
            .as_ref()
            .and_then(|s| s.endpoints.first().cloned())
            .map(|e| source_address_towards(store::etcd::host_port(&e)))
            .transpose()?,
    };
    let overlay_mtu = args.underlay_mtu - 50;
    // The descriptors of the netd before (DNS sockets, TUN devices), kept by the fd store
    // while it restarted, are served again, so a restart closes no port and drops no
    // packet that reached one.
    let (fd_store, mut held) = open_fd_store(&node);
    let datapath = datapath::open(
        args.datapath,
        &node,
        args.cgroup.clone(),
        overlay_mtu,
        args.userspace_conntrack_max as usize,
        fd_store.as_ref().ok().map(|s| {
            (
                s.clone(),
                crate::fdstore::take(&mut held, crate::datapath::userspace::HELD_KIND),
            )
        }),
    )?;
    tracing::info!(
        node,
        datapath = datapath.status().active,
        reason = datapath.status().reason,
        "load-balancing datapath"
    );
    let pools = Pools {
        pool: args.address_pool,
        size: args.pool_size,
        ingress: args.ingress_subnet,
        ingress_encrypted: args.ingress_encrypted,
    };
    if args.vxlan_port == crate::wireguard::SEALED_VXLAN_PORT {
        bail!(
            "--vxlan-port {} is the encrypted overlays' own VXLAN port: pick another",
            args.vxlan_port
        );
    }
    // Without its key (an unwritable state directory) the node runs, without
    // encrypted overlays: `netd status` says why.
    let wg_key_path = args.state_dir.join(&node).join("wireguard.key");
    let wg_key = crate::wireguard::keys::load_or_create(&wg_key_path).map_err(|e| format!("{e:#}"));
    let me = Node {
        name: node.clone(),
        address,
        gwbridge_subnet: args.gwbridge_subnet,
        started_at: model::now_secs(),
        lb_addresses: datapath.needs_lb_addresses(),
        public_key: wg_key.as_ref().ok().map(|k| k.public_text()),
        // A rotation a restart cut short is dropped: the other nodes go back to the
        // key the node has (their sessions to it never ended).
        next_public_key: None,
        wireguard_port: wg_key.is_ok().then_some(args.wireguard_port),
    };
    let lease_ttl = Duration::from_secs(args.lease_ttl.max(2));
    join_cluster(&view, me, &pools, lease_ttl, STORE_WAIT).await?;
    // The first DNS and load-balancer tables hold this node's own tasks even when the
    // store does not hold it alive yet (a restart after its lease ran out): the view
    // counts its own node alive (view::own).

    // CNI DELs that came while this daemon was away go first: their namespaces are gone,
    // and the initial reconcile should not try to rebuild them.
    if let Some(queue) = crate::frontends::cni_queue::queue_dir(api_spec) {
        drain_cni_queue(&view, &node, &queue).await;
        tokio::spawn({
            let (view, node) = (view.clone(), node.clone());
            async move {
                loop {
                    tokio::time::sleep(CNI_QUEUE_INTERVAL).await;
                    drain_cni_queue(&view, &node, &queue).await;
                }
            }
        });
    }

    // From here on, what changes in the cluster is kept for `netd events`.
    let events = crate::events::Events::follow(view.clone());
    let mut dns = Dns::new(dns_config(&args)?);
    // `ndwg`'s descriptor, kept like the DNS sockets (see `Sealer::start`).
    let wg_handover = fd_store.as_ref().ok().map(|store| {
        let held = crate::fdstore::take(&mut held, crate::wireguard::device::HELD_KIND);
        crate::fdstore::Handover::new(store.clone(), crate::wireguard::device::HELD_KIND, held)
    });
    match fd_store {
        Ok(store) => dns.hand_over(store, held),
        Err(why) => dns.no_hand_over(why),
    }
    dns.sync_table(&view.state());
    let dns = Arc::new(dns);
    let (followed_tx, followed) = tokio::sync::watch::channel(0);
    tokio::spawn(follow::follow(
        view.clone(),
        dns.clone(),
        datapath.clone(),
        followed_tx,
    ));
    let encryption = start_wireguard(wg_key, wg_key_path, address, &args, wg_handover).await;
    match &encryption {
        Ok(_) => tracing::info!(
            "WireGuard for encrypted overlays on port {}",
            args.wireguard_port
        ),
        Err(why) => tracing::warn!("no encrypted overlays on this node: {why}"),
    }
    if encryption.is_err() && view.state().ingress().is_some_and(|n| n.encrypted) {
        tracing::error!(
            "the ingress network is encrypted and this node has no WireGuard: its ingress \
             sandbox is refused, and its published ports reach no task on another node"
        );
    }
    if let Ok(sealer) = &encryption {
        tokio::spawn(follow_peers(view.clone(), sealer.clone()));
    }
    let reconciler = Arc::new(Reconciler::new(
        view.clone(),
        NodeConfig {
            name: node.clone(),
            gwbridge_subnet: args.gwbridge_subnet,
            vxlan_port: args.vxlan_port,
            overlay_mtu,
            bridge_mtu: args.underlay_mtu,
            tasks_reach_node: args.allow_tasks_to_node,
            protected: protected_endpoints(etcd.as_ref()),
            mesh_source: args.mesh_source,
            wireguard: match (&encryption, address) {
                (Ok(_), Some(address)) => Ok(crate::plan::Wireguard {
                    port: args.wireguard_port,
                    address,
                    overlay_mtu: crate::wireguard::overlay_mtu(args.underlay_mtu),
                }),
                (Err(why), _) => Err(why.clone()),
                (Ok(_), None) => Err("the node has no underlay address".into()),
            },
            lease_ttl,
        },
        Some(dns.clone()),
        Some(datapath.clone()),
        Some(Arc::new(crate::datapath::xdp::XdpMesh::new(
            &node, args.xdp,
        ))),
    ));
    tokio::spawn(follow::report_applied(
        store.clone(),
        node.clone(),
        followed.clone(),
        reconciler.applied(),
    ));
    // What the netd before left open is served once the tables hold the state (a
    // userspace load balancer without them would refuse every new flow).
    if !follow::await_local(&followed, view.state().revision).await {
        tracing::warn!("the DNS and load-balancer tables are late; resuming anyway");
    }
    reconciler.resume().await;
    let report = reconciler.run_once().await.context("initial reconcile")?;
    tracing::info!(
        node,
        errors = report.errors.len() + report.task_errors.len(),
        "initial reconcile done"
    );
    tokio::spawn(
        reconciler
            .clone()
            .run_forever(Duration::from_secs(args.resync.max(1))),
    );

    let daemon_store = store.clone();
    let daemon = Arc::new(Daemon {
        dns,
        store,
        view,
        followed,
        node: node.clone(),
        pools,
        reconciler,
        datapath,
        api: api_spec.to_string(),
        events,
        encryption,
    });
    if let Some(addr) = args.http {
        crate::web::serve(addr, daemon.clone()).await?;
    }
    let app = api::router(daemon.clone());
    if let Some(path) = &args.docker_plugin {
        let plugin = crate::frontends::docker::Plugin::new(app.clone(), daemon.reconciler.clone());
        let listener = bind_unix(path)?;
        tracing::info!(socket = %path.display(), "serving Docker's network and IPAM plugin `netd`");
        let router = crate::frontends::docker::router(plugin);
        tokio::spawn(async move {
            let make =
                router.into_make_service_with_connect_info::<crate::frontends::docker::Peer>();
            if let Err(e) = axum::serve(listener, make).await {
                tracing::error!("Docker plugin socket: {e}");
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down; kernel state stays in place");
    };
    tracing::info!(node, api = api_spec, "netd is serving");
    let serve_result = api.serve(app, shutdown).await;
    // Tell the cluster at once rather than after the lease TTL.
    if let Err(e) = daemon_store.withdraw_ephemeral().await {
        tracing::warn!("withdraw liveness: {e}");
    }
    serve_result
}

/// This node's fd store (started if none runs) and what it holds; or why there is none.
fn open_fd_store(
    node: &str,
) -> (
    std::result::Result<Arc<crate::fdstore::FdStore>, String>,
    crate::fdstore::Held,
) {
    let path = Path::new(crate::datapath::userspace::RUN_ROOT)
        .join(node)
        .join("fd-store.sock");
    let opened = std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))
        .context("state directory")
        .and_then(|()| std::env::current_exe().context("netd's own executable"))
        .and_then(|exe| crate::fdstore::FdStore::open(&path, &exe));
    match opened {
        Ok((store, held)) => {
            tracing::info!(
                store = store.describe(),
                entries = held.len(),
                "descriptors kept across restarts"
            );
            (Ok(Arc::new(store)), held)
        }
        Err(e) => {
            tracing::warn!("no fd store, a restart closes the DNS ports for a moment: {e:#}");
            (Err(format!("{e:#}")), vec![])
        }
    }
}

/// How often the daemon looks for CNI DELs queued while it could not be reached (a
/// plugin that found it down a moment before it came up).
const CNI_QUEUE_INTERVAL: Duration = Duration::from_secs(2);

async fn drain_cni_queue(view: &View, node: &str, queue: &Path) {
    match crate::frontends::cni_queue::drain(view, node, queue).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(tasks = n, "detached the tasks of queued CNI DELs"),
        Err(e) => tracing::warn!("queued CNI DELs: {e:#}"),
    }
}

/// A unix socket only root can use (0600), replacing a file left by a dead predecessor (a
/// live one would hold the local store's lock, or the node name in the cluster).
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("bind socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Where the API is served. Checked before anything else happens, so that a wrong
/// `--api` (or a TCP API without TLS) stops the daemon before it touches the store or the
/// kernel; bound only at the end, once the daemon can answer (and, for a unix socket,
/// once the store's lock proved no other daemon owns it).
enum ApiSpec {
    Unix(std::path::PathBuf),
    Tls(String, Arc<rustls::ServerConfig>),
}

impl ApiSpec {
    fn parse(api_spec: &str, tls: &TlsFiles) -> Result<Self> {
        if let Some(path) = api_spec.strip_prefix("unix:") {
            if !tls.is_empty() {
                tracing::warn!("--tls-* apply to a tcp: API only; unix:{path} is 0600 root");
            }
            Ok(ApiSpec::Unix(path.into()))
        } else if let Some(addr) = api_spec.strip_prefix("tcp:") {
            let config = tls
                .server_config()
                .context("refusing to serve the API on TCP without mutual TLS")?;
            Ok(ApiSpec::Tls(addr.to_string(), config))
        } else {
            bail!("--api must be unix:PATH or tcp:ADDR, got {api_spec:?}");
        }
    }

    async fn serve(
        self,
        app: axum::Router,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        match self {
            ApiSpec::Unix(path) => {
                let listener = bind_unix(&path)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .context("serve API")?;
                let _ = std::fs::remove_file(path);
            }
            ApiSpec::Tls(addr, config) => {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("bind API address {addr}"))?;
                let listener = crate::tls::TlsListener::new(listener, config)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .context("serve API")?;
            }
        }
        Ok(())
    }
}

/// This node's WireGuard for encrypted overlays, or why it has none.
async fn start_wireguard(
    key: Result<crate::wireguard::keys::NodeKey, String>,
    key_path: std::path::PathBuf,
    address: Option<Ipv4Addr>,
    args: &DaemonArgs,
    handover: Option<crate::fdstore::Handover>,
) -> Result<Arc<crate::wireguard::device::Sealer>, String> {
    // Without WireGuard, nothing takes what the netd before left.
    let give_up = |why: String| {
        if let Some(h) = &handover {
            h.release_unclaimed();
        }
        why
    };
    let key = key.map_err(give_up)?;
    let Some(me) = address else {
        return Err(give_up(
            "the node has no underlay address (a store of one node): there is no other \
             node to encrypt for"
                .into(),
        ));
    };
    crate::wireguard::fits_underlay(args.underlay_mtu).map_err(give_up)?;
    let why = crate::wireguard::why_userspace().await;
    crate::wireguard::device::Sealer::start(
        key,
        key_path,
        me,
        args.wireguard_port,
        crate::wireguard::tunnel_mtu(args.underlay_mtu),
        why,
        handover.as_ref(),
    )
    .await
    .map_err(|e| format!("{e:#}"))
}

/// Keeps the WireGuard peers to the cluster's nodes (each with its address and public
/// key), from the node's view.
async fn follow_peers(view: Arc<crate::view::View>, sealer: Arc<crate::wireguard::device::Sealer>) {
    let mut updates = view.subscribe();
    let mut last: Vec<crate::wireguard::device::PeerNode> = vec![];
    loop {
        let st = view.state();
        let peers: Vec<_> = st
            .nodes
            .values()
            .filter_map(|n| {
                Some(crate::wireguard::device::PeerNode {
                    name: n.name.clone(),
                    address: n.address?,
                    port: n.wireguard_port,
                    public_key: n.public_key.clone()?,
                    next_public_key: n.next_public_key.clone(),
                })
            })
            .collect();
        if peers != last {
            sealer.set_peers(&peers).await;
            last = peers;
        }
        // Only a change of a node record can change the peers: other revisions (every
        // attach, every status report) pass by without a look at the nodes.
        loop {
            match updates.recv().await {
                Ok(u)
                    if u.changed
                        .as_ref()
                        .is_some_and(|keys| !keys.iter().any(|k| k.contains("/nodes/"))) =>
                {
                    continue
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use clap::Parser;

    use crate::state::fixture;
    use crate::store::local::LocalStore;
    use crate::store::testing::CountingStore;
    use crate::view::View;

    fn node(name: &str) -> crate::model::Node {
        crate::model::Node {
            name: name.into(),
            address: Some("198.18.0.11".parse().unwrap()),
            gwbridge_subnet: "198.18.1.0/24".parse().unwrap(),
            started_at: 0,
            lb_addresses: false,
            public_key: None,
            next_public_key: None,
            wireguard_port: None,
        }
    }

    /// A store blip while a node starts (etcd electing a leader, restarting) delays the
    /// start; it does not end it. Before, the first failed write exited the daemon.
    #[tokio::test]
    async fn joining_the_cluster_rides_out_a_store_blip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(CountingStore::new(Arc::new(
            LocalStore::open(dir.path()).unwrap(),
        )));
        let view = View::open(store.clone()).await.unwrap();
        let lease = Duration::from_secs(10);
        // Two failures: the cluster's identity, then its retry; all else goes through.
        store.fail_next(2);
        super::join_cluster(
            &view,
            node("n1"),
            &fixture::pools(),
            lease,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let rev = view
            .store()
            .list(crate::store::ROOT)
            .await
            .unwrap()
            .revision;
        let st = view.at_least(rev).await.unwrap();
        assert!(st.nodes.contains_key("n1"));
        assert!(st.ingress().is_some(), "the ingress network was made");
        assert!(st.node_alive("n1"));
        // A store that stays away past the wait: the start fails, saying what.
        store.fail_next(usize::MAX);
        let e = super::join_cluster(&view, node("n2"), &fixture::pools(), lease, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("register node"), "{e:#}");
        assert!(format!("{e:#}").contains("unavailable"), "{e:#}");
        store.fail_next(0);
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        daemon: super::DaemonArgs,
    }

    #[test]
    fn an_underlay_mtu_that_leaves_no_room_for_an_overlay_is_refused() {
        for bad in ["90", "117", "65536", "0"] {
            let Err(e) = Cli::try_parse_from(["netd", "--underlay-mtu", bad]) else {
                panic!("--underlay-mtu {bad} was taken");
            };
            assert!(e.to_string().contains("118..=65535"), "{bad}: {e}");
        }
        let cli = Cli::try_parse_from(["netd", "--underlay-mtu", "118"]).expect("118");
        assert_eq!(cli.daemon.underlay_mtu, 118);
        let cli = Cli::try_parse_from(["netd"]).expect("defaults");
        assert_eq!(cli.daemon.underlay_mtu, 1500);
    }
}
