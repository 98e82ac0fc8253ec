//! Pictor's scheduler: a bounded queue in front of each loaded model.
//!
//! A [`ModelQueue`] owns one engine [`Pipeline`] on a dedicated OS thread and feeds it jobs
//! from a bounded channel. Admission is non-blocking: a full queue answers
//! [`SubmitError::Overloaded`] with a retry estimate from the measured job time, which the
//! API turns into 429 + `Retry-After`. Every job carries a cancel flag checked between
//! denoising steps; dropping the [`Ticket`] (the client went away) sets it, and so does the
//! job's deadline.
//!
//! Compatible waiting jobs (same size and steps) are run together through
//! [`Pipeline::generate_batch`], up to [`QueueConfig::batch_images`] images.
//!
//! It is not an HTTP layer, not a store and not an engine: it takes the seam's requests
//! (`pictor-core`) and gives back its results, and never compiles the engine that
//! implements them. Distributed queues come later.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use pictor_core::{
    Control, Generation, GenerationRequest, PartMemory, Pipeline, PipelineError, Progress, RgbImage,
};
use tokio::sync::{mpsc, oneshot};

/// Queue settings for one model.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Jobs that may wait (beyond the one running) before new ones are refused.
    pub depth: usize,
    /// Longest a job may take from submission to its last step.
    pub timeout: Duration,
    /// Most images run together: waiting jobs compatible with the next one (same size and
    /// steps) join its batch up to this many images.
    pub batch_images: usize,
}

/// Why a job was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; try again after about `retry_after`.
    #[error("the queue is full")]
    Overloaded {
        /// Estimated time until a place frees up (1 to 60 s).
        retry_after: Duration,
    },
    /// The model's worker has stopped (shutting down).
    #[error("the model is shutting down")]
    Closed,
}

/// Why an admitted job produced no images.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The pipeline failed (shared by every job of the batch).
    #[error(transparent)]
    Engine(Arc<PipelineError>),
    /// The job ran past its deadline.
    #[error("the generation took longer than the {0:?} limit")]
    TimedOut(Duration),
    /// The job was cancelled (its client went away).
    #[error("cancelled")]
    Cancelled,
    /// The worker died.
    #[error("the model worker stopped")]
    WorkerGone,
}

/// A finished job.
#[derive(Debug)]
pub struct Outcome {
    /// The images and prompt info.
    pub generation: Generation,
    /// Time spent waiting in the queue.
    pub queued: Duration,
    /// Time spent generating.
    pub ran: Duration,
}

/// A preview of one image of a job, taken while it denoises.
#[derive(Debug, Clone)]
pub struct Preview {
    /// Index of the image within the job (`0..n`).
    pub image: usize,
    /// 0-based index of this preview among the image's previews.
    pub index: usize,
    /// Denoising steps finished when it was taken.
    pub step: usize,
    /// The preview.
    pub pixels: RgbImage,
}

struct Job {
    req: GenerationRequest,
    /// Where previews go, when the request asked for some.
    previews: Option<mpsc::UnboundedSender<Preview>>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    reply: oneshot::Sender<Result<Outcome, JobError>>,
}

#[derive(Default)]
struct Stats {
    waiting: AtomicUsize,
    running: AtomicUsize,
    /// Exponentially weighted mean of job seconds, `None` before the first job.
    mean_secs: Mutex<Option<f64>>,
}

