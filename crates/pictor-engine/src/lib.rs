//! Pictor's inference core: turns a prompt into RGB images with a diffusion pipeline.
//!
//! The crate is what the server and the CLI call to generate images, and nothing more:
//! it knows nothing of HTTP, JSON wire formats, keys or queues, and it never derives
//! `Serialize` (serde is used only to read model configuration files).
//!
//! Principal types:
//! - [`Pipeline`] (the seam, from `pictor-core`, re-exported here): one loaded model;
//!   `generate` takes a [`GenerationRequest`] and returns [`Generation`] (images plus the
//!   prompt text really encoded), reporting [`Progress`] to a callback that can cancel
//!   between denoising steps.
//! - [`ModelFiles`]: where each part of a model lives on disk, found from a folder, a single
//!   file or a Hugging Face cache snapshot by [`ModelFiles::resolve`].
//! - [`zimage::ZImagePipeline`]: Z-Image-Turbo, from its diffusers folder, ComfyUI's split
//!   files or a GGUF transformer ([`zimage::ZImageFiles`]).
//! - [`flux::FluxPipeline`]: FLUX.1-schnell and -dev (CLIP-L + T5-XXL text encoders, the flux
//!   transformer, the flux autoencoder) on candle.
//!
//! One design decision, with its reasons: the Black Forest Labs tensor names are the
//! canonical in-memory form. Every other layout (diffusers folders, sharded files, GGUF)
//! is translated name by name at load time by [`weights`], lazily and with shape checks,
//! so there is exactly one implementation of each network and every load error names the
//! file and the tensor that is wrong.

#![deny(missing_docs)]

mod device;
mod error;
pub mod flux;
pub mod heap;
mod image;
pub mod inspect;

mod layers;
mod layout;
pub mod lora;
mod noise;
pub mod ops;
pub mod quantize;
pub mod text;
pub mod weights;
pub mod zimage;

pub use device::{DTypeChoice, DeviceChoice};
pub use error::{EngineError, Result};
pub use image::{to_rgb8, to_unit_range};
pub use layout::{ModelFiles, Part, hf_hub_cache_dir, locate};
pub use noise::gaussian_noise;
pub use pictor_core::{
    Control, Dimensions, EditInput, Generation, GenerationRequest, Invalid, LoraRequest, LoraUse,
    ModelRules, PartMemory, Phases, Pipeline, PipelineError, Progress, PromptInfo, RgbImage,
    preview_steps,
};
