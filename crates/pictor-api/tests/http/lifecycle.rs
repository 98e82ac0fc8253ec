//! Backpressure, cancellation on disconnect, graceful shutdown, metrics.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

/// A request that keeps the tiny model busy for many seconds (200 steps at 512²) unless
/// it is cancelled.
fn slow() -> serde_json::Value {
    json!({"model": MODEL, "prompt": "slow", "size": "512x512", "steps": 200, "seed": 1})
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn full_queue_is_429_with_retry_after_and_disconnects_cancel_the_work() {
    let s = start(Options {
        queue_depth: 1,
        ..Options::default()
    })
    .await;
    let queue = || s.queue.as_deref().expect("the model is loaded");
    let a = tokio::spawn(s.post(&slow()).send());
    until("the first job to run", || queue().running() == 1).await;
    let b = tokio::spawn(s.post(&slow()).send());
    until("the second job to wait", || queue().waiting() == 1).await;

    let (status, headers, reply) = s.generate(small("one too many")).await;
    assert_eq!(status, 429, "{reply}");
    let secs: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs));
    assert!(headers.contains_key("retry-after-ms"));
    let (kind, _, code) = error_parts(&reply);
    assert_eq!(
        (kind.as_str(), code.as_deref()),
        ("rate_limit_error", Some("queue_full"))
    );

    // Both clients go away: the running job stops within a step, the waiting one is
    // skipped, and the model serves the next request.
    let gone = Instant::now();
    a.abort();
    b.abort();
    until("the worker to be free", || {
        queue().running() == 0 && queue().waiting() == 0
    })
    .await;
    let freed = gone.elapsed();
    // Uncancelled, the two jobs would take well over 20 s here; one step takes ~0.1 s.
    assert!(
        freed < Duration::from_secs(8),
        "cancellation took {freed:?}"
    );
    let (status, _, _) = s.generate(small("next")).await;
    assert_eq!(status, 200);
    let usage = s.db.usage().await.unwrap();
    assert_eq!(usage[0].requests, 1, "cancelled jobs are not billed");
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_and_refuses_new() {
    let mut s = start(Options::default()).await;
    let queue = || s.queue.as_deref().expect("the model is loaded");
    let in_flight = tokio::spawn(
        s.post(
            &json!({"model": MODEL, "prompt": "last", "size": "256x256", "steps": 8, "seed": 2}),
        )
        .send(),
    );
    until("the job to run", || queue().running() == 1).await;
    let handle = s.stop();
    // New work is refused: either the listener is closed or the server says 503.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Ok(r) = s.post(&small("late")).send().await {
        assert_eq!(r.status(), 503);
    }
    let r = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(r.status(), 200);
    assert!(r.json::<serde_json::Value>().await.unwrap()["data"][0]["url"].is_string());
    assert!(
        handle.await.unwrap().unwrap(),
        "drained within the grace period"
    );
}

#[tokio::test]
async fn metrics_count_requests_and_show_queue_depth() {
    let s = start(Options::default()).await;
    let (status, _, _) = s.generate(small("a")).await;
    assert_eq!(status, 200);
    let text = s
        .client
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("pictor_requests_total{"), "{text}");
    assert!(text.contains("path=\"/v1/images/generations\""), "{text}");
    assert!(
        text.contains("pictor_queue_depth{model=\"tiny\"}"),
        "{text}"
    );
    assert!(text.contains("pictor_generation_seconds_bucket"), "{text}");
    assert!(text.contains("pictor_images_generated_total"), "{text}");
}

#[tokio::test]
async fn a_job_past_the_deadline_is_504_not_408() {
    let s = start(Options {
        timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let (status, _, reply) = s.generate(slow()).await;
    assert_eq!(status, 504, "{reply}");
    let (kind, _, code) = error_parts(&reply);
    assert_eq!(
        (kind.as_str(), code.as_deref()),
        ("server_error", Some("timeout"))
    );
}

#[tokio::test]
async fn a_storage_failure_is_500_without_internals_and_the_server_keeps_serving() {
    let s = start(Options::default()).await;
    // Replace the image directory with a file: storing a `url` image now fails.
    let images = s.dir.path().join("images");
    std::fs::remove_dir_all(&images).unwrap();
    std::fs::write(&images, b"not a directory").unwrap();
    let (status, _, reply) = s.generate(small("a")).await;
    assert_eq!(status, 500, "{reply}");
    let (kind, _, _) = error_parts(&reply);
    assert_eq!(kind, "server_error");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("images") && !message.contains('/'),
        "leaks internals: {message}"
    );
    // b64_json needs no storage and still works.
    let mut body = small("a");
    body["response_format"] = json!("b64_json");
    let (status, _, _) = s.generate(body).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn openapi_document_is_served() {
    let s = start(Options {
        load_model: false,
        max_n: 4,
        ..Options::default()
    })
    .await;
    let doc: serde_json::Value = s
        .client
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/v1/images/generations"]["post"].is_object());
    assert!(doc["components"]["schemas"]["ErrorResponse"].is_object());
    // It states this server's own limits, not the defaults.
    let request = &doc["components"]["schemas"]["CreateImageRequest"]["properties"];
    assert_eq!(request["n"]["maximum"], 4);
    assert_eq!(request["prompt"]["maxLength"], 8192);
}
