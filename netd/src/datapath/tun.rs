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

/// What kind of device [`open`] makes or opens, and how its packets are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// A TAP device: every packet has an Ethernet header (a TUN device's start at the
    /// IP header). The kernel takes a UDP tunnel super-packet only from a TAP device:
    /// it checks the offsets of one against an Ethernet header.
    pub tap: bool,
    /// Every packet read or written has a virtio-net header before it (what lets a
    /// writer hand the kernel a super-packet to segment).
    pub vnet_hdr: bool,
}

impl Mode {
    /// A plain TUN device: IP packets, no header before them.
    pub const TUN: Mode = Mode {
        tap: false,
        vnet_hdr: false,
    };

    /// The `ifreq` flags of a device opened in this mode.
    fn flags(self) -> libc::c_short {
        let mut flags = libc::IFF_NO_PI;
        flags |= if self.tap {
            libc::IFF_TAP
        } else {
            libc::IFF_TUN
        };
        if self.vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        flags as libc::c_short
    }

    /// Whether a device with `flags` (from TUNGETIFF) was opened in this mode.
    fn matches(self, flags: libc::c_short) -> bool {
        let mask = (libc::IFF_TUN | libc::IFF_TAP | libc::IFF_VNET_HDR) as libc::c_short;
        flags & mask == self.flags() & mask
    }
}

/// Opens TUN or TAP device `name` in the calling thread's namespace, creating it
/// (persistent, so that it and its routes stay while netd restarts) if it is not
/// there. A device of the other kind by that name is refused (EINVAL).
pub fn open(name: &str, mode: Mode) -> io::Result<OwnedFd> {
    // SAFETY: a plain open(2) of a constant, NUL-terminated path.
    let fd = check(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name, mode.flags())?;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is (and outlives the call).
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) })?;
    Ok(fd)
}

/// Sets the virtio-net header size of a device opened with `vnet_hdr`, and the
/// offloads it offers its reader (`TUN_F_*`): the kernel then hands over super-packets
/// it would otherwise have cut. False if the kernel refused the offloads (the device
/// then offers none).
pub fn set_offloads(fd: BorrowedFd, hdr_len: usize, offloads: libc::c_uint) -> io::Result<bool> {
    let len = libc::c_int::try_from(hdr_len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "header size"))?;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) })?;
    // SAFETY: TUNSETOFFLOAD takes its flags by value.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            offloads as libc::c_ulong,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    // SAFETY: as above.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) })?;
    Ok(false)
}

/// The descriptor of device `name` the netd before left in the fd store under `id`
/// (opened in `netns`), if it is one descriptor of that device still, opened in `mode`;
/// anything else left under `id` is let go (the store closes its copy before this
/// returns, so the device can be opened again).
pub fn take_held(
    h: &crate::fdstore::Handover,
    id: &str,
    netns: &str,
    name: &str,
    mode: Mode,
) -> Option<(crate::fdstore::Key, OwnedFd)> {
    let (key, fds) = h.take_left(id, netns)?;
    let wanted = |fd: &OwnedFd| {
        attached(fd.as_fd()).is_ok_and(|(n, flags)| n == name && mode.matches(flags))
    };
    match <[OwnedFd; 1]>::try_from(fds) {
        Ok([fd]) if wanted(&fd) => Some((key, fd)),
        _ => {
            // Ours closes as it goes out of scope, the store's now.
            h.release(Some(&key));
            None
        }
    }
}

/// The name of the TUN or TAP device a descriptor is attached to, and its flags (to
/// check a held one).
pub fn attached(fd: BorrowedFd) -> io::Result<(String, libc::c_short)> {
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
    Ok((String::from_utf8_lossy(&name).into_owned(), req.flags))
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

    /// Waits for a packet, then reads those waiting, up to one per buffer of `bufs`
    /// (each one's length into `lens`) and `budget` bytes in all, without waiting
    /// again; returns how many.
    pub async fn recv_many(
        &self,
        bufs: &mut [Vec<u8>],
        lens: &mut [usize],
        budget: usize,
    ) -> io::Result<usize> {
        loop {
            let mut guard = self.io.readable().await?;
            let (mut n, mut bytes) = (0, 0);
            while let (Some(buf), Some(len), true) =
                (bufs.get_mut(n), lens.get_mut(n), bytes < budget)
            {
                // SAFETY: read(2) into `buf`, at most its length.
                let r = guard.try_io(|fd| {
                    check_len(unsafe {
                        libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                    })
                });
                match r {
                    Ok(Ok(read)) => {
                        *len = read;
                        bytes += read;
                        n += 1;
                    }
                    Ok(Err(e)) if n == 0 => return Err(e),
                    // What was read goes first; the error comes again at the next read.
                    Ok(Err(_)) => return Ok(n),
                    // Nothing more waiting (the readiness is cleared).
                    Err(_) => break,
                }
            }
            if n > 0 {
                return Ok(n);
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
