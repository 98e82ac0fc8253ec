//! The `multipart/form-data` body of `/v1/images/edits` and `/v1/images/variations`: its
//! files (`image` or `image[]`, several allowed; `mask` or `mask[]`, one) and its text
//! fields, each bounded. The fields are parsed by [`super::parse_form`]; the files are
//! decoded by the generation flow.

use axum::{
    body::Bytes,
    http::{HeaderMap, header},
};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// What an upload may be.
#[derive(Debug, Clone)]
pub struct UploadLimits {
    /// Largest file, bytes (OpenAI's limit for GPT image models is 50 MB a request).
    pub max_file_bytes: usize,
    /// Largest edit or variation request, files and fields together, bytes.
    pub max_request_bytes: usize,
    /// Most images in one edit (OpenAI takes 16).
    pub max_images: usize,
    /// Most pixels an uploaded image may declare; larger ones are refused from their header.
    pub max_pixels: u64,
    /// Longest side an uploaded image may declare.
    pub max_side: u32,
    /// Time to send an upload's body once its headers arrived (uploads are larger than
    /// other bodies, so they get longer than `connections.body_timeout`).
    pub body_timeout: std::time::Duration,
    /// Upload bodies received at once; one more is answered 503 (each is held in memory,
    /// up to `max_request_bytes`, while it arrives).
    pub max_concurrent: usize,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 16 << 20,
            max_request_bytes: 50 << 20,
            max_images: 16,
            max_pixels: 40_000_000,
            max_side: 16_384,
            body_timeout: std::time::Duration::from_secs(120),
            max_concurrent: 8,
        }
    }
}

/// Longest text field; a prompt of 8192 four-byte characters fits many times.
const MAX_TEXT_BYTES: usize = 256 << 10;

/// A read form: text fields by name, then the files.
#[derive(Debug, Default)]
pub(crate) struct Form {
    /// Text fields, each a JSON string (or `null` for none), for [`super::parse_form`].
    pub fields: Map<String, Value>,
    /// `image` / `image[]` files, in order.
    pub images: Vec<Bytes>,
    /// The `mask` / `mask[]` file.
    pub mask: Option<Bytes>,
}

/// Which file a field holds, if a file field: `image`, `image[]`, `image[0]`... or the
/// same of `mask`.
fn file_kind(name: &str) -> Option<&'static str> {
    let base = match name.find('[') {
        Some(i)
            if name.ends_with(']')
                && name[i + 1..name.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
        {
            &name[..i]
        }
        Some(_) => return None,
        None => name,
    };
    match base {
        "image" => Some("image"),
        "mask" => Some("mask"),
        _ => None,
    }
}

fn is_multipart(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = value.split(';').next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    multer::parse_boundary(value).ok()
}

fn text_too_long(name: &str) -> ApiError {
    ApiError::invalid(
        name,
        format!("Invalid '{name}': longer than {MAX_TEXT_BYTES} bytes."),
    )
}

fn read_error(e: multer::Error, limits: &UploadLimits) -> ApiError {
    match e {
        multer::Error::FieldSizeExceeded { field_name, .. } => {
            let param = field_name.unwrap_or_default();
            if file_kind(&param).is_some() {
                ApiError::FileTooLarge {
                    param,
                    limit: limits.max_file_bytes,
                }
            } else {
                text_too_long(&param)
            }
        }
        multer::Error::StreamSizeExceeded { .. } => {
            ApiError::PayloadTooLarge(limits.max_request_bytes)
        }
        other => ApiError::invalid_body(format!(
            "Could not read the multipart/form-data body: {other}."
        )),
    }
}

