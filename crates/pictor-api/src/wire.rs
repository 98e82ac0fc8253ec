//! The `POST /v1/images/generations` body, parsed field by field so every error names its
//! `param`. `null` for an optional field means its default; unknown fields are refused, as
//! OpenAI does.

use pictor_core::Dimensions;
use pictor_image::Format;
use serde_json::{Map, Value};

use crate::error::ApiError;

pub use crate::openapi::{Quality, ResponseFormat};

/// `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// The model's default.
    Auto,
    /// Width and height in pixels.
    Exact(Dimensions),
}

/// A parsed request, before the model's own rules are applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    /// `model`.
    pub model: String,
    /// `prompt`.
    pub prompt: String,
    /// `n`.
    pub n: usize,
    /// `size`.
    pub size: Size,
    /// `quality`.
    pub quality: Quality,
    /// `response_format`.
    pub response_format: ResponseFormat,
    /// `output_format`.
    pub output_format: Format,
    /// `output_compression`.
    pub output_compression: u8,
    /// `seed` (extension).
    pub seed: Option<u64>,
    /// `steps` / `num_inference_steps` (extension).
    pub steps: Option<usize>,
    /// `guidance_scale` (extension).
    pub guidance_scale: Option<f64>,
    /// `negative_prompt` (extension).
    pub negative_prompt: Option<String>,
    /// `user`.
    pub user: Option<String>,
    /// `stream`: answer with server-sent events.
    pub stream: bool,
    /// `partial_images`: previews per image when streaming (0 to 3).
    pub partial_images: usize,
}

/// Limits that do not depend on the model.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    /// Longest prompt, in characters.
    pub max_prompt_chars: usize,
    /// Most images per request.
    pub max_n: usize,
}

pub(crate) const KNOWN: &[&str] = &[
    "model",
    "prompt",
    "n",
    "size",
    "quality",
    "response_format",
    "user",
    "style",
    "output_format",
    "output_compression",
    "background",
    "moderation",
    "stream",
    "partial_images",
    "seed",
    "steps",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
];

struct Fields<'a>(&'a Map<String, Value>);

fn type_error(param: &str, want: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::invalid(
        param,
        format!("Invalid type for '{param}': expected {want}, but got {got}."),
    )
}

impl Fields<'_> {
    /// The value of `key`, treating `null` as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(type_error(key, "a string", other)),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                        .map(|f| f as i64)
                })
                .map(Some)
                .ok_or_else(|| {
                    ApiError::invalid(
                        key,
                        format!("Invalid '{key}': expected an integer, got {n}."),
                    )
                }),
            Some(other) => Err(type_error(key, "an integer", other)),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(type_error(key, "a number", other)),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(type_error(key, "a boolean", other)),
        }
    }

    /// One of `choices`, returning its index.
    fn choice(&self, key: &str, choices: &[&str]) -> Result<Option<usize>, ApiError> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        choices
            .iter()
            .position(|c| *c == s)
            .map(Some)
            .ok_or_else(|| {
                let list = choices
                    .iter()
                    .map(|c| format!("'{c}'"))
                    .collect::<Vec<_>>()
                    .join(", ");
                ApiError::invalid(
                    key,
                    format!("Invalid value: '{s}'. Supported values are: {list}."),
                )
            })
    }

    fn in_range(&self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.integer(key)? {
            Some(v) if v < lo || v > hi => Err(ApiError::invalid(
                key,
                format!("Invalid '{key}': {v} is out of range; it must be between {lo} and {hi}."),
            )),
            v => Ok(v),
        }
    }
}

