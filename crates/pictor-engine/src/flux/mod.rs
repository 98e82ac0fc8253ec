//! FLUX.1 (schnell, and dev with its guidance-distilled fine-tunes: [`Variant`]): CLIP-L
//! and T5 text encoders, the flux transformer, each variant's schedule and the flux
//! autoencoder's decoder.
//!
//! The transformer is ours (`model.rs`, one network over dense or quantized layers), as is
//! the decoder (`decoder.rs`, on faster CPU kernels); the text encoders are
//! candle-transformers' (`models::t5`, `models::clip::text_model`) for dense weights. This module owns everything around them
//! that decides parity with diffusers: tokenization, seeded noise, packing, the sigma
//! schedule, the Euler update in f32, and the 8-bit conversion. Each network is also a
//! component of its own ([`transformer::Transformer`], [`vae::Vae`]) for benches and staged
//! loading.

mod attention;
mod blocks;
pub mod config;
pub mod decoder;
mod denoiser;
pub(crate) mod edit;
pub mod encoder;
pub use denoiser::{Denoiser, StepState, img2img_start, latent_mask};
pub(crate) use denoiser::{Known, noised};
mod fit;
pub use fit::{Architecture, validate};
pub mod memory;
pub(crate) mod model;
pub use attention::{AttentionKernel, set_attention_kernel};
pub use model::{set_mlp_block_elements, tensor_names};
pub mod sampling;
pub mod selfcheck;
pub mod transformer;
pub mod vae;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pictor_core::{
    Control, Dimensions, Generation, GenerationRequest, ModelRules, PartMemory, Phases, Pipeline,
    PipelineError, Progress, RgbImage, preview_steps,
};

use crate::{
    device::{DTypeChoice, DeviceChoice},
    error::{EngineError, Result},
    image::to_rgb8,
    layout::ModelFiles,
    text::{ClipEncoder, Embeddings, FixedLengthTokenizer, T5Encoder, TextEncoders},
};

/// The FLUX.1 variants, told apart by the transformer's weights: a guidance embedding
/// (`guidance_in`) makes a guidance-distilled model, FLUX.1-dev or one of its fine-tunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Timestep-distilled for 1 to 4 steps; no guidance; an unshifted schedule.
    Schnell,
    /// Guidance-distilled: a guidance scale as input, a schedule shifted by image size.
    Dev,
}

impl Variant {
    /// The variant of a transformer with this configuration.
    pub fn of(config: &candle_transformers::models::flux::model::Config) -> Self {
        if config.guidance_embed {
            Self::Dev
        } else {
            Self::Schnell
        }
    }

    /// The family name clients see (`/v1/models`, receipts' logs).
    pub fn name(self) -> &'static str {
        match self {
            Self::Schnell => "FLUX.1-schnell",
            Self::Dev => "FLUX.1-dev",
        }
    }

    /// Most T5 tokens per prompt, as Black Forest Labs and diffusers run each: 256 for
    /// schnell, 512 for dev.
    pub fn max_sequence_length(self) -> usize {
        match self {
            Self::Schnell => 256,
            Self::Dev => 512,
        }
    }

    /// The variant's rules: sides on a grid of 16 pixels (the autoencoder's 8× times the
    /// transformer's 2×2 patches), 256 to 2048 a side as Black Forest Labs serve them, at
    /// most 2048² pixels, 1024² by default; no negative prompt. Schnell takes 4 steps (it
    /// is distilled for them), at most 50, and no guidance; dev 28 by default (diffusers'
    /// default), at most 100, and a guidance scale of 3.5 by default.
    pub fn rules(self) -> ModelRules {
        let (default_steps, max_steps, default_guidance) = match self {
            Self::Schnell => (4, 50, None),
            Self::Dev => (28, 100, Some(3.5)),
        };
        ModelRules {
            family: self.name().into(),
            multiple: 16,
            min_side: 256,
            max_side: 2048,
            max_pixels: 2048 * 2048,
            default_size: Dimensions::new(1024, 1024),
            default_steps,
            max_steps,
            default_guidance,
            takes_negative_prompt: false,
            takes_loras: true,
        }
    }
}

/// How to load and run the pipeline.
#[derive(Debug, Clone)]
pub struct FluxOptions {
    /// Where to run.
    pub device: DeviceChoice,
    /// Compute dtype.
    pub dtype: DTypeChoice,
    /// Most T5 tokens per prompt (`None`: the variant's, [`Variant::max_sequence_length`]);
    /// a tokenizer that declares a smaller `model_max_length` uses that.
    pub max_sequence_length: Option<usize>,
    /// Most images denoised together through the transformer.
    pub max_batch: usize,
    /// Bytes the model may take (`None`: no limit); see [`memory::plan`].
    pub memory_budget: Option<u64>,
    /// The folder of LoRA files requests may name (`None`: requests with LoRAs are
    /// refused).
    pub lora_dir: Option<std::path::PathBuf>,
}

