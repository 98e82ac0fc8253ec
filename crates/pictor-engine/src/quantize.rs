//! Converting a FLUX transformer, a T5 encoder or a Z-Image transformer, from any layout
//! the engine reads, to a quantized GGUF file in the community's conventions, one tensor at
//! a time (Z-Image's in Tongyi-MAI's original names, as ComfyUI-GGUF's files have them).
//!
//! What gets quantized follows city96's FLUX GGUF files (ComfyUI-GGUF `tools/`): the 2-D
//! weights of the blocks take the target type; the input and output layers (`img_in`,
//! `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer`) stay F16; 1-D tensors
//! stay F32. T5 follows llama.cpp: the seven linear weights per block take the target,
//! the token embedding F16, norms and the position bias F32, and the names are llama.cpp's
//! (`enc.blk.N.attn_q.weight`) so the file also works in ComfyUI-GGUF and
//! stable-diffusion.cpp. A row length that is not a whole number of the target's blocks
//! falls back as llama.cpp does (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, then F16).
//!
//! Peak memory is one tensor in f32 plus its quantized bytes: the directory is written
//! first ([`GgufWriter`]) and each tensor is read, converted and written in turn.

use std::{collections::BTreeMap, path::Path, str::FromStr};

use candle_core::{Device, Tensor, quantized::GgmlDType, quantized::QTensor};
use rayon::prelude::*;

use crate::{
    error::{EngineError, Result},
    flux::{config, model, transformer},
    layers::Weights,
    layout::Part,
    text::{self, t5},
    weights::gguf_write::{GgufWriter, MetaValue, TensorEntry},
    zimage,
};

/// The quantization a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// 8.5 bits per weight.
    Q8_0,
    /// 6.56 bits per weight (k-quant).
    Q6K,
    /// 5.5 bits per weight (k-quant).
    Q5K,
    /// 4.5 bits per weight (k-quant).
    Q4K,
    /// 5.5 bits per weight (legacy).
    Q5_0,
    /// 4.5 bits per weight (legacy).
    Q4_0,
    /// Half precision, no quantization.
    F16,
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "q8_0" => Self::Q8_0,
            "q6_k" | "q6k" => Self::Q6K,
            "q5_k" | "q5k" | "q5_k_s" => Self::Q5K,
            "q4_k" | "q4k" | "q4_k_s" => Self::Q4K,
            "q5_0" => Self::Q5_0,
            "q4_0" => Self::Q4_0,
            "f16" => Self::F16,
            other => {
                return Err(format!(
                    "unknown quantization `{other}`: use q8_0, q6_k, q5_k, q4_k, q5_0, q4_0 or f16"
                ));
            }
        })
    }
}

impl Target {
    /// The name files and users use: `Q8_0`, `Q4_K`, ...
    pub fn label(self) -> &'static str {
        crate::inspect::ggml_name(self.ggml())
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::F16 => GgmlDType::F16,
        }
    }

    /// llama.cpp's `general.file_type` for a file mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q4K => 14,
            Self::Q5K => 16,
            Self::Q6K => 18,
        }
    }

    /// The type a weight of row length `cols` gets: the target if its blocks fit,
    /// otherwise llama.cpp's fallback.
    fn for_row(self, cols: usize) -> GgmlDType {
        let fits = |t: GgmlDType| cols.is_multiple_of(t.block_size());
        let first = self.ggml();
        let fallback = match first {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            _ => GgmlDType::F16,
        };
        [first, fallback]
            .into_iter()
            .find(|&t| fits(t))
            .unwrap_or(GgmlDType::F16)
    }
}

/// Which network to convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The flux transformer.
    Transformer,
    /// The T5 text encoder.
    T5,
    /// Z-Image's transformer.
    ZImageTransformer,
}

impl Component {
    /// Its name in file names and messages.
    pub fn label(self) -> &'static str {
        match self {
            Self::Transformer => "transformer",
            Self::T5 => "t5",
            Self::ZImageTransformer => "zimage-transformer",
        }
    }
}

/// What a conversion wrote.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Tensors written.
    pub tensors: usize,
    /// Parameters written.
    pub parameters: u64,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Tensor count and bytes per storage type.
    pub by_type: BTreeMap<String, (usize, u64)>,
}

