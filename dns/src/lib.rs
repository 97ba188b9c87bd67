//! netd's embedded DNS: service discovery at 127.0.0.11 in every task, as Docker's.
//!
//! - [`table`]: the records (services, aliases, tasks, VIPs, ports) per network, changed
//!   one record at a time, and the scoped lookup rules.
//! - [`message`]: one packet in, one decision out (answer, forward, drop); all the bad
//!   input handling lives here, where a fuzz test can reach it.
//! - [`upstream`]: forwarding other names to the node's resolvers, whose answers
//!   [`cache`] keeps for their TTL.
//! - [`server`]: the UDP and TCP sockets of each task, served by the one process;
//!   [`batch`]: its batched UDP system calls; [`stats`]: what it answered, counted.

pub mod batch;
pub mod cache;
pub mod message;
pub mod server;
pub mod stats;
pub mod table;
pub mod upstream;
