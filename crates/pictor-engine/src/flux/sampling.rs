//! The schnell sampler's pieces: schedule, latent packing, position ids.
//!
//! Matches diffusers' FluxPipeline (`pipeline_flux.py`: `prepare_latents`, `_pack_latents`,
//! `_unpack_latents`, `_prepare_latent_image_ids`) and BFL's `sampling.py`.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Schnell's sigmas: `linspace(1, 0, steps + 1)` with no shift; `[1, .75, .5, .25, 0]` for
/// 4 steps. Each step moves the latent by `(sigma_next - sigma) * velocity`.
pub fn schedule(steps: usize) -> Vec<f64> {
    (0..=steps).map(|i| 1.0 - i as f64 / steps as f64).collect()
}

/// Latent height and width for an image: 2 latent cells per 16 pixels.
pub fn latent_dims(height: usize, width: usize) -> (usize, usize) {
    (2 * (height / 16), 2 * (width / 16))
}

/// `(b, c, h, w)` → `(b, h/2 · w/2, c · 4)`: 2×2 patches in row-major order, channel index
/// `c · 4 + dy · 2 + dx`.
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// The inverse of [`pack`] for a latent of height `h` and width `w`.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _tokens, c4) = x.dims3()?;
    let c = c4 / 4;
    Ok(x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))?)
}

/// Position ids `(b, h/2 · w/2, 3)`: `[0, row, col]` for each packed token.
pub fn image_ids(b: usize, h: usize, w: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let (rows, cols) = (h / 2, w / 2);
    let ids: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).flat_map(move |c| [0.0, r as f32, c as f32]))
        .collect();
    let ids = Tensor::from_vec(ids, (1, rows * cols, 3), device)?;
    Ok(ids.repeat((b, 1, 1))?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schnell_schedule_is_exact() {
        assert_eq!(schedule(4), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(schedule(1), vec![1.0, 0.0]);
    }

    #[test]
    fn pack_unpack_round_trip_and_token_order() -> Result<()> {
        let x =
            Tensor::arange(0f32, 2.0 * 16.0 * 6.0 * 10.0, &Device::Cpu)?.reshape((2, 16, 6, 10))?;
        let packed = pack(&x)?;
        assert_eq!(packed.dims(), &[2, 15, 64]);
        // Token 1 is the patch at row 0, cols 2..4; its channel 1 is (c=0, dy=0, dx=1).
        let v: f32 = packed.get(0)?.get(1)?.get(1)?.to_scalar()?;
        let want: f32 = x.get(0)?.get(0)?.get(0)?.get(3)?.to_scalar()?;
        assert_eq!(v, want);
        let back = unpack(&packed, 6, 10)?;
        let diff: f32 = (back - &x)?.abs()?.max_all()?.to_scalar()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn ids_are_row_major() -> Result<()> {
        let ids = image_ids(1, 6, 10, DType::F32, &Device::Cpu)?;
        assert_eq!(ids.dims(), &[1, 15, 3]);
        let last: Vec<f32> = ids.get(0)?.get(14)?.to_vec1()?;
        assert_eq!(last, vec![0.0, 2.0, 4.0]);
        let second: Vec<f32> = ids.get(0)?.get(1)?.to_vec1()?;
        assert_eq!(second, vec![0.0, 0.0, 1.0]);
        Ok(())
    }
}
