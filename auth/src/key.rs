//! Keys pinned to one algorithm: [`VerifyKey`] (checks signatures) and [`SigningKey`] (issues
//! tokens), loaded from a key file ([`load_key`]) or generated ([`keygen`]).
//!
//! Key files are detected by content: a PEM P-256 key is ES256, a PEM Ed25519 key is EdDSA, a PEM
//! RSA key is RS256 (verify only unless it is a private key); anything else is a shared secret for
//! HS256 (the file's bytes with surrounding whitespace trimmed, at least [`MIN_SECRET_LEN`]
//! bytes), or HS384/HS512 when asked for explicitly. The secret is the text itself; it is not
//! base64-decoded, so other tools (PyJWT, jwt.io) use the same file contents as the secret.

use std::{fmt, path::Path, sync::Arc};

use aws_lc_rs::{
    hmac,
    rand::{SecureRandom, SystemRandom},
    signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
        ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256,
    },
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use jsonwebtoken::EncodingKey;
use rustls_pki_types::pem::{PemObject, SectionKind};

use crate::{Algorithm, KeyError, der};

/// The shortest accepted shared secret, in bytes (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_LEN: usize = 32;

/// A key id (`kid`): an RFC 7638 JWK thumbprint for key pairs, a salted hash prefix for secrets,
/// or whatever a JWKS document names its keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Arc<str>);

impl KeyId {
    /// Wraps a key id string.
    pub fn new(kid: impl AsRef<str>) -> Self {
        KeyId(Arc::from(kid.as_ref()))
    }

    /// The key id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The public half of a key pair, as base64url JWK members.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum PublicParams {
    /// P-256 point.
    Ec { x: String, y: String },
    /// Ed25519 public key.
    Ed { x: String },
    /// RSA modulus and exponent.
    Rsa { n: String, e: String },
}

impl PublicParams {
    /// The RFC 7638 thumbprint input: required members in lexicographic order, no whitespace.
    fn thumbprint_input(&self) -> String {
        match self {
            PublicParams::Ec { x, y } => {
                format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#)
            }
            PublicParams::Ed { x } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
            PublicParams::Rsa { n, e } => format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#),
        }
    }

    /// The RFC 7638 SHA-256 JWK thumbprint, base64url.
    pub(crate) fn thumbprint(&self) -> KeyId {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.thumbprint_input().as_bytes());
        KeyId::new(B64.encode(digest.as_ref()))
    }

    /// Parses (and so validates: the point is on the curve, the modulus is sane) the public key
    /// once, for every later verification.
    fn checker(&self) -> Result<Checker, KeyError> {
        let raw = |v: &str| B64.decode(v).map_err(|_| KeyError::Encoding("public key component"));
        let parsed = match self {
            PublicParams::Ec { x, y } => {
                let mut point = vec![0x04];
                point.extend(raw(x)?);
                point.extend(raw(y)?);
                ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            }
            PublicParams::Ed { x } => ParsedPublicKey::new(&ED25519, raw(x)?),
            PublicParams::Rsa { n, e } => {
                ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der::encode_rsa_public_key(&raw(n)?, &raw(e)?))
            }
        };
        parsed.map(Checker::Public).map_err(|_| KeyError::Rejected("public key"))
    }

    fn kind(&self) -> &'static str {
        match self {
            PublicParams::Ec { .. } => "EC P-256",
            PublicParams::Ed { .. } => "Ed25519",
            PublicParams::Rsa { .. } => "RSA",
        }
    }

    /// The JWK members of the public key (without `kid`, `alg`, `use`).
    pub(crate) fn jwk_members(&self) -> serde_json::Map<String, serde_json::Value> {
        let json = match self {
            PublicParams::Ec { x, y } => {
                serde_json::json!({"kty": "EC", "crv": "P-256", "x": x, "y": y})
            }
            PublicParams::Ed { x } => serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
            PublicParams::Rsa { n, e } => serde_json::json!({"kty": "RSA", "n": n, "e": e}),
        };
        match json {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }

    /// Checks the component sizes and builds the params.
    pub(crate) fn ec(x: &[u8], y: &[u8]) -> Result<Self, KeyError> {
        if x.len() != 32 || y.len() != 32 {
            return Err(KeyError::Unsupported("EC key not on P-256"));
        }
        Ok(PublicParams::Ec { x: B64.encode(x), y: B64.encode(y) })
    }

    pub(crate) fn ed(x: &[u8]) -> Result<Self, KeyError> {
        if x.len() != 32 {
            return Err(KeyError::Unsupported("OKP key is not Ed25519"));
        }
        Ok(PublicParams::Ed { x: B64.encode(x) })
    }

    pub(crate) fn rsa(n: &[u8], e: &[u8]) -> Result<Self, KeyError> {
        if n.len() < 256 {
            return Err(KeyError::Unsupported("RSA key shorter than 2048 bits"));
        }
        Ok(PublicParams::Rsa { n: B64.encode(n), e: B64.encode(e) })
    }

    fn from_ec_point(point: &[u8]) -> Result<Self, KeyError> {
        match point {
            [0x04, rest @ ..] if rest.len() == 64 => Self::ec(&rest[..32], &rest[32..]),
            _ => Err(KeyError::Unsupported("EC point is not an uncompressed P-256 point")),
        }
    }
}

