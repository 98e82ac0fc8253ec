//! A generation request made good: every decision taken once, from the wire request and the
//! model's rules, and read from here by everything downstream.

use std::sync::Arc;

use pictor_core::{GenerationRequest, ModelRules};
use pictor_image::Format;
use pictor_store::ApiKey;

use super::source::Source;
use crate::{
    error::ApiError,
    state::ModelSlot,
    wire::{Endpoint, ImageRequest, InputFidelity, Quality, ResponseFormat, Size},
};

/// A validated generation: the model it runs on, the engine request, and how the answer is
/// shaped. Only [`Job::new`] makes one, so nothing unchecked reaches a queue; its fields are
/// private, so nothing downstream changes a decision.
pub(crate) struct Job {
    slot: Arc<ModelSlot>,
    key: Option<ApiKey>,
    engine: GenerationRequest,
    quality: &'static str,
    response_format: ResponseFormat,
    output_format: Format,
    compression: u8,
    stream: bool,
    /// Streamed with `pictor.progress` events.
    stream_progress: bool,
    endpoint: Endpoint,
    input_image_tokens: u64,
    output_tokens: u64,
}

/// The strength of an edit that names none: a masked region is repainted from noise (from
/// 0.85 of the way with `input_fidelity: high`), a whole image is taken ¾ of the way (½
/// with `high`), a variation 0.6 of the way (diffusers' default).
fn default_strength(endpoint: Endpoint, masked: bool, fidelity: InputFidelity) -> f64 {
    match (endpoint, masked, fidelity) {
        (Endpoint::Variations, ..) => 0.6,
        (_, true, InputFidelity::Low) => 1.0,
        (_, true, InputFidelity::High) => 0.85,
        (_, false, InputFidelity::Low) => 0.75,
        (_, false, InputFidelity::High) => 0.5,
    }
}

/// The engine's edit input: `source` brought to `size` (the image resampled, the mask's
/// transparent pixels marked for repainting).
fn edit_input(
    source: Source,
    size: pictor_core::Dimensions,
    strength: f64,
) -> pictor_core::EditInput {
    let Source {
        image,
        mask,
        image_sha256,
    } = source;
    let (w, h) = (image.image.width, image.image.height);
    pictor_core::EditInput {
        mask: mask.map(|alpha| pictor_image::mask_from_alpha(&alpha, w, h, size)),
        image: pictor_image::resize(&image.image, size),
        strength,
        image_sha256,
    }
}

/// Steps for a quality preset: the model's default for `auto`, `high`, `hd` and
/// `standard`, ¾ of it for `medium`, ½ for `low` (at least 1).
fn steps_for(rules: &ModelRules, quality: Quality) -> usize {
    let full = rules.default_steps;
    match quality {
        Quality::Low => (full / 2).max(1),
        Quality::Medium => (full * 3 / 4).max(1),
        Quality::Auto
        | Quality::High
        | Quality::Xhigh
        | Quality::Max
        | Quality::Standard
        | Quality::Hd => full,
    }
}

/// OpenAI's `quality` name for a run of `steps`: the highest preset it reaches.
fn quality_name(rules: &ModelRules, steps: usize) -> &'static str {
    if steps >= steps_for(rules, Quality::High) {
        "high"
    } else if steps >= steps_for(rules, Quality::Medium) {
        "medium"
    } else {
        "low"
    }
}

impl Job {
    /// Holds `req` to the rules of `slot`'s model (503 while it loads); `seed` is used when
    /// the request has none; `source` is the image an edit or variation starts from.
    pub(crate) fn new(
        req: ImageRequest,
        slot: Arc<ModelSlot>,
        key: Option<ApiKey>,
        seed: u64,
        source: Option<Source>,
    ) -> Result<Self, ApiError> {
        let rules = &slot.ready()?.rules;
        let size = match (req.size, &source) {
            (Size::Exact(size), _) => size,
            // `auto` for an edit: the input's size, brought to the model's rules.
            (Size::Auto, Some(s)) => rules.fit(pictor_core::Dimensions::new(
                s.image.image.width,
                s.image.image.height,
            )),
            (Size::Auto, None) => rules.default_size,
        };
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
        let mut engine = GenerationRequest {
            loras: req.loras,
            prompt: req.prompt,
            width: size.width,
            height: size.height,
            steps: req.steps.unwrap_or_else(|| steps_for(rules, req.quality)),
            // The model's default where it takes guidance; 0 stands for none where it
            // takes none (any other value is refused by the rules' check below).
            guidance: match rules.default_guidance {
                Some(default) => Some(req.guidance_scale.unwrap_or(default)),
                None => req.guidance_scale.filter(|&g| g != 0.0),
            },
            seed: req.seed.unwrap_or(seed),
            n: req.n,
            previews: if req.stream { req.partial_images } else { 0 },
            edit: None,
        };
        // The size is held to the model's rules before any image is resampled to it.
        rules.check(&engine)?;
        if let Some(source) = source {
            let masked = source.mask.is_some();
            let strength = req
                .strength
                .unwrap_or_else(|| default_strength(req.endpoint, masked, req.input_fidelity));
            pictor_core::edit_start(engine.steps, strength)?;
            let size = pictor_core::Dimensions::new(engine.width, engine.height);
            engine.edit = Some(Arc::new(edit_input(source, size, strength)));
        }
        // One token per cell of the model's grid: what its transformer denoises (and, for
        // an edit, the input it starts from).
        let cells = (engine.width / rules.multiple) * (engine.height / rules.multiple);
        Ok(Self {
            input_image_tokens: if engine.edit.is_some() {
                cells as u64
            } else {
                0
            },
            endpoint: req.endpoint,
            output_tokens: (engine.n * cells) as u64,
            quality: quality_name(rules, engine.steps),
            // Stream events carry each image inline, as OpenAI's do.
            response_format: if req.stream {
                ResponseFormat::B64Json
            } else {
                req.response_format
            },
            output_format: req.output_format,
            compression: req.output_compression,
            stream: req.stream,
            stream_progress: req.stream_progress,
            slot,
            key,
            engine,
        })
    }

