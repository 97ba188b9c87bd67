//! Who may drive netd, tried for real: the TCP API only with a client certificate of the
//! operator's CA (a plain request, a request without a certificate and one with a
//! stranger's certificate all refused), the store only with TLS and a password, and
//! tasks reaching neither their node's services nor the store through the gwbridge.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use netd_lab::pki::{Identity, Pki};
use netd_lab::{binary, connect_from, http_get_from, underlay_ip, Lab, TlsApi, ETCD_HOST};
use serde_json::json;

/// curl from `netns`; returns (success, stdout + stderr).
fn curl(netns: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "--max-time", "5"])
        .args(args)
        .output()
        .context("run curl (Debian package curl)")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn cert_args(id: &Identity) -> Vec<String> {
    [
        ("--cacert", &id.ca),
        ("--cert", &id.cert),
        ("--key", &id.key),
    ]
    .iter()
    .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
    .collect()
}

#[test]
fn the_tcp_api_serves_only_clients_with_a_certificate_of_its_ca() -> Result<()> {
    let mut lab = Lab::start("tls", 1)?;
    let (ns, ip, name) = (
        lab.nodes[0].netns.clone(),
        lab.nodes[0].ip,
        lab.nodes[0].name.clone(),
    );
    let port = 9440;
    let api = format!("tcp:{ip}:{port}");
    lab.stop_daemon(0, false)?;

    // Without TLS files the daemon refuses to start, and says why.
    let out = Command::new("timeout")
        .args(["30", "ip", "netns", "exec", &ns])
        .arg(binary("netd")?)
        .args(["daemon", "--node", &name, "--api", &api, "--store"])
        .arg(format!(
            "local:{}",
            lab.nodes[0].dir.join("state").display()
        ))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without TLS: {err}");
    assert!(
        err.contains("refusing to serve the API on TCP without mutual TLS")
            && err.contains("--tls-ca, --tls-cert, --tls-key missing"),
        "{err}"
    );

    let (daemon, client) = {
        let pki = lab.pki()?;
        (pki.issue("node-api", &[ip])?, pki.issue("operator", &[])?)
    };
    let stranger = Pki::new(&lab.dir.join("stranger"), "stranger")?.issue("intruder", &[])?;
    lab.nodes[0].tls_api = Some(TlsApi {
        port,
        daemon,
        client: client.clone(),
    });
    // The lab's CLI reaches it with NETD_TLS_* (start_daemon waits on `netd status`).
    lab.start_daemon(0)?;
    lab.cli(
        0,
        &["network", "create", "secured", "--subnet", "198.19.80.0/24"],
    )?;
    assert!(!lab.nodes[0].dir.join("netd.sock").exists());
    // ... and with the flags.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(binary("netd")?)
        .args(["--api", &api, "--tls-ca"])
        .arg(&client.ca)
        .arg("--tls-cert")
        .arg(&client.cert)
        .arg("--tls-key")
        .arg(&client.key)
        .args(["network", "ls"])
        .output()?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("secured"),
        "{out:?}"
    );
    // The CLI without them does not send a plaintext request at all.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(binary("netd")?)
        .args(["--api", &api, "network", "ls"])
        .env_remove("NETD_TLS_CA")
        .env_remove("NETD_TLS_CERT")
        .env_remove("NETD_TLS_KEY")
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs mutual TLS"),
        "{out:?}"
    );

    // From another host on the network: a plain HTTP request gets no HTTP answer.
    let outside = lab.add_host("outside", 100)?;
    let addr = SocketAddr::from((ip, port));
    let mut s = connect_from(&outside, addr)?;
    s.write_all(b"GET /v1/networks HTTP/1.1\r\nHost: netd\r\nConnection: close\r\n\r\n")?;
    let mut answer = vec![];
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("HTTP/1.1") && !answer.contains("secured"),
        "{answer}"
    );
    // TLS without a client certificate, or with a stranger's: refused in the handshake.
    let url = format!("https://{ip}:{port}/v1/networks");
    let ca = client.ca.display().to_string();
    let (ok, out) = curl(&outside, &["--cacert", &ca, &url])?;
    assert!(!ok && !out.contains("secured"), "{out}");
    let mut args = cert_args(&stranger);
    args[1] = ca.clone(); // trusts the daemon, presents the stranger's certificate
    args.push(url.clone());
    let (ok, out) = curl(&outside, &netd_lab::strs(&args))?;
    assert!(!ok && !out.contains("secured"), "{out}");
    // The operator's certificate: served.
    let mut args = cert_args(&client);
    args.push(url);
    let (ok, out) = curl(&outside, &netd_lab::strs(&args))?;
    assert!(ok && out.contains("secured"), "{out}");
    Ok(())
}

