//! The node's WireGuard static key. It is made once, kept in a file only its owner can
//! read (0600, under netd's state directory), and never leaves the node. Its public half
//! goes in the node's record, where the other nodes find it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

/// A node's static key pair.
pub struct NodeKey {
    pub secret: StaticSecret,
    pub public: PublicKey,
}

impl NodeKey {
    fn from_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        NodeKey { secret, public }
    }

    /// The public key as WireGuard's tools write it (base64 of 32 bytes).
    pub fn public_text(&self) -> String {
        encode(&self.public)
    }
}

/// `key` as WireGuard's tools write it.
pub fn encode(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// A public key as WireGuard's tools write it; an error says what is wrong with it.
pub fn decode_public(text: &str) -> Result<PublicKey> {
    Ok(PublicKey::from(decode32(text)?))
}

fn decode32(text: &str) -> Result<[u8; 32]> {
    let bytes = STANDARD
        .decode(text.trim())
        .context("a WireGuard key is base64")?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| anyhow::anyhow!("a WireGuard key is 32 bytes, this one {}", bytes.len()))
}

/// The key at `path`, or a new one written there (0600, its directory 0700) if there is
/// none. A file that others may read is refused, not used: its key may have leaked.
pub fn load_or_create(path: &Path) -> Result<NodeKey> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let mode = fs::metadata(path)
                .with_context(|| format!("read the mode of {}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                bail!(
                    "{} holds this node's private WireGuard key but is readable by others \
                     (mode {:o}): chmod 600 it, or remove it to make a new key",
                    path.display(),
                    mode & 0o777
                );
            }
            let bytes =
                decode32(&text).with_context(|| format!("the key in {}", path.display()))?;
            Ok(NodeKey::from_bytes(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodeKey::from_bytes(rand::random());
            write_new(path, &key)?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Writes `key` to `path` whole or not at all (a temporary file, synced, renamed).
fn write_new(path: &Path, key: &NodeKey) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 700 {}", dir.display()))?;
    }
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    writeln!(f, "{}", STANDARD.encode(key.secret.as_bytes()))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_kept_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node/wireguard.key");
        let made = load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let again = load_or_create(&path).unwrap();
        assert_eq!(again.public.as_bytes(), made.public.as_bytes());
        assert_eq!(
            decode_public(&made.public_text()).unwrap().as_bytes(),
            made.public.as_bytes()
        );
        // The file holds the private key, which is not the public one.
        let text = fs::read_to_string(&path).unwrap();
        assert_ne!(text.trim(), made.public_text());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wireguard.key");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).err().unwrap().to_string();
        assert!(err.contains("readable by others"), "{err}");
    }

    #[test]
    fn bad_keys_are_named() {
        assert!(decode_public("not base64!").is_err());
        let short = STANDARD.encode([1u8; 16]);
        let err = decode_public(&short).err().unwrap().to_string();
        assert!(err.contains("32 bytes"), "{err}");
    }
}
