//! Reading the transformer's and the autoencoder's hyper-parameters from the weights.
//!
//! The Black Forest Labs files and GGUF files carry no config, so every size is read from
//! tensor shapes; a diffusers `config.json`, when present, only adds what shapes cannot say
//! (the RoPE axes and the VAE's latent scale and shift).

use std::path::{Path, PathBuf};

use candle_transformers::models::flux::{autoencoder, model};
use serde::Deserialize;

use crate::{
    error::{EngineError, Result},
    weights::{MappedWeights, QWeights},
};

/// Shape lookups by canonical name, over any weight source.
pub(crate) trait Shapes {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>>;
    fn origin(&self) -> PathBuf;
    /// RoPE axes the file itself records (Pictor's GGUF files do), if any.
    fn rope_axes(&self) -> Option<Vec<usize>> {
        None
    }
}

/// The GGUF metadata key under which converted transformers keep their RoPE axes, which
/// tensor shapes cannot tell (a diffusers `config.json` can).
pub const ROPE_AXES_KEY: &str = "pictor.flux.axes_dims_rope";

impl Shapes for MappedWeights {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.shape(name)
    }
    fn origin(&self) -> PathBuf {
        self.files().path_of("")
    }
}

impl Shapes for QWeights {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.shape(name)
    }
    fn origin(&self) -> PathBuf {
        self.origin().to_path_buf()
    }
    fn rope_axes(&self) -> Option<Vec<usize>> {
        self.meta(ROPE_AXES_KEY)?
            .split(',')
            .map(|a| a.trim().parse().ok())
            .collect()
    }
}

fn dim(w: &dyn Shapes, name: &str, axis: usize) -> Result<usize> {
    let shape = w.shape_of(name).ok_or_else(|| EngineError::Tensor {
        path: w.origin(),
        tensor: name.to_string(),
        problem: "missing".into(),
    })?;
    shape.get(axis).copied().ok_or_else(|| EngineError::Tensor {
        path: w.origin(),
        tensor: name.to_string(),
        problem: format!(
            "has shape {shape:?}, expected at least {} dimensions",
            axis + 1
        ),
    })
}

fn count(w: &dyn Shapes, pattern: impl Fn(usize) -> String) -> usize {
    (0..)
        .take_while(|&i| w.shape_of(&pattern(i)).is_some())
        .count()
}

fn bad(w: &dyn Shapes, message: String) -> EngineError {
    EngineError::UnknownLayout {
        path: w.origin(),
        message,
    }
}

#[derive(Debug, Default, Deserialize)]
struct DiffusersTransformerConfig {
    #[serde(default)]
    axes_dims_rope: Option<Vec<usize>>,
}

#[derive(Debug, Default, Deserialize)]
struct DiffusersVaeConfig {
    #[serde(default)]
    scaling_factor: Option<f64>,
    #[serde(default)]
    shift_factor: Option<f64>,
    #[serde(default)]
    norm_num_groups: Option<usize>,
    #[serde(default)]
    act_fn: Option<String>,
    #[serde(default)]
    latent_channels: Option<usize>,
    #[serde(default)]
    block_out_channels: Option<Vec<usize>>,
    #[serde(default)]
    layers_per_block: Option<usize>,
    #[serde(default)]
    use_post_quant_conv: Option<bool>,
}

impl DiffusersVaeConfig {
    /// Refuses every architectural field the decoder does not implement as the config
    /// states it, by name: the decoder would otherwise run and draw wrong pixels.
    fn check(&self, path: &Path, cfg: &autoencoder::Config) -> Result<()> {
        let widths: Vec<usize> = cfg.ch_mult.iter().map(|m| m * cfg.ch).collect();
        let mut wrong = Vec::new();
        if let Some(g) = self
            .norm_num_groups
            .filter(|&g| g != super::decoder::GROUPS)
        {
            wrong.push(format!(
                "`norm_num_groups` is {g}, but the decoder implements FLUX.1's {} groups only",
                super::decoder::GROUPS
            ));
        }
        if let Some(act) = self.act_fn.as_deref().filter(|a| *a != "silu") {
            wrong.push(format!(
                "`act_fn` is `{act}`, but the decoder implements `silu` only"
            ));
        }
        if let Some(c) = self.latent_channels.filter(|&c| c != cfg.z_channels) {
            wrong.push(format!(
                "`latent_channels` is {c}, but the weights have {}",
                cfg.z_channels
            ));
        }
        if let Some(b) = self.block_out_channels.as_ref().filter(|b| **b != widths) {
            wrong.push(format!(
                "`block_out_channels` is {b:?}, but the weights have {widths:?}"
            ));
        }
        if let Some(l) = self.layers_per_block.filter(|&l| l != cfg.num_res_blocks) {
            wrong.push(format!(
                "`layers_per_block` is {l}, but the weights have {}",
                cfg.num_res_blocks
            ));
        }
        if self.use_post_quant_conv == Some(true) {
            wrong.push(
                "`use_post_quant_conv` is true, but FLUX.1's autoencoder has no post_quant_conv and the decoder applies none"
                    .into(),
            );
        }
        if wrong.is_empty() {
            return Ok(());
        }
        Err(EngineError::file(
            path,
            format!(
                "this autoencoder is not one Pictor can decode: {}",
                wrong.join("; ")
            ),
        ))
    }
}