/// The fields whose parsing is more than a type and a range.
impl Fields<'_> {
    /// `prompt`: required, not blank, at most `max_chars` characters.
    fn prompt(&self, max_chars: usize) -> Result<String, ApiError> {
        let prompt = self
            .string("prompt")?
            .ok_or_else(|| ApiError::invalid("prompt", "Missing required parameter: 'prompt'."))?;
        let chars = prompt.chars().count();
        if chars == 0 || prompt.trim().is_empty() {
            return Err(ApiError::invalid(
                "prompt",
                "Invalid 'prompt': empty string. Expected at least 1 character.",
            ));
        }
        if chars > max_chars {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "Invalid 'prompt': string too long. Expected a string with maximum length {max_chars}, but got {chars}."
                ),
            ));
        }
        if let Some(problem) = pictor_core::prompt_problem(prompt) {
            return Err(ApiError::invalid(
                "prompt",
                format!("Invalid 'prompt': {problem}."),
            ));
        }
        Ok(prompt.to_string())
    }

    /// `quality`, `auto` when absent.
    fn quality(&self) -> Result<Quality, ApiError> {
        const QUALITIES: [Quality; 6] = [
            Quality::Auto,
            Quality::Low,
            Quality::Medium,
            Quality::High,
            Quality::Standard,
            Quality::Hd,
        ];
        Ok(self
            .choice(
                "quality",
                &["auto", "low", "medium", "high", "standard", "hd"],
            )?
            .map_or(Quality::Auto, |i| QUALITIES[i]))
    }

    /// `seed`: an integer that `seed + n - 1` keeps within [`pictor_core::MAX_SEED`].
    fn seed(&self, n: usize) -> Result<Option<u64>, ApiError> {
        let most = pictor_core::MAX_SEED - (n as u64).saturating_sub(1);
        match self.integer("seed")? {
            Some(v) if u64::try_from(v).map_or(true, |v| v > most) => Err(ApiError::invalid(
                "seed",
                format!(
                    "Invalid 'seed': {v}; expected an integer from 0 to {most} (image i uses seed + i, and {} is the largest integer a JSON number carries exactly).",
                    pictor_core::MAX_SEED
                ),
            )),
            v => Ok(v.map(|v| v as u64)),
        }
    }

    /// `steps` or its diffusers name `num_inference_steps`, never both (as the OpenAPI
    /// document says: `not: {required: [steps, num_inference_steps]}`).
    fn steps(&self) -> Result<Option<usize>, ApiError> {
        // Present at all, `null` included, as JSON Schema's `required` counts.
        if self.0.contains_key("steps") && self.0.contains_key("num_inference_steps") {
            return Err(ApiError::invalid(
                "num_inference_steps",
                "Send one of 'steps' and 'num_inference_steps', not both.",
            ));
        }
        let steps = self.in_range("steps", 1, 1000)?;
        let nis = self.in_range("num_inference_steps", 1, 1000)?;
        Ok(steps.or(nis).map(|s| s as usize))
    }
}

fn parse_size(s: &str) -> Result<Size, ApiError> {
    if s == "auto" {
        return Ok(Size::Auto);
    }
    s.parse().map(Size::Exact).map_err(|_| {
        ApiError::invalid(
            "size",
            format!("Invalid size '{s}': expected 'auto' or WIDTHxHEIGHT, such as '1024x1024'."),
        )
    })
}

