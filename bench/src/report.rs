//! Summaries and the markdown files in bench/results/.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

/// The `q`-quantile (0..=1) of `samples`, nearest-rank; zero for no samples.
pub fn quantile(samples: &[Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// The median of `values` (the middle run of an odd number of runs).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// The median of the per-round ratios `a[i] / b[i]` of two paths whose runs alternated
/// round by round: a ratio of runs made side by side, not of medians picked per path
/// (the machine drifts between rounds).
pub fn paired_ratio(a: &[crate::load::Run], b: &[crate::load::Run]) -> f64 {
    let rate =
        |runs: &[crate::load::Run]| -> Vec<f64> { runs.iter().map(|r| r.per_second()).collect() };
    paired(&rate(a), &rate(b))
}

/// The median of the ratios of figures taken in the same round (`a[i] / b[i]`): paths
/// that alternate share the machine's drift round by round, which medians picked per
/// path do not cancel.
pub fn paired(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b.max(1e-9)).collect();
    median(&ratios)
}

/// The median run by rate (of runs that alternated with other paths).
pub fn median_run(runs: &[crate::load::Run]) -> &crate::load::Run {
    let mut v: Vec<&crate::load::Run> = runs.iter().collect();
    v.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    v[v.len() / 2]
}

/// The table cells of one path from its alternating runs: the median new-connection
/// run and the median keep-alive run, each as rate and p99 (`rate | p99 | rate | p99`),
/// with the two rates for ratios and plots.
pub fn conn_req_cells(conns: &[crate::load::Run], reqs: &[crate::load::Run]) -> (String, f64, f64) {
    let (c, q) = (median_run(conns), median_run(reqs));
    let cells = format!(
        "{:.0} | {} | {:.0} | {}",
        c.per_second(),
        ms(quantile(&c.latencies, 0.99)),
        q.per_second(),
        ms(quantile(&q.latencies, 0.99)),
    );
    (cells, c.per_second(), q.per_second())
}

/// A latency for a table: µs below a millisecond, ms with one decimal above.
pub fn ms(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

/// The machine a result came from (kernel release, CPUs), for the results files.
pub fn machine() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {release}, {cpus} CPUs")
}

/// The head of a results file: its title, the command that produced it and the commit
/// it ran on.
pub fn header(title: &str) -> String {
    format!(
        "# {title}\n\nCommand (from the repository root, as root):\n\n\
         ```\ncargo build --release --workspace --bins && ./target/release/{}\n```\n\n\
         Commit: {}.\n\n",
        command_line(),
        commit()
    )
}

/// The commit the benchmark binary was built from (`git describe` at build time: a
/// `-dirty` suffix says the work tree had uncommitted changes then).
pub fn commit() -> &'static str {
    env!("NETD_BENCH_COMMIT")
}

/// The command line that produced a result, as the results files quote it.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    let exe = args
        .first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or("netd-bench")
        .to_string();
    std::iter::once(exe)
        .chain(args.into_iter().skip(1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the plot of the table `out` goes (next to it, extension .svg), and the line
/// that links the table to it.
pub fn plot_beside(out: &Path) -> Result<(PathBuf, String)> {
    let svg = out.with_extension("svg");
    let name = svg
        .file_name()
        .and_then(|f| f.to_str())
        .context("plot file name")?
        .to_string();
    let link = format!("Plot: [{name}]({name}).");
    Ok((svg, link))
}

/// Prints the table and writes it to `out`, with its plot (path, SVG) if it has one.
pub fn write_results(out: &Path, md: &str, plot: Option<(&Path, &str)>) -> Result<()> {
    print!("{md}");
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(out, md).with_context(|| format!("write {}", out.display()))?;
    if let Some((path, svg)) = plot {
        std::fs::write(path, svg).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_medians() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&d, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&d, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&d, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(ms(Duration::from_micros(250)), "250 µs");
        assert_eq!(ms(Duration::from_micros(2750)), "2.8 ms");
    }
}