/// One output tensor: canonical name (to read), file name (to write), shape and type.
struct Planned {
    canonical: String,
    name: String,
    shape: Vec<usize>,
    dtype: GgmlDType,
}

const FLUX_KEEP: [&str; 6] = [
    "img_in.",
    "txt_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
];

/// The type of a tensor that is not quantized: F32 when small or 1-D, else F16.
fn plain_type(shape: &[usize]) -> GgmlDType {
    let elems: usize = shape.iter().product();
    if shape.len() < 2 || elems <= 1024 {
        GgmlDType::F32
    } else {
        GgmlDType::F16
    }
}

/// A diffusion transformer's plan: the blocks' matrices (2-D `.weight`s of more than one
/// row) take the target; the layers named by `keep` (inputs and outputs), 1-D tensors and
/// the rest stay plain.
fn blocks_plan(names: Vec<(String, Vec<usize>)>, keep: &[&str], target: Target) -> Vec<Planned> {
    names
        .into_iter()
        .map(|(name, shape)| {
            let quantize = shape.len() == 2
                && shape[0] > 1
                && name.ends_with(".weight")
                && !keep.iter().any(|p| name.starts_with(p));
            let dtype = if quantize {
                target.for_row(shape[1])
            } else {
                plain_type(&shape)
            };
            Planned {
                canonical: name.clone(),
                name,
                shape,
                dtype,
            }
        })
        .collect()
}

/// Z-Image's in and out layers stay F16, as FLUX's do; the blocks' matrices (attention,
/// feed-forward, modulation) take the target.
const ZIMAGE_KEEP: [&str; 4] = [
    "x_embedder.",
    "cap_embedder.",
    "t_embedder.",
    "final_layer.",
];

fn t5_plan(cfg: &candle_transformers::models::t5::Config, target: Target) -> Result<Vec<Planned>> {
    t5::tensor_names(cfg)
        .into_iter()
        .map(|(canonical, shape)| {
            let linear = canonical.contains("SelfAttention.")
                && !canonical.contains("relative_attention_bias")
                || canonical.contains("DenseReluDense.");
            let dtype = if linear {
                target.for_row(shape[1])
            } else {
                plain_type(&shape)
            };
            let name = t5::hf_to_llama(&canonical).ok_or_else(|| {
                EngineError::load("t5", format!("no llama.cpp name for `{canonical}`"))
            })?;
            Ok(Planned {
                canonical,
                name,
                shape,
                dtype,
            })
        })
        .collect()
}

