//! `Idempotency-Key`: one job and one answer per key and body, attached to by retries.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

fn body(prompt: &str) -> serde_json::Value {
    json!({"model": MODEL, "prompt": prompt, "size": "64x48", "steps": 2, "response_format": "b64_json"})
}

async fn send(
    s: &Server,
    idem: &str,
    body: &serde_json::Value,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let r = s
        .post(body)
        .header("Idempotency-Key", idem)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (
        status,
        headers,
        r.json().await.unwrap_or(serde_json::Value::Null),
    )
}

async fn requests_billed(s: &Server) -> i64 {
    s.db.usage().await.unwrap()[0].requests
}

#[tokio::test]
async fn same_key_same_body_replays_the_same_response() {
    let s = start(Options::default()).await;
    // No seed: a second render would draw a different image, so equality proves a replay.
    let (a_status, _, a) = send(&s, "key-1", &body("a cat")).await;
    let (b_status, headers, b) = send(&s, "key-1", &body("a cat")).await;
    assert_eq!((a_status, b_status), (200, 200));
    assert_eq!(a, b, "same images, same created");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(requests_billed(&s).await, 1, "one job ran");
    // Another key renders anew.
    let (_, _, c) = send(&s, "key-2", &body("a cat")).await;
    assert_ne!(a["data"][0]["b64_json"], c["data"][0]["b64_json"]);
}

#[tokio::test]
async fn same_key_other_body_is_409_and_not_retried() {
    let s = start(Options::default()).await;
    send(&s, "k", &body("a cat")).await;
    let (status, headers, reply) = send(&s, "k", &body("a dog")).await;
    assert_eq!(status, 409, "{reply}");
    assert_eq!(headers["x-should-retry"], "false");
    let (_, param, code) = error_parts(&reply);
    assert_eq!(
        (param.as_deref(), code.as_deref()),
        (Some("Idempotency-Key"), Some("idempotency_key_reused"))
    );
}

#[tokio::test]
async fn a_concurrent_duplicate_waits_for_the_first() {
    let s = start(Options::default()).await;
    let slow = json!({"model": MODEL, "prompt": "slow", "size": "256x256", "steps": 20, "response_format": "b64_json"});
    let (first, second) = tokio::join!(send(&s, "dup", &slow), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&s, "dup", &slow).await
    });
    assert_eq!((first.0, second.0), (200, 200));
    assert_eq!(first.2, second.2);
    assert_eq!(requests_billed(&s).await, 1);
}

#[tokio::test]
async fn a_retry_after_a_dropped_connection_attaches_to_the_running_job() {
    let s = start(Options::default()).await;
    let slow = json!({"model": MODEL, "prompt": "slow", "size": "256x256", "steps": 30, "response_format": "b64_json"});
    let queue = || s.queue.as_deref().expect("the model is loaded");
    let dropped = tokio::spawn({
        let req = s.post(&slow).header("Idempotency-Key", "retry-me");
        async move { req.send().await }
    });
    let start = Instant::now();
    while queue().running() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dropped.abort(); // the client gives up; with a key, the job goes on
    let (status, _, reply) = send(&s, "retry-me", &slow).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        requests_billed(&s).await,
        1,
        "the retry did not render again"
    );
}

#[tokio::test]
async fn a_bad_key_header_is_400() {
    let s = start(Options::default()).await;
    let (status, _, reply) = send(&s, &"x".repeat(300), &body("a")).await;
    assert_eq!(status, 400);
    let (_, param, _) = error_parts(&reply);
    assert_eq!(param.as_deref(), Some("Idempotency-Key"));
}

async fn sdk_attempt(
    s: &Server,
    attempt: u32,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = s
        .post(body)
        .header("x-stainless-retry-count", attempt.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Without a key, an OpenAI SDK's retry (`x-stainless-retry-count` > 0) of the same body
/// attaches to the attempt it repeats, running or finished; a first attempt renders anew.
#[tokio::test]
async fn an_sdk_retry_without_a_key_attaches_to_the_dropped_attempt() {
    let s = start(Options::default()).await;
    let slow = json!({"model": MODEL, "prompt": "slow", "size": "256x256", "steps": 30, "response_format": "b64_json"});
    let queue = || s.queue.as_deref().expect("the model is loaded");
    let dropped = tokio::spawn({
        let req = s.post(&slow).header("x-stainless-retry-count", "0");
        async move { req.send().await }
    });
    let start = Instant::now();
    while queue().running() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dropped.abort(); // the SDK timed out and drops the connection
    let (status, retried) = sdk_attempt(&s, 1, &slow).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(
        requests_billed(&s).await,
        1,
        "the retry did not render again"
    );
    // A second retry of the same attempt gets the same answer.
    let (_, again) = sdk_attempt(&s, 2, &slow).await;
    assert_eq!(again, retried);
    assert_eq!(requests_billed(&s).await, 1);

    // A new first attempt with the same body is a new request: no seed, new images.
    let (_, fresh) = sdk_attempt(&s, 0, &slow).await;
    assert_ne!(fresh["data"][0]["b64_json"], retried["data"][0]["b64_json"]);
    assert_eq!(requests_billed(&s).await, 2);
    // Another body is never attached to.
    let (status, _) = sdk_attempt(&s, 1, &body("something else")).await;
    assert_eq!(status, 200);
    assert_eq!(requests_billed(&s).await, 3);
}
