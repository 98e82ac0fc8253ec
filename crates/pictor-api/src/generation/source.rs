//! The image an edit or a variation starts from: the form's files decoded within the upload
//! limits (off the async threads: a large PNG takes a while), the mask read from its alpha,
//! and the hashes that identify the request for idempotency and receipts.

use pictor_image::{DecodeError, DecodeLimits, Decoded};
use serde_json::Value;
use sha2::Digest as _;

use crate::{
    error::ApiError,
    wire::{
        Endpoint,
        form::{Form, UploadLimits},
    },
};

/// The decoded input of an edit or a variation.
pub(crate) struct Source {
    /// The image to edit.
    pub image: Decoded,
    /// The mask's alpha (0 where the image is to change), at the image's size.
    pub mask: Option<Vec<u8>>,
    /// The SHA-256 (hex) of the image's file.
    pub image_sha256: String,
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn refused(param: &str, e: &DecodeError) -> ApiError {
    let hint = match e {
        DecodeError::NotAnImage => " Send a PNG, JPEG or WebP file.",
        DecodeError::TooLarge { .. } => " Send a smaller image.",
        DecodeError::Corrupt(_) => " The file may be truncated; send it whole.",
    };
    ApiError::invalid(param, format!("Invalid '{param}': {e}.{hint}"))
}

/// Decodes `form`'s files for `endpoint` and returns them with the request's fingerprint
/// (its text fields and every file's SHA-256). One image is edited; more (references) are
/// refused, since no model Pictor serves can use them; a variation takes no mask.
pub(super) async fn read(
    form: Form,
    endpoint: Endpoint,
    limits: &UploadLimits,
) -> Result<(Source, Value), ApiError> {
    let Form {
        fields,
        images,
        mask,
    } = form;
    let Some(first) = images.first() else {
        return Err(ApiError::invalid(
            "image",
            "Missing required parameter: 'image' (a PNG, JPEG or WebP file).",
        ));
    };
    if images.len() > 1 {
        return Err(ApiError::invalid(
            "image",
            format!(
                "{} images were sent, but this server's models edit one image and cannot use reference images; send one 'image'.",
                images.len()
            ),
        ));
    }
    if endpoint == Endpoint::Variations && mask.is_some() {
        return Err(ApiError::invalid(
            "mask",
            "A variation takes no mask; use /v1/images/edits to repaint part of an image.",
        ));
    }
    let decode_limits = DecodeLimits {
        max_pixels: limits.max_pixels,
        max_side: limits.max_side,
    };
    let image_bytes = first.clone();
    let mask_bytes = mask;
    let decoded = tokio::task::spawn_blocking(move || {
        let image = pictor_image::decode(&image_bytes, decode_limits);
        let mask = mask_bytes
            .as_ref()
            .map(|m| (pictor_image::decode(m, decode_limits), sha256(m)));
        (image, sha256(&image_bytes), mask)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("decoding an upload")))?;
    let (image, image_sha256, mask) = decoded;
    let image = image.map_err(|e| refused("image", &e))?;
    let mut fingerprint = fields;
    // Names no form field can take: `image` and `mask` are files, `_endpoint` no field.
    fingerprint.insert("_endpoint".into(), Value::from(format!("{endpoint:?}")));
    fingerprint.insert("image".into(), Value::from(vec![image_sha256.clone()]));
    let mask = match mask {
        None => None,
        Some((decoded, hash)) => {
            fingerprint.insert("mask".into(), Value::from(hash));
            Some(mask_alpha(
                decoded.map_err(|e| refused("mask", &e))?,
                &image,
            )?)
        }
    };
    Ok((
        Source {
            image,
            mask,
            image_sha256,
        },
        Value::Object(fingerprint),
    ))
}

/// The mask's alpha, once it is shown to have one and to match the image's size.
fn mask_alpha(mask: Decoded, image: &Decoded) -> Result<Vec<u8>, ApiError> {
    let (mw, mh) = (mask.image.width, mask.image.height);
    let (iw, ih) = (image.image.width, image.image.height);
    if (mw, mh) != (iw, ih) {
        return Err(ApiError::invalid(
            "mask",
            format!(
                "Invalid 'mask': it is {mw}x{mh}, the image {iw}x{ih}; the mask must be the same size as the image."
            ),
        ));
    }
    mask.alpha.ok_or_else(|| {
        ApiError::invalid(
            "mask",
            "Invalid 'mask': it has no alpha channel. Send a PNG with transparency: fully transparent (alpha 0) where the image should change.",
        )
    })
}