/// A model's queue and its worker thread.
pub struct ModelQueue {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    /// What the pipeline said it holds, before it moved to its thread.
    memory: Vec<PartMemory>,
    stats: Arc<Stats>,
    config: QueueConfig,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A submitted job. Await [`Ticket::wait`] (after [`Ticket::next_preview`] when the
/// request asked for previews); dropping the ticket cancels the job.
pub struct Ticket {
    rx: oneshot::Receiver<Result<Outcome, JobError>>,
    previews: Option<mpsc::UnboundedReceiver<Preview>>,
    /// The result, when it arrived while waiting for a preview.
    result: Option<Result<Outcome, JobError>>,
    cancel: Arc<AtomicBool>,
}

impl Ticket {
    /// The next preview, in the order the engine made them; `None` once the job has
    /// finished (or failed) and every preview was handed out. The worker sends a job's
    /// previews before its result, so none is lost.
    pub async fn next_preview(&mut self) -> Option<Preview> {
        if self.result.is_some() {
            return None;
        }
        let previews = self.previews.as_mut()?;
        tokio::select! {
            biased;
            preview = previews.recv() => {
                if preview.is_none() {
                    self.previews = None;
                }
                preview
            }
            result = &mut self.rx => {
                self.result = Some(result.unwrap_or(Err(JobError::WorkerGone)));
                // Previews sent just before the result are still in the channel.
                self.previews.as_mut().and_then(|p| p.try_recv().ok())
            }
        }
    }

    /// Waits for the result.
    pub async fn wait(mut self) -> Result<Outcome, JobError> {
        if let Some(result) = self.result.take() {
            return result;
        }
        (&mut self.rx).await.unwrap_or(Err(JobError::WorkerGone))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl ModelQueue {
    /// Starts a worker thread named after `name` that owns `pipeline`.
    pub fn start(name: &str, pipeline: Box<dyn Pipeline>, config: QueueConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.depth.max(1));
        let stats = Arc::new(Stats::default());
        let worker_stats = Arc::clone(&stats);
        let worker_config = config.clone();
        let memory = pipeline.memory();
        let worker = std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || Worker::new(pipeline, rx, worker_stats, worker_config).run())
            .expect("spawning a thread only fails when the OS is out of resources");
        Self {
            tx: Mutex::new(Some(tx)),
            memory,
            stats,
            config,
            worker: Mutex::new(Some(worker)),
        }
    }

    /// Each part of the model and its memory, as the pipeline reported it at start.
    pub fn memory(&self) -> &[PartMemory] {
        &self.memory
    }

    /// Jobs waiting (not counting the one running).
    pub fn waiting(&self) -> usize {
        self.stats.waiting.load(Ordering::Relaxed)
    }

    /// Jobs running (0 or 1).
    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::Relaxed)
    }

    /// Admits `req` or refuses it at once when the queue is full.
    pub fn submit(&self, req: GenerationRequest) -> Result<Ticket, SubmitError> {
        let cancel = Arc::new(AtomicBool::new(false));
        let (reply, rx) = oneshot::channel();
        // At most `n × previews` of them, so the channel is bounded by the request.
        let (previews_tx, previews) = if req.previews > 0 {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let job = Job {
            req,
            previews: previews_tx,
            cancel: Arc::clone(&cancel),
            submitted: Instant::now(),
            reply,
        };
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let tx = guard.as_ref().ok_or(SubmitError::Closed)?;
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => Ok(Ticket {
                rx,
                previews,
                result: None,
                cancel,
            }),
            Err(e) => {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(SubmitError::Overloaded {
                        retry_after: self.retry_after(),
                    }),
                    mpsc::error::TrySendError::Closed(_) => Err(SubmitError::Closed),
                }
            }
        }
    }

    /// Estimated wait for a place: the queue's jobs times the mean job time, 1 to 60 s.
    pub fn retry_after(&self) -> Duration {
        let mean = self
            .stats
            .mean_secs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(1.0);
        let ahead = (self.waiting() + self.running()).max(1) as f64;
        let per_place = ahead * mean / (self.config.depth.max(1) as f64);
        Duration::from_secs_f64(per_place.clamp(1.0, 60.0))
    }

    /// Stops admitting jobs; the worker finishes what is queued, then exits.
    /// `shutdown` waits for it for at most `grace`, cancelling what is left after that.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Closes the queue and waits up to `grace` for the worker to finish; returns whether it
    /// did.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.close();
        let Some(worker) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return true;
        };
        let deadline = Instant::now() + grace;
        while !worker.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worker.join().is_ok()
    }
}

/// The model's thread: takes jobs, groups compatible ones, runs them, replies.
struct Worker {
    pipeline: Box<dyn Pipeline>,
    rx: mpsc::Receiver<Job>,
    /// Jobs taken off the channel but not yet run (incompatible with the last batch);
    /// still counted as waiting.
    pending: VecDeque<Job>,
    stats: Arc<Stats>,
    config: QueueConfig,
}

impl Job {
    fn deadline(&self, timeout: Duration) -> Instant {
        self.submitted + timeout
    }

    /// The client left, or the job can no longer finish in time.
    fn dead(&self, timeout: Duration) -> bool {
        self.cancel.load(Ordering::Relaxed)
            || self.reply.is_closed()
            || Instant::now() >= self.deadline(timeout)
    }
}

impl Worker {
    fn new(
        pipeline: Box<dyn Pipeline>,
        rx: mpsc::Receiver<Job>,
        stats: Arc<Stats>,
        config: QueueConfig,
    ) -> Self {
        Self {
            pipeline,
            rx,
            pending: VecDeque::new(),
            stats,
            config,
        }
    }

