//! What the API answers: images, usage, errors, models and stream events, serialized as
//! they are documented.

use serde::Serialize;
use utoipa::ToSchema;

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
    /// has no guidance input).
    pub guidance: Option<f64>,
    /// Extension: the model that drew it (its configured name, not an alias).
    pub model: String,
    /// Extension: a short hash of the model's weight files (first 10 hex digits of their
    /// SHA-256), once the server has computed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
    /// Extension, edits and variations: how far from the input the image went, in (0, 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Extension, edits and variations: the SHA-256 (hex) of the input image's file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_image_sha256: Option<String>,
    /// Extension: where it was drawn and in which dtype (`cpu f32`,
    /// `cuda:0 (NVIDIA H100 80GB HBM3) bf16`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Extension: the LoRAs applied, with their files' SHA-256 and scales.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraApplied>,
    /// Extension: where the time went.
    pub timings: Timings,
}

/// A LoRA as applied to an image.
#[derive(Serialize, ToSchema, Clone)]
pub struct LoraApplied {
    /// Its name (the file in the server's LoRA folder, without `.safetensors`).
    pub name: String,
    /// The SHA-256 (hex) of the file.
    pub sha256: String,
    /// Its scale.
    pub scale: f64,
}

/// A LoRA file a model can take.
#[derive(Serialize, ToSchema, Clone)]
pub struct LoraFile {
    /// The name requests give in `loras`.
    pub name: String,
    /// Its size on disk.
    pub bytes: u64,
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
/// tokens that carry the prompt (end-of-text included, padding not) and, for an edit, the
/// input image's tokens (one per 16×16 pixels, as the transformer sees it); output tokens
/// are the transformer's image tokens, one per 16×16 pixels of each image.
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
    /// `text` and `image` tokens in, `output` image tokens out.
    pub fn new(text: u64, image: u64, output: u64) -> Self {
        Self {
            input_tokens: text + image,
            input_tokens_details: TokenDetails {
                text_tokens: text,
                image_tokens: image,
            },
            output_tokens: output,
            output_tokens_details: TokenDetails {
                text_tokens: 0,
                image_tokens: output,
            },
            total_tokens: text + image + output,
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
    /// Where it runs and in which dtype (`cpu f32`, `cuda:0 (NVIDIA H100 80GB HBM3) bf16`),
    /// once loaded on this node (a Pictor extension; absent where workers run it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// What the model accepts, once loaded (a Pictor extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<ModelRulesView>,
    /// The LoRAs requests may add (`loras`), for a model that takes them (a Pictor
    /// extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loras: Option<Vec<LoraFile>>,
}

/// What a model accepts: the sizes it draws, its steps, which inputs apply.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelRulesView {
    /// The model family its weights make (`FLUX.1-schnell`, `FLUX.1-dev`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub family: String,
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
    /// The guidance scale a request without one runs at, where `guidance_scale` applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_guidance: Option<f64>,
    /// Whether `negative_prompt` applies.
    pub negative_prompt: bool,
    /// Whether `loras` applies.
    pub loras: bool,
}

impl From<&pictor_core::ModelRules> for ModelRulesView {
    fn from(r: &pictor_core::ModelRules) -> Self {
        Self {
            family: r.family.clone(),
            default_size: r.default_size.to_string(),
            min_side: r.min_side,
            max_side: r.max_side,
            size_multiple: r.multiple,
            max_pixels: r.max_pixels,
            default_steps: r.default_steps,
            max_steps: r.max_steps,
            guidance: r.takes_guidance(),
            default_guidance: r.default_guidance,
            negative_prompt: r.takes_negative_prompt,
            loras: r.takes_loras,
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
    /// Where it runs: `cpu` or `cuda:0 (NVIDIA H100 80GB HBM3)` (a model too big for its
    /// GPU keeps T5 on the CPU).
    pub device: String,
}

impl From<&pictor_core::PartMemory> for ModelPart {
    fn from(p: &pictor_core::PartMemory) -> Self {
        Self {
            part: p.part.to_string(),
            bytes: p.bytes,
            storage: p.storage.clone(),
            resident: p.resident,
            device: p.device.clone(),
        }
    }
}

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

/// Extension, with `stream_progress: true`: where a streamed job has got to.
#[derive(Serialize, ToSchema)]
pub struct ProgressEvent {
    /// `pictor.progress`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Jobs ahead of it in the model's queue while it waits (about: jobs set aside for
    /// another batch may overtake; a cluster counts the jobs of that model queued before
    /// it on every API node); `null` once it runs.
    pub queue_position: Option<usize>,
    /// Denoising steps finished (of the images denoised together now).
    pub step: usize,
    /// Steps to run; 0 until it runs.
    pub total: usize,
}

/// `GET /v1/models`.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// Models and aliases.
    pub data: Vec<Model>,
}
