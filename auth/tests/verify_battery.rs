//! The token battery at the library level: every way a token can be bad, each refused with the
//! right error and status, and valid tokens of every algorithm accepted.

mod common;

use std::time::Duration;

use common::{NOW, good_claims, hs256_token, unsigned_token};
use gearmesh_auth::{
    Algorithm, AuthError, AuthStatus, Claims, Issuer, KeySet, LoadedKey, Permission, Scopes, SigningKey, TokenRequest,
    Verifier, VerifierConfig, bearer_from_authorization, keygen, load_key,
};
use serde_json::json;

fn issuer_and_verifier(alg: Algorithm, config: VerifierConfig) -> (Issuer, Verifier) {
    let key = keygen(alg).expect("keygen").key;
    let mut keys = KeySet::new();
    keys.insert_signing(&key);
    (Issuer::new(key), Verifier::new(keys, config))
}

fn rsa_key() -> (SigningKey, String) {
    let pair = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).expect("rsa keygen");
    let LoadedKey::Signing(key) = load_key(pair.serialize_pem().as_bytes(), None).expect("load rsa") else {
        panic!("an RSA private key must load as a signing key");
    };
    (key, pair.public_key_pem())
}

fn req(scope: &str) -> TokenRequest {
    TokenRequest::new("alice", Scopes::parse(scope), Duration::from_secs(3600))
}

/// Asserts the error and that neither its text nor its Debug form contains the token.
fn refused(verifier: &Verifier, token: &str, now: i64) -> AuthError {
    let err = verifier.verify_at(token, now).expect_err("token must be refused");
    let shown = format!("{err} {err:?} {}", err.www_authenticate(None));
    if token.len() > 8 {
        assert!(!shown.contains(token), "error shows the token: {shown}");
        for part in token.split('.').filter(|p| p.len() > 8) {
            assert!(!shown.contains(part), "error shows part of the token: {shown}");
        }
    }
    assert_eq!(err.status(), AuthStatus::Unauthorized, "{err}");
    assert_eq!(err.status().http_status(), 401);
    err
}

#[test]
fn valid_tokens_of_every_algorithm_are_accepted() {
    let mut keys: Vec<SigningKey> =
        [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512, Algorithm::ES256, Algorithm::EdDSA]
            .into_iter()
            .map(|a| keygen(a).expect("keygen").key)
            .collect();
    keys.push(rsa_key().0);
    let set: KeySet = keys.iter().map(|k| k.verify_key().clone()).collect();
    let verifier = Verifier::new(set, VerifierConfig::default());
    for key in keys {
        let token = Issuer::new(key.clone()).issue_at(&req("call:billing/charge observe"), NOW).expect("issue");
        let id = verifier.verify_at(&token, NOW + 10).expect("valid token");
        assert_eq!(id.subject(), "alice", "{:?}", key.algorithm());
        assert_eq!(id.expires_at(), NOW + 3600);
        id.check(&Permission::call("billing", "charge")).expect("allowed");
        id.check(&Permission::Observe).expect("allowed");
    }
}

#[test]
fn no_token() {
    let err = bearer_from_authorization(None).expect_err("missing");
    assert_eq!(err, AuthError::Missing);
    assert_eq!(err.status(), AuthStatus::Unauthorized);
    assert_eq!(err.www_authenticate(None), "Bearer");
    let (_, verifier) = issuer_and_verifier(Algorithm::HS256, VerifierConfig::default());
    assert_eq!(verifier.verify_at("", NOW), Err(AuthError::Missing));
}

