//! Network namespaces: naming them, creating and removing them the way `ip netns` does
//! (a bind mount of the namespace under /run/netns), and running netlink work inside one.
//!
//! `setns` changes the namespace of the calling *thread*. Doing it on a tokio worker would
//! leak the namespace into unrelated tasks, so a socket for a namespace is made by a
//! fresh OS thread that enters it and exits; the socket stays bound to that namespace.
//! The reconciler keeps one netlink socket per namespace ([`NetlinkPool`]); one-off work
//! ([`with_netlink`]) opens its own.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named namespaces live, as for `ip netns`.
pub const NETNS_DIR: &str = "/run/netns";
/// `statfs` magic of nsfs: how we tell a namespace file from any other file.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Which namespace a piece of work runs in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Netns {
    /// The daemon's own namespace: the node's "root" namespace (in the lab, the node netns).
    Home,
    /// A namespace file: /run/netns/NAME, /proc/PID/ns/net, ...
    Path(PathBuf),
}

impl Netns {
    pub fn named(name: &str) -> Self {
        Netns::Path(Path::new(NETNS_DIR).join(name))
    }

    pub fn open(&self) -> Result<Option<File>> {
        match self {
            Netns::Home => Ok(None),
            Netns::Path(p) => {
                let f = File::open(p).with_context(|| format!("open netns {}", p.display()))?;
                Ok(Some(f))
            }
        }
    }
}

/// Checks that `path` exists and is a network namespace, with a message a user can act on.
pub fn check_netns_path(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("netns {}: {e}", path.display()))?;
    let st = nix::sys::statfs::fstatfs(file.as_fd())
        .map_err(|e| format!("netns {}: {e}", path.display()))?;
    #[allow(clippy::unnecessary_cast)]
    if st.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(format!(
            "{} is not a network namespace (expected a file like /run/netns/NAME or /proc/PID/ns/net)",
            path.display()
        ));
    }
    // A namespace file may be of another kind (mnt, pid...): ask the kernel.
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let kind = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(format!(
            "{} is a namespace, but not a network namespace",
            path.display()
        ));
    }
    Ok(())
}

/// The prefix of a task error that is the task's node refusing its namespace: the API
/// answers it as a bad request, also when another node gave the verdict.
pub const REFUSED: &str = "netns refused: ";

/// The namespaces no task may have: the node's own (netd's), the machine's (pid 1's), and
/// the ones netd made (sandboxes), since netd would plumb and rule them as a task's. Read
/// once, checked against many tasks (a reconcile step checks every local task).
pub struct NotTasks {
    ids: Vec<((u64, u64), String)>,
}

/// A namespace file's identity (device, inode).
pub fn file_id(p: &Path) -> Option<(u64, u64)> {
    let m = fs::metadata(p).ok()?;
    Some((
        std::os::unix::fs::MetadataExt::dev(&m),
        std::os::unix::fs::MetadataExt::ino(&m),
    ))
}

impl NotTasks {
    pub fn read() -> Self {
        let mut ids = vec![];
        for (own, what) in [
            ("/proc/self/ns/net", "netd's own (the node's) namespace"),
            ("/proc/1/ns/net", "the machine's namespace"),
        ] {
            if let Some(id) = file_id(Path::new(own)) {
                ids.push((id, what.to_string()));
            }
        }
        if let Ok(entries) = fs::read_dir(NETNS_DIR) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(crate::naming::NETNS_PREFIX) {
                    if let Some(id) = file_id(&e.path()) {
                        ids.push((id, format!("netd's own namespace {name}")));
                    }
                }
            }
        }
        NotTasks { ids }
    }

    /// Checks that `path` is a network namespace a task may have, with a message a user
    /// can act on (prefixed [`REFUSED`]).
    pub fn check(&self, path: &Path) -> Result<(), String> {
        check_netns_path(path).map_err(|e| format!("{REFUSED}{e}"))?;
        let Some(target) = file_id(path) else {
            return Err(format!("{REFUSED}netns {}: cannot read it", path.display()));
        };
        match self.ids.iter().find(|(id, _)| *id == target) {
            Some((_, what)) => Err(format!(
                "{REFUSED}{} is {what}, not a task's",
                path.display()
            )),
            None => Ok(()),
        }
    }
}

