//! Whether a model's parts fit together: each part's output width against the input the
//! next part takes, read from headers and configs before anything is loaded. A T5 encoder
//! from another model would otherwise be found only at the first request, as a matmul of
//! the wrong width.

use crate::{
    error::{EngineError, Result},
    layout::{ModelFiles, Part},
    text,
};

fn named(part: &Part) -> String {
    part.files
        .first()
        .map_or_else(|| "(no file)".into(), |f| f.display().to_string())
}

/// Refuses a set of parts whose widths disagree, naming both parts and both numbers.
/// [`super::FluxPipeline::load`] runs it first; `pictor models inspect` runs it too, so the
/// two cannot disagree about whether a set of files is a model.
pub fn check(files: &ModelFiles) -> Result<()> {
    let transformer = super::transformer::config_of(&files.transformer)?;
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
    // The transformer sees the latents in 2×2 patches.
    let latents = super::vae::latent_channels(&files.vae)?;
    if latents * 4 != transformer.in_channels {
        wrong.push(format!(
            "the autoencoder ({}) has {latents} latent channels ({} per 2×2 patch), but the transformer's img_in takes {}",
            named(&files.vae),
            latents * 4,
            transformer.in_channels
        ));
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(EngineError::Mismatch {
        message: format!(
            "{}; transformer: {}. The parts come from different models: use the ones made for this transformer.",
            wrong.join("; "),
            named(&files.transformer)
        ),
    })
}
