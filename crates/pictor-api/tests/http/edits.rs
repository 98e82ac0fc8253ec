//! `/v1/images/edits` and `/v1/images/variations` over real multipart bodies: the answer and
//! its receipt, the inputs really used, streaming, idempotency, and every bad upload refused
//! with its `param` while the server keeps serving.

use std::io::Cursor;

use reqwest::multipart::{Form, Part};
use serde_json::Value;
use sha2::Digest as _;

use crate::common::*;

/// A PNG of `w`×`h` whose pixel (x, y) is `f(x, y)` (RGBA when `alpha`).
fn png(w: u32, h: u32, alpha: bool, f: impl Fn(u32, u32) -> [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    let image = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba(f(x, y)));
    let image = if alpha {
        image::DynamicImage::ImageRgba8(image)
    } else {
        image::DynamicImage::ImageRgb8(image::DynamicImage::ImageRgba8(image).to_rgb8())
    };
    image
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A red disc on white.
fn disc(w: u32, h: u32) -> Vec<u8> {
    png(w, h, false, |x, y| {
        let (dx, dy) = (x as f32 - w as f32 / 2.0, y as f32 - h as f32 / 2.0);
        if dx * dx + dy * dy < (h as f32 / 3.0).powi(2) {
            [220, 20, 20, 255]
        } else {
            [255, 255, 255, 255]
        }
    })
}

/// OpenAI's mask: transparent (repaint) on the left half.
fn left_half_mask(w: u32, h: u32) -> Vec<u8> {
    png(w, h, true, |x, _| {
        [0, 0, 0, if x < w / 2 { 0 } else { 255 }]
    })
}

/// A PNG header declaring `w`×`h` pixels and no pixel data.
fn bomb(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(png::ColorType::Rgb);
        e.set_depth(png::BitDepth::Eight);
        let _header_only = e.write_header().unwrap();
    }
    out
}

fn file(bytes: Vec<u8>) -> Part {
    Part::bytes(bytes)
        .file_name("image.png")
        .mime_str("image/png")
        .unwrap()
}

fn edit_form(image: Vec<u8>) -> Form {
    Form::new()
        .text("model", MODEL)
        .text("prompt", "a blue disc")
        .text("size", "64x48")
        .text("seed", "5")
        .text("steps", "4")
        .text("response_format", "b64_json")
        .part("image", file(image))
}

