//! `stream: true`: OpenAI's server-sent events, previews, errors mid-stream, cancel on close.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::*;

/// `(event name, data)` of every event in an SSE body (keep-alive comments skipped).
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            let data = serde_json::from_str(&data).ok()?;
            Some((name.expect("every event is named"), data))
        })
        .collect()
}

async fn stream(s: &Server, body: &Value) -> (u16, String, Vec<(String, Value)>) {
    let r = s.post(body).send().await.unwrap();
    let status = r.status().as_u16();
    let content_type = r.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    let text = r.text().await.unwrap();
    (status, content_type, events(&text))
}

fn pixels(b64: &Value) -> image::RgbImage {
    decode(
        &base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("b64_json"))
            .unwrap(),
    )
}

#[tokio::test]
async fn partial_images_then_completed_and_the_final_image_equals_the_plain_one() {
    let s = start(Options::default()).await;
    let mut body = json!({"model": MODEL, "prompt": "a red circle", "size": "64x48",
        "seed": 21, "steps": 4, "stream": true, "partial_images": 2});
    let (status, content_type, evs) = stream(&s, &body).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    for (k, (name, data)) in evs.iter().enumerate() {
        assert_eq!(data["type"], json!(name), "type repeats the event name");
        assert_eq!(data["background"], "opaque");
        assert_eq!(data["output_format"], "png");
        assert_eq!(data["size"], "64x48");
        assert_eq!(data["quality"], "high");
        assert!(data["created_at"].as_i64().unwrap() > 1_700_000_000);
        assert_eq!(data["image_index"], 0);
        if k < 2 {
            assert_eq!(data["partial_image_index"], k);
            assert_eq!(data["step"], [1, 3][k], "spread over the 4 steps");
        }
    }
    let done = &evs[2].1;
    assert_eq!(done["seed"], 21);
    assert!(done["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(done["usage"]["output_tokens"], 4 * 3);
    assert!(done.get("url").is_none());
    let previews: Vec<_> = evs[..2]
        .iter()
        .map(|(_, d)| pixels(&d["b64_json"]))
        .collect();
    let streamed = pixels(&done["b64_json"]);
    assert_eq!(previews[0].dimensions(), (64, 48));
    assert_ne!(previews[0], previews[1], "previews follow the denoising");

    body["stream"] = json!(false);
    body["response_format"] = json!("b64_json");
    let (status, _, plain) = s.generate(body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(
        streamed,
        pixels(&plain["data"][0]["b64_json"]),
        "streaming does not change the image"
    );
}

#[tokio::test]
async fn n_images_each_get_previews_and_a_completed_event_whose_usage_adds_up() {
    let s = start(Options::default()).await;
    let body = json!({"model": MODEL, "prompt": "two", "size": "32x32", "seed": 4,
        "steps": 2, "n": 2, "stream": true, "partial_images": 3});
    let (status, _, evs) = stream(&s, &body).await;
    assert_eq!(status, 200);
    // 2 steps leave room for one preview per image.
    let partial: Vec<_> = evs
        .iter()
        .filter(|(n, _)| n == "image_generation.partial_image")
        .map(|(_, d)| {
            (
                d["image_index"].as_u64().unwrap(),
                d["step"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(partial, [(0, 1), (1, 1)]);
    let done: Vec<_> = evs
        .iter()
        .filter(|(n, _)| n == "image_generation.completed")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(done.len(), 2);
    assert_eq!(
        (
            done[0]["image_index"].clone(),
            done[1]["image_index"].clone()
        ),
        (json!(0), json!(1))
    );
    assert_eq!(
        (done[0]["seed"].clone(), done[1]["seed"].clone()),
        (json!(4), json!(5))
    );
    assert_eq!(
        done[1]["usage"]["input_tokens"], 0,
        "the prompt is counted once"
    );
    let total: u64 = done
        .iter()
        .map(|d| d["usage"]["total_tokens"].as_u64().unwrap())
        .sum();
    let input = done[0]["usage"]["input_tokens"].as_u64().unwrap();
    assert_eq!(total, input + 2 * 2 * 2);
}

#[tokio::test]
async fn a_failure_after_the_stream_began_is_an_error_event() {
    let s = start(Options {
        timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let body = json!({"model": MODEL, "prompt": "slow", "size": "512x512", "steps": 200,
        "stream": true});
    let (status, _, evs) = stream(&s, &body).await;
    assert_eq!(status, 200, "the stream had begun");
    let (name, data) = evs.last().expect("an event");
    assert_eq!(name, "error");
    assert_eq!(data["type"], "error");
    let (kind, _, code) = error_parts(data);
    assert_eq!(
        (kind.as_str(), code.as_deref()),
        ("server_error", Some("timeout"))
    );
}

#[tokio::test]
async fn closing_the_stream_cancels_the_job() {
    let s = start(Options::default()).await;
    let queue = || s.queue.as_deref().expect("the model is loaded");
    let body = json!({"model": MODEL, "prompt": "slow", "size": "512x512", "steps": 200,
        "stream": true, "partial_images": 1});
    let response = s.post(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let start = Instant::now();
    while queue().running() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gone = Instant::now();
    drop(response);
    while queue().running() != 0 {
        assert!(gone.elapsed() < Duration::from_secs(30), "never cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Uncancelled, 200 steps at 512² take well over 20 s; a step takes ~0.1 s and the
    // server notices a closed stream at its next keep-alive (1 s).
    let took = gone.elapsed();
    eprintln!("stream closed → job cancelled in {took:?}");
    assert!(took < Duration::from_secs(5), "cancellation took {took:?}");
    let usage = s.db.usage().await.unwrap();
    assert!(
        usage.iter().all(|u| u.requests == 0),
        "a cancelled stream is not billed: {usage:?}"
    );
}

#[tokio::test]
async fn a_stream_cannot_take_an_idempotency_key() {
    let s = start(Options::default()).await;
    let r = s
        .post(&json!({"model": MODEL, "prompt": "x", "size": "32x32", "stream": true}))
        .header("Idempotency-Key", "k1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(error_parts(&body).1.as_deref(), Some("Idempotency-Key"));
}

/// `stream_progress: true` adds `pictor.progress` events: the place in the queue while the
/// job waits behind others, then every step; streams without it carry none.
#[tokio::test]
async fn progress_events_tell_the_queue_then_every_step() {
    let s = start(Options::default()).await;
    let queue = || s.queue.as_deref().expect("the model is loaded");
    // One long job runs, one short one waits: the streamed job is second in line.
    let long = s.post(&json!({"model": MODEL, "prompt": "long", "size": "512x512", "steps": 25}));
    let long = tokio::spawn(long.send());
    let start = Instant::now();
    while queue().running() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiting = tokio::spawn(s.post(&small("waits")).send());
    while queue().waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let body = json!({"model": MODEL, "prompt": "watched", "size": "64x48", "seed": 3, "steps": 3,
        "stream": true, "stream_progress": true});
    let (status, _, events) = stream(&s, &body).await;
    assert_eq!(status, 200);
    let progress: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "pictor.progress")
        .map(|(_, d)| d)
        .collect();
    assert!(progress.iter().all(|p| p["type"] == "pictor.progress"));
    let places: Vec<u64> = progress
        .iter()
        .filter_map(|p| p["queue_position"].as_u64())
        .collect();
    assert_eq!(places.first(), Some(&1), "one job was ahead: {progress:?}");
    let steps: Vec<(u64, u64)> = progress
        .iter()
        .filter(|p| p["queue_position"].is_null())
        .map(|p| (p["step"].as_u64().unwrap(), p["total"].as_u64().unwrap()))
        .collect();
    assert_eq!(steps.last(), Some(&(3, 3)), "{progress:?}");
    assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "{steps:?}");
    assert!(
        events
            .iter()
            .any(|(n, _)| n == "image_generation.completed")
    );
    assert_eq!(long.await.unwrap().unwrap().status(), 200);
    assert_eq!(waiting.await.unwrap().unwrap().status(), 200);
    // Without the extension, none.
    let plain =
        json!({"model": MODEL, "prompt": "plain", "size": "64x48", "steps": 2, "stream": true});
    let (_, _, events) = stream(&s, &plain).await;
    assert!(events.iter().all(|(n, _)| n != "pictor.progress"));
}
