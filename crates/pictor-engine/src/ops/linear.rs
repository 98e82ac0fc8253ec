//! Dense linear layers for f32 activations on the CPU: `x·Wᵀ + b` as gemms into a buffer
//! that starts as the bias rows, and `[x₁ x₂]·Wᵀ` without concatenating the inputs.
//!
//! candle's matmul zero-fills its output, runs gemm into it, and the bias then takes a
//! second pass into a third tensor; a single block's second layer also needed its two
//! inputs copied side by side first (267 MB at 1024²). Here the output is written once
//! and each input is read where it lies, whatever its row stride.
//!
//! The weight may be f32, or bf16/f16 kept at half the size (`dtype = bf16` on the CPU).
//! A half-precision weight is widened a block of input columns at a time into a scratch
//! buffer of at most [`WIDEN_ELEMENTS`] floats, and each block's gemm adds into the
//! output: gemm works through the reduction in slices of a few hundred columns anyway, so
//! the split repacks nothing. candle would instead widen both operands of every matmul in
//! full and multiply on its slower half-precision path.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::f32_data as data;

/// Most floats of a half-precision weight widened at once (16 MiB of f32): 320 to 1344
/// columns of the transformer's weights per block, more than gemm takes in one slice.
const WIDEN_ELEMENTS: usize = 1 << 22;

/// `Σᵢ xᵢ·W[:, colsᵢ]ᵀ + bias`: the inputs `(b, l, kᵢ)` are the column blocks, in order, of
/// one `(b, l, Σkᵢ)` input to `W` `(n, Σkᵢ)`. Returns `(b, l, n)` in f32.
///
/// Each input's rows must be contiguous (any row stride); `W` (f32, bf16 or f16) and
/// `bias` contiguous. Only for f32 inputs on the CPU: see [`is_fast`].
pub fn linear(xs: &[&Tensor], w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (n, k_total) = w.dims2()?;
    let Some(first) = xs.first() else {
        candle_core::bail!("pictor-linear: no input");
    };
    let (b, l, _) = first.dims3()?;
    let m = b * l;
    let mut out = vec![0f32; m * n];
    let mut started = match bias {
        Some(bias) => {
            let bias = bias.to_dtype(DType::F32)?.contiguous()?;
            let held = bias.storage_and_layout();
            let bias = &data(&held.0, held.1)?[..n];
            out.par_chunks_mut(n.max(1))
                .for_each(|row| row.copy_from_slice(bias));
            true
        }
        None => false,
    };
    let w = w.contiguous()?;
    let w_held = w.storage_and_layout();
    let start = w_held.1.start_offset();
    // From the layout's start; an offset past the data leaves an empty slice.
    let (weight, len) = match &*w_held.0 {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let v = v.get(start..).unwrap_or_default();
            (Weight::F32(v), v.len())
        }
        Storage::Cpu(CpuStorage::BF16(v)) => {
            let v = v.get(start..).unwrap_or_default();
            (Weight::Bf16(v), v.len())
        }
        Storage::Cpu(CpuStorage::F16(v)) => {
            let v = v.get(start..).unwrap_or_default();
            (Weight::F16(v), v.len())
        }
        _ => candle_core::bail!("pictor-linear: an f32, bf16 or f16 weight on the CPU"),
    };
    if len < n * k_total {
        candle_core::bail!("pictor-linear: weight shorter than its layout");
    }
    let mut scratch = Vec::new();
    let mut col = 0;
    for x in xs {
        let (xb, xl, k) = x.dims3()?;
        // The gemm reads (b·l, k) rows evenly spaced: other views are copied first.
        let even = |s: &[usize]| s[2] == 1 && (b <= 1 || s[0] == l * s[1]);
        let x = if even(x.stride()) {
            (*x).clone()
        } else {
            x.contiguous()?
        };
        let stride = x.stride();
        let row_stride = stride[1];
        if (xb, xl) != (b, l) || !even(stride) {
            candle_core::bail!(
                "pictor-linear: input {:?} with strides {stride:?} for {b}×{l} rows",
                x.dims()
            );
        }
        if col + k > k_total {
            candle_core::bail!("pictor-linear: inputs wider than the weight's {k_total}");
        }
        let held = x.storage_and_layout();
        let src = data(&held.0, held.1)?;
        if m > 0 && src.len() < (m - 1) * row_stride + k {
            candle_core::bail!("pictor-linear: input shorter than its layout");
        }
        if let Weight::Bf16(w) = weight
            && super::dpbf16::available()
        {
            let ops = super::dpbf16::Operands {
                x: src,
                m,
                row_stride,
                k,
                w: w.reinterpret_cast(),
                n,
                k_total,
                col,
            };
            // The output holds the bias, or zeros: the products add to it.
            super::dpbf16::add_products(&mut out, &ops)?;
            started = true;
            col += k;
            continue;
        }
        // Blocks of the input's columns: all of them for an f32 weight, read in place
        // (element (kk, j) of Wᵀ is w[j·k_total + col + kk]); for a half one, as many as
        // fit the scratch, widened into (n, width) rows.
        let per = match weight {
            Weight::F32(_) => k.max(1),
            _ => (WIDEN_ELEMENTS / n.max(1) / 64 * 64).clamp(64, k.max(64)),
        };
        for at in (0..k).step_by(per) {
            let width = per.min(k - at);
            let cols = (n, k_total, col + at, width);
            let (rhs, rhs_stride) = match weight {
                Weight::F32(w) => (&w[col + at..], k_total),
                // bf16 is the top half of an f32: widening is a shift.
                Weight::Bf16(w) => (
                    widen(w, cols, &mut scratch, |v| {
                        f32::from_bits(u32::from(v.to_bits()) << 16)
                    }),
                    width,
                ),
                Weight::F16(w) => (widen(w, cols, &mut scratch, f16::to_f32), width),
            };
            // SAFETY: dst is (m, n) row-major; lhs is columns at..at+width of (m, k) rows
            // `row_stride` apart with unit columns, in bounds (checked above); rhs is
            // (width, n) with element (kk, j) at rhs[j·rhs_stride + kk]: the weight holds
            // n·k_total floats from which rhs starts at col + at, with col + at + width ≤
            // k_total, or the scratch holds n·width.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    width,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    started,
                    src.as_ptr().add(at),
                    1,
                    row_stride as isize,
                    rhs.as_ptr(),
                    rhs_stride as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
            started = true;
        }
        col += k;
    }
    if col != k_total {
        candle_core::bail!("pictor-linear: inputs of {col} columns for a weight of {k_total}");
    }
    Tensor::from_vec(out, (b, l, n), first.device())
}

