//! Real container runtimes driving netd through its CNI plugin: containerd (`ctr run
//! --cni`) and podman (CNI backend), from Debian's packages. Each runs inside a node's
//! network namespace and a private mount namespace of its own, so that its state, its
//! CNI config and cache, and runc's state stay out of the machine's (only the
//! container network namespaces podman mounts under /run/netns are shared, as netd must
//! open them). A guard kills every container and the daemon when it is dropped, also
//! when a test fails.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{binary, Lab, SEARCH_DOMAIN};

/// A root filesystem with busybox-static (Debian package busybox-static) and a resolv.conf
/// pointing at netd's DNS, as a runtime writes it from the CNI result.
pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing: install Debian's busybox-static");
    }
    let bin = dir.join("bin");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
        fs::create_dir_all(dir.join(d)).with_context(|| format!("create rootfs {d}"))?;
    }
    fs::copy(busybox, bin.join("busybox")).context("copy busybox")?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            symlink("busybox", bin.join(applet))
                .with_context(|| format!("link applet {applet}"))?;
        }
    }
    fs::write(
        dir.join("etc/resolv.conf"),
        format!("nameserver 127.0.0.11\nsearch {SEARCH_DOMAIN}\n"),
    )?;
    fs::write(dir.join("etc/hosts"), "127.0.0.1 localhost\n")?;
    Ok(dir.to_path_buf())
}

/// The CNI plugin directory a runtime is given: `netd` (the plugin binary's CNI type
/// name) pointing at `netd-cni`, and Debian's plugins for chaining.
pub fn cni_plugin_dir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let _ = fs::remove_file(dir.join("netd"));
    symlink(binary("netd-cni")?, dir.join("netd")).context("link the netd plugin")?;
    for p in ["loopback", "firewall", "tuning", "bandwidth", "portmap"] {
        let _ = fs::remove_file(dir.join(p));
        symlink(Path::new(crate::CNI_PLUGIN_DIR).join(p), dir.join(p))?;
    }
    Ok(dir.to_path_buf())
}

/// A shell prologue that gives a fresh mount namespace (made by `unshare -m
/// --propagation unchanged`) its own /run (the directory `run`, kept across commands),
/// private copies of `tmpfs` paths and `binds` (target, source), while /run/netns stays
/// the machine's and shared with it.
fn private_mounts(run: &Path, tmpfs: &[&str], binds: &[(&str, &Path)]) -> String {
    // The root mount becomes private first, so nothing below propagates back; /run/netns
    // is a mount of its own (shared by `ip netns`) and keeps propagating.
    let mut s = format!(
        "set -e; mount --make-private /; mkdir -p {run}; \
         keep=$(mktemp -d); mount --rbind /run/netns \"$keep\"; \
         mount --bind {run} /run; mkdir -p /run/netns; \
         mount --move \"$keep\" /run/netns; rmdir \"$keep\"; ",
        run = run.display()
    );
    for t in tmpfs {
        s.push_str(&format!("mkdir -p {t}; mount -t tmpfs netd-lab {t}; "));
    }
    for (target, source) in binds {
        s.push_str(&format!(
            "mkdir -p {target}; mount --bind {} {target}; ",
            source.display()
        ));
    }
    s
}

fn unshare_in(node_netns: &str, script: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{node_netns}"))
        .args(["unshare", "-m", "--propagation", "unchanged", "sh", "-c"])
        .arg(script);
    cmd
}

/// A containerd of node `node`, with its own root, state and socket; `ctr` runs in its
/// mount namespace, where /etc/cni/net.d is the test's config dir and /opt/cni/bin the
/// test's plugin dir.
pub struct Containerd {
    child: Option<Child>,
    pid: u32,
    socket: PathBuf,
    /// The cgroup parent of its containers, named with the lab prefix (see
    /// `cleanup_prefix`).
    cgroup: String,
    pub dir: PathBuf,
}

