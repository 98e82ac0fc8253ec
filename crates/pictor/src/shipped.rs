//! The model shipped inside the binary: `models/pictor-tiny`, a small FLUX.1-schnell-architecture
//! model trained by `tools/train_tiny.py`. Its files are compiled in, so `pictor serve` and
//! `pictor generate` work on a fresh machine with nothing else; on first use they are
//! written to `<data_dir>/models/pictor-tiny-<hash>/` and loaded from there like any other
//! diffusers folder.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

/// The name the shipped model answers to, in config and on the command line.
pub const NAME: &str = "pictor-tiny";

/// The size it was trained at, its default.
pub const NATIVE_SIZE: pictor_core::Dimensions = pictor_core::Dimensions::new(128, 128);

macro_rules! shipped_files {
    ($($path:literal),* $(,)?) => {
        &[$(
            (
                $path,
                include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/pictor-tiny/", $path))
                    as &[u8],
            )
        ),*]
    };
}

/// Every file of the model folder but its model card.
pub static FILES: &[(&str, &[u8])] = shipped_files!(
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// A short hash of the shipped files, so a new build's model never mixes with an old one's.
fn version() -> String {
    let mut h = Sha256::new();
    for (path, bytes) in FILES {
        h.update(path.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    hex::encode(&h.finalize()[..6])
}

/// Writes the shipped model under `data_dir` unless it is already there, and returns its
/// folder. Files go to a temporary folder first and are renamed into place, so an
/// interrupted write is never mistaken for a model.
pub fn extract(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let models = data_dir.join("models");
    let dir = models.join(format!("{NAME}-{}", version()));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    let tmp = models.join(format!(".{NAME}-{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (path, bytes) in FILES {
        let file = tmp.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&file, bytes).with_context(|| format!("writing {}", file.display()))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process extracted it meanwhile.
        Err(_) if dir.join("model_index.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e).with_context(|| format!("moving the model into {}", dir.display())),
    }
}

/// Where a model named on the command line or in config lives: `pictor-tiny` (when no
/// file or folder of that name exists) is the shipped model; anything else is as given.
pub fn locate(spec: &str, data_dir: &Path) -> anyhow::Result<String> {
    if spec == NAME && !Path::new(spec).exists() {
        let dir = extract(data_dir).context("writing out the shipped model")?;
        return Ok(dir.display().to_string());
    }
    Ok(spec.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compiled-in list is exactly the folder's files (the model card aside).
    #[test]
    fn the_list_matches_the_folder() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/pictor-tiny");
        let mut on_disk = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path
                        .strip_prefix(&root)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/");
                    if rel != "README.md" {
                        on_disk.push(rel);
                    }
                }
            }
        }
        on_disk.sort();
        let mut listed: Vec<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
        listed.sort();
        assert_eq!(listed, on_disk);
    }

    #[test]
    fn extracts_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let a = extract(dir.path()).unwrap();
        let b = extract(dir.path()).unwrap();
        assert_eq!(a, b);
        let files = pictor_engine::ModelFiles::resolve(&a.display().to_string()).unwrap();
        assert!(files.transformer.files[0].starts_with(&a));
        assert_eq!(
            locate("some/other/path", dir.path()).unwrap(),
            "some/other/path"
        );
    }
}
