//! The OpenAPI document, generated from the wire types (`GET /openapi.json`,
//! `pictor openapi`): the request schemas (`requests`), the responses (`responses`) and the
//! routes (here). Requests are parsed by hand in `wire` so that every error names its
//! `param`; a test keeps each request schema's fields and the parser's known fields
//! identical.

mod requests;
mod responses;

use utoipa::OpenApi;

pub use self::{requests::*, responses::*};

#[utoipa::path(post, path = "/v1/images/generations", request_body = CreateImageRequest,
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Same key and body from the same API key: one job, the same response replayed (24 h by default); another body: 409.")),
    responses(
        (status = 200, description = "JSON; with `stream: true`, server-sent events: `image_generation.partial_image` (PartialImageEvent) previews, then one `image_generation.completed` (CompletedEvent) per image; with the extension `stream_progress: true` also `pictor.progress` (ProgressEvent) events. A failure after the stream began arrives as `event: error` with `{\"type\": \"error\", \"error\": {...}}`.",
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

#[utoipa::path(post, path = "/v1/images/edits",
    request_body(content = EditImageRequest, content_type = "multipart/form-data"),
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Same key and form (the files by their SHA-256) from the same API key: one job, the same response replayed; another form: 409.")),
    responses(
        (status = 200, description = "JSON as for generations, each image with `strength` and `input_image_sha256`; with `stream: true`, server-sent events `image_edit.partial_image` then one `image_edit.completed` per image.",
            content((ImagesResponse = "application/json"), (CompletedEvent = "text/event-stream"))),
        (status = 400, description = "Invalid request; `param` names the field (`image`, `mask`, ...)", body = ErrorResponse),
        (status = 401, description = "Missing, malformed, unknown or revoked key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 405, description = "Another method than POST", body = ErrorResponse),
        (status = 408, description = "The body did not arrive within `limits.upload_timeout_secs`", body = ErrorResponse),
        (status = 409, description = "Idempotency-Key reused with another form", body = ErrorResponse),
        (status = 413, description = "A file over `limits.max_upload_bytes` (`param` names it) or a body over `limits.max_upload_request_bytes`", body = ErrorResponse),
        (status = 415, description = "Not multipart/form-data", body = ErrorResponse),
        (status = 429, description = "Queue full or the key's rate limit; see Retry-After", body = ErrorResponse),
        (status = 500, body = ErrorResponse),
        (status = 503, description = "Loading, shutting down, or receiving `limits.max_concurrent_uploads` uploads already", body = ErrorResponse),
        (status = 504, description = "Past the server's deadline", body = ErrorResponse),
    ))]
#[allow(dead_code)]
fn edit_image() {}

#[utoipa::path(post, path = "/v1/images/variations",
    request_body(content = CreateVariationRequest, content_type = "multipart/form-data"),
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "As for edits.")),
    responses(
        (status = 200, description = "JSON as for generations, each image with `strength` and `input_image_sha256`.", body = ImagesResponse),
        (status = 400, description = "Invalid request; `param` names the field", body = ErrorResponse),
        (status = 401, description = "Missing, malformed, unknown or revoked key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 405, description = "Another method than POST", body = ErrorResponse),
        (status = 408, description = "The body did not arrive within `limits.upload_timeout_secs`", body = ErrorResponse),
        (status = 409, description = "Idempotency-Key reused with another form", body = ErrorResponse),
        (status = 413, description = "A file or the body over the upload limits", body = ErrorResponse),
        (status = 415, description = "Not multipart/form-data", body = ErrorResponse),
        (status = 429, description = "Queue full or the key's rate limit; see Retry-After", body = ErrorResponse),
        (status = 500, body = ErrorResponse),
        (status = 503, description = "Loading, shutting down, or too many uploads at once", body = ErrorResponse),
        (status = 504, description = "Past the server's deadline", body = ErrorResponse),
    ))]
