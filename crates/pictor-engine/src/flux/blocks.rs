//! The autoencoder's building blocks, shared by its decoder and encoder: the resnet block
//! and the mid-block attention, with the names and arithmetic of Black Forest Labs'
//! `ae.safetensors` (diffusers' `AutoencoderKL` maps onto the same).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::{
    error::Result,
    ops::{Conv2d, GroupNorm},
};

pub(super) const EPS: f64 = 1e-6;
/// Query positions per attention chunk: 1024 × 16384 f32 scores are 64 MiB.
const ATTN_CHUNK: usize = 1024;

pub(super) struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    pub(super) fn load(vb: VarBuilder, c_in: usize, c_out: usize, groups: usize) -> Result<Self> {
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

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        match &self.shortcut {
            None => x + h,
            Some(c) => c.forward(x)? + h,
        }
    }
}

pub(super) struct Attention {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl Attention {
    pub(super) fn load(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), groups, c, EPS)?,
            q: Conv2d::load(vb.pp("q"), c, c, 1, 0)?,
            k: Conv2d::load(vb.pp("k"), c, c, 1, 0)?,
            v: Conv2d::load(vb.pp("v"), c, c, 1, 0)?,
            proj_out: Conv2d::load(vb.pp("proj_out"), c, c, 1, 0)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
