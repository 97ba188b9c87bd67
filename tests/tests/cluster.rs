//! Multi-node overlays, in the lab: three node namespaces on one underlay, each running
//! netd against a real etcd (its own namespace on the underlay), tasks running whoami on
//! different nodes, real traffic over VXLAN between them.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::{connect_from, field, http_get_from, task_mac, udp_ask_from, Lab, LEASE_TTL_SECS};
use serde_json::Value;

const PORT: u16 = 80;

fn addr(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, PORT))
}

/// A 3-node cluster with overlay `front` and service `web` (created through node 1).
fn cluster(tag: &str) -> Result<Lab> {
    let lab = Lab::cluster(tag, 3)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.10.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    Ok(lab)
}

fn node_name(lab: &Lab, i: usize) -> String {
    lab.nodes[i].name.clone()
}

/// Waits up to `limit` for `check` to hold; the error names what was awaited.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not within {limit:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The static FDB entries (`MAC dst VTEP`) of `network`'s vxlan0 on node `i`.
fn fdb(lab: &Lab, i: usize, network: &str) -> Result<BTreeSet<String>> {
    let net = lab.cli_json(i, &["network", "inspect", network])?;
    let id = net["id"].as_str().context("network id")?;
    let sandbox = format!("netd-{}-{id}", lab.nodes[i].name);
    let out = netd_lab::run(
        std::process::Command::new("bridge").args(["-n", &sandbox, "fdb", "show", "dev", "vxlan0"]),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let dst = w.iter().position(|x| *x == "dst")?;
            Some(format!("{} dst {}", w[0], w.get(dst + 1)?))
        })
        .collect())
}

fn reaches(from: &str, to: Ipv4Addr, name: &str) -> bool {
    http_get_from(from, addr(to))
        .map(|body| field(&body, "Hostname") == Some(name))
        .unwrap_or(false)
}

