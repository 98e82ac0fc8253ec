//! The T5 v1.1 encoder: its tensor names (transformers' and llama.cpp's), the config read
//! from tensor shapes, and the network ([`T5`]), over dense weights (safetensors, in the
//! compute dtype) or quantized ones (GGUF), following transformers' `T5EncoderModel`: RMS
//! norms, unscaled attention with a relative position bias from the first block,
//! gated-GELU feed-forward.
//!
//! Only the matrix products run in the weights' dtype: the residual stream, the norms and
//! the attention (scores and softmax) stay in f32. candle-transformers' T5 keeps all of
//! them in the compute dtype; in bf16 it put the fixture's hidden states 2.2 off (of 3.3)
//! where transformers' bf16 T5 is 0.08 off.

use std::{path::Path, sync::Arc};

use candle_core::{D, DType, Module, Tensor, quantized::QMatMul, quantized::QTensor};
use candle_nn::Activation;
use candle_nn::VarBuilder;
use candle_transformers::models::t5::{ActivationWithOptionalGating, Config};

use crate::{
    error::{EngineError, Result},
    weights::{CompactWeight, QWeights},
};

/// The canonical (transformers) names of an encoder with `cfg`'s sizes, with shapes.
pub fn tensor_names(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
    let mut names = vec![("shared.weight".to_string(), vec![cfg.vocab_size, d])];
    for i in 0..cfg.num_layers {
        let a = format!("encoder.block.{i}.layer.0");
        let f = format!("encoder.block.{i}.layer.1");
        names.push((format!("{a}.layer_norm.weight"), vec![d]));
        for p in ["q", "k", "v"] {
            names.push((format!("{a}.SelfAttention.{p}.weight"), vec![inner, d]));
        }
        names.push((format!("{a}.SelfAttention.o.weight"), vec![d, inner]));
        if i == 0 {
            names.push((
                format!("{a}.SelfAttention.relative_attention_bias.weight"),
                vec![cfg.relative_attention_num_buckets, cfg.num_heads],
            ));
        }
        names.push((format!("{f}.layer_norm.weight"), vec![d]));
        names.push((format!("{f}.DenseReluDense.wi_0.weight"), vec![ff, d]));
        names.push((format!("{f}.DenseReluDense.wi_1.weight"), vec![ff, d]));
        names.push((format!("{f}.DenseReluDense.wo.weight"), vec![d, ff]));
    }
    names.push(("encoder.final_layer_norm.weight".to_string(), vec![d]));
    names
}

