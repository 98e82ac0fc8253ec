//! Short hashes of a model's weight files for receipts: the first 10 hex digits of the
//! SHA-256 of the files' bytes in order. Hashing a 24 GB model takes minutes, so results
//! are cached in the data directory by path, size and modification time.

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Paths, sizes and modification times of `files`: what says they are unchanged.
pub fn identity(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut parts = Vec::with_capacity(files.len());
    for f in files {
        let meta = std::fs::metadata(f).with_context(|| format!("reading {}", f.display()))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        parts.push(format!("{}:{}:{modified}", f.display(), meta.len()));
    }
    Ok(parts.join(";"))
}

/// Every weight file of a model, each once, in a fixed order.
pub fn weight_files(files: &pictor_engine::ModelFiles) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for part in [&files.transformer, &files.vae, &files.clip, &files.t5] {
        for f in &part.files {
            if !all.contains(f) {
                all.push(f.clone());
            }
        }
    }
    all
}

/// The short hash of `files`, from `cache` when their paths, sizes and times are unchanged.
pub fn weights_hash(files: &[PathBuf], cache: &Path) -> anyhow::Result<String> {
    let key = identity(files)?;
    let mut known: BTreeMap<String, String> = std::fs::read_to_string(cache)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(hash) = known.get(&key) {
        return Ok(hash.clone());
    }
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for f in files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        loop {
            let n = file
                .read(&mut buffer)
                .with_context(|| format!("reading {}", f.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    let hash = hex::encode(hasher.finalize())[..10].to_string();
    known.insert(key, hash.clone());
    if let Ok(text) = serde_json::to_string_pretty(&known) {
        let _ = std::fs::write(cache, text);
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_of_the_bytes_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"hello ").unwrap();
        std::fs::write(&b, b"world").unwrap();
        let cache = dir.path().join("cache.json");
        let h = weights_hash(&[a.clone(), b.clone()], &cache).unwrap();
        // sha256("hello world") = b94d27b9934d3e08... (sha256sum agrees)
        assert_eq!(h, "b94d27b993");
        assert!(
            std::fs::read_to_string(&cache)
                .unwrap()
                .contains("b94d27b993")
        );
        // Changing a file changes its identity, so the hash is computed anew.
        std::fs::write(&b, b"there").unwrap();
        assert_ne!(weights_hash(&[a, b], &cache).unwrap(), h);
    }
}