impl Containerd {
    pub fn start(lab: &Lab, node: usize, conf_dir: &Path, plugin_dir: &Path) -> Result<Self> {
        let dir = lab.dir.join(format!("containerd-{node}"));
        fs::create_dir_all(&dir)?;
        let config = dir.join("config.toml");
        // No CRI: only the plain containerd services ctr uses.
        fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )?;
        let socket = dir.join("containerd.sock");
        let log = fs::File::create(dir.join("containerd.log"))?;
        let script = format!(
            "{}exec containerd --config {} --root {} --state {} --address {}",
            private_mounts(
                &dir.join("run"),
                &["/var/lib/cni", "/opt"],
                &[("/etc/cni/net.d", conf_dir), ("/opt/cni/bin", plugin_dir)],
            ),
            config.display(),
            dir.join("root").display(),
            dir.join("state").display(),
            socket.display(),
        );
        let child = unshare_in(&lab.nodes[node].netns, &script)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd (Debian package containerd)")?;
        let pid = child.id();
        let mut c = Containerd {
            child: None,
            pid,
            socket,
            cgroup: format!("/{}-containerd", lab.prefix),
            dir,
        };
        let child = wait_up("containerd", child, Duration::from_secs(20), || {
            Ok(c.ctr(&["version"])?.status.success())
        })
        .with_context(|| c.log())?;
        c.child = Some(child);
        Ok(c)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr ARGS` in containerd's namespaces.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "-n", "ctr", "--address"])
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run ctr (Debian package containerd)")
    }

    /// `ctr run --rm --cni` of `rootfs` as container `id`, running `sh -c SCRIPT`; waits
    /// for it (bounded by `timeout`) and returns what it printed.
    pub fn run(&self, id: &str, rootfs: &Path, script: &str, timeout: Duration) -> Result<Output> {
        let rootfs = rootfs.display().to_string();
        let secs = timeout.as_secs().max(1).to_string();
        let cgroup = format!("{}/{id}", self.cgroup);
        let out = Command::new("timeout")
            .args([&secs, "nsenter", "-t", &self.pid.to_string(), "-m", "-n"])
            .args(["ctr", "--address"])
            .arg(&self.socket)
            .args([
                "run",
                "--rm",
                "--cni",
                "--env",
                "PATH=/bin",
                "--cgroup",
                &cgroup,
                "--rootfs",
            ])
            .args([rootfs.as_str(), id, "/bin/sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .context("ctr run")?;
        Ok(out)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(out) = self.ctr(&["tasks", "ls", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
                let _ = self.ctr(&["tasks", "rm", "-f", id]);
                let _ = self.ctr(&["containers", "rm", id]);
            }
        }
        if let Some(child) = self.child.take() {
            terminate(child, Duration::from_secs(5));
        }
    }
}

/// podman with `network_backend = "cni"` (a test-private containers.conf), its storage,
/// run and tmp dirs in the lab, run in node `node`'s netns. Each command gets a private
/// mount namespace with its own /var/lib/cni (libcni's cache) and the lab's /run (runc's
/// state, kept across commands), except /run/netns, where podman mounts the container
/// namespaces netd opens.
pub struct Podman {
    netns: String,
    dir: PathBuf,
    conf: PathBuf,
    cgroup: String,
}

impl Podman {
    pub fn new(lab: &Lab, node: usize, conf_dir: &Path, plugin_dir: &Path) -> Result<Self> {
        let dir = lab.dir.join(format!("podman-{node}"));
        fs::create_dir_all(dir.join("tmp"))?;
        let conf = dir.join("containers.conf");
        // Root here lacks CAP_SYS_RESOURCE: podman's default ulimits above the hard limit
        // would make runc fail.
        fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
                 [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n\
                 cni_plugin_dirs = [\"{}\"]\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{}\"\nruntime = \"runc\"\ntmp_dir = \"{}\"\n",
                conf_dir.display(),
                plugin_dir.display(),
                dir.join("events.log").display(),
                dir.join("tmp").display(),
            ),
        )?;
        Ok(Podman {
            netns: lab.nodes[node].netns.clone(),
            dir,
            conf,
            cgroup: format!("/{}-podman", lab.prefix),
        })
    }

    /// `podman ARGS`, bounded by 120 s.
    pub fn podman(&self, args: &[&str]) -> Result<Output> {
        let mut script = private_mounts(&self.dir.join("run"), &["/var/lib/cni"], &[]);
        script.push_str(&format!(
            "exec timeout 120 podman --root {} --runroot {} --storage-driver vfs \"$@\"",
            self.dir.join("root").display(),
            self.dir.join("runroot").display(),
        ));
        unshare_in(&self.netns, &script)
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .context("run podman (Debian package podman)")
    }

    /// `podman run --network NETWORK --rootfs ROOTFS ARGS… /bin/sh -c SCRIPT`.
    pub fn run(
        &self,
        network: &str,
        rootfs: &Path,
        extra: &[&str],
        script: &str,
    ) -> Result<Output> {
        let rootfs = rootfs.display().to_string();
        let mut args = vec!["run", "--network", network, "--cgroup-parent", &self.cgroup];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--rootfs", rootfs.as_str(), "/bin/sh", "-c", script]);
        self.podman(&args)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-f", "-a", "-t", "0"]);
    }
}

/// A dockerd (Debian's docker.io 20.10) of node `node`: in the node's network namespace
/// and a private mount namespace whose /run is the node's run directory (where the
/// node's netd serves the `netd` plugin, /run/docker/plugins/netd.sock, and where
/// dockerd's own containerd and runc keep their state), with its data, exec root, API
/// socket and config in the lab. `--dns 127.0.0.12` makes Docker's resolver ask netd.
pub struct Dockerd {
    child: Option<Child>,
    socket: PathBuf,
    pub dir: PathBuf,
}

impl Dockerd {
    pub fn start(lab: &Lab, node: usize) -> Result<Self> {
        let n = &lab.nodes[node];
        let dir = n.dir.join("docker");
        fs::create_dir_all(&dir)?;
        let config = dir.join("daemon.json");
        let daemon = serde_json::json!({
            // No docker0 and no iptables rules of Docker's in the node: every container
            // here is on a netd network.
            "bridge": "none",
            "iptables": false,
            "ip-masq": false,
            "dns": ["127.0.0.12"],
            "storage-driver": "overlay2",
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "cgroup-parent": format!("/{}-{}", lab.prefix, n.name),
            "default-address-pools": [{"base": format!("198.18.{}.0/24", 200 + node), "size": 26}],
        });
        fs::write(&config, daemon.to_string())?;
        let socket = dir.join("docker.sock");
        let log = fs::File::create(dir.join("dockerd.log"))?;
        let script = format!(
            "{}exec dockerd --config-file {} --data-root {} --exec-root {} -H unix://{} --pidfile {}",
            private_mounts(&node_run_dir(lab, node), &["/etc/docker"], &[]),
            config.display(),
            dir.join("data").display(),
            dir.join("exec").display(),
            socket.display(),
            dir.join("docker.pid").display(),
        );
        let child = unshare_in(&n.netns, &script)
            .env("DOCKER_SERVICE_PREFER_OFFLINE_IMAGE", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start dockerd (Debian package docker.io)")?;
        let mut d = Dockerd {
            child: None,
            socket,
            dir,
        };
        let child = wait_up("dockerd", child, Duration::from_secs(60), || {
            Ok(d.docker(&["version"])?.status.success())
        })
        .with_context(|| d.log())?;
        d.child = Some(child);
        Ok(d)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// `docker ARGS` against this dockerd, bounded by 120 s.
    pub fn docker(&self, args: &[&str]) -> Result<Output> {
        Command::new("timeout")
            .args(["120", "docker", "-H"])
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run docker (Debian package docker.io)")
    }

    /// `docker network create -d netd --ipam-driver netd --subnet SUBNET -o
    /// netd.network=NETWORK -o netd.service=SERVICE NAME`: Docker's view `name` of netd
    /// network `network`, whose containers join `service`.
    pub fn netd_network(
        &self,
        name: &str,
        subnet: &str,
        network: &str,
        service: &str,
    ) -> Result<()> {
        let (net_opt, svc_opt) = (
            format!("netd.network={network}"),
            format!("netd.service={service}"),
        );
        let out = self.docker(&[
            "network",
            "create",
            "-d",
            "netd",
            "--ipam-driver",
            "netd",
            "--subnet",
            subnet,
            "-o",
            &net_opt,
            "-o",
            &svc_opt,
            name,
        ])?;
        check(&format!("docker network create {name}"), out).map(|_| ())
    }

