//! The flux transformer network (Black Forest Labs' `src/flux/model.py`), written once over
//! [`Linear`] layers that are either plain tensors or quantized blocks, so the same code
//! runs a bf16 safetensors file and a Q4_K GGUF.
//!
//! The arithmetic follows candle-transformers' `flux::model` (which matches diffusers), and
//! the parity tests hold it to diffusers' output.

use candle_core::{D, DType, IndexOp, Module, Tensor, quantized::QMatMul};
use candle_nn::RmsNorm;
use candle_transformers::models::flux::model::Config;

use crate::{
    error::{EngineError, Result},
    weights::{MappedWeights, QWeights},
};

/// A linear layer: `x·Wᵀ + b`, with `W` dense or quantized.
pub(crate) struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    /// The layer restricted to outputs `start..start + len`, sharing this one's weight
    /// (a view, no copy); `None` for quantized weights, whose blocks do not split by row.
    fn rows(&self, start: usize, len: usize) -> candle_core::Result<Option<Self>> {
        let QMatMul::Tensor(w) = &self.weight else {
            return Ok(None);
        };
        Ok(Some(Self {
            weight: QMatMul::Tensor(w.narrow(0, start, len)?),
            bias: match &self.bias {
                Some(b) => Some(b.narrow(0, start, len)?),
                None => None,
            },
        }))
    }

    /// `[xs₁ xs₂ …]·Wᵀ + b` for inputs that are the column blocks of one input, without
    /// concatenating them where the weights are dense and the inputs f32 on the CPU.
    fn forward_parts(&self, xs: &[&Tensor]) -> candle_core::Result<Tensor> {
        if let QMatMul::Tensor(w) = &self.weight
            && xs.iter().all(|x| crate::ops::linear_is_fast(x, w))
        {
            return crate::ops::linear(xs, w, self.bias.as_ref());
        }
        Tensor::cat(xs, D::Minus1)?.apply(self)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if let QMatMul::Tensor(w) = &self.weight {
            // The modulations and embedders take `(b, features)`: one row per image.
            let rows = match xs.rank() {
                2 => xs.unsqueeze(0)?,
                _ => xs.clone(),
            };
            if crate::ops::linear_is_fast(&rows, w) {
                let ys = crate::ops::linear(&[&rows], w, self.bias.as_ref())?;
                return if xs.rank() == 2 {
                    ys.squeeze(0)
                } else {
                    Ok(ys)
                };
            }
            if w.dtype() != xs.dtype() {
                // Half-precision weights with f32 arithmetic off the CPU kernels: widened
                // for this call (a fallback; the CPU kernels widen block by block).
                let ys = xs.broadcast_matmul(&w.to_dtype(xs.dtype())?.t()?)?;
                return match &self.bias {
                    Some(b) => ys.broadcast_add(&b.to_dtype(xs.dtype())?),
                    None => Ok(ys),
                };
            }
        }
        let ys = match &self.weight {
            QMatMul::QTensor(_) => xs.contiguous()?.apply(&self.weight)?,
            _ => xs.apply(&self.weight)?,
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// Where layers come from: dense safetensors or quantized GGUF weights, by BFL name.
pub(crate) enum Source<'a> {
    /// Safetensors (any layout): the linear layers' weight matrices converted to `matrices`,
    /// everything else (biases, norm scales) to the compute dtype.
    Dense {
        weights: &'a MappedWeights,
        matrices: DType,
        compute: DType,
        device: &'a candle_core::Device,
    },
    /// GGUF or converted blocks; computed in f32.
    Quantized(&'a QWeights),
}

impl Source<'_> {
    fn has(&self, name: &str) -> bool {
        match self {
            Self::Dense { weights, .. } => weights.contains(name),
            Self::Quantized(q) => q.contains(name),
        }
    }

    /// A plain tensor of shape `shape` in the compute dtype.
    pub(crate) fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self {
            Self::Dense { compute, .. } => self.dense(name, shape, *compute),
            Self::Quantized(q) => {
                let t = q.get(name, shape)?.dequantize(q.device())?;
                q.release(name);
                Ok(t)
            }
        }
    }

    /// A dense tensor of shape `shape` in `dtype`.
    fn dense(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense {
                weights: w, device, ..
            } => {
                let t = w.load(name, dtype, device)?;
                if t.dims() != shape {
                    return Err(EngineError::Tensor {
                        path: w.files().path_of(""),
                        tensor: name.to_string(),
                        problem: format!("has shape {:?}, expected {shape:?}", t.dims()),
                    });
                }
                Ok(t)
            }
            Self::Quantized(_) => self.tensor(name, shape),
        }
    }

    /// The linear layer `prefix.weight` `(out, inp)` with `prefix.bias` when present.
    pub(crate) fn linear(&self, prefix: &str, inp: usize, out: usize) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let weight = match self {
            Self::Dense { matrices, .. } => {
                QMatMul::Tensor(self.dense(&name, &[out, inp], *matrices)?)
            }
            Self::Quantized(q) => {
                let weight = QMatMul::from_arc(q.get(&name, &[out, inp])?)?;
                if matches!(weight, QMatMul::QTensor(_)) {
                    // Two rows are enough for every kernel to build its repacked copy now,
                    // after which the mapped original can go back to the page cache.
                    let probe = Tensor::zeros((2, inp), DType::F32, q.device())?;
                    probe.apply(&weight)?;
                }
                q.release(&name);
                weight
            }
        };
        let bias_name = format!("{prefix}.bias");
        let bias = if self.has(&bias_name) {
            Some(self.tensor(&bias_name, &[out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    fn rms_norm(&self, name: &str, dim: usize) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.tensor(name, &[dim])?, QK_NORM_EPS))
    }
}