#[test]
fn malformed_tokens() {
    let (issuer, verifier) = issuer_and_verifier(Algorithm::ES256, VerifierConfig::default());
    let good = issuer.issue_at(&req("observe"), NOW).expect("issue");
    let (h, rest) = good.split_once('.').expect("dots");
    let cases = [
        "abc".to_owned(),
        "a.b".to_owned(),
        format!("{good}.x"),
        format!("{h}.!!!.{rest}"),
        format!("e30.{rest}"),                         // header `{}` has no alg
        format!("bm90IGpzb24.{rest}"),                 // header is not JSON
        format!("{h}.bm90IGpzb24.{}", "A".repeat(86)), // claims are not JSON (and bad signature)
        format!("{h}.{}", rest.split_once('.').expect("dot").0) + ".",
    ];
    for token in cases {
        let err = refused(&verifier, &token, NOW);
        assert!(matches!(err, AuthError::Malformed(_) | AuthError::BadSignature), "{token}: {err:?}");
        assert_eq!(err.oauth_error(), Some("invalid_token"));
    }
    // A header with critical extensions we do not understand.
    let token = unsigned_token(&json!({"alg": "ES256", "crit": ["exp"]}), &good_claims("observe"), "AAAA");
    assert!(matches!(refused(&verifier, &token, NOW), AuthError::Malformed(_)));
    // Tampered claims: signature no longer matches.
    let parts: Vec<&str> = good.split('.').collect();
    let forged = common::signing_input(
        &json!({"alg": "ES256", "typ": "JWT", "kid": issuer.key().kid().as_str()}),
        &good_claims("admin"),
    );
    let token = format!("{forged}.{}", parts[2]);
    assert_eq!(refused(&verifier, &token, NOW), AuthError::BadSignature);
}

#[test]
fn alg_none_is_refused() {
    let (issuer, verifier) = issuer_and_verifier(Algorithm::HS256, VerifierConfig::default());
    let kid = issuer.key().kid().as_str().to_owned();
    for alg in ["none", "None", "NONE", "nOnE", "", "HS257", "PS256"] {
        for sig in ["", "AAAA"] {
            let token = unsigned_token(&json!({"alg": alg, "kid": kid}), &good_claims("admin"), sig);
            let err = refused(&verifier, &token, NOW);
            assert!(matches!(err, AuthError::AlgorithmNotAllowed(_)), "{alg}: {err:?}");
            let token = unsigned_token(&json!({"alg": alg}), &good_claims("admin"), sig);
            assert!(matches!(refused(&verifier, &token, NOW), AuthError::AlgorithmNotAllowed(_)));
        }
    }
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let (rsa, public_pem) = rsa_key();
    let mut keys = KeySet::new();
    keys.insert_signing(&rsa);
    let verifier = Verifier::new(keys, VerifierConfig::default());
    let kid = rsa.kid().as_str();
    // The classic confusion: the attacker uses the published public key as an HMAC secret.
    for secret in [public_pem.as_bytes(), public_pem.trim().as_bytes()] {
        for header in [json!({"alg": "HS256", "kid": kid}), json!({"alg": "HS256"})] {
            let token = hs256_token(&header, &good_claims("admin"), secret);
            let err = refused(&verifier, &token, NOW);
            assert_eq!(err, AuthError::AlgorithmNotAllowed("HS256".into()), "{header}");
        }
    }
    // And the JWKS form of the key (what /.well-known/jwks.json serves) as the secret.
    let jwks = verifier.keys().public_jwks().to_string();
    let token = hs256_token(&json!({"alg": "HS256", "kid": kid}), &good_claims("admin"), jwks.as_bytes());
    assert!(matches!(refused(&verifier, &token, NOW), AuthError::AlgorithmNotAllowed(_)));
    // The genuine RS256 token still works.
    let token = Issuer::new(rsa).issue_at(&req("admin"), NOW).expect("issue");
    verifier.verify_at(&token, NOW).expect("valid RS256");
}

