//! The OpenAPI document, generated from the wire types (`GET /openapi.json`,
//! `pictor openapi`). The request body is parsed by hand in `wire.rs` so that every error
//! names its `param`; a test keeps [`CreateImageRequest`]'s fields and the parser's list of
//! known fields identical.

use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

/// `POST /v1/images/generations` body. `null` for any optional field means its default.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct CreateImageRequest {
    /// A configured model name or alias.
    #[schema(min_length = 1)]
    pub model: String,
    /// 1 to 8192 characters (`limits.max_prompt_chars`), not all blank; no control
    /// characters but newline, carriage return and tab.
    #[schema(
        min_length = 1,
        max_length = 8192,
        pattern = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F]*[^\s\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F][^\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F]*$"
    )]
    pub prompt: String,
    /// Images to generate, 1 to `limits.max_n` (default 1, at most 10 by default).
    #[schema(minimum = 1, maximum = 10)]
    pub n: Option<u32>,
    /// `WxH` (on the model's grid and within its sizes: see `/v1/models`) or `auto`.
    #[schema(example = "1024x1024", pattern = "^(auto|[0-9]{1,9}x[0-9]{1,9})$")]
    pub size: Option<String>,
    /// Steps per model (low ½, medium ¾ of the default).
    #[schema(value_type = Option<Quality>)]
    pub quality: Option<String>,
    /// `url` (default) or `b64_json`.
    #[schema(value_type = Option<ResponseFormat>)]
    pub response_format: Option<String>,
    /// Accepted and recorded nowhere.
    pub user: Option<String>,
    /// Accepted, ignored.
    #[schema(value_type = Option<Style>)]
    pub style: Option<String>,
    /// `png` (default), `jpeg` or `webp`.
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    /// 0 to 100: JPEG quality (WebP is lossless).
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// `auto` or `opaque` (`transparent` is refused).
    #[schema(value_type = Option<Background>)]
    pub background: Option<String>,
    /// Accepted, ignored.
    #[schema(value_type = Option<Moderation>)]
    pub moderation: Option<String>,
    /// Answer with server-sent events (`text/event-stream`): `image_generation.partial_image`
    /// previews, then one `image_generation.completed` per image. See [`PartialImageEvent`]
    /// and [`CompletedEvent`].
    pub stream: Option<bool>,
    /// 0 to 3 previews per image while streaming (ignored otherwise); fewer come when the
    /// run has fewer steps than `partial_images + 1`.
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u8>,
    /// Extension: seed of the first image; image `i` uses `seed + i`, which must stay
    /// within 2^53 − 1, the largest integer a JSON number carries exactly.
    #[schema(minimum = 0, maximum = 9_007_199_254_740_991_u64)]
    pub seed: Option<u64>,
    /// Extension: denoising steps, 1 to the model's most (see `/v1/models`).
    #[schema(minimum = 1, maximum = 1000)]
    pub steps: Option<u32>,
    /// Extension: alias of `steps`.
    #[schema(minimum = 1, maximum = 1000)]
    pub num_inference_steps: Option<u32>,
    /// Extension: refused (400) by models without a guidance input, such as FLUX.1-schnell.
    pub guidance_scale: Option<f64>,
    /// Extension: refused (400) by models that cannot use it, such as FLUX.1-schnell.
    pub negative_prompt: Option<String>,
}

/// `quality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Quality {
    /// `auto` (the default).
    Auto,
    /// `low`.
    Low,
    /// `medium`.
    Medium,
    /// `high`.
    High,
    /// `standard` (dall-e-3's name).
    Standard,
    /// `hd` (dall-e-3's name).
    Hd,
}

/// `response_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// A signed link to the stored image (the default).
    Url,
    /// The image inline, base64.
    B64Json,
}

/// `output_format`.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

/// `style`.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Style {
    Vivid,
    Natural,
}

/// `background`: `transparent` is refused.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Background {
    Auto,
    Opaque,
}

/// `moderation`.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Moderation {
    Auto,
    Low,
}

