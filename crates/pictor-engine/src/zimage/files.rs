//! Where each part of a Z-Image model lives, in the layouts it is distributed in:
//!
//! - the diffusers folder (`model_index.json` naming `ZImagePipeline`, with `tokenizer/`,
//!   `text_encoder/`, `transformer/`, `vae/`, `scheduler/`), from a path or the Hugging
//!   Face cache;
//! - split files in one folder, as ComfyUI users hold them (`z_image_turbo_bf16.safetensors`
//!   or a GGUF of it, `qwen_3_4b.safetensors`, `ae.safetensors`), named by the transformer
//!   file or by the folder, each file recognised by its tensor names. These come without a
//!   tokenizer: a `tokenizer.json` (or `tokenizer/`) beside them is used when present,
//!   else Qwen's, built into Pictor.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::{
    encoder,
    transformer::{self, Config, DIFFUSERS, ORIGINAL, PAD},
};
use crate::{
    error::{EngineError, Result},
    layout::{self, Part, has_name},
};

/// Each part of a Z-Image model.
#[derive(Debug, Clone)]
pub struct ZImageFiles {
    /// The transformer: safetensors (original or diffusers names, shards) or one GGUF.
    pub transformer: Part,
    /// The Qwen3 text encoder.
    pub text_encoder: Part,
    /// The FLUX autoencoder.
    pub vae: Part,
    /// The tokenizer's `tokenizer.json`; `None` for Qwen's, built in.
    pub tokenizer: Option<PathBuf>,
    /// diffusers' `scheduler_config.json`, when there is one.
    pub scheduler: Option<PathBuf>,
    /// How the files are laid out, in words.
    pub layout: &'static str,
}

impl ZImageFiles {
    /// The Z-Image model `spec` names (a diffusers folder, a folder of split files, one of
    /// its transformer files, or a Hugging Face repo id in the local cache), or `None` when
    /// it names another family or nothing.
    pub fn find_spec(spec: &str) -> Result<Option<Self>> {
        match crate::layout::locate(spec)? {
            Some(path) => Self::find(&path),
            None => Ok(None),
        }
    }

    /// The Z-Image model at `path` (a diffusers folder, a folder of split files, or one of
    /// its transformer files), or `None` when `path` holds another family.
    pub fn find(path: &Path) -> Result<Option<Self>> {
        if path.is_dir() {
            if is_folder(path) {
                return Self::diffusers(path).map(Some);
            }
            if layout::pipeline_class(path).is_some() {
                return Ok(None);
            }
            let transformers: Vec<PathBuf> = layout::weight_files_in(path)?
                .into_iter()
                .filter(|f| is_transformer(f).unwrap_or(false))
                .collect();
            return match transformers.as_slice() {
                [] => Ok(None),
                [one] => Self::beside(one).map(Some),
                many => Err(EngineError::NotFound(format!(
                    "{}: several Z-Image transformers: {}; name the one to use",
                    path.display(),
                    listed(many)
                ))),
            };
        }
        // A file that cannot be read is left to the FLUX loader, which names what is wrong.
        if path.is_file() && is_transformer(path).unwrap_or(false) {
            return Self::beside(path).map(Some);
        }
        Ok(None)
    }

    /// A diffusers folder.
    pub fn diffusers(dir: &Path) -> Result<Self> {
        let scheduler = dir.join("scheduler/scheduler_config.json");
        Ok(Self {
            transformer: Part::folder(&dir.join("transformer"))?,
            text_encoder: Part::folder(&dir.join("text_encoder"))?,
            vae: Part::folder(&dir.join("vae"))?,
            tokenizer: Some(dir.join("tokenizer/tokenizer.json")).filter(|t| t.is_file()),
            scheduler: scheduler.is_file().then_some(scheduler),
            layout: "diffusers folder (ZImagePipeline)",
        })
    }

    /// The transformer file `file` with its text encoder, autoencoder and (optional)
    /// tokenizer found beside it.
    pub fn beside(file: &Path) -> Result<Self> {
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let (mut encoders, mut vaes, mut llama) = (Vec::new(), Vec::new(), Vec::new());
        for f in layout::weight_files_in(dir)? {
            if f == file {
                continue;
            }
            let names = layout::names_in_file(&f)?;
            if has_name(&names, encoder::ANCHOR) && has_name(&names, "embed_tokens.weight") {
                encoders.push(f);
            } else if has_name(&names, "blk.0.attn_q_norm.weight")
                && has_name(&names, "token_embd.weight")
            {
                llama.push(f);
            } else if layout::parts_in(names.iter().map(String::as_str))
                .first()
                .is_some_and(|p| p.kind == layout::Kind::Vae)
            {
                vaes.push(f);
            }
        }
        if encoders.is_empty()
            && let Some(gguf) = llama.first()
        {
            return Err(EngineError::UnknownLayout {
                path: gguf.clone(),
                message: "a Qwen3 text encoder in llama.cpp's GGUF names, which Pictor does not \
                          read yet: put the safetensors one (qwen_3_4b.safetensors) beside the \
                          transformer"
                    .into(),
            });
        }
        let one = |found: Vec<PathBuf>, what: &str| -> Result<PathBuf> {
            match found.as_slice() {
                [one] => Ok(one.clone()),
                [] => Err(EngineError::NotFound(format!(
                    "{}: no {what} beside the Z-Image transformer {}",
                    dir.display(),
                    file.display()
                ))),
                many => Err(EngineError::NotFound(format!(
                    "{}: several files hold a {what}: {}; keep one beside the transformer",
                    dir.display(),
                    listed(many)
                ))),
            }
        };
        let tokenizer = [
            dir.join("tokenizer.json"),
            dir.join("tokenizer/tokenizer.json"),
        ]
        .into_iter()
        .find(|p| p.is_file());
        Ok(Self {
            transformer: Part::file(file),
            text_encoder: Part::file(one(
                encoders,
                "Qwen3 text encoder (e.g. qwen_3_4b.safetensors)",
            )?),
            // With `ae.json` or a `config.json` beside it when one says what the tensors
            // cannot (the latent scale and shift of an autoencoder other than FLUX's).
            vae: Part::beside(
                &one(vaes, "FLUX autoencoder (e.g. ae.safetensors)")?,
                layout::Kind::Vae,
            ),
            tokenizer,
            scheduler: None,
            layout: match Part::file(file).is_gguf() {
                true => "split files, the transformer quantized (GGUF)",
                false => "split files (ComfyUI's layout)",
            },
        })
    }

    /// The transformer's hyper-parameters: its `config.json`, else read from its tensors.
    pub fn transformer_config(&self) -> Result<Config> {
        let weights = transformer::open_weights(&self.transformer, &Device::Cpu)?;
        transformer::config_of(&self.transformer, &weights)
    }

    /// Every weight file, for hashing.
    pub fn weight_files(&self) -> Vec<PathBuf> {
        [&self.text_encoder, &self.transformer, &self.vae]
            .into_iter()
            .flat_map(|p| p.files.iter().cloned())
            .collect()
    }
}

/// `paths`, comma-separated.
fn listed(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// Whether `file` holds a Z-Image transformer, in either spelling.
pub fn is_transformer(file: &Path) -> Result<bool> {
    let names = layout::names_in_file(file)?;
    Ok((has_name(&names, ORIGINAL) || has_name(&names, DIFFUSERS)) && has_name(&names, PAD))
}

/// Whether `dir` is a diffusers Z-Image folder (its `model_index.json` names
/// `ZImagePipeline`).
pub fn is_folder(dir: &Path) -> bool {
    layout::pipeline_class(dir).as_deref() == Some("ZImagePipeline")
}
