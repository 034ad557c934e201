//! Seeded mutation test: thousands of damaged variants of valid tokens (bytes flipped, parts cut,
//! swapped, duplicated, headers rewritten) are all refused, and nothing panics.

mod common;

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use common::NOW;
use gearmesh_auth::{Algorithm, Issuer, KeySet, Scopes, TokenRequest, Verifier, VerifierConfig, keygen};

/// xorshift64*: a tiny deterministic generator, so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00\xff";

fn mutate(rng: &mut Rng, token: &str, others: &[String]) -> Vec<u8> {
    let mut t = token.as_bytes().to_vec();
    let parts: Vec<&str> = token.split('.').collect();
    match rng.below(8) {
        0 => {
            let i = rng.below(t.len());
            t[i] = ALPHABET[rng.below(ALPHABET.len())];
        }
        1 => t.truncate(rng.below(t.len())),
        2 => {
            let i = rng.below(t.len());
            t.insert(i, ALPHABET[rng.below(ALPHABET.len())]);
        }
        3 => {
            // Another token's part in place of ours.
            let other: Vec<&str> = others[rng.below(others.len())].split('.').collect();
            let k = rng.below(3);
            let mut p = parts.clone();
            p[k] = other[k];
            t = p.join(".").into_bytes();
        }
        4 => {
            // A rewritten header with the original payload and signature.
            let alg = ["none", "HS256", "ES256", "EdDSA", "RS256", "HS512"][rng.below(6)];
            let header = format!(r#"{{"alg":"{alg}","kid":"x{}"}}"#, rng.below(3));
            t = format!("{}.{}.{}", B64.encode(header), parts[1], parts[2]).into_bytes();
        }
        5 => t = format!("{}.{}", parts[0], parts[1]).into_bytes(),
        6 => t = format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], parts[2]).into_bytes(),
        _ => {
            // Claims re-encoded with one field changed.
            let mut claims: serde_json::Value =
                serde_json::from_slice(&B64.decode(parts[1]).expect("payload")).expect("claims");
            claims["scope"] = "admin".into();
            t = format!("{}.{}.{}", parts[0], B64.encode(claims.to_string()), parts[2]).into_bytes();
        }
    }
    t
}

#[test]
fn damaged_tokens_are_refused_without_panicking() {
    let mut keys = KeySet::new();
    let mut tokens = Vec::new();
    for alg in [Algorithm::HS256, Algorithm::ES256, Algorithm::EdDSA] {
        let key = keygen(alg).expect("keygen").key;
        keys.insert_signing(&key);
        let req = TokenRequest::new("alice", Scopes::parse("call:billing/charge"), Duration::from_secs(3600));
        tokens.push(Issuer::new(key).issue_at(&req, NOW).expect("issue"));
    }
    let verifier = Verifier::new(keys, VerifierConfig::default());
    for t in &tokens {
        verifier.verify_at(t, NOW).expect("originals are valid");
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut refused = 0;
    for _ in 0..3000 {
        let original = &tokens[rng.below(tokens.len())];
        let damaged = mutate(&mut rng, original, &tokens);
        let Ok(text) = std::str::from_utf8(&damaged) else { continue };
        if tokens.iter().any(|t| t == text) {
            continue; // the mutation happened to be a no-op
        }
        // A flip in the last base64 character's unused bits may leave the signature bytes equal:
        // then the token is, correctly, still valid. Everything else must be refused.
        match verifier.verify_at(text, NOW) {
            Err(_) => refused += 1,
            Ok(_) => {
                let same_bytes = |a: &str, b: &str| {
                    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
                    a.len() == 3
                        && b.len() == 3
                        && a.iter().zip(&b).all(|(x, y)| B64.decode(x).ok() == B64.decode(y).ok())
                };
                assert!(tokens.iter().any(|t| same_bytes(t, text)), "damaged token accepted: {text}");
            }
        }
    }
    assert!(refused > 2500, "only {refused} refused");
}
