//! GGUF files: quantized transformers read by candle's quantized FLUX model.

use std::path::{Path, PathBuf};

use candle_core::{Device, quantized::gguf_file};
use candle_transformers::quantized_var_builder::VarBuilder as QVarBuilder;

use crate::error::{EngineError, Result};

/// An opened GGUF file: its tensor directory, read from the header.
pub struct GgufFile {
    path: PathBuf,
    content: gguf_file::Content,
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
        // The header can be intact while the data is cut short: check the last tensor ends
        // inside the file.
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size()
                * info.ggml_dtype.type_size();
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

    /// A quantized `VarBuilder` over the file; tensors are read when the model asks.
    pub fn var_builder(&self, device: &Device) -> Result<QVarBuilder> {
        QVarBuilder::from_gguf(&self.path, device).map_err(|e| EngineError::file(&self.path, e))
    }
}
