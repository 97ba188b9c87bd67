//! `netd-cni`, the CNI plugin (type `netd`): how containerd, CRI-O, Kubernetes, Nomad and
//! Podman's CNI backend attach a container to a netd service. It is a thin client of the
//! API: ADD is `POST /v1/tasks` with the container's namespace, DEL detaches the tasks
//! labelled with the container id and interface, and nothing is kept anywhere but in
//! the daemon's store (the task's labels).
//!
//! The runtime runs the plugin once per operation with `CNI_*` environment variables and
//! the network config on stdin; the plugin prints a result (ADD), a version list
//! (VERSION) or an error object, and exits non-zero on error. Spec versions 0.3.x, 0.4.0,
//! 1.0.0 and 1.1.0 (STATUS, GC) are spoken; the result is in the config's version.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{json, Value};

use super::cni_queue::{self, QueuedDelete, LABEL_CONTAINER, LABEL_IFNAME, LABEL_NETWORK};
use crate::client::{encode_component, ApiError, Client};
use crate::daemon::DEFAULT_API;
use crate::model::{PortSpec, Protocol, PublishMode};

/// The versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Where tasks find netd's embedded DNS.
const NAMESERVER: &str = "127.0.0.11";

/// CNI's error codes (spec "Error codes"), and netd's own from 100 up.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// netd refused the attachment for a reason of its own (a taken port or name, an
    /// exhausted subnet).
    pub const REFUSED: u32 = 100;
    /// The kernel work of an attachment failed on the node.
    pub const KERNEL: u32 = 101;
    /// CHECK found the attachment other than ADD made it.
    pub const NOT_AS_ADDED: u32 = 102;
}

/// A CNI error object: printed on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

type CniResult<T> = Result<T, CniError>;

/// The environment of one invocation (`CNI_*`), read once so tests can build one.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`: `K=V;K2=V2`.
    pub args: String,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }

    /// `CNI_ARGS` as pairs; pieces without `=` are ignored, as libcni ignores them.
    pub fn cni_args(&self) -> BTreeMap<String, String> {
        self.args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    fn require(&self, name: &str, value: &str) -> CniResult<()> {
        if value.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!(
                    "{name} is not set: the runtime must give it for {}",
                    self.command
                ),
            ));
        }
        Ok(())
    }
}

/// One `portMappings` entry of `runtimeConfig` (the `portmap` capability).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

/// An entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network config on stdin. Unknown keys are allowed: runtimes add their own
/// (`runtimeConfig`, `args`, capabilities) and the spec says to ignore what one does
/// not use.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// netd's network; default: the config's `name`.
    #[serde(default)]
    pub network: Option<String>,
    /// netd's service; or `NETD_SERVICE` in `CNI_ARGS`.
    #[serde(default)]
    pub service: Option<String>,
    /// `unix:PATH` or `tcp:ADDR` of the daemon; default the daemon's default socket.
    #[serde(default)]
    pub api: Option<String>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> CniResult<NetConf> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("cannot decode the network config on stdin: {e}"),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "netd-cni does not speak CNI {:?}; it speaks {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if conf.kind != "netd" {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "this is the netd plugin, but the config's type is {:?}",
                    conf.kind
                ),
            ));
        }
        Ok(conf)
    }

    pub fn network(&self) -> &str {
        self.network.as_deref().unwrap_or(&self.name)
    }

    pub fn api(&self) -> &str {
        self.api.as_deref().unwrap_or(DEFAULT_API)
    }

    fn service(&self, env: &Env) -> CniResult<String> {
        self.service
            .clone()
            .or_else(|| env.cni_args().get("NETD_SERVICE").cloned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "network config {:?} names no netd service: add \"service\": \"NAME\" \
                         to it, or pass NETD_SERVICE=NAME in CNI_ARGS",
                        self.name
                    ),
                )
            })
    }

    /// `portMappings` as host-mode ports of the service. A host IP narrows nothing in
    /// netd (a host-mode port answers on every address of the node), so one other than
    /// "" / 0.0.0.0 is refused rather than silently widened.
    fn publish(&self) -> CniResult<Vec<PortSpec>> {
        self.runtime_config
            .port_mappings
            .iter()
            .map(|m| {
                let protocol = match m.protocol.as_deref().unwrap_or("tcp") {
                    p if p.eq_ignore_ascii_case("tcp") => Protocol::Tcp,
                    p if p.eq_ignore_ascii_case("udp") => Protocol::Udp,
                    other => {
                        return Err(CniError::new(
                            code::INVALID_CONFIG,
                            format!("portMappings: protocol {other:?} is not tcp or udp"),
                        ))
                    }
                };
                if let Some(ip) = m.host_ip.as_deref().filter(|ip| !ip.is_empty()) {
                    if ip != "0.0.0.0" {
                        return Err(CniError::new(
                            code::INVALID_CONFIG,
                            format!(
                                "portMappings: hostIP {ip} is not supported; netd publishes a \
                                 host-mode port on every address of the node"
                            ),
                        ));
                    }
                }
                Ok(PortSpec {
                    published: m.host_port,
                    target: m.container_port,
                    protocol,
                    mode: PublishMode::Host,
                })
            })
            .collect()
    }
}