/// `_IO(0xb7, 0x3)` from linux/nsfs.h.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Runs `work` on a fresh thread inside `ns`, with a netlink handle bound to that namespace.
pub async fn with_netlink<F, Fut, R>(ns: &Netns, work: F) -> Result<R>
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R>> + 'static,
    R: Send + 'static,
{
    run_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("netns runtime")?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().context("open netlink socket")?;
            tokio::spawn(conn);
            work(handle).await
        })
    })
    .await
}

/// One netlink socket per namespace, opened on first use and kept: a reconcile step
/// talks to the kernel through sockets it already has, instead of a thread, a runtime
/// and a socket per operation. A socket keeps its namespace alive, so the pool lets go
/// of every namespace that is no longer wanted or no longer the one at its path
/// ([`NetlinkPool::retain`], after each step), and the kernel can free it.
#[derive(Default)]
pub struct NetlinkPool {
    entries: std::sync::Mutex<HashMap<Netns, PoolEntry>>,
}

struct PoolEntry {
    /// The namespace file's (device, inode) when the socket was opened: a namespace made
    /// anew at the same path is another namespace.
    id: Option<(u64, u64)>,
    handle: rtnetlink::Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for PoolEntry {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// The (device, inode) of the namespace at `ns` now (None: the daemon's own).
fn ns_id(ns: &Netns) -> Result<Option<(u64, u64)>> {
    match ns {
        Netns::Home => Ok(None),
        Netns::Path(p) => file_id(p)
            .map(Some)
            .with_context(|| format!("netns {} is gone", p.display())),
    }
}

impl NetlinkPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle on the socket of `ns`, opened if this is the first use (or the
    /// namespace at that path changed).
    pub async fn handle(&self, ns: &Netns) -> Result<rtnetlink::Handle> {
        let id = ns_id(ns)?;
        if let Ok(entries) = self.entries.lock() {
            if let Some(e) = entries.get(ns) {
                if e.id == id && !e.conn.is_finished() {
                    return Ok(e.handle.clone());
                }
            }
        }
        // The socket is made by a thread inside the namespace (and stays bound to it);
        // its connection runs on the daemon's runtime like any other task.
        let sock = run_in(ns, || {
            rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)
                .context("open netlink socket")
        })
        .await?;
        // SAFETY: the descriptor is a netlink socket we own (into_raw_fd gave it up).
        let sock = unsafe {
            <rtnetlink::sys::TokioSocket as std::os::fd::FromRawFd>::from_raw_fd(
                std::os::fd::IntoRawFd::into_raw_fd(sock),
            )
        };
        let (conn, handle, _) = rtnetlink::from_socket(sock);
        let entry = PoolEntry {
            id,
            handle: handle.clone(),
            conn: tokio::spawn(conn),
        };
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| anyhow!("netlink pool poisoned"))?;
        // Someone opened one meanwhile: theirs stays (a caller may be using it), ours goes.
        if let Some(e) = entries.get(ns) {
            if e.id == id && !e.conn.is_finished() {
                return Ok(e.handle.clone());
            }
        }
        entries.insert(ns.clone(), entry);
        Ok(handle)
    }

    /// Runs `work` with the socket of `ns`.
    pub async fn with<F, Fut, R>(&self, ns: &Netns, work: F) -> Result<R>
    where
        F: FnOnce(rtnetlink::Handle) -> Fut,
        Fut: Future<Output = Result<R>>,
    {
        let handle = self.handle(ns).await?;
        work(handle).await
    }