/// Reads a whole form from `body`, sent with `headers`: 415 when it is not
/// `multipart/form-data`, 413 past a limit (naming the file), 400 for a malformed body, a
/// repeated text field, a second mask, a file in a text field or too many images.
pub(crate) async fn read(
    headers: &HeaderMap,
    body: Bytes,
    limits: &UploadLimits,
) -> Result<Form, ApiError> {
    let boundary = is_multipart(headers).ok_or(ApiError::UnsupportedMediaType(
        "multipart/form-data (with a boundary)",
    ))?;
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .whole_stream(limits.max_request_bytes as u64)
            .per_field(limits.max_file_bytes as u64),
    );
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut form = Form::default();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| read_error(e, limits))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let has_file = field.file_name().is_some();
        let Some(kind) = file_kind(&name) else {
            if has_file {
                return Err(ApiError::invalid(
                    &name,
                    format!(
                        "Unexpected file in '{name}': only 'image' (or 'image[]') and 'mask' take files."
                    ),
                ));
            }
            let text = field.bytes().await.map_err(|e| read_error(e, limits))?;
            if text.len() > MAX_TEXT_BYTES {
                return Err(text_too_long(&name));
            }
            let text = String::from_utf8(text.to_vec()).map_err(|_| {
                ApiError::invalid(&name, format!("Invalid '{name}': not UTF-8 text."))
            })?;
            if form
                .fields
                .insert(name.clone(), Value::String(text))
                .is_some()
            {
                return Err(ApiError::invalid(
                    &name,
                    format!("'{name}' was sent more than once; send it once."),
                ));
            }
            continue;
        };
        let bytes = field.bytes().await.map_err(|e| read_error(e, limits))?;
        if kind == "mask" {
            if form.mask.is_some() {
                return Err(ApiError::invalid(
                    "mask",
                    "More than one mask was sent; send one, for the first image.",
                ));
            }
            form.mask = Some(bytes);
        } else {
            if form.images.len() == limits.max_images {
                return Err(ApiError::invalid(
                    "image",
                    format!(
                        "Too many images: at most {} per request.",
                        limits.max_images
                    ),
                ));
            }
            form.images.push(bytes);
        }
    }
    Ok(form)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> (HeaderMap, Bytes) {
        let mut out = Vec::new();
        for (name, file, data) in parts {
            out.extend_from_slice(b"--XyZ\r\n");
            let disposition = match file {
                Some(f) => format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n"
                ),
                None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
            };
            out.extend_from_slice(disposition.as_bytes());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=XyZ".parse().unwrap(),
        );
        (headers, Bytes::from(out))
    }

    fn limits() -> UploadLimits {
        UploadLimits {
            max_file_bytes: 100,
            max_request_bytes: 1000,
            max_images: 2,
            ..UploadLimits::default()
        }
    }

    async fn param_of(parts: &[(&str, Option<&str>, &[u8])]) -> (u16, Option<String>) {
        use axum::response::IntoResponse;
        let (h, b) = body(parts);
        let e = read(&h, b, &limits()).await.unwrap_err();
        let param = match &e {
            ApiError::Invalid { param, .. } => param.clone(),
            ApiError::FileTooLarge { param, .. } => Some(param.clone()),
            _ => None,
        };
        (e.into_response().status().as_u16(), param)
    }

    #[tokio::test]
    async fn files_and_fields_are_read_under_either_name() {
        let (h, b) = body(&[
            ("model", None, b"m"),
            ("n", None, b"2"),
            ("image[]", Some("a.png"), b"one"),
            ("image", Some("b.png"), b"two"),
            ("mask[]", Some("m.png"), b"mask"),
        ]);
        let form = read(&h, b, &limits()).await.unwrap();
        assert_eq!(form.fields["n"], "2");
        assert_eq!(
            form.images.iter().map(|b| &b[..]).collect::<Vec<_>>(),
            [&b"one"[..], b"two"]
        );
        assert_eq!(&form.mask.unwrap()[..], b"mask");
    }

    #[tokio::test]
    async fn every_bound_is_named() {
        let big = [0u8; 101];
        assert_eq!(
            param_of(&[("image", Some("a.png"), &big)]).await,
            (413, Some("image".into()))
        );
        assert_eq!(
            param_of(&[
                ("mask", Some("a.png"), b"x"),
                ("mask[]", Some("b.png"), b"y")
            ])
            .await,
            (400, Some("mask".into()))
        );
        assert_eq!(
            param_of(&[
                ("image[]", Some("a"), b"1"),
                ("image[]", Some("b"), b"2"),
                ("image[]", Some("c"), b"3")
            ])
            .await,
            (400, Some("image".into()))
        );
        assert_eq!(
            param_of(&[("n", None, b"1"), ("n", None, b"2")]).await,
            (400, Some("n".into()))
        );
        assert_eq!(
            param_of(&[("photo", Some("a.png"), b"1")]).await,
            (400, Some("photo".into()))
        );
        let many = [b'a'; 90];
        let names: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
        let parts: Vec<_> = names
            .iter()
            .map(|n| (n.as_str(), None, &many[..]))
            .collect();
        assert_eq!(param_of(&parts).await, (413, None));
        let (_, b) = body(&[("n", None, b"1")]);
        let json: HeaderMap = [(header::CONTENT_TYPE, "application/json".parse().unwrap())]
            .into_iter()
            .collect();
        assert!(matches!(
            read(&json, b, &limits()).await,
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }
}
