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
//! implements them. [`JobQueue`] is what the API holds per model: this crate's
//! [`ModelQueue`], or a cluster's shared queue (`pictor-cluster`), whose remote jobs answer
//! through [`ticket`]'s [`Reply`].

mod ticket;
mod worker;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use pictor_core::{Generation, GenerationRequest, PartMemory, Pipeline, PipelineError, RgbImage};
use tokio::sync::{mpsc, oneshot, watch};

pub use self::ticket::{ProgressWatch, Reply, Ticket, ticket};
use self::worker::Worker;

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
    /// The queue cannot be reached (a cluster's database or store is down); says which.
    #[error("{0}")]
    Unavailable(String),
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

/// How far a job has come: waiting behind about `ahead` jobs, then running, at `step`
/// of `total` denoising steps (of the batch's current chunk of images).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobProgress {
    /// Whether the worker has started it.
    pub running: bool,
    /// Jobs admitted before it and not yet started, while it waits and where its queue
    /// can tell.
    pub ahead: Option<usize>,
    /// Denoising steps finished.
    pub step: usize,
    /// Denoising steps to run (0 until it runs).
    pub total: usize,
}

struct Job {
    req: GenerationRequest,
    /// Where previews go, when the request asked for some.
    previews: Option<mpsc::UnboundedSender<Preview>>,
    /// Where it has got to (read through its ticket).
    progress: watch::Sender<JobProgress>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    reply: oneshot::Sender<Result<Outcome, JobError>>,
}

#[derive(Default)]
struct Stats {
    waiting: AtomicUsize,
    running: AtomicUsize,
    /// Jobs offered to the queue so far: each one's number is the count before it.
    offered: AtomicU64,
    /// Of those, how many have left the waiting line (started, dropped, or refused).
    left: AtomicU64,
    /// Exponentially weighted mean of job seconds, `None` before the first job.
    mean_secs: Mutex<Option<f64>>,
}

/// A job id as queues whose jobs run elsewhere name them: `job_` and 24 hex digits, from
/// 12 random bytes.
pub fn job_id(random: [u8; 12]) -> String {
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("job_{hex}")
}

/// A boxed future, for [`JobQueue`]'s async methods.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where a model's admitted jobs run: its own worker thread ([`ModelQueue`]) or a queue
/// shared by a cluster's workers. Admission answers at once: admitted (a [`Ticket`]) or
/// refused.
pub trait JobQueue: Send + Sync {
    /// Admits `req`, or refuses it when the queue is full or closed.
    fn submit(&self, req: GenerationRequest) -> BoxFuture<'_, Result<Ticket, SubmitError>>;
    /// Admits `req` as job `id` ([`job_id`]) where the queue names its jobs (a cluster's
    /// shared queue), so that a caller can record the id before the job exists and whoever
    /// takes its place finds the job, or admits it under the same id; the other queues
    /// ignore the id and [`JobQueue::submit`].
    fn submit_as(
        &self,
        id: &str,
        req: GenerationRequest,
    ) -> BoxFuture<'_, Result<Ticket, SubmitError>> {
        let _ = id;
        self.submit(req)
    }
    /// Each part of the model and its memory (empty where the model runs elsewhere).
    fn memory(&self) -> &[PartMemory];
    /// Where the model runs, as [`Pipeline::device`] says (`None` where it runs elsewhere).
    fn device(&self) -> Option<&str> {
        None
    }
    /// Jobs waiting (not counting those running).
    fn waiting(&self) -> usize;
    /// Jobs running.
    fn running(&self) -> usize;
    /// Stops admitting jobs.
    fn close(&self);
    /// Closes, then waits up to `grace` for admitted jobs; returns whether they finished.
    fn shutdown(&self, grace: Duration) -> BoxFuture<'_, bool>;
    /// A ticket for job `id`, already admitted by another caller (a cluster's API node
    /// that stopped), carrying `previews` previews; only queues whose jobs have ids can.
    fn attach(&self, id: &str, previews: usize) -> BoxFuture<'_, Result<Ticket, SubmitError>> {
        let _ = (id, previews);
        Box::pin(async {
            Err(SubmitError::Unavailable(
                "This queue's jobs cannot be attached to".into(),
            ))
        })
    }
}

impl JobQueue for ModelQueue {
    fn submit(&self, req: GenerationRequest) -> BoxFuture<'_, Result<Ticket, SubmitError>> {
        let admitted = ModelQueue::submit(self, req);
        Box::pin(async move { admitted })
    }

    fn memory(&self) -> &[PartMemory] {
        ModelQueue::memory(self)
    }

    fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    fn waiting(&self) -> usize {
        ModelQueue::waiting(self)
    }

    fn running(&self) -> usize {
        ModelQueue::running(self)
    }

    fn close(&self) {
        ModelQueue::close(self)
    }

    fn shutdown(&self, grace: Duration) -> BoxFuture<'_, bool> {
        Box::pin(ModelQueue::shutdown(self, grace))
    }
}

/// A model's queue and its worker thread.
pub struct ModelQueue {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    /// What the pipeline said it holds, before it moved to its thread.
    memory: Vec<PartMemory>,
    /// Where the pipeline said it runs.
    device: Option<String>,
    stats: Arc<Stats>,
    config: QueueConfig,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ModelQueue {
    /// Starts a worker thread named after `name` that owns `pipeline`.
    pub fn start(name: &str, pipeline: Box<dyn Pipeline>, config: QueueConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.depth.max(1));
        let stats = Arc::new(Stats::default());
        let worker_stats = Arc::clone(&stats);
        let worker_config = config.clone();
        let memory = pipeline.memory();
        let device = pipeline.device();
        let worker = std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || Worker::new(pipeline, rx, worker_stats, worker_config).run())
            .expect("spawning a thread only fails when the OS is out of resources");
        Self {
            tx: Mutex::new(Some(tx)),
            memory,
            device,
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
        let (progress, progress_rx) = watch::channel(JobProgress::default());
        let job = Job {
            req,
            previews: previews_tx,
            progress,
            cancel: Arc::clone(&cancel),
            submitted: Instant::now(),
            reply,
        };
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let tx = guard.as_ref().ok_or(SubmitError::Closed)?;
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let number = self.stats.offered.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => Ok(Ticket {
                rx,
                previews,
                result: None,
                cancel,
                job: None,
                progress: Some(ProgressWatch {
                    rx: progress_rx,
                    line: Some((Arc::clone(&self.stats), number)),
                    watched: Arc::default(),
                }),
            }),
            Err(e) => {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                self.stats.left.fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests;
