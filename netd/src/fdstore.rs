//! Keeps the sockets netd serves in task namespaces open while netd itself restarts
//! (also after kill -9), so that no DNS query meets a closed port.
//!
//! A socket lives as long as some process holds it. netd hands a duplicate of each DNS
//! listener's sockets to a small process of its own, `netd fd-store` (this module's
//! [`serve`]), over a unix socket with SCM_RIGHTS, as systemd's file-descriptor store
//! does for the services it runs. While netd is away the kernel keeps queueing the
//! queries on the held sockets (a UDP socket's receive buffer, a TCP listener's
//! backlog). A starting netd takes them back ([`FdStore::open`]) before its first
//! step and answers what queued, from a record table it built before.
//!
//! The store holds sockets, and a socket keeps its namespace alive. So netd removes an
//! entry whenever it closes the listener (a task detached, or its namespace gone); and
//! while no netd is connected, the store drops every entry whose namespace path no
//! longer names the namespace the sockets were opened in, and exits when it holds
//! nothing.

use std::collections::{BTreeMap, HashMap};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};

/// Most descriptors in one entry (a task's DNS: UDP and TCP on up to two addresses).
const MAX_FDS: usize = 8;
/// Largest message (a JSON header; keys hold a namespace path).
const MAX_MESSAGE: usize = 8192;
/// How long a call waits for the store's answer before netd goes on without it.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the store, with no netd connected, looks at its entries' namespaces.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long an empty store with no netd connected waits before it exits (a netd that
/// just started it has this long to connect).
const IDLE_EXIT: Duration = Duration::from_secs(10);
/// The namespace path of entries that belong to the node itself (netd's own namespace,
/// which the store, started by netd, shares): such a namespace never goes, so these
/// entries are dropped once no netd has connected for [`OWN_HOLD`].
pub const OWN_NETNS: &str = "/proc/self/ns/net";
/// How long the node's own entries outlast netd: a restart, not a netd stopped for good.
const OWN_HOLD: Duration = Duration::from_secs(600);

/// What an entry holds: whose sockets, in which namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key {
    /// What the sockets are for, e.g. `dns`.
    pub kind: String,
    /// The owner within that kind, e.g. a task id.
    pub id: String,
    /// The namespace's path when the sockets were opened in it ...
    pub netns: String,
    /// ... and the namespace it named then (device and inode of the nsfs file).
    pub netns_dev: u64,
    pub netns_ino: u64,
}

impl Key {
    /// A key for sockets just opened in the namespace at `netns`.
    pub fn new(kind: &str, id: &str, netns: &str) -> Result<Self> {
        let (dev, ino) = netns_identity(netns)?;
        Ok(Key {
            kind: kind.into(),
            id: id.into(),
            netns: netns.into(),
            netns_dev: dev,
            netns_ino: ino,
        })
    }

    /// Whether the namespace path still names the namespace the sockets live in.
    pub fn netns_current(&self) -> bool {
        netns_identity(&self.netns).ok() == Some((self.netns_dev, self.netns_ino))
    }
}

fn netns_identity(path: &str) -> Result<(u64, u64)> {
    let m = std::fs::metadata(path).with_context(|| format!("stat {path}"))?;
    Ok((m.dev(), m.ino()))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// Hold these descriptors (replacing what the key held).
    Put { key: Key },
    /// Close what the key holds.
    Remove { key: Key },
    /// Send every entry back (each keeps being held).
    List,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Reply {
    Ok,
    Error { message: String },
    Entry { key: Key },
    End,
}

fn send(fd: RawFd, msg: &impl Serialize, fds: &[RawFd]) -> Result<()> {
    let body = serde_json::to_vec(msg)?;
    let iov = [IoSlice::new(&body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    socket::sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .context("send to the fd store")?;
    Ok(())
}

/// One message and the descriptors that came with it; None at end of stream.
fn receive<T: for<'de> Deserialize<'de>>(fd: RawFd) -> Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .context("receive from the fd store")?;
        let mut fds = vec![];
        for c in msg.cmsgs().context("control messages")? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors for this process;
                // nothing else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) || msg.flags.contains(MsgFlags::MSG_TRUNC) {
            bail!("a message to the fd store was cut short");
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..len]).context("decode an fd store message")?;
    Ok(Some((msg, fds)))
}

