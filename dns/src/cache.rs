//! Answers from upstream, kept for their time to live: a name a task asks again (every
//! HTTP client resolves its peer before each connection) is answered from memory instead
//! of another round trip to the node's resolvers, as any stub or caching resolver
//! would. Shared by every task of the node: these are the node's resolvers' answers,
//! the same for all of them.
//!
//! What is kept, and how long: a positive answer for the smallest TTL of its answer
//! records (at most [`MAX_TTL`]); a negative one (NXDOMAIN, or no data) for its SOA's
//! negative TTL (RFC 2308: the smaller of the SOA record's TTL and its MINIMUM, at most
//! [`MAX_NEGATIVE_TTL`]), and not at all without an SOA. Truncated answers, failures and
//! TTL 0 are never kept. An answer given from the cache carries TTLs aged by the time it
//! was kept, so no client keeps it longer than the upstream said.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;

/// The longest any answer is kept, whatever its TTL.
pub const MAX_TTL: u32 = 3600;
/// The longest a negative answer is kept: a name that does not exist yet may soon.
pub const MAX_NEGATIVE_TTL: u32 = 60;
/// Entries kept at most; past it, expired ones go, and if none has, the cache starts
/// over (a flood of distinct names must not grow it without bound).
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// Lower case: DNS names compare without case.
    name: String,
    qtype: u16,
    qclass: u16,
}

struct Cached {
    reply: Message,
    stored: Instant,
    ttl: u32,
}

#[derive(Default)]
pub struct ForwardCache {
    entries: Mutex<HashMap<Key, Cached>>,
}

/// The key of a request with exactly one question.
fn key(request: &Message) -> Option<Key> {
    let [q] = request.queries.as_slice() else {
        return None;
    };
    Some(Key {
        name: q.name().to_ascii().to_ascii_lowercase(),
        qtype: u16::from(q.query_type()),
        qclass: u16::from(q.query_class()),
    })
}

/// How long `reply` may be kept (None: not at all).
fn keep_for(reply: &Message) -> Option<u32> {
    if reply.metadata.truncation {
        return None;
    }
    let ttl = match reply.metadata.response_code {
        ResponseCode::NoError if !reply.answers.is_empty() => {
            reply.answers.iter().map(|r| r.ttl).min()?.min(MAX_TTL)
        }
        ResponseCode::NoError | ResponseCode::NXDomain => reply
            .authorities
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })?
            .min(MAX_NEGATIVE_TTL),
        _ => return None,
    };
    (ttl > 0).then_some(ttl)
}

impl ForwardCache {
    /// The kept answer to `request` at `now`, its TTLs aged; None if there is none or it
    /// expired.
    pub fn get(&self, request: &Message, now: Instant) -> Option<Message> {
        let key = key(request)?;
        let mut entries = self.entries.lock().ok()?;
        let c = entries.get(&key)?;
        let age = now.saturating_duration_since(c.stored).as_secs();
        let Ok(age) = u32::try_from(age) else {
            entries.remove(&key);
            return None;
        };
        if age >= c.ttl {
            entries.remove(&key);
            return None;
        }
        let mut reply = c.reply.clone();
        drop(entries);
        for r in reply
            .answers
            .iter_mut()
            .chain(reply.authorities.iter_mut())
            .chain(reply.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(reply)
    }

    /// Keeps upstream's `reply` to `request` (received at `now`) if it may be kept.
    pub fn put(&self, request: &Message, reply: &Message, now: Instant) {
        let Some(key) = key(request) else {
            return;
        };
        let Some(ttl) = keep_for(reply) else {
            return;
        };
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, c| {
                now.saturating_duration_since(c.stored) < Duration::from_secs(c.ttl.into())
            });
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            key,
            Cached {
                reply: reply.clone(),
                stored: now,
                ttl,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, Query};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, Record, RecordType};

    fn request(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    fn reply_to(req: &Message, code: ResponseCode) -> Message {
        let mut m = req.clone();
        m.metadata.message_type = MessageType::Response;
        m.metadata.response_code = code;
        m
    }

    fn a(name: &str, ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            ttl,
            RData::A(A::new(198, 18, 0, 100)),
        )
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        let n = Name::from_ascii("example.org.").unwrap();
        Record::from_rdata(
            n.clone(),
            ttl,
            RData::SOA(SOA::new(n.clone(), n, 1, 60, 60, 60, minimum)),
        )
    }

