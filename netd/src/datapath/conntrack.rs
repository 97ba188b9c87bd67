//! The userspace datapath's connection tracking: one table per overlay network on this
//! node. A flow from a client to a VIP gets a backend (round-robin, chosen by the
//! caller) and a port on the node's load-balancer address; answers from the backend to
//! that port are translated back. Entries expire when idle (per protocol and TCP state).
//!
//! Hardening, as the kernel's conntrack does it:
//! - An answer is recognised by its whole address: protocol, backend address, backend
//!   port and the port on the LB address ([`RevKey`]); anything else sent to the LB
//!   address is not an answer.
//! - Ports on the LB address are picked at random (a CSPRNG, so that seeing some ports
//!   does not tell the next one): who wants to inject into a flow must guess its port.
//! - The table holds at most `max` flows. When it is full, a new flow takes the place of
//!   the oldest unconfirmed one (the kernel's early drop: TCP before the handshake
//!   completes, UDP without a reply), so a flood churns its own entries and new clients
//!   still get in; established flows are never evicted, and when every flow is
//!   established a new one is refused ([`Outbound::Full`]). Unconfirmed flows also
//!   expire after 30 s.
//!
//! Every flow its backend answered (a SYN-ACK, a UDP reply) and its removal is appended
//! to a journal file (fixed 24-byte records) in /run, so a netd restarted after
//! `kill -9` translates the flows as before: the page cache keeps what a dead process
//! wrote. A flow is journaled as soon as the backend answers, not when the client
//! completes the handshake: a client whose ACK and request follow a SYN-ACK that the
//! netd before passed would otherwise send them into a flow the new netd does not know,
//! and its connection would hang (seen in the restart-under-load test). Flows nobody
//! answered are not journaled, so a SYN flood towards a VIP writes nothing unless the
//! backend answers it, and then one record to add and one to remove a flow (a restart
//! loses only handshakes not answered yet: the client retransmits its SYN and gets a
//! new flow). The journal is compacted on load and whenever it grows well beyond the
//! table.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::nat::{Flow, TCP, UDP};

/// Idle timeouts in seconds.
///
/// A TCP flow whose handshake has not completed (SYN sent, or SYN-ACK answered but not
/// yet acknowledged): short, as a SYN flood's entries must leave soon. Covers the gaps
/// of a client's first five SYN retransmissions (up to 16 s).
pub const TCP_SYN_TIMEOUT: u64 = 30;
/// Longer than IPVS's 900 s, whose expiry under idle connections is one of Swarm's weak
/// spots.
pub const TCP_ESTABLISHED_TIMEOUT: u64 = 7200;
pub const TCP_CLOSING_TIMEOUT: u64 = 10;
/// A UDP flow the backend answered.
pub const UDP_TIMEOUT: u64 = 60;
/// A UDP flow nobody answered yet (the kernel's nf_conntrack_udp_timeout): a flood of
/// datagrams to a VIP leaves the table after this.
pub const UDP_UNREPLIED_TIMEOUT: u64 = 30;

/// Flows one table holds unless told otherwise (`netd daemon
/// --userspace-conntrack-max`): roughly 10 MB of memory per network at most (some 80
/// bytes of hash tables per flow, doubled by their growth, and a journal of up to
/// 3 MB).
pub const DEFAULT_MAX_FLOWS: usize = 65536;

/// First port handed out on the load-balancer address (below are the well-known ports).
const FIRST_PORT: u16 = 1024;

/// Random ports tried before a scan: with 90% of a backend port's range in use, 32
/// probes all fail about 3% of the time, and then the scan still finds a free port.
const PORT_PROBES: usize = 32;

/// The journal is rewritten with just the live flows when it holds more records than
/// twice the table plus this.
const COMPACT_SLACK: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FwdKey {
    pub proto: u8,
    pub client: Ipv4Addr,
    pub cport: u16,
    pub vip: Ipv4Addr,
    pub vport: u16,
}

/// How an answer is recognised: the backend it comes from (address and port) and the
/// port on the LB address it goes to. All of them must match: a packet from any other
/// address or port is no answer, whatever port it guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RevKey {
    proto: u8,
    backend: Ipv4Addr,
    bport: u16,
    lport: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpState {
    /// The client's SYN went out, nothing came back.
    SynSent,
    /// The backend answered (SYN-ACK); the client has not acknowledged it yet. A flood
    /// that a backend answers but the client never completes stays unconfirmed here.
    SynRecv,
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
    /// The backend sent something back on this flow.
    replied: bool,
    /// An ADD record of this flow is in the journal (so its end needs a DEL record).
    logged: bool,
    last_seen: u64,
}

