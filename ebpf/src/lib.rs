//! netd's eBPF programs, written in C (bpf/), built by build.rs with clang, and their
//! shared map layouts mirrored in Rust ([`maps`]). Attaching and filling the maps is
//! netd's job (netd/src/datapath/ebpf.rs); this crate only knows how to load them.
//!
//! `sock_lb`: socket-level VIP load balancing (cgroup connect4 / sendmsg4 / recvmsg4 /
//! getpeername4). Its maps are pinned by name, so every loader gives a directory on a
//! bpffs: the same directory after a restart finds the same maps.

use std::io;
use std::path::Path;

use aya::{Ebpf, EbpfError, EbpfLoader};

pub mod maps;
pub mod relink;

/// The compiled `sock_lb` object (ELF with BTF), aligned as aya's loader wants it.
pub static SOCK_LB: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.o"));

/// The programs in [`SOCK_LB`], by section, as the loader attaches them.
pub const SOCK_LB_PROGRAMS: &[&str] = &[
    "netd_connect4",
    "netd_sendmsg4",
    "netd_recvmsg4",
    "netd_getpeername4",
];

/// The maps of [`SOCK_LB`]; each is pinned under the loader's directory by this name.
pub const SOCK_LB_MAPS: &[&str] = &[
    "netd_netns",
    "netd_vips",
    "netd_backends",
    "netd_rr",
    "netd_revnat",
    "netd_udp_flows",
    "netd_counters",
];

/// The netns cookie of the calling thread's network namespace, as
/// `bpf_get_netns_cookie` reports it for sockets there (`netd_netns` is keyed by it).
pub fn current_netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("SO_NETNS_COOKIE: {e}")));
    }
    Ok(cookie)
}

/// The compiled `ingress_xdp` object: the routing mesh's fast path (XDP on the node's
/// underlay interface).
pub static INGRESS_XDP: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ingress_xdp.o"));

/// The program in [`INGRESS_XDP`].
pub const INGRESS_XDP_PROGRAM: &str = "netd_ingress";

/// The compiled `wire_peer` object (section `xdp`): what the lab runs on the far end of
/// a veth whose near end runs [`INGRESS_XDP`] in native mode, for the frames it sends
/// back to reach the wire at all.
pub static WIRE_PEER: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wire_peer.o"));

/// The maps of [`INGRESS_XDP`], pinned by name like sock_lb's.
pub const INGRESS_XDP_MAPS: &[&str] = &[
    "netd_ingress_cfg",
    "netd_ports",
    "netd_mesh_backends",
    "netd_mesh_rr",
    "netd_flows_fwd",
    "netd_flows_rev",
    "netd_flows_fwd_new",
    "netd_flows_rev_new",
    "netd_xdp_stats",
    "netd_xdp_flow_stats",
];

/// The flow tables of [`INGRESS_XDP`] (LRU hashes of 131072 entries each): confirmed
/// flows (forward, reverse), then unconfirmed ones (forward, reverse). A new flow enters
/// the unconfirmed tables and moves to the confirmed ones when the client sends again
/// after the task's answer came back from the task's VTEP (TCP: an ACK of the task's
/// SYN-ACK, ack_seq = its ISN + 1; UDP, more weakly: any datagram from the same
/// 4-tuple), so a flood of flows that are never answered, or of TCP flows from spoofed
/// sources, churns only the unconfirmed tables.
pub const INGRESS_XDP_FLOW_MAPS: &[&str] = &[
    "netd_flows_fwd",
    "netd_flows_rev",
    "netd_flows_fwd_new",
    "netd_flows_rev_new",
];

/// Loads [`INGRESS_XDP`] with its maps pinned in `pin_dir`, as [`load_sock_lb`] does.
pub fn load_ingress_xdp(pin_dir: &Path) -> Result<Ebpf, EbpfError> {
    load_ingress_xdp_sized(pin_dir, None)
}

/// As [`load_ingress_xdp`], with each of the flow tables ([`INGRESS_XDP_FLOW_MAPS`])
/// made `flow_entries` entries large instead of the object's size: for tests that
/// overflow them (netd takes it from `NETD_XDP_FLOW_ENTRIES`). Maps already pinned in
/// `pin_dir` keep the size they were made with.
pub fn load_ingress_xdp_sized(
    pin_dir: &Path,
    flow_entries: Option<u32>,
) -> Result<Ebpf, EbpfError> {
    load_ingress_xdp_with(
        pin_dir,
        &IngressOptions {
            flow_entries,
            ..Default::default()
        },
    )
}

