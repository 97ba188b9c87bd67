//! Nobody gets in where they don't belong, tried for real in the lab: VXLAN forged by a
//! host that is not a member of the cluster, and tasks that pretend to be another
//! (another source address, another MAC, ARP answers for another's address).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::{task_mac, Lab};
use serde_json::Value;

/// A UDP sink on port 9999 that appends every datagram it gets to `file`.
const SINK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
while True:
    d, _ = s.recvfrom(2048)
    open(sys.argv[1], "ab").write(d + b"\n")
"#;

/// Sends COUNT VXLAN datagrams to DST:4789, each carrying an Ethernet frame with a UDP
/// datagram (to port 9999) from SRC_IP/SRC_MAC to DST_IP/DST_MAC in network VNI.
const FORGE: &str = r#"
import socket, struct, sys
dst, vni, dmac, smac, sip, dip, payload, count = sys.argv[1:]
mac = lambda m: bytes(int(x, 16) for x in m.split(":"))
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return (~s) & 0xFFFF
data = payload.encode()
udp = struct.pack("!HHHH", 5555, 9999, 8 + len(data), 0) + data
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                 socket.inet_aton(sip), socket.inet_aton(dip))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = mac(dmac) + mac(smac) + b"\x08\x00" + ip + udp
vx = struct.pack("!II", 0x08000000, int(vni) << 8)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(count)):
    s.sendto(vx + frame, (dst, 4789))
"#;

/// Sends one gratuitous ARP reply from the namespace's eth0 claiming IP for MAC.
const ARP_CLAIM: &str = r#"
import socket, struct, sys
ip, mac = sys.argv[1:]
m = bytes(int(x, 16) for x in mac.split(":"))
a = socket.inet_aton(ip)
arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + m + a + b"\xff" * 6 + a
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
s.send(b"\xff" * 6 + m + b"\x08\x06" + arp)
"#;

