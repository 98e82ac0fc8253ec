//! `stream: true`: OpenAI's image stream as server-sent events.
//!
//! Each image's previews arrive as `image_generation.partial_image` events while it
//! denoises, then each finished image as one `image_generation.completed` event, in image
//! order (an edit's are `image_edit.partial_image` and `image_edit.completed`). With `n > 1`, every event carries the extension field `image_index`; images
//! denoised in the same batch send their previews interleaved. A failure after the stream
//! began is an `error` event, which the SDKs raise as `APIError`. When the client closes
//! the stream, the job's ticket is dropped, which cancels it before its next step. With
//! the extension `stream_progress: true`, `pictor.progress` events also tell the place in
//! the queue while waiting and each denoising step (the SDKs' own streams never ask).

use std::{convert::Infallible, time::Duration};

use axum::response::{
    IntoResponse, Response,
    sse::{Event, KeepAlive, Sse},
};
use base64::Engine as _;
use pictor_sched::Ticket;
use pictor_store::now_unix;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{job::Job, run};
use crate::{
    error::ApiError,
    openapi::{CompletedEvent, ImagesResponse, PartialImageEvent, ProgressEvent, Usage},
    state::AppState,
};

/// Admits the job (errors before the stream starts are ordinary HTTP errors) and answers
/// with its event stream.
pub(super) async fn respond(state: AppState, job: Job) -> Result<Response, ApiError> {
    let ticket = run::admit(&state, &job).await?;
    let (tx, rx) = mpsc::channel::<Event>(8);
    if job.stream_progress()
        && let Some(watch) = ticket.progress()
    {
        tokio::spawn(report_progress(watch, tx.clone()));
    }
    tokio::spawn(async move {
        tokio::select! {
            // The client left: returning drops the ticket, which cancels the job.
            () = tx.closed() => tracing::debug!("the client closed the image stream"),
            () = produce(&state, &job, ticket, &tx) => {}
        }
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    // Comments every second keep proxies from timing the stream out and let the server
    // notice a vanished client while a long step runs.
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(1)))
        .into_response())
}

fn event(name: &'static str, data: &impl Serialize) -> Option<Event> {
    match Event::default().event(name).json_data(data) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::error!(error = %e, "serializing a stream event");
            None
        }
    }
}

/// `pictor.progress` events: the place in the queue while the job waits (looked at every
/// second), then each step as the worker reports it; until the job is over or the client
/// leaves.
async fn report_progress(mut watch: pictor_sched::ProgressWatch, tx: mpsc::Sender<Event>) {
    let mut last = None;
    loop {
        let now = watch.now();
        if last != Some(now) {
            last = Some(now);
            let data = ProgressEvent {
                kind: "pictor.progress",
                queue_position: if now.running { None } else { now.ahead },
                step: now.step,
                total: now.total,
            };
            let Some(ev) = event("pictor.progress", &data) else {
                return;
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        let waiting = !now.running;
        tokio::select! {
            changed = watch.changed() => if !changed { return },
            () = tokio::time::sleep(Duration::from_secs(1)), if waiting => {}
            () = tx.closed() => return,
        }
    }
}

/// Sends the job's events until it ends or the client leaves (a failed send).
async fn produce(state: &AppState, job: &Job, mut ticket: Ticket, tx: &mpsc::Sender<Event>) {
    let created_at = now_unix();
    let (partial_kind, completed_kind) = job.endpoint().events();
    let format = job.output_format();
    let size = job.size();
    while let Some(preview) = ticket.next_preview().await {
        // A preview carries no receipt: it is not the image the receipt describes.
        let bytes = match pictor_image::encode(&preview.pixels, format, job.compression(), "") {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(error = %err, "encoding a preview");
                continue;
            }
        };
        let data = PartialImageEvent {
            kind: partial_kind,
            b64_json: base64::engine::general_purpose::STANDARD.encode(bytes),
            background: "opaque",
            created_at,
            output_format: format.name(),
            partial_image_index: preview.index,
            quality: job.quality(),
            size: size.clone(),
            image_index: preview.image,
            step: preview.step,
        };
        let Some(ev) = event(partial_kind, &data) else {
            continue;
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
    let events = match run::finish(state, job, ticket).await {
        Ok(response) => completed(response, created_at, completed_kind),
        Err(err) => {
            let body = serde_json::json!({"type": "error", "error": err.body().error});
            event("error", &body).into_iter().collect()
        }
    };
    for ev in events {
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// One `image_generation.completed` (or `image_edit.completed`) event per image.
fn completed(response: ImagesResponse, created_at: i64, kind: &'static str) -> Vec<Event> {
    let usage = response.usage;
    let per_image = usage.output_tokens / (response.data.len().max(1) as u64);
    response
        .data
        .into_iter()
        .enumerate()
        .filter_map(|(i, image)| {
            let details = &usage.input_tokens_details;
            let (text, image_in) = if i == 0 {
                (details.text_tokens, details.image_tokens)
            } else {
                (0, 0)
            };
            let data = CompletedEvent {
                kind,
                background: "opaque",
                created_at,
                output_format: response.output_format,
                quality: response.quality,
                size: response.size.clone(),
                usage: Usage::new(text, image_in, per_image),
                image_index: i,
                image,
            };
            event(kind, &data)
        })
        .collect()
}
