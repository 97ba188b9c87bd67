//! What the DNS answered, counted for `/metrics`: queries by type and result, how long
//! they took, and the forwards upstream. Fixed arrays of relaxed atomics, so counting
//! costs a few additions per query and no lock or allocation on the answer path; the
//! metrics endpoint reads them whenever it is scraped.
//!
//! Type and result come from the bytes already at hand (the question's type after its
//! name, the answer's RCODE), not from a second parse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The query types counted apart; every other type counts as `other`.
pub const TYPES: [(&str, u16); 6] = [
    ("A", 1),
    ("AAAA", 28),
    ("SRV", 33),
    ("PTR", 12),
    ("TXT", 16),
    ("MX", 15),
];
const OTHER_TYPE: usize = TYPES.len();

/// Results: the answer's RCODE by name; `dropped` for a packet that got no answer at
/// all (not a query, or too malformed to answer).
pub const RESULTS: [&str; 7] = [
    "noerror", "formerr", "servfail", "nxdomain", "notimp", "refused", "other",
];
const DROPPED: usize = RESULTS.len();

/// Upper bounds of the latency buckets, in seconds (the last bucket is +Inf).
pub const BUCKETS: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.5, 2.0,
];

/// Why a forward gave no upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardFailure {
    /// Refused at once: the task's share or the node's slots were in use.
    Busy,
    /// No server answered usably within the budget.
    Failed,
}

/// The counters. One per process, shared by every listener.
#[derive(Debug)]
pub struct Stats {
    /// [type][result], results plus `dropped`.
    queries: [[AtomicU64; RESULTS.len() + 1]; TYPES.len() + 1],
    /// Per bucket (not cumulative), plus +Inf.
    latency: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
    forwards: AtomicU64,
    forward_busy: AtomicU64,
    forward_failed: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            queries: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ns: AtomicU64::new(0),
            forwards: AtomicU64::new(0),
            forward_busy: AtomicU64::new(0),
            forward_failed: AtomicU64::new(0),
        }
    }
}

/// A copy of the counters at one moment, for an exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// (type, result, count) for every pair counted at least once.
    pub queries: Vec<(&'static str, &'static str, u64)>,
    /// Cumulative count per bucket of [`BUCKETS`], then the total (+Inf).
    pub latency_buckets: Vec<u64>,
    pub latency_sum_seconds: f64,
    pub forwards: u64,
    pub forward_busy: u64,
    pub forward_failed: u64,
}

impl Stats {
    /// One query `packet` answered with `answer` (None: dropped unanswered), `took`
    /// from its arrival to its answer's sending.
    pub fn query(&self, packet: &[u8], answer: Option<&[u8]>, took: Duration) {
        let result = match answer {
            None => DROPPED,
            Some(a) => rcode_index(a),
        };
        self.queries[type_index(packet)][result].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A name sent upstream.
    pub fn forward(&self) {
        self.forwards.fetch_add(1, Ordering::Relaxed);
    }

    /// A forward that got no upstream answer.
    pub fn forward_failed(&self, why: ForwardFailure) {
        let c = match why {
            ForwardFailure::Busy => &self.forward_busy,
            ForwardFailure::Failed => &self.forward_failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut queries = vec![];
        for (t, row) in self.queries.iter().enumerate() {
            let ty = TYPES.get(t).map_or("other", |(name, _)| *name);
            for (r, n) in row.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    queries.push((ty, RESULTS.get(r).copied().unwrap_or("dropped"), n));
                }
            }
        }
        let mut total = 0;
        let latency_buckets = self
            .latency
            .iter()
            .map(|n| {
                total += n.load(Ordering::Relaxed);
                total
            })
            .collect();
        Snapshot {
            queries,
            latency_buckets,
            latency_sum_seconds: self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            forwards: self.forwards.load(Ordering::Relaxed),
            forward_busy: self.forward_busy.load(Ordering::Relaxed),
            forward_failed: self.forward_failed.load(Ordering::Relaxed),
        }
    }
}

/// The index of the question's type in [`TYPES`] (`other` when there is none, or the
/// name runs past the packet or uses a pointer, which a question's name never needs).
fn type_index(packet: &[u8]) -> usize {
    // The question starts after the 12-byte header: a name of length-prefixed labels
    // ending with a 0 byte, then QTYPE (2 bytes).
    let mut at = 12;
    loop {
        let Some(&len) = packet.get(at) else {
            return OTHER_TYPE;
        };
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return OTHER_TYPE;
        }
        at += 1 + len as usize;
    }
    let Some(q) = packet.get(at + 1..at + 3) else {
        return OTHER_TYPE;
    };
    let qtype = u16::from_be_bytes([q[0], q[1]]);
    TYPES
        .iter()
        .position(|(_, t)| *t == qtype)
        .unwrap_or(OTHER_TYPE)
}

/// The index of an answer's RCODE (the low 4 bits of its fourth byte) in [`RESULTS`].
fn rcode_index(answer: &[u8]) -> usize {
    match answer.get(3).map(|b| b & 0x0F) {
        Some(code @ 0..=5) => code as usize,
        _ => RESULTS.len() - 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` of type `qtype`, as a stub resolver sends it.
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        p
    }

    fn answer(rcode: u8) -> Vec<u8> {
        vec![0x12, 0x34, 0x81, 0x80 | rcode, 0, 1, 0, 0, 0, 0, 0, 0]
    }

    #[test]
    fn queries_count_by_type_and_result_and_latency_by_bucket() {
        let s = Stats::default();
        let ms = Duration::from_millis;
        s.query(
            &query("web", 1),
            Some(&answer(0)),
            Duration::from_micros(20),
        );
        s.query(&query("web", 1), Some(&answer(0)), ms(3));
        s.query(&query("nope.example", 28), Some(&answer(3)), ms(30));
        s.query(&query("x", 255), Some(&answer(5)), ms(5000));
        // Not a name: cut short, and a compression pointer where a label should be.
        s.query(&[0u8; 13], None, ms(0));
        s.query(
            &[0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1],
            None,
            ms(0),
        );
        let snap = s.snapshot();
        assert_eq!(
            snap.queries,
            vec![
                ("A", "noerror", 2),
                ("AAAA", "nxdomain", 1),
                ("other", "refused", 1),
                ("other", "dropped", 2)
            ]
        );
        // Cumulative: 3 within 25 µs (two of them took 0), 4 by 5 ms, 5 by 50 ms, all 6
        // by +Inf (5 s is past the last bound).
        let at =
            |bound: f64| snap.latency_buckets[BUCKETS.iter().position(|b| *b == bound).unwrap()];
        assert_eq!(at(0.000_025), 3);
        assert_eq!(at(0.005), 4);
        assert_eq!(at(0.05), 5);
        assert_eq!(at(2.0), 5);
        assert_eq!(snap.latency_buckets.last(), Some(&6));
        assert!(
            (snap.latency_sum_seconds - 5.033_02).abs() < 1e-6,
            "{snap:?}"
        );
    }

    #[test]
    fn forwards_and_their_failures_count_apart() {
        let s = Stats::default();
        s.forward();
        s.forward();
        s.forward_failed(ForwardFailure::Busy);
        let snap = s.snapshot();
        assert_eq!(
            (snap.forwards, snap.forward_busy, snap.forward_failed),
            (2, 1, 0)
        );
    }
}
