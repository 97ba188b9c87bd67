//! The `netd` command line: Docker-like verbs, each one API request through `client`.
//! Table output by default (for people), `--output json` (for scripts) prints exactly what
//! the API returned.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::client::Client;
use crate::daemon::{DaemonArgs, DEFAULT_API};
use crate::model::parse_publish;

#[derive(Debug, Parser)]
#[command(
    name = "netd",
    version,
    about = "Per-node data-plane daemon for container clusters"
)]
pub struct Cli {
    /// Where the API is: unix:PATH or tcp:ADDR.
    #[arg(long, global = true, env = "NETD_API", default_value = DEFAULT_API)]
    pub api: String,
    /// Mutual TLS for a `tcp:` API: the daemon serves with these files, the CLI
    /// connects with them.
    #[command(flatten)]
    pub tls: crate::tls::TlsFiles,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Daemon(DaemonArgs),
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Attach and detach tasks (network namespaces).
    #[command(subcommand)]
    Task(TaskCmd),
    /// List nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Show the daemon's state: node, store, datapath and kernel features.
    Status,
    /// Follow what changes in the cluster (networks, services, tasks, nodes), one line
    /// per event, until interrupted.
    Events {
        /// Start with the kept events after this store revision (0: every one kept).
        #[arg(long, value_name = "REV")]
        since: Option<u64>,
        /// type=network|service|task|node; several are or-ed.
        #[arg(long, value_name = "KEY=VALUE")]
        filter: Vec<String>,
    },
    /// Hold the sockets netd serves in task namespaces across its restarts (started by
    /// the daemon; see `netd::fdstore`).
    #[command(hide = true)]
    FdStore {
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    Create {
        name: String,
        #[arg(long, default_value = "overlay", value_parser = ["overlay", "bridge"])]
        driver: String,
        #[arg(long)]
        subnet: Option<String>,
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long)]
        attachable: bool,
        #[arg(long)]
        internal: bool,
        /// Driver options, as Docker's: `encrypted` (WireGuard between nodes).
        #[arg(long = "opt", value_parser = ["encrypted"])]
        opts: Vec<String>,
    },
    #[command(alias = "list")]
    Ls,
    Inspect {
        name: String,
    },
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    Create {
        name: String,
        #[arg(long = "network", required = true)]
        networks: Vec<String>,
        #[arg(long, default_value = "vip", value_parser = ["vip", "dnsrr"])]
        endpoint_mode: String,
        /// PUB:TARGET[/tcp|/udp][,mode=ingress|host]
        #[arg(long)]
        publish: Vec<String>,
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// Publish a port even though the node serves it itself (sshd, etcd, the API).
        #[arg(long)]
        force: bool,
        /// tcp:PORT or http:PORT/PATH: the node that runs a task probes it inside the
        /// task's namespace; a task is out of new picks and DNS answers until its first
        /// success and after RETRIES failures in a row.
        #[arg(long, value_name = "CHECK")]
        health_cmd: Option<String>,
        /// Seconds between two probes of a task.
        #[arg(long, value_name = "S", default_value_t = 5, requires = "health_cmd")]
        health_interval: u64,
        /// Failed probes in a row that make a task unhealthy.
        #[arg(long, value_name = "N", default_value_t = 3, requires = "health_cmd")]
        health_retries: u32,
    },
    #[command(alias = "list")]
    Ls,
    Inspect {
        name: String,
    },
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    Attach {
        service: String,
        /// The task's network namespace: /run/netns/NAME or /proc/PID/ns/net.
        #[arg(long)]
        netns: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        node: Option<String>,
    },
    Detach {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Graceful: take the tasks out of new connections and DNS answers on every node
        /// now, and remove each once its connections are gone or after SECONDS.
        #[arg(long, value_name = "SECONDS")]
        drain: Option<u64>,
    },
    /// One task's record, with its state and health.
    Inspect { name: String },
    #[command(alias = "list")]
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    #[command(alias = "list")]
    Ls,
    /// Replace this node's WireGuard key (encrypted overlays) without dropping traffic:
    /// the other nodes move to the new key first, then the old one goes.
    RotateKey,
}

