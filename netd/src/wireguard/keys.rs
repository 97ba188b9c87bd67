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
#[derive(Clone)]
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

    /// A new random key pair.
    pub fn generate() -> Self {
        Self::from_bytes(rand::random())
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
/// none. A file that others may read, that another user owns, or that is a symbolic
/// link is refused, not used: its key may have leaked, or be someone else's. The mode
/// and owner are those of the file opened (`O_NOFOLLOW`, then `fstat` of the
/// descriptor), not of whatever the path names a moment later.
pub fn load_or_create(path: &Path) -> Result<NodeKey> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodeKey::generate();
            store(path, &key)?;
            return Ok(key);
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => bail!(
            "{} is a symbolic link: this node's private WireGuard key must be a file of \
             its own",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?;
    let mode = meta.mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} holds this node's private WireGuard key but is readable by others \
             (mode {:o}): chmod 600 it, or remove it to make a new key",
            path.display(),
            mode & 0o777
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        bail!(
            "{} holds this node's private WireGuard key but belongs to user {}, not to \
             netd's ({me}): chown it, or remove it to make a new key",
            path.display(),
            meta.uid()
        );
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("read {}", path.display()))?;
    let bytes = decode32(&text).with_context(|| format!("the key in {}", path.display()))?;
    Ok(NodeKey::from_bytes(bytes))
}

/// Writes `key` to `path` whole or not at all (a temporary file, synced, renamed; 0600
/// in a 0700 directory): a new node's key, or the one a rotation moves to.
pub fn store(path: &Path, key: &NodeKey) -> Result<()> {
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
    fn a_key_file_others_can_read_or_own_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wireguard.key");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).err().unwrap().to_string();
        assert!(err.contains("readable by others"), "{err}");
        // Private, but another user's (the tests run as root, as netd does).
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = load_or_create(&path).err().unwrap().to_string();
        assert!(err.contains("belongs to user 65534"), "{err}");
    }

    #[test]
    fn a_key_file_behind_a_symbolic_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("elsewhere.key");
        load_or_create(&real).unwrap();
        let path = dir.path().join("wireguard.key");
        std::os::unix::fs::symlink(&real, &path).unwrap();
        let err = load_or_create(&path).err().unwrap().to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn bad_keys_are_named() {
        assert!(decode_public("not base64!").is_err());
        let short = STANDARD.encode([1u8; 16]);
        let err = decode_public(&short).err().unwrap().to_string();
        assert!(err.contains("32 bytes"), "{err}");
    }
}
