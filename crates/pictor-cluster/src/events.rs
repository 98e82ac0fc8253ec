//! Job events for an API node: one `LISTEN pictor_events` connection per node, each
//! notification handed to the job it names (`done:<id>` or
//! `preview:<id>:<image>:<index>:<step>`). Notifications sent while the connection was
//! down are lost; one poll per node a second finds the followed jobs that ended anyway,
//! so a lost one only delays.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use crate::jobs::{self, EVENTS_CHANNEL};

/// How often the followed jobs' rows are read when no notification came.
const POLL: Duration = Duration::from_secs(1);

/// What happened to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// It ended (done, failed or cancelled): read its row.
    Done,
    /// A preview is in the store.
    Preview {
        image: usize,
        index: usize,
        step: usize,
    },
    /// Its worker finished `step` of `total` denoising steps.
    Progress { step: usize, total: usize },
}

type Subscribers = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Event>>>>;

/// The node's listener and the jobs waiting on it.
#[derive(Clone)]
pub(crate) struct Events {
    subscribers: Subscribers,
    url: Arc<str>,
    pool: sqlx::PgPool,
    /// The listener starts with the first subscription: a worker, which never
    /// subscribes, holds no idle connection for it.
    started: Arc<std::sync::Once>,
}

/// A job's events until it is dropped.
pub(crate) struct Subscription {
    id: String,
    subscribers: Subscribers,
    pub rx: mpsc::UnboundedReceiver<Event>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

fn parse(payload: &str) -> Option<(&str, Event)> {
    let mut parts = payload.split(':');
    match (parts.next()?, parts.next()?) {
        ("done", id) => Some((id, Event::Done)),
        ("preview", id) => {
            let mut n = || parts.next()?.parse().ok();
            let (image, index, step) = (n()?, n()?, n()?);
            Some((id, Event::Preview { image, index, step }))
        }
        ("progress", id) => {
            let mut n = || parts.next()?.parse().ok();
            let (step, total) = (n()?, n()?);
            Some((id, Event::Progress { step, total }))
        }
        _ => None,
    }
}

impl Events {
    /// The events of the cluster at `url`; nothing is listened to until a job subscribes.
    pub(crate) fn new(url: &str, pool: sqlx::PgPool) -> Self {
        Self {
            subscribers: Arc::default(),
            url: Arc::from(url),
            pool,
            started: Arc::new(std::sync::Once::new()),
        }
    }

    /// Once a second, tells each followed job that ended without a notification.
    fn poll(&self) {
        let (pool, handed) = (self.pool.clone(), Arc::clone(&self.subscribers));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ids: Vec<String> = handed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                match jobs::ended(&pool, &ids).await {
                    Ok(ended) => {
                        let subs = handed.lock().unwrap_or_else(|e| e.into_inner());
                        for id in ended {
                            if let Some(tx) = subs.get(&id) {
                                let _ = tx.send(Event::Done);
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "job events: polling"),
                }
            }
        });
    }

    /// Listens (reconnecting as needed) for the life of the process.
    fn listen(&self) {
        let (url, handed) = (Arc::clone(&self.url), Arc::clone(&self.subscribers));
        tokio::spawn(async move {
            loop {
                let mut listener = match PgListener::connect(&url).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "job events: cannot connect; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(EVENTS_CHANNEL).await {
                    tracing::warn!(error = %e, "job events: cannot listen; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                loop {
                    match listener.recv().await {
                        Ok(n) => {
                            if let Some((id, event)) = parse(n.payload()) {
                                let subs = handed.lock().unwrap_or_else(|e| e.into_inner());
                                if let Some(tx) = subs.get(id) {
                                    let _ = tx.send(event);
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "job events: connection lost");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            break;
                        }
                    }
                }
            }
        });
    }

    /// Job `id`'s events from now on (the first subscription starts the listener and the
    /// poll; an end sent before it listens is caught by the poll).
    pub(crate) fn subscribe(&self, id: &str) -> Subscription {
        self.started.call_once(|| {
            self.listen();
            self.poll();
        });
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), tx);
        Subscription {
            id: id.to_string(),
            subscribers: Arc::clone(&self.subscribers),
            rx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_and_junk_is_ignored() {
        assert_eq!(parse("done:j1"), Some(("j1", Event::Done)));
        assert_eq!(
            parse("preview:j2:1:0:3"),
            Some((
                "j2",
                Event::Preview {
                    image: 1,
                    index: 0,
                    step: 3
                }
            ))
        );
        assert_eq!(parse("preview:j2:x:0:3"), None);
        assert_eq!(parse("other:j3"), None);
    }
}
