//! The listener: HTTP/1.1 connections bounded in time and number, and a shutdown that
//! keeps answering while in-flight work finishes.
//!
//! Anyone who reaches the port, key or not, can open connections, so each is bounded
//! before it can do harm: its request headers must arrive within `header_timeout` (counted
//! from the connection's start or its previous response, so an idle keep-alive connection
//! closes after the same time, as uvicorn's 5 s keep-alive does), its body within
//! `body_timeout`, and no more than `max_connections` are served at once; one more gets an
//! immediate 503 and is closed, so the server answers at the cap instead of hanging.
//!
//! On shutdown, idle connections close, new connections are still accepted (one request
//! each: a new generation gets 503 with `Retry-After`), in-flight requests get the grace
//! period to finish, and any still waiting then are answered with a 503 before the server
//! stops, never cut off mid-reply.

use std::{
    pin::pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body_util::BodyExt;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};

use crate::{
    error::ApiError,
    state::{AppState, Connections},
};

struct InFlightGuard(Arc<crate::state::Inner>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts the request as in flight until its response body is done or dropped.
pub(crate) async fn count_in_flight(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    state.0.in_flight.fetch_add(1, Ordering::SeqCst);
    let guard = InFlightGuard(Arc::clone(&state.0));
    let response = next.run(req).await;
    response.map(|body| {
        Body::new(body.map_frame(move |frame| {
            let _held = &guard;
            frame
        }))
    })
}

/// Reads the whole request body within `body_timeout` (408 otherwise) and at most
/// `max_body_bytes` of it (413 otherwise), so a client that trickles its body cannot hold
/// a connection. An upload route's body has `uploads.body_timeout` and may be
/// `uploads.max_request_bytes`, and only `uploads.max_concurrent` of them are received at
/// once (503 beyond).
pub(crate) async fn read_body_in_time(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let config = &state.0.config;
    let upload = crate::routes::images::UPLOAD_ROUTES.contains(&req.uri().path());
    let permit = if upload {
        let permit = Arc::clone(&state.0.uploads)
            .try_acquire_owned()
            .map_err(|_| ApiError::Unavailable {
                message:
                    "The server is receiving as many uploads as it holds at once. Retry shortly."
                        .into(),
                retry_after: Duration::from_secs(1),
            })?;
        Some(permit)
    } else {
        None
    };
    let (limit, within) = if upload {
        (
            config.uploads.max_request_bytes,
            config.uploads.body_timeout,
        )
    } else {
        (config.max_body_bytes, config.connections.body_timeout)
    };
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await {
        Err(_) => return Err(ApiError::RequestTimeout(within)),
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return Err(if too_large {
                ApiError::PayloadTooLarge(limit)
            } else {
                ApiError::invalid_body(format!("Could not read the request body: {e}"))
            });
        }
    };
    drop(permit);
    Ok(next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await)
}

/// Past the cap: answers the connection's one request with 503 and closes it, through
/// hyper and [`ApiError`] like any other answer (a client that sends nothing within a
/// second gets nothing).
async fn refuse_busy(stream: TcpStream) {
    let busy = hyper::service::service_fn(|_| async {
        Ok::<_, std::convert::Infallible>(
            ApiError::Unavailable {
                message: "The server is at its connection limit. Retry shortly.".into(),
                retry_after: Duration::from_secs(1),
            }
            .into_response(),
        )
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(1))
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), busy);
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
}

fn spawn_connection(
    stream: TcpStream,
    app: Router,
    limits: &Connections,
    permits: &Arc<Semaphore>,
    mut draining: watch::Receiver<bool>,
) {
    let Ok(permit) = Arc::clone(permits).try_acquire_owned() else {
        tokio::spawn(refuse_busy(stream));
        return;
    };
    let header_timeout = limits.header_timeout;
    tokio::spawn(async move {
        let _permit = permit;
        let shutting_down = *draining.borrow_and_update();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            // During the drain each new connection answers one request, then closes.
            .keep_alive(!shutting_down);
        let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
        let mut conn = pin!(conn);
        let mut watching = !shutting_down;
        loop {
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "connection ended");
                    }
                    break;
                }
                changed = draining.changed(), if watching => {
                    watching = false;
                    if changed.is_ok() {
                        // Finishes the request in flight, if any, then closes.
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    });
}

/// Serves `state` on `listener` until `shutdown` resolves; then refuses new generations
/// (503), lets in-flight requests finish, and gives the model workers up to `grace` to
/// drain. Returns whether everything finished within the grace period.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<bool> {
    let app = crate::router(state.clone());
    let limits = state.0.config.connections.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (draining, watch_draining) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut drained = pin!(drain(state.clone(), grace));
    let mut stopping = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    spawn_connection(stream, app.clone(), &limits, &permits, watch_draining.clone());
                }
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown, if !stopping => {
                tracing::info!("shutting down: refusing new work, finishing in-flight requests");
                stopping = true;
                state.begin_shutdown();
                let _ = draining.send(true);
            }
            clean = &mut drained, if stopping => return Ok(clean),
        }
    }
}

/// Once shutdown began: waits up to `grace` for the model workers and the requests in
/// flight; then answers the requests still waiting (503) and gives their replies a moment.
async fn drain(state: AppState, grace: Duration) -> bool {
    let idle = async {
        let workers = state.drain(grace).await;
        while state.0.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        workers
    };
    if let Ok(clean) = tokio::time::timeout(grace, idle).await {
        return clean;
    }
    tracing::warn!("grace period over: answering the requests still waiting with 503");
    state.cut_off();
    let flushed = async {
        while state.0.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
    false
}
