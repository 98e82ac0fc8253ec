//! GGUF files: the header read with candle, the tensors kept in the file as mapped
//! quantized tensors ([`QWeights`]).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::{
    Device,
    quantized::{GgmlDType, QStorage, QTensor, gguf_file},
};
use memmap2::Mmap;

use super::mapped;
use crate::error::{EngineError, Result};

/// An opened GGUF file: its metadata and tensor directory, read from the header.
pub struct GgufFile {
    path: PathBuf,
    content: gguf_file::Content,
}

/// Bytes a tensor of `elems` elements takes in `dtype`.
pub fn tensor_bytes(dtype: GgmlDType, elems: usize) -> usize {
    elems / dtype.block_size() * dtype.type_size()
}

impl GgufFile {
    /// Reads the header and tensor directory of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| EngineError::file(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::file(path, format!("not a valid GGUF file: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| EngineError::file(path, e))?
            .len();
        // The header can be intact while the data is cut short: check every tensor ends
        // inside the file.
        for (name, info) in &content.tensor_infos {
            let bytes = tensor_bytes(info.ggml_dtype, info.shape.elem_count());
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > len {
                return Err(EngineError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    problem: format!("data ends at byte {end} but the file has {len} (truncated?)"),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    /// Whether the tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A tensor's shape (in candle's order, outermost first).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        Some(self.content.tensor_infos.get(name)?.shape.dims().to_vec())
    }

    /// A tensor's storage type.
    pub fn dtype(&self, name: &str) -> Option<GgmlDType> {
        Some(self.content.tensor_infos.get(name)?.ggml_dtype)
    }

    /// A metadata value as text (strings as they are, numbers formatted), if present.
    pub fn meta(&self, key: &str) -> Option<String> {
        use gguf_file::Value;
        Some(match self.content.metadata.get(key)? {
            Value::String(s) => s.clone(),
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            Value::Bool(v) => v.to_string(),
            Value::Array(v) => format!("[{} values]", v.len()),
        })
    }

    /// A numeric metadata value.
    pub fn meta_usize(&self, key: &str) -> Option<usize> {
        self.meta(key)?.parse().ok()
    }

    /// Reads one tensor onto the heap (used to convert or re-quantize a file).
    pub fn read(&self, name: &str, device: &Device) -> Result<QTensor> {
        let mut file =
            std::fs::File::open(&self.path).map_err(|e| EngineError::file(&self.path, e))?;
        self.content
            .tensor(&mut file, name, device)
            .map_err(|e| EngineError::Tensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                problem: format!("unreadable: {e}"),
            })
    }

    /// A diffusion model's tensors, by their bare names: a file that bundles the model with
    /// other parts (ComfyUI's and stable-diffusion.cpp's put `model.diffusion_model.` before
    /// its names; `anchor` is one of them) gives only those, without the prefix; any other
    /// file gives every tensor as named.
    pub fn diffusion_model(&self, anchor: &str, device: &Device) -> Result<QWeights> {
        const BUNDLE_PREFIX: &str = "model.diffusion_model.";
        let prefixed = self.contains(&format!("{BUNDLE_PREFIX}{anchor}"));
        self.weights(
            |name| match name.strip_prefix(BUNDLE_PREFIX) {
                Some(bare) => Some(bare.to_string()),
                None => (!prefixed).then(|| name.to_string()),
            },
            device,
        )
    }

    /// Maps the file and views every tensor whose name `rename` accepts under the name it
    /// returns. Tensors stay in the file (see [`mapped`]); on devices other than the CPU
    /// they are copied there instead.
    pub fn weights(
        &self,
        rename: impl Fn(&str) -> Option<String>,
        device: &Device,
    ) -> Result<QWeights> {
        let file = std::fs::File::open(&self.path).map_err(|e| EngineError::file(&self.path, e))?;
        // SAFETY: read-only private mapping; like every mmap-based loader we rely on the
        // file not being truncated by another process while it is mapped.
        let map =
            Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| EngineError::file(&self.path, e))?);
        let mut tensors = HashMap::new();
        let mut ranges = HashMap::new();
        for (name, info) in &self.content.tensor_infos {
            let Some(canonical) = rename(name) else {
                continue;
            };
            let bytes = tensor_bytes(info.ggml_dtype, info.shape.elem_count());
            let offset = usize::try_from(self.content.tensor_data_offset + info.offset)
                .map_err(|e| EngineError::file(&self.path, e))?;
            let bad = |e: candle_core::Error| EngineError::Tensor {
                path: self.path.clone(),
                tensor: name.clone(),
                problem: e.to_string(),
            };
            let storage = match mapped::boxed(info.ggml_dtype, &map, offset, bytes) {
                Some(blocks) if device.is_cpu() => QStorage::Cpu(blocks),
                _ => {
                    let q = self.read(name, device)?;
                    tensors.insert(canonical, Arc::new(q));
                    continue;
                }
            };
            let q = QTensor::new(storage, info.shape.clone()).map_err(bad)?;
            ranges.insert(canonical.clone(), (offset, bytes));
            tensors.insert(canonical, Arc::new(q));
        }
        let meta = self
            .content
            .metadata
            .keys()
            .filter_map(|k| Some((k.clone(), self.meta(k)?)))
            .collect();
        Ok(QWeights {
            tensors,
            ranges,
            meta,
            map: Some(map),
            origin: self.path.clone(),
            device: device.clone(),
        })
    }
}