fn python(lab: &Lab, netns: &str, script: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["python3", "-c", script];
    full.extend_from_slice(args);
    let out = lab.exec_in(netns, &full)?;
    if !out.status.success() {
        bail!(
            "python3 in {netns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn received(file: &Path) -> String {
    std::fs::read_to_string(file).unwrap_or_default()
}

fn dropped(lab: &Lab) -> Result<u64> {
    let st: Value = lab.cli_json(0, &["status"])?;
    st["overlay"]["vxlan_from_non_members_dropped"]
        .as_u64()
        .with_context(|| format!("status shows no VXLAN drop count: {st}"))
}

#[test]
fn vxlan_from_a_host_that_is_not_a_member_reaches_no_task() -> Result<()> {
    let mut lab = Lab::cluster("vx", 2)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.70.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    lab.attach_whoami(0, "web", "a", None)?;
    lab.attach_whoami(0, "web", "b", Some(&lab.nodes[1].name.clone()))?;
    let sink = lab.dir.join("sink-a");
    let python3 = Path::new("/usr/bin/python3");
    let ns_a = lab.ns("a");
    let sink_arg = sink.display().to_string();
    lab.spawn_in(&ns_a, python3, &["-c", SINK, &sink_arg])?;
    std::thread::sleep(Duration::from_millis(300));
    let vni = lab.cli_json(0, &["network", "inspect", "front"])?["vni"]
        .as_u64()
        .context("front has no VNI")?
        .to_string();
    let a = lab.task_ip(0, "a", "front")?.to_string();
    let node0 = lab.nodes[0].ip.to_string();
    let forged = |payload: &str, count: &str| -> Vec<String> {
        [
            node0.as_str(),
            &vni,
            &task_mac(a.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)),
            "02:42:c6:13:46:63",
            "198.19.70.99",
            &a,
            payload,
            count,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let before = dropped(&lab)?;

    // From a host on the underlay that is not a node: nothing arrives, all is counted.
    let evil = lab.add_host("evil", 70)?;
    let args = forged("FORGED", "5");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    python(&lab, &evil, FORGE, &argv)?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !received(&sink).contains("FORGED"),
        "a forged frame reached task a"
    );
    let now = dropped(&lab)?;
    assert!(now >= before + 5, "drops went from {before} to {now}");

    // The same datagram from a member (node 1's address) is delivered: the check above
    // did not pass because the frame was wrong.
    let args = forged("FROM-MEMBER", "1");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let n1 = lab.nodes[1].netns.clone();
    python(&lab, &n1, FORGE, &argv)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !received(&sink).contains("FROM-MEMBER") {
        if Instant::now() > deadline {
            bail!("a member's VXLAN did not arrive: {:?}", received(&sink));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn a_task_cannot_send_as_another_address_or_mac_nor_claim_anothers_ip() -> Result<()> {
    let mut lab = Lab::start("spoof", 1)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.71.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    for t in ["a", "b", "c"] {
        lab.attach_whoami(0, "web", t, None)?;
    }
    let (ns_a, ns_c) = (lab.ns("a"), lab.ns("c"));
    let b = lab.task_ip(0, "b", "front")?;
    assert!(lab.pings(&ns_a, b, &[])?, "a cannot reach b at all");

    // Another source address: dropped at a's port.
    lab.exec_in(
        &ns_a,
        &["ip", "addr", "add", "198.19.71.77/24", "dev", "eth0"],
    )?;
    assert!(
        !lab.pings(&ns_a, b, &["-I", "198.19.71.77"])?,
        "a reached b from an address that is not its own"
    );
    lab.exec_in(
        &ns_a,
        &["ip", "addr", "del", "198.19.71.77/24", "dev", "eth0"],
    )?;

    // Another MAC: dropped too.
    let own = task_mac(lab.task_ip(0, "a", "front")?);
    lab.exec_in(
        &ns_a,
        &["ip", "link", "set", "eth0", "address", "02:42:c6:13:47:66"],
    )?;
    assert!(!lab.pings(&ns_a, b, &[])?, "a reached b with another MAC");
    lab.exec_in(&ns_a, &["ip", "link", "set", "eth0", "address", &own])?;
    assert!(
        lab.pings(&ns_a, b, &[])?,
        "a lost its way back after the test"
    );

    // An ARP answer claiming b's address: c keeps b's MAC for it.
    assert!(lab.pings(&ns_c, b, &[])?);
    std::thread::sleep(Duration::from_millis(1200)); // past the neighbour lock time
    python(&lab, &ns_a, ARP_CLAIM, &[&b.to_string(), &own])?;
    std::thread::sleep(Duration::from_millis(200));
    let neigh = lab.exec_in(&ns_c, &["ip", "neigh", "show", &b.to_string()])?;
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(
        neigh.contains(&task_mac(b)) && !neigh.contains(&own),
        "c now sends b's traffic to a: {neigh}"
    );
    Ok(())
}

#[test]
fn internal_tasks_get_no_forwarding_and_bad_namespaces_and_subnets_are_refused() -> Result<()> {
    let mut lab = Lab::cluster("ref", 2)?;
    lab.start_upstream_dns()?;
    lab.cli(
        0,
        &[
            "network",
            "create",
            "sealed",
            "--subnet",
            "198.19.72.0/24",
            "--internal",
        ],
    )?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.73.0/24"],
    )?;
    lab.cli(0, &["service", "create", "vault", "--network", "sealed"])?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    lab.attach_whoami(0, "vault", "v", None)?;
    lab.attach_whoami(0, "web", "w", None)?;

    // A task only on internal networks resolves the cluster's names but nothing outside:
    // its DNS is not a way out (CVE-2024-29018).
    let (v, w) = (lab.ns("v"), lab.ns("w"));
    assert_eq!(lab.dig_short(&v, "vault")?.len(), 1);
    let out = lab.dig(&v, &["leak.example.org"])?;
    assert!(out.contains("status: REFUSED"), "{out}");
    assert!(
        !lab.upstream_queries().contains("leak.example.org"),
        "forwarded"
    );
    // ... while a task with egress still gets them forwarded.
    lab.dig(&w, &["outside.example.org"])?;
    assert!(lab.upstream_queries().contains("outside.example.org"));

    // Namespaces that are not a task's: the node's own, a sandbox of netd's; locally and
    // through another node's API. Each a 4xx with the reason, nothing attached.
    let own = format!(
        "/proc/{}/ns/net",
        lab.nodes[1].daemon.as_ref().context("daemon")?.id()
    );
    let sandbox = std::fs::read_dir("/run/netns")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("netd-{}-", lab.nodes[0].name)))
        .context("no sandbox of node 0")?;
    let sandbox = format!("/run/netns/{sandbox}");
    let n1 = lab.nodes[1].name.clone();
    let missing = format!("/run/netns/{}-missing", lab.prefix);
    for (api, path, node, why) in [
        (0, sandbox.as_str(), None, "not a task's"),
        (0, own.as_str(), Some(n1.as_str()), "not a task's"),
        (0, missing.as_str(), Some(n1.as_str()), "No such file"),
    ] {
        let mut args = vec!["task", "attach", "web", "--netns", path];
        if let Some(n) = node {
            args.extend_from_slice(&["--node", n]);
        }
        let v = lab.cli_json(api, &args)?;
        assert_eq!(v["status"], 400, "{path} via {node:?}: {v}");
        assert!(v["error"].as_str().unwrap_or("").contains(why), "{v}");
    }
    assert_eq!(
        lab.cli_json(0, &["task", "ls"])?.as_array().map(Vec::len),
        Some(2)
    );

    // Subnets no network may use, and one this node routes (its underlay).
    for subnet in ["127.1.0.0/24", "224.0.1.0/24", "0.0.0.0/8", "198.18.0.0/24"] {
        let v = lab.cli_json(0, &["network", "create", "bad", "--subnet", subnet])?;
        assert!(
            v["status"]
                .as_u64()
                .is_some_and(|s| (400..500).contains(&s)),
            "{subnet}: {v}"
        );
    }
    Ok(())
}

#[test]
fn a_task_cannot_use_another_networks_vip_on_either_datapath() -> Result<()> {
    for datapath in ["ebpf", "userspace"] {
        let mut lab = Lab::build(&format!("vs{}", &datapath[..1]), 1, false, datapath)?;
        lab.cli(
            0,
            &["network", "create", "front", "--subnet", "198.19.74.0/24"],
        )?;
        lab.cli(
            0,
            &["network", "create", "back", "--subnet", "198.19.75.0/24"],
        )?;
        lab.cli(0, &["service", "create", "web", "--network", "front"])?;
        lab.cli(0, &["service", "create", "db", "--network", "back"])?;
        lab.cli(0, &["service", "create", "client", "--network", "back"])?;
        lab.attach_whoami(0, "web", "w", None)?;
        lab.attach_whoami(0, "db", "d", None)?;
        lab.attach_whoami(0, "client", "c", None)?;
        let (web, db) = (lab.vip(0, "web", "front")?, lab.vip(0, "db", "back")?);
        let c = lab.ns("c");
        // Its own network's VIP works ...
        let body = netd_lab::http_get_from(&c, std::net::SocketAddr::from((db, 80)))?;
        assert_eq!(
            netd_lab::field(&body, "Hostname"),
            Some("d"),
            "{datapath}: {body}"
        );
        // ... another network's does not, even when the task knows the address.
        let other = netd_lab::connect_from(&c, std::net::SocketAddr::from((web, 80)));
        let Err(e) = other else {
            bail!("{datapath}: c reached web's VIP {web} on a network it is not on");
        };
        // eBPF refuses the connect() itself (it used to rewrite it towards web's task);
        // the userspace datapath has no way there at all (VIPs live in their network's
        // sandbox).
        if datapath == "ebpf" {
            let kind = e
                .root_cause()
                .downcast_ref::<std::io::Error>()
                .map(|e| e.kind());
            assert_eq!(kind, Some(std::io::ErrorKind::PermissionDenied), "{e:#}");
        }
    }
    Ok(())
}

/// Isolation on every path of the routing mesh (its XDP fast path and the kernel path):
/// published services of two networks answer through every node, but their tasks reach
/// each other neither across the ingress network (which carries the mesh, not traffic
/// between tasks) nor across their networks; a service only on an `--internal` network
/// cannot publish, and its task has no way out or in.
#[test]
fn isolation_holds_on_the_mesh_on_both_paths() -> Result<()> {
    use netd_lab::{connect_from, field, http_get_from};
    use std::net::SocketAddr;
    for xdp in ["native", "off"] {
        let mut lab = Lab::build_with(&format!("iso{}", &xdp[..1]), 2, true, "auto", xdp)?;
        for (name, subnet) in [("front", "198.19.76.0/24"), ("back", "198.19.77.0/24")] {
            lab.cli(0, &["network", "create", name, "--subnet", subnet])?;
        }
        lab.cli(
            0,
            &[
                "network",
                "create",
                "sealed",
                "--subnet",
                "198.19.78.0/24",
                "--internal",
            ],
        )?;
        let publish = |svc: &str, net: &str, port: &str| {
            vec![
                "service".to_string(),
                "create".into(),
                svc.into(),
                "--network".into(),
                net.into(),
                "--publish".into(),
                format!("{port}:80"),
            ]
        };
        lab.cli(0, &netd_lab::strs(&publish("web", "front", "8080")))?;
        lab.cli(0, &netd_lab::strs(&publish("api", "back", "8081")))?;
        let refused = lab.cli_json(0, &netd_lab::strs(&publish("vault", "sealed", "8082")))?;
        let err = refused["error"].as_str().unwrap_or_default();
        assert!(err.contains("--internal"), "{xdp}: {refused}");
        lab.cli(0, &["service", "create", "vault", "--network", "sealed"])?;
        let n2 = lab.nodes[1].name.clone();
        lab.attach_whoami(0, "web", "w", None)?;
        lab.attach_whoami(0, "api", "a", Some(&n2))?;
        lab.attach_whoami(0, "vault", "v", None)?;
        let client = lab.add_host("client", 100)?;
        lab.whoami_host("ext", 101, 8080)?;

        // The mesh answers on both nodes, for both services.
        for node in [lab.nodes[0].ip, lab.nodes[1].ip] {
            for (port, task) in [(8080, "w"), (8081, "a")] {
                let body = http_get_from(&client, SocketAddr::from((node, port)))?;
                assert_eq!(field(&body, "Hostname"), Some(task), "{xdp}: {body}");
            }
        }
        let (w, v) = (lab.ns("w"), lab.ns("v"));
        // The web task cannot reach the api task by its ingress address (the same L2
        // network on every node), nor by its address on `back`, nor the vault.
        let a_ingress = lab.task_ip(0, "a", "ingress")?;
        let a_back = lab.task_ip(0, "a", "back")?;
        let v_sealed = lab.task_ip(0, "v", "sealed")?;
        for target in [a_ingress, a_back, v_sealed] {
            assert!(
                connect_from(&w, SocketAddr::from((target, 80))).is_err(),
                "{xdp}: w reached {target}"
            );
            assert!(!lab.pings(&w, target, &[])?, "{xdp}: w pinged {target}");
        }
        // The vault has no way out, and the outside no way in.
        let ext = SocketAddr::from((netd_lab::underlay_ip(101), 8080));
        assert!(
            connect_from(&v, ext).is_err(),
            "{xdp}: the internal task got out"
        );
        assert!(connect_from(&client, SocketAddr::from((v_sealed, 80))).is_err());
        // ... while the web task's egress works.
        assert!(http_get_from(&w, ext)?.contains("ext"), "{xdp}: no egress");
    }
    Ok(())
}

/// The fuzz target of the API's request bodies, against a running daemon, for a bounded
/// number of inputs (seeded): random bytes, and valid bodies with bytes flipped, cut or
/// repeated, on every endpoint that takes one. None may get a 5xx or hang the daemon.
#[test]
fn hostile_api_bodies_get_a_4xx_never_a_5xx() -> Result<()> {
    let lab = Lab::start("fz", 1)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.76.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    let valid: [(&str, &[u8]); 5] = [
        ("/v1/networks", br#"{"name":"n1","subnet":"198.19.77.0/24","driver":"overlay"}"#),
        ("/v1/services", br#"{"name":"s1","networks":["front"],"publish":[{"published":9000,"target":80,"protocol":"tcp","mode":"host"}]}"#),
        ("/v1/tasks", br#"{"service":"web","netns":"/run/netns/nope","name":"t1","labels":{"a":"b"}}"#),
        ("/v1/networks/front/reservations", br#"{"owner":"x","address":"198.19.76.9"}"#),
        ("/v1/bindings/docker/abc", br#"{"network":"front","service":"web"}"#),
    ];
    let mut seed: u64 = 0x6170_6931;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut fivexx = vec![];
    for round in 0..400 {
        let (path, good) = valid[round % valid.len()];
        let method = if path.starts_with("/v1/bindings") {
            "PUT"
        } else {
            "POST"
        };
        let body: Vec<u8> = match round % 3 {
            0 => (0..next() % 200).map(|_| next() as u8).collect(),
            1 => {
                let mut b = good.to_vec();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % b.len();
                    b[at] = next() as u8;
                }
                b.truncate(1 + (next() as usize) % b.len());
                b
            }
            _ => {
                // A string field blown up, or the body repeated.
                let mut b = good.to_vec();
                let at = (next() as usize) % b.len();
                let filler = vec![b'a' + (next() % 26) as u8; (next() % 5000) as usize];
                b.splice(at..at, filler);
                b
            }
        };
        let (status, _) = lab.api_raw(0, method, path, &body)?;
        if status >= 500 {
            fivexx.push((path, status, String::from_utf8_lossy(&body).into_owned()));
        }
    }
    // A body over the limit is refused as such.
    let huge = vec![b' '; 3 << 20];
    assert_eq!(lab.api_raw(0, "POST", "/v1/networks", &huge)?.0, 413);
    assert!(fivexx.is_empty(), "5xx answers: {fivexx:?}");
    // The daemon still serves, and its state reads back.
    lab.cli(0, &["network", "ls"])?;
    lab.cli(0, &["task", "ls"])?;
    Ok(())
}
