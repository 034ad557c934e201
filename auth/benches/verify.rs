//! Cost of verifying and issuing tokens per algorithm (`cargo bench -p gearmesh-auth`), next to
//! plain `jsonwebtoken::decode` of the same token as a reference.
//!
//! A plain timing loop (no criterion): the two verifiers are measured alternately, 7 rounds of N
//! operations each, and the median per operation is printed. Numbers only, no pass/fail.

use std::{hint::black_box, time::Duration, time::Instant};

use gearmesh_auth::{Algorithm, GeneratedKey, Issuer, KeySet, Scopes, TokenRequest, Verifier, VerifierConfig, keygen};

fn per_op_ns(ops: u32, f: &mut impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..ops {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(ops)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn reference_key(generated: &GeneratedKey) -> jsonwebtoken::DecodingKey {
    match generated.key.verify_key().public_jwk() {
        Some(jwk) => {
            let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk).expect("jwk");
            jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("decoding key")
        }
        None => jsonwebtoken::DecodingKey::from_secret(generated.contents.trim().as_bytes()),
    }
}

fn main() {
    println!("{:<6} {:>12} {:>12} {:>16}", "alg", "verify", "issue", "jsonwebtoken");
    for (alg, jwt_alg) in [
        (Algorithm::HS256, jsonwebtoken::Algorithm::HS256),
        (Algorithm::ES256, jsonwebtoken::Algorithm::ES256),
        (Algorithm::EdDSA, jsonwebtoken::Algorithm::EdDSA),
    ] {
        let generated = keygen(alg).expect("keygen");
        let mut keys = KeySet::new();
        keys.insert_signing(&generated.key);
        let verifier = Verifier::new(keys, VerifierConfig::default().with_audience("mesh-a"));
        let issuer = Issuer::new(generated.key.clone());
        let req = TokenRequest::new("alice", Scopes::parse("call:billing/charge observe"), Duration::from_secs(3600))
            .audience("mesh-a");
        let token = issuer.issue(&req).expect("issue");
        let reference = reference_key(&generated);
        let mut validation = jsonwebtoken::Validation::new(jwt_alg);
        validation.set_audience(&["mesh-a"]);

        let ops = if alg.is_symmetric() { 20_000 } else { 2_000 };
        let mut ours = || {
            black_box(verifier.verify(black_box(&token)).expect("valid"));
        };
        let mut theirs = || {
            black_box(
                jsonwebtoken::decode::<serde_json::Value>(black_box(&token), &reference, &validation).expect("valid"),
            );
        };
        let mut issuing = || {
            black_box(issuer.issue(black_box(&req)).expect("issue"));
        };
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..7 {
            a.push(per_op_ns(ops, &mut ours));
            b.push(per_op_ns(ops, &mut theirs));
            c.push(per_op_ns(ops, &mut issuing));
        }
        println!(
            "{:<6} {:>9.1} us {:>9.1} us {:>13.1} us",
            alg.as_str(),
            median(a) / 1e3,
            median(c) / 1e3,
            median(b) / 1e3
        );
    }
}
