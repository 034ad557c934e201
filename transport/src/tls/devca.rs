//! Certificates: the per-user development CA (created once, kept in the user's data directory)
//! that issues node certificates, and PEM loading for operator-provided certificates.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use super::{TlsError, provider};

/// File name of the development CA (certificate and key, PEM, mode 0600) in its directory.
pub const DEV_CA_FILE: &str = "dev-ca.pem";
const CA_COMMON_NAME: &str = "gearmesh development CA";
const KEY_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";

/// A certificate chain and its private key: what a node serves.
#[derive(Debug)]
pub struct NodeCert {
    /// The leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for NodeCert {
    fn clone(&self) -> Self {
        NodeCert { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl NodeCert {
    /// Loads a chain and a key from PEM files (`--tls-cert`, `--tls-key`).
    pub fn load_pem(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let chain = load_certs(cert_path)?;
        let key_pem = read(key_path)?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| TlsError::Io { path: key_path.to_owned(), source: e })?
            .ok_or_else(|| TlsError::NoPrivateKey(key_path.to_owned()))?;
        Ok(NodeCert { chain, key })
    }

    /// The rustls form, ready for a [`super::CertResolver`].
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let signer = provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| TlsError::InvalidKey(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), signer)))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.to_owned(), source })
}

/// Loads every certificate of a PEM file (a chain, or CA certificates for `--tls-ca`).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Io { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates(path.to_owned()));
    }
    Ok(certs)
}

/// The development CA: one per user, trusted by every node started by that user.
#[derive(Debug)]
pub struct DevCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(3650);
    p
}

fn rcgen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

impl DevCa {
    /// Where the development CA lives by default: `$XDG_DATA_HOME/gearmesh`, else
    /// `~/.local/share/gearmesh`.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(x).join("gearmesh"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/gearmesh"))
    }

    /// A new CA held only in memory (tests).
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_err)?;
        let cert = ca_params().self_signed(&key).map_err(rcgen_err)?;
        Ok(DevCa { cert_pem: cert.pem(), cert_der: cert.der().clone(), key })
    }

    /// Loads the CA from `dir`, creating it (and `dir`) on first use. Safe against several
    /// nodes starting at once: the file appears atomically and the first writer wins.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let path = dir.join(DEV_CA_FILE);
        if path.exists() {
            return Self::load(&path);
        }
        let io = |source| TlsError::Io { path: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let ca = Self::generate()?;
        let tmp = dir.join(format!("{DEV_CA_FILE}.{:016x}.tmp", rand::random::<u64>()));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let written = opts.open(&tmp).and_then(|mut f| {
            f.write_all(ca.cert_pem.as_bytes())?;
            f.write_all(ca.key.serialize_pem().as_bytes())?;
            f.sync_all()
        });
        let linked = written.and_then(|()| std::fs::hard_link(&tmp, &path));
        if let Err(e) = std::fs::remove_file(&tmp) {
            tracing::debug!(error = %e, "could not remove temporary CA file");
        }
        match linked {
            Ok(()) => {
                tracing::info!(path = %path.display(), "created the development CA");
                Ok(ca)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(&path),
            Err(e) => Err(io(e)),
        }
    }

    /// Loads a CA file written by [`DevCa::load_or_create`].
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let pem = String::from_utf8(read(path)?).map_err(|_| TlsError::NoPrivateKey(path.to_owned()))?;
        let at = pem.find(KEY_BEGIN).ok_or_else(|| TlsError::NoPrivateKey(path.to_owned()))?;
        let (cert_pem, key_pem) = pem.split_at(at);
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| TlsError::NoCertificates(path.to_owned()))?
            .map_err(|source| TlsError::Io { path: path.to_owned(), source })?;
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_err)?;
        Ok(DevCa { cert_pem: cert_pem.to_owned(), cert_der, key })
    }

    /// The CA certificate as PEM (what `gearmesh ca export` prints).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, to trust.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Issues a node certificate for DNS names and IP addresses, valid from an hour ago for a
    /// year.
    pub fn issue(&self, names: &[String]) -> Result<NodeCert, TlsError> {
        let now = OffsetDateTime::now_utc();
        self.issue_valid(names, now - Duration::hours(1), now + Duration::days(365))
    }

    /// Issues a node certificate with an explicit validity window (tests use a past one).
    pub fn issue_valid(
        &self,
        names: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<NodeCert, TlsError> {
        let (cert, key) = self.sign(names, not_before, not_after)?;
        Ok(NodeCert {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// Issues a node certificate (as [`DevCa::issue`]) as PEM text: `(certificate, key)`, for
    /// writing `--tls-cert` / `--tls-key` files.
    pub fn issue_pem(&self, names: &[String]) -> Result<(String, String), TlsError> {
        let now = OffsetDateTime::now_utc();
        let (cert, key) = self.sign(names, now - Duration::hours(1), now + Duration::days(365))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn sign(
        &self,
        names: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(rcgen::Certificate, KeyPair), TlsError> {
        let mut p = CertificateParams::new(names.to_vec()).map_err(rcgen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().map_or("gearmesh node", String::as_str));
        p.distinguished_name = dn;
        p.is_ca = IsCa::NoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = not_before;
        p.not_after = not_after;
        let key = KeyPair::generate().map_err(rcgen_err)?;
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(rcgen_err)?;
        Ok((cert, key))
    }
}
