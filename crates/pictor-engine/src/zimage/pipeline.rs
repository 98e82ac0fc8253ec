//! The Z-Image-Turbo pipeline, as diffusers' `ZImagePipeline` runs it with Turbo's
//! settings: the prompt in Qwen3's chat template, cut at 512 tokens (template included),
//! encoded to the features of the encoder's last layer but one; 8 steps on the shifted
//! schedule, no guidance; the FLUX autoencoder to decode.
//!
//! Loaded from [`ZImageFiles`] in any layout, on the CPU, as [`super::memory::plan`]
//! decides within the memory budget: f32 or bf16 weight matrices, the text encoder and the
//! transformer resident or taking turns.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pictor_core::{
    Control, Dimensions, EditInput, Generation, GenerationRequest, ModelRules, PartMemory, Phases,
    Pipeline, PipelineError, Progress, PromptInfo, RgbImage, preview_steps,
};

use super::{encoder::TextEncoder, files::ZImageFiles, json, transformer::Transformer};
use crate::{
    DTypeChoice,
    error::{EngineError, Result},
    flux::{
        Known,
        edit::{self, Prepared},
        encoder::Encoder,
        noised, sampling,
        vae::Vae,
    },
    image::to_rgb8,
    noise::gaussian_noise,
};

/// Most tokens the text encoder reads, template included (diffusers' default).
const MAX_TOKENS: usize = 512;

/// How to load a Z-Image model.
#[derive(Debug, Clone, Default)]
pub struct ZImageOptions {
    /// The weights' dtype: `Auto` is f32 when the model fits the budget in f32, else bf16
    /// (Z-Image-Turbo is 40 GB in f32, 20 GB in bf16). Quantized (GGUF) transformers keep
    /// their blocks whatever this says.
    pub dtype: DTypeChoice,
    /// Bytes the model may take (`None`: no limit): see [`super::memory::plan`]. A model
    /// over it even staged is refused before loading.
    pub memory_budget: Option<u64>,
    /// The folder of LoRA files requests may name (`None`: requests with LoRAs are
    /// refused).
    pub lora_dir: Option<std::path::PathBuf>,
}

/// A loaded Z-Image-Turbo.
pub struct ZImagePipeline {
    tokenizer: tokenizers::Tokenizer,
    /// `None` while staged out.
    encoder: Option<TextEncoder>,
    /// `None` while staged out.
    transformer: Option<Transformer>,
    /// The text encoder and the transformer take turns (see [`super::memory`]).
    staged: bool,
    files: ZImageFiles,
    dtype: DType,
    /// Each part's memory, as planned.
    parts: Vec<PartMemory>,
    vae: Vae,
    /// The autoencoder's encoder, loaded by the first edit.
    image_encoder: Option<Encoder>,
    shift: f64,
    device: Device,
    /// Where it runs and in which dtype, as [`Generation::device`] spells it.
    runs_on: String,
    /// The transformer's hyper-parameters (it may be staged out).
    config: super::transformer::Config,
    loras: Option<crate::lora::LoraLibrary>,
}

impl ZImagePipeline {
    /// Loads the diffusers folder `dir` on the CPU in f32, with no memory limit.
    pub fn load(dir: &std::path::Path) -> Result<Self> {
        let files = ZImageFiles::diffusers(dir)?;
        Self::load_files(
            &files,
            ZImageOptions {
                dtype: DTypeChoice::F32,
                ..ZImageOptions::default()
            },
        )
    }

