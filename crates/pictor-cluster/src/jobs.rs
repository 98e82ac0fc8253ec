//! The job table's statements, written once: insert, claim, renew, finish, cancel, reap,
//! and the workers' advertisements. Times are the database's clock in milliseconds
//! (`NOW_MS`), so nodes never compare their own clocks.

use sqlx::{PgPool, Row};

use crate::{Advertised, Result};

/// The database's clock, Unix milliseconds.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The channel that wakes workers (payload: the model).
pub(crate) const JOBS_CHANNEL: &str = "pictor_jobs";
/// The channel of job events for API nodes (payload: see `events`).
pub(crate) const EVENTS_CHANNEL: &str = "pictor_events";

/// A claimed job.
pub(crate) struct Claimed {
    pub id: String,
    pub model: String,
    pub request: String,
    pub attempts: i64,
    /// Images it makes (at least one).
    pub images: usize,
    /// Milliseconds it waited before this run.
    pub waited_ms: i64,
}

/// A job as an API node reads it back.
pub(crate) struct JobRow {
    pub state: String,
    pub result: Option<String>,
    pub error: Option<String>,
}

/// What admitting a job found.
pub(crate) struct Admitted {
    /// Whether the job was queued (the model's waiting jobs were under the bound).
    pub queued: bool,
    /// Jobs of the model waiting (counted up to the bound) and running before it.
    pub waiting: i64,
    pub running: i64,
}

/// A job to queue.
pub(crate) struct NewJob<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub request: &'a str,
    /// Images it makes (a worker claims no more than its batch holds).
    pub images: i64,
    pub max_attempts: i64,
    pub timeout_ms: i64,
}

/// Queues `job` unless `depth` jobs of its model already wait (one statement), then wakes
/// the workers.
pub(crate) async fn admit(pool: &PgPool, job: &NewJob<'_>, depth: i64) -> Result<Admitted> {
    let row = sqlx::query(&format!(
        "WITH depth AS (
             SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM jobs
                         WHERE state = 'queued' AND model = $2 LIMIT $7) AS w) AS waiting,
                    (SELECT COUNT(*) FROM jobs
                         WHERE state = 'running' AND model = $2) AS running),
         queued AS (
             INSERT INTO jobs (id, model, state, request, images, max_attempts, created_at,
                               deadline)
             SELECT $1, $2, 'queued', $3, $4, $5, {NOW_MS}, {NOW_MS} + $6
             FROM depth WHERE waiting < $7
             RETURNING id)
         SELECT waiting, running, (SELECT COUNT(*) FROM queued) AS queued FROM depth"
    ))
    .bind(job.id)
    .bind(job.model)
    .bind(job.request)
    .bind(job.images)
    .bind(job.max_attempts)
    .bind(job.timeout_ms)
    .bind(depth)
    .fetch_one(pool)
    .await?;
    let queued = row.try_get::<i64, _>("queued")? == 1;
    if queued {
        notify(pool, JOBS_CHANNEL, job.model).await?;
    }
    Ok(Admitted {
        queued,
        waiting: row.try_get("waiting")?,
        running: row.try_get("running")?,
    })
}

/// Claims for `worker`, leased for `lease_ms`, the oldest waiting job of one of `models`
/// whose images fit the room that model has (`rooms`, in the same order). Each model's
/// oldest is read in index order (a join instead sorted every waiting job on each claim).
pub(crate) async fn claim(
    pool: &PgPool,
    worker: &str,
    models: &[String],
    rooms: &[i64],
    lease_ms: i64,
) -> Result<Option<Claimed>> {
    let row = sqlx::query(&format!(
        "UPDATE jobs SET state = 'running', worker = $1, attempts = attempts + 1,
             leased_until = {NOW_MS} + $2, started_at = {NOW_MS}
         WHERE id = (SELECT oldest.id FROM UNNEST($3::TEXT[], $4::BIGINT[]) AS free(model, room)
                     CROSS JOIN LATERAL (
                         SELECT j.id, j.created_at FROM jobs j
                         WHERE j.state = 'queued' AND j.model = free.model
                           AND j.images <= free.room AND j.deadline > {NOW_MS}
                         ORDER BY j.created_at, j.id LIMIT 1 FOR UPDATE SKIP LOCKED) AS oldest
                     ORDER BY oldest.created_at, oldest.id LIMIT 1)
         RETURNING id, model, request, attempts, images, started_at - created_at AS waited"
    ))
    .bind(worker)
    .bind(lease_ms)
    .bind(models)
    .bind(rooms)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(Claimed {
            id: r.try_get("id")?,
            model: r.try_get("model")?,
            request: r.try_get("request")?,
            attempts: r.try_get("attempts")?,
            images: r.try_get::<i64, _>("images")?.max(1) as usize,
            waited_ms: r.try_get("waited")?,
        })
    })
    .transpose()
}

