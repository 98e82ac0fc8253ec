//! Z-Image's text encoder: Qwen3 (Qwen3-4B for Z-Image-Turbo) as `ZImagePipeline` reads
//! it, the hidden states after the last layer but one (`hidden_states[-2]`), without the
//! final norm, for one unpadded prompt under a causal mask. The last layer is never run,
//! so it is never loaded.
//!
//! Tensors by transformers' `Qwen3Model` names (`embed_tokens.weight`, `layers.N.…`), after
//! whatever prefix a file puts before them (`model.` in `Qwen3ForCausalLM` and ComfyUI's
//! `qwen_3_4b.safetensors`), from [`Source`]: dense in any dtype or quantized.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;

use crate::{
    error::{EngineError, Result},
    layers::{Linear, Source},
    layout::Part,
    weights::{MappedWeights, SafetensorFiles, Scheme},
};

/// A name only Qwen3's text stack has (its per-head query norm), to find its prefix.
pub(crate) const ANCHOR: &str = "layers.0.self_attn.q_norm.weight";

/// Qwen3's RMS norms' epsilon and RoPE base, where a config does not say.
const QWEN3_EPS: f64 = 1e-6;
const QWEN3_ROPE_THETA: f64 = 1e6;

/// Qwen3's hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Width.
    pub hidden: usize,
    /// Layers in the checkpoint (the last one is not run).
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key and value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// The MLP's width.
    pub intermediate: usize,
    /// RMS norms' epsilon.
    pub eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
}

impl EncoderConfig {
    /// From transformers' `config.json` (`rope_theta` at the top, or in `rope_parameters`
    /// as transformers 5 writes it).
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = super::json(path)?;
        let get = |key: &str| json.get(key).and_then(serde_json::Value::as_u64);
        let need = |key: &str| {
            get(key)
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::file(path, format!("no `{key}`")))
        };
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let theta = json
            .get("rope_theta")
            .or_else(|| json.get("rope_parameters")?.get("rope_theta"))
            .and_then(serde_json::Value::as_f64);
        Ok(Self {
            hidden,
            layers: need("num_hidden_layers")?,
            heads,
            kv_heads: get("num_key_value_heads").map_or(heads, |v| v as usize),
            head_dim: get("head_dim").map_or(hidden / heads.max(1), |v| v as usize),
            intermediate: need("intermediate_size")?,
            eps: json
                .get("rms_norm_eps")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(QWEN3_EPS),
            rope_theta: theta.unwrap_or(QWEN3_ROPE_THETA),
        })
    }

    /// From the tensors' shapes (`shape` of a canonical name), for files that come without
    /// a config (ComfyUI's): Qwen3's RMS epsilon (1e-6) and RoPE base (1e6).
    pub(crate) fn from_weights(
        shape: impl Fn(&str) -> Option<Vec<usize>>,
        origin: &Path,
    ) -> Result<Self> {
        let dims = |name: &str| super::needed_shape(&shape, name, origin, "Qwen3 text encoder");
        let rows = |name: &str| -> Result<usize> { Ok(dims(name)?.first().copied().unwrap_or(0)) };
        let head_dim = rows(ANCHOR)?;
        if head_dim == 0 {
            return Err(EngineError::Tensor {
                path: origin.to_path_buf(),
                tensor: ANCHOR.into(),
                problem: "is empty".into(),
            });
        }
        let layers = (0..)
            .take_while(|i| shape(&format!("layers.{i}.self_attn.q_norm.weight")).is_some())
            .count();
        Ok(Self {
            hidden: dims("embed_tokens.weight")?.get(1).copied().unwrap_or(0),
            layers,
            heads: rows("layers.0.self_attn.q_proj.weight")? / head_dim,
            kv_heads: rows("layers.0.self_attn.k_proj.weight")? / head_dim,
            head_dim,
            intermediate: rows("layers.0.mlp.gate_proj.weight")?,
            eps: QWEN3_EPS,
            rope_theta: QWEN3_ROPE_THETA,
        })
    }
}

struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    fn load(src: &Source, i: usize, cfg: &EncoderConfig) -> Result<Self> {
        let p = format!("layers.{i}");
        let (h, hd, eps) = (cfg.hidden, cfg.head_dim, cfg.eps);
        let lin = |name: &str, inp: usize, out: usize| src.linear(&format!("{p}.{name}"), inp, out);
        let norm =
            |name: &str, width: usize| src.rms_norm(&format!("{p}.{name}.weight"), width, eps);
        Ok(Self {
            input_norm: norm("input_layernorm", h)?,
            q: lin("self_attn.q_proj", h, cfg.heads * hd)?,
            k: lin("self_attn.k_proj", h, cfg.kv_heads * hd)?,
            v: lin("self_attn.v_proj", h, cfg.kv_heads * hd)?,
            o: lin("self_attn.o_proj", cfg.heads * hd, h)?,
            q_norm: norm("self_attn.q_norm", hd)?,
            k_norm: norm("self_attn.k_norm", hd)?,
            post_norm: norm("post_attention_layernorm", h)?,
            gate: lin("mlp.gate_proj", h, cfg.intermediate)?,
            up: lin("mlp.up_proj", h, cfg.intermediate)?,
            down: lin("mlp.down_proj", cfg.intermediate, h)?,
        })
    }

    /// One layer over `x` `(1, L, hidden)` with RoPE `(cos, sin)` `(L, head/2)` and the
    /// causal `mask` `(L, L)` (0 or -inf).
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        cfg: &EncoderConfig,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let hd = cfg.head_dim;
        let n = self.input_norm.forward(x)?;
        let heads =
            |t: Tensor, count: usize, norm: Option<&RmsNorm>| -> candle_core::Result<Tensor> {
                let t = t.reshape((b, l, count, hd))?;
                let t = match norm {
                    Some(norm) => norm.forward(&t)?,
                    None => t,
                };
                t.transpose(1, 2)?.contiguous()
            };
        let q = heads(n.apply(&self.q)?, cfg.heads, Some(&self.q_norm))?;
        let k = heads(n.apply(&self.k)?, cfg.kv_heads, Some(&self.k_norm))?;
        let v = heads(n.apply(&self.v)?, cfg.kv_heads, None)?;
        let q = candle_nn::rotary_emb::rope(&q, &rope.0, &rope.1)?;
        let k = candle_nn::rotary_emb::rope(&k, &rope.0, &rope.1)?;
        // Each key/value head serves `heads / kv_heads` consecutive query heads.
        let rep = cfg.heads / cfg.kv_heads.max(1);
        let repeat = |t: Tensor| -> candle_core::Result<Tensor> {
            match rep {
                1 => Ok(t),
                _ => t
                    .unsqueeze(2)?
                    .expand((b, cfg.kv_heads, rep, l, hd))?
                    .reshape((b, cfg.heads, l, hd)),
            }
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let attn = attn.transpose(1, 2)?.reshape((b, l, cfg.heads * hd))?;
        let x = (x + attn.apply(&self.o)?)?;
        let n = self.post_norm.forward(&x)?;
        let mlp = (n.apply(&self.gate)?.silu()? * n.apply(&self.up)?)?.apply(&self.down)?;
        x + mlp
    }
}

/// The loaded encoder.
pub struct TextEncoder {
    embed: Tensor,
    layers: Vec<Layer>,
    cfg: EncoderConfig,
    dtype: DType,
}

impl TextEncoder {
    /// Loads the text encoder `part` (safetensors, any prefix) with its matrices in
    /// `dtype`; its `config.json` when it has one, else its shape read from the tensors.
    pub fn open(part: &Part, dtype: DType, device: &Device) -> Result<Self> {
        let weights = open_weights(part)?;
        let cfg = match &part.config {
            Some(path) => EncoderConfig::from_file(path)?,
            None => EncoderConfig::from_weights(|n| weights.shape(n), &part.files[0])?,
        };
        let weights = crate::layers::Weights::Dense(weights);
        Self::load(&weights.source(dtype, device), &cfg)
    }

    /// Builds it from `src`; loads all layers but the last.
    pub(crate) fn load(src: &Source, cfg: &EncoderConfig) -> Result<Self> {
        if cfg.layers < 2 || cfg.kv_heads == 0 || !cfg.heads.is_multiple_of(cfg.kv_heads) {
            return Err(EngineError::load(
                "text encoder",
                format!("{cfg:?} is not a Qwen3 text stack Z-Image can read"),
            ));
        }
        let vocab = src
            .shape("embed_tokens.weight")
            .and_then(|s| s.first().copied())
            .unwrap_or(0);
        Ok(Self {
            embed: src.matrix("embed_tokens.weight", &[vocab, cfg.hidden])?,
            layers: (0..cfg.layers - 1)
                .map(|i| Layer::load(src, i, cfg))
                .collect::<Result<_>>()?,
            cfg: cfg.clone(),
            dtype: src.compute(),
        })
    }

    /// The width of the features.
    pub fn hidden(&self) -> usize {
        self.cfg.hidden
    }

    /// The features `(L, hidden)` of token `ids`, in f32.
    pub fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let l = ids.len();
        let vocab = self.embed.dim(0)?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::load(
                "text encoder",
                format!("token {bad} is outside its vocabulary of {vocab}"),
            ));
        }
        let ids_t = Tensor::new(ids, device)?;
        let mut x = self
            .embed
            .index_select(&ids_t, 0)?
            .to_dtype(self.dtype)?
            .unsqueeze(0)?;
        let rope = self.rope(l, device)?;
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (l, l), device)?.to_dtype(self.dtype)?;
        for layer in &self.layers {
            x = layer.forward(&x, &rope, &mask, &self.cfg)?;
        }
        Ok(x.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// `(cos, sin)` `(L, head/2)` of positions `0..l` at `1 / theta^(2i / head)`, in the
    /// compute dtype (turned in f32 first).
    fn rope(&self, l: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim;
        let inv: Vec<f32> = (0..hd)
            .step_by(2)
            .map(|i| (1.0 / self.cfg.rope_theta.powf(i as f64 / hd as f64)) as f32)
            .collect();
        let angles: Vec<f32> = (0..l)
            .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (l, hd / 2), device)?;
        let cast = |t: Tensor| t.to_dtype(self.dtype);
        Ok((cast(angles.cos()?)?, cast(angles.sin()?)?))
    }
}

/// Opens the text encoder part, by `Qwen3Model`'s names after the file's prefix.
fn open_weights(part: &Part) -> Result<MappedWeights> {
    let files = std::sync::Arc::new(SafetensorFiles::open(&part.files)?);
    let prefix = files
        .prefix_of(ANCHOR)
        .ok_or_else(|| EngineError::UnknownLayout {
            path: files.path_of(""),
            message: format!("no Qwen3 text encoder names (`{}`)", ANCHOR),
        })?;
    Ok(MappedWeights::new(files, Scheme::Identity, prefix))
}
