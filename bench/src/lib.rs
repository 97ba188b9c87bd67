//! netd's benchmarks: load generators and side-by-side comparisons that write their
//! results, with the command that made them, to bench/results/. Empty in this build:
//! there is no load-balancing datapath to measure yet.