/// Parses a request body (already checked to be JSON).
pub fn parse(body: &Value, limits: &BodyLimits) -> Result<ImageRequest, ApiError> {
    let Value::Object(map) = body else {
        return Err(ApiError::invalid_body(
            "The request body must be a JSON object.",
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            unknown,
            format!("Unrecognized request argument supplied: {unknown}"),
        ));
    }
    let f = Fields(map);
    let model = f
        .string("model")?
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("model", "You must provide a model parameter."))?
        .to_string();
    let prompt = f.prompt(limits.max_prompt_chars)?;
    let n = f.in_range("n", 1, limits.max_n as i64)?.unwrap_or(1) as usize;
    let size = f
        .string("size")?
        .map(parse_size)
        .transpose()?
        .unwrap_or(Size::Auto);
    let quality = f.quality()?;
    let response_format = match f.choice("response_format", &["url", "b64_json"])? {
        Some(1) => ResponseFormat::B64Json,
        _ => ResponseFormat::Url,
    };
    let output_format = match f.choice("output_format", &["png", "jpeg", "webp"])? {
        Some(1) => Format::Jpeg,
        Some(2) => Format::Webp,
        _ => Format::Png,
    };
    let output_compression = f.in_range("output_compression", 0, 100)?.unwrap_or(100) as u8;
    f.choice("style", &["vivid", "natural"])?;
    f.choice("moderation", &["auto", "low"])?;
    if f.choice("background", &["auto", "opaque", "transparent"])? == Some(2) {
        return Err(ApiError::invalid(
            "background",
            "Transparent backgrounds are not supported by this server.",
        ));
    }
    let stream = f.boolean("stream")?.unwrap_or(false);
    let partial_images = f.in_range("partial_images", 0, 3)?.unwrap_or(0) as usize;
    let seed = f.seed(n)?;
    let steps = f.steps()?;
    Ok(ImageRequest {
        model,
        prompt,
        n,
        size,
        quality,
        response_format,
        output_format,
        output_compression,
        seed,
        steps,
        guidance_scale: f.number("guidance_scale")?,
        negative_prompt: f.string("negative_prompt")?.map(str::to_string),
        user: f.string("user")?.map(str::to_string),
        stream,
        partial_images,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn limits() -> BodyLimits {
        BodyLimits {
            max_prompt_chars: 20,
            max_n: 10,
        }
    }

    fn param_of(body: Value) -> Option<String> {
        match parse(&body, &limits()) {
            Err(ApiError::Invalid { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_nulls() {
        let r = parse(
            &json!({"model": "m", "prompt": "a cat", "n": null, "size": null}),
            &limits(),
        )
        .unwrap();
        assert_eq!(
            (r.n, r.size, r.quality, r.response_format),
            (1, Size::Auto, Quality::Auto, ResponseFormat::Url)
        );
        assert_eq!(
            (r.output_format, r.output_compression, r.seed),
            (Format::Png, 100, None)
        );
    }

    #[test]
    fn every_bad_field_names_its_param() {
        let cases = [
            (json!({"prompt": "a"}), "model"),
            (json!({"model": "m"}), "prompt"),
            (json!({"model": "m", "prompt": ""}), "prompt"),
            (json!({"model": "m", "prompt": "x".repeat(21)}), "prompt"),
            (json!({"model": "m", "prompt": 5}), "prompt"),
            (json!({"model": "m", "prompt": "a", "n": 0}), "n"),
            (json!({"model": "m", "prompt": "a", "n": 11}), "n"),
            (json!({"model": "m", "prompt": "a", "n": "2"}), "n"),
            (json!({"model": "m", "prompt": "a", "size": "big"}), "size"),
            (
                json!({"model": "m", "prompt": "a", "quality": "ultra"}),
                "quality",
            ),
            (
                json!({"model": "m", "prompt": "a", "response_format": "Url"}),
                "response_format",
            ),
            (
                json!({"model": "m", "prompt": "a", "output_compression": 101}),
                "output_compression",
            ),
            (json!({"model": "m", "prompt": "a", "seed": -1}), "seed"),
            (
                json!({"model": "m", "prompt": "a", "seed": 9_007_199_254_740_992u64}),
                "seed",
            ),
            (
                json!({"model": "m", "prompt": "a", "seed": 9_007_199_254_740_991u64, "n": 2}),
                "seed",
            ),
            (json!({"model": "m", "prompt": "a\u{0}b"}), "prompt"),
            (json!({"model": "m", "prompt": "bell \u{7}"}), "prompt"),
            (json!({"model": "m", "prompt": "a", "steps": 0}), "steps"),
            (
                json!({"model": "m", "prompt": "a", "stream": "yes"}),
                "stream",
            ),
            (
                json!({"model": "m", "prompt": "a", "stream": true, "partial_images": 4}),
                "partial_images",
            ),
            (
                json!({"model": "m", "prompt": "a", "colour": "red"}),
                "colour",
            ),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(body.clone()).as_deref(), Some(param), "{body}");
        }
        assert_eq!(param_of(json!([1, 2])), None);
    }

    #[test]
    fn extensions_parse() {
        let r = parse(
            &json!({"model": "m", "prompt": "a", "seed": 42, "num_inference_steps": 2, "size": "512x256",
                    "response_format": "b64_json", "output_format": "jpeg", "output_compression": 80}),
            &limits(),
        )
        .unwrap();
        assert_eq!(
            (r.seed, r.steps, r.size),
            (Some(42), Some(2), Size::Exact(Dimensions::new(512, 256)))
        );
        assert_eq!(
            (r.response_format, r.output_format, r.output_compression),
            (ResponseFormat::B64Json, Format::Jpeg, 80)
        );
    }
}
