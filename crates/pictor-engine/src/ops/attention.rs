//! FLUX's self-attention for f32 tensors on the CPU, from the fused q/k/v projections to
//! the `(b, l, heads·d)` rows that the output projection reads, in two passes.
//!
//! Written with candle's ops, this step was about twenty passes over the activations
//! (strided slices, RMS norm as six elementwise ops, concatenation, rotary embedding as
//! broadcasts, the 1/√d scale, contiguous copies, and the transposes back), each one a
//! fresh tensor, plus the `(heads, l, l)` score matrix in 256 MB blocks at 1024².
//! Here:
//! 1. one pass over each token's q and k RMS-normalises them, rotates them and scales q by
//!    1/√d, in place in the projection: no copy of q, k or v is made (at 1024² a copy was
//!    160 MB, most of a single block's peak memory besides its weights);
//! 2. per (image, head), the head's keys and values are gathered from every part into
//!    contiguous rows (2 × 2.2 MB at 1024², per head in flight), then per block of [`ROWS`]
//!    queries, read where they lie, one gemm makes the block's scores in a per-thread
//!    buffer that stays in cache, the softmax runs in place (with a vectorised `exp`), and
//!    a second gemm writes the block's output straight into its columns of the
//!    `(b, l, heads·d)` result, normalised by each row's sum afterwards.
//!
//! Blocks run in parallel; each gemm runs on its own thread. Every query row's softmax is
//! independent of the other rows, so blocking changes no result.

use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use rayon::prelude::*;

use super::{Out, exp, f32_data, wide};

/// Queries per task: a block's scores are `ROWS × l` floats (4.5 MB at 1024²).
const ROWS: usize = 256;

