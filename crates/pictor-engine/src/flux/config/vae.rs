//! The flux autoencoder's architecture: widths from the decoder's weights, the group
//! count and the latent scale and shift from a record.

use serde::Deserialize;

use super::{Disagreements, Shapes, Source, bad, count, dim, read_config};
use crate::{error::Result, layout::Part};

/// FLUX.1's autoencoder: its decoder's base width, width multipliers, resnets per level
/// and latent channels, and the values its files do not record (Black Forest Labs'
/// `src/flux/modules/autoencoder.py` and `src/flux/util.py`).
const FLUX1_CH: usize = 128;
const FLUX1_MULT: [usize; 4] = [1, 2, 4, 4];
const FLUX1_RESNETS: usize = 2;
const FLUX1_LATENTS: usize = 16;
const FLUX1_GROUPS: usize = 32;
const FLUX1_SCALE: f64 = 0.3611;
const FLUX1_SHIFT: f64 = 0.1159;
/// What diffusers' `AutoencoderKL` takes when its config names no group count.
const DIFFUSERS_GROUPS: usize = 32;

/// A flux autoencoder decoder's architecture as read.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeArch {
    /// The width of the last (full-resolution) level.
    pub ch: usize,
    /// Each level's width as a multiple of `ch`, from full resolution down.
    pub ch_mult: Vec<usize>,
    /// Resnets per level, less one (the decoder has one more than the encoder).
    pub num_res_blocks: usize,
    /// Latent channels.
    pub z_channels: usize,
    /// Image channels.
    pub out_ch: usize,
    /// Group count of every group norm.
    pub groups: usize,
    /// Latents are `z / scale_factor + shift_factor` before decoding.
    pub scale_factor: f64,
    /// See `scale_factor`.
    pub shift_factor: f64,
    /// Where the group count, scale and shift came from.
    pub from: Source,
}

impl VaeArch {
    /// Each level's width, from full resolution down.
    pub fn widths(&self) -> Vec<usize> {
        self.ch_mult.iter().map(|m| m * self.ch).collect()
    }

    fn is_flux1(&self) -> bool {
        self.ch == FLUX1_CH
            && self.ch_mult == FLUX1_MULT
            && self.num_res_blocks == FLUX1_RESNETS
            && self.z_channels == FLUX1_LATENTS
    }
}

/// The fields of diffusers' `AutoencoderKL` config that describe the decoder.
#[derive(Debug, Default, Deserialize)]
struct DiffusersConfig {
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
    norm_num_groups: Option<usize>,
    act_fn: Option<String>,
    latent_channels: Option<usize>,
    out_channels: Option<usize>,
    block_out_channels: Option<Vec<usize>>,
    layers_per_block: Option<usize>,
    use_post_quant_conv: Option<bool>,
    mid_block_add_attention: Option<bool>,
    up_block_types: Option<Vec<String>>,
    latents_mean: Option<serde_json::Value>,
    latents_std: Option<serde_json::Value>,
}

impl DiffusersConfig {
    /// Refuses every architectural field the decoder does not implement as the config
    /// states it, by name: the decoder would otherwise run and draw wrong pixels.
    fn check(&self, arch: &VaeArch, wrong: &mut Disagreements) {
        if let Some(act) = self.act_fn.as_deref().filter(|a| *a != "silu") {
            wrong.push(format!(
                "`act_fn` is `{act}`, but the decoder implements `silu` only"
            ));
        }
        wrong.field("latent_channels", self.latent_channels, arch.z_channels);
        wrong.field("out_channels", self.out_channels, arch.out_ch);
        wrong.field(
            "block_out_channels",
            self.block_out_channels.clone(),
            arch.widths(),
        );
        wrong.field(
            "layers_per_block",
            self.layers_per_block,
            arch.num_res_blocks,
        );
        if self.use_post_quant_conv == Some(true) {
            wrong.push(
                "`use_post_quant_conv` is true, but FLUX.1's autoencoder has no post_quant_conv and the decoder applies none",
            );
        }
        if self.mid_block_add_attention == Some(false) {
            wrong.push(
                "`mid_block_add_attention` is false, but the decoder implements the mid-block attention of FLUX.1's autoencoder only",
            );
        }
        if let Some(kind) = self
            .up_block_types
            .iter()
            .flatten()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            wrong.push(format!(
                "`up_block_types` has `{kind}`, but the decoder implements `UpDecoderBlock2D` only"
            ));
        }
        for (name, value) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                wrong.push(format!(
                    "`{name}` is set, but the decoder implements FLUX.1's single latent scale and shift only"
                ));
            }
        }
        for (name, value) in [
            ("scaling_factor", self.scaling_factor),
            ("shift_factor", self.shift_factor),
        ] {
            if value.is_none() {
                wrong.push(format!("`{name}` is missing"));
            }
        }
    }
}

/// The autoencoder's architecture, from its decoder weights and the part's config.
pub(crate) fn vae(w: &dyn Shapes, part: &Part) -> Result<VaeArch> {
    let levels = count(w, |i| format!("decoder.up.{i}.block.0.conv1.weight"));
    if levels == 0 {
        return Err(bad(w, "no decoder.up.N blocks".into()));
    }
    if levels != FLUX1_MULT.len() {
        return Err(bad(
            w,
            format!(
                "the decoder has {levels} levels (a {}× upscale), but the engine implements FLUX.1's {} (8×), which its 16-pixel grid assumes",
                1usize << (levels - 1).min(16),
                FLUX1_MULT.len()
            ),
        ));
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
    let mut arch = VaeArch {
        ch,
        ch_mult: widths.iter().map(|c| c / ch).collect(),
        num_res_blocks: count(w, |j| format!("decoder.up.0.block.{j}.conv1.weight")) - 1,
        z_channels: dim(w, "decoder.conv_in.weight", 1)?,
        out_ch: dim(w, "decoder.conv_out.weight", 0)?,
        groups: FLUX1_GROUPS,
        scale_factor: FLUX1_SCALE,
        shift_factor: FLUX1_SHIFT,
        from: Source::Flux1,
    };
    let file: Option<DiffusersConfig> = read_config(part.config.as_deref())?;
    match (file, &part.config) {
        (Some(file), Some(path)) => {
            let mut wrong = Disagreements::default();
            file.check(&arch, &mut wrong);
            arch.groups = file.norm_num_groups.unwrap_or(DIFFUSERS_GROUPS);
            arch.scale_factor = file.scaling_factor.unwrap_or_default();
            arch.shift_factor = file.shift_factor.unwrap_or_default();
            arch.from = Source::Config(path.clone());
            if let Some(w) = arch.widths().into_iter().find(|c| c % arch.groups != 0) {
                wrong.push(format!(
                    "`norm_num_groups` is {}, which does not divide the width {w}",
                    arch.groups
                ));
            }
            wrong.check(path, "this autoencoder is not one Pictor can decode")?;
        }
        _ if arch.is_flux1() => {}
        _ => {
            return Err(bad(
                w,
                format!(
                    "this decoder (widths {:?}, {} latent channels) is not FLUX.1's, and nothing records its group count, latent scale and shift: \
                     put the model's diffusers vae config.json beside the file, named after it with .json",
                    arch.widths(),
                    arch.z_channels
                ),
            ));
        }
    }
    Ok(arch)
}

impl std::fmt::Display for VaeArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "decoder widths {:?}, {} resnets a level, {} latent channels, {} groups, latent scale {} and shift {} ({})",
            self.widths(),
            self.num_res_blocks + 1,
            self.z_channels,
            self.groups,
            self.scale_factor,
            self.shift_factor,
            self.from
        )
    }
}
