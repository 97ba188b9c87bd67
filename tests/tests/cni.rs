//! The CNI plugin `netd-cni`, run directly with the spec's environment the way a runtime
//! runs it (inside the node's namespace, config on stdin), against a real daemon: what
//! ADD makes is a task like any other (DNS, VIP, published ports), CHECK reads the
//! kernel back, GC and DEL detach, chained plugins take its result, and every failure is
//! a CNI error object with the spec's code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::{binary, field, http_get_from, CniEnv, Lab, CNI_PLUGIN_DIR};
use serde_json::{json, Value};

fn plugin() -> Result<PathBuf> {
    binary("netd-cni")
}

/// Overlay `front`, service `web` on it (the CNI tasks' service) and service `client`
/// with one CLI-attached task `c` to look from.
fn lab(tag: &str) -> Result<Lab> {
    let mut lab = Lab::start(tag, 1)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.30.0/24"],
    )?;
    lab.cli(0, &["service", "create", "web", "--network", "front"])?;
    lab.cli(0, &["service", "create", "client", "--network", "front"])?;
    lab.attach_whoami(0, "client", "c", None)?;
    Ok(lab)
}

fn config(lab: &Lab, version: &str, extra: Value) -> Value {
    let mut v = json!({
        "cniVersion": version,
        "name": "front",
        "type": "netd",
        "service": "web",
        "api": lab.nodes[0].api(),
    });
    for (k, x) in extra.as_object().into_iter().flatten() {
        v[k] = x.clone();
    }
    v
}

fn env<'a>(command: &'a str, container: &'a str, netns: &'a str) -> CniEnv<'a> {
    CniEnv {
        command,
        container,
        netns,
        ifname: "eth0",
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-a",
    }
}

/// Runs the plugin and insists on success; returns its output.
fn ok(lab: &Lab, e: &CniEnv, conf: &Value) -> Result<Value> {
    let (success, out) = lab.cni(0, &plugin()?, e, conf)?;
    if !success {
        bail!("netd-cni {} failed: {out}", e.command);
    }
    Ok(out)
}

/// Runs the plugin and insists on failure; returns the error object.
fn fails(lab: &Lab, e: &CniEnv, conf: &Value) -> Result<Value> {
    let (success, out) = lab.cni(0, &plugin()?, e, conf)?;
    if success {
        bail!("netd-cni {} succeeded, expected an error: {out}", e.command);
    }
    Ok(out)
}

/// The task names, sorted.
fn names(lab: &Lab) -> Result<Vec<String>> {
    let mut n: Vec<String> = tasks(lab)?
        .iter()
        .filter_map(|t| t["name"].as_str().map(String::from))
        .collect();
    n.sort();
    Ok(n)
}

