//! An admitted job's life: into its model's queue, out as an OpenAI images response with
//! each image encoded, its receipt embedded, inline or stored, and usage recorded.

use base64::Engine as _;
use pictor_image::Receipt;
use pictor_sched::{JobError, Outcome, SubmitError, Ticket};
use pictor_store::now_unix;

use super::job::Job;
use crate::{
    error::ApiError,
    files,
    openapi::{ImageData, ImagesResponse, LoraApplied, Timings, Usage},
    state::AppState,
    wire::ResponseFormat,
};

/// Admits the job to its model's queue (429 when full, 503 while stopping).
pub(super) async fn admit(state: &AppState, job: &Job) -> Result<Ticket, ApiError> {
    admit_as(state, job, None).await
}

/// [`admit`], as job `id` where the model's queue names its jobs (see
/// [`pictor_sched::JobQueue::submit_as`]).
pub(super) async fn admit_as(
    state: &AppState,
    job: &Job,
    id: Option<&str>,
) -> Result<Ticket, ApiError> {
    if state.shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let queue = &job.slot().ready()?.queue;
    let req = job.engine().clone();
    match id {
        Some(id) => queue.submit_as(id, req).await,
        None => queue.submit(req).await,
    }
    .map_err(|e| match e {
        SubmitError::Overloaded { retry_after } => ApiError::Overloaded {
            model: job.model().to_string(),
            retry_after,
        },
        SubmitError::Closed => ApiError::shutting_down(),
        SubmitError::Unavailable(why) => ApiError::Unavailable {
            message: format!("{why}; retry shortly."),
            retry_after: std::time::Duration::from_secs(2),
        },
    })
}

/// Waits for the job, answers it and records its usage against the caller's key.
pub(super) async fn finish(
    state: &AppState,
    job: &Job,
    ticket: Ticket,
) -> Result<ImagesResponse, ApiError> {
    let model = job.model();
    let outcome = tokio::select! {
        outcome = ticket.wait() => outcome.map_err(|e| match e {
            JobError::TimedOut(limit) => ApiError::Timeout(limit),
            // What only the model could check (a LoRA made for other layers): the
            // request's fault, named by its field.
            JobError::Engine(ref e) if let pictor_core::PipelineError::Invalid(invalid) = &**e => {
                invalid.clone().into()
            }
            other => ApiError::Internal(
                anyhow::Error::new(other).context(format!("generating with {model}")),
            ),
        })?,
        () = state.cut_off_reached() => {
            return Err(ApiError::Unavailable {
                message: "The server shut down before this generation finished; retry it.".into(),
                retry_after: std::time::Duration::from_secs(5),
            });
        }
    };
    let images = outcome.generation.images.len();
    metrics::histogram!("pictor_generation_seconds", "model" => model.to_string())
        .record(outcome.ran.as_secs_f64());
    metrics::counter!("pictor_images_generated_total", "model" => model.to_string())
        .increment(images as u64);
    let response = respond(state, job, &outcome).await?;
    if let Some(key) = job.key() {
        let e = job.engine();
        state
            .db()
            .record_usage(
                &key.id,
                images as i64,
                (images * e.width * e.height) as i64,
                outcome.ran.as_secs_f64(),
            )
            .await?;
    }
    Ok(response)
}

/// The response: each image encoded with its receipt, inline or behind a signed link.
async fn respond(
    state: &AppState,
    job: &Job,
    outcome: &Outcome,
) -> Result<ImagesResponse, ApiError> {
    let generation = &outcome.generation;
    let phases = &generation.phases;
    let timings = Timings {
        queue_seconds: outcome.queued.as_secs_f64(),
        encode_seconds: phases.encode.as_secs_f64(),
        denoise_seconds: phases.denoise.as_secs_f64(),
        decode_seconds: phases.decode.as_secs_f64(),
        generation_seconds: outcome.ran.as_secs_f64(),
    };
    let model_hash = job.slot().hash();
    let format = job.output_format();
    let mut data = Vec::with_capacity(generation.images.len());
    for (i, image) in generation.images.iter().enumerate() {
        let receipt = Receipt::new(job.engine(), generation, i, job.model(), model_hash);
        let bytes =
            pictor_image::encode(image, format, job.compression(), &receipt.to_parameters())?;
        let (url, b64_json) = match job.response_format() {
            ResponseFormat::B64Json => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
            ),
            ResponseFormat::Url => (Some(files::store(state, bytes, format).await?), None),
        };
        data.push(ImageData {
            url,
            b64_json,
            revised_prompt: receipt.prompt,
            prompt_truncated: generation.prompt.truncated,
            seed: receipt.seed,
            steps: receipt.steps as u32,
            width: receipt.width as u32,
            height: receipt.height as u32,
            guidance: receipt.guidance,
            model: receipt.model,
            model_hash: receipt.model_hash,
            strength: receipt.strength,
            input_image_sha256: receipt.input_sha256,
            device: receipt.device,
            loras: generation
                .loras
                .iter()
                .map(|l| LoraApplied {
                    name: l.name.clone(),
                    sha256: l.sha256.clone(),
                    scale: l.scale,
                })
                .collect(),
            timings,
        });
    }
    Ok(ImagesResponse {
        usage: Usage::new(
            generation.prompt.tokens as u64,
            job.input_image_tokens(),
            job.output_tokens(),
        ),
        created: now_unix(),
        data,
        output_format: format.name(),
        size: job.size(),
        quality: job.quality(),
    })
}