/// The epsilon of FLUX's query and key RMS norms.
const QK_NORM_EPS: f64 = 1e-6;

/// The epsilon of FLUX's LayerNorms (no affine weights) before each modulation.
const LAYER_NORM_EPS: f64 = 1e-6;

fn rope(pos: &Tensor, dim: usize, theta: usize) -> candle_core::Result<Tensor> {
    let dev = pos.device();
    let inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1f32 / (theta as f64).powf(i as f64 / dim as f64) as f32)
        .collect();
    let n = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, 1, n), dev)?.to_dtype(pos.dtype())?;
    let freqs = pos.unsqueeze(2)?.broadcast_mul(&inv_freq)?;
    let (cos, sin) = (freqs.cos()?, freqs.sin()?);
    let out = Tensor::stack(&[&cos, &sin.neg()?, &sin, &cos], 3)?;
    let (b, n, d, _) = out.dims4()?;
    out.reshape((b, n, d, 2, 2))
}

fn apply_rope(x: &Tensor, freq_cis: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let (b, h, l, d) = x.dims4()?;
    let x = x.reshape((b, h, l, d / 2, 2))?;
    let x0 = x.narrow(D::Minus1, 0, 1)?;
    let x1 = x.narrow(D::Minus1, 1, 1)?;
    let fr0 = freq_cis.get_on_dim(D::Minus1, 0)?;
    let fr1 = freq_cis.get_on_dim(D::Minus1, 1)?;
    (fr0.broadcast_mul(&x0)? + fr1.broadcast_mul(&x1)?)?.reshape(dims.to_vec())
}

/// Most attention scores held at once by [`AttentionKernel::Blocks`] by default, in
/// elements (256 MB of f32). A 1024² image has 4352 tokens: its 24 heads would need 1.8 GB
/// of scores at once; queries are taken in blocks so that a block's scores stay under
/// this, which changes no result (each query row's softmax is independent of the others).
const SCORE_ELEMENTS: usize = 1 << 26;

/// How attention is computed on the CPU in f32. Other devices and dtypes always use
/// candle's ops in query blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `ops::flux_attention`: norms, rotary embedding and attention in two passes, scores
    /// in cache-sized blocks (the default).
    Fused,
    /// candle's ops, with at most this many scores held at once.
    Blocks(usize),
    /// candle-nn's CPU flash-attention kernel.
    CandleFlash,
}

/// 0: fused, 1: candle's flash kernel, n ≥ 2: blocks of n scores.
static KERNEL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Chooses the attention kernel for the whole process (for benchmarks and tests).
pub fn set_attention_kernel(kernel: AttentionKernel) {
    let code = match kernel {
        AttentionKernel::Fused => 0,
        AttentionKernel::CandleFlash => 1,
        AttentionKernel::Blocks(n) => n.max(2),
    };
    KERNEL.store(code, std::sync::atomic::Ordering::Relaxed);
}

fn attention_kernel() -> AttentionKernel {
    match KERNEL.load(std::sync::atomic::Ordering::Relaxed) {
        0 => AttentionKernel::Fused,
        1 => AttentionKernel::CandleFlash,
        n => AttentionKernel::Blocks(n),
    }
}

/// One stream's fused q/k/v projection with its query and key norms.
type StreamQkv<'a> = (&'a Tensor, &'a RmsNorm, &'a RmsNorm);

/// Attention over the tokens of `parts`, concatenated in order: each is a fused q/k/v
/// projection `(b, l_i, ≥ 3·hidden)` with its stream's query and key norms. Returns
/// `(b, Σl_i, hidden)`. The CPU kernel normalises q and k in place, so the projections'
/// first `2·hidden` columns are not to be read afterwards.
fn attend(parts: &[StreamQkv], heads: usize, pe: &Tensor) -> candle_core::Result<Tensor> {
    let fast = parts.iter().all(|(p, ..)| {
        p.device().is_cpu() && p.dtype() == DType::F32 && p.stride().last() == Some(&1)
    });
    if fast && attention_kernel() == AttentionKernel::Fused {
        return fused_attention(parts, heads, pe);
    }
    let (q, k, v) = split_streams(parts, heads)?;
    attention(&q, &k, &v, pe)
}

