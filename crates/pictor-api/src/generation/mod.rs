//! The generation flow, written once for every way a request is answered.
//!
//! ```text
//! JSON body ─wire::parse──────▶ ImageRequest ─┐
//! form ─wire::parse_form──────▶ ImageRequest ─┼─Job::new─▶ Job ─rate limit─▶ answer
//!      └─source::read (files)─▶ Source ───────┘
//!   answer: streamed  → stream::respond  (admit, then previews and results as events)
//!           detached  → detach::run      (Idempotency-Key or SDK attempt: replay, wait or run)
//!           plain     → run::admit, run::finish
//! ```
//!
//! [`job::Job`] holds every decision (model, size, steps, quality, formats, seed, an edit's
//! strength), made once from the request and the model's rules; [`run`] is the life of an
//! admitted job, the same for all three answers and every endpoint.

mod detach;
mod job;
mod run;
mod shared;
mod source;
mod stream;

use axum::{
    Json,
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use pictor_store::ApiKey;
use serde_json::Value;

use self::{job::Job, source::Source};
use crate::{
    error::ApiError,
    state::AppState,
    wire::{self, Endpoint, ImageRequest, form::Form},
};

/// Answers a generation request whose body is `body` (JSON already parsed) from the
/// caller holding `key`.
pub(crate) async fn generate(
    state: AppState,
    key: Option<ApiKey>,
    headers: &HeaderMap,
    body: Value,
) -> Result<Response, ApiError> {
    let request = wire::parse(&body, &state.0.config.limits)?;
    start(state, key, headers, request, None, &body).await
}

/// Answers an edit or a variation (`endpoint`) whose form is `form`. Without a `model`, it
/// goes to the first model configured, as OpenAI's edits and variations have a default.
pub(crate) async fn edit(
    state: AppState,
    key: Option<ApiKey>,
    headers: &HeaderMap,
    form: Form,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let default_model = state.models().first().map(|m| m.spec.name.clone());
    let limits = &state.0.config.limits;
    let request = wire::parse_form(&form.fields, endpoint, limits, default_model.as_deref())?;
    // An unknown or unready model is refused before the upload is decoded.
    state
        .model(&request.model)
        .ok_or_else(|| state.model_not_found(&request.model))?
        .ready()?;
    let (source, fingerprint) = source::read(form, endpoint, &state.0.config.uploads).await?;
    start(state, key, headers, request, Some(source), &fingerprint).await
}

/// Makes the job, holds it to the caller's rate limit, and answers it; `fingerprint`
/// identifies the request for idempotency.
async fn start(
    state: AppState,
    key: Option<ApiKey>,
    headers: &HeaderMap,
    request: ImageRequest,
    source: Option<Source>,
    fingerprint: &Value,
) -> Result<Response, ApiError> {
    let slot = state
        .model(&request.model)
        .ok_or_else(|| state.model_not_found(&request.model))?
        .clone();
    // A random seed any client can carry exactly, as the seeds they send must be.
    let job = Job::new(request, slot, key, rand::random::<u32>().into(), source)?;
    check_loras(&state, &job.engine().loras)?;
    let rate = match job.key() {
        Some(key) => state.0.limiter.admit(key, job.engine().n).await?,
        None => Default::default(),
    };
    let mut response = answer(state, job, headers, fingerprint)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    rate.apply(&mut response);
    Ok(response)
}

/// Each LoRA a request names must be a file in the LoRA folder (the worker that runs it
/// reads it, and refuses one made for another model).
fn check_loras(state: &AppState, loras: &[pictor_core::LoraRequest]) -> Result<(), ApiError> {
    if loras.is_empty() {
        return Ok(());
    }
    let dir = state.0.config.lora_dir.as_deref();
    let known: Vec<String> = dir
        .map(pictor_core::lora_files)
        .unwrap_or_default()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    match loras.iter().find(|l| !known.contains(&l.name)) {
        None => Ok(()),
        Some(missing) => Err(pictor_core::missing_lora(&missing.name, dir).into()),
    }
}

/// Streams, runs detached, or runs plainly.
async fn answer(
    state: AppState,
    job: Job,
    headers: &HeaderMap,
    body: &Value,
) -> Result<Response, ApiError> {
    let detached = detach::plan(headers, &job, body)?;
    if job.stream() {
        return stream::respond(state, job).await;
    }
    if let Some(detached) = detached {
        return detach::run(state, job, detached).await;
    }
    // If the client goes away, axum drops this future and with it the ticket, which
    // cancels the job before its next denoising step.
    let ticket = run::admit(&state, &job).await?;
    Ok(Json(run::finish(&state, &job, ticket).await?).into_response())
}
