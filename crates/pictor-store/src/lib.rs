//! Pictor's stores: API keys and usage in SQL, generated images in object storage.
//!
//! This crate is where state lives; it knows nothing of HTTP or of models.
//! [`Db`] holds keys (only as SHA-256 hashes of their secrets), per-key usage and the
//! index of stored images, through sqlx with embedded migrations, on SQLite (one process,
//! the default) or PostgreSQL (a cluster): the same SQL and migrations run on both, and the
//! tests run them on both. [`Blobs`] holds image bytes in an `object_store`
//! (a local directory by default).
//!
//! One design decision: keys are random (`sk-` + 32 random bytes, hex), so a plain SHA-256
//! is a sufficient hash (no password stretching is needed against guessing), lookups are by
//! hash, and the final comparison is constant-time.

mod blobs;
mod keys;
mod rates;
mod replays;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::{
    path::Path,
    str::FromStr,
    time::{SystemTime, UNIX_EPOCH},
};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};

pub use blobs::{Blobs, S3Options};
pub use keys::{ApiKey, KeyLimits, NewKey, Usage};
pub use rates::{BucketState, Buckets};
pub use replays::ReplayEntry;

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
    /// A storage URL that is not `s3://bucket[/prefix]`.
    #[error("unsupported storage URL `{0}`: use s3://BUCKET or s3://BUCKET/PREFIX")]
    StorageUrl(String),
    /// A database URL of neither kind.
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://USER@HOST:PORT/DB")]
    Url(String),
}

impl StoreError {
    /// Whether the store is out of reach (down, restarting, or too slow) rather than the
    /// request wrong: what a client may retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Db(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ),
            // A remote store's request failures (down, timed out, refused); a local
            // directory that fails is a fault of the server's, not a wait.
            Self::Blob(object_store::Error::Generic { store, .. }) => *store == "S3",
            Self::Blob(_) => false,
            Self::Migrate(_) | Self::NotFound(_) | Self::StorageUrl(_) | Self::Url(_) => false,
        }
    }

    /// Which store failed, for messages.
    pub fn store(&self) -> &'static str {
        match self {
            Self::Blob(_) => "The image store",
            _ => "The database",
        }
    }
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

/// Which SQL server a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file: one process (`pictor serve --role all`).
    Sqlite,
    /// PostgreSQL: shared by every node of a cluster.
    Postgres,
}

/// The SQL database: SQLite or PostgreSQL behind one pool, the same SQL and the same
/// migrations for both.
#[derive(Clone)]
pub struct Db {
    pool: sqlx::AnyPool,
    backend: Backend,
}

impl Db {
    /// Opens the database at `url` (`sqlite://path`, created if missing, `sqlite::memory:`,
    /// or `postgres://user@host:port/db`) and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let db = Self::connect_only(url).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// Opens the database at `url` without touching its schema.
    pub async fn connect_only(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Url(url.to_string()));
        };
        let url = match backend {
            // Create the file if missing, as `sqlite://` URLs do not by default.
            Backend::Sqlite if !url.contains("mode=") && !url.contains(":memory:") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = match backend {
            Backend::Sqlite => {
                // An in-memory database is one per connection: keep a single one.
                let connections = if url.contains(":memory:") { 1 } else { 4 };
                AnyPoolOptions::new()
                    .max_connections(connections)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // With the write-ahead log, NORMAL syncs at checkpoints instead
                            // of on every commit: a commit survives the process crashing,
                            // and the database cannot be corrupted; only a power cut can
                            // lose the last commits, as it can the image files beside them.
                            // FULL made each `url` response wait for an fsync (p99 overhead
                            // 25 ms at 1 client, 183 ms at 8).
                            for pragma in [
                                "PRAGMA journal_mode = WAL",
                                "PRAGMA synchronous = NORMAL",
                                "PRAGMA busy_timeout = 5000",
                                "PRAGMA foreign_keys = ON",
                            ] {
                                sqlx::query(pragma).execute(&mut *conn).await?;
                            }
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(std::time::Duration::from_secs(10))
                    .connect_with(options)
                    .await?
            }
        };
        Ok(Self { pool, backend })
    }

    /// Applies the migrations not yet applied (`pictor migrate`; [`Db::connect`] does it
    /// too). On PostgreSQL, nodes starting together take turns through sqlx's advisory
    /// lock.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// The SQL server behind this database.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Opens the SQLite file `path`.
    pub async fn open_file(path: &Path) -> Result<Self> {
        Self::connect(&format!("sqlite://{}", path.display())).await
    }

    /// The value of setting `name`, made by `fresh` and stored the first time: every node
    /// of a cluster gets the same (the first writer wins).
    pub async fn shared_setting(
        &self,
        name: &str,
        fresh: impl FnOnce() -> String,
    ) -> Result<String> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(fresh())
        .execute(&self.pool)
        .await?;
        let (value,): (String,) = sqlx::query_as("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn images_expire(db: Db) -> Result<()> {
        let now = now_unix();
        db.add_image("old", "image/png", now - 1).await?;
        db.add_image("new", "image/webp", now + 3600).await?;
        assert_eq!(db.live_image("old").await?, None);
        assert_eq!(db.live_image("new").await?.as_deref(), Some("image/webp"));
        assert_eq!(db.take_expired_images(now).await?, ["old"]);
        assert!(db.take_expired_images(now).await?.is_empty());
        assert_eq!(db.live_image("new").await?.as_deref(), Some("image/webp"));
        Ok(())
    }

    #[tokio::test]
    async fn the_image_index_on_sqlite_and_postgres() -> Result<()> {
        images_expire(Db::connect("sqlite::memory:").await?).await?;
        images_expire(testing::fresh_postgres().await?).await
    }

    #[tokio::test]
    async fn a_shared_setting_is_made_once_for_every_node() -> Result<()> {
        let a = testing::fresh_postgres().await?;
        let first = a.shared_setting("k", || "one".into()).await?;
        let second = a.shared_setting("k", || "two".into()).await?;
        assert_eq!((first.as_str(), second.as_str()), ("one", "one"));
        Ok(())
    }

    #[tokio::test]
    async fn a_url_of_another_database_is_refused_by_name() {
        let err = Db::connect("mysql://localhost/x")
            .await
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("postgres://")));
    }
}
