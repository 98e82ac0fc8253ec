//! 3×3, stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each 2×2 block of outputs
//! comes from a 4×4 input tile with 16 multiplications per channel pair instead of 36, so
//! the convolution becomes 16 matrix products of `(c_out × c_in)` by `(c_in × tiles)`,
//! 2.25× fewer FLOPs than im2col + gemm. The filter transform is computed once per layer.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::{Out, f32_inputs};

/// `U = G g Gᵀ` for every `(c_out, c_in)` filter of `w` `(c_out, c_in, 3, 3)`, laid out
/// `[16][c_out][c_in]` (one matrix per transformed position).
pub fn transform_filters(w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * c_out * c_in];
    for co in 0..c_out {
        for ci in 0..c_in {
            let g = &w[(co * c_in + ci) * 9..][..9];
            // G g: 4×3.
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                t[0][j] = g0;
                t[1][j] = 0.5 * (g0 + g1 + g2);
                t[2][j] = 0.5 * (g0 - g1 + g2);
                t[3][j] = g2;
            }
            // (G g) Gᵀ: 4×4.
            for (i, row) in t.iter().enumerate() {
                let (a, b, c) = (row[0], row[1], row[2]);
                let out = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (j, v) in out.into_iter().enumerate() {
                    u[((i * 4 + j) * c_out + co) * c_in + ci] = v;
                }
            }
        }
    }
    u
}

/// The convolution: inputs are `x` `(b, c_in, h, w)`, the transformed filters
/// `(16, c_out, c_in)` and the bias `(c_out)`.
pub struct WinogradOp {
    /// Zero padding on every side.
    pub padding: usize,
}

