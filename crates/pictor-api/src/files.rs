//! Stored images: put behind a signed, expiring link; served to whoever holds the link;
//! swept when expired.

use pictor_image::Format;
use pictor_store::{StoreError, now_unix};

use crate::{error::ApiError, state::AppState};

/// Stores `bytes` for `image_ttl` and returns their link: the store's presigned GET when
/// so configured, else this server's own signed link.
pub(crate) async fn store(
    state: &AppState,
    bytes: Vec<u8>,
    format: Format,
) -> Result<String, ApiError> {
    let name = format!(
        "{}.{}",
        hex::encode(rand::random::<[u8; 16]>()),
        format.extension()
    );
    let expires = now_unix() + state.0.config.image_ttl.as_secs() as i64;
    state
        .0
        .blobs
        .put(&name, bytes.into(), format.content_type())
        .await?;
    state
        .db()
        .add_image(&name, format.content_type(), expires)
        .await?;
    let ttl = state.0.config.image_ttl;
    if state.0.config.presigned_links
        && let Some(url) = state.0.blobs.presigned_get(&name, ttl).await?
    {
        return Ok(url);
    }
    let signature = state.0.signer.sign(&name, expires);
    Ok(format!(
        "{}/v1/images/files/{name}?expires={expires}&signature={signature}",
        state.0.config.public_url.trim_end_matches('/')
    ))
}

/// A stored image a link reaches.
pub(crate) struct Stored {
    /// Its MIME type.
    pub content_type: String,
    /// Its bytes.
    pub bytes: bytes::Bytes,
    /// Seconds until the link expires.
    pub max_age: i64,
}

/// The image behind a link, when the link is valid, unexpired and the image still stored;
/// otherwise the 404 that says so (which of them is not told).
pub(crate) async fn open(
    state: &AppState,
    name: &str,
    expires: Option<i64>,
    signature: Option<&str>,
) -> Result<Stored, ApiError> {
    let not_found = || ApiError::NotFound("This image link is invalid or has expired.".into());
    let (Some(expires), Some(signature)) = (expires, signature) else {
        return Err(not_found());
    };
    if expires <= now_unix() || !state.0.signer.verify(name, expires, signature) {
        return Err(not_found());
    }
    let content_type = state.db().live_image(name).await?.ok_or_else(not_found)?;
    let bytes = match state.0.blobs.get(name).await {
        Ok(b) => b,
        Err(StoreError::NotFound(_)) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    Ok(Stored {
        content_type,
        bytes,
        max_age: (expires - now_unix()).max(0),
    })
}

/// Deletes expired images; returns how many.
pub(crate) async fn sweep(state: &AppState) -> Result<usize, StoreError> {
    let expired = state.db().take_expired_images(now_unix()).await?;
    for name in &expired {
        state.0.blobs.delete(name).await?;
    }
    Ok(expired.len())
}
