//! The desired-state records netd keeps in its store, shared by the API, the CLI and the
//! reconciler. They are plain serde types so the store can hold them as JSON and the CLI
//! can print them without a second schema.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// Network drivers. `overlay` spans nodes over VXLAN; `bridge` is local to one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Overlay,
    Bridge,
}

impl Driver {
    pub fn as_str(&self) -> &'static str {
        match self {
            Driver::Overlay => "overlay",
            Driver::Bridge => "bridge",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub driver: Driver,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    /// VXLAN network identifier; only overlays have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    pub attachable: bool,
    pub internal: bool,
    pub created_at: u64,
    /// Its traffic between nodes goes through WireGuard (`--opt encrypted`; overlays
    /// only): see [`crate::wireguard`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    Vip,
    Dnsrr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    Ingress,
    Host,
}

/// A published port as Docker writes it: `PUB:TARGET[/proto][,mode=ingress|host]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub published: u16,
    pub target: u16,
    pub protocol: Protocol,
    pub mode: PublishMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub name: String,
    /// Network names, in the order the user gave them (the first is the task's eth0).
    pub networks: Vec<String>,
    pub endpoint_mode: EndpointMode,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub publish: Vec<PortSpec>,
    /// One virtual IP per network (vip mode only), keyed by network name.
    #[serde(default)]
    pub vips: BTreeMap<String, Ipv4Addr>,
    pub created_at: u64,
    /// How the node that runs each task probes it; none: a task is in service as soon
    /// as its interfaces work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
}

/// A service's health check (`--health-cmd`). A task with one is out of new picks and
/// DNS answers until its first probe succeeds, and again after `retries` probes in a
/// row failed, `interval` seconds apart; one success brings it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `tcp:PORT` (a TCP connect) or `http:PORT/PATH` (a GET answered 2xx or 3xx).
    pub cmd: String,
    #[serde(default = "HealthCheck::default_interval")]
    pub interval: u64,
    #[serde(default = "HealthCheck::default_retries")]
    pub retries: u32,
}

/// What a health check asks, parsed from [`HealthCheck::cmd`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp { port: u16 },
    Http { port: u16, path: String },
}

impl HealthCheck {
    pub const MAX_INTERVAL: u64 = 3600;
    pub const MAX_RETRIES: u32 = 100;

    fn default_interval() -> u64 {
        5
    }

    fn default_retries() -> u32 {
        3
    }

    /// The probe, or why the check is not one netd can run.
    pub fn probe(&self) -> Result<Probe, String> {
        if !(1..=Self::MAX_INTERVAL).contains(&self.interval) {
            return Err(format!(
                "health interval {} s must be 1 to {} s",
                self.interval,
                Self::MAX_INTERVAL
            ));
        }
        if !(1..=Self::MAX_RETRIES).contains(&self.retries) {
            return Err(format!(
                "health retries {} must be 1 to {}",
                self.retries,
                Self::MAX_RETRIES
            ));
        }
        let bad = || {
            format!(
                "health check {:?} must be tcp:PORT or http:PORT/PATH",
                self.cmd
            )
        };
        let (kind, rest) = self.cmd.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
        match kind {
            "tcp" => Ok(Probe::Tcp { port: port(rest)? }),
            "http" => {
                let (p, path) = rest.split_once('/').unwrap_or((rest, ""));
                let path = format!("/{path}");
                if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    return Err(bad());
                }
                Ok(Probe::Http {
                    port: port(p)?,
                    path,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// One interface of a task: on a service network or on the node's gwbridge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Short random id; every kernel object of this endpoint is named after it.
    pub id: String,
    /// Network name, or [`GWBRIDGE`] for the egress interface.
    pub network: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: String,
    /// Interface name inside the task netns (eth0, eth1, ...).
    pub ifname: String,
}

/// The pseudo network name of a task's egress endpoint on the node-local gwbridge.
pub const GWBRIDGE: &str = "gwbridge";

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub name: String,
    pub service: String,
    pub node: String,
    pub netns: String,
    pub endpoints: Vec<Endpoint>,
    /// Gateway of the default route set in the task, if it has egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_gateway: Option<Ipv4Addr>,
    /// Who asked for the task and why, as the front ends record it (a CNI attachment's
    /// container id and interface, a Docker endpoint id): the only state they keep.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The runtime moves the first endpoint's task side into the namespace itself, which
    /// may not exist yet (Docker moves a plugin's interface when the container starts):
    /// netd leaves that side in the node's namespace, keeps whatever name the runtime
    /// gives it, and builds the rest once the namespace is there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
    pub created_at: u64,
    /// Set by a graceful detach (`task detach --drain`): the task is out of new picks
    /// and DNS answers on every node, its established connections and UDP flows keep
    /// working, and its node removes it once they are gone or at the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining: Option<Drain>,
}

/// A drain under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Drain {
    /// When it began (seconds since the epoch).
    pub since: u64,
    /// When the task is removed whatever its connections (seconds since the epoch).
    pub until: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub address: Option<Ipv4Addr>,
    pub gwbridge_subnet: Ipv4Network,
    pub started_at: u64,
    /// The node's datapath translates client addresses to an address of its own on each
    /// overlay (the userspace datapath does): attaches to it reserve one per network.
    #[serde(default)]
    pub lb_addresses: bool,
    /// The node's WireGuard public key (base64), for encrypted overlays: the other
    /// nodes seal what they send it with it. None: the node has no key (its daemon
    /// could not read or write one); a key does not mean its WireGuard runs (`netd
    /// status` on that node says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The key the node is rotating to (`netd node rotate-key`), while it rotates: the
    /// other nodes open a second session to it and move their traffic there, and the
    /// node makes it its `public_key` once they have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    /// The port the node's WireGuard listens on (its `--wireguard-port`), with its
    /// key: the other nodes send there. None from a netd before this field: the other
    /// nodes assume their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_port: Option<u16>,
}

/// Why a name was refused; the text goes to the user as is.
pub fn validate_dns_label(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "{kind} name {name:?} must be 1 to 63 characters long (a DNS label)"
        ));
    }
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "{kind} name {name:?} is not a DNS label: use letters, digits and '-', \
             not starting or ending with '-'"
        ));
    }
    Ok(())
}

