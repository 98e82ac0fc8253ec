//! Planning a pipeline's memory before loading it: each part's bytes, estimated from the
//! file headers, against a budget. On the CPU: everything resident when it fits; otherwise
//! staged (the T5 encoder and the transformer take turns, the small parts stay). On a GPU
//! (its free memory as the budget): everything on it when it fits; otherwise T5 on the
//! CPU, which runs once per prompt. Otherwise a refusal that names the part, its size and
//! the budget, so a model that cannot fit is never loaded into the arms of the OOM killer
//! or a CUDA out-of-memory error in the middle of a request.

use candle_core::{DType, Device};
pub use pictor_core::PartMemory;

use crate::{
    error::{EngineError, Result},
    inspect::{PartInfo, human_bytes, inspect_file},
    layout::{ModelFiles, Part},
};

/// Memory for activations and scratch on top of the weights (a 512² step of the full
/// FLUX transformer peaks around 0.5 GB over its weights; 1 GiB leaves room for a batch).
pub const WORKING_BYTES: u64 = 1 << 30;

/// Memory for activations, scratch and cuBLAS's workspace on a GPU on top of the weights
/// (a batch of four 1024² images through the full FLUX transformer in bf16, its attention
/// scores in f32 blocks of 256 MB, and the autoencoder decoding one 1024² image).
pub const GPU_WORKING_BYTES: u64 = 3 << 30;

/// What a model loaded onto a GPU with `free` bytes free may take: all but 5 % (at least
/// 512 MiB), left for fragmentation and whatever else shares the GPU.
pub fn gpu_budget(free: u64) -> u64 {
    free.saturating_sub((free / 20).max(512 << 20))
}

/// What [`plan`] and [`plan_gpu`] decided.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    /// Every part, in load order.
    pub parts: Vec<PartMemory>,
    /// T5 and the transformer take turns.
    pub staged: bool,
    /// On a GPU too small for everything: T5 runs on the CPU, in this dtype.
    pub t5_on_host: Option<DType>,
}

impl MemoryPlan {
    /// Where T5 runs and in which dtype, for a pipeline on `device` computing in `dtype`:
    /// there, or on the CPU when the plan moved it off a GPU too small for everything.
    pub fn t5_placement(&self, device: &Device, dtype: DType) -> (Device, DType) {
        match self.t5_on_host {
            Some(host_dtype) => (Device::Cpu, host_dtype),
            None => (device.clone(), dtype),
        }
    }

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
        format!("{} (stored {stored})", crate::device::dtype_name(dtype))
    };
    Ok(PartMemory {
        part: name,
        bytes,
        storage,
        resident: true,
        device: "cpu".into(),
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
            t5_on_host: None,
        });
    };
    let all = clip + t5 + transformer + vae + WORKING_BYTES;
    if all <= budget {
        return Ok(MemoryPlan {
            parts,
            staged: false,
            t5_on_host: None,
        });
    }
    let small = clip + vae + WORKING_BYTES;
    for (name, bytes, file) in [
        ("transformer", transformer, &files.transformer),
        ("t5", t5, &files.t5),
    ] {
        if small + bytes > budget {
            return Err(too_big(
                &parts,
                name,
                file,
                beside(clip + vae, WORKING_BYTES),
                Limit {
                    bytes: budget,
                    name: "the memory budget",
                    remedy: "raise memory_budget in the config",
                },
            ));
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
        t5_on_host: None,
    })
}

/// A budget a part did not fit: its bytes, how the refusal names it, and the remedy
/// beside quantizing.
struct Limit<'a> {
    bytes: u64,
    name: &'a str,
    remedy: &'a str,
}

/// What stays beside a part, in bytes: CLIP and the autoencoder (where they share the
/// device with it) and `working` bytes of working memory.
fn beside(small_parts: u64, working: u64) -> (String, u64) {
    let what = if small_parts > 0 {
        format!(
            "the CLIP encoder, the autoencoder and {} of working memory",
            human_bytes(working)
        )
    } else {
        format!("{} of working memory", human_bytes(working))
    };
    (what, small_parts + working)
}

