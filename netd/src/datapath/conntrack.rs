//! The userspace datapath's connection tracking: one table per overlay network on this
//! node. A flow from a client to a VIP gets a backend (round-robin, chosen by the
//! caller) and a port on the node's load-balancer address; answers from the backend to
//! that port are translated back. Entries expire when idle (per protocol and TCP state).
//!
//! Every new and removed entry is appended to a journal file (fixed 24-byte records) in
//! /run, so a netd restarted after `kill -9` translates the established flows as before:
//! the page cache keeps what a dead process wrote. The journal is compacted on load.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::nat::{Flow, TCP, UDP};

/// Idle timeouts in seconds.
pub const TCP_SYN_TIMEOUT: u64 = 30;
/// Longer than IPVS's 900 s, whose expiry under idle connections is one of Swarm's weak
/// spots.
pub const TCP_ESTABLISHED_TIMEOUT: u64 = 7200;
pub const TCP_CLOSING_TIMEOUT: u64 = 10;
pub const UDP_TIMEOUT: u64 = 60;

/// First port handed out on the load-balancer address (below are the well-known ports).
const FIRST_PORT: u16 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FwdKey {
    pub proto: u8,
    pub client: Ipv4Addr,
    pub cport: u16,
    pub vip: Ipv4Addr,
    pub vport: u16,
}

/// How an answer is recognised: the backend it comes from and the port it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RevKey {
    proto: u8,
    backend: Ipv4Addr,
    bport: u16,
    lport: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpState {
    SynSent,
    Established,
    Closing,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    backend: Ipv4Addr,
    lport: u16,
    state: TcpState,
    fin_out: bool,
    fin_in: bool,
    last_seen: u64,
}

impl Entry {
    fn timeout(&self, proto: u8) -> u64 {
        match (proto, self.state) {
            (UDP, _) => UDP_TIMEOUT,
            (_, TcpState::SynSent) => TCP_SYN_TIMEOUT,
            (_, TcpState::Established) => TCP_ESTABLISHED_TIMEOUT,
            (_, TcpState::Closing) => TCP_CLOSING_TIMEOUT,
        }
    }

    fn rev(&self, k: &FwdKey) -> RevKey {
        RevKey {
            proto: k.proto,
            backend: self.backend,
            bport: k.vport,
            lport: self.lport,
        }
    }

    fn see_flags(&mut self, f: &Flow, outbound: bool) {
        if f.proto != TCP {
            return;
        }
        if f.rst {
            self.state = TcpState::Closing;
            return;
        }
        if f.fin {
            if outbound {
                self.fin_out = true;
            } else {
                self.fin_in = true;
            }
        }
        if self.fin_out && self.fin_in {
            self.state = TcpState::Closing;
        } else if !outbound && self.state == TcpState::SynSent {
            self.state = TcpState::Established;
        }
    }
}

/// What to do with a packet from a client to a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Send it from `lb:lport` to `backend:vport`; `new` when this packet opened the flow.
    Translate {
        backend: Ipv4Addr,
        lport: u16,
        new: bool,
    },
    /// The VIP has no backend: refuse.
    NoBackend,
    /// Mid-connection packet of a flow nobody knows, or no port left: drop.
    Drop,
}

#[derive(Default)]
pub struct Conntrack {
    fwd: HashMap<FwdKey, Entry>,
    rev: HashMap<RevKey, FwdKey>,
    next_port: u16,
    journal: Option<(PathBuf, File)>,
}

const RECORD: usize = 24;
const ADD: u8 = 1;
const DEL: u8 = 2;

fn encode(kind: u8, k: &FwdKey, e: &Entry) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0] = kind;
    r[1] = k.proto;
    r[2..4].copy_from_slice(&k.cport.to_be_bytes());
    r[4..8].copy_from_slice(&k.client.octets());
    r[8..12].copy_from_slice(&k.vip.octets());
    r[12..14].copy_from_slice(&k.vport.to_be_bytes());
    r[14..16].copy_from_slice(&e.lport.to_be_bytes());
    r[16..20].copy_from_slice(&e.backend.octets());
    r[20..24].copy_from_slice(&(e.last_seen as u32).to_be_bytes());
    r
}

