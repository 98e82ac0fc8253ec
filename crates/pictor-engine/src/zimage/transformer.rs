//! Z-Image's single-stream transformer ("S3-DiT"), as diffusers'
//! `ZImageTransformer2DModel` computes it for one image (no batch padding):
//!
//! - the latent `(C, 1, H, W)` is cut into 2×2 patches (features in (ph, pw, c) order) and
//!   embedded; the caption features `(L, cap_feat_dim)` go through an RMS norm and a linear
//!   layer;
//! - each sequence is padded to a multiple of 32 with a learned pad token (`x_pad_token`,
//!   `cap_pad_token`) that takes part in attention: nothing is masked;
//! - positions: caption token i (padding included) at (1 + i, 0, 0), image patch (h, w) at
//!   (Lc + 1, h, w) with Lc the padded caption length, image padding at (0, 0, 0); RoPE per
//!   axis (`axes_dims`, theta 256) on interleaved pairs, in f32;
//! - two modulated refiner blocks over the image, two plain ones over the caption, then the
//!   main blocks over [image, caption], then the final layer over the image rows.
//!
//! The timestep is the pipeline's `1 - sigma`, embedded at `t_scale` (1000) times it.

use candle_core::{D, Device, IndexOp, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use crate::error::Result;

/// Rows of each padded sequence are a multiple of this.
const SEQ_MULTIPLE: usize = 32;
/// Width of the timestep embedding the modulations read (at most; `min(dim, 256)`).
const ADALN_WIDTH: usize = 256;
/// Width of the timestep embedder's hidden layer and of its sinusoid.
const T_HIDDEN: usize = 1024;
const T_FREQUENCIES: usize = 256;

/// The fields of diffusers' `transformer/config.json` the network is built from.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Model width.
    pub dim: usize,
    /// Main blocks.
    pub n_layers: usize,
    /// Refiner blocks for the image and for the caption, each.
    pub n_refiner_layers: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// RMS norms' epsilon.
    pub norm_eps: f64,
    /// Width of the text encoder's features.
    pub cap_feat_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// The timestep's scale before its sinusoid.
    pub t_scale: f64,
    /// RoPE widths per axis (caption position, row, column); they add up to the head size.
    pub axes_dims: Vec<usize>,
    /// Latent channels.
    pub in_channels: usize,
    /// Spatial patch sizes; Z-Image has one, 2.
    pub all_patch_size: Vec<usize>,
}

impl Config {
    /// Reads `config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        serde_json::from_value(super::json(path)?)
            .map_err(|e| crate::EngineError::file(path.to_path_buf(), e))
    }

    fn patch(&self) -> usize {
        self.all_patch_size.first().copied().unwrap_or(2)
    }

    fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    fn adaln_width(&self) -> usize {
        self.dim.min(ADALN_WIDTH)
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }
}

