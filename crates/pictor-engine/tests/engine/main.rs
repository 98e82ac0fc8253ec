//! Engine integration tests: parity with diffusers on the tiny fixture, and every loader
//! path (layouts, shards, cache snapshots, GGUF, malformed files).

mod comfy;
mod common;
mod dev;
mod edit;
mod gguf;
mod loaders;
mod lora;
mod malformed;
mod memory;
mod odd;
mod parity;
mod quantized;
mod zimage;
mod zimage_layouts;
