//! An API node's queue for one model: jobs go into the shared table, and each caller's
//! ticket is answered from its job's row and the store.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use pictor_core::{Generation, GenerationRequest, PartMemory, PipelineError};
use pictor_sched::{
    BoxFuture, JobError, JobProgress, JobQueue, Outcome, Preview, Reply, SubmitError, Ticket,
};

use crate::{
    Cluster, ClusterError,
    events::{Event, Subscription},
    jobs,
    objects::{self, JobResult},
};

/// How a model's shared queue admits and bounds jobs.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Jobs of the model that may wait across the cluster; more are refused (429).
    pub depth: usize,
    /// Longest a job may take from admission to its result.
    pub timeout: Duration,
    /// Runs a job gets before it fails (a worker dying mid-job costs one).
    pub max_attempts: u32,
}

/// A model's queue shared by the cluster: what an API node holds instead of a local one.
pub struct SharedQueue {
    cluster: Cluster,
    model: String,
    options: QueueOptions,
    waiting: AtomicUsize,
    running: AtomicUsize,
    closed: AtomicBool,
    /// Exponentially weighted mean of job seconds, for `Retry-After`.
    mean_secs: Arc<Mutex<Option<f64>>>,
    /// When a live worker was last seen serving the model (an async lock: a burst of
    /// requests after a quiet spell waits for one lookup instead of making one each).
    served_at: tokio::sync::Mutex<Option<Instant>>,
}

/// How long a sighting of a worker serving the model is trusted before looking again.
const SERVED_FOR: Duration = Duration::from_secs(2);

fn unavailable(e: ClusterError) -> SubmitError {
    tracing::warn!(error = %e, "the shared queue is out of reach");
    SubmitError::Unavailable("The cluster's queue is unavailable".into())
}

impl SharedQueue {
    /// The shared queue of `model`.
    pub fn new(cluster: &Cluster, model: &str, options: QueueOptions) -> Self {
        Self {
            cluster: cluster.clone(),
            model: model.to_string(),
            options,
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            mean_secs: Arc::default(),
            served_at: tokio::sync::Mutex::new(None),
        }
    }

    fn retry_after(&self, waiting: i64, running: i64) -> Duration {
        let mean = self
            .mean_secs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(1.0);
        let per_place = mean * (waiting + 1) as f64 / running.max(1) as f64;
        Duration::from_secs_f64(per_place.clamp(1.0, 60.0))
    }

    /// Whether a live worker serves the model (looked up at most every `SERVED_FOR`).
    async fn served(&self) -> Result<bool, SubmitError> {
        let mut seen = self.served_at.lock().await;
        if seen.is_some_and(|at| at.elapsed() < SERVED_FOR) {
            return Ok(true);
        }
        let models = self.cluster.advertised().await.map_err(unavailable)?;
        let served = models.iter().any(|m| m.name == self.model);
        if served {
            *seen = Some(Instant::now());
        }
        Ok(served)
    }