#[test]
fn the_store_wants_tls_and_a_password() -> Result<()> {
    let mut lab = Lab::secure_cluster("sst", 2)?;
    lab.cli(
        0,
        &["network", "create", "tight", "--subnet", "198.19.81.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "tight"])?;
    lab.attach_whoami(0, "web", "w1", None)?;
    let n2 = lab.nodes[1].name.clone();
    lab.attach_whoami(0, "web", "w2", Some(&n2))?;
    // The cluster works through the secured store: a task on node 2 reaches node 1's.
    let w1 = lab.task_ip(0, "w1", "tight")?;
    let body = http_get_from(&lab.ns("w2"), SocketAddr::from((w1, 80)))?;
    assert!(body.contains("w1"), "{body}");
    let status = lab.cli_json(0, &["status"])?;
    let store = status["store"].to_string();
    assert!(
        store.contains("etcd+https://netd@198.18.0.2:2379"),
        "{status}"
    );
    assert!(!store.contains("pw-"), "the password is shown: {status}");

    // etcd's own door: a client certificate of the lab's CA without netd's password
    // reads nothing; a stranger's certificate does not get through the handshake.
    let etcd = underlay_ip(ETCD_HOST);
    let (peer, id) = {
        let pki = lab.pki()?;
        (pki.issue("curious", &[])?, pki.issue("wrong", &[])?)
    };
    let range = json!({"key": netd_lab::base64_encode(b"/netd/"),
                       "range_end": netd_lab::base64_encode(b"/netd0")});
    let out = lab.etcd_gateway(&peer, "kv/range", &range, None)?;
    assert!(!out.contains("\"kvs\""), "read without a password: {out}");
    let stranger = Pki::new(&lab.dir.join("stranger"), "stranger")?.issue("intruder", &[])?;
    let mut stranger_trusting_etcd = stranger.clone();
    stranger_trusting_etcd.ca = peer.ca.clone();
    let out = lab.etcd_gateway(&stranger_trusting_etcd, "kv/range", &range, None)?;
    assert!(
        !out.contains("\"kvs\""),
        "read with a stranger's cert: {out}"
    );

    // A daemon with a wrong password stops at once with etcd's refusal.
    let out = Command::new("timeout")
        .args(["25", "ip", "netns", "exec", &lab.nodes[1].netns])
        .arg(binary("netd")?)
        .args(["daemon", "--node", "wrongpw", "--api"])
        .arg(format!("unix:{}", lab.dir.join("wrong.sock").display()))
        .arg("--store")
        .arg(format!("etcd+https://netd:not-it@{etcd}:2379"))
        .arg("--store-ca")
        .arg(&id.ca)
        .arg("--store-cert")
        .arg(&id.cert)
        .arg("--store-key")
        .arg(&id.key)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("authentication failed"),
        "{:?} {err}",
        out.status
    );
    Ok(())
}

#[test]
fn tasks_reach_neither_their_node_nor_the_store_unless_allowed() -> Result<()> {
    let mut lab = Lab::cluster("t2n", 1)?;
    lab.cli(
        0,
        &["network", "create", "apps", "--subnet", "198.19.82.0/24"],
    )?;
    lab.cli(0, &["service", "create", "app", "--network", "apps"])?;
    lab.attach_whoami(0, "app", "a1", None)?;
    let task = lab.ns("a1");
    let (node_ns, node_ip) = (lab.nodes[0].netns.clone(), lab.nodes[0].ip);
    // A service of the node's own (think sshd), the store, and a host outside.
    lab.start_whoami(&node_ns, "nodesvc", 7000)?;
    lab.whoami_host("web", 100, 8080)?;
    let etcd = SocketAddr::from((underlay_ip(ETCD_HOST), 2379));
    let node_svc = SocketAddr::from((node_ip, 7000));
    let gateway = SocketAddr::from(([198, 18, 1, 1], 7000));
    let outside = SocketAddr::from((underlay_ip(100), 8080));

    assert!(http_get_from(&task, outside)?.contains("web"), "no egress");
    let dropped = |lab: &Lab| -> Result<u64> {
        lab.cli_json(0, &["status"])?["tasks"]["to_node_dropped"]
            .as_u64()
            .context("status.tasks.to_node_dropped")
    };
    for target in [node_svc, gateway, etcd] {
        let before = dropped(&lab)?;
        assert!(
            connect_from(&task, target).is_err(),
            "a task reached {target}"
        );
        assert!(
            dropped(&lab)? > before,
            "{target}: the drop was not counted"
        );
    }
    // No way around the IPv4 rules: the bridges tasks hang on have no IPv6 address.
    let v6 = Command::new("ip")
        .args(["-n", &node_ns, "-6", "addr", "show", "dev", "netd_gwbridge"])
        .output()?;
    assert!(
        v6.status.success() && !String::from_utf8_lossy(&v6.stdout).contains("inet6"),
        "{v6:?}"
    );

    // The operator may open the node to its tasks.
    lab.daemon_args = vec!["--allow-tasks-to-node".into()];
    lab.stop_daemon(0, false)?;
    lab.start_daemon(0)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while connect_from(&task, node_svc).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "still blocked with --allow-tasks-to-node"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(http_get_from(&task, node_svc)?.contains("nodesvc"));
    assert!(http_get_from(&task, gateway)?.contains("nodesvc"));
    connect_from(&task, etcd).context("the store with --allow-tasks-to-node")?;
    Ok(())
}

#[test]
fn a_published_port_the_node_serves_itself_needs_force() -> Result<()> {
    let mut lab = Lab::cluster("pub", 1)?;
    lab.cli(
        0,
        &["network", "create", "pubnet", "--subnet", "198.19.83.0/24"],
    )?;
    let node_ns = lab.nodes[0].netns.clone();
    lab.start_whoami(&node_ns, "sshd", 2222)?;
    for port in ["2222:80", "4789:80/udp"] {
        let v = lab.cli_json(
            0,
            &[
                "service",
                "create",
                "grab",
                "--network",
                "pubnet",
                "--publish",
                port,
            ],
        )?;
        let err = v["error"].as_str().unwrap_or_default();
        assert!(err.contains("is served by the node itself"), "{port}: {v}");
    }
    assert!(lab.cli(0, &["service", "ls"])?.lines().count() <= 1);
    lab.cli(
        0,
        &[
            "service",
            "create",
            "grab",
            "--network",
            "pubnet",
            "--publish",
            "2222:80",
            "--force",
        ],
    )?;
    lab.cli(
        0,
        &[
            "service",
            "create",
            "fine",
            "--network",
            "pubnet",
            "--publish",
            "8081:80",
        ],
    )?;
    Ok(())
}
