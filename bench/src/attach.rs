//! `netd-bench attach`: how long it takes to plug one container into a network, through
//! each of netd's front ends and through the anchors users know, on one node (etcd, as a
//! cluster runs it), paths alternating within every round:
//!
//! - one container's network set up by a plugin run as its runtime runs it: `netd-cni`
//!   ADD, Podman's `netavark setup` (bridge, its own firewall rules, no DNS) and the CNI
//!   reference `bridge` plugin (what Podman's CNI backend and containerd's examples use);
//! - `netd task attach` (the CLI, up to the API's answer: the interfaces work then);
//! - `docker run -d` of a busybox httpd up to its first answered TCP connection, on a
//!   netd network (`-d netd`) and on Docker's own bridge network.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_bench::report::{header, machine, ms, quantile, write_results};
use netd_lab::runtimes::{busybox_rootfs, check, Dockerd};
use netd_lab::{binary, in_netns, CniEnv, Lab, CNI_PLUGIN_DIR};
use serde_json::{json, Value};

const NETD_SUBNET: &str = "198.19.60.0/24";
const NAVARK_SUBNET: &str = "198.18.220.0/24";
const BRIDGE_SUBNET: &str = "198.18.221.0/24";
const DOCKER_BRIDGE_SUBNET: &str = "198.18.222.0/24";
const NETAVARK: &str = "/usr/lib/podman/netavark";

/// One path's samples.
struct Series {
    name: &'static str,
    what: &'static str,
    samples: Vec<Duration>,
}

pub fn run(rounds: usize, out: &Path) -> Result<()> {
    if !Path::new(NETAVARK).exists() {
        bail!("{NETAVARK} is missing: install Debian's netavark");
    }
    let mut lab = Lab::docker_cluster("batt", 1)?;
    lab.cli(0, &["network", "create", "front", "--subnet", NETD_SUBNET])?;
    lab.cli(0, &["service", "create", "box", "--network", "front"])?;
    lab.cli(0, &["service", "create", "client", "--network", "front"])?;
    let client = lab.add_task_netns("cl")?.1;
    lab.cli(
        0,
        &[
            "task", "attach", "client", "--netns", &client, "--name", "cl",
        ],
    )?;
    let rootfs = busybox_rootfs(&lab.dir.join("rootfs"))?;
    let docker = Dockerd::start(&lab, 0)?;
    docker.import(&rootfs, "local/bb")?;
    docker.netd_network("front", NETD_SUBNET, "front", "box")?;
    check(
        "docker network create -d bridge",
        docker.docker(&[
            "network",
            "create",
            "-d",
            "bridge",
            "--subnet",
            DOCKER_BRIDGE_SUBNET,
            "dbr",
        ])?,
    )?;
    let plugin = binary("netd-cni")?;
    let netd_conf = json!({"cniVersion": "1.0.0", "name": "front", "type": "netd",
        "service": "box", "api": lab.nodes[0].api()});
    let bridge_conf = json!({"cniVersion": "1.0.0", "name": "refbr", "type": "bridge",
        "bridge": "refbr0", "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": BRIDGE_SUBNET,
                 "dataDir": lab.dir.join("host-local").display().to_string()}});
    let navark_dir = lab.dir.join("netavark");
    std::fs::create_dir_all(&navark_dir)?;

    let mut paths = [
        Series {
            name: "netd-cni ADD",
            what: "plugin run",
            samples: vec![],
        },
        Series {
            name: "netavark setup",
            what: "plugin run",
            samples: vec![],
        },
        Series {
            name: "CNI bridge ADD",
            what: "plugin run",
            samples: vec![],
        },
        Series {
            name: "netd task attach",
            what: "CLI until it returns",
            samples: vec![],
        },
        Series {
            name: "docker run, -d netd",
            what: "run until its port answers",
            samples: vec![],
        },
        Series {
            name: "docker run, Docker's bridge",
            what: "run until its port answers",
            samples: vec![],
        },
    ];
    for round in 0..rounds {
        // The order rotates every round, so no path always runs first after the others.
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let tag = format!("r{round}p{i}");
            let sample = match i {
                0 => cni_add(&mut lab, &plugin, &netd_conf, &tag)?,
                1 => netavark_setup(&mut lab, &navark_dir, &tag, round)?,
                2 => cni_add(
                    &mut lab,
                    &Path::new(CNI_PLUGIN_DIR).join("bridge"),
                    &bridge_conf,
                    &tag,
                )?,
                3 => cli_attach(&mut lab, &tag)?,
                4 => docker_run(&docker, "front", netd_ip(round), &client_ns(&lab))?,
                _ => docker_run(&docker, "dbr", docker_bridge_ip(round), &lab.nodes[0].netns)?,
            };
            paths[i].samples.push(sample);
        }
    }
    drop(docker);
    write_results(out, &table(&paths, rounds), None)
}

fn client_ns(lab: &Lab) -> String {
    lab.ns("cl")
}

fn netd_ip(round: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 60, 100 + (round % 100) as u8)
}

fn docker_bridge_ip(round: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 222, 100 + (round % 100) as u8)
}

