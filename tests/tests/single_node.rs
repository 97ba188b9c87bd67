//! Single-node data plane, in the lab: real netd daemons in node namespaces, real tasks
//! running whoami, real traffic. Each test builds its own lab (distinct name prefix) and
//! tears it down, also when it fails.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use netd_lab::{
    connect_from, diff_lines, field, http_get, http_get_from, udp_ask_from, underlay_ip, Lab,
};

const PORT: u16 = 80;

fn addr(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, PORT))
}

/// A lab with one node, overlay network `front` and service `web` with tasks `names`.
fn web_lab(tag: &str, names: &[&str]) -> Result<Lab> {
    let mut lab = Lab::start(tag, 1)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.10.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    for n in names {
        let path = lab.whoami_task(n, PORT)?;
        lab.cli(0, &["task", "attach", "web", "--netns", &path, "--name", n])?;
    }
    Ok(lab)
}

#[test]
fn two_tasks_on_one_overlay_reach_each_other_over_tcp_udp_and_icmp() -> Result<()> {
    let lab = web_lab("ov", &["a", "b"])?;
    let a = lab.task_ip(0, "a", "front")?;
    let b = lab.task_ip(0, "b", "front")?;
    assert!(lab.pings(&lab.ns("a"), b, &[])?, "a cannot ping b");
    assert!(lab.pings(&lab.ns("b"), a, &[])?, "b cannot ping a");

    let body = http_get_from(&lab.ns("a"), addr(b))?;
    assert_eq!(field(&body, "Hostname"), Some("b"));
    // Overlay traffic is not NATed: b sees a's own address.
    assert!(
        field(&body, "RemoteAddr")
            .unwrap_or("")
            .starts_with(&format!("{a}:")),
        "{body}"
    );

    let (reply, from) = udp_ask_from(&lab.ns("b"), addr(a))?;
    assert_eq!(field(&reply, "Hostname"), Some("a"));
    assert_eq!(from, addr(a));

    // Docker's overlay numbers: MTU 1450 inside, MAC derived from the IP.
    let link = lab.exec_in(&lab.ns("a"), &["ip", "-o", "link", "show", "eth0"])?;
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("mtu 1450"), "{link}");
    let mac = netd_lab::task_mac(a);
    assert!(link.contains(&mac), "{link} lacks {mac}");
    Ok(())
}

#[test]
fn tasks_on_different_networks_cannot_reach_each_other() -> Result<()> {
    let mut lab = web_lab("iso", &["a"])?;
    lab.cli(
        0,
        &["network", "create", "back", "--subnet", "198.19.20.0/24"],
    )?;
    lab.cli(0, &["service", "create", "db", "--network", "back"])?;
    let path = lab.whoami_task("c", PORT)?;
    lab.cli(
        0,
        &["task", "attach", "db", "--netns", &path, "--name", "c"],
    )?;
    let c = lab.task_ip(0, "c", "back")?;
    let c_gw = lab.task_ip(0, "c", "gwbridge")?;
    let a = lab.ns("a");

    // Neither over the overlays ...
    assert!(!lab.pings(&a, c, &[])?, "a reached c's overlay address");
    assert!(
        connect_from(&a, addr(c)).is_err(),
        "TCP a -> c over overlay worked"
    );
    // ... nor through the gwbridge they share (bridged or routed).
    assert!(!lab.pings(&a, c_gw, &[])?, "a reached c over the gwbridge");
    assert!(
        connect_from(&a, addr(c_gw)).is_err(),
        "TCP a -> c over gwbridge worked"
    );
    // The same pair on one network does talk (the check above is not vacuous).
    let b_path = lab.whoami_task("b", PORT)?;
    lab.cli(
        0,
        &["task", "attach", "db", "--netns", &b_path, "--name", "b"],
    )?;
    assert!(lab.pings(&lab.ns("b"), c, &[])?);
    Ok(())
}

#[test]
fn egress_through_gwbridge_reaches_an_outside_host_masqueraded() -> Result<()> {
    let mut lab = web_lab("eg", &["a"])?;
    lab.whoami_host("outside", 100, PORT)?;
    let body = http_get_from(&lab.ns("a"), addr(underlay_ip(100)))?;
    assert_eq!(field(&body, "Hostname"), Some("outside"));
    let node_ip = lab.nodes[0].ip;
    assert!(
        field(&body, "RemoteAddr")
            .unwrap_or("")
            .starts_with(&format!("{node_ip}:")),
        "egress not masqueraded to the node address: {body}"
    );
    Ok(())
}

