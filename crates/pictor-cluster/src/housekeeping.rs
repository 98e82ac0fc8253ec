//! What every worker does besides its jobs: it advertises its models, hands expired
//! leases to another worker (or fails a job out of attempts), and sweeps the rows of jobs
//! that ended longer ago than the retention, with anything they left in the store. The
//! statements are safe to run on every worker at once.

use std::time::Duration;

use tokio::sync::watch;

use crate::{Advertised, Cluster, jobs, objects};

/// How often the models are advertised and leases reaped.
const TICK: Duration = Duration::from_secs(2);
/// How often ended jobs are swept, and how many rows at most each time.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const SWEEP_ROWS: i64 = 1000;

/// Runs until `stop` changes.
pub(crate) async fn run(
    cluster: Cluster,
    advertised: Vec<Advertised>,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TICK);
    let mut swept = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let pool = &cluster.pool;
        if let Err(e) = jobs::advertise(pool, &cluster.node, &advertised).await {
            tracing::warn!(error = %e, "advertising the worker's models");
        }
        match jobs::reap(pool).await {
            Ok((0, 0)) => {}
            Ok((requeued, failed)) => {
                metrics::counter!("pictor_leases_expired_total").increment(requeued + failed);
                metrics::counter!("pictor_jobs_retried_total").increment(requeued);
                tracing::info!(requeued, failed, "reaped jobs whose worker stopped");
            }
            Err(e) => tracing::warn!(error = %e, "reaping expired leases"),
        }
        if swept.elapsed() >= SWEEP_EVERY {
            swept = tokio::time::Instant::now();
            sweep(&cluster, retention).await;
        }
    }
}

/// Deletes the jobs that ended more than `retention` ago, and what they left in the store.
async fn sweep(cluster: &Cluster, retention: Duration) {
    let rows = match jobs::sweep(&cluster.pool, retention.as_millis() as i64, SWEEP_ROWS).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "sweeping ended jobs");
            return;
        }
    };
    for (id, request, result) in &rows {
        let names = objects::left_by(id, request, result.as_deref());
        if !names.is_empty() {
            cluster.delete_objects(&names).await;
        }
    }
    if !rows.is_empty() {
        tracing::debug!(jobs = rows.len(), "swept ended jobs");
    }
}