/// Runs one client command and prints its result.
pub fn run(cli: &Cli) -> Result<()> {
    let c = Client::new(&cli.api).with_tls(&cli.tls);
    let out = cli.output;
    match &cli.command {
        Command::Daemon(_) | Command::FdStore { .. } => bail!("started by main"),
        Command::Status => {
            let v = c.get("/v1/status")?;
            print_record(out, &v);
        }
        Command::Node(NodeCmd::RotateKey) => {
            let v = c.post("/v1/node/rotate-key", &serde_json::json!({}))?;
            print_record(out, &v);
        }
        Command::Node(NodeCmd::Ls) => {
            let v = c.get("/v1/nodes")?;
            print_table(
                out,
                &v,
                &[
                    ("NAME", "name"),
                    ("ADDRESS", "address"),
                    ("STATUS", "status"),
                    ("TASKS", "tasks"),
                ],
            );
        }
        Command::Events { since, filter } => events(&c, out, *since, filter)?,
        Command::Network(cmd) => network(&c, out, cmd)?,
        Command::Service(cmd) => service(&c, out, cmd)?,
        Command::Task(cmd) => task(&c, out, cmd)?,
    }
    Ok(())
}

/// Prints each event as it comes: a line of text, or the API's JSON object.
fn events(c: &Client, out: Output, since: Option<u64>, filters: &[String]) -> Result<()> {
    let mut query = vec![];
    if let Some(rev) = since {
        query.push(format!("since={rev}"));
    }
    for f in filters {
        match f.split_once('=') {
            Some(("type", kind)) => {
                query.push(format!("type={}", crate::client::encode_component(kind)))
            }
            _ => bail!("--filter {f:?}: expected type=network|service|task|node"),
        }
    }
    let path = format!("/v1/events?{}", query.join("&"));
    c.stream_lines(&path, |line| {
        let v: Value = serde_json::from_str(line)?;
        if let Some(e) = v.get("error") {
            bail!("{}", e.as_str().unwrap_or("the event stream ended"));
        }
        match out {
            Output::Json => println!("{line}"),
            Output::Table => {
                let attrs: Vec<String> = v["attributes"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                println!(
                    "{} rev {} {} {} {} ({})",
                    v["time"],
                    v["revision"],
                    cell(&v["type"]),
                    cell(&v["action"]),
                    cell(&v["name"]),
                    attrs.join(", ")
                );
            }
        }
        Ok(())
    })
}

fn network(c: &Client, out: Output, cmd: &NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            driver,
            subnet,
            gateway,
            attachable,
            internal,
            opts,
        } => {
            let encrypted = opts.iter().any(|o| o == "encrypted");
            let v = c.post(
                "/v1/networks",
                &json!({"name": name, "driver": driver, "subnet": subnet, "gateway": gateway,
                        "attachable": attachable, "internal": internal,
                        "encrypted": encrypted}),
            )?;
            print_created(out, &v);
        }
        NetworkCmd::Ls => {
            let v = c.get("/v1/networks")?;
            print_table(
                out,
                &v,
                &[
                    ("NETWORK ID", "id"),
                    ("NAME", "name"),
                    ("DRIVER", "driver"),
                    ("SUBNET", "subnet"),
                    ("GATEWAY", "gateway"),
                    ("VNI", "vni"),
                ],
            );
        }
        NetworkCmd::Inspect { name } => inspect(c, out, "networks", name)?,
        NetworkCmd::Rm { names } => remove(c, out, "networks", names)?,
    }
    Ok(())
}

