//! The routing mesh's XDP flow tables under a flood: an established connection through
//! a published port keeps working (data both ways, the same translation) after a flood
//! of new flows to that port from outside, several times the size of the flow tables:
//! spoofed-source SYNs; spoofed-source SYNs each followed by a blind ACK (the SYN-ACK
//! went to the spoofed address, so the ACK's number is a guess: before the program
//! checked it against the SYN-ACK's, such pairs were confirmed and evicted established
//! flows); and UDP datagrams from random source ports. And an idle connection outlives
//! many more closed connections than the table holds: the established table never
//! evicts (it was an LRU map, which lost the idle connection to them), and the sweep
//! removes the closed ones.
//!
//! A 2-node cluster: the service's only task runs on n1, the client connects to n2, so
//! every flow crosses n2's XDP fast path (generic mode on the lab's veths). The daemons
//! make their flow maps `TABLE` entries large (`NETD_XDP_FLOW_ENTRIES`, which they
//! inherit from this test's environment), so the flood stays small and quick. The
//! flooder is a host on the underlay sending with a raw socket (python3).

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::{connect_from, field, http_get, in_netns, Lab};
use serde_json::Value;

const PUBLISHED: u16 = 4567;
const PUBLISHED_UDP: u16 = 4568;
/// Entries of each XDP flow map in this test's daemons.
const TABLE: usize = 256;
/// Packets of a flood: 32 times the table (the old single LRU tables, whose second
/// chance spares recently used entries for a while, lost established flows reliably
/// from about that much on; 8 times was not always enough).
const FLOOD: usize = 32 * TABLE;
const CLIENT_HOST: u8 = 100;
const FLOODER_HOST: u8 = 101;

/// Sends `count` packets (pairs for `synack`) to DST:DPORT with a raw socket, paced (32
/// every 2 ms, so that the veths' queues keep them all): `tcp` SYNs from random sources
/// in 198.18.128.0/17 (spoofed: nobody there answers); `synack` such SYNs in batches of
/// 64, and 50 ms after each batch (time for the task's SYN-ACKs to pass n2 on their way
/// to nowhere) an ACK from each SYN's source and port with the next sequence number and
/// a random acknowledgement number, as a blind attacker sends them; or `udp` datagrams
/// from SRC and distinct random source ports. Checksums are right, so the task's kernel
/// takes every one.
const FLOODER: &str = r#"
import random, socket, struct, sys, time
proto, src, dst, dport, count, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rng = random.Random(seed)
def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16:
        t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
d = socket.inet_aton(dst)
ports = rng.sample(range(1024, 65536), count)
sent = 0
def send(a, p, l4):
    global sent
    at = 16 if p == 6 else 6
    c = csum(a + d + struct.pack("!BBH", 0, p, len(l4)) + l4) or 0xffff
    l4 = l4[:at] + struct.pack("!H", c) + l4[at + 2:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), sent & 0xffff, 0, 64, p, 0, a, d)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s.sendto(ip + l4, (dst, 0))
    sent += 1
    if sent % 32 == 0:
        time.sleep(0.002)
def spoofed():
    return socket.inet_aton("198.18.%d.%d" % (128 + rng.randrange(128), rng.randrange(1, 255)))
def segment(port, flags, seq, ack):
    return struct.pack("!HHIIBBHHH", port, dport, seq, ack, 5 << 4, flags, 64240, 0, 0)
if proto == "synack":
    for start in range(0, count, 64):
        batch = []
        for i in range(start, min(count, start + 64)):
            a, seq = spoofed(), rng.getrandbits(32)
            batch.append((a, ports[i], seq))
            send(a, 6, segment(ports[i], 0x02, seq, 0))
        time.sleep(0.05)
        for a, port, seq in batch:
            send(a, 6, segment(port, 0x10, (seq + 1) & 0xffffffff, rng.getrandbits(32)))
for i in range(count if proto != "synack" else 0):
    if proto == "tcp":
        send(spoofed(), 6, segment(ports[i], 0x02, rng.getrandbits(32), 0))
    else:
        send(socket.inet_aton(src), 17, struct.pack("!HHHH", ports[i], dport, 8 + 5, 0) + b"flood")