/// [`attend`] on the CPU kernel (f32 CPU tensors with contiguous rows).
fn fused_attention(parts: &[StreamQkv], heads: usize, pe: &Tensor) -> candle_core::Result<Tensor> {
    let parts: Vec<_> = parts
        .iter()
        .map(|(p, q, k)| crate::ops::QkvPart {
            qkv: p,
            q_scale: q.weight(),
            k_scale: k.weight(),
        })
        .collect();
    crate::ops::flux_attention(&parts, heads, QK_NORM_EPS as f32, pe)
}

/// Normalised q, k and v `(b, heads, Σl_i, d)` of the streams, text first, with candle's ops.
fn split_streams(
    parts: &[StreamQkv],
    heads: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
    for (p, q_norm, k_norm) in parts {
        let hidden = heads * q_norm.weight().dim(0)?;
        let qkv = p.narrow(D::Minus1, 0, 3 * hidden)?;
        let (q, k, v) = split_qkv(&qkv, heads, q_norm, k_norm)?;
        qs.push(q);
        ks.push(k);
        vs.push(v);
    }
    let cat = |xs: Vec<Tensor>| -> candle_core::Result<Tensor> {
        if xs.len() == 1 {
            Ok(xs.into_iter().next().expect("one part"))
        } else {
            Tensor::cat(&xs, 2)
        }
    };
    Ok((cat(qs)?, cat(ks)?, cat(vs)?))
}

/// Rotary embedding, then softmax attention over all heads with candle's ops; returns
/// `(b, l, h·d)`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pe: &Tensor) -> candle_core::Result<Tensor> {
    match attention_kernel() {
        AttentionKernel::CandleFlash if q.device().is_cpu() && q.dtype() == DType::F32 => {
            let (q, k) = (apply_rope(q, pe)?, apply_rope(k, pe)?);
            let bshd = |t: &Tensor| t.transpose(1, 2)?.contiguous();
            let scale = 1.0 / (q.dim(D::Minus1)? as f32).sqrt();
            candle_nn::attention::flash_attn::<f32>(
                &bshd(&q)?,
                &bshd(&k)?,
                &bshd(v)?,
                scale,
                candle_nn::attention::AttnMask::None,
                None,
                None,
            )?
            // The kernel answers (b, h, l, d).
            .transpose(1, 2)?
            .flatten_from(2)
        }
        AttentionKernel::Blocks(n) => attention_in_blocks(q, k, v, pe, n),
        _ => attention_in_blocks(q, k, v, pe, SCORE_ELEMENTS),
    }
}

fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pe: &Tensor,
    score_elements: usize,
) -> candle_core::Result<Tensor> {
    // The 1/√d scale goes on the queries, not on the scores: l·d elements instead of l²
    // (35× fewer at 1024²), and candle's scalar multiply runs on one thread.
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let q = (apply_rope(q, pe)? * scale)?.contiguous()?;
    let k = apply_rope(k, pe)?.contiguous()?;
    let (b, h, l, d) = q.dims4()?;
    let q = q.reshape((b * h, l, d))?;
    let kt = k.reshape((b * h, l, d))?.t()?;
    let v = v.contiguous()?.reshape((b * h, l, d))?;
    let rows = (score_elements / (b * h * l).max(1)).clamp(1, l);
    let mut blocks = Vec::with_capacity(l.div_ceil(rows));
    for start in (0..l).step_by(rows) {
        let q = q.narrow(1, start, rows.min(l - start))?;
        blocks.push(candle_nn::ops::softmax_last_dim(&q.matmul(&kt)?)?.matmul(&v)?);
    }
    let out = if blocks.len() == 1 {
        blocks.remove(0)
    } else {
        Tensor::cat(&blocks, 1)?
    };
    out.reshape((b, h, l, d))?.transpose(1, 2)?.flatten_from(2)
}

fn timestep_embedding(t: &Tensor, dim: usize, dtype: DType) -> candle_core::Result<Tensor> {
    const TIME_FACTOR: f64 = 1000.;
    const MAX_PERIOD: f64 = 10000.;
    let half = dim / 2;
    let t = (t * TIME_FACTOR)?;
    let arange = Tensor::arange(0, half as u32, t.device())?.to_dtype(DType::F32)?;
    let freqs = (arange * (-MAX_PERIOD.ln() / half as f64))?.exp()?;
    let args = t
        .unsqueeze(1)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&freqs.unsqueeze(0)?)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(dtype)
}