impl Entry {
    fn new(backend: Ipv4Addr, lport: u16, now: u64) -> Self {
        Entry {
            backend,
            lport,
            state: TcpState::SynSent,
            fin_out: false,
            fin_in: false,
            replied: false,
            logged: false,
            last_seen: now,
        }
    }

    fn timeout(&self, proto: u8) -> u64 {
        match (proto, self.state) {
            (UDP, _) if self.replied => UDP_TIMEOUT,
            (UDP, _) => UDP_UNREPLIED_TIMEOUT,
            (_, TcpState::SynSent | TcpState::SynRecv) => TCP_SYN_TIMEOUT,
            (_, TcpState::Established) => TCP_ESTABLISHED_TIMEOUT,
            (_, TcpState::Closing) => TCP_CLOSING_TIMEOUT,
        }
    }

    /// Whether both sides took part: a TCP handshake completed, or a UDP answer came.
    /// Early drops spare only such flows.
    fn confirmed(&self, proto: u8) -> bool {
        if proto == UDP {
            self.replied
        } else {
            self.state == TcpState::Established
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
        if !outbound {
            self.replied = true;
        }
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
            self.state = TcpState::SynRecv;
        } else if outbound && self.state == TcpState::SynRecv && f.ack && !f.syn {
            // The client acknowledged the backend's SYN-ACK: the handshake completed.
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
    /// It would open a flow, but the table holds its maximum: refuse (and count). No
    /// flow is evicted for it.
    Full,
    /// Mid-connection packet of a flow nobody knows, or no port left: drop.
    Drop,
}

/// The journal file, open for appending.
struct Journal {
    path: PathBuf,
    file: File,
    /// Records in the file, for deciding when to compact it.
    records: usize,
}

pub struct Conntrack {
    fwd: HashMap<FwdKey, Entry>,
    rev: HashMap<RevKey, FwdKey>,
    /// Flows the table holds at most.
    max: usize,
    /// Picks ports on the LB address (ChaCha12: fast, and its outputs do not reveal the
    /// next ones, as a linear generator's would to a backend that sees a few ports).
    rng: StdRng,
    journal: Option<Journal>,
    /// New flows in the order they came, for the early drop. Lazily cleaned: a key whose
    /// flow is gone or confirmed is skipped when it comes up.
    unconfirmed: std::collections::VecDeque<FwdKey>,
    /// Unconfirmed flows dropped to make room.
    early_drops: u64,
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

/// One record; flows come back confirmed (only those are written), so established.
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
        state: TcpState::Established,
        replied: true,
        logged: true,
        last_seen: u64::from(u32::from_be_bytes([r[20], r[21], r[22], r[23]])),
        ..Entry::new(ip(16), port(14), 0)
    };
    Some((kind, k, e))
}

impl Conntrack {
    /// An empty table without a journal, for at most `max` flows, its ports drawn from
    /// `rng`.
    fn with_rng(max: usize, rng: StdRng) -> Self {
        Conntrack {
            fwd: HashMap::new(),
            rev: HashMap::new(),
            max,
            rng,
            journal: None,
            unconfirmed: std::collections::VecDeque::new(),
            early_drops: 0,
        }
    }

    /// Unconfirmed flows dropped so far to make room for new ones.
    pub fn early_drops(&self) -> u64 {
        self.early_drops
    }

    /// Makes room for one flow by dropping the oldest unconfirmed one; false if every
    /// flow is confirmed.
    fn early_drop(&mut self) -> bool {
        while let Some(k) = self.unconfirmed.pop_front() {
            if self.fwd.get(&k).is_some_and(|e| !e.confirmed(k.proto)) {
                // Journaled if the backend answered: then its end is too.
                self.end(&k);
                self.early_drops += 1;
                return true;
            }
        }
        false
    }

    /// An empty table whose port choices repeat for a given `seed` (for tests).
    #[cfg(test)]
    pub fn seeded(max: usize, seed: u64) -> Self {
        Self::with_rng(max, StdRng::seed_from_u64(seed))
    }

