//! netd's eBPF programs (in C, built by this crate's build.rs) and their shared map
//! layouts. Empty in this build: the VIP and ingress datapaths that will live here are
//! not written yet, and netd reports `datapath: none` rather than pretending otherwise.