fn service(c: &Client, out: Output, cmd: &ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::Create {
            name,
            networks,
            endpoint_mode,
            publish,
            aliases,
            force,
            health_cmd,
            health_interval,
            health_retries,
        } => {
            let publish = publish
                .iter()
                .map(|p| parse_publish(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let health = health_cmd.as_ref().map(
                |cmd| json!({"cmd": cmd, "interval": health_interval, "retries": health_retries}),
            );
            let v = c.post(
                "/v1/services",
                &json!({"name": name, "networks": networks, "endpoint_mode": endpoint_mode,
                        "publish": publish, "aliases": aliases, "force": force,
                        "health": health}),
            )?;
            print_created(out, &v);
        }
        ServiceCmd::Ls => {
            let v = c.get("/v1/services")?;
            print_table(
                out,
                &v,
                &[
                    ("ID", "id"),
                    ("NAME", "name"),
                    ("MODE", "endpoint_mode"),
                    ("REPLICAS", "replicas"),
                    ("NETWORKS", "networks"),
                    ("VIPS", "vips"),
                ],
            );
        }
        ServiceCmd::Inspect { name } => inspect(c, out, "services", name)?,
        ServiceCmd::Rm { names } => remove(c, out, "services", names)?,
    }
    Ok(())
}

fn task(c: &Client, out: Output, cmd: &TaskCmd) -> Result<()> {
    let columns = [
        ("ID", "id"),
        ("NAME", "name"),
        ("SERVICE", "service"),
        ("NODE", "node"),
        ("STATE", "state"),
        ("HEALTH", "health"),
        ("ADDRESSES", "addresses"),
    ];
    match cmd {
        TaskCmd::Attach {
            service,
            netns,
            name,
            node,
        } => {
            let v = c.post(
                "/v1/tasks",
                &json!({"service": service, "netns": netns, "name": name, "node": node}),
            )?;
            // JSON: the task record itself, as `inspect` prints it.
            match out {
                Output::Json => print_json(&v),
                Output::Table => print_table(out, &with_addresses(json!([v])), &columns),
            }
        }
        TaskCmd::Detach { ids, drain: None } => remove(c, out, "tasks", ids)?,
        TaskCmd::Detach {
            ids,
            drain: Some(secs),
        } => {
            for id in ids {
                let path = format!(
                    "/v1/tasks/{}?drain={secs}",
                    crate::client::encode_component(id)
                );
                let v = c.delete(&path)?;
                match out {
                    Output::Json => print_json(&v),
                    Output::Table => println!("{} draining", cell(&v["name"])),
                }
            }
        }
        TaskCmd::Inspect { name } => inspect(c, out, "tasks", name)?,
        TaskCmd::Ls => {
            let v = c.get("/v1/tasks")?;
            print_table(out, &with_addresses(v), &columns);
        }
    }
    Ok(())
}

fn inspect(c: &Client, out: Output, collection: &str, name: &str) -> Result<()> {
    let v = c.get(&format!(
        "/v1/{collection}/{}",
        crate::client::encode_component(name)
    ))?;
    print_record(out, &v);
    Ok(())
}

/// Removes each named object in turn, printing each name as it goes (as docker does).
fn remove(c: &Client, out: Output, collection: &str, names: &[String]) -> Result<()> {
    for n in names {
        let v = c.delete(&format!(
            "/v1/{collection}/{}",
            crate::client::encode_component(n)
        ))?;
        match out {
            Output::Json => print_json(&v),
            Output::Table => println!("{}", cell(&v["name"])),
        }
    }
    Ok(())
}

/// Adds a compact `addresses` column (`eth0=198.19.0.2/24 ...`) to task records.
fn with_addresses(mut tasks: Value) -> Value {
    if let Some(list) = tasks.as_array_mut() {
        for t in list {
            let addrs: Vec<String> = t["endpoints"]
                .as_array()
                .map(|eps| {
                    eps.iter()
                        .map(|e| {
                            format!(
                                "{}={}/{}",
                                e["ifname"].as_str().unwrap_or("?"),
                                e["ip"].as_str().unwrap_or("?"),
                                e["prefix"]
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            t["addresses"] = json!(addrs.join(" "));
        }
    }
    tasks
}

/// Percent-encodes anything but unreserved characters, so a name can't escape its path.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn print_table(out: Output, rows: &Value, columns: &[(&str, &str)]) {
    if out == Output::Json {
        return print_json(rows);
    }
    let rows: Vec<Vec<String>> = rows
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| columns.iter().map(|(_, k)| cell(&r[*k])).collect())
                .collect()
        })
        .unwrap_or_default();
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(columns.iter().map(|(h, _)| *h).collect());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_record(out: Output, v: &Value) {
    if out == Output::Json {
        return print_json(v);
    }
    if let Some(obj) = v.as_object() {
        let width = obj.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, val) in obj {
            match val {
                Value::Array(items) if items.iter().any(Value::is_object) => {
                    println!("{k}:");
                    for item in items {
                        println!("  - {}", cell(item));
                    }
                }
                Value::Object(inner) if inner.values().any(Value::is_object) => {
                    println!("{k}:");
                    for (ik, iv) in inner {
                        println!("  {ik}: {}", cell(iv));
                    }
                }
                _ => println!("{k:<width$}  {}", cell(val)),
            }
        }
    } else {
        print_json(v);
    }
}

fn print_created(out: Output, v: &Value) {
    match out {
        Output::Json => print_json(v),
        Output::Table => println!("{}", cell(&v["id"])),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command, NetworkCmd};

    /// clap checks a command's arguments against each other (two with one short name,
    /// say) only when it builds the command, which a user's first try would otherwise do.
    #[test]
    fn every_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn network_options_are_dockers_and_only_known_ones_are_taken() {
        let cli = Cli::try_parse_from(["netd", "network", "create", "x", "--opt", "encrypted"])
            .expect("--opt encrypted");
        let Command::Network(NetworkCmd::Create { opts, .. }) = cli.command else {
            panic!("not a network create");
        };
        assert_eq!(opts, vec!["encrypted".to_string()]);
        assert!(
            Cli::try_parse_from(["netd", "network", "create", "x", "--opt", "secret"]).is_err()
        );
    }
}
