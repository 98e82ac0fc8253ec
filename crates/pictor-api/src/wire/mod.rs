//! The images requests, parsed field by field so every error names its `param`: the JSON
//! body of `POST /v1/images/generations`, and the form fields of `/v1/images/edits` and
//! `/v1/images/variations` (their files are read by [`form`]). `null` for an optional field
//! means its default; unknown fields are refused, as OpenAI does.

mod fields;
pub(crate) mod form;

use pictor_core::Dimensions;
use pictor_image::Format;
use serde_json::{Map, Value};

use self::fields::Fields;
use crate::error::ApiError;

pub use crate::openapi::{InputFidelity, Quality, ResponseFormat};

/// Which images endpoint a request came to: it decides the fields taken and the names of
/// the stream's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/images/generations`.
    Generations,
    /// `POST /v1/images/edits`.
    Edits,
    /// `POST /v1/images/variations`.
    Variations,
}

impl Endpoint {
    /// The text fields it takes (files are [`form`]'s).
    pub(crate) fn known(self) -> &'static [&'static str] {
        match self {
            Self::Generations => KNOWN,
            Self::Edits => KNOWN_EDIT,
            Self::Variations => KNOWN_VARIATION,
        }
    }

    /// The stream's preview and completion event types.
    pub(crate) fn events(self) -> (&'static str, &'static str) {
        match self {
            Self::Generations | Self::Variations => (
                "image_generation.partial_image",
                "image_generation.completed",
            ),
            Self::Edits => ("image_edit.partial_image", "image_edit.completed"),
        }
    }
}

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
    /// `loras` (extension): LoRA files of the server's to add, with their scales.
    pub loras: Vec<pictor_core::LoraRequest>,
    /// `user`.
    pub user: Option<String>,
    /// `stream`: answer with server-sent events.
    pub stream: bool,
    /// `partial_images`: previews per image when streaming (0 to 3).
    pub partial_images: usize,
    /// `stream_progress` (extension): when streaming, also `pictor.progress` events (the
    /// place in the queue while waiting, then each denoising step).
    pub stream_progress: bool,
    /// `strength` (extension, edits and variations): how far from the input, in (0, 1].
    pub strength: Option<f64>,
    /// `input_fidelity` (edits): `high` keeps more of the input.
    pub input_fidelity: InputFidelity,
    /// Where the request came.
    pub endpoint: Endpoint,
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
    "stream_progress",
    "seed",
    "steps",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "loras",
    "safety_identifier",
];

/// `/v1/images/edits`' text fields: OpenAI's, then the extensions.
pub(crate) const KNOWN_EDIT: &[&str] = &[
    "model",
    "prompt",
    "n",
    "size",
    "quality",
    "response_format",
    "user",
    "safety_identifier",
    "output_format",
    "output_compression",
    "background",
    "moderation",
    "input_fidelity",
    "stream",
    "partial_images",
    "stream_progress",
    "seed",
    "steps",
    "strength",
    "guidance_scale",
    "negative_prompt",
    "loras",
];

