//! Shared helpers: the fixture, its reference tensors, comparisons.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, Tensor};
use pictor_engine::{
    ModelFiles, Part,
    flux::{FluxOptions, FluxPipeline},
    text::Embeddings,
};

/// How far the transformer's outputs and latents may be from diffusers', and how far
/// decoded pixels (0..1) may be: the bounds `pictor selfcheck` holds an f32 run to.
pub use pictor_engine::flux::selfcheck::{
    F32_PIXEL_TOLERANCE as PIXEL_TOL, F32_TOLERANCE as STEP_TOL,
};

/// The tiny FLUX.1-schnell made by `tools/make_tiny_flux.py`.
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny-flux-schnell")
}

/// The reference tensors diffusers produced.
pub fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors")
}

pub fn tensor(reference: &HashMap<String, Tensor>, name: &str) -> Tensor {
    reference
        .get(name)
        .unwrap_or_else(|| panic!("reference lacks {name}"))
        .clone()
}

/// Reference ids as u32.
pub fn ids(reference: &HashMap<String, Tensor>, name: &str) -> Vec<u32> {
    tensor(reference, name)
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::I64))
        .and_then(|t| t.to_vec1::<i64>())
        .expect("ids")
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// Largest absolute difference, after checking the shapes agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("difference")
}

/// Standard deviation, to show a reference is not trivially small.
pub fn std(t: &Tensor) -> f32 {
    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let v: Vec<f32> = t.to_vec1().unwrap();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
}

/// The fixture's transformer in Black Forest Labs names, as a part: its RoPE axes are
/// recorded in the config beside it (`flux1-schnell.json`), since its heads are not
/// FLUX.1's and its tensors cannot say.
pub fn bfl_transformer(path: impl Into<PathBuf>) -> Part {
    Part {
        files: vec![path.into()],
        config: Some(fixture().join("flux1-schnell.json")),
        rope_axes: None,
    }
}

pub fn load(files: &ModelFiles) -> FluxPipeline {
    FluxPipeline::load(files, FluxOptions::default()).expect("pipeline loads")
}

/// The reference's own text embeddings, to test later stages in isolation.
pub fn reference_embeddings(reference: &HashMap<String, Tensor>) -> Embeddings {
    Embeddings {
        sequence: tensor(reference, "t5_hidden"),
        pooled: tensor(reference, "clip_pooled"),
        prompt: pictor_engine::PromptInfo {
            encoded: String::new(),
            truncated: false,
            pooled_truncated: false,
            tokens: 0,
        },
    }
}

/// How far the first transformer step of `files` lands from diffusers' (max |Δ|), on the
/// reference noise and embeddings.
pub fn step0_error(files: &ModelFiles) -> f32 {
    let p = load(files);
    let r = reference();
    let noise = tensor(&r, "noise");
    let (_, _, h, w) = noise.dims4().unwrap();
    let v = p
        .denoiser()
        .velocity(
            &pictor_engine::flux::sampling::pack(&noise).unwrap(),
            &reference_embeddings(&r),
            1.0,
            None,
            (h, w),
        )
        .expect("velocity");
    max_abs_diff(&v, &tensor(&r, "transformer_out_step0"))
}

/// The fixture's prompt and size, from reference.json.
pub struct Setup {
    pub prompt: String,
    pub long_prompt: String,
    pub punct_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
}

pub fn setup() -> Setup {
    let text = std::fs::read_to_string(fixture().join("reference.json")).expect("reference.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let s = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_else(|| panic!("reference.json lacks {k}"))
            .to_string()
    };
    let n = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_u64())
            .unwrap_or_else(|| panic!("reference.json lacks {k}")) as usize
    };
    Setup {
        prompt: s("prompt"),
        long_prompt: s("long_prompt"),
        punct_prompt: s("punct_prompt"),
        width: n("width"),
        height: n("height"),
        steps: n("num_inference_steps"),
    }
}

/// Links (or copies) fixture entries into `dir` to build other layouts.
pub fn link(entries: &[&str], dir: &Path) {
    for e in entries {
        let src = fixture().join(e).canonicalize().expect("fixture entry");
        let dst = dir.join(e);
        std::os::unix::fs::symlink(&src, &dst).expect("symlink");
    }
}
