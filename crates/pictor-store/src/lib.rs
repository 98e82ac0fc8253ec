//! Pictor's stores: API keys and usage in SQL, generated images in object storage.
//!
//! This crate is where state lives; it knows nothing of HTTP or of models.
//! [`Db`] holds keys (only as SHA-256 hashes of their secrets), per-key usage and the
//! index of stored images, through sqlx with embedded migrations (SQLite by default; the
//! SQL is kept portable for PostgreSQL). [`Blobs`] holds image bytes in an `object_store`
//! (a local directory by default).
//!
//! One design decision: keys are random (`sk-` + 32 random bytes, hex), so a plain SHA-256
//! is a sufficient hash (no password stretching is needed against guessing), lookups are by
//! hash, and the final comparison is constant-time.

mod blobs;
mod keys;

use std::{
    path::Path,
    str::FromStr,
    time::{SystemTime, UNIX_EPOCH},
};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use blobs::Blobs;
pub use keys::{ApiKey, KeyLimits, NewKey, Usage};

/// Errors from the stores.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Object storage failed.
    #[error("object storage: {0}")]
    Blob(#[from] object_store::Error),
    /// Something named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
}

/// The stores' result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The SQL database.
#[derive(Clone)]
pub struct Db {
    pool: sqlx::SqlitePool,
}

impl Db {
    /// Opens (creating if needed) the database at `url` (`sqlite://path` or `sqlite::memory:`)
    /// and applies migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // With the write-ahead log, NORMAL syncs at checkpoints instead of on every
            // commit: a commit survives the process crashing, and the database cannot be
            // corrupted; only a power cut can lose the last commits, as it can the image
            // files beside them, which are not synced either. FULL made each `url`
            // response wait for an fsync (p99 overhead 25 ms at 1 client, 183 ms at 8).
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Opens the SQLite file `path`.
    pub async fn open_file(path: &Path) -> Result<Self> {
        Self::connect(&format!("sqlite://{}", path.display())).await
    }

    /// Records a stored image's expiry.
    pub async fn add_image(&self, id: &str, content_type: &str, expires_at: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO images (id, content_type, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(content_type)
        .bind(now_unix())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A stored image's content type, if it exists and has not expired.
    pub async fn live_image(&self, id: &str) -> Result<Option<String>> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT content_type FROM images WHERE id = $1 AND expires_at > $2")
                .bind(id)
                .bind(now_unix())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.0))
    }

    /// Removes and returns the ids of images expired at `now`.
    pub async fn take_expired_images(&self, now: i64) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT id FROM images WHERE expires_at <= $1")
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        for (id,) in &rows {
            sqlx::query("DELETE FROM images WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}
