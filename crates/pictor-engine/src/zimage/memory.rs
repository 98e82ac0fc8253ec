//! Planning a Z-Image model's memory before loading it, as FLUX's plan does: each part's
//! bytes from the file headers, plus [`WORKING_BYTES`], against the budget. Everything
//! resident when it fits; otherwise staged (the text encoder and the transformer take
//! turns, loaded for each request's encoding and denoising in turn; the autoencoder
//! stays); otherwise a refusal naming what it needs.

use candle_core::DType;
use pictor_core::PartMemory;

use super::files::ZImageFiles;
use crate::{
    DTypeChoice,
    error::{EngineError, Result},
    flux::memory::WORKING_BYTES,
    inspect::human_bytes,
    layout::Part,
    weights::SafetensorFiles,
};

/// What [`plan`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The weight matrices' dtype (GGUF transformers keep their blocks whatever it is).
    pub dtype: DType,
    /// The text encoder and the transformer take turns.
    pub staged: bool,
}

/// Bytes `part`'s weights take once loaded with matrices in `dtype`: GGUF blocks as
/// stored, safetensors tensors at `dtype`'s width.
fn resident_bytes(part: &Part, dtype: DType) -> Result<u64> {
    if part.is_gguf() {
        let f = &part.files[0];
        return Ok(std::fs::metadata(f)
            .map_err(|e| EngineError::file(f, e))?
            .len());
    }
    let files = SafetensorFiles::open(&part.files)?;
    Ok(files
        .names()
        .filter_map(|n| files.stored(n))
        .map(|(shape, _)| shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64)
        .sum())
}

/// Each part's memory once loaded as `plan` says (the text encoder and the transformer
/// not resident when staged).
fn parts(files: &ZImageFiles, plan: Plan) -> Result<Vec<PartMemory>> {
    let part = |name: &'static str, part: &Part, dtype: DType, resident: bool| {
        let storage = match part.is_gguf() {
            true => "GGUF blocks, as stored".to_string(),
            false => format!("{} matrices", crate::device::dtype_name(dtype)),
        };
        Ok::<_, EngineError>(PartMemory {
            part: name,
            bytes: resident_bytes(part, dtype)?,
            storage,
            resident,
            device: "cpu".into(),
        })
    };
    let turns = !plan.staged;
    Ok(vec![
        part("text_encoder", &files.text_encoder, plan.dtype, turns)?,
        part("transformer", &files.transformer, plan.dtype, turns)?,
        part("vae", &files.vae, DType::F32, true)?,
    ])
}

/// Bytes `parts` need at their peak: the resident ones, the larger of those taking turns,
/// and the working memory.
fn peak(parts: &[PartMemory]) -> u64 {
    let resident: u64 = parts.iter().filter(|p| p.resident).map(|p| p.bytes).sum();
    let turns = parts.iter().filter(|p| !p.resident).map(|p| p.bytes).max();
    resident + turns.unwrap_or(0) + WORKING_BYTES
}

/// Bytes loading `files` as `plan` says needs at its peak: the autoencoder, the text
/// encoder and the transformer (or the larger of the two when staged), and the working
/// memory.
pub fn needs(files: &ZImageFiles, plan: Plan) -> Result<u64> {
    Ok(peak(&parts(files, plan)?))
}

/// How to load `files` within `budget` (`None`: no limit, everything resident), with each
/// part's memory under that plan. `Auto` prefers f32 resident, then bf16 resident, then
/// bf16 staged; an explicit dtype is kept, resident or else staged.
pub fn plan(
    files: &ZImageFiles,
    choice: DTypeChoice,
    budget: Option<u64>,
) -> Result<(Plan, Vec<PartMemory>)> {
    let p = |dtype, staged| Plan { dtype, staged };
    let kept = |dtype| vec![p(dtype, false), p(dtype, true)];
    let candidates = match choice {
        DTypeChoice::Auto => vec![
            p(DType::F32, false),
            p(DType::BF16, false),
            p(DType::BF16, true),
        ],
        DTypeChoice::F32 => kept(DType::F32),
        DTypeChoice::Bf16 => kept(DType::BF16),
        DTypeChoice::F16 => kept(DType::F16),
    };
    let mut tried = None;
    for plan in candidates {
        let parts = parts(files, plan)?;
        let bytes = peak(&parts);
        if budget.is_none_or(|budget| bytes <= budget) {
            return Ok((plan, parts));
        }
        tried = Some((plan, bytes));
    }
    let (plan, bytes) = tried.ok_or_else(|| EngineError::load("Z-Image", "no plan to try"))?;
    Err(EngineError::OutOfMemory {
        message: format!(
            "Z-Image from {} needs about {} in {} even with its text encoder and transformer \
             taking turns, over the memory budget of {}; use a quantized transformer (a GGUF \
             file, or quantize = \"q8_0\"), or raise memory_budget",
            files.transformer.files[0].display(),
            human_bytes(bytes),
            crate::device::dtype_name(plan.dtype),
            human_bytes(budget.unwrap_or_default())
        ),
    })
}