    /// What upstream sent, as bytes off the wire: only what parses is kept.
    fn put_bytes(c: &ForwardCache, req: &Message, bytes: &[u8], now: Instant) {
        if let Ok(m) = Message::from_vec(bytes) {
            c.put(req, &m, now);
        }
    }

    fn ttls(m: &Message) -> Vec<u32> {
        m.answers
            .iter()
            .chain(&m.authorities)
            .map(|r| r.ttl)
            .collect()
    }

    #[test]
    fn a_positive_answer_is_kept_for_its_smallest_ttl_and_ages() {
        let c = ForwardCache::default();
        let t0 = Instant::now();
        let req = request("outside.example.org.", RecordType::A);
        let mut r = reply_to(&req, ResponseCode::NoError);
        r.add_answer(a("outside.example.org.", 300));
        r.add_answer(a("outside.example.org.", 120));
        put_bytes(&c, &req, &r.to_vec().unwrap(), t0);
        // Asked again 20 s later (in another case): the TTLs have aged by 20 s.
        let again = request("OUTSIDE.example.org.", RecordType::A);
        let hit = c.get(&again, t0 + Duration::from_secs(20)).expect("kept");
        assert_eq!(ttls(&hit), vec![280, 100]);
        // Another type is another question.
        assert!(c
            .get(&request("outside.example.org.", RecordType::AAAA), t0)
            .is_none());
        // Gone when the smallest TTL ran out.
        assert!(c.get(&req, t0 + Duration::from_secs(120)).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn negative_answers_follow_their_soa_and_failures_are_never_kept() {
        let c = ForwardCache::default();
        let t0 = Instant::now();
        let req = request("nosuch.example.org.", RecordType::A);
        let mut nx = reply_to(&req, ResponseCode::NXDomain);
        nx.add_authority(soa(300, 30));
        put_bytes(&c, &req, &nx.to_vec().unwrap(), t0);
        assert!(c.get(&req, t0 + Duration::from_secs(29)).is_some());
        assert!(c.get(&req, t0 + Duration::from_secs(30)).is_none());
        // Capped: an SOA asking for an hour gets a minute.
        let mut long = reply_to(&req, ResponseCode::NXDomain);
        long.add_authority(soa(3600, 3600));
        put_bytes(&c, &req, &long.to_vec().unwrap(), t0);
        assert!(c
            .get(&req, t0 + Duration::from_secs(MAX_NEGATIVE_TTL.into()))
            .is_none());
        // Not kept: NXDOMAIN without an SOA, SERVFAIL, truncated, TTL 0, garbage.
        let bare = reply_to(&req, ResponseCode::NXDomain);
        let fail = reply_to(&req, ResponseCode::ServFail);
        let mut cut = reply_to(&req, ResponseCode::NoError);
        cut.metadata.truncation = true;
        cut.add_answer(a("nosuch.example.org.", 60));
        let mut zero = reply_to(&req, ResponseCode::NoError);
        zero.add_answer(a("nosuch.example.org.", 0));
        for m in [bare, fail, cut, zero] {
            put_bytes(&c, &req, &m.to_vec().unwrap(), t0);
            assert!(c.get(&req, t0).is_none(), "{m:?} was kept");
        }
        put_bytes(&c, &req, b"\x01\x02garbage", t0);
        assert!(c.is_empty());
    }

    #[test]
    fn a_flood_of_distinct_names_does_not_grow_it_without_bound() {
        let c = ForwardCache::default();
        let t0 = Instant::now();
        for i in 0..MAX_ENTRIES + 10 {
            let name = format!("n{i}.example.org.");
            let req = request(&name, RecordType::A);
            let mut r = reply_to(&req, ResponseCode::NoError);
            r.add_answer(a(&name, 60));
            put_bytes(&c, &req, &r.to_vec().unwrap(), t0);
        }
        assert!(c.len() <= MAX_ENTRIES);
    }
}
