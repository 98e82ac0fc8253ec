//! FLUX.1-schnell: CLIP-L and T5 text encoders, the flux transformer, the schnell
//! schedule and the flux autoencoder's decoder.
//!
//! The networks are candle-transformers' (`models::flux`, `models::t5`,
//! `models::clip::text_model`), which follow the Black Forest Labs reference; this module
//! owns everything around them that decides parity with diffusers: tokenization, seeded
//! noise, packing, the sigma schedule, the Euler update in f32, and the 8-bit conversion.

pub mod config;
pub mod decoder;
pub mod sampling;

use std::{sync::Arc, time::Instant};

use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::flux::{
    WithForward, autoencoder, model::Flux, quantized_model::Flux as QuantizedFlux,
};

use crate::{
    device::{DTypeChoice, DeviceChoice},
    error::{EngineError, Result},
    image::{RgbImage, to_rgb8, to_unit_range},
    layout::{ModelFiles, Part},
    noise::gaussian_noise,
    pipeline::{Control, Generation, GenerationRequest, Phases, Pipeline, Progress, preview_steps},
    text::{ClipEncoder, Embeddings, FixedLengthTokenizer, T5Encoder, TextEncoders},
    weights::{GgufFile, MappedWeights, SafetensorFiles, Scheme},
};

/// Latent channels of the flux autoencoder (before 2×2 packing).
const LATENT_CHANNELS: usize = 16;

/// How to load and run the pipeline.
#[derive(Debug, Clone)]
pub struct FluxOptions {
    /// Where to run.
    pub device: DeviceChoice,
    /// Compute dtype.
    pub dtype: DTypeChoice,
    /// Most T5 tokens per prompt: 256 for schnell (diffusers' and BFL's value); a tokenizer
    /// that declares a smaller `model_max_length` uses that.
    pub max_sequence_length: usize,
    /// Most images denoised together through the transformer.
    pub max_batch: usize,
}

impl Default for FluxOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            dtype: DTypeChoice::Auto,
            max_sequence_length: 256,
            max_batch: 4,
        }
    }
}

enum Denoiser {
    Dense(Box<Flux>),
    Quantized(Box<QuantizedFlux>),
}

/// The sampler after a step, as [`FluxPipeline::denoise`] shows it to its callback.
pub struct StepState<'a> {
    /// Steps finished (0 before the first).
    pub step: usize,
    latents: &'a Tensor,
    velocity: Option<&'a Tensor>,
    sigma: f64,
}

impl StepState<'_> {
    /// The clean latents predicted at this step, `x₀ = x − σ·v` (packed, f32): what the
    /// image would be if the last velocity held to the end. `None` before the first step.
    /// It is the rectified-flow estimate every step already makes, so a preview costs one
    /// decode and no extra transformer pass.
    pub fn predicted_clean(&self) -> Result<Option<Tensor>> {
        let Some(v) = self.velocity else {
            return Ok(None);
        };
        Ok(Some((self.latents - (v * self.sigma)?)?))
    }
}

/// A loaded FLUX.1-schnell pipeline.
pub struct FluxPipeline {
    text: TextEncoders,
    denoiser: Denoiser,
    decoder: decoder::Decoder,
    vae: autoencoder::Config,
    transformer: candle_transformers::models::flux::model::Config,
    device: Device,
    dtype: DType,
    options: FluxOptions,
}