#[test]
fn bridge_networks_connect_their_tasks_and_internal_ones_have_no_egress() -> Result<()> {
    let mut lab = Lab::start("br", 1)?;
    lab.whoami_host("outside", 100, PORT)?;
    lab.cli(
        0,
        &[
            "network",
            "create",
            "--driver",
            "bridge",
            "lan",
            "--subnet",
            "198.19.50.0/24",
        ],
    )?;
    lab.cli(
        0,
        &[
            "network",
            "create",
            "--driver",
            "bridge",
            "--internal",
            "vault",
            "--subnet",
            "198.19.51.0/24",
        ],
    )?;
    lab.cli(0, &["service", "create", "app", "--network", "lan"])?;
    lab.cli(0, &["service", "create", "safe", "--network", "vault"])?;
    for (svc, t) in [("app", "a"), ("app", "b"), ("safe", "s")] {
        let p = lab.whoami_task(t, PORT)?;
        lab.cli(0, &["task", "attach", svc, "--netns", &p, "--name", t])?;
    }
    let b = lab.task_ip(0, "b", "lan")?;
    let s = lab.task_ip(0, "s", "vault")?;
    let body = http_get_from(&lab.ns("a"), addr(b))?;
    assert_eq!(field(&body, "Hostname"), Some("b"));
    // Egress through the bridge itself, masqueraded.
    let body = http_get_from(&lab.ns("a"), addr(underlay_ip(100)))?;
    assert_eq!(field(&body, "Hostname"), Some("outside"));
    // Bridge networks are isolated from each other; internal ones have no way out.
    assert!(
        connect_from(&lab.ns("a"), addr(s)).is_err(),
        "lan reached vault"
    );
    assert!(
        connect_from(&lab.ns("s"), addr(underlay_ip(100))).is_err(),
        "internal egress"
    );
    Ok(())
}

