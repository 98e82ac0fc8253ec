//! Jobs that outlive their connection, so a duplicate or a retry attaches to them instead of
//! rendering again:
//! - `Idempotency-Key`: the same key and body get one job and one answer; another body 409.
//! - No key, but an OpenAI SDK's retry (`x-stainless-retry-count` > 0) of a body the same
//!   API key sent within the last two minutes attaches to that attempt's job, running or
//!   just finished. A first attempt (count 0) always renders: sending the same body twice
//!   on purpose still draws new images.
//!
//! A detached job keeps running when its client leaves (that is the point: the retry
//! collects it); the queue's deadline still bounds it. A cluster's API nodes record these
//! runs in the database instead (`shared`), so a retry reaching another node attaches too.

use std::sync::Arc;

use axum::{
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};
use serde_json::Value;
use sha2::Digest as _;

use super::{job::Job, run};
use crate::{
    error::ApiError,
    idempotency::{Lookup, Replays},
    state::AppState,
};

/// Which table a detached run is recorded in.
#[derive(Clone, Copy)]
pub(super) enum Table {
    /// By `Idempotency-Key` (kept `idempotency_ttl_secs`).
    Keys,
    /// By request body, for SDK retries (kept two minutes).
    Retries,
}

/// A detached run's identity.
pub(super) struct Detached {
    pub(super) table: Table,
    /// Who and what: the API key and the idempotency key or the body's hash.
    pub(super) scope: String,
    /// The body's hash (a different body under the same idempotency key is a conflict).
    pub(super) fingerprint: String,
    /// Render anew even if the table holds a run for this scope (an SDK's first attempt).
    pub(super) fresh: bool,
}

impl Table {
    /// How long a finished run is replayed.
    pub(super) fn ttl(self, state: &AppState) -> std::time::Duration {
        match self {
            Self::Keys => state.0.config.idempotency_ttl,
            Self::Retries => crate::state::RETRY_TTL,
        }
    }

    /// Its name in shared records.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Keys => "key",
            Self::Retries => "retry",
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let visible = |b: &u8| (b'!'..=b'~').contains(b);
    let fits = (1..=255).contains(&bytes.len())
        && bytes.iter().all(|b| visible(b) || *b == b' ')
        && bytes.first().is_some_and(visible)
        && bytes.last().is_some_and(visible);
    match value.to_str() {
        Ok(v) if fits => Ok(Some(v.to_string())),
        _ => Err(ApiError::invalid(
            "Idempotency-Key",
            "The Idempotency-Key header must be 1 to 255 visible ASCII characters (inner spaces allowed).",
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

/// Whether `job` runs detached, and under which identity: by its `Idempotency-Key`, or as
/// an SDK attempt; `None` for a plain or streamed job. A malformed key, or a key on a
/// streamed job (a stream cannot be replayed), is a 400.
pub(super) fn plan(
    headers: &HeaderMap,
    job: &Job,
    body: &Value,
) -> Result<Option<Detached>, ApiError> {
    let idem = idempotency_key(headers)?;
    if job.stream() {
        return match idem {
            Some(_) => Err(ApiError::invalid(
                "Idempotency-Key",
                "A streamed response cannot be replayed; send Idempotency-Key without stream: true.",
            )),
            None => Ok(None),
        };
    }
    let (table, fresh) = match (&idem, sdk_attempt(headers)) {
        (Some(_), _) => (Table::Keys, false),
        (None, Some(attempt)) => (Table::Retries, attempt == 0),
        (None, None) => return Ok(None),
    };
    let owner = job.key().map_or("anonymous", |k| k.id.as_str());
    let fingerprint = hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(body).unwrap_or_default(),
    ));
    // Keyed runs are found by their key, SDK attempts by their body.
    let scope = format!("{owner}\n{}", idem.as_deref().unwrap_or(&fingerprint));
    Ok(Some(Detached {
        table,
        scope,
        fingerprint,
        fresh,
    }))
}

fn replays(state: &AppState, table: Table) -> &Replays {
    match table {
        Table::Keys => &state.0.replays,
        Table::Retries => &state.0.retries,
    }
}

pub(super) fn replay(stored: &[u8]) -> Response {
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
}

/// Runs `job` detached from the connection, recorded in its table: replays a finished run,
/// waits for a running one, or runs it and records the answer.
pub(super) async fn run(state: AppState, job: Job, d: Detached) -> Result<Response, ApiError> {
    if state.0.config.shared_state {
        return super::shared::run(state, job, d).await;
    }
    let Detached {
        table,
        scope,
        fingerprint,
        fresh,
    } = d;
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
                let ticket = match run::admit(&state, &job).await {
                    Ok(t) => t,
                    Err(e) => {
                        replays(&state, table).complete(&scope, &fingerprint, None, done);
                        return Err(e);
                    }
                };
                let task = tokio::spawn(async move {
                    let result = run::finish(&state, &job, ticket).await;
                    let stored = result
                        .as_ref()
                        .ok()
                        .and_then(|r| serde_json::to_vec(r).ok())
                        .map(Arc::new);
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
