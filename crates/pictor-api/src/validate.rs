//! A model's own rules: sizes, steps per quality, which extensions it can use.
//! Only [`validate`] builds a [`ValidGeneration`], so nothing unchecked reaches the queue.

use pictor_sched::GenerationRequest;

use crate::{
    error::ApiError,
    wire::{ImageRequest, Quality, Size},
};

/// What a model accepts. FLUX.1-schnell's defaults are in [`ModelRules::flux_schnell`].
#[derive(Debug, Clone)]
pub struct ModelRules {
    /// Smallest side in pixels.
    pub min_side: usize,
    /// Largest side in pixels.
    pub max_side: usize,
    /// Sides must be multiples of this.
    pub multiple: usize,
    /// Most pixels per image.
    pub max_pixels: usize,
    /// `size: auto`.
    pub default_size: (usize, usize),
    /// Steps for `quality` `auto`, `high`, `hd` and `standard`; `medium` uses ¾ of it and
    /// `low` ½ (at least 1).
    pub default_steps: usize,
    /// Most steps a request may ask for.
    pub max_steps: usize,
    /// Whether the model has a guidance input (FLUX.1-schnell has none).
    pub takes_guidance: bool,
    /// Whether the model can use a negative prompt (FLUX.1-schnell cannot).
    pub takes_negative_prompt: bool,
}

impl ModelRules {
    /// FLUX.1-schnell: multiples of 16 from 256 to 2048 a side, at most 2048×2048 pixels,
    /// 4 steps, no guidance, no negative prompt.
    pub fn flux_schnell() -> Self {
        Self {
            min_side: 256,
            max_side: 2048,
            multiple: 16,
            max_pixels: 2048 * 2048,
            default_size: (1024, 1024),
            default_steps: 4,
            max_steps: 50,
            takes_guidance: false,
            takes_negative_prompt: false,
        }
    }

    /// Steps for a quality preset.
    pub fn steps_for(&self, quality: Quality) -> usize {
        match quality {
            Quality::Low => (self.default_steps / 2).max(1),
            Quality::Medium => (self.default_steps * 3 / 4).max(1),
            Quality::Auto | Quality::High | Quality::Standard | Quality::Hd => self.default_steps,
        }
    }
}

/// A request the model can serve, in engine terms plus what the response needs.
#[derive(Debug, Clone)]
pub struct ValidGeneration {
    /// For the engine.
    pub engine: GenerationRequest,
    /// The parsed request.
    pub request: ImageRequest,
}

/// Checks `req` against `rules`; `seed` is used when the request has none.
pub fn validate(
    req: ImageRequest,
    rules: &ModelRules,
    seed: u64,
) -> Result<ValidGeneration, ApiError> {
    let (width, height) = match req.size {
        Size::Auto => rules.default_size,
        Size::Exact(w, h) => (w, h),
    };
    for side in [width, height] {
        if side < rules.min_side || side > rules.max_side || side % rules.multiple != 0 {
            return Err(ApiError::invalid(
                "size",
                format!(
                    "Invalid size '{width}x{height}': each side must be a multiple of {} between {} and {}.",
                    rules.multiple, rules.min_side, rules.max_side
                ),
            ));
        }
    }
    if width * height > rules.max_pixels {
        return Err(ApiError::invalid(
            "size",
            format!(
                "Invalid size '{width}x{height}': at most {} pixels per image.",
                rules.max_pixels
            ),
        ));
    }
    if let Some(steps) = req.steps.filter(|s| *s > rules.max_steps) {
        return Err(ApiError::invalid(
            "steps",
            format!(
                "Invalid 'steps': {steps}; this model takes at most {}.",
                rules.max_steps
            ),
        ));
    }
    if !rules.takes_guidance && req.guidance_scale.is_some_and(|g| g != 0.0) {
        return Err(ApiError::invalid(
            "guidance_scale",
            "This model is guidance-distilled and takes no guidance scale; omit 'guidance_scale' or send 0.",
        ));
    }
    if !rules.takes_negative_prompt
        && req
            .negative_prompt
            .as_deref()
            .is_some_and(|s| !s.is_empty())
    {
        return Err(ApiError::invalid(
            "negative_prompt",
            "This model cannot use a negative prompt; omit 'negative_prompt'.",
        ));
    }
    let engine = GenerationRequest {
        prompt: req.prompt.clone(),
        width,
        height,
        steps: req.steps.unwrap_or_else(|| rules.steps_for(req.quality)),
        seed: req.seed.unwrap_or(seed),
        n: req.n,
        previews: if req.stream { req.partial_images } else { 0 },
    };
    Ok(ValidGeneration {
        engine,
        request: req,
    })
}