#[test]
fn tasks_on_three_nodes_talk_over_vxlan_with_the_right_mtu() -> Result<()> {
    let mut lab = cluster("mn")?;
    // Every node sees every node, with its underlay address, alive.
    let nodes = lab.cli_json(1, &["node", "ls"])?;
    for (i, n) in lab.nodes.iter().enumerate() {
        let rec = nodes
            .as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == n.name.as_str()))
            .with_context(|| format!("node {i} missing from {nodes}"))?;
        assert_eq!(rec["address"], n.ip.to_string());
        assert_eq!(rec["status"], "ready");
    }
    // a on n1 (local attach), b on n2 attached through n1's API, c on n3 through its own.
    lab.attach_whoami(0, "web", "a", None)?;
    let b = lab.attach_whoami(0, "web", "b", Some(&node_name(&lab, 1)))?;
    assert_eq!(b["node"], node_name(&lab, 1).as_str());
    assert_eq!(b["state"], "running", "{b}");
    lab.attach_whoami(2, "web", "c", None)?;
    let ip = |t: &str| lab.task_ip(1, t, "front");
    let (a, b, c) = (ip("a")?, ip("b")?, ip("c")?);
    // An acknowledged attach is in force on every node: the other nodes' kernels hold
    // c's VXLAN peer when n3's API answers, not some time later.
    for i in [0, 1] {
        let entries = fdb(&lab, i, "front")?;
        assert!(
            entries.contains(&format!("{} dst {}", task_mac(c), lab.nodes[2].ip)),
            "n{} has no peer for c when the attach returns: {entries:?}",
            i + 1
        );
    }

    // TCP, UDP and ICMP across nodes, in both directions; no NAT on the overlay.
    for (from, to, name) in [("a", b, "b"), ("a", c, "c"), ("c", a, "a"), ("b", c, "c")] {
        let body = http_get_from(&lab.ns(from), addr(to))?;
        assert_eq!(field(&body, "Hostname"), Some(name), "{from} -> {name}");
        assert!(
            lab.pings(&lab.ns(from), to, &[])?,
            "{from} cannot ping {name}"
        );
    }
    let body = http_get_from(&lab.ns("c"), addr(a))?;
    assert!(
        field(&body, "RemoteAddr").is_some_and(|r| r.starts_with(&format!("{c}:"))),
        "{body}"
    );
    let (reply, from) = udp_ask_from(&lab.ns("b"), addr(a))?;
    assert_eq!(field(&reply, "Hostname"), Some("a"));
    assert_eq!(from, addr(a));

    // The kernel state behind it: n1's vxlan0 sends b's MAC to n2 and c's to n3.
    let entries = fdb(&lab, 0, "front")?;
    assert!(
        entries.contains(&format!("{} dst {}", task_mac(b), lab.nodes[1].ip)),
        "{entries:?}"
    );
    assert!(
        entries.contains(&format!("{} dst {}", task_mac(c), lab.nodes[2].ip)),
        "{entries:?}"
    );
    assert!(
        !entries.iter().any(|e| e.starts_with(&task_mac(a))),
        "own task in fdb"
    );

    // MTU: 1450 inside. A 1400-byte payload crosses with DF set; 1422 + 28 = 1450 fits
    // exactly; one byte more does not fit and is refused, not fragmented.
    let a_ns = lab.ns("a");
    assert!(lab.pings(&a_ns, b, &["-M", "do", "-s", "1400"])?);
    assert!(lab.pings(&a_ns, b, &["-M", "do", "-s", "1422"])?);
    assert!(!lab.pings(&a_ns, b, &["-M", "do", "-s", "1423"])?);

    // A restarted daemon finds its overlay state complete and changes nothing.
    let snapshot = lab.kernel_snapshot(0)?;
    lab.stop_daemon(0, true)?;
    lab.start_daemon(0)?;
    let again = lab.kernel_snapshot(0)?;
    assert!(
        snapshot == again,
        "{}",
        netd_lab::diff_lines(&snapshot, &again)
    );

    // Detaching c withdraws it from the other nodes, by the time the detach returns.
    lab.cli(0, &["task", "detach", "c"])?;
    for i in [0, 1] {
        let entries = fdb(&lab, i, "front")?;
        assert!(
            !entries.iter().any(|e| e.starts_with(&task_mac(c))),
            "n{} still has a peer for c when the detach returns: {entries:?}",
            i + 1
        );
    }
    Ok(())
}

#[test]
fn two_overlays_stay_isolated_across_nodes() -> Result<()> {
    let mut lab = cluster("mi")?;
    lab.cli(
        0,
        &["network", "create", "back", "--subnet", "198.19.20.0/24"],
    )?;
    lab.cli(0, &["service", "create", "db", "--network", "back"])?;
    lab.attach_whoami(0, "web", "a", None)?;
    lab.attach_whoami(1, "db", "d", None)?;
    let d = lab.task_ip(0, "d", "back")?;
    let a_ns = lab.ns("a");
    assert!(!lab.pings(&a_ns, d, &[])?, "front task reached back task");
    assert!(
        connect_from(&a_ns, addr(d)).is_err(),
        "TCP front -> back worked"
    );
    // n1 has no sandbox for `back` at all: nothing local needs it.
    let back_id = lab.cli_json(0, &["network", "inspect", "back"])?["id"]
        .as_str()
        .context("id")?
        .to_string();
    let sandbox = format!("/run/netns/netd-{}-{back_id}", lab.nodes[0].name);
    assert!(!std::path::Path::new(&sandbox).exists(), "{sandbox} exists");
    // A task of `back` on n1 does reach d (the check above is not vacuous).
    lab.attach_whoami(0, "db", "e", None)?;
    assert!(reaches(&lab.ns("e"), d, "d"));
    Ok(())
}

