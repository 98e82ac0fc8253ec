//! The caller's handle on a submitted job: previews, then the result; dropping it cancels.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::{mpsc, oneshot};

use crate::{JobError, Outcome, Preview};

/// A submitted job. Await [`Ticket::wait`] (after [`Ticket::next_preview`] when the
/// request asked for previews); dropping the ticket cancels the job.
pub struct Ticket {
    pub(crate) rx: oneshot::Receiver<Result<Outcome, JobError>>,
    pub(crate) previews: Option<mpsc::UnboundedReceiver<Preview>>,
    /// The result, when it arrived while waiting for a preview.
    pub(crate) result: Option<Result<Outcome, JobError>>,
    pub(crate) cancel: Arc<AtomicBool>,
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
