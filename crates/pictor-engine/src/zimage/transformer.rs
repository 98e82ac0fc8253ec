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
//!
//! Tensors are read by Z-Image's original names (Tongyi-MAI's single file, ComfyUI's and
//! the GGUF files: fused `attention.qkv`, `attention.out`, `x_embedder`, `final_layer`);
//! diffusers' names are translated by [`crate::weights::Scheme::DiffusersZImage`].

use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::RmsNorm;
use serde::Deserialize;

use std::sync::Arc;

use crate::{
    error::{EngineError, Result},
    layers::{LayerTable, Linear, Source, Weights},
    layout::Part,
    weights::{GgufFile, MappedWeights, SafetensorFiles, Scheme},
};

/// Names only Z-Image's transformer has: in its original spelling, and diffusers'.
pub(crate) const ORIGINAL: &str = "layers.0.attention.qkv.weight";
pub(crate) const DIFFUSERS: &str = "layers.0.attention.to_q.weight";
/// Its caption pad token (Lumina 2, which shares the block names, has none).
pub(crate) const PAD: &str = "cap_pad_token";

/// Rows of each padded sequence are a multiple of this.
const SEQ_MULTIPLE: usize = 32;
/// Width of the timestep embedding the modulations read (at most; `min(dim, 256)`).
const ADALN_WIDTH: usize = 256;
/// Width of the timestep embedder's hidden layer and of its sinusoid.
const T_HIDDEN: usize = 1024;
const T_FREQUENCIES: usize = 256;
/// The epsilon of the attention's query and key norms.
const QK_NORM_EPS: f64 = 1e-5;

/// The network's hyper-parameters: diffusers' `transformer/config.json` where there is
/// one, else read from the tensors' shapes ([`Config::from_weights`]).
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
    pub fn from_file(path: &Path) -> Result<Self> {
        serde_json::from_value(super::json(path)?)
            .map_err(|e| crate::EngineError::file(path.to_path_buf(), e))
    }

    /// The hyper-parameters a checkpoint without a config has, from its tensors' shapes
    /// (`shape` of a canonical name) and Z-Image's constants: RoPE theta 256, `t_scale`
    /// 1000, norms' epsilon 1e-5, 2×2 patches, and RoPE axes splitting the head as Z-Image
    /// does (a quarter for the caption position, three eighths per image axis: 32, 48, 48
    /// for its heads of 128).
    pub(crate) fn from_weights(
        shape: impl Fn(&str) -> Option<Vec<usize>>,
        origin: &Path,
    ) -> Result<Self> {
        let dims = |name: &str| super::needed_shape(&shape, name, origin, "Z-Image transformer");
        let last = |name: &str| -> Result<usize> {
            dims(name)?
                .last()
                .copied()
                .ok_or_else(|| EngineError::Tensor {
                    path: origin.to_path_buf(),
                    tensor: name.to_string(),
                    problem: "is a scalar".into(),
                })
        };
        let count = |block: &str| {
            (0..)
                .take_while(|i| shape(&format!("{block}.{i}.attention.qkv.weight")).is_some())
                .count()
        };
        let dim = last("x_pad_token")?;
        let head = last("layers.0.attention.q_norm.weight")?;
        let patch = 2;
        if head == 0 || !dim.is_multiple_of(head) || !head.is_multiple_of(8) {
            return Err(EngineError::Tensor {
                path: origin.to_path_buf(),
                tensor: "layers.0.attention.q_norm.weight".into(),
                problem: format!("a head of {head} does not divide the width {dim} into RoPE axes"),
            });
        }
        Ok(Self {
            dim,
            n_layers: count("layers"),
            n_refiner_layers: count("noise_refiner"),
            n_heads: dim / head,
            norm_eps: 1e-5,
            cap_feat_dim: last("cap_embedder.0.weight")?,
            rope_theta: 256.0,
            t_scale: 1000.0,
            axes_dims: vec![head / 4, head * 3 / 8, head * 3 / 8],
            in_channels: last("x_embedder.weight")? / (patch * patch),
            all_patch_size: vec![patch],
        })
    }

    fn patch(&self) -> usize {
        self.all_patch_size.first().copied().unwrap_or(2)
    }

    fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// diffusers' FeedForward width: int(dim / 3 * 8), computed in floating point.
    fn ffn_width(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }

    fn adaln_width(&self) -> usize {
        self.dim.min(ADALN_WIDTH)
    }
}