fn read_config<T: for<'de> Deserialize<'de> + Default>(path: Option<&Path>) -> Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::file(path, format!("bad config: {e}")))
}

/// The flux transformer's config, from its weights (and `config.json` for the RoPE axes).
pub(crate) fn transformer(w: &dyn Shapes, config: Option<&Path>) -> Result<model::Config> {
    let hidden = dim(w, "img_in.weight", 0)?;
    let in_channels = dim(w, "img_in.weight", 1)?;
    let head_dim = dim(w, "double_blocks.0.img_attn.norm.query_norm.scale", 0)?;
    let mlp = dim(w, "double_blocks.0.img_mlp.0.weight", 0)?;
    if head_dim == 0 || hidden % head_dim != 0 {
        return Err(bad(
            w,
            format!("hidden size {hidden} is not a multiple of the head size {head_dim}"),
        ));
    }
    let from_file = read_config::<DiffusersTransformerConfig>(config)?.axes_dims_rope;
    let axes_dim = match from_file.or_else(|| w.rope_axes()) {
        Some(axes) => axes,
        // FLUX's (16, 56, 56) for 128-wide heads, scaled: the proportion BFL uses.
        None => vec![head_dim / 8, head_dim * 7 / 16, head_dim * 7 / 16],
    };
    if axes_dim.iter().sum::<usize>() != head_dim || axes_dim.iter().any(|a| a % 2 != 0) {
        return Err(bad(
            w,
            format!("RoPE axes {axes_dim:?} must be even and add up to the head size {head_dim}"),
        ));
    }
    let cfg = model::Config {
        in_channels,
        vec_in_dim: dim(w, "vector_in.in_layer.weight", 1)?,
        context_in_dim: dim(w, "txt_in.weight", 1)?,
        hidden_size: hidden,
        mlp_ratio: mlp as f64 / hidden as f64,
        num_heads: hidden / head_dim,
        depth: count(w, |i| format!("double_blocks.{i}.img_attn.qkv.weight")),
        depth_single_blocks: count(w, |i| format!("single_blocks.{i}.linear1.weight")),
        axes_dim,
        theta: 10_000,
        qkv_bias: w.shape_of("double_blocks.0.img_attn.qkv.bias").is_some(),
        guidance_embed: w.shape_of("guidance_in.in_layer.weight").is_some(),
    };
    if cfg.guidance_embed {
        return Err(bad(
            w,
            "this transformer has a guidance embedding (FLUX.1-dev); only FLUX.1-schnell is supported so far".into(),
        ));
    }
    Ok(cfg)
}

/// FLUX's latent normalisation, used when the weights come without a config
/// (BFL `ae.safetensors`): `src/flux/util.py` in black-forest-labs/flux.
const FLUX_SCALE: f64 = 0.3611;
const FLUX_SHIFT: f64 = 0.1159;

/// The autoencoder's config, from its decoder weights (and `config.json` for the latent
/// scale and shift).
pub(crate) fn vae(w: &dyn Shapes, config: Option<&Path>) -> Result<autoencoder::Config> {
    let levels = count(w, |i| format!("decoder.up.{i}.block.0.conv1.weight"));
    if levels == 0 {
        return Err(bad(w, "no decoder.up.N blocks".into()));
    }
    let widths = (0..levels)
        .map(|i| dim(w, &format!("decoder.up.{i}.block.0.conv2.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let ch = widths[0];
    if ch == 0 || widths.iter().any(|c| c % ch != 0) {
        return Err(bad(
            w,
            format!("decoder widths {widths:?} are not multiples of {ch}"),
        ));
    }
    let file: DiffusersVaeConfig = read_config(config)?;
    let cfg = autoencoder::Config {
        resolution: 256,
        in_channels: 3,
        ch,
        out_ch: dim(w, "decoder.conv_out.weight", 0)?,
        ch_mult: widths.iter().map(|c| c / ch).collect(),
        num_res_blocks: count(w, |j| format!("decoder.up.0.block.{j}.conv1.weight")) - 1,
        z_channels: dim(w, "decoder.conv_in.weight", 1)?,
        scale_factor: file.scaling_factor.unwrap_or(FLUX_SCALE),
        shift_factor: file.shift_factor.unwrap_or(FLUX_SHIFT),
    };
    if let Some(path) = config {
        file.check(path, &cfg)?;
    }
    Ok(cfg)
}
