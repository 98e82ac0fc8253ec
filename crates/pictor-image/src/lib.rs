//! Pictor's image files: what the server and `pictor generate` both write.
//!
//! [`encode`] turns a pipeline's [`pictor_core::RgbImage`] into PNG, JPEG or WebP bytes
//! ([`Format`]) with the image's [`Receipt`] embedded where other image tools read it (a
//! PNG `parameters` text chunk, or the EXIF `UserComment` of JPEG and WebP, as AUTOMATIC1111
//! writes it); [`Receipt::from_image`] reads it back, so an image can be reproduced from its
//! own file. [`Receipt::new`] is the one place a receipt is made from a request and its
//! result. [`decode`] reads what clients upload to edit, refusing oversized images from
//! their header.
//!
//! What it is not: no HTTP, no storage, no tensors. Where the bytes go (a response, a
//! signed link, a file) is the caller's business.

#![deny(missing_docs)]

mod decode;
mod encode;
mod receipt;

pub use decode::{DecodeError, DecodeLimits, Decoded, decode, mask_from_alpha, resize};
pub use encode::{Format, encode};
pub use receipt::Receipt;

/// Why an image could not be written, or its receipt not read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PNG encoder or decoder failed.
    #[error("PNG: {0}")]
    Png(String),
    /// The JPEG or WebP codec failed, or the bytes are no image it knows.
    #[error("image: {0}")]
    Image(#[from] image::ImageError),
    /// The EXIF block could not be written or read.
    #[error("EXIF: {0}")]
    Exif(#[from] exif::Error),
    /// The file carries no receipt Pictor can read; says what was missing.
    #[error("{0}")]
    NoReceipt(&'static str),
    /// The receipt's UTF-16 text is not valid.
    #[error("the receipt is not valid UTF-16: {0}")]
    Text(#[from] std::string::FromUtf16Error),
}

impl From<image::error::UnsupportedError> for Error {
    fn from(e: image::error::UnsupportedError) -> Self {
        Self::Image(image::ImageError::Unsupported(e))
    }
}

impl From<png::EncodingError> for Error {
    fn from(e: png::EncodingError) -> Self {
        Self::Png(e.to_string())
    }
}

impl From<png::DecodingError> for Error {
    fn from(e: png::DecodingError) -> Self {
        Self::Png(e.to_string())
    }
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