struct Mlp2 {
    first: Linear,
    second: Linear,
    /// The hidden activation's width.
    width: usize,
}

impl Mlp2 {
    fn load(
        src: &Source,
        prefix: &str,
        names: (&str, &str),
        dims: (usize, usize, usize),
    ) -> Result<Self> {
        Ok(Self {
            first: src.linear(&format!("{prefix}.{}", names.0), dims.0, dims.1)?,
            second: src.linear(&format!("{prefix}.{}", names.1), dims.1, dims.2)?,
            width: dims.1,
        })
    }

    fn silu_between(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.apply(&self.first)?.silu()?.apply(&self.second)
    }

    /// Takes `xs` so that it is freed once the first layer has read it; the activation runs
    /// in place on the first layer's output.
    fn gelu_between(&self, xs: Tensor) -> candle_core::Result<Tensor> {
        let hidden = xs.apply(&self.first)?;
        drop(xs);
        crate::ops::gelu_in_place(hidden)?.apply(&self.second)
    }
}

/// Shift, scale and gate from a modulation layer.
struct Modulation {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

impl Modulation {
    /// `n` triples from `silu(vec)·W`.
    fn split(lin: &Linear, vec_: &Tensor, n: usize) -> candle_core::Result<Vec<Self>> {
        let ys = vec_
            .silu()?
            .apply(lin)?
            .unsqueeze(1)?
            .chunk(3 * n, D::Minus1)?;
        Ok(ys
            .chunks_exact(3)
            .map(|c| Self {
                shift: c[0].clone(),
                scale: c[1].clone(),
                gate: c[2].clone(),
            })
            .collect())
    }

    /// `layer_norm(xs)·(1 + scale) + shift`.
    fn norm_modulate(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        crate::ops::norm_modulate(xs, &self.scale, &self.shift, LAYER_NORM_EPS)
    }

    /// `xs + gate·ys`.
    fn gated_residual(&self, xs: &Tensor, ys: &Tensor) -> candle_core::Result<Tensor> {
        crate::ops::gated_residual(xs, &self.gate, ys)
    }

    /// Image `i`'s modulation, for its rows alone (a batch shares one row of `(1, 1, h)`).
    fn image(&self, i: usize) -> candle_core::Result<Self> {
        let pick = |t: &Tensor| t.narrow(0, if t.dim(0)? == 1 { 0 } else { i }, 1);
        Ok(Self {
            shift: pick(&self.shift)?,
            scale: pick(&self.scale)?,
            gate: pick(&self.gate)?,
        })
    }
}

/// Most floats of an MLP's hidden activation that exist at once, by default: 2²⁴ (64 MiB
/// of f32). At full width a 1024² image's 4352 tokens make 4 blocks of 1088 rows (53 MB
/// each, the size of the block's other activations, instead of one of 214 MB); 512² and
/// below take one. The gemms lose about 2 % to repacking the weight per block.
const MLP_ELEMENTS: usize = 1 << 24;

thread_local! {
    static MLP_LIMIT: std::cell::Cell<usize> = const { std::cell::Cell::new(MLP_ELEMENTS) };
}

/// Sets the most floats of an MLP's hidden activation held at once, for forwards run on
/// the calling thread (for tests and benchmarks; at least one row is always taken); `None`
/// restores the default.
pub fn set_mlp_block_elements(elements: Option<usize>) {
    MLP_LIMIT.set(elements.unwrap_or(MLP_ELEMENTS).max(1));
}

/// The rows `start..start + len` of image `image` of `t` `(b, l, ·)`: a view.
fn rows(t: &Tensor, (image, start, len): (usize, usize, usize)) -> candle_core::Result<Tensor> {
    t.narrow(0, image, 1)?.narrow(1, start, len)
}

/// Row-wise work over `(b, l, ·)` tensors whose hidden activation is `width` wide, a block
/// of rows at a time so that at most [`MLP_ELEMENTS`] of it exist at once (or the limit
/// [`set_mlp_block_elements`] set):
/// `f((image, start, len))` returns those rows' `(1, len, c)` output, and the blocks are
/// joined into `(b, l, c)`. The hidden activations of big images are the largest tensors
/// of a step besides the weights; in blocks, they and the other activations are a few
/// sizes that the heap reuses instead of fragmenting.
fn by_rows(
    (b, l): (usize, usize),
    width: usize,
    mut f: impl FnMut((usize, usize, usize)) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let limit = MLP_LIMIT.get();
    let blocks = (l * width).div_ceil(limit).clamp(1, l.max(1));
    let per = l.div_ceil(blocks).max(1);
    if b <= 1 && per >= l {
        return f((0, 0, l));
    }
    // Each block is copied into its rows of the output as soon as it is made, so the
    // blocks never all exist beside the joined result.
    let mut out: Option<Tensor> = None;
    for image in 0..b {
        for start in (0..l).step_by(per) {
            let piece = f((image, start, per.min(l - start)))?;
            let out = match &mut out {
                Some(out) => out,
                None => out.insert(Tensor::zeros(
                    (1, b * l, piece.dim(2)?),
                    piece.dtype(),
                    piece.device(),
                )?),
            };
            out.slice_set(&piece.contiguous()?, 1, image * l + start)?;
        }
    }
    match out {
        Some(out) => out.reshape((b, l, ())),
        None => candle_core::bail!("by_rows: no rows"),
    }
}

struct Attention {
    qkv: Linear,
    query_norm: RmsNorm,
    key_norm: RmsNorm,
    proj: Linear,
    heads: usize,
}

/// q, k, v `(b, heads, l, head_dim)` from a fused projection's first `3·hidden` columns.
fn split_qkv(
    qkv: &Tensor,
    heads: usize,
    q_norm: &RmsNorm,
    k_norm: &RmsNorm,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, l, _) = qkv.dims3()?;
    let qkv = qkv.reshape((b, l, 3, heads, ()))?;
    let q = qkv.i((.., .., 0))?.transpose(1, 2)?.apply(q_norm)?;
    let k = qkv.i((.., .., 1))?.transpose(1, 2)?.apply(k_norm)?;
    let v = qkv.i((.., .., 2))?.transpose(1, 2)?;
    Ok((q, k, v))
}