/// Every tensor a transformer of `cfg` may have, by original name, with its shape (the
/// biases of the embedders, modulations and final layer included: checkpoints have them).
pub(crate) fn tensor_names(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (dim, p, c) = (cfg.dim, cfg.patch(), cfg.in_channels);
    let (hd, adaln, cap) = (cfg.head_dim(), cfg.adaln_width(), cfg.cap_feat_dim);
    let hidden = cfg.ffn_width();
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut linear = |name: &str, inp: usize, outp: usize| {
        out.push((format!("{name}.weight"), vec![outp, inp]));
        out.push((format!("{name}.bias"), vec![outp]));
    };
    linear("x_embedder", p * p * c, dim);
    linear("cap_embedder.1", cap, dim);
    linear("t_embedder.mlp.0", T_FREQUENCIES, T_HIDDEN);
    linear("t_embedder.mlp.2", T_HIDDEN, adaln);
    linear("final_layer.adaLN_modulation.1", adaln, dim);
    linear("final_layer.linear", dim, p * p * c);
    let blocks = [
        ("noise_refiner", cfg.n_refiner_layers, true),
        ("context_refiner", cfg.n_refiner_layers, false),
        ("layers", cfg.n_layers, true),
    ];
    for (name, n, modulated) in blocks {
        for i in 0..n {
            let b = format!("{name}.{i}");
            linear(&format!("{b}.attention.qkv"), dim, 3 * dim);
            linear(&format!("{b}.attention.out"), dim, dim);
            linear(&format!("{b}.feed_forward.w1"), dim, hidden);
            linear(&format!("{b}.feed_forward.w2"), hidden, dim);
            linear(&format!("{b}.feed_forward.w3"), dim, hidden);
            if modulated {
                linear(&format!("{b}.adaLN_modulation.0"), adaln, 4 * dim);
            }
        }
    }
    out.push(("cap_embedder.0.weight".into(), vec![cap]));
    out.push(("x_pad_token".into(), vec![1, dim]));
    out.push(("cap_pad_token".into(), vec![1, dim]));
    for (name, n, _) in blocks {
        for i in 0..n {
            let b = format!("{name}.{i}");
            for norm in ["attention.q_norm", "attention.k_norm"] {
                out.push((format!("{b}.{norm}.weight"), vec![hd]));
            }
            for norm in [
                "attention_norm1",
                "attention_norm2",
                "ffn_norm1",
                "ffn_norm2",
            ] {
                out.push((format!("{b}.{norm}.weight"), vec![dim]));
            }
        }
    }
    out
}

/// An RMS norm over the last dimension (made contiguous first, for candle's fast kernel).
fn norm(n: &RmsNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    n.forward(&x.contiguous()?)
}

struct Block {
    qkv: Linear,
    out: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
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
    fn load(src: &Source, p: &str, cfg: &Config, modulated: bool) -> Result<Self> {
        let (dim, hd, eps) = (cfg.dim, cfg.head_dim(), cfg.norm_eps);
        let hidden = cfg.ffn_width();
        let norm = |name: &str, width: usize, eps: f64| {
            src.rms_norm(&format!("{p}.{name}.weight"), width, eps)
        };
        let lin = |name: &str, inp: usize, out: usize| src.linear(&format!("{p}.{name}"), inp, out);
        Ok(Self {
            qkv: lin("attention.qkv", dim, 3 * dim)?,
            out: lin("attention.out", dim, dim)?,
            q_norm: norm("attention.q_norm", hd, QK_NORM_EPS)?,
            k_norm: norm("attention.k_norm", hd, QK_NORM_EPS)?,
            attention_norm1: norm("attention_norm1", dim, eps)?,
            attention_norm2: norm("attention_norm2", dim, eps)?,
            ffn_norm1: norm("ffn_norm1", dim, eps)?,
            ffn_norm2: norm("ffn_norm2", dim, eps)?,
            w1: lin("feed_forward.w1", dim, hidden)?,
            w2: lin("feed_forward.w2", hidden, dim)?,
            w3: lin("feed_forward.w3", dim, hidden)?,
            modulation: match modulated {
                true => Some(lin("adaLN_modulation.0", cfg.adaln_width(), 4 * dim)?),
                false => None,
            },
            heads: cfg.n_heads,
        })
    }

