//! A worker node: it advertises the models it holds, claims their jobs under a lease it
//! renews while they run, runs them on its local queues, and writes their images to the
//! store and their outcome to the row once. It listens for new jobs only while it has room
//! (a busy worker claims again as soon as a job ends). Every worker also reaps expired
//! leases and sweeps long-ended jobs. On shutdown it stops claiming, lets running jobs
//! finish within the grace period, and hands back what is left.

use std::{collections::HashMap, sync::Arc, time::Duration};

use pictor_core::ModelRules;
use pictor_sched::{JobError, JobQueue, Outcome};
use sqlx::postgres::PgListener;
use tokio::{sync::watch, task::JoinSet};

use crate::{
    Advertised, Cluster, Result, housekeeping,
    jobs::{self, Claimed, EVENTS_CHANNEL, JOBS_CHANNEL},
    objects::{self, JobResult},
};

/// A model this worker holds.
pub struct WorkerModel {
    /// Its configured name (what jobs name).
    pub name: String,
    /// Its local queue.
    pub queue: Arc<dyn JobQueue>,
    /// The rules it is served by (advertised to the API nodes).
    pub rules: ModelRules,
    /// A short hash of its weights, for receipts.
    pub hash: Option<String>,
    /// Images of it in the jobs it holds at once: its batch size, so that compatible jobs
    /// are denoised together and none waits here while another worker idles. An idle
    /// model takes a job of any size.
    pub capacity: usize,
}

/// How a worker holds its jobs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// A job whose worker has not renewed its lease for this long goes to another worker.
    pub lease: Duration,
    /// How often a cancellation is looked for (a cancelled job stops within this and one
    /// denoising step); the lease is renewed every third of `lease`.
    pub heartbeat: Duration,
    /// Time running jobs get to finish on shutdown before they are handed back.
    pub grace: Duration,
    /// How long an ended job's row is kept (for late readers) before it is swept.
    pub retention: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            heartbeat: Duration::from_millis(250),
            grace: Duration::from_secs(30),
            retention: Duration::from_secs(3600),
        }
    }
}

/// A worker node.
pub struct Worker {
    cluster: Cluster,
    models: HashMap<String, WorkerModel>,
    options: WorkerOptions,
}

/// How a run of a job ended.
enum Ended {
    Outcome(Result<Outcome, JobError>),
    /// Its caller asked to cancel.
    Cancelled,
    /// Another worker holds it now (this one's lease expired).
    Lost,
    /// This worker is stopping.
    Stopping,
}

impl Worker {
    /// A worker for `models`.
    pub fn new(cluster: Cluster, models: Vec<WorkerModel>, options: WorkerOptions) -> Self {
        Self {
            cluster,
            models: models.into_iter().map(|m| (m.name.clone(), m)).collect(),
            options,
        }
    }

    fn advertised(&self) -> Vec<Advertised> {
        self.models
            .values()
            .map(|m| Advertised {
                name: m.name.clone(),
                rules: m.rules.clone(),
                hash: m.hash.clone(),
            })
            .collect()
    }

