//! Self-attention in the flux transformer: the choice of kernel, and attention from the
//! fused q/k/v projections of one or two streams. On the CPU in f32 it runs on
//! `ops::flux_attention`; elsewhere on candle's ops, with the scores taken in query blocks.
//! The rotary embedding table is built here too.

use candle_core::{D, DType, IndexOp, Tensor};
use candle_nn::RmsNorm;

/// The epsilon of FLUX's query and key RMS norms.
pub(super) const QK_NORM_EPS: f64 = 1e-6;

/// The rotary table `(b, l, dim/2, 2, 2)` of positions `pos` `(b, l)` along one axis, in
/// f32 whatever the compute dtype (as diffusers builds it): bf16 spaces numbers between 64
/// and 128 by 0.5, so an angle there could be off by a quarter of a radian.
pub(super) fn rope(pos: &Tensor, dim: usize, theta: usize) -> candle_core::Result<Tensor> {
    let dev = pos.device();
    let inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1f32 / (theta as f64).powf(i as f64 / dim as f64) as f32)
        .collect();
    let n = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, 1, n), dev)?;
    let freqs = pos
        .to_dtype(DType::F32)?
        .unsqueeze(2)?
        .broadcast_mul(&inv_freq)?;
    let (cos, sin) = (freqs.cos()?, freqs.sin()?);
    let out = Tensor::stack(&[&cos, &sin.neg()?, &sin, &cos], 3)?;
    let (b, n, d, _) = out.dims4()?;
    out.reshape((b, n, d, 2, 2))
}

/// Rotates `x` `(b, h, l, d)` by the f32 table `freq_cis`, in f32, and answers in `x`'s
/// dtype (diffusers' `apply_rotary_emb` does the same).
fn apply_rope(x: &Tensor, freq_cis: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims();
    let (b, h, l, d) = x.dims4()?;
    let x = x.to_dtype(DType::F32)?.reshape((b, h, l, d / 2, 2))?;
    let x0 = x.narrow(D::Minus1, 0, 1)?;
    let x1 = x.narrow(D::Minus1, 1, 1)?;
    let fr0 = freq_cis.get_on_dim(D::Minus1, 0)?;
    let fr1 = freq_cis.get_on_dim(D::Minus1, 1)?;
    (fr0.broadcast_mul(&x0)? + fr1.broadcast_mul(&x1)?)?
        .reshape(dims.to_vec())?
        .to_dtype(dtype)
}

/// Most attention scores held at once by [`AttentionKernel::Blocks`] by default, in
/// elements (256 MB of f32). A 1024² image has 4352 tokens: its 24 heads would need 1.8 GB
/// of scores at once; queries are taken in blocks so that a block's scores stay under
/// this, which changes no result (each query row's softmax is independent of the others).
const SCORE_ELEMENTS: usize = 1 << 26;

/// How attention is computed on the CPU in f32. Other devices and dtypes always use
/// candle's ops in query blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `ops::flux_attention`: norms, rotary embedding and attention in two passes, scores
    /// in cache-sized blocks (the default).
    Fused,
    /// candle's ops, with at most this many scores held at once.
    Blocks(usize),
    /// candle-nn's CPU flash-attention kernel.
    CandleFlash,
}

/// 0: fused, 1: candle's flash kernel, n ≥ 2: blocks of n scores.
static KERNEL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Chooses the attention kernel for the whole process (for benchmarks and tests).
pub fn set_attention_kernel(kernel: AttentionKernel) {
    let code = match kernel {
        AttentionKernel::Fused => 0,
        AttentionKernel::CandleFlash => 1,
        AttentionKernel::Blocks(n) => n.max(2),
    };
    KERNEL.store(code, std::sync::atomic::Ordering::Relaxed);
}

fn attention_kernel() -> AttentionKernel {
    match KERNEL.load(std::sync::atomic::Ordering::Relaxed) {
        0 => AttentionKernel::Fused,
        1 => AttentionKernel::CandleFlash,
        n => AttentionKernel::Blocks(n),
    }
}

/// One stream's fused q/k/v projection with its query and key norms.
type StreamQkv<'a> = (&'a Tensor, &'a RmsNorm, &'a RmsNorm);

