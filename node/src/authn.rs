//! Token authentication on the node: the node's [`Auth`] loaded from `[auth]` at build and
//! started with the node, the HTTP middleware that turns a bearer token into the call's
//! [`Principal`] and checks the scope each route needs, and `/.well-known/jwks.json`.
//!
//! Not here: the token model (the `gearmesh-auth` crate), the WebSocket interface and mesh links
//! (they reach the loaded [`Auth`] through [`NodeShared::auth`] when they are wired in).
//!
//! The scope each route needs is in [`required`], one table for the whole API. A route missing
//! from it needs `admin` (fail closed), so a new route must be added there.

use std::sync::Arc;

use axum::{
    Json,
    extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State},
    http::{HeaderValue, StatusCode, header, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
};
use gearmesh_auth::{Auth, AuthError, AuthStatus, Permission, Scopes, bearer_from_authorization, query_has_token};
use gearmesh_gears::{Call, CallError, ErrorCode, Principal, PrincipalKind, Publish};
use tokio_util::sync::CancellationToken;

use crate::{
    NodeConfig,
    api::ApiError,
    node::{BuildError, NodeShared},
};

/// Where the node publishes its public keys.
pub(crate) const JWKS_PATH: &str = "/.well-known/jwks.json";

// === build and start ===

/// Loads the node's auth from its configuration: `Ok(None)` in insecure development mode.
///
/// With a key source configured, tokens are required even if `insecure_dev` is set too (it is
/// switched off, with a warning): configured keys are never silently ignored.
///
/// # Errors
/// [`BuildError::NoAuth`] without a key source and without `insecure_dev`; [`BuildError::Auth`]
/// when a key file or JWKS cannot be loaded.
pub(crate) fn load(config: &mut NodeConfig) -> Result<Option<Auth>, BuildError> {
    if !config.auth.has_key_source() {
        return if config.insecure_dev { Ok(None) } else { Err(BuildError::NoAuth) };
    }
    if config.insecure_dev {
        tracing::warn!("auth keys are configured, so --insecure-dev is ignored: every request needs a token");
        config.insecure_dev = false;
    }
    Ok(Some(Auth::load(&config.auth)?))
}

/// Fetches every remote JWKS once (failures are logged, not fatal: the refreshers retry) and
/// spawns the refreshers, which stop when `shutdown` is cancelled.
pub(crate) async fn start(auth: Option<&Auth>, shutdown: &CancellationToken) {
    let Some(auth) = auth else { return };
    for e in auth.refresh_remotes().await {
        tracing::warn!(error = %e, "remote JWKS not loaded yet; retrying in the background");
    }
    tracing::info!(
        keys = auth.verifier.keys().len(),
        remote_jwks = auth.remotes.len(),
        audience = auth.audience().unwrap_or("(none)"),
        can_sign = auth.issuer.is_some(),
        "token authentication on"
    );
    if !auth.remotes.is_empty() {
        let auth = auth.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { auth.run_refreshers(shutdown.cancelled_owned()).await });
    }
}

impl NodeShared {
    /// The node's auth: `None` in insecure development mode. For the HTTP middleware, the
    /// WebSocket interface and mesh links (`link_token`, `verifier.verify_mesh_link`).
    pub(crate) fn auth(&self) -> Option<&Auth> {
        self.auth.as_ref()
    }
}

// === the check where a call runs ===

/// Whether `call`'s caller may call its port on this node; `Ok` in insecure development mode.
///
/// This is the check at the node that runs the port, for every caller: a user or node with the
/// scopes its token carried, a gear (`gear:<name>`) with the scopes `[auth.gears]` grants it here
/// (none if it has no entry), anonymous never. The HTTP middleware checks users earlier, to answer
/// with `WWW-Authenticate`; this catches gears calling gears and code embedding the node.
pub(crate) fn authorize_call(auth: Option<&Auth>, call: &Call<'_>) -> Result<(), CallError> {
    match auth {
        None => Ok(()),
        Some(auth) => authorize(auth, &call.meta.caller, &Permission::call(call.gear, call.port)),
    }
}

/// The same check for calls arriving over mesh links, on the node that runs the port: the caller
/// and its scopes travel in the call frame, so an entry node cannot launder a call.
pub(crate) struct MeshAuthorizer(pub(crate) Auth);

impl gearmesh_mesh::Authorizer for MeshAuthorizer {
    fn authorize_call(&self, call: &Call<'_>) -> Result<(), CallError> {
        authorize_call(Some(&self.0), call)
    }
}

/// Whether `publish`'s publisher may publish to its topic on this node (see [`authorize_call`]).
pub(crate) fn authorize_publish(auth: Option<&Auth>, publish: &Publish) -> Result<(), CallError> {
    match auth {
        None => Ok(()),
        Some(auth) => authorize(auth, &publish.publisher, &Permission::publish(&publish.topic)),
    }
}

