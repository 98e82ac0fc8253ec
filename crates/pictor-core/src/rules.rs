//! What a model accepts, and the one check that holds a request to it.

use std::{fmt, str::FromStr};

use crate::{GenerationRequest, Invalid};

/// Width and height in pixels, spelt `WIDTHxHEIGHT` (lower-case `x`, no spaces) in
/// requests, receipts, the configuration and the command line alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Dimensions {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
}

impl Dimensions {
    /// `width` × `height`.
    pub const fn new(width: usize, height: usize) -> Self {
        Self { width, height }
    }
}

impl fmt::Display for Dimensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for Dimensions {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not WIDTHxHEIGHT, such as 1024x1024");
        let (w, h) = s.split_once('x').ok_or_else(bad)?;
        let side = |v: &str| {
            // `parse` would accept a leading `+`; a size is 1 to 9 digits (no model draws a
            // side of a billion pixels, and every such number fits any `usize`).
            if v.is_empty() || v.len() > 9 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            v.parse::<usize>().map_err(|_| bad())
        };
        Ok(Self::new(side(w)?, side(h)?))
    }
}

impl TryFrom<String> for Dimensions {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Dimensions> for String {
    fn from(d: Dimensions) -> Self {
        d.to_string()
    }
}

/// What a model accepts. A pipeline declares its own ([`crate::Pipeline::rules`]); a server
/// may change the ranges and defaults by configuration, never the grid.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelRules {
    /// The model family, as its weights say (`FLUX.1-schnell`, `FLUX.1-dev`); empty where
    /// unknown (rules recorded before families were reported).
    #[serde(default)]
    pub family: String,
    /// Sides must be multiples of this (the network's patch grid).
    pub multiple: usize,
    /// Smallest side in pixels.
    pub min_side: usize,
    /// Largest side in pixels.
    pub max_side: usize,
    /// Most pixels per image.
    pub max_pixels: usize,
    /// The size of `size: auto`.
    pub default_size: Dimensions,
    /// Steps for the default quality; lower qualities take a fraction of them.
    pub default_steps: usize,
    /// Most steps a request may ask for.
    pub max_steps: usize,
    /// The guidance scale when a request gives none, for a model with a guidance input
    /// (FLUX.1-dev's distilled guidance: 3.5); `None` for a model without one.
    pub default_guidance: Option<f64>,
    /// Whether the model can use a negative prompt.
    pub takes_negative_prompt: bool,
    /// Whether requests may add LoRAs (`loras`) to the model's weights.
    #[serde(default)]
    pub takes_loras: bool,
}

/// The largest guidance scale a request may give (FLUX.1-dev is used at 1 to 10).
pub const MAX_GUIDANCE: f64 = 30.0;

/// Most LoRAs one request may add.
pub const MAX_LORAS: usize = 8;

/// The largest LoRA scale taken, either sign (ComfyUI's and Forge's sliders stop well
/// inside it; past it images are noise).
pub const MAX_LORA_SCALE: f64 = 10.0;

/// Largest side anyone may ask of a network, served or not.
const LARGEST_SIDE: usize = 1 << 14;
/// Most steps anyone may ask for, served or not.
const MOST_STEPS: usize = 1000;

impl ModelRules {
    /// The same rules without a server's ranges: any size on the grid up to
    /// 16384 a side and up to 1000 steps. What a person asks of a model on their own machine
    /// (`pictor generate`), and what a pipeline itself refuses to run.
    pub fn without_serving_limits(&self) -> Self {
        Self {
            min_side: self.multiple,
            max_side: LARGEST_SIDE,
            max_pixels: LARGEST_SIDE * LARGEST_SIDE,
            max_steps: MOST_STEPS,
            ..self.clone()
        }
    }