/// One image of a response: `url` or `b64_json`, never both.
#[derive(Serialize, ToSchema)]
pub struct ImageData {
    /// Signed link, valid for `image_ttl_secs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The encoded image, raw base64 (no `data:` prefix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// The prompt text the encoder really saw (after truncation).
    pub revised_prompt: String,
    /// Extension: whether the prompt was cut to fit the text encoder.
    pub prompt_truncated: bool,
    /// Extension: this image's seed (`seed + i` for image `i`); send it back to reproduce it.
    pub seed: u64,
    /// Extension: denoising steps run.
    pub steps: u32,
    /// Extension: width in pixels.
    pub width: u32,
    /// Extension: height in pixels.
    pub height: u32,
    /// Extension: the guidance scale used; `null` for models that take none (FLUX.1-schnell
    /// is guidance-distilled).
    pub guidance: Option<f64>,
    /// Extension: the model that drew it (its configured name, not an alias).
    pub model: String,
    /// Extension: a short hash of the model's weight files (first 10 hex digits of their
    /// SHA-256), once the server has computed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
    /// Extension: where the time went.
    pub timings: Timings,
}

/// Seconds spent on a request. The phases are those of the batch the request ran in
/// (requests of the same size and steps that waited together run as one batch).
#[derive(Serialize, ToSchema, Clone, Copy)]
pub struct Timings {
    /// Waiting in the model's queue.
    pub queue_seconds: f64,
    /// Running the text encoders.
    pub encode_seconds: f64,
    /// Denoising (including decoding previews when streaming).
    pub denoise_seconds: f64,
    /// Decoding the final latents to pixels.
    pub decode_seconds: f64,
    /// The whole run on the model's worker: encode, denoise and decode.
    pub generation_seconds: f64,
}

/// Token counts, as OpenAI reports them. For an image model: input tokens are the T5
/// tokens that carry the prompt (end-of-text included, padding not); output tokens are the
/// transformer's image tokens, one per 16×16 pixels of each image.
#[derive(Serialize, ToSchema)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Their kinds (all text here).
    pub input_tokens_details: TokenDetails,
    /// Image tokens generated.
    pub output_tokens: u64,
    /// Their kinds (all image here).
    pub output_tokens_details: TokenDetails,
    /// Input plus output.
    pub total_tokens: u64,
}

impl Usage {
    /// `input` text tokens in and `output` image tokens out.
    pub fn new(input: u64, output: u64) -> Self {
        Self {
            input_tokens: input,
            input_tokens_details: TokenDetails {
                text_tokens: input,
                image_tokens: 0,
            },
            output_tokens: output,
            output_tokens_details: TokenDetails {
                text_tokens: 0,
                image_tokens: output,
            },
            total_tokens: input + output,
        }
    }
}

/// Tokens by kind.
#[derive(Serialize, ToSchema)]
pub struct TokenDetails {
    /// Text tokens.
    pub text_tokens: u64,
    /// Image tokens.
    pub image_tokens: u64,
}

/// `POST /v1/images/generations` response.
#[derive(Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: i64,
    /// The images, in seed order.
    pub data: Vec<ImageData>,
    /// `png` | `jpeg` | `webp`.
    pub output_format: &'static str,
    /// `WxH`.
    pub size: String,
    /// `low` | `medium` | `high`, from the steps run.
    pub quality: &'static str,
    /// Tokens in and out.
    pub usage: Usage,
}

/// The error object.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, if one.
    pub param: Option<String>,
    /// A machine-readable code (`invalid_api_key`, `model_not_found`, `queue_full`, ...).
    pub code: Option<&'static str>,
}

/// Every error response: `{"error": {...}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// One entry of `GET /v1/models`.
#[derive(Serialize, ToSchema)]
pub struct Model {
    /// The name clients send.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    /// Always `pictor`.
    pub owned_by: &'static str,
    /// For an alias, the model it reaches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias_of: Option<String>,
    /// Whether the model has loaded.
    pub ready: bool,
    /// A short hash of its weight files, once computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Memory per part once loaded (a Pictor extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Vec<ModelPart>>,
    /// What the model accepts, once loaded (a Pictor extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<ModelRulesView>,
}

