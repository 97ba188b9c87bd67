//! The record table: what the embedded DNS knows, indexed per network, changed one service
//! or task at a time as the store changes. Every answer is scoped: a querier sees only
//! the networks it is attached to, and a name it cannot see is NXDOMAIN, exactly as a
//! name that does not exist.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How a service answers its own name: its VIP, or its task IPs (DNS round-robin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Vip,
    Dnsrr,
}

/// A port a service publishes, found with SRV `_PORT._PROTO.SERVICE` (PORT is the target
/// port: the one the tasks listen on, reached at the service's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub port: u16,
    pub udp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    pub name: String,
    pub aliases: Vec<String>,
    pub mode: Mode,
    /// Every network the service is on, with its VIP there (None in dnsrr mode).
    pub networks: Vec<(String, Option<Ipv4Addr>)>,
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub id: String,
    pub name: String,
    pub service: String,
    /// The task's address on each of its networks, in attach order.
    pub addrs: Vec<(String, Ipv4Addr)>,
    /// Whether it is among its service's answers (`tasks.NAME`, a dnsrr service's
    /// name); a task being drained is not, though its own name still resolves.
    pub serving: bool,
}

/// Answer TTLs: a VIP is stable for the service's life; task IPs come and go.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    pub vip: u32,
    pub task: u32,
}

impl Default for Ttls {
    fn default() -> Self {
        Ttls { vip: 600, task: 2 }
    }
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The name exists for this querier: its A records (maybe none for another type).
    Addrs { ips: Vec<Ipv4Addr>, ttl: u32 },
    /// A reverse name that resolves to this name.
    Ptr { name: String, ttl: u32 },
    /// SRV: (port, target name) for the service, plus the target's addresses.
    Srv {
        port: u16,
        target: String,
        ips: Vec<Ipv4Addr>,
        ttl: u32,
    },
    /// Not a name this querier may see, and not one to ask upstream about.
    NxDomain,
    /// Not ours: ask the upstream resolvers.
    Forward,
}

#[derive(Debug, Default)]
struct NetIndex {
    /// Lower-case service name or alias -> service name.
    service_names: HashMap<String, String>,
    /// Service name -> its VIP on this network.
    vips: HashMap<String, Ipv4Addr>,
    /// Service name -> its tasks' addresses on this network, by task id.
    members: HashMap<String, BTreeMap<String, Ipv4Addr>>,
    /// Lower-case task name -> address.
    tasks: HashMap<String, Ipv4Addr>,
    /// Address (VIP or task IP) -> name, for PTR.
    ptr: HashMap<Ipv4Addr, String>,
}