fn seqpacket() -> Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("unix socket")
}

fn set_timeout(fd: &OwnedFd, t: Duration) -> Result<()> {
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as i64, t.subsec_micros() as i64);
    socket::setsockopt(fd, socket::sockopt::ReceiveTimeout, &tv).context("SO_RCVTIMEO")?;
    socket::setsockopt(fd, socket::sockopt::SendTimeout, &tv).context("SO_SNDTIMEO")?;
    Ok(())
}

/// The store process: holds what netd puts, until netd removes it or its namespace is
/// gone; exits when it holds nothing and no netd has been connected for a while.
pub fn serve(path: &Path) -> Result<()> {
    serve_until_idle(path, IDLE_EXIT)
}

fn serve_until_idle(path: &Path, idle_exit: Duration) -> Result<()> {
    let listener = seqpacket()?;
    let addr = UnixAddr::new(path).context("fd store path")?;
    socket::bind(listener.as_raw_fd(), &addr)
        .with_context(|| format!("bind {}", path.display()))?;
    socket::listen(&listener, Backlog::new(4).context("backlog")?).context("listen")?;
    set_timeout(&listener, CHECK_INTERVAL)?;
    let mut held: BTreeMap<Key, Vec<OwnedFd>> = BTreeMap::new();
    let mut idle_since = Instant::now();
    loop {
        match socket::accept(listener.as_raw_fd()) {
            Ok(raw) => {
                // SAFETY: accept returned a new descriptor that only this owns.
                let conn = unsafe { OwnedFd::from_raw_fd(raw) };
                // A netd may stay quiet for as long as it likes.
                set_timeout(&conn, Duration::ZERO)?;
                if let Err(e) = serve_client(&conn, &mut held) {
                    eprintln!("netd fd-store: {e:#}");
                }
                idle_since = Instant::now();
            }
            Err(Errno::EAGAIN | Errno::EINTR) => {
                let own_expired = idle_since.elapsed() >= OWN_HOLD;
                held.retain(|k, _| k.netns_current() && !(own_expired && k.netns == OWN_NETNS));
                if held.is_empty() && idle_since.elapsed() >= idle_exit {
                    let _ = std::fs::remove_file(path);
                    return Ok(());
                }
            }
            Err(e) => return Err(anyhow!("accept on {}: {e}", path.display())),
        }
    }
}

fn serve_client(conn: &OwnedFd, held: &mut BTreeMap<Key, Vec<OwnedFd>>) -> Result<()> {
    let fd = conn.as_raw_fd();
    while let Some((req, fds)) = receive::<Request>(fd)? {
        match req {
            Request::Put { key } => {
                held.insert(key, fds);
                send(fd, &Reply::Ok, &[])?;
            }
            Request::Remove { key } => {
                held.remove(&key);
                send(fd, &Reply::Ok, &[])?;
            }
            Request::List => {
                for (key, fds) in held.iter() {
                    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                    send(fd, &Reply::Entry { key: key.clone() }, &raw)?;
                }
                send(fd, &Reply::End, &[])?;
            }
        }
    }
    Ok(())
}

/// netd's side: a connection to its node's store.
pub struct FdStore {
    conn: std::sync::Mutex<OwnedFd>,
    pid: Option<u32>,
    path: PathBuf,
}

/// What the store held when netd connected: the sockets of the netd before.
pub type Held = Vec<(Key, Vec<OwnedFd>)>;

/// Takes the entries of `kind` out of `held`.
pub fn take(held: &mut Held, kind: &str) -> Held {
    let (mine, rest) = std::mem::take(held)
        .into_iter()
        .partition(|(k, _)| k.kind == kind);
    *held = rest;
    mine
}

/// One part of netd's use of the store (a kind of entry): what it holds there, and what
/// the netd before left, until that part's first step takes it or lets it go.
pub struct Handover {
    store: std::sync::Arc<FdStore>,
    kind: &'static str,
    left: std::sync::Mutex<HashMap<String, (Key, Vec<OwnedFd>)>>,
}