/// One ADD of `plugin` into a fresh namespace, timed as the runtime sees it (process
/// start to exit); the DEL after it is not timed.
fn cni_add(lab: &mut Lab, plugin: &Path, conf: &Value, tag: &str) -> Result<Duration> {
    let path = lab.add_task_netns(tag)?.1;
    let env = CniEnv {
        command: "ADD",
        container: tag,
        netns: &path,
        ifname: "eth0",
        args: "",
    };
    let t0 = Instant::now();
    let (ok, out) = lab.cni(0, plugin, &env, conf)?;
    let took = t0.elapsed();
    if !ok {
        bail!("{} ADD failed: {out}", plugin.display());
    }
    let del = CniEnv {
        command: "DEL",
        ..env
    };
    let (ok, out) = lab.cni(0, plugin, &del, conf)?;
    if !ok {
        bail!("{} DEL failed: {out}", plugin.display());
    }
    Ok(took)
}

/// One `netavark setup` (as Podman runs it: its own IPAM decided the address) into a
/// fresh namespace, from the node's namespace; `teardown` after it is not timed.
fn netavark_setup(lab: &mut Lab, dir: &Path, tag: &str, round: usize) -> Result<Duration> {
    let path = lab.add_task_netns(tag)?.1;
    let ip = Ipv4Addr::new(198, 18, 220, 10 + (round % 200) as u8);
    let id = format!("{:0>64}", format!("{round:x}"));
    let opts = json!({
        "container_id": id,
        "container_name": tag,
        "networks": {"nb": {"interface_name": "eth0", "static_ips": [ip]}},
        "network_info": {"nb": {
            "name": "nb", "id": format!("{:0>64}", "ab"), "driver": "bridge",
            "network_interface": "nbbr0",
            "subnets": [{"subnet": NAVARK_SUBNET, "gateway": "198.18.220.1"}],
            "ipv6_enabled": false, "internal": false, "dns_enabled": false,
            "ipam_options": {"driver": "host-local"}}},
    });
    let file = dir.join(format!("{tag}.json"));
    std::fs::write(&file, opts.to_string())?;
    let netavark = |verb: &str| -> Result<Duration> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", lab.nodes[0].netns))
            .arg(NETAVARK)
            .arg("--config")
            .arg(dir)
            .arg("--file")
            .arg(&file)
            .args([verb, &path])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let t0 = Instant::now();
        let out = cmd.output().context("run netavark")?;
        let took = t0.elapsed();
        if !out.status.success() {
            bail!("netavark {verb}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    };
    let took = netavark("setup")?;
    netavark("teardown")?;
    Ok(took)
}

/// `netd task attach` into a fresh namespace, timed as the CLI runs; detached after.
fn cli_attach(lab: &mut Lab, tag: &str) -> Result<Duration> {
    let path = lab.add_task_netns(tag)?.1;
    let t0 = Instant::now();
    lab.cli(
        0,
        &["task", "attach", "box", "--netns", &path, "--name", tag],
    )?;
    let took = t0.elapsed();
    lab.cli(0, &["task", "detach", tag])?;
    Ok(took)
}

/// `docker run -d` of a busybox httpd at `ip` on `network`, timed until a TCP connect to
/// it from `from` (a namespace) succeeds; removed after.
fn docker_run(d: &Dockerd, network: &str, ip: Ipv4Addr, from: &str) -> Result<Duration> {
    let ip_text = ip.to_string();
    let t0 = Instant::now();
    let run = d.docker(&[
        "run",
        "-d",
        "--network",
        network,
        "--ip",
        &ip_text,
        "local/bb",
        "httpd",
        "-f",
        "-p",
        "80",
    ])?;
    let id = check("docker run", run)?.trim().to_string();
    let from = from.to_string();
    let reached = in_netns(&from, move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&SocketAddr::from((ip, 80)), Duration::from_millis(200))
                .is_ok()
            {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(false)
    })?;
    let took = t0.elapsed();
    check("docker rm", d.docker(&["rm", "-f", &id])?)?;
    if !reached {
        bail!("the container at {ip} on {network} never answered");
    }
    Ok(took)
}

fn table(paths: &[Series], rounds: usize) -> String {
    let p50 = |i: usize| quantile(&paths[i].samples, 0.5).as_secs_f64();
    let mut md = header("Attach latency through netd's front ends and the anchors");
    let _ = writeln!(
        md,
        "Machine: {}. One node on etcd; {rounds} rounds, the six paths in an order that \
         rotates every round; each sample is one container.\n",
        machine()
    );
    md.push_str("| path | timed | p50 | p99 | p50 / netavark setup |\n|---|---|---|---|---|\n");
    for (i, p) in paths.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.2}× |",
            p.name,
            p.what,
            ms(quantile(&p.samples, 0.5)),
            ms(quantile(&p.samples, 0.99)),
            p50(i) / p50(1),
        );
    }
    let _ = writeln!(
        md,
        "\nTarget: netd's CNI ADD ≤ netavark's setup time for one container: {:.2}× \
         ({}).\n\nReading (this run): a netd-cni ADD took {} at the median against {} for \
         netavark and {} for the CNI bridge plugin; `netd task attach` {}. Through \
         Docker, a container on a netd network answered {} after `docker run` against {} \
         on Docker's own bridge ({:.2}×).",
        p50(0) / p50(1),
        if p50(0) <= p50(1) { "met" } else { "not met" },
        ms(quantile(&paths[0].samples, 0.5)),
        ms(quantile(&paths[1].samples, 0.5)),
        ms(quantile(&paths[2].samples, 0.5)),
        ms(quantile(&paths[3].samples, 0.5)),
        ms(quantile(&paths[4].samples, 0.5)),
        ms(quantile(&paths[5].samples, 0.5)),
        p50(4) / p50(5),
    );
    md
}