/// Whether `principal` holds `needed` here, as a `unauthorized`/`forbidden` [`CallError`].
pub(crate) fn authorize(auth: &Auth, principal: &Principal, needed: &Permission) -> Result<(), CallError> {
    let result = match principal.kind() {
        PrincipalKind::Gear => auth.gears.check(principal.id(), needed),
        PrincipalKind::User | PrincipalKind::Node => {
            Scopes::from_strs(principal.scopes().iter().map(String::as_str)).check(needed)
        }
        // Anonymous, and any kind this node does not know: no credentials (fail closed).
        _ => Err(AuthError::Missing),
    };
    result.map_err(|e| match e.status() {
        AuthStatus::Unauthorized => CallError::unauthorized(format!("{principal}: {e}")),
        AuthStatus::Forbidden => CallError::forbidden(format!("{principal}: {e}")),
    })
}

// === the HTTP middleware ===

/// Who made an HTTP request, set by [`authenticate`] (anonymous in insecure development mode);
/// handlers take it as an extractor.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub(crate) Principal);

impl FromRequestParts<Arc<NodeShared>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<NodeShared>) -> Result<Self, Self::Rejection> {
        match (parts.extensions.get::<Caller>(), shared.auth()) {
            (Some(caller), _) => Ok(caller.clone()),
            (None, None) => Ok(Caller(Principal::anonymous())),
            // Fail closed: a route served without the middleware never runs as anyone.
            (None, Some(_)) => {
                Err(CallError::internal("request not authenticated (route without auth middleware)").into())
            }
        }
    }
}

/// What a route needs.
#[derive(Debug, PartialEq, Eq)]
enum Required {
    /// Nothing: open to anyone.
    Nothing,
    /// A valid token granting this permission.
    Scope(Permission),
    /// A valid token; what the request does is checked call by call later (pipeline runs: each
    /// step is a call checked against the caller's scopes).
    Authenticated,
}

/// The table: what each route of the API needs, from its matched path and parameters.
fn required(route: &str, param: impl Fn(&str) -> String) -> Required {
    match route {
        // The ACME server fetches HTTP-01 answers without any token.
        "/healthz" | "/readyz" | JWKS_PATH | gearmesh_transport::acme::HTTP01_ROUTE => Required::Nothing,
        // The dashboard's files hold no secret: the page asks for a token and uses it on the socket.
        page if crate::dashboard::is_asset(page) => Required::Nothing,
        // The WebSocket interface authenticates on the socket (a header, a subprotocol offer or
        // a first message; close 4401/4403), since browsers cannot set headers on a WebSocket.
        "/v1/mesh" => Required::Nothing,
        "/v1/call/{gear}/{port}" => Required::Scope(Permission::call(&param("gear"), &param("port"))),
        "/v1/events/{topic}" => Required::Scope(Permission::publish(&param("topic"))),
        "/v1/node" | "/v1/gears" | "/v1/nodes" | "/v1/routes" | "/metrics" => Required::Scope(Permission::Observe),
        "/v1/pipelines/runs/{id}" => Required::Scope(Permission::Observe),
        // One path, two methods: its handlers check observe (GET, listing) and admin (POST, defining).
        "/v1/pipelines" => Required::Authenticated,
        // Each step is then a call checked against the caller's scopes.
        "/v1/pipelines/{name}/call" | "/v1/pipelines/{name}/cast" => Required::Authenticated,
        // Fail closed: a route not listed here is mesh control.
        _ => Required::Scope(Permission::Admin),
    }
}

/// The middleware (a `route_layer`, so unknown paths and wrong methods still answer 404/405):
/// refuses tokens in the query, verifies the bearer token, checks the route's scope and sets the
/// request's [`Caller`]. In insecure development mode every caller is anonymous and allowed.
pub(crate) async fn authenticate(State(shared): State<Arc<NodeShared>>, req: Request, next: Next) -> Response {
    let Some(auth) = shared.auth() else {
        // Insecure development mode: `Caller` is anonymous.
        return next.run(req).await;
    };
    let (mut parts, body) = req.into_parts();
    if parts.uri.query().is_some_and(query_has_token) {
        // The URL is not logged: it holds a credential.
        return refusal(&AuthError::Malformed(
            "credentials in the URL query are refused; use the Authorization header",
        ));
    }
    let route = parts.extensions.get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_default();
    let params = if route.contains('{') {
        match RawPathParams::from_request_parts(&mut parts, &()).await {
            Ok(p) => Some(p),
            Err(rejection) => return rejection.into_response(),
        }
    } else {
        None
    };
    let param = |name: &str| {
        params.iter().flat_map(|p| p.iter()).find(|(k, _)| *k == name).map(|(_, v)| v.to_owned()).unwrap_or_default()
    };
    let needed = match required(&route, param) {
        Required::Nothing => return next.run(Request::from_parts(parts, body)).await,
        Required::Scope(p) => Some(p),
        Required::Authenticated => None,
    };
    let header = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let identity = match bearer_from_authorization(header) {
        Ok(token) => auth.verifier.verify_with_refresh(token).await,
        Err(e) => Err(e),
    };
    let identity = match identity.and_then(|id| match &needed {
        Some(needed) => id.check(needed).map(|()| id),
        None => Ok(id),
    }) {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(route = %route, error = %e, "request refused");
            return refusal(&e);
        }
    };
    let principal = Principal::user(identity.subject(), identity.scopes().to_strings());
    parts.extensions.insert(Caller(principal));
    next.run(Request::from_parts(parts, body)).await
}

