//! The API over real HTTP on loopback, with the tiny FLUX.1-schnell fixture as the model.

mod common;
mod edits;
mod errors;
mod hardening;
mod idempotency;
mod images;
mod lifecycle;
mod loras;
mod playground;
mod stream;
