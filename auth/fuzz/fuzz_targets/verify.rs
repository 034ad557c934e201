//! Fuzz target: the verifier never panics on any input, and never accepts one (the fuzzer does
//! not know the keys, so anything accepted would be a forgery).
#![no_main]

use std::sync::OnceLock;

use gearmesh_auth::{Algorithm, KeySet, Verifier, VerifierConfig, keygen};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let mut keys = KeySet::new();
        for alg in [Algorithm::HS256, Algorithm::ES256, Algorithm::EdDSA] {
            keys.insert_signing(&keygen(alg).expect("keygen").key);
        }
        Verifier::new(keys, VerifierConfig::default())
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        assert!(verifier().verify_at(token, 1_793_491_200).is_err(), "accepted a token it cannot have");
    }
});