/// The refusal for part `name` (of `file`), which with what stays beside it exceeds
/// `limit`.
fn too_big(
    parts: &[PartMemory],
    name: &str,
    file: &Part,
    (beside, others): (String, u64),
    limit: Limit,
) -> EngineError {
    let part = parts.iter().find(|p| p.part == name);
    let bytes = part.map_or(0, |p| p.bytes);
    let storage = part.map(|p| p.storage.as_str()).unwrap_or_default();
    let label = if name == "t5" {
        "T5 encoder"
    } else {
        "FLUX transformer"
    };
    let path = file
        .files
        .first()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    EngineError::OutOfMemory {
        message: format!(
            "the {label} needs {} in memory ({storage}, from {path}); with {beside} that is {}, over {} of {}. Make a smaller copy once with `pictor quantize {path} --to q8_0` (or q4_k){}, or {}",
            human_bytes(bytes),
            human_bytes(others + bytes),
            limit.name,
            human_bytes(limit.bytes),
            if name == "t5" { " --part t5" } else { "" },
            limit.remedy,
        ),
    }
}

/// Fits the parts of `files`, computing in `dtype`, onto GPU `device` with `budget` bytes
/// free: all of them when they fit with [`GPU_WORKING_BYTES`]; otherwise T5 on the CPU
/// (in f32, or bf16 when f32 exceeds `host_budget`) and the rest on the GPU.
pub fn plan_gpu(
    files: &ModelFiles,
    dtype: DType,
    device: &str,
    budget: u64,
    host_budget: Option<u64>,
) -> Result<MemoryPlan> {
    let mut plan = plan(files, dtype, None)?;
    let by = |name: &str| plan.bytes(name);
    let (clip, t5, transformer, vae) = (by("clip"), by("t5"), by("transformer"), by("vae"));
    for p in &mut plan.parts {
        p.device = device.to_string();
    }
    if clip + t5 + transformer + vae + GPU_WORKING_BYTES <= budget {
        return Ok(plan);
    }
    let on_gpu = clip + vae + GPU_WORKING_BYTES;
    if on_gpu + transformer > budget {
        return Err(too_big(
            &plan.parts,
            "transformer",
            &files.transformer,
            beside(clip + vae, GPU_WORKING_BYTES),
            Limit {
                bytes: budget,
                name: &format!("the memory free on {device}"),
                remedy: "use a GPU with more memory",
            },
        ));
    }
    let fits = |p: &PartMemory| host_budget.is_none_or(|b| p.bytes + WORKING_BYTES <= b);
    let f32_t5 = estimate(&files.t5, "T5 encoder", "t5", DType::F32)?;
    let bf16_t5 = estimate(&files.t5, "T5 encoder", "t5", DType::BF16)?;
    let (host_dtype, host_t5) = if fits(&f32_t5) {
        (DType::F32, f32_t5)
    } else if fits(&bf16_t5) {
        (DType::BF16, bf16_t5)
    } else {
        return Err(too_big(
            &[bf16_t5],
            "t5",
            &files.t5,
            beside(0, WORKING_BYTES),
            Limit {
                bytes: host_budget.unwrap_or_default(),
                name: &format!(
                    "the memory budget of the CPU it moves to (it does not fit on {device} beside the transformer)"
                ),
                remedy: "raise memory_budget in the config",
            },
        ));
    };
    tracing::warn!(
        gpu = device,
        free = %human_bytes(budget),
        "the model does not fit whole on the GPU: T5 will run on the CPU"
    );
    for p in &mut plan.parts {
        if p.part == "t5" {
            *p = host_t5.clone();
        }
    }
    plan.t5_on_host = Some(host_dtype);
    Ok(plan)
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
