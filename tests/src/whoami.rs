//! `netd-lab whoami`: a tiny server to run as a task, in the spirit of traefik/whoami.
//! Over TCP it speaks HTTP/1.1 with keep-alive (so a test can hold one connection across
//! a netd restart); over UDP it answers every datagram. Every answer names the task, the
//! address the request arrived on, and the address it came from, which is what the tests
//! check (which backend answered, and whether the source was rewritten).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
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

fn serve_http(mut conn: TcpStream, name: &str) -> Result<()> {
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
        pending.drain(..end);
        let body = format!("Hostname: {name}\nIP: {}\nRemoteAddr: {peer}\n", local.ip());
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(resp.as_bytes())?;
    }
}
