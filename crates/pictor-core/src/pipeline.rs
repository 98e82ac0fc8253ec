//! The trait every model family implements, and the plain data it takes and gives.

use std::time::Duration;

use crate::{ModelRules, RgbImage, error::Result};

/// What to generate. Plain values: the caller has already held them to the model's rules
/// ([`ModelRules::check`] over [`Pipeline::rules`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationRequest {
    /// The text prompt, as the user wrote it.
    pub prompt: String,
    /// Width in pixels (a multiple of 16 for FLUX).
    pub width: usize,
    /// Height in pixels (a multiple of 16 for FLUX).
    pub height: usize,
    /// Number of denoising steps.
    pub steps: usize,
    /// The guidance scale, for a model with a guidance input (`None`: the model's
    /// default); a model without one refuses any ([`ModelRules::check`]).
    #[serde(default)]
    pub guidance: Option<f64>,
    /// Seed of the first image; image `i` uses `seed + i`, so any image of a batch can be
    /// reproduced alone.
    pub seed: u64,
    /// Number of images.
    pub n: usize,
    /// Previews wanted per image while it denoises (0 for none); see [`preview_steps`].
    pub previews: usize,
    /// LoRAs added to the model's weights for this request, in order.
    #[serde(default)]
    pub loras: Vec<LoraRequest>,
    /// An image to edit instead of drawing from noise alone (`None`: text to image). Not
    /// serialized: its pixels travel beside the request, never inside it.
    #[serde(skip)]
    pub edit: Option<std::sync::Arc<EditInput>>,
}

/// A LoRA a request adds: a file in the server's LoRA folder, by name, and how strongly.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraRequest {
    /// The file's name without its extension.
    pub name: String,
    /// Its weight: 1 as trained, 0 off, negative inverted.
    pub scale: f64,
}

/// A LoRA as it was applied: what receipts record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraUse {
    /// As requested.
    pub name: String,
    /// SHA-256 (hex) of the file.
    pub sha256: String,
    /// As requested.
    pub scale: f64,
}

/// What is wrong with a LoRA name, if anything: it names a file in one folder, so only
/// letters, digits, `-`, `_` and `.` (not leading), at most 128 characters.
pub fn lora_name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    (!ok).then(|| {
        format!("`{name}` is not a LoRA name (letters, digits, `-`, `_` and `.`, not leading; at most 128)")
    })
}

/// The extension of LoRA files.
pub const LORA_EXTENSION: &str = "safetensors";

/// The LoRAs in folder `dir`, `(name, bytes)` sorted by name: its `.safetensors` files
/// whose names are LoRA names; none when it does not exist.
pub fn lora_files(dir: &std::path::Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(String, u64)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            (path.extension()? == LORA_EXTENSION).then_some(())?;
            let name = path.file_stem()?.to_str()?.to_string();
            lora_name_problem(&name).is_none().then_some(())?;
            Some((name, std::fs::metadata(&path).ok()?.len()))
        })
        .collect();
    found.sort();
    found
}

/// The request error for LoRA `name` that is not in folder `dir` (`None`: the server has
/// no LoRA folder), listing the LoRAs there are.
pub fn missing_lora(name: &str, dir: Option<&std::path::Path>) -> crate::Invalid {
    let known: Vec<String> = dir
        .map(lora_files)
        .unwrap_or_default()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let there = match known.is_empty() {
        true => "none (put .safetensors files in its lora_dir)".to_string(),
        false => known.join(", "),
    };
    crate::Invalid::new(
        "loras",
        format!("Invalid 'loras': there is no LoRA `{name}`; this server has {there}."),
    )
}

/// An image to edit: image to image, or inpainting where a mask is given.
#[derive(Debug, Clone, PartialEq)]
pub struct EditInput {
    /// The image, at the request's width and height.
    pub image: RgbImage,
    /// Where to paint, one byte per pixel (128 and above: repaint; below: keep);
    /// `None`: everywhere.
    pub mask: Option<Vec<u8>>,
    /// How far from the image, in (0, 1]: the share of the steps that run (1: from noise,
    /// the image's composition lost).
    pub strength: f64,
    /// The SHA-256 (hex) of the file the image came from, recorded in receipts; pipelines
    /// never read it.
    pub image_sha256: String,
}

/// The steps after which an image asking for `previews` previews gets one: evenly spread
/// over the run, never after the last step (that is the final image), so at most
/// `steps - 1` of them. 4 steps give `[2]` for one preview, `[1, 3]` for two and
/// `[1, 2, 3]` for three.
pub fn preview_steps(steps: usize, previews: usize) -> Vec<usize> {
    let k = previews.min(steps.saturating_sub(1));
    (1..=k)
        .map(|j| ((j * steps) as f64 / (k + 1) as f64).round() as usize)
        .collect()
}

/// How far a generation has gone; passed to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// The text encoders are running.
    Encoding,
    /// `step` of `total` denoising steps have finished for images `first..first + count`
    /// of the request; `step == 0` is sent as a batch starts to denoise.
    Step {
        /// Steps finished in this batch.
        step: usize,
        /// Steps per batch.
        total: usize,
        /// First image index of the batch being denoised.
        first: usize,
        /// Images in the batch.
        count: usize,
    },
    /// A preview of one image: the clean image predicted at `step`, through the real
    /// decoder. Sent at the [`preview_steps`] of requests that ask for previews.
    Preview {
        /// Index of the request in the batch given to [`Pipeline::generate_batch`].
        request: usize,
        /// Index of the image within its request.
        image: usize,
        /// 0-based index of this preview among the image's previews.
        index: usize,
        /// Steps finished when the prediction was made.
        step: usize,
        /// The preview.
        pixels: &'a RgbImage,
    },
    /// The autoencoder is decoding.
    Decoding,
}

