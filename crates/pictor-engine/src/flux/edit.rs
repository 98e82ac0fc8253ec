//! Requests that edit an image ([`pictor_core::EditInput`]): the image encoded once per
//! request, its mask brought to the latents, and the denoiser run from them, as image to
//! image or, with a mask, inpainting.

use candle_core::{DType, Device, Tensor};
use pictor_core::{Control, EditInput};

use super::{
    denoiser::{Denoiser, StepState, img2img_start, latent_mask},
    encoder::Encoder,
};
use crate::{
    error::{EngineError, Result},
    text::Embeddings,
};

/// An edit, ready for the denoiser.
pub(crate) struct Prepared {
    /// `(1, z, h, w)`, normalised.
    latents: Tensor,
    /// `(1, 1, h, w)`, 1 = repaint.
    mask: Option<Tensor>,
    strength: f64,
    /// Steps that run of the request's.
    pub(crate) steps_run: usize,
}

impl Prepared {
    /// The image's latents `(1, z, h, w)`, normalised.
    pub(crate) fn latents(&self) -> &Tensor {
        &self.latents
    }

    /// Where to repaint `(1, 1, h, w)` (1) and keep (0); `None` for image to image.
    pub(crate) fn mask(&self) -> Option<&Tensor> {
        self.mask.as_ref()
    }
}

/// Encodes the edit's image (which must be `width`×`height`) and brings its mask to the
/// latents.
pub(crate) fn prepare(
    encoder: &Encoder,
    edit: &EditInput,
    width: usize,
    height: usize,
    steps: usize,
    device: &Device,
) -> Result<Prepared> {
    let image = &edit.image;
    if (image.width, image.height) != (width, height) || image.pixels.len() != width * height * 3 {
        return Err(EngineError::InvalidInput {
            field: "image",
            message: format!(
                "the image is {}x{}, the request {width}x{height}: resize it first",
                image.width, image.height
            ),
        });
    }
    let start = img2img_start(steps, edit.strength)?;
    let pixels = Tensor::from_vec(image.pixels.clone(), (height, width, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?
        .unsqueeze(0)?;
    let pixels = ((pixels / 127.5)? - 1.0)?;
    let mask = match &edit.mask {
        None => None,
        Some(m) if m.len() != width * height => {
            return Err(EngineError::InvalidInput {
                field: "mask",
                message: format!(
                    "the mask has {} pixels, the image {width}x{height}",
                    m.len()
                ),
            });
        }
        Some(m) => {
            let values = m.iter().map(|&b| f32::from(b) / 255.0).collect();
            Some(latent_mask(&Tensor::from_vec(
                values,
                (1, 1, height, width),
                device,
            )?)?)
        }
    };
    Ok(Prepared {
        latents: encoder.encode(&pixels)?,
        mask,
        strength: edit.strength,
        steps_run: steps - start,
    })
}

/// Runs the edit for a batch of `noise` `(b, z, h, w)` (the same image for each).
pub(super) fn denoise(
    denoiser: &Denoiser,
    edit: &Prepared,
    noise: &Tensor,
    emb: &Embeddings,
    steps: usize,
    guidance: Option<f64>,
    on_step: impl FnMut(&StepState<'_>) -> Result<Control>,
) -> Result<Tensor> {
    let b = noise.dim(0)?;
    let latents = edit.latents.repeat((b, 1, 1, 1))?;
    let mask = edit
        .mask
        .as_ref()
        .map(|m| m.repeat((b, 1, 1, 1)))
        .transpose()?;
    denoiser.denoise_image(
        &latents,
        mask.as_ref(),
        noise,
        emb,
        steps,
        edit.strength,
        guidance,
        on_step,
    )
}