#[test]
fn wrong_key() {
    let (_, verifier) = issuer_and_verifier(Algorithm::ES256, VerifierConfig::default());
    let kid = verifier.keys().iter().next().expect("one key").kid().clone();
    let other = keygen(Algorithm::ES256).expect("keygen").key;
    // Another key, its own kid: unknown.
    let token = Issuer::new(other.clone()).issue_at(&req("observe"), NOW).expect("issue");
    assert!(matches!(refused(&verifier, &token, NOW), AuthError::UnknownKey { kid: Some(_) }));
    // Another key claiming our kid: bad signature.
    let token = Issuer::new(other.clone().with_kid(kid)).issue_at(&req("observe"), NOW).expect("issue");
    assert_eq!(refused(&verifier, &token, NOW), AuthError::BadSignature);
    // Another shared secret, no kid at all.
    let (hs, hs_verifier) = issuer_and_verifier(Algorithm::HS256, VerifierConfig::default());
    drop(hs);
    let token = hs256_token(&json!({"alg": "HS256"}), &good_claims("observe"), &[7u8; 32]);
    assert_eq!(refused(&hs_verifier, &token, NOW), AuthError::BadSignature);
}

#[test]
fn expired_and_not_yet_valid() {
    let config = VerifierConfig { leeway: Duration::from_secs(30), ..VerifierConfig::default() };
    let (issuer, verifier) = issuer_and_verifier(Algorithm::EdDSA, config);
    let token = issuer.issue_at(&req("observe"), NOW).expect("issue");
    let exp = NOW + 3600;
    verifier.verify_at(&token, exp).expect("at exp");
    verifier.verify_at(&token, exp + 30).expect("within leeway");
    assert_eq!(refused(&verifier, &token, exp + 31), AuthError::Expired);
    assert_eq!(
        refused(&verifier, &token, exp + 31).www_authenticate(None),
        "Bearer error=\"invalid_token\", error_description=\"token expired\""
    );
    // iat in the future beyond the leeway.
    verifier.verify_at(&token, NOW - 30).expect("iat within leeway");
    assert_eq!(refused(&verifier, &token, NOW - 31), AuthError::NotYetValid);
    // nbf in the future.
    let claims = Claims { sub: Some("alice".into()), exp: Some(NOW + 3600), nbf: Some(NOW + 600), ..Claims::default() };
    let token = issuer.sign_claims(&claims).expect("sign");
    assert_eq!(refused(&verifier, &token, NOW), AuthError::NotYetValid);
    verifier.verify_at(&token, NOW + 570).expect("nbf within leeway");
    // No exp at all: refused (and the issuer refuses to make one).
    let token = hs256_token(&json!({"alg": "HS256"}), &json!({"sub": "a"}), &[1u8; 32]);
    let mut keys = KeySet::new();
    keys.insert(gearmesh_auth::VerifyKey::from_secret(&[1u8; 32], Algorithm::HS256).expect("key"));
    let v = Verifier::new(keys, VerifierConfig::default());
    assert_eq!(refused(&v, &token, NOW), AuthError::MissingClaim("exp"));
    assert!(issuer.sign_claims(&Claims::default()).is_err());
}

#[test]
fn wrong_audience_and_issuer() {
    let config = VerifierConfig::default().with_audience("mesh-a").with_issuer("https://idp.example");
    let (issuer, verifier) = issuer_and_verifier(Algorithm::ES256, config);
    let right = issuer.clone().with_issuer("https://idp.example");
    let token = right.issue_at(&req("observe").audience("mesh-a"), NOW).expect("issue");
    verifier.verify_at(&token, NOW).expect("valid");

    let token = right.issue_at(&req("observe").audience("mesh-b"), NOW).expect("issue");
    assert_eq!(refused(&verifier, &token, NOW), AuthError::WrongAudience);
    let token = right.issue_at(&req("observe"), NOW).expect("issue");
    assert_eq!(refused(&verifier, &token, NOW), AuthError::MissingClaim("aud"));
    // An audience array containing ours is fine.
    let claims = Claims {
        exp: Some(NOW + 60),
        iss: Some("https://idp.example".into()),
        aud: Some(gearmesh_auth::Audience::Many(vec!["api".into(), "mesh-a".into()])),
        ..Claims::default()
    };
    verifier.verify_at(&issuer.sign_claims(&claims).expect("sign"), NOW).expect("aud array");

    let wrong = issuer.clone().with_issuer("https://evil.example");
    let token = wrong.issue_at(&req("observe").audience("mesh-a"), NOW).expect("issue");
    assert_eq!(refused(&verifier, &token, NOW), AuthError::WrongIssuer);
    let token = issuer.issue_at(&req("observe").audience("mesh-a"), NOW).expect("issue");
    assert_eq!(refused(&verifier, &token, NOW), AuthError::MissingClaim("iss"));
}