/// A 401 or 403 in the API's error shape, with `WWW-Authenticate`.
fn refusal(e: &AuthError) -> Response {
    let (code, status) = match e.status() {
        AuthStatus::Unauthorized => (ErrorCode::Unauthorized, StatusCode::UNAUTHORIZED),
        AuthStatus::Forbidden => (ErrorCode::Forbidden, StatusCode::FORBIDDEN),
    };
    let mut resp = ApiError(CallError::new(code, e.description()), status).into_response();
    match HeaderValue::from_str(&e.www_authenticate(None)) {
        Ok(v) => {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        Err(_) => {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
    }
    resp
}

// === /.well-known/jwks.json ===

/// The node's public keys (404 when it has none: secrets only, or insecure development mode).
pub(crate) async fn jwks(State(shared): State<Arc<NodeShared>>) -> Response {
    match shared.auth().and_then(Auth::jwks_document) {
        Some(doc) => Json(doc).into_response(),
        None => ApiError::from(CallError::not_found("this node publishes no public keys")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> String + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned()).unwrap_or_default()
    }

    #[test]
    fn every_route_needs_its_scope_and_unknown_routes_need_admin() {
        let none = params(&[]);
        assert_eq!(required("/healthz", &none), Required::Nothing);
        assert_eq!(required("/readyz", &none), Required::Nothing);
        assert_eq!(required(JWKS_PATH, &none), Required::Nothing);
        assert_eq!(required("/v1/mesh", &none), Required::Nothing);
        assert_eq!(required("/", &none), Required::Nothing);
        assert_eq!(required("/dashboard/app.js", &none), Required::Nothing);
        assert_eq!(required("/dashboard/other.js", &none), Required::Scope(Permission::Admin));
        assert_eq!(required("/.well-known/acme-challenge/{token}", &none), Required::Nothing);
        assert_eq!(required("/v1/node", &none), Required::Scope(Permission::Observe));
        assert_eq!(required("/v1/gears", &none), Required::Scope(Permission::Observe));
        assert_eq!(required("/metrics", &none), Required::Scope(Permission::Observe));
        assert_eq!(required("/v1/nodes", &none), Required::Scope(Permission::Observe));
        assert_eq!(required("/v1/routes", &none), Required::Scope(Permission::Observe));
        assert_eq!(
            required("/v1/call/{gear}/{port}", params(&[("gear", "billing"), ("port", "charge")])),
            Required::Scope(Permission::call("billing", "charge"))
        );
        assert_eq!(
            required("/v1/events/{topic}", params(&[("topic", "orders.placed")])),
            Required::Scope(Permission::publish("orders.placed"))
        );
        assert_eq!(required("/v1/pipelines", &none), Required::Authenticated);
        assert_eq!(required("/v1/pipelines/runs/{id}", &none), Required::Scope(Permission::Observe));
        assert_eq!(required("/v1/pipelines/{name}/call", &none), Required::Authenticated);
        assert_eq!(required("/v1/pipelines/{name}/cast", &none), Required::Authenticated);
        assert_eq!(required("/v1/something-new", &none), Required::Scope(Permission::Admin));
        assert_eq!(required("", &none), Required::Scope(Permission::Admin));
    }

    #[test]
    fn auth_config_comes_from_an_auth_table() {
        let c = NodeConfig::from_toml(
            "[auth]\nkeys = [\"/k\"]\naudience = \"mesh-a\"\n[auth.gears]\norders = [\"call:billing/charge\"]\n",
        )
        .expect("valid");
        assert_eq!(c.auth.keys, vec![std::path::PathBuf::from("/k")]);
        assert_eq!(c.auth.audience.as_deref(), Some("mesh-a"));
        assert!(c.auth.gears.scopes_for("orders").allows(&Permission::call("billing", "charge")));
        let e = NodeConfig::from_toml("[auth]\nkey = [\"/k\"]\n").expect_err("typo");
        assert!(e.to_string().contains("key"), "{e}");
        let e = NodeConfig::from_toml("[auth.gears]\norders = [\"cal:billing\"]\n").expect_err("bad scope");
        assert!(e.to_string().contains("cal:billing"), "{e}");
    }

    #[test]
    fn without_keys_insecure_dev_is_required_and_keys_switch_it_off() {
        let mut c = NodeConfig::default();
        assert!(matches!(load(&mut c), Err(BuildError::NoAuth)));
        c.insecure_dev = true;
        assert!(matches!(load(&mut c), Ok(None)));

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hs.key");
        let key = gearmesh_auth::keygen(gearmesh_auth::Algorithm::HS256).expect("keygen");
        std::fs::write(&path, &key.contents).expect("write");
        c.auth.keys = vec![path];
        assert!(matches!(load(&mut c), Ok(Some(_))));
        assert!(!c.insecure_dev, "configured keys win over insecure_dev");
        c.auth.keys = vec![dir.path().join("missing")];
        let e = load(&mut c).expect_err("missing key file");
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
