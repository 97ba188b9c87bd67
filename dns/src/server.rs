//! The sockets: one UDP socket and one TCP listener per task namespace, all served by
//! tokio tasks of the one process (sockets are bound inside the namespace by the caller;
//! a socket stays in the namespace it was made in). Dropping a [`Listener`] stops its
//! tasks and closes its sockets.
//!
//! TCP is bounded: at most `MAX_TCP_CONNS` connections per task, each closed after
//! `TCP_IDLE` without a complete query, so a client that stalls mid-message holds
//! nothing for long.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::batch::{Inbox, Outbox};
use crate::message::{self, Action};
use crate::stats::{ForwardFailure, Stats};
use crate::table::Table;
use crate::upstream::{ForwardError, Upstream};

pub const MAX_TCP_CONNS: usize = 32;
pub const TCP_IDLE: Duration = Duration::from_secs(5);

/// What every listener shares: the record table and the way upstream.
pub struct Shared {
    pub table: RwLock<Table>,
    pub upstream: Upstream,
    /// Whether listeners keep their answers per request (see `AnswerCache`). Off, every
    /// query goes through the record table: what a bench needs to measure the lookup
    /// itself rather than a cache that any resolver could put in front of it.
    pub answer_cache: bool,
    /// What was asked and answered (for `/metrics`).
    pub stats: Stats,
}

/// The DNS of one task: its sockets' serving tasks.
pub struct Listener {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Who asks on a listener: the networks it is attached to (what it may resolve), and
/// whether names that are not the cluster's are forwarded upstream for it (not for a
/// task whose networks are all internal: its DNS must not be a way out, CVE-2024-29018).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Querier {
    pub networks: Vec<String>,
    pub forward: bool,
}

/// The forwards one listener (one task) may have in flight at once: an eighth of the
/// node's [`crate::upstream::MAX_IN_FLIGHT`], so a task flooding names that upstream
/// answers slowly (or never) is refused past its share while other tasks' forwards still
/// find free slots; only eight tasks flooding together can fill the node's.
pub const MAX_FORWARDS_PER_TASK: usize = crate::upstream::MAX_IN_FLIGHT / 8;

/// A listener's querier and its share of the forward slots.
struct Asker {
    querier: Querier,
    forwards: Arc<Semaphore>,
}

/// Serves `udp` and `tcp` for `querier`. Must run inside a tokio runtime; the std
/// sockets are switched to non-blocking here.
pub fn listen(
    shared: Arc<Shared>,
    querier: Querier,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
) -> std::io::Result<Listener> {
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    let udp = Arc::new(UdpSocket::from_std(udp)?);
    let tcp = TcpListener::from_std(tcp)?;
    let querier = Arc::new(Asker {
        querier,
        forwards: Arc::new(Semaphore::new(MAX_FORWARDS_PER_TASK)),
    });
    Ok(Listener {
        tasks: vec![
            tokio::spawn(serve_udp(shared.clone(), querier.clone(), udp)),
            tokio::spawn(serve_tcp(shared, querier, tcp)),
        ],
    })
}

fn decide(shared: &Shared, asker: &Asker, packet: &[u8], tcp: bool) -> Action {
    let action = match shared.table.read() {
        Ok(table) => message::handle(packet, tcp, &table, &asker.querier.networks),
        Err(_) => Action::Drop,
    };
    match action {
        Action::Forward(request) if !asker.querier.forward => {
            Action::Reply(message::refused(&request, tcp))
        }
        other => other,
    }
}

/// Asks upstream for `request` and returns the answer for the client: REFUSED at once
/// when the task has used its share of the slots, or the node all of them.
async fn forwarded(
    shared: &Shared,
    asker: &Asker,
    request: &hickory_proto::op::Message,
    tcp: bool,
) -> Vec<u8> {
    shared.stats.forward();
    let Ok(_share) = asker.forwards.clone().try_acquire_owned() else {
        shared.stats.forward_failed(ForwardFailure::Busy);
        return message::refused(request, tcp);
    };
    match shared.upstream.forward(request).await {
        Ok(reply) => message::relay(Some(reply), request, tcp),
        Err(ForwardError::Busy) => {
            shared.stats.forward_failed(ForwardFailure::Busy);
            message::refused(request, tcp)
        }
        Err(ForwardError::Failed) => {
            shared.stats.forward_failed(ForwardFailure::Failed);
            message::relay(None, request, tcp)
        }
    }
}

/// Answers of this listener by request bytes (everything after the id), valid for one
/// table generation. Per listener, so no lock: its querier's scope is part of the key.
struct AnswerCache {
    generation: u64,
    answers: HashMap<Vec<u8>, Vec<u8>, BuildHasherDefault<Fnv>>,
}

/// FNV-1a: the keys are a few dozen bytes from the querier's own task, so a fast hash
/// without DoS resistance is the right trade (SipHash costs more than the lookup).
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// Entries a listener keeps at most; past it the cache starts over.
const CACHE_ENTRIES: usize = 4096;