    /// Closes the socket of `ns`, if one is open (before removing the namespace).
    pub fn forget(&self, ns: &Netns) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(ns);
        }
    }

    /// Closes the sockets of namespaces `keep` does not want, and of those whose path
    /// holds another namespace now (or none).
    pub fn retain(&self, keep: impl Fn(&Netns) -> bool) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|ns, e| keep(ns) && ns_id(ns).ok() == Some(e.id));
        }
    }

    /// How many namespaces have a socket open (for `netd status` and tests).
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs a blocking closure on a fresh thread inside `ns` (for sysctl writes and sockets).
pub async fn run_in<F, R>(ns: &Netns, work: F) -> Result<R>
where
    F: FnOnce() -> Result<R> + Send + 'static,
    R: Send + 'static,
{
    let fd = ns.open()?;
    let label = format!("{ns:?}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netd-netns".into())
        .spawn(move || {
            let result = (|| {
                if let Some(fd) = fd {
                    setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("enter {label}"))?;
                }
                work()
            })();
            let _ = tx.send(result);
        })
        .context("spawn netns thread")?;
    rx.await.map_err(|_| anyhow!("netns worker thread died"))?
}

/// Makes /run/netns a shared mount point, as `ip netns add` does, so namespaces we mount
/// there are visible in every mount namespace (including `ip netns exec` shells).
fn prepare_netns_dir() -> Result<()> {
    fs::create_dir_all(NETNS_DIR).context("create /run/netns")?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared().is_err() {
        // Not a mount point yet: bind it onto itself, then share it.
        mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .context("bind /run/netns")?;
        shared().context("make /run/netns shared")?;
    }
    Ok(())
}

/// Creates the named namespace `name` (no-op if it already exists and is a namespace).
pub fn create_named(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    if check_netns_path(&path).is_ok() {
        return Ok(());
    }
    prepare_netns_dir()?;
    let path2 = path.clone();
    std::thread::Builder::new()
        .name("netd-netns-add".into())
        .spawn(move || -> Result<()> {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o444)
                .open(&path2)
                .with_context(|| format!("create {}", path2.display()))?;
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            let tid = nix::unistd::gettid();
            let own = format!("/proc/self/task/{tid}/ns/net");
            mount(
                Some(own.as_str()),
                &path2,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mount new netns on {}", path2.display()))?;
            Ok(())
        })
        .context("spawn netns creator")?
        .join()
        .map_err(|_| anyhow!("netns creator thread panicked"))?
        .inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })?;
    Ok(())
}

/// Removes the named namespace; the kernel frees it (and every interface in it) once no
/// process or mount holds it any more.
pub fn delete_named(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    if !path.exists() {
        return Ok(());
    }
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => bail!("unmount {}: {e}", path.display()),
    }
    fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))
}

/// Names of namespaces under /run/netns starting with `prefix`.
pub fn list_named(prefix: &str) -> Result<Vec<String>> {
    let mut out = vec![];
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).context("read /run/netns"),
    };
    for entry in entries {
        let name = entry.context("read /run/netns")?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) {
            out.push(name.into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Keeps the calling thread's namespace's bridges out of netfilter (br_netfilter's
/// `bridge-nf-call-*`, on by default in every namespace where the module is loaded): a
/// namespace netd filters nothing in would otherwise pay for IP hooks on every bridged
/// frame. Nothing to do where br_netfilter is absent.
pub fn bridge_netfilter_off() -> Result<()> {
    for table in ["iptables", "ip6tables", "arptables"] {
        let key = format!("net.bridge.bridge-nf-call-{table}");
        if Path::new("/proc/sys").join(key.replace('.', "/")).exists() {
            write_sysctl(&key, "0")?;
        }
    }
    Ok(())
}

/// Turns IPv6 off on interface `ifname` in the namespace of the calling thread (netd's
/// interfaces carry IPv4 only); nothing to do on a kernel without IPv6.
pub fn disable_ipv6(ifname: &str) -> Result<()> {
    if !Path::new(&format!("/proc/sys/net/ipv6/conf/{ifname}")).exists() {
        return Ok(());
    }
    write_sysctl(&format!("net.ipv6.conf.{ifname}.disable_ipv6"), "1")
}

/// Writes a sysctl in the namespace of the calling thread (/proc/sys/net is per netns).
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let current = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    if current.trim() == value {
        return Ok(());
    }
    crate::writes::count(crate::writes::Kind::Sysctl, 1);
    fs::write(&path, value).with_context(|| format!("write {path}"))
}
