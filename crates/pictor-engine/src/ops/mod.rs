//! Fast CPU kernels: convolution and group normalisation for the autoencoder; attention,
//! GELU, LayerNorm with modulation, gated residuals and linear layers for the transformer.
//!
//! candle 0.11.1's CPU `conv2d` transposes the whole input to NHWC on one thread, scatters
//! an im2col tile element by element and writes the output back element by element; its
//! `GroupNorm` is a chain of a dozen tensor ops. On this project's 2-core CPU they ran a
//! 3×3, 32-channel convolution at 128² at 16 GFLOP/s and a group norm over the same tensor
//! in 12.6 ms, which made the autoencoder 80 % of the shipped model's time per image.
//!
//! Here, for contiguous f32 tensors on the CPU:
//! - a 3×3 (any k×k, stride 1) convolution builds its im2col tile for a band of whole output
//!   rows straight from the NCHW input (each copy is a contiguous run of an input row), and
//!   one gemm per band writes the NCHW output in place; bands run in parallel;
//! - group norm (optionally fused with SiLU) makes one pass for the statistics and one for
//!   the output per (image, group), groups in parallel.
//!
//! The transformer's kernels are in [`flux_attention`], [`gelu`](gelu()), [`norm_modulate`],
//! [`gated_residual`] and [`linear`](linear()), whose bf16 weights multiply on the CPU's
//! native bf16 dot products where it has them (`dpbf16`); each module's header says what
//! it replaces.
//!
//! Other devices and dtypes use candle's own ops, so CUDA is unaffected.

mod accumulate;
mod attention;
mod dpbf16;
mod gelu;
mod linear;
mod modulate;
mod winograd;

pub(crate) use accumulate::{add_columns, can_add_columns};
pub use attention::{QkvPart, flux_attention};
pub(crate) use dpbf16::available as native_bf16;
pub use gelu::gelu;
pub(crate) use gelu::gelu_in_place;
pub use linear::{is_fast as linear_is_fast, linear};
pub use modulate::{gated_residual, norm_modulate};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::error::Result;

/// `e^x` for `x` in about [-87, 88] (clamped outside), with no libm call.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // t's low mantissa bits hold n (|n| ≤ 127): 2ⁿ with integer ops only, which vectorise
    // (an `as i32` cast saturates and stays scalar).
    e * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

/// Calls `f`, compiled for AVX2 and FMA when this CPU has them (the crate is built for
/// baseline x86-64, whose vectors are half as wide). `f` must be `#[inline(always)]`
/// down to its loops for them to use the wider vectors.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features `avx2` was compiled for.
            return unsafe { avx2(f) };
        }
    }
    f()
}

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A 2-D convolution with stride 1 (the only kind the flux decoder has).
#[derive(Debug, Clone)]
pub struct Conv2d {
    kernel: Kernel,
    bias: Tensor,
    padding: usize,
}

/// The filters, as the fastest path for them wants them.
#[derive(Debug, Clone)]
enum Kernel {
    /// Winograd-transformed 3×3 filters `(16, out, in)` (f32 on the CPU); the plain weight
    /// is not kept.
    Winograd(Tensor),
    /// The weight `(out, in, k, k)`.
    Plain(Tensor),
}

impl Conv2d {
    /// Loads `weight` `(out, in, k, k)` and `bias` `(out)` from `vb`.
    pub fn load(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, k, k), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        Ok(Self::new(weight, bias, padding)?)
    }

    /// A convolution with these filters, bias and padding.
    pub fn new(weight: Tensor, bias: Tensor, padding: usize) -> candle_core::Result<Self> {
        let kernel = match winograd_filters(&weight)? {
            Some(u) => Kernel::Winograd(u),
            None => Kernel::Plain(weight),
        };
        Ok(Self {
            kernel,
            bias,
            padding,
        })
    }
}

