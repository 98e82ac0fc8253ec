//! The flux autoencoder's decoder, on [`crate::ops`]' fast CPU kernels.
//!
//! The same network and tensor names as candle-transformers' `flux::autoencoder::Decoder`
//! and Black Forest Labs' `ae.safetensors` (`conv_in`, `mid.block_1`, `mid.attn_1`,
//! `up.N.block.M`, `up.N.upsample`, `norm_out`, `conv_out`), which it replaces: there the
//! convolutions and group norms were most of the shipped model's time per image. Its
//! resnets and mid-block attention are `blocks.rs`', shared with the encoder.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{Attention, EPS, Resnet};
use crate::{
    error::Result,
    flux::config::VaeArch,
    ops::{Conv2d, GroupNorm},
};

struct Level {
    blocks: Vec<Resnet>,
    upsample: Option<Conv2d>,
}

/// The decoder: latents `(b, z, h, w)` to images `(b, 3, 8h, 8w)` in about `[-1, 1]`.
pub struct Decoder {
    conv_in: Conv2d,
    mid_1: Resnet,
    mid_attn: Attention,
    mid_2: Resnet,
    /// From the lowest resolution up.
    levels: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Loads the decoder described by `cfg` from `vb` (already at `decoder.`).
    pub fn load(cfg: &VaeArch, vb: VarBuilder) -> Result<Self> {
        let g = cfg.groups;
        let mults = &cfg.ch_mult;
        let mut c = cfg.ch * mults.last().copied().unwrap_or(1);
        let conv_in = Conv2d::load(vb.pp("conv_in"), cfg.z_channels, c, 3, 1)?;
        let mid_1 = Resnet::load(vb.pp("mid.block_1"), c, c, g)?;
        let mid_attn = Attention::load(vb.pp("mid.attn_1"), c, g)?;
        let mid_2 = Resnet::load(vb.pp("mid.block_2"), c, c, g)?;
        let mut levels = Vec::with_capacity(mults.len());
        for (i, mult) in mults.iter().enumerate().rev() {
            let vb = vb.pp("up").pp(i);
            let c_out = cfg.ch * mult;
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks + 1);
            for j in 0..=cfg.num_res_blocks {
                blocks.push(Resnet::load(vb.pp("block").pp(j), c, c_out, g)?);
                c = c_out;
            }
            let upsample = if i == 0 {
                None
            } else {
                Some(Conv2d::load(vb.pp("upsample.conv"), c, c, 3, 1)?)
            };
            levels.push(Level { blocks, upsample });
        }
        Ok(Self {
            conv_in,
            mid_1,
            mid_attn,
            mid_2,
            levels,
            norm_out: GroupNorm::load(vb.pp("norm_out"), g, c, EPS)?,
            conv_out: Conv2d::load(vb.pp("conv_out"), c, cfg.out_ch, 3, 1)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self
            .mid_2
            .forward(&self.mid_attn.forward(&self.mid_1.forward(&h)?)?)?;
        for level in &self.levels {
            for block in &level.blocks {
                h = block.forward(&h)?;
            }
            if let Some(conv) = &level.upsample {
                let (_, _, hh, ww) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(hh * 2, ww * 2)?)?;
            }
        }
        let h = self.norm_out.forward(&h, true)?;
        self.conv_out.forward(&h)
    }
}
