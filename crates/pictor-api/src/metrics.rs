//! Prometheus metrics: one recorder for the process, one middleware for request counts.
//! Names carry the `pictor_` prefix; histogram buckets are declared here only.

use std::sync::OnceLock;

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls reuse it).
pub fn install() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("pictor_generation_seconds".into()),
                &[
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ],
            )
            .ok()?;
        match builder.install_recorder() {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!("metrics recorder not installed: {e}");
                None
            }
        }
    });
}

/// The current metrics in Prometheus' text format.
pub fn render() -> String {
    HANDLE
        .get()
        .and_then(|h| h.as_ref())
        .map(|h| h.render())
        .unwrap_or_default()
}

/// Counts responses by route and status.
pub async fn track(req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // Only the methods HTTP defines: any other string a client sends would be a new series.
    const KNOWN: [&str; 9] = [
        "GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    let method = KNOWN
        .into_iter()
        .find(|m| *m == req.method().as_str())
        .unwrap_or("other");
    let response = next.run(req).await;
    metrics::counter!("pictor_requests_total", "method" => method, "path" => path,
        "status" => response.status().as_u16().to_string())
    .increment(1);
    response
}
