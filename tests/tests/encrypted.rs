//! Encrypted overlays (`network create --opt encrypted`): traffic between tasks on two
//! nodes works, and what crosses the underlay for it is WireGuard, with nothing of the
//! network readable in it, while a plain network beside it is VXLAN in the clear.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netd_lab::{connect_from, debian_tool, in_netns, read_http_response, spawn_in_netns, Lab};

/// One GET carrying `marker` in a header, asking for `size` extra bytes; returns the
/// answer's body.
fn get_with_marker(netns: &str, to: SocketAddr, marker: &str, size: usize) -> Result<String> {
    let mut s = connect_from(netns, to)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /data?size={size} HTTP/1.1\r\nHost: lab\r\nX-Marker: {marker}\r\n\r\n"
    )?;
    let mut answer = vec![];
    let body = read_http_response(&mut s, &mut answer)?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!("{to} answered {:.200}", String::from_utf8_lossy(&answer));
    }
    Ok(String::from_utf8_lossy(&answer[body]).into_owned())
}

/// tcpdump on the lab's underlay switch, writing every frame to a file.
struct Capture {
    child: std::process::Child,
}

impl Capture {
    /// Starts it, and returns once it listens (it says so on stderr).
    fn start(tcpdump: &Path, lab: &Lab, file: &Path) -> Result<Capture> {
        let log = file.with_extension("log");
        let mut cmd = Command::new(tcpdump);
        // Immediate mode: without it the kernel hands packets over in blocks, up to a
        // second late, and a stop loses what it holds.
        cmd.args(["-i", "ul", "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let child = spawn_in_netns(&mut cmd, &lab.hub)?;
        let mut capture = Capture { child };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)?.contains("listening on") {
            if std::time::Instant::now() > deadline {
                capture.stop();
                bail!("tcpdump did not start: {}", std::fs::read_to_string(&log)?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(capture)
    }

    /// Stops it once what it saw is written out (SIGINT, then wait): what it had not
    /// read from the kernel by then is lost, so it gets half a second first.
    fn stop(&mut self) {
        std::thread::sleep(Duration::from_millis(500));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many packets of capture `file` match `filter` (tcpdump's own reading).
fn count(tcpdump: &Path, file: &Path, filter: &str) -> Result<usize> {
    let out = Command::new(tcpdump)
        .args(["-nn", "-r"])
        .arg(file)
        .arg(filter)
        .output()
        .context("tcpdump -r")?;
    if !out.status.success() {
        bail!(
            "tcpdump -r {filter}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

#[test]
fn an_encrypted_overlay_carries_traffic_the_underlay_cannot_read() -> Result<()> {
    let tcpdump = debian_tool("/usr/bin/tcpdump", "tcpdump")?;
    let mut lab = Lab::cluster("en", 2)?;
    let net = |name: &str, subnet: &str, extra: &[&str]| {
        let mut args = vec!["network", "create", name, "--subnet", subnet];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    for args in [
        net("sealed", "198.19.92.0/24", &["--opt", "encrypted"]),
        net("plain", "198.19.93.0/24", &[]),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.cli(0, &args)?;
    }
    let inspect = lab.cli_json(0, &["network", "inspect", "sealed"])?;
    assert_eq!(inspect["encrypted"], true, "{inspect}");
    lab.cli(0, &["service", "create", "sweb", "--network", "sealed"])?;
    lab.cli(0, &["service", "create", "pweb", "--network", "plain"])?;
    let (n1, n2) = (lab.nodes[0].name.clone(), lab.nodes[1].name.clone());
    lab.attach_whoami(0, "sweb", "s1", Some(&n2))?;
    lab.attach_whoami(0, "pweb", "p1", Some(&n2))?;
    // One client on n1, on both networks.
    lab.cli(
        0,
        &[
            "service",
            "create",
            "clients",
            "--network",
            "sealed",
            "--network",
            "plain",
        ],
    )?;
    let (client, path) = lab.add_task_netns("client")?;
    lab.cli(
        0,
        &[
            "task", "attach", "clients", "--netns", &path, "--name", "client", "--node", &n1,
        ],
    )?;
    let sealed_to = SocketAddr::from((lab.task_ip(0, "s1", "sealed")?, 80));
    let plain_to = SocketAddr::from((lab.task_ip(0, "p1", "plain")?, 80));

    // A large download first: many full-size packets, sealed and opened whole.
    let large = get_with_marker(&client, sealed_to, "netd-sealed-large-5d80e1", 2_000_000)?;
    assert!(large.contains("Hostname: s1"), "{large:.200}");
    assert!(large.len() > 2_000_000, "{} bytes", large.len());

    // Everything the underlay carries while both networks talk.
    let capture = lab.dir.join("underlay.pcap");
    let mut dump = Capture::start(&tcpdump, &lab, &capture)?;
    let (sealed_marker, plain_marker) = ("netd-sealed-3f1c9a", "netd-plain-7b2e4d");
    let asked = (|| -> Result<(String, String)> {
        let sealed = get_with_marker(&client, sealed_to, sealed_marker, 0)?;
        let plain = get_with_marker(&client, plain_to, plain_marker, 0)?;
        Ok((sealed, plain))
    })();
    dump.stop();
    let (sealed, plain) = asked?;
    assert!(sealed.contains("Hostname: s1"), "{sealed}");
    assert!(plain.contains("Hostname: p1"), "{plain}");

    let bytes = std::fs::read(&capture).context("read the capture")?;
    let contains = |m: &str| bytes.windows(m.len()).any(|w| w == m.as_bytes());
    assert!(
        contains(plain_marker),
        "the plain network's marker is not on the underlay: the capture saw nothing"
    );
    assert!(
        !contains(sealed_marker),
        "the encrypted network's marker crossed the underlay in the clear"
    );
    let (a, b) = (lab.nodes[0].ip, lab.nodes[1].ip);
    let between = format!("host {a} and host {b}");
    assert!(count(&tcpdump, &capture, &format!("udp port 4789 and {between}"))? > 0);
    assert_eq!(
        count(&tcpdump, &capture, &format!("udp port 4790 and {between}"))?,
        0,
        "the encrypted network's VXLAN left a node unsealed"
    );
    let sealed = count(&tcpdump, &capture, &format!("udp port 51821 and {between}"))?;
    assert!(
        sealed >= 6,
        "{sealed} WireGuard datagrams for a TCP exchange"
    );
    // No inner IPv4 header of the encrypted network: its two tasks' addresses side by
    // side, as a header holds them, appear nowhere; the plain network's do.
    let pair = |net: &str, to: SocketAddr| -> Result<Vec<u8>> {
        let SocketAddr::V4(to) = to else {
            bail!("IPv4 only");
        };
        let mut b = lab.task_ip(0, "client", net)?.octets().to_vec();
        b.extend_from_slice(&to.ip().octets());
        Ok(b)
    };
    let has = |b: &[u8]| bytes.windows(b.len()).any(|w| w == b);
    assert!(
        has(&pair("plain", plain_to)?),
        "the plain network's inner header"
    );
    assert!(
        !has(&pair("sealed", sealed_to)?),
        "an inner header in the clear"
    );

    let status = lab.cli_json(0, &["status"])?;
    let enc = &status["encryption"];
    assert_eq!(enc["implementation"], "userspace (boringtun)", "{enc}");
    assert!(
        enc["why"].as_str().is_some_and(|w| w.contains("WireGuard")),
        "{enc}"
    );
    let peers = enc["peers"].as_array().context("peers")?;
    assert_eq!(peers.len(), 1, "{enc}");
    assert_eq!(peers[0]["node"], n2.as_str(), "{enc}");
    assert!(peers[0]["last_handshake_s"].is_number(), "{enc}");

    // Fail closed: with n1's WireGuard interface down (and its route with it), the
    // network stops, and nothing of it leaves n1 in the clear.
    let out = lab.exec_in(&lab.nodes[0].netns, &["ip", "link", "set", "ndwg", "down"])?;
    assert!(out.status.success(), "{out:?}");
    let capture = lab.dir.join("closed.pcap");
    let mut dump = Capture::start(&tcpdump, &lab, &capture)?;
    let refused = get_with_marker(&client, sealed_to, sealed_marker, 0);
    dump.stop();
    assert!(
        refused.is_err(),
        "the encrypted network answered without WireGuard"
    );
    let bytes = std::fs::read(&capture)?;
    assert!(!bytes
        .windows(sealed_marker.len())
        .any(|w| w == sealed_marker.as_bytes()));
    assert_eq!(
        count(&tcpdump, &capture, &format!("udp port 4790 and {between}"))?,
        0
    );
    Ok(())
}

/// The IPv4 UDP datagrams in pcap `bytes` (Ethernet link type, as tcpdump writes a
/// capture of the hub's bridge): source address, destination port, payload.
fn udp_payloads(bytes: &[u8]) -> Vec<(Ipv4Addr, u16, Vec<u8>)> {
    let mut out = vec![];
    // The file header is 24 bytes; each record has a 16-byte header whose third word
    // is the length captured.
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes([bytes[at + 8], bytes[at + 9], bytes[at + 10], bytes[at + 11]])
            as usize;
        let Some(frame) = bytes.get(at + 16..at + 16 + len) else {
            break;
        };
        at += 16 + len;
        // Ethernet (14), then IPv4: its header length in the low nibble of byte 0, the
        // protocol at 9; then UDP's 8 bytes.
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
            continue;
        }
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let src = Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
        let (Some(ports), Some(payload)) =
            (frame.get(14 + ihl..14 + ihl + 4), frame.get(14 + ihl + 8..))
        else {
            continue;
        };
        out.push((
            src,
            u16::from_be_bytes([ports[2], ports[3]]),
            payload.to_vec(),
        ));
    }
    out
}

/// Sends `datagram` from `netns` (bound to `from`, any port) to `to`.
fn send_from(netns: &str, from: Ipv4Addr, to: SocketAddr, datagram: Vec<u8>) -> Result<()> {
    in_netns(netns, move || {
        let s = UdpSocket::bind(SocketAddr::from((from, 0)))?;
        s.send_to(&datagram, to)?;
        Ok(())
    })
}

/// What node `i`'s WireGuard refused, by reason, and what its firewall dropped as not
/// from a member.
fn refused(lab: &Lab, i: usize) -> Result<(serde_json::Value, u64)> {
    let st = lab.cli_json(i, &["status"])?;
    let foreign = st["overlay"]["vxlan_from_non_members_dropped"]
        .as_u64()
        .context("vxlan_from_non_members_dropped")?;
    Ok((st["encryption"]["dropped"].clone(), foreign))
}

#[test]
fn replayed_altered_and_foreign_datagrams_are_dropped_and_counted() -> Result<()> {
    let tcpdump = debian_tool("/usr/bin/tcpdump", "tcpdump")?;
    let mut lab = Lab::cluster("er", 2)?;
    lab.cli(
        0,
        &[
            "network",
            "create",
            "sealed",
            "--opt",
            "encrypted",
            "--subnet",
            "198.19.94.0/24",
        ],
    )?;
    lab.cli(0, &["service", "create", "sweb", "--network", "sealed"])?;
    let n2name = lab.nodes[1].name.clone();
    lab.attach_whoami(0, "sweb", "s1", Some(&n2name))?;
    let client = lab.add_client("client", "sealed", 0)?;
    let to = SocketAddr::from((lab.task_ip(0, "s1", "sealed")?, 80));
    let (n1, n2) = (lab.nodes[0].ip, lab.nodes[1].ip);
    let wg = SocketAddr::from((n2, 51821));

    // What n1 seals for n2 during one exchange.
    let capture = lab.dir.join("sealed.pcap");
    let mut dump = Capture::start(&tcpdump, &lab, &capture)?;
    let asked = get_with_marker(&client, to, "replay-me", 0);
    dump.stop();
    assert!(asked?.contains("Hostname: s1"));
    // A transport data message (type 4) that carries a packet (more than the 32 bytes
    // of a keepalive).
    let data = udp_payloads(&std::fs::read(&capture)?)
        .into_iter()
        .filter(|(from, port, _)| *from == n1 && *port == 51821)
        .map(|(_, _, p)| p)
        .find(|p| p.len() > 32 && p[0] == 4)
        .context("no sealed data message in the capture")?;
    let (before, foreign_before) = refused(&lab, 1)?;
    let n1ns = lab.nodes[0].netns.clone();

    // The same message again, from n1's own address: a replay.
    send_from(&n1ns, n1, wg, data.clone())?;
    // A message with a counter never used and its sealed bytes altered.
    let mut altered = data.clone();
    altered[8..16]
        .copy_from_slice(&(u64::from_le_bytes(data[8..16].try_into()?) + 1000).to_le_bytes());
    let last = altered.len() - 1;
    altered[last] ^= 0x55;
    send_from(&n1ns, n1, wg, altered)?;
    // From a host of the underlay that is no node: the message, and a VXLAN frame
    // straight to the encrypted networks' VXLAN port.
    let intruder = lab.add_host("intruder", 77)?;
    let me = netd_lab::underlay_ip(77);
    send_from(&intruder, me, wg, data.clone())?;
    let mut vxlan = vec![0x08, 0, 0, 0, 0, 0x10, 0, 0];
    vxlan.extend_from_slice(&[0xff; 6]);
    vxlan.extend_from_slice(&[0x02, 0x42, 0, 0, 0, 0x77, 0x08, 0x06]);
    vxlan.extend_from_slice(&[0u8; 28]);
    send_from(&intruder, me, SocketAddr::from((n2, 4790)), vxlan)?;
    std::thread::sleep(Duration::from_millis(500));

    let (after, foreign_after) = refused(&lab, 1)?;
    let grew = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    assert_eq!(grew("replayed"), 1, "{before} -> {after}");
    assert_eq!(grew("not_authentic"), 1, "{before} -> {after}");
    assert_eq!(
        foreign_after - foreign_before,
        2,
        "the intruder's datagram and VXLAN frame are dropped by n2's firewall"
    );
    // The network still works after all of it.
    assert!(get_with_marker(&client, to, "after", 0)?.contains("Hostname: s1"));
    Ok(())
}

/// Nodes need not share a WireGuard port: each publishes its own (`--wireguard-port`)
/// in its node record with its key, and the other nodes send there. n2 restarts on
/// another port than n1's; a request and its answer cross the encrypted network (a
/// handshake each way, from both ports), and n1's status names n2's port.
#[test]
fn nodes_on_different_wireguard_ports_reach_each_other() -> Result<()> {
    let mut lab = Lab::cluster("ep", 2)?;
    lab.stop_daemon(1, false)?;
    lab.daemon_args = vec!["--wireguard-port".into(), "51900".into()];
    lab.start_daemon(1)?;
    lab.daemon_args.clear();
    let (client, to) = sealed_pair(&mut lab, "198.19.97.0/24")?;
    let answer = get_with_marker(&client, to, "netd-another-port", 0)?;
    assert!(answer.contains("Hostname: s1"), "{answer}");
    let encryption = lab.cli_json(0, &["status"])?["encryption"].clone();
    let ports: Vec<_> = encryption["peers"]
        .as_array()
        .context("n1's peers")?
        .iter()
        .map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(ports, vec![Some(51900)], "{encryption}");
    assert_eq!(
        lab.cli_json(1, &["status"])?["encryption"]["port"].as_u64(),
        Some(51900)
    );
    Ok(())
}

/// Encrypted network `sealed` on `subnet` with service `sweb`: a whoami task `s1` on n2
/// and a client task on n1. Returns the client's namespace and s1's address.
fn sealed_pair(lab: &mut Lab, subnet: &str) -> Result<(String, SocketAddr)> {
    lab.cli(
        0,
        &[
            "network",
            "create",
            "sealed",
            "--subnet",
            subnet,
            "--opt",
            "encrypted",
        ],
    )?;
    lab.cli(0, &["service", "create", "sweb", "--network", "sealed"])?;
    let (n1, n2) = (lab.nodes[0].name.clone(), lab.nodes[1].name.clone());
    lab.attach_whoami(0, "sweb", "s1", Some(&n2))?;
    let (client, path) = lab.add_task_netns("client")?;
    lab.cli(
        0,
        &[
            "task", "attach", "sweb", "--netns", &path, "--name", "client", "--node", &n1,
        ],
    )?;
    Ok((
        client,
        SocketAddr::from((lab.task_ip(0, "s1", "sealed")?, 80)),
    ))
}

/// One datagram of `size` bytes with DF (`IP_PMTUDISC_DO`: the kernel neither fragments
/// it nor lets it go when it exceeds the path MTU it knows) from `netns` to `to`; the
/// answer, or the error of the send.
fn df_datagram(netns: &str, to: SocketAddr, size: usize) -> Result<std::io::Result<String>> {
    in_netns(netns, move || {
        use std::os::fd::AsRawFd;
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let on: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt on a socket this closure owns, with a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "IP_MTU_DISCOVER: {}",
            std::io::Error::last_os_error()
        );
        if let Err(e) = s.send_to(&vec![b'x'; size], to) {
            return Ok(Err(e));
        }
        let mut buf = [0u8; 2048];
        let (n, _) = s.recv_from(&mut buf).context("UDP answer")?;
        Ok(Ok(String::from_utf8_lossy(&buf[..n]).into_owned()))
    })
}

/// The MTU of `dev` in `netns`.
/// The packets node `i`'s ndwg received (what netd wrote into it) and sent (what
/// the kernel handed netd to seal), as `ip -s link` counts them: a super-packet is one.
fn ndwg_packets(lab: &Lab, i: usize) -> Result<(u64, u64)> {
    let out = netd_lab::run(Command::new("ip").args([
        "-n",
        &lab.nodes[i].netns,
        "-s",
        "-j",
        "link",
        "show",
        "ndwg",
    ]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j link")?;
    let stats = &v[0]["stats64"];
    match (
        stats["rx"]["packets"].as_u64(),
        stats["tx"]["packets"].as_u64(),
    ) {
        (Some(rx), Some(tx)) => Ok((rx, tx)),
        _ => bail!("no packet counts for ndwg: {v}"),
    }
}

fn mtu(netns: &str, dev: &str) -> Result<u64> {
    let link = netd_lab::link_json(netns, dev)?;
    link["mtu"]
        .as_u64()
        .with_context(|| format!("no MTU for {dev} in {netns}: {link}"))
}

/// On a 1400-byte underlay (`--underlay-mtu 1400`, every link of the lab), an encrypted
/// network's tasks get 1400 − 110 = 1290 (WireGuard's 60 bytes, then VXLAN's 50), and
/// `ndwg` 1340: a sealed full-size packet is exactly 1400 bytes on the wire.
/// A DF datagram of exactly the path MTU crosses and is answered; one byte more is
/// refused at the sender (EMSGSIZE), never lost on the way; TCP's segments follow the
/// same MTU through a 1 MB download, which n2 seals from super-packets its kernel hands
/// over whole and n1 writes back joined (both counted). n2 checks reverse paths strictly
/// (`all.rp_filter=1`), which dropped everything `ndwg` delivered while it had no
/// address.
#[test]
fn an_encrypted_overlay_follows_the_underlay_mtu_for_udp_and_tcp() -> Result<()> {
    let mut lab = Lab::build_mtu("em", 2, "auto", 1400)?;
    let (client, to) = sealed_pair(&mut lab, "198.19.94.0/24")?;
    // A host that checks reverse paths strictly everywhere (`all` wins over a
    // device's lower setting): what n2's ndwg delivers must still get in.
    netd_lab::run(Command::new("ip").args([
        "netns",
        "exec",
        &lab.nodes[1].netns,
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.rp_filter=1",
    ]))?;
    assert_eq!(mtu(&client, "eth0")?, 1290, "the task's MTU");
    assert_eq!(mtu(&lab.nodes[0].netns, "ndwg")?, 1340, "ndwg's MTU");
    // IPv4 20 + UDP 8 + payload = the path MTU.
    let answer = df_datagram(&client, to, 1290 - 28)?.context("a datagram of the MTU")?;
    assert!(answer.contains("Hostname: s1"), "{answer}");
    // The download's data goes n2 -> n1: n2 seals it and n1 opens it (n1 seals only
    // the ACKs, which delayed ACKs make fewer than the segments).
    let counter = |lab: &Lab, i: usize, what: &str| -> Result<u64> {
        Ok(lab.cli_json(i, &["status"])?["encryption"][what]
            .as_u64()
            .unwrap_or(0))
    };
    let (sealed_before, opened_before) = (counter(&lab, 1, "sealed")?, counter(&lab, 0, "opened")?);
    let (handed_before, written_before) = (ndwg_packets(&lab, 1)?.1, ndwg_packets(&lab, 0)?.0);
    match df_datagram(&client, to, 1290 - 28 + 1)? {
        Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
        other => bail!("a datagram one byte over the MTU: {other:?}"),
    }
    let large = get_with_marker(&client, to, "netd-sealed-mtu", 1_000_000)?;
    assert!(large.len() > 1_000_000, "{} bytes", large.len());
    // It went sealed (1 MB is at least 808 segments of 1238 bytes; 750 leaves room
    // for other TCP options), and neither node refused anything (a packet cut short or
    // too big).
    let (sealed, opened) = (counter(&lab, 1, "sealed")?, counter(&lab, 0, "opened")?);
    assert!(
        sealed > sealed_before + 750 && opened > opened_before + 750,
        "n2 sealed {sealed_before} -> {sealed}, n1 opened {opened_before} -> {opened}"
    );
    // Batched both ways: n2's kernel handed its ndwg's packets over as super-packets
    // (45 and more segments in one, on this kernel's UDP tunnel offload for TAP), and
    // n1 wrote what it opened back joined into TCP super-packets (what one UDP GRO read
    // brought), which its kernel took (a refused one turns `tcp_joins` off).
    let (handed, written) = (ndwg_packets(&lab, 1)?.1, ndwg_packets(&lab, 0)?.0);
    for i in [0, 1] {
        let e = &lab.cli_json(i, &["status"])?["encryption"];
        assert_eq!(
            (
                e["super_packets"].as_bool(),
                e["udp_gso"].as_bool(),
                e["tcp_joins"].as_bool()
            ),
            (Some(true), Some(true), Some(true)),
            "n{}: ndwg super-packets and TCP joins need Linux 6.17's UDP tunnel offload \
             for TUN/TAP: {e}",
            i + 1
        );
    }
    assert!(
        (handed - handed_before) * 10 < sealed - sealed_before,
        "n2's ndwg handed over {} packets for {} sealed",
        handed - handed_before,
        sealed - sealed_before
    );
    assert!(
        (written - written_before) * 4 < opened - opened_before,
        "n1 wrote {} packets into ndwg for {} opened",
        written - written_before,
        opened - opened_before
    );
    for i in [0, 1] {
        let dropped = &lab.cli_json(i, &["status"])?["encryption"]["dropped"];
        for why in ["not_authentic", "wrong_inner", "invalid", "not_cut"] {
            assert_eq!(
                dropped[why].as_u64(),
                Some(0),
                "n{} dropped {why}: {dropped}",
                i + 1
            );
        }
    }
    Ok(())
}

/// `netd node rotate-key` on n1 under a steady load over an encrypted network (a
/// client task on n1, a whoami on n2; new connections and keep-alive requests): no
/// request fails; n2 moved to the new key before the old one went (the answer says
/// so); n1's key file, its status and its node record hold the new key, n2 seals for it
/// (a handshake with it), and the network still works afterwards.
#[test]
fn a_node_rotates_its_key_under_load_without_a_failed_request() -> Result<()> {
    let mut lab = Lab::cluster("er", 2)?;
    let (client, to) = sealed_pair(&mut lab, "198.19.95.0/24")?;
    let n1 = lab.nodes[0].name.clone();
    get_with_marker(&client, to, "netd-rotate-before", 0)?;
    let key_file = lab.nodes[0]
        .dir
        .join("state")
        .join(&n1)
        .join("wireguard.key");
    let file_before = std::fs::read_to_string(&key_file)
        .with_context(|| format!("read {}", key_file.display()))?;
    let before = lab.cli_json(0, &["status"])?["encryption"]["public_key"]
        .as_str()
        .context("n1's public key")?
        .to_string();
    // What either node refused: a packet sealed for a session the other side had
    // dropped would show there (TCP would resend it, and the load would not see it).
    let refused = |lab: &Lab, i: usize| -> Result<u64> {
        let d = &lab.cli_json(i, &["status"])?["encryption"]["dropped"];
        Ok([
            "invalid",
            "not_authentic",
            "wrong_inner",
            "no_peer",
            "replayed",
        ]
        .iter()
        .map(|k| d[k].as_u64().unwrap_or(0))
        .sum())
    };
    let refused_before = (refused(&lab, 0)?, refused(&lab, 1)?);
    let load = netd_lab::load::start(&netd_lab::load::Spec {
        connections: 2,
        rate: Some(200.0),
        duration: Duration::from_secs(60),
        new_connections: true,
        netns: Some(client.clone()),
        ..netd_lab::load::Spec::new(netd_lab::load::Target::Http(to, "/".into()))
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let rotated = lab.cli_json(0, &["node", "rotate-key"]);
    std::thread::sleep(Duration::from_secs(2));
    let report = load.stop();
    let rotated = rotated?;
    let after = rotated["public_key"]
        .as_str()
        .context("the new key")?
        .to_string();
    assert_eq!(rotated["previous_public_key"], before.as_str(), "{rotated}");
    assert_ne!(after, before, "{rotated}");
    assert_eq!(rotated["peers"], 1, "{rotated}");
    assert_eq!(
        rotated["moved"], 1,
        "n2 moved before the old key went: {rotated}"
    );
    report.no_failures("the load during the rotation")?;
    assert!(report.requests > 500, "{} requests", report.requests);
    assert_eq!(
        (refused(&lab, 0)?, refused(&lab, 1)?),
        refused_before,
        "datagrams refused during the rotation (n1, n2)"
    );
    // The new key everywhere it belongs.
    let status = lab.cli_json(0, &["status"])?["encryption"].clone();
    assert_eq!(status["public_key"], after.as_str(), "{status}");
    assert!(status["next_public_key"].is_null(), "{status}");
    assert_eq!(status["rotations"], 1, "{status}");
    let file_after = std::fs::read_to_string(&key_file)?;
    assert_ne!(
        file_after, file_before,
        "the key file still holds the old key"
    );
    assert!(
        !file_after.contains(&after),
        "the key file holds the public key"
    );
    // n1's record as n2 reads it.
    let nodes = lab.cli_json(1, &["node", "ls"])?;
    let record = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == n1.as_str()))
        .with_context(|| format!("n1 in {nodes}"))?;
    assert_eq!(record["public_key"], after.as_str(), "{record}");
    assert!(record["next_public_key"].is_null(), "{record}");
    // n2 dropped the old key's tunnel and talks to the new one.
    let peers = &lab.cli_json(1, &["status"])?["encryption"]["peers"];
    assert_eq!(peers[0]["tunnels"], 1, "{peers}");
    assert!(peers[0]["last_handshake_s"].is_number(), "{peers}");
    get_with_marker(&client, to, "netd-rotate-after", 0)?;
    Ok(())
}

/// A restarted netd has no WireGuard session, while n2 still seals for the one before:
/// a task on n2 that sends first (a server pushing, an answer to a request already
/// delivered) must reach n1's task as soon as n1's netd is back, not once n2's own
/// timers give the old session up (15 s and more). The new netd opens a session to every
/// peer at once, and n2's first datagrams after the restart arrive.
#[test]
fn a_restarted_node_is_reached_at_once_by_a_peer_that_sends_first() -> Result<()> {
    let mut lab = Lab::cluster("ew", 2)?;
    let (client, to) = sealed_pair(&mut lab, "198.19.96.0/24")?;
    // Sessions both ways, as traffic leaves them.
    get_with_marker(&client, to, "netd-before-restart", 0)?;
    let client_ip = lab.task_ip(0, "client", "sealed")?;
    let server = lab.ns("s1");
    lab.stop_daemon(0, true)?;
    lab.start_daemon(0)?;
    let listener = in_netns(&client, || {
        let s = UdpSocket::bind("0.0.0.0:7000")?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s)
    })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut sent = 0;
    let mut buf = [0u8; 64];
    loop {
        let to = SocketAddr::from((client_ip, 7000));
        in_netns(&server, move || {
            UdpSocket::bind("0.0.0.0:0")?.send_to(b"pushed", to)?;
            Ok(())
        })?;
        sent += 1;
        if let Ok((n, _)) = listener.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"pushed");
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "none of {sent} datagrams from n2 reached n1's task within 3 s of n1's \
                 restart; n1's encryption: {}",
                lab.cli_json(0, &["status"])?["encryption"]
            );
        }
    }
    Ok(())
}

/// A netd before this one made `ndwg` a TUN device (a persistent one stays across
/// restarts); this netd needs a TAP device, so it deletes and makes it anew (the
/// encrypted overlays' packets are dropped meanwhile, none leaves in the clear), and
/// the network works with TCP joins on.
#[test]
fn an_older_netds_tun_device_is_made_anew_as_a_tap_device() -> Result<()> {
    let mut lab = Lab::cluster("et", 2)?;
    let (client, to) = sealed_pair(&mut lab, "198.19.97.0/24")?;
    get_with_marker(&client, to, "netd-before-upgrade", 0)?;
    let ns = lab.nodes[0].netns.clone();
    lab.stop_daemon(0, false)?;
    // What an older netd left: `ndwg` as a persistent TUN device.
    netd_lab::run(Command::new("ip").args(["-n", &ns, "link", "del", "ndwg"]))?;
    netd_lab::run(
        Command::new("ip").args(["-n", &ns, "tuntap", "add", "dev", "ndwg", "mode", "tun"]),
    )?;
    lab.start_daemon(0)?;
    let opened_before = lab.cli_json(0, &["status"])?["encryption"]["opened"]
        .as_u64()
        .unwrap_or(0);
    let written_before = ndwg_packets(&lab, 0)?.0;
    let link = netd_lab::run(Command::new("ip").args(["-n", &ns, "-d", "link", "show", "ndwg"]))?;
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    assert!(link.contains("tun type tap"), "{link}");
    assert!(link.contains("NOARP"), "{link}");
    assert!(
        get_with_marker(&client, to, "netd-after-upgrade", 200_000)?.len() >= 200_000,
        "the download after the upgrade"
    );
    let e = &lab.cli_json(0, &["status"])?["encryption"];
    assert_eq!(e["device_taken_over"], false, "{e}");
    assert_eq!(e["tcp_joins"], true, "{e}");
    // The download's segments went into the new device joined.
    let opened = e["opened"].as_u64().unwrap_or(0) - opened_before;
    let written = ndwg_packets(&lab, 0)?.0 - written_before;
    assert!(
        opened > 100 && written * 4 < opened,
        "n1 wrote {written} packets into ndwg for {opened} opened"
    );
    Ok(())
}
