//! Reading weights: memory-mapped safetensors (one file or shards) and GGUF, seen through
//! a name map so that every layout is read by one model implementation.
//!
//! Models are built with candle's `VarBuilder`, which asks for tensors by the canonical
//! (Black Forest Labs / transformers) names. [`MappedWeights`] answers those requests from
//! files in any supported layout: it translates each name with a [`Scheme`], reads the
//! source tensors lazily, concatenates or reorders them where the layouts differ, checks the
//! shape, and on any failure says which file and which tensor are at fault.

mod diffusers;
mod gguf;
pub mod gguf_write;
mod mapped;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::{DType, Device, Shape, Tensor, safetensors::MmapedSafetensors};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};

pub use gguf::{CompactWeight, GgufFile, QWeights, tensor_bytes};

use crate::error::{EngineError, Result};

/// A set of safetensors files (one model part, possibly sharded), memory-mapped.
pub struct SafetensorFiles {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
}

impl SafetensorFiles {
    /// Maps and parses the headers of `paths`. A missing, truncated or malformed file is
    /// an error naming that file.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(EngineError::file(path, "no such file"));
            }
            // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the
            // file not being truncated by another process while it is mapped.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
                EngineError::file(path, format!("not a valid safetensors file: {e}"))
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path.clone(), st));
        }
        Ok(Self { files, routing })
    }

    /// The tensor names in all files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(String::as_str)
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// The prefix before `anchor` in the tensor names that end with it (`""` for bare
    /// names, `model.diffusion_model.` in a bundled checkpoint); `None` when none does.
    pub fn prefix_of(&self, anchor: &str) -> Option<String> {
        self.names()
            .filter_map(|n| n.strip_suffix(anchor))
            .min_by_key(|p| p.len())
            .map(str::to_string)
    }

    /// The shape and stored dtype name (`BF16`, `F8_E4M3`, ...) of a tensor, as the header
    /// spells it, including dtypes candle cannot load.
    pub fn stored(&self, name: &str) -> Option<(Vec<usize>, String)> {
        let (_, st) = &self.files[*self.routing.get(name)?];
        let view = st.get(name).ok()?;
        Some((view.shape().to_vec(), format!("{:?}", view.dtype())))
    }

    /// Where a tensor lives, or a description of all files for error messages.
    pub fn path_of(&self, name: &str) -> PathBuf {
        match self.routing.get(name) {
            Some(&i) => self.files[i].0.clone(),
            None => self.describe(),
        }
    }

    fn describe(&self) -> PathBuf {
        match self.files.as_slice() {
            [(p, _)] => p.clone(),
            files => PathBuf::from(
                files
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        }
    }

    /// Reads one tensor into memory as `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let &index = self.routing.get(name).ok_or_else(|| EngineError::Tensor {
            path: self.describe(),
            tensor: name.to_string(),
            problem: "missing".into(),
        })?;
        let (path, st) = &self.files[index];
        let bad = |problem: String| EngineError::Tensor {
            path: path.clone(),
            tensor: name.to_string(),
            problem,
        };
        let view = st.get(name).map_err(|e| bad(format!("unreadable: {e}")))?;
        let stored = if view.dtype() == safetensors::Dtype::F8_E5M2 {
            e5m2_to_f16(view.data(), view.shape(), device)
        } else {
            st.load(name, device)
        };
        let tensor = stored
            .map_err(|e| bad(format!("unreadable: {e}")))?
            .to_dtype(dtype)
            .map_err(|e| bad(format!("cannot convert to {dtype:?}: {e}")))?;
        release(view.data());
        Ok(tensor)
    }

    /// The scale of a "scaled fp8" weight (ComfyUI's `<layer>.scale_weight`, or the newer
    /// `<layer>.weight_scale`): the stored weight times this is the real one.
    fn fp8_scale(&self, weight: &str) -> Result<Option<f32>> {
        let Some(layer) = weight.strip_suffix(".weight") else {
            return Ok(None);
        };
        for key in [
            format!("{layer}.scale_weight"),
            format!("{layer}.weight_scale"),
        ] {
            if self.contains(&key) {
                let scale = self.load(&key, DType::F32, &Device::Cpu)?;
                let value = scale
                    .flatten_all()
                    .and_then(|s| s.to_vec1::<f32>())
                    .ok()
                    .filter(|v| v.len() == 1)
                    .ok_or_else(|| EngineError::Tensor {
                        path: self.path_of(&key),
                        tensor: key.clone(),
                        problem: format!(
                            "a weight scale must be one number, not {:?}",
                            scale.dims()
                        ),
                    })?;
                return Ok(Some(value[0]));
            }
        }
        Ok(None)
    }
}

