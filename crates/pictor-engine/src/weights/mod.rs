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
            .filter(|p| p.is_empty() || p.ends_with('.'))
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

    /// The file and parsed header entry of a tensor.
    fn view<'a>(&'a self, name: &'a str) -> Result<View<'a>> {
        let &index = self.routing.get(name).ok_or_else(|| EngineError::Tensor {
            path: self.describe(),
            tensor: name.to_string(),
            problem: "missing".into(),
        })?;
        let (path, st) = &self.files[index];
        let view = st.get(name).map_err(|e| EngineError::Tensor {
            path: path.clone(),
            tensor: name.to_string(),
            problem: format!("unreadable: {e}"),
        })?;
        Ok(View {
            name,
            path,
            st,
            view,
        })
    }

    /// Reads one tensor into memory as `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.load_rows(&[name], dtype, device)
    }

    /// Reads tensors that agree past their first dimension and joins them along it, as
    /// `dtype` on `device`. For f32 on the CPU from f32, bf16 or f16 files, each is
    /// widened straight from the mapped file into its rows of the one output buffer: no
    /// stored-dtype copy and no parts to concatenate, whose freed buffers would otherwise
    /// be left as holes between the weights on the heap (263 MB after loading the
    /// full-width transformer test file).
    pub fn load_rows(&self, names: &[&str], dtype: DType, device: &Device) -> Result<Tensor> {
        let views = names
            .iter()
            .map(|n| self.view(n))
            .collect::<Result<Vec<_>>>()?;
        if device.is_cpu()
            && dtype == DType::F32
            && let Some(tensor) = widen_rows(&views)?
        {
            return Ok(tensor);
        }
        let mut parts = views
            .iter()
            .map(|v| v.convert(dtype, device))
            .collect::<Result<Vec<_>>>()?;
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        Tensor::cat(&parts, 0).map_err(|e| views[0].error(format!("cannot join: {e}")))
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

/// A tensor's header entry, with its file.
struct View<'a> {
    name: &'a str,
    path: &'a PathBuf,
    st: &'a MmapedSafetensors,
    view: safetensors::tensor::TensorView<'a>,
}

impl View<'_> {
    fn error(&self, problem: String) -> EngineError {
        EngineError::Tensor {
            path: self.path.clone(),
            tensor: self.name.to_string(),
            problem,
        }
    }

    /// The tensor through candle's loader and `to_dtype`.
    fn convert(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let stored = if self.view.dtype() == safetensors::Dtype::F8_E5M2 {
            e5m2_to_f16(self.view.data(), self.view.shape(), device)
        } else {
            self.st.load(self.name, device)
        };
        let tensor = stored
            .map_err(|e| self.error(format!("unreadable: {e}")))?
            .to_dtype(dtype)
            .map_err(|e| self.error(format!("cannot convert to {dtype:?}: {e}")))?;
        release(self.view.data());
        Ok(tensor)
    }
}

/// `views` (all f32, bf16 or f16, agreeing past their first dimension) widened to f32
/// and joined along the first dimension into one CPU tensor, straight from the mapped
/// bytes; `None` when a view has another dtype or the shapes do not join.
fn widen_rows(views: &[View<'_>]) -> Result<Option<Tensor>> {
    use safetensors::Dtype;
    let Some(first) = views.first() else {
        return Ok(None);
    };
    let tail = first.view.shape().get(1..).unwrap_or_default();
    let joins = views.iter().all(|v| {
        matches!(v.view.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::F16)
            && v.view.shape().get(1..) == Some(tail)
    });
    if !joins {
        return Ok(None);
    }
    let rows: usize = views.iter().map(|v| v.view.shape()[0]).sum();
    let mut out = vec![0f32; rows * tail.iter().product::<usize>()];
    let mut at = 0;
    for v in views {
        let n = v.view.shape().iter().product::<usize>();
        if v.view.data().len() * 8 != n * v.view.dtype().bitsize() {
            return Err(v.error("data does not match its shape".into()));
        }
        widen(v.view.dtype(), v.view.data(), &mut out[at..at + n]);
        release(v.view.data());
        at += n;
    }
    let mut shape = vec![rows];
    shape.extend_from_slice(tail);
    Ok(Some(Tensor::from_vec(out, shape, &Device::Cpu)?))
}

/// Little-endian f32, bf16 or f16 `bytes` as f32 into `dst`, in parallel.
fn widen(dtype: safetensors::Dtype, bytes: &[u8], dst: &mut [f32]) {
    use rayon::prelude::*;
    use safetensors::Dtype;
    const CHUNK: usize = 1 << 16;
    let width = match dtype {
        Dtype::F32 => 4,
        _ => 2,
    };
    dst.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .for_each(|(dst, src)| match dtype {
            Dtype::F32 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
            Dtype::BF16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f32::from_bits(u32::from(u16::from_le_bytes([s[0], s[1]])) << 16);
                }
            }
            _ => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = half::f16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
        });
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
    /// diffusers `ZImageTransformer2DModel` names, read as Z-Image's original names.
    DiffusersZImage,
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
            Self::DiffusersZImage => diffusers::zimage_transformer(name),
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
                let srcs: Vec<&str> = srcs.iter().map(String::as_str).collect();
                self.files.load_rows(&srcs, dtype, device)
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

    /// The direct f32 path reads the same values as candle's loader and `to_dtype`, for
    /// each stored dtype and for parts joined along rows; other targets and dtypes that do
    /// not join take candle's path.
    #[test]
    fn rows_are_widened_as_candle_converts_them() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("w.safetensors");
        let base = Tensor::randn(0f32, 3.0, (5, 7), &dev)?;
        let tensors = std::collections::HashMap::from([
            ("f32".to_string(), base.clone()),
            ("bf16".to_string(), base.to_dtype(DType::BF16)?),
            (
                "f16".to_string(),
                base.narrow(0, 0, 2)?.to_dtype(DType::F16)?,
            ),
            ("odd".to_string(), Tensor::zeros((2, 3), DType::F16, &dev)?),
        ]);
        candle_core::safetensors::save(&tensors, &path)?;
        let files = SafetensorFiles::open(&[path])?;
        let st = &files.files[0].1;
        let want = |n: &str| -> anyhow::Result<Vec<Vec<f32>>> {
            Ok(st.load(n, &dev)?.to_dtype(DType::F32)?.to_vec2()?)
        };
        for n in ["f32", "bf16", "f16"] {
            assert_eq!(
                files.load(n, DType::F32, &dev)?.to_vec2::<f32>()?,
                want(n)?,
                "{n}"
            );
        }
        let joined = files.load_rows(&["bf16", "f16", "f32"], DType::F32, &dev)?;
        let expect: Vec<Vec<f32>> = [want("bf16")?, want("f16")?, want("f32")?].concat();
        assert_eq!(joined.dims(), [12, 7]);
        assert_eq!(joined.to_vec2::<f32>()?, expect);
        // Through candle: another target dtype, and parts that cannot join.
        let bf16 = files.load_rows(&["bf16", "f16"], DType::BF16, &dev)?;
        assert_eq!(bf16.dtype(), DType::BF16);
        assert_eq!(bf16.dims(), [7, 7]);
        assert!(files.load_rows(&["f32", "odd"], DType::F32, &dev).is_err());
        Ok(())
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
