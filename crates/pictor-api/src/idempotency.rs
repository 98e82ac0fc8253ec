//! `Idempotency-Key`: the same key with the same body, from the same API key, gets the same
//! response (same images, same `created`) for a while; a duplicate that arrives while the
//! first is running waits for it instead of rendering again; the same key with another
//! body is a 409.
//!
//! The same table, keyed by the request body instead, lets an SDK's automatic retry attach
//! to the attempt it repeats (see `routes::images`).
//!
//! Results live in memory, bounded in count, in bytes (oldest finished entries are dropped
//! first) and in time. Only successes are kept: a failed attempt leaves nothing behind, so a
//! retry runs again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::watch;

/// A stored response body (the JSON of a 200).
pub type Stored = Arc<Vec<u8>>;

enum Entry {
    Running {
        fingerprint: String,
        done: watch::Receiver<Option<Stored>>,
    },
    Done {
        fingerprint: String,
        body: Stored,
        until: Instant,
    },
}

/// What to do with a request.
pub enum Lookup {
    /// First of its kind: run it, then call [`Replays::complete`] with this sender.
    New(watch::Sender<Option<Stored>>),
    /// Already answered: send this body again.
    Replay(Stored),
    /// Running now: wait on this, then look up again.
    Wait(watch::Receiver<Option<Stored>>),
    /// The key was used with another body.
    Conflict,
}

/// The table of idempotency keys.
pub struct Replays {
    entries: Mutex<HashMap<String, Entry>>,
    ttl: Duration,
    capacity: usize,
    max_bytes: usize,
}

/// Drops the oldest finished entries until `incoming` more bytes and one more entry fit.
fn make_room(
    entries: &mut HashMap<String, Entry>,
    capacity: usize,
    max_bytes: usize,
    incoming: usize,
) {
    let now = Instant::now();
    entries.retain(|_, e| !matches!(e, Entry::Done { until, .. } if *until <= now));
    let stored = |entries: &HashMap<String, Entry>| -> usize {
        entries
            .values()
            .map(|e| match e {
                Entry::Done { body, .. } => body.len(),
                Entry::Running { .. } => 0,
            })
            .sum()
    };
    while entries.len() >= capacity || stored(entries) + incoming > max_bytes {
        let oldest = entries
            .iter()
            .filter_map(|(k, e)| match e {
                Entry::Done { until, .. } => Some((k.clone(), *until)),
                Entry::Running { .. } => None,
            })
            .min_by_key(|(_, until)| *until)
            .map(|(k, _)| k);
        match oldest {
            Some(k) => entries.remove(&k),
            None => break,
        };
    }
}