    /// Claims and runs jobs until `shutdown` resolves, then stops as the module says.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let this = Arc::new(self);
        let (stop_tx, stop) = watch::channel(false);
        let housekeeping = tokio::spawn(housekeeping::run(
            this.cluster.clone(),
            this.advertised(),
            this.options.retention,
            stop.clone(),
        ));
        let mut wake = PgListener::connect(&this.cluster.url).await?;
        let mut listening = false;
        let mut running: JoinSet<(String, usize)> = JoinSet::new();
        let mut held: HashMap<String, usize> = HashMap::new();
        tokio::pin!(shutdown);
        loop {
            // Claim while some model has room.
            let mut room_left = false;
            loop {
                let (models, rooms) = this.rooms(&held);
                if models.is_empty() {
                    break;
                }
                let lease = this.options.lease.as_millis() as i64;
                let (pool, node) = (&this.cluster.pool, &this.cluster.node);
                match jobs::claim(pool, node, &models, &rooms, lease).await {
                    Ok(Some(job)) => {
                        *held.entry(job.model.clone()).or_default() += job.images;
                        running.spawn(Arc::clone(&this).run_job(job, stop.clone()));
                    }
                    Ok(None) => {
                        room_left = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming a job failed");
                        room_left = true;
                        break;
                    }
                }
            }
            // Wake-ups only while there is room: then claim once more, for a job queued
            // before the listener was on.
            if room_left != listening {
                let changed = if room_left {
                    wake.listen(JOBS_CHANNEL).await
                } else {
                    wake.unlisten(JOBS_CHANNEL).await
                };
                match changed {
                    Ok(()) => {
                        listening = room_left;
                        if listening {
                            continue;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "job wake-ups: (un)listening"),
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                done = running.join_next(), if !running.is_empty() => {
                    if let Some(Ok((model, images))) = done
                        && let Some(n) = held.get_mut(&model)
                    {
                        *n = n.saturating_sub(images);
                    }
                }
                note = wake.recv(), if listening => {
                    if let Err(e) = note {
                        tracing::warn!(error = %e, "job wake-ups: connection lost");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        // Stopping: claim nothing more, let the running jobs finish within the grace
        // period, then hand back what is left.
        if let Err(e) = jobs::retire(&this.cluster.pool, &this.cluster.node).await {
            tracing::warn!(error = %e, "retiring the worker");
        }
        let drained = tokio::time::timeout(this.options.grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            let _ = stop_tx.send(true);
            while running.join_next().await.is_some() {}
        }
        housekeeping.abort();
        Ok(())
    }

    /// The models with room for another job, and that room in images (unbounded for an
    /// idle model).
    fn rooms(&self, held: &HashMap<String, usize>) -> (Vec<String>, Vec<i64>) {
        self.models
            .values()
            .filter_map(|m| match held.get(&m.name).copied().unwrap_or(0) {
                0 => Some((m.name.clone(), i64::MAX)),
                used if used < m.capacity => Some((m.name.clone(), (m.capacity - used) as i64)),
                _ => None,
            })
            .unzip()
    }

    /// Runs one claimed job; returns its model and images, whatever happened.
    async fn run_job(
        self: Arc<Self>,
        job: Claimed,
        stop: watch::Receiver<bool>,
    ) -> (String, usize) {
        let held = (job.model.clone(), job.images);
        if let Err(e) = Arc::clone(&self).try_run(&job, stop).await {
            tracing::warn!(job = %job.id, error = %e, "running a claimed job failed");
            let why = format!("its worker failed: {e}");
            let pool = &self.cluster.pool;
            let _ = jobs::finish(
                pool,
                &job.id,
                &self.cluster.node,
                "failed",
                None,
                Some(&why),
            )
            .await;
        }
        held
    }

    async fn try_run(
        self: Arc<Self>,
        job: &Claimed,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let (pool, node, cluster) = (&self.cluster.pool, &self.cluster.node, &self.cluster);
        let Some(model) = self.models.get(&job.model) else {
            jobs::hand_back(pool, &job.id, node, &job.model).await?;
            return Ok(());
        };
        tracing::info!(job = %job.id, model = %job.model, attempt = job.attempts, "running a job");
        let req = objects::get_request(cluster, &job.id, &job.request).await?;
        let mut ticket = match model.queue.submit(req).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "the local queue refused a job");
                jobs::hand_back(pool, &job.id, node, &job.model).await?;
                return Ok(());
            }
        };
        let lease = self.options.lease.as_millis() as i64;
        let started = std::time::Instant::now();
        // Each step the local queue reports goes out as a notification, for the API node
        // whose client streams progress.
        let watch = ticket.progress();
        let progress = async {
            let Some(mut watch) = watch else { return };
            // Ends when the local job is over (its sender is dropped).
            while watch.changed().await {
                let now = watch.now();
                if !now.running {
                    continue;
                }
                let event = format!("progress:{}:{}:{}", job.id, now.step, now.total);
                if let Err(e) = jobs::notify(pool, EVENTS_CHANNEL, &event).await {
                    tracing::debug!(job = %job.id, error = %e, "publishing progress");
                }
            }
        };
        let previews_then_result = async {
            while let Some(p) = ticket.next_preview().await {
                let name = objects::preview(&job.id, p.image, p.index);
                let published = async {
                    cluster.put_object(&name, objects::png(&p.pixels)?).await?;
                    jobs::notify(
                        pool,
                        EVENTS_CHANNEL,
                        &format!("preview:{}:{}:{}:{}", job.id, p.image, p.index, p.step),
                    )
                    .await?;
                    Ok::<_, crate::ClusterError>(())
                };
                if let Err(e) = published.await {
                    tracing::warn!(job = %job.id, error = %e, "publishing a preview");
                }
            }
            ticket.wait().await
        };
        let run = async { tokio::join!(previews_then_result, progress).0 };
        tokio::pin!(run);
        let first = tokio::time::Instant::now() + self.options.heartbeat;
        let mut beat = tokio::time::interval_at(first, self.options.heartbeat);
        // The lease is rewritten a few times per lease; in between, each beat only reads
        // whether the job was cancelled (a read costs the database no commit).
        let renew_every = self.options.lease / 3;
        let mut renewed = std::time::Instant::now();
        let ended = loop {
            tokio::select! {
                outcome = &mut run => break Ended::Outcome(outcome),
                _ = beat.tick() => {
                    let checked = if renewed.elapsed() >= renew_every {
                        renewed = std::time::Instant::now();
                        jobs::renew(pool, &job.id, node, lease).await
                    } else {
                        jobs::check(pool, &job.id, node).await
                    };
                    match checked {
                        Ok(Some(false)) => {}
                        Ok(Some(true)) => break Ended::Cancelled,
                        Ok(None) => break Ended::Lost,
                        // The database is away: keep running; the result is written if
                        // it comes back within the lease.
                        Err(e) => tracing::warn!(job = %job.id, error = %e, "renewing a lease"),
                    }
                }
                _ = stop.changed() => break Ended::Stopping,
            }
        };
        // Leaving the loop early drops the ticket, which cancels the local job.
        match ended {
            Ended::Outcome(Ok(outcome)) => {
                let images = &outcome.generation.images;
                let inline = objects::put_results(cluster, &job.id, images).await?;
                let result = JobResult {
                    prompt: outcome.generation.prompt.clone(),
                    phases: outcome.generation.phases,
                    device: outcome.generation.device.clone(),
                    loras: outcome.generation.loras.clone(),
                    queued_ms: job.waited_ms.max(0) as u64 + outcome.queued.as_millis() as u64,
                    ran_ms: outcome.ran.as_millis() as u64,
                    images: images.len(),
                    inline,
                };
                let row = serde_json::to_string(&result)?;
                if !jobs::finish(pool, &job.id, node, "done", Some(&row), None).await? {
                    tracing::info!(job = %job.id, "another worker took the job first; result dropped");
                }
            }
            Ended::Outcome(Err(JobError::Cancelled)) | Ended::Cancelled => {
                jobs::finish(pool, &job.id, node, "cancelled", None, None).await?;
            }
            Ended::Outcome(Err(e)) => {
                let why = e.to_string();
                jobs::finish(pool, &job.id, node, "failed", None, Some(&why)).await?;
            }
            Ended::Lost => tracing::info!(job = %job.id, "lost the lease; another worker runs it"),
            Ended::Stopping => {
                tracing::info!(job = %job.id, "stopping: handing the job back");
                jobs::hand_back(pool, &job.id, node, &job.model).await?;
            }
        }
        tracing::debug!(job = %job.id, secs = started.elapsed().as_secs_f64(), "job ended");
        Ok(())
    }
}