/// A quantized weight `(n, k)` left in its file and multiplied by candle's row kernel.
pub struct CompactWeight {
    blocks: Box<dyn candle_core::quantized::QuantizedType>,
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
    n: usize,
    k: usize,
}

impl CompactWeight {
    /// `x·Wᵀ` for `x` `(…, k)` in f32.
    pub fn forward(&self, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let mut dims = x.dims().to_vec();
        let m = x.elem_count() / self.k;
        let lhs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut dst = vec![0f32; m * self.n];
        self.blocks.matmul_t((m, self.k, self.n), &lhs, &mut dst)?;
        if let Some(last) = dims.last_mut() {
            *last = self.n;
        }
        Ok(candle_core::Tensor::from_vec(dst, dims, x.device())?)
    }

    /// Hands the weight's file pages back to the page cache until the next use.
    pub fn release(&self) {
        super::release(&self.map[self.offset..self.offset + self.len]);
    }
}

/// Quantized (or plain) tensors by canonical name, as a GGUF file or a conversion holds
/// them.
pub struct QWeights {
    tensors: HashMap<String, Arc<QTensor>>,
    ranges: HashMap<String, (usize, usize)>,
    meta: HashMap<String, String>,
    map: Option<Arc<Mmap>>,
    origin: PathBuf,
    device: Device,
}

impl QWeights {
    /// Tensors already in memory (converted on the fly), by canonical name.
    pub fn from_tensors(
        tensors: HashMap<String, Arc<QTensor>>,
        origin: PathBuf,
        device: &Device,
    ) -> Self {
        Self {
            tensors,
            ranges: HashMap::new(),
            meta: HashMap::new(),
            map: None,
            origin,
            device: device.clone(),
        }
    }

    /// The file they come from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The device tensors are computed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A metadata value of the file, as text.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(String::as_str)
    }

    /// Whether canonical `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Canonical names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor's shape.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        Some(self.tensors.get(name)?.shape().dims().to_vec())
    }

    /// Canonical `name`, checked to have shape `want`.
    pub fn get(&self, name: &str, want: &[usize]) -> Result<Arc<QTensor>> {
        let bad = |problem: String| EngineError::Tensor {
            path: self.origin.clone(),
            tensor: name.to_string(),
            problem,
        };
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| bad("missing".into()))?;
        if tensor.shape().dims() != want {
            return Err(bad(format!(
                "has shape {:?}, expected {want:?}",
                tensor.shape().dims()
            )));
        }
        Ok(tensor.clone())
    }

    /// Canonical `name` as compact blocks in the file, multiplied by candle's row kernel
    /// with no repacked copy: for weights used rarely (T5 runs once per request), whose
    /// pages can be handed back after each use. `None` for tensors not mapped from a file.
    pub fn compact(&self, name: &str, want: &[usize]) -> Result<Option<CompactWeight>> {
        let tensor = self.get(name, want)?;
        let (Some(map), Some(&(offset, len))) = (&self.map, self.ranges.get(name)) else {
            return Ok(None);
        };
        let Some(blocks) = mapped::boxed(tensor.dtype(), map, offset, len) else {
            return Ok(None);
        };
        let (n, k) = tensor.shape().dims2()?;
        Ok(Some(CompactWeight {
            blocks,
            map: map.clone(),
            offset,
            len,
            n,
            k,
        }))
    }

    /// Hands the file pages of `name` back to the page cache: for a weight that has been
    /// copied or repacked, the mapped original is no longer read.
    pub fn release(&self, name: &str) {
        if let (Some(map), Some(&(offset, len))) = (&self.map, self.ranges.get(name)) {
            super::release(&map[offset..offset + len]);
        }
    }

    /// Bytes of every tensor as stored.
    pub fn stored_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| t.storage_size_in_bytes() as u64)
            .sum()
    }
}
