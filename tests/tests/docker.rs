//! Docker's own daemon (Debian's docker.io 20.10) drives netd through netd's network and
//! IPAM plugin: two nodes, each with its own dockerd and netd on one etcd. Containers on
//! different nodes are tasks of one netd service, reach each other over the overlay,
//! resolve the service's VIP through Docker's resolver (which asks netd) and are
//! balanced over both nodes through it; `docker rm -f` detaches.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::runtimes::{busybox_rootfs, check, Dockerd};
use std::net::SocketAddr;

use netd_lab::{http_get_from, Lab};
use serde_json::Value;

const SUBNET: &str = "198.19.50.0/24";

/// A busybox container on Docker network `network` serving its own name over HTTP on
/// port 80.
fn web_container(d: &Dockerd, network: &str, name: &str) -> Result<()> {
    let script =
        format!("mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 80 -h /www");
    check(
        "docker run -d",
        d.docker(&[
            "run",
            "-d",
            "--network",
            network,
            "--name",
            name,
            "local/bb",
            "sh",
            "-c",
            &script,
        ])?,
    )?;
    Ok(())
}

/// The container resolves web through Docker's resolver (retrying while netd opens its
/// listener), then asks the VIP eight times and pings `peer` across the overlay.
fn probe(peer: &str) -> String {
    format!(
        "for i in $(seq 50); do vip=$(nslookup web | awk '/^Address/ {{a=$NF}} END {{print a}}'); \
         case $vip in 198.19.*) break;; esac; sleep 0.1; done; echo vip=$vip; \
         for i in 1 2 3 4 5 6 7 8; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 $vip 80 | tail -n 1; done; \
         ping -c 1 -W 2 {peer} >/dev/null && echo ping-ok; ip -o -4 addr"
    )
}

#[test]
fn docker_containers_on_two_nodes_are_tasks_of_one_netd_service() -> Result<()> {
    let mut lab = Lab::docker_cluster("dk", 2)?;
    let rootfs = busybox_rootfs(&lab.dir.join("rootfs"))?;
    let d0 = Dockerd::start(&lab, 0)?;
    let d1 = Dockerd::start(&lab, 1)?;
    for d in [&d0, &d1] {
        d.import(&rootfs, "local/bb")?;
        // Each dockerd keeps a local view of the cluster's netd network `front`: the
        // first makes it (and service web), the second adopts both.
        d.netd_network("front", SUBNET, "front", "web")?;
    }
    // Clients join the same netd network as another service.
    d1.netd_network("front-client", SUBNET, "front", "client")?;
    let nets = lab.cli_json(0, &["network", "inspect", "front"])?;
    assert_eq!(nets["subnet"], SUBNET, "{nets}");

    web_container(&d0, "front", "wa").with_context(|| lab.daemon_log(0))?;
    web_container(&d1, "front", "wb").with_context(|| lab.daemon_log(1))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = lab.tasks_of(0, "web")?;
        if t.len() == 2 && t.iter().all(|t| t["state"] == "running") {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "web's containers did not become running tasks: {t:?}\n{}",
                d0.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let on_node: Vec<(String, String)> = lab
        .tasks_of(0, "web")?
        .iter()
        .map(|t| {
            (
                t["node"].as_str().unwrap_or("").to_string(),
                t["endpoints"][0]["ip"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let a_ip = on_node
        .iter()
        .find(|(n, _)| n == &lab.nodes[0].name)
        .map(|(_, ip)| ip.clone())
        .context("no task on node 0")?;

    let out = check(
        "docker run client",
        d1.docker(&[
            "run",
            "--rm",
            "--network",
            "front-client",
            "local/bb",
            "sh",
            "-c",
            &probe(&a_ip),
        ])?,
    )?;
    let vip = lab.vip(0, "web", "front")?;
    assert!(
        out.contains(&format!("vip={vip}")),
        "web did not resolve to {vip}: {out}"
    );
    let answers: Vec<&str> = out.lines().filter(|l| *l == "wa" || *l == "wb").collect();
    assert_eq!(
        answers.len(),
        8,
        "not every request through the VIP was answered: {out}"
    );
    assert!(
        answers.contains(&"wa") && answers.contains(&"wb"),
        "the VIP did not spread over both nodes: {out}"
    );
    assert!(
        out.contains("ping-ok"),
        "the client could not reach wa on the other node: {out}"
    );
    assert!(out.contains("eth0    inet 198.19.50."), "{out}");
    assert_eq!(
        lab.tasks_of(0, "client")?.len(),
        0,
        "--rm left the client's task"
    );

    // The routing mesh: a service published by netd, whose container Docker runs on
    // node 0, answers on node 1's address.
    lab.cli(
        0,
        &[
            "service",
            "create",
            "pub",
            "--network",
            "front",
            "--publish",
            "8080:80",
        ],
    )?;
    d0.netd_network("front-pub", SUBNET, "front", "pub")?;
    web_container(&d0, "front-pub", "pa")?;
    // One container picks its service itself: created without a network, then connected
    // to `front` with a driver option.
    let script = "mkdir -p /www && echo pc > /www/index.html && exec httpd -f -p 80 -h /www";
    check(
        "docker create",
        d1.docker(&[
            "create",
            "--network",
            "none",
            "--name",
            "pc",
            "local/bb",
            "sh",
            "-c",
            script,
        ])?,
    )?;
    check(
        "docker network disconnect",
        d1.docker(&["network", "disconnect", "none", "pc"])?,
    )?;
    check(
        "docker network connect --driver-opt",
        d1.docker(&[
            "network",
            "connect",
            "--driver-opt",
            "netd.service=pub",
            "front",
            "pc",
        ])?,
    )?;
    check("docker start", d1.docker(&["start", "pc"])?)?;
    let pub_nodes: Vec<Value> = lab
        .tasks_of(0, "pub")?
        .iter()
        .map(|t| t["node"].clone())
        .collect();
    assert_eq!(pub_nodes.len(), 2, "{pub_nodes:?}");
    let outside = lab.add_host("out", 60)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        match http_get_from(&outside, SocketAddr::from((lab.nodes[1].ip, 8080))) {
            Ok(b) => break b,
            Err(e) if Instant::now() > deadline => {
                bail!("the published port did not answer: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(["pa", "pc"].contains(&body.trim()), "{body}");

    check("docker rm -f", d0.docker(&["rm", "-f", "wa"])?)?;
    let left: Vec<Value> = lab.tasks_of(0, "web")?;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["node"], lab.nodes[1].name.as_str());
    drop(d1);
    drop(d0);
    Ok(())
}