fn decode(r: &[u8]) -> Option<(u8, FwdKey, Entry)> {
    let ip = |at: usize| Ipv4Addr::new(r[at], r[at + 1], r[at + 2], r[at + 3]);
    let port = |at: usize| u16::from_be_bytes([r[at], r[at + 1]]);
    let kind = r[0];
    let proto = r[1];
    if !matches!(kind, ADD | DEL) || !matches!(proto, TCP | UDP) {
        return None;
    }
    let k = FwdKey {
        proto,
        cport: port(2),
        client: ip(4),
        vip: ip(8),
        vport: port(12),
    };
    let e = Entry {
        lport: port(14),
        backend: ip(16),
        last_seen: u64::from(u32::from_be_bytes([r[20], r[21], r[22], r[23]])),
        state: TcpState::Established,
        fin_out: false,
        fin_in: false,
    };
    Some((kind, k, e))
}

impl Conntrack {
    /// A table journaled to `path`: what an earlier process left there is loaded (as
    /// established flows, idle from `now`), then the file is rewritten with just that.
    pub fn open(path: &Path, now: u64) -> std::io::Result<Self> {
        let mut ct = Conntrack::default();
        let mut bytes = vec![];
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for r in bytes.chunks_exact(RECORD) {
            match decode(r) {
                Some((ADD, k, mut e)) => {
                    e.last_seen = now;
                    ct.insert(k, e);
                }
                Some((_, k, _)) => ct.remove(&k),
                None => {}
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        for (k, e) in &ct.fwd {
            f.write_all(&encode(ADD, k, e))?;
        }
        std::fs::rename(&tmp, path)?;
        let f = OpenOptions::new().append(true).open(path)?;
        ct.journal = Some((path.to_path_buf(), f));
        Ok(ct)
    }

    pub fn len(&self) -> usize {
        self.fwd.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fwd.is_empty()
    }

    fn insert(&mut self, k: FwdKey, e: Entry) {
        self.rev.insert(e.rev(&k), k);
        self.fwd.insert(k, e);
    }

    fn remove(&mut self, k: &FwdKey) {
        if let Some(e) = self.fwd.remove(k) {
            self.rev.remove(&e.rev(k));
        }
    }

    fn log(&mut self, kind: u8, k: &FwdKey, e: &Entry) {
        if let Some((path, f)) = &mut self.journal {
            if let Err(err) = f.write_all(&encode(kind, k, e)) {
                tracing::warn!("conntrack journal {}: {err}", path.display());
            }
        }
    }

    /// A free port on the load-balancer address towards `backend:bport`.
    fn free_port(&mut self, proto: u8, backend: Ipv4Addr, bport: u16) -> Option<u16> {
        let span = u32::from(u16::MAX - FIRST_PORT) + 1;
        for _ in 0..span {
            let p = self.next_port.max(FIRST_PORT);
            self.next_port = if p == u16::MAX { FIRST_PORT } else { p + 1 };
            let k = RevKey {
                proto,
                backend,
                bport,
                lport: p,
            };
            if !self.rev.contains_key(&k) {
                return Some(p);
            }
        }
        None
    }

    /// A packet from a client to a VIP. `pick` chooses a backend for a new flow (and is
    /// only called then); None means the VIP has none.
    pub fn outbound(
        &mut self,
        f: &Flow,
        now: u64,
        pick: impl FnOnce() -> Option<Ipv4Addr>,
    ) -> Outbound {
        let k = FwdKey {
            proto: f.proto,
            client: f.src,
            cport: f.sport,
            vip: f.dst,
            vport: f.dport,
        };
        let opens = f.proto == UDP || (f.syn && !f.ack && !f.rst);
        if let Some(e) = self.fwd.get_mut(&k) {
            // A new SYN on a closed flow's ports is a new connection.
            if !(opens && f.proto == TCP && e.state == TcpState::Closing) {
                e.last_seen = now;
                e.see_flags(f, true);
                return Outbound::Translate {
                    backend: e.backend,
                    lport: e.lport,
                    new: false,
                };
            }
            let old = *e;
            self.remove(&k);
            self.log(DEL, &k, &old);
        }
        if !opens {
            return Outbound::Drop;
        }
        let Some(backend) = pick() else {
            return Outbound::NoBackend;
        };
        let Some(lport) = self.free_port(f.proto, backend, f.dport) else {
            return Outbound::Drop;
        };
        let e = Entry {
            backend,
            lport,
            state: TcpState::SynSent,
            fin_out: false,
            fin_in: false,
            last_seen: now,
        };
        self.insert(k, e);
        self.log(ADD, &k, &e);
        Outbound::Translate {
            backend,
            lport,
            new: true,
        }
    }

    /// A packet from a backend to the load-balancer address: the flow it answers (its
    /// client and VIP), if any.
    pub fn inbound(&mut self, f: &Flow, now: u64) -> Option<FwdKey> {
        let r = RevKey {
            proto: f.proto,
            backend: f.src,
            bport: f.sport,
            lport: f.dport,
        };
        let k = *self.rev.get(&r)?;
        let e = self.fwd.get_mut(&k)?;
        e.last_seen = now;
        e.see_flags(f, false);
        Some(k)
    }

    /// Removes idle flows; returns how many.
    pub fn expire(&mut self, now: u64) -> usize {
        let stale: Vec<(FwdKey, Entry)> = self
            .fwd
            .iter()
            .filter(|(k, e)| now.saturating_sub(e.last_seen) > e.timeout(k.proto))
            .map(|(k, e)| (*k, *e))
            .collect();
        for (k, e) in &stale {
            self.remove(k);
            self.log(DEL, k, e);
        }
        stale.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::nat;
    use etherparse::PacketBuilder;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: &str) -> Flow {
        let mut b = vec![];
        let mut p =
            PacketBuilder::ipv4(a(src).octets(), a(dst).octets(), 64).tcp(sport, dport, 100, 1000);
        if flags.contains('S') {
            p = p.syn();
        }
        if flags.contains('A') {
            p = p.ack(1);
        }
        if flags.contains('F') {
            p = p.fin();
        }
        if flags.contains('R') {
            p = p.rst();
        }
        p.write(&mut b, &[]).unwrap();
        nat::parse(&b).unwrap()
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        let mut b = vec![];
        PacketBuilder::ipv4(a(src).octets(), a(dst).octets(), 64)
            .udp(sport, dport)
            .write(&mut b, b"x")
            .unwrap();
        nat::parse(&b).unwrap()
    }

    const C: &str = "198.18.9.2";
    const VIP: &str = "198.18.9.200";
    const B: &str = "198.18.9.7";

    fn opened(ct: &mut Conntrack, f: &Flow, now: u64) -> (Ipv4Addr, u16) {
        match ct.outbound(f, now, || Some(a(B))) {
            Outbound::Translate {
                backend,
                lport,
                new: true,
            } => (backend, lport),
            other => panic!("expected a new flow, got {other:?}"),
        }
    }

    #[test]
    fn a_flow_keeps_its_backend_and_answers_map_back() {
        let mut ct = Conntrack::default();
        let (b, lport) = opened(&mut ct, &tcp(C, 40000, VIP, 80, "S"), 0);
        // Later packets of the flow never ask for a backend again.
        let again = ct.outbound(&tcp(C, 40000, VIP, 80, "A"), 1, || panic!("no pick"));
        assert_eq!(
            again,
            Outbound::Translate {
                backend: b,
                lport,
                new: false
            }
        );
        let back = ct
            .inbound(&tcp(B, 80, "198.18.9.250", lport, "SA"), 1)
            .unwrap();
        assert_eq!(
            (back.client, back.cport, back.vip, back.vport),
            (a(C), 40000, a(VIP), 80)
        );
        // Anything else from the backend is not ours.
        assert!(ct
            .inbound(&tcp(B, 80, "198.18.9.250", lport + 1, "A"), 1)
            .is_none());
        assert!(ct
            .inbound(&tcp(B, 81, "198.18.9.250", lport, "A"), 1)
            .is_none());
    }

    #[test]
    fn two_clients_get_distinct_ports_towards_one_backend() {
        let mut ct = Conntrack::default();
        let (_, p1) = opened(&mut ct, &tcp(C, 40000, VIP, 80, "S"), 0);
        let (_, p2) = opened(&mut ct, &tcp("198.18.9.3", 40000, VIP, 80, "S"), 0);
        assert_ne!(p1, p2);
        assert!(p1 >= FIRST_PORT && p2 >= FIRST_PORT);
    }

    #[test]
    fn unknown_mid_flow_packets_are_dropped_and_empty_vips_refuse() {
        let mut ct = Conntrack::default();
        assert_eq!(
            ct.outbound(&tcp(C, 1, VIP, 80, "A"), 0, || Some(a(B))),
            Outbound::Drop
        );
        assert_eq!(
            ct.outbound(&tcp(C, 1, VIP, 80, "S"), 0, || None),
            Outbound::NoBackend
        );
        assert_eq!(
            ct.outbound(&udp(C, 1, VIP, 53), 0, || None),
            Outbound::NoBackend
        );
        assert!(ct.is_empty());
    }

    #[test]
    fn idle_flows_expire_by_protocol_and_state() {
        let mut ct = Conntrack::default();
        opened(&mut ct, &udp(C, 1, VIP, 53), 0);
        let (_, lport) = opened(&mut ct, &tcp(C, 2, VIP, 80, "S"), 0);
        ct.inbound(&tcp(B, 80, "198.18.9.250", lport, "SA"), 0)
            .unwrap();
        assert_eq!(ct.expire(UDP_TIMEOUT), 0);
        assert_eq!(ct.expire(UDP_TIMEOUT + 1), 1, "the UDP flow goes first");
        assert_eq!(ct.expire(TCP_ESTABLISHED_TIMEOUT), 0);
        // FIN both ways: closing, short timeout.
        ct.outbound(&tcp(C, 2, VIP, 80, "FA"), 100, || None);
        ct.inbound(&tcp(B, 80, "198.18.9.250", lport, "FA"), 100);
        assert_eq!(ct.expire(100 + TCP_CLOSING_TIMEOUT + 1), 1);
        assert!(ct.is_empty());
    }

    #[test]
    fn a_new_syn_on_a_closed_flow_takes_a_new_backend() {
        let mut ct = Conntrack::default();
        opened(&mut ct, &tcp(C, 5, VIP, 80, "S"), 0);
        ct.outbound(&tcp(C, 5, VIP, 80, "RA"), 1, || None);
        let r = ct.outbound(&tcp(C, 5, VIP, 80, "S"), 2, || Some(a("198.18.9.8")));
        assert!(
            matches!(r, Outbound::Translate { backend, new: true, .. } if backend == a("198.18.9.8"))
        );
    }

    #[test]
    fn the_journal_brings_flows_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ct");
        let (kept, gone);
        {
            let mut ct = Conntrack::open(&path, 0).unwrap();
            kept = opened(&mut ct, &tcp(C, 10, VIP, 80, "S"), 0).1;
            ct.inbound(&tcp(B, 80, "198.18.9.250", kept, "SA"), 0)
                .unwrap();
            gone = opened(&mut ct, &udp(C, 11, VIP, 53), 0).1;
            assert_eq!(ct.expire(UDP_TIMEOUT + 1), 1);
            // Dropped without any goodbye, as by kill -9.
        }
        let mut ct = Conntrack::open(&path, 500).unwrap();
        assert_eq!(ct.len(), 1);
        let r = ct.outbound(&tcp(C, 10, VIP, 80, "A"), 500, || panic!("known flow"));
        assert_eq!(
            r,
            Outbound::Translate {
                backend: a(B),
                lport: kept,
                new: false
            }
        );
        assert!(ct.inbound(&udp(B, 53, "198.18.9.250", gone), 500).is_none());
        // Compacted: one record left on disk.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RECORD as u64);
        // A torn or foreign file is read as far as it makes sense, never a panic.
        std::fs::write(&path, [7u8; 50]).unwrap();
        assert!(Conntrack::open(&path, 0).unwrap().is_empty());
    }
}