/// What a loader of [`INGRESS_XDP`] may set otherwise than the object does.
#[derive(Debug, Clone, Copy, Default)]
pub struct IngressOptions {
    /// The size of each flow table (see [`load_ingress_xdp_sized`]).
    pub flow_entries: Option<u32>,
    /// How long a UDP flow may go without a packet before it is forgotten (and its
    /// client's next datagram makes a new pick); the object's own is about 120 s.
    /// Rounded up to the program's units of 2^30 ns.
    pub udp_idle: Option<std::time::Duration>,
}

/// The object's own UDP idle time, in its units (`udp_idle_units` in ingress_xdp.c:
/// about 120 s).
pub const UDP_IDLE_UNITS: u32 = 112;

/// The program's units (2^30 ns) for `d`, rounded up: what its flows' last-seen stamps
/// count in.
pub fn seen_units(d: std::time::Duration) -> u32 {
    let units = d.as_nanos().div_ceil(1 << 30);
    units.min(u128::from(maps::FLOW_SEEN_MASK)) as u32
}

/// As [`load_ingress_xdp`], with `options`.
pub fn load_ingress_xdp_with(pin_dir: &Path, options: &IngressOptions) -> Result<Ebpf, EbpfError> {
    unpin_reshaped(pin_dir, INGRESS_XDP_RESHAPED)?;
    unpin_retyped(pin_dir, INGRESS_XDP_RETYPED)?;
    // Older netds' map of each node's ingress address: the task's port answers now.
    let retired = pin_dir.join("netd_mesh_vias");
    if retired.exists() {
        std::fs::remove_file(&retired).map_err(|e| EbpfError::FileError {
            path: retired.clone(),
            error: e,
        })?;
    }
    let mut loader = EbpfLoader::new();
    if let Some(n) = options.flow_entries {
        for name in INGRESS_XDP_FLOW_MAPS {
            loader.map_max_entries(name, n);
        }
    }
    let idle;
    if let Some(d) = options.udp_idle {
        idle = seen_units(d);
        loader.override_global("udp_idle_units", &idle, true);
    }
    load_pinned(&mut loader, INGRESS_XDP, pin_dir)
}

/// The compiled `task_port` object: the routing mesh's way back, on the ports of
/// published tasks in the ingress network's sandbox (TC, both directions).
pub static TASK_PORT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/task_port.o"));

/// The program of [`TASK_PORT`] for frames on their way to the task (the port's egress).
pub const TASK_PORT_TO_TASK: &str = "netd_to_task";
/// The program of [`TASK_PORT`] for frames from the task (the port's ingress).
pub const TASK_PORT_FROM_TASK: &str = "netd_from_task";

/// Loads [`TASK_PORT`] with its maps pinned by name in `pin_dir`, as [`load_sock_lb`]
/// does: a restarted netd finds the flows it remembered.
pub fn load_task_port(pin_dir: &Path) -> Result<Ebpf, EbpfError> {
    unpin_reshaped(pin_dir, TASK_PORT_RESHAPED)?;
    unpin_retyped(pin_dir, TASK_PORT_RETYPED)?;
    load_pinned(&mut EbpfLoader::new(), TASK_PORT, pin_dir)
}

/// As [`INGRESS_XDP_RETYPED`], for [`TASK_PORT`]: its flows were an LRU hash.
const TASK_PORT_RETYPED: &[(&str, aya::maps::MapType)] =
    &[("netd_return_flows", aya::maps::MapType::Hash)];

/// As [`INGRESS_XDP_RESHAPED`], for [`TASK_PORT`].
const TASK_PORT_RESHAPED: &[(&str, usize, usize, u32)] = &[
    // 4 counters before stray.
    (
        "netd_return_stats",
        std::mem::size_of::<u32>(),
        std::mem::size_of::<u64>(),
        maps::RETURN_COUNTERS,
    ),
];

/// Maps of [`INGRESS_XDP`] whose shape changed since an older netd could have pinned
/// them, with what this version needs: (name, key size, value size, least entries). aya
/// reuses a pinned map by name without looking at its shape, so the program would meet
/// the old map: the verifier refuses a program that reads past a key's or value's end
/// (and netd could not load it at all), and an index past an array's end is silently
/// never counted. Add a map here whenever its key or value changes size or an array
/// gains entries.
const INGRESS_XDP_RESHAPED: &[(&str, usize, usize, u32)] = &[
    // 16 bytes before the config held its flags (the client source) and the ingress
    // network's mask.
    (
        "netd_ingress_cfg",
        std::mem::size_of::<u32>(),
        std::mem::size_of::<maps::IngressConfig>(),
        1,
    ),
    // 16 bytes before the SYN-ACK's sequence number was kept.
    (
        "netd_flows_fwd_new",
        std::mem::size_of::<maps::FlowKey>(),
        std::mem::size_of::<maps::FlowFwdNew>(),
        1,
    ),
    // Keyed by {task, target port, translation port} (12 bytes) before flows could keep
    // the client's address: their established flows are forgotten with them.
    (
        "netd_flows_rev",
        std::mem::size_of::<maps::FlowTuple>(),
        std::mem::size_of::<maps::FlowRev>(),
        1,
    ),
    (
        "netd_flows_rev_new",
        std::mem::size_of::<maps::FlowTuple>(),
        std::mem::size_of::<maps::FlowRev>(),
        1,
    ),
    // 4 counters before wrong_vtep and bad_ack, 6 before expired, 7 before too_big, 8
    // before icmp_relayed.
    (
        "netd_xdp_flow_stats",
        std::mem::size_of::<u32>(),
        std::mem::size_of::<u64>(),
        maps::FLOWS_COUNTERS,
    ),
];

