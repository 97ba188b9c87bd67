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

/// OpenSSL's ChaCha20-Poly1305 on the same packets: the other implementation of
/// WireGuard's cipher within reach (AVX-512 code where the CPUs have it), for whether a
/// faster one would change the encrypted path.
#[derive(Debug, Clone)]
pub struct OpensslCost {
    /// `openssl version`'s name and number.
    pub version: String,
    /// `openssl speed -evp`: one long stream cut into `size`-byte blocks, set up once (the
    /// figure OpenSSL publishes); None without the `openssl` program.
    pub bulk_ns: Option<f64>,
    /// Packet by packet, as WireGuard's data messages need it: each its own nonce (the
    /// message counter), its own tag; through the `openssl` crate, as netd would call it.
    pub seal_ns: f64,
    pub open_ns: f64,
}

/// Seals `count` packets of `size` bytes with OpenSSL, each with the next nonce, opens
/// each one (its tag checked), and asks `openssl speed` for the streaming rate.
pub fn openssl_cost(size: usize, count: usize) -> Result<OpensslCost> {
    use openssl::cipher::Cipher;
    use openssl::cipher_ctx::CipherCtx;
    let key = [0x5au8; 32];
    let plain = packet(size);
    let nonce = |n: u64| {
        // WireGuard's nonce: 4 zero bytes, then the message counter, little-endian.
        let mut b = [0u8; 12];
        b[4..].copy_from_slice(&n.to_le_bytes());
        b
    };
    let mut seal = CipherCtx::new()?;
    seal.encrypt_init(Some(Cipher::chacha20_poly1305()), Some(&key), None)?;
    let mut open = CipherCtx::new()?;
    open.decrypt_init(Some(Cipher::chacha20_poly1305()), Some(&key), None)?;
    let rounds = count.clamp(1, 1000);
    let mut sealed: Vec<Vec<u8>> = vec![vec![0u8; size + 16]; rounds];
    let mut opened = vec![0u8; size + 32];
    let (mut seal_s, mut open_s, mut done) = (0.0, 0.0, 0u64);
    while done < count as u64 {
        let round = rounds.min(count - done as usize);
        let t = Instant::now();
        for (k, buf) in sealed.iter_mut().take(round).enumerate() {
            seal.encrypt_init(None, None, Some(&nonce(done + k as u64)))?;
            let (body, tag) = buf.split_at_mut(size);
            let n = seal.cipher_update(&plain, Some(body))?;
            seal.cipher_final(&mut body[n..])?;
            seal.tag(tag)?;
        }
        seal_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for (k, buf) in sealed.iter().take(round).enumerate() {
            open.decrypt_init(None, None, Some(&nonce(done + k as u64)))?;
            let (body, tag) = buf.split_at(size);
            open.set_tag(tag)?;
            let n = open.cipher_update(body, Some(&mut opened))?;
            open.cipher_final(&mut opened[n..])?;
        }
        open_s += t.elapsed().as_secs_f64();
        if opened[..size] != plain[..] {
            bail!("a packet OpenSSL sealed opened to something else");
        }
        done += round as u64;
    }
    Ok(OpensslCost {
        version: openssl::version::version().to_string(),
        bulk_ns: openssl_speed_ns(size),
        seal_ns: seal_s * 1e9 / count as f64,
        open_ns: open_s * 1e9 / count as f64,
    })
}

/// `openssl speed -evp chacha20-poly1305` on `size`-byte blocks, in ns per block; None
/// where the program is missing or prints something else.
fn openssl_speed_ns(size: usize) -> Option<f64> {
    let out = std::process::Command::new("openssl")
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
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "ChaCha20-Poly1305  2563678.41k" (thousands of bytes per second).
    let kbps = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ChaCha20-Poly1305"))
        .filter_map(|rest| rest.trim().strip_suffix('k'))
        .find_map(|n| n.parse::<f64>().ok());
    if kbps.is_none() {
        eprintln!("no rate in openssl speed's output: {text}");
    }
    kbps.map(|k| size as f64 / (k * 1000.0) * 1e9)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sealed_packets_open_and_take_time() {
        let c = super::measure(1440, 50).expect("measure");
        assert!(c.seal_ns > 0.0 && c.open_ns > 0.0, "{c:?}");
    }

    #[test]
    fn openssl_opens_what_it_sealed() {
        // 1,500 packets: two rounds, the second with nonces the first did not use.
        let c = super::openssl_cost(1440, 1500).expect("OpenSSL seals and opens");
        assert!(c.seal_ns > 0.0 && c.open_ns > 0.0, "{c:?}");
        assert!(!c.version.is_empty(), "{c:?}");
    }
}
