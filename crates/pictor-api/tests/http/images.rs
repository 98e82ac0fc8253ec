//! Successful generations: both response formats, encodings, links, usage, models.

use base64::Engine as _;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn b64_json_is_raw_base64_of_a_png_of_the_asked_size() {
    let s = start(Options::default()).await;
    let mut body = small("a small red circle");
    body["response_format"] = json!("b64_json");
    body["n"] = json!(2);
    let (status, headers, reply) = s.generate(body.clone()).await;
    assert_eq!(status, 200, "{reply}");
    assert!(headers.contains_key("x-request-id"));
    let data = reply["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let b64 = data[0]["b64_json"].as_str().unwrap();
    assert!(!b64.starts_with("data:"));
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    assert_eq!(decode(&png).dimensions(), (64, 48));
    assert_eq!(data[0]["revised_prompt"], "a small red circle");
    assert_eq!(
        (reply["size"].as_str(), reply["output_format"].as_str()),
        (Some("64x48"), Some("png"))
    );
    assert!(reply["created"].as_i64().unwrap() > 1_700_000_000);
    assert_ne!(
        data[0]["b64_json"], data[1]["b64_json"],
        "seed and seed+1 differ"
    );

    // The same seed gives the same image.
    let (_, _, again) = s.generate(body).await;
    assert_eq!(again["data"][0]["b64_json"], reply["data"][0]["b64_json"]);

    // Usage was recorded against the key.
    let usage = s.db.usage().await.unwrap();
    assert_eq!(
        (usage[0].requests, usage[0].images, usage[0].pixels),
        (2, 4, 4 * 64 * 48)
    );
}

#[tokio::test]
async fn url_links_serve_the_image_and_refuse_tampering() {
    let s = start(Options::default()).await;
    let (status, _, reply) = s.generate(small("a blue square")).await;
    assert_eq!(status, 200, "{reply}");
    let url = reply["data"][0]["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&s.url));
    // No bearer key needed: the link itself is the credential.
    let r = s.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(decode(&r.bytes().await.unwrap()).dimensions(), (64, 48));

    let tampered = [
        url.replace("signature=", "signature=00"),
        url.replace(".png?", ".jpg?"),
        {
            let (base, _) = url.split_once("expires=").unwrap();
            let rest = url.split_once("&signature=").unwrap().1;
            format!("{base}expires=99999999999&signature={rest}")
        },
        url.split_once('?').unwrap().0.to_string(),
    ];
    for t in tampered {
        let r = s.client.get(&t).send().await.unwrap();
        assert_eq!(r.status(), 404, "{t}");
        error_parts(&r.json().await.unwrap());
    }
}

#[tokio::test]
async fn expired_links_are_404_and_swept_from_disk() {
    let s = start(Options {
        ttl: std::time::Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    let (_, _, reply) = s.generate(small("a")).await;
    let url = reply["data"][0]["url"].as_str().unwrap().to_string();
    let name = url
        .split("/files/")
        .nth(1)
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let file = s.dir.path().join("images").join(&name);
    assert!(file.is_file());
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let r = s.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(pictor_api::sweep_now(&s.state).await.unwrap(), 1);
    assert!(!file.exists(), "the sweeper deleted the file");
}

#[tokio::test]
async fn jpeg_and_webp_outputs_carry_the_receipt() {
    let s = start(Options::default()).await;
    for (format, magic, mime) in [
        ("jpeg", &b"\xff\xd8"[..], "image/jpeg"),
        ("webp", &b"RIFF"[..], "image/webp"),
    ] {
        let mut body = small("a");
        body["output_format"] = json!(format);
        body["output_compression"] = json!(80);
        let (status, _, reply) = s.generate(body).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["output_format"], format);
        let r = s
            .client
            .get(reply["data"][0]["url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["content-type"], mime);
        let bytes = r.bytes().await.unwrap();
        assert!(bytes.starts_with(magic));
        assert_eq!(decode(&bytes).dimensions(), (64, 48));
        let receipt = pictor_image::Receipt::from_image(&bytes).expect("EXIF receipt");
        assert_eq!(
            (
                receipt.prompt.as_str(),
                receipt.seed,
                receipt.steps,
                receipt.width
            ),
            ("a", 1, 2, 64)
        );
    }
}

#[tokio::test]
async fn models_list_names_and_aliases_and_an_alias_generates() {
    let s = start(Options::default()).await;
    let r = s.get_json("/v1/models").await;
    assert_eq!(r["object"], "list");
    let ids: Vec<&str> = r["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL, "dall-e-3"]);
    let mut body = small("a");
    body["model"] = json!("dall-e-3");
    let (status, _, _) = s.generate(body).await;
    assert_eq!(status, 200);
}

/// A FLUX.1-dev model (its tiny fixture): `/v1/models` names the family and its guidance,
/// a request's `guidance_scale` runs and comes back in the answer and the receipt, its
/// absence takes the model's 3.5, and a scale out of range is refused naming the field.
#[tokio::test]
async fn a_dev_model_takes_guidance_and_reports_it() {
    let s = start(Options {
        fixture: "tiny-flux-dev",
        ..Options::default()
    })
    .await;
    let models = s.get_json(&format!("/v1/models/{MODEL}")).await;
    let rules = &models["rules"];
    assert_eq!(rules["family"], "FLUX.1-dev", "{models}");
    assert_eq!(rules["guidance"], true);
    assert_eq!(rules["default_guidance"], 3.5);
    assert_eq!(rules["default_steps"], 28);

    let mut body = small("a red circle");
    body["guidance_scale"] = json!(2.0);
    body["response_format"] = json!("b64_json");
    let (status, _, guided) = s.generate(body.clone()).await;
    assert_eq!(status, 200, "{guided}");
    let image = &guided["data"][0];
    assert_eq!(image["guidance"], 2.0);
    let png = image_of(&guided, 0);
    let receipt = pictor_image::Receipt::from_image(&png).unwrap();
    assert_eq!(receipt.guidance, Some(2.0));

    body.as_object_mut().unwrap().remove("guidance_scale");
    let (status, _, default) = s.generate(body.clone()).await;
    assert_eq!(status, 200, "{default}");
    assert_eq!(default["data"][0]["guidance"], 3.5);
    assert_ne!(default["data"][0]["b64_json"], image["b64_json"]);

    for bad in [-1.0, 30.5] {
        body["guidance_scale"] = json!(bad);
        let (status, _, reply) = s.generate(body.clone()).await;
        assert_eq!(status, 400, "{bad}: {reply}");
        assert_eq!(reply["error"]["param"], "guidance_scale", "{reply}");
    }
}

/// A Z-Image-Turbo model (its tiny fixture) behind the same API: its family and rules in
/// `/v1/models`, an image of the asked size with its receipt, and a guidance scale refused
/// as for any model without one.
#[tokio::test]
async fn a_z_image_model_serves_the_same_api() {
    let s = start(Options {
        fixture: "tiny-z-image-turbo",
        ..Options::default()
    })
    .await;
    let models = s.get_json(&format!("/v1/models/{MODEL}")).await;
    assert_eq!(models["rules"]["family"], "Z-Image-Turbo", "{models}");
    assert_eq!(models["rules"]["default_steps"], 8);
    let mut body = small("a green star");
    body["response_format"] = json!("b64_json");
    let (status, _, reply) = s.generate(body.clone()).await;
    assert_eq!(status, 200, "{reply}");
    let png = image_of(&reply, 0);
    let image = image::load_from_memory(&png).unwrap();
    assert_eq!((image.width(), image.height()), (64, 48));
    let receipt = pictor_image::Receipt::from_image(&png).unwrap();
    assert_eq!((receipt.steps, receipt.seed), (2, 1));
    body["guidance_scale"] = json!(2.0);
    let (status, _, reply) = s.generate(body).await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["param"], "guidance_scale");
}

#[tokio::test]
async fn an_open_loopback_server_needs_no_key_until_one_exists() {
    let s = start(Options {
        open: true,
        ..Options::default()
    })
    .await;
    let url = format!("{}/v1/images/generations", s.url);
    let r = s.client.post(&url).json(&small("a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The SDKs always send a bearer, and the README's examples say `Bearer $PICTOR_KEY`:
    // with no key created, whatever it holds is let in.
    for bearer in ["YOUR_API_KEY", "sk-anything", ""] {
        let r = s
            .client
            .post(&url)
            .bearer_auth(bearer)
            .json(&small("a"))
            .send();
        assert_eq!(r.await.unwrap().status(), 200, "{bearer:?}");
    }
    let key = s.db.create_key("first").await.unwrap().secret;
    let r = s.client.post(&url).json(&small("a")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .post(&url)
        .bearer_auth("YOUR_API_KEY")
        .json(&small("a"))
        .send();
    assert_eq!(
        r.await.unwrap().status(),
        401,
        "once a key exists, keys count"
    );
    let r = s
        .client
        .post(&url)
        .bearer_auth(&key)
        .json(&small("a"))
        .send();
    assert_eq!(r.await.unwrap().status(), 200);
}

/// Each image carries its receipt: extension fields in the JSON and a `parameters` text
/// chunk in the PNG, from which the same image can be asked for again.
#[tokio::test]
async fn every_image_carries_its_receipt() {
    let s = start(Options::default()).await;
    s.state.set_hash(MODEL, "0123abcdef".into());
    let mut body = small("a green star");
    body["response_format"] = json!("b64_json");
    body["n"] = json!(2);
    let (status, _, reply) = s.generate(body).await;
    assert_eq!(status, 200, "{reply}");
    // Usage: output tokens are image tokens, one per 16x16 pixels of each image.
    let usage = &reply["usage"];
    assert_eq!(usage["output_tokens"], 2 * (64 / 16) * (48 / 16));
    assert_eq!(
        usage["output_tokens_details"]["image_tokens"],
        usage["output_tokens"]
    );
    let input = usage["input_tokens"].as_u64().unwrap();
    assert!(input >= 4, "the prompt's T5 tokens, EOS included: {input}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), input + 24);
    for (i, item) in reply["data"].as_array().unwrap().iter().enumerate() {
        assert!(item["timings"]["generation_seconds"].as_f64().unwrap() > 0.0);
        assert!(item["timings"]["queue_seconds"].as_f64().unwrap() >= 0.0);
        assert_eq!(item["seed"], 1 + i as u64);
        assert_eq!(
            (
                item["steps"].as_u64(),
                item["width"].as_u64(),
                item["height"].as_u64()
            ),
            (Some(2), Some(64), Some(48))
        );
        assert_eq!(item["model"], MODEL);
        assert_eq!(item["model_hash"], "0123abcdef");
        assert_eq!(
            item["device"], "cpu f32",
            "where it was drawn, in which dtype"
        );
        assert_eq!(item["prompt_truncated"], false);
        let png_bytes = base64::engine::general_purpose::STANDARD
            .decode(item["b64_json"].as_str().unwrap())
            .unwrap();
        let reader = png::Decoder::new(std::io::Cursor::new(png_bytes))
            .read_info()
            .unwrap();
        let text = reader
            .info()
            .uncompressed_latin1_text
            .iter()
            .find(|c| c.keyword == "parameters")
            .expect("a parameters chunk")
            .text
            .clone();
        assert!(text.starts_with("a green star\n"), "{text}");
        assert!(
            text.contains("Model hash: 0123abcdef")
                && text.contains("Device: cpu f32")
                && text.contains(&format!("Seed: {}", 1 + i))
                && text.contains("Steps: 2")
                && text.contains("Size: 64x48"),
            "{text}"
        );
    }

    // Image 1 asked for alone, by its own seed: the same pixels.
    let mut again = small("a green star");
    again["response_format"] = json!("b64_json");
    again["seed"] = json!(2);
    let (_, _, single) = s.generate(again).await;
    let pixels = |v: &serde_json::Value| {
        decode(
            &base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap(),
        )
    };
    let a = pixels(&reply["data"][1]["b64_json"]);
    let b = pixels(&single["data"][0]["b64_json"]);
    let worst = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(worst <= 1, "differs by {worst}");
}

#[tokio::test]
async fn a_truncated_prompt_says_so() {
    let s = start(Options::default()).await;
    let long = "a small red circle on a blue background in the top left, ".repeat(40);
    let (status, _, reply) = s.generate(small(&long)).await;
    assert_eq!(status, 200, "{reply}");
    let item = &reply["data"][0];
    assert_eq!(item["prompt_truncated"], true);
    let revised = item["revised_prompt"].as_str().unwrap();
    assert!(revised.len() < long.len() && long.starts_with(revised));
}