print(sent)
"#;

/// A 2-node cluster whose daemons make TABLE-entry flow maps; service `web` publishing
/// 4567:80 and 4568:80/udp with one whoami task on n1; a client and a flooder on the
/// underlay. Returns the lab, the client's and the flooder's namespaces.
fn flood_mesh(tag: &str) -> Result<(Lab, String, String)> {
    // Inherited by the daemons the lab starts (and only read by them). Closed flows are
    // swept after 1 s of quiet, not 120.
    std::env::set_var("NETD_XDP_FLOW_ENTRIES", TABLE.to_string());
    std::env::set_var("NETD_XDP_CLOSED_SECS", "1");
    let mut lab = Lab::build_with(tag, 2, true, "auto", "auto")?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.41.0/24"],
    )?;
    lab.cli(
        0,
        &[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--publish",
            &format!("{PUBLISHED}:80"),
            "--publish",
            &format!("{PUBLISHED_UDP}:80/udp"),
        ],
    )?;
    let n1 = lab.nodes[0].name.clone();
    lab.attach_whoami(0, "web", "w0", Some(&n1))?;
    let client = lab.add_host("client", CLIENT_HOST)?;
    let flooder = lab.add_host("flood", FLOODER_HOST)?;
    Ok((lab, client, flooder))
}

/// n2's XDP fast path: (packets forwarded, its flow counters).
fn n2_xdp(lab: &Lab) -> Result<(u64, Value)> {
    let x = &lab.cli_json(1, &["status"])?["routing_mesh"]["xdp"];
    if x["mode"].as_str().unwrap_or("none") == "none" {
        bail!("XDP does not run on n2: {x}");
    }
    Ok((
        x["packets"]["forwarded"].as_u64().unwrap_or(0),
        x["flows"].clone(),
    ))
}

/// The port whoami saw a request come from (`RemoteAddr: IP:PORT`): the translation
/// port of the flow.
fn remote_port(body: &str) -> Result<u16> {
    field(body, "RemoteAddr")
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.port())
        .with_context(|| format!("no RemoteAddr in {body:?}"))
}

