//! The embedded DNS, with real clients: `dig` and `getent` (glibc's resolver, through the
//! task's resolv.conf with a search domain) from task namespaces, netd answering at
//! 127.0.0.11 inside each, and a real upstream (unbound) on the underlay.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netd_lab::{dig_once, in_netns, Lab};

fn status(dig_output: &str) -> &str {
    dig_output
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or("no status")
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn vip(lab: &Lab, service: &str, network: &str) -> Result<String> {
    let v = lab.cli_json(0, &["service", "inspect", service])?;
    Ok(v["vips"][network].as_str().context("vip")?.to_string())
}

/// One node, network `front`, service `web` with task web-1; returns web-1's netns.
fn one_node_with_web(tag: &str) -> Result<(Lab, String)> {
    let mut lab = Lab::start(tag, 1)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.10.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    lab.attach_whoami(0, "web", "web-1", None)?;
    let w1 = lab.ns("web-1");
    Ok((lab, w1))
}

fn ip(lab: &Lab, task: &str, network: &str) -> Result<String> {
    Ok(lab.task_ip(0, task, network)?.to_string())
}

fn getent(lab: &Lab, ns: &str, name: &str) -> Result<Option<String>> {
    let out = lab.exec_in(ns, &["getent", "hosts", name])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string))
}

#[test]
fn tasks_resolve_services_tasks_and_aliases_in_their_networks_only() -> Result<()> {
    let mut lab = Lab::start("dn", 1)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.10.0/24"],
    )?;
    lab.cli(
        0,
        &["network", "create", "back", "--subnet", "198.19.20.0/24"],
    )?;
    lab.cli(
        0,
        &[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--alias",
            "www",
        ],
    )?;
    lab.cli(
        0,
        &[
            "service",
            "create",
            "db",
            "--network",
            "back",
            "--endpoint-mode",
            "dnsrr",
        ],
    )?;
    for (svc, t) in [
        ("web", "web-1"),
        ("web", "web-2"),
        ("db", "db-1"),
        ("db", "db-2"),
    ] {
        lab.attach_whoami(0, svc, t, None)?;
    }
    let w1 = lab.ns("web-1");
    let web_vip = vip(&lab, "web", "front")?;
    let (web1, web2) = (ip(&lab, "web-1", "front")?, ip(&lab, "web-2", "front")?);
    let (db1, db2) = (ip(&lab, "db-1", "back")?, ip(&lab, "db-2", "back")?);

    // The service name is its VIP; getent goes through the search domain first.
    assert_eq!(lab.dig_short(&w1, "web")?, vec![web_vip.clone()]);
    assert_eq!(getent(&lab, &w1, "web")?, Some(web_vip.clone()));
    assert_eq!(lab.dig_short(&w1, "WWW.")?, vec![web_vip.clone()]);
    assert_eq!(lab.dig_short(&w1, "web.front")?, vec![web_vip.clone()]);
    assert_eq!(
        sorted(lab.dig_short(&w1, "tasks.web")?),
        sorted(vec![web1.clone(), web2.clone()])
    );
    assert_eq!(lab.dig_short(&w1, "web-2")?, vec![web2.clone()]);
    assert_eq!(getent(&lab, &w1, "web-2")?, Some(web2.clone()));
    // Over TCP too, and AAAA is an empty NOERROR.
    assert_eq!(
        lab.dig(&w1, &["+tcp", "+short", "web"])?.trim(),
        web_vip.as_str()
    );
    let aaaa = lab.dig(&w1, &["AAAA", "web"])?;
    assert_eq!(status(&aaaa), "NOERROR");
    assert!(aaaa.contains("ANSWER: 0"), "{aaaa}");
    // PTR for VIPs and task IPs.
    assert_eq!(lab.dig(&w1, &["+short", "-x", &web_vip])?.trim(), "web.");
    assert_eq!(lab.dig(&w1, &["+short", "-x", &web2])?.trim(), "web-2.");

    // Scoping: web-1 is not on `back`. Every form of db is NXDOMAIN, like a name that
    // does not exist, and getent finds nothing.
    for name in ["db", "tasks.db", "db-1", "db.back", "nosuch"] {
        assert_eq!(status(&lab.dig(&w1, &[name])?), "NXDOMAIN", "{name}");
    }
    assert_eq!(getent(&lab, &w1, "db")?, None);
    assert_eq!(status(&lab.dig(&w1, &["-x", &db1])?), "NXDOMAIN");

    // dnsrr: every task IP, rotated between answers; and db's tasks do not see web.
    let d1 = lab.ns("db-1");
    let first = lab.dig_short(&d1, "db")?;
    assert_eq!(
        sorted(first.clone()),
        sorted(vec![db1.clone(), db2.clone()])
    );
    let second = lab.dig_short(&d1, "db")?;
    assert_ne!(first, second, "dnsrr order did not rotate");
    assert_eq!(status(&lab.dig(&d1, &["web"])?), "NXDOMAIN");

    // Freshness: what `task attach/detach` and `service rm` return with, the next query
    // already sees.
    lab.attach_whoami(0, "web", "web-3", None)?;
    let web3 = ip(&lab, "web-3", "front")?;
    assert!(lab.dig_short(&w1, "tasks.web")?.contains(&web3));
    assert_eq!(lab.dig_short(&w1, "web-3")?, vec![web3.clone()]);
    lab.cli(0, &["task", "detach", "web-3"])?;
    assert!(!lab.dig_short(&w1, "tasks.web")?.contains(&web3));
    assert_eq!(status(&lab.dig(&w1, &["web-3"])?), "NXDOMAIN");
    lab.cli(0, &["service", "create", "api", "--network", "front"])?;
    lab.attach_whoami(0, "api", "api-1", None)?;
    lab.cli(0, &["service", "rm", "web"])?;
    assert_eq!(status(&lab.dig(&lab.ns("api-1"), &["web"])?), "NXDOMAIN");
    Ok(())
}

