//! The flux transformer as a component: loaded from safetensors (Black Forest Labs or
//! diffusers names) or GGUF, evaluated one velocity at a time.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::model::Config;

use super::{
    config::{self, TransformerArch},
    model::FluxModel,
    sampling,
};
use crate::{
    error::{EngineError, Result},
    layers::{LayerTable, Weights},
    layout::Part,
    text::Embeddings,
    weights::{GgufFile, MappedWeights, SafetensorFiles, Scheme},
};

/// Opens a transformer part in whichever layout it is.
pub(crate) fn open(part: &Part, device: &Device) -> Result<Weights> {
    if part.is_gguf() {
        let gguf = GgufFile::open(&part.files[0])?;
        let weights = gguf.diffusion_model("img_in.weight", device)?;
        return Ok(Weights::Quantized(weights));
    }
    let files = Arc::new(SafetensorFiles::open(&part.files)?);
    if let Some(prefix) = files.prefix_of("double_blocks.0.img_attn.qkv.weight") {
        Ok(Weights::Dense(MappedWeights::new(
            files,
            Scheme::Identity,
            prefix,
        )))
    } else if let Some(prefix) = files.prefix_of("transformer_blocks.0.attn.to_q.weight") {
        Ok(Weights::Dense(MappedWeights::new(
            files,
            Scheme::DiffusersFluxTransformer,
            prefix,
        )))
    } else {
        Err(EngineError::UnknownLayout {
            path: files.path_of(""),
            message: "neither Black Forest Labs (double_blocks.N...) nor diffusers (transformer_blocks.N...) transformer names".into(),
        })
    }
}

/// A transformer part's architecture, read from its headers (and records) without
/// loading it.
pub fn arch_of(part: &Part) -> Result<TransformerArch> {
    match open(part, &Device::Cpu)? {
        Weights::Quantized(weights) => config::transformer(&weights, part),
        Weights::Dense(weights) => config::transformer(&weights, part),
    }
}

/// A loaded flux transformer.
pub struct Transformer {
    model: FluxModel,
    /// Its linear layers, where a batch's LoRA updates attach.
    layers: LayerTable,
    config: Config,
    device: Device,
    /// The arithmetic's dtype.
    dtype: DType,
}

impl Transformer {
    /// Loads the transformer part in `dtype`. On the CPU a half dtype keeps the weight
    /// matrices at half the size and computes in f32; GGUF files keep their quantization
    /// and compute in f32.
    pub fn load(part: &Part, dtype: DType, device: &Device) -> Result<Self> {
        let weights = open(part, device)?;
        let config = match &weights {
            Weights::Quantized(w) => config::transformer(w, part)?.config,
            Weights::Dense(w) => config::transformer(w, part)?.config,
        };
        let src = weights.source(dtype, device);
        let (model, dtype) = (FluxModel::load(&src, &config)?, src.compute());
        // Loading converted and concatenated tensors; their scratch is free now.
        crate::heap::release_freed_memory();
        Ok(Self {
            model,
            layers: src.layers(),
            config,
            device: device.clone(),
            dtype,
        })
    }

    /// Its linear layers by BFL name.
    pub(crate) fn layers(&self) -> &LayerTable {
        &self.layers
    }

    /// The hyper-parameters, as read from the weights.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// One evaluation: the velocity for packed latents `img` `(b, tokens, 64)` at `sigma`,
    /// returned in f32. `emb` holds one prompt (shared by the batch) or `b`; `guidance` is
    /// the guidance scale of a model with a guidance embedding (which needs one).
    pub fn velocity(
        &self,
        img: &Tensor,
        emb: &Embeddings,
        sigma: f64,
        guidance: Option<f64>,
        latent_hw: (usize, usize),
    ) -> Result<Tensor> {
        let b = img.dim(0)?;
        let dtype = self.dtype;
        // One prompt for the whole batch, or one per image.
        let per_image = emb.sequence.dim(0)? == b;
        let txt = emb.sequence.to_dtype(dtype)?;
        let txt = if per_image {
            txt
        } else {
            txt.repeat((b, 1, 1))?
        };
        let pooled = emb.pooled.to_dtype(dtype)?;
        let pooled = if per_image {
            pooled
        } else {
            pooled.repeat((b, 1))?
        };
        // Positions in f32 whatever the dtype: bf16 holds integers exactly only to 256.
        let txt_ids = Tensor::zeros((b, txt.dim(1)?, 3), DType::F32, &self.device)?;
        let (h, w) = latent_hw;
        let img_ids = sampling::image_ids(b, h, w, DType::F32, &self.device)?;
        let t = Tensor::full(sigma as f32, b, &self.device)?.to_dtype(dtype)?;
        let img = img.to_dtype(dtype)?;
        // As diffusers and BFL pass it: in the compute dtype (3.5 is exact in bf16).
        let guidance = match guidance {
            Some(g) => Some(Tensor::full(g as f32, b, &self.device)?.to_dtype(dtype)?),
            None => None,
        };
        let v = self.model.forward(
            &img,
            &img_ids,
            &txt,
            &txt_ids,
            &t,
            &pooled,
            guidance.as_ref(),
        )?;
        Ok(v.to_dtype(DType::F32)?)
    }
}
