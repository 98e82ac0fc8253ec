//! The Z-Image-Turbo pipeline from a diffusers folder (`tokenizer/tokenizer.json`,
//! `text_encoder/`, `transformer/`, `vae/`, `scheduler/`), as diffusers' `ZImagePipeline`
//! runs it with Turbo's settings: the prompt in Qwen3's chat template, cut at 512 tokens
//! (template included), encoded to the features of the encoder's last layer but one; 8
//! steps on the shifted schedule, no guidance; the FLUX autoencoder to decode.
//!
//! On the CPU in f32 only so far; the memory check refuses weights that would not fit the
//! budget in f32, with no staging or quantizing. `pictor serve` and `generate` load it
//! from a folder whose `model_index.json` names `ZImagePipeline`.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::z_image::text_encoder::{TextEncoderConfig, ZImageTextEncoder};
use pictor_core::{
    Control, Dimensions, Generation, GenerationRequest, ModelRules, Phases, Pipeline,
    PipelineError, Progress, PromptInfo, RgbImage, preview_steps,
};

use super::{
    json,
    transformer::{Config, Transformer},
};
use crate::{
    error::{EngineError, Result},
    flux::{sampling, vae::Vae},
    image::to_rgb8,
    layout::Part,
    noise::gaussian_noise,
};

/// Where it runs and in which dtype, as [`Generation::device`] spells it.
const RUNS_ON: &str = "cpu f32";

/// Most tokens the text encoder reads, template included (diffusers' default).
const MAX_TOKENS: usize = 512;

/// A loaded Z-Image-Turbo.
pub struct ZImagePipeline {
    tokenizer: tokenizers::Tokenizer,
    encoder: ZImageTextEncoder,
    transformer: Transformer,
    vae: Vae,
    shift: f64,
    device: Device,
}

fn safetensors_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::file(dir.to_path_buf(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// Whether `dir` is a diffusers Z-Image folder (its `model_index.json` names
/// `ZImagePipeline`).
pub fn is_folder(dir: &Path) -> bool {
    crate::layout::pipeline_class(dir).as_deref() == Some("ZImagePipeline")
}

/// The weight files of the folder `dir`: text encoder, transformer, autoencoder.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    for sub in ["text_encoder", "transformer", "vae"] {
        all.extend(safetensors_in(&dir.join(sub))?);
    }
    Ok(all)
}

impl ZImagePipeline {
    /// Loads the diffusers folder `dir` on the CPU in f32, when its weights widened to f32
    /// fit `memory_budget` bytes (`None`: no limit); refused before loading otherwise.
    pub fn load_within(dir: &Path, memory_budget: Option<u64>) -> Result<Self> {
        let files = weight_files(dir)?;
        let mut bytes = 0u64;
        for f in &files {
            let stored = std::fs::metadata(f).map_err(|e| EngineError::file(f.clone(), e))?;
            // bf16 or f16 files double in f32; f32 ones stay (an estimate from the size).
            bytes += stored.len() * 2;
        }
        if let Some(budget) = memory_budget
            && bytes > budget
        {
            return Err(EngineError::OutOfMemory {
                message: format!(
                    "Z-Image-Turbo from {} needs about {:.2} GB in f32, over the memory budget \
                     of {:.2} GB (Z-Image runs in f32 on the CPU so far)",
                    dir.display(),
                    bytes as f64 / 1e9,
                    budget as f64 / 1e9
                ),
            });
        }
        Self::load(dir)
    }

