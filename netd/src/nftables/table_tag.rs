//! Reads one nftables table's comment over netfilter netlink (NFT_MSG_GETTABLE), without
//! running `nft`: the periodic checked step reads every namespace's tag, and a process
//! per namespace made netd's cost at rest grow with the node's namespaces (8% of a core
//! per node with 100 sandboxes and 170 tasks, bench/results/scale.md).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// nfnetlink's subsystem of nftables, and its messages (linux/netfilter/nfnetlink.h,
/// nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_USERDATA: u16 = 6;
/// The comment's type in a table's userdata (libnftnl's NFTNL_UDATA_TABLE_COMMENT).
const UDATA_TABLE_COMMENT: u8 = 0;
const NLMSG_ERROR: u16 = 2;
/// struct nlmsghdr, struct nfgenmsg, struct nlattr.
const NLMSG_HDR: usize = 16;
const NFGEN_HDR: usize = 4;
const NLA_HDR: usize = 4;

/// The nftables family numbers of `ip` and `bridge` (NFPROTO_IPV4, NFPROTO_BRIDGE).
pub fn family(name: &str) -> Option<u8> {
    match name {
        "ip" => Some(2),
        "bridge" => Some(7),
        _ => None,
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The GETTABLE request for table `name` of `family`.
fn request(family: u8, name: &str, seq: u32) -> Vec<u8> {
    let mut attr = name.as_bytes().to_vec();
    attr.push(0);
    let attr_len = NLA_HDR + attr.len();
    let len = NLMSG_HDR + NFGEN_HDR + align4(attr_len);
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE).to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id 0 (big-endian).
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
    m.extend_from_slice(&attr);
    m.resize(len, 0);
    m
}

/// What one answer says: Ok(None) for no such table, Ok(Some(comment or "")) for a
/// table, Err for anything else.
fn parse(answer: &[u8]) -> io::Result<Option<String>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(answer.get(at..at + 2)?.try_into().ok()?))
    };
    let len = answer
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| bad("short netlink answer"))? as usize;
    let kind = u16_at(4).ok_or_else(|| bad("short netlink answer"))?;
    let msg = answer
        .get(..len)
        .ok_or_else(|| bad("netlink answer shorter than its length"))?;
    if kind == NLMSG_ERROR {
        // struct nlmsgerr: a negative errno, then the request's header.
        let errno = msg
            .get(NLMSG_HDR..NLMSG_HDR + 4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_ne_bytes)
            .ok_or_else(|| bad("short netlink error"))?;
        return match -errno {
            0 => Err(bad("an acknowledgement instead of the table")),
            libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != ((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE) {
        return Err(bad("an unexpected netlink message"));
    }
    // Attributes after the nfgenmsg, each padded to 4 bytes.
    let mut at = NLMSG_HDR + NFGEN_HDR;
    while at + NLA_HDR <= msg.len() {
        let alen = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
        let atype = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]) & 0x3fff;
        if alen < NLA_HDR || at + alen > msg.len() {
            return Err(bad("a malformed netlink attribute"));
        }
        if atype == NFTA_TABLE_USERDATA {
            return Ok(Some(
                comment(&msg[at + NLA_HDR..at + alen]).unwrap_or_default(),
            ));
        }
        at += align4(alen);
    }
    Ok(Some(String::new()))
}

/// The comment in a table's userdata: type-length-value records of one byte each.
fn comment(udata: &[u8]) -> Option<String> {
    let mut at = 0;
    while at + 2 <= udata.len() {
        let (kind, len) = (udata[at], udata[at + 1] as usize);
        let value = udata.get(at + 2..at + 2 + len)?;
        if kind == UDATA_TABLE_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or(&[]);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        at += 2 + len;
    }
    None
}

/// The comment of table `name` of `family` in the calling thread's namespace: None if
/// there is no such table, "" if it has no comment.
pub fn table_comment(family: u8, name: &str) -> io::Result<Option<String>> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval, which `tv` is.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let req = request(family, name, 1);
    // SAFETY: send(2) of `req`, its length (the kernel is the default destination).
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 16384];
    // SAFETY: recv(2) into `buf`, at most its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    parse(&buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NEWTABLE answer as the kernel writes it for `table ip netd { comment "..." }`.
    fn answer(comment: Option<&str>) -> Vec<u8> {
        let mut attrs = vec![];
        let mut put = |t: u16, v: &[u8]| {
            attrs.extend_from_slice(&((NLA_HDR + v.len()) as u16).to_ne_bytes());
            attrs.extend_from_slice(&t.to_ne_bytes());
            attrs.extend_from_slice(v);
            attrs.resize(align4(attrs.len()), 0);
        };
        put(NFTA_TABLE_NAME, b"netd\0");
        put(2, &0u32.to_be_bytes());
        if let Some(c) = comment {
            let mut u = vec![UDATA_TABLE_COMMENT, (c.len() + 1) as u8];
            u.extend_from_slice(c.as_bytes());
            u.push(0);
            put(NFTA_TABLE_USERDATA, &u);
        }
        let len = NLMSG_HDR + NFGEN_HDR + attrs.len();
        let mut m = vec![];
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[2, 0, 0, 0]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn reads_the_comment_of_a_table_and_tells_a_missing_one() {
        assert_eq!(
            parse(&answer(Some("netd:abc123"))).unwrap(),
            Some("netd:abc123".into())
        );
        assert_eq!(parse(&answer(None)).unwrap(), Some(String::new()));
        let mut err = vec![];
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        assert_eq!(parse(&err).unwrap(), None);
        // Garbage is an error, never a panic.
        assert!(parse(&[1, 2, 3]).is_err());
        let mut torn = answer(Some("netd:x"));
        torn.truncate(torn.len() - 3);
        assert!(parse(&torn).is_err());
    }

    /// Against the kernel, in a namespace of its own (root and `nft` needed, as for the
    /// lab): what `nft` wrote is what netlink reads back.
    #[test]
    fn reads_back_what_nft_wrote() {
        let got = std::thread::spawn(|| -> Result<_, String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare a network namespace (needs root): {e}"))?;
            let before = table_comment(2, "netd").map_err(|e| e.to_string())?;
            let out = std::process::Command::new("nft")
                .args(["add table ip netd { comment \"netd:t4g\" ; }"])
                .output()
                .map_err(|e| format!("run nft (package nftables): {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            let after = table_comment(2, "netd").map_err(|e| e.to_string())?;
            let other = table_comment(7, "netd").map_err(|e| e.to_string())?;
            Ok((before, after, other))
        })
        .join()
        .unwrap();
        let (before, after, other) = got.unwrap();
        assert_eq!(before, None);
        assert_eq!(after, Some("netd:t4g".into()));
        assert_eq!(other, None, "no bridge table was made");
    }

    #[test]
    fn the_request_names_the_table() {
        let r = request(7, "netd", 9);
        assert_eq!(r.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize,
            r.len()
        );
        assert_eq!(r[16], 7);
        assert_eq!(&r[24..29], b"netd\0");
    }
}
