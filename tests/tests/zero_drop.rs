//! Zero failed requests through the operations that replace or take out a task: a
//! rolling replace of every task of a service (attach the new one, drain the old one)
//! and a task's health check failing and passing again. Each runs under a steady load of
//! new connections, each carrying one HTTP request, from a client that counts every
//! failure (refused, reset, timed out); the failure count must be 0. On both VIP
//! datapaths (eBPF, userspace) and both paths of the routing mesh (XDP, kernel).

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::{connect_from, field, http_get, http_get_from, in_netns, load, Lab};
use serde_json::Value;

const PUBLISHED: u16 = 4567;
const PUBLISHED_UDP: u16 = 4568;
const CLIENT_HOST: u8 = 100;
/// The most a load may run, whatever the test does meanwhile.
const LOAD_LIMIT: Duration = Duration::from_secs(180);

/// A steady load of new connections from `client` to `to`, one HTTP request each, at
/// 300 a second over 2 connections (`netd-bench load`'s engine), until stopped.
fn start_load(client: &str, to: SocketAddr) -> Result<load::Running> {
    load::start(&load::Spec {
        connections: 2,
        rate: Some(300.0),
        duration: LOAD_LIMIT,
        new_connections: true,
        netns: Some(client.to_string()),
        ..load::Spec::new(load::Target::Http(to, "/".into()))
    })
}

/// Seconds since the load began.
fn at(load: &load::Running, t: Instant) -> f64 {
    t.saturating_duration_since(load.started()).as_secs_f64()
}

/// A keep-alive connection to `tcp` and a UDP socket sending to `udp`, both from
/// `client`, each answered by task `task` (new ones are tried until one is: the picks
/// rotate).
fn held_on(
    client: &str,
    tcp: SocketAddr,
    udp: SocketAddr,
    task: &str,
) -> Result<(TcpStream, UdpSocket)> {
    let mut stream = None;
    for _ in 0..20 {
        let mut s = connect_from(client, tcp)?;
        if field(&http_get(&mut s)?, "Hostname") == Some(task) {
            stream = Some(s);
            break;
        }
    }
    let stream = stream.with_context(|| format!("no connection to {tcp} reached {task}"))?;
    for _ in 0..20 {
        let s = in_netns(client, || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            Ok(s)
        })?;
        if udp_ask(&s, udp)? == task {
            return Ok((stream, s));
        }
    }
    bail!("no UDP socket to {udp} reached {task}")
}

/// One datagram from `s` to `to`; the name of the task that answered.
fn udp_ask(s: &UdpSocket, to: SocketAddr) -> Result<String> {
    s.send_to(b"who", to)?;
    let mut buf = [0u8; 2048];
    let (n, _) = s
        .recv_from(&mut buf)
        .with_context(|| format!("UDP answer from {to}"))?;
    let body = String::from_utf8_lossy(&buf[..n]);
    Ok(field(&body, "Hostname").unwrap_or("?").to_string())
}

/// How the load reaches the service: its VIP from a client task, or its published port
/// on the first node from a host on the underlay.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Vip,
    Mesh,
}

/// A 2-node cluster (`--datapath datapath --xdp xdp`; the mesh tests run XDP native, as
/// the ingress suite does), overlay `front`, service `web` (with the health check flags
/// `health`) publishing 4567:80, whoami tasks `names` alternating over the nodes, and the
/// load's client and target.
fn setup(
    tag: &str,
    datapath: &str,
    xdp: &str,
    via: Via,
    health: &[&str],
    names: &[&str],
) -> Result<(Lab, String, SocketAddr)> {
    let mut lab = Lab::build_with(tag, 2, true, datapath, xdp)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.50.0/24"],
    )?;
    let mut create = vec!["service", "create", "web", "--network", "front"];
    create.extend_from_slice(&["--publish", "4567:80", "--publish", "4568:80/udp"]);
    create.extend_from_slice(health);
    lab.cli(0, &create)?;
    for (i, n) in names.iter().enumerate() {
        let node = lab.nodes[i % 2].name.clone();
        lab.attach_whoami(0, "web", n, Some(&node))?;
    }
    let (client, to) = match via {
        Via::Vip => {
            let client = lab.add_client("client", "front", 0)?;
            (client, SocketAddr::from((lab.vip(0, "web", "front")?, 80)))
        }
        Via::Mesh => {
            let client = lab.add_host("client", CLIENT_HOST)?;
            let node: Ipv4Addr = lab.nodes[0].ip;
            (client, SocketAddr::from((node, PUBLISHED)))
        }
    };
    Ok((lab, client, to))
}

