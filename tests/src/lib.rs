//! The lab: a virtual netd cluster on one Linux machine. Each node is a network namespace
//! plugged into a shared underlay bridge (itself in a lab namespace, so nothing touches
//! the machine's root namespace), running its own `netd daemon`. Tasks are namespaces
//! running real servers. Everything the lab makes carries its unique prefix and is
//! removed by [`Lab::teardown`], which also runs on drop (so after a failed test too).
//!
//! A lab made by [`Lab::cluster`] shares its state through a real etcd running in its own
//! namespace on the underlay (.2); one made by [`Lab::start`] gives each node a local store.
//!
//! Addresses (all in 198.18.0.0/15): underlay 198.18.0.0/24 (etcd .2, nodes .11 up,
//! external hosts .100 up), each node's gwbridge 198.18.1.0/24, network subnets from
//! 198.19.0.0/16.

pub mod load;
pub mod pki;
pub mod runtimes;
pub mod whoami;

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub const UNDERLAY_PREFIX: u8 = 24;
pub const GWBRIDGE_SUBNET: &str = "198.18.1.0/24";
pub const ADDRESS_POOL: &str = "198.19.0.0/16";
/// The routing mesh's network in every lab.
pub const INGRESS_SUBNET: &str = "198.19.255.0/24";
/// Underlay host number of the lab's etcd.
pub const ETCD_HOST: u8 = 2;
/// Lease TTL the lab's daemons use: a dead node is marked down this long after it died.
pub const LEASE_TTL_SECS: u64 = 5;
/// Underlay host number of the lab's upstream resolver (unbound), when a test starts one.
pub const UPSTREAM_DNS_HOST: u8 = 3;
/// The search domain every task's resolv.conf carries (and the daemons know).
pub const SEARCH_DOMAIN: &str = "lab.example";
/// What the lab's upstream resolver answers: `NAME.example.org` records.
pub const UPSTREAM_ZONE: &str = "example.org";
/// Every lab prefix starts with this, so `netd-lab cleanup` can find leftovers.
pub const LAB_MARK: &str = "nlab";

/// The MAC netd gives a task interface: 02:42 followed by its IPv4 address (Docker's).
pub fn task_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

pub fn underlay_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, host)
}

/// Runs a command, failing with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}{}",
            cmd,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

/// What `ip -j link show DEV` says of link `dev` in `netns` (its MTU, its MAC, …).
pub fn link_json(netns: &str, dev: &str) -> Result<serde_json::Value> {
    let out = run(Command::new("ip").args(["-n", netns, "-j", "link", "show", dev]))?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -j link show {dev} in {netns}"))?;
    Ok(links[0].clone())
}

/// `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Makes `dev` in `netns` finish every checksum itself, as frames on a wire carry them.
fn ethtool_tx_off(netns: &str, dev: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "exec", netns, "ethtool", "-K", dev, "tx", "off"]))
        .with_context(|| format!("ethtool -K {dev} tx off in {netns} (Debian package ethtool)"))
        .map(|_| ())
}

/// Where the workspace's binaries are: next to the running test binary's parent dir, or
/// named by NETD_BIN / NETD_LAB_BIN.
pub fn binary(name: &str) -> Result<PathBuf> {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current exe")?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("cannot find the {name} binary: run `cargo build --workspace --bins` or set {var}")
}

/// Where Debian's containernetworking-plugins are (bridge, firewall, tuning, ...).
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The `CNI_*` variables of one plugin run.
#[derive(Debug, Clone, Copy, Default)]
pub struct CniEnv<'a> {
    pub command: &'a str,
    pub container: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
}

pub struct NodeHandle {
    pub name: String,
    /// The node's network namespace name (under /run/netns).
    pub netns: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub daemon: Option<Child>,
    /// Serve the API on TCP with mutual TLS instead of the unix socket (from the next
    /// start of the daemon); the CLI then runs in the node's namespace with `client`.
    pub tls_api: Option<TlsApi>,
}

/// A node's API on `tcp:NODE_IP:port`, with the files of both sides.
#[derive(Debug, Clone)]
pub struct TlsApi {
    pub port: u16,
    pub daemon: pki::Identity,
    pub client: pki::Identity,
}

impl NodeHandle {
    pub fn api(&self) -> String {
        match &self.tls_api {
            Some(t) => format!("tcp:{}:{}", self.ip, t.port),
            None => format!("unix:{}", self.dir.join("netd.sock").display()),
        }
    }

    /// The `netd` CLI aimed at this node's API.
    fn cli_command(&self, netd: &Path) -> Command {
        let mut cmd = match &self.tls_api {
            Some(t) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.netns])
                    .arg(netd)
                    .env("NETD_TLS_CA", &t.client.ca)
                    .env("NETD_TLS_CERT", &t.client.cert)
                    .env("NETD_TLS_KEY", &t.client.key);
                cmd
            }
            None => Command::new(netd),
        };
        cmd.env("NETD_API", self.api());
        cmd
    }
}

/// An etcd that wants a client certificate and a password (`Lab::secure_cluster`).
struct SecureStore {
    server: pki::Identity,
    client: pki::Identity,
    /// The password of etcd user `netd`.
    password: String,
    /// Authentication was enabled (it stays enabled in etcd's data across restarts).
    auth_enabled: bool,
}

/// A client's site behind a NAT router (see [`Lab::add_site`]).
pub struct Site {
    /// The router's namespace.
    pub router: String,
    /// The site's network is 198.18.`net`.0/24.
    pub net: u8,
    mtu: String,
    hosts: u8,
}

/// How a lab differs from the plain one.
struct Flavor {
    docker_plugin: bool,
    secure_store: bool,
    underlay_mtu: u32,
    daemon_args: Vec<String>,
}

impl Default for Flavor {
    fn default() -> Self {
        Flavor {
            docker_plugin: false,
            secure_store: false,
            underlay_mtu: 1500,
            daemon_args: vec![],
        }
    }
}

pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub hub: String,
    pub nodes: Vec<NodeHandle>,
    /// Namespaces the lab made besides nodes and hub (tasks, external hosts).
    netns: Vec<String>,
    children: Vec<Child>,
    netd: PathBuf,
    lab_bin: PathBuf,
    /// The etcd of a cluster lab: its namespace and, while it runs, its process.
    etcd: Option<(String, Option<Child>)>,
    /// The etcd wants TLS and a password.
    secure_store: Option<SecureStore>,
    /// More arguments for every daemon started from now on.
    pub daemon_args: Vec<String>,
    pki: Option<pki::Pki>,
    /// `--datapath` of every daemon.
    pub datapath: String,
    /// `--xdp` of every daemon.
    pub xdp: String,
    /// Daemons serve Docker's plugin protocols on `NODE_DIR/run/docker/plugins/netd.sock`
    /// (see [`runtimes::Dockerd`]).
    pub docker_plugin: bool,
    /// Start daemons with the bpf(2) system call refused (seccomp), as a kernel without
    /// eBPF support would refuse it.
    pub deny_bpf: bool,
    /// The underlay behaves like a wire, for native XDP (a lab built with `--xdp
    /// native`): every frame carries its full checksums (a veth otherwise hands them on
    /// unfinished, which a frame sent back by XDP loses), and the hub side of a node
    /// whose daemon runs `--xdp native` runs [`netd_ebpf::WIRE_PEER`].
    wire: bool,
    /// What every underlay link carries (the daemons get it as `--underlay-mtu`).
    underlay_mtu: u32,
    torn_down: bool,
}

