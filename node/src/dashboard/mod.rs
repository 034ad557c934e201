//! The dashboard: a page built into the binary, served at `GET /`, that watches the mesh live
//! through the WebSocket interface (`/v1/mesh`) of the node that served it.
//!
//! The page's files sit next to this one (`index.html`, `app.js`, `style.css`, `favicon.svg`)
//! and are embedded at compile time: no build step, no CDN, works offline. They are open to
//! anyone (see `authn::required`) because they hold no secret: the page asks the user for a token
//! (or reads it from the URL fragment, which browsers never send) and presents it on the socket.
//!
//! Every response carries a strict Content-Security-Policy: scripts, styles and images from this
//! node only, no inline code, connections only to this node and WebSockets.
//!
//! Not here: what the page shows and how (that is `app.js`), the interface it talks to
//! (`crate::interface`).

use axum::{
    Router,
    http::{HeaderName, HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};

/// The policy every dashboard response carries. `connect-src` names `wss:`/`ws:` as well as
/// `'self'` because older browsers do not match WebSocket URLs to `'self'`.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self' wss: ws:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
#[derive(Debug)]
struct Asset {
    /// The path it is served at.
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// Every file of the dashboard.
static ASSETS: [Asset; 4] = [
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: include_str!("index.html") },
    Asset { path: "/dashboard/app.js", content_type: "text/javascript; charset=utf-8", body: include_str!("app.js") },
    Asset { path: "/dashboard/style.css", content_type: "text/css; charset=utf-8", body: include_str!("style.css") },
    Asset { path: "/dashboard/favicon.svg", content_type: "image/svg+xml", body: include_str!("favicon.svg") },
];

/// Whether `route` (a matched path) is one of the dashboard's files, open to anyone.
pub(crate) fn is_asset(route: &str) -> bool {
    ASSETS.iter().any(|a| a.path == route)
}

/// `router` with a `GET` route for every dashboard file.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    ASSETS.iter().fold(router, |r, asset| r.route(asset.path, get(move || std::future::ready(serve(asset)))))
}

fn serve(asset: &'static Asset) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin")),
        // The files change with the binary; a browser asks again rather than mix versions.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(path: &str) -> &'static Asset {
        ASSETS.iter().find(|a| a.path == path).expect("asset exists")
    }

    #[test]
    fn the_page_refers_only_to_embedded_files() {
        let html = asset("/").body;
        let mut referenced = 0;
        for attr in ["src=\"", "href=\""] {
            for part in html.split(attr).skip(1) {
                let target = part.split('"').next().unwrap_or_default();
                assert!(is_asset(target), "index.html refers to {target:?}, which is not embedded");
                referenced += 1;
            }
        }
        assert!(referenced >= 3, "the page loads its script, style sheet and icon");
    }

    #[test]
    fn nothing_is_loaded_from_elsewhere_and_nothing_is_inline() {
        for a in &ASSETS {
            // The SVG namespace is a name, not a download.
            let body = a.body.replace("http://www.w3.org/2000/svg", "");
            for needle in ["http://", "https://", "//cdn", "@import", "url(http"] {
                assert!(!body.contains(needle), "{} contains {needle:?}: the dashboard must work offline", a.path);
            }
        }
        let html = asset("/").body;
        // The policy forbids inline code; the page must not need it.
        assert!(!html.contains("style=\""), "no inline style attributes");
        assert!(!html.contains("<style"), "no inline style sheets");
        let handler = html.split(" on").skip(1).find(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(handler.is_none(), "no inline event handlers: on{}", handler.unwrap_or_default());
        for script in html.split("<script").skip(1) {
            assert!(script.trim_start().starts_with("src="), "no inline scripts: <script{script}");
        }
        // The token must never travel in the query (it would be logged); the page reads the fragment.
        let js = asset("/dashboard/app.js").body;
        assert!(!js.contains("location.search"), "the page never reads credentials from the query");
    }

    #[test]
    fn every_file_has_its_type_and_the_policy() {
        for a in &ASSETS {
            let r = serve(a);
            let h = r.headers();
            assert_eq!(h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()), Some(a.content_type));
            assert_eq!(
                h.get(header::CONTENT_SECURITY_POLICY).and_then(|v| v.to_str().ok()),
                Some(CONTENT_SECURITY_POLICY)
            );
            assert_eq!(h.get(header::X_CONTENT_TYPE_OPTIONS).and_then(|v| v.to_str().ok()), Some("nosniff"));
        }
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"), "no unsafe-inline or unsafe-eval");
    }
}