fn allowed_for(alg: Algorithm, params: Option<&PublicParams>) -> bool {
    matches!(
        (alg, params),
        (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, None)
            | (Algorithm::ES256, Some(PublicParams::Ec { .. }))
            | (Algorithm::EdDSA, Some(PublicParams::Ed { .. }))
            | (Algorithm::RS256, Some(PublicParams::Rsa { .. }))
    )
}

/// A parsed verification key, ready to check signatures without further parsing.
#[derive(Clone)]
enum Checker {
    /// An HMAC key (HS256/384/512).
    Hmac(Box<hmac::Key>),
    /// A parsed public key (ES256, EdDSA, RS256).
    Public(ParsedPublicKey),
}

/// A key that verifies signatures of exactly one [`Algorithm`].
///
/// `Debug` shows the kid and algorithm, never key bytes.
#[derive(Clone)]
pub struct VerifyKey {
    pub(crate) kid: KeyId,
    pub(crate) alg: Algorithm,
    checker: Checker,
    /// `None` for shared secrets (which are never published).
    pub(crate) public: Option<PublicParams>,
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKey").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

impl VerifyKey {
    pub(crate) fn from_public(alg: Algorithm, public: PublicParams, kid: Option<KeyId>) -> Result<Self, KeyError> {
        if !allowed_for(alg, Some(&public)) {
            return Err(KeyError::AlgorithmMismatch { alg, kind: public.kind() });
        }
        Ok(VerifyKey {
            kid: kid.unwrap_or_else(|| public.thumbprint()),
            alg,
            checker: public.checker()?,
            public: Some(public),
        })
    }

    /// A shared-secret key (HS256/384/512) at least [`MIN_SECRET_LEN`] bytes long.
    pub fn from_secret(secret: &[u8], alg: Algorithm) -> Result<Self, KeyError> {
        Ok(SigningKey::from_secret(secret, alg)?.verify)
    }

    /// The key id.
    pub fn kid(&self) -> &KeyId {
        &self.kid
    }