#[test]
fn missing_scope_and_scope_for_another_gear() {
    let (issuer, verifier) = issuer_and_verifier(Algorithm::HS256, VerifierConfig::default());
    let token = issuer.issue_at(&req("call:inventory observe"), NOW).expect("issue");
    let id = verifier.verify_at(&token, NOW).expect("valid");
    id.check(&Permission::call("inventory", "list")).expect("own gear");

    let err = id.check(&Permission::call("billing", "charge")).expect_err("other gear");
    assert_eq!(err.status(), AuthStatus::Forbidden);
    assert_eq!(err.status().http_status(), 403);
    assert_eq!(err.status().ws_close_code(), 4403);
    assert_eq!(
        err.www_authenticate(None),
        "Bearer error=\"insufficient_scope\", error_description=\"missing scope for call:billing/charge\", scope=\"call:billing/charge\""
    );
    for needed in
        [Permission::Admin, Permission::MeshLink, Permission::publish("orders.created"), Permission::serve("inventory")]
    {
        assert!(matches!(id.check(&needed), Err(AuthError::Forbidden { .. })), "{needed}");
    }
    // A port-scoped grant does not cover the gear's other ports.
    let token = issuer.issue_at(&req("call:billing/charge"), NOW).expect("issue");
    let id = verifier.verify_at(&token, NOW).expect("valid");
    assert!(id.check(&Permission::call("billing", "refund")).is_err());
    // Scopes from an `scp` array (another provider's style), unknown ones ignored.
    let claims = json!({"sub": "svc", "exp": NOW + 60, "scp": ["openid", "call:billing/*"]});
    let claims: Claims = serde_json::from_value(claims).expect("claims");
    let id = verifier.verify_at(&issuer.sign_claims(&claims).expect("sign"), NOW).expect("valid");
    id.check(&Permission::call("billing", "refund")).expect("scp wildcard");
}

#[test]
fn oversized_tokens_are_refused_before_parsing() {
    let (issuer, verifier) = issuer_and_verifier(Algorithm::HS256, VerifierConfig::default());
    let huge_scope = (0..600).map(|i| format!("call:gear{i}")).collect::<Vec<_>>().join(" ");
    let token = issuer.issue_at(&req(&huge_scope), NOW).expect("issue");
    assert!(token.len() > 8 * 1024);
    assert!(matches!(refused(&verifier, &token, NOW), AuthError::TooLarge { limit: 8192, .. }));
    // Garbage of that size is refused as too large, not parsed.
    let garbage = "!".repeat(9000);
    assert!(matches!(refused(&verifier, &garbage, NOW), AuthError::TooLarge { .. }));
    // The limit is configurable.
    let mut keys = KeySet::new();
    keys.insert_signing(issuer.key());
    let roomy = Verifier::new(keys, VerifierConfig { max_token_len: 64 * 1024, ..VerifierConfig::default() });
    roomy.verify_at(&token, NOW).expect("fits the larger limit");
}

#[test]
fn an_unknown_kid_without_matching_keys_says_so() {
    let verifier = Verifier::new(KeySet::new(), VerifierConfig::default());
    let token = hs256_token(&json!({"alg": "HS256", "kid": "k1"}), &good_claims("observe"), &[0u8; 32]);
    assert_eq!(refused(&verifier, &token, NOW), AuthError::UnknownKey { kid: Some("k1".into()) });
    let token = hs256_token(&json!({"alg": "HS256"}), &good_claims("observe"), &[0u8; 32]);
    assert_eq!(refused(&verifier, &token, NOW), AuthError::UnknownKey { kid: None });
}