struct Block {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    attention_norm1: RmsNorm,
    attention_norm2: RmsNorm,
    ffn_norm1: RmsNorm,
    ffn_norm2: RmsNorm,
    w1: Linear,
    w2: Linear,
    w3: Linear,
    /// Scale and gate of both halves from the timestep; `None` for the caption refiners.
    modulation: Option<Linear>,
    heads: usize,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config, modulated: bool) -> Result<Self> {
        let (dim, hd, eps) = (cfg.dim, cfg.head_dim(), cfg.norm_eps);
        // diffusers' FeedForward width: int(dim / 3 * 8), computed in floating point.
        let hidden = (dim as f64 / 3.0 * 8.0) as usize;
        let attn = vb.pp("attention");
        let ff = vb.pp("feed_forward");
        Ok(Self {
            to_q: candle_nn::linear_no_bias(dim, dim, attn.pp("to_q"))?,
            to_k: candle_nn::linear_no_bias(dim, dim, attn.pp("to_k"))?,
            to_v: candle_nn::linear_no_bias(dim, dim, attn.pp("to_v"))?,
            to_out: candle_nn::linear_no_bias(dim, dim, attn.pp("to_out").pp("0"))?,
            norm_q: RmsNorm::load(attn.pp("norm_q"), hd, 1e-5)?,
            norm_k: RmsNorm::load(attn.pp("norm_k"), hd, 1e-5)?,
            attention_norm1: RmsNorm::load(vb.pp("attention_norm1"), dim, eps)?,
            attention_norm2: RmsNorm::load(vb.pp("attention_norm2"), dim, eps)?,
            ffn_norm1: RmsNorm::load(vb.pp("ffn_norm1"), dim, eps)?,
            ffn_norm2: RmsNorm::load(vb.pp("ffn_norm2"), dim, eps)?,
            w1: candle_nn::linear_no_bias(dim, hidden, ff.pp("w1"))?,
            w2: candle_nn::linear_no_bias(hidden, dim, ff.pp("w2"))?,
            w3: candle_nn::linear_no_bias(dim, hidden, ff.pp("w3"))?,
            modulation: match modulated {
                true => Some(candle_nn::linear(
                    cfg.adaln_width(),
                    4 * dim,
                    vb.pp("adaLN_modulation").pp("0"),
                )?),
                false => None,
            },
            heads: cfg.n_heads,
        })
    }

    /// Attention over `x` `(1, L, dim)` with RoPE `(cos, sin)` `(L, head/2)`, unmasked.
    fn attention(&self, x: &Tensor, rope: &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
        let (b, l, dim) = x.dims3()?;
        let hd = dim / self.heads;
        let heads = |t: Tensor, norm: Option<&RmsNorm>| -> candle_core::Result<Tensor> {
            let t = t.reshape((b, l, self.heads, hd))?;
            let t = match norm {
                Some(n) => n.forward(&t)?,
                None => t,
            };
            t.transpose(1, 2)?.contiguous()
        };
        let q = heads(x.apply(&self.to_q)?, Some(&self.norm_q))?;
        let k = heads(x.apply(&self.to_k)?, Some(&self.norm_k))?;
        let v = heads(x.apply(&self.to_v)?, None)?;
        // Interleaved pairs (x[2i], x[2i+1]) turned by the angle of pair i.
        let q = candle_nn::rotary_emb::rope_i(&q, &rope.0, &rope.1)?;
        let k = candle_nn::rotary_emb::rope_i(&k, &rope.0, &rope.1)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let out = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        out.transpose(1, 2)?
            .reshape((b, l, dim))?
            .apply(&self.to_out)
    }

    fn feed_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        (x.apply(&self.w1)?.silu()? * x.apply(&self.w3)?)?.apply(&self.w2)
    }

    /// One block over `x` `(1, L, dim)`; `adaln` `(1, adaln width)` for a modulated one.
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        adaln: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let Some(modulation) = &self.modulation else {
            let a = self.attention(&self.attention_norm1.forward(x)?, rope)?;
            let x = (x + self.attention_norm2.forward(&a)?)?;
            let f = self.feed_forward(&self.ffn_norm1.forward(&x)?)?;
            return x + self.ffn_norm2.forward(&f)?;
        };
        let m = adaln.apply(modulation)?.unsqueeze(1)?.chunk(4, D::Minus1)?;
        let scale_msa = (&m[0] + 1.0)?;
        let gate_msa = m[1].tanh()?;
        let scale_mlp = (&m[2] + 1.0)?;
        let gate_mlp = m[3].tanh()?;
        let a = self.attention(
            &self.attention_norm1.forward(x)?.broadcast_mul(&scale_msa)?,
            rope,
        )?;
        let x = (x + self.attention_norm2.forward(&a)?.broadcast_mul(&gate_msa)?)?;
        let f = self.feed_forward(&self.ffn_norm1.forward(&x)?.broadcast_mul(&scale_mlp)?)?;
        x + self.ffn_norm2.forward(&f)?.broadcast_mul(&gate_mlp)?
    }
}

/// The network.
pub struct Transformer {
    x_embedder: Linear,
    cap_norm: RmsNorm,
    cap_embedder: Linear,
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    t_first: Linear,
    t_second: Linear,
    noise_refiner: Vec<Block>,
    context_refiner: Vec<Block>,
    layers: Vec<Block>,
    final_modulation: Linear,
    final_linear: Linear,
    cfg: Config,
}

impl Transformer {
    /// Builds the network from diffusers' tensor names under `vb`.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (dim, p, c) = (cfg.dim, cfg.patch(), cfg.in_channels);
        let tag = format!("{p}-1");
        let blocks = |name: &str, n: usize, modulated: bool| -> Result<Vec<Block>> {
            (0..n)
                .map(|i| Block::load(vb.pp(name).pp(i), cfg, modulated))
                .collect()
        };
        let final_layer = vb.pp("all_final_layer").pp(&tag);
        Ok(Self {
            x_embedder: candle_nn::linear(p * p * c, dim, vb.pp("all_x_embedder").pp(&tag))?,
            cap_norm: RmsNorm::load(
                vb.pp("cap_embedder").pp("0"),
                cfg.cap_feat_dim,
                cfg.norm_eps,
            )?,
            cap_embedder: candle_nn::linear(cfg.cap_feat_dim, dim, vb.pp("cap_embedder").pp("1"))?,
            x_pad_token: vb.get((1, dim), "x_pad_token")?,
            cap_pad_token: vb.get((1, dim), "cap_pad_token")?,
            t_first: candle_nn::linear(T_FREQUENCIES, T_HIDDEN, vb.pp("t_embedder.mlp.0"))?,
            t_second: candle_nn::linear(T_HIDDEN, cfg.adaln_width(), vb.pp("t_embedder.mlp.2"))?,
            noise_refiner: blocks("noise_refiner", cfg.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", cfg.n_refiner_layers, false)?,
            layers: blocks("layers", cfg.n_layers, true)?,
            final_modulation: candle_nn::linear(
                cfg.adaln_width(),
                dim,
                final_layer.pp("adaLN_modulation").pp("1"),
            )?,
            final_linear: candle_nn::linear(dim, p * p * c, final_layer.pp("linear"))?,
            cfg: cfg.clone(),
        })
    }

