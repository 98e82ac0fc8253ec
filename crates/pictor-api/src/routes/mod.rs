//! Route handlers, one module per endpoint family.

pub mod health;
pub mod images;
pub mod models;
mod stream;