impl Lab {
    /// A lab with `nodes` nodes, each running netd. `tag` (a few letters) makes the names
    /// of parallel labs distinct and recognisable.
    pub fn start(tag: &str, nodes: usize) -> Result<Lab> {
        Self::build(tag, nodes, false, "auto")
    }

    /// A lab whose nodes form one cluster through a real etcd on the underlay.
    pub fn cluster(tag: &str, nodes: usize) -> Result<Lab> {
        Self::build(tag, nodes, true, "auto")
    }

    /// A cluster on etcd whose daemons also get `args` (`--http ADDR`, say).
    pub fn cluster_with(tag: &str, nodes: usize, args: &[&str]) -> Result<Lab> {
        let flavor = Flavor {
            daemon_args: args.iter().map(|a| a.to_string()).collect(),
            ..Flavor::default()
        };
        Self::build_full(tag, nodes, true, "auto", "auto", flavor)
    }

    /// A cluster on etcd whose daemons run `--xdp xdp` and also get `args`.
    pub fn cluster_xdp_with(tag: &str, nodes: usize, xdp: &str, args: &[&str]) -> Result<Lab> {
        let flavor = Flavor {
            daemon_args: args.iter().map(|a| a.to_string()).collect(),
            ..Flavor::default()
        };
        Self::build_full(tag, nodes, true, "auto", xdp, flavor)
    }

    /// A lab whose daemons run `--datapath datapath`; a cluster on etcd when `etcd`.
    pub fn build(tag: &str, nodes: usize, etcd: bool, datapath: &str) -> Result<Lab> {
        Self::build_with(tag, nodes, etcd, datapath, "auto")
    }

    /// As [`Lab::build`], with the daemons' `--xdp` too.
    pub fn build_with(
        tag: &str,
        nodes: usize,
        etcd: bool,
        datapath: &str,
        xdp: &str,
    ) -> Result<Lab> {
        Self::build_full(tag, nodes, etcd, datapath, xdp, Flavor::default())
    }

    /// A cluster on etcd whose underlay carries `underlay_mtu` bytes (every link of it,
    /// and the daemons' `--underlay-mtu`), with the daemons' `--xdp`.
    pub fn build_mtu(tag: &str, nodes: usize, xdp: &str, underlay_mtu: u32) -> Result<Lab> {
        let flavor = Flavor {
            underlay_mtu,
            ..Flavor::default()
        };
        Self::build_full(tag, nodes, true, "auto", xdp, flavor)
    }

    /// A cluster whose etcd serves only TLS with client certificates and has
    /// authentication on: the daemons connect as user `netd` (password from
    /// `NETD_STORE_PASSWORD`) with a certificate of the lab's CA.
    pub fn secure_cluster(tag: &str, nodes: usize) -> Result<Lab> {
        let flavor = Flavor {
            secure_store: true,
            ..Flavor::default()
        };
        Self::build_full(tag, nodes, true, "auto", "auto", flavor)
    }

    /// The lab's certificate authority (made on first use; its files in the lab's
    /// directory).
    pub fn pki(&mut self) -> Result<&pki::Pki> {
        if self.pki.is_none() {
            self.pki = Some(pki::Pki::new(&self.dir.join("pki"), "lab")?);
        }
        self.pki.as_ref().context("the lab's CA")
    }

    /// A cluster on etcd whose daemons serve Docker's plugin protocols (see
    /// [`runtimes::Dockerd`]).
    pub fn docker_cluster(tag: &str, nodes: usize) -> Result<Lab> {
        let flavor = Flavor {
            docker_plugin: true,
            ..Flavor::default()
        };
        Self::build_full(tag, nodes, true, "auto", "auto", flavor)
    }

    fn build_full(
        tag: &str,
        nodes: usize,
        etcd: bool,
        datapath: &str,
        xdp: &str,
        flavor: Flavor,
    ) -> Result<Lab> {
        let Flavor {
            docker_plugin,
            secure_store,
            underlay_mtu,
            daemon_args,
        } = flavor;
        let rnd: u32 = rand::random::<u32>() % 0xfffff;
        let prefix = format!("{LAB_MARK}{tag}{rnd:05x}");
        let dir = std::env::temp_dir().join(format!("netd-lab-{prefix}"));
        fs::create_dir_all(&dir).context("create lab dir")?;
        let mut lab = Lab {
            hub: format!("{prefix}-hub"),
            prefix,
            dir,
            nodes: vec![],
            netns: vec![],
            children: vec![],
            netd: binary("netd")?,
            lab_bin: binary("netd-lab")?,
            etcd: None,
            secure_store: None,
            daemon_args,
            pki: None,
            datapath: datapath.to_string(),
            xdp: xdp.to_string(),
            deny_bpf: false,
            docker_plugin,
            wire: xdp == "native",
            underlay_mtu,
            torn_down: false,
        };
        if lab.wire {
            fs::write(lab.wire_peer_object(), netd_ebpf::WIRE_PEER)
                .context("write the wire's XDP object")?;
        }
        // If anything below fails, Drop tears down what was made.
        ip(&["netns", "add", &lab.hub])?;
        ip(&["-n", &lab.hub, "link", "add", "ul", "type", "bridge"])?;
        ip(&["-n", &lab.hub, "link", "set", "ul", "up"])?;
        // The hub is the underlay's switch: frames it bridges skip netfilter, as on a
        // physical one (br_netfilter, where loaded, hooks every namespace's bridges).
        run(Command::new("ip")
            .args(["netns", "exec", &lab.hub, "sh", "-c"])
            .arg(
                "for t in iptables ip6tables arptables; do \
             f=/proc/sys/net/bridge/bridge-nf-call-$t; [ ! -e $f ] || echo 0 > $f; done",
            ))
        .context("keep the hub's bridge out of netfilter")?;
        if etcd {
            let name = format!("{}-etcd", lab.prefix);
            lab.plug_underlay(&name, ETCD_HOST)?;
            lab.etcd = Some((name, None));
            if secure_store {
                let pki = lab.pki()?;
                lab.secure_store = Some(SecureStore {
                    server: pki.issue("etcd", &[underlay_ip(ETCD_HOST)])?,
                    client: pki.issue("netd-store", &[])?,
                    password: format!("pw-{:08x}", rand::random::<u32>()),
                    auth_enabled: false,
                });
            }
            lab.start_etcd()?;
        }
        for i in 0..nodes {
            lab.add_node(i)?;
        }
        for i in 0..nodes {
            lab.start_daemon(i)?;
        }
        Ok(lab)
    }

