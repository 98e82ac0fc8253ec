//! Every error row: status, OpenAI shape, the right `param` and `code`, a request id.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn bad_requests_name_their_param() {
    let s = start(Options::default()).await;
    let cases = [
        (json!({"model": MODEL}), "prompt"),
        (json!({"model": MODEL, "prompt": ""}), "prompt"),
        (
            json!({"model": MODEL, "prompt": "x".repeat(8193)}),
            "prompt",
        ),
        (json!({"model": MODEL, "prompt": 7}), "prompt"),
        (json!({"prompt": "a cat"}), "model"),
        (
            json!({"model": MODEL, "prompt": "a", "size": "250x256"}),
            "size",
        ),
        (
            json!({"model": MODEL, "prompt": "a", "size": "4096x4096"}),
            "size",
        ),
        (
            json!({"model": MODEL, "prompt": "a", "size": "wide"}),
            "size",
        ),
        (json!({"model": MODEL, "prompt": "a", "n": 0}), "n"),
        (json!({"model": MODEL, "prompt": "a", "n": 11}), "n"),
        (json!({"model": MODEL, "prompt": "a", "n": 1.5}), "n"),
        (
            json!({"model": MODEL, "prompt": "a", "quality": "ultra"}),
            "quality",
        ),
        (
            json!({"model": MODEL, "prompt": "a", "response_format": "png"}),
            "response_format",
        ),
        (
            json!({"model": MODEL, "prompt": "a", "output_format": "gif"}),
            "output_format",
        ),
        (
            json!({"model": MODEL, "prompt": "a", "negative_prompt": "blurry"}),
            "negative_prompt",
        ),
        (
            json!({"model": MODEL, "prompt": "a", "guidance_scale": 3.5}),
            "guidance_scale",
        ),
        (
            json!({"model": MODEL, "prompt": "a", "steps": 501}),
            "steps",
        ),
        (json!({"model": MODEL, "prompt": "a", "wat": 1}), "wat"),
    ];
    for (body, param) in cases {
        let (status, headers, reply) = s.generate(body.clone()).await;
        assert_eq!(status, 400, "{body} -> {reply}");
        assert!(headers.contains_key("x-request-id"));
        let (kind, got, _) = error_parts(&reply);
        assert_eq!(kind, "invalid_request_error");
        assert_eq!(got.as_deref(), Some(param), "{body} -> {reply}");
    }
    // Malformed JSON and a non-object body: 400 with no param.
    for raw in ["{\"model\": ", "[1, 2]"] {
        let r = s
            .client
            .post(format!("{}/v1/images/generations", s.url))
            .bearer_auth(&s.key)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let (_, param, _) = error_parts(&r.json().await.unwrap());
        assert_eq!(param, None);
    }
}

#[tokio::test]
async fn auth_failures_are_401_invalid_api_key() {
    let s = start(Options::default()).await;
    let url = format!("{}/v1/images/generations", s.url);
    let body = small("a cat");
    let missing = s.client.post(&url).json(&body).send().await.unwrap();
    let malformed = s
        .client
        .post(&url)
        .header("authorization", "Token abc")
        .json(&body)
        .send()
        .await
        .unwrap();
    let unknown = s
        .client
        .post(&url)
        .bearer_auth("sk-unknown")
        .json(&body)
        .send()
        .await
        .unwrap();
    for r in [missing, malformed, unknown] {
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key("x-request-id"));
        let (_, _, code) = error_parts(&r.json().await.unwrap());
        assert_eq!(code.as_deref(), Some("invalid_api_key"));
    }
    // Revocation takes effect on the next request.
    let (ok, _, _) = s.generate(small("a cat")).await;
    assert_eq!(ok, 200);
    let id = s.db.list_keys().await.unwrap()[0].id.clone();
    s.db.revoke_key(&id).await.unwrap();
    let (status, _, reply) = s.generate(small("a cat")).await;
    assert_eq!(status, 401);
    assert!(
        !reply.to_string().contains(&s.key),
        "the secret is never echoed"
    );
}