#[test]
fn concurrent_attaches_from_three_nodes_never_share_an_address() -> Result<()> {
    let mut lab = cluster("mc")?;
    let per_node = 5;
    let mut paths = vec![];
    for i in 0..3 {
        for k in 0..per_node {
            paths.push((i, lab.add_task_netns(&format!("t{i}{k}"))?.1));
        }
    }
    let netd = netd_lab::binary("netd")?;
    let apis: Vec<String> = lab.nodes.iter().map(|n| n.api()).collect();
    // Every attach at the same moment: 5 per node, each through its own node's API.
    let handles: Vec<_> = paths
        .into_iter()
        .map(|(i, path)| {
            let (netd, api) = (netd.clone(), apis[i].clone());
            std::thread::spawn(move || -> Result<Value> {
                let out = std::process::Command::new(netd)
                    .args([
                        "--output", "json", "task", "attach", "web", "--netns", &path,
                    ])
                    .env("NETD_API", api)
                    .output()?;
                if !out.status.success() {
                    bail!("attach failed: {}", String::from_utf8_lossy(&out.stdout));
                }
                Ok(serde_json::from_slice(&out.stdout)?)
            })
        })
        .collect();
    let mut ips = BTreeSet::new();
    let mut names = BTreeSet::new();
    for h in handles {
        let t = h
            .join()
            .map_err(|_| anyhow::anyhow!("attach thread panicked"))??;
        let ip = t["endpoints"][0]["ip"].as_str().context("ip")?.to_string();
        assert!(ips.insert(ip.clone()), "{ip} handed out twice");
        assert!(
            names.insert(t["name"].to_string()),
            "name {} twice",
            t["name"]
        );
    }
    assert_eq!(ips.len(), 3 * per_node);
    // The VIP is not among them either.
    let vip = lab.cli_json(0, &["service", "inspect", "web"])?["vips"]["front"].clone();
    assert!(!ips.contains(vip.as_str().context("vip")?));
    Ok(())
}

#[test]
fn a_dead_node_is_withdrawn_and_comes_back_after_restart() -> Result<()> {
    let mut lab = cluster("md")?;
    lab.attach_whoami(0, "web", "a", None)?;
    lab.attach_whoami(1, "web", "b", None)?;
    let b = lab.task_ip(0, "b", "front")?;
    let a_ns = lab.ns("a");
    assert!(reaches(&a_ns, b, "b"));
    let n2 = node_name(&lab, 1);

    // kill -9: nobody tells the cluster; the lease runs out.
    let killed = Instant::now();
    lab.stop_daemon(1, true)?;
    let limit = Duration::from_secs(LEASE_TTL_SECS + 5);
    eventually(limit, "n2 marked down on n1", || {
        Ok(lab.node_status(0, &n2)? == "down")
    })?;
    eventually(limit, "b withdrawn from n1's vxlan0", || {
        Ok(!fdb(&lab, 0, "front")?
            .iter()
            .any(|e| e.starts_with(&task_mac(b))))
    })?;
    assert!(killed.elapsed() <= limit + Duration::from_secs(1));
    assert!(
        !reaches(&a_ns, b, "b"),
        "a still reaches b's withdrawn endpoint"
    );
    let tasks = lab.cli_json(0, &["task", "ls"])?;
    let b_task = tasks
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "b"))
        .context("b is still a task")?;
    assert_eq!(b_task["state"], "node down");

    // Restarted, it reconciles and the others take it back.
    lab.start_daemon(1)?;
    assert_eq!(lab.node_status(0, &n2)?, "ready");
    eventually(Duration::from_secs(5), "a reaches b again", || {
        Ok(reaches(&a_ns, b, "b"))
    })?;

    // A graceful stop withdraws at once, without waiting out the lease.
    lab.stop_daemon(1, false)?;
    eventually(
        Duration::from_secs(2),
        "n2 down right after SIGTERM",
        || Ok(lab.node_status(0, &n2)? == "down"),
    )?;
    Ok(())
}

