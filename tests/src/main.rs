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
    Demo {
        /// Keep the cluster up at the end and forward its live view to
        /// 127.0.0.1:VIEW_PORT, until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
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
                println!("removed {n}");
            }
            Ok(())
        }
        Cmd::Demo { keep } => demo(keep),
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

/// Where every demo node serves its read-only HTTP (metrics, the live view).
const VIEW_PORT: u16 = 9440;

fn demo(keep: bool) -> Result<()> {
    step("Standing up a 3-node virtual cluster: node netns on a lab underlay, etcd beside them");
    let http = format!("0.0.0.0:{VIEW_PORT}");
    let mut lab = Lab::cluster_with("demo", 3, &["--http", &http])?;
    for n in &lab.nodes {
        println!("node {} at {} running netd", n.name, n.ip);
    }
    println!(
        "etcd at {} (its own netns)",
        underlay_ip(netd_lab::ETCD_HOST)
    );
    show(&lab, &["node", "ls"])?;
    lab.whoami_host("outside", 100, 80)?;
    println!(
        "an outside host at {} runs whoami (the egress target)",
        underlay_ip(100)
    );

    step("Creating an overlay network and a service (through node 1's API)");
    show(
        &lab,
        &["network", "create", "front", "--subnet", "198.19.10.0/24"],
    )?;
    show(
        &lab,
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

    step("Attaching five tasks over the three nodes, all through node 1's API (--node picks the node)");
    for i in 0..5 {
        let path = lab.whoami_task(&format!("web{}", i + 1), 80)?;
        let node = lab.nodes[i % 3].name.clone();
        show(
            &lab,
            &[
                "task",
                "attach",
                "web",
                "--netns",
                &path,
                "--name",
                &format!("web-{}", i + 1),
                "--node",
                &node,
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
    step("Task web-1 (node 1) calls web-2 (node 2) and web-3 (node 3) over VXLAN");
    let from = lab.ns("web1");
    for target in ["web-2", "web-3"] {
        let addr: SocketAddr = format!("{}:80", ip_of(target)?).parse()?;
        let body = http_get_from(&from, addr)?;
        println!("GET http://{addr}/ from web-1 ->\n{}", indent(&body));
        ensure!(field(&body, "Hostname").is_some(), "no answer");
    }
    let net = lab.cli_json(0, &["network", "inspect", "front"])?;
    let sandbox = format!(
        "netd-{}-{}",
        lab.nodes[0].name,
        net["id"].as_str().context("network id")?
    );
    println!("$ bridge -n {sandbox} fdb show dev vxlan0   # remote task MAC -> node address");
    let fdb = lab.exec_in(
        &lab.nodes[0].netns,
        &["bridge", "-n", &sandbox, "fdb", "show", "dev", "vxlan0"],
    )?;
    print!("{}", indent(&String::from_utf8_lossy(&fdb.stdout)));

    step("Names: netd's DNS at 127.0.0.11 inside every task answers for the cluster");
    for args in [
        &["dig", "+short", "web"][..],
        &["dig", "+short", "tasks.web"][..],
        &["getent", "hosts", "web-3"][..],
    ] {
        println!("$ ip netns exec web1 {}", args.join(" "));
        let out = lab.exec_in(&from, args)?;
        print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    }
    println!("(web is the service's VIP; tasks.web every task's address, on any node)");

    let status = lab.cli_json(0, &["status"])?;
    step(&format!(
        "Load balancing: web-1 connects to the VIP six times (datapath: {})",
        status["datapath"]["active"].as_str().unwrap_or("?")
    ));
    let vip: SocketAddr = format!(
        "{}:80",
        lab.cli_json(0, &["service", "inspect", "web"])?["vips"]["front"]
            .as_str()
            .context("vip")?
    )
    .parse()?;
    for _ in 0..6 {
        let body = http_get_from(&from, vip)?;
        let name = field(&body, "Hostname").context("no answer")?;
        println!("GET http://{vip}/ from web-1 -> answered by {name}");
    }
    let inspect = lab.cli_json(0, &["service", "inspect", "web"])?;
    println!(
        "connections per backend, as node 1 counted them: {}",
        inspect["load_balancer"]["vips"][0]["backends"]
    );

    step("The routing mesh: the outside host curls port 4567 on every node");
    let outside = lab.ns("outside");
    for n in &lab.nodes {
        let addr = SocketAddr::from((n.ip, 4567));
        let mut names = vec![];
        for _ in 0..5 {
            let body = http_get_from(&outside, addr)?;
            names.push(field(&body, "Hostname").context("no answer")?.to_string());
        }
        println!(
            "curl http://{addr}/ x5 (node {}) -> {}",
            n.name,
            names.join(" ")
        );
    }
    println!("(every node answers and rotates over all five tasks, wherever they run)");

    step("Task web-1 reaches the outside host through the gwbridge (masqueraded)");
    let body = http_get_from(&from, SocketAddr::from((underlay_ip(100), 80)))?;
    println!(
        "GET http://{}/ from web-1 ->\n{}",
        underlay_ip(100),
        indent(&body)
    );
    println!("(RemoteAddr is the node's underlay address: egress is masqueraded)");

    step("Stopping node 3's daemon: the cluster marks it down and withdraws web-3");
    lab.stop_daemon(2, false)?;
    show(&lab, &["node", "ls"])?;
    step("Starting it again: it reconciles and web-3 is back");
    lab.start_daemon(2)?;
    show(&lab, &["node", "ls"])?;
    let addr: SocketAddr = format!("{}:80", ip_of("web-3")?).parse()?;
    // Node 1 re-adds web-3 when it sees node 3's lease again: give it a moment.
    let body = (0..25)
        .find_map(|_| {
            let r = http_get_from(&from, addr).ok();
            if r.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            r
        })
        .context("web-3 did not come back")?;
    println!("GET http://{addr}/ from web-1 ->\n{}", indent(&body));

    let view = SocketAddr::from((lab.nodes[0].ip, VIEW_PORT));
    if keep {
        step("The live view (every node serves it; node 1's is forwarded here)");
        let local = SocketAddr::from(([127, 0, 0, 1], VIEW_PORT));
        forward(local, outside.clone(), view)?;
        println!("open http://{local}/ in a browser; /metrics is next to it");
        println!("the cluster stays up until Ctrl-C");
        wait_for_interrupt();
    } else {
        println!(
            "\nThe live view was at http://{view}/ inside the lab; `netd-lab demo --keep` \
             (make demo KEEP=1) keeps the cluster up and opens it at http://127.0.0.1:{VIEW_PORT}/"
        );
    }

    step("Tearing down: detach, remove, and delete the cluster");
    show(&lab, &["service", "rm", "web"])?;
    show(&lab, &["network", "rm", "front"])?;
    lab.teardown();
    println!("\ndone: every namespace, link and process of the demo is gone");
    Ok(())
}

/// Forwards connections to `local` (the machine's loopback) to `to`, connecting from
/// namespace `via` (a lab host that reaches the underlay): the lab adds no route to the
/// machine, so a browser reaches the view this way.
fn forward(local: SocketAddr, via: String, to: SocketAddr) -> Result<()> {
    let listener = std::net::TcpListener::bind(local)
        .with_context(|| format!("listen on {local} (is another demo running?)"))?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let via = via.clone();
            std::thread::spawn(move || {
                let Ok(upstream) = netd_lab::connect_from(&via, to) else {
                    return;
                };
                let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
                    return;
                };
                let (mut c, mut u) = (client, upstream);
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut u2);
                    let _ = u2.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut u, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    Ok(())
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Returns once the user pressed Ctrl-C (or the process got SIGTERM), so the demo still
/// tears down what it made.
fn wait_for_interrupt() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if unsafe { sigaction(sig, &action) }.is_err() {
            return;
        }
    }
    while !INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
