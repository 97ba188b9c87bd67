//! netd: the networking half of Docker Swarm mode as a per-node daemon.
//!
//! A request enters through [`api`] (or the [`cli`], which is a client of it), is
//! validated and committed by [`state`] to the [`store`], and is made real in the kernel
//! by [`reconcile`], which uses [`netns`], [`netlink`] and [`nftables`]. [`ipam`] picks
//! addresses; [`naming`] names every kernel object netd owns; [`datapath`] is the seam for
//! VIP load balancing. See docs/architecture.md for the whole picture.

pub mod api;
pub mod cli;
pub mod client;
pub mod conntrack;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod drain;
pub mod events;
pub mod fdstore;
pub mod follow;
pub mod frontends;
pub mod health;
pub mod identity;
pub mod ipam;
pub mod mesh_return;
pub mod metrics;
pub mod model;
pub mod naming;
pub mod netlink;
pub mod netns;
pub mod nftables;
pub mod node_ports;
pub mod plan;
pub mod reconcile;
pub mod state;
pub mod store;
pub mod supervise;
pub mod tls;
pub mod verify;
pub mod view;
pub mod web;
pub mod wireguard;
pub mod writes;