    /// Attention over `x` `(1, L, dim)` with `rope` for its L positions, unmasked.
    fn attention(&self, x: &Tensor, rope: &Rope) -> candle_core::Result<Tensor> {
        let (b, l, dim) = x.dims3()?;
        let hd = dim / self.heads;
        let qkv = x.apply(&self.qkv)?;
        if qkv.device().is_cpu() && qkv.dtype() == DType::F32 && qkv.is_contiguous() {
            // Pictor's kernel: norms, rotation and scale in place, scores by blocks of rows.
            let part = crate::ops::QkvPart {
                qkv: &qkv,
                q_scale: self.q_norm.weight(),
                k_scale: self.k_norm.weight(),
            };
            let out =
                crate::ops::flux_attention(&[part], self.heads, QK_NORM_EPS as f32, &rope.table)?;
            return out.apply(&self.out);
        }
        let heads = |i: usize, norm_by: Option<&RmsNorm>| -> candle_core::Result<Tensor> {
            let t = qkv
                .narrow(D::Minus1, i * dim, dim)?
                .reshape((b, l, self.heads, hd))?;
            let t = match norm_by {
                Some(n) => norm(n, &t)?,
                None => t,
            };
            t.transpose(1, 2)?.contiguous()
        };
        let q = heads(0, Some(&self.q_norm))?;
        let k = heads(1, Some(&self.k_norm))?;
        let v = heads(2, None)?;
        drop(qkv);
        // Interleaved pairs (x[2i], x[2i+1]) turned by the angle of pair i.
        let (cos, sin) = (rope.cos.to_dtype(q.dtype())?, rope.sin.to_dtype(q.dtype())?);
        let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let out = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        out.transpose(1, 2)?.reshape((b, l, dim))?.apply(&self.out)
    }

    fn feed_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        (x.apply(&self.w1)?.silu()? * x.apply(&self.w3)?)?.apply(&self.w2)
    }

    /// One block over `x` `(1, L, dim)`; `adaln` `(1, adaln width)` for a modulated one.
    fn forward(&self, x: &Tensor, rope: &Rope, adaln: &Tensor) -> candle_core::Result<Tensor> {
        let Some(modulation) = &self.modulation else {
            let a = self.attention(&norm(&self.attention_norm1, x)?, rope)?;
            let x = (x + norm(&self.attention_norm2, &a)?)?;
            let f = self.feed_forward(&norm(&self.ffn_norm1, &x)?)?;
            return x + norm(&self.ffn_norm2, &f)?;
        };
        let m = adaln.apply(modulation)?.unsqueeze(1)?.chunk(4, D::Minus1)?;
        let scale_msa = (&m[0] + 1.0)?;
        let gate_msa = m[1].tanh()?;
        let scale_mlp = (&m[2] + 1.0)?;
        let gate_mlp = m[3].tanh()?;
        let a = self.attention(
            &norm(&self.attention_norm1, x)?.broadcast_mul(&scale_msa)?,
            rope,
        )?;
        let x = (x + norm(&self.attention_norm2, &a)?.broadcast_mul(&gate_msa)?)?;
        let f = self.feed_forward(&norm(&self.ffn_norm1, &x)?.broadcast_mul(&scale_mlp)?)?;
        x + norm(&self.ffn_norm2, &f)?.broadcast_mul(&gate_mlp)?
    }
}

/// The network.
pub struct Transformer {
    /// Its linear layers, where a request's LoRA updates attach.
    table: LayerTable,
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
    /// The arithmetic's dtype.
    dtype: DType,
    cfg: Config,
}

impl Transformer {
    /// Loads the transformer `part` (any layout) with its matrices in `dtype` (GGUF files
    /// keep their blocks); returns it with its hyper-parameters.
    pub fn open(part: &Part, dtype: DType, device: &Device) -> Result<(Self, Config)> {
        let weights = open_weights(part, device)?;
        let config = config_of(part, &weights)?;
        let net = Self::load(&weights.source(dtype, device), &config)?;
        Ok((net, config))
    }