    /// The next job, from what was set aside first, then the channel (blocking).
    fn next(&mut self) -> Option<Job> {
        if let Some(job) = self.pending.pop_front() {
            return Some(job);
        }
        self.rx.blocking_recv()
    }

    /// Marks a job as no longer waiting; replies to it and returns `None` when it is dead.
    fn take(&self, job: Job) -> Option<Job> {
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        if !job.dead(self.config.timeout) {
            return Some(job);
        }
        if Instant::now() >= job.deadline(self.config.timeout) {
            let _ = job.reply.send(Err(JobError::TimedOut(self.config.timeout)));
        } else {
            tracing::debug!("skipping a job whose client left while it waited");
        }
        None
    }

    /// `first` plus the waiting jobs that can share its batch, in arrival order.
    fn gather(&mut self, first: Job) -> Vec<Job> {
        let budget = self.config.batch_images.max(1);
        let mut images = first.req.n;
        let lead = first.req.clone();
        let mut batch = vec![first];
        let fits = |job: &Job, images: usize, this: &Self| {
            images + job.req.n <= budget && this.pipeline.compatible(&lead, &job.req)
        };
        let mut i = 0;
        while i < self.pending.len() && images < budget {
            if fits(&self.pending[i], images, self) {
                let job = self.pending.remove(i).expect("index checked");
                if let Some(job) = self.take(job) {
                    images += job.req.n;
                    batch.push(job);
                }
            } else {
                i += 1;
            }
        }
        while images < budget {
            let Ok(job) = self.rx.try_recv() else { break };
            if fits(&job, images, self) {
                if let Some(job) = self.take(job) {
                    images += job.req.n;
                    batch.push(job);
                }
            } else {
                self.pending.push_back(job);
            }
        }
        batch
    }

    fn run(mut self) {
        while let Some(job) = self.next() {
            let Some(first) = self.take(job) else {
                continue;
            };
            let batch = self.gather(first);
            let started = Instant::now();
            self.run_batch(batch);
            // Idle after a long batch: the pages it freed go back to the system. A short
            // batch freed little, and trimming locks the heap while the handlers encode
            // its images (at 128² that added about 1 ms to every request).
            if started.elapsed() >= Duration::from_millis(500)
                && self.pending.is_empty()
                && self.rx.is_empty()
            {
                self.pipeline.idle();
            }
        }
    }

    fn run_batch(&mut self, batch: Vec<Job>) {
        let timeout = self.config.timeout;
        self.stats.running.store(batch.len(), Ordering::Relaxed);
        let started = Instant::now();
        let reqs: Vec<GenerationRequest> = batch.iter().map(|j| j.req.clone()).collect();
        // Stop only when no job of the batch is still wanted.
        let result = self.pipeline.generate_batch(&reqs, &mut |progress| {
            if let Progress::Preview {
                request,
                image,
                index,
                step,
                pixels,
            } = progress
                && let Some(tx) = batch.get(request).and_then(|j| j.previews.as_ref())
            {
                let _ = tx.send(Preview {
                    image,
                    index,
                    step,
                    pixels: pixels.clone(),
                });
            }
            if batch.iter().all(|j| j.dead(timeout)) {
                Control::Cancel
            } else {
                Control::Continue
            }
        });
        let ran = started.elapsed();
        self.stats.running.store(0, Ordering::Relaxed);
        let outcome_of = |job: &Job| {
            if job.cancel.load(Ordering::Relaxed) {
                Err(JobError::Cancelled)
            } else if Instant::now() >= job.deadline(timeout) {
                Err(JobError::TimedOut(timeout))
            } else {
                Ok(())
            }
        };
        match result {
            Ok(generations) => {
                let mut mean = self
                    .stats
                    .mean_secs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let secs = ran.as_secs_f64();
                *mean = Some(mean.map_or(secs, |m| 0.8 * m + 0.2 * secs));
                drop(mean);
                for (job, generation) in batch.into_iter().zip(generations) {
                    let reply = outcome_of(&job).map(|()| Outcome {
                        generation,
                        queued: started - job.submitted,
                        ran,
                    });
                    let _ = job.reply.send(reply);
                }
            }
            Err(PipelineError::Cancelled) => {
                for job in batch {
                    let reply = outcome_of(&job).and(Err(JobError::Cancelled));
                    let _ = job.reply.send(reply);
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for job in batch {
                    let _ = job.reply.send(Err(JobError::Engine(Arc::clone(&e))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