    /// The model's output for one latent `(C, 1, H, W)` at `t` (`1 - sigma`), given the
    /// caption's features `(L, cap_feat_dim)`: `(C, 1, H, W)`, as diffusers returns it
    /// (the pipeline negates it for its Euler step).
    pub fn forward(&self, latent: &Tensor, t: f64, caption: &Tensor) -> Result<Tensor> {
        let device = latent.device();
        let (c, f, h, w) = latent.dims4()?;
        let p = self.cfg.patch();
        let (ht, wt) = (h / p, w / p);
        // (C, F, H, W) -> (H/p · W/p, p · p · C), features in (ph, pw, c) order.
        let patches = latent
            .reshape((c, f, ht, p, wt, p))?
            .permute((1, 2, 4, 3, 5, 0))?
            .reshape((f * ht * wt, p * p * c))?;
        let n_img = ht * wt;
        let n_cap = caption.dim(0)?;
        let cap_len = n_cap.div_ceil(SEQ_MULTIPLE) * SEQ_MULTIPLE;
        let img_len = n_img.div_ceil(SEQ_MULTIPLE) * SEQ_MULTIPLE;

        let adaln = self.timestep(t, device)?;
        let img = pad_rows(
            &patches.apply(&self.x_embedder)?,
            img_len,
            &self.x_pad_token,
        )?;
        let cap = self.cap_norm.forward(caption)?.apply(&self.cap_embedder)?;
        let cap = pad_rows(&cap, cap_len, &self.cap_pad_token)?;

        let mut img_ids = Vec::with_capacity(img_len);
        for r in 0..ht {
            for col in 0..wt {
                img_ids.push([cap_len + 1, r, col]);
            }
        }
        img_ids.resize(img_len, [0, 0, 0]);
        let cap_ids: Vec<[usize; 3]> = (0..cap_len).map(|i| [1 + i, 0, 0]).collect();
        let img_rope = self.rope(&img_ids, device)?;
        let cap_rope = self.rope(&cap_ids, device)?;

        let mut img = img.unsqueeze(0)?;
        for block in &self.noise_refiner {
            img = block.forward(&img, &img_rope, &adaln)?;
        }
        let mut cap = cap.unsqueeze(0)?;
        for block in &self.context_refiner {
            cap = block.forward(&cap, &cap_rope, &adaln)?;
        }
        let mut x = Tensor::cat(&[&img, &cap], 1)?;
        let rope = (
            Tensor::cat(&[&img_rope.0, &cap_rope.0], 0)?,
            Tensor::cat(&[&img_rope.1, &cap_rope.1], 0)?,
        );
        for block in &self.layers {
            x = block.forward(&x, &rope, &adaln)?;
        }
        let scale = (adaln.silu()?.apply(&self.final_modulation)? + 1.0)?.unsqueeze(1)?;
        let x = layer_norm(&x.i((.., ..n_img))?, 1e-6)?.broadcast_mul(&scale)?;
        let x = x.apply(&self.final_linear)?.squeeze(0)?;
        // (H/p · W/p, p · p · C) -> (C, F, H, W).
        Ok(x.reshape((f, ht, wt, p, p, c))?
            .permute((5, 0, 1, 3, 2, 4))?
            .reshape((c, f, h, w))?)
    }

    /// The modulations' input for `t`: `cat(cos, sin)` of `t · t_scale` at 128
    /// frequencies, in f32, through the embedder's MLP.
    fn timestep(&self, t: f64, device: &Device) -> Result<Tensor> {
        let half = T_FREQUENCIES / 2;
        let args: Vec<f32> = (0..half)
            .map(|i| {
                let freq = (-(10_000f32.ln()) * i as f32 / half as f32).exp();
                (t * self.cfg.t_scale) as f32 * freq
            })
            .collect();
        let args = Tensor::from_vec(args, (1, half), device)?;
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?;
        Ok(emb.apply(&self.t_first)?.silu()?.apply(&self.t_second)?)
    }

    /// RoPE `(cos, sin)` `(rows, head/2)` for positions `ids`: per axis, angles
    /// `pos / theta^(2j / d)` computed in f64 and rounded to f32, as diffusers does.
    fn rope(&self, ids: &[[usize; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let half: usize = self.cfg.axes_dims.iter().map(|d| d / 2).sum();
        let mut angles = Vec::with_capacity(ids.len() * half);
        for id in ids {
            for (axis, &d) in self.cfg.axes_dims.iter().enumerate() {
                for j in (0..d).step_by(2) {
                    let freq = 1.0 / self.cfg.rope_theta.powf(j as f64 / d as f64);
                    angles.push((id[axis] as f64 * freq) as f32);
                }
            }
        }
        let angles = Tensor::from_vec(angles, (ids.len(), half), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

/// `x` `(n, dim)` padded to `len` rows of `pad` `(1, dim)`.
fn pad_rows(x: &Tensor, len: usize, pad: &Tensor) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    if n == len {
        return Ok(x.clone());
    }
    Tensor::cat(&[x, &pad.to_dtype(x.dtype())?.repeat((len - n, 1))?], 0)
}

/// LayerNorm without affine parameters over the last dimension.
fn layer_norm(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)
}