#[test]
fn other_names_go_upstream_and_cluster_names_never_do() -> Result<()> {
    let (mut lab, w1) = one_node_with_web("du")?;

    // No upstream answers yet (nothing at 198.18.0.3): SERVFAIL, before dig's 5 s.
    let start = Instant::now();
    let out = lab.dig(&w1, &["outside.example.org"])?;
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    lab.start_upstream_dns()?;
    assert_eq!(
        lab.dig_short(&w1, "outside.example.org")?,
        vec!["198.18.0.100".to_string()]
    );
    assert_eq!(
        getent(&lab, &w1, "outside.example.org")?.as_deref(),
        Some("198.18.0.100")
    );
    // 100 addresses do not fit one UDP answer: truncated to the client, which retries
    // over TCP and gets them all (netd asked upstream over TCP as well).
    let many = lab.dig(&w1, &["many.example.org"])?;
    assert!(many.contains("ANSWER: 100"), "{many}");

    // Cluster-shaped names (single labels, tasks.X, X.NETWORK, and their search-domain
    // forms, which getent tries first) are answered here, never sent upstream. Outside
    // names go upstream also in their search-domain forms, as a resolver expects.
    for name in ["nosuchsvc", "tasks.nosuchsvc", "web-9", "nosuch.front"] {
        lab.dig(&w1, &[name])?;
        getent(&lab, &w1, name)?;
    }
    let log = lab.upstream_queries();
    assert!(log.contains("outside.example.org"), "upstream log: {log}");
    for leak in ["nosuchsvc", "web-9", "front"] {
        assert!(!log.contains(leak), "{leak} leaked upstream: {log}");
    }
    Ok(())
}

