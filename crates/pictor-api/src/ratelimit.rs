//! Per-key rate limits: requests and images per minute, kept as token buckets (in memory,
//! or in the database for API nodes that share them), reported in OpenAI's
//! `x-ratelimit-*` headers.
//!
//! A limit of `L` per minute is a bucket of `L` tokens refilled at `L / 60` per second: a
//! burst of `L` is allowed, then one every `60 / L` seconds. A request costs one request
//! token and `n` image tokens; it is admitted only when both buckets hold enough, and then
//! takes from both. In memory the counts are per server process (a restart refills them);
//! shared, they are the cluster's, on the database's clock.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::{HeaderName, HeaderValue};
use pictor_store::ApiKey;

/// Why a request was refused; `ApiError` turns it into a 400 or a 429.
#[derive(Debug)]
pub enum Refused {
    /// `images` alone is more than the key's per-minute image limit: no wait helps.
    TooManyImages {
        /// Images asked for.
        images: usize,
        /// The key's images per minute.
        limit: u32,
    },
    /// The key's `kind` budget (`requests` or `images`) is spent until `retry_after`.
    Limited {
        /// `requests` or `images`.
        kind: &'static str,
        /// The per-minute limit.
        limit: u32,
        /// When enough is back.
        retry_after: Duration,
        /// The `x-ratelimit-*` headers.
        headers: RateHeaders,
    },
    /// The shared buckets could not be read.
    Unreachable(pictor_store::StoreError),
}

/// The `x-ratelimit-*` headers for one response.
#[derive(Debug, Clone, Default)]
pub struct RateHeaders(pub Vec<(HeaderName, HeaderValue)>);

impl RateHeaders {
    /// Adds the headers to `response`.
    pub fn apply(&self, response: &mut axum::response::Response) {
        for (name, value) in &self.0 {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
}

/// A bucket: tokens left at `at` seconds (on the limiter's clock).
type Bucket = pictor_store::BucketState;

fn full(limit: u32, now: f64) -> Bucket {
    Bucket {
        tokens: f64::from(limit),
        at: now,
    }
}

/// Tokens at `now`, after refilling at `limit / 60` per second.
fn refill(b: &mut Bucket, limit: u32, now: f64) {
    let rate = f64::from(limit) / 60.0;
    let elapsed = (now - b.at).max(0.0);
    b.tokens = (b.tokens + elapsed * rate).min(f64::from(limit));
    b.at = now;
}

/// How long until `cost` tokens are there.
fn wait_for(b: &Bucket, limit: u32, cost: f64) -> Duration {
    let rate = f64::from(limit) / 60.0;
    Duration::from_secs_f64(((cost - b.tokens) / rate).max(0.0))
}

/// One kind of limit: its header suffix, the key's limit and the request's cost.
struct Kind {
    name: &'static str,
    limit: Option<u32>,
    cost: f64,
}

/// Token buckets per key: this process's, or the cluster's in the database.
pub enum Limiter {
    /// In memory, on this process's monotonic clock.
    Memory {
        /// Buckets by key id.
        buckets: Mutex<HashMap<String, pictor_store::Buckets>>,
        /// The clock's zero.
        epoch: Instant,
    },
    /// In the database, shared by every API node.
    Shared(pictor_store::Db),
}

impl Default for Limiter {
    fn default() -> Self {
        Self::Memory {
            buckets: Mutex::default(),
            epoch: Instant::now(),
        }
    }
}

/// Go-style durations, as OpenAI writes its reset headers: `250ms`, `1.5s`, `6m0s`.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = |ms: u128| {
        let s = format!("{:.3}", ms as f64 / 1000.0);
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    if ms < 60_000 {
        format!("{}s", secs(ms))
    } else {
        format!("{}m{}s", ms / 60_000, secs(ms % 60_000))
    }
}

fn header(name: String, value: String) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::try_from(name).ok()?,
        HeaderValue::try_from(value).ok()?,
    ))
}

impl Limiter {
    /// Admits a request for `images` images from `key`, taking its tokens; or refuses it
    /// with 429 (`retry_after` is when enough tokens will be back) or, when `images` alone
    /// exceeds the per-minute limit, 400 on `n`. Shared buckets that cannot be reached
    /// refuse with 503.
    pub async fn admit(&self, key: &ApiKey, images: usize) -> Result<RateHeaders, Refused> {
        if key.limits.requests_per_minute.is_none() && key.limits.images_per_minute.is_none() {
            return Ok(RateHeaders::default());
        }
        if let Some(limit) = key.limits.images_per_minute
            && images as f64 > f64::from(limit)
        {
            return Err(Refused::TooManyImages { images, limit });
        }
        match self {
            Self::Memory { buckets, epoch } => {
                let now = epoch.elapsed().as_secs_f64();
                let mut all = buckets.lock().unwrap_or_else(|e| e.into_inner());
                let slot = all.entry(key.id.clone()).or_default();
                let (after, answer) = decide(key, images, now, *slot);
                *slot = after;
                answer
            }
            Self::Shared(db) => db
                .with_rate_buckets(&key.id, |now, b| decide(key, images, now, b))
                .await
                .map_err(Refused::Unreachable)?,
        }
    }
}