async fn send(s: &Server, route: &str, form: Form) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = s
        .client
        .post(format!("{}/v1/images/{route}", s.url))
        .bearer_auth(&s.key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_edit_uses_its_image_and_mask_and_records_them() {
    let s = start(Options::default()).await;
    let input = disc(64, 48);
    let (status, _, masked) = send(
        &s,
        "edits",
        edit_form(input.clone()).part("mask", file(left_half_mask(64, 48))),
    )
    .await;
    assert_eq!(status, 200, "{masked}");
    let d = &masked["data"][0];
    assert_eq!(d["strength"], 1.0, "a masked edit repaints from noise");
    let sha = hex::encode(sha2::Sha256::digest(&input));
    assert_eq!(d["input_image_sha256"], sha.as_str());
    assert_eq!(
        (d["seed"].as_u64(), d["steps"].as_u64()),
        (Some(5), Some(4))
    );
    // One input token per 16×16 cell of the input, as for the output.
    let usage = &masked["usage"];
    assert_eq!(usage["input_tokens_details"]["image_tokens"], 12);
    assert_eq!(usage["output_tokens"], 12);
    let bytes = image_of(&masked, 0);
    assert_eq!(decode(&bytes).dimensions(), (64, 48));
    let receipt = pictor_image::Receipt::from_image(&bytes).unwrap();
    assert_eq!(
        (receipt.strength, receipt.input_sha256.as_deref()),
        (Some(1.0), Some(sha.as_str()))
    );

    // The same request draws the same image; another image, no mask or another strength
    // draws another: each input is really used.
    let (_, _, again) = send(
        &s,
        "edits",
        edit_form(input.clone()).part("mask", file(left_half_mask(64, 48))),
    )
    .await;
    assert_eq!(image_of(&again, 0), bytes);
    let (_, _, whole) = send(&s, "edits", edit_form(input.clone())).await;
    assert_eq!(whole["data"][0]["strength"], 0.75);
    let stripes = png(64, 48, false, |x, _| {
        if x / 8 % 2 == 0 {
            [0, 0, 0, 255]
        } else {
            [40, 220, 40, 255]
        }
    });
    let (_, _, other) = send(&s, "edits", edit_form(stripes)).await;
    let (_, _, weaker) = send(&s, "edits", edit_form(input).text("strength", "0.5")).await;
    assert_eq!(weaker["data"][0]["strength"], 0.5);
    let images = [&masked, &whole, &other, &weaker].map(|r| decode(&image_of(r, 0)));
    for i in 0..images.len() {
        for j in i + 1..images.len() {
            assert_ne!(
                images[i], images[j],
                "answers {i} and {j} are the same image"
            );
        }
    }
    let usage = s.db.usage().await.unwrap();
    assert_eq!(usage[0].requests, 5, "every edit is recorded");
}

#[tokio::test]
async fn size_auto_keeps_the_input_aspect_on_the_model_grid() {
    let s = start(Options::default()).await;
    let form = Form::new()
        .text("prompt", "a disc")
        .text("steps", "2")
        .part("image[]", file(disc(200, 100)));
    let (status, _, reply) = send(&s, "edits", form).await;
    assert_eq!(status, 200, "{reply}");
    let (w, h) = (
        reply["data"][0]["width"].as_u64().unwrap(),
        reply["data"][0]["height"].as_u64().unwrap(),
    );
    assert_eq!(reply["size"], format!("{w}x{h}"));
    assert!(w % 16 == 0 && h % 16 == 0, "{w}x{h} is on the grid");
    let ratio = w as f64 / h as f64;
    assert!((1.8..=2.2).contains(&ratio), "{w}x{h} keeps 2:1");
    // No model named: the first one configured.
    assert_eq!(reply["data"][0]["model"], MODEL);
    // A URL answer is a working link, as for generations.
    let url = reply["data"][0]["url"].as_str().unwrap();
    let got = s.client.get(url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(
        decode(&got.bytes().await.unwrap()).dimensions(),
        (w as u32, h as u32)
    );
}

#[tokio::test]
async fn variations_draw_n_images_from_the_input_alone() {
    let s = start(Options::default()).await;
    let form = Form::new()
        .text("n", "2")
        .text("size", "64x64")
        .text("steps", "2")
        .text("response_format", "b64_json")
        .part("image", file(disc(64, 64)));
    let (status, _, reply) = send(&s, "variations", form).await;
    assert_eq!(status, 200, "{reply}");
    let data = reply["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["revised_prompt"], "");
    assert_eq!(data[0]["strength"], 0.6);
    assert_ne!(image_of(&reply, 0), image_of(&reply, 1));
}

#[tokio::test]
async fn a_streamed_edit_sends_image_edit_events() {
    let s = start(Options::default()).await;
    let form = Form::new()
        .text("prompt", "a blue disc")
        .text("size", "64x48")
        .text("steps", "4")
        .text("strength", "1")
        .text("stream", "true")
        .text("partial_images", "1")
        .part("image", file(disc(64, 48)));
    let r = s
        .client
        .post(format!("{}/v1/images/edits", s.url))
        .bearer_auth(&s.key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds, ["image_edit.partial_image", "image_edit.completed"]);
}

#[tokio::test]
async fn an_idempotency_key_covers_the_files_too() {
    let s = start(Options::default()).await;
    let post = |image: Vec<u8>| {
        s.client
            .post(format!("{}/v1/images/edits", s.url))
            .bearer_auth(&s.key)
            .header("Idempotency-Key", "edit-1")
            .multipart(edit_form(image))
            .send()
    };
    let first = post(disc(64, 48)).await.unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    let again = post(disc(64, 48)).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    // Same fields, another image: a conflict, not a replay.
    let other = post(disc(48, 48)).await.unwrap();
    assert_eq!(other.status(), 409);
}

#[tokio::test]
async fn every_bad_upload_is_refused_with_its_param_and_the_server_keeps_serving() {
    let s = start(Options {
        uploads: pictor_api::UploadLimits {
            max_file_bytes: 64 << 10,
            max_request_bytes: 160 << 10,
            max_images: 2,
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let good = disc(64, 48);
    let truncated = good[..good.len() / 2].to_vec();
    let noise: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, Form, u16, Option<&str>)> = vec![
        (
            "not an image",
            edit_form(b"hello, world".to_vec()),
            400,
            Some("image"),
        ),
        ("a truncated PNG", edit_form(truncated), 400, Some("image")),
        (
            "an image bomb",
            edit_form(bomb(20_000, 20_000)),
            400,
            Some("image"),
        ),
        (
            "a mask of another size",
            edit_form(good.clone()).part("mask", file(left_half_mask(32, 48))),
            400,
            Some("mask"),
        ),
        (
            "a mask without alpha",
            edit_form(good.clone()).part("mask", file(disc(64, 48))),
            400,
            Some("mask"),
        ),
        (
            "two masks",
            edit_form(good.clone())
                .part("mask", file(left_half_mask(64, 48)))
                .part("mask[]", file(left_half_mask(64, 48))),
            400,
            Some("mask"),
        ),
        (
            "reference images",
            edit_form(good.clone()).part("image[]", file(good.clone())),
            400,
            Some("image"),
        ),
        (
            "more images than allowed",
            edit_form(good.clone())
                .part("image[]", file(good.clone()))
                .part("image[]", file(good.clone())),
            400,
            Some("image"),
        ),
        (
            "no image",
            Form::new().text("prompt", "a"),
            400,
            Some("image"),
        ),
        (
            "no prompt",
            Form::new().part("image", file(good.clone())),
            400,
            Some("prompt"),
        ),
        (
            "a file over the limit",
            edit_form(noise.clone()),
            413,
            Some("image"),
        ),
        (
            "a request over the limit",
            edit_form(noise[..60_000].to_vec())
                .part("image[]", file(noise[..60_000].to_vec()))
                .part("mask", file(noise[..60_000].to_vec())),
            413,
            None,
        ),
        (
            "a text field over the limit",
            edit_form(good.clone()).text("user", "x".repeat(100_000)),
            400,
            Some("user"),
        ),
        (
            "a number that is none",
            edit_form(good.clone()).text("n", "two"),
            400,
            Some("n"),
        ),
        (
            "a file in a text field",
            edit_form(good.clone()).part("prompt_file", file(good.clone())),
            400,
            Some("prompt_file"),
        ),
        (
            "an unknown field",
            edit_form(good.clone()).text("mask_image", "x"),
            400,
            Some("mask_image"),
        ),
        (
            "a size far past the model's",
            Form::new()
                .text("prompt", "a")
                .text("size", "991x92232535")
                .part("image", file(good.clone())),
            400,
            Some("size"),
        ),
        (
            "too few steps for the strength",
            Form::new()
                .text("prompt", "a")
                .text("steps", "1")
                .text("strength", "0.5")
                .part("image", file(good.clone())),
            400,
            Some("steps"),
        ),
        (
            "a strength of 0",
            edit_form(good.clone()).text("strength", "0"),
            400,
            Some("strength"),
        ),
        (
            "a mask on a variation",
            Form::new()
                .part("image", file(good.clone()))
                .part("mask", file(left_half_mask(64, 48))),
            400,
            Some("mask"),
        ),
    ];
    for (what, form, status, param) in cases {
        let route = if what.contains("variation") {
            "variations"
        } else {
            "edits"
        };
        let (got, _, reply) = send(&s, route, form).await;
        assert_eq!(got, status, "{what}: {reply}");
        assert_eq!(error_parts(&reply).1.as_deref(), param, "{what}: {reply}");
    }
    // Not multipart at all.
    let r = s
        .client
        .post(format!("{}/v1/images/edits", s.url))
        .bearer_auth(&s.key)
        .json(&serde_json::json!({"prompt": "a", "image": "data:image/png;base64,AAAA"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // Still serving.
    let (status, _, reply) = send(&s, "edits", edit_form(good)).await;
    assert_eq!(status, 200, "{reply}");
}

/// A Z-Image model takes edits too (image to image, and inpainting with a mask): each input
/// is used (another picture draws another image, the same request the same one).
#[tokio::test]
async fn a_z_image_model_edits_with_its_image_and_mask() {
    let s = start(Options {
        fixture: "tiny-z-image-turbo",
        ..Options::default()
    })
    .await;
    let form = |image: Vec<u8>| edit_form(image).text("strength", "0.6");
    let (status, _, first) = send(&s, "edits", form(disc(64, 48))).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["data"][0]["strength"], 0.6);
    let bytes = image_of(&first, 0);
    assert_eq!(decode(&bytes).dimensions(), (64, 48));
    let (_, _, again) = send(&s, "edits", form(disc(64, 48))).await;
    assert_eq!(image_of(&again, 0), bytes, "same request, same image");
    let (status, _, masked) = send(
        &s,
        "edits",
        form(disc(64, 48)).part("mask", file(left_half_mask(64, 48))),
    )
    .await;
    assert_eq!(status, 200, "{masked}");
    assert_ne!(image_of(&masked, 0), bytes, "the mask is used");
    let stripes = png(64, 48, false, |x, _| {
        if x / 8 % 2 == 0 {
            [0, 0, 0, 255]
        } else {
            [40, 220, 40, 255]
        }
    });
    let (_, _, other) = send(&s, "edits", form(stripes)).await;
    assert_ne!(image_of(&other, 0), bytes, "the image is used");
}