#[test]
fn bad_packets_and_stalled_tcp_clients_do_not_hurt_the_dns() -> Result<()> {
    let (mut lab, w1) = one_node_with_web("db")?;
    let web_vip = vip(&lab, "web", "front")?;
    let dns = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 11), 53));

    // Garbage over UDP: too short (dropped), a header only with 2 questions (FORMERR),
    // an unknown opcode (NOTIMP), random bytes. Answers carry the right codes.
    let answers = in_netns(&w1, move || {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut codes = vec![];
        for p in [
            vec![1u8, 2, 3],
            vec![0xab, 0xcd, 0x01, 0x00, 0, 2, 0, 0, 0, 0, 0, 0],
            vec![0xab, 0xce, 0x10, 0x00, 0, 1, 0, 0, 0, 0, 0, 0],
            (0..300).map(|i| (i * 7 % 251) as u8).collect(),
        ] {
            s.send_to(&p, dns)?;
            let mut buf = [0u8; 512];
            codes.push(s.recv(&mut buf).ok().map(|n| (n, buf[3] & 0x0f)));
        }
        Ok(codes)
    })?;
    assert_eq!(answers[0], None, "a 3-byte packet got an answer");
    assert_eq!(answers[1], Some((12, 1)), "two questions: FORMERR");
    assert_eq!(answers[2], Some((12, 4)), "opcode 2: NOTIMP");

    // TCP clients that stall (one sends half a length, one connects and says nothing)
    // hold no one else up, and are closed by the server.
    let stalled = in_netns(&w1, move || {
        let mut a = TcpStream::connect(dns)?;
        a.write_all(&[0])?;
        let b = TcpStream::connect(dns)?;
        Ok((a, b))
    })?;
    assert_eq!(lab.dig_short(&w1, "web")?, vec![web_vip.clone()]);
    assert_eq!(
        lab.dig(&w1, &["+tcp", "+short", "web"])?.trim(),
        web_vip.as_str()
    );
    let (mut a, _b) = stalled;
    a.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 1];
    let closed = std::io::Read::read(&mut a, &mut buf);
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "a stalled client was never closed"
    );

    // netd restarts (kill -9): the DNS is back in the task with the daemon.
    lab.stop_daemon(0, true)?;
    lab.start_daemon(0)?;
    assert_eq!(lab.dig_short(&w1, "web")?, vec![web_vip]);
    Ok(())
}