/// Runs one invocation: what to print on stdout, and whether it succeeded.
pub fn run(env: &Env, stdin: &[u8]) -> (String, bool) {
    if env.command == "VERSION" {
        return (version_output(stdin).to_string(), true);
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => {
            // The error is written in the version the runtime asked for, if it said.
            let asked = serde_json::from_slice::<Value>(stdin)
                .ok()
                .and_then(|v| v["cniVersion"].as_str().map(String::from))
                .unwrap_or_else(|| "1.0.0".into());
            return (e.to_json(&asked).to_string(), false);
        }
    };
    let client = Client::new(conf.api());
    let outcome = match env.command.as_str() {
        "ADD" => add(&client, env, &conf).map(Some),
        "DEL" => del(&client, env, &conf).map(|_| None),
        "CHECK" => check(&client, env, &conf).map(|_| None),
        "STATUS" => status(&client, &conf).map(|_| None),
        "GC" => gc(&client, &conf).map(|_| None),
        "" => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set: netd-cni is run by a container runtime (ADD, DEL, \
             CHECK, STATUS, GC, VERSION)",
        )),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    };
    match outcome {
        Ok(Some(result)) => (result.to_string(), true),
        Ok(None) => (String::new(), true),
        Err(e) => (e.to_json(&conf.cni_version).to_string(), false),
    }
}

fn version_output(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".into());
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})
}

/// An API failure as a CNI error: an unreachable daemon is "try again later", the
/// daemon's refusals keep its sentence.
fn api_error(e: anyhow::Error, what: &str) -> CniError {
    match e.downcast_ref::<ApiError>() {
        Some(api) => {
            let code = match api.code.as_str() {
                "not_found" | "invalid_argument" | "invalid_json" | "unsupported" => {
                    code::INVALID_CONFIG
                }
                "busy" => code::TRY_AGAIN_LATER,
                "kernel" | "store" => code::KERNEL,
                _ => code::REFUSED,
            };
            CniError::new(code, format!("{what}: {}", api.message)).with_details(&api.code)
        }
        None => CniError::new(
            code::TRY_AGAIN_LATER,
            format!("{what}: netd is not reachable: {e:#}"),
        ),
    }
}

/// This node's name, as the daemon says it: attachments are per node.
fn node_name(client: &Client) -> CniResult<String> {
    let st = client
        .get("/v1/status")
        .map_err(|e| api_error(e, "ask netd for its status"))?;
    Ok(st["node"].as_str().unwrap_or_default().to_string())
}