    /// The size these rules accept that is closest to `input` in shape and scale: what
    /// `size: auto` means for an edit of an image of that size. The aspect ratio is kept
    /// as far as the range and the pixel budget allow, each side is rounded to the grid,
    /// and the result always passes [`ModelRules::check`]'s size rules.
    pub fn fit(&self, input: Dimensions) -> Dimensions {
        let grid = self.multiple.max(1);
        let lo = self.min_side.max(1).div_ceil(grid) * grid;
        let hi = (self.max_side / grid * grid).max(lo);
        let (w, h) = (input.width.max(1) as f64, input.height.max(1) as f64);
        // Shrink to the pixel budget, then bring the longer side within the range; the
        // shorter side is clamped (which bends the shape) only when it must be.
        let scale = (self.max_pixels as f64 / (w * h))
            .sqrt()
            .min(1.0)
            .min(hi as f64 / w.max(h))
            .max(lo as f64 / w.min(h));
        let side = |v: f64| (((v * scale) / grid as f64).round() as usize * grid).clamp(lo, hi);
        let (mut fw, mut fh) = (side(w), side(h));
        // Rounding up may pass the budget: take a grid step off the longer side until not.
        while fw * fh > self.max_pixels && (fw > lo || fh > lo) {
            if fw >= fh && fw > lo {
                fw -= grid;
            } else {
                fh -= grid;
            }
        }
        Dimensions::new(fw, fh)
    }

    /// Holds `req` to these rules: sides on the grid and within range, the pixel budget,
    /// steps and images at least 1, steps at most `max_steps`, and an edit's steps enough
    /// for its strength ([`crate::edit_start`]). The error names the request field (`size`,
    /// `steps`, `strength` or `n`).
    pub fn check(&self, req: &GenerationRequest) -> Result<(), Invalid> {
        let size = Dimensions::new(req.width, req.height);
        if self.min_side == self.max_side
            && (req.width, req.height) != (self.min_side, self.min_side)
        {
            return Err(Invalid::new(
                "size",
                format!(
                    "Invalid size '{size}': this model draws only {0}x{0}.",
                    self.min_side
                ),
            ));
        }
        for (side, value) in [("width", req.width), ("height", req.height)] {
            if value < self.min_side.max(1)
                || value > self.max_side
                || !value.is_multiple_of(self.multiple.max(1))
            {
                return Err(Invalid::new(
                    "size",
                    format!(
                        "Invalid size '{size}': each side must be a multiple of {} between {} and {}, and the {side} is {value}.",
                        self.multiple, self.min_side, self.max_side
                    ),
                ));
            }
        }
        if req.width * req.height > self.max_pixels {
            return Err(Invalid::new(
                "size",
                format!(
                    "Invalid size '{size}': at most {} pixels per image.",
                    self.max_pixels
                ),
            ));
        }
        if let Some(edit) = &req.edit {
            crate::edit_start(req.steps, edit.strength)?;
        }
        if req.steps == 0 || req.steps > self.max_steps {
            return Err(Invalid::new(
                "steps",
                format!(
                    "Invalid 'steps': {}; this model takes 1 to {}.",
                    req.steps, self.max_steps
                ),
            ));
        }
        if req.n == 0 {
            return Err(Invalid::new("n", "Invalid 'n': 0; expected at least 1."));
        }
        match (req.guidance, self.default_guidance) {
            (Some(_), None) => {
                return Err(Invalid::new(
                    "guidance_scale",
                    "This model has no guidance input and takes no guidance scale; omit 'guidance_scale' or send 0.",
                ));
            }
            (Some(g), Some(_)) if !(0.0..=MAX_GUIDANCE).contains(&g) => {
                return Err(Invalid::new(
                    "guidance_scale",
                    format!("Invalid 'guidance_scale': {g}; this model takes 0 to {MAX_GUIDANCE}."),
                ));
            }
            _ => {}
        }
        self.check_loras(&req.loras)
    }

