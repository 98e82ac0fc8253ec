//! `POST /v1/images/generations` and the signed image links it hands out.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use pictor_sched::{JobError, SubmitError};
use pictor_store::now_unix;
use serde_json::Value;
use sha2::Digest as _;

use crate::{
    auth::Caller,
    encode::{self, Format},
    error::ApiError,
    idempotency::Lookup,
    openapi::{ImageData, ImagesResponse, Timings, Usage},
    receipt::Receipt,
    state::AppState,
    validate::{ValidGeneration, validate},
    wire::{self, ResponseFormat},
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
        return Err(ApiError::UnsupportedMediaType);
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid_body(format!(
            "We could not parse the JSON body of your request. ({e}) Send valid JSON with Content-Type: application/json."
        ))
    })
}

/// A validated request, ready for the queue.
pub(super) struct Prepared {
    pub(super) model: String,
    pub(super) valid: ValidGeneration,
    pub(super) key: Option<pictor_store::ApiKey>,
}

/// `POST /v1/images/generations`.
pub async fn generate(
    State(state): State<AppState>,
    Caller(key): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let config = &state.0.config;
    let body = json_body(&headers, body, config.max_body_bytes)?;
    let request = wire::parse(&body, &config.limits)?;
    let slot = state
        .model(&request.model)
        .ok_or_else(|| ApiError::ModelNotFound(request.model.clone()))?;
    let prepared = Prepared {
        model: slot.spec.name.clone(),
        valid: validate(request, &slot.spec.rules, rand::random())?,
        key,
    };
    let rate = match &prepared.key {
        Some(key) => state.0.limiter.admit(key, prepared.valid.engine.n)?,
        None => Default::default(),
    };
    let mut response = dispatch(state, prepared, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    rate.apply(&mut response);
    Ok(response)
}

/// Runs an admitted request: streamed, under an idempotency key, attachable by SDK
/// retries, or plain.
async fn dispatch(
    state: AppState,
    prepared: Prepared,
    headers: &HeaderMap,
    body: Value,
) -> Result<Response, ApiError> {
    let idem = idempotency_key(headers)?;
    if prepared.valid.request.stream {
        if idem.is_some() {
            return Err(ApiError::invalid(
                "Idempotency-Key",
                "A streamed response cannot be replayed; send Idempotency-Key without stream: true.",
            ));
        }
        return super::stream::respond(state, prepared);
    }
    let detach = match (idem, sdk_attempt(headers)) {
        (Some(idem), _) => Some((Table::Keys, Some(idem), false)),
        (None, Some(attempt)) => Some((Table::Retries, None, attempt == 0)),
        (None, None) => None,
    };
    if let Some((table, idem, fresh)) = detach {
        let owner = prepared.key.as_ref().map_or("anonymous", |k| k.id.as_str());
        let fingerprint = hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(&body).unwrap_or_default(),
        ));
        // Keyed runs are found by their key, SDK attempts by their body.
        let scope = format!("{owner}\n{}", idem.as_deref().unwrap_or(&fingerprint));
        let run = Run {
            scope,
            fingerprint,
            fresh,
        };
        return detached(state, prepared, run, table).await;
    }
    // If the client goes away, axum drops this future and with it the ticket, which
    // cancels the job before its next denoising step.
    let ticket = submit(&state, &prepared)?;
    Ok(Json(finish(&state, &prepared, ticket).await?).into_response())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(v) if !v.is_empty() && v.len() <= 255 => Ok(Some(v.to_string())),
        _ => Err(ApiError::invalid(
            "Idempotency-Key",
            "The Idempotency-Key header must be 1 to 255 visible ASCII characters.",
        )),
    }
}

