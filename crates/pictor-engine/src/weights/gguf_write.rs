//! Writing GGUF (version 3) one tensor at a time.
//!
//! candle's `gguf_file::write` wants every tensor in memory at once; a converter that must
//! stay within the size of the largest tensor declares the directory up front (names,
//! shapes, types: the offsets follow from them) and then streams each tensor's bytes.

use std::{
    fs::File,
    io::{BufWriter, Seek, Write},
    path::{Path, PathBuf},
};

use candle_core::quantized::GgmlDType;

use super::gguf::tensor_bytes;
use crate::error::{EngineError, Result};

const ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// UTF-8 text.
    Str(String),
    /// Unsigned 32-bit.
    U32(u32),
    /// 32-bit float.
    F32(f32),
}

/// One tensor of the directory.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Name in the file.
    pub name: String,
    /// Shape, outermost first (candle's order).
    pub shape: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlDType,
}

impl TensorEntry {
    /// Bytes of data.
    pub fn bytes(&self) -> usize {
        tensor_bytes(self.dtype, self.shape.iter().product())
    }
}

/// GGML's numeric id of a type, as written in a tensor record.
pub fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// A GGUF file being written: header first, then tensors in directory order.
pub struct GgufWriter {
    out: BufWriter<File>,
    path: PathBuf,
    entries: Vec<TensorEntry>,
    next: usize,
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn padding(pos: u64) -> usize {
    ((ALIGNMENT - pos % ALIGNMENT) % ALIGNMENT) as usize
}

impl GgufWriter {
    /// Creates `path` and writes the metadata and the tensor directory.
    pub fn create(
        path: &Path,
        metadata: &[(&str, MetaValue)],
        entries: Vec<TensorEntry>,
    ) -> Result<Self> {
        let io = |e: std::io::Error| EngineError::file(path, e);
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(b"GGUF").map_err(io)?;
        out.write_all(&3u32.to_le_bytes()).map_err(io)?;
        out.write_all(&(entries.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&(metadata.len() as u64).to_le_bytes())
            .map_err(io)?;
        for (key, value) in metadata {
            put_str(&mut out, key).map_err(io)?;
            match value {
                MetaValue::Str(s) => {
                    out.write_all(&8u32.to_le_bytes()).map_err(io)?;
                    put_str(&mut out, s).map_err(io)?;
                }
                MetaValue::U32(v) => {
                    out.write_all(&4u32.to_le_bytes()).map_err(io)?;
                    out.write_all(&v.to_le_bytes()).map_err(io)?;
                }
                MetaValue::F32(v) => {
                    out.write_all(&6u32.to_le_bytes()).map_err(io)?;
                    out.write_all(&v.to_le_bytes()).map_err(io)?;
                }
            }
        }
        let mut offset = 0u64;
        for entry in &entries {
            if !entry
                .shape
                .last()
                .is_some_and(|d| d.is_multiple_of(entry.dtype.block_size()))
            {
                return Err(EngineError::Tensor {
                    path: path.to_path_buf(),
                    tensor: entry.name.clone(),
                    problem: format!(
                        "shape {:?} cannot be stored as {:?} (rows must be whole blocks of {})",
                        entry.shape,
                        entry.dtype,
                        entry.dtype.block_size()
                    ),
                });
            }
            put_str(&mut out, &entry.name).map_err(io)?;
            out.write_all(&(entry.shape.len() as u32).to_le_bytes())
                .map_err(io)?;
            for &d in entry.shape.iter().rev() {
                out.write_all(&(d as u64).to_le_bytes()).map_err(io)?;
            }
            out.write_all(&ggml_type_id(entry.dtype).to_le_bytes())
                .map_err(io)?;
            out.write_all(&offset.to_le_bytes()).map_err(io)?;
            let bytes = entry.bytes() as u64;
            offset += bytes + padding(bytes) as u64;
        }
        let pos = out.stream_position().map_err(io)?;
        out.write_all(&vec![0u8; padding(pos)]).map_err(io)?;
        Ok(Self {
            out,
            path: path.to_path_buf(),
            entries,
            next: 0,
        })
    }

    /// The next tensor the file expects, if any.
    pub fn next_entry(&self) -> Option<&TensorEntry> {
        self.entries.get(self.next)
    }

    /// Writes the next tensor's bytes; they must be exactly what the directory declared.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let entry = self.entries.get(self.next).ok_or_else(|| {
            EngineError::file(&self.path, format!("`{name}` is one tensor too many"))
        })?;
        if entry.name != name || entry.bytes() != data.len() {
            return Err(EngineError::Tensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                problem: format!(
                    "expected `{}` with {} bytes, got {} bytes",
                    entry.name,
                    entry.bytes(),
                    data.len()
                ),
            });
        }
        let io = |e: std::io::Error| EngineError::file(&self.path, e);
        self.out.write_all(data).map_err(io)?;
        self.out
            .write_all(&vec![0u8; padding(data.len() as u64)])
            .map_err(io)?;
        self.next += 1;
        Ok(())
    }

    /// Checks every declared tensor was written and flushes the file to disk.
    pub fn finish(mut self) -> Result<()> {
        if let Some(missing) = self.entries.get(self.next) {
            return Err(EngineError::Tensor {
                path: self.path.clone(),
                tensor: missing.name.clone(),
                problem: "declared but never written".into(),
            });
        }
        let io = |e: std::io::Error| EngineError::file(&self.path, e);
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_all().map_err(io)
    }
}