fn open_transformer(
    part: &Part,
    dtype: DType,
    device: &Device,
) -> Result<(Denoiser, candle_transformers::models::flux::model::Config)> {
    if part.is_gguf() {
        let gguf = GgufFile::open(&part.files[0])?;
        let cfg = config::transformer(&gguf, part.config.as_deref())?;
        let vb = gguf.var_builder(device)?;
        let model = QuantizedFlux::new(&cfg, vb).map_err(|e| {
            EngineError::load("transformer", format!("{}: {e}", gguf.path().display()))
        })?;
        return Ok((Denoiser::Quantized(Box::new(model)), cfg));
    }
    let files = Arc::new(SafetensorFiles::open(&part.files)?);
    let weights = if let Some(prefix) = files.prefix_of("double_blocks.0.img_attn.qkv.weight") {
        MappedWeights::new(files, Scheme::Identity, prefix)
    } else if let Some(prefix) = files.prefix_of("transformer_blocks.0.attn.to_q.weight") {
        MappedWeights::new(files, Scheme::DiffusersFluxTransformer, prefix)
    } else {
        return Err(EngineError::UnknownLayout {
            path: files.path_of(""),
            message: "neither Black Forest Labs (double_blocks.N...) nor diffusers (transformer_blocks.N...) transformer names".into(),
        });
    };
    let cfg = config::transformer(&weights, part.config.as_deref())?;
    let model = Flux::new(&cfg, weights.var_builder(dtype, device))
        .map_err(|e| EngineError::load("transformer", e))?;
    Ok((Denoiser::Dense(Box::new(model)), cfg))
}

fn open_vae(
    part: &Part,
    dtype: DType,
    device: &Device,
) -> Result<(decoder::Decoder, autoencoder::Config)> {
    let files = Arc::new(SafetensorFiles::open(&part.files)?);
    let weights = if let Some(prefix) = files.prefix_of("decoder.up.0.block.0.conv1.weight") {
        MappedWeights::new(files, Scheme::Identity, prefix)
    } else if let Some(prefix) = files.prefix_of("decoder.up_blocks.0.resnets.0.conv1.weight") {
        let levels = (0..)
            .take_while(|k| {
                files.contains(&format!(
                    "{prefix}decoder.up_blocks.{k}.resnets.0.conv1.weight"
                ))
            })
            .count();
        MappedWeights::new(files, Scheme::DiffusersVae { levels }, prefix)
    } else {
        return Err(EngineError::UnknownLayout {
            path: files.path_of(""),
            message: "neither Black Forest Labs (decoder.up.N...) nor diffusers (decoder.up_blocks.N...) autoencoder names".into(),
        });
    };
    let cfg = config::vae(&weights, part.config.as_deref())?;
    let decoder = decoder::Decoder::load(&cfg, weights.var_builder(dtype, device).pp("decoder"))?;
    Ok((decoder, cfg))
}

impl FluxPipeline {
    /// Loads every part. Errors name the part, the file and the tensor at fault.
    pub fn load(files: &ModelFiles, options: FluxOptions) -> Result<Self> {
        let device = options.device.open()?;
        let dtype = options.dtype.resolve(&device);
        tracing::info!(?dtype, ?device, "loading FLUX.1-schnell");
        let clip = ClipEncoder::load(&files.clip, dtype, &device)?;
        let text = TextEncoders {
            clip_tokenizer: FixedLengthTokenizer::clip(
                &files.clip_tokenizer,
                clip.max_positions(),
            )?,
            t5_tokenizer: FixedLengthTokenizer::t5(
                &files.t5_tokenizer,
                options.max_sequence_length,
            )?,
            clip,
            t5: T5Encoder::load(&files.t5, dtype, &device)?,
        };
        let (denoiser, transformer) = open_transformer(&files.transformer, dtype, &device)?;
        let (decoder, vae) = open_vae(&files.vae, dtype, &device)?;
        Ok(Self {
            text,
            denoiser,
            decoder,
            vae,
            transformer,
            device,
            dtype,
            options,
        })
    }

    /// The compute dtype in use.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The transformer's hyper-parameters, as read from the weights.
    pub fn transformer_config(&self) -> &candle_transformers::models::flux::model::Config {
        &self.transformer
    }

    /// Encodes a prompt with both text encoders.
    pub fn encode_prompt(&mut self, prompt: &str) -> Result<Embeddings> {
        self.text.encode(prompt)
    }

    /// The tokenizers (for inspection and tests).
    pub fn tokenize(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok((
            self.text.clip_tokenizer.encode(prompt)?.ids,
            self.text.t5_tokenizer.encode(prompt)?.ids,
        ))
    }