/// The Winograd filters of a 3×3 f32 CPU weight; `None` for any other.
fn winograd_filters(weight: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (c_out, c_in, k_h, k_w) = weight.dims4()?;
    if !fast_path(weight) || (k_h, k_w) != (3, 3) {
        return Ok(None);
    }
    let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
    let u = winograd::transform_filters(&w, c_out, c_in);
    Ok(Some(Tensor::from_vec(
        u,
        (16, c_out, c_in),
        weight.device(),
    )?))
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let weight = match &self.kernel {
            Kernel::Winograd(u) => {
                return x.contiguous()?.apply_op3_no_bwd(
                    u,
                    &self.bias.contiguous()?,
                    &winograd::WinogradOp {
                        padding: self.padding,
                    },
                );
            }
            Kernel::Plain(weight) => weight,
        };
        let (.., k_h, k_w) = weight.dims4()?;
        if fast_path(x) && k_h * k_w > 1 {
            let x = x.contiguous()?;
            return x.apply_op3_no_bwd(
                &weight.contiguous()?,
                &self.bias.contiguous()?,
                &ConvOp {
                    padding: self.padding,
                },
            );
        }
        let y = x.conv2d(weight, self.padding, 1, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

struct ConvOp {
    padding: usize,
}

/// The f32 data of a CPU op's (contiguous) inputs, each from its layout's start.
fn f32_inputs<'a, const N: usize>(
    op: &str,
    inputs: [(&'a CpuStorage, &Layout); N],
) -> candle_core::Result<[&'a [f32]; N]> {
    let mut out = [&[][..]; N];
    for (slot, (storage, layout)) in out.iter_mut().zip(inputs) {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{op} takes f32");
        };
        *slot = &data[layout.start_offset()..];
    }
    Ok(out)
}

/// The f32 data of a CPU tensor's storage, from `layout`'s start (hold the storage guard
/// of `Tensor::storage_and_layout` while the slice is used).
pub(crate) fn f32_data<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(CpuStorage::F32(values)) = storage else {
        candle_core::bail!("pictor's CPU kernels take f32 tensors on the CPU");
    };
    values
        .get(layout.start_offset()..)
        .ok_or_else(|| candle_core::Error::Msg("tensor offset past its data".into()))
}

/// A pointer that may cross threads: each task writes a disjoint part of the output.
#[derive(Clone, Copy)]
pub(crate) struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "pictor-conv2d"
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
        let [x, w, bias] = f32_inputs(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (b, c_in, h, wd) = l1.shape().dims4()?;
        let (c_out, c_in_w, k_h, k_w) = l2.shape().dims4()?;
        if c_in != c_in_w {
            candle_core::bail!("pictor-conv2d: {c_in} input channels, weight takes {c_in_w}");
        }
        let p = self.padding;
        let (out_h, out_w) = (
            (h + 2 * p + 1).saturating_sub(k_h),
            (wd + 2 * p + 1).saturating_sub(k_w),
        );
        let k = c_in * k_h * k_w;
        let plane = out_h * out_w;
        let mut out = vec![0f32; b * c_out * plane];
        // Bands of whole rows: an im2col tile of at most ~1 MB, at least one row.
        let rows = (262_144 / (k * out_w).max(1)).clamp(1, out_h.max(1));
        let bands: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..out_h).step_by(rows).map(move |r0| (bi, r0)))
            .collect();
        let dst = Out(out.as_mut_ptr());
        bands.into_par_iter().for_each(|(bi, r0)| {
            let r1 = (r0 + rows).min(out_h);
            let n = (r1 - r0) * out_w;
            let mut col = vec![0f32; k * n];
            for ci in 0..c_in {
                let src = &x[(bi * c_in + ci) * h * wd..][..h * wd];
                for ky in 0..k_h {
                    for kx in 0..k_w {
                        let row = (ci * k_h + ky) * k_w + kx;
                        let tile = &mut col[row * n..(row + 1) * n];
                        // Output column ox reads input column ox + kx - p.
                        let lo = p.saturating_sub(kx);
                        let hi = (wd + p).saturating_sub(kx).min(out_w);
                        if lo >= hi {
                            continue;
                        }
                        for r in r0..r1 {
                            let Some(iy) = (r + ky).checked_sub(p).filter(|&iy| iy < h) else {
                                continue;
                            };
                            let from = iy * wd + lo + kx - p;
                            let at = (r - r0) * out_w;
                            tile[at + lo..at + hi].copy_from_slice(&src[from..from + hi - lo]);
                        }
                    }
                }
            }
            let base = dst.get();
            // SAFETY: the destination block is out[bi, :, r0..r1, :], rows of `n` floats
            // `plane` apart, inside `out` and written by this band only; `w` is (c_out, k)
            // and `col` is (k, n), both row-major.
            unsafe {
                let d = base.add(bi * c_out * plane + r0 * out_w);
                gemm::gemm(
                    c_out,
                    n,
                    k,
                    d,
                    1,
                    plane as isize,
                    false,
                    w.as_ptr(),
                    1,
                    k as isize,
                    col.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                for (co, &bv) in bias.iter().enumerate().take(c_out) {
                    let row = std::slice::from_raw_parts_mut(d.add(co * plane), n);
                    row.iter_mut().for_each(|v| *v += bv);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, out_h, out_w))))
    }
}

/// Group normalisation with an affine transform, optionally followed by SiLU.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
    eps: f64,
    /// candle's own, for other dtypes and devices.
    portable: candle_nn::GroupNorm,
}

impl GroupNorm {
    /// Loads `weight` and `bias` `(channels)` from `vb`.
    pub fn load(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        let gamma = vb.get(channels, "weight")?;
        let beta = vb.get(channels, "bias")?;
        Ok(Self::new(gamma, beta, groups, eps)?)
    }

