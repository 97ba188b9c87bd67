//! The userspace datapath under a flood, in the lab: a daemon whose conntrack table
//! holds 8 flows (`--userspace-conntrack-max 8`), an established connection through a
//! VIP from one task, and new connections and datagrams from another task until the
//! table refuses them. The established connection must keep carrying data, the
//! refusals must be quick and counted in `netd status`, the backend must see random
//! ports on the LB address, and once the flood's connections close and expire new flows
//! must be accepted again.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::{connect_from, field, http_get, in_netns, Lab};
use serde_json::Value;

const PORT: u16 = 80;
const SUBNET: &str = "198.19.21.0/24";
const MAX: usize = 8;
/// TCP_CLOSING_TIMEOUT of the userspace conntrack, plus its 1 s expiry tick and slack.
const CLOSED_FLOWS_GONE: Duration = Duration::from_secs(20);

fn detail(lab: &Lab) -> Result<Value> {
    Ok(lab.cli_json(0, &["status"])?["datapath"]["detail"].clone())
}

/// The status of network `front`'s sandbox.
fn front(detail: &Value) -> Result<Value> {
    detail["sandboxes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["network"] == "front"))
        .cloned()
        .with_context(|| format!("no sandbox of network front: {detail}"))
}

/// New connections from `netns` to `vip` until one fails; the open ones and how the
/// failing one failed (its error and how long it took).
fn flood(netns: &str, vip: Ipv4Addr) -> Result<(Vec<TcpStream>, ErrorKind, Duration)> {
    in_netns(netns, move || {
        let mut open = vec![];
        for _ in 0..4 * MAX {
            let start = Instant::now();
            match TcpStream::connect_timeout(&SocketAddr::from((vip, PORT)), Duration::from_secs(5))
            {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    open.push(s);
                }
                Err(e) => return Ok((open, e.kind(), start.elapsed())),
            }
        }
        bail!("{} connections and none refused", open.len())
    })
}

/// One datagram from `netns` to `vip` on a connected socket: Ok if answered, else the
/// error (a refusal shows as ConnectionRefused).
fn udp_once(netns: &str, vip: Ipv4Addr) -> Result<std::result::Result<(), ErrorKind>> {
    in_netns(netns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.connect((vip, PORT))?;
        s.send(b"who")?;
        let mut buf = [0u8; 256];
        Ok(s.recv(&mut buf).map(|_| ()).map_err(|e| e.kind()))
    })
}

#[test]
fn a_flood_is_refused_and_counted_while_established_flows_carry_on() -> Result<()> {
    let mut lab = Lab::build("uh", 1, false, "userspace")?;
    lab.daemon_args = vec!["--userspace-conntrack-max".into(), MAX.to_string()];
    lab.stop_daemon(0, false)?;
    lab.start_daemon(0)?;
    lab.cli(0, &["network", "create", "front", "--subnet", SUBNET])?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    lab.cli(0, &["service", "create", "client", "--network", "front"])?;
    lab.attach_whoami(0, "web", "w0", None)?;
    lab.attach_whoami(0, "client", "cli", None)?;
    lab.attach_whoami(0, "client", "flood", None)?;
    let vip = lab.vip(0, "web", "front")?;
    let d = detail(&lab)?;
    if lab.cli_json(0, &["status"])?["datapath"]["active"] != "userspace"
        || d["conntrack_max"] != MAX
    {
        bail!("expected the userspace datapath with {MAX} flows at most: {d}");
    }

    // The established connection.
    let mut kept = connect_from(&lab.ns("cli"), SocketAddr::from((vip, PORT)))?;
    http_get(&mut kept).context("the kept connection")?;

    // The flood: every flow but the kept one fits, then new ones are refused at once.
    let (mut open, kind, took) = flood(&lab.ns("flood"), vip)?;
    if open.len() != MAX - 1
        || kind != ErrorKind::ConnectionRefused
        || took > Duration::from_secs(2)
    {
        bail!(
            "expected {} connections and then a quick refusal, got {} and {kind:?} after \
             {took:?}",
            MAX - 1,
            open.len()
        );
    }
    match udp_once(&lab.ns("flood"), vip)? {
        Err(ErrorKind::ConnectionRefused) => {}
        other => bail!("a datagram to a full table: {other:?}, not refused"),
    }

    // The flood's connections work, and the backend saw them from random LB ports.
    let mut ports = vec![];
    for s in open.iter_mut() {
        let body = http_get(s).context("a flood connection")?;
        let from: SocketAddr = field(&body, "RemoteAddr")
            .context("RemoteAddr")?
            .parse()
            .context("RemoteAddr")?;
        ports.push(from.port());
    }
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    let steps = ports
        .windows(2)
        .filter(|w| w[1] == w[0].wrapping_add(1))
        .count();
    if distinct.len() != ports.len() || steps > 2 {
        bail!("LB ports as the backend saw them are not random: {ports:?}");
    }

    // The established connection carries on, and the refusals are counted.
    http_get(&mut kept).context("the kept connection during the flood")?;
    let d = detail(&lab)?;
    let sb = front(&d)?;
    let refused = d["flows_refused_full"].as_u64().unwrap_or(0);
    if refused < 2 || sb["flows_refused_full"].as_u64() != Some(refused) || sb["flows"] != MAX {
        bail!("status does not count the refusals of a full table: {d}");
    }

    // The flood ends: its flows close, expire, and new flows are accepted again.
    drop(open);
    let deadline = Instant::now() + CLOSED_FLOWS_GONE;
    loop {
        let again = connect_from(&lab.ns("flood"), SocketAddr::from((vip, PORT)));
        if let Ok(mut s) = again {
            http_get(&mut s).context("a new connection after the flood")?;
            break;
        }
        if Instant::now() > deadline {
            bail!("no new connection within {CLOSED_FLOWS_GONE:?} of the flood's end: {again:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    http_get(&mut kept).context("the kept connection after the flood")?;
    Ok(())
}
