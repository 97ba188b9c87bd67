//! The request path: one packet in, one decision out (answer, forward, or drop). Pure
//! and synchronous, so every malformed input can be thrown at it in a test. Headers are
//! checked by hand before the full parse: a packet too short to carry an id is dropped, a
//! response is never answered (no reflection loops), and counts a query cannot have are
//! FORMERR before any allocation sized by them.

use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::table::{Lookup, Table};

/// Largest UDP answer we advertise and send (the DNS flag day 2020 value: no IP
/// fragmentation on any common path).
pub const EDNS_PAYLOAD: u16 = 1232;
const HEADER_LEN: usize = 12;

/// What to do with a packet.
#[derive(Debug)]
pub enum Action {
    Reply(Vec<u8>),
    /// An answer from the table that is the same for the same request bytes (after the
    /// id) until the table changes: the server may cache it (no rotation in it).
    Answer(Vec<u8>),
    /// Not a cluster name: ask upstream, then [`relay`] the answer.
    Forward(Box<Message>),
    /// Not worth an answer (too short to carry an id, or itself a response).
    Drop,
}

impl Action {
    /// The bytes to send back, if this is an answer.
    pub fn reply(&self) -> Option<&[u8]> {
        match self {
            Action::Reply(b) | Action::Answer(b) => Some(b),
            _ => None,
        }
    }
}

/// A header-only answer (FORMERR, NOTIMP, ...) for a packet we could not parse further.
fn header_error(packet: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let id = [packet[0], packet[1]];
    let opcode = packet[2] & 0x78; // the request's 4 opcode bits, in place
    let rd = packet[2] & 0x01;
    let flags_hi = 0x80 | opcode | rd; // QR=1
    let flags_lo = 0x80 | (rcode.low() & 0x0f); // RA=1
    let mut out = vec![0u8; HEADER_LEN];
    out[..2].copy_from_slice(&id);
    out[2] = flags_hi;
    out[3] = flags_lo;
    out
}

/// How large an answer may be on this transport for this request.
fn size_limit(request: &Message, tcp: bool) -> usize {
    if tcp {
        return u16::MAX as usize;
    }
    match &request.edns {
        Some(e) => e.max_payload().clamp(512, EDNS_PAYLOAD) as usize,
        None => 512,
    }
}

fn response_to(request: &Message, rcode: ResponseCode) -> Message {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.recursion_available = true;
    metadata.response_code = rcode;
    let mut m = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata = metadata;
    m.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// Encodes `m`, cut down to a truncated (TC) answer if it does not fit `limit`.
fn encode(m: &Message, limit: usize) -> Vec<u8> {
    match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        Ok(_) => m.truncate().to_vec().unwrap_or_default(),
        Err(_) => {
            let mut fail = m.truncate();
            fail.answers.clear();
            fail.metadata.truncation = false;
            fail.metadata.response_code = ResponseCode::ServFail;
            fail.to_vec().unwrap_or_default()
        }
    }
}

fn fqdn(name: &str) -> Option<Name> {
    let mut n = Name::from_ascii(name).ok()?;
    n.set_fqdn(true);
    Some(n)
}

fn a_records(name: &Name, ips: &[Ipv4Addr], ttl: u32) -> Vec<Record> {
    ips.iter()
        .map(|ip| Record::from_rdata(name.clone(), ttl, RData::A(A(*ip))))
        .collect()
}

/// Decides what to answer to `packet` from a querier on `networks`.
pub fn handle(packet: &[u8], tcp: bool, table: &Table, networks: &[String]) -> Action {
    if packet.len() < HEADER_LEN {
        return Action::Drop;
    }
    if packet[2] & 0x80 != 0 {
        return Action::Drop; // QR=1: a response, not a question
    }
    let opcode = (packet[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Action::Reply(header_error(packet, ResponseCode::NotImp));
    }
    let qdcount = u16::from_be_bytes([packet[4], packet[5]]);
    let ancount = u16::from_be_bytes([packet[6], packet[7]]);
    if qdcount != 1 || ancount != 0 {
        return Action::Reply(header_error(packet, ResponseCode::FormErr));
    }
    let request = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => return Action::Reply(header_error(packet, ResponseCode::FormErr)),
    };
    let limit = size_limit(&request, tcp);
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Action::Reply(encode(&response_to(&request, ResponseCode::BADVERS), limit));
    }
    let query: &Query = &request.queries[0];
    if query.query_class() != DNSClass::IN {
        return Action::Reply(encode(&response_to(&request, ResponseCode::Refused), limit));
    }
    let qtype = query.query_type();
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        return Action::Reply(encode(&response_to(&request, ResponseCode::NotImp), limit));
    }
    let qname = query.name().clone();
    let text = qname.to_ascii();
    let lookup = if qtype == RecordType::SRV {
        table.lookup_srv(networks, &text)
    } else {
        table.lookup_name(networks, &text)
    };
    let mut resp = response_to(&request, ResponseCode::NoError);
    resp.metadata.authoritative = true;
    // Several addresses come rotated: such an answer changes from one query to the next.
    let stable = match &lookup {
        Lookup::Addrs { ips, .. } | Lookup::Srv { ips, .. } => ips.len() <= 1,
        _ => true,
    };
    match lookup {
        Lookup::Forward => return Action::Forward(Box::new(request)),
        Lookup::NxDomain => resp.metadata.response_code = ResponseCode::NXDomain,
        Lookup::Addrs { ips, ttl } => {
            if matches!(qtype, RecordType::A | RecordType::ANY) {
                resp.add_answers(a_records(&qname, &ips, ttl));
            }
        }
        Lookup::Ptr { name, ttl } => {
            if matches!(qtype, RecordType::PTR | RecordType::ANY) {
                if let Some(target) = fqdn(&name) {
                    resp.add_answer(Record::from_rdata(qname, ttl, RData::PTR(PTR(target))));
                }
            }
        }
        Lookup::Srv {
            port,
            target,
            ips,
            ttl,
        } => {
            if let Some(target) = fqdn(&target) {
                resp.add_answer(Record::from_rdata(
                    qname,
                    ttl,
                    RData::SRV(SRV::new(0, 0, port, target.clone())),
                ));
                resp.add_additionals(a_records(&target, &ips, ttl));
            }
        }
    }
    let bytes = encode(&resp, limit);
    if stable {
        Action::Answer(bytes)
    } else {
        Action::Reply(bytes)
    }
}