#[test]
fn a_netd_killed_and_restarted_leaves_no_dns_query_unanswered() -> Result<()> {
    let (mut lab, w1) = one_node_with_web("dk")?;
    let web_vip = vip(&lab, "web", "front")?;
    let st = lab.cli_json(0, &["status"])?;
    assert_eq!(st["dns"]["handover"]["active"], true, "{st}");
    // A client asks again and again, over UDP and TCP, while netd is killed and started.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asker = {
        let (stop, w1) = (stop.clone(), w1.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut answers = vec![];
            for i in 0..4000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                answers.push(dig_once(&w1, "web", i % 2 == 1));
            }
            answers
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_daemon(0, true)?;
    // Down long enough for several queries to wait on the held sockets.
    std::thread::sleep(Duration::from_millis(1500));
    lab.start_daemon(0)?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = asker
        .join()
        .map_err(|_| anyhow::anyhow!("the asking thread panicked"))?;
    let wrong: Vec<_> = answers
        .iter()
        .filter(|(a, _)| a.as_ref().ok() != Some(&vec![web_vip.clone()]))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} queries not answered with {web_vip} across the restart: {wrong:?}",
        wrong.len(),
        answers.len()
    );
    // Some query waited for the new netd (it was asked while none ran) and got its answer.
    let waited = answers
        .iter()
        .filter(|(_, took)| *took > Duration::from_millis(500))
        .count();
    assert!(
        waited > 0,
        "no query was asked while netd was down: {answers:?}"
    );
    // The new netd serves the sockets the fd store kept, not new ones.
    let st = lab.cli_json(0, &["status"])?;
    let store = st["dns"]["handover"]["store"].as_str().unwrap_or_default();
    assert!(store.contains("kept from the netd before"), "{st}");
    assert_eq!(st["dns"]["handover"]["tasks_held"], 1, "{st}");
    // A detached task's sockets are closed everywhere, the fd store's copy too (which
    // would otherwise keep the namespace alive): the port is free in the task again.
    lab.cli(0, &["task", "detach", "web-1"])?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = in_netns(&w1, || {
        UdpSocket::bind("127.0.0.11:53")?;
        Ok(())
    }) {
        assert!(
            Instant::now() < deadline,
            "127.0.0.11:53 still bound in a detached task: {e:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = lab.cli_json(0, &["status"])?;
    assert_eq!(st["dns"]["handover"]["tasks_held"], 0, "{st}");
    Ok(())
}

#[test]
fn names_resolve_across_nodes_and_changes_reach_every_node() -> Result<()> {
    let mut lab = Lab::cluster("dc", 3)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.10.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    lab.cli(0, &["service", "create", "cli", "--network", "front"])?;
    lab.attach_whoami(0, "web", "web-1", None)?;
    lab.attach_whoami(1, "web", "web-2", None)?;
    lab.attach_whoami(2, "cli", "cli-1", None)?;
    let c = lab.ns("cli-1");
    assert_eq!(lab.dig_short(&c, "web")?, vec![vip(&lab, "web", "front")?]);
    assert_eq!(
        sorted(lab.dig_short(&c, "tasks.web")?),
        sorted(vec![
            ip(&lab, "web-1", "front")?,
            ip(&lab, "web-2", "front")?
        ])
    );
    assert_eq!(
        getent(&lab, &c, "web-2")?,
        Some(ip(&lab, "web-2", "front")?)
    );
    // A task attached on n2 through n1's API is in n3's answers once attach returns.
    let n2 = lab.nodes[1].name.clone();
    lab.attach_whoami(0, "web", "web-3", Some(&n2))?;
    let web3 = ip(&lab, "web-3", "front")?;
    assert!(lab.dig_short(&c, "tasks.web")?.contains(&web3));
    lab.cli(0, &["task", "detach", "web-3"])?;
    assert!(!lab.dig_short(&c, "tasks.web")?.contains(&web3));
    Ok(())
}

/// An upstream resolver that never answers names starting with `slow` (each such
/// forward holds a slot until netd gives up) and answers anything else with 198.18.0.99.
const BLACKHOLE_DNS: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
while True:
    d, a = s.recvfrom(4096)
    if len(d) < 17:
        continue
    i = 12
    while i < len(d) and d[i] != 0:
        i += 1 + d[i]
    if d[13:17] == b"slow":
        continue
    header = d[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([198, 18, 0, 99])
    s.sendto(header + d[12:i + 5] + answer, a)
"#;

/// Sends N queries for distinct `slowI.example.org` names to the embedded DNS in 0.2 s,
/// prints `sent`, then counts the REFUSED answers for 2 s and prints `refused K`.
const SLOW_FLOOD: &str = r#"
import socket, struct, sys, time
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.connect(("127.0.0.11", 53))
for i in range(n):
    name = b"".join(bytes([len(p)]) + p for p in (b"slow%d" % i, b"example", b"org"))
    s.send(struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + name + b"\x00\x00\x01\x00\x01")
    if i % 50 == 49:
        time.sleep(0.005)  # in bursts the server's socket buffer holds (none lost)
print("sent", flush=True)
s.settimeout(0.2)
refused, deadline = 0, time.time() + 2
while time.time() < deadline:
    try:
        d = s.recv(4096)
    except socket.timeout:
        continue
    refused += (d[3] & 0x0F) == 5
print("refused", refused, flush=True)
"#;

#[test]
fn one_task_flooding_slow_names_does_not_starve_anothers_answers() -> Result<()> {
    use std::io::BufRead;
    let (mut lab, _) = one_node_with_web("dfair")?;
    let upstream = lab.add_host("blackhole", netd_lab::UPSTREAM_DNS_HOST)?;
    lab.spawn_in(
        &upstream,
        std::path::Path::new("python3"),
        &["-c", BLACKHOLE_DNS],
    )?;
    lab.attach_whoami(0, "web", "flooder", None)?;
    lab.attach_whoami(0, "web", "bystander", None)?;
    let (flooder, bystander) = (lab.ns("flooder"), lab.ns("bystander"));
    // Upstream answers (the server is up) before the flood starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab
        .dig(&bystander, &["warm.example.org"])?
        .contains("198.18.0.99")
    {
        assert!(
            Instant::now() < deadline,
            "the test's upstream never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // 1500 forwards that upstream never answers: more than the node's 1024 slots.
    let mut flood = std::process::Command::new("ip");
    flood
        .args([
            "netns", "exec", &flooder, "python3", "-c", SLOW_FLOOD, "1500",
        ])
        .stdout(std::process::Stdio::piped());
    let mut flood = flood.spawn().context("run the flood")?;
    let mut lines = std::io::BufReader::new(flood.stdout.take().context("flood stdout")?).lines();
    assert_eq!(lines.next().transpose()?.as_deref(), Some("sent"));
    // While they hang, the other task's name still goes upstream and comes back.
    let out = lab.dig(&bystander, &["+tries=1", "+time=2", "fast.example.org"])?;
    assert!(
        out.contains("status: NOERROR") && out.contains("198.18.0.99"),
        "the bystander was starved: {out}"
    );
    // The flooder was refused at once past its share, not left to time out.
    let last = lines.next().transpose()?.unwrap_or_default();
    let _ = flood.wait();
    let refused: usize = last
        .strip_prefix("refused ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("flood printed {last:?}"))?;
    assert!(
        refused >= 1500 - netd_dns::server::MAX_FORWARDS_PER_TASK - 50,
        "only {refused} of 1500 refused"
    );
    Ok(())
}

/// The embedded DNS is no open resolver: it answers inside tasks (127.0.0.11 of each
/// task's own namespace) and nowhere else, neither to another task asking at a task's
/// address nor to a host on the underlay asking at the node.
#[test]
fn the_dns_answers_inside_tasks_only() -> Result<()> {
    let (mut lab, w1) = one_node_with_web("dopen")?;
    lab.start_upstream_dns()?;
    lab.attach_whoami(0, "web", "web-2", None)?;
    let w2 = lab.ns("web-2");
    let outside = lab.add_host("asker", 100)?;
    // Inside a task: cluster names and forwarded names both answer.
    assert_eq!(lab.dig_short(&w1, "web")?.len(), 1);
    assert!(lab
        .dig(&w1, &["outside.example.org"])?
        .contains("status: NOERROR"));
    let seen = || {
        lab.upstream_queries()
            .matches("outside.example.org")
            .count()
    };
    let before = seen();
    let w1_ip = ip(&lab, "web-1", "front")?;
    let node_ip = lab.nodes[0].ip.to_string();
    for (from, server) in [(&w2, &w1_ip), (&outside, &node_ip)] {
        for transport in ["+notcp", "+tcp"] {
            let at = format!("@{server}");
            let out = lab.dig(from, &[&at, "+time=2", transport, "outside.example.org"])?;
            assert!(
                !out.contains("status:") && !out.contains("198.18.0.100"),
                "{server} answered {transport}: {out}"
            );
            let out = lab.dig(from, &[&at, "+time=2", transport, "web"])?;
            assert!(
                !out.contains("status:"),
                "{server} answered {transport}: {out}"
            );
        }
    }
    // None of the outsiders' queries reached upstream.
    assert_eq!(seen(), before, "queries from outside tasks were forwarded");
    Ok(())
}

/// A forwarded name asked again is answered from netd's cache for its TTL: upstream
/// hears it once, and the second answer's TTL has not grown.
#[test]
fn a_forwarded_answer_is_kept_for_its_ttl() -> Result<()> {
    let (mut lab, w1) = one_node_with_web("dfwc")?;
    lab.start_upstream_dns()?;
    let ttl = |out: &str| -> Option<u32> {
        out.lines()
            .find(|l| l.starts_with("outside.example.org.") && l.contains("\tA\t"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    };
    let asked = || {
        lab.upstream_queries()
            .matches("outside.example.org")
            .count()
    };
    let first = lab.dig(&w1, &["outside.example.org"])?;
    assert!(first.contains("198.18.0.100"), "{first}");
    let after_first = asked();
    assert!(after_first > 0, "the first query did not go upstream");
    std::thread::sleep(Duration::from_millis(1100));
    let second = lab.dig(&w1, &["outside.example.org"])?;
    assert!(second.contains("198.18.0.100"), "{second}");
    let (a, b) = (ttl(&first), ttl(&second));
    assert!(a.is_some() && b <= a, "TTLs {a:?} then {b:?}");
    assert_eq!(asked(), after_first, "the second query went upstream too");
    let cached = lab.cli_json(0, &["status"])?["dns"]["forwarded_answers_cached"].as_u64();
    assert_eq!(cached, Some(1));
    Ok(())
}
