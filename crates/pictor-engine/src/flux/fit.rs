//! Whether a set of files is a model that loads: each part's architecture read and
//! checked against what records it, each part's output width against the input the next
//! part takes, and the tokenizers, all from headers and configs before any weight is read.
//! A T5 encoder from another model would otherwise be found only at the first request, as
//! a matmul of the wrong width. [`super::FluxPipeline::load`] and `pictor models inspect`
//! both call [`validate`], so they cannot disagree about whether files are a model.

use super::config::{TransformerArch, VaeArch};
use crate::{
    error::{EngineError, Result},
    layout::{ModelFiles, Part},
    text::{self, FixedLengthTokenizer},
};

/// What a set of parts is, once [`validate`] has found that it loads.
#[derive(Debug, Clone)]
pub struct Architecture {
    /// The transformer's.
    pub transformer: TransformerArch,
    /// The autoencoder's.
    pub vae: VaeArch,
    /// The width of T5's token embeddings.
    pub t5_width: usize,
    /// The width of CLIP's pooled vector.
    pub clip_width: usize,
}

fn named(part: &Part) -> String {
    part.files
        .first()
        .map_or_else(|| "(no file)".into(), |f| f.display().to_string())
}

fn refuse(wrong: Vec<String>, transformer: &Part) -> Result<()> {
    if wrong.is_empty() {
        return Ok(());
    }
    Err(EngineError::Mismatch {
        message: format!(
            "{}; transformer: {}. The parts come from different models: use the ones made for this transformer.",
            wrong.join("; "),
            named(transformer)
        ),
    })
}

fn latent_mismatch(arch: &TransformerArch, vae: &Part, vae_arch: &VaeArch) -> Option<String> {
    // The transformer sees the latents in 2×2 patches.
    let latents = vae_arch.z_channels;
    (latents * 4 != arch.config.in_channels).then(|| {
        format!(
            "the autoencoder ({}) has {latents} latent channels ({} per 2×2 patch), but the transformer's img_in takes {}",
            named(vae),
            latents * 4,
            arch.config.in_channels
        )
    })
}

/// Refuses an autoencoder whose latents are not what the transformer takes.
pub(crate) fn latents(
    transformer: &Part,
    arch: &TransformerArch,
    vae: &Part,
    vae_arch: &VaeArch,
) -> Result<()> {
    refuse(
        latent_mismatch(arch, vae, vae_arch).into_iter().collect(),
        transformer,
    )
}

/// Reads every part's architecture and refuses a set whose parts disagree, naming both
/// parts and both numbers, or whose tokenizers do not load.
pub fn validate(files: &ModelFiles) -> Result<Architecture> {
    let arch = super::transformer::arch_of(&files.transformer)?;
    let transformer = &arch.config;
    let mut wrong = Vec::new();
    let t5 = text::t5_width(&files.t5)?;
    if t5 != transformer.context_in_dim {
        wrong.push(format!(
            "the T5 encoder ({}) gives {t5}-wide token embeddings, but the transformer's txt_in takes {}",
            named(&files.t5),
            transformer.context_in_dim
        ));
    }
    let clip = text::clip_width(&files.clip)?;
    if clip != transformer.vec_in_dim {
        wrong.push(format!(
            "the CLIP encoder ({}) gives a {clip}-wide pooled vector, but the transformer's vector_in takes {}",
            named(&files.clip),
            transformer.vec_in_dim
        ));
    }
    let vae_arch = super::vae::arch_of(&files.vae)?;
    wrong.extend(latent_mismatch(&arch, &files.vae, &vae_arch));
    refuse(wrong, &files.transformer)?;
    // Their lengths only pad; loading them is the check.
    if let Some(path) = &files.clip_tokenizer {
        FixedLengthTokenizer::clip(path, 77)?;
    }
    if let Some(path) = &files.t5_tokenizer {
        FixedLengthTokenizer::t5(path, 256)?;
    }
    Ok(Architecture {
        transformer: arch,
        vae: vae_arch,
        t5_width: t5,
        clip_width: clip,
    })
}