/// The attempt number the OpenAI SDKs send (`x-stainless-retry-count`: 0 first, then 1, 2);
/// `None` from other clients.
fn sdk_attempt(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("x-stainless-retry-count")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Which table a detached run is recorded in.
#[derive(Clone, Copy)]
enum Table {
    /// By `Idempotency-Key` (kept `idempotency_ttl_secs`).
    Keys,
    /// By request body, for SDK retries (kept two minutes).
    Retries,
}

/// A detached run's identity.
struct Run {
    /// Who and what: the API key and the idempotency key or the body's hash.
    scope: String,
    /// The body's hash (a different body under the same idempotency key is a conflict).
    fingerprint: String,
    /// Render anew even if the table holds a run for this scope (an SDK's first attempt).
    fresh: bool,
}

/// Runs the job detached from the connection, recorded in `table`, so that a duplicate or
/// a retry attaches to it instead of rendering again:
/// - `Idempotency-Key`: the same key and body get one job and one answer; another body 409.
/// - No key, but an OpenAI SDK's retry (`x-stainless-retry-count` > 0) of a body the same
///   API key sent within the last two minutes attaches to that attempt's job, running or
///   just finished. A first attempt (count 0) always renders: sending the same body twice
///   on purpose still draws new images.
///
/// A detached job keeps running when its client leaves (that is the point: the retry
/// collects it); the queue's deadline still bounds it.
async fn detached(
    state: AppState,
    prepared: Prepared,
    run: Run,
    table: Table,
) -> Result<Response, ApiError> {
    fn replays(state: &AppState, table: Table) -> &crate::idempotency::Replays {
        match table {
            Table::Keys => &state.0.replays,
            Table::Retries => &state.0.retries,
        }
    }
    let replay = |stored: &[u8]| {
        (
            [
                (header::CONTENT_TYPE, "application/json"),
                (
                    header::HeaderName::from_static("idempotent-replayed"),
                    "true",
                ),
            ],
            stored.to_vec(),
        )
            .into_response()
    };
    let Run {
        scope,
        fingerprint,
        fresh,
    } = run;
    let mut lookup = if fresh {
        Lookup::New(replays(&state, table).begin_fresh(&scope, &fingerprint))
    } else {
        replays(&state, table).begin(&scope, &fingerprint)
    };
    loop {
        match lookup {
            Lookup::Replay(stored) => return Ok(replay(&stored)),
            Lookup::Conflict => return Err(ApiError::IdempotencyConflict),
            Lookup::Wait(mut done) => {
                let _ = done.changed().await;
                let stored = done.borrow().clone();
                match stored {
                    Some(stored) => return Ok(replay(&stored)),
                    // The first attempt failed: try again ourselves.
                    None => lookup = replays(&state, table).begin(&scope, &fingerprint),
                }
            }
            Lookup::New(done) => {
                let ticket = match submit(&state, &prepared) {
                    Ok(t) => t,
                    Err(e) => {
                        replays(&state, table).complete(&scope, &fingerprint, None, done);
                        return Err(e);
                    }
                };
                let task = tokio::spawn(async move {
                    let result = finish(&state, &prepared, ticket).await;
                    let stored = result
                        .as_ref()
                        .ok()
                        .and_then(|r| serde_json::to_vec(r).ok())
                        .map(std::sync::Arc::new);
                    replays(&state, table).complete(&scope, &fingerprint, stored.clone(), done);
                    result.map(|_| stored)
                });
                return match task.await {
                    Ok(Ok(Some(stored))) => Ok((
                        [(header::CONTENT_TYPE, "application/json")],
                        stored.to_vec(),
                    )
                        .into_response()),
                    Ok(Ok(None)) => Err(ApiError::Internal(anyhow::anyhow!(
                        "the response could not be serialized"
                    ))),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(ApiError::Internal(
                        anyhow::Error::new(e).context("generation task"),
                    )),
                };
            }
        }
    }
}

/// Admits the job to its model's queue (429 when full, 503 while loading or stopping).
pub(super) fn submit(state: &AppState, p: &Prepared) -> Result<pictor_sched::Ticket, ApiError> {
    if state.shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let slot = state
        .model(&p.model)
        .ok_or_else(|| ApiError::ModelNotFound(p.model.clone()))?;
    slot.ready_queue()?
        .submit(p.valid.engine.clone())
        .map_err(|e| match e {
            SubmitError::Overloaded { retry_after } => ApiError::Overloaded {
                model: p.model.clone(),
                retry_after,
            },
            SubmitError::Closed => ApiError::shutting_down(),
        })
}

/// Waits for the job, encodes and stores its images, records usage.
pub(super) async fn finish(
    state: &AppState,
    p: &Prepared,
    ticket: pictor_sched::Ticket,
) -> Result<ImagesResponse, ApiError> {
    let model = &p.model;
    let outcome = ticket.wait().await.map_err(|e| match e {
        JobError::TimedOut(limit) => ApiError::Timeout(limit),
        other => ApiError::Internal(
            anyhow::Error::new(other).context(format!("generating with {model}")),
        ),
    })?;
    metrics::histogram!("pictor_generation_seconds", "model" => model.clone())
        .record(outcome.ran.as_secs_f64());
    metrics::counter!("pictor_images_generated_total", "model" => model.clone())
        .increment(outcome.generation.images.len() as u64);
    let response = respond(state, model, &p.valid, &outcome).await?;
    if let Some(key) = &p.key {
        let e = &p.valid.engine;
        let images = outcome.generation.images.len() as i64;
        state
            .db()
            .record_usage(
                &key.id,
                images,
                images * (e.width * e.height) as i64,
                outcome.ran.as_secs_f64(),
            )
            .await?;
    }
    Ok(response)
}

async fn respond(
    state: &AppState,
    model: &str,
    valid: &ValidGeneration,
    outcome: &pictor_sched::Outcome,
) -> Result<ImagesResponse, ApiError> {
    let generation = &outcome.generation;
    let model_hash = state
        .model(model)
        .and_then(|m| m.hash())
        .map(str::to_string);
    let phases = &generation.phases;
    let timings = Timings {
        queue_seconds: outcome.queued.as_secs_f64(),
        encode_seconds: phases.encode.as_secs_f64(),
        denoise_seconds: phases.denoise.as_secs_f64(),
        decode_seconds: phases.decode.as_secs_f64(),
        generation_seconds: outcome.ran.as_secs_f64(),
    };
    let req = &valid.request;
    let ttl = state.0.config.image_ttl.as_secs() as i64;
    let e = &valid.engine;
    let mut data = Vec::with_capacity(generation.images.len());
    for (i, image) in generation.images.iter().enumerate() {
        let seed = e.seed.wrapping_add(i as u64);
        let parameters = Receipt {
            prompt: generation.prompt.encoded.clone(),
            steps: e.steps,
            seed,
            width: e.width,
            height: e.height,
            model: model.to_string(),
            model_hash: model_hash.clone(),
        }
        .to_parameters();
        let bytes = encode::encode(
            image,
            req.output_format,
            req.output_compression.max(1),
            &parameters,
        )?;
        let (url, b64_json) = match req.response_format {
            ResponseFormat::B64Json => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
            ),
            ResponseFormat::Url => (
                Some(store_image(state, bytes, req.output_format, ttl).await?),
                None,
            ),
        };
        data.push(ImageData {
            url,
            b64_json,
            revised_prompt: generation.prompt.encoded.clone(),
            prompt_truncated: generation.prompt.truncated,
            seed,
            steps: e.steps as u32,
            width: e.width as u32,
            height: e.height as u32,
            guidance: None,
            model: model.to_string(),
            model_hash: model_hash.clone(),
            timings,
        });
    }
    let input = generation.prompt.tokens as u64;
    let output = (generation.images.len() * (e.width / 16) * (e.height / 16)) as u64;
    Ok(ImagesResponse {
        usage: Usage::new(input, output),
        created: now_unix(),
        data,
        output_format: req.output_format.name(),
        size: format!("{}x{}", e.width, e.height),
        quality: quality_name(e.steps),
    })
}

