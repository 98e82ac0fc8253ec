//! Reading images that clients upload (to edit): PNG, JPEG or WebP, bounded before a byte
//! of pixels is decoded, so that a small file that declares 20000×20000 pixels is refused
//! from its header, and with its alpha channel kept, since OpenAI's masks are drawn in it.

use std::io::Cursor;

use image::{ImageReader, Limits};
use pictor_core::RgbImage;

/// What an upload may declare.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Most pixels (width × height).
    pub max_pixels: u64,
    /// Longest side.
    pub max_side: u32,
}

/// An uploaded image: its RGB pixels and, when the file has one, its alpha channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The pixels, alpha dropped.
    pub image: RgbImage,
    /// One byte per pixel, 0 transparent to 255 opaque; `None` when the file has no alpha.
    pub alpha: Option<Vec<u8>>,
}

/// Why an upload is refused; each says what to send instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not PNG, JPEG or WebP.
    #[error("not a PNG, JPEG or WebP image")]
    NotAnImage,
    /// It declares more pixels, or a longer side, than allowed.
    #[error(
        "the image declares {width}x{height} pixels; at most {max_side} a side and {max_pixels} pixels are accepted"
    )]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit on a side.
        max_side: u32,
        /// The limit on pixels.
        max_pixels: u64,
    },
    /// Truncated or corrupt.
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
}

/// Decodes `bytes`, refusing from the header alone an image over `limits`.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<Decoded, DecodeError> {
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>, DecodeError> {
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        match reader.format() {
            Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {
                Ok(reader)
            }
            _ => Err(DecodeError::NotAnImage),
        }
    };
    let (width, height) = reader()?
        .into_dimensions()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if width.max(height) > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels
        || width == 0
        || height == 0
    {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    let mut reader = reader()?;
    let mut bounds = Limits::default();
    bounds.max_image_width = Some(limits.max_side);
    bounds.max_image_height = Some(limits.max_side);
    // The decoded RGBA image, and as much again for the decoder's own buffers.
    bounds.max_alloc = Some(limits.max_pixels * 4 * 2);
    reader.limits(bounds);
    let decoded = reader
        .decode()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let alpha = decoded.color().has_alpha().then(|| {
        decoded
            .to_rgba8()
            .pixels()
            .map(|p| p.0[3])
            .collect::<Vec<u8>>()
    });
    let rgb = decoded.to_rgb8();
    Ok(Decoded {
        image: RgbImage {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            pixels: rgb.into_raw(),
        },
        alpha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_pixels: 4096 * 4096,
        max_side: 4096,
    };

    fn png(width: u32, height: u32, color: image::ColorType) -> Vec<u8> {
        let channels = color.channel_count() as usize;
        let pixels = vec![200u8; width as usize * height as usize * channels];
        let mut out = Vec::new();
        image::write_buffer_with_format(
            &mut Cursor::new(&mut out),
            &pixels,
            width,
            height,
            color,
            image::ImageFormat::Png,
        )
        .unwrap();
        out
    }

    /// A PNG of under 60 bytes whose header declares `width`×`height` pixels.
    fn bomb(width: u32, height: u32) -> Vec<u8> {
        fn crc(bytes: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 == 1 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(width.to_be_bytes());
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend(13u32.to_be_bytes());
        out.extend(&ihdr);
        out.extend(crc(&ihdr).to_be_bytes());
        // An empty IDAT: a header's worth of file, no pixels.
        out.extend(0u32.to_be_bytes());
        out.extend(b"IDAT");
        out.extend(crc(b"IDAT").to_be_bytes());
        out.extend(0u32.to_be_bytes());
        out.extend(b"IEND");
        out.extend(crc(b"IEND").to_be_bytes());
        out
    }

    #[test]
    fn rgb_and_rgba_decode_with_alpha_kept() {
        let d = decode(&png(32, 16, image::ColorType::Rgb8), LIMITS).unwrap();
        assert_eq!((d.image.width, d.image.height, d.alpha), (32, 16, None));
        let d = decode(&png(8, 8, image::ColorType::Rgba8), LIMITS).unwrap();
        assert_eq!(d.alpha.as_deref(), Some(&[200u8; 64][..]));
    }

    #[test]
    fn bombs_truncations_and_other_files_are_refused() {
        let err = decode(&bomb(20_000, 20_000), LIMITS).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooLarge { width: 20_000, .. }),
            "{err}"
        );
        let whole = png(64, 64, image::ColorType::Rgb8);
        let err = decode(&whole[..whole.len() / 2], LIMITS).unwrap_err();
        assert!(matches!(err, DecodeError::Corrupt(_)), "{err}");
        assert_eq!(
            decode(b"GIF89a....", LIMITS).unwrap_err(),
            DecodeError::NotAnImage
        );
        assert_eq!(
            decode(b"hello", LIMITS).unwrap_err(),
            DecodeError::NotAnImage
        );
    }
}

