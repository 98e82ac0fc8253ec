//! `pictor models list`: the models this configuration serves (where each one's files are,
//! whether they make a model, their size on disk), the LoRAs requests may add, and the
//! repositories in the Hugging Face cache with the models that use them. It reads files
//! only: nothing is loaded and nothing is downloaded.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use pictor_engine::{ModelFiles, inspect::human_bytes, zimage::ZImageFiles};

use crate::config::{Config, ModelConfig};

/// What a model's path holds, for one line of the list.
struct State {
    /// `FLUX, complete`, `incomplete: no T5`, `not found: …`.
    summary: String,
    /// The weight files found, canonical (to match them with the cache's repositories).
    files: Vec<PathBuf>,
}

pub fn run(config: &Config) -> anyhow::Result<()> {
    // Loading the configuration put the shipped model in when it names none.
    println!("Models:");
    let mut used: Vec<(String, PathBuf)> = Vec::new();
    for (name, model) in &config.models {
        let state = state(model);
        let aliases = if model.aliases.is_empty() {
            String::new()
        } else {
            format!(" (also {})", model.aliases.join(", "))
        };
        println!("  {name}{aliases}: {}", state.summary);
        println!("    path = {:?}", model.path);
        used.extend(state.files.into_iter().map(|f| (name.clone(), f)));
    }

    let lora_dir = config.lora_dir();
    let loras = pictor_core::lora_files(&lora_dir);
    println!("\nLoRAs in {} ({}):", lora_dir.display(), loras.len());
    for (name, bytes) in &loras {
        println!("  {name} ({})", human_bytes(*bytes));
    }

    let cache = pictor_engine::hf_hub_cache_dir();
    let repos = cached_repos(&cache);
    println!(
        "\nHugging Face cache {} ({} repositories):",
        cache.display(),
        repos.len()
    );
    for (repo, (dir, bytes)) in &repos {
        let mut users: Vec<&str> = used
            .iter()
            .filter(|(_, f)| f.starts_with(dir))
            .map(|(n, _)| n.as_str())
            .collect();
        users.dedup();
        let use_note = if users.is_empty() {
            "used by no configured model".to_string()
        } else {
            format!("used by {}", users.join(", "))
        };
        println!("  {repo} ({}), {use_note}", human_bytes(*bytes));
    }
    Ok(())
}

/// What `model.path` holds: a Z-Image or FLUX model, complete or not, and its files.
fn state(model: &ModelConfig) -> State {
    if model.path == crate::shipped::NAME && !Path::new(&model.path).exists() {
        return State {
            summary: "FLUX (pictor-tiny), complete, compiled into this binary".into(),
            files: Vec::new(),
        };
    }
    match ZImageFiles::find_spec(&model.path) {
        Ok(Some(files)) => return complete("Z-Image-Turbo", &files.weight_files()),
        Ok(None) => {}
        Err(e) => return not_found(e),
    }
    let survey = match ModelFiles::survey(&model.path) {
        Ok(survey) => survey,
        Err(e) => return not_found(e),
    };
    let parts = survey.parts();
    let missing: Vec<&str> = parts
        .iter()
        .filter(|(_, p)| p.is_err())
        .map(|(label, _)| *label)
        .collect();
    let mut files: Vec<PathBuf> = parts
        .iter()
        .filter_map(|(_, p)| p.as_ref().ok())
        .flat_map(|p| p.files.iter().cloned())
        .collect();
    files.sort();
    files.dedup();
    if missing.is_empty() {
        return complete("FLUX", &files);
    }
    State {
        summary: format!(
            "incomplete, `pictor serve` cannot load it: no {}",
            missing.join(", no ")
        ),
        files: canonical(&files),
    }
}

fn complete(family: &str, files: &[PathBuf]) -> State {
    let bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    State {
        summary: format!("{family}, complete, {} on disk", human_bytes(bytes)),
        files: canonical(files),
    }
}

/// The files with every link resolved (a cache snapshot's lead into its blobs).
fn canonical(files: &[PathBuf]) -> Vec<PathBuf> {
    files.iter().filter_map(|f| f.canonicalize().ok()).collect()
}

fn not_found(e: impl std::fmt::Display) -> State {
    State {
        summary: format!("not found: {e}"),
        files: Vec::new(),
    }
}

/// The cache's model repositories (`models--owner--name`), by repo id: their folder and
/// the bytes their blobs take.
fn cached_repos(cache: &Path) -> BTreeMap<String, (PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let folder = e
                .file_name()
                .to_str()?
                .strip_prefix("models--")?
                .to_string();
            let repo = folder.replacen("--", "/", 1);
            let dir = e.path().canonicalize().ok()?;
            let bytes = std::fs::read_dir(dir.join("blobs"))
                .map(|blobs| {
                    blobs
                        .filter_map(|b| b.ok()?.metadata().ok())
                        .filter(|m| m.is_file())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            Some((repo, (dir, bytes)))
        })
        .collect()
}
