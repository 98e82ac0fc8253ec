//! Dense linear layers for f32 tensors on the CPU: `x·Wᵀ + b` as one gemm into a buffer
//! that starts as the bias rows, and `[x₁ x₂]·Wᵀ` without concatenating the inputs.
//!
//! candle's matmul zero-fills its output, runs gemm into it, and the bias then takes a
//! second pass into a third tensor; a single block's second layer also needed its two
//! inputs copied side by side first (267 MB at 1024²). Here the output is written once
//! and each input is read where it lies, whatever its row stride.

use candle_core::Tensor;
use rayon::prelude::*;

use super::f32_data as data;

/// `Σᵢ xᵢ·W[:, colsᵢ]ᵀ + bias`: the inputs `(b, l, kᵢ)` are the column blocks, in order, of
/// one `(b, l, Σkᵢ)` input to `W` `(n, Σkᵢ)`. Returns `(b, l, n)`.
///
/// Each input's rows must be contiguous (any row stride); `W` and `bias` contiguous. Only
/// for f32 on the CPU: see [`is_fast`].
pub fn linear(xs: &[&Tensor], w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (n, k_total) = w.dims2()?;
    let Some(first) = xs.first() else {
        candle_core::bail!("pictor-linear: no input");
    };
    let (b, l, _) = first.dims3()?;
    let m = b * l;
    let mut out = vec![0f32; m * n];
    let read_dst = match bias {
        Some(bias) => {
            let bias = bias.contiguous()?;
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
    let weight = data(&w_held.0, w_held.1)?;
    let mut col = 0;
    for (i, x) in xs.iter().enumerate() {
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
        // SAFETY: dst is (m, n) row-major; lhs is (m, k) with rows `row_stride` apart and
        // unit columns, in bounds (checked above); rhs is Wᵀ's rows col..col+k: element
        // (kk, j) of Wᵀ is weight[j·k_total + col + kk], in bounds as col + k ≤ k_total.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                read_dst || i > 0,
                src.as_ptr(),
                1,
                row_stride as isize,
                weight.as_ptr().add(col),
                k_total as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            );
        }
        col += k;
    }
    if col != k_total {
        candle_core::bail!("pictor-linear: inputs of {col} columns for a weight of {k_total}");
    }
    Tensor::from_vec(out, (b, l, n), first.device())
}

/// Whether [`linear`] can take `x` and `w`: f32 CPU tensors, `x` of rank 3 with unit
/// column stride.
pub fn is_fast(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && x.rank() == 3
        && x.stride().last() == Some(&1)
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}