/// `image` resampled to `to` (Lanczos, as image editors do); the image itself when it is
/// that size already.
pub fn resize(image: &RgbImage, to: pictor_core::Dimensions) -> RgbImage {
    if (image.width, image.height) == (to.width, to.height) {
        return image.clone();
    }
    let Some(buffer) = image::RgbImage::from_raw(
        image.width as u32,
        image.height as u32,
        image.pixels.clone(),
    ) else {
        return image.clone();
    };
    let out = image::imageops::resize(
        &buffer,
        to.width as u32,
        to.height as u32,
        image::imageops::FilterType::Lanczos3,
    );
    RgbImage {
        width: to.width,
        height: to.height,
        pixels: out.into_raw(),
    }
}

/// An OpenAI edit mask from its alpha channel (`width`×`height`, one byte per pixel) at
/// the size `to`: 255 (repaint) where the mask is fully transparent, 0 (keep) elsewhere,
/// as OpenAI reads it; resized by nearest neighbour, so that no edge is half-kept.
pub fn mask_from_alpha(
    alpha: &[u8],
    width: usize,
    height: usize,
    to: pictor_core::Dimensions,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(to.width * to.height);
    for y in 0..to.height {
        let sy = (y * height / to.height.max(1)).min(height.saturating_sub(1));
        for x in 0..to.width {
            let sx = (x * width / to.width.max(1)).min(width.saturating_sub(1));
            let a = alpha.get(sy * width + sx).copied().unwrap_or(255);
            out.push(if a == 0 { 255 } else { 0 });
        }
    }
    out
}

#[cfg(test)]
mod resize_tests {
    use pictor_core::Dimensions;

    use super::*;

    #[test]
    fn resizing_keeps_a_flat_colour_and_a_same_size_image() {
        let image = RgbImage {
            width: 40,
            height: 30,
            pixels: [10u8, 200, 90].repeat(40 * 30),
        };
        assert_eq!(resize(&image, Dimensions::new(40, 30)), image);
        let out = resize(&image, Dimensions::new(64, 48));
        assert_eq!(
            (out.width, out.height, out.pixels.len()),
            (64, 48, 64 * 48 * 3)
        );
        assert!(out.pixels.chunks(3).all(|p| p == [10, 200, 90]));
    }

    #[test]
    fn transparent_mask_pixels_are_the_ones_repainted() {
        // 4x2: the left column fully transparent, a half-transparent one, two opaque.
        let alpha = [0, 128, 255, 255, 0, 1, 255, 255];
        assert_eq!(
            mask_from_alpha(&alpha, 4, 2, Dimensions::new(4, 2)),
            vec![255, 0, 0, 0, 255, 0, 0, 0]
        );
        let up = mask_from_alpha(&alpha, 4, 2, Dimensions::new(8, 4));
        assert_eq!(&up[..8], &[255, 255, 0, 0, 0, 0, 0, 0]);
        assert_eq!(up.iter().filter(|&&m| m == 255).count(), 8);
    }
}
