//! Everything after the text encoders: seeded noise, the schnell schedule through the
//! transformer, and the decoder. It runs from embeddings it is given, so parity work and
//! users who bring their own conditioning need no text encoders; [`super::FluxPipeline`]
//! adds them (and the staging that swaps T5 and the transformer).

use candle_core::{DType, Device, Tensor};
use pictor_core::Control;

use super::{
    config::{TransformerArch, VaeArch},
    fit, sampling,
    transformer::{self, Transformer},
    vae::Vae,
};
use crate::{
    error::{EngineError, Result},
    layout::Part,
    noise::gaussian_noise,
    text::Embeddings,
};

/// The sampler after a step, as [`Denoiser::denoise`] shows it to its callback.
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

/// The first of `steps` schnell steps image-to-image runs at `strength`:
/// [`pictor_core::edit_start`], diffusers' `get_timesteps` that never starts an edit below
/// strength 1 from noise alone.
pub fn img2img_start(steps: usize, strength: f64) -> Result<usize> {
    Ok(pictor_core::edit_start(steps, strength)?)
}

/// `image` noised to `sigma` with `noise`, as the flow-matching scheduler's
/// `scale_noise`: `σ · noise + (1 − σ) · image`.
pub(crate) fn noised(image: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(((noise * sigma)? + (image * (1.0 - sigma))?)?)
}

/// What inpainting keeps, laid out like the latents (packed for FLUX, not for Z-Image).
pub(crate) struct Known {
    image: Tensor,
    noise: Tensor,
    /// 1 where the model paints, 0 where the image is kept.
    repaint: Tensor,
}

impl Known {
    /// The image's latents, the request's noise and the repaint mask, all of one shape.
    pub(crate) fn new(image: Tensor, noise: Tensor, repaint: Tensor) -> Self {
        Self {
            image,
            noise,
            repaint,
        }
    }

    /// `x` with the kept region set to the image noised to `sigma`.
    pub(crate) fn merge(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let kept = noised(&self.image, &self.noise, sigma)?;
        let keep = (1.0 - &self.repaint)?;
        Ok(((keep * kept)? + (&self.repaint * x)?)?)
    }
}

/// A pixel mask `(b, 1, H, W)` (1 or more than ½ = repaint) at the latents' resolution
/// `(b, 1, H/8, W/8)`, as diffusers does it: binarised at ½, then the pixel at the top
/// left of each 8×8 cell (nearest-neighbour resizing).
pub fn latent_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    if c != 1 || h % 8 != 0 || w % 8 != 0 {
        return Err(EngineError::InvalidInput {
            field: "mask",
            message: format!(
                "a mask of {c} channels and {w}x{h} pixels: it needs 1 channel and sides that are multiples of 8"
            ),
        });
    }
    let cells = mask
        .to_dtype(DType::F32)?
        .reshape((b, 1, h / 8, 8, w / 8, 8))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, 1, h / 8, w / 8))?;
    Ok(cells.ge(0.5)?.to_dtype(DType::F32)?)
}

/// A loaded transformer and decoder: embeddings and noise in, pixels out.
pub struct Denoiser {
    /// `None` while staged out.
    transformer: Option<Transformer>,
    part: Part,
    arch: TransformerArch,
    vae: Vae,
    device: Device,
    dtype: DType,
}

impl Denoiser {
    /// Loads the transformer and the autoencoder's decoder, after checking that the
    /// decoder's latents are what the transformer takes.
    pub fn load(transformer: &Part, vae: &Part, dtype: DType, device: &Device) -> Result<Self> {
        let arch = transformer::arch_of(transformer)?;
        fit::latents(transformer, &arch, vae, &super::vae::arch_of(vae)?)?;
        let loaded = Transformer::load(transformer, dtype, device)?;
        let vae = Vae::load(vae, dtype, device)?;
        Ok(Self {
            transformer: Some(loaded),
            part: transformer.clone(),
            arch,
            vae,
            device: device.clone(),
            dtype,
        })
    }

    /// The transformer's architecture, as read.
    pub fn transformer_arch(&self) -> &TransformerArch {
        &self.arch
    }

    /// The autoencoder's architecture, as read.
    pub fn vae_arch(&self) -> &VaeArch {
        self.vae.arch()
    }

    /// Frees the transformer (staging: T5 takes its place for a while).
    pub(crate) fn unload_transformer(&mut self) {
        self.transformer = None;
    }

    /// Whether the transformer is loaded.
    pub(crate) fn transformer_loaded(&self) -> bool {
        self.transformer.is_some()
    }

    /// Loads the transformer again if it was freed.
    pub(crate) fn reload_transformer(&mut self) -> Result<()> {
        if self.transformer.is_none() {
            self.transformer = Some(Transformer::load(&self.part, self.dtype, &self.device)?);
        }
        Ok(())
    }

    /// The loaded transformer's linear layers (where LoRA updates attach).
    pub(crate) fn layers(&self) -> Result<&crate::layers::LayerTable> {
        Ok(self.loaded_transformer()?.layers())
    }

    fn loaded_transformer(&self) -> Result<&Transformer> {
        self.transformer.as_ref().ok_or_else(|| {
            EngineError::load("transformer", "staged out: call generate, which loads it")
        })
    }

    /// One transformer evaluation; see [`Transformer::velocity`].
    pub fn velocity(
        &self,
        img: &Tensor,
        emb: &Embeddings,
        sigma: f64,
        guidance: Option<f64>,
        latent_hw: (usize, usize),
    ) -> Result<Tensor> {
        self.loaded_transformer()?
            .velocity(img, emb, sigma, guidance, latent_hw)
    }