    /// Whether `signature` (raw bytes) is valid for `message` under this key (HMAC compared in
    /// constant time). The caller has already checked that the token's `alg` is this key's.
    pub(crate) fn verify_signature(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.checker {
            Checker::Hmac(key) => hmac::verify(key, message, signature).is_ok(),
            Checker::Public(key) => key.verify_sig(message, signature).is_ok(),
        }
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Whether the key is a shared secret (never published in a JWKS).
    pub fn is_secret(&self) -> bool {
        self.public.is_none()
    }

    /// Returns a copy with a different key id.
    pub fn with_kid(mut self, kid: KeyId) -> Self {
        self.kid = kid;
        self
    }

    /// The public JWK (`kty`, key members, `kid`, `alg`, `use: sig`); `None` for a secret.
    pub fn public_jwk(&self) -> Option<serde_json::Value> {
        let mut map = self.public.as_ref()?.jwk_members();
        map.insert("kid".into(), self.kid.as_str().into());
        map.insert("alg".into(), self.alg.as_str().into());
        map.insert("use".into(), "sig".into());
        Some(serde_json::Value::Object(map))
    }
}

/// A key that signs tokens with exactly one [`Algorithm`]; it also holds the matching
/// [`VerifyKey`].
///
/// `Debug` shows the kid and algorithm, never key bytes.
#[derive(Clone)]
pub struct SigningKey {
    pub(crate) key: EncodingKey,
    pub(crate) verify: VerifyKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.verify.kid)
            .field("alg", &self.verify.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A shared-secret key (HS256/384/512) at least [`MIN_SECRET_LEN`] bytes long.
    ///
    /// Its kid is `hs-` and the first 12 bytes of a salted SHA-256 of the secret (hex), so
    /// nodes sharing a secret agree on the kid without revealing anything useful.
    pub fn from_secret(secret: &[u8], alg: Algorithm) -> Result<Self, KeyError> {
        if !alg.is_symmetric() {
            return Err(KeyError::AlgorithmMismatch { alg, kind: "shared secret" });
        }
        if secret.len() < MIN_SECRET_LEN {
            return Err(KeyError::SecretTooShort { len: secret.len(), min: MIN_SECRET_LEN });
        }
        let hmac_alg = match alg {
            Algorithm::HS384 => hmac::HMAC_SHA384,
            Algorithm::HS512 => hmac::HMAC_SHA512,
            _ => hmac::HMAC_SHA256,
        };
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(b"gearmesh kid v1\0");
        ctx.update(secret);
        let digest = ctx.finish();
        let kid: String = digest.as_ref()[..12].iter().map(|b| format!("{b:02x}")).collect();
        Ok(SigningKey {
            key: EncodingKey::from_secret(secret),
            verify: VerifyKey {
                kid: KeyId::new(format!("hs-{kid}")),
                alg,
                checker: Checker::Hmac(Box::new(hmac::Key::new(hmac_alg, secret))),
                public: None,
            },
        })
    }

    /// The key id (put in the `kid` header of issued tokens).
    pub fn kid(&self) -> &KeyId {
        &self.verify.kid
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.verify.alg
    }

    /// The matching verification key.
    pub fn verify_key(&self) -> &VerifyKey {
        &self.verify
    }

    /// Returns a copy with a different key id.
    pub fn with_kid(mut self, kid: KeyId) -> Self {
        self.verify.kid = kid;
        self
    }

    /// Signs `message` (the JWS signing input) and returns the base64url signature.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<String, KeyError> {
        jsonwebtoken::crypto::sign(message, &self.key, self.verify.alg.to_jwt())
            .map_err(|_| KeyError::Rejected("signing failed"))
    }
}

/// A loaded key file: a signing key (secret or private key) or a verify-only public key.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LoadedKey {
    /// A shared secret or private key: the node can verify and also sign its own tokens.
    Signing(SigningKey),
    /// A public key: verification only.
    Verify(VerifyKey),
}

impl LoadedKey {
    /// The verification half.
    pub fn verify_key(&self) -> &VerifyKey {
        match self {
            LoadedKey::Signing(k) => k.verify_key(),
            LoadedKey::Verify(k) => k,
        }
    }

    /// The signing key, if this is one.
    pub fn signing_key(&self) -> Option<&SigningKey> {
        match self {
            LoadedKey::Signing(k) => Some(k),
            LoadedKey::Verify(_) => None,
        }
    }
}

/// Reads a key file (`--auth-key FILE`) and detects its kind; see the module docs.
///
/// `alg` forces an algorithm (needed for HS384/HS512 secrets); it must fit the key.
pub fn load_key_file(path: impl AsRef<Path>, alg: Option<Algorithm>) -> Result<LoadedKey, KeyError> {
    let path = path.as_ref();
    let bytes =
        std::fs::read(path).map_err(|e| KeyError::Io { path: path.display().to_string(), reason: e.to_string() })?;
    let key = load_key(&bytes, alg)?;
    #[cfg(unix)]
    if let (LoadedKey::Signing(_), Ok(meta)) = (&key, std::fs::metadata(path)) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "key file is readable by group or others; chmod 600 it");
        }
    }
    Ok(key)
}

/// Detects and loads a key from file contents; see the module docs.
pub fn load_key(bytes: &[u8], alg: Option<Algorithm>) -> Result<LoadedKey, KeyError> {
    let trimmed = bytes.trim_ascii();
    if trimmed.starts_with(b"-----BEGIN ") {
        // The first key section; certificates (a combined cert + key file) are skipped.
        let mut section = None;
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(trimmed) {
            let (kind, der) = item.map_err(|_| KeyError::Encoding("unreadable PEM"))?;
            if kind != SectionKind::Certificate {
                section = Some((kind, der));
                break;
            }
        }
        let (kind, der) = section.ok_or(KeyError::Encoding("no key in the PEM file"))?;
        let key = load_pem_section(kind, &der)?;
        if let Some(alg) = alg {
            let have = key.verify_key().alg;
            if alg != have {
                return Err(KeyError::AlgorithmMismatch { alg, kind: have.as_str() });
            }
        }
        return Ok(key);
    }
    Ok(LoadedKey::Signing(SigningKey::from_secret(trimmed, alg.unwrap_or(Algorithm::HS256))?))
}

