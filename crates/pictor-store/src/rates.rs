//! Per-key token buckets in the database, for API nodes that share rate limits: each
//! admission reads and rewrites a key's buckets under a row lock (PostgreSQL), on the
//! database's clock, so nodes never compare their own.

use sqlx::Row;

use crate::{Backend, Db, Result};

/// A token bucket as stored: tokens left, and when they were counted (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// Tokens left.
    pub tokens: f64,
    /// When, in seconds on the database's clock.
    pub at: f64,
}

/// The two buckets of a key: requests, images.
pub type Buckets = [Option<BucketState>; 2];

fn pair(tokens: Option<f64>, at: Option<f64>) -> Option<BucketState> {
    Some(BucketState {
        tokens: tokens?,
        at: at?,
    })
}

impl Db {
    /// Runs `decide` on key `key_id`'s buckets and stores the buckets it returns, as one
    /// transaction holding the key's row (so two nodes admitting for the same key take
    /// turns); `decide` gets the database's clock in seconds. On SQLite (one process) the
    /// row is not locked.
    pub async fn with_rate_buckets<T>(
        &self,
        key_id: &str,
        decide: impl FnOnce(f64, Buckets) -> (Buckets, T),
    ) -> Result<T> {
        let (now, lock) = match self.backend {
            Backend::Postgres => (
                "EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION",
                " FOR UPDATE",
            ),
            Backend::Sqlite => ("(julianday('now') - 2440587.5) * 86400.0", ""),
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO rate_buckets (key_id) VALUES ($1) ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(key_id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT requests_tokens, requests_at, images_tokens, images_at, {now} AS now
             FROM rate_buckets WHERE key_id = $1{lock}"
        ))
        .bind(key_id)
        .fetch_one(&mut *tx)
        .await?;
        let buckets = [
            pair(row.try_get(0)?, row.try_get(1)?),
            pair(row.try_get(2)?, row.try_get(3)?),
        ];
        let (buckets, out) = decide(row.try_get("now")?, buckets);
        sqlx::query(
            "UPDATE rate_buckets SET requests_tokens = $2, requests_at = $3,
                 images_tokens = $4, images_at = $5 WHERE key_id = $1",
        )
        .bind(key_id)
        .bind(buckets[0].map(|b| b.tokens))
        .bind(buckets[0].map(|b| b.at))
        .bind(buckets[1].map(|b| b.tokens))
        .bind(buckets[1].map(|b| b.at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn buckets_persist_and_take_turns(db: Db) -> Result<()> {
        let first = db
            .with_rate_buckets("key_a", |now, b| {
                assert_eq!(b, [None, None]);
                (
                    [
                        Some(BucketState {
                            tokens: 3.0,
                            at: now,
                        }),
                        None,
                    ],
                    now,
                )
            })
            .await?;
        let seen = db.with_rate_buckets("key_a", |_, b| (b, b)).await?;
        assert_eq!(seen[0].map(|b| (b.tokens, b.at)), Some((3.0, first)));
        assert_eq!(seen[1], None);
        // Concurrent admissions each see the other's spending: ten take one token each.
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move {
                    db.with_rate_buckets("key_b", |now, b| {
                        let left = b[0].map_or(10.0, |b| b.tokens) - 1.0;
                        (
                            [
                                Some(BucketState {
                                    tokens: left,
                                    at: now,
                                }),
                                None,
                            ],
                            (),
                        )
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task")?;
        }
        let left = db.with_rate_buckets("key_b", |_, b| (b, b[0])).await?;
        assert_eq!(left.map(|b| b.tokens), Some(0.0));
        Ok(())
    }

    #[tokio::test]
    async fn rate_buckets_on_postgres() -> Result<()> {
        buckets_persist_and_take_turns(crate::testing::fresh_postgres().await?).await
    }
}
