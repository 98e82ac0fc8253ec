//! What a weight file holds, read from its header alone: the parts in it, how their
//! tensors are named, each part's storage types, parameters and bytes, and the memory a
//! part takes once loaded. `pictor models inspect` prints it; the loader's memory check
//! uses the same estimate.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use candle_core::{DType, quantized::GgmlDType};

use crate::{
    error::Result,
    layout::{Found, parts_in},
    weights::{GgufFile, SafetensorFiles, tensor_bytes},
};

/// One part found in a file.
#[derive(Debug, Clone)]
pub struct PartInfo {
    /// What it is ("FLUX transformer", "T5 encoder", ...).
    pub kind: &'static str,
    /// Whose names it uses ("Black Forest Labs", "diffusers", "llama.cpp", ...).
    pub naming: &'static str,
    /// The prefix before its names (`""`, `model.diffusion_model.`, ...).
    pub prefix: String,
    /// Tensors.
    pub tensors: usize,
    /// Parameters.
    pub parameters: u64,
    /// Bytes as stored.
    pub bytes: u64,
    /// Parameters per storage type (`BF16`, `F8_E4M3`, `Q4_K`, ...).
    pub types: BTreeMap<String, u64>,
    /// Bytes in memory once loaded with f32 compute (see [`PartInfo::resident_bytes`]).
    resident_f32: u64,
    /// The same with 16-bit compute.
    resident_16: u64,
    /// Of those, what K-quant tiles add over the file's blocks (zero where K-quants run
    /// compact, as T5's do: see `text/t5.rs`).
    tile_extra: u64,
}

impl PartInfo {
    /// Bytes this part takes in memory once loaded for `dtype` compute: quantized GGUF
    /// tensors as the matmul kernels hold them (see `resident_gguf_bytes`), plain GGUF
    /// tensors widened to f32 (candle's kernels run them in f32), safetensors tensors
    /// converted to `dtype`.
    pub fn resident_bytes(&self, dtype: DType) -> u64 {
        match dtype {
            DType::F32 => self.resident_f32,
            _ => self.resident_16,
        }
    }

    /// Bytes in memory when K-quant weights run compact from the file instead of tiled.
    pub fn resident_bytes_compact(&self, dtype: DType) -> u64 {
        self.resident_bytes(dtype) - self.tile_extra
    }

