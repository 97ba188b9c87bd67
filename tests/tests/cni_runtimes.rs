//! netd driven by real container runtimes through `netd-cni`: containerd's `ctr run
//! --cni` and podman's CNI backend, each running a busybox container that resolves a
//! netd service by name and reaches it through its VIP; the container is a netd task
//! while it runs and is detached when the runtime removes it.

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result};
use netd_lab::runtimes::{busybox_rootfs, check, cni_plugin_dir, conflist, Containerd, Podman};
use netd_lab::Lab;
use serde_json::{json, Value};

/// Overlay `front` with service `web` (one whoami task `a`) and service `box` for the
/// containers; the conflist `front` (netd, then Debian's `tuning`) in a config dir.
fn lab(
    tag: &str,
) -> Result<(
    Lab,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
)> {
    let mut lab = Lab::start(tag, 1)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.40.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    lab.cli(0, &["service", "create", "box", "--network", "front"])?;
    lab.attach_whoami(0, "web", "a", None)?;
    let conf_dir = lab.dir.join("net.d");
    fs::create_dir_all(&conf_dir)?;
    let netd = json!({"type": "netd", "network": "front", "service": "box",
        "api": lab.nodes[0].api()});
    let tuning = json!({"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.accept_local": "1"}});
    fs::write(
        conf_dir.join("10-front.conflist"),
        conflist("front", netd, &[tuning]).to_string(),
    )?;
    let plugins = cni_plugin_dir(&lab.dir.join("cni-bin"))?;
    let rootfs = busybox_rootfs(&lab.dir.join("rootfs"))?;
    Ok((lab, conf_dir, plugins, rootfs))
}

/// What the container does: resolve web, fetch from it through its VIP, show the
/// interface, and check that the chained tuning plugin ran on it. (busybox-static's wget
/// crashes in glibc's static NSS lookups, so the script resolves with nslookup and speaks
/// HTTP through nc.)
const PROBE: &str = "nslookup web 127.0.0.11; \
    vip=$(nslookup web 127.0.0.11 | awk '/^Address/ {a=$NF} END {print a}'); echo ---; \
    printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 $vip 80; echo ---; ip -o -4 addr show eth0; \
    echo sysctl=$(cat /proc/sys/net/ipv4/conf/eth0/accept_local)";

fn assert_probe(out: &str, vip: &str) {
    assert!(
        out.contains(&format!("Address: {vip}")) || out.contains(&format!("Address 1: {vip}")),
        "web did not resolve to its VIP {vip}: {out}"
    );
    assert!(
        out.contains("Hostname: a"),
        "the VIP did not reach task a: {out}"
    );
    assert!(
        out.contains("inet 198.19.40."),
        "eth0 has no front address: {out}"
    );
    assert!(
        out.contains("sysctl=1"),
        "the chained tuning plugin did not run: {out}"
    );
}

#[test]
fn containerd_ctr_run_with_cni_attaches_a_container_as_a_task() -> Result<()> {
    let (lab, conf_dir, plugins, rootfs) = lab("ctrd")?;
    let containerd = Containerd::start(&lab, 0, &conf_dir, &plugins)?;
    let vip = lab.vip(0, "web", "front")?.to_string();
    // The container lists the netd tasks' view of itself while it runs: its name comes
    // back from netd's DNS as the address on its eth0.
    let script = format!("{PROBE}; echo ---; nslookup box-1 127.0.0.11");
    let out = check(
        "ctr run --cni",
        containerd.run("c1", &rootfs, &script, Duration::from_secs(60))?,
    )?;
    assert_probe(&out, &vip);
    let own = out
        .lines()
        .find_map(|l| l.split("inet ").nth(1))
        .and_then(|a| a.split('/').next())
        .context("no address")?
        .to_string();
    assert!(
        out.rsplit("---").next().unwrap_or("").contains(&own),
        "box-1 is not {own}: {out}"
    );
    // `--rm`: ctr ran DEL when the container ended.
    assert_eq!(lab.tasks_of(0, "box")?, Vec::<Value>::new());
    drop(containerd);
    Ok(())
}

#[test]
fn podman_with_the_cni_backend_attaches_and_rm_detaches() -> Result<()> {
    let (lab, conf_dir, plugins, rootfs) = lab("pod")?;
    let podman = Podman::new(&lab, 0, &conf_dir, &plugins)?;
    let vip = lab.vip(0, "web", "front")?.to_string();
    let out = check(
        "podman run",
        podman.run(
            "front",
            &rootfs,
            &["--rm", "--name", "p1", "--dns", "127.0.0.11"],
            PROBE,
        )?,
    )?;
    assert_probe(&out, &vip);
    assert_eq!(
        lab.tasks_of(0, "box")?,
        Vec::<Value>::new(),
        "--rm left the task"
    );

    // A detached container is a task named after it until `podman rm`.
    check(
        "podman run -d",
        podman.run("front", &rootfs, &["-d", "--name", "p2"], "sleep 60")?,
    )?;
    let tasks = lab.tasks_of(0, "box")?;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["name"], "p2");
    assert_eq!(tasks[0]["state"], "running");
    check("podman rm", podman.podman(&["rm", "-f", "-t", "0", "p2"])?)?;
    assert_eq!(
        lab.tasks_of(0, "box")?,
        Vec::<Value>::new(),
        "podman rm left the task"
    );
    drop(podman);
    Ok(())
}