    /// `etcd://…` of the lab's etcd (`etcd+https://netd@…` for a secure one); None for
    /// a lab of local stores.
    pub fn etcd_spec(&self) -> Option<String> {
        let ip = underlay_ip(ETCD_HOST);
        self.etcd.as_ref().map(|_| match &self.secure_store {
            Some(_) => format!("etcd+https://netd@{ip}:2379"),
            None => format!("etcd://{ip}:2379"),
        })
    }

    /// Starts (or restarts, on the same data) the lab's etcd and waits until it answers.
    pub fn start_etcd(&mut self) -> Result<()> {
        let (netns, _) = self.etcd.as_ref().context("this lab has no etcd")?;
        let netns = netns.clone();
        let ip = underlay_ip(ETCD_HOST);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let scheme = if self.secure_store.is_some() {
            "https"
        } else {
            "http"
        };
        let client_url = format!("{scheme}://{ip}:2379");
        let url = |port: u16| format!("http://{ip}:{port}");
        let mut cmd = Command::new("etcd");
        cmd.args([
            "--name",
            "lab",
            "--data-dir",
            &self.dir.join("etcd").display().to_string(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &url(2380),
            "--initial-advertise-peer-urls",
            &url(2380),
            "--initial-cluster",
            &format!("lab={}", url(2380)),
        ])
        .stdout(log.try_clone()?)
        .stderr(log);
        if let Some(s) = &self.secure_store {
            cmd.arg("--cert-file")
                .arg(&s.server.cert)
                .arg("--key-file")
                .arg(&s.server.key)
                .arg("--trusted-ca-file")
                .arg(&s.server.ca)
                .arg("--client-cert-auth");
        }
        let child =
            spawn_in_netns(&mut cmd, &netns).context("start etcd (Debian package etcd-server)")?;
        if let Some(e) = self.etcd.as_mut() {
            e.1 = Some(child);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = in_netns(&netns, move || {
                Ok(TcpStream::connect_timeout(
                    &SocketAddr::from((ip, 2379)),
                    Duration::from_millis(200),
                )
                .is_ok())
            })?;
            if up {
                return self.enable_store_auth();
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not come up: {}",
                    fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Turns on a secure etcd's authentication, once: user `root` (required by etcd), and
    /// user `netd` whose role may read and write `/netd/` only.
    fn enable_store_auth(&mut self) -> Result<()> {
        let Some(s) = self.secure_store.as_ref().filter(|s| !s.auth_enabled) else {
            return Ok(());
        };
        let b64 = |k: &str| base64_encode(k.as_bytes());
        let steps = [
            (
                "user/add",
                serde_json::json!({"name": "root", "password": s.password}),
            ),
            (
                "user/grant",
                serde_json::json!({"user": "root", "role": "root"}),
            ),
            ("role/add", serde_json::json!({"name": "netd"})),
            (
                "role/grant",
                serde_json::json!({"name": "netd", "perm": {
                    "permType": "READWRITE", "key": b64("/netd/"), "range_end": b64("/netd0")}}),
            ),
            (
                "user/add",
                serde_json::json!({"name": "netd", "password": s.password}),
            ),
            (
                "user/grant",
                serde_json::json!({"user": "netd", "role": "netd"}),
            ),
            ("enable", serde_json::json!({})),
        ];
        for (path, body) in steps {
            let out = self.etcd_gateway(&s.client, &format!("auth/{path}"), &body, None)?;
            if out.contains("\"error\"") {
                bail!("etcd auth/{path}: {out}");
            }
        }
        if let Some(s) = self.secure_store.as_mut() {
            s.auth_enabled = true;
        }
        Ok(())
    }

    /// A request to a secure etcd's JSON gateway with curl (a real client), from the
    /// etcd's own namespace, with the certificate `id` and, if given, an auth token.
    pub fn etcd_gateway(
        &self,
        id: &pki::Identity,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<String> {
        let (netns, _) = self.etcd.as_ref().context("this lab has no etcd")?;
        let url = format!("https://{}:2379/v3/{path}", underlay_ip(ETCD_HOST));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, "curl", "-sS", "--max-time", "5"])
            .arg("--cacert")
            .arg(&id.ca)
            .arg("--cert")
            .arg(&id.cert)
            .arg("--key")
            .arg(&id.key)
            .args(["-X", "POST", "-d", &body.to_string(), &url]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: {t}")]);
        }
        let out = cmd.output().context("run curl")?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// The process id of the lab's etcd while it runs (for memory figures).
    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd
            .as_ref()
            .and_then(|(_, child)| child.as_ref())
            .map(Child::id)
    }

    /// The process id of node `i`'s daemon while it runs (for memory figures).
    pub fn daemon_pid(&self, i: usize) -> Option<u32> {
        self.nodes.get(i)?.daemon.as_ref().map(Child::id)
    }

    /// Stops the lab's etcd (SIGTERM, or SIGKILL when `kill`); its data stays.
    pub fn stop_etcd(&mut self, kill: bool) -> Result<()> {
        if let Some(child) = self.etcd.as_mut().and_then(|e| e.1.take()) {
            stop_child(child, kill)?;
        }
        Ok(())
    }

    /// Takes node `i` off the underlay (its port on the hub goes down), as a machine that
    /// died or a pulled cable: nothing reaches it, nothing leaves it.
    pub fn cut_underlay(&self, i: usize) -> Result<()> {
        let host = self.nodes[i].ip.octets()[3];
        ip(&["-n", &self.hub, "link", "set", &format!("u{host}"), "down"])
    }

    /// Plugs a new namespace `name` into the underlay with address .`host`.
    fn plug_underlay(&self, name: &str, host: u8) -> Result<()> {
        let hub_side = format!("u{host}");
        ip(&["netns", "add", name])?;
        ip(&[
            "-n", &self.hub, "link", "add", &hub_side, "type", "veth", "peer", "name", "eth0",
            "netns", name,
        ])?;
        let mtu = self.underlay_mtu.to_string();
        ip(&["-n", &self.hub, "link", "set", &hub_side, "mtu", &mtu])?;
        ip(&["-n", name, "link", "set", "eth0", "mtu", &mtu])?;
        ip(&[
            "-n", &self.hub, "link", "set", &hub_side, "master", "ul", "up",
        ])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        if self.wire {
            ethtool_tx_off(name, "eth0")?;
            ethtool_tx_off(&self.hub, &hub_side)?;
        }
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{}/{UNDERLAY_PREFIX}", underlay_ip(host)),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", name, "link", "set", "eth0", "up"])
    }

    fn add_node(&mut self, i: usize) -> Result<()> {
        let name = format!("{}n{}", self.prefix, i + 1);
        let host = 11 + i as u8;
        let dir = self.dir.join(&name);
        fs::create_dir_all(&dir)?;
        self.nodes.push(NodeHandle {
            netns: name.clone(),
            name: name.clone(),
            ip: underlay_ip(host),
            dir,
            daemon: None,
            tls_api: None,
        });
        self.plug_underlay(&name, host)
    }

    /// A host on the underlay that is not a node (a client, or an egress target).
    pub fn add_host(&mut self, tag: &str, host: u8) -> Result<String> {
        let name = format!("{}-{tag}", self.prefix);
        self.netns.push(name.clone());
        self.plug_underlay(&name, host)?;
        Ok(name)
    }

    /// A client's site: a router on the underlay at .`host` that masquerades a network
    /// of its own behind it (198.18.`net`.0/24, the router at .1), as a home or office
    /// NAT does (Linux's: it keeps a client's port where the connection it makes is
    /// unique, so two clients with one port towards two nodes leave with the same
    /// port). Its inside leg carries at most `mtu` bytes, less than the underlay and the
    /// overlay: a task's full-size segments to a client there need path MTU discovery
    /// (the router answers them with ICMP "fragmentation needed").
    pub fn add_site(&mut self, tag: &str, host: u8, net: u8, mtu: u32) -> Result<Site> {
        let router = format!("{}-{tag}", self.prefix);
        self.netns.push(router.clone());
        self.plug_underlay(&router, host)?;
        let mtu = mtu.to_string();
        ip(&["-n", &router, "link", "add", "lan", "type", "bridge"])?;
        ip(&["-n", &router, "link", "set", "lan", "mtu", &mtu, "up"])?;
        ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("198.18.{net}.1/24"),
            "dev",
            "lan",
        ])?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]))?;
        let rules = self.dir.join(format!("{tag}.nft"));
        fs::write(
            &rules,
            format!(
                "table ip {LAB_MARK}site {{\n  chain post {{\n    type nat hook postrouting \
                 priority srcnat;\n    oifname \"eth0\" ip saddr 198.18.{net}.0/24 masquerade\n  \
                 }}\n}}\n"
            ),
        )?;
        run(Command::new("ip")
            .args(["netns", "exec", &router, "nft", "-f"])
            .arg(&rules))
        .context("the site's NAT (Debian package nftables)")?;
        Ok(Site {
            router,
            net,
            mtu,
            hosts: 0,
        })
    }

    /// A host on `site`'s network (the next free address from .2), its default route
    /// through the router; its own link takes full-size frames (only the router's
    /// inside leg is narrow). Returns its namespace and address.
    pub fn add_site_host(&mut self, site: &mut Site, tag: &str) -> Result<(String, Ipv4Addr)> {
        site.hosts += 1;
        let addr = Ipv4Addr::new(198, 18, site.net, 1 + site.hosts);
        let name = format!("{}-{tag}", self.prefix);
        self.netns.push(name.clone());
        ip(&["netns", "add", &name])?;
        let port = format!("h{}", site.hosts);
        ip(&[
            "-n",
            &site.router,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &name,
        ])?;
        ip(&["-n", &site.router, "link", "set", &port, "mtu", &site.mtu])?;
        ip(&[
            "-n",
            &site.router,
            "link",
            "set",
            &port,
            "master",
            "lan",
            "up",
        ])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{}.1", site.net),
        ])?;
        Ok((name, addr))
    }

    /// An empty namespace to attach as a task; returns (name, path). Its resolv.conf
    /// (`/etc/netns/NAME/resolv.conf`, which `ip netns exec` mounts over /etc/resolv.conf)
    /// points at netd's embedded DNS, as Docker writes a container's.
    pub fn add_task_netns(&mut self, tag: &str) -> Result<(String, String)> {
        let name = format!("{}-{tag}", self.prefix);
        self.netns.push(name.clone());
        ip(&["netns", "add", &name])?;
        let etc = Path::new("/etc/netns").join(&name);
        fs::create_dir_all(&etc).context("create /etc/netns dir")?;
        fs::write(
            etc.join("resolv.conf"),
            format!("nameserver 127.0.0.11\nsearch {SEARCH_DOMAIN}\n"),
        )
        .context("write task resolv.conf")?;
        Ok((name.clone(), format!("/run/netns/{name}")))
    }

    /// Starts an upstream resolver (unbound) on the underlay at .3, answering
    /// `outside.example.org` (198.18.0.100) and `many.example.org` (100 addresses: an
    /// answer too big for one UDP datagram).
    pub fn start_upstream_dns(&mut self) -> Result<String> {
        let name = self.add_host("updns", UPSTREAM_DNS_HOST)?;
        let dir = self.dir.join("unbound");
        fs::create_dir_all(&dir)?;
        let mut conf = format!(
            "server:\n  interface: {ip}\n  port: 53\n  access-control: 198.18.0.0/15 allow\n  \
             do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{dir}\"\n  \
             pidfile: \"\"\n  use-syslog: no\n  logfile: \"{dir}/queries.log\"\n  \
             log-queries: yes\n  num-threads: 1\n  \
             local-zone: \"{UPSTREAM_ZONE}.\" static\n  \
             local-data: \"outside.{UPSTREAM_ZONE}. 60 IN A 198.18.0.100\"\n",
            ip = underlay_ip(UPSTREAM_DNS_HOST),
            dir = dir.display()
        );
        for i in 0..100 {
            conf.push_str(&format!(
                "  local-data: \"many.{UPSTREAM_ZONE}. 60 IN A 198.18.2.{}\"\n",
                i + 1
            ));
        }
        let path = dir.join("unbound.conf");
        fs::write(&path, conf)?;
        self.spawn_in(
            &name,
            Path::new("unbound"),
            &["-d", "-c", &path.display().to_string()],
        )?;
        let server = format!("@{}", underlay_ip(UPSTREAM_DNS_HOST));
        // Asked from where netd asks it (the first node), so that the hub's new port
        // and the node's neighbour entry are up before a test's first query.
        let asking = self
            .nodes
            .first()
            .map_or_else(|| name.clone(), |n| n.netns.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.exec_in(
                &asking,
                &[
                    "dig",
                    &server,
                    "+short",
                    "+time=1",
                    "+tries=1",
                    &format!("outside.{UPSTREAM_ZONE}"),
                ],
            )?;
            if String::from_utf8_lossy(&out.stdout).contains("198.18.0.100") {
                return Ok(name);
            }
            if Instant::now() > deadline {
                bail!("unbound did not answer on the underlay");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wire_peer_object(&self) -> PathBuf {
        self.dir.join("wire_peer.o")
    }

    /// On a wire lab: the far end of node `i`'s underlay runs the wire's XDP program
    /// while the daemon runs native XDP, and none otherwise.
    fn wire_peer(&self, i: usize) -> Result<()> {
        if !self.wire {
            return Ok(());
        }
        let hub_side = format!("u{}", self.nodes[i].ip.octets()[3]);
        let obj = self.wire_peer_object();
        let mut args = vec![
            "-force", "-n", &self.hub, "link", "set", "dev", &hub_side, "xdpdrv",
        ];
        let obj = obj.display().to_string();
        if self.xdp == "native" {
            args.extend(["obj", &obj, "sec", "xdp"]);
        } else {
            args.push("off");
        }
        ip(&args)
    }

    /// Starts (or restarts) node `i`'s daemon and waits until its API answers.
    pub fn start_daemon(&mut self, i: usize) -> Result<()> {
        self.wire_peer(i)?;
        let node = &self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("netd.log"))?;
        let store = self
            .etcd_spec()
            .unwrap_or_else(|| format!("local:{}", node.dir.join("state").display()));
        let mut cmd = Command::new(&self.netd);
        cmd.args([
            "daemon",
            "--lease-ttl",
            &LEASE_TTL_SECS.to_string(),
            "--store",
            &store,
            "--api",
            &node.api(),
            "--node",
            &node.name,
            "--advertise-addr",
            &node.ip.to_string(),
            "--address-pool",
            ADDRESS_POOL,
            "--gwbridge-subnet",
            GWBRIDGE_SUBNET,
            "--ingress-subnet",
            INGRESS_SUBNET,
            "--dns-search",
            SEARCH_DOMAIN,
            "--dns-upstream",
            &underlay_ip(UPSTREAM_DNS_HOST).to_string(),
            "--datapath",
            &self.datapath,
            "--xdp",
            &self.xdp,
            "--underlay-mtu",
            &self.underlay_mtu.to_string(),
            "--state-dir",
            &node.dir.join("state").display().to_string(),
        ])
        .stdout(log.try_clone()?)
        .stderr(log);
        cmd.args(&self.daemon_args);
        if let Some(s) = &self.secure_store {
            cmd.arg("--store-ca")
                .arg(&s.client.ca)
                .arg("--store-cert")
                .arg(&s.client.cert)
                .arg("--store-key")
                .arg(&s.client.key)
                .env("NETD_STORE_PASSWORD", &s.password);
        }
        if let Some(t) = &node.tls_api {
            cmd.arg("--tls-ca")
                .arg(&t.daemon.ca)
                .arg("--tls-cert")
                .arg(&t.daemon.cert)
                .arg("--tls-key")
                .arg(&t.daemon.key);
        }
        if self.docker_plugin {
            cmd.arg("--docker-plugin")
                .arg(node.dir.join("run/docker/plugins/netd.sock"));
        }
        if self.deny_bpf {
            // SAFETY: only prctl(2) runs between fork and exec, on a filter built before.
            unsafe {
                cmd.pre_exec(deny_bpf_syscall);
            }
        }
        let child = spawn_in_netns(&mut cmd, &node.netns)?;
        self.nodes[i].daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.cli(i, &["status"]).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.nodes[i].daemon.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "netd on {} exited with {status}: {}",
                    self.nodes[i].name,
                    self.daemon_log(i)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "netd on {} did not come up: {}",
                    self.nodes[i].name,
                    self.daemon_log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn daemon_log(&self, i: usize) -> String {
        fs::read_to_string(self.nodes[i].dir.join("netd.log")).unwrap_or_default()
    }

    /// Why node `i`'s daemon is no longer running (how it ended and the end of its log),
    /// when it ended without the lab stopping it; None while it runs. Looks without
    /// reaping it (`WNOWAIT`), so stopping it later still works.
    pub fn daemon_gone(&self, i: usize) -> Option<String> {
        use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
        let pid = self.nodes[i].daemon.as_ref()?.id();
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let how = match waitid(Id::Pid(nix::unistd::Pid::from_raw(pid as i32)), flags) {
            Ok(WaitStatus::Exited(_, code)) => format!("exited with code {code}"),
            Ok(WaitStatus::Signaled(_, sig, core)) => {
                format!(
                    "killed by {sig}{}",
                    if core { " (core dumped)" } else { "" }
                )
            }
            _ => return None,
        };
        let log = self.daemon_log(i);
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        Some(format!(
            "netd on {} {how}; the end of its log:\n{tail}",
            self.nodes[i].name
        ))
    }

    /// `error`, with the story of every daemon that ended on its own: a CLI call that
    /// fails because its netd died says so, with the daemon's last words.
    fn with_gone_daemons(&self, error: anyhow::Error) -> anyhow::Error {
        (0..self.nodes.len())
            .filter_map(|i| self.daemon_gone(i))
            .fold(error, |e, gone| e.context(gone))
    }

    /// Stops node `i`'s daemon: gracefully (SIGTERM) or with SIGKILL.
    pub fn stop_daemon(&mut self, i: usize, kill: bool) -> Result<()> {
        if let Some(child) = self.nodes[i].daemon.take() {
            stop_child(child, kill)?;
        }
        Ok(())
    }

    /// Runs the `netd` CLI against node `i`; Err carries the CLI's stderr.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.nodes[i]
            .cli_command(&self.netd)
            .args(args)
            .output()
            .context("run netd CLI")?;
        if !out.status.success() {
            return Err(self.with_gone_daemons(anyhow!(
                "netd {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The `netd` CLI aimed at node `i`, started with `args`, its output piped: for a
    /// command that streams (`netd events`); the caller ends it.
    pub fn cli_spawn(&self, i: usize, args: &[&str]) -> Result<Child> {
        self.nodes[i]
            .cli_command(&self.netd)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run netd CLI")
    }
    /// What node `asking` says of `node` in `netd node ls` ("ready", "down"; "missing"
    /// when it lists no such node).
    pub fn node_status(&self, asking: usize, node: &str) -> Result<String> {
        let nodes = self.cli_json(asking, &["node", "ls"])?;
        Ok(nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == node))
            .and_then(|n| n["status"].as_str())
            .unwrap_or("missing")
            .to_string())
    }

    /// Waits until node `asking` says `status` of `node`, for at most `limit`.
    pub fn await_node_status(
        &self,
        asking: usize,
        node: &str,
        status: &str,
        limit: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.node_status(asking, node)?;
            if now == status {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {asking} still says {node} is {now} after {limit:?}, not {status}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs the CLI with `--output json` and parses what it printed (also on failure,
    /// where it prints the API error as JSON).
    pub fn cli_json(&self, i: usize, args: &[&str]) -> Result<Value> {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let out = self.nodes[i]
            .cli_command(&self.netd)
            .args(&full)
            .output()
            .context("run netd CLI")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            self.with_gone_daemons(anyhow!(
                "netd {} printed no JSON ({e}): {text} {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        })?;
        if !out.status.success() && v.get("error").is_none() {
            bail!("netd {} failed without an API error: {v}", args.join(" "));
        }
        Ok(v)
    }

    /// Spawns a long-running process inside namespace `netns`; killed at teardown.
    pub fn spawn_in(&mut self, netns: &str, program: &Path, args: &[&str]) -> Result<()> {
        let mut cmd = Command::new(program);
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        let child = spawn_in_netns(&mut cmd, netns)?;
        self.children.push(child);
        Ok(())
    }

    /// Kills what runs in task namespace `tag` (made by [`Lab::add_task_netns`]) and
    /// deletes it: a long run that makes tasks by the hundred gives each back.
    pub fn remove_task_netns(&mut self, tag: &str) -> Result<()> {
        let name = self.ns(tag);
        let pids = run(Command::new("ip").args(["netns", "pids", &name]))?;
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Reap what was killed (the lab's children) so none stays a zombie.
        self.children
            .retain_mut(|c| c.try_wait().map(|s| s.is_none()).unwrap_or(true));
        ip(&["netns", "del", &name])?;
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&name));
        self.netns.retain(|n| *n != name);
        Ok(())
    }

    /// Makes a task namespace running `netd-lab whoami` on `port` (TCP and UDP); returns
    /// its namespace path. Waits until the server listens.
    pub fn whoami_task(&mut self, tag: &str, port: u16) -> Result<String> {
        let (name, path) = self.add_task_netns(tag)?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        self.start_whoami(&name, tag, port)?;
        Ok(path)
    }

    /// A host on the underlay (not a node) running whoami on `port`; returns its netns.
    pub fn whoami_host(&mut self, tag: &str, host: u8, port: u16) -> Result<String> {
        let name = self.add_host(tag, host)?;
        self.start_whoami(&name, tag, port)?;
        Ok(name)
    }

    /// Runs `netd-lab whoami` in `netns` (answering as `tag`) and waits until it listens.
    pub fn start_whoami(&mut self, netns: &str, tag: &str, port: u16) -> Result<()> {
        let bin = self.lab_bin.clone();
        self.spawn_in(
            netns,
            &bin,
            &["whoami", "--port", &port.to_string(), "--name", tag],
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let probe = in_netns(netns, move || {
                Ok(TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_millis(200),
                )
                .is_ok())
            })?;
            if probe {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("whoami in {netns} did not start")
    }

    /// A client task `tag` of service `clients` (made here, on `network`) on node `node`,
    /// attached through node 0's API: what a test's load leaves from to reach a VIP.
    /// Returns its namespace.
    pub fn add_client(&mut self, tag: &str, network: &str, node: usize) -> Result<String> {
        self.cli(0, &["service", "create", "clients", "--network", network])?;
        let (netns, path) = self.add_task_netns(tag)?;
        let on = self.nodes[node].name.clone();
        self.cli(
            0,
            &[
                "task", "attach", "clients", "--netns", &path, "--name", tag, "--node", &on,
            ],
        )?;
        Ok(netns)
    }

    /// Runs CNI plugin `plugin` (a path) as a runtime on node `i` would: inside the node's
    /// namespace, with the spec's environment and `config` on stdin. Returns whether it
    /// exited 0 and what it printed (JSON, or Null for nothing).
    pub fn cni(
        &self,
        i: usize,
        plugin: &Path,
        env: &CniEnv,
        config: &Value,
    ) -> Result<(bool, Value)> {
        let mut cmd = Command::new(plugin);
        cmd.env("CNI_COMMAND", env.command)
            .env("CNI_CONTAINERID", env.container)
            .env("CNI_NETNS", env.netns)
            .env("CNI_IFNAME", env.ifname)
            .env("CNI_ARGS", env.args)
            .env("CNI_PATH", CNI_PLUGIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_in_netns(&mut cmd, &self.nodes[i].netns)?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(config.to_string().as_bytes())?;
        let out = child
            .wait_with_output()
            .context("wait for the CNI plugin")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .with_context(|| format!("CNI plugin printed non-JSON: {text:?}"))?
        };
        Ok((out.status.success(), value))
    }

    /// The namespace name of a task or host made with `tag`.
    pub fn ns(&self, tag: &str) -> String {
        format!("{}-{tag}", self.prefix)
    }

    /// Whether one ping from `netns` to `to` gets an answer; `extra` are ping options.
    pub fn pings(&self, netns: &str, to: Ipv4Addr, extra: &[&str]) -> Result<bool> {
        let to = to.to_string();
        let mut args = vec!["ping", "-c", "1", "-W", "1"];
        args.extend_from_slice(extra);
        args.push(&to);
        Ok(self.exec_in(netns, &args)?.status.success())
    }

    /// Makes a whoami task namespace `tag` and attaches it to `service` through node
    /// `api`'s API, on node `on` (default: that node). Returns the CLI's JSON.
    pub fn attach_whoami(
        &mut self,
        api: usize,
        service: &str,
        tag: &str,
        on: Option<&str>,
    ) -> Result<Value> {
        let path = self.whoami_task(tag, 80)?;
        let mut args = vec!["task", "attach", service, "--netns", &path, "--name", tag];
        if let Some(n) = on {
            args.extend_from_slice(&["--node", n]);
        }
        let v = self.cli_json(api, &args)?;
        if v.get("error").is_some() {
            bail!("attach {tag}: {v}");
        }
        Ok(v)
    }

    /// Every query the upstream resolver received so far (its log).
    pub fn upstream_queries(&self) -> String {
        fs::read_to_string(self.dir.join("unbound").join("queries.log")).unwrap_or_default()
    }

    /// `dig ARGS` from `netns` (its resolv.conf: netd's DNS), 5 s timeout, one try;
    /// returns everything dig printed.
    pub fn dig(&self, netns: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["dig", "+time=5", "+tries=1"];
        full.extend_from_slice(args);
        let out = self.exec_in(netns, &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The addresses `dig +short NAME` gives from `netns`, in the order given.
    pub fn dig_short(&self, netns: &str, name: &str) -> Result<Vec<String>> {
        Ok(self
            .dig(netns, &["+short", name])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Runs a command in `netns` to completion (ping, curl, ...).
    pub fn exec_in(&self, netns: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .output()
            .context("ip netns exec")
    }

    /// One raw HTTP/1.1 request to node `i`'s API socket, as a client that does not go
    /// through the CLI sends it (any body, valid or not); returns the status code and
    /// the body. The daemon may answer (413) before it read a body it refuses.
    pub fn api_raw(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, String)> {
        let socket = self.nodes[i].dir.join("netd.sock");
        let mut s =
            std::os::unix::net::UnixStream::connect(&socket).context("connect to the API")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: netd\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        let _ = s.write_all(body);
        let mut out = vec![];
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no HTTP status in {text:.200}"))?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status, body.to_string()))
    }

    /// Waits (at most `limit`) until node `i` has in force everything its view holds
    /// now: its DNS and load-balancer tables and its kernel have both reached the view's
    /// revision (`netd status`). What a test checks after a change it saw through the
    /// API, whose view runs ahead of the datapath.
    pub fn await_in_force(&self, i: usize, limit: Duration) -> Result<()> {
        let revision = |st: &Value, k: &str| st["state"][k].as_u64().unwrap_or(0);
        let want = revision(&self.cli_json(i, &["status"])?, "revision");
        let deadline = Instant::now() + limit;
        loop {
            let st = self.cli_json(i, &["status"])?;
            let (tables, kernel) = (
                revision(&st, "tables_revision"),
                revision(&st, "kernel_revision"),
            );
            if tables >= want && kernel >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} has not put revision {want} in force after {limit:?}: its \
                     tables hold {tables}, its kernel {kernel}",
                    self.nodes[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything netd can have changed in the kernel of node `i` (its netns, its
    /// sandboxes, its tasks' netns): links with their details, addresses, routes and
    /// the nftables ruleset. Two equal snapshots mean the kernel was not touched.
    pub fn kernel_snapshot(&self, i: usize) -> Result<String> {
        let node = &self.nodes[i];
        let mut namespaces = vec![node.netns.clone()];
        let sandbox_prefix = format!("netd-{}-", node.name);
        let mut others: Vec<String> = fs::read_dir("/run/netns")?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&sandbox_prefix) || self.netns.contains(n))
            .collect();
        others.sort();
        namespaces.extend(others);
        let mut out = String::new();
        for ns in &namespaces {
            out.push_str(&format!("### {ns}\n"));
            for args in [
                &["-d", "-o", "link", "show"][..],
                &["-4", "-o", "addr", "show"][..],
                &["-4", "route", "show", "table", "all"][..],
            ] {
                let o = run(Command::new("ip").arg("-n").arg(ns).args(args))?;
                out.push_str(&without_timers(&String::from_utf8_lossy(&o.stdout)));
            }
            // Static entries for remote tasks: VXLAN FDB (`... dst VTEP`) and neighbours.
            let fdb = run(Command::new("bridge").args(["-n", ns, "fdb", "show"]))?;
            for l in String::from_utf8_lossy(&fdb.stdout).lines() {
                if l.contains(" dst ") {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            let neigh =
                run(Command::new("ip").args(["-n", ns, "neigh", "show", "nud", "permanent"]))?;
            out.push_str(&String::from_utf8_lossy(&neigh.stdout));
        }
        let o = self.exec_in(&node.netns, &["nft", "list", "ruleset"])?;
        out.push_str(&without_counts(&String::from_utf8_lossy(&o.stdout)));
        // The node's BPF pins by name and inode: a re-pinned link or map is a new inode.
        out.push_str("### bpf pins\n");
        let mut pins: Vec<String> = fs::read_dir(Path::new("/sys/fs/bpf/netd").join(&node.name))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let ino = std::os::unix::fs::MetadataExt::ino(&e.metadata().ok()?);
                Some(format!("{} {ino}", e.file_name().to_string_lossy()))
            })
            .collect();
        pins.sort();
        for p in pins {
            out.push_str(&p);
            out.push('\n');
        }
        Ok(out)
    }

    /// The tasks of `service`, as node `i`'s `netd task ls` shows them.
    pub fn tasks_of(&self, i: usize, service: &str) -> Result<Vec<Value>> {
        Ok(self
            .cli_json(i, &["task", "ls"])?
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t["service"] == service)
            .collect())
    }

    /// The VIP of `service` on `network`, from node `i`'s `netd service inspect`.
    pub fn vip(&self, i: usize, service: &str, network: &str) -> Result<Ipv4Addr> {
        let v = self.cli_json(i, &["service", "inspect", service])?;
        v["vips"][network]
            .as_str()
            .with_context(|| format!("{service} has no VIP on {network}: {v}"))?
            .parse()
            .context("VIP address")
    }

    /// The address of task `task` on `network` (or "gwbridge"), from `netd task ls`.
    pub fn task_ip(&self, i: usize, task: &str, network: &str) -> Result<Ipv4Addr> {
        let tasks = self.cli_json(i, &["task", "ls"])?;
        tasks
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == task))
            .and_then(|t| t["endpoints"].as_array())
            .and_then(|eps| eps.iter().find(|e| e["network"] == network))
            .and_then(|e| e["ip"].as_str())
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("task {task} has no address on {network}: {tasks}"))
    }

    /// Removes everything the lab made: processes, namespaces (and with them every link
    /// in them), sandboxes the daemons made, the lab directory.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for i in 0..self.nodes.len() {
            // A daemon that died under a test is news even when the test passed or
            // failed for another reason (libtest shows it with a failure's output).
            if let Some(gone) = self.daemon_gone(i) {
                eprintln!("{gone}");
            }
            let _ = self.stop_daemon(i, true);
        }
        let _ = self.stop_etcd(true);
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = cleanup_prefix(&self.prefix);
        // NETD_LAB_KEEP=DIR keeps the lab's logs (netd's, etcd's) in DIR/PREFIX, for
        // reading after a failure.
        if let Some(keep) = std::env::var_os("NETD_LAB_KEEP") {
            let to = Path::new(&keep).join(&self.prefix);
            let _ = fs::create_dir_all(&to);
            let _ = Command::new("cp")
                .arg("-r")
                .arg(&self.dir)
                .arg(&to)
                .status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Drops what changes on its own: running bridge timers (`gc_timer 12.34`) and the
/// operational state (a new bridge goes from UNKNOWN to UP when its ports settle).
fn without_timers(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut skip = false;
        for tok in line.split_whitespace() {
            if skip {
                skip = false;
                continue;
            }
            if tok.ends_with("_timer") || tok == "state" {
                skip = true;
                continue;
            }
            out.push_str(tok);
            out.push(' ');
        }
        out.push('\n');
    }
    out
}

/// Drops what traffic changes in an nftables listing: the numbers of `counter packets N
/// bytes N` in rules and of `packets N bytes N` in named counters (a line of its own,
/// indented with tabs).
fn without_counts(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut words = line.split(' ').peekable();
        let mut first = true;
        while let Some(w) = words.next() {
            if !first {
                out.push(' ');
            }
            first = false;
            out.push_str(w);
            let bare = w.trim_start_matches('\t');
            if bare == "packets" || bare == "bytes" {
                if let Some(n) = words.peek() {
                    if n.parse::<u64>().is_ok() {
                        words.next();
                        out.push_str(" _");
                    }
                }
            }
        }
        out.push('\n');
    }
    out
}

/// The lines of `a` and `b` that differ, for assertion messages that can be read.
pub fn diff_lines(a: &str, b: &str) -> String {
    let mut out = String::new();
    for l in a.lines().filter(|l| !b.lines().any(|m| m == *l)) {
        out.push_str(&format!("- {l}\n"));
    }
    for l in b.lines().filter(|l| !a.lines().any(|m| m == *l)) {
        out.push_str(&format!("+ {l}\n"));
    }
    out
}

/// Deletes every namespace whose name contains lab prefix `prefix` (the lab's own and the
/// netd sandboxes of its nodes, `netd-PREFIXnN-...`) and kills processes inside them;
/// removes the nodes' BPF pins (which detaches their programs) and conntrack journals.
pub fn cleanup_prefix(prefix: &str) -> Result<Vec<String>> {
    let mut removed = remove_cgroups(prefix);
    for root in [
        "/sys/fs/bpf/netd",
        "/sys/fs/bpf/netd-xdp",
        "/sys/fs/bpf/netd-mesh",
        "/run/netd",
    ] {
        if let Ok(dirs) = fs::read_dir(root) {
            for d in dirs.flatten() {
                if d.file_name().to_string_lossy().starts_with(prefix) {
                    let _ = fs::remove_dir_all(d.path());
                    removed.push(d.path().display().to_string());
                }
            }
        }
    }
    // resolv.conf dirs of task namespaces (also of ones already gone).
    if let Ok(dirs) = fs::read_dir("/etc/netns") {
        for d in dirs.flatten() {
            if d.file_name().to_string_lossy().starts_with(prefix) {
                let _ = fs::remove_dir_all(d.path());
            }
        }
    }
    let entries = match fs::read_dir("/run/netns") {
        Ok(e) => e,
        Err(_) => return Ok(removed),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(prefix) || name.starts_with(&format!("netd-{prefix}"));
        if !ours {
            continue;
        }
        // Processes still inside (a crashed test's servers) would keep it alive.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if ip(&["netns", "del", &name]).is_ok() {
            removed.push(name.clone());
        }
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&name));
    }
    Ok(removed)
}

/// Installs a seccomp filter on the calling process that fails bpf(2) with EPERM and
/// allows everything else (x86_64 only; other architectures' calls are allowed).
fn deny_bpf_syscall() -> std::io::Result<()> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let filter = [
        // seccomp_data: nr at offset 0, arch at offset 4.
        stmt(ld, 4),
        jeq(AUDIT_ARCH_X86_64, 0, 3),
        stmt(ld, 0),
        jeq(libc::SYS_bpf as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl reads `prog` and the filter it points to, both alive here.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Stops a process with SIGTERM (or SIGKILL) and reaps it.
fn stop_child(mut child: Child, kill: bool) -> Result<()> {
    let sig = if kill {
        nix::sys::signal::Signal::SIGKILL
    } else {
        nix::sys::signal::Signal::SIGTERM
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, sig);
    child.wait().context("wait for child")?;
    Ok(())
}

/// Kills the processes in, and removes, every cgroup named with the lab prefix: the
/// container runtimes a lab starts put their containers under such a parent (they stay
/// behind otherwise, in each cgroup v1 hierarchy and the v2 one).
fn remove_cgroups(prefix: &str) -> Vec<String> {
    let mut removed = vec![];
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return removed;
    };
    let mut roots: Vec<PathBuf> = hierarchies
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    for root in roots {
        let Ok(entries) = fs::read_dir(&root) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) && e.path().is_dir() {
                remove_cgroup_tree(&e.path());
                removed.push(e.path().display().to_string());
            }
        }
    }
    removed
}

/// Kills what is in `dir` and its children, then removes them, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = fs::remove_dir(dir);
}

/// Starts `cmd` with its network namespace switched to `netns` (and nothing else: the
/// daemon must share our mount namespace so the netns it mounts are visible to all).
pub fn spawn_in_netns(cmd: &mut Command, netns: &str) -> Result<Child> {
    let file = fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("open netns {netns}"))?;
    // SAFETY: the closure only calls setns(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
        .with_context(|| format!("spawn {:?} in {netns}", cmd.get_program()))
}

/// Runs `f` on a thread inside namespace `netns`. Sockets it opens stay in that namespace,
/// so a test can hold a connection from a task across a netd restart.
/// A Debian tool a test needs at `path`, or an error naming the package to install: a
/// test whose client is missing fails with the reason instead of passing.
pub fn debian_tool(path: &str, package: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.exists() {
        bail!("{path} is missing: install Debian's {package}");
    }
    Ok(p.to_path_buf())
}

pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("open netns {netns}"))?;
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?
}

/// One lookup by dig from `netns` as glibc's resolver makes it by default (5 s timeout,
/// 2 tries): the answer's lines, or why there is none, and how long it took.
pub fn dig_once(netns: &str, name: &str, tcp: bool) -> (Result<Vec<String>, String>, Duration) {
    let start = Instant::now();
    let mut args = vec![
        "netns", "exec", netns, "dig", "+time=5", "+tries=2", "+short",
    ];
    if tcp {
        args.push("+tcp");
    }
    args.push(name);
    let out = std::process::Command::new("ip").args(&args).output();
    let answer = match out {
        // dig notes a failed try (";; communications error ...") before the answer of the
        // next: the lookup is the answer.
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.starts_with(';'))
            .map(str::to_string)
            .collect()),
        Ok(o) => Err(format!(
            "dig exited {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim()
        )),
        Err(e) => Err(format!("run dig: {e}")),
    };
    (answer, start.elapsed())
}