    /// Loads the diffusers folder `dir` on the CPU in f32.
    pub fn load(dir: &Path) -> Result<Self> {
        let device = Device::Cpu;
        let tokenizer_file = dir.join("tokenizer/tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_file)
            .map_err(|e| EngineError::file(tokenizer_file.clone(), e.to_string()))?;
        let mmap = |sub: &str| -> Result<VarBuilder<'static>> {
            let files = safetensors_in(&dir.join(sub))?;
            // SAFETY: the weight files are not modified while the model holds them.
            Ok(unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &device)? })
        };
        let te_config: TextEncoderConfig =
            serde_json::from_value(json(&dir.join("text_encoder/config.json"))?)
                .map_err(|e| EngineError::file(dir.join("text_encoder/config.json"), e))?;
        // Qwen3Model's names, or Qwen3ForCausalLM's (`model.` first), which candle reads.
        let encoder = ZImageTextEncoder::new(
            &te_config,
            mmap("text_encoder")?
                .rename_f(|n: &str| n.strip_prefix("model.").unwrap_or(n).to_string()),
        )?;
        let config = Config::from_file(&dir.join("transformer/config.json"))?;
        let transformer = Transformer::load(mmap("transformer")?, &config)?;
        let vae = Vae::load(&Part::folder(&dir.join("vae"))?, DType::F32, &device)?;
        let shift = json(&dir.join("scheduler/scheduler_config.json"))
            .ok()
            .and_then(|c| c.get("shift")?.as_f64())
            .unwrap_or(3.0);
        Ok(Self {
            tokenizer,
            encoder,
            transformer,
            vae,
            shift,
            device,
        })
    }

    /// The features `(tokens, width)` of `prompt` and what was encoded.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, PromptInfo)> {
        let templated = super::chat_prompt(prompt);
        let encoding = self
            .tokenizer
            .encode(templated, false)
            .map_err(|e| EngineError::load("tokenizer", e.to_string()))?;
        let all = encoding.get_ids();
        let ids = &all[..all.len().min(MAX_TOKENS)];
        let truncated = all.len() > MAX_TOKENS;
        // Cut, the prompt's tokens are those after the template's head.
        let encoded = match truncated {
            false => prompt.to_string(),
            true => {
                let head = self
                    .tokenizer
                    .encode(super::PROMPT_HEAD, false)
                    .map_err(|e| EngineError::load("tokenizer", e.to_string()))?
                    .get_ids()
                    .len();
                self.tokenizer
                    .decode(&ids[head.min(ids.len())..], false)
                    .map_err(|e| EngineError::load("tokenizer", e.to_string()))?
            }
        };
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let features = self.encoder.forward(&input)?.squeeze(0)?;
        Ok((
            features,
            PromptInfo {
                encoded,
                truncated,
                pooled_truncated: false,
                tokens: ids.len(),
            },
        ))
    }

    /// The sigmas of `steps` steps on this model's schedule.
    pub fn sigmas(&self, steps: usize) -> Vec<f64> {
        super::sigmas(steps, self.shift)
    }

    /// Denoises one latent `(C, H/8, W/8)` from noise for `steps` steps; `on_step(step,
    /// predicted clean latent)` after each step.
    pub fn denoise(
        &self,
        noise: &Tensor,
        caption: &Tensor,
        steps: usize,
        mut on_step: impl FnMut(usize, &Tensor) -> Result<Control>,
    ) -> Result<Tensor> {
        let mut x = noise.to_dtype(DType::F32)?;
        for (i, pair) in self.sigmas(steps).windows(2).enumerate() {
            // The model predicts clean minus noise at 1 - sigma; the pipeline negates it.
            let v = self
                .transformer
                .forward(&x.unsqueeze(1)?, 1.0 - pair[0], caption)?
                .squeeze(1)?;
            let clean = (&x + (&v * pair[0])?)?;
            x = (x - (v * (pair[1] - pair[0]))?)?;
            if on_step(i + 1, &clean)? == Control::Cancel {
                return Err(EngineError::Cancelled);
            }
        }
        Ok(x)
    }

    /// Latents `(C, H/8, W/8)` to an image.
    pub fn decode(&self, latent: &Tensor, height: usize, width: usize) -> Result<RgbImage> {
        let packed = sampling::pack(&latent.unsqueeze(0)?)?;
        let pixels = self.vae.decode(&packed, height, width)?;
        to_rgb8(&pixels)?
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::load("vae", "decoded no image"))
    }

    fn run(
        &mut self,
        req: &GenerationRequest,
        request: usize,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Generation> {
        self.rules().without_serving_limits().check(req)?;
        if progress(Progress::Encoding) == Control::Cancel {
            return Err(EngineError::Cancelled);
        }
        let mut phases = Phases::default();
        let started = Instant::now();
        let (caption, prompt) = self.encode_prompt(&req.prompt)?;
        phases.encode = started.elapsed();
        let (h, w) = (req.height / 8, req.width / 8);
        let channels = self.vae.arch().z_channels;
        let due = preview_steps(req.steps, req.previews);
        let mut images = Vec::with_capacity(req.n);
        for image in 0..req.n {
            let started = Instant::now();
            let seed = req.seed.wrapping_add(image as u64);
            let noise = Tensor::from_vec(
                gaussian_noise(seed, channels * h * w),
                (channels, h, w),
                &self.device,
            )?;
            let step0 = Progress::Step {
                step: 0,
                total: req.steps,
                first: image,
                count: 1,
            };
            if progress(step0) == Control::Cancel {
                return Err(EngineError::Cancelled);
            }
            let latent = self.denoise(&noise, &caption, req.steps, |step, clean| {
                let state = Progress::Step {
                    step,
                    total: req.steps,
                    first: image,
                    count: 1,
                };
                if progress(state) == Control::Cancel {
                    return Ok(Control::Cancel);
                }
                if let Some(index) = due.iter().position(|&s| s == step) {
                    let pixels = self.decode(clean, req.height, req.width)?;
                    let preview = Progress::Preview {
                        request,
                        image,
                        index,
                        step,
                        pixels: &pixels,
                    };
                    let _ = progress(preview);
                }
                Ok(Control::Continue)
            })?;
            phases.denoise += started.elapsed();
            if progress(Progress::Decoding) == Control::Cancel {
                return Err(EngineError::Cancelled);
            }
            let started = Instant::now();
            images.push(self.decode(&latent, req.height, req.width)?);
            phases.decode += started.elapsed();
        }
        Ok(Generation {
            images,
            prompt,
            phases,
            device: RUNS_ON.into(),
        })
    }
}

impl Pipeline for ZImagePipeline {
    /// Z-Image-Turbo's rules: sides on a grid of 16 (the autoencoder's 8× times 2×2
    /// patches), 256 to 2048, 1024² by default; 8 steps (it is distilled for them), at most
    /// 50; no guidance (Turbo runs without) and no negative prompt.
    fn rules(&self) -> ModelRules {
        ModelRules {
            family: "Z-Image-Turbo".into(),
            multiple: 16,
            min_side: 256,
            max_side: 2048,
            max_pixels: 2048 * 2048,
            default_size: Dimensions::new(1024, 1024),
            default_steps: 8,
            max_steps: 50,
            default_guidance: None,
            takes_negative_prompt: false,
        }
    }

    fn device(&self) -> Option<String> {
        Some(RUNS_ON.into())
    }

    fn generate_batch(
        &mut self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> pictor_core::Result<Vec<Generation>> {
        reqs.iter()
            .enumerate()
            .map(|(i, r)| self.run(r, i, progress).map_err(PipelineError::from))
            .collect()
    }
}
