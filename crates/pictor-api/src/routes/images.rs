//! `POST /v1/images/generations`, `/v1/images/edits` and `/v1/images/variations`, and
//! `GET /v1/images/files/{name}`: HTTP in and out; the flow itself is `generation`'s, the
//! stored files `files`'.

use axum::{
    body::Bytes,
    extract::{
        Path, Query, State,
        rejection::{BytesRejection, PathRejection, QueryRejection},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::Value;

use crate::{
    auth::Caller,
    error::ApiError,
    files, generation,
    state::AppState,
    wire::{Endpoint, form},
};

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// The request body as JSON, with 413/415/400 in OpenAI's shape.
fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Value, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::invalid_body(format!("Could not read the request body: {e}"))
        }
    })?;
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType("application/json"));
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid_body(format!(
            "We could not parse the JSON body of your request. ({e}) Send valid JSON with Content-Type: application/json."
        ))
    })
}

/// `POST /v1/images/generations`.
pub(crate) async fn generate(
    State(state): State<AppState>,
    Caller(key): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(&headers, body, state.0.config.max_body_bytes)?;
    generation::generate(state, key, &headers, body).await
}

/// The routes whose bodies are uploads (bounded by `uploads`, not `max_body_bytes`).
pub(crate) const UPLOAD_ROUTES: [&str; 2] = [EDITS, VARIATIONS];
/// `POST` an edit.
pub(crate) const EDITS: &str = "/v1/images/edits";
/// `POST` a variation.
pub(crate) const VARIATIONS: &str = "/v1/images/variations";

/// An edit's or a variation's form (its body already bounded and read by
/// `server::read_body_in_time`), answered by the generation flow.
async fn upload(
    state: AppState,
    key: Option<pictor_store::ApiKey>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let body =
        body.map_err(|e| ApiError::invalid_body(format!("Could not read the request body: {e}")))?;
    let form = form::read(&headers, body, &state.0.config.uploads).await?;
    generation::edit(state, key, &headers, form, endpoint).await
}

/// `POST /v1/images/edits`.
pub(crate) async fn edit(
    State(state): State<AppState>,
    Caller(key): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    upload(state, key, headers, body, Endpoint::Edits).await
}

/// `POST /v1/images/variations`.
pub(crate) async fn variation(
    State(state): State<AppState>,
    Caller(key): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    upload(state, key, headers, body, Endpoint::Variations).await
}

/// Query of an image link.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct LinkQuery {
    expires: Option<i64>,
    signature: Option<String>,
}

/// `GET /v1/images/files/{name}`: serves a stored image to whoever holds a valid link.
pub(crate) async fn file(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<LinkQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|_| ApiError::NotFound("No such image.".into()))?;
    let Query(q) = q.map_err(|_| {
        ApiError::invalid(
            "expires",
            "Invalid image link: `expires` must be an integer (Unix seconds) and `signature` a string; use the URL exactly as the server gave it.",
        )
    })?;
    let stored = files::open(&state, &name, q.expires, q.signature.as_deref()).await?;
    Ok((
        [
            (header::CONTENT_TYPE, stored.content_type),
            (
                header::CACHE_CONTROL,
                format!("private, max-age={}", stored.max_age),
            ),
        ],
        stored.bytes,
    )
        .into_response())
}