    /// The model's slot.
    pub(crate) fn slot(&self) -> &ModelSlot {
        &self.slot
    }

    /// The model's name (not the alias the client used).
    pub(crate) fn model(&self) -> &str {
        &self.slot.spec.name
    }

    /// The caller's API key, when the server has keys.
    pub(crate) fn key(&self) -> Option<&ApiKey> {
        self.key.as_ref()
    }

    /// What the engine runs.
    pub(crate) fn engine(&self) -> &GenerationRequest {
        &self.engine
    }

    /// OpenAI's `quality` for the steps that run.
    pub(crate) fn quality(&self) -> &'static str {
        self.quality
    }

    /// `WxH`, as responses spell it.
    pub(crate) fn size(&self) -> String {
        pictor_core::Dimensions::new(self.engine.width, self.engine.height).to_string()
    }

    /// Inline or behind a link.
    pub(crate) fn response_format(&self) -> ResponseFormat {
        self.response_format
    }

    /// The file format.
    pub(crate) fn output_format(&self) -> Format {
        self.output_format
    }

    /// JPEG quality as asked, 0 to 100 (`pictor_image::encode` takes 0, the smallest
    /// file, as 1).
    pub(crate) fn compression(&self) -> u8 {
        self.compression
    }

    /// Answered as server-sent events.
    pub(crate) fn stream(&self) -> bool {
        self.stream
    }

    /// Whether the stream also carries `pictor.progress` events.
    pub(crate) fn stream_progress(&self) -> bool {
        self.stream && self.stream_progress
    }

    /// The endpoint the request came to.
    pub(crate) fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// An edit's input image tokens (one per cell of the model's grid), 0 for a generation.
    pub(crate) fn input_image_tokens(&self) -> u64 {
        self.input_image_tokens
    }

    /// Output tokens, as `usage` counts them for images: one per cell of the model's size
    /// grid (16×16 pixels for FLUX) of each image.
    pub(crate) fn output_tokens(&self) -> u64 {
        self.output_tokens
    }
}

#[cfg(test)]
mod tests {
    use pictor_core::Dimensions;

    use super::*;

    fn rules(default_steps: usize) -> ModelRules {
        ModelRules {
            family: "FLUX.1-schnell".into(),
            multiple: 16,
            min_side: 64,
            max_side: 512,
            max_pixels: 512 * 512,
            default_size: Dimensions::new(128, 128),
            default_steps,
            max_steps: 100,
            default_guidance: None,
            takes_negative_prompt: false,
            takes_loras: false,
        }
    }

    #[test]
    fn quality_presets_and_names_agree_for_any_default() {
        for default in [1, 2, 4, 8, 28, 50] {
            let r = rules(default);
            for (q, name) in [
                (Quality::Auto, "high"),
                (Quality::High, "high"),
                (Quality::Medium, "medium"),
                (Quality::Low, "low"),
            ] {
                let steps = steps_for(&r, q);
                let expect = match (name, default) {
                    // With 1 or 2 steps the presets collapse onto each other.
                    (_, 1) => "high",
                    ("low", 2) => "medium",
                    _ => name,
                };
                assert_eq!(quality_name(&r, steps), expect, "{q:?} at {default}");
            }
        }
        let schnell = rules(4);
        assert_eq!(
            [1, 2, 3, 4, 10].map(|s| quality_name(&schnell, s)),
            ["low", "low", "medium", "high", "high"]
        );
    }
}