impl Handover {
    /// `held`: the store's entries of `kind` when this netd connected.
    pub fn new(store: std::sync::Arc<FdStore>, kind: &'static str, held: Held) -> Self {
        let left = held
            .into_iter()
            .map(|(k, fds)| (k.id.clone(), (k, fds)))
            .collect();
        Handover {
            store,
            kind,
            left: std::sync::Mutex::new(left),
        }
    }

    pub fn store(&self) -> &FdStore {
        &self.store
    }

    /// Whether the netd before left something for `id`.
    pub fn left_for(&self, id: &str) -> bool {
        self.left.lock().is_ok_and(|l| l.contains_key(id))
    }

    /// What the netd before left for `id`, if it was opened in the namespace that
    /// `netns` still names; anything else it left for `id` is let go.
    pub fn take_left(&self, id: &str, netns: &str) -> Option<(Key, Vec<OwnedFd>)> {
        let (key, fds) = self.left.lock().ok()?.remove(id)?;
        if key.netns != netns || !key.netns_current() {
            self.release(Some(&key));
            return None;
        }
        Some((key, fds))
    }

    /// Lets go of everything the netd before left that nothing took.
    pub fn release_unclaimed(&self) {
        let unclaimed: Vec<Key> = self
            .left
            .lock()
            .map(|mut l| l.drain().map(|(_, (k, _))| k).collect())
            .unwrap_or_default();
        for k in unclaimed {
            self.release(Some(&k));
        }
    }

    /// Has the store hold duplicates of `fds` for `id`, opened in `netns`; None (and a
    /// warning: the part then works without a handover) if it cannot.
    pub fn hold(&self, id: &str, netns: &str, fds: &[BorrowedFd]) -> Option<Key> {
        let held = Key::new(self.kind, id, netns).and_then(|k| self.store.put(&k, fds).map(|()| k));
        match held {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(kind = self.kind, id, "not handed to the fd store: {e:#}");
                None
            }
        }
    }

    /// Has the store close what it holds under `key`.
    pub fn release(&self, key: Option<&Key>) {
        if let Some(k) = key {
            if let Err(e) = self.store.remove(k) {
                tracing::warn!(kind = k.kind, id = k.id, "fd store: {e:#}");
            }
        }
    }
}

impl FdStore {
    /// Connects to the store at `path` (starting one with `exe fd-store` when none
    /// answers) and takes back what it holds.
    pub fn open(path: &Path, exe: &Path) -> Result<(Self, Held)> {
        let (conn, pid) = match connect(path) {
            Ok(c) => (c, None),
            Err(_) => {
                let _ = std::fs::remove_file(path);
                let pid = spawn(path, exe)?;
                (wait_connect(path)?, Some(pid))
            }
        };
        set_timeout(&conn, CALL_TIMEOUT)?;
        let store = FdStore {
            conn: std::sync::Mutex::new(conn),
            pid,
            path: path.to_path_buf(),
        };
        let held = store.list()?;
        Ok((store, held))
    }

    /// Where the store listens, and whether this netd started it.
    pub fn describe(&self) -> String {
        match self.pid {
            Some(pid) => format!("{} (started by this netd, pid {pid})", self.path.display()),
            None => format!("{} (kept from the netd before)", self.path.display()),
        }
    }

    fn call(&self, req: &Request, fds: &[RawFd]) -> Result<()> {
        let conn = self.conn.lock().map_err(|_| anyhow!("fd store lock"))?;
        send(conn.as_raw_fd(), req, fds)?;
        match receive::<Reply>(conn.as_raw_fd())? {
            Some((Reply::Ok, _)) => Ok(()),
            Some((Reply::Error { message }, _)) => bail!("fd store: {message}"),
            other => bail!("fd store answered {:?}", other.map(|o| o.0)),
        }
    }