/// Renews `worker`'s lease on job `id`; `None` when it lost the job (reaped), else whether
/// its caller asked to cancel.
pub(crate) async fn renew(
    pool: &PgPool,
    id: &str,
    worker: &str,
    lease_ms: i64,
) -> Result<Option<bool>> {
    let row = sqlx::query(&format!(
        "UPDATE jobs SET leased_until = {NOW_MS} + $3
         WHERE id = $1 AND worker = $2 AND state = 'running'
         RETURNING cancel_requested"
    ))
    .bind(id)
    .bind(worker)
    .bind(lease_ms)
    .fetch_optional(pool)
    .await?;
    row.map(|r| Ok(r.try_get::<i64, _>(0)? != 0)).transpose()
}

/// Whether `worker` still holds job `id` (`None`: it lost it), and whether its caller
/// asked to cancel; reads only.
pub(crate) async fn check(pool: &PgPool, id: &str, worker: &str) -> Result<Option<bool>> {
    let row = sqlx::query(
        "SELECT cancel_requested FROM jobs WHERE id = $1 AND worker = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(worker)
    .fetch_optional(pool)
    .await?;
    row.map(|r| Ok(r.try_get::<i64, _>(0)? != 0)).transpose()
}

/// Ends `worker`'s run of job `id` as `state` with `result` or `error`, once: a worker
/// that lost the job (its lease expired and another took it) changes nothing. Then tells
/// the API nodes. Returns whether this run's outcome was recorded.
pub(crate) async fn finish(
    pool: &PgPool,
    id: &str,
    worker: &str,
    state: &str,
    result: Option<&str>,
    error: Option<&str>,
) -> Result<bool> {
    let ended = sqlx::query(&format!(
        "UPDATE jobs SET state = $3, result = $4, error = $5, finished_at = {NOW_MS},
             leased_until = NULL
         WHERE id = $1 AND worker = $2 AND state = 'running'"
    ))
    .bind(id)
    .bind(worker)
    .bind(state)
    .bind(result)
    .bind(error)
    .execute(pool)
    .await?
    .rows_affected()
        == 1;
    if ended {
        notify_done(pool, id).await?;
    }
    Ok(ended)
}

/// Sends `payload` on `channel`, in a statement of its own after the change it tells of
/// has committed. PostgreSQL serialises the commits of notifying transactions; one that
/// writes nothing commits without flushing the log, so the lock is held only briefly.
/// (Notifying inside the writing transaction held it across the flush, and at 64 workers
/// that queue was most of a job's overhead.) A notification lost to a crash in between is
/// caught by the pollers.
pub(crate) async fn notify(
    conn: impl sqlx::PgExecutor<'_>,
    channel: &str,
    payload: &str,
) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}

async fn notify_done(conn: impl sqlx::PgExecutor<'_>, id: &str) -> Result<()> {
    notify(conn, EVENTS_CHANNEL, &format!("done:{id}")).await
}

/// Gives job `id` back to the queue (a worker stopping), not counting the run.
pub(crate) async fn hand_back(pool: &PgPool, id: &str, worker: &str, model: &str) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET state = 'queued', worker = NULL, leased_until = NULL,
             attempts = GREATEST(attempts - 1, 0)
         WHERE id = $1 AND worker = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(worker)
    .execute(pool)
    .await?;
    notify(pool, JOBS_CHANNEL, model).await
}

/// The caller left: a waiting job is cancelled at once, a running one is flagged for its
/// worker (which stops before its next step).
pub(crate) async fn cancel(pool: &PgPool, id: &str) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE jobs SET cancel_requested = 1,
             state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END,
             finished_at = CASE WHEN state = 'queued' THEN {NOW_MS} ELSE finished_at END
         WHERE id = $1 AND state IN ('queued', 'running')"
    ))
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// How many jobs of the same model were queued before job `id` and still wait (claims
/// take the oldest first, a tie in milliseconds by id); `None` once it no longer waits.
pub(crate) async fn place(pool: &PgPool, id: &str) -> Result<Option<i64>> {
    let row = sqlx::query(&format!(
        "SELECT (SELECT COUNT(*) FROM jobs q
                     WHERE q.state = 'queued' AND q.model = j.model
                       AND (q.created_at, q.id) < (j.created_at, j.id)
                       AND q.deadline > {NOW_MS}) AS ahead
         FROM jobs j WHERE j.id = $1 AND j.state = 'queued'"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| r.try_get("ahead"))
        .transpose()
        .map_err(Into::into)
}

/// A job's state, result and error.
pub(crate) async fn read(pool: &PgPool, id: &str) -> Result<Option<JobRow>> {
    let row = sqlx::query("SELECT state, result, error FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        Ok(JobRow {
            state: r.try_get("state")?,
            result: r.try_get("result")?,
            error: r.try_get("error")?,
        })
    })
    .transpose()
}