#[test]
fn restarting_netd_keeps_connections_and_changes_nothing_in_the_kernel() -> Result<()> {
    let mut lab = web_lab("rs", &["a", "b"])?;
    // The API socket is for root only.
    let sock = lab.nodes[0].dir.join("netd.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "API socket mode {mode:o}");
    // `auto` picked eBPF on this kernel, said why, and attached the hooks for the tasks.
    let status = lab.cli_json(0, &["status"])?;
    assert_eq!(status["node"], lab.nodes[0].name.as_str());
    assert_eq!(status["datapath"]["active"], "ebpf", "{status}");
    assert_eq!(status["datapath"]["requested"], "auto", "{status}");
    assert_eq!(status["datapath"]["detail"]["attached"], true, "{status}");
    // The netd that built the node counts what it wrote (the check after the restart
    // below relies on these counters).
    let built = &status["reconcile"]["kernel_writes"];
    for kind in ["netlink", "nftables", "bpf", "dns_sockets"] {
        assert!(
            built[kind].as_u64() > Some(0),
            "no {kind} write counted: {built}"
        );
    }
    let b = lab.task_ip(0, "b", "front")?;
    let mut conn = connect_from(&lab.ns("a"), addr(b))?;
    assert_eq!(field(&http_get(&mut conn)?, "Hostname"), Some("b"));
    let before = lab.kernel_snapshot(0)?;
    let tasks_before = lab.cli_json(0, &["task", "ls"])?;

    // kill -9: the data plane keeps working while netd is down ...
    lab.stop_daemon(0, true)?;
    assert_eq!(field(&http_get(&mut conn)?, "Hostname"), Some("b"));
    // ... and a restarted netd finds everything in place and touches nothing: it
    // reports no kernel write of any kind, and the kernel reads back the same.
    lab.start_daemon(0)?;
    let status = lab.cli_json(0, &["status"])?;
    let writes = &status["reconcile"]["kernel_writes"];
    assert!(
        writes
            .as_object()
            .is_some_and(|w| !w.is_empty() && w.values().all(|n| n == 0)),
        "a restarted netd wrote to the kernel: {writes}\nkernel diff:\n{}\nlog:\n{}",
        diff_lines(&before, &lab.kernel_snapshot(0)?),
        lab.daemon_log(0)
    );
    let after = lab.kernel_snapshot(0)?;
    assert!(
        after == before,
        "kill -9 restart changed:\n{}",
        diff_lines(&before, &after)
    );
    assert_eq!(field(&http_get(&mut conn)?, "Hostname"), Some("b"));
    assert_eq!(lab.cli_json(0, &["task", "ls"])?, tasks_before);

    // A graceful restart too.
    lab.stop_daemon(0, false)?;
    lab.start_daemon(0)?;
    let after = lab.kernel_snapshot(0)?;
    assert!(
        after == before,
        "graceful restart changed:\n{}",
        diff_lines(&before, &after)
    );
    assert_eq!(field(&http_get(&mut conn)?, "Hostname"), Some("b"));
    assert_eq!(
        field(&http_get_from(&lab.ns("a"), addr(b))?, "Hostname"),
        Some("b")
    );

    // What the API acknowledged survives kill -9 right after the acknowledgement.
    lab.cli(0, &["network", "create", "acked"])?;
    lab.stop_daemon(0, true)?;
    lab.start_daemon(0)?;
    lab.cli(0, &["network", "inspect", "acked"])?;
    Ok(())
}

#[test]
fn detach_and_rm_remove_everything_netd_made() -> Result<()> {
    let mut lab = Lab::start("cl", 1)?;
    let node = lab.nodes[0].netns.clone();
    let node_name = lab.nodes[0].name.clone();
    let sandboxes = || -> BTreeSet<String> {
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&format!("netd-{node_name}-")))
                    .collect()
            })
            .unwrap_or_default()
    };
    let links = |lab: &Lab| -> Result<BTreeSet<String>> {
        let out = lab.exec_in(&node, &["ip", "-o", "link", "show"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            .collect())
    };
    let ruleset = |lab: &Lab| -> Result<String> {
        let out = lab.exec_in(&node, &["nft", "list", "ruleset"])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // What a node that just joined has: the ingress network's sandbox and the node's
    // ingress sandbox on it (with its gwbridge leg), as Docker's ingress-sbox.
    let joined = (sandboxes(), links(&lab)?, ruleset(&lab)?);
    assert_eq!(
        joined.0.len(),
        2,
        "ingress sandboxes at join: {:?}",
        joined.0
    );
    assert!(joined.0.contains(&format!("netd-{node_name}-isbox")));
    assert!(joined.1.contains("netd_gwbridge"), "{:?}", joined.1);

    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.10.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    for n in ["a", "b"] {
        let path = lab.whoami_task(n, PORT)?;
        lab.cli(0, &["task", "attach", "web", "--netns", &path, "--name", n])?;
    }
    lab.cli(
        0,
        &[
            "network",
            "create",
            "--driver",
            "bridge",
            "lan",
            "--subnet",
            "198.19.50.0/24",
        ],
    )?;
    assert_eq!(
        sandboxes().len(),
        3,
        "one more sandbox, for the overlay with tasks"
    );

    lab.cli(0, &["task", "detach", "a"])?;
    let a_links = lab.exec_in(&lab.ns("a"), &["ip", "-o", "link", "show"])?;
    assert_eq!(
        String::from_utf8_lossy(&a_links.stdout).lines().count(),
        1,
        "only lo left in a"
    );

    lab.cli(0, &["service", "rm", "web"])?; // detaches b as well
    assert_eq!(
        sandboxes(),
        joined.0,
        "sandbox left after its last task went"
    );
    lab.cli(0, &["network", "rm", "front", "lan"])?;
    // Back to what the node had when it joined: links, rules, networks.
    assert_eq!(links(&lab)?, joined.1, "netd left links");
    assert_eq!(ruleset(&lab)?, joined.2, "netd left rules");
    let nets = lab.cli_json(0, &["network", "ls"])?;
    let names: Vec<&str> = nets
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["ingress"]);

    // And the lab itself leaves nothing behind.
    let prefix = lab.prefix.clone();
    lab.teardown();
    let left: Vec<String> = std::fs::read_dir("/run/netns")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&prefix))
        .collect();
    assert!(left.is_empty(), "lab left namespaces: {left:?}");
    let procs = std::process::Command::new("pgrep")
        .args(["-f", &prefix])
        .output()?;
    assert!(procs.stdout.is_empty(), "lab left processes");
    Ok(())
}