/// Attention over the tokens of `parts`, concatenated in order: each is a fused q/k/v
/// projection `(b, l_i, ≥ 3·hidden)` with its stream's query and key norms. Returns
/// `(b, Σl_i, hidden)`. The CPU kernel normalises q and k in place, so the projections'
/// first `2·hidden` columns are not to be read afterwards.
pub(super) fn attend(
    parts: &[StreamQkv],
    heads: usize,
    pe: &Tensor,
) -> candle_core::Result<Tensor> {
    let fast = parts.iter().all(|(p, ..)| {
        p.device().is_cpu() && p.dtype() == DType::F32 && p.stride().last() == Some(&1)
    });
    if fast && attention_kernel() == AttentionKernel::Fused {
        return fused_attention(parts, heads, pe);
    }
    let (q, k, v) = split_streams(parts, heads)?;
    attention(&q, &k, &v, pe)
}

/// [`attend`] on the CPU kernel (f32 CPU tensors with contiguous rows).
fn fused_attention(parts: &[StreamQkv], heads: usize, pe: &Tensor) -> candle_core::Result<Tensor> {
    let parts: Vec<_> = parts
        .iter()
        .map(|(p, q, k)| crate::ops::QkvPart {
            qkv: p,
            q_scale: q.weight(),
            k_scale: k.weight(),
        })
        .collect();
    crate::ops::flux_attention(&parts, heads, QK_NORM_EPS as f32, pe)
}

/// Normalised q, k and v `(b, heads, Σl_i, d)` of the streams, text first, with candle's ops.
fn split_streams(
    parts: &[StreamQkv],
    heads: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
    for (p, q_norm, k_norm) in parts {
        let hidden = heads * q_norm.weight().dim(0)?;
        let qkv = p.narrow(D::Minus1, 0, 3 * hidden)?;
        let (q, k, v) = split_qkv(&qkv, heads, q_norm, k_norm)?;
        qs.push(q);
        ks.push(k);
        vs.push(v);
    }
    let cat = |xs: Vec<Tensor>| -> candle_core::Result<Tensor> {
        if xs.len() == 1 {
            Ok(xs.into_iter().next().expect("one part"))
        } else {
            Tensor::cat(&xs, 2)
        }
    };
    Ok((cat(qs)?, cat(ks)?, cat(vs)?))
}

/// Rotary embedding, then softmax attention over all heads with candle's ops; returns
/// `(b, l, h·d)`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pe: &Tensor) -> candle_core::Result<Tensor> {
    match attention_kernel() {
        AttentionKernel::CandleFlash if q.device().is_cpu() && q.dtype() == DType::F32 => {
            let (q, k) = (apply_rope(q, pe)?, apply_rope(k, pe)?);
            let bshd = |t: &Tensor| t.transpose(1, 2)?.contiguous();
            let scale = 1.0 / (q.dim(D::Minus1)? as f32).sqrt();
            candle_nn::attention::flash_attn::<f32>(
                &bshd(&q)?,
                &bshd(&k)?,
                &bshd(v)?,
                scale,
                candle_nn::attention::AttnMask::None,
                None,
                None,
            )?
            // The kernel answers (b, h, l, d).
            .transpose(1, 2)?
            .flatten_from(2)
        }
        AttentionKernel::Blocks(n) => attention_in_blocks(q, k, v, pe, n),
        _ => attention_in_blocks(q, k, v, pe, SCORE_ELEMENTS),
    }
}

fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pe: &Tensor,
    score_elements: usize,
) -> candle_core::Result<Tensor> {
    // The 1/√d scale goes on the queries, not on the scores: l·d elements instead of l²
    // (35× fewer at 1024²), and candle's scalar multiply runs on one thread.
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    // q and k (rotated, scaled) in f32, and so the scores and their softmax, whatever the
    // compute dtype, as flash attention keeps them: rounded to bf16, a score of 20 could
    // be off by 0.06 and its weight by 6 %. The weights go back to the compute dtype for
    // the product with v (accumulated in f32 by the GEMM), as flash attention does too.
    let q = (apply_rope(q, pe)?.to_dtype(DType::F32)? * scale)?.contiguous()?;
    let k = apply_rope(k, pe)?.to_dtype(DType::F32)?.contiguous()?;
    let (b, h, l, d) = q.dims4()?;
    let q = q.reshape((b * h, l, d))?;
    let kt = k.reshape((b * h, l, d))?.t()?;
    let v = v.contiguous()?.reshape((b * h, l, d))?;
    let rows = (score_elements / (b * h * l).max(1)).clamp(1, l);
    let mut blocks = Vec::with_capacity(l.div_ceil(rows));
    for start in (0..l).step_by(rows) {
        let q = q.narrow(1, start, rows.min(l - start))?;
        let weights = candle_nn::ops::softmax_last_dim(&q.matmul(&kt)?)?;
        blocks.push(weights.to_dtype(v.dtype())?.matmul(&v)?);
    }
    let out = if blocks.len() == 1 {
        blocks.remove(0)
    } else {
        Tensor::cat(&blocks, 1)?
    };
    out.reshape((b, h, l, d))?.transpose(1, 2)?.flatten_from(2)
}