/// Hands expired leases to another worker (or fails a job that ran `max_attempts` times)
/// and fails waiting jobs past their deadline; tells whoever waits. Returns how many jobs
/// were requeued and how many failed.
pub(crate) async fn reap(pool: &PgPool) -> Result<(u64, u64)> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(&format!(
        "UPDATE jobs SET
             state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
             error = CASE WHEN attempts >= max_attempts
                 THEN 'its worker stopped during each of its ' || attempts || ' runs'
                 ELSE error END,
             finished_at = CASE WHEN attempts >= max_attempts THEN {NOW_MS} ELSE NULL END,
             worker = NULL, leased_until = NULL
         WHERE state = 'running' AND leased_until < {NOW_MS}
         RETURNING id, state, model"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let late = sqlx::query(&format!(
        "UPDATE jobs SET state = 'failed', error = 'it waited past its deadline',
             finished_at = {NOW_MS}
         WHERE state = 'queued' AND deadline <= {NOW_MS} RETURNING id"
    ))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let (mut requeued, mut failed) = (0, late.len() as u64);
    for row in &rows {
        let id: String = row.try_get("id")?;
        let state: String = row.try_get("state")?;
        if state == "queued" {
            requeued += 1;
            let model: String = row.try_get("model")?;
            notify(pool, JOBS_CHANNEL, &model).await?;
        } else {
            failed += 1;
            notify_done(pool, &id).await?;
        }
    }
    for row in &late {
        notify_done(pool, &row.try_get::<String, _>("id")?).await?;
    }
    Ok((requeued, failed))
}

/// Records that `worker` is alive and serves `models`.
pub(crate) async fn advertise(pool: &PgPool, worker: &str, models: &[Advertised]) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO workers (id, models, seen_at) VALUES ($1, $2, {NOW_MS})
         ON CONFLICT (id) DO UPDATE SET models = EXCLUDED.models, seen_at = EXCLUDED.seen_at"
    ))
    .bind(worker)
    .bind(serde_json::to_string(models)?)
    .execute(pool)
    .await?;
    Ok(())
}

/// Removes `worker`'s advertisement (it stops).
pub(crate) async fn retire(pool: &PgPool, worker: &str) -> Result<()> {
    sqlx::query("DELETE FROM workers WHERE id = $1")
        .bind(worker)
        .execute(pool)
        .await?;
    Ok(())
}

/// The models of workers seen within the last 10 seconds, one entry per model name.
pub(crate) async fn advertised(pool: &PgPool) -> Result<Vec<Advertised>> {
    let rows = sqlx::query(&format!(
        "SELECT models FROM workers WHERE seen_at > {NOW_MS} - 10000 ORDER BY id"
    ))
    .fetch_all(pool)
    .await?;
    let mut out: Vec<Advertised> = Vec::new();
    for row in rows {
        let models: Vec<Advertised> = serde_json::from_str(&row.try_get::<String, _>(0)?)?;
        for m in models {
            if !out.iter().any(|o| o.name == m.name) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// Workers seen within the last 10 seconds.
pub(crate) async fn workers_alive(pool: &PgPool) -> Result<i64> {
    let row = sqlx::query(&format!(
        "SELECT COUNT(*) FROM workers WHERE seen_at > {NOW_MS} - 10000"
    ))
    .fetch_one(pool)
    .await?;
    Ok(row.try_get(0)?)
}

/// Which of `ids` have ended (done, failed or cancelled): one read for every job a node
/// follows, the fallback when a notification was lost.
pub(crate) async fn ended(pool: &PgPool, ids: &[String]) -> Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT id FROM jobs WHERE id = ANY($1) AND state NOT IN ('queued', 'running')",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// Deletes up to `limit` jobs that ended more than `retention_ms` ago; returns each one's
/// id, request and result (to find what it left in the store).
pub(crate) async fn sweep(
    pool: &PgPool,
    retention_ms: i64,
    limit: i64,
) -> Result<Vec<(String, String, Option<String>)>> {
    let rows = sqlx::query(&format!(
        "DELETE FROM jobs WHERE id IN (
             SELECT id FROM jobs
             WHERE state IN ('done', 'failed', 'cancelled') AND finished_at < {NOW_MS} - $1
             LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING id, request, result"
    ))
    .bind(retention_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect()
}