impl Attention {
    fn load(src: &Source, prefix: &str, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let head = h / cfg.num_heads;
        Ok(Self {
            qkv: src.linear(&format!("{prefix}.qkv"), h, 3 * h)?,
            query_norm: src.rms_norm(&format!("{prefix}.norm.query_norm.scale"), head)?,
            key_norm: src.rms_norm(&format!("{prefix}.norm.key_norm.scale"), head)?,
            proj: src.linear(&format!("{prefix}.proj"), h, h)?,
            heads: cfg.num_heads,
        })
    }

    fn norms(&self) -> (&RmsNorm, &RmsNorm) {
        (&self.query_norm, &self.key_norm)
    }
}

/// One stream (image or text) of a double block.
struct Stream {
    modulation: Linear,
    attn: Attention,
    mlp: Mlp2,
}

struct DoubleBlock {
    img: Stream,
    txt: Stream,
}

impl DoubleBlock {
    fn load(src: &Source, i: usize, cfg: &Config, mlp: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let stream = |s: &str| -> Result<Stream> {
            let p = format!("double_blocks.{i}.{s}");
            Ok(Stream {
                modulation: src.linear(&format!("{p}_mod.lin"), h, 6 * h)?,
                attn: Attention::load(src, &format!("{p}_attn"), cfg)?,
                mlp: Mlp2::load(src, &format!("{p}_mlp"), ("0", "2"), (h, mlp, h))?,
            })
        };
        Ok(Self {
            img: stream("img")?,
            txt: stream("txt")?,
        })
    }

    /// Takes the streams so that they are freed once their residuals are made, before
    /// the MLPs run.
    fn forward(
        &self,
        img: Tensor,
        txt: Tensor,
        vec_: &Tensor,
        pe: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let img_mod = Modulation::split(&self.img.modulation, vec_, 2)?;
        let txt_mod = Modulation::split(&self.txt.modulation, vec_, 2)?;
        // The projections are freed as soon as attention has read them, the attention
        // output once both output projections have.
        let attn = {
            let img_qkv = img_mod[0].norm_modulate(&img)?.apply(&self.img.attn.qkv)?;
            let txt_qkv = txt_mod[0].norm_modulate(&txt)?.apply(&self.txt.attn.qkv)?;
            // Text tokens first, then image tokens, each stream with its own q/k norms.
            let (txt_norms, img_norms) = (self.txt.attn.norms(), self.img.attn.norms());
            attend(
                &[
                    (&txt_qkv, txt_norms.0, txt_norms.1),
                    (&img_qkv, img_norms.0, img_norms.1),
                ],
                self.img.attn.heads,
                pe,
            )?
        };
        let n_txt = txt.dim(1)?;
        let residual = |x: Tensor, a: Tensor, s: &Stream, m: &Modulation| {
            m.gated_residual(&x, &a.apply(&s.attn.proj)?)
        };
        let img_attn = attn.narrow(1, n_txt, attn.dim(1)? - n_txt)?;
        let img = residual(img, img_attn, &self.img, &img_mod[0])?;
        let txt = residual(txt, attn.narrow(1, 0, n_txt)?, &self.txt, &txt_mod[0])?;
        drop(attn);
        let mlp = |x: Tensor, s: &Stream, m: &Modulation| -> candle_core::Result<Tensor> {
            let (b, l, _) = x.dims3()?;
            by_rows((b, l), s.mlp.width, |at| {
                let (x, m) = (rows(&x, at)?, m.image(at.0)?);
                let y = s.mlp.gelu_between(m.norm_modulate(&x)?)?;
                m.gated_residual(&x, &y)
            })
        };
        Ok((
            mlp(img, &self.img, &img_mod[1])?,
            mlp(txt, &self.txt, &txt_mod[1])?,
        ))
    }
}