    /// Builds the network from `src` (Z-Image's original names).
    pub(crate) fn load(src: &Source, cfg: &Config) -> Result<Self> {
        let (dim, p, c) = (cfg.dim, cfg.patch(), cfg.in_channels);
        let blocks = |name: &str, n: usize, modulated: bool| -> Result<Vec<Block>> {
            (0..n)
                .map(|i| Block::load(src, &format!("{name}.{i}"), cfg, modulated))
                .collect()
        };
        let adaln = cfg.adaln_width();
        Ok(Self {
            x_embedder: src.linear("x_embedder", p * p * c, dim)?,
            cap_norm: src.rms_norm("cap_embedder.0.weight", cfg.cap_feat_dim, cfg.norm_eps)?,
            cap_embedder: src.linear("cap_embedder.1", cfg.cap_feat_dim, dim)?,
            x_pad_token: src.tensor("x_pad_token", &[1, dim])?,
            cap_pad_token: src.tensor("cap_pad_token", &[1, dim])?,
            t_first: src.linear("t_embedder.mlp.0", T_FREQUENCIES, T_HIDDEN)?,
            t_second: src.linear("t_embedder.mlp.2", T_HIDDEN, adaln)?,
            noise_refiner: blocks("noise_refiner", cfg.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", cfg.n_refiner_layers, false)?,
            layers: blocks("layers", cfg.n_layers, true)?,
            final_modulation: src.linear("final_layer.adaLN_modulation.1", adaln, dim)?,
            final_linear: src.linear("final_layer.linear", dim, p * p * c)?,
            dtype: src.compute(),
            cfg: cfg.clone(),
            table: src.layers(),
        })
    }

    /// Its linear layers by original name.
    pub(crate) fn layers(&self) -> &LayerTable {
        &self.table
    }

    /// The model's output for one latent `(C, 1, H, W)` at `t` (`1 - sigma`), given the
    /// caption's features `(L, cap_feat_dim)`: `(C, 1, H, W)` in f32, as diffusers returns
    /// it (the pipeline negates it for its Euler step).
    pub fn forward(&self, latent: &Tensor, t: f64, caption: &Tensor) -> Result<Tensor> {
        let device = latent.device();
        let (latent, caption) = (latent.to_dtype(self.dtype)?, caption.to_dtype(self.dtype)?);
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
        let cap = norm(&self.cap_norm, &caption)?.apply(&self.cap_embedder)?;
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
        let rope = img_rope.then(&cap_rope)?;
        for block in &self.layers {
            x = block.forward(&x, &rope, &adaln)?;
        }
        let scale = (adaln.silu()?.apply(&self.final_modulation)? + 1.0)?.unsqueeze(1)?;
        let x = layer_norm(&x.i((.., ..n_img))?, 1e-6)?.broadcast_mul(&scale)?;
        let x = x.apply(&self.final_linear)?.squeeze(0)?;
        // (H/p · W/p, p · p · C) -> (C, F, H, W), in f32.
        Ok(x.reshape((f, ht, wt, p, p, c))?
            .permute((5, 0, 1, 3, 2, 4))?
            .reshape((c, f, h, w))?
            .to_dtype(DType::F32)?)
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
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(self.dtype)?;
        Ok(emb.apply(&self.t_first)?.silu()?.apply(&self.t_second)?)
    }

    /// RoPE for positions `ids`: per axis, angles `pos / theta^(2j / d)` computed in f64
    /// and rounded to f32, as diffusers does.
    fn rope(&self, ids: &[[usize; 3]], device: &Device) -> Result<Rope> {
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
        Ok(Rope::new(&Tensor::from_vec(
            angles,
            (ids.len(), half),
            device,
        )?)?)
    }
}

/// The rotation of each position's pairs, kept in f32 (the angles are large and bf16 has
/// 8 bits of mantissa): `cos` and `sin` `(L, head/2)` for candle's `rope_i`, and the same
/// as 2×2 matrices `(1, 1, L, head/2, 2, 2)` for Pictor's attention kernel.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    table: Tensor,
}

impl Rope {
    fn new(angles: &Tensor) -> candle_core::Result<Self> {
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let (l, half) = angles.dims2()?;
        let table =
            Tensor::stack(&[&cos, &sin.neg()?, &sin, &cos], 2)?.reshape((1, 1, l, half, 2, 2))?;
        Ok(Self { cos, sin, table })
    }

    /// This sequence's positions followed by `next`'s.
    fn then(&self, next: &Rope) -> candle_core::Result<Self> {
        Ok(Self {
            cos: Tensor::cat(&[&self.cos, &next.cos], 0)?,
            sin: Tensor::cat(&[&self.sin, &next.sin], 0)?,
            table: Tensor::cat(&[&self.table, &next.table], 2)?,
        })
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

/// Opens the transformer part, by Z-Image's original names.
pub(crate) fn open_weights(part: &Part, device: &Device) -> Result<Weights> {
    if part.is_gguf() {
        let gguf = GgufFile::open(&part.files[0])?;
        let weights = gguf.diffusion_model(ORIGINAL, device)?;
        return Ok(Weights::Quantized(weights));
    }
    let files = Arc::new(SafetensorFiles::open(&part.files)?);
    if let Some(prefix) = files.prefix_of(ORIGINAL) {
        return Ok(Weights::Dense(MappedWeights::new(
            files,
            Scheme::Identity,
            prefix,
        )));
    }
    if let Some(prefix) = files.prefix_of(DIFFUSERS) {
        return Ok(Weights::Dense(MappedWeights::new(
            files,
            Scheme::DiffusersZImage,
            prefix,
        )));
    }
    Err(EngineError::UnknownLayout {
        path: files.path_of(""),
        message: format!("no Z-Image transformer names (`{ORIGINAL}` or `{DIFFUSERS}`)"),
    })
}

/// The hyper-parameters of the transformer `part` opened as `weights`.
pub(crate) fn config_of(part: &Part, weights: &Weights) -> Result<Config> {
    let origin = &part.files[0];
    match (&part.config, weights) {
        (Some(path), _) => Config::from_file(path),
        (None, Weights::Dense(w)) => Config::from_weights(|n| w.shape(n), origin),
        (None, Weights::Quantized(q)) => Config::from_weights(|n| q.shape(n), origin),
    }
}
