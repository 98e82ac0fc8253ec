//! Z-Image-Turbo's transformer on its tiny fixture (`tools/make_tiny_zimage.py`) against
//! diffusers' `ZImageTransformer2DModel`: caption and image padded to 32 with the learned
//! pad tokens, a 15-token image and a 29-token caption.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use pictor_engine::{Part, zimage::transformer::Transformer};

use crate::common::{STEP_TOL, max_abs_diff, tensor};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny-z-image-turbo")
}

fn load() -> Transformer {
    let part = Part::folder(&fixture().join("transformer")).expect("part");
    Transformer::open(&part, DType::F32, &Device::Cpu)
        .expect("loads")
        .0
}

#[test]
fn the_transformer_matches_diffusers_at_the_first_step() {
    let net = load();
    let r = candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu)
        .expect("reference");
    let t: Vec<f32> = tensor(&r, "transformer_timestep_step0")
        .to_vec1()
        .expect("t");
    let out = net
        .forward(
            &tensor(&r, "transformer_in_step0"),
            f64::from(t[0]),
            &tensor(&r, "text_features"),
        )
        .expect("forward");
    let want = tensor(&r, "transformer_out_step0");
    let d = max_abs_diff(&out, &want);
    eprintln!("Z-Image step 0: max |Δ| {d:.2e}");
    assert!(d <= STEP_TOL, "step 0 differs by {d}");
}

/// All 8 Turbo steps from the reference's noise, on Pictor's sigmas, with the output
/// negated as the pipeline does: every step's latents within the FLUX fixtures' bound.
#[test]
fn eight_turbo_steps_land_on_diffusers_latents() {
    let net = load();
    let r = candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu)
        .expect("reference");
    let caption = tensor(&r, "text_features");
    let sigmas = pictor_engine::zimage::sigmas(8, 3.0);
    let mut x = tensor(&r, "noise").squeeze(0).expect("one image");
    for (i, pair) in sigmas.windows(2).enumerate() {
        let out = net
            .forward(
                &x.unsqueeze(1).expect("frame axis"),
                1.0 - pair[0],
                &caption,
            )
            .expect("forward")
            .squeeze(1)
            .expect("no frame axis");
        x = (x - (out * (pair[1] - pair[0])).expect("scaled")).expect("step");
        let want = tensor(&r, &format!("latents_step{i}"))
            .squeeze(0)
            .expect("one image");
        let d = max_abs_diff(&x, &want);
        assert!(d <= STEP_TOL, "step {i} differs by {d}");
    }
}

/// The prompt through [`pictor_engine::zimage::chat_prompt`], the fixture's tokenizer.json
/// and Pictor's Qwen3 encoder stopped at the last layer but one: the same token ids and
/// features as diffusers' `_encode_prompt`.
#[test]
fn the_templated_prompt_encodes_as_diffusers_does() {
    use pictor_engine::zimage::encoder::TextEncoder;
    let dir = fixture();
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .expect("reference");
    let setup: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("json"))
            .expect("parses");
    let tok =
        tokenizers::Tokenizer::from_file(dir.join("tokenizer/tokenizer.json")).expect("tokenizer");
    let text = pictor_engine::zimage::chat_prompt(setup["prompt"].as_str().expect("prompt"));
    assert_eq!(text, setup["templated"].as_str().expect("templated"));
    let ids = tok.encode(text, false).expect("encodes").get_ids().to_vec();
    let want: Vec<i64> = tensor(&r, "input_ids")
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), want);
    let part = Part::folder(&dir.join("text_encoder")).expect("part");
    let encoder = TextEncoder::open(&part, DType::F32, &Device::Cpu).expect("loads");
    let features = encoder.forward(&ids, &Device::Cpu).expect("encodes");
    let d = max_abs_diff(&features, &tensor(&r, "text_features"));
    assert!(d <= STEP_TOL, "features differ by {d}");
}

/// The pipeline from the diffusers folder: the prompt's features, 8 steps from the
/// reference noise and the decoded image land on diffusers' (pixels within 1 of 255).
#[test]
fn the_pipeline_draws_the_reference_image_from_its_noise() {
    use pictor_engine::zimage::ZImagePipeline;
    let p = ZImagePipeline::load(&fixture()).expect("loads");
    let r = candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu)
        .expect("reference");
    let (caption, info) = p
        .encode_prompt("a small red circle on a blue background in the top left")
        .expect("encodes");
    assert!(!info.truncated && info.tokens == 29, "{info:?}");
    assert!(max_abs_diff(&caption, &tensor(&r, "text_features")) <= STEP_TOL);
    let noise = tensor(&r, "noise").squeeze(0).expect("one image");
    let mut steps = 0;
    let latent = p
        .denoise(&noise, &caption, 8, |_, _| {
            steps += 1;
            Ok(pictor_core::Control::Continue)
        })
        .expect("denoises");
    assert_eq!(steps, 8);
    let want = tensor(&r, "final_latents").squeeze(0).expect("one image");
    let d = max_abs_diff(&latent, &want);
    assert!(d <= STEP_TOL, "final latents differ by {d}");
    let image = p.decode(&latent, 48, 80).expect("decodes");
    let want: Vec<u8> = tensor(&r, "image_u8")
        .squeeze(0)
        .and_then(|t| t.permute((1, 2, 0)))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("pixels");
    let worst = image
        .pixels
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .expect("pixels");
    assert!(worst <= 1, "pixels differ by {worst}");
}