/// A single block's first layer: q/k/v and the MLP's input in one weight.
enum Linear1 {
    /// Quantized: computed whole, then narrowed.
    Whole(Linear),
    /// Dense: the two halves as views of the one weight, computed one after the other so
    /// that the full output (`l × 21504` at full width: 374 MB of f32 at 1024²) never
    /// exists; q/k/v are freed once attention has read them.
    Split { qkv: Linear, mlp: Linear },
}

/// Where a single block's MLP input comes from.
enum MlpInput<'a> {
    /// linear1's MLP rows, applied to the modulated input block by block.
    Project(&'a Linear),
    /// The MLP half of linear1's whole output.
    Projected(Tensor),
}

struct SingleBlock {
    linear1: Linear1,
    linear2: Linear,
    query_norm: RmsNorm,
    key_norm: RmsNorm,
    modulation: Linear,
    hidden: usize,
    mlp: usize,
    heads: usize,
}

impl SingleBlock {
    fn load(src: &Source, i: usize, cfg: &Config, mlp: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let head = h / cfg.num_heads;
        let p = format!("single_blocks.{i}");
        let linear1 = src.linear(&format!("{p}.linear1"), h, 3 * h + mlp)?;
        let linear1 = match (linear1.rows(0, 3 * h)?, linear1.rows(3 * h, mlp)?) {
            (Some(qkv), Some(mlp)) => Linear1::Split { qkv, mlp },
            _ => Linear1::Whole(linear1),
        };
        Ok(Self {
            linear1,
            linear2: src.linear(&format!("{p}.linear2"), h + mlp, h)?,
            query_norm: src.rms_norm(&format!("{p}.norm.query_norm.scale"), head)?,
            key_norm: src.rms_norm(&format!("{p}.norm.key_norm.scale"), head)?,
            modulation: src.linear(&format!("{p}.modulation.lin"), h, 3 * h)?,
            hidden: h,
            mlp,
            heads: cfg.num_heads,
        })
    }

    fn forward(&self, xs: &Tensor, vec_: &Tensor, pe: &Tensor) -> candle_core::Result<Tensor> {
        let m = Modulation::split(&self.modulation, vec_, 1)?;
        let (q_norm, k_norm) = (&self.query_norm, &self.key_norm);
        // Attention, then the MLP's input: its half of linear1 applied to the modulated
        // input again, one block of rows at a time (a pass over `xs` costs far less than
        // holding the whole modulated input through attention), or that half of linear1's
        // whole output.
        let (attn, mlp_input) = match &self.linear1 {
            Linear1::Split { qkv, mlp } => {
                let qkv = m[0].norm_modulate(xs)?.apply(qkv)?;
                let attn = attend(&[(&qkv, q_norm, k_norm)], self.heads, pe)?;
                (attn, MlpInput::Project(mlp))
            }
            Linear1::Whole(linear1) => {
                let x = m[0].norm_modulate(xs)?.apply(linear1)?;
                let attn = attend(&[(&x, q_norm, k_norm)], self.heads, pe)?;
                let half = x.narrow(D::Minus1, 3 * self.hidden, self.mlp)?;
                (attn, MlpInput::Projected(half))
            }
        };
        let (b, l, _) = xs.dims3()?;
        by_rows((b, l), self.mlp, |at| {
            let (xs, m) = (rows(xs, at)?, m[0].image(at.0)?);
            let hidden = match mlp_input {
                MlpInput::Project(mlp) => {
                    crate::ops::gelu_in_place(m.norm_modulate(&xs)?.apply(mlp)?)?
                }
                MlpInput::Projected(ref x) => crate::ops::gelu(&rows(x, at)?)?,
            };
            let out = self.linear2.forward_parts(&[&rows(&attn, at)?, &hidden])?;
            m.gated_residual(&xs, &out)
        })
    }
}