impl AnswerCache {
    /// Queues the cached answer to `packet` under `generation`, with the packet's id,
    /// and counts it in `stats` (asked at `arrived`); false if there is none.
    fn answer(
        &mut self,
        generation: u64,
        packet: &[u8],
        outbox: &mut Outbox,
        to: SocketAddr,
        (stats, arrived): (&Stats, Instant),
    ) -> bool {
        if generation != self.generation {
            self.answers.clear();
            self.generation = generation;
            return false;
        }
        let Some(cached) = packet.get(2..).and_then(|k| self.answers.get(k)) else {
            return false;
        };
        outbox.push_with(to, |buf| {
            let start = buf.len();
            buf.extend_from_slice(cached);
            buf[start..start + 2].copy_from_slice(&packet[..2]);
        });
        stats.query(packet, Some(cached), arrived.elapsed());
        true
    }

    fn put(&mut self, packet: &[u8], answer: &[u8]) {
        if self.answers.len() >= CACHE_ENTRIES {
            self.answers.clear();
        }
        if let Some(key) = packet.get(2..) {
            self.answers.insert(key.to_vec(), answer.to_vec());
        }
    }
}

fn generation(shared: &Shared) -> u64 {
    shared.table.read().map(|t| t.generation()).unwrap_or(0)
}

async fn serve_udp(shared: Arc<Shared>, querier: Arc<Asker>, sock: Arc<UdpSocket>) {
    let fd = sock.as_raw_fd();
    let mut inbox = Inbox::default();
    let mut outbox = Outbox::default();
    let mut cache = AnswerCache {
        generation: 0,
        answers: HashMap::default(),
    };
    loop {
        if sock.readable().await.is_err() {
            return; // the runtime is going away
        }
        // Drain what is queued before waiting again: one wake-up, many batches.
        loop {
            let n = match sock.try_io(Interest::READABLE, || inbox.recv(fd)) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("dns udp: {e}");
                    break;
                }
            };
            let generation = generation(&shared);
            // Each query's time runs from its batch's arrival.
            let arrived = Instant::now();
            let stats = &shared.stats;
            for i in 0..n {
                let (packet, from) = inbox.get(i);
                if shared.answer_cache
                    && cache.answer(generation, packet, &mut outbox, from, (stats, arrived))
                {
                    continue;
                }
                match decide(&shared, &querier, packet, false) {
                    Action::Answer(bytes) => {
                        if shared.answer_cache {
                            cache.put(packet, &bytes);
                        }
                        outbox.push(&bytes, from);
                        stats.query(packet, Some(&bytes), arrived.elapsed());
                    }
                    Action::Reply(bytes) => {
                        outbox.push(&bytes, from);
                        stats.query(packet, Some(&bytes), arrived.elapsed());
                    }
                    Action::Forward(request) => {
                        let (shared, sock) = (shared.clone(), sock.clone());
                        let asker = querier.clone();
                        let packet = packet.to_vec();
                        tokio::spawn(async move {
                            let bytes = forwarded(&shared, &asker, &request, false).await;
                            let _ = sock.send_to(&bytes, from).await;
                            shared.stats.query(&packet, Some(&bytes), arrived.elapsed());
                        });
                    }
                    Action::Drop => stats.query(packet, None, arrived.elapsed()),
                }
            }
            outbox.flush(fd);
        }
    }
}

async fn serve_tcp(shared: Arc<Shared>, querier: Arc<Asker>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNS));
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("dns tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Over the limit: close at once rather than queue.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(conn);
            continue;
        };
        let (shared, querier) = (shared.clone(), querier.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_conn(&shared, &querier, conn).await {
                tracing::debug!(%peer, "dns tcp: {e}");
            }
        });
    }
}

/// Queries on one TCP connection (RFC 7766: 2-byte length, then the message).
async fn serve_conn(shared: &Shared, querier: &Asker, mut conn: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 65535];
    loop {
        let mut len = [0u8; 2];
        match timeout(TCP_IDLE, conn.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()), // idle, closed, or stalled mid-length: done
        }
        let len = u16::from_be_bytes(len) as usize;
        match timeout(TCP_IDLE, conn.read_exact(&mut buf[..len])).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let arrived = Instant::now();
        let packet = &buf[..len];
        let reply = match decide(shared, querier, packet, true) {
            Action::Reply(bytes) | Action::Answer(bytes) => bytes,
            Action::Forward(request) => forwarded(shared, querier, &request, true).await,
            Action::Drop => {
                shared.stats.query(packet, None, arrived.elapsed());
                return Ok(());
            }
        };
        shared.stats.query(packet, Some(&reply), arrived.elapsed());
        let Ok(n) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        conn.write_all(&n.to_be_bytes()).await?;
        conn.write_all(&reply).await?;
    }
}

/// The address the embedded DNS serves in every task, as Docker's.
pub const DNS_ADDR: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 11)),
    53,
);