#[test]
fn mesh_link_tokens() {
    let key = keygen(Algorithm::EdDSA).expect("keygen").key;
    let mut keys = KeySet::new();
    keys.insert_signing(&key);
    let verifier = Verifier::new(keys, VerifierConfig::default().with_audience("mesh-a"));
    let token = Issuer::new(key).mesh_link_token("n1", "mesh-a", Duration::from_secs(300)).expect("issue");
    let id = verifier.verify(&token).expect("valid now");
    assert_eq!(id.subject(), "node:n1");
    id.check(&Permission::MeshLink).expect("mesh:link");
    assert!(id.check(&Permission::Admin).is_err());
}

#[test]
fn link_tokens_need_the_mesh_audience_and_mesh_link() {
    // The verifier itself has no audience configured: the link check still demands it.
    let (issuer, verifier) = issuer_and_verifier(Algorithm::ES256, VerifierConfig::default());
    let ok = issuer.mesh_link_token("n2", "mesh-a", Duration::from_secs(60)).expect("issue");
    assert_eq!(verifier.verify_mesh_link(&ok, "mesh-a").expect("valid").subject(), "node:n2");
    assert_eq!(verifier.verify_mesh_link(&ok, "mesh-b").map(|_| ()), Err(AuthError::WrongAudience));
    let no_aud = issuer
        .issue(&TokenRequest::new("node:n3", Scopes::parse("mesh:link"), Duration::from_secs(60)))
        .expect("issue");
    assert_eq!(verifier.verify_mesh_link(&no_aud, "mesh-a").map(|_| ()), Err(AuthError::MissingClaim("aud")));
    let user = issuer.issue(&req("call:*").audience("mesh-a")).expect("issue");
    let err = verifier.verify_mesh_link(&user, "mesh-a").expect_err("no mesh:link");
    assert_eq!(err.status(), AuthStatus::Forbidden);
    assert_eq!(verifier.verify_mesh_link("", "mesh-a").map(|_| ()), Err(AuthError::Missing));
    // verify_for: 401 before 403.
    assert!(verifier.verify_for(&user, &Permission::call("a", "b")).is_ok());
    assert!(matches!(verifier.verify_for(&user, &Permission::Admin), Err(AuthError::Forbidden { .. })));
    assert!(matches!(verifier.verify_for("x.y.z", &Permission::Admin), Err(AuthError::Malformed(_))));
}

#[test]
fn debug_output_never_shows_keys_or_tokens() {
    let hs = keygen(Algorithm::HS256).expect("keygen");
    let ed = keygen(Algorithm::EdDSA).expect("keygen");
    let mut keys = KeySet::new();
    keys.insert_signing(&hs.key);
    keys.insert_signing(&ed.key);
    let verifier = Verifier::new(keys, VerifierConfig::default());
    let issuer = Issuer::new(hs.key.clone());
    let token = issuer.issue_at(&req("observe"), NOW).expect("issue");
    let node_token = gearmesh_auth::NodeToken::parse(&token).expect("node token");
    let shown = format!("{verifier:?} {issuer:?} {hs:?} {ed:?} {node_token:?} {:?}", hs.key.verify_key());
    let ed_body: String = ed.contents.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!shown.contains(hs.contents.trim()), "{shown}");
    assert!(!shown.contains(&ed_body), "{shown}");
    assert!(!shown.contains(&token), "{shown}");
}

#[test]
fn shared_types_are_send_and_sync_and_futures_are_send() {
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Verifier>();
    send_sync::<Issuer>();
    send_sync::<gearmesh_auth::Auth>();
    send_sync::<gearmesh_auth::RemoteJwks>();
    send_sync::<KeySet>();
    let (_, verifier) = issuer_and_verifier(Algorithm::HS256, VerifierConfig::default());
    // Handlers in axum need Send futures.
    send(&verifier.verify_with_refresh("a.b.c"));
    let remote = gearmesh_auth::RemoteJwks::new("https://idp.example/jwks", Default::default()).expect("remote");
    send(&remote.refresh());
    send(&remote.run(std::future::pending::<()>()));
}