/// One stream's fused q/k/v projection and its q and k RMS-norm scales (`d` each).
pub struct QkvPart<'a> {
    /// `(b, l, ≥ 3·heads·d)` with contiguous rows: q, k and v in the first `3·heads·d`
    /// columns, head-major (a narrowed view of a wider projection is fine). Its q and k
    /// columns are overwritten (see [`flux_attention`]); v and any further columns are not.
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
/// Each part's q and k columns are normalised, rotated and scaled **in place**: pass fresh
/// projections that nothing reads afterwards (a part whose rows overlap is copied first).
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
        let (pb, l, width) = part.qkv.dims3()?;
        if pb != b || width < 3 * hidden || part.qkv.stride()[2] != 1 {
            candle_core::bail!(
                "pictor-attention: part {:?} (strides {:?}) for {b} images of {heads} heads \
                 of {d}",
                part.qkv.dims(),
                part.qkv.stride()
            );
        }
        let qkv = if disjoint_rows(part.qkv.layout(), 3 * hidden) {
            part.qkv.clone()
        } else {
            part.qkv.contiguous()?
        };
        let scales = (
            part.q_scale.to_vec1::<f32>()?,
            part.k_scale.to_vec1::<f32>()?,
        );
        if scales.0.len() != d || scales.1.len() != d {
            candle_core::bail!("pictor-attention: norm scales of {d} expected");
        }
        sources.push((qkv, tokens, l, scales));
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

    // Pass 1: q and k normalised, rotated and scaled where they lie.
    {
        let pe_held = pe.storage_and_layout();
        let rope = f32_data(&pe_held.0, pe_held.1)?;
        for (qkv, first, _, (q_scale, k_scale)) in &sources {
            qkv.inplace_op1(&Prep {
                heads,
                d,
                first: *first,
                tokens,
                q_scale,
                k_scale,
                eps,
                softmax_scale: 1.0 / (d as f32).sqrt(),
                rope,
                pe_b,
            })?;
        }
    }

    // Pass 2: softmax(q·kᵀ)·v per block of queries, into (b, tokens, heads·d).
    let held: Vec<_> = sources.iter().map(|s| s.0.storage_and_layout()).collect();
    let mut reads = Vec::with_capacity(sources.len());
    for ((_, first, l, _), (storage, layout)) in sources.iter().zip(&held) {
        // Pass 1 checked that the rows lie within the data.
        let stride = layout.stride();
        reads.push(Read {
            data: f32_data(storage, layout)?,
            first: *first,
            l: *l,
            image_stride: stride[0],
            row_stride: stride[1],
        });
    }
    // Every part's query rows, in blocks of at most ROWS.
    let blocks: Vec<(usize, usize, usize)> = reads
        .iter()
        .enumerate()
        .flat_map(|(p, r)| {
            (0..r.l)
                .step_by(ROWS)
                .map(move |s| (p, s, ROWS.min(r.l - s)))
        })
        .collect();
    let mut out = vec![0f32; b * tokens * hidden];
    let dst = Out(out.as_mut_ptr());
    let geometry = Geometry { tokens, d, hidden };
    (0..b * heads).into_par_iter().for_each(|task| {
        let (image, col) = (task / heads, task % heads * d);
        // This head's keys and values from every part, gathered once into contiguous
        // (tokens, d) rows: each block's gemms pack them again, and packing them from rows
        // a projection's width apart touches a page per row.
        let (mut k, mut v) = (vec![0f32; tokens * d], vec![0f32; tokens * d]);
        for part in &reads {
            for (r, (k, v)) in k[part.first * d..(part.first + part.l) * d]
                .chunks_exact_mut(d)
                .zip(v[part.first * d..].chunks_exact_mut(d))
                .enumerate()
            {
                let row = &part.at(image, r * part.row_stride)[..3 * hidden];
                k.copy_from_slice(&row[hidden + col..][..d]);
                v.copy_from_slice(&row[2 * hidden + col..][..d]);
            }
        }
        blocks.par_iter().for_each_init(
            || vec![0f32; ROWS * tokens],
            |scores, &(p, start, rows)| {
                let part = &reads[p];
                let q = part.at(image, start * part.row_stride + col);
                let at = (image * tokens + part.first + start) * hidden + col;
                // SAFETY: this task alone writes rows start..start+rows of part p's tokens
                // in this head of this image; q, k and v are read only.
                unsafe {
                    block(
                        (q, part.row_stride),
                        (&k, &v),
                        rows,
                        scores,
                        dst.get().add(at),
                        geometry,
                    );
                }
            },
        );
    });
    drop(held);
    Tensor::from_vec(out, (b, tokens, hidden), first.qkv.device())
}

/// Whether `layout`'s `(b, l, ≥ width)` rows of `width` floats never overlap, so that each
/// can be written by its own task.
fn disjoint_rows(layout: &Layout, width: usize) -> bool {
    let (dims, stride) = (layout.dims(), layout.stride());
    dims.len() == 3
        && (dims[1] <= 1 || stride[1] >= width)
        && (dims[0] <= 1 || stride[0] >= dims[1] * stride[1].max(width))
}

/// The floats from `layout`'s start that its `(b, l)` rows of `width` span.
fn extent(layout: &Layout, width: usize) -> usize {
    let (dims, stride) = (layout.dims(), layout.stride());
    match dims {
        [b, l, _] if b * l > 0 => (b - 1) * stride[0] + (l - 1) * stride[1] + width,
        _ => 0,
    }
}

/// One part's projection, read in pass 2.
struct Read<'a> {
    data: &'a [f32],
    /// The index of its first token among all parts'.
    first: usize,
    l: usize,
    image_stride: usize,
    row_stride: usize,
}

impl Read<'_> {
    /// The data from `offset` floats into `image`'s rows (row r, column c is at
    /// `r·row_stride + c`).
    fn at(&self, image: usize, offset: usize) -> &[f32] {
        &self.data[image * self.image_stride + offset..]
    }
}

#[derive(Clone, Copy)]
struct Geometry {
    tokens: usize,
    d: usize,
    hidden: usize,
}

