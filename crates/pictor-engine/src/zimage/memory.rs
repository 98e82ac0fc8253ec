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
pub fn parts(files: &ZImageFiles, plan: Plan) -> Result<Vec<PartMemory>> {
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
    Ok(vec![
        part(
            "text_encoder",
            &files.text_encoder,
            plan.dtype,
            !plan.staged,
        )?,
        part("transformer", &files.transformer, plan.dtype, !plan.staged)?,
        part("vae", &files.vae, DType::F32, true)?,
    ])
}

/// Bytes loading `files` as `plan` says needs at its peak: the autoencoder, the text
/// encoder and the transformer (or the larger of the two when staged), and the working
/// memory.
pub fn needs(files: &ZImageFiles, plan: Plan) -> Result<u64> {
    let parts = parts(files, plan)?;
    let resident: u64 = parts.iter().filter(|p| p.resident).map(|p| p.bytes).sum();
    let turns = parts.iter().filter(|p| !p.resident).map(|p| p.bytes).max();
    Ok(resident + turns.unwrap_or(0) + WORKING_BYTES)
}

/// How to load `files` within `budget` (`None`: no limit, everything resident). `Auto`
/// prefers f32 resident, then bf16 resident, then bf16 staged; an explicit dtype is kept,
/// resident or else staged.
pub fn plan(files: &ZImageFiles, choice: DTypeChoice, budget: Option<u64>) -> Result<Plan> {
    let dtypes: &[DType] = match choice {
        DTypeChoice::Auto if budget.is_none() => &[DType::F32],
        DTypeChoice::Auto => &[DType::F32, DType::BF16],
        DTypeChoice::F32 => &[DType::F32],
        DTypeChoice::Bf16 => &[DType::BF16],
        DTypeChoice::F16 => &[DType::F16],
    };
    let Some(budget) = budget else {
        return Ok(Plan {
            dtype: dtypes[0],
            staged: false,
        });
    };
    // Resident in every dtype first (Auto's bf16 before staging f32), then staged.
    let mut last = None;
    for staged in [false, true] {
        for &dtype in dtypes {
            if staged && choice == DTypeChoice::Auto && dtype == DType::F32 {
                continue;
            }
            let plan = Plan { dtype, staged };
            let bytes = needs(files, plan)?;
            if bytes <= budget {
                return Ok(plan);
            }
            last = Some((plan, bytes));
        }
    }
    let (plan, bytes) = last.ok_or_else(|| EngineError::load("Z-Image", "no dtype to plan"))?;
    Err(EngineError::OutOfMemory {
        message: format!(
            "Z-Image from {} needs about {} in {} even with its text encoder and transformer \
             taking turns, over the memory budget of {}; use a quantized transformer (a GGUF \
             file, or quantize = \"q8_0\"), or raise memory_budget",
            files.transformer.files[0].display(),
            human_bytes(bytes),
            crate::device::dtype_name(plan.dtype),
            human_bytes(budget)
        ),
    })
}