/// The admission of `images` images from `key` at `now` against `buckets`: the buckets
/// after it, and the answer.
fn decide(
    key: &ApiKey,
    images: usize,
    now: f64,
    mut buckets: pictor_store::Buckets,
) -> (pictor_store::Buckets, Result<RateHeaders, Refused>) {
    let kinds = [
        Kind {
            name: "requests",
            limit: key.limits.requests_per_minute,
            cost: 1.0,
        },
        Kind {
            name: "images",
            limit: key.limits.images_per_minute,
            cost: images as f64,
        },
    ];
    let mut refused = None;
    for (kind, slot) in kinds.iter().zip(buckets.iter_mut()) {
        let Some(limit) = kind.limit else {
            *slot = None;
            continue;
        };
        let bucket = slot.get_or_insert_with(|| full(limit, now));
        refill(bucket, limit, now);
        if bucket.tokens + 1e-9 < kind.cost && refused.is_none() {
            refused = Some((kind.name, limit, wait_for(bucket, limit, kind.cost)));
        }
    }
    if refused.is_none() {
        for (kind, bucket) in kinds.iter().zip(buckets.iter_mut()) {
            if let Some(b) = bucket {
                b.tokens = (b.tokens - kind.cost).max(0.0);
            }
        }
    }
    let mut headers = Vec::new();
    for (kind, bucket) in kinds.iter().zip(buckets.iter()) {
        let (Some(limit), Some(b)) = (kind.limit, bucket) else {
            continue;
        };
        let to_full = wait_for(b, limit, f64::from(limit));
        headers.extend(
            [
                header(
                    format!("x-ratelimit-limit-{}", kind.name),
                    limit.to_string(),
                ),
                header(
                    format!("x-ratelimit-remaining-{}", kind.name),
                    (b.tokens + 1e-9).floor().to_string(),
                ),
                header(
                    format!("x-ratelimit-reset-{}", kind.name),
                    go_duration(to_full),
                ),
            ]
            .into_iter()
            .flatten(),
        );
    }
    let headers = RateHeaders(headers);
    let answer = match refused {
        None => Ok(headers),
        Some((kind, limit, retry_after)) => Err(Refused::Limited {
            kind,
            limit,
            retry_after: retry_after.max(Duration::from_millis(1)),
            headers,
        }),
    };
    (buckets, answer)
}

#[cfg(test)]
mod tests {
    use pictor_store::KeyLimits;

    use super::*;

    fn key(rpm: Option<u32>, ipm: Option<u32>) -> ApiKey {
        ApiKey {
            id: "key_1".into(),
            name: "k".into(),
            prefix: "sk-1".into(),
            created_at: 0,
            revoked_at: None,
            limits: KeyLimits {
                requests_per_minute: rpm,
                images_per_minute: ipm,
            },
        }
    }

    fn value<'a>(h: &'a RateHeaders, name: &str) -> &'a str {
        h.0.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[tokio::test]
    async fn requests_per_minute_allow_a_burst_then_refuse_with_the_wait() {
        let l = Limiter::default();
        let k = key(Some(2), None);
        let first = l.admit(&k, 1).await.expect("first");
        assert_eq!(value(&first, "x-ratelimit-limit-requests"), "2");
        assert_eq!(value(&first, "x-ratelimit-remaining-requests"), "1");
        assert!(l.admit(&k, 1).await.is_ok());
        match l.admit(&k, 1).await {
            Err(Refused::Limited {
                kind,
                retry_after,
                headers,
                ..
            }) => {
                assert_eq!(kind, "requests");
                // One token comes back every 30 s.
                assert!(
                    retry_after > Duration::from_secs(29) && retry_after <= Duration::from_secs(30)
                );
                assert_eq!(value(&headers, "x-ratelimit-remaining-requests"), "0");
                assert!(value(&headers, "x-ratelimit-reset-requests").ends_with('s'));
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        assert!(
            l.admit(&key(None, None), 1).await.is_ok(),
            "no limits, no headers"
        );
    }

    #[tokio::test]
    async fn images_count_n_and_a_refusal_takes_nothing() {
        let l = Limiter::default();
        let k = key(Some(10), Some(4));
        assert!(l.admit(&k, 3).await.is_ok());
        assert!(matches!(
            l.admit(&k, 2).await,
            Err(Refused::Limited { kind: "images", .. })
        ));
        // The refused request did not spend a request token.
        let ok = l.admit(&k, 1).await.expect("one image fits");
        assert_eq!(value(&ok, "x-ratelimit-remaining-requests"), "8");
        assert_eq!(value(&ok, "x-ratelimit-remaining-images"), "0");
        assert!(matches!(
            l.admit(&k, 5).await,
            Err(Refused::TooManyImages {
                images: 5,
                limit: 4
            })
        ));
    }

    #[test]
    fn durations_read_like_openais() {
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(20)), "20s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
    }
}
