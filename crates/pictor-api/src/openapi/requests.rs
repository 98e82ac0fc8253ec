//! The documented request bodies and their enums. The bodies are parsed by hand in `wire`
//! so that every error names its `param`; tests keep each schema's fields and the parser's
//! list of known fields identical.

use utoipa::ToSchema;

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
    /// Extension: while streaming, also send `ProgressEvent`s (`pictor.progress`): the
    /// place in the queue while waiting, then each denoising step.
    pub stream_progress: Option<bool>,
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
    /// Extension: the guidance scale, 0 to 30, for models with a guidance input (FLUX.1-dev:
    /// default 3.5); refused (400) by models without one, such as FLUX.1-schnell (0 is taken
    /// as none there).
    pub guidance_scale: Option<f64>,
    /// Extension: refused (400) by models that cannot use it, such as FLUX.1-schnell.
    pub negative_prompt: Option<String>,
    /// Extension: LoRAs to add for this request, files of the server's LoRA folder listed
    /// in `/v1/models/{id}` (FLUX models); `"name"` or `"name:scale"` strings also work.
    /// An unknown name, or a LoRA made for another model, is a 400 on `loras`.
    #[schema(max_items = 8)]
    pub loras: Option<Vec<LoraChoice>>,
    /// Accepted and recorded nowhere (OpenAI's successor of `user`).
    pub safety_identifier: Option<String>,
}

/// `POST /v1/images/edits` form (`multipart/form-data`; numbers and booleans as text, an
/// empty field as absent).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct EditImageRequest {
    /// The image to edit: PNG, JPEG or WebP, at most `limits.max_upload_bytes` (16 MiB) and
    /// `limits.max_upload_pixels`. Also taken as `image[]`; one image (the models served
    /// take no reference images).
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    /// A PNG with alpha, the size of `image`: fully transparent (alpha 0) where the image
    /// should change. Also taken as `mask[]`.
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<Vec<u8>>,
    /// A configured model name or alias; the first model configured when absent.
    #[schema(min_length = 1)]
    pub model: Option<String>,
    /// Required; the same rules as a generation's `prompt`.
    pub prompt: String,
    /// Images to make, 1 to `limits.max_n`.
    #[schema(minimum = 1, maximum = 10)]
    pub n: Option<u32>,
    /// `WxH`, or `auto` (the default): the input's size brought to the model's sizes,
    /// aspect ratio kept as far as they allow. The input is resampled to it.
    #[schema(example = "1024x1024", pattern = "^(auto|[0-9]{1,9}x[0-9]{1,9})$")]
    pub size: Option<String>,
    /// Steps per model, as for generations (the edit runs `strength` of them).
    #[schema(value_type = Option<Quality>)]
    pub quality: Option<String>,
    /// `url` (default) or `b64_json`.
    #[schema(value_type = Option<ResponseFormat>)]
    pub response_format: Option<String>,
    /// Accepted and recorded nowhere.
    pub user: Option<String>,
    /// Accepted and recorded nowhere.
    pub safety_identifier: Option<String>,
    /// `png` (default), `jpeg` or `webp`.
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    /// 0 to 100: JPEG quality.
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// `auto` or `opaque` (`transparent` is refused).
    #[schema(value_type = Option<Background>)]
    pub background: Option<String>,
    /// Accepted, ignored.
    #[schema(value_type = Option<Moderation>)]
    pub moderation: Option<String>,
    /// `low` (default) or `high`: with `high`, the default `strength` is lower, so more of
    /// the input is kept (0.85 instead of 1 with a mask, 0.5 instead of 0.75 without).
    #[schema(value_type = Option<InputFidelity>)]
    pub input_fidelity: Option<String>,
    /// Server-sent events: `image_edit.partial_image` previews, then one
    /// `image_edit.completed` per image (the generation events' fields).
    pub stream: Option<bool>,
    /// 0 to 3 previews per image while streaming.
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u8>,
    /// Extension: while streaming, also send `pictor.progress` events.
    pub stream_progress: Option<bool>,
    /// Extension: seed of the first image, as for generations.
    #[schema(minimum = 0, maximum = 9_007_199_254_740_991_u64)]
    pub seed: Option<u64>,
    /// Extension: denoising steps of the schedule, 1 to the model's most.
    #[schema(minimum = 1, maximum = 1000)]
    pub steps: Option<u32>,
    /// Extension: how far from the input, above 0 to 1: the share of the steps that run
    /// (1 starts from noise). Default: 1 with a mask (the masked region is repainted), 0.75
    /// without; see `input_fidelity`.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
    /// Extension: the guidance scale, 0 to 30, for models with a guidance input (FLUX.1-dev:
    /// default 3.5); refused (400) by models without one (0 is taken as none there).
    pub guidance_scale: Option<f64>,
    /// Extension: refused (400) by models that cannot use it.
    pub negative_prompt: Option<String>,
    /// Extension: LoRAs to add, as a JSON list of `{"name", "scale"}` or as
    /// `name:scale,name:scale` (see the generation request).
    pub loras: Option<String>,
}

/// One LoRA a request adds.
#[allow(dead_code)]
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraChoice {
    /// The file's name in the server's LoRA folder, without `.safetensors`.
    #[schema(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
    pub name: String,
    /// Its weight, -10 to 10: 1 as trained (the default), 0 off, negative inverted.
    #[schema(minimum = -10.0, maximum = 10.0)]
    pub scale: Option<f64>,
}

/// `POST /v1/images/variations` form (`multipart/form-data`): image to image of the input
/// with an empty prompt.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct CreateVariationRequest {
    /// The image: PNG, JPEG or WebP, within the upload limits.
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    /// A configured model name or alias; the first model configured when absent.
    #[schema(min_length = 1)]
    pub model: Option<String>,
    /// Images to make, 1 to `limits.max_n`.
    #[schema(minimum = 1, maximum = 10)]
    pub n: Option<u32>,
    /// `WxH`, or `auto` (the default): the input's size brought to the model's sizes.
    #[schema(example = "1024x1024", pattern = "^(auto|[0-9]{1,9}x[0-9]{1,9})$")]
    pub size: Option<String>,
    /// `url` (default) or `b64_json`.
    #[schema(value_type = Option<ResponseFormat>)]
    pub response_format: Option<String>,
    /// Accepted and recorded nowhere.
    pub user: Option<String>,
    /// Accepted and recorded nowhere.
    pub safety_identifier: Option<String>,
    /// Extension: steps per model, as for generations.
    #[schema(value_type = Option<Quality>)]
    pub quality: Option<String>,
    /// Extension: `png` (default), `jpeg` or `webp`.
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    /// Extension: 0 to 100, JPEG quality.
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// Extension: seed of the first image.
    #[schema(minimum = 0, maximum = 9_007_199_254_740_991_u64)]
    pub seed: Option<u64>,
    /// Extension: denoising steps of the schedule.
    #[schema(minimum = 1, maximum = 1000)]
    pub steps: Option<u32>,
    /// Extension: how far from the input, above 0 to 1 (default 0.6).
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
    /// Extension: LoRAs to add, as for edits.
    pub loras: Option<String>,
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
    /// `xhigh` (gpt-image-2's name): as `high`, the model's default steps.
    Xhigh,
    /// `max` (gpt-image-2's name): as `high`, the model's default steps.
    Max,
    /// `standard` (dall-e-3's name).
    Standard,
    /// `hd` (dall-e-3's name).
    Hd,
}

/// `input_fidelity` of an edit: how much of the input the result keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum InputFidelity {
    /// The default: the edit may move further from the input.
    Low,
    /// Keeps more of the input (a lower default `strength`).
    High,
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