#[test]
fn an_etcd_restart_loses_nothing() -> Result<()> {
    let mut lab = cluster("me")?;
    lab.attach_whoami(0, "web", "a", None)?;
    lab.attach_whoami(1, "web", "b", None)?;
    let b = lab.task_ip(0, "b", "front")?;
    let a_ns = lab.ns("a");
    let before = lab.cli_json(2, &["task", "ls"])?;

    lab.stop_etcd(true)?;
    // The data plane does not depend on etcd being up.
    assert!(reaches(&a_ns, b, "b"), "traffic stopped with etcd");
    // Writes fail with a clear error and change nothing.
    let e = lab.cli_json(0, &["network", "create", "late"])?;
    assert_eq!(e["code"], "store_unavailable", "{e}");
    lab.start_etcd()?;

    // Everyone reconnects: the state is as it was, every node is up, and the watches
    // work again (a new task on n3 is programmed on n1).
    eventually(
        Duration::from_secs(15),
        "nodes answer from etcd again",
        || Ok(lab.cli_json(2, &["task", "ls"]).is_ok_and(|t| t == before)),
    )?;
    for i in 0..3 {
        assert_eq!(lab.node_status(0, &node_name(&lab, i))?, "ready");
    }
    assert!(lab
        .cli_json(0, &["network", "inspect", "late"])?
        .get("error")
        .is_some());
    lab.attach_whoami(2, "web", "c", None)?;
    let c = lab.task_ip(0, "c", "front")?;
    eventually(Duration::from_secs(5), "a reaches the new task c", || {
        Ok(reaches(&a_ns, c, "c"))
    })?;
    assert!(reaches(&a_ns, b, "b"));
    Ok(())
}

