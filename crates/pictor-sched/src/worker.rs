//! The model's thread: takes jobs off the queue, batches the compatible ones, runs them
//! through the pipeline, routes previews and replies.

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use pictor_core::{Control, GenerationRequest, Pipeline, PipelineError, Progress};
use tokio::sync::mpsc;

use crate::{Job, JobError, JobProgress, Outcome, Preview, QueueConfig, Stats};

/// The model's thread: takes jobs, groups compatible ones, runs them, replies.
pub(crate) struct Worker {
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
    pub(crate) fn new(
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
        self.stats.left.fetch_add(1, Ordering::Relaxed);
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

    pub(crate) fn run(mut self) {
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
        for job in &batch {
            job.progress.send_replace(JobProgress {
                running: true,
                ..JobProgress::default()
            });
        }
        // Stop only when no job of the batch is still wanted.
        let result = self.pipeline.generate_batch(&reqs, &mut |progress| {
            if let Progress::Step { step, total, .. } = progress {
                for job in &batch {
                    job.progress.send_replace(JobProgress {
                        running: true,
                        ahead: None,
                        step,
                        total,
                    });
                }
            }
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