impl Default for FluxOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            dtype: DTypeChoice::Auto,
            max_sequence_length: None,
            max_batch: 4,
            memory_budget: None,
            lora_dir: None,
        }
    }
}

/// A loaded FLUX.1 pipeline.
pub struct FluxPipeline {
    text: TextEncoders,
    /// Its transformer is staged out while T5 encodes (see [`memory::plan`]).
    denoiser: Denoiser,
    /// The autoencoder's encoder, loaded by the first edit.
    encoder: Option<encoder::Encoder>,
    files: ModelFiles,
    plan: memory::MemoryPlan,
    device: Device,
    dtype: DType,
    /// [`Generation::device`] for every result.
    ran_on: String,
    loras: Option<crate::lora::LoraLibrary>,
    options: FluxOptions,
}

impl FluxPipeline {
    /// Loads every part, after checking they fit the memory budget (resident, or staged:
    /// then the transformer stays loaded and T5 is loaded for each request's prompts).
    /// Errors name the part, the file and the tensor at fault.
    pub fn load(files: &ModelFiles, options: FluxOptions) -> Result<Self> {
        let device = options.device.open()?;
        let dtype = options.dtype.resolve(&device);
        let described = crate::device::describe(&device);
        let plan = match crate::device::free_memory(&device) {
            Some(free) => memory::plan_gpu(
                files,
                dtype,
                &described,
                memory::gpu_budget(free),
                options.memory_budget,
            )?,
            None => memory::plan(files, dtype, options.memory_budget)?,
        };
        let variant = Variant::of(&validate(files)?.transformer.config);
        let ran_on = format!("{described} {}", crate::device::dtype_name(dtype));
        tracing::info!(
            device = %ran_on,
            staged = plan.staged,
            t5_on_host = plan.t5_on_host.is_some(),
            "loading {}",
            variant.name()
        );
        let t5_length = options
            .max_sequence_length
            .unwrap_or(variant.max_sequence_length());
        if options.dtype == DTypeChoice::Auto && device.is_cpu() && crate::ops::native_bf16() {
            tracing::info!(
                "this CPU has native bf16 dot products: dtype = \"bf16\" runs dense weights \
                 about twice as fast as f32, in half the memory"
            );
        }
        crate::device::set_f32_products(&device, dtype);
        let (t5_device, t5_dtype) = plan.t5_placement(&device, dtype);
        let clip = ClipEncoder::load(&files.clip, dtype, &device)?;
        let text = TextEncoders {
            clip_tokenizer: match &files.clip_tokenizer {
                Some(path) => FixedLengthTokenizer::clip(path, clip.max_positions())?,
                None => FixedLengthTokenizer::builtin_clip(clip.max_positions())?,
            },
            t5_tokenizer: match &files.t5_tokenizer {
                Some(path) => FixedLengthTokenizer::t5(path, t5_length)?,
                None => FixedLengthTokenizer::builtin_t5(t5_length)?,
            },
            clip,
            t5: Some(T5Encoder::load(&files.t5, t5_dtype, &t5_device)?),
        };
        let mut text = text;
        if plan.staged {
            // Loaded once to check it, then freed until a request needs it.
            text.t5 = None;
        }
        let denoiser = Denoiser::load(&files.transformer, &files.vae, dtype, &device)?;
        crate::heap::release_freed_memory();
        Ok(Self {
            text,
            denoiser,
            encoder: None,
            files: files.clone(),
            plan,
            device,
            dtype,
            ran_on,
            loras: options
                .lora_dir
                .clone()
                .map(|dir| crate::lora::LoraLibrary::new(dir, crate::lora::DEFAULT_CACHE_BYTES)),
            options,
        })
    }

    /// Which FLUX.1 this is.
    pub fn variant(&self) -> Variant {
        Variant::of(&self.denoiser.transformer_arch().config)
    }

    /// Each part's memory and whether it stays loaded.
    pub fn memory(&self) -> &[memory::PartMemory] {
        &self.plan.parts
    }

    /// Staged: frees the transformer and loads T5 (for encoding prompts).
    fn stage_t5(&mut self) -> Result<()> {
        if self.text.t5.is_none() {
            self.denoiser.unload_transformer();
            let (device, dtype) = self.plan.t5_placement(&self.device, self.dtype);
            self.text.t5 = Some(T5Encoder::load(&self.files.t5, dtype, &device)?);
            crate::heap::release_freed_memory();
        }
        Ok(())
    }

