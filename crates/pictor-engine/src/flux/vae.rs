//! The flux autoencoder's decoder as a component: latents to pixels.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::{
    config::{self, VaeArch},
    decoder::Decoder,
    sampling,
};
use crate::{
    error::{EngineError, Result},
    image::to_unit_range,
    layout::Part,
    weights::{MappedWeights, SafetensorFiles, Scheme},
};

/// An autoencoder part's decoder weights (Black Forest Labs or diffusers names), opened.
pub(super) fn open(part: &Part) -> Result<MappedWeights> {
    let files = Arc::new(SafetensorFiles::open(&part.files)?);
    let weights = if let Some(prefix) = files.prefix_of("decoder.up.0.block.0.conv1.weight") {
        MappedWeights::new(files, Scheme::Identity, prefix)
    } else if let Some(prefix) = files.prefix_of("decoder.up_blocks.0.resnets.0.conv1.weight") {
        let levels = (0..)
            .take_while(|k| {
                files.contains(&format!(
                    "{prefix}decoder.up_blocks.{k}.resnets.0.conv1.weight"
                ))
            })
            .count();
        MappedWeights::new(files, Scheme::DiffusersVae { levels }, prefix)
    } else {
        return Err(EngineError::UnknownLayout {
            path: files.path_of(""),
            message: "neither Black Forest Labs (decoder.up.N...) nor diffusers (decoder.up_blocks.N...) autoencoder names".into(),
        });
    };
    Ok(weights)
}

/// An autoencoder part's architecture, read without loading it.
pub fn arch_of(part: &Part) -> Result<VaeArch> {
    config::vae(&open(part)?, part)
}

/// A loaded autoencoder decoder with its latent scale and shift.
pub struct Vae {
    decoder: Decoder,
    config: VaeArch,
    dtype: DType,
}

impl Vae {
    /// Loads the decoder of the autoencoder part (Black Forest Labs or diffusers names).
    /// On the CPU it always runs in f32: candle 0.11.1 has no bf16/f16 convolution there
    /// (its im2col matmul refuses them), and f32 is the faster CPU dtype anyway.
    pub fn load(part: &Part, dtype: DType, device: &Device) -> Result<Self> {
        let dtype = if device.is_cpu() { DType::F32 } else { dtype };
        let weights = open(part)?;
        let config = config::vae(&weights, part)?;
        let decoder = Decoder::load(&config, weights.var_builder(dtype, device).pp("decoder"))?;
        Ok(Self {
            decoder,
            config,
            dtype,
        })
    }

    /// The architecture, as read.
    pub fn arch(&self) -> &VaeArch {
        &self.config
    }

    /// Decodes packed latents `(b, tokens, 64)` for an image of `height`×`width` into pixel
    /// values in `[0, 1]`, `(b, 3, height, width)` f32, one image at a time to bound memory.
    pub fn decode(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let (h, w) = sampling::latent_dims(height, width);
        let latents = sampling::unpack(packed, h, w)?;
        let mut images = Vec::with_capacity(latents.dim(0)?);
        for i in 0..latents.dim(0)? {
            let z = latents.narrow(0, i, 1)?;
            let z = ((z / self.config.scale_factor)? + self.config.shift_factor)?
                .to_dtype(self.dtype)?;
            images.push(to_unit_range(&self.decoder.forward(&z)?)?);
        }
        Ok(Tensor::cat(&images, 0)?)
    }
}
