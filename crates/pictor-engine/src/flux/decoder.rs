//! The flux autoencoder's decoder, on [`crate::ops`]' fast CPU kernels.
//!
//! The same network and tensor names as candle-transformers' `flux::autoencoder::Decoder`
//! and Black Forest Labs' `ae.safetensors` (`conv_in`, `mid.block_1`, `mid.attn_1`,
//! `up.N.block.M`, `up.N.upsample`, `norm_out`, `conv_out`), which it replaces: there the
//! convolutions and group norms were most of the shipped model's time per image. The
//! mid-block attention runs over query chunks so that a 1024² image (16384 latent
//! positions) never holds the whole score matrix.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::{
    error::Result,
    flux::config::VaeArch,
    ops::{Conv2d, GroupNorm},
};

const EPS: f64 = 1e-6;
/// Query positions per attention chunk: 1024 × 16384 f32 scores are 64 MiB.
const ATTN_CHUNK: usize = 1024;

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn load(vb: VarBuilder, c_in: usize, c_out: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), groups, c_in, EPS)?,
            conv1: Conv2d::load(vb.pp("conv1"), c_in, c_out, 3, 1)?,
            norm2: GroupNorm::load(vb.pp("norm2"), groups, c_out, EPS)?,
            conv2: Conv2d::load(vb.pp("conv2"), c_out, c_out, 3, 1)?,
            shortcut: if c_in == c_out {
                None
            } else {
                Some(Conv2d::load(vb.pp("nin_shortcut"), c_in, c_out, 1, 0)?)
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        match &self.shortcut {
            None => x + h,
            Some(c) => c.forward(x)? + h,
        }
    }
}

struct Attention {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl Attention {
    fn load(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), groups, c, EPS)?,
            q: Conv2d::load(vb.pp("q"), c, c, 1, 0)?,
            k: Conv2d::load(vb.pp("k"), c, c, 1, 0)?,
            v: Conv2d::load(vb.pp("v"), c, c, 1, 0)?,
            proj_out: Conv2d::load(vb.pp("proj_out"), c, c, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x, false)?;
        // (b, hw, c) queries, (b, c, hw) keys, (b, hw, c) values.
        let q = self
            .q
            .forward(&n)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let k = self.k.forward(&n)?.flatten_from(2)?.contiguous()?;
        let v = self
            .v
            .forward(&n)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let scale = 1.0 / (c as f64).sqrt();
        let mut out = Vec::with_capacity((h * w).div_ceil(ATTN_CHUNK));
        for start in (0..h * w).step_by(ATTN_CHUNK) {
            let len = ATTN_CHUNK.min(h * w - start);
            let scores = (q.narrow(1, start, len)?.matmul(&k)? * scale)?;
            let p = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?;
            out.push(p.matmul(&v)?);
        }
        let attended = Tensor::cat(&out, 1)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        self.proj_out.forward(&attended)? + x
    }
}

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
