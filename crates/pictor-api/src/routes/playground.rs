//! `GET /`: the playground, a small page over the public API, its files compiled into the
//! binary (no CDN, works offline). Served only where the configuration turns it on.

use axum::{
    extract::{Path, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::{error::ApiError, state::AppState};

const INDEX: &str = include_str!("../../assets/playground/index.html");
const APP: &str = include_str!("../../assets/playground/app.js");
const STYLE: &str = include_str!("../../assets/playground/style.css");

/// The page may load its own files and talk to this origin, nothing else; images it shows
/// are `data:` and `blob:` URLs it made.
const POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; \
    style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn file(state: &AppState, content_type: &'static str, body: &'static str) -> Response {
    if !state.0.config.playground {
        return ApiError::NotFound(
            "The playground is turned off on this server (playground = false).".into(),
        )
        .into_response();
    }
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The files change with the binary only.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`.
pub(crate) async fn index(State(state): State<AppState>) -> Response {
    file(&state, "text/html; charset=utf-8", INDEX)
}

/// `GET /playground/{file}`.
pub(crate) async fn asset(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => file(&state, "text/javascript; charset=utf-8", APP),
        "style.css" => file(&state, "text/css; charset=utf-8", STYLE),
        _ => ApiError::NotFound("No such file.".into()).into_response(),
    }
}
