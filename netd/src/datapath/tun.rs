//! The userspace datapath's TUN device, opened by netd itself so that its descriptor can
//! outlive netd: handed to the fd store (see [`crate::fdstore`]) and taken back by the
//! next netd. While no netd runs, the kernel queues the sandbox's packets on the held
//! descriptor (up to the device's queue length) instead of dropping them, so a client's
//! SYN sent during a restart is answered when the new netd reads it, not after the
//! client's retransmission timer (1 s, then 3 s, 7 s ...).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// One queue of a TUN device (no packet information header: each read is one IP packet).
pub struct Tun {
    io: AsyncFd<OwnedFd>,
}

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    /// The rest of the kernel's union (24 bytes in all on 64-bit).
    pad: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_short) -> io::Result<IfReq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_len(ret: isize) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Opens TUN device `name` in the calling thread's namespace, creating it (persistent,
/// so that it and its routes stay while netd restarts) if it is not there.
pub fn open(name: &str) -> io::Result<OwnedFd> {
    // SAFETY: a plain open(2) of a constant, NUL-terminated path.
    let fd = check(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name, (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short)?;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is (and outlives the call).
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) })?;
    Ok(fd)
}

/// The name of the TUN device a descriptor is attached to (to check a held one).
pub fn name_of(fd: BorrowedFd) -> io::Result<String> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes one ifreq into `req`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) })?;
    let name: Vec<u8> = req
        .name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&name).into_owned())
}

impl Tun {
    /// Serves `fd` (from [`open`] or held) on the current tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // A held descriptor comes back with its flags as the netd before left them.
        // SAFETY: F_GETFL/F_SETFL on a descriptor this owns.
        let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
        // SAFETY: the AsyncFd owns `fd`, which therefore stays open and the same for
        // the AsyncFd's whole life.
        let io = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Tun { io })
    }

    /// Reads one packet.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.io.readable().await?;
            // SAFETY: read(2) into `buf`, at most its length.
            let r = guard.try_io(|fd| {
                check_len(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
            });
            if let Ok(r) = r {
                return r;
            }
        }
    }

    /// Writes one packet.
    pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.io.writable().await?;
            // SAFETY: write(2) of `buf`, its length.
            let r = guard.try_io(|fd| {
                check_len(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
            });
            if let Ok(r) = r {
                return r;
            }
        }
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.io.get_ref().as_fd()
    }
}
