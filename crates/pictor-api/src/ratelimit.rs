//! Per-key rate limits: requests and images per minute, kept as token buckets in memory,
//! reported in OpenAI's `x-ratelimit-*` headers.
//!
//! A limit of `L` per minute is a bucket of `L` tokens refilled at `L / 60` per second: a
//! burst of `L` is allowed, then one every `60 / L` seconds. A request costs one request
//! token and `n` image tokens; it is admitted only when both buckets hold enough, and then
//! takes from both. The counts are per server process (a restart refills them).

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

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(limit: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(limit),
            updated: now,
        }
    }

    /// Tokens now, after refilling at `limit / 60` per second.
    fn refill(&mut self, limit: u32, now: Instant) {
        let rate = f64::from(limit) / 60.0;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(limit));
        self.updated = now;
    }

    /// How long until `cost` tokens are there.
    fn wait_for(&self, limit: u32, cost: f64) -> Duration {
        let rate = f64::from(limit) / 60.0;
        Duration::from_secs_f64(((cost - self.tokens) / rate).max(0.0))
    }
}

/// One kind of limit: its header suffix, the key's limit and the request's cost.
struct Kind {
    name: &'static str,
    limit: Option<u32>,
    cost: f64,
}

/// Token buckets per key.
#[derive(Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, [Option<Bucket>; 2]>>,
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
    /// exceeds the per-minute limit, 400 on `n`.
    pub fn admit(&self, key: &ApiKey, images: usize) -> Result<RateHeaders, Refused> {
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
        if kinds.iter().all(|k| k.limit.is_none()) {
            return Ok(RateHeaders::default());
        }
        if let Some(limit) = key.limits.images_per_minute
            && images as f64 > f64::from(limit)
        {
            return Err(Refused::TooManyImages { images, limit });
        }
        let now = Instant::now();
        let mut all = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let buckets = all.entry(key.id.clone()).or_default();
        let mut refused = None;
        for (kind, slot) in kinds.iter().zip(buckets.iter_mut()) {
            let Some(limit) = kind.limit else {
                *slot = None;
                continue;
            };
            let bucket = slot.get_or_insert_with(|| Bucket::full(limit, now));
            bucket.refill(limit, now);
            if bucket.tokens + 1e-9 < kind.cost && refused.is_none() {
                refused = Some((kind.name, limit, bucket.wait_for(limit, kind.cost)));
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
            let to_full = b.wait_for(limit, f64::from(limit));
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
        match refused {
            None => Ok(headers),
            Some((kind, limit, retry_after)) => Err(Refused::Limited {
                kind,
                limit,
                retry_after: retry_after.max(Duration::from_millis(1)),
                headers,
            }),
        }
    }
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

    #[test]
    fn requests_per_minute_allow_a_burst_then_refuse_with_the_wait() {
        let l = Limiter::default();
        let k = key(Some(2), None);
        let first = l.admit(&k, 1).expect("first");
        assert_eq!(value(&first, "x-ratelimit-limit-requests"), "2");
        assert_eq!(value(&first, "x-ratelimit-remaining-requests"), "1");
        assert!(l.admit(&k, 1).is_ok());
        match l.admit(&k, 1) {
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
            l.admit(&key(None, None), 1).is_ok(),
            "no limits, no headers"
        );
    }

    #[test]
    fn images_count_n_and_a_refusal_takes_nothing() {
        let l = Limiter::default();
        let k = key(Some(10), Some(4));
        assert!(l.admit(&k, 3).is_ok());
        assert!(matches!(
            l.admit(&k, 2),
            Err(Refused::Limited { kind: "images", .. })
        ));
        // The refused request did not spend a request token.
        let ok = l.admit(&k, 1).expect("one image fits");
        assert_eq!(value(&ok, "x-ratelimit-remaining-requests"), "8");
        assert_eq!(value(&ok, "x-ratelimit-remaining-images"), "0");
        assert!(matches!(
            l.admit(&k, 5),
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
