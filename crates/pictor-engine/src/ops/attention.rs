//! FLUX's self-attention for f32 tensors on the CPU, from the fused q/k/v projections to
//! the `(b, l, heads·d)` rows that the output projection reads, in two passes.
//!
//! Written with candle's ops, this step was about twenty passes over the activations
//! (strided slices, RMS norm as six elementwise ops, concatenation, rotary embedding as
//! broadcasts, the 1/√d scale, contiguous copies, and the transposes back), each one a
//! fresh tensor, plus the `(heads, l, l)` score matrix in 256 MB blocks at 1024².
//! Here:
//! 1. one pass reads each token's q, k and v once, RMS-normalises q and k, rotates them,
//!    scales q by 1/√d and writes the three as `(b, heads, l, d)`;
//! 2. per (image, head, block of [`ROWS`] queries), one gemm makes the block's scores in a
//!    per-thread buffer that stays in cache, the softmax runs in place (with a vectorised
//!    `exp`), and a second gemm writes the block's output straight into its columns of
//!    the `(b, l, heads·d)` result, normalised by each row's sum afterwards.
//!
//! Blocks run in parallel; each gemm runs on its own thread. Every query row's softmax is
//! independent of the other rows, so blocking changes no result.

use candle_core::Tensor;
use rayon::prelude::*;

use super::{Out, exp, f32_data, wide};

/// Queries per task: a block's scores are `ROWS × l` floats (4.5 MB at 1024²).
const ROWS: usize = 256;

/// One stream's fused q/k/v projection and its q and k RMS-norm scales (`d` each).
pub struct QkvPart<'a> {
    /// `(b, l, ≥ 3·heads·d)` with contiguous rows: q, k and v in the first `3·heads·d`
    /// columns, head-major (a narrowed view of a wider projection is fine).
    pub qkv: &'a Tensor,
    /// The query norm's scale.
    pub q_scale: &'a Tensor,
    /// The key norm's scale.
    pub k_scale: &'a Tensor,
}

/// Attention over the tokens of `parts`, concatenated in order (a double block's text and
/// image streams, or a single block's one), each part's q and k normalised with its own
/// scales and `eps`. `pe` is the rotary table `(b or 1, 1, Σl_i, d/2, 2, 2)`. Returns
/// `(b, Σl_i, heads·d)`.
///
/// Only for f32 tensors on the CPU whose rows are contiguous; the caller keeps candle's
/// ops for the rest.
pub fn flux_attention(
    parts: &[QkvPart],
    heads: usize,
    eps: f32,
    pe: &Tensor,
) -> candle_core::Result<Tensor> {
    let Some(first) = parts.first() else {
        candle_core::bail!("pictor-attention: no tokens");
    };
    let d = first.q_scale.dim(0)?;
    let hidden = heads * d;
    let b = first.qkv.dim(0)?;
    let mut sources = Vec::with_capacity(parts.len());
    let mut tokens = 0;
    for part in parts {
        let p = part.qkv;
        let (pb, l, width) = p.dims3()?;
        let stride = p.stride();
        if pb != b || width < 3 * hidden || stride[2] != 1 {
            candle_core::bail!(
                "pictor-attention: part {:?} (strides {stride:?}) for {b} images of {heads} \
                 heads of {d}",
                p.dims()
            );
        }
        let scales = (
            part.q_scale.to_vec1::<f32>()?,
            part.k_scale.to_vec1::<f32>()?,
        );
        if scales.0.len() != d || scales.1.len() != d {
            candle_core::bail!("pictor-attention: norm scales of {d} expected");
        }
        sources.push((p, tokens, l, (stride[0], stride[1]), scales));
        tokens += l;
    }
    let pe = pe.contiguous()?;
    let pe_b = pe.dim(0)?;
    if pe.elem_count() != pe_b * tokens * d * 2 || (pe_b != 1 && pe_b != b) {
        candle_core::bail!(
            "pictor-attention: rotary table {:?} for {tokens}",
            pe.dims()
        );
    }
    let pe_held = pe.storage_and_layout();
    let rope = f32_data(&pe_held.0, pe_held.1)?;

    // Pass 1: q, k, v as (b, heads, tokens, d).
    let size = b * heads * tokens * d;
    let (mut q, mut k, mut v) = (vec![0f32; size], vec![0f32; size], vec![0f32; size]);
    let (qo, ko, vo) = (
        Out(q.as_mut_ptr()),
        Out(k.as_mut_ptr()),
        Out(v.as_mut_ptr()),
    );
    for (part, first, l, (sb, sl), (q_scale, k_scale)) in &sources {
        let (first, l, sb, sl) = (*first, *l, *sb, *sl);
        let prep = Prep {
            heads,
            d,
            tokens,
            q_scale,
            k_scale,
            eps,
            softmax_scale: 1.0 / (d as f32).sqrt(),
        };
        let held = part.storage_and_layout();
        let data = f32_data(&held.0, held.1)?;
        (0..b * l).into_par_iter().for_each(|i| {
            let (bi, r) = (i / l, i % l);
            let row = &data[bi * sb + r * sl..][..3 * hidden];
            let t = first + r;
            let cis = &rope[((bi % pe_b) * tokens + t) * d * 2..][..d * 2];
            // SAFETY: token `t` of image `bi` owns rows (bi, ·, t) of q, k and v, and no
            // other task writes them.
            unsafe { prep.token(row, cis, (bi * heads * tokens + t) * d, (qo, ko, vo)) };
        });
    }

    // Pass 2: softmax(q·kᵀ)·v per block of queries, into (b, tokens, heads·d).
    let mut out = vec![0f32; b * tokens * hidden];
    let dst = Out(out.as_mut_ptr());
    let blocks = tokens.div_ceil(ROWS);
    (0..b * heads * blocks).into_par_iter().for_each_init(
        || vec![0f32; ROWS * tokens],
        |scores, task| {
            let (bh, start) = (task / blocks, (task % blocks) * ROWS);
            let rows = ROWS.min(tokens - start);
            let head = bh * tokens * d;
            let at = (bh / heads * tokens + start) * hidden + (bh % heads) * d;
            // SAFETY: this task alone writes rows start..start+rows of head `bh % heads`
            // of image `bh / heads`; q, k, v are read only.
            unsafe {
                block(
                    &q[head + start * d..],
                    &k[head..],
                    &v[head..],
                    scores,
                    dst.get().add(at),
                    (rows, tokens, d, hidden),
                );
            }
        },
    );
    Tensor::from_vec(out, (b, tokens, hidden), first.qkv.device())
}

