//! Quantized tensors that stay in their GGUF file: candle `QTensor`s whose blocks are a
//! memory-mapped range of the file instead of a heap copy.
//!
//! Why not candle's own GGUF reader: it copies every tensor onto the heap, and on x86 CPUs
//! with VNNI its matmul later builds a second, repacked copy of each Q4_K/Q6_K/Q8_0 weight
//! next to the first, so a model would sit in memory twice. With the blocks mapped, the
//! original is file-backed: loading costs no copy, and once a weight has been repacked its
//! pages can be handed back to the page cache ([`release`]) and are read again only if a
//! kernel that needs them runs.

use std::{marker::PhantomData, sync::Arc};

use candle_core::{
    CpuStorage,
    quantized::{GgmlDType, QuantizedType, k_quants},
};
use half::f16;
use memmap2::Mmap;

/// A range of a mapped file read as blocks of `T`.
pub(crate) struct MappedBlocks<T> {
    map: Arc<Mmap>,
    offset: usize,
    blocks: usize,
    _type: PhantomData<T>,
}

impl<T: k_quants::GgmlType> MappedBlocks<T> {
    /// `bytes` bytes at `offset` of `map`, which must lie inside the map and be aligned for
    /// `T`; returns `None` otherwise.
    pub(crate) fn new(map: Arc<Mmap>, offset: usize, bytes: usize) -> Option<Self> {
        let size = std::mem::size_of::<T>();
        let end = offset.checked_add(bytes)?;
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>());
        if end > map.len() || !bytes.is_multiple_of(size) || !aligned {
            return None;
        }
        Some(Self {
            map,
            offset,
            blocks: bytes / size,
            _type: PhantomData,
        })
    }

    fn slice(&self) -> &[T] {
        // SAFETY: `new` checked that the range lies inside the read-only mapping, is a whole
        // number of blocks and is aligned for `T`; GGML block types are plain old data
        // (integers and floats), so every bit pattern is a valid value. The map is kept
        // alive by the Arc for as long as the slice is borrowed.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.offset).cast(), self.blocks)
        }
    }
}

impl<T: k_quants::GgmlType + 'static> QuantizedType for MappedBlocks<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn matmul_t(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> candle_core::Result<()> {
        k_quants::matmul(mkn, lhs, self.slice(), dst)
    }

    fn matmul_t_f16(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f16],
        dst: &mut [f16],
    ) -> candle_core::Result<()> {
        k_quants::matmul_f16(mkn, lhs, self.slice(), dst)
    }

    fn embedding(
        &self,
        ids: &[u32],
        rows: usize,
        hidden: usize,
    ) -> candle_core::Result<CpuStorage> {
        let row_blocks = hidden / T::BLCK_SIZE;
        if !hidden.is_multiple_of(T::BLCK_SIZE) || self.blocks != rows * row_blocks {
            candle_core::bail!(
                "embedding table of {} blocks is not {rows}×{hidden}",
                self.blocks
            )
        }
        let blocks = self.slice();
        let mut out = vec![0f32; ids.len() * hidden];
        for (dst, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            let row = id as usize;
            if row >= rows {
                candle_core::bail!("embedding id {row} is out of range for {rows} rows")
            }
            T::to_float(&blocks[row * row_blocks..(row + 1) * row_blocks], dst);
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> candle_core::Result<CpuStorage> {
        let mut out = vec![0f32; elem_count];
        T::to_float(self.slice(), &mut out);
        Ok(CpuStorage::F32(out))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.blocks * std::mem::size_of::<T>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.slice().as_ptr().cast()
    }

    fn block_size(&self) -> usize {
        T::BLCK_SIZE
    }

    fn from_float(&mut self, _xs: &[f32]) {
        // candle calls this only on storage it has just allocated to quantize into; a
        // mapped file is never such a target.
        unreachable!("mapped GGUF weights are read-only")
    }

    fn from_float_imatrix(&mut self, _xs: &[f32], _w: &[f32], _n_per_row: usize) {
        unreachable!("mapped GGUF weights are read-only")
    }

    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

/// Boxes `bytes` bytes at `offset` of `map` as quantized storage of `dtype`; `None` when the
/// range is out of bounds or misaligned (the caller then copies the tensor instead).
pub(crate) fn boxed(
    dtype: GgmlDType,
    map: &Arc<Mmap>,
    offset: usize,
    bytes: usize,
) -> Option<Box<dyn QuantizedType>> {
    use k_quants::*;
    fn make<T: GgmlType + 'static>(
        map: &Arc<Mmap>,
        offset: usize,
        bytes: usize,
    ) -> Option<Box<dyn QuantizedType>> {
        Some(Box::new(MappedBlocks::<T>::new(
            map.clone(),
            offset,
            bytes,
        )?))
    }
    match dtype {
        GgmlDType::F32 => make::<f32>(map, offset, bytes),
        GgmlDType::F16 => make::<f16>(map, offset, bytes),
        GgmlDType::BF16 => make::<half::bf16>(map, offset, bytes),
        GgmlDType::Q4_0 => make::<BlockQ4_0>(map, offset, bytes),
        GgmlDType::Q4_1 => make::<BlockQ4_1>(map, offset, bytes),
        GgmlDType::Q5_0 => make::<BlockQ5_0>(map, offset, bytes),
        GgmlDType::Q5_1 => make::<BlockQ5_1>(map, offset, bytes),
        GgmlDType::Q8_0 => make::<BlockQ8_0>(map, offset, bytes),
        GgmlDType::Q8_1 => make::<BlockQ8_1>(map, offset, bytes),
        GgmlDType::Q2K => make::<BlockQ2K>(map, offset, bytes),
        GgmlDType::Q3K => make::<BlockQ3K>(map, offset, bytes),
        GgmlDType::Q4K => make::<BlockQ4K>(map, offset, bytes),
        GgmlDType::Q5K => make::<BlockQ5K>(map, offset, bytes),
        GgmlDType::Q6K => make::<BlockQ6K>(map, offset, bytes),
        GgmlDType::Q8K => make::<BlockQ8K>(map, offset, bytes),
    }
}
