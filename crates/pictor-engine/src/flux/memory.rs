//! Planning a pipeline's memory before loading it: each part's bytes, estimated from the
//! file headers, against a budget. Everything resident when it fits; otherwise staged
//! (the T5 encoder and the transformer take turns, the small parts stay); otherwise a
//! refusal that names the part, its size and the budget, so a model that cannot fit is
//! never loaded into the arms of the OOM killer.

use candle_core::DType;
pub use pictor_core::PartMemory;

use crate::{
    error::{EngineError, Result},
    inspect::{PartInfo, human_bytes, inspect_file},
    layout::{ModelFiles, Part},
};

/// Memory for activations and scratch on top of the weights (a 512² step of the full
/// FLUX transformer peaks around 0.5 GB over its weights; 1 GiB leaves room for a batch).
pub const WORKING_BYTES: u64 = 1 << 30;

/// What [`plan`] decided.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    /// Every part, in load order.
    pub parts: Vec<PartMemory>,
    /// T5 and the transformer take turns.
    pub staged: bool,
}

impl MemoryPlan {
    /// Bytes of one part.
    pub fn bytes(&self, part: &str) -> u64 {
        self.parts
            .iter()
            .find(|p| p.part == part)
            .map_or(0, |p| p.bytes)
    }
}

fn estimate(part: &Part, kind: &str, name: &'static str, dtype: DType) -> Result<PartMemory> {
    let mut infos: Vec<PartInfo> = Vec::new();
    let mut gguf = false;
    for file in &part.files {
        let info = inspect_file(file)?;
        gguf |= info.format == "GGUF";
        infos.extend(info.parts.into_iter().filter(|p| p.kind == kind));
    }
    // T5 runs its K-quant weights compact from the file (text/t5.rs), one block at a time;
    // counting their blocks whole keeps the estimate on the safe side.
    let bytes = infos
        .iter()
        .map(|p| {
            if name == "t5" {
                p.resident_bytes_compact(dtype)
            } else {
                p.resident_bytes(dtype)
            }
        })
        .sum();
    let mut merged = infos.first().cloned();
    if let Some(m) = merged.as_mut() {
        for other in infos.iter().skip(1) {
            m.parameters += other.parameters;
            for (t, n) in &other.types {
                *m.types.entry(t.clone()).or_default() += n;
            }
        }
    }
    let stored = merged.map(|m| m.type_shares()).unwrap_or_default();
    let storage = if gguf {
        stored
    } else {
        format!("{} (stored {stored})", format!("{dtype:?}").to_lowercase())
    };
    Ok(PartMemory {
        part: name,
        bytes,
        storage,
        resident: true,
    })
}

/// Estimates every part of `files` for `dtype` compute and fits them into `budget` bytes
/// (`None`: no limit).
pub fn plan(files: &ModelFiles, dtype: DType, budget: Option<u64>) -> Result<MemoryPlan> {
    let mut parts = vec![
        estimate(&files.clip, "CLIP text encoder", "clip", dtype)?,
        estimate(&files.t5, "T5 encoder", "t5", dtype)?,
        estimate(&files.transformer, "FLUX transformer", "transformer", dtype)?,
        estimate(&files.vae, "autoencoder", "vae", dtype)?,
    ];
    let by = |name: &str| parts.iter().find(|p| p.part == name).map_or(0, |p| p.bytes);
    let (clip, t5, transformer, vae) = (by("clip"), by("t5"), by("transformer"), by("vae"));
    let Some(budget) = budget else {
        return Ok(MemoryPlan {
            parts,
            staged: false,
        });
    };
    let all = clip + t5 + transformer + vae + WORKING_BYTES;
    if all <= budget {
        return Ok(MemoryPlan {
            parts,
            staged: false,
        });
    }
    let small = clip + vae + WORKING_BYTES;
    for (name, bytes, file) in [
        ("transformer", transformer, &files.transformer),
        ("t5", t5, &files.t5),
    ] {
        if small + bytes > budget {
            let label = if name == "t5" {
                "T5 encoder"
            } else {
                "FLUX transformer"
            };
            let storage = &parts
                .iter()
                .find(|p| p.part == name)
                .map(|p| p.storage.clone())
                .unwrap_or_default();
            let path = file
                .files
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(EngineError::OutOfMemory {
                message: format!(
                    "the {label} needs {} in memory ({storage}, from {path}); with the CLIP encoder, the autoencoder and {} of working memory that is {}, over the memory budget of {}. Make a smaller copy once with `pictor quantize {path} --to q8_0` (or q4_k){}, or raise memory_budget in the config",
                    human_bytes(bytes),
                    human_bytes(WORKING_BYTES),
                    human_bytes(small + bytes),
                    human_bytes(budget),
                    if name == "t5" { " --part t5" } else { "" },
                ),
            });
        }
    }
    for p in &mut parts {
        p.resident = !matches!(p.part, "t5" | "transformer");
    }
    tracing::warn!(
        total = %human_bytes(all),
        budget = %human_bytes(budget),
        "the model does not fit whole: T5 and the transformer will take turns for each request"
    );
    Ok(MemoryPlan {
        parts,
        staged: true,
    })
}

/// What this machine has, less a margin for the system and the server itself: total
/// memory minus 10% (at least 1 GiB), from `/proc/meminfo` (or the cgroup limit when it is
/// lower). `None` where neither can be read.
pub fn default_budget() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut total = total_kb * 1024;
    if let Some(limit) = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        total = total.min(limit);
    }
    let margin = (total / 10).max(1 << 30);
    Some(total.saturating_sub(margin))
}