/// Quantizes rows in parallel: every row is whole blocks, so row ranges convert
/// independently and their bytes concatenate to the tensor's.
fn quantize_rows(t: &Tensor, dtype: GgmlDType) -> candle_core::Result<Vec<u8>> {
    let rows = t.dim(0)?;
    if t.rank() < 2 || rows < 64 {
        return Ok(QTensor::quantize(t, dtype)?.data()?.into_owned());
    }
    let cols = t.elem_count() / rows;
    // Chunks are built from slices: candle's `QTensor::quantize` reads a tensor's whole
    // storage, ignoring a view's offset, so narrowed views cannot be passed to it.
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    let chunk = rows.div_ceil(rayon::current_num_threads() * 4).max(16);
    let parts: Vec<Vec<u8>> = values
        .par_chunks(chunk * cols)
        .map(|part| {
            let rows = part.len() / cols;
            let part = Tensor::from_slice(part, (rows, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&part, dtype)?.data()?.into_owned())
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(parts.concat())
}

/// Converts `component` of `part` to a GGUF file of `target` at `out`, reporting each
/// tensor to `progress` as `(index, count, name)`.
pub fn quantize(
    part: &Part,
    component: Component,
    target: Target,
    out: &Path,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<Summary> {
    let origin = part.files[0]
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut meta: Vec<(&str, MetaValue)> = vec![
        ("general.quantization_version", MetaValue::U32(2)),
        ("general.file_type", MetaValue::U32(target.file_type())),
        ("pictor.source", MetaValue::Str(origin)),
    ];
    let (reader, plan) = match component {
        Component::Transformer => {
            let reader = transformer::open(part, &Device::Cpu)?;
            let cfg = match &reader {
                Weights::Dense(w) => config::transformer(w, part)?.config,
                Weights::Quantized(w) => config::transformer(w, part)?.config,
            };
            meta.insert(0, ("general.architecture", MetaValue::Str("flux".into())));
            meta.push(("general.name", MetaValue::Str("FLUX.1-schnell".into())));
            let axes: Vec<String> = cfg.axes_dim.iter().map(usize::to_string).collect();
            meta.push((config::ROPE_AXES_KEY, MetaValue::Str(axes.join(","))));
            (
                reader,
                blocks_plan(model::tensor_names(&cfg), &FLUX_KEEP, target),
            )
        }
        Component::ZImageTransformer => {
            let reader = zimage::transformer::open_weights(part, &Device::Cpu)?;
            let cfg = zimage::transformer::config_of(part, &reader)?;
            let names = zimage::transformer::tensor_names(&cfg)
                .into_iter()
                .filter(|(n, _)| reader.contains(n))
                .collect();
            // ComfyUI-GGUF's architecture name for Z-Image's (Lumina 2's) network.
            meta.insert(
                0,
                ("general.architecture", MetaValue::Str("lumina2".into())),
            );
            meta.push(("general.name", MetaValue::Str("Z-Image-Turbo".into())));
            (reader, blocks_plan(names, &ZIMAGE_KEEP, target))
        }
        Component::T5 => {
            let reader = text::open_t5(part, &Device::Cpu)?;
            let shape_of = |n: &str| reader.shape(n);
            let cfg = t5::infer_config(&shape_of, &part.files[0])?;
            meta.insert(
                0,
                ("general.architecture", MetaValue::Str("t5encoder".into())),
            );
            meta.extend([
                ("general.name", MetaValue::Str("T5 v1.1 encoder".into())),
                ("t5encoder.context_length", MetaValue::U32(512)),
                (
                    "t5encoder.embedding_length",
                    MetaValue::U32(cfg.d_model as u32),
                ),
                (
                    "t5encoder.feed_forward_length",
                    MetaValue::U32(cfg.d_ff as u32),
                ),
                (
                    "t5encoder.block_count",
                    MetaValue::U32(cfg.num_layers as u32),
                ),
                (
                    "t5encoder.attention.head_count",
                    MetaValue::U32(cfg.num_heads as u32),
                ),
                (
                    "t5encoder.attention.key_length",
                    MetaValue::U32(cfg.d_kv as u32),
                ),
                (
                    "t5encoder.attention.value_length",
                    MetaValue::U32(cfg.d_kv as u32),
                ),
                (
                    "t5encoder.attention.layer_norm_epsilon",
                    MetaValue::F32(cfg.layer_norm_epsilon as f32),
                ),
                (
                    "t5encoder.attention.relative_buckets_count",
                    MetaValue::U32(cfg.relative_attention_num_buckets as u32),
                ),
            ]);
            let plan = t5_plan(&cfg, target)?;
            (reader, plan)
        }
    };
    let entries = plan
        .iter()
        .map(|p| TensorEntry {
            name: p.name.clone(),
            shape: p.shape.clone(),
            dtype: p.dtype,
        })
        .collect();
    let mut writer = GgufWriter::create(out, &meta, entries)?;
    let mut summary = Summary::default();
    for (i, p) in plan.iter().enumerate() {
        progress(i, plan.len(), &p.name);
        let t = reader.f32(&p.canonical)?;
        if t.dims() != p.shape.as_slice() {
            return Err(EngineError::Tensor {
                path: part.files[0].clone(),
                tensor: p.canonical.clone(),
                problem: format!("has shape {:?}, expected {:?}", t.dims(), p.shape),
            });
        }
        let bytes = quantize_rows(&t, p.dtype)?;
        writer.write(&p.name, &bytes)?;
        summary.tensors += 1;
        summary.parameters += t.elem_count() as u64;
        summary.bytes += bytes.len() as u64;
        let slot = summary
            .by_type
            .entry(crate::inspect::ggml_name(p.dtype).to_string())
            .or_default();
        slot.0 += 1;
        slot.1 += bytes.len() as u64;
    }
    writer.finish()?;
    Ok(summary)
}
