//! netd's benchmarks: bounded load generators ([`load`]) and the side-by-side runs built
//! on the lab that write their results, with the command that made them, to
//! bench/results/. Every figure is a ratio against another path measured in the same
//! run, because these machines are too noisy for absolute numbers to mean much.

pub mod load;
pub mod plot;
pub mod report;
pub mod seal_cost;