    async fn admit(&self, id: String, req: GenerationRequest) -> Result<Ticket, SubmitError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(SubmitError::Closed);
        }
        // With no live worker for the model, say so now rather than at the deadline.
        if !self.served().await? {
            return Err(SubmitError::Unavailable(format!(
                "No live worker serves the model `{}` right now",
                self.model
            )));
        }
        let row = objects::put_request(&self.cluster, &id, &req)
            .await
            .map_err(unavailable)?;
        // Subscribed before the row exists, so no event of the job is missed.
        let events = self.cluster.events.subscribe(&id);
        let job = jobs::NewJob {
            id: &id,
            model: &self.model,
            request: &row,
            images: req.n as i64,
            max_attempts: i64::from(self.options.max_attempts.max(1)),
            timeout_ms: self.options.timeout.as_millis() as i64,
        };
        let depth = self.options.depth as i64;
        let admitted = jobs::admit(&self.cluster.pool, &job, depth)
            .await
            .map_err(unavailable)?;
        let waiting = admitted.waiting + i64::from(admitted.queued);
        self.waiting.store(waiting as usize, Ordering::Relaxed);
        self.running
            .store(admitted.running as usize, Ordering::Relaxed);
        if !admitted.queued {
            // An edit's pixels were put for nothing.
            if req.edit.is_some() {
                let names = objects::all(&id, 0, 0, true, None);
                self.cluster.delete_objects_later(names);
            }
            return Err(SubmitError::Overloaded {
                retry_after: self.retry_after(admitted.waiting, admitted.running),
            });
        }
        Ok(self.follow(id, events, req.n, req.previews, req.edit.is_some()))
    }

    /// A ticket answered from job `id`'s row and objects.
    fn follow(
        &self,
        id: String,
        events: Subscription,
        images: usize,
        previews: usize,
        edit: bool,
    ) -> Ticket {
        let (ticket, reply) = pictor_sched::ticket(previews > 0);
        let ticket = ticket.for_job(&id);
        let follow = Follow {
            cluster: self.cluster.clone(),
            id,
            images,
            previews,
            edit,
            timeout: self.options.timeout,
            mean_secs: Arc::clone(&self.mean_secs),
        };
        tokio::spawn(follow.run(events, reply));
        ticket
    }

    async fn adopt(&self, id: &str, previews: usize) -> Result<Ticket, SubmitError> {
        let events = self.cluster.events.subscribe(id);
        let row = objects::JobRequest::read(&self.cluster.pool, id)
            .await
            .map_err(unavailable)?;
        let Some(request) = row else {
            return Err(SubmitError::Unavailable(format!("The job {id} is gone")));
        };
        let images = request.request.n;
        Ok(self.follow(
            id.to_string(),
            events,
            images,
            previews,
            request.edit.is_some(),
        ))
    }
}

impl JobQueue for SharedQueue {
    fn submit(&self, req: GenerationRequest) -> BoxFuture<'_, Result<Ticket, SubmitError>> {
        Box::pin(self.admit(pictor_sched::job_id(rand::random()), req))
    }

    fn submit_as(
        &self,
        id: &str,
        req: GenerationRequest,
    ) -> BoxFuture<'_, Result<Ticket, SubmitError>> {
        Box::pin(self.admit(id.to_string(), req))
    }

    fn memory(&self) -> &[PartMemory] {
        &[]
    }

    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    fn shutdown(&self, _grace: Duration) -> BoxFuture<'_, bool> {
        // Jobs run on the workers; the API's own drain waits for its callers.
        self.close();
        Box::pin(async { true })
    }

    fn attach(&self, id: &str, previews: usize) -> BoxFuture<'_, Result<Ticket, SubmitError>> {
        let id = id.to_string();
        Box::pin(async move { self.adopt(&id, previews).await })
    }
}

/// One admitted job, followed for its caller.
struct Follow {
    cluster: Cluster,
    id: String,
    images: usize,
    previews: usize,
    /// The job edits an image (its input is in the store too).
    edit: bool,
    timeout: Duration,
    mean_secs: Arc<Mutex<Option<f64>>>,
}

