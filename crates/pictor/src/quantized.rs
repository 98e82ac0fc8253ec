//! `quantize = "q8_0"` in a model's config: the transformer and T5 (Z-Image: its
//! transformer), when not GGUF already, are converted once into
//! `<data_dir>/cache/quantized/` (named by the source files' paths, sizes and times, so a
//! changed source is converted again) and the model
//! runs from the copies. A bf16 FLUX.1-schnell (23.8 GB) then runs from 12.7 GB (Q8_0) or
//! 6.8 GB (Q4_K) on a machine that could not hold it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use pictor_engine::{
    ModelFiles, Part,
    quantize::{Component, Target, quantize},
    zimage::ZImageFiles,
};
use sha2::{Digest, Sha256};

/// Replaces the transformer and T5 parts of `files` with quantized copies in `target`.
pub fn apply(files: &mut ModelFiles, target: &str, data_dir: &Path) -> anyhow::Result<()> {
    let target: Target = target.parse().map_err(anyhow::Error::msg)?;
    let dir = cache_dir(data_dir)?;
    files.transformer = cached(&files.transformer, Component::Transformer, target, &dir)?;
    files.t5 = cached(&files.t5, Component::T5, target, &dir)?;
    Ok(())
}

/// Replaces a Z-Image model's transformer with a quantized copy in `target` (its text
/// encoder stays as it is: the pipeline keeps it in bf16 when f32 does not fit).
pub fn apply_zimage(files: &mut ZImageFiles, target: &str, data_dir: &Path) -> anyhow::Result<()> {
    let target: Target = target.parse().map_err(anyhow::Error::msg)?;
    let dir = cache_dir(data_dir)?;
    files.transformer = cached(
        &files.transformer,
        Component::ZImageTransformer,
        target,
        &dir,
    )?;
    Ok(())
}

fn cache_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("cache").join("quantized");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn cached(part: &Part, component: Component, target: Target, dir: &Path) -> anyhow::Result<Part> {
    if part.is_gguf() {
        return Ok(part.clone());
    }
    let label = component.label();
    // The config and stated axes are in the key: the copy records the RoPE axes they gave.
    let mut sources = part.files.clone();
    sources.extend(part.config.clone());
    let identity = crate::hash::identity(&sources)?;
    let key = hex::encode(
        &Sha256::digest(format!(
            "{identity}|{:?}|{label}|{}",
            part.rope_axes,
            target.label()
        ))[..8],
    );
    let path: PathBuf = dir.join(format!("{key}-{label}-{}.gguf", target.label()));
    if !path.is_file() {
        eprintln!(
            "quantizing the {label} to {} once, into {} (later starts reuse it)",
            target.label(),
            path.display()
        );
        let partial = path.with_extension("gguf.partial");
        let done = quantize(part, component, target, &partial, |_, _, _| {});
        if let Err(e) = done {
            let _ = std::fs::remove_file(&partial);
            return Err(e).with_context(|| format!("quantizing the {label}"));
        }
        std::fs::rename(&partial, &path)
            .with_context(|| format!("moving {} into place", partial.display()))?;
    }
    Ok(Part {
        rope_axes: part.rope_axes.clone(),
        ..Part::file(path)
    })
}