/// llama.cpp's component names and transformers' (ggml-org/llama.cpp
/// `gguf-py/gguf/tensor_mapping.py`, the T5 encoder entries).
const COMPONENTS: [(&str, &str); 10] = [
    ("attn_norm", "layer.0.layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    (
        "attn_rel_b",
        "layer.0.SelfAttention.relative_attention_bias",
    ),
    ("ffn_norm", "layer.1.layer_norm"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
];

/// A llama.cpp T5 encoder name (`enc.blk.3.attn_q.weight`) as transformers spells it.
pub fn llama_to_hf(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("shared.weight".into()),
        "enc.output_norm.weight" => return Some("encoder.final_layer_norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("enc.blk.")?;
    let (block, rest) = rest.split_once('.')?;
    let block: usize = block.parse().ok()?;
    let (component, suffix) = rest.split_once('.')?;
    let (_, hf) = COMPONENTS.iter().find(|(l, _)| *l == component)?;
    Some(format!("encoder.block.{block}.{hf}.{suffix}"))
}

/// A transformers T5 encoder name as llama.cpp spells it.
pub fn hf_to_llama(name: &str) -> Option<String> {
    match name {
        "shared.weight" | "encoder.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "encoder.final_layer_norm.weight" => return Some("enc.output_norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("encoder.block.")?;
    let (block, rest) = rest.split_once('.')?;
    let block: usize = block.parse().ok()?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    let (llama, _) = COMPONENTS.iter().find(|(_, h)| *h == stem)?;
    Some(format!("enc.blk.{block}.{llama}.{suffix}"))
}

/// The encoder's config from its tensor shapes (transformers names), for files that come
/// without a `config.json` (ComfyUI's `t5xxl_fp16.safetensors`, GGUF).
pub fn infer_config(
    shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
    origin: &Path,
) -> Result<Config> {
    let get = |name: &str, axis: usize| -> Result<usize> {
        shape_of(name)
            .and_then(|s| s.get(axis).copied())
            .ok_or_else(|| EngineError::Tensor {
                path: origin.to_path_buf(),
                tensor: name.to_string(),
                problem: "missing, so the T5 encoder's sizes cannot be read".into(),
            })
    };
    let a = "encoder.block.0.layer.0.SelfAttention";
    let (buckets, heads) = (
        get(&format!("{a}.relative_attention_bias.weight"), 0)?,
        get(&format!("{a}.relative_attention_bias.weight"), 1)?,
    );
    let inner = get(&format!("{a}.q.weight"), 0)?;
    if heads == 0 || inner % heads != 0 {
        return Err(EngineError::UnknownLayout {
            path: origin.to_path_buf(),
            message: format!("T5 attention width {inner} is not a multiple of {heads} heads"),
        });
    }
    let gated = shape_of("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").is_some();
    let num_layers = (0..)
        .take_while(|i| {
            shape_of(&format!("encoder.block.{i}.layer.0.SelfAttention.q.weight")).is_some()
        })
        .count();
    Ok(Config {
        vocab_size: get("shared.weight", 0)?,
        d_model: get(&format!("{a}.q.weight"), 1)?,
        d_kv: inner / heads,
        d_ff: get(
            if gated {
                "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
            } else {
                "encoder.block.0.layer.1.DenseReluDense.wi.weight"
            },
            0,
        )?,
        num_layers,
        num_decoder_layers: None,
        num_heads: heads,
        relative_attention_num_buckets: buckets,
        relative_attention_max_distance: 128,
        dropout_rate: 0.0,
        layer_norm_epsilon: 1e-6,
        initializer_factor: 1.0,
        // T5 v1.1 (and so FLUX's T5-XXL) is gated GELU (tanh form); v1.0 is plain ReLU.
        feed_forward_proj: ActivationWithOptionalGating {
            gated,
            activation: if gated {
                Activation::NewGelu
            } else {
                Activation::Relu
            },
        },
        tie_word_embeddings: false,
        is_decoder: false,
        is_encoder_decoder: false,
        use_cache: false,
        pad_token_id: 0,
        eos_token_id: 1,
        decoder_start_token_id: None,
    })
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(variance + eps)?.sqrt()?)?
        .broadcast_mul(weight)
}

/// A T5 linear layer: a dense matrix in the compute dtype; or, from GGUF, repacked tiles
/// (fast, resident) or K-quant blocks left in the file and run by the row kernel (4.4×
/// slower for Q4_K, but T5 runs once per request and its pages go back to the page cache
/// after each prompt: a Q4_K T5-XXL then holds no memory between requests instead of
/// 3.2 GiB of tiles).
enum Linear {
    Dense(candle_nn::Linear),
    Tiled(QMatMul),
    Compact(CompactWeight),
}

impl Linear {
    /// `x` (f32) through the layer, in the weights' dtype; the answer in f32.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // On the CPU, Pictor's kernel takes the f32 input as it is: bf16 weights on the
            // native bf16 products where the CPU has them (the input rounded to bf16, as
            // below), else widened block by block.
            Self::Dense(m) if crate::ops::linear_is_fast(x, m.weight()) => {
                Ok(crate::ops::linear(&[x], m.weight(), m.bias())?)
            }
            Self::Dense(m) => Ok(m
                .forward(&x.to_dtype(m.weight().dtype())?)?
                .to_dtype(DType::F32)?),
            Self::Tiled(m) => Ok(x.apply(m)?),
            Self::Compact(w) => w.forward(x),
        }
    }

    fn release(&self) {
        if let Self::Compact(w) = self {
            w.release();
        }
    }
}

struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Block {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}

/// The token embedding: a dense table, or quantized rows read as they are needed.
enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

/// The T5 encoder (canonical transformers names).
pub struct T5 {
    embedding: Embedding,
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    cfg: Config,
}

fn linear(w: &QWeights, name: &str, shape: [usize; 2]) -> Result<Linear> {
    use candle_core::quantized::GgmlDType as G;
    let stored = w.get(name, &shape)?.dtype();
    if matches!(stored, G::Q2K | G::Q3K | G::Q4K | G::Q5K | G::Q6K)
        && let Some(compact) = w.compact(name, &shape)?
    {
        compact.release();
        return Ok(Linear::Compact(compact));
    }
    let weight = QMatMul::from_arc(w.get(name, &shape)?)?;
    if matches!(weight, QMatMul::QTensor(_)) {
        // Let the kernels build their repacked copy now; then the mapped original can go.
        Tensor::zeros((2, shape[1]), DType::F32, w.device())?.apply(&weight)?;
    }
    w.release(name);
    Ok(Linear::Tiled(weight))
}

fn dense(w: &QWeights, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = w.get(name, shape)?.dequantize(w.device())?;
    w.release(name);
    Ok(t)
}

/// The name of block `i`'s tensor `tail` (`layer.0.SelfAttention.q.weight`).
fn block_name(i: usize, tail: &str) -> String {
    format!("encoder.block.{i}.{tail}")
}

const RELATIVE_BIAS: &str = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";

