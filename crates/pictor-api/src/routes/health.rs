//! Liveness, readiness and metrics.

use axum::{Json, extract::State, http::header, response::IntoResponse};
use serde_json::{Value, json};

use crate::{error::ApiError, metrics, state::AppState};

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: every model is loaded and the server is not shutting down.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.shutting_down() {
        return Err(ApiError::shutting_down());
    }
    for slot in state.models() {
        slot.ready_queue()?;
    }
    Ok(Json(json!({"status": "ready"})))
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    for slot in state.models() {
        if let Some(q) = slot.queue() {
            ::metrics::gauge!("pictor_queue_depth", "model" => slot.spec.name.clone())
                .set((q.waiting() + q.running()) as f64);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(),
    )
}