/// q, k, v `(b, heads, l, head_dim)` from a fused projection's first `3·hidden` columns.
fn split_qkv(
    qkv: &Tensor,
    heads: usize,
    q_norm: &RmsNorm,
    k_norm: &RmsNorm,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, l, _) = qkv.dims3()?;
    let qkv = qkv.reshape((b, l, 3, heads, ()))?;
    let q = qkv.i((.., .., 0))?.transpose(1, 2)?.apply(q_norm)?;
    let k = qkv.i((.., .., 1))?.transpose(1, 2)?.apply(k_norm)?;
    let v = qkv.i((.., .., 2))?.transpose(1, 2)?;
    Ok((q, k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_in_query_blocks_equals_all_at_once() {
        let dev = candle_core::Device::Cpu;
        let (b, h, l, d) = (2, 3, 37, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let ids = Tensor::arange(0f32, (l * 3) as f32, &dev)
            .unwrap()
            .reshape((1, l, 3))
            .unwrap();
        let pe = {
            let parts: Vec<Tensor> = [2usize, 2, 4]
                .iter()
                .enumerate()
                .map(|(i, &dim)| rope(&ids.get_on_dim(D::Minus1, i).unwrap(), dim, 10_000).unwrap())
                .collect();
            Tensor::cat(&parts, 2).unwrap().unsqueeze(1).unwrap()
        };
        let whole = attention_in_blocks(&q, &k, &v, &pe, usize::MAX).unwrap();
        set_attention_kernel(AttentionKernel::CandleFlash);
        let flash = attention(&q, &k, &v, &pe).unwrap();
        set_attention_kernel(AttentionKernel::Fused);
        let diff = (&whole - flash).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            diff.to_scalar::<f32>().unwrap() < 1e-5,
            "candle's flash kernel agrees"
        );
        // 6 heads × 37 keys per row: 5 rows per block, so 8 blocks, the last one short.
        let blocks = attention_in_blocks(&q, &k, &v, &pe, 6 * 37 * 5).unwrap();
        let diff = (whole - blocks).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    /// In bf16 the scores and their softmax are taken in f32: with scores in the tens (as
    /// FLUX's are), attention on bf16 inputs is within bf16's rounding of the output of
    /// attention in f32 on the same (rounded) inputs, where bf16 scores would be ~10×
    /// further off.
    #[test]
    fn bf16_attention_keeps_scores_in_f32() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let (b, h, l, d) = (1, 2, 64, 32);
        let round = |t: Tensor| t.to_dtype(DType::BF16);
        let q = round(Tensor::randn(0f32, 3.0, (b, h, l, d), &dev)?)?;
        let k = round(Tensor::randn(0f32, 3.0, (b, h, l, d), &dev)?)?;
        let v = round(Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?)?;
        // Position 0 everywhere: the rotation is the identity, so rounding its output
        // (which diffusers does too) does not blur what is measured.
        let ids = Tensor::zeros((1, l), DType::F32, &dev)?;
        let pe = rope(&ids, d, 10_000)?.unsqueeze(1)?;
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
        let exact = attention_in_blocks(&f32_of(&q)?, &f32_of(&k)?, &f32_of(&v)?, &pe, 1 << 20)?;
        let ours = attention_in_blocks(&q, &k, &v, &pe, 1 << 20)?.to_dtype(DType::F32)?;
        let err = (&ours - &exact)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // The same attention with its scores rounded to bf16 before the softmax.
        let scale = 1.0 / (d as f64).sqrt();
        let (qr, kr) = (apply_rope(&q, &pe)?, apply_rope(&k, &pe)?);
        let scores = ((qr.matmul(&kr.t()?)? * scale)?).to_dtype(DType::BF16)?;
        let rough = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .matmul(&f32_of(&v)?)?
            .transpose(1, 2)?
            .flatten_from(2)?;
        let rough_err = (&rough - &exact)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 0.02, "bf16 attention off by {err}");
        assert!(
            rough_err > 4.0 * err,
            "bf16 scores: {rough_err}, f32 scores: {err}"
        );
        Ok(())
    }

    /// In bf16 the rotary embedding is the f32 result rounded once, at positions far past
    /// those bf16 holds exactly, and its table is the f64 cosine and sine to f32 precision.
    #[test]
    fn rope_is_computed_in_f32_for_bf16_activations() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let (h, l, d) = (2, 700, 16);
        let pos = Tensor::arange(0u32, l as u32, &dev)?
            .to_dtype(DType::F32)?
            .reshape((1, l))?;
        let pe = rope(&pos, d, 10_000)?;
        assert_eq!(pe.dtype(), DType::F32);
        let table = pe.flatten_all()?.to_vec1::<f32>()?;
        for (p, row) in table.chunks(d / 2 * 4).enumerate() {
            for (i, rot) in row.chunks(4).enumerate() {
                let angle = p as f64 / 10_000f64.powf(2.0 * i as f64 / d as f64);
                let want = [angle.cos(), -angle.sin(), angle.sin(), angle.cos()];
                for (got, want) in rot.iter().zip(want) {
                    assert!(
                        (f64::from(*got) - want).abs() < 1e-4,
                        "position {p}, pair {i}"
                    );
                }
            }
        }
        let pe = pe.unsqueeze(1)?;
        let x = Tensor::randn(0f32, 1.0, (1, h, l, d), &dev)?.to_dtype(DType::BF16)?;
        let want = apply_rope(&x.to_dtype(DType::F32)?, &pe)?;
        let got = apply_rope(&x, &pe)?;
        assert_eq!(got.dtype(), DType::BF16);
        // One rounding to bf16: within 2⁻⁸ of the value.
        let err = (got.to_dtype(DType::F32)? - &want)?.abs()?;
        let bound = ((want.abs()? * (1.0 / 256.0))? + 1e-6)?;
        let over = err.gt(&bound)?.to_dtype(DType::F32)?.sum_all()?;
        assert_eq!(over.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    /// The fused CPU kernel against candle's ops: two streams with their own norms (text
    /// then image, as in a double block), a part wider than q/k/v (as in a single block),
    /// two images, and more tokens than one block of queries.
    #[test]
    fn fused_attention_equals_candle_ops() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let (b, h, d) = (2, 3, 8);
        let hidden = h * d;
        let (l_txt, l_img) = (37, 150);
        let ids = Tensor::arange(0f32, ((l_txt + l_img) * 3) as f32, &dev)?
            .affine(0.1, 0.0)?
            .reshape((1, l_txt + l_img, 3))?;
        let pe = {
            let parts: Vec<Tensor> = [2usize, 2, 4]
                .iter()
                .enumerate()
                .map(|(i, &dim)| rope(&ids.get_on_dim(D::Minus1, i)?, dim, 10_000))
                .collect::<candle_core::Result<_>>()?;
            Tensor::cat(&parts, 2)?.unsqueeze(1)?
        };
        let norm = || -> candle_core::Result<RmsNorm> {
            Ok(RmsNorm::new(
                (Tensor::randn(0f32, 0.3, d, &dev)? + 1.0)?,
                QK_NORM_EPS,
            ))
        };
        let (txt_q, txt_k, img_q, img_k) = (norm()?, norm()?, norm()?, norm()?);
        let txt = Tensor::randn(0f32, 2.0, (b, l_txt, 3 * hidden), &dev)?;
        // An image stream wider than its q/k/v, like a single block's linear1 output.
        let img = Tensor::randn(0f32, 2.0, (b, l_img, 3 * hidden + 5), &dev)?;
        let parts = [(&txt, &txt_q, &txt_k), (&img, &img_q, &img_k)];
        let (q, k, v) = split_streams(&parts, h)?;
        let want = attention_in_blocks(&q, &k, &v, &pe, usize::MAX)?;
        // After candle's ops have read the inputs: the kernel overwrites q and k.
        let img_v = img.narrow(D::Minus1, 2 * hidden, hidden + 5)?.copy()?;
        let fused = fused_attention(&parts, h, &pe)?;
        let v_diff = (img.narrow(D::Minus1, 2 * hidden, hidden + 5)? - img_v)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(
            v_diff, 0.0,
            "v and the columns after it are left as they were"
        );
        assert_eq!(fused.dims(), want.dims());
        let diff = (&fused - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(scale > 0.1, "a non-trivial output: {scale}");
        assert!(diff < 2e-5, "max |diff| {diff} (outputs up to {scale})");
        Ok(())
    }
}