impl Follow {
    async fn run(self, mut events: Subscription, mut reply: Reply) {
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        // While the job waits, its place in the line is looked up every second for a
        // caller who reads its progress.
        let mut waiting = true;
        let mut look = tokio::time::interval(Duration::from_secs(1));
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            tokio::select! {
                event = events.rx.recv() => match event {
                    Some(Event::Preview { image, index, step }) => {
                        self.preview(&reply, image, index, step).await;
                    }
                    Some(Event::Progress { step, total }) => {
                        waiting = false;
                        reply.progress(JobProgress {
                            running: true,
                            ahead: None,
                            step,
                            total,
                        });
                    }
                    Some(Event::Done) => {
                        // Read the row; an event it does not bear out is ignored.
                        if let Some(ended) = self.result().await {
                            break Ok(ended);
                        }
                    }
                    None => {}
                },
                _ = look.tick(), if waiting => {
                    if reply.watched() {
                        waiting = self.tell_place(&reply).await;
                    }
                }
                // The caller left (its ticket dropped): the job is cancelled at once.
                () = reply.left() => break Err(false),
                () = &mut deadline => break Err(true),
            }
        };
        let (result, row) = match ended {
            Ok(ended) => ended,
            Err(timed_out) => {
                self.given_up(reply, timed_out).await;
                return;
            }
        };
        if let Ok(outcome) = &result {
            let secs = outcome.ran.as_secs_f64();
            let mut mean = self.mean_secs.lock().unwrap_or_else(|e| e.into_inner());
            *mean = Some(mean.map_or(secs, |m| 0.8 * m + 0.2 * secs));
        }
        reply.finish(result);
        self.clean_up(row.as_ref());
    }

    /// Tells the caller how many jobs wait before this one; `false` once it no longer
    /// waits (a failed lookup is tried again at the next tick).
    async fn tell_place(&self, reply: &Reply) -> bool {
        match jobs::place(&self.cluster.pool, &self.id).await {
            Ok(Some(ahead)) => {
                reply.progress(JobProgress {
                    ahead: Some(ahead.max(0) as usize),
                    ..JobProgress::default()
                });
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(job = %self.id, error = %e, "looking up a job's place");
                true
            }
        }
    }

    /// The caller left or the deadline passed: the job is cancelled.
    async fn given_up(&self, reply: Reply, timed_out: bool) {
        if let Err(e) = jobs::cancel(&self.cluster.pool, &self.id).await {
            tracing::warn!(job = %self.id, error = %e, "cancelling a job");
        }
        if timed_out {
            reply.finish(Err(JobError::TimedOut(self.timeout)));
        }
        self.clean_up(None);
    }

    async fn preview(&self, reply: &Reply, image: usize, index: usize, step: usize) {
        let name = objects::preview(&self.id, image, index);
        match self.cluster.get_object(&name).await {
            Ok(bytes) => match objects::pixels(&bytes) {
                Ok(pixels) => reply.preview(Preview {
                    image,
                    index,
                    step,
                    pixels,
                }),
                Err(e) => tracing::warn!(job = %self.id, error = %e, "reading a preview"),
            },
            Err(e) => tracing::warn!(job = %self.id, error = %e, "fetching a preview"),
        }
    }

    /// The ended job's outcome, its images read from the row or the store, and the result
    /// as its row holds it; `None` while the job is still waiting or running.
    async fn result(&self) -> Option<(Result<Outcome, JobError>, Option<JobResult>)> {
        let failed = |why: String| JobError::Engine(Arc::new(PipelineError::Failed(why.into())));
        let row = match jobs::read(&self.cluster.pool, &self.id).await {
            Ok(Some(row)) => row,
            Ok(None) => return Some((Err(failed("the job's record is gone".into())), None)),
            Err(e) => {
                let why = format!("reading the job's record: {e}");
                return Some((Err(failed(why)), None));
            }
        };
        match row.state.as_str() {
            "done" => {}
            "queued" | "running" => return None,
            "cancelled" => return Some((Err(JobError::Cancelled), None)),
            _ => {
                let why = row.error.unwrap_or_else(|| "the job failed".into());
                return Some((Err(failed(why)), None));
            }
        }
        let result: JobResult = match serde_json::from_str(row.result.as_deref().unwrap_or("")) {
            Ok(r) => r,
            Err(e) => {
                let why = format!("reading the job's result: {e}");
                return Some((Err(failed(why)), None));
            }
        };
        let read = async {
            let mut images = Vec::with_capacity(result.images);
            for i in 0..result.images {
                images.push(objects::get_result(&self.cluster, &self.id, &result, i).await?);
            }
            Ok::<_, ClusterError>(Outcome {
                generation: Generation {
                    images,
                    prompt: result.prompt.clone(),
                    phases: result.phases,
                    device: result.device.clone(),
                    loras: result.loras.clone(),
                },
                queued: Duration::from_millis(result.queued_ms),
                ran: Duration::from_millis(result.ran_ms),
            })
        };
        let outcome = read
            .await
            .map_err(|e| failed(format!("reading the job's result: {e}")));
        Some((outcome, Some(result)))
    }

    /// Deletes what the job left in the store once read.
    fn clean_up(&self, result: Option<&JobResult>) {
        let names = objects::all(&self.id, self.images, self.previews, self.edit, result);
        self.cluster.delete_objects_later(names);
    }
}