    /// One transformer evaluation: the velocity for packed latents `img` `(b, tokens, 64)`
    /// at `sigma`, returned in f32. `emb` holds one prompt (shared by the batch) or `b`.
    pub fn velocity(
        &self,
        img: &Tensor,
        emb: &Embeddings,
        sigma: f64,
        latent_hw: (usize, usize),
    ) -> Result<Tensor> {
        let b = img.dim(0)?;
        // The quantized model computes in f32 whatever the pipeline's dtype.
        let dtype = match self.denoiser {
            Denoiser::Dense(_) => self.dtype,
            Denoiser::Quantized(_) => DType::F32,
        };
        // One prompt for the whole batch, or one per image.
        let per_image = emb.sequence.dim(0)? == b;
        let txt = emb.sequence.to_dtype(dtype)?;
        let txt = if per_image {
            txt
        } else {
            txt.repeat((b, 1, 1))?
        };
        let pooled = emb.pooled.to_dtype(dtype)?;
        let pooled = if per_image {
            pooled
        } else {
            pooled.repeat((b, 1))?
        };
        let txt_ids = Tensor::zeros((b, txt.dim(1)?, 3), dtype, &self.device)?;
        let img_ids = sampling::image_ids(b, latent_hw.0, latent_hw.1, dtype, &self.device)?;
        let t = Tensor::full(sigma as f32, b, &self.device)?.to_dtype(dtype)?;
        let img = img.to_dtype(dtype)?;
        let v = match &self.denoiser {
            Denoiser::Dense(m) => m.forward(&img, &img_ids, &txt, &txt_ids, &t, &pooled, None)?,
            Denoiser::Quantized(m) => {
                m.forward(&img, &img_ids, &txt, &txt_ids, &t, &pooled, None)?
            }
        };
        Ok(v.to_dtype(DType::F32)?)
    }