impl CustomOp3 for WinogradOp {
    fn name(&self) -> &'static str {
        "pictor-winograd-conv3x3"
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
        let [x, u, bias] = f32_inputs(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (b, c_in, h, w) = l1.shape().dims4()?;
        let (sixteen, c_out, c_in_u) = l2.shape().dims3()?;
        if sixteen != 16 || c_in_u != c_in {
            candle_core::bail!(
                "pictor-winograd-conv3x3: filters {:?} for {c_in} channels",
                l2.shape()
            );
        }
        let p = self.padding;
        let (oh, ow) = ((h + 2 * p).saturating_sub(2), (w + 2 * p).saturating_sub(2));
        let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
        let plane = oh * ow;
        let mut out = vec![0f32; b * c_out * plane];
        // Bands of whole tile rows, about 256 tiles each.
        let rows = (256 / tw.max(1)).clamp(1, th.max(1));
        let bands: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..th).step_by(rows).map(move |r0| (bi, r0)))
            .collect();
        let dst = Out(out.as_mut_ptr());
        bands.into_par_iter().for_each(|(bi, r0)| {
            let r1 = (r0 + rows).min(th);
            let n = (r1 - r0) * tw;
            // V = Bᵀ d B for every channel and tile: [16][c_in][n]. Per tile row, the row
            // transform runs on whole (zero-padded) input rows, then the column transform
            // on every tile of the row at once, so both loops are long and contiguous.
            let mut v = vec![0f32; 16 * c_in * n];
            let wp = 2 * tw + 2;
            let mut rows_in = vec![0f32; 4 * wp];
            let mut rows_t = vec![0f32; 4 * wp];
            for ci in 0..c_in {
                let src = &x[(bi * c_in + ci) * h * w..][..h * w];
                for ty in r0..r1 {
                    for (i, row) in rows_in.chunks_mut(wp).enumerate() {
                        row.fill(0.0);
                        let Some(iy) = (2 * ty + i).checked_sub(p).filter(|&y| y < h) else {
                            continue;
                        };
                        // Padded column c holds input column c - p.
                        let lo = p.min(wp);
                        let len = w.min(wp - lo);
                        row[lo..lo + len].copy_from_slice(&src[iy * w..iy * w + len]);
                    }
                    {
                        let (d0, rest) = rows_in.split_at(wp);
                        let (d1, rest) = rest.split_at(wp);
                        let (d2, d3) = rest.split_at(wp);
                        let (t0, rest) = rows_t.split_at_mut(wp);
                        let (t1, rest) = rest.split_at_mut(wp);
                        let (t2, t3) = rest.split_at_mut(wp);
                        for c in 0..wp {
                            t0[c] = d0[c] - d2[c];
                            t1[c] = d1[c] + d2[c];
                            t2[c] = d2[c] - d1[c];
                            t3[c] = d1[c] - d3[c];
                        }
                    }
                    let at = (ty - r0) * tw;
                    for (i, t) in rows_t.chunks(wp).enumerate() {
                        let base = |j: usize| ((i * 4 + j) * c_in + ci) * n + at;
                        let (b0, b1, b2, b3) = (base(0), base(1), base(2), base(3));
                        for tx in 0..tw {
                            let (a, b, c, d) =
                                (t[2 * tx], t[2 * tx + 1], t[2 * tx + 2], t[2 * tx + 3]);
                            v[b0 + tx] = a - c;
                            v[b1 + tx] = b + c;
                            v[b2 + tx] = c - b;
                            v[b3 + tx] = b - d;
                        }
                    }
                }
            }
            // M[k] = U[k] · V[k]: [16][c_out][n].
            let mut m = vec![0f32; 16 * c_out * n];
            for k in 0..16 {
                // SAFETY: U[k] is c_out × c_in, V[k] is c_in × n and M[k] is c_out × n, all
                // row-major slices of the buffers above.
                unsafe {
                    gemm::gemm(
                        c_out,
                        n,
                        c_in,
                        m.as_mut_ptr().add(k * c_out * n),
                        1,
                        n as isize,
                        false,
                        u.as_ptr().add(k * c_out * c_in),
                        1,
                        c_in as isize,
                        v.as_ptr().add(k * c_in * n),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            // Y = Aᵀ M A + bias, written into out[bi, co, 2ty.., 2tx..], a tile row at a
            // time.
            let base = dst.get();
            let mut s0 = vec![0f32; 4 * tw];
            let mut s1 = vec![0f32; 4 * tw];
            for co in 0..c_out {
                for ty in r0..r1 {
                    let at = (ty - r0) * tw;
                    let row = |k: usize| &m[(k * c_out + co) * n + at..][..tw];
                    for j in 0..4 {
                        let (m0, m1, m2, m3) = (row(j), row(4 + j), row(8 + j), row(12 + j));
                        let (a, b) = (&mut s0[j * tw..(j + 1) * tw], &mut s1[j * tw..(j + 1) * tw]);
                        for tx in 0..tw {
                            a[tx] = m0[tx] + m1[tx] + m2[tx];
                            b[tx] = m1[tx] - m2[tx] - m3[tx];
                        }
                    }
                    for (i, sr) in [&s0, &s1].into_iter().enumerate() {
                        let y = 2 * ty + i;
                        if y >= oh {
                            continue;
                        }
                        // SAFETY: row y of out[bi, co] lies inside `out` and only this band
                        // writes it.
                        let dst_row = unsafe {
                            std::slice::from_raw_parts_mut(
                                base.add((bi * c_out + co) * plane + y * ow),
                                ow,
                            )
                        };
                        let (q0, q1, q2, q3) = (
                            &sr[..tw],
                            &sr[tw..2 * tw],
                            &sr[2 * tw..3 * tw],
                            &sr[3 * tw..],
                        );
                        let bv = bias[co];
                        for tx in 0..tw {
                            let x0 = 2 * tx;
                            dst_row[x0] = q0[tx] + q1[tx] + q2[tx] + bv;
                            if x0 + 1 < ow {
                                dst_row[x0 + 1] = q1[tx] - q2[tx] - q3[tx] + bv;
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, oh, ow))))
    }
}
