//! Products with bf16 weights on the CPU's native bf16 dot products (AVX-512 BF16,
//! `vdpbf16ps`), for CPUs that have them; [`available`] says so, once per process.
//!
//! `dtype = bf16` on the CPU used to widen each weight to f32 and multiply in f32, at about
//! f32's speed, while PyTorch's bf16 matmul on the same CPU runs about twice as fast. Here
//! the f32 activations are rounded to bf16 (to nearest even, as PyTorch's bf16 activations
//! are) and each product of two bf16 values is added in f32: the answer is the f32 product
//! of the rounded operands up to the order of the sums.
//!
//! The kernel is the usual register tile: for each block of [`KC`] input columns the
//! activations are rounded once into pairs of columns, and each panel of [`NR`] weight rows
//! is repacked so that one load gives the same column pair of 16 rows; a tile of up to
//! [`MR`] × [`NR`] outputs then takes one `vdpbf16ps` per row, per 16 outputs, per column
//! pair, and is added to the output once per block. Fewer than [`FEW_ROWS`] rows (the
//! modulations: one row per image) read each weight row once, in place, as dot products.
//!
//! Not here: f16 (no native f16 products on these CPUs) and the attention, which stays f32.

/// Output rows per register tile.
const MR: usize = 8;
/// Output columns per register tile and per packed weight panel: three vectors of 16 f32.
const NR: usize = 48;
/// Vectors of 16 outputs per tile row.
const NV: usize = NR / 16;
/// Input columns per block (even): a panel of packed weights is `KC·NR` bf16, 192 KiB.
const KC: usize = 2048;
/// Below this many rows, dot products over the weight in place beat repacking it.
const FEW_ROWS: usize = 8;

/// Whether this CPU has the native bf16 dot products (AVX-512 F, BW and BF16), unless
/// `PICTOR_CPU_BF16=off` asks for the widening path (to compare the two).
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let off = std::env::var("PICTOR_CPU_BF16").is_ok_and(|v| v == "off");
        !off && detect()
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// The operands of [`add_products`]: `x` holds `m` rows of `k` f32 values, `row_stride`
/// apart; `w` holds `n` rows of `k_total` bf16 bit patterns, of which columns
/// `col..col + k` multiply `x`.
pub(crate) struct Operands<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub row_stride: usize,
    pub k: usize,
    pub w: &'a [u16],
    pub n: usize,
    pub k_total: usize,
    pub col: usize,
}