    /// Staged: frees T5 and loads the transformer (for denoising).
    fn stage_transformer(&mut self) -> Result<()> {
        if !self.denoiser.transformer_loaded() {
            self.text.t5 = None;
            self.denoiser.reload_transformer()?;
        }
        Ok(())
    }

    /// The compute dtype in use.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The transformer and decoder, which run from embeddings and noise.
    pub fn denoiser(&self) -> &Denoiser {
        &self.denoiser
    }

    /// Encodes a prompt with both text encoders (staged: loading T5 first).
    pub fn encode_prompt(&mut self, prompt: &str) -> Result<Embeddings> {
        self.stage_t5()?;
        self.text.encode(prompt)
    }

    /// The tokenizers (for inspection and tests).
    pub fn tokenize(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok((
            self.text.clip_tokenizer.encode(prompt)?.ids,
            self.text.t5_tokenizer.encode(prompt)?.ids,
        ))
    }

    /// Decodes and reports the previews due at this step for the images of `chunk`
    /// (`(request, image, seed)`); `due[r]` lists request `r`'s preview steps.
    fn previews(
        &self,
        state: &StepState<'_>,
        chunk: &[(usize, usize, u64)],
        due: &[Vec<usize>],
        height: usize,
        width: usize,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<()> {
        let wanted: Vec<(usize, usize, usize, usize)> = chunk
            .iter()
            .enumerate()
            .filter_map(|(row, &(r, i, _))| {
                let index = due[r].iter().position(|&s| s == state.step)?;
                Some((row, r, i, index))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let Some(clean) = state.predicted_clean()? else {
            return Ok(());
        };
        for (row, request, image, index) in wanted {
            let pixels = self
                .denoiser
                .decode(&clean.narrow(0, row, 1)?, height, width)?;
            if let Some(preview) = to_rgb8(&pixels)?.first() {
                progress(Progress::Preview {
                    request,
                    image,
                    index,
                    step: state.step,
                    pixels: preview,
                });
            }
        }
        Ok(())
    }
}

impl Pipeline for FluxPipeline {
    fn rules(&self) -> ModelRules {
        self.variant().rules()
    }

    fn memory(&self) -> Vec<PartMemory> {
        self.plan.parts.clone()
    }

    fn device(&self) -> Option<String> {
        Some(self.ran_on.clone())
    }

    fn generate_batch(
        &mut self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> pictor_core::Result<Vec<Generation>> {
        self.run_batch(reqs, progress).map_err(PipelineError::from)
    }

    fn idle(&mut self) {
        crate::heap::release_freed_memory();
    }
}

impl FluxPipeline {
    /// [`Pipeline::generate_batch`] in the engine's own error type. A request off the grid
    /// or a batch that breaks [`Pipeline::compatible`] is refused before anything runs.
    fn run_batch(
        &mut self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Vec<Generation>> {
        let Some(first_req) = reqs.first() else {
            return Ok(Vec::new());
        };
        let runnable = self.rules().without_serving_limits();
        for (i, req) in reqs.iter().enumerate() {
            runnable.check(req)?;
            if i > 0 && !self.compatible(first_req, req) {
                return Err(EngineError::InvalidInput {
                    field: "size",
                    message: "a batch must share size and steps, and an edit runs alone".into(),
                });
            }
        }
        let (width, height, steps) = (first_req.width, first_req.height, first_req.steps);
        // The model's default where the request leaves it (`pictor generate`'s callers).
        let guidance = first_req.guidance.or(self.rules().default_guidance);
        if progress(Progress::Encoding) == Control::Cancel {
            return Err(EngineError::Cancelled);
        }
        let mut phases = Phases::default();
        let started = Instant::now();
        // A batch shares its LoRAs (`Pipeline::compatible`): read and checked before
        // anything runs, the text encoder's used for the prompts, the transformer's
        // attached for the batch and taken off when `applied` drops, however it ends.
        let loras = self.prepare_loras(&first_req.loras)?;
        let embeddings = reqs
            .iter()
            .map(|r| self.encode_prompt_with(&r.prompt, &loras))
            .collect::<Result<Vec<_>>>()?;
        self.stage_transformer()?;
        let applied = self.attach_loras(loras)?;
        phases.encode = started.elapsed();
        // Every image of every request, as (request, image index, seed), in order.
        let items: Vec<(usize, usize, u64)> = reqs
            .iter()
            .enumerate()
            .flat_map(|(r, req)| (0..req.n).map(move |i| (r, i, req.seed.wrapping_add(i as u64))))
            .collect();
        // An edit runs alone (see `Pipeline::compatible`), the last of its steps only.
        let edit = match &first_req.edit {
            None => None,
            Some(edit) => {
                if self.encoder.is_none() {
                    let device = self.device.clone();
                    self.encoder = Some(encoder::Encoder::load(
                        &self.files.vae,
                        self.dtype,
                        &device,
                    )?);
                }
                let encoder = self
                    .encoder
                    .as_ref()
                    .ok_or_else(|| EngineError::load("encoder", "not loaded"))?;
                Some(edit::prepare(
                    encoder,
                    edit,
                    width,
                    height,
                    steps,
                    &self.device,
                )?)
            }
        };
        let steps_run = edit.as_ref().map_or(steps, |e| e.steps_run);
        let previews: Vec<Vec<usize>> = reqs
            .iter()
            .map(|r| preview_steps(steps_run, r.previews))
            .collect();
        let mut images: Vec<Vec<RgbImage>> = reqs.iter().map(|r| Vec::with_capacity(r.n)).collect();
        for (chunk_index, chunk) in items.chunks(self.options.max_batch.max(1)).enumerate() {
            let first = chunk_index * self.options.max_batch.max(1);
            let mut noise = Vec::with_capacity(chunk.len());
            let mut sequence = Vec::with_capacity(chunk.len());
            let mut pooled = Vec::with_capacity(chunk.len());
            for &(r, _, seed) in chunk {
                noise.push(self.denoiser.noise(seed, 1, height, width)?);
                sequence.push(embeddings[r].sequence.clone());
                pooled.push(embeddings[r].pooled.clone());
            }
            let batch = Embeddings {
                sequence: Tensor::cat(&sequence, 0)?,
                pooled: Tensor::cat(&pooled, 0)?,
                prompt: embeddings[chunk[0].0].prompt.clone(),
            };
            let count = chunk.len();
            let started = Instant::now();
            let on_step = |state: &StepState<'_>| {
                let step = state.step;
                let control = progress(Progress::Step {
                    step,
                    total: steps_run,
                    first,
                    count,
                });
                if control == Control::Continue {
                    self.previews(state, chunk, &previews, height, width, progress)?;
                }
                Ok(control)
            };
            let noise = Tensor::cat(&noise, 0)?;
            let latents = match &edit {
                None => self
                    .denoiser
                    .denoise(&noise, &batch, steps, guidance, on_step)?,
                Some(edit) => edit::denoise(
                    &self.denoiser,
                    edit,
                    &noise,
                    &batch,
                    steps,
                    guidance,
                    on_step,
                )?,
            };
            phases.denoise += started.elapsed();
            if progress(Progress::Decoding) == Control::Cancel {
                return Err(EngineError::Cancelled);
            }
            let started = Instant::now();
            let pixels = self.denoiser.decode(&latents, height, width)?;
            phases.decode += started.elapsed();
            for (&(r, _, _), image) in chunk.iter().zip(to_rgb8(&pixels)?) {
                images[r].push(image);
            }
        }
        Ok(images
            .into_iter()
            .zip(embeddings)
            .map(|(images, emb)| Generation {
                images,
                prompt: emb.prompt,
                phases,
                device: self.ran_on.clone(),
                loras: applied.used().to_vec(),
            })
            .collect())
    }

    /// Reads `loras` (files in the LoRA folder) and checks them against this model's
    /// transformer (from its architecture: it may be staged out) and CLIP, before anything
    /// runs.
    pub fn prepare_loras(
        &self,
        loras: &[pictor_core::LoraRequest],
    ) -> Result<crate::lora::Prepared> {
        crate::lora::prepare(
            self.loras.as_ref(),
            loras,
            || model::tensor_names(&self.denoiser.transformer_arch().config),
            crate::weights::Scheme::DiffusersFluxTransformer,
            Some(self.text.clip.layers()),
            &self.device,
        )
    }

    /// Attaches prepared LoRAs' transformer updates to the loaded transformer until the
    /// answer drops; the shared weights are not changed.
    pub fn attach_loras(&self, loras: crate::lora::Prepared) -> Result<crate::lora::Applied> {
        loras.attach(|| self.denoiser.layers())
    }

    /// [`FluxPipeline::encode_prompt`] through CLIP with prepared LoRAs' text-encoder
    /// updates: a patched copy for this call, the shared encoder left as it is.
    pub fn encode_prompt_with(
        &mut self,
        prompt: &str,
        loras: &crate::lora::Prepared,
    ) -> Result<Embeddings> {
        if loras.text_encoder().is_empty() {
            return self.encode_prompt(prompt);
        }
        let patched = self.text.clip.with_deltas(loras.text_encoder().clone())?;
        let shared = std::mem::replace(&mut self.text.clip, patched);
        let embeddings = self.encode_prompt(prompt);
        self.text.clip = shared;
        embeddings
    }
}
