//! The adaptive-norm modulation around each FLUX block, one pass per step for f32 tensors
//! on the CPU.
//!
//! With candle's ops, a LayerNorm without an affine bias takes its generic path (seven
//! elementwise and reduction ops, each a fresh tensor), and `·(1 + scale) + shift` and
//! `x + gate·y` take two more each. Here each is one parallel pass over the rows.

use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_inputs, fast_path};

/// Rows per parallel task.
const ROWS: usize = 16;

/// `layer_norm(x)·(1 + scale) + shift` (LayerNorm without affine weights, over the last
/// dimension), for `x` `(b, l, h)` and `scale`, `shift` `(b, 1, h)`.
pub fn norm_modulate(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if !fast_path(x) {
        // candle-nn's LayerNorm without affine weights: statistics in f32.
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        return normed.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift);
    }
    let (b, _, h) = x.dims3()?;
    let (scale, shift) = (rows(scale, b, h)?, rows(shift, b, h)?);
    x.contiguous()?
        .apply_op3_no_bwd(&scale, &shift, &NormModulate { eps: eps as f32 })
}

/// `x + gate·y` for `x`, `y` `(b, l, h)` and `gate` `(b, 1, h)`.
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    if !fast_path(x) || !fast_path(y) {
        return x + gate.broadcast_mul(y)?;
    }
    if y.dims() != x.dims() {
        candle_core::bail!("gated residual: {:?} and {:?}", x.dims(), y.dims());
    }
    let (b, _, h) = x.dims3()?;
    x.contiguous()?
        .apply_op3_no_bwd(&rows(gate, b, h)?, &y.contiguous()?, &GatedResidual)
}

/// A `(b, 1, h)` (or `(1, 1, h)`) modulation vector as `b` contiguous rows of `h`.
fn rows(t: &Tensor, b: usize, h: usize) -> candle_core::Result<Tensor> {
    t.broadcast_as((b, 1, h))?.contiguous()
}

/// Runs `each(row, dst)` over the rows of `(b, l, h)` `x`, in parallel, and returns the
/// output; `row` is the row's index in `b·l`.
fn map_rows(
    l: &Layout,
    each: impl Fn(usize, &mut [f32]) + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (b, rows, h) = l.shape().dims3()?;
    let mut out = vec![0f32; b * rows * h];
    out.par_chunks_mut(ROWS * h.max(1))
        .enumerate()
        .for_each(|(chunk, dst)| {
            for (i, d) in dst.chunks_exact_mut(h.max(1)).enumerate() {
                each(chunk * ROWS + i, d);
            }
        });
    Ok((CpuStorage::F32(out), l.shape().clone()))
}

struct NormModulate {
    eps: f32,
}

impl CustomOp3 for NormModulate {
    fn name(&self) -> &'static str {
        "pictor-norm-modulate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [x, scale, shift] = f32_inputs(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (_, l, h) = l1.shape().dims3()?;
        map_rows(l1, |row, d| {
            let bi = row / l;
            let src = &x[row * h..][..h];
            let mean = src.iter().sum::<f32>() / h as f32;
            let var = src.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            let (sc, sh) = (&scale[bi * h..][..h], &shift[bi * h..][..h]);
            for (((o, &v), &s), &t) in d.iter_mut().zip(src).zip(sc).zip(sh) {
                *o = (v - mean) * inv * (1.0 + s) + t;
            }
        })
    }
}

struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "pictor-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [x, gate, y] = f32_inputs(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (_, l, h) = l1.shape().dims3()?;
        map_rows(l1, |row, d| {
            let g = &gate[row / l * h..][..h];
            let (xr, yr) = (&x[row * h..][..h], &y[row * h..][..h]);
            for (((o, &a), &v), &gv) in d.iter_mut().zip(xr).zip(yr).zip(g) {
                *o = a + gv * v;
            }
        })
    }
}