impl Replays {
    /// Keeps results for `ttl`, at most `capacity` of them and `max_bytes` in all.
    pub fn new(ttl: Duration, capacity: usize, max_bytes: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            ttl,
            capacity: capacity.max(1),
            max_bytes,
        }
    }

    /// Registers a new run of `scope` whatever the table holds for it (a first attempt that
    /// must render anew, though an identical request ran before).
    pub fn begin_fresh(&self, scope: &str, fingerprint: &str) -> watch::Sender<Option<Stored>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(scope);
        self.start(&mut entries, scope, fingerprint)
    }

    /// Records a running entry for `scope` and returns the sender that completes it.
    fn start(
        &self,
        entries: &mut HashMap<String, Entry>,
        scope: &str,
        fingerprint: &str,
    ) -> watch::Sender<Option<Stored>> {
        make_room(entries, self.capacity, self.max_bytes, 0);
        let (tx, rx) = watch::channel(None);
        entries.insert(
            scope.to_string(),
            Entry::Running {
                fingerprint: fingerprint.to_string(),
                done: rx,
            },
        );
        tx
    }

    /// Looks `scope` (API key + idempotency key) up for a body with `fingerprint`.
    pub fn begin(&self, scope: &str, fingerprint: &str) -> Lookup {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        entries.retain(|_, e| !matches!(e, Entry::Done { until, .. } if *until <= now));
        match entries.get(scope) {
            Some(Entry::Done {
                fingerprint: f,
                body,
                ..
            }) if f == fingerprint => Lookup::Replay(Arc::clone(body)),
            Some(Entry::Running {
                fingerprint: f,
                done,
            }) if f == fingerprint => Lookup::Wait(done.clone()),
            Some(_) => Lookup::Conflict,
            None => Lookup::New(self.start(&mut entries, scope, fingerprint)),
        }
    }

    /// Records the outcome of a [`Lookup::New`] run: `Some(body)` is kept and replayed,
    /// `None` (a failure) forgets the key. Waiters are woken either way.
    pub fn complete(
        &self,
        scope: &str,
        fingerprint: &str,
        body: Option<Stored>,
        done: watch::Sender<Option<Stored>>,
    ) {
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            match &body {
                Some(body) if body.len() <= self.max_bytes => {
                    entries.remove(scope);
                    make_room(&mut entries, self.capacity, self.max_bytes, body.len());
                    entries.insert(
                        scope.to_string(),
                        Entry::Done {
                            fingerprint: fingerprint.to_string(),
                            body: Arc::clone(body),
                            until: Instant::now() + self.ttl,
                        },
                    );
                }
                // A failure, or a body too large to keep.
                _ => {
                    entries.remove(scope);
                }
            }
        }
        done.send_replace(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replay_wait_conflict_and_forget_on_failure() {
        let r = Replays::new(Duration::from_secs(60), 8, 1 << 20);
        let Lookup::New(tx) = r.begin("k", "a") else {
            panic!("first is new")
        };
        let Lookup::Wait(mut rx) = r.begin("k", "a") else {
            panic!("duplicate waits")
        };
        assert!(matches!(r.begin("k", "b"), Lookup::Conflict));
        r.complete("k", "a", Some(Arc::new(b"ok".to_vec())), tx);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().as_deref().map(Vec::as_slice), Some(&b"ok"[..]));
        assert!(matches!(r.begin("k", "a"), Lookup::Replay(b) if b.as_slice() == b"ok"));
        assert!(matches!(r.begin("other", "a"), Lookup::New(_)));

        let Lookup::New(tx) = r.begin("f", "a") else {
            panic!()
        };
        r.complete("f", "a", None, tx);
        assert!(
            matches!(r.begin("f", "a"), Lookup::New(_)),
            "a failure is not kept"
        );
    }

    #[test]
    fn expired_and_excess_entries_go() {
        let r = Replays::new(Duration::from_millis(0), 2, 1 << 20);
        for k in ["a", "b", "c"] {
            let Lookup::New(tx) = r.begin(k, "x") else {
                panic!()
            };
            r.complete(k, "x", Some(Arc::new(vec![])), tx);
        }
        // ttl 0: everything finished has expired.
        assert!(matches!(r.begin("a", "x"), Lookup::New(_)));
    }

    #[test]
    fn stored_bytes_are_bounded_oldest_first() {
        let r = Replays::new(Duration::from_secs(60), 100, 10);
        for k in ["a", "b", "c"] {
            let Lookup::New(tx) = r.begin(k, "x") else {
                panic!()
            };
            r.complete(k, "x", Some(Arc::new(vec![0; 4])), tx);
        }
        // 12 bytes do not fit in 10: the oldest went.
        assert!(matches!(r.begin("a", "x"), Lookup::New(_)));
        assert!(matches!(r.begin("c", "x"), Lookup::Replay(_)));
        let Lookup::New(tx) = r.begin("big", "x") else {
            panic!()
        };
        r.complete("big", "x", Some(Arc::new(vec![0; 11])), tx);
        assert!(
            matches!(r.begin("big", "x"), Lookup::New(_)),
            "a body over the bound is not kept"
        );
    }

    #[tokio::test]
    async fn a_fresh_run_replaces_what_was_there() {
        let r = Replays::new(Duration::from_secs(60), 8, 1 << 20);
        let Lookup::New(tx) = r.begin("k", "a") else {
            panic!()
        };
        r.complete("k", "a", Some(Arc::new(b"old".to_vec())), tx);
        let tx = r.begin_fresh("k", "a");
        let Lookup::Wait(_) = r.begin("k", "a") else {
            panic!("a retry waits for the fresh run")
        };
        r.complete("k", "a", Some(Arc::new(b"new".to_vec())), tx);
        assert!(matches!(r.begin("k", "a"), Lookup::Replay(b) if b.as_slice() == b"new"));
    }
}
