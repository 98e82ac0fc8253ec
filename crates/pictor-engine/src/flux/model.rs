//! The flux transformer network (Black Forest Labs' `src/flux/model.py`), written once over
//! [`Linear`] layers that are either plain tensors or quantized blocks, so the same code
//! runs a bf16 safetensors file and a Q4_K GGUF.
//!
//! The arithmetic follows candle-transformers' `flux::model` (which matches diffusers), and
//! the parity tests hold it to diffusers' output.

use candle_core::{D, DType, IndexOp, Tensor};
use candle_nn::RmsNorm;
use candle_transformers::models::flux::model::Config;

use super::attention::{QK_NORM_EPS, attend, rope};
use crate::error::Result;
use crate::layers::{Linear, Source};

/// The epsilon of FLUX's LayerNorms (no affine weights) before each modulation.
const LAYER_NORM_EPS: f64 = 1e-6;

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

impl Attention {
    fn load(src: &Source, prefix: &str, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let head = h / cfg.num_heads;
        Ok(Self {
            qkv: src.linear(&format!("{prefix}.qkv"), h, 3 * h)?,
            query_norm: src.rms_norm(
                &format!("{prefix}.norm.query_norm.scale"),
                head,
                QK_NORM_EPS,
            )?,
            key_norm: src.rms_norm(&format!("{prefix}.norm.key_norm.scale"), head, QK_NORM_EPS)?,
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
            query_norm: src.rms_norm(&format!("{p}.norm.query_norm.scale"), head, QK_NORM_EPS)?,
            key_norm: src.rms_norm(&format!("{p}.norm.key_norm.scale"), head, QK_NORM_EPS)?,
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
    if cfg.guidance_embed {
        linear("guidance_in.in_layer".into(), 256, h, true);
        linear("guidance_in.out_layer".into(), h, h, true);
    }
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
    /// FLUX.1-dev's distilled guidance, embedded as the timestep is.
    guidance_in: Option<Mlp2>,
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
            guidance_in: match cfg.guidance_embed {
                true => Some(Mlp2::load(
                    src,
                    "guidance_in",
                    ("in_layer", "out_layer"),
                    (256, h, h),
                )?),
                false => None,
            },
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
    /// `(b, l_txt, context)`, positions, timesteps `t` `(b)`, pooled vectors `y` and, for a
    /// model with a guidance embedding, guidance scales `guidance` `(b)` (which it needs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        img: &Tensor,
        img_ids: &Tensor,
        txt: &Tensor,
        txt_ids: &Tensor,
        t: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
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
        let mut vec_ = self
            .time_in
            .silu_between(&timestep_embedding(t, 256, dtype)?)?;
        match (&self.guidance_in, guidance) {
            (Some(embed), Some(g)) => {
                vec_ = (vec_ + embed.silu_between(&timestep_embedding(g, 256, dtype)?)?)?;
            }
            (Some(_), None) => candle_core::bail!("this transformer needs a guidance scale"),
            (None, _) => {}
        }
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
    fn dev_has_the_780_tensors_of_the_bfl_file() {
        let names = tensor_names(&Config::dev());
        assert_eq!(names.len(), 780);
        let params: usize = names.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(params, 11_901_408_320);
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