/// OpenAI's `quality` for a run of `steps` (schnell's default 4 is `high`).
pub(super) fn quality_name(steps: usize) -> &'static str {
    match steps {
        s if s >= 4 => "high",
        3 => "medium",
        _ => "low",
    }
}

/// Stores the bytes and returns their signed link.
async fn store_image(
    state: &AppState,
    bytes: Vec<u8>,
    format: Format,
    ttl: i64,
) -> Result<String, ApiError> {
    let name = format!(
        "{}.{}",
        hex::encode(rand::random::<[u8; 16]>()),
        format.extension()
    );
    let expires = now_unix() + ttl;
    state.0.blobs.put(&name, bytes.into()).await?;
    state
        .db()
        .add_image(&name, format.content_type(), expires)
        .await?;
    let signature = state.0.signer.sign(&name, expires);
    Ok(format!(
        "{}/v1/images/files/{name}?expires={expires}&signature={signature}",
        state.0.config.public_url.trim_end_matches('/')
    ))
}

/// Query of an image link.
#[derive(Debug, serde::Deserialize)]
pub struct LinkQuery {
    expires: Option<i64>,
    signature: Option<String>,
}

/// `GET /v1/images/files/{name}`: serves a stored image to whoever holds a valid link.
pub async fn file(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LinkQuery>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound("This image link is invalid or has expired.".into());
    let (Some(expires), Some(signature)) = (q.expires, q.signature) else {
        return Err(not_found());
    };
    if expires <= now_unix() || !state.0.signer.verify(&name, expires, &signature) {
        return Err(not_found());
    }
    let content_type = state.db().live_image(&name).await?.ok_or_else(not_found)?;
    let bytes = match state.0.blobs.get(&name).await {
        Ok(b) => b,
        Err(pictor_store::StoreError::NotFound(_)) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    let max_age = (expires - now_unix()).max(0);
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, format!("private, max-age={max_age}")),
        ],
        bytes,
    )
        .into_response())
}

/// Deletes expired images; returns how many.
pub async fn sweep(state: &AppState) -> anyhow::Result<usize> {
    let expired = state.db().take_expired_images(now_unix()).await?;
    for name in &expired {
        state.0.blobs.delete(name).await?;
    }
    Ok(expired.len())
}
