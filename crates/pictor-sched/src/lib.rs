//! Pictor's scheduler: a bounded queue in front of each loaded model.
//!
//! A [`ModelQueue`] owns one engine [`Pipeline`] on a dedicated OS thread and feeds it jobs
//! from a bounded channel. Admission is non-blocking: a full queue answers
//! [`SubmitError::Overloaded`] with a retry estimate from the measured job time, which the
//! API turns into 429 + `Retry-After`. Every job carries a cancel flag checked between
//! denoising steps; dropping the [`Ticket`] (the client went away) sets it, and so does the
//! job's deadline.
//!
//! It is not an HTTP layer and not a store: it takes engine requests and gives back engine
//! results. Batching of compatible requests across jobs and distributed queues come later.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

pub use pictor_engine::{
    Control, EngineError, Generation, GenerationRequest, Pipeline, Progress, PromptInfo, RgbImage,
};
use tokio::sync::{mpsc, oneshot};

/// Queue settings for one model.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Jobs that may wait (beyond the one running) before new ones are refused.
    pub depth: usize,
    /// Longest a job may take from submission to its last step.
    pub timeout: Duration,
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
    /// The engine failed.
    #[error(transparent)]
    Engine(EngineError),
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

struct Job {
    req: GenerationRequest,
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
    stats: Arc<Stats>,
    config: QueueConfig,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A submitted job. Await [`Ticket::wait`]; dropping the ticket cancels the job.
pub struct Ticket {
    rx: oneshot::Receiver<Result<Outcome, JobError>>,
    cancel: Arc<AtomicBool>,
}

impl Ticket {
    /// Waits for the result.
    pub async fn wait(mut self) -> Result<Outcome, JobError> {
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
        let timeout = config.timeout;
        let worker = std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || work(pipeline, rx, worker_stats, timeout))
            .expect("spawning a thread only fails when the OS is out of resources");
        Self {
            tx: Mutex::new(Some(tx)),
            stats,
            config,
            worker: Mutex::new(Some(worker)),
        }
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
        let job = Job {
            req,
            cancel: Arc::clone(&cancel),
            submitted: Instant::now(),
            reply,
        };
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let tx = guard.as_ref().ok_or(SubmitError::Closed)?;
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => Ok(Ticket { rx, cancel }),
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

fn work(
    mut pipeline: Box<dyn Pipeline>,
    mut rx: mpsc::Receiver<Job>,
    stats: Arc<Stats>,
    timeout: Duration,
) {
    while let Some(job) = rx.blocking_recv() {
        stats.waiting.fetch_sub(1, Ordering::Relaxed);
        let deadline = job.submitted + timeout;
        if job.cancel.load(Ordering::Relaxed) || job.reply.is_closed() {
            tracing::debug!("skipping a job whose client left while it waited");
            continue;
        }
        if Instant::now() >= deadline {
            let _ = job.reply.send(Err(JobError::TimedOut(timeout)));
            continue;
        }
        stats.running.store(1, Ordering::Relaxed);
        let started = Instant::now();
        let queued = started - job.submitted;
        let result = pipeline.generate(&job.req, &mut |_| {
            if job.cancel.load(Ordering::Relaxed) || Instant::now() >= deadline {
                Control::Cancel
            } else {
                Control::Continue
            }
        });
        let ran = started.elapsed();
        stats.running.store(0, Ordering::Relaxed);
        let outcome = match result {
            Ok(generation) => {
                let mut mean = stats.mean_secs.lock().unwrap_or_else(|e| e.into_inner());
                let secs = ran.as_secs_f64();
                *mean = Some(mean.map_or(secs, |m| 0.8 * m + 0.2 * secs));
                Ok(Outcome {
                    generation,
                    queued,
                    ran,
                })
            }
            Err(EngineError::Cancelled) if job.cancel.load(Ordering::Relaxed) => {
                Err(JobError::Cancelled)
            }
            Err(EngineError::Cancelled) => Err(JobError::TimedOut(timeout)),
            Err(e) => Err(JobError::Engine(e)),
        };
        let _ = job.reply.send(outcome);
    }
}

#[cfg(test)]
mod tests;