/// What a model accepts: the sizes it draws, its steps, which inputs apply.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelRulesView {
    /// The size of `size: auto`, `WxH`.
    pub default_size: String,
    /// Smallest side in pixels.
    pub min_side: usize,
    /// Largest side in pixels.
    pub max_side: usize,
    /// Sides are multiples of this.
    pub size_multiple: usize,
    /// Most pixels per image.
    pub max_pixels: usize,
    /// Steps of `quality: auto` and `high`.
    pub default_steps: usize,
    /// Most steps a request may ask for.
    pub max_steps: usize,
    /// Whether `guidance_scale` applies.
    pub guidance: bool,
    /// Whether `negative_prompt` applies.
    pub negative_prompt: bool,
}

impl From<&pictor_core::ModelRules> for ModelRulesView {
    fn from(r: &pictor_core::ModelRules) -> Self {
        Self {
            default_size: r.default_size.to_string(),
            min_side: r.min_side,
            max_side: r.max_side,
            size_multiple: r.multiple,
            max_pixels: r.max_pixels,
            default_steps: r.default_steps,
            max_steps: r.max_steps,
            guidance: r.takes_guidance,
            negative_prompt: r.takes_negative_prompt,
        }
    }
}

/// One part of a loaded model and the memory it takes.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelPart {
    /// `transformer`, `t5`, `clip` or `vae`.
    pub part: String,
    /// Bytes in memory (estimated from the files at load).
    pub bytes: u64,
    /// How the weights are held: GGUF types by share of parameters (`Q4_K 95.1%, F16 4.4%`)
    /// or the compute dtype (`f32 (stored BF16 100.0%)`).
    pub storage: String,
    /// Whether it stays loaded between requests (false: loaded per request, because the
    /// whole model exceeds the memory budget).
    pub resident: bool,
}

impl From<&pictor_core::PartMemory> for ModelPart {
    fn from(p: &pictor_core::PartMemory) -> Self {
        Self {
            part: p.part.to_string(),
            bytes: p.bytes,
            storage: p.storage.clone(),
            resident: p.resident,
        }
    }
}

/// `GET /v1/models`.
/// `image_generation.partial_image`: a preview of one image while it denoises, sent as
/// `event: image_generation.partial_image` with this object as `data`.
#[derive(Serialize, ToSchema)]
pub struct PartialImageEvent {
    /// `image_generation.partial_image`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The preview, encoded in `output_format`, raw base64.
    pub b64_json: String,
    /// Always `opaque`.
    pub background: &'static str,
    /// Unix seconds when the request was accepted.
    pub created_at: i64,
    /// `png` | `jpeg` | `webp`.
    pub output_format: &'static str,
    /// 0-based index of this preview among its image's previews.
    pub partial_image_index: usize,
    /// `low` | `medium` | `high`, from the steps run.
    pub quality: &'static str,
    /// `WxH`.
    pub size: String,
    /// Extension: which image of the request it previews (`0..n`).
    pub image_index: usize,
    /// Extension: denoising steps finished when it was taken.
    pub step: usize,
}

/// `image_generation.completed`: one finished image (one event per image, in order), with
/// every receipt field of [`ImageData`] except `url`.
#[derive(Serialize, ToSchema)]
pub struct CompletedEvent {
    /// `image_generation.completed`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always `opaque`.
    pub background: &'static str,
    /// Unix seconds when the request was accepted.
    pub created_at: i64,
    /// `png` | `jpeg` | `webp`.
    pub output_format: &'static str,
    /// `low` | `medium` | `high`, from the steps run.
    pub quality: &'static str,
    /// `WxH`.
    pub size: String,
    /// This image's share of the request's tokens: the prompt's input tokens are counted on
    /// image 0 only, so the events' usages add up to the request's.
    pub usage: Usage,
    /// Extension: which image of the request this is (`0..n`).
    pub image_index: usize,
    /// The image and its receipt (`b64_json` always; no `url`).
    #[serde(flatten)]
    pub image: ImageData,
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// Models and aliases.
    pub data: Vec<Model>,
}