    fn check_loras(&self, loras: &[crate::LoraRequest]) -> Result<(), Invalid> {
        let invalid = |m: String| Err(Invalid::new("loras", m));
        if loras.is_empty() {
            return Ok(());
        }
        if !self.takes_loras {
            return invalid(format!(
                "This model ({}) takes no LoRAs yet; omit 'loras'.",
                self.family
            ));
        }
        if loras.len() > MAX_LORAS {
            return invalid(format!(
                "Invalid 'loras': {} LoRAs; at most {MAX_LORAS} per request.",
                loras.len()
            ));
        }
        for (i, lora) in loras.iter().enumerate() {
            if let Some(problem) = crate::lora_name_problem(&lora.name) {
                return invalid(format!("Invalid 'loras[{i}].name': {problem}."));
            }
            if !lora.scale.is_finite() || lora.scale.abs() > MAX_LORA_SCALE {
                return invalid(format!(
                    "Invalid 'loras[{i}].scale': {}; expected -{MAX_LORA_SCALE} to {MAX_LORA_SCALE}.",
                    lora.scale
                ));
            }
            if loras[..i].iter().any(|l| l.name == lora.name) {
                return invalid(format!(
                    "Invalid 'loras': `{}` is listed twice; give it once with the sum of the scales.",
                    lora.name
                ));
            }
        }
        Ok(())
    }

    /// Whether the model has a guidance input.
    pub fn takes_guidance(&self) -> bool {
        self.default_guidance.is_some()
    }

    /// Checks that the rules can serve their own defaults (`size: auto` at the default
    /// steps); a configuration that breaks this would refuse every plain request.
    pub fn check_defaults(&self) -> Result<(), Invalid> {
        self.check(&GenerationRequest {
            width: self.default_size.width,
            height: self.default_size.height,
            steps: self.default_steps,
            n: 1,
            ..GenerationRequest::default()
        })
    }
}

#[cfg(test)]
mod tests {
    fn flux() -> ModelRules {
        ModelRules {
            family: "FLUX.1-schnell".into(),
            multiple: 16,
            min_side: 256,
            max_side: 2048,
            max_pixels: 2048 * 2048,
            default_size: Dimensions::new(1024, 1024),
            default_steps: 4,
            max_steps: 50,
            default_guidance: None,
            takes_negative_prompt: false,
            takes_loras: false,
        }
    }

    #[test]
    fn fit_keeps_the_shape_on_the_grid_and_within_the_rules() {
        let rules = flux();
        let fit = |w, h| rules.fit(Dimensions::new(w, h));
        assert_eq!(fit(1024, 768), Dimensions::new(1024, 768));
        assert_eq!(fit(1000, 750), Dimensions::new(1008, 752));
        assert_eq!(fit(4000, 3000), Dimensions::new(2048, 1536));
        assert_eq!(fit(100, 50), Dimensions::new(512, 256));
        // A shape the range cannot hold is bent as little as it allows.
        assert_eq!(fit(10_000, 100), Dimensions::new(2048, 256));
        let only = ModelRules {
            min_side: 128,
            max_side: 128,
            ..flux()
        };
        assert_eq!(
            only.fit(Dimensions::new(640, 480)),
            Dimensions::new(128, 128)
        );
        let budget = ModelRules {
            max_pixels: 1024 * 1024,
            ..flux()
        };
        let got = budget.fit(Dimensions::new(3000, 2000));
        assert!(got.width * got.height <= 1024 * 1024, "{got}");
        assert_eq!((got.width % 16, got.height % 16), (0, 0));
        for (w, h) in [(1, 1), (7, 5000), (2048, 2048), (333, 777), (65_000, 3)] {
            for rules in [&rules, &only, &budget] {
                let d = rules.fit(Dimensions::new(w, h));
                let req = GenerationRequest {
                    width: d.width,
                    height: d.height,
                    steps: 4,
                    n: 1,
                    ..Default::default()
                };
                assert_eq!(rules.check(&req), Ok(()), "{w}x{h} -> {d}");
            }
        }
    }

    use super::*;

    fn rules() -> ModelRules {
        ModelRules {
            family: "FLUX.1-schnell".into(),
            multiple: 16,
            min_side: 256,
            max_side: 2048,
            max_pixels: 1024 * 2048,
            default_size: Dimensions::new(1024, 1024),
            default_steps: 4,
            max_steps: 50,
            default_guidance: None,
            takes_negative_prompt: false,
            takes_loras: false,
        }
    }

    fn req(width: usize, height: usize, steps: usize, n: usize) -> GenerationRequest {
        GenerationRequest {
            width,
            height,
            steps,
            n,
            ..GenerationRequest::default()
        }
    }

