//! Forwarding names that are not the cluster's to the node's resolvers: a small client of
//! our own (hickory's forwarder is known to drop queries under load). Each forward uses a
//! fresh UDP socket on a random port and a fresh query id, accepts only a matching
//! answer, retries over TCP when the answer is truncated, and gives up on a server after
//! its share of a total budget that stays inside a stub resolver's own timeout. At most
//! `MAX_IN_FLIGHT` forwards run at once; past that the client gets REFUSED at once. An
//! answer that may be kept is, for its TTL (`crate::cache`), and asked again from memory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};

/// Docker's limit on concurrent forwards.
pub const MAX_IN_FLIGHT: usize = 1024;
/// glibc and dig wait 5 s for an answer: SERVFAIL must come before that.
pub const TOTAL_BUDGET: Duration = Duration::from_secs(3);
/// Docker forwards to at most 3 servers.
pub const MAX_SERVERS: usize = 3;
/// How long a query over UDP waits for its answer before it goes again (at most half
/// its server's share of the budget): one datagram lost on the way (a neighbour still
/// being resolved, a port of the path just coming up) must not make the answer
/// SERVFAIL, as a stub resolver also asks again.
pub const RESEND_AFTER: Duration = Duration::from_secs(1);

/// The node's resolver settings, as read from resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub servers: Vec<SocketAddr>,
    pub search: Vec<String>,
}

impl ResolvConf {
    /// Parses resolv.conf text. Loopback servers (a local stub such as systemd-resolved)
    /// are left out: they are not reachable from the node netns a task's queries leave.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words
                        .next()
                        .and_then(|w| w.parse::<std::net::IpAddr>().ok())
                    {
                        if !ip.is_loopback() && conf.servers.len() < MAX_SERVERS {
                            conf.servers.push(SocketAddr::new(ip, 53));
                        }
                    }
                }
                Some("search") | Some("domain") => {
                    conf.search = words.map(|w| w.trim_end_matches('.').to_string()).collect();
                }
                _ => {}
            }
        }
        conf
    }
}

#[derive(Debug)]
pub enum ForwardError {
    /// Too many forwards in flight.
    Busy,
    /// No server gave a usable answer within the budget.
    Failed,
}

pub struct Upstream {
    servers: Vec<SocketAddr>,
    in_flight: Arc<Semaphore>,
    /// Answers kept for their TTL (see `crate::cache`).
    cache: crate::cache::ForwardCache,
}

/// Whether `reply` answers `query` (same id, a response, the same question).
fn answers(reply: &Message, query: &Message) -> bool {
    reply.metadata.id == query.metadata.id
        && reply.metadata.message_type == hickory_proto::op::MessageType::Response
        && reply.queries.len() == query.queries.len()
        && reply.queries.iter().zip(&query.queries).all(|(a, b)| {
            a.query_type() == b.query_type()
                && a.name()
                    .to_ascii()
                    .eq_ignore_ascii_case(&b.name().to_ascii())
        })
}

/// Asks `server` over UDP, the same query again each `resend` without an answer.
async fn over_udp(
    server: SocketAddr,
    bytes: &[u8],
    query: &Message,
    resend: Duration,
) -> Option<(Message, bool)> {
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.ok()?;
    sock.connect(server).await.ok()?;
    sock.send(bytes).await.ok()?;
    let mut again = Instant::now() + resend;
    let mut buf = vec![0u8; 65535];
    loop {
        // A refused port (ICMP) fails the receive at once: next server.
        let n = match tokio::time::timeout_at(again, sock.recv(&mut buf)).await {
            Ok(received) => received.ok()?,
            Err(_) => {
                // The same query again (same id: a late answer to either matches).
                sock.send(bytes).await.ok()?;
                again = Instant::now() + resend;
                continue;
            }
        };
        if let Ok(reply) = Message::from_vec(&buf[..n]) {
            if answers(&reply, query) {
                let truncated = reply.metadata.truncation;
                return Some((reply, truncated));
            }
        }
        // Anything else is not our answer (spoofed or stale): keep waiting.
    }
}

async fn over_tcp(server: SocketAddr, bytes: &[u8], query: &Message) -> Option<Message> {
    let mut s = TcpStream::connect(server).await.ok()?;
    let len = u16::try_from(bytes.len()).ok()?;
    s.write_all(&len.to_be_bytes()).await.ok()?;
    s.write_all(bytes).await.ok()?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.ok()?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.ok()?;
    let reply = Message::from_vec(&buf).ok()?;
    answers(&reply, query).then_some(reply)
}

impl Upstream {
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Upstream {
            servers: servers.into_iter().take(MAX_SERVERS).collect(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            cache: Default::default(),
        }
    }