#[utoipa::path(post, path = "/v1/images/generations", request_body = CreateImageRequest,
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Same key and body from the same API key: one job, the same response replayed (24 h by default); another body: 409.")),
    responses(
        (status = 200, description = "JSON; with `stream: true`, server-sent events: `image_generation.partial_image` (PartialImageEvent) previews, then one `image_generation.completed` (CompletedEvent) per image. A failure after the stream began arrives as `event: error` with `{\"type\": \"error\", \"error\": {...}}`.",
            content((ImagesResponse = "application/json"), (CompletedEvent = "text/event-stream"))),
        (status = 400, description = "Invalid request; `param` names the field", body = ErrorResponse),
        (status = 401, description = "Missing, malformed, unknown or revoked key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 405, description = "Another method than POST", body = ErrorResponse),
        (status = 408, description = "The body did not arrive within `limits.body_timeout_secs`", body = ErrorResponse),
        (status = 409, description = "Idempotency-Key reused with another body", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 415, description = "Not JSON", body = ErrorResponse),
        (status = 429, description = "Queue full (`queue_full`) or the key's rate limit (`rate_limit_exceeded`, with x-ratelimit-* headers); see Retry-After", body = ErrorResponse),
        (status = 500, body = ErrorResponse),
        (status = 503, description = "Loading or shutting down", body = ErrorResponse),
        (status = 504, description = "Past the server's deadline", body = ErrorResponse),
    ))]
#[allow(dead_code)]
fn create_image() {}

#[utoipa::path(get, path = "/v1/images/files/{name}",
    params(("name" = String, Path), ("expires" = i64, Query), ("signature" = String, Query)),
    responses((status = 200, description = "The image bytes", content_type = "image/*"),
               (status = 400, description = "`expires` is not an integer", body = ErrorResponse),
               (status = 404, description = "Invalid, tampered or expired link", body = ErrorResponse)))]
#[allow(dead_code)]
fn image_file() {}

#[utoipa::path(get, path = "/v1/models", security(("bearer" = [])),
    responses((status = 200, body = ModelList), (status = 401, description = "Missing, malformed, unknown or revoked key", body = ErrorResponse)))]
#[allow(dead_code)]
fn list_models() {}

#[utoipa::path(get, path = "/v1/models/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Model),
        (status = 401, description = "Missing, malformed, unknown or revoked key", body = ErrorResponse),
        (status = 404, body = ErrorResponse)))]
#[allow(dead_code)]
fn get_model() {}

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(title = "Pictor", description = "OpenAI-compatible image generation."),
    paths(create_image, image_file, list_models, get_model),
    components(schemas(PartialImageEvent)),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON.
pub fn json() -> String {
    json_for(DEFAULT_MAX_N, DEFAULT_MAX_PROMPT_CHARS)
}

/// The limits the committed document states: the configuration's defaults.
const DEFAULT_MAX_N: usize = 10;
const DEFAULT_MAX_PROMPT_CHARS: usize = 8192;

/// The document for a server whose limits are `max_n` images and `max_prompt_chars`
/// characters, as `GET /openapi.json` serves it.
pub fn json_for(max_n: usize, max_prompt_chars: usize) -> String {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    for (pointer, value) in [
        (
            "/components/schemas/CreateImageRequest/properties/n/maximum",
            max_n,
        ),
        (
            "/components/schemas/CreateImageRequest/properties/prompt/maxLength",
            max_prompt_chars,
        ),
    ] {
        if let Some(slot) = doc.pointer_mut(pointer) {
            *slot = value.into();
        }
    }
    // What the derive cannot say: `steps` and its alias are never sent together, and no
    // other field is taken.
    if let Some(request) = doc.pointer_mut("/components/schemas/CreateImageRequest")
        && let Some(request) = request.as_object_mut()
    {
        // Unknown fields are refused, as OpenAI refuses them.
        request.insert("additionalProperties".into(), false.into());
        request.insert(
            "not".into(),
            serde_json::json!({"required": ["steps", "num_inference_steps"]}),
        );
    }
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_request_fields_are_exactly_the_parsed_ones() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let props = doc["components"]["schemas"]["CreateImageRequest"]["properties"]
            .as_object()
            .expect("schema");
        let mut documented: Vec<&str> = props.keys().map(String::as_str).collect();
        let mut parsed = crate::wire::KNOWN.to_vec();
        documented.sort_unstable();
        parsed.sort_unstable();
        assert_eq!(documented, parsed);
    }

    #[test]
    fn committed_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed.trim() == json().trim(),
            "docs/openapi.json is stale: run `cargo run -p pictor -- openapi > docs/openapi.json`"
        );
    }
}
