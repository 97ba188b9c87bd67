//! The benches' loads. Each is bounded twice, by a request count and by a duration, and
//! runs its client threads inside the namespace it is given (each thread enters it), so
//! the load leaves from a task or host of the lab like real clients would. Requests and
//! connections go through the load engine every user and test has (`netd_lab::load`);
//! only the raw UDP flood, a packet generator with nothing to answer, is its own.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netd_lab::in_netns;
use netd_lab::load::{self, Spec, Target};

/// What a load run achieved.
#[derive(Debug, Clone)]
pub struct Run {
    pub requests: u64,
    pub elapsed: Duration,
    /// Per-request latencies (the engine's uniform sample, 200,000 at most).
    pub latencies: Vec<Duration>,
    /// Connections or requests that failed (refused, reset, timed out); the run goes on
    /// after one, so a path that fails now and then shows it instead of ending the bench.
    pub failures: u64,
    /// The first failure's error, for the report.
    pub first_failure: Option<String>,
}

impl Run {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A run of the load engine ([`netd_lab::load`], the one `netd-bench load` and the
/// lab's tests use) from `netns`, to its end.
fn engine(netns: &str, spec: Spec) -> Result<Run> {
    let r = load::run(
        &Spec {
            netns: Some(netns.to_string()),
            ..spec
        },
        |_| {},
    )?;
    Ok(Run {
        requests: r.requests,
        elapsed: Duration::from_secs_f64(r.elapsed_s),
        failures: r.failed(),
        first_failure: r.first_failure,
        latencies: r.samples,
    })
}

/// The first of `addrs`, the target every connection goes to unless spread.
fn first(addrs: &[SocketAddr]) -> Result<SocketAddr> {
    addrs.first().copied().context("no address to load")
}

/// HTTP/1.1 requests over `conns` keep-alive connections from `netns` to `addr`, until
/// `duration` passes or `max_requests` are done.
pub fn http_keepalive(
    netns: &str,
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    max_requests: u64,
) -> Result<Run> {
    http_keepalive_to(netns, &[addr], conns, duration, max_requests)
}

/// As [`http_keepalive`], connection `i` to `addrs[i % addrs.len()]`: the same load
/// spread over several servers (the tasks a load balancer would spread it over). A
/// failed request counts, and the next one goes over a new connection.
pub fn http_keepalive_to(
    netns: &str,
    addrs: &[SocketAddr],
    conns: usize,
    duration: Duration,
    max_requests: u64,
) -> Result<Run> {
    let spec = Spec {
        connections: conns,
        duration,
        max_requests: Some(max_requests),
        spread: addrs.to_vec(),
        ..Spec::new(Target::Http(first(addrs)?, "/".into()))
    };
    engine(netns, spec)
}

/// New connections from `netns` to `addr` over `threads` client threads, each opening a
/// connection, doing one HTTP GET and closing it with a reset (SO_LINGER 0, so no
/// TIME_WAIT piles up and exhausts the client's ports), until `duration` passes or
/// `max_conns` are done. Latencies are per connection (connect + request).
pub fn new_connections(
    netns: &str,
    addr: SocketAddr,
    threads: usize,
    duration: Duration,
    max_conns: u64,
) -> Result<Run> {
    new_connections_to(netns, &[addr], threads, duration, max_conns)
}

/// As [`new_connections`], thread `i` to `addrs[i % addrs.len()]`.
pub fn new_connections_to(
    netns: &str,
    addrs: &[SocketAddr],
    threads: usize,
    duration: Duration,
    max_conns: u64,
) -> Result<Run> {
    let spec = Spec {
        connections: threads,
        duration,
        new_connections: true,
        reset_close: true,
        max_requests: Some(max_conns),
        spread: addrs.to_vec(),
        ..Spec::new(Target::Http(first(addrs)?, "/".into()))
    };
    engine(netns, spec)
}

/// Tries to connect from `netns` to `addr` every few milliseconds until it works or
/// `limit` passes; returns how long it took (None if it never worked).
pub fn first_connect(
    netns: &str,
    addr: SocketAddr,
    limit: Duration,
) -> Result<Option<(Duration, u32)>> {
    in_netns(netns, move || {
        let start = Instant::now();
        let mut attempts = 0;
        while start.elapsed() < limit {
            attempts += 1;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(20)).is_ok() {
                return Ok(Some((start.elapsed(), attempts)));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(None)
    })
}

/// Waits until a connect from `netns` to `addr` fails (the target was withdrawn).
pub fn until_unreachable(netns: &str, addr: SocketAddr, limit: Duration) -> Result<bool> {
    in_netns(netns, move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_err() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(false)
    })
}

/// UDP request/answer round trips from `netns` to `addr` over `threads` sockets (one
/// flow each), until `duration` passes or `max` are asked: each socket sends one
/// datagram and waits for its answer. A datagram lost (no answer in 200 ms) counts as a
/// timeout, not as a round trip.
pub fn udp_round_trips(
    netns: &str,
    addr: SocketAddr,
    threads: usize,
    duration: Duration,
    max: u64,
) -> Result<Run> {
    let spec = Spec {
        connections: threads,
        duration,
        timeout: Duration::from_millis(200),
        max_requests: Some(max),
        ..Spec::new(Target::Udp(addr))
    };
    engine(netns, spec)
}

/// Addresses of a raw flood: the frames leave `netns`'s eth0 with these.
#[derive(Debug, Clone, Copy)]
pub struct RawFlow {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
}

/// The Ethernet frame of one datagram of `flow` with a 64-byte payload: IPv4 header
/// checksum computed, UDP checksum 0 (none, as IPv4 allows).
pub fn udp_frame(flow: &RawFlow) -> Vec<u8> {
    const PAYLOAD: usize = 64;
    let mut f = Vec::with_capacity(14 + 20 + 8 + PAYLOAD);
    f.extend_from_slice(&flow.dst_mac);
    f.extend_from_slice(&flow.src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    let total = (20 + 8 + PAYLOAD) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]); // id, DF, TTL, UDP, checksum
    f.extend_from_slice(&flow.src.ip().octets());
    f.extend_from_slice(&flow.dst.ip().octets());
    let mut sum: u32 = f[ip_start..ip_start + 20]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[ip_start + 10..ip_start + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&flow.src.port().to_be_bytes());
    f.extend_from_slice(&flow.dst.port().to_be_bytes());
    f.extend_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(f.len() + PAYLOAD, 0);
    f
}

/// One-way UDP datagrams of `flow` from one thread on `cpu`, handing ready-made frames to
/// `netns`'s eth0: a packet socket with the qdisc bypassed, 64 frames per sendmmsg(2), so
/// the sender's own stack costs little next to what it measures. At `pps` frames per
/// second (the same offered load for every path it is compared on), or as fast as it
/// can. Until `duration` passes or `max` frames are sent; `requests` is the number sent
/// (whoever counts what arrived reports the rate). A batch the device refuses is not
/// counted.
pub fn udp_flood(
    netns: &str,
    flow: RawFlow,
    cpu: usize,
    duration: Duration,
    max: u64,
    pps: Option<u64>,
) -> Result<Run> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const BATCH: usize = 64;
    let start = Instant::now();
    let sent = in_netns(netns, move || {
        pin_to_cpu(0, cpu)?;
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("packet socket");
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error()).context("eth0's index");
        }
        // SAFETY: all-zero is a valid sockaddr_ll; the fields set below make it one.
        let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        ll.sll_ifindex = ifindex as i32;
        // SAFETY: `ll` is a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&ll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("bind to eth0");
        }
        set_option(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &(1 as libc::c_int),
            "PACKET_QDISC_BYPASS",
        )?;
        let mut frame = udp_frame(&flow);
        let mut iov = libc::iovec {
            iov_base: frame.as_mut_ptr().cast(),
            iov_len: frame.len(),
        };
        // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for m in msgs.iter_mut() {
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0;
        let start = Instant::now();
        let until = start + duration;
        while done < max && Instant::now() < until {
            // At a given rate: the next batch waits for its time (a spin for the last
            // stretch, a sleep can oversleep by more than a batch's share).
            if let Some(rate) = pps {
                let due = start + Duration::from_secs_f64(done as f64 / rate.max(1) as f64);
                loop {
                    let now = Instant::now();
                    if now >= due {
                        break;
                    }
                    if due - now > Duration::from_micros(200) {
                        std::thread::sleep(due - now - Duration::from_micros(100));
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            // SAFETY: `msgs` holds BATCH initialised headers whose one iovec points at
            // `frame`; all outlive the call.
            let n = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    0,
                )
            };
            if n > 0 {
                done += n as u64;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN) => {}
                _ => return Err(e).context("sendmmsg"),
            }
        }
        Ok(done)
    })?;
    Ok(Run {
        requests: sent,
        elapsed: start.elapsed(),
        latencies: vec![],
        failures: 0,
        first_failure: None,
    })
}

/// Runs thread or process `pid` (0: the calling thread) on `cpu` only.
pub fn pin_to_cpu(pid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    let r = unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pin {pid} to CPU {cpu}"));
    }
    Ok(())
}

/// SO_LINGER with a zero timeout: close() sends RST instead of FIN.
fn set_option<T>(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
    what: &str,
) -> Result<()> {
    // SAFETY: setsockopt reads `value` (of the size given) during the call only.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| what.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_frame_is_a_valid_ipv4_udp_datagram() {
        let flow = RawFlow {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: "198.18.0.100:40000".parse().unwrap(),
            dst: "198.18.0.13:4568".parse().unwrap(),
        };
        let f = udp_frame(&flow);
        let p = etherparse::SlicedPacket::from_ethernet(&f).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("not IPv4");
        };
        let h = ip.header();
        assert_eq!(h.source_addr(), *flow.src.ip());
        assert_eq!(h.destination_addr(), *flow.dst.ip());
        assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
        let Some(etherparse::TransportSlice::Udp(u)) = p.transport else {
            panic!("not UDP");
        };
        assert_eq!((u.source_port(), u.destination_port()), (40000, 4568));
        assert_eq!(u.payload().len(), 64);
    }
}
