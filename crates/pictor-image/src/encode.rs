//! Pipeline images to the bytes a client asked for: PNG, JPEG or WebP.

use std::io::Cursor;

use image::{ImageEncoder, codecs};
use pictor_core::RgbImage;

use crate::Result;

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Lossless PNG (the default).
    Png,
    /// JPEG at `output_compression` quality.
    Jpeg,
    /// Lossless WebP (the encoder available is lossless; `output_compression` is ignored).
    Webp,
}

impl Format {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }

    /// The MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }
}

/// Writes a PNG with a `parameters` text chunk, the field image tools read generation
/// settings from.
fn png_with_parameters(img: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, img.width as u32, img.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // The fast deflate path: 0.14 ms instead of 2.9 ms for a 128² image, which was most of
    // the server's overhead per request (BENCHMARKS.md, server load); files come out a
    // little larger than at the default level.
    encoder.set_compression(png::Compression::Fast);
    if parameters.is_empty() {
        // No receipt (a preview).
    } else if parameters.is_ascii() {
        encoder.add_text_chunk("parameters".into(), parameters.into())?;
    } else {
        encoder.add_itxt_chunk("parameters".into(), parameters.into())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&img.pixels)?;
    writer.finish()?;
    Ok(out)
}

/// An EXIF block (raw TIFF, big-endian) holding `parameters` as its `UserComment`, in the
/// form AUTOMATIC1111's web UI writes and reads for JPEG and WebP: the `UNICODE\0` charset
/// code, then UTF-16BE text.
fn exif_with_parameters(parameters: &str) -> Result<Vec<u8>> {
    let mut comment = b"UNICODE\0".to_vec();
    comment.extend(parameters.encode_utf16().flat_map(u16::to_be_bytes));
    let field = exif::Field {
        tag: exif::Tag::UserComment,
        ifd_num: exif::In::PRIMARY,
        value: exif::Value::Undefined(comment, 0),
    };
    let mut writer = exif::experimental::Writer::new();
    writer.push_field(&field);
    let mut out = Cursor::new(Vec::new());
    writer.write(&mut out, false)?;
    Ok(out.into_inner())
}

/// Encodes `img`; `quality` applies to JPEG, clamped to 1..=100 (0, the smallest file, is
/// taken as 1). `parameters` (the receipt in the text form image tools use) is embedded in
/// every format: a PNG `parameters` text chunk, or the EXIF `UserComment` of JPEG and
/// WebP. An empty `parameters` embeds nothing.
pub fn encode(img: &RgbImage, format: Format, quality: u8, parameters: &str) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    let (w, h) = (img.width as u32, img.height as u32);
    let color = image::ExtendedColorType::Rgb8;
    let exif = || -> Result<Vec<u8>> {
        if parameters.is_empty() {
            Ok(Vec::new())
        } else {
            exif_with_parameters(parameters)
        }
    };
    match format {
        Format::Png => return png_with_parameters(img, parameters),
        Format::Jpeg => {
            let mut encoder =
                codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
            encoder.set_exif_metadata(exif()?)?;
            encoder.write_image(&img.pixels, w, h, color)?
        }
        Format::Webp => {
            let mut encoder = codecs::webp::WebPEncoder::new_lossless(&mut out);
            encoder.set_exif_metadata(exif()?)?;
            encoder.write_image(&img.pixels, w, h, color)?
        }
    }
    Ok(out.into_inner())
}