/// Opens a TCP connection from inside `netns`.
pub fn connect_from(netns: &str, addr: SocketAddr) -> Result<TcpStream> {
    in_netns(netns, move || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("connect to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    })
}

/// One HTTP/1.1 keep-alive GET on an open connection; returns the body.
pub fn http_get(stream: &mut TcpStream) -> Result<String> {
    let mut buf = vec![];
    let body = http_request(stream, &mut buf)?;
    Ok(String::from_utf8_lossy(&buf[body]).into_owned())
}

/// Sends one GET on a keep-alive connection and reads the whole response into `buf`
/// (reused across calls by load generators); returns where the body is in it.
pub fn http_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<std::ops::Range<usize>> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")?;
    read_http_response(stream, buf)
}

/// Reads one whole HTTP response (its `Content-Length`) into `buf`; returns where the
/// body is in it.
pub fn read_http_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<std::ops::Range<usize>> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).context("read HTTP response")?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let len: usize = String::from_utf8_lossy(&buf[..head])
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse().ok())
                })
                .ok_or_else(|| anyhow!("no content-length"))?;
            let body = head + 4..head + 4 + len;
            if buf.len() >= body.end {
                return Ok(body);
            }
        }
    }
}

/// A fresh connection from `netns` to `addr`, one GET, the body.
pub fn http_get_from(netns: &str, addr: SocketAddr) -> Result<String> {
    let mut s = connect_from(netns, addr)?;
    http_get(&mut s)
}

