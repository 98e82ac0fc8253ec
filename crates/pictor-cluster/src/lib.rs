//! Pictor across machines: stateless API nodes and GPU workers that share a job queue in
//! PostgreSQL and exchange images through an S3-compatible store.
//!
//! An API node holds a [`SharedQueue`] per model where a single process holds a local
//! `ModelQueue`: admission inserts a job row, and the caller's ticket is answered from the
//! row and the store (previews and results), with cancellation written back. A [`Worker`]
//! holds loaded models, claims jobs for them with `FOR UPDATE SKIP LOCKED` under a lease it
//! renews while the job runs, runs them on its local queue, writes the images to the store
//! and the result to the row once; a reaper hands expired leases to another worker, at most
//! `max_attempts` runs per job. `LISTEN/NOTIFY` wakes idle workers and waiting API nodes,
//! with polling as the fallback, so a lost notification only delays. Workers also sweep
//! the rows of jobs that ended long ago.
//!
//! What it is not: no HTTP (the API crate answers clients), no tensors (workers run
//! whatever `Pipeline` their queues hold), and no large images in the database (a small
//! result travels in its row; pixels go through the database only while the store is down).

mod events;
mod housekeeping;
mod jobs;
mod objects;
mod queue;
#[cfg(test)]
mod tests;
mod worker;

use std::time::Duration;

use pictor_store::Blobs;
use sqlx::postgres::{PgPool, PgPoolOptions};

pub use queue::{QueueOptions, SharedQueue};
pub use worker::{Worker, WorkerModel, WorkerOptions};

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The image store failed.
    #[error("{0}")]
    Store(#[from] pictor_store::StoreError),
    /// A job's request or result could not be read.
    #[error("a job's record: {0}")]
    Json(#[from] serde_json::Error),
    /// An image passed between nodes could not be read or written.
    #[error("an image between nodes: {0}")]
    Image(String),
    /// Cluster mode needs PostgreSQL.
    #[error("cluster roles need database_url = \"postgres://...\", not `{0}`")]
    NotPostgres(String),
}

/// The cluster's result type.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// A model a worker serves, as it advertises it to the API nodes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Advertised {
    /// The model's configured name.
    pub name: String,
    /// The rules it is served by.
    pub rules: pictor_core::ModelRules,
    /// A short hash of its weight files, once computed.
    pub hash: Option<String>,
}

/// One node's handle on the cluster: the shared database and store.
#[derive(Clone)]
pub struct Cluster {
    pool: PgPool,
    /// For listeners, which hold a connection of their own outside the pool.
    url: String,
    blobs: Blobs,
    node: String,
    events: events::Events,
}

impl Cluster {
    /// Connects to the cluster's PostgreSQL at `database_url` (already migrated) and image
    /// `blobs`, as the node called `node`.
    pub async fn connect(database_url: &str, blobs: Blobs, node: &str) -> Result<Self> {
        Self::connect_with(database_url, blobs, node, 16).await
    }

    /// [`Cluster::connect`] with at most `connections` pooled connections (besides one
    /// listening for events).
    pub async fn connect_with(
        database_url: &str,
        blobs: Blobs,
        node: &str,
        connections: u32,
    ) -> Result<Self> {
        if !database_url.starts_with("postgres://") && !database_url.starts_with("postgresql://") {
            return Err(ClusterError::NotPostgres(database_url.to_string()));
        }
        let pool = PgPoolOptions::new()
            .max_connections(connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect(database_url)
            .await?;
        let events = events::Events::new(database_url, pool.clone());
        Ok(Self {
            pool,
            url: database_url.to_string(),
            blobs,
            node: node.to_string(),
            events,
        })
    }

    /// This node's name (workers record it on the jobs they hold).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The models live workers serve (seen within the last 10 seconds).
    pub async fn advertised(&self) -> Result<Vec<Advertised>> {
        jobs::advertised(&self.pool).await
    }

    /// Workers seen within the last 10 seconds.
    pub async fn workers_alive(&self) -> Result<i64> {
        jobs::workers_alive(&self.pool).await
    }
}

/// A node name: the host's name and a random suffix, unique per process.
pub fn node_name(role: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    format!("{role}-{host}-{}", hex::encode(rand::random::<[u8; 3]>()))
}