struct Prep<'a> {
    heads: usize,
    d: usize,
    tokens: usize,
    q_scale: &'a [f32],
    k_scale: &'a [f32],
    eps: f32,
    softmax_scale: f32,
}

impl Prep<'_> {
    /// Writes one token's q, k and v for every head, at `at + head·tokens·d` of each.
    ///
    /// # Safety
    /// The `d` floats at each of those places must be this call's alone to write.
    unsafe fn token(&self, row: &[f32], cis: &[f32], at: usize, (q, k, v): (Out, Out, Out)) {
        let (d, hidden) = (self.d, self.heads * self.d);
        for h in 0..self.heads {
            let to = at + h * self.tokens * d;
            // SAFETY: the caller's contract.
            let (qd, kd, vd) = unsafe {
                (
                    std::slice::from_raw_parts_mut(q.get().add(to), d),
                    std::slice::from_raw_parts_mut(k.get().add(to), d),
                    std::slice::from_raw_parts_mut(v.get().add(to), d),
                )
            };
            let src = |i: usize| &row[i * hidden + h * d..][..d];
            self.norm_rope(src(0), self.q_scale, cis, self.softmax_scale, qd);
            self.norm_rope(src(1), self.k_scale, cis, 1.0, kd);
            vd.copy_from_slice(src(2));
        }
    }

    /// `dst = rope(rms_norm(x)·scale)·factor`, rotating pairs (2i, 2i+1) by `cis`.
    fn norm_rope(&self, x: &[f32], scale: &[f32], cis: &[f32], factor: f32, dst: &mut [f32]) {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let inv = factor / (mean_sq + self.eps).sqrt();
        for ((pair, s), (c, out)) in x
            .chunks_exact(2)
            .zip(scale.chunks_exact(2))
            .zip(cis.chunks_exact(4).zip(dst.chunks_exact_mut(2)))
        {
            let (x0, x1) = (pair[0] * s[0] * inv, pair[1] * s[1] * inv);
            out[0] = c[0] * x0 + c[1] * x1;
            out[1] = c[2] * x0 + c[3] * x1;
        }
    }
}

/// One block of `rows` queries against all `tokens` keys of one head, written at `dst`
/// (rows `hidden` apart).
///
/// # Safety
/// `dst` must point at `rows` rows of `d` writable floats, `hidden` apart, that no one else
/// reads or writes meanwhile; `q` holds `rows·d` floats, `k` and `v` `tokens·d`.
unsafe fn block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scores: &mut [f32],
    dst: *mut f32,
    (rows, tokens, d, hidden): (usize, usize, usize, usize),
) {
    let scores = &mut scores[..rows * tokens];
    // SAFETY: q is (rows, d), k is (tokens, d) read as kᵀ (d, tokens), scores is
    // (rows, tokens); all row-major and in bounds.
    unsafe {
        gemm::gemm(
            rows,
            tokens,
            d,
            scores.as_mut_ptr(),
            1,
            tokens as isize,
            false,
            q.as_ptr(),
            1,
            d as isize,
            k.as_ptr(),
            d as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    let mut sums = [0f32; ROWS];
    wide(
        #[inline(always)]
        || softmax_rows(scores, tokens, &mut sums),
    );
    // SAFETY: scores (rows, tokens) times v (tokens, d) into dst (rows, d) with row
    // stride `hidden`, which the caller owns.
    unsafe {
        gemm::gemm(
            rows,
            d,
            tokens,
            dst,
            1,
            hidden as isize,
            false,
            scores.as_ptr(),
            1,
            tokens as isize,
            v.as_ptr(),
            1,
            d as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        for (r, &sum) in sums.iter().enumerate().take(rows) {
            let out = std::slice::from_raw_parts_mut(dst.add(r * hidden), d);
            let inv = 1.0 / sum;
            out.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// Folds `xs` with `f` in 8 independent lanes, then folds the lanes.
#[inline(always)]
fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    let lanes = acc.into_iter().fold(init, &f);
    tail.iter().fold(lanes, |a, &x| f(a, x))
}

/// Replaces each `tokens`-long row of `scores` by `exp(x - max)` and writes its sum.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], tokens: usize, sums: &mut [f32]) {
    for (row, sum) in scores.chunks_exact_mut(tokens).zip(sums) {
        // Three loops the compiler vectorises: a lane-wise max, a plain map, a lane-wise
        // sum (one loop with a running sum would stay scalar).
        let max = lanes(row, f32::NEG_INFINITY, |a, x| if x > a { x } else { a });
        for x in row.iter_mut() {
            *x = exp(*x - max);
        }
        *sum = lanes(row, 0.0, |a, x| a + x);
    }
}