impl T5 {
    /// Builds the encoder, checking every shape: `linear` gives each matrix, `vector` each
    /// norm weight and the position bias table, in f32.
    fn build(
        cfg: &Config,
        embedding: Embedding,
        linear: &dyn Fn(&str, [usize; 2]) -> Result<Linear>,
        vector: &dyn Fn(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        if !cfg.feed_forward_proj.gated {
            return Err(EngineError::load(
                "t5",
                "only gated (T5 v1.1, as FLUX uses) encoders are supported",
            ));
        }
        let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let n = |tail: &str| block_name(i, tail);
                Ok(Block {
                    attn_norm: vector(&n("layer.0.layer_norm.weight"), &[d])?,
                    q: linear(&n("layer.0.SelfAttention.q.weight"), [inner, d])?,
                    k: linear(&n("layer.0.SelfAttention.k.weight"), [inner, d])?,
                    v: linear(&n("layer.0.SelfAttention.v.weight"), [inner, d])?,
                    o: linear(&n("layer.0.SelfAttention.o.weight"), [d, inner])?,
                    ffn_norm: vector(&n("layer.1.layer_norm.weight"), &[d])?,
                    gate: linear(&n("layer.1.DenseReluDense.wi_0.weight"), [ff, d])?,
                    up: linear(&n("layer.1.DenseReluDense.wi_1.weight"), [ff, d])?,
                    down: linear(&n("layer.1.DenseReluDense.wo.weight"), [d, ff])?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            embedding,
            relative_bias: vector(
                RELATIVE_BIAS,
                &[cfg.relative_attention_num_buckets, cfg.num_heads],
            )?,
            blocks,
            final_norm: vector("encoder.final_layer_norm.weight", &[d])?,
            cfg: cfg.clone(),
        })
    }

    /// The encoder from GGUF weights `w` (transformers names).
    pub fn load_quantized(w: &QWeights, cfg: &Config) -> Result<Self> {
        let embedding =
            Embedding::Quantized(w.get("shared.weight", &[cfg.vocab_size, cfg.d_model])?);
        Self::build(cfg, embedding, &|n, s| linear(w, n, s), &|n, s| {
            dense(w, n, s)
        })
    }

    /// The encoder from dense weights (transformers names) through `vb`, whose dtype the
    /// matrices are held and multiplied in.
    pub fn load_dense(vb: &VarBuilder, cfg: &Config) -> Result<Self> {
        let get = |name: &str, shape: &[usize], dtype: DType| -> Result<Tensor> {
            Ok(vb
                .get(shape, name)
                .map_err(|e| EngineError::load("t5", e))?
                .to_dtype(dtype)?)
        };
        let dtype = vb.dtype();
        // The table in the weights' dtype (as the memory plan counts it); the rows a prompt
        // reads are widened to f32.
        let embedding =
            Embedding::Dense(get("shared.weight", &[cfg.vocab_size, cfg.d_model], dtype)?);
        Self::build(
            cfg,
            embedding,
            &|n, s| {
                Ok(Linear::Dense(candle_nn::Linear::new(
                    get(n, &s, dtype)?,
                    None,
                )))
            },
            &|n, s| get(n, s, DType::F32),
        )
    }

    /// transformers' `_relative_position_bucket`, bidirectional, computed in f32 as
    /// transformers computes it (so the same bucket is picked at the boundaries).
    fn bucket(&self, relative: i64) -> u32 {
        let buckets = (self.cfg.relative_attention_num_buckets / 2) as u32;
        let max_exact = buckets / 2;
        let base = if relative > 0 { buckets } else { 0 };
        let n = relative.unsigned_abs() as u32;
        if n < max_exact {
            return base + n;
        }
        let max_distance = self.cfg.relative_attention_max_distance as f32;
        let large = (n as f32 / max_exact as f32).log(max_distance / max_exact as f32)
            * (buckets - max_exact) as f32;
        base + (max_exact + large as u32).min(buckets - 1)
    }

    /// The position bias `(1, heads, l, l)` shared by every block.
    fn position_bias(&self, len: usize) -> candle_core::Result<Tensor> {
        let ids: Vec<u32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| (i, j)))
            .map(|(i, j)| self.bucket(j as i64 - i as i64))
            .collect();
        let ids = Tensor::from_vec(ids, len * len, self.relative_bias.device())?;
        self.relative_bias
            .embedding(&ids)?
            .reshape((len, len, self.cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// The last hidden states `(1, len, d_model)` for token `ids`.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let device = self.relative_bias.device();
        let input = Tensor::new(ids, device)?;
        let mut x = match &self.embedding {
            Embedding::Dense(table) => table.embedding(&input)?,
            Embedding::Quantized(table) => table.embedding(&input)?,
        }
        .to_dtype(DType::F32)?
        .unsqueeze(0)?;
        let (b, l) = (1, ids.len());
        let (h, dk) = (self.cfg.num_heads, self.cfg.d_kv);
        let bias = self.position_bias(l)?;
        let eps = self.cfg.layer_norm_epsilon;
        for block in &self.blocks {
            let n = rms_norm(&x, &block.attn_norm, eps)?;
            let heads = |m: &Linear| -> Result<Tensor> {
                Ok(m.forward(&n)?
                    .reshape((b, l, h, dk))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (q, k, v) = (heads(&block.q)?, heads(&block.k)?, heads(&block.v)?);
            // In f32 (the layers answer in f32): T5's scores are not scaled and reach the
            // hundreds, where bf16 steps by one.
            let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
            let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let attn = attn.transpose(1, 2)?.reshape((b, l, h * dk))?;
            x = (x + block.o.forward(&attn)?)?;
            let n = rms_norm(&x, &block.ffn_norm, eps)?;
            // NewGelu is GELU's tanh form: Pictor's kernel on the CPU, candle's elsewhere.
            let gated = crate::ops::gelu_in_place(block.gate.forward(&n)?)?;
            let ff = block.down.forward(&(gated * block.up.forward(&n)?)?)?;
            x = (x + ff)?;
            for linear in block.linears() {
                linear.release();
            }
        }
        Ok(rms_norm(&x, &self.final_norm, eps)?)
    }
}
