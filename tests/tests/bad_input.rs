//! Bad input gets a clear error and changes nothing: neither the desired state (what
//! `ls` shows) nor the kernel. Every case goes through the real CLI or the raw API socket
//! of a real daemon in the lab.

use anyhow::{Context, Result};
use netd_lab::Lab;
use serde_json::Value;

/// Everything a user can list, to compare before and after a rejected request.
fn listing(lab: &Lab) -> Result<Value> {
    Ok(serde_json::json!({
        "networks": lab.cli_json(0, &["network", "ls"])?,
        "services": lab.cli_json(0, &["service", "ls"])?,
        "tasks": lab.cli_json(0, &["task", "ls"])?,
    }))
}

/// POSTs raw bytes to node 0's API; returns (status, JSON body).
fn raw_post(lab: &Lab, path: &str, body: &[u8]) -> Result<(u16, Value)> {
    let (status, text) = lab.api_raw(0, "POST", path, body)?;
    Ok((
        status,
        serde_json::from_str(&text).context("a JSON answer")?,
    ))
}

struct Checker<'a> {
    lab: &'a Lab,
    listing: Value,
    kernel: String,
}

impl<'a> Checker<'a> {
    fn new(lab: &'a Lab) -> Result<Self> {
        Ok(Checker {
            lab,
            listing: listing(lab)?,
            kernel: lab.kernel_snapshot(0)?,
        })
    }

    /// Runs a CLI command that must fail with API error `code`, then checks nothing moved.
    fn rejects(&self, args: &[&str], code: &str) -> Result<()> {
        let v = self.lab.cli_json(0, args)?;
        assert_eq!(v["code"], code, "netd {} -> {v}", args.join(" "));
        assert!(
            v["error"].as_str().is_some_and(|e| e.len() > 10),
            "no clear message: {v}"
        );
        let status = v["status"].as_u64().unwrap_or(0);
        assert!((400..500).contains(&status), "status {status} for {args:?}");
        assert!(
            self.lab.cli(0, args).is_err(),
            "CLI exit status is 0 for {args:?}"
        );
        self.unchanged(&args.join(" "))
    }

    fn unchanged(&self, what: &str) -> Result<()> {
        assert_eq!(listing(self.lab)?, self.listing, "{what} changed the state");
        let now = self.lab.kernel_snapshot(0)?;
        assert!(
            now == self.kernel,
            "{what} changed the kernel:\n{}",
            netd_lab::diff_lines(&self.kernel, &now)
        );
        Ok(())
    }
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() -> Result<()> {
    let mut lab = Lab::start("bad", 1)?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.10.0/24"],
    )?;
    lab.cli(
        0,
        &["network", "create", "tiny", "--subnet", "198.19.40.0/30"],
    )?;
    lab.cli(
        0,
        &[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--publish",
            "4567:80",
        ],
    )?;
    // /30: two hosts, the gateway and the service VIP: no address left for a task.
    lab.cli(0, &["service", "create", "full", "--network", "tiny"])?;
    let (_, t1) = lab.add_task_netns("t1")?;
    let (_, t2) = lab.add_task_netns("t2")?;
    lab.cli(
        0,
        &["task", "attach", "web", "--netns", &t1, "--name", "one"],
    )?;
    let check = Checker::new(&lab)?;

