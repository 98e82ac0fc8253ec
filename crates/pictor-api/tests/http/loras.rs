//! LoRA per request over HTTP: `loras` in the body (and an edit's form), listed in
//! `/v1/models/{id}`, recorded in the answer and the receipt, never batched with other
//! LoRAs, and every bad value a 400 naming `loras`.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::Digest;

use crate::common::*;

fn tiny_loras() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny-loras")
}

/// A LoRA folder: the fixture's files and one made for an SDXL UNet.
fn lora_dir(dir: &Path) -> PathBuf {
    let loras = dir.join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    for name in ["pixel-peft", "pixel-kohya", "pixel-bfl"] {
        let file = format!("{name}.safetensors");
        std::fs::copy(tiny_loras().join(&file), loras.join(&file)).unwrap();
    }
    // A safetensors file by hand: header length, JSON header, f32 data.
    let (r, inp, out) = (4usize, 1280usize, 320usize);
    let key = "lora_unet_input_blocks_1_0_emb_layers_1";
    let down = r * inp * 4;
    let header = json!({
        format!("{key}.lora_down.weight"): {"dtype": "F32", "shape": [r, inp], "data_offsets": [0, down]},
        format!("{key}.lora_up.weight"): {"dtype": "F32", "shape": [out, r], "data_offsets": [down, down + out * r * 4]},
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(vec![0u8; down + out * r * 4]);
    std::fs::write(loras.join("sdxl-style.safetensors"), bytes).unwrap();
    loras
}

/// A server whose LoRA folder lives as long as the returned temporary folder.
async fn server() -> (Server, tempfile::TempDir, PathBuf) {
    let holder = tempfile::tempdir().unwrap();
    let loras = lora_dir(holder.path());
    let s = start(Options {
        lora_dir: Some(loras.clone()),
        ..Options::default()
    })
    .await;
    (s, holder, loras)
}

fn with_loras(loras: Value) -> Value {
    let mut body = small("a red circle");
    body["loras"] = loras;
    body["response_format"] = json!("b64_json");
    body
}

fn png_of(body: &Value) -> Vec<u8> {
    let b64 = body["data"][0]["b64_json"].as_str().expect("b64_json");
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

async fn pixels(s: &Server, loras: Value) -> Vec<u8> {
    let (status, _, body) = s.generate(with_loras(loras)).await;
    assert_eq!(status, 200, "{body}");
    decode(&png_of(&body)).into_raw()
}

#[tokio::test]
async fn loras_are_listed_applied_and_recorded() {
    let (s, _holder, dir) = server().await;
    let model = s.get_json(&format!("/v1/models/{MODEL}")).await;
    assert_eq!(model["rules"]["loras"], true, "{model}");
    let names: Vec<&str> = model["loras"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["pixel-bfl", "pixel-kohya", "pixel-peft", "sdxl-style"],
        "{model}"
    );

    let (status, _, body) = s
        .generate(with_loras(json!([{"name": "pixel-kohya", "scale": 0.8}])))
        .await;
    assert_eq!(status, 200, "{body}");
    let file = std::fs::read(dir.join("pixel-kohya.safetensors")).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&file));
    assert_eq!(
        body["data"][0]["loras"],
        json!([{"name": "pixel-kohya", "sha256": sha, "scale": 0.8}])
    );
    let receipt = pictor_image::Receipt::from_image(&png_of(&body)).unwrap();
    assert_eq!(receipt.loras.len(), 1);
    assert_eq!(
        (receipt.loras[0].name.as_str(), receipt.loras[0].scale),
        ("pixel-kohya", 0.8)
    );
    assert_eq!(receipt.loras[0].sha256, sha[..12]);

    // The same update in three file formats draws the same image; none differs from it,
    // and scale 0 is no LoRA at all.
    let kohya = decode(&png_of(&body)).into_raw();
    let plain = pixels(&s, Value::Null).await;
    assert_ne!(kohya, plain, "the LoRA changed nothing");
    assert_eq!(
        pixels(&s, json!([{"name": "pixel-peft", "scale": 0.8}])).await,
        kohya
    );
    assert_eq!(pixels(&s, json!(["pixel-bfl:0.8"])).await, kohya);
    assert_eq!(
        pixels(&s, json!([{"name": "pixel-peft", "scale": 0}])).await,
        plain
    );

    // Requests with different LoRAs waiting together are never one batch.
    let (a, b) = tokio::join!(
        s.generate(with_loras(json!([{"name": "pixel-peft", "scale": 0.8}]))),
        s.generate(with_loras(Value::Null)),
    );
    assert_eq!(decode(&png_of(&a.2)).into_raw(), kohya);
    assert_eq!(decode(&png_of(&b.2)).into_raw(), plain);
}

#[tokio::test]
async fn bad_loras_are_400s_naming_loras_and_the_server_keeps_serving() {
    let (s, _holder, _) = server().await;
    let nine: Vec<Value> = (0..9).map(|i| json!({"name": format!("l{i}")})).collect();
    for (loras, says) in [
        (json!([{"name": "absent"}]), "no LoRA `absent`"),
        (
            json!([{"name": "pixel-peft", "scale": 11}]),
            "'loras[0].scale'",
        ),
        (json!(nine), "at most 8"),
        (json!(["pixel-peft", "pixel-peft:0.5"]), "listed twice"),
        (json!([{"name": "../etc/passwd"}]), "not a LoRA name"),
        (
            json!([{"name": "pixel-peft", "weight": 1}]),
            "unknown field 'weight'",
        ),
        (json!("pixel-peft"), "expected a list"),
        (
            json!([{"name": "pixel-peft", "scale": "high"}]),
            "expected a number",
        ),
        // Only the model can tell: a LoRA for an SDXL UNet.
        (
            json!([{"name": "sdxl-style"}]),
            "lora_unet_input_blocks_1_0_emb_layers_1",
        ),
    ] {
        let (status, _, body) = s.generate(with_loras(loras.clone())).await;
        assert_eq!(status, 400, "{loras}: {body}");
        let (kind, param, _) = error_parts(&body);
        assert_eq!(
            (kind.as_str(), param.as_deref()),
            ("invalid_request_error", Some("loras")),
            "{body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{loras}: {message}");
    }
    let (status, _, body) = s.generate(with_loras(json!([{"name": "pixel-bfl"}]))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_edit_takes_loras_as_a_form_field() {
    let (s, _holder, _) = server().await;
    let image = {
        let img = image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
        });
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    };
    let edit = |loras: Option<&'static str>| {
        let part = reqwest::multipart::Part::bytes(image.clone())
            .file_name("in.png")
            .mime_str("image/png")
            .unwrap();
        let mut form = reqwest::multipart::Form::new()
            .text("model", MODEL)
            .text("prompt", "a red circle")
            .text("seed", "3")
            .text("steps", "2")
            .text("response_format", "b64_json")
            .part("image", part);
        if let Some(l) = loras {
            form = form.text("loras", l);
        }
        s.client
            .post(format!("{}/v1/images/edits", s.url))
            .bearer_auth(&s.key)
            .multipart(form)
            .send()
    };
    let with: Value = edit(Some("pixel-kohya:0.8"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(with["data"][0]["loras"][0]["name"], "pixel-kohya", "{with}");
    let json_list: Value = edit(Some(r#"[{"name": "pixel-peft", "scale": 0.8}]"#))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        decode(&png_of(&with)).into_raw(),
        decode(&png_of(&json_list)).into_raw()
    );
    let without: Value = edit(None).await.unwrap().json().await.unwrap();
    assert_ne!(
        decode(&png_of(&with)).into_raw(),
        decode(&png_of(&without)).into_raw()
    );
    // A variation takes them the same way.
    let part = reqwest::multipart::Part::bytes(image.clone())
        .file_name("in.png")
        .mime_str("image/png")
        .unwrap();
    let form = reqwest::multipart::Form::new()
        .text("model", MODEL)
        .text("steps", "2")
        .text("response_format", "b64_json")
        .text("loras", "pixel-bfl:0.5")
        .part("image", part);
    let varied: Value = s
        .client
        .post(format!("{}/v1/images/variations", s.url))
        .bearer_auth(&s.key)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(varied["data"][0]["loras"][0]["scale"], 0.5, "{varied}");
}
