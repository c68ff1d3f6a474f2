//! The web console at `/`: the single-page app built from `console/` into
//! `console/dist` (committed), embedded in the binary at compile time, so a
//! fresh clone's `cargo run -- serve` serves it without Node. The app talks
//! to Picket only through grpc-web on this same origin.
//!
//! Every response carries a strict Content-Security-Policy: scripts, styles
//! and connections from this origin only, no inline script or style, no
//! framing. `index.html` is revalidated on every load (its ETag is the
//! build's content hash); the assets under `/assets/` have content hashes in
//! their names and are cached for a year.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rust_embed::Embed;

/// The built console (`npm run build` in `console/`).
#[derive(Embed)]
#[folder = "console/dist"]
struct Dist;

/// The console's Content-Security-Policy. `connect-src 'self'`: the page
/// may call this server's grpc-web endpoints and nothing else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; font-src 'self'; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's routes (no fallback: they are merged with the gRPC routes).
pub fn routes() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/assets/{*file}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", "no-cache", &headers)
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(
        &format!("assets/{file}"),
        "public, max-age=31536000, immutable",
        &headers,
    )
}

/// One embedded file with the console's security headers; 304 when the
/// client's `If-None-Match` names its content hash.
fn serve(path: &str, cache: &'static str, request: &HeaderMap) -> Response {
    let Some(file) = Dist::get(path) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    let matches = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if matches {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    (headers, file.data.into_owned()).into_response()
}

/// The media type of a built file, by extension (the build emits only these).
fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::Dist;

    #[test]
    fn the_built_console_is_embedded() {
        let index = Dist::get("index.html").expect("console/dist/index.html is embedded");
        let html = String::from_utf8_lossy(&index.data);
        assert!(
            !html.contains("<script>") && !html.contains("style="),
            "inline script or style would break the CSP: {html}"
        );
        for asset in html
            .split('"')
            .filter(|s| s.starts_with("/assets/"))
            .map(|s| &s[1..])
        {
            assert!(
                Dist::get(asset).is_some(),
                "{asset} is referenced but not embedded"
            );
        }
    }
}