    // Malformed and unknown-field bodies, straight at the API.
    for body in [
        &b"{not json"[..],
        b"",
        b"[]",
        b"{\"name\":\"x\",\"bogus\":1}",
        b"{\"name\":7}",
    ] {
        let (status, v) = raw_post(&lab, "/v1/networks", body)?;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["code"], "invalid_json", "{v}");
        check.unchanged(&String::from_utf8_lossy(body))?;
    }
    let (status, v) = raw_post(
        &lab,
        "/v1/tasks",
        br#"{"service":"web","netns":"/x","extra":true}"#,
    )?;
    assert_eq!((status, v["code"].as_str()), (400, Some("invalid_json")));

    // Subnets and gateways.
    check.rejects(
        &["network", "create", "n1", "--subnet", "198.19.300.0/24"],
        "invalid_argument",
    )?;
    check.rejects(
        &["network", "create", "n1", "--subnet", "198.19.20.5/24"],
        "invalid_argument",
    )?;
    check.rejects(
        &["network", "create", "n1", "--subnet", "198.19.20.0/31"],
        "invalid_argument",
    )?;
    check.rejects(
        &["network", "create", "n1", "--subnet", "198.19.10.128/25"],
        "conflict",
    )?;
    check.rejects(
        &["network", "create", "n1", "--subnet", "198.19.0.0/16"],
        "conflict",
    )?;
    check.rejects(
        &["network", "create", "n1", "--subnet", "198.18.1.0/24"],
        "conflict",
    )?;
    check.rejects(
        &[
            "network",
            "create",
            "n1",
            "--subnet",
            "198.19.30.0/24",
            "--gateway",
            "198.19.31.1",
        ],
        "invalid_argument",
    )?;
    check.rejects(
        &["network", "create", "n1", "--gateway", "198.19.31.1"],
        "invalid_argument",
    )?;

    // Names.
    check.rejects(&["network", "create", "front"], "conflict")?;
    check.rejects(&["network", "create", "bad_name"], "invalid_argument")?;
    check.rejects(&["network", "create", "gwbridge"], "invalid_argument")?;
    check.rejects(
        &["service", "create", "web-", "--network", "front"],
        "invalid_argument",
    )?;
    check.rejects(
        &["service", "create", "web", "--network", "front"],
        "conflict",
    )?;
    check.rejects(
        &["service", "create", "api", "--network", "nowhere"],
        "not_found",
    )?;
    check.rejects(
        &[
            "service",
            "create",
            "api",
            "--network",
            "front",
            "--alias",
            "not.a.label",
        ],
        "invalid_argument",
    )?;
    check.rejects(
        &["task", "attach", "web", "--netns", &t2, "--name", "a.b"],
        "invalid_argument",
    )?;
    check.rejects(
        &["task", "attach", "web", "--netns", &t2, "--name", "one"],
        "conflict",
    )?;

    // Published ports: taken by another service, published twice, a target port of 0,
    // ingress mode on a dnsrr service, no network.
    for (args, code) in [
        (
            &["--network", "front", "--publish", "4567:8080"][..],
            "conflict",
        ),
        (
            &[
                "--network",
                "front",
                "--publish",
                "4600:80",
                "--publish",
                "4600:81",
            ][..],
            "invalid_argument",
        ),
        (
            &[
                "--network",
                "front",
                "--publish",
                "4600:80",
                "--endpoint-mode",
                "dnsrr",
            ][..],
            "invalid_argument",
        ),
    ] {
        let mut cmd = vec!["service", "create", "api"];
        cmd.extend_from_slice(args);
        check.rejects(&cmd, code)?;
    }
    for body in [
        &br#"{"name":"api","networks":["front"],"publish":[{"published":4600,"target":0,"protocol":"tcp","mode":"ingress"}]}"#[..],
        br#"{"name":"api","networks":["front"],"publish":[{"published":0,"target":80,"protocol":"tcp","mode":"ingress"}]}"#,
        br#"{"name":"api","networks":[],"publish":[{"published":4600,"target":80,"protocol":"tcp","mode":"ingress"}]}"#,
    ] {
        let (status, v) = raw_post(&lab, "/v1/services", body)?;
        assert_eq!((status, v["code"].as_str()), (400, Some("invalid_argument")), "{v}");
        check.unchanged(&String::from_utf8_lossy(body))?;
    }
    let (status, v) = raw_post(
        &lab,
        "/v1/services",
        br#"{"name":"api","networks":["front"],"publish":[{"published":70000,"target":80,"protocol":"tcp","mode":"ingress"}]}"#,
    )?;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("invalid_json")),
        "{v}"
    );
    check.unchanged("published port 70000")?;
    // The CLI checks the spec before asking the API.
    for spec in ["0:80", "4600:0", "70000:80", "4600:80/sctp", "4600"] {
        let out = lab.cli(
            0,
            &[
                "service",
                "create",
                "api",
                "--network",
                "front",
                "--publish",
                spec,
            ],
        );
        assert!(out.is_err(), "--publish {spec} was accepted");
    }
    check.unchanged("bad --publish specs")?;

    // Netns paths.
    let missing = format!("/run/netns/{}-missing", lab.prefix);
    check.rejects(
        &["task", "attach", "web", "--netns", &missing],
        "invalid_argument",
    )?;
    check.rejects(
        &["task", "attach", "web", "--netns", "/etc/hostname"],
        "invalid_argument",
    )?;
    check.rejects(
        &["task", "attach", "web", "--netns", "relative/path"],
        "invalid_argument",
    )?;
    check.rejects(&["task", "attach", "web", "--netns", &t1], "conflict")?;
    check.rejects(&["task", "attach", "nosuch", "--netns", &t2], "not_found")?;
    check.rejects(
        &["task", "attach", "web", "--netns", &t2, "--node", "nosuch"],
        "not_found",
    )?;

    // Removals that must be refused, and things that do not exist.
    check.rejects(&["network", "rm", "front"], "in_use")?;
    check.rejects(&["network", "rm", "nope"], "not_found")?;
    check.rejects(&["service", "rm", "nope"], "not_found")?;
    check.rejects(&["task", "detach", "nope"], "not_found")?;

    // IPAM exhaustion.
    check.rejects(&["task", "attach", "full", "--netns", &t2], "exhausted")?;
    Ok(())
}