/// `out (m, n) += x · W[:, col..col + k]ᵀ` on the native bf16 dot products.
///
/// Fails, touching nothing, when [`available`] is false or a slice is shorter than its
/// shape says.
pub(crate) fn add_products(out: &mut [f32], ops: &Operands) -> candle_core::Result<()> {
    let &Operands {
        x,
        m,
        row_stride,
        k,
        w,
        n,
        k_total,
        col,
    } = ops;
    if !available() {
        candle_core::bail!("pictor-linear: this CPU has no native bf16 dot products");
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let fits = out.len() >= m * n
        && x.len() >= (m - 1) * row_stride + k
        && col + k <= k_total
        && w.len() >= (n - 1) * k_total + col + k;
    if !fits {
        candle_core::bail!("pictor-linear: operands shorter than their shapes");
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has the features (`available`), and every slice holds the
        // elements its shape reaches (checked above).
        unsafe {
            if m < FEW_ROWS {
                native::few_rows(out, ops);
            } else {
                native::tiled(out, ops);
            }
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod native {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{KC, MR, NR, NV, Operands};
    use crate::ops::Out;

    /// The tiled product (see the module header).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and BF16; the operands are in bounds and `m, n, k > 0`.
    pub(super) unsafe fn tiled(out: &mut [f32], ops: &Operands) {
        let &Operands {
            x,
            m,
            row_stride,
            k,
            n,
            ..
        } = ops;
        let panels = n.div_ceil(NR);
        // A few tasks per thread, for balance when panels take unequal time.
        let per_task = panels
            .div_ceil(4 * rayon::current_num_threads().max(1))
            .max(1);
        let tiles = m.div_ceil(MR);
        // Each tile of MR rows holds its pairs interleaved: pair p of row r at p·MR + r, so
        // that a step of the kernel reads one run of MR pairs.
        let mut pairs = vec![0u32; tiles * MR * KC / 2];
        let dst = Out(out.as_mut_ptr());
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let kp = kc.div_ceil(2);
            pairs[..tiles * MR * kp]
                .par_chunks_mut(MR * kp)
                .enumerate()
                .for_each(|(t, tile)| {
                    let mut row = [0u32; KC / 2];
                    for r in 0..MR.min(m - t * MR) {
                        let at = (t * MR + r) * row_stride + k0;
                        // SAFETY: the row holds k ≥ k0 + kc values from `at`.
                        unsafe { round_row(&x[at..][..kc], &mut row[..kp]) };
                        for (p, &pair) in row[..kp].iter().enumerate() {
                            tile[p * MR + r] = pair;
                        }
                    }
                });
            let pairs = &pairs[..tiles * MR * kp];
            (0..panels.div_ceil(per_task))
                .into_par_iter()
                .for_each(|task| {
                    let mut panel = vec![0u32; kp * NR];
                    for q in task * per_task..panels.min((task + 1) * per_task) {
                        let j0 = q * NR;
                        let width = NR.min(n - j0);
                        // SAFETY: the CPU has the features (the caller's contract).
                        unsafe { pack_panel(ops, k0 + ops.col, kc, j0, width, &mut panel) };
                        // SAFETY: each tile writes rows r0..r0 + rows and columns
                        // j0..j0 + width of `out`, which no other task writes.
                        unsafe {
                            for r0 in (0..m).step_by(MR) {
                                let rows = MR.min(m - r0);
                                let tile = Tile {
                                    pairs: pairs[r0 * kp..].as_ptr(),
                                    // (r0 is a multiple of MR: tile r0 / MR starts at r0·kp.)
                                    kp,
                                    panel: panel.as_ptr(),
                                    out: dst.get().add(r0 * n + j0),
                                    ldc: n,
                                    width,
                                };
                                tile.run(rows);
                            }
                        }
                    }
                });
        }
    }

    /// Rows of fewer than `FEW_ROWS`: each output is a dot product of an activation row
    /// (rounded once) with a weight row read in place.
    ///
    /// # Safety
    /// As [`tiled`].
    pub(super) unsafe fn few_rows(out: &mut [f32], ops: &Operands) {
        let &Operands {
            x,
            m,
            row_stride,
            k,
            w,
            n,
            k_total,
            col,
        } = ops;
        let kp = k.div_ceil(2);
        let mut pairs = vec![0u32; m * kp];
        for (r, row) in pairs.chunks_mut(kp).enumerate() {
            // SAFETY: row r holds k values from r·row_stride.
            unsafe { round_row(&x[r * row_stride..][..k], row) };
        }
        let dst = Out(out.as_mut_ptr());
        let chunk = 64;
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            for j in c * chunk..n.min((c + 1) * chunk) {
                let wrow = &w[j * k_total + col..][..k];
                for r in 0..m {
                    // SAFETY: output (r, j) is in bounds and only this task writes column j.
                    unsafe {
                        let o = dst.get().add(r * n + j);
                        *o += dot(&pairs[r * kp..][..kp], wrow);
                    }
                }
            }
        });
    }

    /// `row` (f32) rounded to bf16, to nearest even, as column pairs in `dst`
    /// (`row.len().div_ceil(2)` of them; an odd last column is paired with zero).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn round_row(row: &[f32], dst: &mut [u32]) {
        let len = row.len();
        debug_assert!(dst.len() * 2 >= len);
        let d = dst.as_mut_ptr().cast::<u16>();
        let mut i = 0;
        // SAFETY: every access is below `len` in `row` and below 2·dst.len() in `d`.
        unsafe {
            while i + 32 <= len {
                let lo = _mm512_loadu_ps(row.as_ptr().add(i));
                let hi = _mm512_loadu_ps(row.as_ptr().add(i + 16));
                let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(d.add(i).cast(), both);
                i += 32;
            }
            while i < len {
                *d.add(i) = half::bf16::from_f32(row[i]).to_bits();
                i += 1;
            }
            if len % 2 == 1 {
                *d.add(len) = 0;
            }
        }
    }

    /// Weight rows `j0..j0 + width`, columns `from..from + kc`, as `kc.div_ceil(2)` groups
    /// of `NR` column pairs (row j0 + i at lane i; lanes past `width` zero).
    ///
    /// Each run of 16 rows by 16 whole pairs is one 16 × 16 transpose of 32-bit lanes;
    /// the rest (short row groups, the last pairs) is copied pair by pair.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pack_panel(
        ops: &Operands,
        from: usize,
        kc: usize,
        j0: usize,
        width: usize,
        panel: &mut [u32],
    ) {
        let kp = kc.div_ceil(2);
        let whole = kc / 2 / 16 * 16;
        for lane0 in (0..NR).step_by(16) {
            let vector = lane0 + 16 <= width;
            for i in lane0..lane0 + 16 {
                if i >= width {
                    for p in 0..kp {
                        panel[p * NR + i] = 0;
                    }
                    continue;
                }
                let row = &ops.w[(j0 + i) * ops.k_total + from..][..kc];
                let done = if vector { whole } else { 0 };
                for (p, pair) in row.chunks(2).enumerate().skip(done) {
                    let hi = pair.get(1).copied().unwrap_or(0);
                    panel[p * NR + i] = u32::from(pair[0]) | (u32::from(hi) << 16);
                }
            }
            if !vector {
                continue;
            }
            let rows: [&[u16]; 16] =
                std::array::from_fn(|i| &ops.w[(j0 + lane0 + i) * ops.k_total + from..][..kc]);
            for p0 in (0..whole).step_by(16) {
                // SAFETY: each row holds kc ≥ 2·(p0 + 16) values from `from`; the panel
                // holds kp·NR ≥ (p0 + 15)·NR + lane0 + 16 lanes.
                unsafe {
                    let block = transpose(std::array::from_fn(|i| {
                        _mm512_loadu_si512(rows[i].as_ptr().add(2 * p0).cast())
                    }));
                    for (q, v) in block.iter().enumerate() {
                        _mm512_storeu_si512(
                            panel.as_mut_ptr().add((p0 + q) * NR + lane0).cast(),
                            *v,
                        );
                    }
                }
            }
        }
    }

    /// The transpose of a 16 × 16 matrix of 32-bit lanes (vector i is row i).
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose(mut r: [__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for b in (0..16).step_by(4) {
            r[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
            r[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
            r[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
            r[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
        }
        for b in [0, 8] {
            for j in 0..4 {
                t[b + j] = _mm512_shuffle_i32x4::<0x88>(r[b + j], r[b + 4 + j]);
                t[b + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(r[b + j], r[b + 4 + j]);
            }
        }
        for j in 0..8 {
            r[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[8 + j]);
            r[8 + j] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[8 + j]);
        }
        r
    }

    /// One register tile's operands: `rows` × `width` outputs at `out` (rows `ldc`
    /// apart), from `kp` column pairs of each activation row (interleaved: pair p of row
    /// r at `pairs[p·MR + r]`) and the packed panel.
    struct Tile {
        pairs: *const u32,
        kp: usize,
        panel: *const u32,
        out: *mut f32,
        ldc: usize,
        width: usize,
    }

    impl Tile {
        /// # Safety
        /// As [`tiled`], with `1 ≤ rows ≤ MR` rows and `1 ≤ width ≤ NR` columns in bounds.
        unsafe fn run(&self, rows: usize) {
            // SAFETY: as the caller's.
            unsafe {
                match rows {
                    8 => self.rows::<8>(),
                    7 => self.rows::<7>(),
                    6 => self.rows::<6>(),
                    5 => self.rows::<5>(),
                    4 => self.rows::<4>(),
                    3 => self.rows::<3>(),
                    2 => self.rows::<2>(),
                    _ => self.rows::<1>(),
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn rows<const R: usize>(&self) {
            let mut acc = [[_mm512_setzero_ps(); NV]; R];
            // SAFETY: kp·MR pairs at `pairs`, kp·NR at `panel`, R × width outputs.
            unsafe {
                for p in 0..self.kp {
                    let b = self.panel.add(p * NR);
                    let b: [__m512bh; NV] = std::array::from_fn(|v| {
                        std::mem::transmute(_mm512_loadu_si512(b.add(16 * v).cast()))
                    });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = *self.pairs.add(p * MR + r);
                        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(a as i32));
                        for (acc, &b) in acc.iter_mut().zip(&b) {
                            *acc = _mm512_dpbf16_ps(*acc, a, b);
                        }
                    }
                }
                let masks: [__mmask16; NV] =
                    std::array::from_fn(|v| lanes(self.width.saturating_sub(16 * v)));
                for (r, acc) in acc.iter().enumerate() {
                    for (v, (&sum, &mask)) in acc.iter().zip(&masks).enumerate() {
                        let o = self.out.add(r * self.ldc + v * 16);
                        let old = _mm512_maskz_loadu_ps(mask, o);
                        _mm512_mask_storeu_ps(o, mask, _mm512_add_ps(old, sum));
                    }
                }
            }
        }
    }

    /// The first `n` of 16 lanes.
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 }
    }

    /// `Σ pairs·w` over `w.len()` columns (the pairs hold them rounded, zero-padded).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn dot(pairs: &[u32], w: &[u16]) -> f32 {
        let k = w.len();
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        // SAFETY: 32 columns from i < k are read only where i + 32 ≤ k, then a masked
        // load of the rest; `pairs` holds k.div_ceil(2) ≥ (i + 32)/2 pairs where read.
        unsafe {
            while i + 64 <= k {
                for (h, acc) in acc.iter_mut().enumerate() {
                    let at = i + 32 * h;
                    let a: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(pairs.as_ptr().add(at / 2).cast()));
                    let b: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(w.as_ptr().add(at).cast()));
                    *acc = _mm512_dpbf16_ps(*acc, a, b);
                }
                i += 64;
            }
            while i < k {
                let left = k - i;
                let mask: __mmask32 = if left >= 32 { !0 } else { (1u32 << left) - 1 };
                let a: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                    mask,
                    pairs.as_ptr().cast::<i16>().add(i),
                ));
                let b: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                    mask,
                    w.as_ptr().cast::<i16>().add(i),
                ));
                acc[0] = _mm512_dpbf16_ps(acc[0], a, b);
                i += 32;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Against the f32 product of the operands rounded to bf16: tiles and panels with
    /// tails (rows, outputs), blocks of columns with an odd last one, a column offset into
    /// a wider weight, strided rows, and the few-rows path. Each output may differ only by
    /// the order of its f32 sums: within 1e-5 of the sum of its terms' magnitudes.
    #[test]
    fn products_match_the_rounded_operands_in_f32() -> candle_core::Result<()> {
        if !available() {
            eprintln!("skipped: this CPU has no native bf16 dot products");
            return Ok(());
        }
        let round = |v: f32| half::bf16::from_f32(v).to_f32();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (m, n, k, col, extra) in [
            (1, 5, 7, 0, 0),
            (7, 70, 2051, 3, 4),
            (13, 33, 1, 0, 0),
            (30, 64, 1100, 1, 2),
            (25, 100, 2048, 0, 0),
        ] {
            let row_stride = k + extra;
            let k_total = col + k + 5;
            let x: Vec<f32> = (0..m * row_stride)
                .map(|_| rng.random_range(-3.0..3.0))
                .collect();
            let w: Vec<u16> = (0..n * k_total)
                .map(|_| half::bf16::from_f32(rng.random_range(-0.5..0.5)).to_bits())
                .collect();
            let bias: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut out = bias.clone();
            let ops = Operands {
                x: &x,
                m,
                row_stride,
                k,
                w: &w,
                n,
                k_total,
                col,
            };
            add_products(&mut out, &ops)?;
            for r in 0..m {
                for j in 0..n {
                    let (mut want, mut scale) = (f64::from(bias[r * n + j]), 1e-3);
                    for kk in 0..k {
                        let a = round(x[r * row_stride + kk]);
                        let b = half::bf16::from_bits(w[j * k_total + col + kk]).to_f32();
                        want += f64::from(a * b);
                        scale += f64::from((a * b).abs());
                    }
                    let diff = (f64::from(out[r * n + j]) - want).abs();
                    assert!(
                        diff <= 1e-5 * scale,
                        "{m}×{n}×{k}: ({r}, {j}) is {} for {want} (sum of |terms| {scale})",
                        out[r * n + j]
                    );
                }
            }
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_by_sixteen_lanes_transpose() {
        use std::arch::x86_64::*;
        if !available() {
            return;
        }
        let m: Vec<u32> = (0..256).collect();
        // SAFETY: the CPU has AVX-512 F; every load and store is 16 lanes of a 256 buffer.
        let got = unsafe {
            let rows = std::array::from_fn(|i| _mm512_loadu_si512(m[16 * i..].as_ptr().cast()));
            let cols = super::native::transpose(rows);
            let mut got = vec![0u32; 256];
            for (i, c) in cols.iter().enumerate() {
                _mm512_storeu_si512(got[16 * i..].as_mut_ptr().cast(), *c);
            }
            got
        };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[16 * i + j], m[16 * j + i], "({i}, {j})");
            }
        }
    }

    #[test]
    fn short_operands_are_refused() {
        if !available() {
            return;
        }
        let (x, w) = (vec![0f32; 10], vec![0u16; 10]);
        let ops = Operands {
            x: &x,
            m: 2,
            row_stride: 5,
            k: 5,
            w: &w,
            n: 3,
            k_total: 5,
            col: 0,
        };
        let mut out = vec![0f32; 6];
        assert!(add_products(&mut out, &ops).is_err());
    }
}
