//! What WireGuard's cipher alone costs on this machine: one core sealing, then opening,
//! the packets an encrypted overlay carries (boringtun's ChaCha20-Poly1305, as netd's
//! userspace WireGuard runs it), with nothing around it: no system call, no copy
//! but the cipher's own. It bounds what any implementation on these CPUs can move.

use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{bail, Result};
use boringtun::noise::{Tunn, TunnResult};
use netd::wireguard::keys::NodeKey;

/// Nanoseconds of one core per packet of `size` bytes.
#[derive(Debug, Clone, Copy)]
pub struct SealCost {
    pub seal_ns: f64,
    pub open_ns: f64,
}

/// An IPv4 packet of `size` bytes (a valid header, as boringtun reads it when opening).
fn packet(size: usize) -> Vec<u8> {
    let mut p = vec![0xa5u8; size];
    p[..20].copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 11, 198, 18, 0, 12,
    ]);
    p[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    p
}

/// Two tunnels with a session between them (a handshake done in memory).
fn pair() -> Result<(Tunn, Tunn)> {
    let (a, b) = (NodeKey::generate(), NodeKey::generate());
    let mut ta = Tunn::new(a.secret.clone(), b.public, None, None, 1, None);
    let mut tb = Tunn::new(b.secret.clone(), a.public, None, None, 2, None);
    let (mut x, mut y) = (vec![0u8; 2048], vec![0u8; 2048]);
    let TunnResult::WriteToNetwork(init) = ta.format_handshake_initiation(&mut x, false) else {
        bail!("no handshake initiation");
    };
    let TunnResult::WriteToNetwork(resp) = tb.decapsulate(None, init, &mut y) else {
        bail!("no handshake response");
    };
    // The initiator's answer to the response (a keepalive) confirms the session.
    if let TunnResult::WriteToNetwork(keepalive) = ta.decapsulate(None, resp, &mut x) {
        let _ = tb.decapsulate(None, keepalive, &mut y);
    }
    Ok((ta, tb))
}

/// Seals `count` packets of `size` bytes on one side and opens them on the other, in
/// rounds of at most 1,000; every opened packet is checked to be the one sealed.
pub fn measure(size: usize, count: usize) -> Result<SealCost> {
    let (mut ta, mut tb) = pair()?;
    let plain = packet(size);
    let mut sealed: Vec<Vec<u8>> = vec![vec![0u8; size + 32]; count.clamp(1, 1000)];
    let mut opened = vec![0u8; size + 32];
    let (mut seal_s, mut open_s, mut done) = (0.0, 0.0, 0);
    while done < count {
        let round = sealed.len().min(count - done);
        let t = Instant::now();
        for buf in sealed.iter_mut().take(round) {
            match ta.encapsulate(&plain, buf) {
                TunnResult::WriteToNetwork(d) => {
                    let n = d.len();
                    buf.truncate(n);
                }
                _ => bail!("no sealed packet"),
            }
        }
        seal_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for buf in sealed.iter().take(round) {
            match tb.decapsulate(Some(Ipv4Addr::new(198, 18, 0, 11).into()), buf, &mut opened) {
                TunnResult::WriteToTunnelV4(p, _) if p.len() == size => {}
                other => bail!("a sealed packet did not open: {other:?}"),
            }
        }
        open_s += t.elapsed().as_secs_f64();
        for buf in sealed.iter_mut() {
            buf.resize(size + 32, 0);
        }
        done += round;
    }
    Ok(SealCost {
        seal_ns: seal_s * 1e9 / count as f64,
        open_ns: open_s * 1e9 / count as f64,
    })
}

/// What OpenSSL's ChaCha20-Poly1305 (`openssl speed -evp`, its best code for these
/// CPUs: AVX-512 where they have it) takes to seal one packet of `size` bytes, in ns of
/// one core, and OpenSSL's version; None where `openssl` is not installed. The same
/// cipher as WireGuard's, for what a faster implementation of it would change.
pub fn openssl_seal_ns(size: usize) -> Result<Option<(f64, String)>> {
    let out = match std::process::Command::new("openssl")
        .args([
            "speed",
            "-evp",
            "chacha20-poly1305",
            "-seconds",
            "2",
            "-bytes",
        ])
        .arg(size.to_string())
        .output()
    {
        Ok(o) if o.status.success() => o,
        _ => return Ok(None),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "ChaCha20-Poly1305  2563678.41k" (thousands of bytes per second).
    let Some(kbps) = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ChaCha20-Poly1305"))
        .filter_map(|rest| rest.trim().strip_suffix('k'))
        .find_map(|n| n.parse::<f64>().ok())
    else {
        // Another OpenSSL's output: the Reading goes without the comparison.
        eprintln!("no rate in openssl speed's output: {text}");
        return Ok(None);
    };
    let version = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Ok(Some((size as f64 / (kbps * 1000.0) * 1e9, version)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sealed_packets_open_and_take_time() {
        let c = super::measure(1420, 50).expect("measure");
        assert!(c.seal_ns > 0.0 && c.open_ns > 0.0, "{c:?}");
    }
}
