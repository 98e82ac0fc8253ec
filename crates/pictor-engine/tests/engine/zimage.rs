//! Z-Image-Turbo's transformer on its tiny fixture (`tools/make_tiny_zimage.py`) against
//! diffusers' `ZImageTransformer2DModel`: caption and image padded to 32 with the learned
//! pad tokens, a 15-token image and a 29-token caption.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use pictor_engine::zimage::transformer::{Config, Transformer};

use crate::common::{STEP_TOL, max_abs_diff, tensor};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny-z-image-turbo")
}

fn load() -> Transformer {
    let dir = fixture().join("transformer");
    let cfg = Config::from_file(&dir.join("config.json")).expect("config");
    // SAFETY: the fixture's file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .expect("weights");
    Transformer::load(vb, &cfg).expect("loads")
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
/// and candle's Qwen3 encoder stopped at the last layer but one: the same token ids and
/// features as diffusers' `_encode_prompt`.
#[test]
fn the_templated_prompt_encodes_as_diffusers_does() {
    use candle_transformers::models::z_image::text_encoder::{
        TextEncoderConfig, ZImageTextEncoder,
    };
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
    let cfg: TextEncoderConfig = serde_json::from_str(
        &std::fs::read_to_string(dir.join("text_encoder/config.json")).expect("config"),
    )
    .expect("parses");
    // SAFETY: the fixture's file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("text_encoder/model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .expect("weights")
    // Qwen3Model's own names; candle reads Qwen3ForCausalLM's (`model.` first).
    .rename_f(|n: &str| n.strip_prefix("model.").unwrap_or(n).to_string());
    let encoder = ZImageTextEncoder::new(&cfg, vb).expect("loads");
    let ids = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let features = encoder.forward(&ids).expect("encodes").squeeze(0).unwrap();
    let d = max_abs_diff(&features, &tensor(&r, "text_features"));
    assert!(d <= STEP_TOL, "features differ by {d}");
}
