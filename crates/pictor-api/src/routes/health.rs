//! Liveness, readiness and metrics.

use axum::{Json, extract::State, http::header, response::IntoResponse};
use serde_json::{Value, json};

use crate::{auth::Caller, error::ApiError, metrics, state::AppState};

/// `GET /healthz`: the process is up.
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: every model is loaded and the server is not shutting down.
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.shutting_down() {
        return Err(ApiError::shutting_down());
    }
    for slot in state.models() {
        slot.ready()?;
    }
    Ok(Json(json!({"status": "ready"})))
}

/// `GET /metrics`: Prometheus text; with `metrics_require_key`, only for a valid key.
pub(crate) async fn metrics(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    if state.0.config.metrics_require_key {
        caller?;
    }
    for slot in state.models() {
        if let Some(loaded) = slot.loaded() {
            let q = &loaded.queue;
            ::metrics::gauge!("pictor_queue_depth", "model" => slot.spec.name.clone())
                .set((q.waiting() + q.running()) as f64);
        }
    }
    Ok(node_metrics().await)
}

/// `GET /metrics` of any node: the process's memory, then every metric in Prometheus
/// text. A worker serves it without a key: it listens where only its operator reaches.
pub(crate) async fn node_metrics() -> impl IntoResponse {
    if let Some((rss, peak)) = process_memory() {
        ::metrics::gauge!("pictor_process_resident_bytes").set(rss as f64);
        ::metrics::gauge!("pictor_process_peak_resident_bytes").set(peak as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(),
    )
}

/// This process's resident and peak resident memory in bytes (`VmRSS`, `VmHWM`), where
/// `/proc` has them.
fn process_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
