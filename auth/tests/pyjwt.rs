//! Interoperability with PyJWT: tokens minted by PyJWT (HS256/384/512, ES256, EdDSA) are
//! accepted with the right key, and tokens we issue verify in PyJWT.
//!
//! Needs `python3` with PyJWT and cryptography. Without them the test prints a SKIP line and
//! passes, unless GEARMESH_REQUIRE_PYJWT is set (CI sets it), in which case it fails.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use gearmesh_auth::{
    Algorithm, AuthError, Issuer, KeySet, Permission, Scopes, TokenRequest, Verifier, VerifierConfig, keygen,
    load_key_file,
};
use serde_json::{Value, json};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pyjwt_tokens.py");

fn pyjwt_available() -> bool {
    let ok =
        Command::new("python3").args(["-c", "import jwt, cryptography"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("GEARMESH_REQUIRE_PYJWT").is_none(),
            "GEARMESH_REQUIRE_PYJWT is set but python3 cannot import jwt and cryptography"
        );
        println!("SKIP pyjwt interop: python3 with PyJWT and cryptography not available");
    }
    ok
}

/// Runs all jobs in one python3 process (start-up dominates the cost).
fn python(jobs: &[Value]) -> Vec<String> {
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(Value::from(jobs.to_vec()).to_string().as_bytes())
        .expect("write jobs");
    let out = child.wait_with_output().expect("python3 output");
    assert!(out.status.success(), "pyjwt script failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON results")
}

const ALGS: [Algorithm; 5] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512, Algorithm::ES256, Algorithm::EdDSA];

#[test]
fn pyjwt_tokens_are_accepted_and_ours_verify_in_pyjwt() {
    if !pyjwt_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut jobs = Vec::new();
    let mut cases = Vec::new();
    for alg in ALGS {
        let generated = keygen(alg).expect("keygen");
        let path = dir.path().join(alg.as_str());
        std::fs::write(&path, &generated.contents).expect("write key");
        let path = path.to_str().expect("utf-8 path").to_owned();
        // The node loads the same file PyJWT signs with.
        let loaded = load_key_file(&path, Some(alg)).expect("load key file");
        let kid = loaded.verify_key().kid().as_str().to_owned();
        // PyJWT -> us: without a kid, with our kid, and for another audience.
        jobs.push(json!({"mode": "mint", "alg": alg.as_str(), "key": path, "aud": "mesh-a"}));
        jobs.push(json!({"mode": "mint", "alg": alg.as_str(), "key": path, "aud": "mesh-a", "kid": kid}));
        jobs.push(json!({"mode": "mint", "alg": alg.as_str(), "key": path, "aud": "mesh-b"}));
        // Us -> PyJWT: secrets by file, key pairs by the JWK we publish.
        let req = TokenRequest::new("rust", Scopes::parse("observe"), Duration::from_secs(600)).audience("mesh-a");
        let token = Issuer::new(generated.key.clone()).issue(&req).expect("issue");
        let key = generated.key.verify_key().public_jwk().unwrap_or_else(|| Value::from(path.clone()));
        jobs.push(json!({"mode": "verify", "alg": alg.as_str(), "key": key, "aud": "mesh-a", "token": token}));
        cases.push((alg, loaded));
    }
    let results = python(&jobs);
    assert_eq!(results.len(), jobs.len());
    for ((alg, loaded), results) in cases.iter().zip(results.chunks(4)) {
        let mut keys = KeySet::new();
        keys.insert(loaded.verify_key().clone());
        let config = VerifierConfig::default().with_audience("mesh-a").with_issuer("pyjwt");
        let verifier = Verifier::new(keys, config);
        for token in &results[..2] {
            let id = verifier.verify(token).unwrap_or_else(|e| panic!("{alg}: {e}"));
            assert_eq!(id.subject(), format!("py-{alg}"));
            id.check(&Permission::call("billing", "charge")).expect("scope");
        }
        assert_eq!(verifier.verify(&results[2]).map(|_| ()), Err(AuthError::WrongAudience), "{alg}");
        assert_eq!(results[3], "rust", "{alg}");
    }
}
