//! `ys[…, col..col + n] += part` over `ys`'s own storage, for f32 on the CPU: how a
//! LoRA's low-rank product joins a layer's output. Done with tensor ops it took a zero
//! block for each uncovered column range, a concatenation, a sum and a new output the
//! size of the layer's (four passes over it and two allocations, per layer and step).

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use super::{fast_path, wide};

/// Whether [`add_columns`] takes `ys`: f32, on the CPU, contiguous.
pub(crate) fn can_add_columns(ys: &Tensor) -> bool {
    fast_path(ys) && ys.is_contiguous()
}

/// Adds `part` `(…, n)` into columns `col..col + n` of `ys` `(…, width)` in place. `ys`
/// must be a fresh output that nothing else views ([`can_add_columns`] says whether its
/// layout is taken); `part` must have `ys`'s leading dimensions.
pub(crate) fn add_columns(ys: &Tensor, part: &Tensor, col: usize) -> candle_core::Result<()> {
    let (lead, width) = ys.dims().split_at(ys.rank().saturating_sub(1));
    let (part_lead, n) = part.dims().split_at(part.rank().saturating_sub(1));
    let (width, n) = (width.first().copied(), n.first().copied());
    if lead != part_lead || width.zip(n).is_none_or(|(w, n)| col + n > w) {
        candle_core::bail!(
            "adding {:?} at column {col} of {:?}: the shapes do not line up",
            part.dims(),
            ys.dims()
        );
    }
    let part = part.contiguous()?;
    ys.inplace_op2(&part, &AddColumns { col })
}

struct AddColumns {
    col: usize,
}

impl InplaceOp2 for AddColumns {
    fn name(&self) -> &'static str {
        "pictor-add-columns"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(ys), CpuStorage::F32(part)) = (s1, s2) else {
            candle_core::bail!("{} takes f32", self.name());
        };
        let (Some((y0, y1)), Some((p0, p1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("{} takes contiguous tensors", self.name());
        };
        let width = l1.dims().last().copied().unwrap_or(1).max(1);
        let n = l2.dims().last().copied().unwrap_or(1).max(1);
        let col = self.col;
        ys[y0..y1]
            .par_chunks_mut(width)
            .zip(part[p0..p1].par_chunks(n))
            .for_each(|(row, add)| {
                wide(
                    #[inline(always)]
                    || {
                        for (y, a) in row[col..col + n].iter_mut().zip(add) {
                            *y += a;
                        }
                    },
                )
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn adds_into_the_columns_asked_for_and_nowhere_else() {
        let dev = Device::Cpu;
        let ys = Tensor::arange(0f32, 24.0, &dev)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let part = Tensor::ones((2, 3, 2), candle_core::DType::F32, &dev).unwrap();
        let want = ys
            .narrow(2, 0, 1)
            .and_then(|a| {
                let mid = (ys.narrow(2, 1, 2)? + &part)?;
                Tensor::cat(&[a, mid, ys.narrow(2, 3, 1)?], 2)
            })
            .unwrap();
        add_columns(&ys, &part, 1).unwrap();
        assert_eq!(
            ys.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(add_columns(&ys, &part, 3).is_err(), "past the last column");
        let other = Tensor::ones((3, 3, 2), candle_core::DType::F32, &dev).unwrap();
        assert!(add_columns(&ys, &other, 0).is_err(), "other leading dims");
    }
}