/// `/v1/images/variations`' text fields: OpenAI's, then the extensions.
pub(crate) const KNOWN_VARIATION: &[&str] = &[
    "model",
    "n",
    "size",
    "response_format",
    "user",
    "safety_identifier",
    "quality",
    "output_format",
    "output_compression",
    "seed",
    "steps",
    "strength",
    "loras",
];

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
        const QUALITIES: [Quality; 8] = [
            Quality::Auto,
            Quality::Low,
            Quality::Medium,
            Quality::High,
            Quality::Xhigh,
            Quality::Max,
            Quality::Standard,
            Quality::Hd,
        ];
        Ok(self
            .choice(
                "quality",
                &[
                    "auto", "low", "medium", "high", "xhigh", "max", "standard", "hd",
                ],
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
        if self.sent("steps") && self.sent("num_inference_steps") {
            return Err(ApiError::invalid(
                "num_inference_steps",
                "Send one of 'steps' and 'num_inference_steps', not both.",
            ));
        }
        let steps = self.in_range("steps", 1, 1000)?;
        let nis = self.in_range("num_inference_steps", 1, 1000)?;
        Ok(steps.or(nis).map(|s| s as usize))
    }

    /// `loras`: a list of `{"name": ..., "scale": ...}` (scale 1 when left out), or of
    /// `"name"` / `"name:scale"` strings; a form sends that list as JSON or as
    /// `name:scale,name:scale`. Names, scales and the count are the model's rules'.
    fn loras(&self) -> Result<Vec<pictor_core::LoraRequest>, ApiError> {
        let invalid = |m: String| ApiError::invalid("loras", m);
        let shape = "expected a list of {\"name\": ..., \"scale\": ...} objects";
        let from_form;
        let list = match self.map().get("loras") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(Value::String(text)) if self.is_form() => {
                from_form = match serde_json::from_str::<Value>(text) {
                    Ok(Value::Array(items)) => items,
                    _ => text
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(|t| Value::String(t.to_string()))
                        .collect(),
                };
                &from_form
            }
            Some(_) => return Err(invalid(format!("Invalid 'loras': {shape}."))),
        };
        let mut loras = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let (name, scale) = match item {
                Value::String(s) => match s.rsplit_once(':') {
                    Some((name, scale)) => {
                        let scale = scale.trim().parse::<f64>().map_err(|_| {
                            invalid(format!("Invalid 'loras[{i}]': '{s}' is not name:scale."))
                        })?;
                        (name.trim().to_string(), scale)
                    }
                    None => (s.trim().to_string(), 1.0),
                },
                Value::Object(o) => {
                    if let Some(k) = o.keys().find(|k| !matches!(k.as_str(), "name" | "scale")) {
                        return Err(invalid(format!(
                            "Invalid 'loras[{i}]': unknown field '{k}'; a LoRA has a name and a scale."
                        )));
                    }
                    let name = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                        invalid(format!(
                            "Invalid 'loras[{i}]': missing its 'name' (a string)."
                        ))
                    })?;
                    let scale = match o.get("scale") {
                        None | Some(Value::Null) => 1.0,
                        Some(v) => v.as_f64().ok_or_else(|| {
                            invalid(format!("Invalid 'loras[{i}].scale': expected a number."))
                        })?,
                    };
                    (name.to_string(), scale)
                }
                _ => return Err(invalid(format!("Invalid 'loras[{i}]': {shape}."))),
            };
            loras.push(pictor_core::LoraRequest { name, scale });
        }
        Ok(loras)
    }

    /// `strength`: in (0, 1].
    fn strength(&self) -> Result<Option<f64>, ApiError> {
        match self.number("strength")? {
            Some(s) if !(s > 0.0 && s <= 1.0) => Err(ApiError::invalid(
                "strength",
                format!(
                    "Invalid 'strength': {s}; it must be greater than 0 and at most 1 (1 starts from noise, keeping only a mask's unmasked region)."
                ),
            )),
            s => Ok(s),
        }
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

/// Parses a generation's body (already checked to be JSON).
pub fn parse(body: &Value, limits: &BodyLimits) -> Result<ImageRequest, ApiError> {
    let Value::Object(map) = body else {
        return Err(ApiError::invalid_body(
            "The request body must be a JSON object.",
        ));
    };
    parse_fields(&Fields::json(map), Endpoint::Generations, limits, None)
}

/// Parses the text fields of an edit's or a variation's form; without a `model`, it goes
/// to `default_model`.
pub(crate) fn parse_form(
    fields: &Map<String, Value>,
    endpoint: Endpoint,
    limits: &BodyLimits,
    default_model: Option<&str>,
) -> Result<ImageRequest, ApiError> {
    parse_fields(&Fields::form(fields), endpoint, limits, default_model)
}

fn refuse_unknown(map: &Map<String, Value>, endpoint: Endpoint) -> Result<(), ApiError> {
    match map.keys().find(|k| !endpoint.known().contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::invalid(
            unknown,
            format!("Unrecognized request argument supplied: {unknown}"),
        )),
        None => Ok(()),
    }
}

