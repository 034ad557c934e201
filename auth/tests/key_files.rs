//! Key files in every form the node may be given: PKCS#8, SEC1 and public (SPKI) PEM keys for
//! ES256, EdDSA and RS256, secrets, and keys that must be refused.

use std::time::Duration;

use aws_lc_rs::{
    encoding::AsDer,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair},
};
use base64::Engine;
use gearmesh_auth::{
    Algorithm, Issuer, KeyError, KeySet, LoadedKey, Scopes, SigningKey, TokenRequest, Verifier, VerifierConfig, keygen,
    load_key, load_key_file,
};

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("ascii")).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn signing(contents: &str) -> SigningKey {
    match load_key(contents.as_bytes(), None).expect("load") {
        LoadedKey::Signing(k) => k,
        other => panic!("expected a signing key, got {other:?}"),
    }
}

/// The public PEM verifies tokens of the private key and has the same kid.
fn check_public_pem(private_pem: &str, public_pem: &str, alg: Algorithm) {
    let key = signing(private_pem);
    assert_eq!(key.algorithm(), alg);
    let public = load_key(public_pem.as_bytes(), None).expect("public key");
    let LoadedKey::Verify(public) = public else { panic!("a public key must load as verify-only") };
    assert_eq!(public.algorithm(), alg);
    assert_eq!(public.kid(), key.kid(), "the thumbprint kid is the same for both halves");
    let mut keys = KeySet::new();
    keys.insert(public);
    let verifier = Verifier::new(keys, VerifierConfig::default());
    let req = TokenRequest::new("a", Scopes::parse("observe"), Duration::from_secs(60));
    let token = Issuer::new(key).issue(&req).expect("issue");
    verifier.verify(&token).expect("verifies with the public key");
}

#[test]
fn public_pem_keys_verify_only() {
    for alg in [Algorithm::ES256, Algorithm::EdDSA] {
        let generated = keygen(alg).expect("keygen");
        let pair = rcgen::KeyPair::from_pem(&generated.contents).expect("rcgen reads our PKCS#8");
        check_public_pem(&generated.contents, &pair.public_key_pem(), alg);
    }
    let rsa = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).expect("rsa");
    check_public_pem(&rsa.serialize_pem(), &rsa.public_key_pem(), Algorithm::RS256);
}

#[test]
fn sec1_ec_private_keys_load() {
    let generated = keygen(Algorithm::ES256).expect("keygen");
    let der = pem_body_der(&generated.contents);
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).expect("pkcs8");
    let sec1 = pair.private_key().as_der().expect("sec1");
    let key = signing(&pem("EC PRIVATE KEY", sec1.as_ref()));
    assert_eq!(key.algorithm(), Algorithm::ES256);
    assert_eq!(key.kid(), generated.key.kid());
}

fn pem_body_der(pem_text: &str) -> Vec<u8> {
    let body: String = pem_text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).expect("base64")
}

#[test]
fn unsupported_keys_are_refused() {
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
    assert!(matches!(load_key(p384.serialize_pem().as_bytes(), None), Err(KeyError::Unsupported(_))));
    assert!(matches!(load_key(p384.public_key_pem().as_bytes(), None), Err(KeyError::Unsupported(_))));
    let cert = rcgen::CertificateParams::new(vec!["a.example".to_owned()])
        .expect("params")
        .self_signed(&rcgen::KeyPair::generate().expect("key"))
        .expect("cert");
    assert!(load_key(cert.pem().as_bytes(), None).is_err(), "a certificate is not a key file");
    // A combined file (certificate, then key) loads the key.
    let generated = keygen(Algorithm::ES256).expect("keygen");
    let combined = format!("{}{}", cert.pem(), generated.contents);
    let key = load_key(combined.as_bytes(), None).expect("key after the certificate");
    assert_eq!(key.verify_key().kid(), generated.key.kid());
    assert!(matches!(
        load_key(b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n", None),
        Err(KeyError::Encoding(_))
    ));
}

#[test]
fn secret_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.key");
    std::fs::write(&path, "  a-long-enough-shared-secret-for-hmac-use\n\n").expect("write");
    let k = load_key_file(&path, Some(Algorithm::HS512)).expect("secret");
    assert_eq!(k.verify_key().algorithm(), Algorithm::HS512);
    assert!(k.signing_key().is_some());
    // Same secret, same kid, on every node.
    let again = load_key_file(&path, Some(Algorithm::HS512)).expect("secret");
    assert_eq!(again.verify_key().kid(), k.verify_key().kid());
    let err = load_key_file(dir.path().join("missing"), None).expect_err("missing file");
    assert!(matches!(err, KeyError::Io { .. }));
}
