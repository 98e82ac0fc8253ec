//! Text encoders: CLIP-L (pooled vector) and T5 (token sequence), with their tokenizers.

mod clip_bpe;
pub mod t5;
mod tokenize;

use std::{path::Path, sync::Arc};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{clip::text_model as clip, t5 as candle_t5};
use pictor_core::PromptInfo;
use serde::Deserialize;

pub use tokenize::{FixedLengthTokenizer, Tokens};

use crate::{
    error::{EngineError, Result},
    layers::Weights,
    layout::Part,
    weights::{GgufFile, MappedWeights, SafetensorFiles, Scheme},
};

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::file(path, format!("bad config: {e}")))
}

fn open(part: &Part, anchor: &str, label: &'static str) -> Result<MappedWeights> {
    let files = Arc::new(SafetensorFiles::open(&part.files)?);
    let prefix = files
        .prefix_of(anchor)
        .ok_or_else(|| EngineError::UnknownLayout {
            path: files.path_of(anchor),
            message: format!("no `{anchor}` tensor: this is not a {label}"),
        })?;
    Ok(MappedWeights::new(files, Scheme::Identity, prefix))
}

/// transformers' `CLIPTextConfig`, as `config.json` spells it (flat, or under
/// `text_config` in a full `CLIPModel` config).
#[derive(Debug, Deserialize)]
struct ClipFileConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    eos_token_id: Option<u32>,
    #[serde(default)]
    layer_norm_eps: Option<f64>,
}

fn clip_config(config_path: &Path) -> Result<ClipFileConfig> {
    let raw: serde_json::Value = read_json(config_path)?;
    let raw = raw.get("text_config").cloned().unwrap_or(raw);
    let cfg: ClipFileConfig = serde_json::from_value(raw)
        .map_err(|e| EngineError::file(config_path, format!("bad CLIP config: {e}")))?;
    if let Some(act) = cfg.hidden_act.as_deref().filter(|a| *a != "quick_gelu") {
        return Err(EngineError::file(
            config_path,
            format!("hidden_act `{act}` is not supported (CLIP-L uses quick_gelu)"),
        ));
    }
    if let Some(eps) = cfg.layer_norm_eps.filter(|e| (e - 1e-5).abs() > 1e-12) {
        return Err(EngineError::file(
            config_path,
            format!("layer_norm_eps {eps} is not supported (CLIP-L uses 1e-5)"),
        ));
    }
    Ok(cfg)
}

/// CLIP's sizes from tensor shapes (transformers names without `text_model.`). Shapes
/// cannot tell the head count; CLIP text models use 64-wide heads (CLIP-L: 768 wide, 12
/// heads).
fn infer_clip_config(
    shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
    origin: &Path,
) -> Result<ClipFileConfig> {
    let dim = |name: &str, axis: usize| -> Result<usize> {
        shape_of(name)
            .and_then(|s| s.get(axis).copied())
            .ok_or_else(|| EngineError::Tensor {
                path: origin.to_path_buf(),
                tensor: format!("text_model.{name}"),
                problem: "missing, so the CLIP encoder's sizes cannot be read".into(),
            })
    };
    let hidden = dim("embeddings.token_embedding.weight", 1)?;
    Ok(ClipFileConfig {
        vocab_size: dim("embeddings.token_embedding.weight", 0)?,
        hidden_size: hidden,
        intermediate_size: dim("encoder.layers.0.mlp.fc1.weight", 0)?,
        num_hidden_layers: (0..)
            .take_while(|i| shape_of(&format!("encoder.layers.{i}.mlp.fc1.weight")).is_some())
            .count(),
        num_attention_heads: (hidden / 64).max(1),
        max_position_embeddings: dim("embeddings.position_embedding.weight", 0)?,
        hidden_act: None,
        eos_token_id: None,
        layer_norm_eps: None,
    })
}

/// The CLIP text encoder; FLUX uses its pooled output only.
pub struct ClipEncoder {
    model: clip::ClipTextTransformer,
    max_positions: usize,
    eos_token_id: u32,
    device: Device,
    /// Where it was loaded from and in which dtype, to build a LoRA'd copy.
    part: Part,
    dtype: DType,
    /// Its linear layers' `(outputs, inputs)` by name (`text_model.encoder.layers.N.…`).
    layers: std::collections::BTreeMap<String, (usize, usize)>,
}