    /// Holds duplicates of `fds` under `key` (the caller keeps its own).
    pub fn put(&self, key: &Key, fds: &[BorrowedFd]) -> Result<()> {
        if fds.len() > MAX_FDS {
            bail!("at most {MAX_FDS} descriptors per entry, not {}", fds.len());
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.call(&Request::Put { key: key.clone() }, &raw)
    }

    /// Closes what the store holds under `key`.
    pub fn remove(&self, key: &Key) -> Result<()> {
        self.call(&Request::Remove { key: key.clone() }, &[])
    }

    fn list(&self) -> Result<Held> {
        let conn = self.conn.lock().map_err(|_| anyhow!("fd store lock"))?;
        send(conn.as_raw_fd(), &Request::List, &[])?;
        let mut out = vec![];
        loop {
            match receive::<Reply>(conn.as_raw_fd())? {
                Some((Reply::Entry { key }, fds)) => out.push((key, fds)),
                Some((Reply::End, _)) => return Ok(out),
                other => bail!("fd store answered {:?}", other.map(|o| o.0)),
            }
        }
    }
}

fn connect(path: &Path) -> Result<OwnedFd> {
    let fd = seqpacket()?;
    let addr = UnixAddr::new(path).context("fd store path")?;
    socket::connect(fd.as_raw_fd(), &addr)
        .with_context(|| format!("connect {}", path.display()))?;
    Ok(fd)
}

fn wait_connect(path: &Path) -> Result<OwnedFd> {
    let deadline = Instant::now() + CALL_TIMEOUT;
    loop {
        match connect(path) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e.context("the new fd store")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Starts `exe fd-store --socket PATH` in a session of its own, so that it outlives
/// this process (and a signal to netd's process group).
fn spawn(path: &Path, exe: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("fd-store")
        .arg("--socket")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: only setsid(2) runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {} fd-store", exe.display()))?;
    let pid = child.id();
    // Reap it when it exits while this netd runs.
    std::thread::spawn(move || child.wait());
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn sockets_outlive_their_opener_and_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fds.sock");
        let stop = path.clone();
        let server = std::thread::spawn(move || serve_until_idle(&stop, Duration::ZERO));
        let conn = wait_connect(&path).unwrap();
        set_timeout(&conn, CALL_TIMEOUT).unwrap();
        let store = FdStore {
            conn: std::sync::Mutex::new(conn),
            pid: None,
            path: path.clone(),
        };
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let key = Key::new("dns", "t1", "/proc/self/ns/net").unwrap();
        store.put(&key, &[udp.as_fd()]).unwrap();
        drop(udp);
        // The port stays bound: a query sent now waits on the held socket.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"queued", addr).unwrap();
        let mut held = store.list().unwrap();
        assert_eq!(held.len(), 1);
        let (got, fds) = held.remove(0);
        assert_eq!(got, key);
        let back = UdpSocket::from(fds.into_iter().next().unwrap());
        assert_eq!(back.local_addr().unwrap(), addr);
        let mut buf = [0u8; 16];
        let (n, _) = back.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"queued");
        // Removed, it is closed in the store too: the port is free again once ours goes.
        store.remove(&key).unwrap();
        drop(back);
        assert!(store.list().unwrap().is_empty());
        UdpSocket::bind(addr).expect("the port was released");
        // A message that is not a request is an error for that client, not the store's end.
        drop(store);
        let raw = wait_connect(&path).unwrap();
        socket::send(raw.as_raw_fd(), b"nonsense", MsgFlags::empty()).unwrap();
        drop(raw);
        let again = wait_connect(&path).unwrap();
        send(again.as_raw_fd(), &Request::List, &[]).unwrap();
        assert!(matches!(
            receive::<Reply>(again.as_raw_fd()).unwrap(),
            Some((Reply::End, _))
        ));
        drop(again);
        // Empty and alone, it exits by itself.
        server.join().unwrap().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn an_entry_whose_namespace_path_moved_on_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ns");
        std::fs::write(&f, "a").unwrap();
        let key = Key::new("dns", "t", f.to_str().unwrap()).unwrap();
        assert!(key.netns_current());
        std::fs::remove_file(&f).unwrap();
        assert!(!key.netns_current());
    }
}
