//! Checking this build on a device against diffusers' own numbers: a fixture folder made by
//! `tools/make_tiny_flux.py` (a tiny FLUX.1-schnell with `reference.safetensors`, the
//! tensors diffusers computed from it, and `reference.json`, the prompt and size) is loaded
//! on the device and dtype asked for, and each stage is run from the reference's own inputs
//! and compared: the two text encoders, one transformer step, every step to the final
//! latents, and the decoded pixels. `pictor selfcheck` prints the result; a GPU machine
//! without a Rust toolchain runs it from the built binary (`bench/gpu.sh`).

use std::{collections::HashMap, path::Path};

use candle_core::{DType, Device, Tensor};
use pictor_core::{Control, PromptInfo};

use super::{FluxOptions, FluxPipeline, sampling};
use crate::{
    error::{EngineError, Result},
    layout::ModelFiles,
    text::Embeddings,
};

/// How far an f32 run's text embeddings, transformer outputs and latents may be from
/// diffusers' (the bound the test suite holds the CPU to).
pub const F32_TOLERANCE: f32 = 1e-4;
/// How far an f32 run's decoded pixels (0..1) may be from diffusers'.
pub const F32_PIXEL_TOLERANCE: f32 = 1e-3;

/// How far a bf16 or f16 run may be from diffusers' f32 numbers at any stage, as a fraction
/// of the reference's largest value. Measured on the CPU in bf16 with native bf16 products:
/// the worst stage is T5's hidden states, 1.8 % off (transformers' own T5 in bf16 lands
/// 2.3 % off on this fixture); one transformer step 0.4 %, the final latents 0.2 %.
pub const HALF_RELATIVE: f32 = 0.03;

/// What [`run`] found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Where it ran, as [`pictor_core::Generation::device`] says.
    pub ran_on: String,
    /// Every stage, in order.
    pub stages: Vec<StageDiff>,
    /// The run computed in f32.
    f32: bool,
}

impl Report {
    /// The bound `stage` is held to: `max_relative` of its reference's largest value when
    /// given; otherwise the test suite's: for an f32 run [`F32_TOLERANCE`]
    /// ([`F32_PIXEL_TOLERANCE`] for pixels), for a half-precision one [`HALF_RELATIVE`] of
    /// the reference's largest value.
    pub fn bound(&self, stage: &StageDiff, max_relative: Option<f32>) -> f32 {
        match max_relative {
            Some(fraction) => fraction * stage.reference_max_abs,
            None if self.f32 && stage.stage == "pixels" => F32_PIXEL_TOLERANCE,
            None if self.f32 => F32_TOLERANCE,
            None => HALF_RELATIVE * stage.reference_max_abs,
        }
    }
}

/// One stage's distance from diffusers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageDiff {
    /// `clip_pooled`, `t5_hidden`, `transformer_step0`, `final_latents` or `pixels`.
    pub stage: &'static str,
    /// Largest absolute difference from the reference.
    pub max_abs_diff: f32,
    /// The reference's own largest absolute value, for scale.
    pub reference_max_abs: f32,
}

/// Loads the fixture in `dir` with `options` and compares every stage with its reference.
pub fn run(dir: &Path, options: FluxOptions) -> Result<Report> {
    let file = |name: &str| dir.join(name);
    let reference: HashMap<String, Tensor> =
        candle_core::safetensors::load(file("reference.safetensors"), &Device::Cpu)
            .map_err(|e| EngineError::file(file("reference.safetensors"), e))?;
    let setup: serde_json::Value = std::fs::read_to_string(file("reference.json"))
        .map_err(|e| EngineError::file(file("reference.json"), e))
        .and_then(|t| {
            serde_json::from_str(&t).map_err(|e| EngineError::file(file("reference.json"), e))
        })?;
    let text = |key: &str| setup.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    let number = |key: &str| {
        setup
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|n| n as usize)
            .ok_or_else(|| EngineError::file(file("reference.json"), format!("no `{key}`")))
    };
    let (height, width, steps) = (
        number("height")?,
        number("width")?,
        number("num_inference_steps")?,
    );
    let mut pipeline = FluxPipeline::load(&ModelFiles::from_dir(dir)?, options)?;
    let device = pipeline.device.clone();
    let want = |name: &str| -> Result<Tensor> {
        let t = reference.get(name).ok_or_else(|| {
            EngineError::file(file("reference.safetensors"), format!("no `{name}`"))
        })?;
        Ok(t.to_device(&device)?)
    };
    let mut out = Vec::new();
    let mut compare = |stage: &'static str, got: &Tensor, name: &str| -> Result<()> {
        let want = want(name)?;
        out.push(StageDiff {
            stage,
            max_abs_diff: max_abs(&(got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?)?,
            reference_max_abs: max_abs(&want)?,
        });
        Ok(())
    };

    let emb = pipeline.encode_prompt(text("prompt"))?;
    compare("clip_pooled", &emb.pooled, "clip_pooled")?;
    compare("t5_hidden", &emb.sequence, "t5_hidden")?;
    // The later stages start from the reference's own inputs, so each stage's error is
    // its own.
    let emb = Embeddings {
        sequence: want("t5_hidden")?,
        pooled: want("clip_pooled")?,
        prompt: PromptInfo::default(),
    };
    let noise = want("noise")?;
    let (_, _, h, w) = noise.dims4()?;
    let denoiser = pipeline.denoiser();
    // A guidance-distilled model runs at the reference's guidance scale.
    let guidance = match pipeline.variant().rules().default_guidance {
        Some(_) => Some(
            setup
                .get("guidance_scale")
                .and_then(|v| v.as_f64())
                .ok_or_else(|| EngineError::file(file("reference.json"), "no `guidance_scale`"))?,
        ),
        None => None,
    };
    let velocity = denoiser.velocity(&sampling::pack(&noise)?, &emb, 1.0, guidance, (h, w))?;
    compare("transformer_step0", &velocity, "transformer_out_step0")?;
    let latents = denoiser.denoise(&noise, &emb, steps, guidance, |_| Ok(Control::Continue))?;
    compare("final_latents", &latents, "final_latents")?;
    let pixels = denoiser.decode(&want("final_latents")?, height, width)?;
    compare("pixels", &pixels, "image")?;
    Ok(Report {
        ran_on: pipeline.ran_on.clone(),
        stages: out,
        f32: pipeline.dtype == DType::F32,
    })
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}
