//! Route handlers, one module per endpoint family: HTTP in and out, nothing else.

pub(crate) mod health;
pub(crate) mod images;
pub(crate) mod models;
pub(crate) mod playground;