/// Pass 1 over one part, as an in-place op on its projection.
struct Prep<'a> {
    heads: usize,
    d: usize,
    /// The part's first token among all parts' (its row in the rotary table).
    first: usize,
    tokens: usize,
    q_scale: &'a [f32],
    k_scale: &'a [f32],
    eps: f32,
    softmax_scale: f32,
    rope: &'a [f32],
    pe_b: usize,
}

impl InplaceOp1 for Prep<'_> {
    fn name(&self) -> &'static str {
        "pictor-attention-prep"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("{} takes f32", self.name());
        };
        let hidden = self.heads * self.d;
        let (b, l, _) = layout.shape().dims3()?;
        let (sb, sl) = (layout.stride()[0], layout.stride()[1]);
        let data = &mut data[layout.start_offset()..];
        if !disjoint_rows(layout, 3 * hidden) || data.len() < extent(layout, 3 * hidden) {
            candle_core::bail!("{}: rows overlap or run past the data", self.name());
        }
        let base = Out(data.as_mut_ptr());
        (0..b * l).into_par_iter().for_each(|i| {
            let (image, r) = (i / l, i % l);
            let t = self.first + r;
            let cis =
                &self.rope[((image % self.pe_b) * self.tokens + t) * self.d * 2..][..self.d * 2];
            // SAFETY: row (image, r)'s first 2·hidden floats are in bounds (checked above)
            // and no other task's (the rows are disjoint).
            let row = unsafe {
                std::slice::from_raw_parts_mut(base.get().add(image * sb + r * sl), 2 * hidden)
            };
            let (q, k) = row.split_at_mut(hidden);
            for (q, k) in q.chunks_exact_mut(self.d).zip(k.chunks_exact_mut(self.d)) {
                self.norm_rope(q, self.q_scale, cis, self.softmax_scale);
                self.norm_rope(k, self.k_scale, cis, 1.0);
            }
        });
        Ok(())
    }
}

impl Prep<'_> {
    /// `x ← rope(rms_norm(x)·scale)·factor`, rotating pairs (2i, 2i+1) by `cis`.
    fn norm_rope(&self, x: &mut [f32], scale: &[f32], cis: &[f32], factor: f32) {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let inv = factor / (mean_sq + self.eps).sqrt();
        for ((pair, s), c) in x
            .chunks_exact_mut(2)
            .zip(scale.chunks_exact(2))
            .zip(cis.chunks_exact(4))
        {
            let (x0, x1) = (pair[0] * s[0] * inv, pair[1] * s[1] * inv);
            pair[0] = c[0] * x0 + c[1] * x1;
            pair[1] = c[2] * x0 + c[3] * x1;
        }
    }
}

/// One block of `rows` queries (`q`, rows `q_stride` apart) against all `tokens` keys and
/// values of one head (`(tokens, d)` each, contiguous), written at `dst` (rows `hidden`
/// apart).
///
/// # Safety
/// `dst` must point at `rows` rows of `d` writable floats, `hidden` apart, that no one else
/// reads or writes meanwhile; `q` holds `rows` rows of `d`.
unsafe fn block(
    (q, q_stride): (&[f32], usize),
    (k, v): (&[f32], &[f32]),
    rows: usize,
    scores: &mut [f32],
    dst: *mut f32,
    Geometry { tokens, d, hidden }: Geometry,
) {
    let scores = &mut scores[..rows * tokens];
    let q_span = (rows - 1) * q_stride + d;
    assert!(q.len() >= q_span && k.len() >= tokens * d && v.len() >= tokens * d);
    // SAFETY: q is (rows, d) with rows `q_stride` apart, k is (tokens, d) read as kᵀ
    // (d, tokens), scores is (rows, tokens); all in bounds (asserted above).
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
            q_stride as isize,
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
    }
    for (r, &sum) in sums.iter().enumerate().take(rows) {
        // SAFETY: row r of the caller's rows.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.add(r * hidden), d) };
        let inv = 1.0 / sum;
        out.iter_mut().for_each(|o| *o *= inv);
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