    /// Answers kept from upstream right now.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The answer to `request`: from the cache while it holds one, else from the
    /// servers in turn (the first matching answer, parsed once, with our id: the caller
    /// relays it under the client's), kept if it may be.
    pub async fn forward(&self, request: &Message) -> Result<Message, ForwardError> {
        if let Some(kept) = self.cache.get(request, std::time::Instant::now()) {
            return Ok(kept);
        }
        let reply = self.ask(request).await?;
        self.cache.put(request, &reply, std::time::Instant::now());
        Ok(reply)
    }

    async fn ask(&self, request: &Message) -> Result<Message, ForwardError> {
        let _permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ForwardError::Busy)?;
        if self.servers.is_empty() {
            return Err(ForwardError::Failed);
        }
        let mut query = request.clone();
        query.metadata.id = rand::random();
        let bytes = query.to_vec().map_err(|_| ForwardError::Failed)?;
        let deadline = Instant::now() + TOTAL_BUDGET;
        let share = TOTAL_BUDGET / self.servers.len() as u32;
        for server in &self.servers {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = share.min(left);
            // At least once within the share, however many servers split the budget.
            let resend = RESEND_AFTER.min(wait / 2);
            match timeout(wait, over_udp(*server, &bytes, &query, resend)).await {
                Ok(Some((reply, false))) => return Ok(reply),
                Ok(Some((udp_reply, true))) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match timeout(left, over_tcp(*server, &bytes, &query)).await {
                        Ok(Some(reply)) => return Ok(reply),
                        // TCP failed: the truncated answer is still an answer.
                        _ => return Ok(udp_reply),
                    }
                }
                _ => continue,
            }
        }
        Err(ForwardError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_gives_up_to_three_reachable_servers_and_the_search_list() {
        let conf = ResolvConf::parse(
            "# comment\nnameserver 127.0.0.53\nnameserver 198.18.0.3\nsearch lab.example corp.\n\
             nameserver 198.18.0.4\nnameserver 198.18.0.5\nnameserver 198.18.0.6\noptions ndots:1\n",
        );
        assert_eq!(
            conf.servers,
            vec![
                "198.18.0.3:53".parse().unwrap(),
                "198.18.0.4:53".parse().unwrap(),
                "198.18.0.5:53".parse().unwrap()
            ]
        );
        assert_eq!(conf.search, vec!["lab.example", "corp"]);
        assert_eq!(ResolvConf::parse(""), ResolvConf::default());
    }

    /// A server whose first query is lost still answers within the budget: the query
    /// goes again after `RESEND_AFTER`, with the same id. Real sockets, in a network
    /// namespace of the test's own (root needed, as for the lab).
    #[test]
    fn a_lost_query_is_asked_again_and_answered() {
        use hickory_proto::op::Query;
        use hickory_proto::rr::{Name, RData, Record, RecordType};
        let got = std::thread::spawn(|| -> Result<(Vec<u16>, Vec<String>), String> {
            // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "unshare a network namespace (needs root): {}",
                    std::io::Error::last_os_error()
                ));
            }
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .map_err(|e| e.to_string())?;
            if !up.success() {
                return Err("ip link set lo up".into());
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let server = UdpSocket::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                let addr = server.local_addr().map_err(|e| e.to_string())?;
                let serve = async move {
                    let mut buf = vec![0u8; 512];
                    let mut ids = vec![];
                    // The first query is dropped; the second answered.
                    for _ in 0..2 {
                        let (n, from) = server.recv_from(&mut buf).await.ok()?;
                        let q = Message::from_vec(&buf[..n]).ok()?;
                        ids.push(q.metadata.id);
                        if ids.len() == 2 {
                            let mut a = q.clone();
                            a.metadata.message_type = hickory_proto::op::MessageType::Response;
                            let name = q.queries[0].name().clone();
                            a.answers.push(Record::from_rdata(
                                name,
                                60,
                                RData::A(std::net::Ipv4Addr::new(198, 18, 0, 100).into()),
                            ));
                            server.send_to(&a.to_vec().ok()?, from).await.ok()?;
                        }
                    }
                    Some(ids)
                };
                let name = Name::from_ascii("outside.example.org.").map_err(|e| e.to_string())?;
                let mut request = Message::query();
                request.add_query(Query::query(name, RecordType::A));
                let upstream = Upstream::new(vec![addr]);
                // Bounded: without the resend, the second query never comes.
                let serve = tokio::time::timeout(Duration::from_secs(5), serve);
                let (ids, reply) = tokio::join!(serve, upstream.forward(&request));
                let ids = ids.map_err(|_| "the server got one query: none was sent again")?;
                let reply = reply.map_err(|e| format!("{e:?}"))?;
                let answers = reply.answers.iter().map(|r| r.data.to_string()).collect();
                Ok((ids.ok_or("the server")?, answers))
            })
        })
        .join()
        .expect("the test's thread");
        let (ids, answers) = got.expect("in a namespace of its own");
        assert_eq!(ids.len(), 2, "asked twice");
        assert_eq!(ids[0], ids[1], "with the same id");
        assert_eq!(answers, vec!["198.18.0.100".to_string()]);
    }
}
