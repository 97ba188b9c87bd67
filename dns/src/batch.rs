//! Batched UDP I/O: `recvmmsg` takes up to [`BATCH`] queued queries in one system call
//! and `sendmmsg` sends their answers in one more. A stub resolver under load keeps many
//! queries in flight, so the socket usually holds several: two system calls per batch
//! instead of two per query is most of what separates a fast DNS server from a slow one.
//!
//! The message headers hold raw pointers into the buffers, so they are built inside each
//! (synchronous) call and never kept across an `.await`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

/// Queries taken per system call.
pub const BATCH: usize = 16;
/// Bytes per query slot: a query larger than this is cut (and then FORMERR).
pub const SLOT: usize = 2048;

/// Receive slots: BATCH buffers of SLOT bytes with their sources.
pub struct Inbox {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_in>,
    lens: [usize; BATCH],
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            bufs: vec![0u8; BATCH * SLOT],
            // SAFETY: sockaddr_in is plain data; all zeroes is a valid value.
            addrs: vec![unsafe { zeroed() }; BATCH],
            lens: [0; BATCH],
        }
    }
}

impl Inbox {
    /// Query `i` of the last batch and where it came from.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr) {
        let a = &self.addrs[i];
        let from = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        ));
        (&self.bufs[i * SLOT..i * SLOT + self.lens[i]], from)
    }

    /// Takes up to BATCH datagrams without blocking; WouldBlock when there are none.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: iovec and mmsghdr are plain data; zeroes are valid before we fill them.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            iovs[i] = libc::iovec {
                // SAFETY: slot i lies inside `bufs` (BATCH * SLOT bytes).
                iov_base: unsafe { base.add(i * SLOT) }.cast(),
                iov_len: SLOT,
            };
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: every header points at live buffers owned by `self` or this frame, with
        // their true sizes; the kernel writes only within them.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, h) in self.lens.iter_mut().zip(&hdrs).take(n) {
            *len = (h.msg_len as usize).min(SLOT);
        }
        Ok(n)
    }
}

/// Answers waiting to go out in one `sendmmsg`.
#[derive(Default)]
pub struct Outbox {
    bytes: Vec<u8>,
    /// (offset, length, destination) of each answer in `bytes`.
    items: Vec<(usize, usize, SocketAddr)>,
}

fn sockaddr(a: SocketAddr) -> Option<libc::sockaddr_in> {
    let SocketAddr::V4(v4) = a else {
        return None;
    };
    // SAFETY: plain data, all zeroes valid.
    let mut s: libc::sockaddr_in = unsafe { zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = v4.port().to_be();
    s.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
    Some(s)
}

impl Outbox {
    pub fn push(&mut self, answer: &[u8], to: SocketAddr) {
        self.items.push((self.bytes.len(), answer.len(), to));
        self.bytes.extend_from_slice(answer);
    }

    /// Appends an answer built in place by `fill` (which writes after the returned
    /// offset), so a cached answer needs no copy of its own.
    pub fn push_with(&mut self, to: SocketAddr, fill: impl FnOnce(&mut Vec<u8>)) {
        let start = self.bytes.len();
        fill(&mut self.bytes);
        self.items.push((start, self.bytes.len() - start, to));
    }

    /// Sends everything queued, without blocking. Answers the socket cannot take right
    /// now are dropped, as a full socket drops datagrams: the client asks again.
    pub fn flush(&mut self, fd: RawFd) {
        let mut sent = 0;
        while sent < self.items.len() {
            let chunk = &self.items[sent..(sent + BATCH).min(self.items.len())];
            // SAFETY: plain data, zeroes valid before we fill them.
            let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
            let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
            let mut addrs: [libc::sockaddr_in; BATCH] = unsafe { zeroed() };
            let mut count = 0;
            for (off, len, to) in chunk {
                let Some(sa) = sockaddr(*to) else { continue };
                addrs[count] = sa;
                iovs[count] = libc::iovec {
                    // SAFETY: off..off+len lies inside `bytes`; sendmmsg only reads it.
                    iov_base: unsafe { self.bytes.as_ptr().add(*off) } as *mut libc::c_void,
                    iov_len: *len,
                };
                hdrs[count].msg_hdr.msg_iov = &mut iovs[count];
                hdrs[count].msg_hdr.msg_iovlen = 1;
                hdrs[count].msg_hdr.msg_name = (&mut addrs[count] as *mut libc::sockaddr_in).cast();
                hdrs[count].msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
                count += 1;
            }
            // SAFETY: the headers point at live buffers of this frame and `self.bytes`.
            let n =
                unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), count as u32, libc::MSG_DONTWAIT) };
            if n <= 0 {
                break; // full (or gone): drop the rest of this round
            }
            sent += chunk.len();
        }
        self.bytes.clear();
        self.items.clear();
    }
}