/// A weight's data from its layout's start.
#[derive(Clone, Copy)]
enum Weight<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// Columns `from..from + width` of the `(n, k_total)` weight `w` as f32 rows of `width`
/// in `scratch` (resized to `n·width`), in parallel; returns them.
fn widen<'s, T: Copy + Sync>(
    w: &[T],
    (n, k_total, from, width): (usize, usize, usize, usize),
    scratch: &'s mut Vec<f32>,
    f: impl Fn(T) -> f32 + Sync,
) -> &'s [f32] {
    scratch.resize(n * width, 0f32);
    scratch
        .par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(j, row)| {
            for (d, &s) in row.iter_mut().zip(&w[j * k_total + from..][..width]) {
                *d = f(s);
            }
        });
    &scratch[..]
}

/// Whether [`linear`] can take `x` and `w`: an f32 CPU input of rank 3 with unit column
/// stride, and an f32, bf16 or f16 weight on the CPU.
pub fn is_fast(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && x.rank() == 3
        && x.stride().last() == Some(&1)
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device};

    use super::*;

    /// Against candle's matmul in f32: two column-block inputs (one a strided view), with
    /// and without a bias, for f32 weights and for bf16/f16 weights (against their f32
    /// widening, and for bf16 on a CPU with native bf16 products against the input rounded
    /// to bf16 too), with the input wider than one block of the scratch.
    #[test]
    fn linear_matches_candle_for_each_weight_dtype() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // n = 20 000 takes 192 columns per block: both inputs take several, the last short.
        let (b, l, k1, k2, n) = (2, 9, 300, 400, 20_000);
        let wide = Tensor::randn(0f32, 1.0, (b, l, k1 + 50), &dev)?;
        let x1 = wide.narrow(D::Minus1, 10, k1)?;
        let x2 = Tensor::randn(0f32, 1.0, (b, l, k2), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, n, &dev)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let w = Tensor::randn(0f32, 0.05, (n, k1 + k2), &dev)?.to_dtype(dtype)?;
            let w32 = w.to_dtype(DType::F32)?;
            let mut x = Tensor::cat(&[&x1, &x2], D::Minus1)?;
            if dtype == DType::BF16 && super::super::dpbf16::available() {
                // The native bf16 products take the activations rounded to bf16.
                x = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            }
            let want = x.broadcast_matmul(&w32.t()?)?;
            for bias in [None, Some(&bias)] {
                let want = match bias {
                    Some(bias) => want.broadcast_add(bias)?,
                    None => want.clone(),
                };
                let got = linear(&[&x1, &x2], &w, bias)?;
                let diff = (got - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "{dtype:?}, bias {}: max |diff| {diff}",
                    bias.is_some()
                );
            }
        }
        Ok(())
    }
}
