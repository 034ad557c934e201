//! The ACME state on disk, under the node's state directory:
//!
//! ```text
//! <state_dir>/<server>/account.json          the account (URL and private key), 0600
//! <state_dir>/<server>/<domain>/cert.pem     the certificate chain, leaf first
//! <state_dir>/<server>/<domain>/key.pem      its private key, 0600
//! ```
//!
//! `<server>` is the directory URL's host, port and path made file-name safe, so certificates
//! from a staging or test server are never served in production. `<domain>` is the first
//! configured domain. Every file is written to a temporary name, synced and renamed, so a
//! crash never leaves half a file and readers see the old or the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::AcmeError;
use super::policy::CertInfo;
use crate::tls::NodeCert;

/// Account file name.
pub const ACCOUNT_FILE: &str = "account.json";
/// Certificate chain file name.
pub const CERT_FILE: &str = "cert.pem";
/// Private key file name.
pub const KEY_FILE: &str = "key.pem";

/// A certificate loaded from disk or just issued.
#[derive(Debug, Clone)]
pub(crate) struct StoredCert {
    pub(crate) cert: NodeCert,
    pub(crate) info: CertInfo,
}

/// Where one server's and one domain set's files are.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    server_dir: PathBuf,
    cert_dir: PathBuf,
}

/// The directory URL as a file name: `acme-v02.api.letsencrypt.org_directory`.
pub(crate) fn server_slug(directory: &str) -> String {
    let rest = directory.split_once("://").map_or(directory, |(_, r)| r);
    let slug: String =
        rest.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    let slug = slug.trim_matches('_').to_owned();
    if slug.is_empty() { "server".to_owned() } else { slug }
}

fn io_err(path: &Path, source: std::io::Error) -> AcmeError {
    AcmeError::Storage { path: path.to_owned(), source }
}

impl Store {
    pub(crate) fn new(state_dir: &Path, directory: &str, first_domain: &str) -> Self {
        let server_dir = state_dir.join(server_slug(directory));
        let domain: String = first_domain
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c.to_ascii_lowercase() } else { '_' })
            .collect();
        let cert_dir = server_dir.join(domain);
        Store { server_dir, cert_dir }
    }

    pub(crate) fn account_path(&self) -> PathBuf {
        self.server_dir.join(ACCOUNT_FILE)
    }

    pub(crate) fn cert_path(&self) -> PathBuf {
        self.cert_dir.join(CERT_FILE)
    }

    pub(crate) fn key_path(&self) -> PathBuf {
        self.cert_dir.join(KEY_FILE)
    }

    /// The stored account credentials (JSON), if any.
    pub(crate) fn read_account(&self) -> Result<Option<Vec<u8>>, AcmeError> {
        read_optional(&self.account_path())
    }

    pub(crate) fn write_account(&self, json: &[u8]) -> Result<(), AcmeError> {
        write_atomic(&self.account_path(), json)
    }

    /// The stored certificate and key, if both exist and parse. A file that exists but does not
    /// parse is an error (it is never silently replaced).
    pub(crate) fn read_cert(&self) -> Result<Option<StoredCert>, AcmeError> {
        let (Some(chain_pem), Some(key_pem)) = (read_optional(&self.cert_path())?, read_optional(&self.key_path())?)
        else {
            return Ok(None);
        };
        parse_cert(&chain_pem, &key_pem)
            .map(Some)
            .map_err(|reason| AcmeError::Certificate(format!("{}: {reason}", self.cert_path().display())))
    }

    /// Writes the key first, then the chain: a crash in between leaves a chain that does not
    /// match the key, which [`Store::read_cert`] refuses (the key is checked against the leaf),
    /// so the next start orders again instead of serving a broken pair.
    pub(crate) fn write_cert(&self, chain_pem: &str, key_pem: &str) -> Result<(), AcmeError> {
        write_atomic(&self.key_path(), key_pem.as_bytes())?;
        write_atomic(&self.cert_path(), chain_pem.as_bytes())
    }
}

/// Parses a PEM chain and a PEM key into what the resolver serves.
pub(crate) fn parse_cert(chain_pem: &[u8], key_pem: &[u8]) -> Result<StoredCert, String> {
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut &chain_pem[..]).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let leaf = chain.first().ok_or("no certificate in the chain")?;
    let info = CertInfo::parse(leaf)?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut &key_pem[..]).map_err(|e| e.to_string())?.ok_or("no private key")?;
    let cert = NodeCert { chain, key };
    // The key must load and match the leaf's public key.
    let certified = cert.certified_key().map_err(|e| e.to_string())?;
    certified.keys_match().map_err(|e| format!("the key does not match the certificate: {e}"))?;
    Ok(StoredCert { cert, info })
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, AcmeError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Writes `bytes` to `path` atomically, mode 0600, creating the directory (mode 0700).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| io_err(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    let renamed = written.and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = renamed {
        if let Err(rm) = std::fs::remove_file(&tmp) {
            tracing::debug!(path = %tmp.display(), error = %rm, "could not remove a temporary file");
        }
        return Err(io_err(path, e));
    }
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir)
        && let Err(e) = d.sync_all()
    {
        tracing::debug!(dir = %dir.display(), error = %e, "could not sync the directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_file_names_and_separate_servers() {
        assert_eq!(
            server_slug("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(server_slug("https://127.0.0.1:14000/dir"), "127.0.0.1_14000_dir");
        assert_ne!(
            server_slug("https://acme-staging-v02.api.letsencrypt.org/directory"),
            server_slug("https://acme-v02.api.letsencrypt.org/directory")
        );
        assert_eq!(server_slug("///"), "server");
    }

    #[test]
    fn atomic_files_are_private_and_replace_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/account.json");
        write_atomic(&path, b"one").expect("write");
        write_atomic(&path, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let dmode = std::fs::metadata(path.parent().expect("dir")).expect("meta").permissions().mode() & 0o777;
            assert_eq!(dmode, 0o700);
        }
        let leftovers = std::fs::read_dir(path.parent().expect("dir")).expect("list").count();
        assert_eq!(leftovers, 1, "no temporary files left");
    }

    #[test]
    fn stored_cert_round_trips_and_a_wrong_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path(), "https://example.test/dir", "node.example");
        assert!(store.read_cert().expect("none yet").is_none());
        let ca = crate::tls::DevCa::generate().expect("ca");
        let (cert, key) = ca.issue_pem(&["node.example".into()]).expect("issue");
        store.write_cert(&cert, &key).expect("store");
        let loaded = store.read_cert().expect("read").expect("present");
        assert!(loaded.info.covers(&["node.example".into()]));
        let (_, other_key) = ca.issue_pem(&["node.example".into()]).expect("issue");
        store.write_cert(&cert, &other_key).expect("store");
        let e = store.read_cert().expect_err("mismatched key");
        assert!(e.to_string().contains("does not match"), "{e}");
    }
}
