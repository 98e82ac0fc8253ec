//! The flux autoencoder's encoder: images to latents, for image-to-image and inpainting.
//!
//! Black Forest Labs' `encoder.*` names (`conv_in`, `down.N.block.M`, `down.N.downsample`,
//! `mid.block_1`, `mid.attn_1`, `mid.block_2`, `norm_out`, `conv_out`); diffusers'
//! `AutoencoderKL` maps onto them. It gives the posterior mean, as diffusers'
//! `latent_dist.mean`, and the latents normalised as FLUX pipelines feed them to the
//! transformer: `(mean − shift) · scale`. It is its own component, loaded only by what
//! edits images, so text-to-image never holds it.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::{
    blocks::{Attention, EPS, Resnet},
    config::{self, VaeArch},
};
use crate::{
    error::{EngineError, Result},
    layout::Part,
    ops::{Conv2d, GroupNorm},
};

/// A 3×3 convolution of stride 2 after padding one row and column of zeros at the bottom
/// and right, as the LDM autoencoder downsamples (diffusers' `Downsample2D` with
/// `padding=0`).
struct Downsample {
    weight: Tensor,
    bias: Tensor,
}

impl Downsample {
    fn load(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((c, c, 3, 3), "weight")?,
            bias: vb.get(c, "bias")?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
        let y = x.conv2d(&self.weight, 0, 2, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

struct Level {
    blocks: Vec<Resnet>,
    downsample: Option<Downsample>,
}

/// The encoder: images `(b, 3, 8h, 8w)` in `[-1, 1]` to latents `(b, z, h, w)`.
pub struct Encoder {
    conv_in: Conv2d,
    /// From full resolution down.
    levels: Vec<Level>,
    mid_1: Resnet,
    mid_attn: Attention,
    mid_2: Resnet,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    arch: VaeArch,
    dtype: DType,
}

impl Encoder {
    /// Loads the encoder of the autoencoder part; its architecture is the decoder's, read
    /// and checked as [`super::vae::Vae::load`] does. On the CPU it runs in f32.
    pub fn load(part: &Part, dtype: DType, device: &Device) -> Result<Self> {
        let dtype = if device.is_cpu() { DType::F32 } else { dtype };
        // The autoencoder's weights, opened as the decoder opens them: the names map the
        // encoder's half as well.
        let weights = super::vae::open(part)?;
        let arch = config::vae(&weights, part)?;
        let vb = weights.var_builder(dtype, device).pp("encoder");
        let g = arch.groups;
        let widths = arch.widths();
        let conv_in = Conv2d::load(vb.pp("conv_in"), 3, arch.ch, 3, 1)?;
        let mut c = arch.ch;
        let mut levels = Vec::with_capacity(widths.len());
        for (i, &c_out) in widths.iter().enumerate() {
            let vb = vb.pp("down").pp(i);
            let mut blocks = Vec::with_capacity(arch.num_res_blocks);
            for j in 0..arch.num_res_blocks {
                blocks.push(Resnet::load(vb.pp("block").pp(j), c, c_out, g)?);
                c = c_out;
            }
            let downsample = if i + 1 == widths.len() {
                None
            } else {
                Some(Downsample::load(vb.pp("downsample.conv"), c)?)
            };
            levels.push(Level { blocks, downsample });
        }
        Ok(Self {
            conv_in,
            levels,
            mid_1: Resnet::load(vb.pp("mid.block_1"), c, c, g)?,
            mid_attn: Attention::load(vb.pp("mid.attn_1"), c, g)?,
            mid_2: Resnet::load(vb.pp("mid.block_2"), c, c, g)?,
            norm_out: GroupNorm::load(vb.pp("norm_out"), g, c, EPS)?,
            conv_out: Conv2d::load(vb.pp("conv_out"), c, 2 * arch.z_channels, 3, 1)?,
            arch,
            dtype,
        })
    }

    /// The posterior mean of `images` `(b, 3, H, W)` in `[-1, 1]`, with H and W multiples
    /// of 8: `(b, z, H/8, W/8)` f32, as diffusers' `encode(x).latent_dist.mean`.
    pub fn posterior_mean(&self, images: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        if h % 8 != 0 || w % 8 != 0 {
            return Err(EngineError::InvalidInput {
                field: "image",
                message: format!("an image of {w}x{h} pixels: both sides must be multiples of 8"),
            });
        }
        let mut x = self.conv_in.forward(&images.to_dtype(self.dtype)?)?;
        for level in &self.levels {
            for block in &level.blocks {
                x = block.forward(&x)?;
            }
            if let Some(down) = &level.downsample {
                x = down.forward(&x)?;
            }
        }
        let x = self
            .mid_2
            .forward(&self.mid_attn.forward(&self.mid_1.forward(&x)?)?)?;
        let moments = self.conv_out.forward(&self.norm_out.forward(&x, true)?)?;
        Ok(moments
            .narrow(1, 0, self.arch.z_channels)?
            .to_dtype(DType::F32)?)
    }

    /// The latents the transformer sees for `images`: `(mean − shift) · scale`, unpacked
    /// `(b, z, H/8, W/8)` f32.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let mean = self.posterior_mean(images)?;
        Ok(((mean - self.arch.shift_factor)? * self.arch.scale_factor)?)
    }
}
