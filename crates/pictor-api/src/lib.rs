//! Pictor's HTTP surface: the OpenAI Images API over axum.
//!
//! This is the only crate that knows HTTP, JSON wire types and OpenAI's error shape. It
//! parses requests (`wire`), authenticates bearer keys (`auth`), holds each request to its
//! model's rules and runs it through the one generation flow (`generation`: plain,
//! detached for idempotency and SDK retries, or streamed), stores images behind signed
//! links (`files`, `links`), and maps every failure to
//! `{"error": {"message", "type", "param", "code"}}` with OpenAI's status (`error`).
//!
//! What it is not: it never touches tensors and never compiles the engine. Models arrive as
//! `pictor-sched` queues over the `pictor-core` seam, images as plain RGB bytes, encoded by
//! `pictor-image`.
//!
//! The boundary is what this file exports: [`router`] builds the routes over an
//! [`AppState`] ([`node_router`] the few a worker node serves); [`serve`] runs them on a listener until a shutdown signal, then drains the
//! model queues; [`spawn_sweeper`] deletes expired images; [`openapi_json`] is the document.

#![deny(missing_docs)]

mod auth;
mod error;
mod files;
mod generation;
mod idempotency;
mod links;
mod metrics;
mod openapi;
mod ratelimit;
mod routes;
mod server;
mod state;
mod wire;

use std::time::Duration;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderName, Request},
    middleware,
    routing::{get, post},
};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

pub use server::serve;
pub use state::{ApiConfig, AppState, Connections, ModelSpec};
pub use wire::{BodyLimits, form::UploadLimits};

/// The OpenAPI document of every route, as pretty JSON (`docs/openapi.json`).
pub fn openapi_json() -> String {
    openapi::json()
}

use crate::error::ApiError;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone, Copy)]
struct RandomId;

impl MakeRequestId for RandomId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let id = format!("req_{}", hex::encode(rand::random::<[u8; 12]>()));
        id.parse().ok().map(RequestId::new)
    }
}

/// The document with this server's own limits on `n` and `prompt`.
async fn openapi_document(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> impl axum::response::IntoResponse {
    let limits = &state.0.config.limits;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi::json_for(limits.max_n, limits.max_prompt_chars),
    )
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Unknown request URL. Please check the URL and method.".into())
}

async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// All routes over `state`.
pub fn router(state: AppState) -> Router {
    metrics::install();
    let limit = state.0.config.max_body_bytes;
    let upload_limit = state.0.config.uploads.max_request_bytes;
    Router::new()
        .route("/v1/images/generations", post(routes::images::generate))
        .route(
            routes::images::EDITS,
            post(routes::images::edit).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route(
            routes::images::VARIATIONS,
            post(routes::images::variation).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/v1/images/files/{name}", get(routes::images::file))
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{id}", get(routes::models::get))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .route("/openapi.json", get(openapi_document))
        .route("/", get(routes::playground::index))
        .route("/playground/{file}", get(routes::playground::asset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            server::read_body_in_time,
        ))
        .layer(middleware::from_fn(metrics::track))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            server::count_in_flight,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, RandomId))
        .with_state(state)
}

/// What a cluster's worker node serves over HTTP: `GET /healthz` and `GET /metrics`
/// (Prometheus text, no key: bind it where only the operator reaches).
pub fn node_router() -> Router {
    metrics::install();
    Router::new()
        .route("/healthz", get(routes::health::healthz))
        .route("/metrics", get(routes::health::node_metrics))
        .fallback(not_found)
}

/// Deletes expired images every `every` until the process ends.
pub fn spawn_sweeper(state: AppState, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match files::sweep(&state).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "swept expired images"),
                Err(e) => tracing::warn!("sweeping expired images failed: {e:#}"),
            }
        }
    })
}

/// Deletes expired images now; returns how many.
pub async fn sweep_now(state: &AppState) -> Result<usize, pictor_store::StoreError> {
    files::sweep(state).await
}