    /// The sigmas of `steps` steps for latents `(h, w)`: schnell's [`sampling::schedule`],
    /// or for a guidance-distilled transformer (FLUX.1-dev and its fine-tunes) the schedule
    /// shifted by image size ([`sampling::shifted_schedule`]), as Black Forest Labs decide
    /// it (every FLUX.1 model but schnell is shifted).
    pub fn sigmas(&self, steps: usize, (h, w): (usize, usize)) -> Vec<f64> {
        match self.transformer_arch().config.guidance_embed {
            true => sampling::shifted_schedule(steps, (h / 2) * (w / 2)),
            false => sampling::schedule(steps),
        }
    }

    /// Decodes packed latents to pixels in `[0, 1]`; see [`Vae::decode`].
    pub fn decode(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        self.vae.decode(packed, height, width)
    }

    /// Denoises `noise` `(b, latent channels, h, w)` for `steps` steps ([`Self::sigmas`])
    /// at the guidance scale `guidance` (for a model with a guidance embedding); returns the
    /// final packed latents `(b, tokens, 4 × latent channels)` in f32. The Euler update
    /// runs in f32 whatever the compute dtype, as diffusers' scheduler does. `on_step` sees
    /// the state before the first step (`step = 0`) and after each step; answering
    /// `Cancel` stops there.
    pub fn denoise(
        &self,
        noise: &Tensor,
        emb: &Embeddings,
        steps: usize,
        guidance: Option<f64>,
        on_step: impl FnMut(&StepState<'_>) -> Result<Control>,
    ) -> Result<Tensor> {
        let (_, _, h, w) = noise.dims4()?;
        let sigmas = self.sigmas(steps, (h, w));
        self.run(noise, &sigmas, (emb, guidance), None, on_step)
    }

    /// Image to image, as diffusers' `FluxImg2ImgPipeline`: of the `steps` steps,
    /// the last `⌊steps · strength⌋` run (`strength` in (0, 1]), from the image's latents
    /// `(b, z, h, w)` (normalised: see `Encoder::encode`) noised to that step's sigma with
    /// `noise`. With a `mask` `(b, 1, h, w)` at latent resolution (1 = repaint, 0 = keep;
    /// see [`latent_mask`]) it is inpainting, as `FluxInpaintPipeline`: after every step
    /// the kept region is put back, the image's latents noised to the next sigma with the
    /// same `noise` (clean after the last). Returns the final packed latents, as
    /// [`Denoiser::denoise`] does.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_image(
        &self,
        image_latents: &Tensor,
        mask: Option<&Tensor>,
        noise: &Tensor,
        emb: &Embeddings,
        steps: usize,
        strength: f64,
        guidance: Option<f64>,
        on_step: impl FnMut(&StepState<'_>) -> Result<Control>,
    ) -> Result<Tensor> {
        let start = img2img_start(steps, strength)?;
        let (_, _, h, w) = image_latents.dims4()?;
        let sigmas = &self.sigmas(steps, (h, w))[start..];
        let image = image_latents.to_dtype(DType::F32)?;
        let noise = noise.to_dtype(DType::F32)?;
        let known = match mask {
            None => None,
            Some(mask) => {
                let repaint = mask
                    .to_dtype(DType::F32)?
                    .broadcast_as(image.shape())?
                    .contiguous()?;
                Some(Known::new(
                    sampling::pack(&image)?,
                    sampling::pack(&noise)?,
                    sampling::pack(&repaint)?,
                ))
            }
        };
        self.run(
            &noised(&image, &noise, sigmas[0])?,
            sigmas,
            (emb, guidance),
            known.as_ref(),
            on_step,
        )
    }

    /// Euler steps from `start` `(b, z, h, w)` at `sigmas[0]` down each sigma in turn,
    /// conditioned on the prompt's embeddings and the guidance scale; with `known`, its
    /// kept region is put back after each step.
    fn run(
        &self,
        start: &Tensor,
        sigmas: &[f64],
        (emb, guidance): (&Embeddings, Option<f64>),
        known: Option<&Known>,
        mut on_step: impl FnMut(&StepState<'_>) -> Result<Control>,
    ) -> Result<Tensor> {
        let (_, _, h, w) = start.dims4()?;
        let mut x = sampling::pack(&start.to_dtype(DType::F32)?)?;
        let start = StepState {
            step: 0,
            latents: &x,
            velocity: None,
            sigma: sigmas.first().copied().unwrap_or(1.0),
        };
        if on_step(&start)? == Control::Cancel {
            return Err(EngineError::Cancelled);
        }
        for (i, pair) in sigmas.windows(2).enumerate() {
            let v = self
                .loaded_transformer()?
                .velocity(&x, emb, pair[0], guidance, (h, w))?;
            x = (x + (&v * (pair[1] - pair[0]))?)?;
            if let Some(known) = known {
                x = known.merge(&x, pair[1])?;
            }
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

    /// The initial noise for `count` images starting at `seed`: image `i` from `seed + i`,
    /// with as many channels as the decoder's latents.
    pub fn noise(&self, seed: u64, count: usize, height: usize, width: usize) -> Result<Tensor> {
        let (h, w) = sampling::latent_dims(height, width);
        let channels = self.vae.arch().z_channels;
        let per = channels * h * w;
        let mut all = Vec::with_capacity(per * count);
        for i in 0..count {
            all.extend(gaussian_noise(seed.wrapping_add(i as u64), per));
        }
        Ok(Tensor::from_vec(
            all,
            (count, channels, h, w),
            &self.device,
        )?)
    }
}
