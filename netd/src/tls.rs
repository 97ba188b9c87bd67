//! TLS for netd's TCP API: whoever reaches the API can make every node enter namespaces
//! as root, so a TCP listener is only ever served with mutual TLS (a client certificate
//! signed by the CA the operator names), as dockerd's `--tlsverify` does. The CLI uses
//! the same three files (`--tls-ca --tls-cert --tls-key`, or `NETD_TLS_*`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The three files of one side of mutual TLS: on the daemon, its server certificate and
/// the CA its clients' certificates must chain to; on the CLI, its client certificate and
/// the CA the daemon's certificate must chain to.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsFiles {
    /// CA certificate (PEM) the peer's certificate must be signed by.
    #[arg(long = "tls-ca", global = true, env = "NETD_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// This side's certificate (PEM).
    #[arg(long = "tls-cert", global = true, env = "NETD_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long = "tls-key", global = true, env = "NETD_TLS_KEY")]
    pub key: Option<PathBuf>,
}

/// The three files, all given.
struct Complete<'a> {
    ca: &'a Path,
    cert: &'a Path,
    key: &'a Path,
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// All three, or an error naming what is missing (half a TLS setup is a mistake, not
    /// a choice).
    fn complete(&self) -> Result<Complete<'_>> {
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Complete { ca, cert, key }),
            _ => {
                let missing: Vec<&str> = [
                    ("--tls-ca", self.ca.is_none()),
                    ("--tls-cert", self.cert.is_none()),
                    ("--tls-key", self.key.is_none()),
                ]
                .into_iter()
                .filter(|(_, m)| *m)
                .map(|(f, _)| f)
                .collect();
                bail!(
                    "the TCP API needs mutual TLS: {} missing (or NETD_TLS_CA, NETD_TLS_CERT, NETD_TLS_KEY)",
                    missing.join(", ")
                )
            }
        }
    }

    /// The daemon's side: serves only clients whose certificate chains to the CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let files = self.complete()?;
        let roots = Arc::new(roots(files.ca)?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .context("build the client-certificate verifier")?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(files.cert)?, key(files.key)?)
            .context("the daemon's certificate and key do not match")?;
        Ok(Arc::new(config))
    }

    /// The CLI's side: trusts only the CA for the daemon's certificate and presents its
    /// own.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let files = self.complete()?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots(files.ca)?)
            .with_client_auth_cert(certs(files.cert)?, key(files.key)?)
            .context("the client certificate and key do not match")?;
        Ok(Arc::new(config))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no PEM certificate in {}", path.display());
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("read a PEM private key from {}", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store
            .add(cert)
            .with_context(|| format!("CA certificate in {}", path.display()))?;
    }
    Ok(store)
}

/// The name the CLI expects in the daemon's certificate: the host part of `tcp:HOST:PORT`
/// (an IP address or a DNS name).
pub fn server_name(addr: &str) -> Result<ServerName<'static>> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| anyhow!("tcp:{addr} has no port"))?;
    ServerName::try_from(host.to_string()).map_err(|e| anyhow!("tcp:{addr}: bad host name: {e}"))
}

/// A TCP listener that hands axum only connections whose TLS handshake succeeded. Each
/// handshake runs in a task of its own (bounded by a timeout), so a client that opens a
/// connection and sends nothing holds up nobody.
pub struct TlsListener {
    local: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
}

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Handshakes in progress at once: connections past it are closed at once, so that
/// whoever reaches the port without a certificate cannot hold every file descriptor
/// (which DNS forwards and netlink share) for the handshake timeout.
const MAX_HANDSHAKES: usize = 128;

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> Result<Self> {
        let local = listener.local_addr().context("API listener address")?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("API accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                    tracing::info!(%peer, "API: too many TLS handshakes in progress; closed");
                    continue;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, "API TLS handshake refused: {e}"),
                        Err(_) => tracing::info!(%peer, "API TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor task only ends with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_setup_names_what_is_missing() {
        let files = TlsFiles {
            ca: Some("/ca.pem".into()),
            cert: None,
            key: None,
        };
        let err = files.server_config().unwrap_err().to_string();
        assert!(err.contains("--tls-cert, --tls-key missing"), "{err}");
        assert!(TlsFiles::default().is_empty());
    }

    #[test]
    fn server_names_from_api_addresses() {
        assert_eq!(
            server_name("198.18.0.2:9440").unwrap(),
            ServerName::try_from("198.18.0.2").unwrap()
        );
        assert_eq!(
            server_name("netd.example:9440").unwrap(),
            ServerName::try_from("netd.example").unwrap()
        );
        assert!(server_name("noport").is_err());
    }

    #[test]
    fn mismatched_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::KeyPair::generate().unwrap();
        let ca_cert = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .self_signed(&ca)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), other.serialize_pem()).unwrap();
        let files = TlsFiles {
            ca: Some(dir.path().join("ca.pem")),
            cert: Some(dir.path().join("cert.pem")),
            key: Some(dir.path().join("key.pem")),
        };
        let err = format!("{:#}", files.server_config().unwrap_err());
        assert!(err.contains("do not match"), "{err}");
        std::fs::write(dir.path().join("key.pem"), ca.serialize_pem()).unwrap();
        files.server_config().expect("matching key");
        files.client_config().expect("matching key");
        std::fs::write(dir.path().join("ca.pem"), "not a pem").unwrap();
        assert!(files.server_config().is_err());
    }
}