/// The callback's answer: go on, or stop as soon as possible (between steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep going.
    Continue,
    /// Stop; `generate` returns [`crate::PipelineError::Cancelled`].
    Cancel,
}

/// What the text encoders really saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PromptInfo {
    /// The prompt text the sequence encoder (T5) really encoded: the prompt itself, or its
    /// longest prefix that fit when it was truncated. This is OpenAI's `revised_prompt`.
    pub encoded: String,
    /// The sequence encoder dropped part of the prompt.
    pub truncated: bool,
    /// The pooled encoder (CLIP, 77 tokens) dropped part of the prompt; it usually
    /// truncates much earlier than T5.
    pub pooled_truncated: bool,
    /// Sequence-encoder tokens that carry the prompt (end-of-text included, padding not).
    pub tokens: usize,
}

/// Where the time of a [`Pipeline::generate_batch`] call went. Every request of the batch
/// reports the batch's figures: its phases ran for all of them at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Phases {
    /// Running the text encoders.
    pub encode: Duration,
    /// Denoising (and decoding previews, when some were asked for).
    pub denoise: Duration,
    /// Decoding the final latents to pixels.
    pub decode: Duration,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// `n` images, in seed order.
    pub images: Vec<RgbImage>,
    /// What the encoders saw.
    pub prompt: PromptInfo,
    /// Time per phase.
    pub phases: Phases,
    /// Where it ran and in which dtype: `cpu f32`, `cuda:0 (NVIDIA H100 80GB HBM3) bf16`
    /// (empty when the pipeline does not say).
    pub device: String,
    /// The LoRAs applied, with their files' hashes.
    pub loras: Vec<LoraUse>,
}

/// One part of a loaded model and the memory it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartMemory {
    /// `transformer`, `t5`, `clip`, `text_encoder` (Z-Image's Qwen3) or `vae`.
    pub part: &'static str,
    /// Bytes in memory once loaded (estimated from the files before loading).
    pub bytes: u64,
    /// How the weights are held: `Q4_K 95.1%, F16 4.4%, F32 0.5%` for GGUF, or the compute
    /// dtype for safetensors (`f32 (stored BF16)`).
    pub storage: String,
    /// Whether it stays loaded between requests (false: loaded for each request's phase
    /// and freed after it, because everything together exceeds the budget).
    pub resident: bool,
    /// Where it runs: `cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)`. A model on a GPU too
    /// small for all of it keeps its T5 encoder on the CPU.
    pub device: String,
}

/// A loaded model that turns prompts into images.
///
/// Implementors provide [`Pipeline::rules`] and [`Pipeline::generate_batch`];
/// `generate` blocks the calling thread for the whole computation (seconds to minutes);
/// async callers run it on a dedicated thread.
pub trait Pipeline: Send {
    /// The model's own rules: its size grid, the sizes and steps it serves by default,
    /// and which inputs it takes. A server may narrow or widen the ranges by
    /// configuration, never the grid.
    fn rules(&self) -> ModelRules;

    /// Each part's memory, once loaded (empty when the pipeline does not say).
    fn memory(&self) -> Vec<PartMemory> {
        Vec::new()
    }

    /// Where it runs and in which dtype, as [`Generation::device`] spells it (`None` when
    /// the pipeline does not say).
    fn device(&self) -> Option<String> {
        None
    }

    /// Generates `req.n` images. `progress` is called after each phase and each denoising
    /// step; returning [`Control::Cancel`] stops before the next step.
    fn generate(
        &mut self,
        req: &GenerationRequest,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Generation> {
        let mut all = self.generate_batch(std::slice::from_ref(req), progress)?;
        all.pop().ok_or(crate::PipelineError::Cancelled)
    }

    /// Generates several requests together, one [`Generation`] per request in order.
    /// Requests that share size and steps are denoised in the same batches (their images
    /// are identical to those each would get alone, up to floating-point rounding); a
    /// pipeline that cannot batch them runs them one after another, which is the default.
    fn generate_batch(
        &mut self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Vec<Generation>>;

    /// Whether two requests can share a batch in [`Pipeline::generate_batch`]: the one
    /// place this is decided (the scheduler groups by it, a pipeline refuses a batch that
    /// breaks it).
    fn compatible(&self, a: &GenerationRequest, b: &GenerationRequest) -> bool {
        // An edit carries its own image: it runs in a batch of its own images only. The
        // guidance scale and the LoRAs condition the whole batch.
        (a.width, a.height, a.steps) == (b.width, b.height, b.steps)
            && a.guidance == b.guidance
            && a.loras == b.loras
            && a.edit.is_none()
            && b.edit.is_none()
    }

    /// The scheduler calls this when its queue has emptied after a long batch: a moment to
    /// hand scratch memory back to the system. Does nothing by default.
    fn idle(&mut self) {}
}