/// Mapped weights with dense updates added to some tensors as they are read: a LoRA'd
/// copy of a network candle builds from a `VarBuilder`, the file left as it is.
struct Patched {
    inner: MappedWeights,
    deltas: std::collections::HashMap<String, Tensor>,
}

impl Patched {
    fn patch(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        match self.deltas.get(name) {
            Some(d) => {
                let sum = (t.to_dtype(DType::F32)? + d.to_device(t.device())?)?;
                sum.to_dtype(t.dtype())
            }
            None => Ok(t),
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for Patched {
    fn get(
        &self,
        want: candle_core::Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get(want, name, init, dtype, dev)?;
        self.patch(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        self.patch(name, t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A CLIP part's weights, opened, and its sizes: from transformers' `config.json` when
/// the part has one; without (ComfyUI's `clip_l.safetensors`, bundles) from tensor shapes.
fn open_clip(part: &Part) -> Result<(MappedWeights, ClipFileConfig)> {
    let weights = open(
        part,
        "text_model.embeddings.token_embedding.weight",
        "CLIP text encoder",
    )?;
    let cfg = match &part.config {
        Some(path) => clip_config(path)?,
        None => infer_clip_config(
            &|n| weights.shape(&format!("text_model.{n}")),
            &part.files[0],
        )?,
    };
    Ok((weights, cfg))
}

/// The width of the pooled vector a CLIP part gives, read without loading it.
pub fn clip_width(part: &Part) -> Result<usize> {
    Ok(open_clip(part)?.1.hidden_size)
}

/// The width of the token embeddings a T5 part gives, read without loading it.
pub fn t5_width(part: &Part) -> Result<usize> {
    let weights = open_t5(part, &Device::Cpu)?;
    let config = t5_config(part, &|n| weights.shape(n))?;
    Ok(config.d_model)
}

impl ClipEncoder {
    /// Loads the encoder, with transformers' `config.json` when the part has one; without
    /// (ComfyUI's `clip_l.safetensors`, bundles) the sizes are read from tensor shapes.
    pub fn load(part: &Part, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_patched(part, dtype, device, Default::default())
    }

    /// A copy with dense updates `deltas` (by weight name) added to its weights: a
    /// request's text-encoder LoRAs. The files and this encoder are left as they are.
    pub(crate) fn with_deltas(
        &self,
        deltas: std::collections::HashMap<String, Tensor>,
    ) -> Result<Self> {
        Self::load_patched(&self.part, self.dtype, &self.device, deltas)
    }

    /// Its linear layers' `(outputs, inputs)` by name.
    pub(crate) fn layers(&self) -> &std::collections::BTreeMap<String, (usize, usize)> {
        &self.layers
    }

    fn load_patched(
        part: &Part,
        dtype: DType,
        device: &Device,
        deltas: std::collections::HashMap<String, Tensor>,
    ) -> Result<Self> {
        let (weights, cfg) = open_clip(part)?;
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let mut layers = std::collections::BTreeMap::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("text_model.encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                layers.insert(format!("{p}.self_attn.{proj}"), (h, h));
            }
            layers.insert(format!("{p}.mlp.fc1"), (ff, h));
            layers.insert(format!("{p}.mlp.fc2"), (h, ff));
        }
        let config = clip::ClipTextConfig {
            vocab_size: cfg.vocab_size,
            embed_dim: cfg.hidden_size,
            activation: clip::Activation::QuickGelu,
            intermediate_size: cfg.intermediate_size,
            max_position_embeddings: cfg.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            projection_dim: cfg.hidden_size,
        };
        let vb = match deltas.is_empty() {
            true => weights.var_builder(dtype, device),
            false => candle_nn::VarBuilder::from_backend(
                Box::new(Patched {
                    inner: weights,
                    deltas,
                }),
                dtype,
                device.clone(),
            ),
        };
        let model = clip::ClipTextTransformer::new(vb.pp("text_model"), &config)
            .map_err(|e| EngineError::load("clip", e))?;
        Ok(Self {
            model,
            max_positions: cfg.max_position_embeddings,
            eos_token_id: cfg.eos_token_id.unwrap_or(2),
            device: device.clone(),
            part: part.clone(),
            dtype,
            layers,
        })
    }

    /// The most tokens the encoder takes (77 for CLIP-L).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The pooled vector `(1, hidden)`: the final hidden state at the end-of-text token,
    /// chosen as transformers does (the highest id when `eos_token_id == 2`, the legacy
    /// CLIP configs; else the first `eos_token_id`).
    pub fn pooled(&self, ids: &[u32]) -> Result<Tensor> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let hidden = self.model.forward_with_mask(&input, usize::MAX)?;
        let position = if self.eos_token_id == 2 {
            // First maximum, as torch.argmax and candle's CPU argmax both return.
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&i| i == max)
        } else {
            ids.iter().position(|&i| i == self.eos_token_id)
        }
        .unwrap_or(ids.len().saturating_sub(1));
        Ok(hidden.get(0)?.get(position)?.unsqueeze(0)?)
    }
}

/// The T5 encoder (v1.1, gated GELU).
pub struct T5Encoder {
    model: t5::T5,
}

/// The name of T5's first query weight, by which its prefix in a bundle is found.
const T5_ANCHOR: &str = "encoder.block.0.layer.0.SelfAttention.q.weight";
const T5_LLAMA_ANCHOR: &str = "enc.blk.0.attn_q.weight";

/// The encoder's config: `config.json` when the part has one, else read from shapes.
fn t5_config(
    part: &Part,
    shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
) -> Result<candle_t5::Config> {
    match &part.config {
        Some(path) => read_json(path),
        None => t5::infer_config(shape_of, &part.files[0]),
    }
}

/// Opens a T5 part in whichever layout it is.
pub(crate) fn open_t5(part: &Part, device: &Device) -> Result<Weights> {
    if !part.is_gguf() {
        return Ok(Weights::Dense(open(part, T5_ANCHOR, "T5 encoder")?));
    }
    let gguf = GgufFile::open(&part.files[0])?;
    let prefix_of = |anchor: &str| {
        gguf.names()
            .filter_map(|n| n.strip_suffix(anchor))
            .min_by_key(|p| p.len())
            .map(str::to_string)
    };
    let weights = if let Some(prefix) = prefix_of(T5_LLAMA_ANCHOR) {
        gguf.weights(
            |n| t5::llama_to_hf(n.strip_prefix(prefix.as_str())?),
            device,
        )?
    } else if let Some(prefix) = prefix_of(T5_ANCHOR) {
        gguf.weights(
            |n| n.strip_prefix(prefix.as_str()).map(str::to_string),
            device,
        )?
    } else {
        return Err(EngineError::UnknownLayout {
            path: gguf.path().to_path_buf(),
            message: format!(
                "no `{T5_LLAMA_ANCHOR}` or `{T5_ANCHOR}` tensor: this is not a T5 encoder"
            ),
        });
    };
    Ok(Weights::Quantized(weights))
}

impl T5Encoder {
    /// Loads the encoder from safetensors (transformers names, any prefix, with or without
    /// `config.json`) or GGUF (llama.cpp or transformers names).
    pub fn load(part: &Part, dtype: DType, device: &Device) -> Result<Self> {
        let model = match open_t5(part, device)? {
            Weights::Dense(weights) => {
                let config = t5_config(part, &|n| weights.shape(n))?;
                t5::T5::load_dense(&weights.var_builder(dtype, device), &config)?
            }
            Weights::Quantized(weights) => {
                let config = t5_config(part, &|n| weights.shape(n))?;
                t5::T5::load_quantized(&weights, &config)?
            }
        };
        Ok(Self { model })
    }

    /// The last hidden states `(1, ids.len(), d_model)`, with no attention mask, as
    /// FluxPipeline calls it.
    pub fn hidden(&self, ids: &[u32]) -> Result<Tensor> {
        self.model.forward(ids)
    }
}

/// Both encoders and their tokenizers, as FLUX uses them.
pub struct TextEncoders {
    /// CLIP's tokenizer (77 tokens).
    pub clip_tokenizer: FixedLengthTokenizer,
    /// T5's tokenizer (256 tokens for schnell).
    pub t5_tokenizer: FixedLengthTokenizer,
    /// CLIP-L.
    pub clip: ClipEncoder,
    /// T5; `None` while staged out.
    pub t5: Option<T5Encoder>,
}

/// A prompt's embeddings.
pub struct Embeddings {
    /// T5 hidden states `(1, len, d)`.
    pub sequence: Tensor,
    /// CLIP pooled `(1, d)`.
    pub pooled: Tensor,
    /// What was really encoded.
    pub prompt: PromptInfo,
}

impl TextEncoders {
    /// Encodes `prompt` with both encoders.
    pub fn encode(&mut self, prompt: &str) -> Result<Embeddings> {
        let clip_tokens = self.clip_tokenizer.encode(prompt)?;
        let t5_tokens = self.t5_tokenizer.encode(prompt)?;
        let pooled = self.clip.pooled(&clip_tokens.ids)?;
        let t5 = self
            .t5
            .as_ref()
            .ok_or_else(|| EngineError::load("t5", "staged out while encoding"))?;
        // T5 may run elsewhere (on the CPU beside a GPU too small for it): its states go
        // where CLIP's, the transformer's, are.
        let sequence = t5
            .hidden(&t5_tokens.ids)?
            .to_device(pooled.device())?
            .to_dtype(pooled.dtype())?;
        Ok(Embeddings {
            sequence,
            pooled,
            prompt: PromptInfo {
                encoded: t5_tokens.kept_text,
                truncated: t5_tokens.truncated,
                pooled_truncated: clip_tokens.truncated,
                tokens: t5_tokens.used,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_l_sizes_are_read_from_its_shapes() {
        // The shapes of `clip_l.safetensors` (openai/clip-vit-large-patch14's text model).
        let shape_of = |name: &str| -> Option<Vec<usize>> {
            let layer = name
                .strip_prefix("encoder.layers.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(i, _)| i.parse::<usize>().ok());
            match name {
                "embeddings.token_embedding.weight" => Some(vec![49408, 768]),
                "embeddings.position_embedding.weight" => Some(vec![77, 768]),
                _ if layer.is_some_and(|i| i < 12) && name.ends_with("mlp.fc1.weight") => {
                    Some(vec![3072, 768])
                }
                _ => None,
            }
        };
        let c = infer_clip_config(&shape_of, Path::new("clip_l.safetensors")).unwrap();
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.intermediate_size),
            (49408, 768, 3072)
        );
        assert_eq!(
            (
                c.num_hidden_layers,
                c.num_attention_heads,
                c.max_position_embeddings
            ),
            (12, 12, 77)
        );
    }

    #[test]
    fn t5_xxl_sizes_and_llama_cpp_names_round_trip() {
        let shape_of = |name: &str| -> Option<Vec<usize>> {
            let block = name
                .strip_prefix("encoder.block.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(i, _)| i.parse::<usize>().ok());
            match name {
                "shared.weight" => Some(vec![32128, 4096]),
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" => {
                    Some(vec![32, 64])
                }
                _ if block.is_some_and(|b| b < 24) && name.ends_with("SelfAttention.q.weight") => {
                    Some(vec![4096, 4096])
                }
                "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" => Some(vec![10240, 4096]),
                _ => None,
            }
        };
        let c = t5::infer_config(&shape_of, Path::new("t5xxl_fp16.safetensors")).unwrap();
        assert_eq!(
            (c.d_model, c.d_ff, c.d_kv, c.num_heads),
            (4096, 10240, 64, 64)
        );
        assert_eq!((c.num_layers, c.vocab_size), (24, 32128));
        assert!(c.feed_forward_proj.gated);
        let names = t5::tensor_names(&c);
        assert_eq!(names.len(), 219, "as city96's T5-XXL GGUF: 24 x 9 + 3");
        for (hf, _) in &names {
            let llama = t5::hf_to_llama(hf).unwrap();
            assert_eq!(t5::llama_to_hf(&llama).as_deref(), Some(hf.as_str()));
        }
        assert_eq!(
            t5::hf_to_llama("encoder.block.3.layer.1.DenseReluDense.wi_0.weight").as_deref(),
            Some("enc.blk.3.ffn_gate.weight")
        );
    }
}
