//! `pictor serve --role api|worker`: the same binary as API nodes and GPU workers over
//! PostgreSQL and S3 (`pictor-cluster`). An API node serves the configured models once a
//! live worker advertises them, with the rules that worker serves them by; a worker loads
//! its models and runs the cluster's jobs for them.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, bail};
use pictor_api::AppState;
use pictor_cluster::{Cluster, QueueOptions, SharedQueue, Worker, WorkerModel, WorkerOptions};
use pictor_store::Db;

use crate::config::Config;

/// What a `pictor serve` process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// One process: API, queue and models (SQLite or PostgreSQL, local disk or S3).
    All,
    /// An API node: answers clients; jobs run on the cluster's workers.
    Api,
    /// A worker: holds models and runs the cluster's jobs.
    Worker,
}

/// Jobs get this many runs before they fail (a worker dying mid-job costs one).
const MAX_ATTEMPTS: u32 = 3;

/// Connects this node to the cluster: PostgreSQL (migrated by the caller) and the S3 store.
async fn connect(config: &Config, role: &str) -> anyhow::Result<Cluster> {
    let url = config.database_url();
    if !url.starts_with("postgres") {
        bail!(
            "--role {role} needs a database shared by the cluster: set database_url = \"postgres://...\" (now {url})"
        );
    }
    if config.storage.url.is_none() {
        bail!(
            "--role {role} needs an image store shared by the cluster: set [storage] url = \"s3://bucket/prefix\""
        );
    }
    let blobs = config
        .storage
        .open(&config.data_dir)
        .context("opening the image store")?;
    let node = pictor_cluster::node_name(role);
    eprintln!("cluster node {node}");
    Ok(Cluster::connect(&url, blobs, &node).await?)
}

/// Serves the configured models through the cluster's shared queue, each installed when
/// a live worker first advertises it (until then its requests get 503).
pub async fn serve_shared_models(config: &Config, state: &AppState) -> anyhow::Result<()> {
    let cluster = connect(config, "api").await?;
    let options = QueueOptions {
        depth: config.limits.queue_depth,
        timeout: Duration::from_secs(config.limits.request_timeout_secs),
        max_attempts: MAX_ATTEMPTS,
    };
    let (state, names) = (
        state.clone(),
        config.models.keys().cloned().collect::<Vec<_>>(),
    );
    tokio::spawn(async move {
        let mut installed: Vec<String> = Vec::new();
        loop {
            if let Ok(n) = cluster.workers_alive().await {
                metrics::gauge!("pictor_workers_alive").set(n as f64);
            }
            match cluster.advertised().await {
                Ok(models) => {
                    for m in models {
                        if names.contains(&m.name) && !installed.contains(&m.name) {
                            let queue = SharedQueue::new(&cluster, &m.name, options.clone());
                            state.install(&m.name, Arc::new(queue), m.rules);
                            if let Some(hash) = m.hash {
                                state.set_hash(&m.name, hash);
                            }
                            eprintln!("model {} served by the cluster's workers", m.name);
                            installed.push(m.name);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the workers' models"),
            }
            let every = if installed.len() == names.len() { 5 } else { 1 };
            tokio::time::sleep(Duration::from_secs(every)).await;
        }
    });
    Ok(())
}

/// Loads the configured models and runs the cluster's jobs for them until `shutdown`.
pub async fn run_worker(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let cluster = connect(&config, "worker").await?;
    // An API node migrates when it opens its database; a worker opens none but this.
    Db::connect(&config.database_url())
        .await
        .context("migrating the database")?;
    let mut models = Vec::new();
    for (name, m) in config.models.clone() {
        let config = config.clone();
        let model = tokio::task::spawn_blocking(move || {
            let running = crate::load::start_model(&config, &name, &m)?;
            let hash = crate::load::weights_hash(&config, &running.weights);
            anyhow::Ok(WorkerModel {
                name,
                queue: Arc::new(running.queue),
                rules: running.rules,
                hash,
                capacity: m.max_batch.max(1),
            })
        })
        .await??;
        models.push(model);
    }
    let options = WorkerOptions {
        grace: Duration::from_secs(config.shutdown_grace_secs),
        ..WorkerOptions::default()
    };
    // Its health and metrics, where the operator reaches them (`listen`).
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    eprintln!(
        "worker serving /healthz and /metrics on http://{}",
        listener.local_addr()?
    );
    let http = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, pictor_api::node_router()).await {
            tracing::warn!(error = %e, "the worker's HTTP endpoint stopped");
        }
    });
    eprintln!("worker running jobs for {} model(s)", models.len());
    let ran = Worker::new(cluster, models, options).run(shutdown).await;
    http.abort();
    ran?;
    eprintln!("worker stopped");
    Ok(())
}