#[tokio::test]
async fn unknown_model_is_404_model_not_found() {
    let s = start(Options::default()).await;
    let (status, _, reply) = s.generate(json!({"model": "flux-9", "prompt": "a"})).await;
    assert_eq!(status, 404);
    let (_, param, code) = error_parts(&reply);
    assert_eq!(
        (param.as_deref(), code.as_deref()),
        (Some("model"), Some("model_not_found"))
    );
    // The 404 says what is served, by name and alias.
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("`tiny` (also as `dall-e-3`)"), "{message}");
    assert!(
        !message.contains("pictor.toml"),
        "no hint for an unknown name"
    );
    // A name the configuration knows, however it is spelt, gets its hint.
    for name in [
        "flux-1-schnell",
        "black-forest-labs/FLUX.1-schnell",
        "flux_1_schnell",
    ] {
        let (status, _, reply) = s.generate(json!({"model": name, "prompt": "a"})).await;
        assert_eq!(status, 404);
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(name) && message.contains("adding it to pictor.toml"),
            "{message}"
        );
    }
    let r = s
        .client
        .get(format!("{}/v1/models/flux-9", s.url))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn oversized_body_is_413_and_wrong_type_is_415() {
    let s = start(Options::default()).await;
    let big = json!({"model": MODEL, "prompt": "x".repeat(100_000)});
    let r = s.post(&big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    error_parts(&r.json().await.unwrap());
    let r = s
        .client
        .post(format!("{}/v1/images/generations", s.url))
        .bearer_auth(&s.key)
        .header("content-type", "text/plain")
        .body(small("a").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    error_parts(&r.json().await.unwrap());
}

#[tokio::test]
async fn unknown_route_is_404_in_openai_shape() {
    let s = start(Options::default()).await;
    let r = s
        .client
        .get(format!("{}/v1/nothing", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("x-request-id"));
    error_parts(&r.json().await.unwrap());
}

#[tokio::test]
async fn a_model_still_loading_is_503_and_not_ready() {
    let s = start(Options {
        load_model: false,
        ..Options::default()
    })
    .await;
    let (status, headers, reply) = s.generate(small("a")).await;
    assert_eq!(status, 503, "{reply}");
    assert!(headers.contains_key("retry-after"));
    error_parts(&reply);
    let r = s
        .client
        .get(format!("{}/readyz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = s
        .client
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn per_key_rate_limits_answer_429_with_openai_headers() {
    let s = start(Options::default()).await;
    let key = s.db.list_keys().await.unwrap().remove(0);
    let limits = pictor_store::KeyLimits {
        requests_per_minute: Some(2),
        images_per_minute: Some(3),
    };
    s.db.set_limits(&key.id, limits).await.unwrap();
    let body = |n: u32| json!({"model": MODEL, "prompt": "x", "size": "32x32", "steps": 1, "n": n});

    let (status, headers, reply) = s.generate(body(2)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "1");
    assert_eq!(headers["x-ratelimit-limit-images"], "3");
    assert_eq!(headers["x-ratelimit-remaining-images"], "1");
    assert!(headers.contains_key("x-ratelimit-reset-requests"));

    // Two more images do not fit the images-per-minute budget.
    let (status, headers, reply) = s.generate(body(2)).await;
    assert_eq!(status, 429, "{reply}");
    let (kind, _, code) = error_parts(&reply);
    assert_eq!(
        (kind.as_str(), code.as_deref()),
        ("images", Some("rate_limit_exceeded"))
    );
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(headers.contains_key("retry-after-ms"));
    assert_eq!(
        headers["x-ratelimit-remaining-requests"], "1",
        "a refusal costs nothing"
    );

    // One image still fits; then the requests budget is spent.
    let (status, _, _) = s.generate(body(1)).await;
    assert_eq!(status, 200);
    let (status, headers, reply) = s.generate(body(1)).await;
    assert_eq!(status, 429);
    assert_eq!(error_parts(&reply).0, "requests");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");

    // More images than a minute allows can never succeed: 400, not 429.
    let (status, _, reply) = s.generate(body(4)).await;
    assert_eq!(status, 400);
    assert_eq!(error_parts(&reply).1.as_deref(), Some("n"));
}