    /// A group norm with these affine parameters `(channels)`.
    pub fn new(gamma: Tensor, beta: Tensor, groups: usize, eps: f64) -> candle_core::Result<Self> {
        let channels = gamma.dim(0)?;
        let portable =
            candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), channels, groups, eps)?;
        Ok(Self {
            gamma,
            beta,
            groups,
            eps,
            portable,
        })
    }

    /// Normalises `x` `(b, c, h, w)`; with `silu`, applies SiLU to the result.
    pub fn forward(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        if fast_path(x) {
            let op = GroupNormOp {
                gamma: self.gamma.to_dtype(DType::F32)?.to_vec1()?,
                beta: self.beta.to_dtype(DType::F32)?.to_vec1()?,
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            return x.contiguous()?.apply_op1_no_bwd(&op);
        }
        let y = self.portable.forward(x)?;
        if silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }
}

struct GroupNormOp {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "pictor-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let [x] = f32_inputs(self.name(), [(s, l)])?;
        let x = &x[..l.shape().elem_count()];
        let (_, c, h, w) = l.shape().dims4()?;
        if self.groups == 0 || c % self.groups != 0 || self.gamma.len() != c {
            candle_core::bail!("pictor-group-norm: {c} channels in {} groups", self.groups);
        }
        let per_channel = h * w;
        let per_group = c / self.groups * per_channel;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(per_group)
            .zip(x.par_chunks(per_group))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let (sum, sq) = src.iter().fold((0f64, 0f64), |(s, q), &v| {
                    let v = f64::from(v);
                    (s + v, q + v * v)
                });
                let n = src.len() as f64;
                let mean = sum / n;
                let var = (sq / n - mean * mean).max(0.0);
                let inv = 1.0 / (var + self.eps).sqrt();
                let first = (i % self.groups) * (c / self.groups);
                for (j, (d, s)) in dst
                    .chunks_mut(per_channel)
                    .zip(src.chunks(per_channel))
                    .enumerate()
                {
                    let scale = (inv * f64::from(self.gamma[first + j])) as f32;
                    let shift = f64::from(self.beta[first + j])
                        - mean * inv * f64::from(self.gamma[first + j]);
                    let shift = shift as f32;
                    if self.silu {
                        for (o, &v) in d.iter_mut().zip(s) {
                            let y = v * scale + shift;
                            *o = y / (1.0 + (-y).exp());
                        }
                    } else {
                        for (o, &v) in d.iter_mut().zip(s) {
                            *o = v * scale + shift;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The fast kernels agree with candle's own ops, edges and odd sizes included.
    #[test]
    fn fast_kernels_match_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (b, c_in, c_out, h, w, k, p) in [
            (2, 5, 7, 9, 13, 3, 1),
            (1, 32, 32, 16, 16, 3, 1),
            (1, 3, 4, 6, 5, 3, 0),
            (1, 4, 2, 7, 7, 5, 2),
            (1, 6, 3, 8, 9, 3, 0),
            (2, 3, 5, 1, 2, 3, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
            let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev)?;
            let fast = Conv2d::new(weight.clone(), bias.clone(), p)?.forward(&x)?;
            // The im2col path too, for the 3×3 filters that took Winograd above.
            let im2col = Conv2d {
                kernel: Kernel::Plain(weight.clone()),
                bias: bias.clone(),
                padding: p,
            }
            .forward(&x)?;
            let slow = x
                .conv2d(&weight, p, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
            assert_eq!(fast.dims(), slow.dims());
            let d = max_diff(&fast, &slow);
            assert!(d < 1e-3, "conv {c_in}->{c_out} {h}x{w} k{k} p{p}: {d}");
            let d = max_diff(&im2col, &slow);
            assert!(
                d < 1e-3,
                "im2col conv {c_in}->{c_out} {h}x{w} k{k} p{p}: {d}"
            );
        }
        let x = ((Tensor::randn(0f32, 1.0, (2, 64, 5, 7), &dev)? * 3.0)? + 1.5)?;
        let gn = GroupNorm::new(
            Tensor::randn(0f32, 1.0, 64, &dev)?,
            Tensor::randn(0f32, 1.0, 64, &dev)?,
            32,
            1e-6,
        )?;
        let reference = candle_nn::GroupNorm::new(gn.gamma.clone(), gn.beta.clone(), 64, 32, 1e-6)?;
        let want = reference.forward(&x)?;
        assert!(max_diff(&gn.forward(&x, false)?, &want) < 1e-4);
        let want = candle_nn::ops::silu(&want)?;
        assert!(max_diff(&gn.forward(&x, true)?, &want) < 1e-4);
        // The portable path (used for other dtypes and devices) agrees too.
        let gn64 = GroupNorm::new(
            gn.gamma.to_dtype(DType::F64)?,
            gn.beta.to_dtype(DType::F64)?,
            32,
            1e-6,
        )?;
        let portable64 = gn64
            .forward(&x.to_dtype(DType::F64)?, true)?
            .to_dtype(DType::F32)?;
        assert!(max_diff(&portable64, &want) < 1e-4);
        Ok(())
    }
}
