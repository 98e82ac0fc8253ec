//! Decoder output to the seam's 8-bit [`RgbImage`]s.

use candle_core::{DType, Tensor};
use pictor_core::RgbImage;

use crate::error::Result;

/// Converts decoder output `(n, 3, h, w)` in `[-1, 1]` to pixel values in `[0, 1]`
/// (still `(n, 3, h, w)`, f32), as diffusers' `postprocess` does: `(x / 2 + 0.5).clamp(0, 1)`.
pub fn to_unit_range(decoded: &Tensor) -> Result<Tensor> {
    Ok(((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// Converts `(n, 3, h, w)` values in `[0, 1]` to 8-bit images, rounding to nearest as
/// diffusers does (`(x * 255).round()`), not truncating as candle's example does.
pub fn to_rgb8(unit: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, height, width) = unit.dims4()?;
    if c != 3 {
        return Err(candle_core::Error::Msg(format!("expected 3 channels, got {c}")).into());
    }
    let hwc = (unit.permute((0, 2, 3, 1))? * 255.0)?.round()?;
    let bytes = hwc.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
    let per_image = height * width * 3;
    Ok(bytes
        .chunks_exact(per_image)
        .take(n)
        .map(|chunk| RgbImage {
            width,
            height,
            pixels: chunk.to_vec(),
        })
        .collect())
}