/// This node's tasks that carry every label in `labels`.
fn tasks_labelled(
    client: &Client,
    node: &str,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<Value>> {
    let mut query = format!("/v1/tasks?node={}", encode_component(node));
    for (k, v) in labels {
        query.push_str(&format!("&label={}", encode_component(&format!("{k}={v}"))));
    }
    let v = client.get(&query)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn attachment_labels(env: &Env) -> BTreeMap<String, String> {
    QueuedDelete {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
    .labels()
}

fn add(client: &Client, env: &Env, conf: &NetConf) -> CniResult<Value> {
    env.require("CNI_CONTAINERID", &env.container_id)?;
    env.require("CNI_NETNS", &env.netns)?;
    env.require("CNI_IFNAME", &env.ifname)?;
    if !std::path::Path::new(&env.netns).exists() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "the container's network namespace {} does not exist",
                env.netns
            ),
        ));
    }
    let service = conf.service(env)?;
    let publish = conf.publish()?;
    let labels = attachment_labels(env);
    let mut all_labels = labels.clone();
    all_labels.insert(LABEL_NETWORK.into(), conf.name.clone());
    let args = env.cni_args();
    let name = args
        .get("NETD_TASK_NAME")
        .or_else(|| args.get("K8S_POD_NAME"))
        .filter(|n| crate::model::validate_dns_label("task", n).is_ok())
        .cloned();
    let attached = client.post(
        "/v1/tasks",
        &json!({
            "service": service,
            "netns": env.netns,
            "name": name,
            "network": conf.network(),
            "ifname": env.ifname,
            "labels": all_labels,
            "publish": publish,
        }),
    );
    let task = match attached {
        Ok(t) => t,
        // A runtime that retries an ADD it lost the answer to gets the same result; the
        // lookup happens only then, so a first ADD costs one request less.
        Err(e)
            if e.downcast_ref::<ApiError>()
                .is_some_and(|a| a.code == "conflict") =>
        {
            let node = node_name(client)?;
            let same = tasks_labelled(client, &node, &labels)
                .map_err(|e| api_error(e, "look up the attachment"))?
                .into_iter()
                .next();
            match same {
                Some(t) if t["netns"].as_str() == Some(env.netns.as_str()) => t,
                Some(t) => {
                    return Err(CniError::new(
                        code::REFUSED,
                        format!(
                            "container {} interface {} is already attached as task {} with \
                             netns {}; DEL it first",
                            env.container_id, env.ifname, t["name"], t["netns"]
                        ),
                    ))
                }
                None => return Err(api_error(e, &format!("attach to netd service {service:?}"))),
            }
        }
        Err(e) => return Err(api_error(e, &format!("attach to netd service {service:?}"))),
    };
    let search: Vec<String> =
        serde_json::from_value(task["dns"]["search"].clone()).unwrap_or_default();
    Ok(build_result(&conf.cni_version, env, &task, &search))
}

/// The ADD result the spec asks for, in `version`, from the task as the API shows it:
/// the task's interfaces (all inside the container), their addresses with gateways, the
/// default route, and netd's DNS.
pub fn build_result(version: &str, env: &Env, task: &Value, search: &[String]) -> Value {
    let legacy = version.starts_with("0.");
    let mut interfaces = vec![];
    let mut ips = vec![];
    for (i, ep) in task["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        interfaces.push(json!({
            "name": ep["ifname"],
            "mac": ep["mac"],
            "sandbox": env.netns,
        }));
        let mut ip = json!({
            "address": format!("{}/{}", ep["ip"].as_str().unwrap_or_default(), ep["prefix"]),
            "interface": i,
        });
        if let Some(gw) = ep["gateway"].as_str() {
            ip["gateway"] = json!(gw);
        }
        if legacy {
            ip["version"] = json!("4");
        }
        ips.push(ip);
    }
    let routes: Vec<Value> = task["default_gateway"]
        .as_str()
        .map(|gw| json!({"dst": "0.0.0.0/0", "gw": gw}))
        .into_iter()
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": {"nameservers": [NAMESERVER], "search": search},
    })
}

fn del(client: &Client, env: &Env, conf: &NetConf) -> CniResult<()> {
    env.require("CNI_CONTAINERID", &env.container_id)?;
    env.require("CNI_IFNAME", &env.ifname)?;
    let labels = attachment_labels(env);
    let found = node_name(client).and_then(|node| {
        tasks_labelled(client, &node, &labels).map_err(|e| api_error(e, "look up the attachment"))
    });
    let tasks = match found {
        Ok(t) => t,
        Err(e) if e.code == code::TRY_AGAIN_LATER => return queue_delete(env, conf, e),
        Err(e) => return Err(e),
    };
    for t in tasks {
        let id = t["id"].as_str().unwrap_or_default();
        match client.delete(&format!("/v1/tasks/{}", encode_component(id))) {
            Ok(_) => {}
            Err(e)
                if e.downcast_ref::<ApiError>()
                    .is_some_and(|a| a.status == 404) => {}
            Err(e) => {
                let e = api_error(e, &format!("detach task {}", t["name"]));
                if e.code == code::TRY_AGAIN_LATER {
                    return queue_delete(env, conf, e);
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// netd is down: leave the DEL for it to finish (see [`cni_queue`]) and succeed.
fn queue_delete(env: &Env, conf: &NetConf, why: CniError) -> CniResult<()> {
    let Some(dir) = cni_queue::queue_dir(conf.api()) else {
        return Err(why);
    };
    let del = QueuedDelete {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    cni_queue::enqueue(&dir, &del).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("netd is down and the DEL could not be queued for it: {e:#}"),
        )
    })?;
    Ok(())
}

fn the_attachment(client: &Client, env: &Env) -> CniResult<Value> {
    let node = node_name(client)?;
    tasks_labelled(client, &node, &attachment_labels(env))
        .map_err(|e| api_error(e, "look up the attachment"))?
        .into_iter()
        .next()
        .ok_or_else(|| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "netd has no attachment of container {} interface {}",
                    env.container_id, env.ifname
                ),
            )
        })
}