    /// Imports `rootfs` as image `name` (`tar | docker import`), with PATH=/bin.
    pub fn import(&self, rootfs: &Path, name: &str) -> Result<()> {
        let tar = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("tar the rootfs")?;
        let out = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["import", "-c", "ENV PATH=/bin", "-", name])
            .stdin(tar.stdout.context("tar stdout")?)
            .output()
            .context("docker import")?;
        check("docker import", out).map(|_| ())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(out) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(String::from)
                .collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.docker(&args);
            }
        }
        if let Some(child) = self.child.take() {
            terminate(child, Duration::from_secs(15));
        }
    }
}

/// The directory a node's runtimes see as /run; the node's netd serves its Docker plugin
/// in it (`docker/plugins/netd.sock`).
pub fn node_run_dir(lab: &Lab, node: usize) -> PathBuf {
    lab.nodes[node].dir.join("run")
}

/// Waits until `up` says the daemon answers and hands its process back; fails if it
/// exits or `limit` passes (and then stops it).
fn wait_up(
    what: &str,
    mut child: Child,
    limit: Duration,
    mut up: impl FnMut() -> Result<bool>,
) -> Result<Child> {
    let deadline = Instant::now() + limit;
    loop {
        match up() {
            Ok(true) => return Ok(child),
            Ok(false) => {}
            Err(e) => {
                terminate(child, Duration::from_secs(5));
                return Err(e);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited with {status}");
        }
        if Instant::now() > deadline {
            terminate(child, Duration::from_secs(5));
            bail!("{what} did not come up within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM, then SIGKILL if `child` has not exited within `grace` (a daemon stops its
/// own children on SIGTERM: dockerd its containerd).
fn terminate(mut child: Child, grace: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A conflist named `name` with netd first and `more` plugins chained after it.
pub fn conflist(name: &str, netd: Value, more: &[Value]) -> Value {
    let mut plugins = vec![netd];
    plugins.extend_from_slice(more);
    serde_json::json!({"cniVersion": "1.0.0", "name": name, "plugins": plugins})
}

/// Succeeds on a command's success, else fails with what it printed.
pub fn check(what: &str, out: Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}
