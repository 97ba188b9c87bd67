//! netd's eBPF programs, written in C (bpf/), built by build.rs with clang, and their
//! shared map layouts mirrored in Rust ([`maps`]). Loading and attaching is netd's job,
//! with aya.
//!
//! So far: `sock_lb`, socket-level VIP load balancing (cgroup connect4 / sendmsg4 /
//! recvmsg4 / getpeername4). It is built and passes the kernel's verifier (tests/), but
//! netd does not load it yet: `netd status` still says `datapath: none`.

pub mod maps;

/// The compiled `sock_lb` object (ELF with BTF), aligned as aya's loader wants it.
pub static SOCK_LB: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.o"));

/// The programs in [`SOCK_LB`], by section, as the loader attaches them.
pub const SOCK_LB_PROGRAMS: &[&str] = &[
    "netd_connect4",
    "netd_sendmsg4",
    "netd_recvmsg4",
    "netd_getpeername4",
];