    #[test]
    fn each_bound_is_refused_with_its_param() {
        let r = rules();
        assert_eq!(r.check(&req(1024, 512, 4, 1)), Ok(()));
        assert_eq!(r.check_defaults(), Ok(()));
        for (bad, param, needle) in [
            (req(250, 256, 4, 1), "size", "width is 250"),
            (req(256, 248, 4, 1), "size", "height is 248"),
            (req(240, 256, 4, 1), "size", "between 256 and 2048"),
            (req(2064, 256, 4, 1), "size", "2064"),
            (req(2048, 2048, 4, 1), "size", "at most 2097152 pixels"),
            (req(256, 256, 0, 1), "steps", "1 to 50"),
            (req(256, 256, 51, 1), "steps", "51"),
            (req(256, 256, 4, 0), "n", "at least 1"),
        ] {
            let e = r.check(&bad).expect_err("refused");
            assert_eq!(e.param, param, "{bad:?}");
            assert!(e.message.contains(needle), "{}", e.message);
        }
    }

    #[test]
    fn guidance_is_held_to_the_model() {
        let guided = |g| GenerationRequest {
            guidance: g,
            ..req(256, 256, 4, 1)
        };
        let schnell = rules();
        assert!(!schnell.takes_guidance());
        assert_eq!(schnell.check(&guided(None)), Ok(()));
        let e = schnell
            .check(&guided(Some(3.5)))
            .expect_err("no guidance input");
        assert_eq!(e.param, "guidance_scale");
        assert!(e.message.contains("takes no guidance"), "{}", e.message);
        let dev = ModelRules {
            default_guidance: Some(3.5),
            ..rules()
        };
        assert!(dev.takes_guidance());
        for ok in [None, Some(0.0), Some(3.5), Some(MAX_GUIDANCE)] {
            assert_eq!(dev.check(&guided(ok)), Ok(()), "{ok:?}");
        }
        for bad in [-0.5, MAX_GUIDANCE + 0.1, f64::NAN, f64::INFINITY] {
            let e = dev.check(&guided(Some(bad))).expect_err("out of range");
            assert_eq!(e.param, "guidance_scale");
            assert!(e.message.contains("0 to 30"), "{}", e.message);
        }
    }

    #[test]
    fn a_model_of_one_size_says_so() {
        let r = ModelRules {
            min_side: 128,
            max_side: 128,
            default_size: Dimensions::new(128, 128),
            ..rules()
        };
        assert_eq!(r.check(&req(128, 128, 4, 1)), Ok(()));
        for (w, h) in [(128, 144), (256, 256), (64, 128)] {
            let e = r.check(&req(w, h, 4, 1)).expect_err("one size only");
            assert_eq!(e.param, "size");
            assert!(e.message.contains("draws only 128x128"), "{}", e.message);
        }
        assert_eq!(r.without_serving_limits().check(&req(64, 48, 4, 1)), Ok(()));
    }

    #[test]
    fn without_serving_limits_keeps_only_the_grid() {
        let r = rules().without_serving_limits();
        assert_eq!(r.check(&req(64, 48, 2, 1)), Ok(()));
        assert_eq!(r.check(&req(4096, 4096, 200, 1)), Ok(()));
        assert_eq!(r.check(&req(80, 48, 4, 1)), Ok(()));
        assert_eq!(
            r.check(&req(80, 44, 4, 1)).map_err(|e| e.param),
            Err("size")
        );
        assert_eq!(r.check(&req(0, 48, 4, 1)).map_err(|e| e.param), Err("size"));
    }

    #[test]
    fn dimensions_have_one_spelling() {
        assert_eq!("512x768".parse(), Ok(Dimensions::new(512, 768)));
        for bad in [
            "512X768",
            "512 x 768",
            "512",
            "x5",
            "+5x5",
            "5x",
            "-1x5",
            "axb",
        ] {
            assert!(bad.parse::<Dimensions>().is_err(), "{bad}");
        }
        assert_eq!(Dimensions::new(64, 48).to_string(), "64x48");
        let json = serde_json::to_string(&Dimensions::new(8, 16)).unwrap();
        assert_eq!(json, "\"8x16\"");
        assert!(serde_json::from_str::<Dimensions>("\"8 by 16\"").is_err());
    }
}