    /// The storage types by share of parameters, largest first: `Q4_K 95.3%, F32 0.5%`.
    pub fn type_shares(&self) -> String {
        let mut shares: Vec<(&String, &u64)> = self.types.iter().collect();
        shares.sort_by(|a, b| b.1.cmp(a.1));
        shares
            .iter()
            .map(|(t, p)| {
                format!(
                    "{t} {:.1}%",
                    **p as f64 * 100.0 / self.parameters.max(1) as f64
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What one file holds.
#[derive(Debug, Clone)]
pub struct FileInfo {
    /// The file.
    pub path: PathBuf,
    /// `safetensors` or `GGUF`.
    pub format: &'static str,
    /// GGUF `general.architecture`, when present.
    pub architecture: Option<String>,
    /// The parts recognised in it.
    pub parts: Vec<PartInfo>,
    /// Tensors that belong to no recognised part (markers, `logit_scale`, ...).
    pub other_tensors: usize,
}

struct Tensor {
    name: String,
    elems: u64,
    stored: u64,
    dtype: String,
    /// Bytes once loaded for f32 and 16-bit compute.
    resident: (u64, u64),
    /// Bytes the kernels' tiles add over the stored blocks.
    tile_extra: u64,
}

/// Reads `path`'s header and describes it.
pub fn inspect_file(path: &Path) -> Result<FileInfo> {
    let gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let (format, architecture, tensors) = if gguf {
        let file = GgufFile::open(path)?;
        let tensors = file
            .names()
            .filter_map(|name| {
                let shape = file.shape(name)?;
                let dtype = file.dtype(name)?;
                let elems = shape.iter().product::<usize>() as u64;
                let stored = tensor_bytes(dtype, elems as usize) as u64;
                let resident = resident_gguf_bytes(dtype, elems, stored);
                let tile_extra = match dtype {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => 0,
                    _ => resident.saturating_sub(stored),
                };
                Some(Tensor {
                    name: name.to_string(),
                    elems,
                    stored,
                    dtype: ggml_name(dtype).to_string(),
                    resident: (resident, resident),
                    tile_extra,
                })
            })
            .collect::<Vec<_>>();
        ("GGUF", file.meta("general.architecture"), tensors)
    } else {
        let files = SafetensorFiles::open(&[path.to_path_buf()])?;
        let tensors = files
            .names()
            .filter_map(|name| {
                let (shape, dtype) = files.stored(name)?;
                let elems = shape.iter().product::<usize>() as u64;
                let width = match dtype.as_str() {
                    "F64" | "I64" | "U64" => 8,
                    "F32" | "I32" | "U32" => 4,
                    "F16" | "BF16" | "I16" | "U16" => 2,
                    _ => 1,
                };
                Some(Tensor {
                    name: name.to_string(),
                    elems,
                    stored: elems * width,
                    dtype,
                    resident: (elems * 4, elems * 2),
                    tile_extra: 0,
                })
            })
            .collect::<Vec<_>>();
        ("safetensors", None, tensors)
    };
    let found = parts_in(tensors.iter().map(|t| t.name.as_str()));
    let mut parts: Vec<PartInfo> = found
        .iter()
        .map(|f| PartInfo {
            kind: f.kind.label(),
            naming: f.naming,
            prefix: f.prefix.clone(),
            tensors: 0,
            parameters: 0,
            bytes: 0,
            types: BTreeMap::new(),
            resident_f32: 0,
            resident_16: 0,
            tile_extra: 0,
        })
        .collect();
    let mut other_tensors = 0;
    for t in &tensors {
        match owner(&found, &t.name) {
            Some(i) => {
                let p = &mut parts[i];
                p.tensors += 1;
                p.parameters += t.elems;
                p.bytes += t.stored;
                p.resident_f32 += t.resident.0;
                p.resident_16 += t.resident.1;
                p.tile_extra += t.tile_extra;
                *p.types.entry(t.dtype.clone()).or_default() += t.elems;
            }
            None => other_tensors += 1,
        }
    }
    Ok(FileInfo {
        path: path.to_path_buf(),
        format,
        architecture,
        parts,
        other_tensors,
    })
}

/// Bytes a GGUF tensor takes once loaded: plain tensors are widened to f32; on x86-64,
/// candle's matmul repacks Q4_K and Q6_K weights into tiles of 6.0 and 10.0 bits per
/// weight (the files hold 4.5 and 6.56) with unpacked scales, which is what makes them fast
/// (Q4_K: 4.4× its row kernel in `benches/components --part qmatmul`), and Q8_0 into tiles
/// of its own size. Pictor keeps only the tiles (the file pages go back to the page cache).
fn resident_gguf_bytes(dtype: GgmlDType, elems: u64, stored: u64) -> u64 {
    match dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => elems * 4,
        GgmlDType::Q4K if cfg!(target_arch = "x86_64") => elems * 3 / 4,
        GgmlDType::Q6K if cfg!(target_arch = "x86_64") => elems * 5 / 4,
        _ => stored,
    }
}

/// The part a tensor belongs to: the one with the longest prefix it starts with. A file
/// holding one part with bare names owns every tensor but another part's.
fn owner(found: &[Found], name: &str) -> Option<usize> {
    let bundle = found.iter().any(|f| !f.prefix.is_empty());
    found
        .iter()
        .enumerate()
        .filter(|(_, f)| name.starts_with(&f.prefix) && !(bundle && f.prefix.is_empty()))
        .max_by_key(|(_, f)| f.prefix.len())
        .map(|(i, _)| i)
        .or_else(|| (!bundle && found.len() == 1).then_some(0))
}

/// GGML's names for storage types.
pub fn ggml_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A parameter count as `11.891 B`, `4.86 M` or `950 k`.
pub fn human_count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.3} B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else {
        format!("{:.0} k", x / 1e3)
    }
}

/// Bytes as `12.3 GB` (decimal, as disks are sold) or `512 MB`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

impl fmt::Display for FileInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.format)?;
        if let Some(arch) = &self.architecture {
            write!(f, " (general.architecture = {arch})")?;
        }
        writeln!(f)?;
        if self.parts.is_empty() {
            writeln!(
                f,
                "  no FLUX transformer, autoencoder, CLIP or T5 tensors found"
            )?;
        }
        for p in &self.parts {
            let prefix = if p.prefix.is_empty() {
                String::new()
            } else {
                format!(" under `{}`", p.prefix)
            };
            writeln!(
                f,
                "  {} ({} names{prefix}): {} tensors, {} parameters, {} on disk",
                p.kind,
                p.naming,
                p.tensors,
                human_count(p.parameters),
                human_bytes(p.bytes)
            )?;
            writeln!(f, "    types: {}", p.type_shares())?;
            if self.format == "GGUF" {
                let resident = human_bytes(p.resident_bytes(DType::F32));
                writeln!(
                    f,
                    "    in memory: {resident} (blocks as the matmul kernels hold them; plain tensors in f32)"
                )?;
            } else {
                writeln!(
                    f,
                    "    in memory: {} (f32 compute), {} (bf16 compute)",
                    human_bytes(p.resident_bytes(DType::F32)),
                    human_bytes(p.resident_bytes(DType::BF16))
                )?;
            }
        }
        if self.other_tensors > 0 {
            writeln!(
                f,
                "  {} other tensors (markers, scales, unused)",
                self.other_tensors
            )?;
        }
        Ok(())
    }
}
