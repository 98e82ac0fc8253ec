//! The caller's handle on a submitted job: previews, then the result; dropping it cancels.
//! [`ticket`] makes one with its other end, [`Reply`], for queues that run jobs elsewhere.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{JobError, JobProgress, Outcome, Preview, Stats};

/// A submitted job. Await [`Ticket::wait`] (after [`Ticket::next_preview`] when the
/// request asked for previews); dropping the ticket cancels the job.
pub struct Ticket {
    pub(crate) rx: oneshot::Receiver<Result<Outcome, JobError>>,
    pub(crate) previews: Option<mpsc::UnboundedReceiver<Preview>>,
    /// The result, when it arrived while waiting for a preview.
    pub(crate) result: Option<Result<Outcome, JobError>>,
    pub(crate) cancel: Arc<AtomicBool>,
    /// The job's id where it runs elsewhere (a cluster's job row).
    pub(crate) job: Option<String>,
    /// Where the job has got to, where its queue says.
    pub(crate) progress: Option<ProgressWatch>,
}

/// A job's progress as it changes: its place in the line while it waits, then its steps.
#[derive(Clone)]
pub struct ProgressWatch {
    pub(crate) rx: watch::Receiver<JobProgress>,
    /// A local queue's counts and the job's number in its line, to tell how many are
    /// ahead (a remote queue's [`Reply`] tells that itself).
    pub(crate) line: Option<(Arc<Stats>, u64)>,
    /// Set once somebody asks for the watch, so that a remote queue looks up the place
    /// in its line only for jobs whose caller reads it.
    pub(crate) watched: Arc<AtomicBool>,
}

impl ProgressWatch {
    /// Where the job is now.
    pub fn now(&self) -> JobProgress {
        let mut now = *self.rx.borrow();
        if !now.running
            && let Some((stats, number)) = &self.line
        {
            let left = stats.left.load(Ordering::Relaxed);
            now.ahead = Some(number.saturating_sub(left) as usize);
        }
        now
    }

    /// Waits for the worker to report a change; `false` once the job is over.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

impl Ticket {
    /// The job's id where it runs elsewhere, so that another caller can attach to it.
    pub fn job(&self) -> Option<&str> {
        self.job.as_deref()
    }

    /// The job's progress, where its queue reports one.
    pub fn progress(&self) -> Option<ProgressWatch> {
        let watch = self.progress.clone()?;
        watch.watched.store(true, Ordering::Relaxed);
        Some(watch)
    }

    /// This ticket, naming its remote job `id`.
    pub fn for_job(mut self, id: &str) -> Self {
        self.job = Some(id.to_string());
        self
    }

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

/// The other end of a [`Ticket`], for a queue whose jobs run elsewhere (a cluster's
/// workers): it hands the caller previews, progress and the result, and sees the caller
/// leave.
pub struct Reply {
    result: oneshot::Sender<Result<Outcome, JobError>>,
    previews: Option<mpsc::UnboundedSender<Preview>>,
    progress: watch::Sender<JobProgress>,
    watched: Arc<AtomicBool>,
}

impl Reply {
    /// Hands the caller a preview (dropped when it asked for none).
    pub fn preview(&self, preview: Preview) {
        if let Some(tx) = &self.previews {
            let _ = tx.send(preview);
        }
    }

    /// Tells the caller where the job has got to.
    pub fn progress(&self, progress: JobProgress) {
        self.progress.send_replace(progress);
    }

    /// Whether the caller reads the job's progress (asked its ticket for it), so that
    /// finding the place in the line is worth a query.
    pub fn watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    /// Hands the caller the result.
    pub fn finish(self, result: Result<Outcome, JobError>) {
        let _ = self.result.send(result);
    }

    /// Resolves when the caller drops its ticket (it went away): the job should stop.
    pub async fn left(&mut self) {
        self.result.closed().await;
    }
}

/// A ticket and its reply end; previews are carried when `previews` is true.
pub fn ticket(previews: bool) -> (Ticket, Reply) {
    let (result, rx) = oneshot::channel();
    let (previews_tx, previews_rx) = if previews {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let (progress, progress_rx) = watch::channel(JobProgress::default());
    let watched = Arc::new(AtomicBool::new(false));
    (
        Ticket {
            rx,
            previews: previews_rx,
            result: None,
            cancel: Arc::new(AtomicBool::new(false)),
            job: None,
            // The place in the line is the remote queue's to tell, through the reply.
            progress: Some(ProgressWatch {
                rx: progress_rx,
                line: None,
                watched: Arc::clone(&watched),
            }),
        },
        Reply {
            result,
            previews: previews_tx,
            progress,
            watched,
        },
    )
}