    /// Denoises `noise` `(b, 16, h, w)` for `steps` schnell steps; returns the final packed
    /// latents `(b, tokens, 64)` in f32. The Euler update runs in f32 whatever the compute
    /// dtype, as diffusers' scheduler does. `on_step` sees the state before the first step
    /// (`step = 0`) and after each step; answering `Cancel` stops there.
    pub fn denoise(
        &self,
        noise: &Tensor,
        emb: &Embeddings,
        steps: usize,
        mut on_step: impl FnMut(&StepState<'_>) -> Result<Control>,
    ) -> Result<Tensor> {
        let (_, _, h, w) = noise.dims4()?;
        let mut x = sampling::pack(&noise.to_dtype(DType::F32)?)?;
        let sigmas = sampling::schedule(steps);
        let start = StepState {
            step: 0,
            latents: &x,
            velocity: None,
            sigma: 1.0,
        };
        if on_step(&start)? == Control::Cancel {
            return Err(EngineError::Cancelled);
        }
        for (i, pair) in sigmas.windows(2).enumerate() {
            let v = self.velocity(&x, emb, pair[0], (h, w))?;
            x = (x + (&v * (pair[1] - pair[0]))?)?;
            let state = StepState {
                step: i + 1,
                latents: &x,
                velocity: Some(&v),
                sigma: pair[1],
            };
            if on_step(&state)? == Control::Cancel {
                return Err(EngineError::Cancelled);
            }
        }
        Ok(x)
    }

    /// Decodes packed latents `(b, tokens, 64)` for an image of `height`×`width` into pixel
    /// values in `[0, 1]`, `(b, 3, height, width)` f32, one image at a time to bound memory.
    pub fn decode(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let (h, w) = sampling::latent_dims(height, width);
        let latents = sampling::unpack(packed, h, w)?;
        let mut images = Vec::with_capacity(latents.dim(0)?);
        for i in 0..latents.dim(0)? {
            let z = latents.narrow(0, i, 1)?;
            let z = ((z / self.vae.scale_factor)? + self.vae.shift_factor)?.to_dtype(self.dtype)?;
            images.push(to_unit_range(&self.decoder.forward(&z)?)?);
        }
        Ok(Tensor::cat(&images, 0)?)
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
            let pixels = self.decode(&clean.narrow(0, row, 1)?, height, width)?;
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

    /// The initial noise for `count` images starting at `seed`: image `i` from `seed + i`.
    pub fn noise(&self, seed: u64, count: usize, height: usize, width: usize) -> Result<Tensor> {
        let (h, w) = sampling::latent_dims(height, width);
        let per = LATENT_CHANNELS * h * w;
        let mut all = Vec::with_capacity(per * count);
        for i in 0..count {
            all.extend(gaussian_noise(seed.wrapping_add(i as u64), per));
        }
        Ok(Tensor::from_vec(
            all,
            (count, LATENT_CHANNELS, h, w),
            &self.device,
        )?)
    }
}

impl Pipeline for FluxPipeline {
    fn check(&self, req: &GenerationRequest) -> Result<()> {
        for (field, value) in [("width", req.width), ("height", req.height)] {
            if value == 0 || value % 16 != 0 {
                return Err(EngineError::InvalidInput {
                    field,
                    message: format!("{value} is not a positive multiple of 16"),
                });
            }
        }
        if req.steps == 0 {
            return Err(EngineError::InvalidInput {
                field: "steps",
                message: "must be at least 1".into(),
            });
        }
        if req.n == 0 {
            return Err(EngineError::InvalidInput {
                field: "n",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    fn generate_batch(
        &mut self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Vec<Generation>> {
        let Some(first_req) = reqs.first() else {
            return Ok(Vec::new());
        };
        for req in reqs {
            self.check(req)?;
            if !self.compatible(first_req, req) {
                return Err(EngineError::InvalidInput {
                    field: "size",
                    message: "a batch must share size and steps".into(),
                });
            }
        }
        let (width, height, steps) = (first_req.width, first_req.height, first_req.steps);
        if progress(Progress::Encoding) == Control::Cancel {
            return Err(EngineError::Cancelled);
        }
        let mut phases = Phases::default();
        let started = Instant::now();
        let embeddings = reqs
            .iter()
            .map(|r| self.encode_prompt(&r.prompt))
            .collect::<Result<Vec<_>>>()?;
        phases.encode = started.elapsed();
        // Every image of every request, as (request, image index, seed), in order.
        let items: Vec<(usize, usize, u64)> = reqs
            .iter()
            .enumerate()
            .flat_map(|(r, req)| (0..req.n).map(move |i| (r, i, req.seed.wrapping_add(i as u64))))
            .collect();
        let previews: Vec<Vec<usize>> = reqs
            .iter()
            .map(|r| preview_steps(steps, r.previews))
            .collect();
        let mut images: Vec<Vec<RgbImage>> = reqs.iter().map(|r| Vec::with_capacity(r.n)).collect();
        for (chunk_index, chunk) in items.chunks(self.options.max_batch.max(1)).enumerate() {
            let first = chunk_index * self.options.max_batch.max(1);
            let mut noise = Vec::with_capacity(chunk.len());
            let mut sequence = Vec::with_capacity(chunk.len());
            let mut pooled = Vec::with_capacity(chunk.len());
            for &(r, _, seed) in chunk {
                noise.push(self.noise(seed, 1, height, width)?);
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
            let latents = self.denoise(&Tensor::cat(&noise, 0)?, &batch, steps, |state| {
                let step = state.step;
                let control = progress(Progress::Step {
                    step,
                    total: steps,
                    first,
                    count,
                });
                if control == Control::Continue {
                    self.previews(state, chunk, &previews, height, width, progress)?;
                }
                Ok(control)
            })?;
            phases.denoise += started.elapsed();
            if progress(Progress::Decoding) == Control::Cancel {
                return Err(EngineError::Cancelled);
            }
            let started = Instant::now();
            let pixels = self.decode(&latents, height, width)?;
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
            })
            .collect())
    }
}
