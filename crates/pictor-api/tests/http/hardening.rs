//! What an outsider can do to the port: slow and idle connections, too many of them,
//! odd methods, odd links, seeds and prompts a client cannot carry, a shutdown mid-job.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::common::*;

fn quick(max_connections: usize) -> pictor_api::Connections {
    pictor_api::Connections {
        header_timeout: Duration::from_millis(800),
        body_timeout: Duration::from_millis(800),
        max_connections,
    }
}

async fn raw(url: &str, send: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(send).await.unwrap();
    stream
}

/// Everything the server sends until it closes the connection, and how long that took;
/// panics if it is still open after `within`.
async fn until_closed(mut stream: TcpStream, within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "still open after {within:?}");
    (String::from_utf8_lossy(&got).to_string(), started.elapsed())
}

#[tokio::test]
async fn slow_and_idle_connections_are_closed_while_others_are_served() {
    let s = start(Options {
        load_model: false,
        connections: quick(64),
        ..Options::default()
    })
    .await;
    let mut silent = Vec::new();
    let mut half_line = Vec::new();
    let mut no_body = Vec::new();
    let mut idle = Vec::new();
    for _ in 0..5 {
        silent.push(raw(&s.url, b"").await);
        half_line.push(raw(&s.url, b"GET /heal").await);
        no_body.push(
            raw(
                &s.url,
                b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"mo",
            )
            .await,
        );
        idle.push(raw(&s.url, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await);
    }
    // Meanwhile the server answers as usual.
    let r = s
        .client
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let within = Duration::from_secs(4);
    for stream in silent.into_iter().chain(half_line) {
        let (_, took) = until_closed(stream, within).await;
        assert!(took < within);
    }
    for stream in no_body {
        let (reply, _) = until_closed(stream, within).await;
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        assert!(reply.contains("\"code\":\"request_timeout\""), "{reply}");
    }
    for stream in idle {
        let (reply, _) = until_closed(stream, within).await;
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "answered, then closed: {reply}"
        );
    }
}

#[tokio::test]
async fn past_the_connection_cap_a_client_is_answered_503_at_once() {
    let s = start(Options {
        load_model: false,
        connections: quick(4),
        ..Options::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(raw(&s.url, b"").await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = s
        .client
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(error_parts(&body).2.as_deref(), Some("unavailable"));
    assert!(started.elapsed() < Duration::from_millis(500));
    // The held connections time out, and the slots are free again.
    for stream in held {
        until_closed(stream, Duration::from_secs(4)).await;
    }
    let r = s
        .client
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn metrics_labels_stay_bounded_and_can_require_a_key() {
    let s = start(Options {
        load_model: false,
        metrics_require_key: true,
        ..Options::default()
    })
    .await;
    for i in 0..20 {
        let method =
            reqwest::Method::from_bytes(format!("X{i}{}", "Y".repeat(200)).as_bytes()).unwrap();
        let r = s.client.request(method, &s.url).send().await.unwrap();
        assert!(r.status().is_client_error());
    }
    let metrics = |key: Option<&str>| {
        let mut req = s.client.get(format!("{}/metrics", s.url));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    let refused = metrics(None).await.unwrap();
    assert_eq!(refused.status(), 401);
    let text = metrics(Some(&s.key)).await.unwrap().text().await.unwrap();
    assert!(text.contains("method=\"other\""), "{text}");
    assert!(!text.contains("YYYY"), "a client's method became a label");
}

#[tokio::test]
async fn wrong_methods_and_malformed_links_are_openai_errors() {
    let s = start(Options {
        load_model: false,
        ..Options::default()
    })
    .await;
    let r = s
        .client
        .put(format!("{}/v1/images/generations", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().contains_key("allow"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(error_parts(&body).2.as_deref(), Some("method_not_allowed"));

    let r = s
        .client
        .get(format!(
            "{}/v1/images/files/x.png?expires=soon&signature=x",
            s.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(error_parts(&body).1.as_deref(), Some("expires"));
}

#[tokio::test]
async fn seeds_a_json_number_cannot_carry_and_control_characters_are_refused() {
    let s = start(Options::default()).await;
    for (body, param) in [
        (
            json!({"model": MODEL, "prompt": "a", "seed": 9_007_199_254_740_992u64}),
            "seed",
        ),
        (
            json!({"model": MODEL, "prompt": "a", "seed": 9_007_199_254_740_991u64, "n": 2}),
            "seed",
        ),
        (json!({"model": MODEL, "prompt": "a\u{0}b"}), "prompt"),
    ] {
        let (status, _, reply) = s.generate(body).await;
        assert_eq!(status, 400, "{reply}");
        assert_eq!(error_parts(&reply).1.as_deref(), Some(param), "{reply}");
    }
    // The largest seed that fits is taken, and a drawn seed is one every client carries.
    let mut body = small("edge");
    body["seed"] = json!(9_007_199_254_740_991u64);
    let (status, _, reply) = s.generate(body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["data"][0]["seed"], json!(9_007_199_254_740_991u64));
    let mut body = small("drawn");
    body.as_object_mut().unwrap().remove("seed");
    let (status, _, reply) = s.generate(body).await;
    assert_eq!(status, 200, "{reply}");
    let seed = reply["data"][0]["seed"].as_u64().unwrap();
    assert!(seed <= u64::from(u32::MAX), "{seed}");
}

/// During the drain the listener stays open: new work gets 503 with `Retry-After`; a job
/// still running when the grace period ends is answered 503, not cut off.
#[tokio::test]
async fn the_drain_answers_new_requests_and_cut_off_ones_with_503() {
    let mut s = start(Options {
        grace: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    let queue = || s.queue.as_deref().expect("the model is loaded");
    let slow =
        json!({"model": MODEL, "prompt": "slow", "size": "512x512", "steps": 300, "seed": 1});
    let running = tokio::spawn(s.post(&slow).send());
    let start = Instant::now();
    while queue().running() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handle = s.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let late = s
        .post(&small("late"))
        .send()
        .await
        .expect("the listener is open");
    assert_eq!(late.status(), 503);
    assert!(late.headers().contains_key("retry-after"));
    let r = running
        .await
        .unwrap()
        .expect("a reply, not a dropped connection");
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(error_parts(&body).2.as_deref(), Some("unavailable"));
    assert!(!handle.await.unwrap().unwrap(), "the grace period ran out");
}