/// Maps of [`INGRESS_XDP`] whose type changed since an older netd could have pinned
/// them, with the type this version needs: aya reuses a pinned map by name whatever its
/// type, and the program would keep an LRU table's evictions. The established flow
/// tables were LRU hashes before an idle connection had to survive any load.
const INGRESS_XDP_RETYPED: &[(&str, aya::maps::MapType)] = &[
    ("netd_flows_fwd", aya::maps::MapType::Hash),
    ("netd_flows_rev", aya::maps::MapType::Hash),
];

/// Removes the pins in `pin_dir` of maps `retyped` ([`INGRESS_XDP_RETYPED`]) finds of
/// another type, so that loading makes them afresh (what they held is lost).
fn unpin_retyped(pin_dir: &Path, retyped: &[(&str, aya::maps::MapType)]) -> Result<(), EbpfError> {
    for (name, wanted) in retyped {
        let pin = pin_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else {
            continue;
        };
        if info.map_type().is_ok_and(|t| t == *wanted) {
            continue;
        }
        remove_pin(&pin)?;
    }
    Ok(())
}

/// Removes a map's pin, so that loading makes the map afresh.
fn remove_pin(pin: &Path) -> Result<(), EbpfError> {
    std::fs::remove_file(pin).map_err(|e| EbpfError::FileError {
        path: pin.to_path_buf(),
        error: e,
    })
}

/// Removes the pins in `pin_dir` of maps `reshaped` ([`INGRESS_XDP_RESHAPED`]) finds in
/// an older shape, so that loading makes them afresh: what they held (flows, counters)
/// is lost, and a program still attached keeps the maps it has.
fn unpin_reshaped(pin_dir: &Path, reshaped: &[(&str, usize, usize, u32)]) -> Result<(), EbpfError> {
    for (name, key_size, value_size, min_entries) in reshaped {
        let pin = pin_dir.join(name);
        if !pin.exists() {
            continue;
        }
        // Not a map the kernel can describe: the loader reports it.
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else {
            continue;
        };
        if info.key_size() as usize == *key_size
            && info.value_size() as usize == *value_size
            && info.max_entries() >= *min_entries
        {
            continue;
        }
        remove_pin(&pin)?;
    }
    Ok(())
}

/// Where bpffs is mounted on Linux.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at [`BPFFS`] unless it is there already: pins need it, and some
/// machines do not mount it at boot.
pub fn ensure_bpffs() -> io::Result<()> {
    let path = std::ffi::CString::new(BPFFS).map_err(io::Error::other)?;
    // SAFETY: statfs writes into a zeroed struct of the right type; path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = c"bpf";
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mount bpffs on {BPFFS}: {e}"),
        ));
    }
    Ok(())
}

/// Loads [`SOCK_LB`] with its maps pinned in `pin_dir` (created if missing): maps pinned
/// there already are reused, with their contents. Programs are not loaded into the
/// kernel yet; the caller loads (verifies) and attaches the ones it needs.
pub fn load_sock_lb(pin_dir: &Path) -> Result<Ebpf, EbpfError> {
    load_pinned(&mut EbpfLoader::new(), SOCK_LB, pin_dir)
}

/// Loads `object` with `loader`, its by-name pinned maps in `pin_dir` (created if
/// missing).
fn load_pinned(
    loader: &mut EbpfLoader<'_>,
    object: &[u8],
    pin_dir: &Path,
) -> Result<Ebpf, EbpfError> {
    std::fs::create_dir_all(pin_dir).map_err(|e| EbpfError::FileError {
        path: pin_dir.to_path_buf(),
        error: e,
    })?;
    loader.default_map_pin_directory(pin_dir).load(object)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn idle_times_round_up_to_the_programs_units() {
        assert_eq!(super::seen_units(Duration::from_secs(1)), 1);
        assert_eq!(super::seen_units(Duration::from_nanos((1 << 30) + 1)), 2);
        // The object's default, 112 units, is about 120 s.
        assert_eq!(super::seen_units(Duration::from_secs(120)), 112);
        assert_eq!(super::seen_units(Duration::from_secs(u64::MAX)), 0xff_ffff);
    }
}