fn tasks(lab: &Lab) -> Result<Vec<Value>> {
    lab.tasks_of(0, "web")
}

fn task_field(lab: &Lab, name: &str, key: &str) -> Result<String> {
    Ok(tasks(lab)?
        .iter()
        .find(|t| t["name"] == name)
        .map(|t| t[key].as_str().unwrap_or("").to_string())
        .unwrap_or_else(|| "gone".into()))
}

fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !check()? {
        if Instant::now() > deadline {
            bail!("not within {limit:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn no_failures(r: &load::Report, what: &str) -> Result<()> {
    r.no_failures(what)
}

/// Every task of `web` replaced one by one under load: the new task attached (the
/// attach returns once it works), the old one detached with `--drain`, which takes it
/// out of new connections at once and removes it once its connections are gone (well
/// before the 20 s asked). `task ls` shows it draining meanwhile. A keep-alive connection
/// and a UDP socket that reached the first old task keep reaching it while it drains;
/// after it went, the UDP socket's next datagram reaches a new task.
fn rolling_replace(tag: &str, datapath: &str, xdp: &str, via: Via) -> Result<()> {
    let old = ["o0", "o1", "o2", "o3", "o4"];
    let (mut lab, client, to) = setup(tag, datapath, xdp, via, &[], &old)?;
    // A keep-alive connection and a UDP socket that reached o0 before its drain.
    let udp_to = SocketAddr::from((to.ip(), if via == Via::Mesh { PUBLISHED_UDP } else { 80 }));
    let (held, held_udp) = held_on(&client, to, udp_to, "o0")?;
    let mut held = Some(held);
    let load = start_load(&client, to)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut draining_seen = false;
    for (i, o) in old.iter().enumerate() {
        let node = lab.nodes[i % 2].name.clone();
        lab.attach_whoami(0, "web", &format!("n{i}"), Some(&node))?;
        let began = Instant::now();
        lab.cli(1, &["task", "detach", o, "--drain", "20"])?;
        draining_seen |= task_field(&lab, o, "state")? == "draining";
        if i == 0 {
            // While draining, the flows o0 had keep reaching it, and o0 stays.
            if let Some(conn) = held.as_mut() {
                for _ in 0..4 {
                    std::thread::sleep(Duration::from_millis(500));
                    let body = http_get(conn)?;
                    assert_eq!(field(&body, "Hostname"), Some("o0"), "{body}");
                    assert_eq!(udp_ask(&held_udp, udp_to)?, "o0");
                }
            }
            assert_eq!(task_field(&lab, o, "state")?, "draining");
            // Closed: o0 goes once it has received no datagram for a while either.
            held = None;
        }
        eventually(Duration::from_secs(25), &format!("{o} removed"), || {
            Ok(task_field(&lab, o, "state")? == "gone")
        })?;
        // It went because its connections did, not at the deadline.
        let took = began.elapsed();
        assert!(took < Duration::from_secs(15), "{o} took {took:?} to drain");
    }
    // The UDP socket whose task went makes a new pick among the tasks there are.
    let now = udp_ask(&held_udp, udp_to)?;
    assert!(
        now.starts_with('n'),
        "the UDP socket reached {now} after o0 went"
    );
    let replaced = at(&load, Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let report = load.stop();
    no_failures(&report, "rolling replace")?;
    assert!(draining_seen, "task ls never showed a task draining");
    let after = report.backends_within(replaced, f64::MAX);
    assert!(
        !after.is_empty() && after.keys().all(|n| n.starts_with('n')),
        "an old task answered after the replace: {after:?}"
    );
    assert!(
        report.requests > 200,
        "the load made only {} requests",
        report.requests
    );
    Ok(())
}

#[test]
fn a_rolling_replace_through_a_vip_fails_no_request_ebpf() -> Result<()> {
    rolling_replace("zre", "ebpf", "auto", Via::Vip)
}

#[test]
fn a_rolling_replace_through_a_vip_fails_no_request_userspace() -> Result<()> {
    rolling_replace("zru", "userspace", "auto", Via::Vip)
}

#[test]
fn a_rolling_replace_through_the_mesh_fails_no_request_xdp() -> Result<()> {
    rolling_replace("zrx", "auto", "native", Via::Mesh)
}

#[test]
fn a_rolling_replace_through_the_mesh_fails_no_request_kernel() -> Result<()> {
    rolling_replace("zrk", "auto", "off", Via::Mesh)
}

/// A task whose health check fails (its server still serves everything else, as a task
/// that is shutting down or overloaded would) leaves new connections and DNS answers on
/// every node within interval × retries, and comes back after one passing probe; no
/// request fails meanwhile. A keep-alive connection and a UDP flow it had keep reaching
/// it while it is out (cutting them would fail what it is serving).
fn health_out_and_back(tag: &str, datapath: &str, xdp: &str, via: Via) -> Result<()> {
    let health = [
        "--health-cmd",
        "http:80/health",
        "--health-interval",
        "1",
        "--health-retries",
        "2",
    ];
    let (lab, client, to) = setup(tag, datapath, xdp, via, &health, &["a", "b", "c"])?;
    for t in ["a", "b", "c"] {
        eventually(Duration::from_secs(10), &format!("{t} healthy"), || {
            Ok(task_field(&lab, t, "health")? == "healthy")
        })?;
    }
    // A task with a check takes picks once healthy: the nodes' tables and kernels
    // follow the report (the kernel mesh with a reconcile step).
    for i in 0..lab.nodes.len() {
        lab.await_in_force(i, Duration::from_secs(10))?;
    }
    let b = lab.task_ip(0, "b", "front")?;
    let b_ns = lab.ns("b");
    let set = |code: u16| -> Result<()> {
        let url = format!("http://{b}/health?set={code}");
        let out = lab.exec_in(&b_ns, &["curl", "-sf", "-m", "3", &url])?;
        anyhow::ensure!(out.status.success(), "curl {url}: {out:?}");
        Ok(())
    };
    // A keep-alive connection and a UDP socket that reached b before it failed.
    let udp_to = SocketAddr::from((to.ip(), if via == Via::Mesh { PUBLISHED_UDP } else { 80 }));
    let (mut held, held_udp) = held_on(&client, to, udp_to, "b")?;
    let load = start_load(&client, to)?;
    std::thread::sleep(Duration::from_millis(500));
    set(503)?;
    // interval × retries (2 s), plus a probe's time and the write (a loaded 2-core
    // machine may take longer).
    eventually(Duration::from_secs(8), "b unhealthy in task ls", || {
        Ok(task_field(&lab, "b", "health")?.starts_with("unhealthy"))
    })?;
    // Every node's tables follow the write (the mesh with a reconcile step).
    let out_at = at(&load, Instant::now()) + 1.5;
    // Out of the answers of the service's names too, on the other node.
    let ns1 = lab.ns("a");
    eventually(Duration::from_secs(3), "tasks.web without b", || {
        Ok(!lab.dig_short(&ns1, "tasks.web")?.contains(&b.to_string()))
    })?;
    let inspected = lab.cli_json(1, &["service", "inspect", "web"])?;
    // Out of new picks, b keeps what it has: it still answers them.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1000));
        let body = http_get(&mut held)?;
        assert_eq!(field(&body, "Hostname"), Some("b"), "{body}");
        assert_eq!(udp_ask(&held_udp, udp_to)?, "b");
    }
    set(200)?;
    let passing = at(&load, Instant::now());
    eventually(Duration::from_secs(5), "b healthy again", || {
        Ok(task_field(&lab, "b", "health")? == "healthy")
    })?;
    let back_at = at(&load, Instant::now()) + 0.3;
    std::thread::sleep(Duration::from_secs(3));
    let report = load.stop();
    no_failures(&report, "health out and back")?;
    let while_out = report.backends_within(out_at, passing);
    assert!(
        !while_out.contains_key("b") && while_out.len() == 2,
        "while b was unhealthy: {while_out:?} ({inspected})"
    );
    let after = report.backends_within(back_at, f64::MAX);
    assert!(after.contains_key("b"), "b never came back: {after:?}");
    eventually(Duration::from_secs(3), "tasks.web with b", || {
        Ok(lab.dig_short(&ns1, "tasks.web")?.contains(&b.to_string()))
    })?;
    Ok(())
}

#[test]
fn a_failing_health_check_takes_a_task_out_and_back_without_a_failed_request_ebpf() -> Result<()> {
    health_out_and_back("zhe", "ebpf", "auto", Via::Vip)
}

#[test]
fn a_failing_health_check_takes_a_task_out_and_back_without_a_failed_request_userspace(
) -> Result<()> {
    health_out_and_back("zhu", "userspace", "auto", Via::Vip)
}

#[test]
fn a_failing_health_check_takes_a_task_out_and_back_without_a_failed_request_xdp() -> Result<()> {
    health_out_and_back("zhx", "auto", "native", Via::Mesh)
}

#[test]
fn a_failing_health_check_takes_a_task_out_and_back_without_a_failed_request_kernel() -> Result<()>
{
    health_out_and_back("zhk", "auto", "off", Via::Mesh)
}

/// etcd down for a minute under load, through a VIP and the mesh at once: the data plane
/// keeps its last state (no request fails), writes answer 503 `store_unavailable` and
/// change nothing, reads answer from the node's view; once etcd is back every node
/// catches up without a restart, having written nothing to its kernel for the outage
/// (nothing was redone), and a new task is programmed everywhere.
fn etcd_down_for_a_minute(tag: &str, datapath: &str) -> Result<()> {
    let (mut lab, client, to) = setup(tag, datapath, "auto", Via::Vip, &[], &["a", "b", "c", "d"])?;
    let outside = lab.add_host("outside", CLIENT_HOST)?;
    let mesh = SocketAddr::from((lab.nodes[0].ip, PUBLISHED));
    let writes = |lab: &Lab, i: usize| -> Result<Value> {
        Ok(lab.cli_json(i, &["status"])?["reconcile"]["kernel_writes"].clone())
    };
    let vip_load = start_load(&client, to)?;
    let mesh_load = start_load(&outside, mesh)?;
    std::thread::sleep(Duration::from_secs(1));
    let before = [writes(&lab, 0)?, writes(&lab, 1)?];
    let listed = lab.cli_json(1, &["task", "ls"])?;

    lab.stop_etcd(true)?;
    let down = Instant::now();
    let e = lab.cli_json(0, &["network", "create", "late"])?;
    assert_eq!(e["code"], "store_unavailable", "{e}");
    assert_eq!(
        lab.cli_json(1, &["task", "ls"])?,
        listed,
        "reads answer from the view"
    );
    let left = Duration::from_secs(60).saturating_sub(down.elapsed());
    std::thread::sleep(left);
    lab.start_etcd()?;

    // A write that asks no node's kernel for anything (a network nobody is on yet).
    eventually(
        Duration::from_secs(30),
        "a write goes through again",
        || {
            let v = lab.cli_json(0, &["network", "create", "after"])?;
            Ok(v.get("error").is_none())
        },
    )?;
    let up = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let (vip_down, vip_up) = (at(&vip_load, down), at(&vip_load, up));
    let (mesh_down, mesh_up) = (at(&mesh_load, down), at(&mesh_load, up));
    let vip = vip_load.stop();
    let mesh = mesh_load.stop();
    no_failures(&vip, "through the VIP")?;
    no_failures(&mesh, "through the mesh")?;
    for (what, r, from, to) in [
        ("VIP", &vip, vip_down, vip_up),
        ("mesh", &mesh, mesh_down, mesh_up),
    ] {
        let during: u64 = r.backends_within(from, to).values().sum();
        assert!(
            during > 100,
            "{what}: only {during} answers while etcd was down"
        );
    }
    // Nothing redone: the kernel writes counted before the outage are all there were.
    for (i, b) in before.iter().enumerate() {
        let a = writes(&lab, i)?;
        assert_eq!(&a, b, "node {i} wrote to its kernel across the outage");
    }
    // The watches work again: a new task on n2 is reachable from n1's client.
    lab.attach_whoami(0, "web", "e", Some(&lab.nodes[1].name.clone()))?;
    let e_ip = lab.task_ip(0, "e", "front")?;
    let body = http_get_from(&client, SocketAddr::from((e_ip, 80)))?;
    assert_eq!(field(&body, "Hostname"), Some("e"));
    Ok(())
}

#[test]
fn etcd_down_for_a_minute_fails_no_request_ebpf() -> Result<()> {
    etcd_down_for_a_minute("zee", "ebpf")
}

#[test]
fn etcd_down_for_a_minute_fails_no_request_userspace() -> Result<()> {
    etcd_down_for_a_minute("zeu", "userspace")
}

/// The kernel conntrack entries of established TCP flows from source port `port`, in
/// every namespace of the lab: (namespace, seconds left). Closed flows of the load that
/// happened to use that port (a translation port, in another namespace) are not the
/// idle connection's.
fn tracked(lab: &Lab, port: u16) -> Result<Vec<(String, u64)>> {
    let mut out = vec![];
    // Every name the lab made carries its prefix (nodes, hosts, tasks, netd's sandboxes).
    let ns_of_lab = lab.ns("");
    let prefix = ns_of_lab.trim_end_matches('-');
    for e in std::fs::read_dir("/run/netns")?.flatten() {
        let ns = e.file_name().to_string_lossy().into_owned();
        if !ns.contains(prefix) {
            continue;
        }
        let o = lab.exec_in(&ns, &["conntrack", "-L", "-p", "tcp"])?;
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if line.contains(&format!("sport={port} ")) && line.contains(" ESTABLISHED ") {
                let left = line.split_whitespace().nth(2).and_then(|t| t.parse().ok());
                out.push((
                    ns.clone(),
                    left.context("conntrack line without a timeout")?,
                ));
            }
        }
    }
    Ok(out)
}

/// An idle TCP connection through a VIP and through the mesh outlives every timer on its
/// path. 20 minutes of silence are too long for the suite, so the test proves it: the
/// connections sit idle for 30 s under a steady load of new connections through the
/// same VIP and ingress node, while netd runs a full step every 2 s (and with it its
/// flow sweeps, at most every 10 s), and still carry a request; every conntrack entry
/// the kernel keeps for them anywhere in the lab has more than 20 minutes left; every
/// expiry netd itself applies to an established TCP flow is at least 20 minutes (unit
/// test `no_timer_of_netd_ends_an_idle_tcp_connection_within_20_minutes`); and the XDP
/// path's established table never evicts (xdp_flood.rs outlives 8 × its size of closed
/// connections).
fn an_idle_connection_survives(tag: &str, datapath: &str, xdp: &str) -> Result<()> {
    let (mut lab, client, vip) = setup(tag, datapath, xdp, Via::Vip, &[], &["a", "b"])?;
    lab.daemon_args = vec!["--resync".into(), "2".into()];
    for i in 0..2 {
        lab.stop_daemon(i, false)?;
        lab.start_daemon(i)?;
    }
    let outside = lab.add_host("outside", CLIENT_HOST)?;
    let mesh = SocketAddr::from((lab.nodes[1].ip, PUBLISHED));
    let mut held = vec![];
    for (what, from, to) in [("VIP", &client, vip), ("mesh", &outside, mesh)] {
        let mut conn = connect_from(from, to)?;
        let name = field(&http_get(&mut conn)?, "Hostname")
            .unwrap_or("?")
            .to_string();
        held.push((what, conn, name));
    }
    // The rest of the traffic goes on meanwhile (new connections through the same VIP
    // and the same ingress node: about 9,000 flows each), and none of it fails.
    let loads = [start_load(&client, vip)?, start_load(&outside, mesh)?];
    std::thread::sleep(Duration::from_secs(30));
    for (what, load) in ["VIP", "mesh"].into_iter().zip(loads) {
        no_failures(
            &load.stop(),
            &format!("the load through the {what} meanwhile"),
        )?;
    }
    let steps = lab.cli_json(0, &["status"])?["reconcile"]["steps"].as_u64();
    assert!(steps.is_some_and(|s| s > 10), "netd ran {steps:?} steps");
    for (what, conn, name) in &mut held {
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let port = conn.local_addr()?.port();
        let body = http_get(conn).with_context(|| format!("the idle connection via the {what}"))?;
        assert_eq!(field(&body, "Hostname"), Some(name.as_str()), "{what}");
        let entries = tracked(&lab, port)?;
        // The mesh's kernel path tracks its flows (DNAT): the check must have found them.
        if *what == "mesh" && xdp == "off" {
            assert!(!entries.is_empty(), "no conntrack entry of the mesh flow");
        }
        for (ns, left) in entries {
            assert!(
                left > 20 * 60,
                "{what}: conntrack in {ns} forgets the idle connection after {left} s"
            );
        }
    }
    Ok(())
}

#[test]
fn an_idle_connection_survives_ebpf_and_xdp() -> Result<()> {
    an_idle_connection_survives("zie", "ebpf", "native")
}

#[test]
fn an_idle_connection_survives_userspace_and_the_kernel_mesh() -> Result<()> {
    an_idle_connection_survives("ziu", "userspace", "off")
}

/// A node lost under load (its underlay cut, as a machine that died): once its lease
/// has ended (5 s in the lab) and the other node took its tasks out, no new request
/// fails, through the VIP and through the mesh on the node that is left; requests asked
/// before may (they went to a task that is no longer there).
fn a_lost_node(tag: &str, datapath: &str, xdp: &str) -> Result<()> {
    let tasks = ["a", "b", "c", "d"];
    let (mut lab, client, vip) = setup(tag, datapath, xdp, Via::Vip, &[], &tasks)?;
    let outside = lab.add_host("outside", CLIENT_HOST)?;
    let mesh = SocketAddr::from((lab.nodes[0].ip, PUBLISHED));
    let vip_load = start_load(&client, vip)?;
    let mesh_load = start_load(&outside, mesh)?;
    std::thread::sleep(Duration::from_secs(1));
    lab.cut_underlay(1)?;
    let cut = Instant::now();
    // b and d ran on n2: n1 takes them out when n2's lease ends.
    eventually(
        Duration::from_secs(15),
        "n2's tasks out of n1's VIP",
        || {
            let v = lab.cli_json(0, &["service", "inspect", "web"])?;
            let b = lab.task_ip(0, "b", "front")?.to_string();
            Ok(!v["load_balancer"].to_string().contains(&format!("\"{b}\"")))
        },
    )?;
    // n1's view has it; from when its tables and kernel have it too, no request fails.
    lab.await_in_force(0, Duration::from_secs(10))?;
    let settled = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let (vip_from, mesh_from) = (at(&vip_load, settled), at(&mesh_load, settled));
    let vip = vip_load.stop();
    let mesh = mesh_load.stop();
    for (what, r, from) in [("VIP", &vip, vip_from), ("mesh", &mesh, mesh_from)] {
        let after = r.failed_from(from.ceil());
        assert_eq!(
            after,
            0,
            "{what}: {after} requests asked after the withdrawal ({:.1} s after the cut) \
             failed: {:?}",
            settled.duration_since(cut).as_secs_f64(),
            r.failures_per_second
        );
        let answered = r.backends_within(from.ceil(), f64::MAX);
        assert!(
            !answered.is_empty() && answered.keys().all(|t| t == "a" || t == "c"),
            "{what}: answered after the withdrawal by {answered:?}"
        );
    }
    Ok(())
}

#[test]
fn a_lost_node_fails_no_request_once_withdrawn_ebpf_and_xdp() -> Result<()> {
    a_lost_node("zle", "ebpf", "native")
}

#[test]
fn a_lost_node_fails_no_request_once_withdrawn_userspace_and_the_kernel_mesh() -> Result<()> {
    a_lost_node("zlu", "userspace", "off")
}