    /// Loads `files` on the CPU as `options` say.
    pub fn load_files(files: &ZImageFiles, options: ZImageOptions) -> Result<Self> {
        let device = Device::Cpu;
        let (plan, parts) = super::memory::plan(files, options.dtype, options.memory_budget)?;
        let dtype = plan.dtype;
        let tokenizer = super::tokenizer::load(files.tokenizer.as_deref())?;
        let encoder = TextEncoder::open(&files.text_encoder, dtype, &device)?;
        // Staged, the encoder stays for the first request and the transformer is read from
        // its headers alone, to be loaded when that request has been encoded.
        let (transformer, config) = match plan.staged {
            true => (None, files.transformer_config()?),
            false => {
                let (t, c) = Transformer::open(&files.transformer, dtype, &device)?;
                (Some(t), c)
            }
        };
        if config.cap_feat_dim != encoder.hidden() {
            return Err(EngineError::load(
                "Z-Image",
                format!(
                    "the transformer reads features of width {}, the text encoder makes {}",
                    config.cap_feat_dim,
                    encoder.hidden()
                ),
            ));
        }
        let runs_on = format!(
            "{} {}",
            crate::device::describe(&device),
            crate::device::dtype_name(dtype)
        );
        tracing::info!(device = %runs_on, layout = files.layout, staged = plan.staged, "loaded Z-Image");
        let vae = Vae::load(&files.vae, DType::F32, &device)?;
        let shift = files
            .scheduler
            .as_deref()
            .and_then(|p| json(p).ok())
            .and_then(|c| c.get("shift")?.as_f64())
            .unwrap_or(3.0);
        crate::heap::release_freed_memory();
        Ok(Self {
            tokenizer,
            encoder: Some(encoder),
            transformer,
            staged: plan.staged,
            files: files.clone(),
            dtype,
            parts,
            vae,
            image_encoder: None,
            shift,
            device,
            runs_on,
            config,
            loras: options
                .lora_dir
                .clone()
                .map(|dir| crate::lora::LoraLibrary::new(dir, crate::lora::DEFAULT_CACHE_BYTES)),
        })
    }

    /// Reads `loras` and checks them against the transformer's layers (Z-Image's original
    /// names; diffusers' and kohya's spellings found through them). Its text encoder takes
    /// none.
    pub fn prepare_loras(
        &self,
        loras: &[pictor_core::LoraRequest],
    ) -> Result<crate::lora::Prepared> {
        crate::lora::prepare(
            self.loras.as_ref(),
            loras,
            || super::transformer::tensor_names(&self.config),
            crate::weights::Scheme::DiffusersZImage,
            None,
            &self.device,
        )
    }

    /// Attaches prepared LoRAs to the loaded transformer until the answer drops.
    pub fn attach_loras(&self, loras: crate::lora::Prepared) -> Result<crate::lora::Applied> {
        loras.attach(|| {
            self.transformer
                .as_ref()
                .map(Transformer::layers)
                .ok_or_else(|| EngineError::load("transformer", "staged out"))
        })
    }

    /// Where it runs, as receipts spell it.
    pub fn runs_on(&self) -> &str {
        &self.runs_on
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
        let encoder = self
            .encoder
            .as_ref()
            .ok_or_else(|| EngineError::load("text encoder", "staged out"))?;
        let features = encoder.forward(ids, &self.device)?;
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
        on_step: impl FnMut(usize, &Tensor) -> Result<Control>,
    ) -> Result<Tensor> {
        let start = noise.to_dtype(DType::F32)?;
        self.steps_from(start, caption, &self.sigmas(steps), None, on_step)
    }

    /// An edit of `steps` steps from `noise` `(C, H/8, W/8)`, as diffusers'
    /// `ZImageImg2ImgPipeline` runs it (or `ZImageInpaintPipeline` with a mask): the image
    /// encoded (its posterior mean), noised to the sigma where the strength starts, the
    /// remaining steps run, and with a mask the kept region put back at each step's sigma.
    pub fn denoise_edit(
        &mut self,
        edit: &EditInput,
        noise: &Tensor,
        caption: &Tensor,
        steps: usize,
        on_step: impl FnMut(usize, &Tensor) -> Result<Control>,
    ) -> Result<Tensor> {
        let prepared = self.prepare_edit(edit, edit.image.width, edit.image.height, steps)?;
        self.denoise_prepared(&prepared, noise, caption, steps, on_step)
    }

    /// Encodes an edit's image and brings its mask to the latents (the autoencoder's encoder
    /// is loaded by the first edit).
    fn prepare_edit(
        &mut self,
        edit: &EditInput,
        width: usize,
        height: usize,
        steps: usize,
    ) -> Result<Prepared> {
        let encoder = match self.image_encoder.take() {
            Some(e) => e,
            None => Encoder::load(&self.files.vae, DType::F32, &self.device)?,
        };
        let prepared = edit::prepare(&encoder, edit, width, height, steps, &self.device);
        self.image_encoder = Some(encoder);
        prepared
    }