fn tasks(lab: &Lab) -> Result<Vec<Value>> {
    Ok(lab
        .cli_json(0, &["task", "ls"])?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn the_address(result: &Value, ifname: &str) -> Result<String> {
    let i = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .position(|x| x["name"] == ifname)
        .with_context(|| format!("no {ifname} in {result}"))?;
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|ip| ip["interface"] == i)
        .and_then(|ip| ip["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or_default().to_string())
        .with_context(|| format!("no address of {ifname} in {result}"))
}

#[test]
fn cni_add_makes_a_task_that_check_gc_and_del_manage() -> Result<()> {
    let mut lab = lab("cni")?;
    let a = lab.whoami_task("a", 80)?;
    let conf = config(&lab, "1.0.0", json!({}));

    let result = ok(&lab, &env("ADD", "ctr-a", &a), &conf)?;
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["interfaces"][0]["name"], "eth0");
    assert_eq!(result["interfaces"][0]["sandbox"], a.as_str());
    let ip = the_address(&result, "eth0")?;
    assert!(ip.starts_with("198.19.30."), "{result}");
    assert_eq!(result["ips"][0]["gateway"], "198.19.30.1");
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(result["dns"]["nameservers"], json!(["127.0.0.11"]));
    assert_eq!(result["dns"]["search"], json!([netd_lab::SEARCH_DOMAIN]));

    // The container is a task of web, named after the pod, like any other task.
    let c = lab.ns("c");
    assert_eq!(lab.dig_short(&c, "pod-a")?, std::slice::from_ref(&ip));
    let vip = lab.dig_short(&c, "web")?;
    assert_eq!(vip.len(), 1, "{vip:?}");
    let body = http_get_from(&c, SocketAddr::new(vip[0].parse()?, 80))?;
    assert_eq!(field(&body, "Hostname"), Some("a"), "{body}");
    let listed = tasks(&lab)?;
    let task = listed
        .iter()
        .find(|t| t["name"] == "pod-a")
        .with_context(|| format!("{listed:?}"))?;
    assert_eq!(task["labels"]["cni.container_id"], "ctr-a");
    assert_eq!(task["state"], "running");

    // A repeated ADD (a runtime that lost the answer) returns the same attachment.
    let again = ok(&lab, &env("ADD", "ctr-a", &a), &conf)?;
    assert_eq!(the_address(&again, "eth0")?, ip);
    assert_eq!(tasks(&lab)?.len(), listed.len());

    // CHECK passes on what ADD made, and fails once the kernel differs from it.
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    ok(&lab, &env("CHECK", "ctr-a", &a), &with_prev)?;
    let ns_a = lab.ns("a");
    lab.exec_in(&ns_a, &["ip", "addr", "flush", "dev", "eth0"])?;
    let err = fails(&lab, &env("CHECK", "ctr-a", &a), &with_prev)?;
    assert_eq!(err["code"], 102, "{err}");
    assert!(err["msg"].as_str().unwrap_or("").contains(&ip), "{err}");

    // STATUS (CNI 1.1): ready, but not for a network netd does not have.
    ok(
        &lab,
        &env("STATUS", "", ""),
        &config(&lab, "1.1.0", json!({})),
    )?;
    let err = fails(
        &lab,
        &env("STATUS", "", ""),
        &config(&lab, "1.1.0", json!({"network": "nowhere"})),
    )?;
    assert_eq!(err["code"], 50, "{err}");

    // GC removes the attachments the runtime no longer lists, and only those.
    let b = lab.whoami_task("b", 80)?;
    let mut e = env("ADD", "ctr-b", &b);
    e.args = "";
    ok(&lab, &e, &conf)?;
    assert_eq!(tasks(&lab)?.len(), 3);
    let gc = config(
        &lab,
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": "ctr-a", "ifname": "eth0"}]}),
    );
    ok(&lab, &env("GC", "", ""), &gc)?;
    assert_eq!(names(&lab)?, ["c", "pod-a"]);

    // DEL detaches; a second DEL and a DEL of something never added succeed too.
    ok(&lab, &env("DEL", "ctr-a", &a), &conf)?;
    ok(&lab, &env("DEL", "ctr-a", &a), &conf)?;
    ok(&lab, &env("DEL", "never-added", ""), &conf)?;
    assert_eq!(names(&lab)?, ["c"]);
    assert!(lab.dig_short(&c, "pod-a")?.is_empty());
    Ok(())
}

#[test]
fn cni_port_mappings_publish_and_chained_plugins_take_the_result() -> Result<()> {
    let mut lab = lab("cnip")?;
    let a = lab.whoami_task("a", 80)?;
    let conf = config(
        &lab,
        "1.0.0",
        json!({"runtimeConfig": {"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}}),
    );
    let result = ok(&lab, &env("ADD", "ctr-a", &a), &conf)?;

    // The port answers on the node's address, as a host-mode port of web.
    let outside = lab.add_host("out", 60)?;
    let node = SocketAddr::from((lab.nodes[0].ip, 8080));
    let body = http_get_from(&outside, node)?;
    assert_eq!(field(&body, "Hostname"), Some("a"), "{body}");
    let svc = lab.cli_json(0, &["service", "inspect", "web"])?;
    assert_eq!(svc["publish"][0]["mode"], "host", "{svc}");

    // The next plugin of a conflist gets our result as prevResult: Debian's `firewall`
    // plugin (iptables backend) opens the forward path for the container's address.
    let firewall = json!({
        "cniVersion": "1.0.0",
        "name": "front",
        "type": "firewall",
        "backend": "iptables",
        "prevResult": result,
    });
    let fw = Path::new(CNI_PLUGIN_DIR).join("firewall");
    let (success, out) = lab.cni(0, &fw, &env("ADD", "ctr-a", &a), &firewall)?;
    assert!(success, "firewall ADD: {out}");
    assert_eq!(out["ips"], result["ips"], "the chain hands our result on");
    let ip = the_address(&result, "eth0")?;
    let rules = lab.exec_in(&lab.nodes[0].netns, &["iptables", "-S", "CNI-FORWARD"])?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(rules.contains(&ip), "no forward rule for {ip}: {rules}");
    let (success, out) = lab.cni(0, &fw, &env("DEL", "ctr-a", &a), &firewall)?;
    assert!(success, "firewall DEL: {out}");
    ok(&lab, &env("DEL", "ctr-a", &a), &conf)?;
    Ok(())
}

#[test]
fn cni_errors_carry_the_specs_codes_and_change_nothing() -> Result<()> {
    let mut lab = lab("cnie")?;
    let a = lab.whoami_task("a", 80)?;
    let before = tasks(&lab)?.len();
    let conf = config(&lab, "1.0.0", json!({}));

    let err = fails(&lab, &env("ADD", "x", "/run/netns/no-such-netns"), &conf)?;
    assert_eq!(err["code"], 3, "{err}");
    assert!(err["msg"].as_str().unwrap_or("").contains("no-such-netns"));

    let err = fails(
        &lab,
        &env("ADD", "x", &a),
        &config(&lab, "1.0.0", json!({"service": "nope"})),
    )?;
    assert_eq!(err["code"], 7, "{err}");
    assert!(err["msg"].as_str().unwrap_or("").contains("nope"), "{err}");

    let err = fails(
        &lab,
        &env("ADD", "x", &a),
        &config(&lab, "1.0.0", json!({"network": "nonet"})),
    )?;
    assert_eq!(err["code"], 7, "{err}");
    assert!(err["msg"].as_str().unwrap_or("").contains("nonet"), "{err}");

    let mut no_service = config(&lab, "1.0.0", json!({}));
    no_service
        .as_object_mut()
        .context("config")?
        .remove("service");
    let mut e = env("ADD", "x", &a);
    e.args = "";
    let err = fails(&lab, &e, &no_service)?;
    assert_eq!(err["code"], 7, "{err}");
    assert!(
        err["msg"].as_str().unwrap_or("").contains("NETD_SERVICE"),
        "{err}"
    );
    // ... which CNI_ARGS can name instead.
    e.args = "NETD_SERVICE=web";
    ok(&lab, &e, &no_service)?;
    ok(&lab, &env("DEL", "x", &a), &conf)?;

    let err = fails(
        &lab,
        &env("ADD", "x", &a),
        &config(&lab, "0.1.0", json!({})),
    )?;
    assert_eq!(err["code"], 1, "{err}");
    let mut e = env("ADD", "x", &a);
    e.ifname = "";
    let err = fails(&lab, &e, &conf)?;
    assert_eq!(err["code"], 4, "{err}");
    let mut e = env("ADD", "x", &a);
    e.ifname = "bad/name";
    let err = fails(&lab, &e, &conf)?;
    assert_eq!(err["code"], 7, "{err}");

    // Another container cannot take a namespace that is attached already.
    ok(&lab, &env("ADD", "first", &a), &conf)?;
    let err = fails(&lab, &env("ADD", "second", &a), &conf)?;
    assert_eq!(err["code"], 100, "{err}");
    ok(&lab, &env("DEL", "first", &a), &conf)?;

    assert_eq!(tasks(&lab)?.len(), before, "a refused ADD left a task");
    Ok(())
}

#[test]
fn cni_del_while_netd_is_down_is_finished_when_it_is_back() -> Result<()> {
    let mut lab = lab("cnid")?;
    let a = lab.whoami_task("a", 80)?;
    let conf = config(&lab, "1.1.0", json!({}));
    ok(&lab, &env("ADD", "ctr-a", &a), &conf)?;
    lab.stop_daemon(0, false)?;

    // With the daemon down: ADD and STATUS say so; DEL succeeds and is queued.
    let err = fails(&lab, &env("ADD", "ctr-b", &a), &conf)?;
    assert_eq!(err["code"], 11, "{err}");
    let err = fails(&lab, &env("STATUS", "", ""), &conf)?;
    assert_eq!(err["code"], 50, "{err}");
    ok(&lab, &env("DEL", "ctr-a", &a), &conf)?;
    let queue = lab.nodes[0].dir.join("cni-delete-queue");
    let queued = std::fs::read_dir(&queue)?.count();
    assert_eq!(queued, 1, "the DEL was not queued in {}", queue.display());

    lab.start_daemon(0)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tasks(&lab)?.iter().any(|t| t["name"] == "pod-a") {
        if Instant::now() > deadline {
            bail!("the queued DEL was not finished: {:?}", tasks(&lab)?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read_dir(&queue)?.count(),
        0,
        "the queue was not emptied"
    );
    let links = lab.exec_in(&lab.ns("a"), &["ip", "-o", "link"])?;
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains("eth0"),
        "the container still has eth0: {links}"
    );
    Ok(())
}
