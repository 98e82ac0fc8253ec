//! Detached runs across a cluster's API nodes: the run of an `Idempotency-Key` (or an SDK
//! attempt) is recorded in the database, its response body in the image store, so a
//! duplicate or a retry reaching any node replays it, waits for it, or, when the node
//! running it stopped (no beat for `STALE`), takes it over by attaching to the job it was
//! waiting on: the images are never rendered twice.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::{
    http::header,
    response::{IntoResponse, Response},
};
use pictor_store::ReplayEntry;

use super::{
    detach::{Detached, replay},
    job::Job,
    run,
};
use crate::{error::ApiError, state::AppState};

/// A node beats this often while it runs a recorded job...
const BEAT: Duration = Duration::from_secs(5);
/// ...and is taken to have stopped after this long without.
const STALE: Duration = Duration::from_secs(15);
/// How often a duplicate looks at a run another node holds.
const WAIT: Duration = Duration::from_millis(250);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Runs `job` as the detached run `d`, shared with the other API nodes.
pub(super) async fn run(state: AppState, job: Job, d: Detached) -> Result<Response, ApiError> {
    let db = state.db().clone();
    let node = state.0.node.clone();
    let scope = format!("{}\n{}", d.table.name(), d.scope);
    let ttl_ms = d.table.ttl(&state).as_millis() as i64;
    if d.fresh {
        db.replay_forget(&scope).await?;
    }
    loop {
        let now = now_ms();
        if db
            .replay_claim(&scope, &d.fingerprint, &node, now, ttl_ms)
            .await?
        {
            return own(state, job, scope, ttl_ms, None).await;
        }
        match db.replay_get(&scope, now).await? {
            ReplayEntry::Absent => continue,
            ReplayEntry::Done {
                fingerprint,
                body_key,
            } if fingerprint == d.fingerprint => {
                return Ok(replay(&state.0.blobs.get(&body_key).await?));
            }
            ReplayEntry::Running {
                fingerprint,
                job: waited_on,
                heartbeat_ms,
            } if fingerprint == d.fingerprint => {
                let stale = now - heartbeat_ms > STALE.as_millis() as i64;
                if stale
                    && db
                        .replay_take_over(&scope, heartbeat_ms, &node, now)
                        .await?
                {
                    tracing::info!(job = ?waited_on, "taking over a run whose API node stopped");
                    return own(state, job, scope, ttl_ms, waited_on).await;
                }
                tokio::time::sleep(WAIT).await;
            }
            _ => return Err(ApiError::IdempotencyConflict),
        }
    }
}

/// Runs the recorded `scope` on this node: on the job it `adopt`s (left by a node that
/// stopped) or a new one; beats while it waits, then stores and records the answer. The
/// run goes on when the client leaves, so that its retry collects it.
async fn own(
    state: AppState,
    job: Job,
    scope: String,
    ttl_ms: i64,
    adopt: Option<String>,
) -> Result<Response, ApiError> {
    let db = state.db().clone();
    let node = state.0.node.clone();
    // The job's id is recorded before the job exists: a node stopped between admitting and
    // recording would otherwise leave a job that whoever takes over cannot find, and the
    // images would be rendered twice.
    let id = adopt
        .clone()
        .unwrap_or_else(|| pictor_sched::job_id(rand::random()));
    db.replay_beat(&scope, &node, Some(&id), now_ms()).await?;
    let admitted = match &adopt {
        Some(id) => {
            let queue = &job.slot().ready()?.queue;
            match queue.attach(id, job.engine().previews).await {
                Ok(ticket) => Ok(ticket),
                // The stopped node recorded the id but never admitted the job.
                Err(_) => run::admit_as(&state, &job, Some(id)).await,
            }
        }
        None => run::admit_as(&state, &job, Some(&id)).await,
    };
    let ticket = match admitted {
        Ok(t) => t,
        Err(e) => {
            db.replay_forget(&scope).await?;
            return Err(e);
        }
    };
    db.replay_beat(&scope, &node, ticket.job(), now_ms())
        .await?;
    let task = tokio::spawn(async move {
        let beats = {
            let (db, scope, node) = (db.clone(), scope.clone(), node.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(BEAT).await;
                    if let Err(e) = db.replay_beat(&scope, &node, None, now_ms()).await {
                        tracing::warn!(error = %e, "beating for a detached run");
                    }
                }
            })
        };
        let recorded = async {
            let response = run::finish(&state, &job, ticket).await?;
            let body = serde_json::to_vec(&response).map_err(|e| ApiError::Internal(e.into()))?;
            let key = format!("replays/{}.json", hex::encode(rand::random::<[u8; 16]>()));
            if let Err(e) = state
                .0
                .blobs
                .put(&key, body.clone().into(), "application/json")
                .await
            {
                // The answer matters more than its replay: give it, unrecorded.
                tracing::warn!(error = %e, "storing a response for replay failed");
                let _ = db.replay_forget(&scope).await;
                return Ok(body);
            }
            let expires_ms = now_ms() + ttl_ms;
            // Indexed like a stored image, so the sweeper deletes it when it expires.
            db.add_image(&key, "application/json", expires_ms / 1000 + 1)
                .await?;
            db.replay_done(&scope, &key, expires_ms).await?;
            Ok::<_, ApiError>(body)
        }
        .await;
        beats.abort();
        if recorded.is_err() {
            // A failed run leaves nothing behind: a retry runs again.
            let _ = db.replay_forget(&scope).await;
        }
        recorded
    });
    match task.await {
        Ok(Ok(body)) => Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response()),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(ApiError::Internal(
            anyhow::Error::new(e).context("detached run"),
        )),
    }
}
