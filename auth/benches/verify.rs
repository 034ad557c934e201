//! Cost of verifying and issuing tokens per algorithm (`cargo bench -p gearmesh-auth`).
//!
//! A plain timing loop (no criterion): median of 5 runs of N operations each, printed per
//! algorithm. Numbers only, no pass/fail.

use std::{hint::black_box, time::Duration, time::Instant};

use gearmesh_auth::{Algorithm, Issuer, KeySet, Scopes, TokenRequest, Verifier, VerifierConfig, keygen};

fn median_ns(runs: usize, ops: u32, mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..ops {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(ops)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[runs / 2]
}

fn main() {
    println!("{:<6} {:>12} {:>12}", "alg", "verify", "issue");
    for alg in [Algorithm::HS256, Algorithm::ES256, Algorithm::EdDSA] {
        let key = keygen(alg).expect("keygen").key;
        let mut keys = KeySet::new();
        keys.insert_signing(&key);
        let verifier = Verifier::new(keys, VerifierConfig::default().with_audience("mesh-a"));
        let issuer = Issuer::new(key);
        let req = TokenRequest::new("alice", Scopes::parse("call:billing/charge observe"), Duration::from_secs(3600))
            .audience("mesh-a");
        let token = issuer.issue(&req).expect("issue");
        let ops = if alg.is_symmetric() { 20_000 } else { 2_000 };
        let verify = median_ns(5, ops, || {
            black_box(verifier.verify(black_box(&token)).expect("valid"));
        });
        let issue = median_ns(5, ops, || {
            black_box(issuer.issue(black_box(&req)).expect("issue"));
        });
        println!("{:<6} {:>9.1} us {:>9.1} us", alg.as_str(), verify / 1e3, issue / 1e3);
    }
}