    fn denoise_prepared(
        &self,
        edit: &Prepared,
        noise: &Tensor,
        caption: &Tensor,
        steps: usize,
        on_step: impl FnMut(usize, &Tensor) -> Result<Control>,
    ) -> Result<Tensor> {
        let all = self.sigmas(steps);
        let sigmas = &all[steps - edit.steps_run..];
        let image = edit.latents().squeeze(0)?;
        let noise = noise.to_dtype(DType::F32)?;
        let keep = match edit.mask() {
            None => None,
            Some(mask) => {
                let repaint = mask.squeeze(0)?.broadcast_as(image.shape())?.contiguous()?;
                Some(Known::new(image.clone(), noise.clone(), repaint))
            }
        };
        let start = noised(&image, &noise, sigmas[0])?;
        self.steps_from(start, caption, sigmas, keep.as_ref(), on_step)
    }

    /// Euler steps from `x` at `sigmas[0]` down each sigma in turn; with `keep`, its kept
    /// region is put back after each step.
    fn steps_from(
        &self,
        mut x: Tensor,
        caption: &Tensor,
        sigmas: &[f64],
        keep: Option<&Known>,
        mut on_step: impl FnMut(usize, &Tensor) -> Result<Control>,
    ) -> Result<Tensor> {
        for (i, pair) in sigmas.windows(2).enumerate() {
            // The model predicts clean minus noise at 1 - sigma; the pipeline negates it.
            let v = self
                .transformer
                .as_ref()
                .ok_or_else(|| EngineError::load("transformer", "staged out"))?
                .forward(&x.unsqueeze(1)?, 1.0 - pair[0], caption)?
                .squeeze(1)?;
            let clean = (&x + (&v * pair[0])?)?;
            x = (x - (v * (pair[1] - pair[0]))?)?;
            if let Some(keep) = keep {
                x = keep.merge(&x, pair[1])?;
            }
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

    /// Loads the text encoder if it is staged out (the transformer making room).
    fn stage_encoder(&mut self) -> Result<()> {
        if self.encoder.is_none() {
            self.transformer = None;
            crate::heap::release_freed_memory();
            let encoder = TextEncoder::open(&self.files.text_encoder, self.dtype, &self.device)?;
            self.encoder = Some(encoder);
        }
        Ok(())
    }

    /// Loads the transformer if it is staged out (the text encoder making room).
    fn stage_transformer(&mut self) -> Result<()> {
        if self.transformer.is_none() {
            self.encoder = None;
            crate::heap::release_freed_memory();
            let (transformer, _) =
                Transformer::open(&self.files.transformer, self.dtype, &self.device)?;
            self.transformer = Some(transformer);
        }
        Ok(())
    }

    /// Whether the text encoder and the transformer take turns.
    pub fn staged(&self) -> bool {
        self.staged
    }

    fn run(
        &mut self,
        req: &GenerationRequest,
        request: usize,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Generation> {
        self.rules().without_serving_limits().check(req)?;
        // LoRAs are read and checked before anything runs, attached once the transformer
        // is loaded and taken off when `applied` drops.
        let loras = self.prepare_loras(&req.loras)?;
        if progress(Progress::Encoding) == Control::Cancel {
            return Err(EngineError::Cancelled);
        }
        let mut phases = Phases::default();
        let started = Instant::now();
        self.stage_encoder()?;
        let (caption, prompt) = self.encode_prompt(&req.prompt)?;
        self.stage_transformer()?;
        let applied = self.attach_loras(loras)?;
        let edit = match &req.edit {
            Some(edit) => Some(self.prepare_edit(edit, req.width, req.height, req.steps)?),
            None => None,
        };
        phases.encode = started.elapsed();
        let (h, w) = (req.height / 8, req.width / 8);
        let channels = self.vae.arch().z_channels;
        let steps_run = edit.as_ref().map_or(req.steps, |e| e.steps_run);
        let due = preview_steps(steps_run, req.previews);
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
                total: steps_run,
                first: image,
                count: 1,
            };
            if progress(step0) == Control::Cancel {
                return Err(EngineError::Cancelled);
            }
            let on_step = |step, clean: &Tensor| {
                let state = Progress::Step {
                    step,
                    total: steps_run,
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
            };
            let latent = match &edit {
                None => self.denoise(&noise, &caption, req.steps, on_step)?,
                Some(edit) => self.denoise_prepared(edit, &noise, &caption, req.steps, on_step)?,
            };
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
            device: self.runs_on.clone(),
            loras: applied.used().to_vec(),
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
            takes_loras: true,
        }
    }

    fn memory(&self) -> Vec<PartMemory> {
        self.parts.clone()
    }

    fn device(&self) -> Option<String> {
        Some(self.runs_on.clone())
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