fn load_pem_section(kind: SectionKind, der: &[u8]) -> Result<LoadedKey, KeyError> {
    match kind {
        SectionKind::PrivateKey => signing_from_pkcs8(der).map(LoadedKey::Signing),
        SectionKind::EcPrivateKey => {
            let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                .map_err(|_| KeyError::Unsupported("EC private key is not P-256"))?;
            let pkcs8 = pair.to_pkcs8v1().map_err(|_| KeyError::Rejected("EC private key"))?;
            signing_from_pkcs8(pkcs8.as_ref()).map(LoadedKey::Signing)
        }
        SectionKind::RsaPrivateKey => signing_from_rsa_pkcs1(der).map(LoadedKey::Signing),
        SectionKind::PublicKey => verify_from_spki(der).map(LoadedKey::Verify),
        _ => Err(KeyError::Unsupported("PEM section is not a private or public key")),
    }
}

fn signing_from_pkcs8(der: &[u8]) -> Result<SigningKey, KeyError> {
    let (alg_id, inner) = der::pkcs8(der).ok_or(KeyError::Encoding("PKCS#8"))?;
    if alg_id.oid == der::OID_EC_PUBLIC_KEY {
        if alg_id.param_oid != Some(der::OID_P256) {
            return Err(KeyError::Unsupported("EC key is not on P-256"));
        }
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| KeyError::Rejected("EC private key"))?;
        let public = PublicParams::from_ec_point(pair.public_key().as_ref())?;
        Ok(SigningKey {
            key: EncodingKey::from_ec_der(der),
            verify: VerifyKey::from_public(Algorithm::ES256, public, None)?,
        })
    } else if alg_id.oid == der::OID_ED25519 {
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|_| KeyError::Rejected("Ed25519 private key"))?;
        let public = PublicParams::ed(pair.public_key().as_ref())?;
        Ok(SigningKey {
            key: EncodingKey::from_ed_der(der),
            verify: VerifyKey::from_public(Algorithm::EdDSA, public, None)?,
        })
    } else if alg_id.oid == der::OID_RSA {
        signing_from_rsa_pkcs1(inner)
    } else {
        Err(KeyError::Unsupported("private key type (need P-256, Ed25519 or RSA)"))
    }
}

fn signing_from_rsa_pkcs1(der: &[u8]) -> Result<SigningKey, KeyError> {
    let pair = aws_lc_rs::rsa::KeyPair::from_der(der).map_err(|_| KeyError::Rejected("RSA private key"))?;
    let (n, e) = der::rsa_public_key(pair.public_key().as_ref()).ok_or(KeyError::Encoding("RSA public key"))?;
    let public = PublicParams::rsa(n, e)?;
    Ok(SigningKey {
        key: EncodingKey::from_rsa_der(der),
        verify: VerifyKey::from_public(Algorithm::RS256, public, None)?,
    })
}

fn verify_from_spki(der: &[u8]) -> Result<VerifyKey, KeyError> {
    let (alg_id, bits) = der::spki(der).ok_or(KeyError::Encoding("SubjectPublicKeyInfo"))?;
    if alg_id.oid == der::OID_EC_PUBLIC_KEY {
        if alg_id.param_oid != Some(der::OID_P256) {
            return Err(KeyError::Unsupported("EC key is not on P-256"));
        }
        VerifyKey::from_public(Algorithm::ES256, PublicParams::from_ec_point(bits)?, None)
    } else if alg_id.oid == der::OID_ED25519 {
        VerifyKey::from_public(Algorithm::EdDSA, PublicParams::ed(bits)?, None)
    } else if alg_id.oid == der::OID_RSA {
        let (n, e) = der::rsa_public_key(bits).ok_or(KeyError::Encoding("RSA public key"))?;
        VerifyKey::from_public(Algorithm::RS256, PublicParams::rsa(n, e)?, None)
    } else {
        Err(KeyError::Unsupported("public key type (need P-256, Ed25519 or RSA)"))
    }
}

/// A freshly generated key: the file contents to write, and what it is.
#[derive(Clone)]
pub struct GeneratedKey {
    /// The key file's contents (a secret's text, or a PKCS#8 PEM private key).
    pub contents: String,
    /// The loaded signing key.
    pub key: SigningKey,
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey").field("key", &self.key).finish_non_exhaustive()
    }
}