/// netd keeps a netlink socket per namespace it works in, and a socket keeps its
/// namespace alive. When a runtime deletes a task's namespace without a detach (a crash),
/// the namespace must still die, taking its side of the task's veth with it: the socket
/// is closed once the path no longer holds that namespace.
#[test]
fn a_deleted_task_namespace_is_not_kept_alive_by_netd() -> Result<()> {
    let mut lab = web_lab("nlk", &[])?;
    // The periodic checked step is what finds the namespace gone: sooner than its
    // default 30 s.
    lab.daemon_args = vec!["--resync".into(), "5".into()];
    lab.stop_daemon(0, false)?;
    lab.start_daemon(0)?;
    let node_name = lab.nodes[0].name.clone();
    let sandboxes = || -> Result<BTreeSet<String>> {
        Ok(std::fs::read_dir("/run/netns")?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("netd-{node_name}-")))
            .collect())
    };
    let joined = sandboxes()?;
    // The overlay's sandbox appears with its first task.
    let (_, path) = lab.add_task_netns("first")?;
    lab.cli(
        0,
        &["task", "attach", "web", "--netns", &path, "--name", "first"],
    )?;
    let sandbox = sandboxes()?
        .difference(&joined)
        .next()
        .cloned()
        .context("no sandbox for the overlay")?;
    let links = |lab: &Lab| -> Result<BTreeSet<String>> {
        let out = lab.exec_in(&sandbox, &["ip", "-o", "link", "show"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            .collect())
    };
    let sockets = |lab: &Lab| -> Result<u64> {
        let st = lab.cli_json(0, &["status"])?;
        st["reconcile"]["netlink_sockets"]
            .as_u64()
            .context("status has no reconcile.netlink_sockets")
    };
    let before = links(&lab)?;
    let (name, path) = lab.add_task_netns("gone")?;
    lab.cli(
        0,
        &["task", "attach", "web", "--netns", &path, "--name", "gone"],
    )?;
    let host_side: Vec<String> = links(&lab)?.difference(&before).cloned().collect();
    assert_eq!(
        host_side.len(),
        1,
        "the task's port in the sandbox: {host_side:?}"
    );
    let open = sockets(&lab)?;
    // The runtime deletes the namespace; the task is still attached.
    let out = Command::new("ip").args(["netns", "del", &name]).output()?;
    anyhow::ensure!(out.status.success(), "ip netns del: {out:?}");
    // netd's periodic step (here every 5 s) finds it gone: the namespace must die with
    // nothing but netd holding it. (A change elsewhere in the cluster does not look at
    // the node's task namespaces: a step visits what the change touched.)
    lab.cli(0, &["service", "create", "other", "--network", "front"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while links(&lab)?.contains(&host_side[0]) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the deleted namespace still lives: its veth {} is in the sandbox",
            host_side[0]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        sockets(&lab)? < open,
        "the socket of the deleted namespace is still open"
    );
    Ok(())
}

/// A runtime that deletes a task's namespace and makes a new one at the same path (a
/// container restarted under its name, without a detach) gets the task plumbed into the
/// new namespace, with its DNS. Before, netd's DNS sockets in the old namespace kept it
/// alive, and with it the old end of the task's veth, so the new plumbing met a port of
/// that name already in the sandbox.
#[test]
fn a_task_namespace_made_anew_at_its_path_is_plumbed_again() -> Result<()> {
    let mut lab = web_lab("nre", &["peer"])?;
    // The periodic checked step is what finds the namespace replaced: sooner than its
    // default 30 s.
    lab.daemon_args = vec!["--resync".into(), "3".into()];
    lab.stop_daemon(0, false)?;
    lab.start_daemon(0)?;
    let (name, path) = lab.add_task_netns("again")?;
    lab.cli(
        0,
        &["task", "attach", "web", "--netns", &path, "--name", "again"],
    )?;
    let ip = lab.task_ip(0, "again", "front")?;
    let peer = lab.task_ip(0, "peer", "front")?;
    assert_eq!(lab.dig_short(&name, "peer")?, vec![peer.to_string()]);

    let out = Command::new("ip").args(["netns", "del", &name]).output()?;
    anyhow::ensure!(out.status.success(), "ip netns del: {out:?}");
    let out = Command::new("ip").args(["netns", "add", &name]).output()?;
    anyhow::ensure!(out.status.success(), "ip netns add: {out:?}");

    let state = |lab: &Lab| -> Result<String> {
        let tasks = lab.tasks_of(0, "web")?;
        Ok(tasks
            .iter()
            .find(|t| t["name"] == "again")
            .and_then(|t| t["state"].as_str())
            .unwrap_or("missing")
            .to_string())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let addrs = lab.exec_in(&name, &["ip", "-o", "-4", "addr", "show"])?;
        let plumbed = String::from_utf8_lossy(&addrs.stdout).contains(&format!("{ip}/"));
        let answered = lab.dig_short(&name, "peer")? == vec![peer.to_string()];
        let now = state(&lab)?;
        // The step that finds the new namespace plumbs it: the task is never in error
        // (before, that step met the old port and failed, until a later one).
        anyhow::ensure!(
            !now.starts_with("error"),
            "the task went into error: {now}\n{}",
            lab.daemon_log(0)
        );
        if plumbed && answered && now == "running" {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the new namespace is not served (address {plumbed}, dns {answered}, state {:?}); \
             netd's log:\n{}",
            state(&lab)?,
            lab.daemon_log(0)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // From the new namespace the peer answers.
    let body = http_get_from(&name, addr(peer))?;
    assert_eq!(field(&body, "Hostname"), Some("peer"), "{body}");
    Ok(())
}
