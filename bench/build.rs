//! Records the commit the benchmarks are built from, so every results file names what
//! ran (a run-time `git describe` would see edits made after the build).
fn main() {
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown (not built from a git checkout)".into());
    println!("cargo:rustc-env=NETD_BENCH_COMMIT={commit}");
    // Rebuild when HEAD moves or the index changes (a commit, a checkout).
    for f in ["../.git/HEAD", "../.git/index"] {
        println!("cargo:rerun-if-changed={f}");
    }
}
