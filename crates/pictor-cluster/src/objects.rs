//! What travels between nodes, and where: a job's request and result as JSON in its row,
//! and its images (an edit's input, previews, results) as lossless PNGs in the store under
//! `jobs/<id>/` (in the database while the store is out of reach). A result image small
//! enough (`INLINE_MAX`) travels in the row instead, which spares the store two round
//! trips. Receipts and the client's format are the API node's business: a worker's PNGs
//! are plain pixels.

use std::sync::Arc;

use bytes::Bytes;
use pictor_core::{EditInput, GenerationRequest, Phases, PromptInfo, RgbImage};
use pictor_image::{DecodeLimits, Format};
use serde::{Deserialize, Serialize};

use crate::{ClusterError, Result};

/// A job's request, as its row holds it.
#[derive(Serialize, Deserialize)]
pub(crate) struct JobRequest {
    /// The engine request (its edit's pixels are in the store).
    pub request: GenerationRequest,
    /// The edit's settings, when the job edits an image.
    pub edit: Option<EditSettings>,
}

impl JobRequest {
    /// Job `id`'s request as its row holds it, if the job exists.
    pub(crate) async fn read(pool: &sqlx::PgPool, id: &str) -> Result<Option<Self>> {
        let row: Option<(String,)> = sqlx::query_as("SELECT request FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
        row.map(|(r,)| Ok(serde_json::from_str(&r)?)).transpose()
    }
}

/// An edit, but for its pixels.
#[derive(Serialize, Deserialize)]
pub(crate) struct EditSettings {
    pub strength: f64,
    pub image_sha256: String,
    pub masked: bool,
}

/// A job's result, as its row holds it (the images are in the store).
#[derive(Serialize, Deserialize)]
pub(crate) struct JobResult {
    pub prompt: PromptInfo,
    pub phases: Phases,
    /// Where the worker ran it ([`pictor_core::Generation::device`]).
    #[serde(default)]
    pub device: String,
    /// The LoRAs the worker applied ([`pictor_core::Generation::loras`]).
    #[serde(default)]
    pub loras: Vec<pictor_core::LoraUse>,
    /// Milliseconds the job waited before its worker started it.
    pub queued_ms: u64,
    /// Milliseconds its worker ran it.
    pub ran_ms: u64,
    pub images: usize,
    /// Image `i`'s PNG in base64 when it travels in the row; `None` (or absent): it is in
    /// the store.
    #[serde(default)]
    pub inline: Vec<Option<String>>,
}

/// The largest result PNG that travels in the job's row rather than the store.
pub(crate) const INLINE_MAX: usize = 64 * 1024;

impl JobResult {
    fn is_inline(&self, i: usize) -> bool {
        self.inline.get(i).is_some_and(Option::is_some)
    }
}

fn input(id: &str) -> String {
    format!("jobs/{id}/input.png")
}

fn mask(id: &str) -> String {
    format!("jobs/{id}/mask.png")
}

/// The store name of image `i` of job `id`'s result.
pub(crate) fn result(id: &str, i: usize) -> String {
    format!("jobs/{id}/{i}.png")
}

/// The store name of a preview.
pub(crate) fn preview(id: &str, image: usize, index: usize) -> String {
    format!("jobs/{id}/preview-{image}-{index}.png")
}

/// Every name job `id` may have written to the store: its results (but those that
/// travelled in the row), its previews, and an edit's input and mask.
pub(crate) fn all(
    id: &str,
    images: usize,
    previews: usize,
    edit: bool,
    result: Option<&JobResult>,
) -> Vec<String> {
    let mut names = if edit {
        vec![input(id), mask(id)]
    } else {
        Vec::new()
    };
    for i in 0..images {
        if !result.is_some_and(|r| r.is_inline(i)) {
            names.push(self::result(id, i));
        }
        names.extend((0..previews).map(|p| preview(id, i, p)));
    }
    names
}

/// What a swept job left in the store, from its row's request and result.
pub(crate) fn left_by(id: &str, request: &str, result: Option<&str>) -> Vec<String> {
    let Ok(JobRequest { request, edit }) = serde_json::from_str(request) else {
        return Vec::new();
    };
    let result: Option<JobResult> = result.and_then(|r| serde_json::from_str(r).ok());
    all(
        id,
        request.n,
        request.previews,
        edit.is_some(),
        result.as_ref(),
    )
}

/// Result `images`: the small ones as base64 for the row, the others put in the store.
pub(crate) async fn put_results(
    cluster: &crate::Cluster,
    id: &str,
    images: &[RgbImage],
) -> Result<Vec<Option<String>>> {
    use base64::Engine as _;
    let mut inline = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let bytes = png(image)?;
        if bytes.len() <= INLINE_MAX {
            inline.push(Some(
                base64::engine::general_purpose::STANDARD.encode(&bytes),
            ));
        } else {
            cluster.put_object(&result(id, i), bytes).await?;
            inline.push(None);
        }
    }
    Ok(inline)
}

