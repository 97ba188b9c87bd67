//! The CLI's only way to netd: a small blocking HTTP/1.1 client over the API's unix socket
//! or TCP address (`--api` / `NETD_API`, as `DOCKER_HOST` works for docker). One request
//! per connection keeps it simple and the CLI has nothing to pipeline.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::tls::TlsFiles;

pub struct Client {
    api: String,
    tls: TlsFiles,
}

/// An error the API returned, kept apart so the CLI can print it cleanly.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ApiError {}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Client {
    pub fn new(api: &str) -> Self {
        Client {
            api: api.to_string(),
            tls: TlsFiles::default(),
        }
    }

    /// The files a `tcp:` API is reached with (a unix socket needs none).
    pub fn with_tls(mut self, tls: &TlsFiles) -> Self {
        self.tls = tls.clone();
        self
    }

    fn connect(&self) -> Result<Box<dyn Stream>> {
        self.connect_with(Some(Duration::from_secs(120)))
    }

    /// A connection whose reads wait at most `timeout` (None: for ever).
    fn connect_with(&self, timeout: Option<Duration>) -> Result<Box<dyn Stream>> {
        if let Some(path) = self.api.strip_prefix("unix:") {
            let s = UnixStream::connect(path).with_context(|| {
                format!("cannot reach netd at {path}: is `netd daemon` running? (set --api or NETD_API)")
            })?;
            s.set_read_timeout(timeout)?;
            Ok(Box::new(s))
        } else if let Some(addr) = self.api.strip_prefix("tcp:") {
            // Refused before any byte is sent: a plaintext request would carry the
            // caller's intent to a server that must not act on it anyway.
            let config = self.tls.client_config()?;
            let name = crate::tls::server_name(addr)?;
            let s =
                TcpStream::connect(addr).with_context(|| format!("cannot reach netd at {addr}"))?;
            s.set_read_timeout(timeout)?;
            let conn = rustls::ClientConnection::new(config, name)
                .with_context(|| format!("TLS towards {addr}"))?;
            Ok(Box::new(rustls::StreamOwned::new(conn, s)))
        } else {
            bail!("--api must be unix:PATH or tcp:ADDR, got {:?}", self.api)
        }
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.request("POST", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        self.request("DELETE", path, None)
    }

    /// GETs `path`, a stream of JSON lines (chunked), and hands each line to `each` as it
    /// arrives, until the server ends the stream or `each` fails. No read timeout: a
    /// quiet cluster sends nothing for as long as it stays quiet.
    pub fn stream_lines(&self, path: &str, mut each: impl FnMut(&str) -> Result<()>) -> Result<()> {
        let mut stream = self.connect_with(None)?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: netd\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes())?;
        let mut r = std::io::BufReader::new(stream);
        let mut line = String::new();
        r.read_line(&mut line)
            .context("read the API's status line")?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let mut chunked = false;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
        }
        if status >= 400 || !chunked {
            let mut rest = vec![];
            r.read_to_end(&mut rest)?;
            let v: Value = serde_json::from_slice(&rest).unwrap_or(Value::Null);
            return Err(ApiError {
                status,
                code: v["code"].as_str().unwrap_or("unknown").to_string(),
                message: v["error"].as_str().unwrap_or("request failed").to_string(),
            }
            .into());
        }
        // Chunks carry whole lines or parts of them: lines are cut where they end.
        let mut pending = Vec::new();
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                return Ok(());
            }
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk)?;
            pending.extend_from_slice(&chunk[..size]);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let one: Vec<u8> = pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&one);
                if !text.trim().is_empty() {
                    each(text.trim_end())?;
                }
            }
        }
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = self.connect()?;
        // One write: a server that answers once it has the head never sees a body
        // that arrives later as unread bytes.
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: netd\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        );
        stream.write_all(request.as_bytes())?;
        let mut raw = vec![];
        stream
            .read_to_end(&mut raw)
            .context("read the API response")?;
        let (status, body) = parse_response(&raw)?;
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .with_context(|| format!("API answered {status} with a non-JSON body"))?
        };
        if status == 202 {
            // Written, but not yet in force on every node (the API stopped waiting).
            let pending: Vec<&str> = value["pending"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str())
                .collect();
            eprintln!(
                "netd: accepted, not yet applied on: {} (they apply it when they catch up)",
                pending.join(", ")
            );
        }
        if status >= 400 {
            return Err(ApiError {
                status,
                code: value["code"].as_str().unwrap_or("unknown").to_string(),
                message: value["error"]
                    .as_str()
                    .unwrap_or("request failed")
                    .to_string(),
            }
            .into());
        }
        Ok(value)
    }
}

/// Percent-encodes `s` for one path segment or query value of an API URL.
pub fn encode_component(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Splits an HTTP/1.1 response into status and (de-chunked) body.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("truncated HTTP response from netd"))?;
    let head = std::str::from_utf8(&raw[..split]).context("non-UTF-8 response head")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line from netd"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[split + 4..];
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = vec![];
    let mut rest = body;
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunked body"))?;
        let size_text = std::str::from_utf8(&rest[..eol]).context("chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .context("chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        if rest.len() < size + 2 {
            bail!("truncated chunked body");
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_bodies() {
        let (s, b) =
            parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (201, &b"{}"[..]));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        let (s, b) = parse_response(raw).unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"[1,2]"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
