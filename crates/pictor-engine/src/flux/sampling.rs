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

/// FLUX.1-dev's shift: `mu` grows linearly with the image's latent tokens, from 0.5 at 256
/// to 1.15 at 4096 (diffusers' `calculate_shift` with FLUX.1-dev's scheduler config, BFL's
/// `get_lin_function`).
const BASE_SHIFT: (f64, f64) = (256.0, 0.5);
const MAX_SHIFT: (f64, f64) = (4096.0, 1.15);

/// The sigmas of a guidance-distilled FLUX.1 (dev) for an image of `tokens` latent tokens:
/// [`schedule`]'s, each moved toward 1 by `e^mu / (e^mu + 1/sigma - 1)`, as diffusers'
/// `FlowMatchEulerDiscreteScheduler` with `use_dynamic_shifting` and BFL's
/// `get_schedule(shift=True)` do; the last stays 0.
pub fn shifted_schedule(steps: usize, tokens: usize) -> Vec<f64> {
    let slope = (MAX_SHIFT.1 - BASE_SHIFT.1) / (MAX_SHIFT.0 - BASE_SHIFT.0);
    let mu = BASE_SHIFT.1 + slope * (tokens as f64 - BASE_SHIFT.0);
    schedule(steps)
        .into_iter()
        .map(|s| match s {
            0.0 => 0.0,
            s => mu.exp() / (mu.exp() + (1.0 / s - 1.0)),
        })
        .collect()
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

    /// Against diffusers' `FlowMatchEulerDiscreteScheduler` (FLUX.1-dev's config) through
    /// `FluxPipeline`'s `calculate_shift`, printed by diffusers 0.35.2 for 28 steps at
    /// 1024² (4096 tokens) and 4 steps at 512² (1024 tokens).
    #[test]
    fn dev_schedule_matches_diffusers() {
        let at_1024 = shifted_schedule(28, 4096);
        assert_eq!(at_1024.len(), 29);
        for (i, want) in [
            (0, 1.0),
            (1, 0.988_408_6),
            (14, 0.759_510_9),
            (27, 0.104_720_9),
        ] {
            assert!((at_1024[i] - want).abs() < 1e-6, "{i}: {}", at_1024[i]);
        }
        assert_eq!(at_1024[28], 0.0);
        let at_512 = shifted_schedule(4, 1024);
        for (got, want) in at_512
            .iter()
            .zip([1.0, 0.849_234_8, 0.652_489_4, 0.384_944_7, 0.0])
        {
            assert!((got - want).abs() < 1e-6, "{got} for {want}");
        }
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
