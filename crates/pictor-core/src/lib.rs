//! The seam between Pictor's engine and everything that calls it.
//!
//! A model family implements [`Pipeline`]; the scheduler, the HTTP API and the command line
//! drive it through this trait alone, with plain data in and out: a [`GenerationRequest`]
//! goes in, [`Generation`]s of 8-bit [`RgbImage`]s come out, [`Progress`] reports each
//! phase and step to a callback that may [`Control::Cancel`]. A pipeline declares its own
//! [`ModelRules`] (size grid and ranges, steps, which inputs apply), and [`ModelRules::check`]
//! is the one place a request is held to them.
//!
//! What it is not: no tensors, no HTTP, no stores, no queues. It depends on no numeric
//! library, so the crates that only need the seam (`pictor-sched`, `pictor-api`) never
//! compile candle; a test over `cargo tree` keeps it so.

#![deny(missing_docs)]

mod error;
mod image;
mod input;
mod pipeline;
mod rules;

pub use error::{Invalid, PipelineError, Result};
pub use image::RgbImage;
pub use input::{MAX_SEED, edit_start, loose_model_name, prompt_problem};
pub use pipeline::{
    Control, EditInput, Generation, GenerationRequest, LORA_EXTENSION, LoraRequest, LoraUse,
    PartMemory, Phases, Pipeline, Progress, PromptInfo, lora_files, lora_name_problem,
    missing_lora, preview_steps,
};
pub use rules::{Dimensions, MAX_LORA_SCALE, MAX_LORAS, ModelRules};
