//! Builds the eBPF programs in bpf/ with clang (`-target bpf -g`, so they carry BTF) and
//! records the C layout of the shared map structs for the layout test. clang-19 comes
//! from Debian (`make deps` installs it); NETD_CLANG names another one.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["sock_lb", "ingress_xdp", "wire_peer", "task_port"];

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=NETD_CLANG");
    let clang = env::var("NETD_CLANG").unwrap_or_else(|_| "clang-19".into());
    // <linux/types.h> pulls <asm/types.h>, which lives under the host's multiarch dir.
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    for prog in PROGRAMS {
        let obj = out.join(format!("{prog}.o"));
        let status = Command::new(&clang)
            .args([
                "-target", "bpf", "-mcpu=v3", "-g", "-O2", "-Wall", "-Werror", "-Ibpf",
            ])
            .arg(format!("-idirafter/usr/include/{arch}"))
            .args(["-c", &format!("bpf/{prog}.c"), "-o"])
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| panic!("run {clang} (Debian package clang-19): {e}"));
        assert!(status.success(), "{clang} failed on bpf/{prog}.c");
    }
    let probe = out.join("layout_probe");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-Ibpf", "bpf/layout_probe.c", "-o"])
        .arg(&probe)
        .status()
        .unwrap_or_else(|e| panic!("run {cc}: {e}"));
    assert!(status.success(), "{cc} failed on bpf/layout_probe.c");
    let layout = Command::new(&probe).output().expect("run layout probe");
    assert!(layout.status.success(), "layout probe failed");
    std::fs::write(out.join("layout.rs"), layout.stdout).expect("write layout.rs");
}