/// Every tensor the network reads, by BFL name, with its shape: what a converter must
/// write for [`FluxModel::load`] to find.
pub fn tensor_names(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mlp = (h as f64 * cfg.mlp_ratio) as usize;
    let head = h / cfg.num_heads;
    let mut names = Vec::new();
    let mut linear = |prefix: String, inp: usize, out: usize, bias: bool| {
        names.push((format!("{prefix}.weight"), vec![out, inp]));
        if bias {
            names.push((format!("{prefix}.bias"), vec![out]));
        }
    };
    linear("img_in".into(), cfg.in_channels, h, true);
    linear("txt_in".into(), cfg.context_in_dim, h, true);
    linear("time_in.in_layer".into(), 256, h, true);
    linear("time_in.out_layer".into(), h, h, true);
    linear("vector_in.in_layer".into(), cfg.vec_in_dim, h, true);
    linear("vector_in.out_layer".into(), h, h, true);
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            linear(format!("{p}_mod.lin"), h, 6 * h, true);
            linear(format!("{p}_attn.qkv"), h, 3 * h, cfg.qkv_bias);
            linear(format!("{p}_attn.proj"), h, h, true);
            linear(format!("{p}_mlp.0"), h, mlp, true);
            linear(format!("{p}_mlp.2"), mlp, h, true);
        }
    }
    for i in 0..cfg.depth_single_blocks {
        let p = format!("single_blocks.{i}");
        linear(format!("{p}.linear1"), h, 3 * h + mlp, true);
        linear(format!("{p}.linear2"), h + mlp, h, true);
        linear(format!("{p}.modulation.lin"), h, 3 * h, true);
    }
    linear("final_layer.linear".into(), h, cfg.in_channels, true);
    linear("final_layer.adaLN_modulation.1".into(), h, 2 * h, true);
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                names.push((
                    format!("double_blocks.{i}.{s}_attn.norm.{n}.scale"),
                    vec![head],
                ));
            }
        }
    }
    for i in 0..cfg.depth_single_blocks {
        for n in ["query_norm", "key_norm"] {
            names.push((format!("single_blocks.{i}.norm.{n}.scale"), vec![head]));
        }
    }
    names
}

/// The flux transformer.
pub(crate) struct FluxModel {
    img_in: Linear,
    txt_in: Linear,
    time_in: Mlp2,
    vector_in: Mlp2,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    final_linear: Linear,
    final_modulation: Linear,
    cfg: Config,
}

impl FluxModel {
    /// Builds the network from `src`, checking every tensor's shape against `cfg`.
    pub(crate) fn load(src: &Source, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let mlp = (h as f64 * cfg.mlp_ratio) as usize;
        Ok(Self {
            img_in: src.linear("img_in", cfg.in_channels, h)?,
            txt_in: src.linear("txt_in", cfg.context_in_dim, h)?,
            time_in: Mlp2::load(src, "time_in", ("in_layer", "out_layer"), (256, h, h))?,
            vector_in: Mlp2::load(
                src,
                "vector_in",
                ("in_layer", "out_layer"),
                (cfg.vec_in_dim, h, h),
            )?,
            double: (0..cfg.depth)
                .map(|i| DoubleBlock::load(src, i, cfg, mlp))
                .collect::<Result<_>>()?,
            single: (0..cfg.depth_single_blocks)
                .map(|i| SingleBlock::load(src, i, cfg, mlp))
                .collect::<Result<_>>()?,
            final_linear: src.linear("final_layer.linear", h, cfg.in_channels)?,
            final_modulation: src.linear("final_layer.adaLN_modulation.1", h, 2 * h)?,
            cfg: cfg.clone(),
        })
    }