/// fp8 E5M2 values are the top byte of an IEEE half, so widening is exact; candle reads
/// E4M3 itself but not E5M2.
fn e5m2_to_f16(bytes: &[u8], shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let halves: Vec<half::f16> = bytes
        .iter()
        .map(|&b| half::f16::from_bits(u16::from(b) << 8))
        .collect();
    Tensor::from_vec(halves, shape, device)
}

/// Drops the pages of `bytes`, a range of a read-only file mapping that has just been
/// copied into a tensor, from this process's resident set. Without it, loading holds the
/// file's pages and the converted copy at once (a bf16 transformer read as f32 peaked at
/// 1.5× the f32 bytes). The pages stay in the page cache and are read back if touched.
fn release(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let start = bytes.as_ptr() as usize;
        let aligned = start - start % page.max(1);
        let len = bytes.len() + (start - aligned);
        // SAFETY: the range lies inside a private read-only file mapping that stays mapped;
        // MADV_DONTNEED only drops resident pages, which later reads fault back in from
        // the file, so no data the mapping shows can change.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// How canonical names map onto a file's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// The file uses the canonical names.
    Identity,
    /// diffusers `FluxTransformer2DModel` names, read as Black Forest Labs names.
    DiffusersFluxTransformer,
    /// diffusers `AutoencoderKL` names, read as Black Forest Labs `ae.safetensors` names;
    /// `levels` is the number of resolution levels (the length of `block_out_channels`).
    DiffusersVae {
        /// Resolution levels.
        levels: usize,
    },
}

/// How one canonical tensor is made from the file's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipe {
    /// One tensor, as stored.
    Tensor(String),
    /// Several tensors concatenated along dimension 0, in order.
    Concat(Vec<String>),
    /// One tensor whose two halves along dimension 0 are swapped.
    SwapHalves(String),
}

impl Recipe {
    fn sources(&self) -> &[String] {
        match self {
            Self::Tensor(n) | Self::SwapHalves(n) => std::slice::from_ref(n),
            Self::Concat(ns) => ns,
        }
    }
}

impl Scheme {
    /// The recipe for canonical name `name`, with `prefix` put before every source name.
    pub fn recipe(self, prefix: &str, name: &str) -> Recipe {
        let recipe = match self {
            Self::Identity => Recipe::Tensor(name.to_string()),
            Self::DiffusersFluxTransformer => diffusers::flux_transformer(name),
            Self::DiffusersVae { levels } => diffusers::vae(name, levels),
        };
        if prefix.is_empty() {
            return recipe;
        }
        let p = |n: &String| format!("{prefix}{n}");
        match recipe {
            Recipe::Tensor(n) => Recipe::Tensor(p(&n)),
            Recipe::SwapHalves(n) => Recipe::SwapHalves(p(&n)),
            Recipe::Concat(ns) => Recipe::Concat(ns.iter().map(p).collect()),
        }
    }
}

/// Safetensors files seen through a [`Scheme`]: a `VarBuilder` backend.
#[derive(Clone)]
pub struct MappedWeights {
    files: Arc<SafetensorFiles>,
    scheme: Scheme,
    prefix: String,
}

impl MappedWeights {
    /// Views `files` through `scheme`, with every source name starting with `prefix`.
    pub fn new(files: Arc<SafetensorFiles>, scheme: Scheme, prefix: impl Into<String>) -> Self {
        Self {
            files,
            scheme,
            prefix: prefix.into(),
        }
    }

    /// The underlying files.
    pub fn files(&self) -> &SafetensorFiles {
        &self.files
    }

