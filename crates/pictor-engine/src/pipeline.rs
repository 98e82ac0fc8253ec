//! The seam between the engine and its callers: one trait, plain data in and out.

use crate::{RgbImage, error::Result};

/// What to generate. Plain values: the caller has already validated them against the
/// model's limits (see [`Pipeline::check`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// The text prompt, as the user wrote it.
    pub prompt: String,
    /// Width in pixels (a multiple of 16 for FLUX).
    pub width: usize,
    /// Height in pixels (a multiple of 16 for FLUX).
    pub height: usize,
    /// Number of denoising steps.
    pub steps: usize,
    /// Seed of the first image; image `i` uses `seed + i`, so any image of a batch can be
    /// reproduced alone.
    pub seed: u64,
    /// Number of images.
    pub n: usize,
}

/// How far a generation has gone; passed to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
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
    /// The autoencoder is decoding.
    Decoding,
}

/// The callback's answer: go on, or stop as soon as possible (between steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep going.
    Continue,
    /// Stop; `generate` returns [`crate::EngineError::Cancelled`].
    Cancel,
}

/// What the text encoders really saw.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// `n` images, in seed order.
    pub images: Vec<RgbImage>,
    /// What the encoders saw.
    pub prompt: PromptInfo,
}

/// A loaded model that turns prompts into images.
///
/// Implementors provide [`Pipeline::check`] and [`Pipeline::generate_batch`];
/// `generate` blocks the calling thread for the whole computation (seconds to minutes);
/// async callers run it on a dedicated thread.
pub trait Pipeline: Send {
    /// Checks a request against the model's own rules (size grid, step range) without
    /// running anything.
    fn check(&self, req: &GenerationRequest) -> Result<()>;

    /// Generates `req.n` images. `progress` is called after each phase and each denoising
    /// step; returning [`Control::Cancel`] stops before the next step.
    fn generate(
        &mut self,
        req: &GenerationRequest,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Generation> {
        let mut all = self.generate_batch(std::slice::from_ref(req), progress)?;
        all.pop().ok_or(crate::EngineError::Cancelled)
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

    /// Whether two requests can share a batch in [`Pipeline::generate_batch`].
    fn compatible(&self, a: &GenerationRequest, b: &GenerationRequest) -> bool {
        (a.width, a.height, a.steps) == (b.width, b.height, b.steps)
    }
}
