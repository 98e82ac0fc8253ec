//! The flux transformer's architecture: sizes from the weights, RoPE axes from a record.

use candle_transformers::models::flux::model;
use serde::Deserialize;

use super::{Disagreements, Shapes, Source, bad, count, dim, read_config};
use crate::{error::Result, layout::Part};

/// FLUX.1's head size and the RoPE axes its heads are split into (Black Forest Labs'
/// `FluxParams.axes_dim` for both FLUX.1 models).
const FLUX1_HEAD: usize = 128;
const FLUX1_AXES: [usize; 3] = [16, 56, 56];

/// A flux transformer's architecture as read, with where its RoPE axes came from.
#[derive(Debug, Clone)]
pub struct TransformerArch {
    /// The hyper-parameters the network is built from.
    pub config: model::Config,
    /// The width of one attention head.
    pub head_dim: usize,
    /// Where [`model::Config::axes_dim`] came from.
    pub axes_from: Source,
}

/// The fields of diffusers' `FluxTransformer2DModel` config that describe the network.
#[derive(Debug, Default, Deserialize)]
struct DiffusersConfig {
    axes_dims_rope: Option<Vec<usize>>,
    attention_head_dim: Option<usize>,
    num_attention_heads: Option<usize>,
    num_layers: Option<usize>,
    num_single_layers: Option<usize>,
    joint_attention_dim: Option<usize>,
    pooled_projection_dim: Option<usize>,
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    patch_size: Option<usize>,
    guidance_embeds: Option<bool>,
}

impl DiffusersConfig {
    /// Refuses a config that describes another network than the weights hold.
    fn check(&self, part: &Part, cfg: &model::Config, head_dim: usize) -> Result<()> {
        let mut wrong = Disagreements::default();
        wrong.field("attention_head_dim", self.attention_head_dim, head_dim);
        wrong.field(
            "num_attention_heads",
            self.num_attention_heads,
            cfg.num_heads,
        );
        wrong.field("num_layers", self.num_layers, cfg.depth);
        wrong.field(
            "num_single_layers",
            self.num_single_layers,
            cfg.depth_single_blocks,
        );
        wrong.field(
            "joint_attention_dim",
            self.joint_attention_dim,
            cfg.context_in_dim,
        );
        wrong.field(
            "pooled_projection_dim",
            self.pooled_projection_dim,
            cfg.vec_in_dim,
        );
        wrong.field("in_channels", self.in_channels, cfg.in_channels);
        wrong.field("out_channels", self.out_channels, cfg.in_channels);
        wrong.field("guidance_embeds", self.guidance_embeds, cfg.guidance_embed);
        if let Some(p) = self.patch_size.filter(|&p| p != 1) {
            wrong.push(format!(
                "`patch_size` is {p}, but the engine implements FLUX.1's 1 only"
            ));
        }
        match &part.config {
            Some(path) => wrong.check(path, "this config does not describe these weights"),
            None => Ok(()),
        }
    }
}

/// The flux transformer's architecture, from its weights and the part's records.
pub(crate) fn transformer(w: &dyn Shapes, part: &Part) -> Result<TransformerArch> {
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
    let file: Option<DiffusersConfig> = read_config(part.config.as_deref())?;
    let (axes_dim, axes_from) = rope_axes(w, part, file.as_ref(), head_dim)?;
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
    if let Some(file) = &file {
        file.check(part, &cfg, head_dim)?;
    }
    Ok(TransformerArch {
        config: cfg,
        head_dim,
        axes_from,
    })
}

/// The RoPE axes: from the config, the file's metadata or the settings (which must agree
/// where several say), FLUX.1's for FLUX.1's head size, and otherwise refused.
fn rope_axes(
    w: &dyn Shapes,
    part: &Part,
    file: Option<&DiffusersConfig>,
    head_dim: usize,
) -> Result<(Vec<usize>, Source)> {
    let recorded = [
        file.and_then(|f| f.axes_dims_rope.clone())
            .zip(part.config.clone().map(Source::Config)),
        w.rope_axes().map(|a| (a, Source::Metadata)),
        part.rope_axes.clone().map(|a| (a, Source::Settings)),
    ];
    let mut recorded = recorded.into_iter().flatten();
    let (axes, from) = match recorded.next() {
        Some(first) => first,
        None if head_dim == FLUX1_HEAD => (FLUX1_AXES.to_vec(), Source::Flux1),
        None => {
            return Err(bad(
                w,
                format!(
                    "the attention heads are {head_dim} wide, not FLUX.1's {FLUX1_HEAD}, and nothing records how RoPE splits them: \
                     put the model's diffusers transformer config.json (with `axes_dims_rope`) beside the file, \
                     named after it with .json, or set `rope_axes = [a, b, c]` (three even numbers adding up to {head_dim}) in the model's settings"
                ),
            ));
        }
    };
    for (other, other_from) in recorded {
        if other != axes {
            return Err(bad(
                w,
                format!("the RoPE axes {axes:?} ({from}) disagree with {other:?} ({other_from})"),
            ));
        }
    }
    if axes.len() != 3 || axes.iter().sum::<usize>() != head_dim || axes.iter().any(|a| a % 2 != 0)
    {
        return Err(bad(
            w,
            format!(
                "RoPE axes {axes:?} ({from}) must be three even numbers adding up to the head size {head_dim}"
            ),
        ));
    }
    Ok((axes, from))
}

impl std::fmt::Display for TransformerArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        write!(
            f,
            "{} ({}): hidden {}, {} head{} of {}, RoPE axes {:?} ({}), {} double and {} single \
             blocks, MLP {}×, {}-wide text in, {}-wide pooled vector in, {} latent channels in",
            crate::flux::Variant::of(c).name(),
            match c.guidance_embed {
                true => "guidance embedding",
                false => "no guidance input",
            },
            c.hidden_size,
            c.num_heads,
            if c.num_heads == 1 { "" } else { "s" },
            self.head_dim,
            c.axes_dim,
            self.axes_from,
            c.depth,
            c.depth_single_blocks,
            c.mlp_ratio,
            c.context_in_dim,
            c.vec_in_dim,
            c.in_channels
        )
    }
}
