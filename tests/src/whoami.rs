//! `netd-lab whoami`: a tiny server to run as a task, in the spirit of traefik/whoami.
//! Over TCP it speaks HTTP/1.1 with keep-alive (so a test can hold one connection across
//! a netd restart); over UDP it answers every datagram. Every answer names the task, the
//! address the request arrived on, and the address it came from, which is what the tests
//! check (which backend answered, and whether the source was rewritten). `GET
//! /data?size=N` adds N bytes to the body (at most 16 MiB), as traefik/whoami's does: a
//! download large enough for path MTU discovery to matter. `GET /health` answers with the
//! status `GET /health?set=CODE` last set (200 at first), as traefik/whoami's `POST
//! /health` does: a health check can fail while the task still serves everything else.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

pub fn serve(port: u16, name: &str) -> Result<()> {
    let name: Arc<str> = Arc::from(name);
    let tcp = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind tcp/{port}"))?;
    let udp = UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("bind udp/{port}"))?;
    let udp_name = name.clone();
    std::thread::spawn(move || serve_udp(udp, &udp_name));
    for conn in tcp.incoming() {
        let Ok(conn) = conn else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = serve_http(conn, &name);
        });
    }
    Ok(())
}

fn serve_udp(sock: UdpSocket, name: &str) {
    let mut buf = [0u8; 2048];
    while let Ok((_, from)) = sock.recv_from(&mut buf) {
        let body = format!("Hostname: {name}\nRemoteAddr: {from}\n");
        let _ = sock.send_to(body.as_bytes(), from);
    }
}

/// Serves one connection's requests (keep-alive) until the client closes it.
pub(crate) fn serve_http(mut conn: TcpStream, name: &str) -> Result<()> {
    let local = conn.local_addr()?;
    let peer = conn.peer_addr()?;
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request head per iteration; bodies are not expected (GET only).
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if pending.len() > 64 * 1024 {
                return Ok(());
            }
            let n = conn.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&chunk[..n]);
        };
        let extra = requested_size(&pending[..end]);
        let status = health(&pending[..end]);
        pending.drain(..end);
        let mut body = format!("Hostname: {name}\nIP: {}\nRemoteAddr: {peer}\n", local.ip());
        body.extend(std::iter::repeat_n('x', extra));
        let resp = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            if status < 400 { "OK" } else { "Unhealthy" },
            body.len()
        );
        conn.write_all(resp.as_bytes())?;
    }
}

/// What `GET /health` answers (the process is one task's server).
static HEALTH: AtomicU16 = AtomicU16::new(200);

/// The status of the answer to a request with head `head`: `/health` answers with the
/// last status `/health?set=CODE` set; everything else with 200.
fn health(head: &[u8]) -> u16 {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let target = std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default();
    if let Some(code) = target.strip_prefix("/health?set=") {
        if let Ok(code @ 200..=599) = code.parse::<u16>() {
            HEALTH.store(code, Ordering::Relaxed);
        }
        return 200;
    }
    if target == "/health" {
        return HEALTH.load(Ordering::Relaxed);
    }
    200
}

/// The most `/data?size=N` adds to a body.
const MAX_DATA: usize = 16 << 20;

/// N of a request line `GET /data?size=N ...`, else 0.
fn requested_size(head: &[u8]) -> usize {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return 0;
    };
    let target = line.split(' ').nth(1).unwrap_or_default();
    target
        .strip_prefix("/data?size=")
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(0, |n| n.min(MAX_DATA))
}

#[cfg(test)]
mod tests {
    #[test]
    fn health_answers_what_was_set_and_other_paths_stay_200() {
        assert_eq!(super::health(b"GET /health HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(super::health(b"GET /health?set=503 HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(super::health(b"GET /health HTTP/1.1\r\n\r\n"), 503);
        assert_eq!(super::health(b"GET / HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(super::health(b"GET /health?set=x HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(super::health(b"GET /health HTTP/1.1\r\n\r\n"), 503);
        assert_eq!(super::health(b"GET /health?set=200 HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(super::health(b"GET /health HTTP/1.1\r\n\r\n"), 200);
    }

    #[test]
    fn data_size_comes_from_the_request_line() {
        assert_eq!(
            super::requested_size(b"GET /data?size=100000 HTTP/1.1\r\n\r\n"),
            100_000
        );
        assert_eq!(super::requested_size(b"GET / HTTP/1.1\r\n\r\n"), 0);
        assert_eq!(super::requested_size(b"GET /data?size=x HTTP/1.1\r\n"), 0);
        assert_eq!(
            super::requested_size(b"GET /data?size=999999999999 HTTP/1.1\r\n"),
            super::MAX_DATA
        );
    }
}