/// One UDP request from `netns` to `addr`; returns the reply and the address it came from.
pub fn udp_ask_from(netns: &str, addr: SocketAddr) -> Result<(String, SocketAddr)> {
    in_netns(netns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(b"who", addr)?;
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf).context("UDP reply")?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })
}

/// Pulls `Key: value` out of a whoami body.
pub fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(": ")))
}

/// Arguments built as strings, as the CLI helpers take them.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Standard base64 with padding (etcd's JSON gateway carries keys this way).
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// Counts change with traffic, in rules and in named counters alike; nothing else
    /// of a listing is dropped.
    #[test]
    fn listings_compare_without_their_counts() {
        let listing =
            "table ip netd {\n\tcounter port_flows {\n\t\tpackets 1369 bytes 82140\n\t}\n\
                       \tchain x {\n\t\tudp dport 4789 counter packets 3 bytes 180 drop\n\t}\n}";
        let quiet = super::without_counts(listing);
        assert!(quiet.contains("\t\tpackets _ bytes _\n"), "{quiet}");
        assert!(quiet.contains("counter packets _ bytes _ drop"), "{quiet}");
        let busier = listing.replace("1369", "2000").replace("82140", "99999");
        assert_eq!(super::without_counts(&busier), quiet);
        assert_ne!(
            super::without_counts(&listing.replace("4789", "4790")),
            quiet
        );
    }
}