/// Why an identifier a front end chose was refused (a reservation's owner such as
/// `docker:ENDPOINT`, a binding's front end and id): 1 to 200 letters, digits, '-', '_',
/// '.' or ':', so that it can never split a store key or smuggle a path.
pub fn validate_token(kind: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 200
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} {value:?} must be 1 to 200 letters, digits, '-', '_', '.' or ':'"
        ))
    }
}

/// Why an interface name was refused: the kernel takes 1 to 15 bytes without '/', ':'
/// or white space, and `lo` is every namespace's own.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name == "lo"
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || !b.is_ascii_graphic());
    if bad {
        return Err(format!(
            "interface name {name:?} is not usable: 1 to 15 printable characters without \
             '/', ':' or spaces, and not \"lo\""
        ));
    }
    Ok(())
}

/// Why a label was refused: keys are short printable words (`cni.container_id`), values
/// any text of reasonable size, and a task carries a bounded number of them.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > 32 {
        return Err(format!(
            "a task takes at most 32 labels, got {}",
            labels.len()
        ));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 128
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if !key_ok {
            return Err(format!(
                "label key {k:?} must be 1 to 128 characters of letters, digits, '.', '_',                  '-' or '/'"
            ));
        }
        if v.len() > 1024 || v.chars().any(char::is_control) {
            return Err(format!(
                "label {k:?}: the value must be at most 1024 characters without control                  characters"
            ));
        }
    }
    Ok(())
}

/// Docker derives a task's MAC from its IP (02:42 + the four address bytes), so the MAC is
/// stable across restarts and remote nodes can program neighbour entries without asking.
pub fn mac_for_ip(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `PUB:TARGET[/tcp|/udp][,mode=ingress|host]`.
pub fn parse_publish(spec: &str) -> Result<PortSpec, String> {
    let mut parts = spec.split(',');
    let ports = parts.next().unwrap_or_default();
    let mut mode = PublishMode::Ingress;
    for opt in parts {
        mode = match opt {
            "mode=ingress" => PublishMode::Ingress,
            "mode=host" => PublishMode::Host,
            other => return Err(format!("publish {spec:?}: unknown option {other:?}")),
        };
    }
    let (ports, protocol) = match ports.split_once('/') {
        None => (ports, Protocol::Tcp),
        Some((p, "tcp")) => (p, Protocol::Tcp),
        Some((p, "udp")) => (p, Protocol::Udp),
        Some((_, other)) => {
            return Err(format!(
                "publish {spec:?}: protocol must be tcp or udp, not {other:?}"
            ))
        }
    };
    let (published, target) = ports
        .split_once(':')
        .ok_or_else(|| format!("publish {spec:?}: expected PUBLISHED:TARGET"))?;
    let port = |s: &str, what: &str| -> Result<u16, String> {
        match s.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err(format!(
                "publish {spec:?}: {what} port {s:?} must be a number from 1 to 65535"
            )),
        }
    };
    Ok(PortSpec {
        published: port(published, "published")?,
        target: port(target, "target")?,
        protocol,
        mode,
    })
}

/// Seconds since the epoch, for `created_at` fields.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random lowercase hex id of `len` characters.
pub fn random_id(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for ok in ["eth0", "net1", "a", "x-y_z.0", &"e".repeat(15)] {
            assert!(validate_ifname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "lo",
            ".",
            "..",
            "a/b",
            "a:1",
            "a b",
            &"e".repeat(16),
            "é",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels() {
        let one = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(validate_labels(&one("cni.container_id", "abc")).is_ok());
        assert!(validate_labels(&one("a/b-c_d", "")).is_ok());
        assert!(validate_labels(&one("", "x")).is_err());
        assert!(validate_labels(&one("a b", "x")).is_err());
        assert!(validate_labels(&one("k", "line\nbreak")).is_err());
        assert!(validate_labels(&one("k", &"v".repeat(1025))).is_err());
        let many = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_labels(&many).is_err());
    }

    #[test]
    fn dns_labels() {
        for ok in ["web", "a", "web-1", "A1b2", &"x".repeat(63)] {
            assert!(validate_dns_label("service", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-web",
            "web-",
            "we_b",
            "web.1",
            "wéb",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(validate_dns_label("service", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn front_end_tokens() {
        for ok in ["docker:0123abcd", "cni", "ep_1.a-b", &"x".repeat(200)] {
            assert!(validate_token("owner", ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "../x", "a b", "a\nb", "wé", &"x".repeat(201)] {
            assert!(validate_token("owner", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn publish_specs() {
        let p = parse_publish("4567:80").unwrap();
        assert_eq!((p.published, p.target), (4567, 80));
        assert_eq!(p.protocol, Protocol::Tcp);
        assert_eq!(p.mode, PublishMode::Ingress);
        let p = parse_publish("53:5353/udp,mode=host").unwrap();
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(p.mode, PublishMode::Host);
        for bad in [
            "80",
            "0:80",
            "80:0",
            "70000:80",
            "80:80/sctp",
            "80:80,mode=x",
            "a:b",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mac_from_ip() {
        let mac = mac_for_ip(Ipv4Addr::new(198, 19, 0, 2));
        assert_eq!(format_mac(&mac), "02:42:c6:13:00:02");
    }
}
