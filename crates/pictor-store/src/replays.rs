//! Detached runs shared by a cluster's API nodes (`Idempotency-Key` and SDK-retry
//! attach): who runs a scope, on which job, and once done where its response is stored.
//! A running entry whose node stopped beating is taken over by the next node that asks,
//! with the job it was waiting on.

use sqlx::Row;

use crate::{Db, Result};

/// A scope's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayEntry {
    /// Nothing recorded (or expired).
    Absent,
    /// A node runs it.
    Running {
        /// The request's fingerprint.
        fingerprint: String,
        /// The job it waits on, once admitted.
        job: Option<String>,
        /// The running node's last beat, Unix milliseconds.
        heartbeat_ms: i64,
    },
    /// Answered; the response body is stored under `body_key`.
    Done {
        /// The request's fingerprint.
        fingerprint: String,
        /// Where the response body is.
        body_key: String,
    },
}

impl Db {
    /// Records `node` as running `scope` for a request with `fingerprint`, if nothing is
    /// recorded; returns whether it did.
    pub async fn replay_claim(
        &self,
        scope: &str,
        fingerprint: &str,
        node: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO replays (scope, fingerprint, state, node, heartbeat_ms, expires_ms)
             VALUES ($1, $2, 'running', $3, $4, $5) ON CONFLICT (scope) DO NOTHING",
        )
        .bind(scope)
        .bind(fingerprint)
        .bind(node)
        .bind(now_ms)
        .bind(now_ms + ttl_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// `scope`'s entry; an expired one is removed and reads as absent.
    pub async fn replay_get(&self, scope: &str, now_ms: i64) -> Result<ReplayEntry> {
        sqlx::query("DELETE FROM replays WHERE scope = $1 AND expires_ms <= $2")
            .bind(scope)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query(
            "SELECT fingerprint, state, job_id, body_key, heartbeat_ms FROM replays WHERE scope = $1",
        )
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(ReplayEntry::Absent);
        };
        let fingerprint: String = row.try_get("fingerprint")?;
        let state: String = row.try_get("state")?;
        Ok(
            match (
                state.as_str(),
                row.try_get::<Option<String>, _>("body_key")?,
            ) {
                ("done", Some(body_key)) => ReplayEntry::Done {
                    fingerprint,
                    body_key,
                },
                _ => ReplayEntry::Running {
                    fingerprint,
                    job: row.try_get("job_id")?,
                    heartbeat_ms: row.try_get("heartbeat_ms")?,
                },
            },
        )
    }

    /// Takes over `scope` from a node whose last beat was `heartbeat_ms` (it stopped);
    /// returns whether this node now runs it (another may have been first).
    pub async fn replay_take_over(
        &self,
        scope: &str,
        heartbeat_ms: i64,
        node: &str,
        now_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE replays SET node = $3, heartbeat_ms = $4
             WHERE scope = $1 AND state = 'running' AND heartbeat_ms = $2",
        )
        .bind(scope)
        .bind(heartbeat_ms)
        .bind(node)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the job `scope` waits on and beats for `node`.
    pub async fn replay_beat(
        &self,
        scope: &str,
        node: &str,
        job: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE replays SET heartbeat_ms = $3, job_id = COALESCE($4, job_id)
             WHERE scope = $1 AND node = $2 AND state = 'running'",
        )
        .bind(scope)
        .bind(node)
        .bind(now_ms)
        .bind(job)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records `scope` as answered, its body stored under `body_key`, until `expires_ms`.
    pub async fn replay_done(&self, scope: &str, body_key: &str, expires_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE replays SET state = 'done', body_key = $2, expires_ms = $3 WHERE scope = $1",
        )
        .bind(scope)
        .bind(body_key)
        .bind(expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets `scope` (its run failed, or a fresh run replaces it).
    pub async fn replay_forget(&self, scope: &str) -> Result<()> {
        sqlx::query("DELETE FROM replays WHERE scope = $1")
            .bind(scope)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn a_run_is_claimed_once_taken_over_once_and_replayed(db: Db) -> Result<()> {
        assert_eq!(db.replay_get("s", 1000).await?, ReplayEntry::Absent);
        assert!(db.replay_claim("s", "fp", "a", 1000, 60_000).await?);
        assert!(!db.replay_claim("s", "fp", "b", 1001, 60_000).await?);
        db.replay_beat("s", "a", Some("job_1"), 2000).await?;
        let ReplayEntry::Running {
            job, heartbeat_ms, ..
        } = db.replay_get("s", 3000).await?
        else {
            panic!("running");
        };
        assert_eq!((job.as_deref(), heartbeat_ms), (Some("job_1"), 2000));
        // Node a stopped: b and c both try to take over; one wins.
        assert!(db.replay_take_over("s", 2000, "b", 40_000).await?);
        assert!(!db.replay_take_over("s", 2000, "c", 40_001).await?);
        db.replay_done("s", "replays/s.json", 100_000).await?;
        assert_eq!(
            db.replay_get("s", 50_000).await?,
            ReplayEntry::Done {
                fingerprint: "fp".into(),
                body_key: "replays/s.json".into()
            }
        );
        assert_eq!(db.replay_get("s", 100_000).await?, ReplayEntry::Absent);
        Ok(())
    }

    #[tokio::test]
    async fn replays_on_sqlite_and_postgres() -> Result<()> {
        a_run_is_claimed_once_taken_over_once_and_replayed(Db::connect("sqlite::memory:").await?)
            .await?;
        a_run_is_claimed_once_taken_over_once_and_replayed(crate::testing::fresh_postgres().await?)
            .await
    }
}