/// Result image `i` of job `id`: from the row or from the store.
pub(crate) async fn get_result(
    cluster: &crate::Cluster,
    id: &str,
    result: &JobResult,
    i: usize,
) -> Result<RgbImage> {
    use base64::Engine as _;
    match result.inline.get(i) {
        Some(Some(b64)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| ClusterError::Image(e.to_string()))?;
            pixels(&bytes)
        }
        _ => pixels(&cluster.get_object(&self::result(id, i)).await?),
    }
}

/// `image` as a lossless PNG.
pub(crate) fn png(image: &RgbImage) -> Result<Bytes> {
    pictor_image::encode(image, Format::Png, 100, "")
        .map(Bytes::from)
        .map_err(|e| ClusterError::Image(e.to_string()))
}

/// Pixels back from a PNG another node wrote.
pub(crate) fn pixels(bytes: &[u8]) -> Result<RgbImage> {
    let limits = DecodeLimits {
        max_pixels: 1 << 28,
        max_side: 1 << 16,
    };
    pictor_image::decode(bytes, limits)
        .map(|d| d.image)
        .map_err(|e| ClusterError::Image(e.to_string()))
}

impl crate::Cluster {
    /// Stores `bytes` as `name` for another node: in the image store, or, while it is out
    /// of reach, in the database (so `b64_json` answers survive the store being down).
    pub(crate) async fn put_object(&self, name: &str, bytes: Bytes) -> Result<()> {
        match self.blobs.put(name, bytes.clone(), "image/png").await {
            Ok(()) => Ok(()),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "the image store is down: passing pixels through the database");
                sqlx::query(
                    "INSERT INTO job_objects (name, bytes) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET bytes = EXCLUDED.bytes",
                )
                .bind(name)
                .bind(bytes.as_ref())
                .execute(&self.pool)
                .await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads what another node stored as `name`: from the store, else from the database
    /// (which holds only what was put while the store was down).
    pub(crate) async fn get_object(&self, name: &str) -> Result<Bytes> {
        let stored = match self.blobs.get(name).await {
            Ok(bytes) => return Ok(bytes),
            Err(e) => e,
        };
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT bytes FROM job_objects WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            Some((bytes,)) => Ok(Bytes::from(bytes)),
            None => Err(stored.into()),
        }
    }

    /// Deletes `names` in the background (best effort: the workers' sweep and the store's
    /// own lifecycle rules catch what is missed).
    pub(crate) fn delete_objects_later(&self, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move { cluster.delete_objects(&names).await });
    }

    /// Deletes `names` wherever they are (best effort).
    pub(crate) async fn delete_objects(&self, names: &[String]) {
        let _ = sqlx::query("DELETE FROM job_objects WHERE name = ANY($1)")
            .bind(names)
            .execute(&self.pool)
            .await;
        for name in names {
            let _ = self.blobs.delete(name).await;
        }
    }
}

/// Puts an edit's pixels in the store (the mask as a grey image, 255 = repaint) and
/// returns the request as its row will hold it.
pub(crate) async fn put_request(
    cluster: &crate::Cluster,
    id: &str,
    request: &GenerationRequest,
) -> Result<String> {
    let edit = match &request.edit {
        None => None,
        Some(edit) => {
            cluster.put_object(&input(id), png(&edit.image)?).await?;
            if let Some(m) = &edit.mask {
                let grey = RgbImage {
                    width: edit.image.width,
                    height: edit.image.height,
                    pixels: m.iter().flat_map(|&v| [v, v, v]).collect(),
                };
                cluster.put_object(&mask(id), png(&grey)?).await?;
            }
            Some(EditSettings {
                strength: edit.strength,
                image_sha256: edit.image_sha256.clone(),
                masked: edit.mask.is_some(),
            })
        }
    };
    Ok(serde_json::to_string(&JobRequest {
        request: request.clone(),
        edit,
    })?)
}

/// The engine request of a job's row, its edit's pixels read back from the store.
pub(crate) async fn get_request(
    cluster: &crate::Cluster,
    id: &str,
    row: &str,
) -> Result<GenerationRequest> {
    let JobRequest { mut request, edit } = serde_json::from_str(row)?;
    if let Some(edit) = edit {
        let image = pixels(&cluster.get_object(&input(id)).await?)?;
        let mask = if edit.masked {
            let grey = pixels(&cluster.get_object(&mask(id)).await?)?;
            Some(grey.pixels.chunks(3).map(|p| p[0]).collect())
        } else {
            None
        };
        request.edit = Some(Arc::new(EditInput {
            image,
            mask,
            strength: edit.strength,
            image_sha256: edit.image_sha256,
        }));
    }
    Ok(request)
}
