//! A throwaway certificate authority for a lab: the certificates a TLS test hands to
//! netd (its TCP API) and to etcd, written as PEM files under the lab's directory (which
//! teardown removes).

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

/// One side's files: its certificate, its key and the CA that signed it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Pki {
    dir: PathBuf,
    ca_pem: PathBuf,
    ca: Certificate,
    ca_key: KeyPair,
}

impl Pki {
    /// A new CA named `name`, its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<Pki> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let key = KeyPair::generate().context("CA key")?;
        let mut params = CertificateParams::new(vec![]).context("CA params")?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).context("self-sign the CA")?;
        let ca_pem = dir.join(format!("{name}-ca.pem"));
        fs::write(&ca_pem, cert.pem()).context("write the CA certificate")?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca_pem,
            ca: cert,
            ca_key: key,
        })
    }

    /// A certificate for `name`, valid as a server for `ips` (its subject alternative
    /// names) and as a client.
    pub fn issue(&self, name: &str, ips: &[Ipv4Addr]) -> Result<Identity> {
        let key = KeyPair::generate().context("key")?;
        let mut params = CertificateParams::new(vec![]).context("params")?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = ips
            .iter()
            .map(|ip| SanType::IpAddress((*ip).into()))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .with_context(|| format!("sign {name}"))?;
        let id = Identity {
            ca: self.ca_pem.clone(),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        fs::write(&id.cert, cert.pem()).context("write certificate")?;
        fs::write(&id.key, key.serialize_pem()).context("write key")?;
        Ok(id)
    }
}