/// Turns an upstream's answer into the answer to `request`: the client's id, and cut to
/// the client's size limit. Anything unusable from upstream becomes SERVFAIL.
pub fn relay(upstream: Option<Message>, request: &Message, tcp: bool) -> Vec<u8> {
    let limit = size_limit(request, tcp);
    match upstream {
        Some(mut m) if m.metadata.message_type == MessageType::Response => {
            m.metadata.id = request.metadata.id;
            // Our own EDNS view to the client, whatever the upstream said.
            m.edns = request.edns.as_ref().map(|_| {
                let mut e = Edns::new();
                e.set_max_payload(EDNS_PAYLOAD);
                e
            });
            encode(&m, limit)
        }
        _ => encode(&response_to(request, ResponseCode::ServFail), limit),
    }
}

/// The answer to a forward the upstream path refused (too many in flight).
pub fn refused(request: &Message, tcp: bool) -> Vec<u8> {
    encode(
        &response_to(request, ResponseCode::Refused),
        size_limit(request, tcp),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Mode, ServiceRecord, TaskRecord, Ttls};
    use rand::{Rng, SeedableRng};

    fn table() -> Table {
        let mut t = Table::new(Ttls::default(), vec![]);
        t.upsert_service(ServiceRecord {
            name: "web".into(),
            aliases: vec![],
            mode: Mode::Vip,
            networks: vec![("front".into(), Some("198.19.10.2".parse().unwrap()))],
            ports: vec![crate::table::Port {
                port: 80,
                udp: false,
            }],
        });
        t.upsert_service(ServiceRecord {
            name: "big".into(),
            aliases: vec![],
            mode: Mode::Dnsrr,
            networks: vec![("front".into(), None)],
            ports: vec![],
        });
        for i in 0..200u32 {
            t.upsert_task(TaskRecord {
                id: format!("t{i}"),
                name: format!("big-{i}"),
                service: "big".into(),
                addrs: vec![(
                    "front".into(),
                    std::net::Ipv4Addr::from(0xc6130000 | (i + 10)),
                )],
                serving: true,
            });
        }
        t
    }

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn ask(packet: &[u8], tcp: bool) -> Message {
        let action = handle(packet, tcp, &table(), &["front".to_string()]);
        match action.reply() {
            Some(bytes) => Message::from_vec(bytes).expect("our answer parses"),
            None => panic!("expected a reply, got {action:?}"),
        }
    }

    #[test]
    fn answers_a_with_the_vip_and_aaaa_with_nodata() {
        let r = ask(&query("Web.", RecordType::A, None), false);
        assert_eq!(r.metadata.id, 0x4242);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert!(r.metadata.authoritative && r.metadata.recursion_desired);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(
            r.answers[0].data,
            RData::A(A("198.19.10.2".parse().unwrap()))
        );
        assert_eq!(r.answers[0].ttl, 600);
        let r = ask(&query("web.", RecordType::AAAA, None), false);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        let r = ask(&query("nosuch.", RecordType::A, None), false);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn srv_names_the_service_and_carries_its_address() {
        let r = ask(&query("_80._tcp.web.", RecordType::SRV, None), false);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        let RData::SRV(srv) = &r.answers[0].data else {
            panic!("not an SRV answer: {r:?}");
        };
        assert_eq!((srv.port, srv.target.to_ascii()), (80, "web.".to_string()));
        assert_eq!(
            r.additionals[0].data,
            RData::A(A("198.19.10.2".parse().unwrap()))
        );
        let r = ask(&query("_81._tcp.web.", RecordType::SRV, None), false);
        assert!(r.answers.is_empty() && r.metadata.response_code == ResponseCode::NoError);
    }

    #[test]
    fn big_answers_are_truncated_on_udp_and_whole_on_tcp() {
        let r = ask(&query("big.", RecordType::A, None), false);
        assert!(r.metadata.truncation && r.answers.is_empty());
        // EDNS raises the limit to our 1232, still too small for 200 addresses.
        let r = ask(&query("big.", RecordType::A, Some(4096)), false);
        assert!(r.metadata.truncation);
        assert_eq!(r.edns.as_ref().map(|e| e.max_payload()), Some(EDNS_PAYLOAD));
        let r = ask(&query("big.", RecordType::A, None), true);
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 200);
        // A small answer with EDNS carries an OPT record back.
        let r = ask(&query("web.", RecordType::A, Some(1232)), false);
        assert!(r.edns.is_some() && !r.metadata.truncation);
    }

    #[test]
    fn malformed_and_unsupported_requests_get_the_right_error() {
        let t = table();
        let nets = ["front".to_string()];
        let run = |p: &[u8]| handle(p, false, &t, &nets);
        assert!(matches!(run(&[]), Action::Drop));
        assert!(matches!(run(&[1, 2, 3]), Action::Drop));
        let mut resp = query("web.", RecordType::A, None);
        resp[2] |= 0x80; // a response: never answered
        assert!(matches!(run(&resp), Action::Drop));
        let rcode = |a: Action| match a.reply() {
            Some(b) => (u16::from_be_bytes([b[0], b[1]]), b[3] & 0x0f),
            None => panic!("{a:?}"),
        };
        let mut status = query("web.", RecordType::A, None);
        status[2] = (status[2] & 0x87) | (2 << 3); // opcode STATUS
        assert_eq!(rcode(run(&status)), (0x4242, 4)); // NOTIMP
        let mut two = query("web.", RecordType::A, None);
        two[5] = 2; // QDCOUNT 2
        assert_eq!(rcode(run(&two)), (0x4242, 1)); // FORMERR
        let mut cut = query("web.", RecordType::A, None);
        cut.truncate(cut.len() - 3);
        assert_eq!(rcode(run(&cut)), (0x4242, 1));
        // 127 labels of one byte: a legal-length but absurd name, still a question
        // (not ours: it goes upstream like any other).
        let long = vec!["a"; 127].join(".") + ".";
        assert!(matches!(
            run(&query(&long, RecordType::A, None)),
            Action::Forward(_)
        ));
        let mut v1 = Message::from_vec(&query("web.", RecordType::A, Some(1232))).unwrap();
        if let Some(e) = v1.edns.as_mut() {
            e.set_version(1);
        }
        let r = Message::from_vec(run(&v1.to_vec().unwrap()).reply().expect("a reply")).unwrap();
        // RCODE 16 (BADVERS; the registry shares the value with BADSIG).
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert!(matches!(
            run(&query("example.org.", RecordType::A, None)),
            Action::Forward(_)
        ));
    }

    /// The fuzz target of the request path, run for a bounded number of inputs: random
    /// bytes, and valid queries with random bytes flipped. Nothing may panic, and every
    /// reply must be a well-formed response to the packet's id.
    #[test]
    fn random_and_mutated_packets_never_panic_and_replies_are_well_formed() {
        let t = table();
        let nets = ["front".to_string()];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e657464);
        let seeds: Vec<Vec<u8>> = [
            query("web.", RecordType::A, None),
            query("big.", RecordType::A, Some(4096)),
            query("_80._tcp.web.", RecordType::SRV, None),
            query("2.10.19.198.in-addr.arpa.", RecordType::PTR, None),
        ]
        .into();
        for i in 0..100_000 {
            let packet: Vec<u8> = if i % 2 == 0 {
                let len = rng.random_range(0..600);
                (0..len).map(|_| rng.random()).collect()
            } else {
                let mut p = seeds[i % seeds.len()].clone();
                for _ in 0..rng.random_range(1..6) {
                    let at = rng.random_range(0..p.len());
                    p[at] = rng.random();
                }
                if rng.random_bool(0.2) {
                    p.truncate(rng.random_range(0..p.len()));
                }
                p
            };
            for tcp in [false, true] {
                if let Some(bytes) = handle(&packet, tcp, &t, &nets).reply() {
                    assert!(bytes.len() >= 12, "short reply to {packet:?}");
                    assert_eq!(bytes[..2], packet[..2], "reply id differs");
                    assert!(bytes[2] & 0x80 != 0, "reply without QR");
                    if !tcp {
                        assert!(bytes.len() <= EDNS_PAYLOAD as usize, "oversized UDP reply");
                    }
                }
            }
        }
    }
}