/// Through the `Pipeline` seam: the family's rules, seeds (image i from seed + i, the same
/// seed the same image), previews at the due steps, a cut prompt reported, cancelling.
#[test]
fn the_pipeline_serves_the_seam() {
    use pictor_core::{Control, GenerationRequest, Pipeline, PipelineError, Progress};
    let mut p = pictor_engine::zimage::ZImagePipeline::load(&fixture()).expect("loads");
    let rules = p.rules();
    assert_eq!(
        (rules.family.as_str(), rules.default_steps),
        ("Z-Image-Turbo", 8)
    );
    assert!(!rules.takes_guidance());
    let req = |seed, n, previews| GenerationRequest {
        loras: Vec::new(),
        prompt: "a green star".into(),
        width: 64,
        height: 48,
        steps: 4,
        guidance: None,
        seed,
        n,
        previews,
        edit: None,
    };
    let mut shown = 0;
    let two = p
        .generate_batch(&[req(7, 2, 1)], &mut |e| {
            if matches!(e, Progress::Preview { .. }) {
                shown += 1;
            }
            Control::Continue
        })
        .expect("generates")
        .remove(0);
    assert_eq!(shown, 2, "one preview per image");
    assert_eq!(two.images.len(), 2);
    assert_ne!(two.images[0], two.images[1]);
    let second = p
        .generate_batch(&[req(8, 1, 0)], &mut |_| Control::Continue)
        .expect("generates")
        .remove(0);
    assert_eq!(
        second.images[0], two.images[1],
        "image 1 of seed 7 is seed 8's"
    );

    let long = "a small red circle on a blue background ".repeat(100);
    let (_, info) = p.encode_prompt(&long).expect("encodes");
    assert!(info.truncated && info.tokens == 512, "{info:?}");
    assert!(
        long.starts_with(info.encoded.trim_end()),
        "{:?}",
        info.encoded
    );

    let cancelled = p.generate_batch(&[req(1, 1, 0)], &mut |e| match e {
        Progress::Step { step: 2, .. } => Control::Cancel,
        _ => Control::Continue,
    });
    assert!(
        matches!(cancelled, Err(PipelineError::Cancelled)),
        "{cancelled:?}"
    );
}

/// Edits against diffusers' `ZImageImg2ImgPipeline` (strength 0.6: 5 of 8 steps) and
/// `ZImageInpaintPipeline` (strength 0.7: 6 of 8 steps, a 48x24 rectangle repainted) on the
/// fixture (`tools/make_tiny_zimage_edit.py`: the same 8-bit picture, the posterior mean,
/// the pipelines' noise): final latents within the step bound, pixels within 1 of 255.
#[test]
fn edits_match_diffusers_img2img_and_inpainting() {
    use pictor_engine::{EditInput, RgbImage, zimage::ZImagePipeline};
    let mut p = ZImagePipeline::load(&fixture()).expect("loads");
    let r =
        candle_core::safetensors::load(fixture().join("edit-reference.safetensors"), &Device::Cpu)
            .expect("reference");
    let (caption, _) = p
        .encode_prompt("a small red circle on a blue background in the top left")
        .expect("encodes");
    let bytes = |name: &str| -> Vec<u8> {
        tensor(&r, name)
            .permute((1, 2, 0))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("pixels")
    };
    let picture = RgbImage {
        width: 80,
        height: 48,
        pixels: bytes("picture_u8"),
    };
    let mask: Vec<u8> = tensor(&r, "inpaint_mask")
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("mask")
        .iter()
        .map(|&m| if m > 0.5 { 255 } else { 0 })
        .collect();
    for (label, strength, mask, steps_run) in
        [("img2img", 0.6, None, 5), ("inpaint", 0.7, Some(mask), 6)]
    {
        let edit = EditInput {
            image: picture.clone(),
            mask,
            strength,
            image_sha256: String::new(),
        };
        let noise = tensor(&r, &format!("{label}_noise")).squeeze(0).unwrap();
        let mut seen = 0;
        let latent = p
            .denoise_edit(&edit, &noise, &caption, 8, |_, _| {
                seen += 1;
                Ok(pictor_core::Control::Continue)
            })
            .expect("edits");
        assert_eq!(seen, steps_run, "{label}");
        let want = tensor(&r, &format!("{label}_final_latents"))
            .squeeze(0)
            .unwrap();
        let d = max_abs_diff(&latent, &want);
        let image = p.decode(&latent, 48, 80).expect("decodes");
        let worst = image
            .pixels
            .iter()
            .zip(bytes(&format!("{label}_image_u8")))
            .map(|(a, b)| a.abs_diff(b))
            .max()
            .unwrap();
        eprintln!("Z-Image {label}: final latents max |Δ| {d:.2e}, pixels {worst}");
        assert!(
            d <= STEP_TOL && worst <= 1,
            "{label}: latents {d}, pixels {worst}"
        );
    }
}