    /// Whether every source tensor of canonical `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        let recipe = self.scheme.recipe(&self.prefix, name);
        recipe.sources().iter().all(|s| self.files.contains(s))
    }

    /// The shape canonical `name` will have, from the headers alone.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let recipe = self.scheme.recipe(&self.prefix, name);
        let mut shapes = recipe
            .sources()
            .iter()
            .map(|s| self.files.stored(s).map(|(shape, _)| shape));
        let mut shape = shapes.next()??;
        for other in shapes {
            let other = other?;
            *shape.first_mut()? += other.first()?;
        }
        Some(shape)
    }

    /// Reads canonical `name` as `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let recipe = self.scheme.recipe(&self.prefix, name);
        let compute = |r: candle_core::Result<Tensor>, src: &str| {
            r.map_err(|e| EngineError::Tensor {
                path: self.files.path_of(src),
                tensor: src.to_string(),
                problem: format!("cannot build `{name}`: {e}"),
            })
        };
        match &recipe {
            Recipe::Tensor(src) => {
                let t = self.files.load(src, dtype, device)?;
                match self.files.fp8_scale(src)? {
                    Some(scale) => compute(t * f64::from(scale), src),
                    None => Ok(t),
                }
            }
            Recipe::Concat(srcs) => {
                let parts = srcs
                    .iter()
                    .map(|s| self.files.load(s, dtype, device))
                    .collect::<Result<Vec<_>>>()?;
                compute(Tensor::cat(&parts, 0), &srcs[0])
            }
            Recipe::SwapHalves(src) => {
                let t = self.files.load(src, dtype, device)?;
                let half = t.dim(0).map_err(EngineError::from)? / 2;
                let swapped = t
                    .narrow(0, half, half)
                    .and_then(|b| Tensor::cat(&[b, t.narrow(0, 0, half)?], 0));
                compute(swapped, src)
            }
        }
    }

    /// A `VarBuilder` over these weights, converting to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn shape_error(&self, name: &str, got: &Shape, want: &Shape) -> candle_core::Error {
        let recipe = self.scheme.recipe(&self.prefix, name);
        let src = &recipe.sources()[0];
        candle_core::Error::Msg(
            EngineError::Tensor {
                path: self.files.path_of(src),
                tensor: src.clone(),
                problem: format!("has shape {got:?}, expected {want:?} (read as `{name}`)"),
            }
            .to_string(),
        )
    }
}

/// Whether two shapes hold the same elements in the same order, differing only by trailing
/// unit dimensions (a linear `[c, c]` stored for a 1×1 convolution `[c, c, 1, 1]`).
fn same_but_trailing_ones(a: &[usize], b: &[usize]) -> bool {
    let trim = |s: &[usize]| {
        let end = s.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
        s[..end].to_vec()
    };
    trim(a) == trim(b)
}

impl SimpleBackend for MappedWeights {
    fn get(
        &self,
        want: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() == &want {
            return Ok(tensor);
        }
        if same_but_trailing_ones(tensor.dims(), want.dims()) {
            return tensor.reshape(want);
        }
        Err(self.shape_error(name, tensor.shape(), &want))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// Reads the `weight_map` of a sharded checkpoint's `*.safetensors.index.json` and returns
/// the shard files it names (in order, each once), checking that each exists.
pub fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| EngineError::file(index, e))?;
    let parsed: Index = serde_json::from_str(&text)
        .map_err(|e| EngineError::file(index, format!("not a safetensors index: {e}")))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for file in parsed.weight_map.values() {
        let path = dir.join(file);
        if !shards.contains(&path) {
            shards.push(path);
        }
    }
    shards.sort();
    if shards.is_empty() {
        return Err(EngineError::file(index, "the index lists no tensors"));
    }
    for shard in &shards {
        if !shard.is_file() {
            return Err(EngineError::file(
                index,
                format!("names shard {} which does not exist", shard.display()),
            ));
        }
    }
    let files = SafetensorFiles::open(&shards)?;
    for (tensor, file) in &parsed.weight_map {
        if !files.contains(tensor) {
            return Err(EngineError::Tensor {
                path: dir.join(file),
                tensor: tensor.clone(),
                problem: format!("listed in {} but missing from the shard", index.display()),
            });
        }
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_unit_dims_are_the_only_reshape_allowed() {
        assert!(same_but_trailing_ones(&[8, 8], &[8, 8, 1, 1]));
        assert!(same_but_trailing_ones(&[8, 8, 1, 1], &[8, 8]));
        assert!(!same_but_trailing_ones(&[8, 8], &[64]));
        assert!(!same_but_trailing_ones(&[4, 16], &[8, 8, 1, 1]));
    }

    #[test]
    fn prefix_applies_to_every_source() {
        let r =
            Scheme::DiffusersFluxTransformer.recipe("p.", "double_blocks.1.img_attn.qkv.weight");
        assert_eq!(
            r,
            Recipe::Concat(vec![
                "p.transformer_blocks.1.attn.to_q.weight".into(),
                "p.transformer_blocks.1.attn.to_k.weight".into(),
                "p.transformer_blocks.1.attn.to_v.weight".into(),
            ])
        );
    }
}