/// A netd killed between moving a network's new VXLAN device into the sandbox and
/// renaming it there leaves the device as `ndvx…` in the sandbox, holding the VNI and
/// port: the restarted netd could not make `vxlan0` again, and the overlay stayed down
/// on that node. The test makes exactly that kernel state (the sandbox's device renamed
/// back to its temporary name while netd is down) and restarts netd.
#[test]
fn a_vxlan_device_left_half_made_by_a_kill_is_made_again() -> Result<()> {
    let mut lab = cluster("mx")?;
    lab.attach_whoami(0, "web", "a", None)?;
    lab.attach_whoami(1, "web", "b", None)?;
    let b = lab.task_ip(0, "b", "front")?;
    let a_ns = lab.ns("a");
    assert!(reaches(&a_ns, b, "b"));
    let net = lab.cli_json(1, &["network", "inspect", "front"])?;
    let id = net["id"].as_str().context("network id")?.to_string();
    let sandbox = format!("netd-{}-{id}", lab.nodes[1].name);
    let half_made = format!("ndvx{}", &id[..id.len().min(10)]);
    lab.stop_daemon(1, true)?;
    let ip = |args: &[&str]| -> Result<String> {
        let mut all = vec!["-n", sandbox.as_str()];
        all.extend_from_slice(args);
        let out = netd_lab::run(std::process::Command::new("ip").args(&all))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ip(&["link", "set", "vxlan0", "down"])?;
    ip(&["link", "set", "vxlan0", "nomaster"])?;
    ip(&["link", "set", "vxlan0", "name", &half_made])?;
    assert!(!reaches(&a_ns, b, "b"), "b's node has no vxlan0 now");

    lab.start_daemon(1)?;
    eventually(Duration::from_secs(10), "a reaches b again", || {
        Ok(reaches(&a_ns, b, "b"))
    })?;
    let links = ip(&["-o", "link", "show"])?;
    assert!(links.contains("vxlan0"), "{links}");
    assert!(!links.contains(&half_made), "{links}");
    let status = lab.cli_json(1, &["status"])?;
    assert_eq!(
        status["reconcile"]["errors"],
        serde_json::json!([]),
        "{status}"
    );
    Ok(())
}

/// A task that gets the address (and with it the MAC) of a task that just left from
/// another node answers at once: nothing on the new task's node (its bridge, its
/// neighbours) still sends that MAC's frames towards the node the address came from.
/// IPAM hands addresses out serially, so an address comes back at once only when asked
/// for (as Docker's IPAM driver does: a reservation, then an attach with it) or in a
/// subnet with no other free one.
#[test]
fn an_address_passed_from_a_remote_task_to_a_local_one_answers_at_once() -> Result<()> {
    let mut lab = cluster("mr")?;
    let (n1, n2) = (node_name(&lab, 0), node_name(&lab, 1));
    lab.attach_whoami(0, "web", "a", Some(&n1))?;
    lab.attach_whoami(0, "web", "x", Some(&n2))?;
    let a_ns = lab.ns("a");
    let x = lab.task_ip(0, "x", "front")?;
    // a talks to x: n1's bridge learns x's MAC behind vxlan0.
    assert!(reaches(&a_ns, x, "x"));
    lab.cli(0, &["task", "detach", "x"])?;
    let reserve = format!(r#"{{"owner":"y","address":"{x}"}}"#);
    let (status, body) = lab.api_raw(
        0,
        "POST",
        "/v1/networks/front/reservations",
        reserve.as_bytes(),
    )?;
    assert!(status < 300, "reserve {x}: {status} {body}");
    let y_ns = lab.whoami_task("y", 80)?;
    let attach =
        format!(r#"{{"service":"web","netns":"{y_ns}","name":"y","node":"{n1}","address":"{x}"}}"#);
    let (status, body) = lab.api_raw(0, "POST", "/v1/tasks", attach.as_bytes())?;
    assert!(status < 300, "attach y at {x}: {status} {body}");
    let y = lab.task_ip(0, "y", "front")?;
    assert_eq!(y, x, "y holds x's old address");
    // One connect (3 s timeout, TCP retries its SYN within it).
    let body = http_get_from(&a_ns, addr(y)).context("y, on a's node, at x's old address")?;
    assert_eq!(field(&body, "Hostname"), Some("y"));
    Ok(())
}

/// A write that a live node has not applied when the API stops waiting (2 s) says so:
/// 202 Accepted and `pending` naming the node (the CLI prints it), never a plain success.
/// n3's daemon is paused (SIGSTOP) well inside its lease, so it is alive but silent;
/// once it runs again, the next write is confirmed everywhere.
#[test]
fn a_write_not_applied_everywhere_in_time_says_which_nodes_are_pending() -> Result<()> {
    let lab = cluster("mp")?;
    let pid = lab.daemon_pid(2).context("n3's daemon")?;
    let signal = |sig: &str| -> Result<()> {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill {sig} {pid}");
        }
        Ok(())
    };
    signal("-STOP")?;
    let started = Instant::now();
    let written = lab.cli_json(0, &["service", "create", "paused", "--network", "front"]);
    let took = started.elapsed();
    signal("-CONT")?;
    let written = written?;
    if took >= Duration::from_secs(LEASE_TTL_SECS) {
        bail!("the write took {took:?}: n3's lease may have lapsed, the test proves nothing");
    }
    let pending: Vec<&str> = written["pending"]
        .as_array()
        .context(format!("no pending nodes in {written}"))?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if !pending.contains(&node_name(&lab, 2).as_str()) {
        bail!("pending {pending:?} does not name n3");
    }
    // The service was written all the same, and n3 applies it once it runs.
    let names = |i: usize| -> Result<Vec<String>> {
        let v = lab.cli_json(i, &["service", "ls"])?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect())
    };
    eventually(Duration::from_secs(20), "n3 lists the service", || {
        Ok(names(2)?.iter().any(|n| n == "paused"))
    })?;
    // n3 running again (and alive): the next write is confirmed everywhere.
    eventually(
        Duration::from_secs(LEASE_TTL_SECS + 20),
        "a write confirmed everywhere",
        || {
            let v = lab.cli_json(0, &["service", "create", "again", "--network", "front"]);
            let done = v.as_ref().is_ok_and(|v| v.get("pending").is_none());
            let _ = lab.cli(0, &["service", "rm", "again"]);
            Ok(done)
        },
    )?;
    Ok(())
}