impl GeneratedKey {
    /// What `gearmesh keygen` prints after writing the key to `path`: how to use it.
    pub fn usage(&self, path: &str) -> String {
        let alg = self.key.algorithm();
        let kind = if alg.is_symmetric() {
            "a shared secret: copy the same file to every node and keep it private (chmod 600)"
        } else {
            "a private key: nodes holding it can verify and sign; others can verify with its \
             public key from /.well-known/jwks.json"
        };
        format!(
            "Wrote a {alg} key to {path} (kid {kid}), {kind}.\n\
             \n\
             Use it on a node:\n\
             \x20 gearmesh start --auth-key {path} ...\n\
             or in the config file:\n\
             \x20 [auth]\n\
             \x20 keys = [\"{path}\"]\n\
             \x20 audience = \"<mesh name>\"\n\
             \n\
             Issue a token with it:\n\
             \x20 gearmesh token issue --key {path} --sub alice --scope \"call:*\" --ttl 1h --aud <mesh name>\n",
            kid = self.key.kid(),
        )
    }
}

/// Generates a key for `alg` (`gearmesh keygen`): HS256/384/512 get 48/64/64 random bytes written as
/// base64url text; ES256 and EdDSA get a PKCS#8 PEM private key. RS256 is not generated (use an
/// identity provider's keys or openssl).
pub fn keygen(alg: Algorithm) -> Result<GeneratedKey, KeyError> {
    let rng = SystemRandom::new();
    let contents = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            let mut raw = [0u8; 64];
            let len = if alg == Algorithm::HS256 { 48 } else { 64 };
            rng.fill(&mut raw[..len]).map_err(|_| KeyError::Rejected("random source"))?;
            B64.encode(&raw[..len])
        }
        Algorithm::ES256 => {
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| KeyError::Rejected("EC key generation"))?;
            pem("PRIVATE KEY", doc.as_ref())
        }
        Algorithm::EdDSA => {
            let doc =
                Ed25519KeyPair::generate_pkcs8v1(&rng).map_err(|_| KeyError::Rejected("Ed25519 key generation"))?;
            pem("PRIVATE KEY", doc.as_ref())
        }
        Algorithm::RS256 => return Err(KeyError::Unsupported("keygen for RS256")),
    };
    let key = match load_key(contents.as_bytes(), Some(alg))? {
        LoadedKey::Signing(key) => key,
        LoadedKey::Verify(_) => return Err(KeyError::NotASigningKey),
    };
    Ok(GeneratedKey { contents, key })
}

/// PEM-encodes DER with 64-character lines.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_round_trips_through_load() {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512, Algorithm::ES256, Algorithm::EdDSA] {
            let generated = keygen(alg).expect("keygen");
            assert_eq!(generated.key.algorithm(), alg);
            let loaded = load_key(generated.contents.as_bytes(), Some(alg)).expect("load");
            assert_eq!(loaded.verify_key().kid(), generated.key.kid());
            let dbg = format!("{generated:?} {loaded:?}");
            assert!(!dbg.contains(generated.contents.trim()), "{dbg}");
        }
        assert!(keygen(Algorithm::RS256).is_err());
        let es = keygen(Algorithm::ES256).expect("keygen");
        let usage = es.usage("mesh.pem");
        assert!(usage.contains("--auth-key mesh.pem") && usage.contains(es.key.kid().as_str()), "{usage}");
        assert!(!usage.contains(es.contents.trim()));
    }

    #[test]
    fn secrets_are_checked() {
        assert!(matches!(load_key(b"short\n", None), Err(KeyError::SecretTooShort { len: 5, .. })));
        let secret = b"  0123456789abcdef0123456789abcdef\n";
        let k = load_key(secret, None).expect("secret");
        assert_eq!(k.verify_key().algorithm(), Algorithm::HS256);
        assert!(k.verify_key().public_jwk().is_none());
        let k = load_key(secret, Some(Algorithm::HS512)).expect("secret");
        assert_eq!(k.verify_key().algorithm(), Algorithm::HS512);
        assert!(load_key(secret, Some(Algorithm::ES256)).is_err());
    }

    #[test]
    fn pem_alg_must_fit() {
        let ec = keygen(Algorithm::ES256).expect("keygen");
        assert!(matches!(
            load_key(ec.contents.as_bytes(), Some(Algorithm::HS256)),
            Err(KeyError::AlgorithmMismatch { .. })
        ));
        assert!(load_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", None).is_err());
    }

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // RFC 7638 §3.1 example key and thumbprint.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let p = PublicParams::Rsa { n: n.into(), e: "AQAB".into() };
        assert_eq!(p.thumbprint().as_str(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }
}
