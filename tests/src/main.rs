//! `netd-lab`: the lab as a command. `whoami` is the task server, `demo` stands up a
//! virtual cluster and shows traffic crossing it, `cleanup` removes what a crashed lab
//! left behind.

use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};
use netd_lab::{field, http_get_from, underlay_ip, Lab, LAB_MARK};

#[derive(Parser)]
#[command(
    name = "netd-lab",
    about = "Virtual netd clusters in network namespaces"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP (TCP) and UDP on PORT, answering with the task name and addresses.
    Whoami {
        #[arg(long, default_value_t = 80)]
        port: u16,
        #[arg(long, default_value = "whoami")]
        name: String,
    },
    /// Stand up a virtual cluster, attach tasks, show traffic, tear it all down.
    Demo,
    /// Remove namespaces (and their processes) left by labs that did not finish.
    Cleanup {
        #[arg(long, default_value = LAB_MARK)]
        prefix: String,
    },
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Whoami { port, name } => netd_lab::whoami::serve(port, &name),
        Cmd::Cleanup { prefix } => {
            for n in netd_lab::cleanup_prefix(&prefix)? {
                println!("removed netns {n}");
            }
            Ok(())
        }
        Cmd::Demo => demo(),
    }
}

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

fn show(lab: &Lab, args: &[&str]) -> Result<String> {
    println!("$ netd {}", args.join(" "));
    let out = lab.cli(0, args)?;
    print!("{out}");
    Ok(out)
}

fn demo() -> Result<()> {
    step("Standing up a 1-node virtual cluster (node netns on a lab underlay bridge)");
    let mut lab = Lab::start("demo", 1)?;
    println!(
        "node {} at {} running netd",
        lab.nodes[0].name, lab.nodes[0].ip
    );
    lab.whoami_host("outside", 100, 80)?;
    println!(
        "an outside host at {} runs whoami (the egress target)",
        underlay_ip(100)
    );

    step("Creating an overlay network and a service");
    show(
        &lab,
        &["network", "create", "front", "--subnet", "198.19.10.0/24"],
    )?;
    show(&lab, &["service", "create", "web", "--network", "front"])?;

    step("Attaching three tasks (each a netns running whoami on port 80)");
    for i in 1..=3 {
        let path = lab.whoami_task(&format!("web{i}"), 80)?;
        show(
            &lab,
            &[
                "task",
                "attach",
                "web",
                "--netns",
                &path,
                "--name",
                &format!("web-{i}"),
            ],
        )?;
    }
    show(&lab, &["task", "ls"])?;

    let tasks = lab.cli_json(0, &["task", "ls"])?;
    let ip_of = |name: &str| -> Result<String> {
        tasks
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == name))
            .and_then(|t| t["endpoints"][0]["ip"].as_str())
            .map(str::to_string)
            .context("task address")
    };
    step("Task web-1 calls web-2 and web-3 over the overlay");
    let from = format!("{}-web1", lab.prefix);
    for target in ["web-2", "web-3"] {
        let addr: SocketAddr = format!("{}:80", ip_of(target)?).parse()?;
        let body = http_get_from(&from, addr)?;
        println!("GET http://{addr}/ from web-1 ->\n{}", indent(&body));
        ensure!(field(&body, "Hostname").is_some(), "no answer");
    }

    step("Task web-1 reaches the outside host through the gwbridge (masqueraded)");
    let body = http_get_from(&from, SocketAddr::from((underlay_ip(100), 80)))?;
    println!(
        "GET http://{}/ from web-1 ->\n{}",
        underlay_ip(100),
        indent(&body)
    );
    println!("(RemoteAddr is the node's underlay address: egress is masqueraded)");

    step("Tearing down: detach, remove, and delete the cluster");
    show(&lab, &["service", "rm", "web"])?;
    show(&lab, &["network", "rm", "front"])?;
    lab.teardown();
    println!("\ndone: every namespace, link and process of the demo is gone");
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