    /// The velocity for packed latents `img` `(b, l, in_channels)` given text states `txt`
    /// `(b, l_txt, context)`, positions, timesteps `t` `(b)` and pooled vectors `y`.
    pub(crate) fn forward(
        &self,
        img: &Tensor,
        img_ids: &Tensor,
        txt: &Tensor,
        txt_ids: &Tensor,
        t: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let dtype = img.dtype();
        let ids = Tensor::cat(&[txt_ids, img_ids], 1)?;
        let pe = {
            let mut parts = Vec::with_capacity(self.cfg.axes_dim.len());
            for (axis, &dim) in self.cfg.axes_dim.iter().enumerate() {
                parts.push(rope(
                    &ids.get_on_dim(D::Minus1, axis)?,
                    dim,
                    self.cfg.theta,
                )?);
            }
            Tensor::cat(&parts, 2)?.unsqueeze(1)?
        };
        let mut txt = txt.apply(&self.txt_in)?;
        let mut img = img.apply(&self.img_in)?;
        let vec_ = self
            .time_in
            .silu_between(&timestep_embedding(t, 256, dtype)?)?;
        let vec_ = (vec_ + self.vector_in.silu_between(y)?)?;
        for block in &self.double {
            (img, txt) = block.forward(img, txt, &vec_, &pe)?;
        }
        let n_txt = txt.dim(1)?;
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        drop((txt, img));
        for block in &self.single {
            x = block.forward(&x, &vec_, &pe)?;
        }
        let img = x.i((.., n_txt..))?;
        let chunks = vec_.silu()?.apply(&self.final_modulation)?.chunk(2, 1)?;
        let (shift, scale) = (&chunks[0], &chunks[1]);
        crate::ops::norm_modulate(
            &img,
            &scale.unsqueeze(1)?,
            &shift.unsqueeze(1)?,
            LAYER_NORM_EPS,
        )?
        .apply(&self.final_linear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_in_query_blocks_equals_all_at_once() {
        let dev = candle_core::Device::Cpu;
        let (b, h, l, d) = (2, 3, 37, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let ids = Tensor::arange(0f32, (l * 3) as f32, &dev)
            .unwrap()
            .reshape((1, l, 3))
            .unwrap();
        let pe = {
            let parts: Vec<Tensor> = [2usize, 2, 4]
                .iter()
                .enumerate()
                .map(|(i, &dim)| rope(&ids.get_on_dim(D::Minus1, i).unwrap(), dim, 10_000).unwrap())
                .collect();
            Tensor::cat(&parts, 2).unwrap().unsqueeze(1).unwrap()
        };
        let whole = attention_in_blocks(&q, &k, &v, &pe, usize::MAX).unwrap();
        set_attention_kernel(AttentionKernel::CandleFlash);
        let flash = attention(&q, &k, &v, &pe).unwrap();
        set_attention_kernel(AttentionKernel::Fused);
        let diff = (&whole - flash).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            diff.to_scalar::<f32>().unwrap() < 1e-5,
            "candle's flash kernel agrees"
        );
        // 6 heads × 37 keys per row: 5 rows per block, so 8 blocks, the last one short.
        let blocks = attention_in_blocks(&q, &k, &v, &pe, 6 * 37 * 5).unwrap();
        let diff = (whole - blocks).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    /// The fused CPU kernel against candle's ops: two streams with their own norms (text
    /// then image, as in a double block), a part wider than q/k/v (as in a single block),
    /// two images, and more tokens than one block of queries.
    #[test]
    fn fused_attention_equals_candle_ops() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let (b, h, d) = (2, 3, 8);
        let hidden = h * d;
        let (l_txt, l_img) = (37, 150);
        let ids = Tensor::arange(0f32, ((l_txt + l_img) * 3) as f32, &dev)?
            .affine(0.1, 0.0)?
            .reshape((1, l_txt + l_img, 3))?;
        let pe = {
            let parts: Vec<Tensor> = [2usize, 2, 4]
                .iter()
                .enumerate()
                .map(|(i, &dim)| rope(&ids.get_on_dim(D::Minus1, i)?, dim, 10_000))
                .collect::<candle_core::Result<_>>()?;
            Tensor::cat(&parts, 2)?.unsqueeze(1)?
        };
        let norm = || -> candle_core::Result<RmsNorm> {
            Ok(RmsNorm::new(
                (Tensor::randn(0f32, 0.3, d, &dev)? + 1.0)?,
                QK_NORM_EPS,
            ))
        };
        let (txt_q, txt_k, img_q, img_k) = (norm()?, norm()?, norm()?, norm()?);
        let txt = Tensor::randn(0f32, 2.0, (b, l_txt, 3 * hidden), &dev)?;
        // An image stream wider than its q/k/v, like a single block's linear1 output.
        let img = Tensor::randn(0f32, 2.0, (b, l_img, 3 * hidden + 5), &dev)?;
        let parts = [(&txt, &txt_q, &txt_k), (&img, &img_q, &img_k)];
        let (q, k, v) = split_streams(&parts, h)?;
        let want = attention_in_blocks(&q, &k, &v, &pe, usize::MAX)?;
        // After candle's ops have read the inputs: the kernel overwrites q and k.
        let img_v = img.narrow(D::Minus1, 2 * hidden, hidden + 5)?.copy()?;
        let fused = fused_attention(&parts, h, &pe)?;
        let v_diff = (img.narrow(D::Minus1, 2 * hidden, hidden + 5)? - img_v)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(
            v_diff, 0.0,
            "v and the columns after it are left as they were"
        );
        assert_eq!(fused.dims(), want.dims());
        let diff = (&fused - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(scale > 0.1, "a non-trivial output: {scale}");
        assert!(diff < 2e-5, "max |diff| {diff} (outputs up to {scale})");
        Ok(())
    }

    #[test]
    fn schnell_has_the_776_tensors_of_the_bfl_file() {
        let names = tensor_names(&Config::schnell());
        assert_eq!(names.len(), 776, "780 in FLUX.1-dev less guidance_in's 4");
        let params: usize = names.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        // FLUX.1-dev's 11,901,408,320 less guidance_in's 10,229,760.
        assert_eq!(params, 11_891_178_560);
    }
}