fn parse_fields(
    f: &Fields<'_>,
    endpoint: Endpoint,
    limits: &BodyLimits,
    default_model: Option<&str>,
) -> Result<ImageRequest, ApiError> {
    refuse_unknown(f.map(), endpoint)?;
    let model = f
        .string("model")?
        .or(default_model)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("model", "You must provide a model parameter."))?
        .to_string();
    // A variation has no prompt: image to image of its input alone.
    let prompt = match endpoint {
        Endpoint::Variations => String::new(),
        Endpoint::Generations | Endpoint::Edits => f.prompt(limits.max_prompt_chars)?,
    };
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
    let input_fidelity = match f.choice("input_fidelity", &["low", "high"])? {
        Some(1) => InputFidelity::High,
        _ => InputFidelity::Low,
    };
    let stream = f.boolean("stream")?.unwrap_or(false);
    let partial_images = f.in_range("partial_images", 0, 3)?.unwrap_or(0) as usize;
    let stream_progress = f.boolean("stream_progress")?.unwrap_or(false);
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
        loras: f.loras()?,
        user: f
            .string("safety_identifier")?
            .or(f.string("user")?)
            .map(str::to_string),
        stream,
        partial_images,
        stream_progress,
        strength: f.strength()?,
        input_fidelity,
        endpoint,
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

    fn form(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect()
    }

    #[test]
    fn form_fields_arrive_as_text() {
        let r = parse_form(
            &form(&[
                ("prompt", "a cat"),
                ("n", " 2"),
                ("seed", "7"),
                ("stream", "true"),
                ("strength", "0.5"),
                ("input_fidelity", "high"),
                ("quality", "xhigh"),
            ]),
            Endpoint::Edits,
            &limits(),
            Some("first"),
        )
        .unwrap();
        assert_eq!((r.model.as_str(), r.n, r.seed), ("first", 2, Some(7)));
        assert_eq!(
            (r.stream, r.strength, r.size),
            (true, Some(0.5), Size::Auto)
        );
        assert_eq!(
            (r.input_fidelity, r.quality),
            (InputFidelity::High, Quality::Xhigh)
        );
        let v = parse_form(&form(&[]), Endpoint::Variations, &limits(), Some("m")).unwrap();
        assert_eq!((v.prompt.as_str(), v.endpoint), ("", Endpoint::Variations));
    }

    #[test]
    fn every_bad_form_field_names_its_param() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Endpoint, &'a str);
        let cases: &[Case] = &[
            (&[("prompt", "a"), ("n", "two")], Endpoint::Edits, "n"),
            (&[("prompt", "a"), ("n", "1.5")], Endpoint::Edits, "n"),
            (
                &[("prompt", "a"), ("stream", "yes")],
                Endpoint::Edits,
                "stream",
            ),
            (
                &[("prompt", "a"), ("strength", "0")],
                Endpoint::Edits,
                "strength",
            ),
            (
                &[("prompt", "a"), ("strength", "1.01")],
                Endpoint::Edits,
                "strength",
            ),
            (
                &[("prompt", "a"), ("strength", "NaN")],
                Endpoint::Edits,
                "strength",
            ),
            (&[("prompt", "")], Endpoint::Edits, "prompt"),
            (&[("prompt", "a"), ("size", "")], Endpoint::Edits, "size"),
            (&[("prompt", "a"), ("model", "")], Endpoint::Edits, "model"),
            (&[("n", "1")], Endpoint::Edits, "prompt"),
            (
                &[("prompt", "a"), ("style", "vivid")],
                Endpoint::Edits,
                "style",
            ),
            (&[("prompt", "a")], Endpoint::Variations, "prompt"),
            (&[("mask_image", "x")], Endpoint::Variations, "mask_image"),
            (
                &[("input_fidelity", "high")],
                Endpoint::Variations,
                "input_fidelity",
            ),
        ];
        for (fields, endpoint, param) in cases {
            match parse_form(&form(fields), *endpoint, &limits(), Some("m")) {
                Err(ApiError::Invalid { param: got, .. }) => {
                    assert_eq!(got.as_deref(), Some(*param), "{fields:?}")
                }
                other => panic!("{fields:?}: expected a 400, got {other:?}"),
            }
        }
        // JSON keeps its types: a generation's `strength` is unknown, its "2" no integer.
        assert_eq!(
            param_of(json!({"model": "m", "prompt": "a", "strength": 0.5})).as_deref(),
            Some("strength")
        );
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