fn check(client: &Client, env: &Env, conf: &NetConf) -> CniResult<()> {
    env.require("CNI_CONTAINERID", &env.container_id)?;
    env.require("CNI_NETNS", &env.netns)?;
    env.require("CNI_IFNAME", &env.ifname)?;
    if conf.cni_version.starts_with("0.3") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "CHECK needs CNI 0.4.0 or later",
        ));
    }
    let task = the_attachment(client, env)?;
    if task["netns"].as_str() != Some(env.netns.as_str()) {
        return Err(CniError::new(
            code::NOT_AS_ADDED,
            format!(
                "the attachment was made for netns {}, not {}",
                task["netns"], env.netns
            ),
        ));
    }
    if let Some(prev) = &conf.prev_result {
        let want: BTreeSet<String> = prev["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str().map(String::from))
            .collect();
        let have: BTreeSet<String> = task["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|ep| format!("{}/{}", ep["ip"].as_str().unwrap_or_default(), ep["prefix"]))
            .collect();
        if let Some(missing) = want.difference(&have).next() {
            return Err(CniError::new(
                code::NOT_AS_ADDED,
                format!("prevResult has address {missing}, which the attachment does not hold"),
            ));
        }
    }
    let id = task["id"].as_str().unwrap_or_default();
    let report = client
        .get(&format!("/v1/tasks/{}/check", encode_component(id)))
        .map_err(|e| api_error(e, "check the attachment"))?;
    let problems: Vec<String> =
        serde_json::from_value(report["problems"].clone()).unwrap_or_default();
    if !problems.is_empty() {
        return Err(CniError::new(
            code::NOT_AS_ADDED,
            format!(
                "the container's network is not as ADD made it: {}",
                problems.join("; ")
            ),
        ));
    }
    Ok(())
}

/// Ready for an ADD: the daemon answers and the config's network exists.
fn status(client: &Client, conf: &NetConf) -> CniResult<()> {
    let unavailable = |e: CniError| CniError::new(code::NOT_AVAILABLE, e.msg);
    client
        .get("/v1/status")
        .map_err(|e| unavailable(api_error(e, "netd cannot take an ADD")))?;
    client
        .get(&format!(
            "/v1/networks/{}",
            encode_component(conf.network())
        ))
        .map_err(|e| {
            unavailable(api_error(
                e,
                &format!("netd cannot take an ADD on network {:?}", conf.network()),
            ))
        })?;
    Ok(())
}

/// Detaches this node's tasks made by this network config whose (container, interface)
/// the runtime no longer lists.
fn gc(client: &Client, conf: &NetConf) -> CniResult<()> {
    let valid: BTreeSet<(String, String)> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let node = node_name(client)?;
    let mine = BTreeMap::from([(LABEL_NETWORK.to_string(), conf.name.clone())]);
    let tasks =
        tasks_labelled(client, &node, &mine).map_err(|e| api_error(e, "list attachments"))?;
    for t in tasks {
        let label = |k: &str| t["labels"][k].as_str().unwrap_or_default().to_string();
        if valid.contains(&(label(LABEL_CONTAINER), label(LABEL_IFNAME))) {
            continue;
        }
        let id = t["id"].as_str().unwrap_or_default();
        match client.delete(&format!("/v1/tasks/{}", encode_component(id))) {
            Ok(_) => {}
            Err(e)
                if e.downcast_ref::<ApiError>()
                    .is_some_and(|a| a.status == 404) => {}
            Err(e) => return Err(api_error(e, &format!("detach stale task {}", t["name"]))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Env {
        Env {
            command: command.into(),
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAME=web-a;NETD_SERVICE=web".into(),
        }
    }

    fn conf(extra: Value) -> Vec<u8> {
        let mut v = json!({"cniVersion": "1.0.0", "name": "front", "type": "netd"});
        for (k, x) in extra.as_object().into_iter().flatten() {
            v[k] = x.clone();
        }
        v.to_string().into_bytes()
    }

    #[test]
    fn version_lists_every_spoken_version() {
        let (out, ok) = run(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#);
        assert!(ok);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        let versions: Vec<&str> = v["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for want in ["0.4.0", "1.0.0", "1.1.0"] {
            assert!(versions.contains(&want));
        }
    }

    #[test]
    fn bad_configs_get_the_specs_codes() {
        let (out, ok) = run(&env("ADD"), b"{not json");
        assert!(!ok);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], 6);
        let (out, ok) = run(&env("ADD"), &conf(json!({"cniVersion": "9.9.9"})));
        assert!(!ok);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (v["code"].as_u64(), v["cniVersion"].as_str()),
            (Some(1), Some("9.9.9"))
        );
        let (out, _) = run(&env("ADD"), &conf(json!({"type": "bridge"})));
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], 7);
        let (out, _) = run(&env("FROB"), &conf(json!({})));
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], 4);
    }

    #[test]
    fn missing_environment_is_code_4_before_any_api_call() {
        let mut e = env("ADD");
        e.netns.clear();
        // The API is a socket that does not exist: code 4 proves it was never asked.
        let body = conf(json!({"api": "unix:/nonexistent/netd.sock", "service": "web"}));
        let (out, ok) = run(&e, &body);
        assert!(!ok);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["code"], 4, "{v}");
        assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"));
    }

    #[test]
    fn service_comes_from_the_config_or_cni_args() {
        let c = NetConf::parse(&conf(json!({"service": "api"}))).unwrap();
        assert_eq!(c.service(&env("ADD")).unwrap(), "api");
        let c = NetConf::parse(&conf(json!({}))).unwrap();
        assert_eq!(c.service(&env("ADD")).unwrap(), "web");
        let mut e = env("ADD");
        e.args.clear();
        assert_eq!(c.service(&e).unwrap_err().code, code::INVALID_CONFIG);
        assert_eq!(c.network(), "front");
        assert_eq!(c.api(), DEFAULT_API);
    }

    #[test]
    fn port_mappings_become_host_mode_ports() {
        let c = NetConf::parse(&conf(json!({"runtimeConfig": {"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "UDP", "hostIP": ""}
        ]}})))
        .unwrap();
        let p = c.publish().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].published, p[0].target, p[0].protocol),
            (8080, 80, Protocol::Tcp)
        );
        assert_eq!(p[1].protocol, Protocol::Udp);
        assert!(p.iter().all(|p| p.mode == PublishMode::Host));
        let c = NetConf::parse(&conf(json!({"runtimeConfig": {"portMappings": [
            {"hostPort": 1, "containerPort": 2, "hostIP": "198.18.0.1"}]}})))
        .unwrap();
        assert_eq!(c.publish().unwrap_err().code, code::INVALID_CONFIG);
    }

    #[test]
    fn results_follow_the_requested_version() {
        let task = json!({
            "default_gateway": "198.18.1.1",
            "endpoints": [
                {"network": "front", "ip": "198.19.0.3", "prefix": 24, "mac": "02:42:c6:13:00:03", "ifname": "eth0", "gateway": "198.19.0.1"},
                {"network": "gwbridge", "ip": "198.18.1.2", "prefix": 24, "mac": "02:42:c6:12:01:02", "ifname": "eth1", "gateway": "198.18.1.1"}
            ]
        });
        let r = build_result("1.0.0", &env("ADD"), &task, &["lab.example".into()]);
        assert_eq!(r["interfaces"][0]["name"], "eth0");
        assert_eq!(r["interfaces"][0]["sandbox"], "/run/netns/x");
        assert_eq!(r["ips"][0]["address"], "198.19.0.3/24");
        assert_eq!(r["ips"][0]["gateway"], "198.19.0.1");
        assert_eq!(r["ips"][1]["interface"], 1);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(
            r["routes"][0],
            json!({"dst": "0.0.0.0/0", "gw": "198.18.1.1"})
        );
        assert_eq!(r["dns"]["nameservers"][0], "127.0.0.11");
        assert_eq!(r["dns"]["search"][0], "lab.example");
        let old = build_result("0.4.0", &env("ADD"), &task, &[]);
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["cniVersion"], "0.4.0");
    }

    #[test]
    fn cni_args_are_pairs() {
        let a = env("ADD").cni_args();
        assert_eq!(a["K8S_POD_NAME"], "web-a");
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn gc_reads_the_valid_attachments() {
        let c = NetConf::parse(&conf(json!({"cniVersion": "1.1.0",
            "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]})))
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }]
        );
    }
}