#[allow(dead_code)]
fn create_variation() {}

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
    paths(create_image, edit_image, create_variation, image_file, list_models, get_model),
    components(schemas(PartialImageEvent, ProgressEvent)),
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
    let schemas = "/components/schemas";
    // An edit's prompt follows a generation's rules, written once.
    let prompt = doc
        .pointer(&format!("{schemas}/CreateImageRequest/properties/prompt"))
        .cloned();
    if let (Some(prompt), Some(slot)) = (
        prompt,
        doc.pointer_mut(&format!("{schemas}/EditImageRequest/properties/prompt")),
    ) {
        let description = slot.get("description").cloned();
        *slot = prompt;
        if let (Some(d), Some(slot)) = (description, slot.as_object_mut()) {
            slot.insert("description".into(), d);
        }
    }
    for request in REQUESTS {
        for (field, key, value) in [
            ("n", "maximum", max_n),
            ("prompt", "maxLength", max_prompt_chars),
        ] {
            if let Some(slot) =
                doc.pointer_mut(&format!("{schemas}/{request}/properties/{field}/{key}"))
            {
                *slot = value.into();
            }
        }
        let Some(schema) = doc
            .pointer_mut(&format!("{schemas}/{request}"))
            .and_then(|s| s.as_object_mut())
        else {
            continue;
        };
        // What the derive cannot say: no other field is taken (unknown fields are refused,
        // as OpenAI refuses them) and a body never sends `steps` and its alias together.
        schema.insert("additionalProperties".into(), false.into());
        if request == "CreateImageRequest" {
            schema.insert(
                "not".into(),
                serde_json::json!({"required": ["steps", "num_inference_steps"]}),
            );
        } else {
            // A form has no null: an optional field is absent or empty.
            without_null(schema);
        }
    }
    // The Idempotency-Key header as the server takes it: 1 to 255 visible ASCII
    // characters, no leading or trailing space.
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for param in paths
            .values_mut()
            .filter_map(|p| p.get_mut("post"))
            .filter_map(|op| op.get_mut("parameters"))
            .filter_map(|ps| ps.as_array_mut())
            .flatten()
            .filter(|p| p["name"] == "Idempotency-Key")
        {
            param["schema"] = serde_json::json!({
                "type": "string",
                "pattern": "^[!-~]([ -~]{0,253}[!-~])?$",
            });
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Makes every property of a form's schema non-nullable.
fn without_null(schema: &mut serde_json::Map<String, serde_json::Value>) {
    let Some(props) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for prop in props.values_mut() {
        // `oneOf: [null, X]` (an optional enum) becomes X.
        if let Some(choices) = prop.get_mut("oneOf").and_then(|o| o.as_array_mut()) {
            choices.retain(|c| c.get("type").is_none_or(|t| t != "null"));
            if let [only] = choices.as_slice() {
                *prop = only.clone();
            }
        }
        if let Some(types) = prop.get_mut("type").and_then(|t| t.as_array_mut()) {
            types.retain(|t| t != "null");
            if let [only] = types.as_slice() {
                let only = only.clone();
                prop["type"] = only;
            }
        }
    }
}

/// The request schemas, each a body or form the server parses.
const REQUESTS: [&str; 3] = [
    "CreateImageRequest",
    "EditImageRequest",
    "CreateVariationRequest",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_request_fields_are_exactly_the_parsed_ones() {
        use crate::wire::Endpoint;
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        for (schema, endpoint, files) in [
            ("CreateImageRequest", Endpoint::Generations, &[][..]),
            ("EditImageRequest", Endpoint::Edits, &["image", "mask"][..]),
            (
                "CreateVariationRequest",
                Endpoint::Variations,
                &["image"][..],
            ),
        ] {
            let props = doc["components"]["schemas"][schema]["properties"]
                .as_object()
                .expect("schema");
            let mut documented: Vec<&str> = props.keys().map(String::as_str).collect();
            let mut parsed = endpoint.known().to_vec();
            parsed.extend_from_slice(files);
            documented.sort_unstable();
            parsed.sort_unstable();
            assert_eq!(documented, parsed, "{schema}");
        }
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