    /// A table of at most `max` flows journaled to `path`: what an earlier process left
    /// there is loaded (as established flows, idle from `now`; all of them, even beyond
    /// `max`, as established flows are never dropped for room), then the file is
    /// rewritten with just that.
    pub fn open(path: &Path, now: u64, max: usize) -> std::io::Result<Self> {
        let rng = StdRng::try_from_os_rng()
            .map_err(|e| std::io::Error::other(format!("seed the port picker from the OS: {e}")))?;
        let mut ct = Conntrack::with_rng(max, rng);
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
                    ct.remove(&k);
                    ct.insert(k, e);
                }
                Some((_, k, _)) => {
                    ct.remove(&k);
                }
                None => {}
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        ct.journal = Some(ct.rewrite(path)?);
        Ok(ct)
    }

    /// Writes the journaled flows to a new file at `path` (atomically, by rename) and
    /// opens it for appending.
    fn rewrite(&self, path: &Path) -> std::io::Result<Journal> {
        // PATH.tmp (not with_extension: network `a.b` and `a.c` would share `a.tmp`).
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp)?;
        let mut records = 0;
        for (k, e) in self.fwd.iter().filter(|(_, e)| e.logged) {
            f.write_all(&encode(ADD, k, e))?;
            records += 1;
        }
        std::fs::rename(&tmp, path)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            records,
        })
    }

    pub fn len(&self) -> usize {
        self.fwd.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fwd.is_empty()
    }

    /// Flows the table holds at most.
    pub fn max(&self) -> usize {
        self.max
    }

    fn insert(&mut self, k: FwdKey, e: Entry) {
        self.rev.insert(e.rev(&k), k);
        self.fwd.insert(k, e);
    }

    /// Removes a flow, without a journal record; returns it.
    fn remove(&mut self, k: &FwdKey) -> Option<Entry> {
        let e = self.fwd.remove(k)?;
        self.rev.remove(&e.rev(k));
        Some(e)
    }

    /// Removes a flow, and from the journal if it is there.
    fn end(&mut self, k: &FwdKey) {
        if let Some(e) = self.remove(k) {
            if e.logged {
                self.log(DEL, k, &e);
            }
        }
    }

    fn log(&mut self, kind: u8, k: &FwdKey, e: &Entry) {
        let Some(j) = &mut self.journal else {
            return;
        };
        if let Err(err) = j.file.write_all(&encode(kind, k, e)) {
            tracing::warn!("conntrack journal {}: {err}", j.path.display());
            return;
        }
        j.records += 1;
        if j.records > 2 * self.fwd.len() + COMPACT_SLACK {
            // A long-running table would otherwise grow its file (in /run: memory) by
            // two records per flow for ever.
            let path = j.path.clone();
            match self.rewrite(&path) {
                Ok(new) => self.journal = Some(new),
                Err(err) => {
                    tracing::warn!("compact conntrack journal {}: {err}", path.display());
                    if let Some(j) = &mut self.journal {
                        // Not again at every packet: after as many records again.
                        j.records = self.fwd.len();
                    }
                }
            }
        }
    }

    /// Journals `k` once its backend answered.
    fn confirm(&mut self, k: &FwdKey) {
        let Some(e) = self.fwd.get_mut(k) else {
            return;
        };
        if e.logged || !e.replied {
            return;
        }
        e.logged = true;
        let e = *e;
        self.log(ADD, k, &e);
    }

    /// A free port on the load-balancer address towards `backend:bport`, at random:
    /// `PORT_PROBES` random tries, then a scan of the whole range from a random place
    /// (so a nearly full range still gives its last free ports).
    fn free_port(&mut self, proto: u8, backend: Ipv4Addr, bport: u16) -> Option<u16> {
        let rev = &self.rev;
        let free = |lport: u16| {
            !rev.contains_key(&RevKey {
                proto,
                backend,
                bport,
                lport,
            })
        };
        for _ in 0..PORT_PROBES {
            let p = self.rng.random_range(FIRST_PORT..=u16::MAX);
            if free(p) {
                return Some(p);
            }
        }
        let span = u32::from(u16::MAX - FIRST_PORT) + 1;
        let start = self.rng.random_range(0..span);
        (0..span)
            .filter_map(|i| u16::try_from((start + i) % span).ok())
            .map(|off| FIRST_PORT + off)
            .find(|p| free(*p))
    }

    /// A packet from a client to a VIP. `pick` chooses a backend for a new flow (and is
    /// only called then, when the table has room); None means the VIP has none.
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
                let (backend, lport) = (e.backend, e.lport);
                self.confirm(&k);
                return Outbound::Translate {
                    backend,
                    lport,
                    new: false,
                };
            }
            self.end(&k);
        }
        if !opens {
            return Outbound::Drop;
        }
        if self.fwd.len() >= self.max && !self.early_drop() {
            return Outbound::Full;
        }
        let Some(backend) = pick() else {
            return Outbound::NoBackend;
        };
        let Some(lport) = self.free_port(f.proto, backend, f.dport) else {
            return Outbound::Drop;
        };
        // Not journaled until confirmed: a flood of SYNs writes nothing.
        self.insert(k, Entry::new(backend, lport, now));
        self.unconfirmed.push_back(k);
        if self.unconfirmed.len() > 2 * self.max + 1024 {
            let fwd = &self.fwd;
            self.unconfirmed
                .retain(|k| fwd.get(k).is_some_and(|e| !e.confirmed(k.proto)));
        }
        Outbound::Translate {
            backend,
            lport,
            new: true,
        }
    }

    /// Ends the flows whose (VIP, backend) `gone` picks (the backend left the VIP) that
    /// no connection depends on; how many. A UDP flow's next datagram makes a new pick; a
    /// TCP handshake the backend never completed must not meet it again when the client
    /// reuses its port (a lost node's task). Established connections keep theirs.
    pub fn forget_left(&mut self, gone: impl Fn(Ipv4Addr, Ipv4Addr) -> bool) -> usize {
        let stale: Vec<FwdKey> = self
            .fwd
            .iter()
            .filter(|(k, e)| {
                let unpinned =
                    k.proto == UDP || matches!(e.state, TcpState::SynSent | TcpState::SynRecv);
                unpinned && gone(k.vip, e.backend)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &stale {
            self.end(k);
        }
        stale.len()
    }

    /// A packet from a backend to the load-balancer address: the flow it answers (its
    /// client and VIP), if any. It must come from the flow's backend address and port,
    /// to the flow's port: nothing else is let through to a client.
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
        self.confirm(&k);
        Some(k)
    }

    /// Removes idle flows; returns how many. Idleness is the only way out of the table:
    /// however full it is, a flow that carries traffic stays.
    pub fn expire(&mut self, now: u64) -> usize {
        let stale: Vec<FwdKey> = self
            .fwd
            .iter()
            .filter(|(k, e)| now.saturating_sub(e.last_seen) > e.timeout(k.proto))
            .map(|(k, _)| *k)
            .collect();
        for k in &stale {
            self.end(k);
        }
        stale.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::datapath::nat;
    use etherparse::PacketBuilder;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// An IPv4 TCP packet with `flags` (S, A, F, R) carrying `payload`.
    pub(crate) fn tcp_packet(
        src: &str,
        sport: u16,
        dst: &str,
        dport: u16,
        flags: &str,
        payload: &[u8],
    ) -> Vec<u8> {
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
        p.write(&mut b, payload).unwrap();
        b
    }

    /// An IPv4 UDP datagram carrying "x".
    pub(crate) fn udp_packet(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
        let mut b = vec![];
        PacketBuilder::ipv4(a(src).octets(), a(dst).octets(), 64)
            .udp(sport, dport)
            .write(&mut b, b"x")
            .unwrap();
        b
    }

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: &str) -> Flow {
        nat::parse(&tcp_packet(src, sport, dst, dport, flags, &[])).unwrap()
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        nat::parse(&udp_packet(src, sport, dst, dport)).unwrap()
    }

    const C: &str = "198.18.9.2";
    const VIP: &str = "198.18.9.200";
    const B: &str = "198.18.9.7";
    const LB: &str = "198.18.9.250";

    fn table() -> Conntrack {
        Conntrack::seeded(DEFAULT_MAX_FLOWS, 1)
    }

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

    /// A TCP connection from `C:cport` through its three-way handshake; its LB port.
    fn established(ct: &mut Conntrack, cport: u16, now: u64) -> u16 {
        let (_, lport) = opened(ct, &tcp(C, cport, VIP, 80, "S"), now);
        ct.inbound(&tcp(B, 80, LB, lport, "SA"), now).unwrap();
        ct.outbound(&tcp(C, cport, VIP, 80, "A"), now, || panic!("known flow"));
        lport
    }

    #[test]
    fn a_udp_flow_or_handshake_whose_backend_left_makes_a_new_pick() {
        let mut ct = table();
        let (b, _) = opened(&mut ct, &udp(C, 40000, VIP, 53), 0);
        let tcp_port = established(&mut ct, 40001, 0);
        // A SYN the backend never answered (its node was lost).
        opened(&mut ct, &tcp(C, 40002, VIP, 80, "S"), 0);
        assert_eq!(
            ct.forget_left(|_, backend| backend != b),
            0,
            "it still serves"
        );
        assert_eq!(
            ct.forget_left(|_, backend| backend == b),
            2,
            "the UDP flow and the handshake"
        );
        let next = ct.outbound(&udp(C, 40000, VIP, 53), 1, || Some(a("198.18.9.8")));
        assert!(
            matches!(next, Outbound::Translate { backend, new: true, .. } if backend == a("198.18.9.8")),
            "a new pick: {next:?}"
        );
        // The client's port comes round again: its SYN makes a new pick.
        let again = ct.outbound(&tcp(C, 40002, VIP, 80, "S"), 1, || Some(a("198.18.9.8")));
        assert!(
            matches!(again, Outbound::Translate { backend, new: true, .. } if backend == a("198.18.9.8")),
            "a new pick: {again:?}"
        );
        // The TCP connection keeps its backend.
        assert!(ct.inbound(&tcp(B, 80, LB, tcp_port, "A"), 1).is_some());
    }

    #[test]
    fn a_flow_keeps_its_backend_and_answers_map_back() {
        let mut ct = table();
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
        let back = ct.inbound(&tcp(B, 80, LB, lport, "SA"), 1).unwrap();
        assert_eq!(
            (back.client, back.cport, back.vip, back.vport),
            (a(C), 40000, a(VIP), 80)
        );
        // Anything else from the backend is not ours.
        assert!(ct
            .inbound(&tcp(B, 80, LB, lport.wrapping_add(1), "A"), 1)
            .is_none());
        assert!(ct.inbound(&tcp(B, 81, LB, lport, "A"), 1).is_none());
    }

    /// An answer is only what comes from the flow's backend address and port to the
    /// flow's port, in the flow's protocol: another host that guessed (or saw) the port
    /// gets nothing through, and the flow is untouched by its attempts.
    #[test]
    fn only_the_flows_backend_and_port_can_answer() {
        let mut ct = table();
        let tcp_port = established(&mut ct, 40000, 0);
        let (_, udp_port) = opened(&mut ct, &udp(C, 40001, VIP, 53), 0);
        for (src, sport) in [("198.18.9.66", 80), ("198.18.9.66", 1), (C, 80), (VIP, 80)] {
            assert!(
                ct.inbound(&tcp(src, sport, LB, tcp_port, "R"), 1).is_none(),
                "TCP from {src}:{sport}"
            );
        }
        assert!(ct.inbound(&tcp(B, 8080, LB, tcp_port, "R"), 1).is_none());
        assert!(ct
            .inbound(&udp("198.18.9.66", 53, LB, udp_port), 1)
            .is_none());
        assert!(ct.inbound(&udp(B, 54, LB, udp_port), 1).is_none());
        // Same numbers, other protocol.
        assert!(ct.inbound(&udp(B, 80, LB, tcp_port), 1).is_none());
        assert!(ct.inbound(&tcp(B, 53, LB, udp_port, "A"), 1).is_none());
        // The forged RSTs changed nothing: the flow still lives its full timeout, and the
        // UDP flow is still unanswered (short timeout).
        assert_eq!(
            ct.expire(TCP_ESTABLISHED_TIMEOUT),
            1,
            "the unanswered UDP flow"
        );
        assert!(ct.inbound(&tcp(B, 80, LB, tcp_port, "A"), 2).is_some());
    }

    #[test]
    fn two_clients_get_distinct_ports_towards_one_backend() {
        let mut ct = table();
        let (_, p1) = opened(&mut ct, &tcp(C, 40000, VIP, 80, "S"), 0);
        let (_, p2) = opened(&mut ct, &tcp("198.18.9.3", 40000, VIP, 80, "S"), 0);
        assert_ne!(p1, p2);
        assert!(p1 >= FIRST_PORT && p2 >= FIRST_PORT);
    }

    /// Ports are random: 1000 flows to one backend port get 1000 distinct ports in range,
    /// not a run, spread over the range; another seed gives other ports.
    #[test]
    fn ports_are_picked_at_random_in_the_range() {
        let picks = |seed| {
            let mut ct = Conntrack::seeded(DEFAULT_MAX_FLOWS, seed);
            (0..1000u16)
                .map(|i| opened(&mut ct, &tcp(C, 10000 + i, VIP, 80, "S"), 0).1)
                .collect::<Vec<u16>>()
        };
        let p = picks(7);
        let distinct: std::collections::HashSet<u16> = p.iter().copied().collect();
        assert_eq!(distinct.len(), 1000);
        assert!(p.iter().all(|&x| x >= FIRST_PORT));
        let steps = p
            .windows(2)
            .filter(|w| w[1] == w[0].wrapping_add(1))
            .count();
        assert!(steps < 10, "{steps} sequential picks");
        // Loosely uniform: each eighth of the range gets 125 +- 60.
        let span = usize::from(u16::MAX - FIRST_PORT) + 1;
        let mut eighths = [0usize; 8];
        for &x in &p {
            eighths[usize::from(x - FIRST_PORT) * 8 / span] += 1;
        }
        assert!(
            eighths.iter().all(|&n| (65..=185).contains(&n)),
            "{eighths:?}"
        );
        assert_ne!(p, picks(8));
        assert_eq!(p, picks(7), "a seed repeats");
    }

    /// With all but a few ports of a backend port taken, the last ones are still found
    /// (by the scan after the random probes), and then there is none.
    #[test]
    fn a_nearly_full_port_range_still_gives_its_free_ports() {
        let mut ct = table();
        let span = u32::from(u16::MAX - FIRST_PORT) + 1;
        let left = [FIRST_PORT, 30000, u16::MAX];
        // Fill the reverse map directly: 64k flows through outbound() would need 64k
        // distinct client tuples, which is what this shortcut stands for.
        for p in FIRST_PORT..=u16::MAX {
            if !left.contains(&p) {
                ct.rev.insert(
                    RevKey {
                        proto: TCP,
                        backend: a(B),
                        bport: 80,
                        lport: p,
                    },
                    FwdKey {
                        proto: TCP,
                        client: a(C),
                        cport: p,
                        vip: a(VIP),
                        vport: 80,
                    },
                );
            }
        }
        assert_eq!(ct.rev.len() as u32, span - 3);
        let mut got = vec![];
        for i in 0..3 {
            got.push(opened(&mut ct, &tcp("198.18.9.3", i, VIP, 80, "S"), 0).1);
        }
        got.sort();
        assert_eq!(got, left);
        assert_eq!(
            ct.outbound(&tcp("198.18.9.3", 9, VIP, 80, "S"), 0, || Some(a(B))),
            Outbound::Drop
        );
        // Another backend port has its whole range.
        assert!(ct.free_port(TCP, a(B), 81).is_some());
        assert!(ct.free_port(UDP, a(B), 80).is_some());
    }

    #[test]
    fn unknown_mid_flow_packets_are_dropped_and_empty_vips_refuse() {
        let mut ct = table();
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
        let mut ct = table();
        let (_, uport) = opened(&mut ct, &udp(C, 1, VIP, 53), 0);
        ct.inbound(&udp(B, 53, LB, uport), 0).unwrap();
        let lport = established(&mut ct, 2, 0);
        assert_eq!(ct.expire(UDP_TIMEOUT), 0);
        assert_eq!(ct.expire(UDP_TIMEOUT + 1), 1, "the UDP flow goes first");
        assert_eq!(ct.expire(TCP_ESTABLISHED_TIMEOUT), 0);
        // FIN both ways: closing, short timeout.
        ct.outbound(&tcp(C, 2, VIP, 80, "FA"), 100, || None);
        ct.inbound(&tcp(B, 80, LB, lport, "FA"), 100);
        assert_eq!(ct.expire(100 + TCP_CLOSING_TIMEOUT + 1), 1);
        assert!(ct.is_empty());
    }

    /// Flows nobody confirmed leave sooner: a SYN never answered, a SYN-ACK never
    /// acknowledged by the client, a datagram never answered.
    #[test]
    fn unconfirmed_flows_expire_sooner() {
        let mut ct = table();
        opened(&mut ct, &tcp(C, 1, VIP, 80, "S"), 0);
        let (_, half) = opened(&mut ct, &tcp(C, 2, VIP, 80, "S"), 0);
        ct.inbound(&tcp(B, 80, LB, half, "SA"), 0).unwrap();
        opened(&mut ct, &udp(C, 3, VIP, 53), 0);
        established(&mut ct, 4, 0);
        let (_, answered) = opened(&mut ct, &udp(C, 5, VIP, 53), 0);
        ct.inbound(&udp(B, 53, LB, answered), 0).unwrap();
        assert_eq!(TCP_SYN_TIMEOUT.max(UDP_UNREPLIED_TIMEOUT), 30);
        assert_eq!(ct.expire(30), 0);
        assert_eq!(ct.expire(31), 3);
        assert_eq!(ct.len(), 2);
        // A retransmitted SYN keeps its flow alive.
        let mut ct = table();
        opened(&mut ct, &tcp(C, 6, VIP, 80, "S"), 100);
        ct.outbound(&tcp(C, 6, VIP, 80, "S"), 125, || panic!("known flow"));
        assert_eq!(ct.expire(140), 0);
        assert_eq!(ct.expire(156), 1);
    }

    /// The cap: a flood of new flows fills the table and then churns its own
    /// (unconfirmed) entries, oldest first, while an established flow still translates
    /// both ways and a new client still gets in; only a table of established flows
    /// refuses; once the flood's unconfirmed flows expire, the table empties of them.
    #[test]
    fn a_full_table_drops_unconfirmed_flows_first_and_keeps_established_ones() {
        const MAX: usize = 100;
        let mut ct = Conntrack::seeded(MAX, 3);
        let kept = established(&mut ct, 1, 0);
        for i in 0..500u16 {
            let f = if i % 2 == 0 {
                tcp("198.18.9.66", 1000 + i, VIP, 80, "S")
            } else {
                udp("198.18.9.66", 1000 + i, VIP, 53)
            };
            match ct.outbound(&f, 1, || Some(a(B))) {
                Outbound::Translate { new: true, .. } => {}
                other => panic!("flood packet {i}: {other:?}"),
            }
        }
        assert_eq!(ct.len(), MAX);
        assert_eq!(ct.early_drops(), 500 - (MAX as u64 - 1));
        // The oldest flood flows went first: the first one is gone, the last one is in.
        let first = tcp("198.18.9.66", 1000, VIP, 80, "A");
        assert_eq!(ct.outbound(&first, 1, || None), Outbound::Drop);
        let last = udp("198.18.9.66", 1499, VIP, 53);
        assert!(matches!(
            ct.outbound(&last, 1, || panic!("known flow")),
            Outbound::Translate { new: false, .. }
        ));
        // A new client gets in.
        opened(&mut ct, &tcp("198.18.9.3", 5, VIP, 80, "S"), 2);
        // The established flow, both ways.
        let fwd = ct.outbound(&tcp(C, 1, VIP, 80, "A"), 20, || panic!("known flow"));
        assert_eq!(
            fwd,
            Outbound::Translate {
                backend: a(B),
                lport: kept,
                new: false
            }
        );
        assert_eq!(
            ct.inbound(&tcp(B, 80, LB, kept, "A"), 20).map(|k| k.client),
            Some(a(C))
        );
        // The flood leaves after the unconfirmed timeout; the established flow stays.
        assert_eq!(ct.expire(1 + TCP_SYN_TIMEOUT), 0);
        assert_eq!(ct.expire(2 + TCP_SYN_TIMEOUT), MAX - 2, "the flood's");
        assert_eq!(ct.expire(3 + TCP_SYN_TIMEOUT), 1, "the new client's");
        assert_eq!(ct.len(), 1);
        assert!(ct.inbound(&tcp(B, 80, LB, kept, "A"), 40).is_some());
        // Only established flows: then a new one is refused, without a round-robin turn.
        let mut full = Conntrack::seeded(3, 4);
        for i in 0..3 {
            established(&mut full, 10 + i, 0);
        }
        let picked = std::cell::Cell::new(false);
        assert_eq!(
            full.outbound(&tcp("198.18.9.3", 6, VIP, 80, "S"), 2, || {
                picked.set(true);
                Some(a(B))
            }),
            Outbound::Full
        );
        assert!(!picked.get(), "a refused flow takes no round-robin turn");
    }

    #[test]
    fn a_new_syn_on_a_closed_flow_takes_a_new_backend() {
        let mut ct = table();
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
            let mut ct = Conntrack::open(&path, 0, DEFAULT_MAX_FLOWS).unwrap();
            kept = established(&mut ct, 10, 0);
            gone = opened(&mut ct, &udp(C, 11, VIP, 53), 0).1;
            ct.inbound(&udp(B, 53, LB, gone), 0).unwrap();
            assert_eq!(ct.expire(UDP_TIMEOUT + 1), 1);
            // Flows nobody answered are not journaled: neither an unanswered SYN nor an
            // unanswered datagram.
            opened(&mut ct, &tcp(C, 12, VIP, 80, "S"), 0);
            opened(&mut ct, &udp(C, 13, VIP, 53), 0);
            // A handshake the backend answered is: the client's ACK and request may
            // come after the restart.
            let answered = opened(&mut ct, &tcp(C, 14, VIP, 80, "S"), 0).1;
            ct.inbound(&tcp(B, 80, LB, answered, "SA"), 0).unwrap();
            // Dropped without any goodbye, as by kill -9.
        }
        let mut ct = Conntrack::open(&path, 500, DEFAULT_MAX_FLOWS).unwrap();
        assert_eq!(ct.len(), 2);
        let r = ct.outbound(&tcp(C, 14, VIP, 80, "A"), 500, || panic!("known flow"));
        assert!(matches!(r, Outbound::Translate { new: false, .. }), "{r:?}");
        let r = ct.outbound(&tcp(C, 10, VIP, 80, "A"), 500, || panic!("known flow"));
        assert_eq!(
            r,
            Outbound::Translate {
                backend: a(B),
                lport: kept,
                new: false
            }
        );
        assert!(ct.inbound(&udp(B, 53, LB, gone), 500).is_none());
        // Compacted: one record per flow left on disk.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * RECORD as u64);
        // A torn or foreign file is read as far as it makes sense, never a panic.
        std::fs::write(&path, [7u8; 50]).unwrap();
        assert!(Conntrack::open(&path, 0, DEFAULT_MAX_FLOWS)
            .unwrap()
            .is_empty());
    }

    /// The record format is the one earlier versions wrote: a journal they left is read.
    #[test]
    fn a_journal_of_the_earlier_format_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ct");
        let mut rec = vec![ADD, TCP, 0x9c, 0x40]; // cport 40000
        rec.extend([198, 18, 9, 2, 198, 18, 9, 200, 0, 80, 0x04, 0x01]); // lport 1025
        rec.extend([198, 18, 9, 7, 0, 0, 0, 9]);
        assert_eq!(rec.len(), RECORD);
        std::fs::write(&path, &rec).unwrap();
        let mut ct = Conntrack::open(&path, 0, DEFAULT_MAX_FLOWS).unwrap();
        let k = ct.inbound(&tcp(B, 80, LB, 1025, "A"), 0).unwrap();
        assert_eq!((k.client, k.cport), (a(C), 40000));
        assert_eq!(
            ct.expire(TCP_ESTABLISHED_TIMEOUT),
            0,
            "loaded as established"
        );
    }

    /// A long-lived table's journal stays about its size: each flow writes an ADD and a
    /// DEL, and the file is rewritten when it holds far more than the live flows.
    #[test]
    fn the_journal_is_compacted_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ct");
        let mut ct = Conntrack::open(&path, 0, DEFAULT_MAX_FLOWS).unwrap();
        let kept = established(&mut ct, 1, 0);
        for i in 0..20_000u16 {
            let (_, p) = opened(&mut ct, &udp(C, 2000 + i, VIP, 53), 0);
            ct.inbound(&udp(B, 53, LB, p), 0).unwrap();
            assert_eq!(ct.expire(UDP_TIMEOUT + 1), 1);
        }
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(
            size <= ((COMPACT_SLACK + 3) * RECORD) as u64,
            "journal of {size} bytes"
        );
        drop(ct);
        let mut ct = Conntrack::open(&path, 0, DEFAULT_MAX_FLOWS).unwrap();
        assert_eq!(ct.len(), 1);
        assert!(ct.inbound(&tcp(B, 80, LB, kept, "A"), 0).is_some());
    }
}