#[derive(Debug, Default)]
pub struct Table {
    ttls: Ttls,
    services: HashMap<String, ServiceRecord>,
    tasks: HashMap<String, TaskRecord>,
    nets: HashMap<String, NetIndex>,
    /// Search domains of the node: `NAME.DOMAIN` of a cluster name is answered here
    /// (NXDOMAIN), never asked upstream, so cluster names do not leak.
    search: Vec<String>,
    /// Rotates multi-address answers, one step per answer.
    rotation: AtomicUsize,
    /// Bumped by every change: answers cached under an older value are stale.
    generation: u64,
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

impl Table {
    pub fn new(ttls: Ttls, search: Vec<String>) -> Self {
        Table {
            ttls,
            search: search
                .into_iter()
                .map(|s| lower(s.trim_end_matches('.')))
                .collect(),
            ..Table::default()
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn service_names(&self) -> impl Iterator<Item = &String> {
        self.services.keys()
    }

    pub fn task_ids(&self) -> impl Iterator<Item = &String> {
        self.tasks.keys()
    }

    /// The networks of task `id`, in its attach order: what it may see.
    pub fn networks_of(&self, id: &str) -> Vec<String> {
        self.tasks
            .get(id)
            .map(|t| t.addrs.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default()
    }

    pub fn upsert_service(&mut self, rec: ServiceRecord) {
        if self.services.get(&rec.name) == Some(&rec) {
            return;
        }
        self.remove_service(&rec.name);
        self.generation += 1;
        for (net, vip) in &rec.networks {
            let idx = self.nets.entry(net.clone()).or_default();
            for n in std::iter::once(&rec.name).chain(&rec.aliases) {
                idx.service_names.insert(lower(n), rec.name.clone());
            }
            if let Some(vip) = vip {
                idx.vips.insert(rec.name.clone(), *vip);
                idx.ptr.insert(*vip, rec.name.clone());
            }
        }
        self.services.insert(rec.name.clone(), rec);
    }

    pub fn remove_service(&mut self, name: &str) {
        let Some(old) = self.services.remove(name) else {
            return;
        };
        self.generation += 1;
        for (net, vip) in &old.networks {
            if let Some(idx) = self.nets.get_mut(net) {
                for n in std::iter::once(&old.name).chain(&old.aliases) {
                    if idx.service_names.get(&lower(n)) == Some(&old.name) {
                        idx.service_names.remove(&lower(n));
                    }
                }
                idx.vips.remove(&old.name);
                if let Some(vip) = vip {
                    if idx.ptr.get(vip) == Some(&old.name) {
                        idx.ptr.remove(vip);
                    }
                }
            }
        }
    }

    pub fn upsert_task(&mut self, rec: TaskRecord) {
        if self.tasks.get(&rec.id) == Some(&rec) {
            return;
        }
        self.remove_task(&rec.id);
        self.generation += 1;
        for (net, ip) in &rec.addrs {
            let idx = self.nets.entry(net.clone()).or_default();
            idx.tasks.insert(lower(&rec.name), *ip);
            idx.ptr.insert(*ip, rec.name.clone());
            if rec.serving {
                idx.members
                    .entry(rec.service.clone())
                    .or_default()
                    .insert(rec.id.clone(), *ip);
            }
        }
        self.tasks.insert(rec.id.clone(), rec);
    }

    pub fn remove_task(&mut self, id: &str) {
        let Some(old) = self.tasks.remove(id) else {
            return;
        };
        self.generation += 1;
        for (net, ip) in &old.addrs {
            if let Some(idx) = self.nets.get_mut(net) {
                if idx.tasks.get(&lower(&old.name)) == Some(ip) {
                    idx.tasks.remove(&lower(&old.name));
                }
                if idx.ptr.get(ip) == Some(&old.name) {
                    idx.ptr.remove(ip);
                }
                if let Some(m) = idx.members.get_mut(&old.service) {
                    m.remove(&old.id);
                    if m.is_empty() {
                        idx.members.remove(&old.service);
                    }
                }
            }
        }
    }

    /// Rotates `ips` by one more step than the previous answer did.
    fn rotated(&self, mut ips: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
        if ips.len() > 1 {
            let n = self.rotation.fetch_add(1, Ordering::Relaxed) % ips.len();
            ips.rotate_left(n);
        }
        ips
    }

    /// Whether `name` (lower case, no trailing dot) belongs to the cluster's name space:
    /// single labels, `tasks.`, `*.NETWORK`, and any of those under a search domain.
    fn is_cluster_form(&self, name: &str) -> bool {
        let core = self
            .search
            .iter()
            .find_map(|d| {
                name.strip_suffix(d.as_str())
                    .and_then(|head| head.strip_suffix('.'))
                    .filter(|head| !head.is_empty())
            })
            .unwrap_or(name);
        !core.contains('.')
            || core.starts_with("tasks.")
            || core
                .rsplit_once('.')
                .is_some_and(|(_, last)| self.nets.contains_key(last))
    }

    /// Resolves `name` (any case, with or without the trailing dot) for a querier on
    /// `networks` (its attach order decides which network answers when several do).
    pub fn lookup_name(&self, networks: &[String], name: &str) -> Lookup {
        let name = lower(name.trim_end_matches('.'));
        if let Some(ptr) = name.strip_suffix(".in-addr.arpa") {
            return self.lookup_ptr(networks, ptr);
        }
        // `NAME.NETWORK`: only that network, if the querier is on it.
        let (base, scope): (&str, Vec<&String>) = match name.rsplit_once('.') {
            Some((head, net)) if networks.iter().any(|n| lower(n) == net) => {
                (head, networks.iter().filter(|n| lower(n) == net).collect())
            }
            _ => (&name, networks.iter().collect()),
        };
        for net in scope {
            let Some(idx) = self.nets.get(net) else {
                continue;
            };
            if let Some(svc) = base.strip_prefix("tasks.") {
                if let Some(svc) = idx.service_names.get(svc) {
                    let ips = idx
                        .members
                        .get(svc)
                        .map(|m| m.values().copied().collect())
                        .unwrap_or_default();
                    return Lookup::Addrs {
                        ips: self.rotated(ips),
                        ttl: self.ttls.task,
                    };
                }
                continue;
            }
            if let Some(svc) = idx.service_names.get(base) {
                return self.service_addrs(idx, svc);
            }
            if let Some(ip) = idx.tasks.get(base) {
                return Lookup::Addrs {
                    ips: vec![*ip],
                    ttl: self.ttls.task,
                };
            }
        }
        if self.is_cluster_form(&name) {
            Lookup::NxDomain
        } else {
            Lookup::Forward
        }
    }

    fn service_addrs(&self, idx: &NetIndex, svc: &str) -> Lookup {
        let rec = self.services.get(svc);
        match (rec.map(|r| r.mode), idx.vips.get(svc)) {
            (Some(Mode::Vip), Some(vip)) => Lookup::Addrs {
                ips: vec![*vip],
                ttl: self.ttls.vip,
            },
            _ => {
                let ips = idx
                    .members
                    .get(svc)
                    .map(|m| m.values().copied().collect())
                    .unwrap_or_default();
                Lookup::Addrs {
                    ips: self.rotated(ips),
                    ttl: self.ttls.task,
                }
            }
        }
    }

    /// `_PORT._PROTO.SERVICE`: the service's name as target, with the port.
    pub fn lookup_srv(&self, networks: &[String], name: &str) -> Lookup {
        let name = lower(name.trim_end_matches('.'));
        let mut labels = name.splitn(3, '.');
        let (Some(port), Some(proto), Some(rest)) = (labels.next(), labels.next(), labels.next())
        else {
            return self.lookup_name(networks, &name);
        };
        let (Some(port), Some(udp)) = (
            port.strip_prefix('_').and_then(|p| p.parse::<u16>().ok()),
            match proto {
                "_tcp" => Some(false),
                "_udp" => Some(true),
                _ => None,
            },
        ) else {
            return self.lookup_name(networks, &name);
        };
        match self.lookup_name(networks, rest) {
            Lookup::Addrs { ips, ttl } => {
                let svc = networks
                    .iter()
                    .filter_map(|n| self.nets.get(n))
                    .find_map(|idx| idx.service_names.get(rest.trim_end_matches('.')))
                    .and_then(|s| self.services.get(s));
                match svc {
                    Some(s) if s.ports.contains(&Port { port, udp }) => Lookup::Srv {
                        port,
                        target: rest.to_string(),
                        ips,
                        ttl,
                    },
                    // The name exists, but publishes no such port: no SRV records.
                    _ => Lookup::Addrs { ips: vec![], ttl },
                }
            }
            other => other,
        }
    }

    fn lookup_ptr(&self, networks: &[String], reversed: &str) -> Lookup {
        let octets: Vec<u8> = reversed
            .split('.')
            .rev()
            .filter_map(|o| o.parse().ok())
            .collect();
        let Ok(octets) = <[u8; 4]>::try_from(octets.as_slice()) else {
            return Lookup::NxDomain;
        };
        let ip = Ipv4Addr::from(octets);
        for net in networks {
            if let Some(name) = self.nets.get(net).and_then(|i| i.ptr.get(&ip)) {
                let ttl = if self.services.contains_key(name) {
                    self.ttls.vip
                } else {
                    self.ttls.task
                };
                return Lookup::Ptr {
                    name: name.clone(),
                    ttl,
                };
            }
        }
        // An address of the cluster the querier may not see stays unanswered here.
        if self.nets.values().any(|i| i.ptr.contains_key(&ip)) {
            Lookup::NxDomain
        } else {
            Lookup::Forward
        }
    }

    /// Names the table holds, per network (for status output and tests).
    pub fn names_on(&self, net: &str) -> BTreeSet<String> {
        self.nets
            .get(net)
            .map(|i| {
                i.service_names
                    .keys()
                    .chain(i.tasks.keys())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn nets(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn table() -> Table {
        let mut t = Table::new(Ttls { vip: 600, task: 2 }, vec!["lab.example.".into()]);
        t.upsert_service(ServiceRecord {
            name: "web".into(),
            aliases: vec!["www".into()],
            mode: Mode::Vip,
            networks: vec![("front".into(), Some(ip("198.19.10.2")))],
            ports: vec![Port {
                port: 80,
                udp: false,
            }],
        });
        t.upsert_service(ServiceRecord {
            name: "db".into(),
            aliases: vec![],
            mode: Mode::Dnsrr,
            networks: vec![("back".into(), None)],
            ports: vec![],
        });
        for (id, name, svc, net, addr) in [
            ("t1", "web-1", "web", "front", "198.19.10.3"),
            ("t2", "web-2", "web", "front", "198.19.10.4"),
            ("t3", "db-1", "db", "back", "198.19.20.3"),
            ("t4", "db-2", "db", "back", "198.19.20.4"),
        ] {
            t.upsert_task(TaskRecord {
                id: id.into(),
                name: name.into(),
                service: svc.into(),
                addrs: vec![(net.into(), ip(addr))],
                serving: true,
            });
        }
        t
    }

    fn addrs(l: Lookup) -> Vec<Ipv4Addr> {
        match l {
            Lookup::Addrs { mut ips, .. } => {
                ips.sort();
                ips
            }
            other => panic!("expected addresses, got {other:?}"),
        }
    }

    #[test]
    fn services_tasks_and_aliases_resolve_on_shared_networks_only() {
        let t = table();
        let front = nets(&["front"]);
        assert_eq!(
            t.lookup_name(&front, "web"),
            Lookup::Addrs {
                ips: vec![ip("198.19.10.2")],
                ttl: 600
            }
        );
        assert_eq!(
            addrs(t.lookup_name(&front, "WWW.")),
            vec![ip("198.19.10.2")]
        );
        assert_eq!(
            addrs(t.lookup_name(&front, "tasks.web")),
            vec![ip("198.19.10.3"), ip("198.19.10.4")]
        );
        assert_eq!(
            addrs(t.lookup_name(&front, "web-2")),
            vec![ip("198.19.10.4")]
        );
        assert_eq!(
            addrs(t.lookup_name(&front, "web.front")),
            vec![ip("198.19.10.2")]
        );
        // Not on `back`: db does not exist for this querier, and is not forwarded.
        for n in [
            "db",
            "tasks.db",
            "db-1",
            "db.back",
            "web.back",
            "db.lab.example",
        ] {
            assert_eq!(t.lookup_name(&front, n), Lookup::NxDomain, "{n}");
        }
        // Other names go upstream; single labels never do.
        assert_eq!(t.lookup_name(&front, "example.org."), Lookup::Forward);
        // A search-domain form of an outside name is an outside name.
        assert_eq!(
            t.lookup_name(&front, "example.org.lab.example"),
            Lookup::Forward
        );
        assert_eq!(t.lookup_name(&front, "nosuch"), Lookup::NxDomain);
    }

    #[test]
    fn a_task_out_of_service_leaves_its_services_answers_but_keeps_its_name() {
        let mut t = table();
        let (front, back) = (nets(&["front"]), nets(&["back"]));
        let gen = t.generation();
        for (id, name, svc, net, addr) in [
            ("t2", "web-2", "web", "front", "198.19.10.4"),
            ("t4", "db-2", "db", "back", "198.19.20.4"),
        ] {
            t.upsert_task(TaskRecord {
                id: id.into(),
                name: name.into(),
                service: svc.into(),
                addrs: vec![(net.into(), ip(addr))],
                serving: false,
            });
        }
        assert!(t.generation() > gen, "cached answers must go");
        assert_eq!(
            addrs(t.lookup_name(&front, "tasks.web")),
            vec![ip("198.19.10.3")]
        );
        assert_eq!(addrs(t.lookup_name(&back, "db")), vec![ip("198.19.20.3")]);
        assert_eq!(
            addrs(t.lookup_name(&front, "web-2")),
            vec![ip("198.19.10.4")]
        );
        // Back in service: back in the answers.
        t.upsert_task(TaskRecord {
            id: "t2".into(),
            name: "web-2".into(),
            service: "web".into(),
            addrs: vec![("front".into(), ip("198.19.10.4"))],
            serving: true,
        });
        assert_eq!(
            addrs(t.lookup_name(&front, "tasks.web")),
            vec![ip("198.19.10.3"), ip("198.19.10.4")]
        );
    }

    #[test]
    fn dnsrr_answers_every_task_and_rotates() {
        let t = table();
        let back = nets(&["back"]);
        let first = t.lookup_name(&back, "db");
        let second = t.lookup_name(&back, "db");
        assert_ne!(first, second, "the order must rotate between answers");
        assert_eq!(addrs(first), vec![ip("198.19.20.3"), ip("198.19.20.4")]);
        assert!(matches!(second, Lookup::Addrs { ttl: 2, .. }));
    }

    #[test]
    fn ptr_answers_vips_and_tasks_in_scope() {
        let t = table();
        let front = nets(&["front"]);
        assert_eq!(
            t.lookup_name(&front, "2.10.19.198.in-addr.arpa."),
            Lookup::Ptr {
                name: "web".into(),
                ttl: 600
            }
        );
        assert_eq!(
            t.lookup_name(&front, "3.10.19.198.in-addr.arpa"),
            Lookup::Ptr {
                name: "web-1".into(),
                ttl: 2
            }
        );
        assert_eq!(
            t.lookup_name(&front, "3.20.19.198.in-addr.arpa"),
            Lookup::NxDomain
        );
        assert_eq!(
            t.lookup_name(&front, "8.8.8.8.in-addr.arpa"),
            Lookup::Forward
        );
    }

    #[test]
    fn srv_finds_published_ports() {
        let t = table();
        let front = nets(&["front"]);
        assert_eq!(
            t.lookup_srv(&front, "_80._tcp.web."),
            Lookup::Srv {
                port: 80,
                target: "web".into(),
                ips: vec![ip("198.19.10.2")],
                ttl: 600
            }
        );
        assert_eq!(
            addrs(t.lookup_srv(&front, "_81._tcp.web")),
            Vec::<Ipv4Addr>::new()
        );
        assert_eq!(
            addrs(t.lookup_srv(&front, "_80._udp.web")),
            Vec::<Ipv4Addr>::new()
        );
        assert_eq!(t.lookup_srv(&front, "_80._tcp.db"), Lookup::NxDomain);
    }

    #[test]
    fn removals_take_names_away() {
        let mut t = table();
        let front = nets(&["front"]);
        t.remove_task("t1");
        assert_eq!(
            addrs(t.lookup_name(&front, "tasks.web")),
            vec![ip("198.19.10.4")]
        );
        assert_eq!(t.lookup_name(&front, "web-1"), Lookup::NxDomain);
        t.remove_task("t2");
        assert_eq!(
            addrs(t.lookup_name(&front, "tasks.web")),
            Vec::<Ipv4Addr>::new()
        );
        t.remove_service("web");
        assert_eq!(t.lookup_name(&front, "web"), Lookup::NxDomain);
        assert_eq!(t.lookup_name(&front, "www"), Lookup::NxDomain);
        assert_eq!(
            t.lookup_name(&front, "2.10.19.198.in-addr.arpa"),
            Lookup::Forward
        );
        assert!(t.names_on("front").is_empty());
    }

    #[test]
    fn a_querier_on_two_networks_gets_its_first_networks_answer() {
        let mut t = table();
        t.upsert_service(ServiceRecord {
            name: "web".into(),
            aliases: vec![],
            mode: Mode::Vip,
            networks: vec![
                ("front".into(), Some(ip("198.19.10.2"))),
                ("back".into(), Some(ip("198.19.20.2"))),
            ],
            ports: vec![],
        });
        assert_eq!(
            addrs(t.lookup_name(&nets(&["back", "front"]), "web")),
            vec![ip("198.19.20.2")]
        );
        assert_eq!(
            addrs(t.lookup_name(&nets(&["back", "front"]), "web.front")),
            vec![ip("198.19.10.2")]
        );
    }
}