/// A keep-alive connection from the client to n2's published port, once the mesh
/// answers there; its first answer.
fn open_connection(lab: &Lab, client: &str) -> Result<(TcpStream, String)> {
    let to = SocketAddr::from((lab.nodes[1].ip, PUBLISHED));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let tried = connect_from(client, to).and_then(|mut s| {
            let body = http_get(&mut s)?;
            Ok((s, body))
        });
        match tried {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() > deadline => return Err(e.context("the mesh on n2")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One request and its answer on the connection: data both ways. The answer must come
/// from the same task through the same translation as `first`.
fn still_the_same(conn: &mut TcpStream, first: &str, when: &str) -> Result<()> {
    let body = http_get(conn).with_context(|| format!("the established connection {when}"))?;
    if field(&body, "Hostname") != field(first, "Hostname")
        || remote_port(&body)? != remote_port(first)?
    {
        bail!("{when}, the connection answered {body:?}, first {first:?}");
    }
    Ok(())
}

/// Runs the flooder in `ns`: FLOOD `proto` packets (pairs for `synack`) to n2's `port`.
fn flood(lab: &Lab, ns: &str, proto: &str, port: u16) -> Result<()> {
    let src = netd_lab::underlay_ip(FLOODER_HOST).to_string();
    let dst = lab.nodes[1].ip.to_string();
    let out = lab.exec_in(
        ns,
        &[
            "timeout",
            "60",
            "python3",
            "-c",
            FLOODER,
            proto,
            &src,
            &dst,
            &port.to_string(),
            &FLOOD.to_string(),
            "1",
        ],
    )?;
    if !out.status.success() {
        bail!(
            "the flooder failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// The flood of `packets` reached n2's fast path and overflowed its tables: nine
/// tenths of it forwarded at least (a few packets may be lost on the way, not that
/// many), many times the table.
fn flood_reached_xdp(lab: &Lab, before: &(u64, Value), packets: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let forwarded = n2_xdp(lab)?.0 - before.0;
        if forwarded >= (packets * 9 / 10) as u64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the flood of {packets} did not overflow the {TABLE}-entry tables on n2: \
                 {forwarded} packets forwarded"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// n2's flow counters saw the flood: as many new flows opened as it overflowed the
/// table with, and none of them confirmed.
fn flood_counted(lab: &Lab, before: &(u64, Value)) -> Result<()> {
    let after = n2_xdp(lab)?;
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let opened = n(&after.1, "opened") - n(&before.1, "opened");
    eprintln!(
        "n2: {} packets forwarded by XDP during the flood; flows {} before, {} after",
        after.0 - before.0,
        before.1,
        after.1
    );
    if opened < (FLOOD * 9 / 10) as u64 || n(&after.1, "confirmed") != n(&before.1, "confirmed") {
        bail!(
            "n2's flow counters: {} before the flood, {} after",
            before.1,
            after.1
        );
    }
    Ok(())
}

#[test]
fn an_established_connection_survives_a_syn_flood() -> Result<()> {
    let (lab, client, flooder) = flood_mesh("fls")?;
    let (mut conn, first) = open_connection(&lab, &client)?;
    // The XDP path translates to ports from 32768 (the kernel path below).
    if remote_port(&first)? < 32768 {
        bail!("the connection did not take the XDP path: {first:?}");
    }
    still_the_same(&mut conn, &first, "before the flood")?;
    let before = n2_xdp(&lab)?;
    flood(&lab, &flooder, "tcp", PUBLISHED)?;
    flood_reached_xdp(&lab, &before, FLOOD)?;
    still_the_same(&mut conn, &first, "after a SYN flood")?;
    flood_counted(&lab, &before)?;
    Ok(())
}

/// Spoofed SYNs, each answered by the task (its SYN-ACK passes n2's XDP on its way to
/// the spoofed address, which marks the flow answered), each followed by a blind ACK:
/// no flow of the flood is confirmed, so the established connection keeps its entry.
#[test]
fn an_established_connection_survives_syns_with_blind_acks() -> Result<()> {
    let (lab, client, flooder) = flood_mesh("flb")?;
    let (mut conn, first) = open_connection(&lab, &client)?;
    if remote_port(&first)? < 32768 {
        bail!("the connection did not take the XDP path: {first:?}");
    }
    still_the_same(&mut conn, &first, "before the flood")?;
    let before = n2_xdp(&lab)?;
    flood(&lab, &flooder, "synack", PUBLISHED)?;
    flood_reached_xdp(&lab, &before, 2 * FLOOD)?;
    still_the_same(&mut conn, &first, "after a flood of SYNs with blind ACKs")?;
    flood_counted(&lab, &before)?;
    // The flood was one that confirmed flows before the ACK number was checked: most
    // blind ACKs met a flow the task had answered (and were refused, counted).
    let after = n2_xdp(&lab)?;
    let n = |v: &Value| v["bad_ack"].as_u64().unwrap_or(0);
    let bad = n(&after.1) - n(&before.1);
    eprintln!("n2: {bad} blind ACKs of {FLOOD} met an answered flow");
    if bad < (FLOOD / 2) as u64 {
        bail!(
            "only {bad} of {FLOOD} blind ACKs met a flow the task had answered: \
             the flood did not test confirmation (flows {})",
            after.1
        );
    }
    Ok(())
}

#[test]
fn established_flows_survive_a_udp_flood() -> Result<()> {
    let (lab, client, flooder) = flood_mesh("flu")?;
    let (mut conn, first) = open_connection(&lab, &client)?;
    if remote_port(&first)? < 32768 {
        bail!("the connection did not take the XDP path: {first:?}");
    }
    // A UDP flow, confirmed: the client sends again after the task's answer.
    let to = SocketAddr::from((lab.nodes[1].ip, PUBLISHED_UDP));
    let udp = in_netns(&client, || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(s)
    })?;
    let ask = |when: &str| -> Result<String> {
        udp.send_to(b"who", to)?;
        let mut buf = [0u8; 2048];
        let (n, from) = udp
            .recv_from(&mut buf)
            .with_context(|| format!("the UDP flow's answer {when}"))?;
        if from != to {
            bail!("a UDP answer from {from}, asked {to}");
        }
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let one = ask("at first")?;
    let two = ask("the second time")?;
    if remote_port(&one)? < 32768 || remote_port(&two)? != remote_port(&one)? {
        bail!("the UDP flow did not keep to the XDP path: {one:?} then {two:?}");
    }
    let before = n2_xdp(&lab)?;
    flood(&lab, &flooder, "udp", PUBLISHED_UDP)?;
    flood_reached_xdp(&lab, &before, FLOOD)?;
    let after = ask("after a UDP flood")?;
    if field(&after, "Hostname") != field(&one, "Hostname")
        || remote_port(&after)? != remote_port(&one)?
    {
        bail!("after a UDP flood the UDP flow answered {after:?}, first {one:?}");
    }
    still_the_same(&mut conn, &first, "after a UDP flood")?;
    flood_counted(&lab, &before)?;
    Ok(())
}

/// An idle keep-alive connection through n2, then 8 × TABLE short connections through
/// n2, each closed with FINs both ways after one request: the idle one still answers
/// (same task, same translation), and n2's sweep removed the closed flows.
#[test]
fn an_idle_connection_outlives_more_closed_connections_than_the_table_holds() -> Result<()> {
    let (lab, client, _) = flood_mesh("flc")?;
    let (mut conn, first) = open_connection(&lab, &client)?;
    if remote_port(&first)? < 32768 {
        bail!("the connection did not take the XDP path: {first:?}");
    }
    let before = n2_xdp(&lab)?;
    let to = SocketAddr::from((lab.nodes[1].ip, PUBLISHED));
    let closed = 8 * TABLE;
    for i in 0..closed {
        let body = netd_lab::http_get_from(&client, to)
            .with_context(|| format!("short connection {i} of {closed}"))?;
        anyhow::ensure!(field(&body, "Hostname").is_some(), "{body}");
    }
    let after = n2_xdp(&lab)?;
    let confirmed =
        after.1["confirmed"].as_u64().unwrap_or(0) - before.1["confirmed"].as_u64().unwrap_or(0);
    // They filled the established table (the idle connection holds one entry) and more
    // wanted in than it held (an LRU table would have made room by evicting).
    if confirmed < TABLE as u64 - 1 || confirmed >= closed as u64 {
        bail!(
            "{confirmed} of {closed} short connections entered the established table: \
             it was not filled and overflowed"
        );
    }
    // Still through the fast path: its flow is still there (the kernel path would take
    // the request too, at another pick when the service has several tasks).
    let passed = |lab: &Lab| -> Result<u64> {
        let x = &lab.cli_json(1, &["status"])?["routing_mesh"]["xdp"];
        Ok(x["packets"]["passed_to_kernel"].as_u64().unwrap_or(0))
    };
    let passed_before = passed(&lab)?;
    still_the_same(&mut conn, &first, "after the closed connections")?;
    let passed_after = passed(&lab)?;
    if passed_after != passed_before {
        bail!(
            "the idle connection's flow was gone: {} packets of it went to the kernel path",
            passed_after - passed_before
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let x = &lab.cli_json(1, &["status"])?["routing_mesh"]["xdp"];
        let swept = x["flows_swept"].as_u64().unwrap_or(0);
        if swept >= TABLE as u64 - 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("n2 swept {swept} closed flows in 30 s: {x}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    still_the_same(&mut conn, &first, "after the sweep")?;
    // Real clients that found the table full are not counted as blind ACKs.
    let bad = n2_xdp(&lab)?.1["bad_ack"].as_u64().unwrap_or(0);
    let bad_before = before.1["bad_ack"].as_u64().unwrap_or(0);
    if bad > bad_before {
        bail!("{} ACKs of real clients counted as blind", bad - bad_before);
    }
    Ok(())
}
