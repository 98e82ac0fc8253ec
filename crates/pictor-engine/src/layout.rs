//! Finding a model's parts on disk: folders, single files and Hugging Face cache snapshots.
//!
//! Parts are recognised by the tensor names inside the files, never by file names alone, so
//! `flux1-schnell.safetensors` renamed to anything still loads, and a wrong file put in the
//! wrong place is reported as such.

use std::path::{Path, PathBuf};

use crate::{
    error::{EngineError, Result},
    weights::{GgufFile, SafetensorFiles, shards_from_index},
};

/// One part of a model: its weight files (one, or several shards) and its `config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Part {
    /// Weight files: safetensors shards, or one GGUF file.
    pub files: Vec<PathBuf>,
    /// The part's config (diffusers' `config.json`, or one beside a single file), when
    /// there is one.
    pub config: Option<PathBuf>,
    /// The RoPE axes the model's settings state for a transformer whose files record none
    /// (`rope_axes` in pictor.toml); other parts ignore it.
    pub rope_axes: Option<Vec<usize>>,
}

impl Part {
    /// A part made of one file with no config.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            files: vec![path.into()],
            ..Self::default()
        }
    }

    /// A part made of one file, with the config beside it that records what its tensors
    /// cannot: `<name>.json` (`flux1-schnell.json` for `flux1-schnell.safetensors`), else
    /// a `config.json` in the same folder; either must say it is written for this kind of
    /// part (diffusers' `_class_name`, or the fields only that kind has). Only transformers
    /// and autoencoders take one; text encoders are read from their tensors alone.
    pub(crate) fn beside(path: &Path, kind: Kind) -> Self {
        let mut part = Self::file(path);
        if matches!(kind, Kind::Transformer | Kind::Vae) {
            part.config = [
                path.with_extension("json"),
                path.with_file_name("config.json"),
            ]
            .into_iter()
            .find(|c| c.is_file() && config_kind(c) == Some(kind));
        }
        part
    }

    /// A diffusers/transformers part folder: `config.json` plus either a sharded
    /// checkpoint (`*.safetensors.index.json`) or the `*.safetensors` files in it.
    pub fn folder(dir: &Path) -> Result<Self> {
        let entries = list_files(dir)?;
        let index = entries
            .iter()
            .find(|p| p.to_string_lossy().ends_with(".safetensors.index.json"));
        let files = match index {
            Some(index) => shards_from_index(index)?,
            None => entries
                .iter()
                .filter(|p| has_ext(p, "safetensors") || has_ext(p, "gguf"))
                .cloned()
                .collect(),
        };
        if files.is_empty() {
            return Err(EngineError::NotFound(format!(
                "{}: no .safetensors or .gguf weights in this folder",
                dir.display()
            )));
        }
        let config = dir.join("config.json");
        Ok(Self {
            files,
            config: config.is_file().then_some(config),
            ..Self::default()
        })
    }

    /// A part made of one weight file of any kind, with the config beside it that records
    /// what its tensors cannot (see [`Part::beside`]'s rules): what a user names when they
    /// point at one file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(match classify_file(path)? {
            Some(kind) => Self::beside(path, kind),
            None => Self::file(path),
        })
    }

    /// Whether the part is a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(self.files.as_slice(), [f] if has_ext(f, "gguf"))
    }
}

/// Where every part of a FLUX model lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The flux transformer (BFL or diffusers names, or GGUF).
    pub transformer: Part,
    /// The autoencoder (BFL `ae.safetensors` or diffusers `vae/`).
    pub vae: Part,
    /// The CLIP-L text encoder.
    pub clip: Part,
    /// The T5 encoder.
    pub t5: Part,
    /// CLIP's tokenizer: a folder (`vocab.json` + `merges.txt`, or `tokenizer.json`) or a
    /// `tokenizer.json` file; `None` for FLUX.1's own, built into the engine (split files,
    /// bundles and GGUF files come without one).
    pub clip_tokenizer: Option<PathBuf>,
    /// T5's tokenizer: a folder with `tokenizer.json`, or the file; `None` for FLUX.1's own.
    pub t5_tokenizer: Option<PathBuf>,
}

/// What a weight file holds, judged from its tensor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Transformer,
    Vae,
    Clip,
    T5,
}

impl Kind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Transformer => "FLUX transformer",
            Self::Vae => "autoencoder",
            Self::Clip => "CLIP text encoder",
            Self::T5 => "T5 encoder",
        }
    }
}

/// A part found inside one file: what it is, the prefix before its names (`""` for bare
/// names, `vae.` in a bundle) and how its names are spelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    pub kind: Kind,
    pub prefix: String,
    pub naming: &'static str,
}

/// One tensor name per part and naming scheme that only that part has.
const SIGNS: [(&str, Kind, &str); 7] = [
    (
        "double_blocks.0.img_attn.qkv.weight",
        Kind::Transformer,
        "Black Forest Labs",
    ),
    (
        "transformer_blocks.0.attn.to_q.weight",
        Kind::Transformer,
        "diffusers",
    ),
    (
        "decoder.up_blocks.0.resnets.0.conv1.weight",
        Kind::Vae,
        "diffusers",
    ),
    (
        "decoder.up.0.block.0.conv1.weight",
        Kind::Vae,
        "Black Forest Labs",
    ),
    (
        "text_model.embeddings.token_embedding.weight",
        Kind::Clip,
        "transformers",
    ),
    (
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        Kind::T5,
        "transformers",
    ),
    ("enc.blk.0.attn_q.weight", Kind::T5, "llama.cpp"),
];

/// Every part whose sign appears among `names`, with its prefix, in `SIGNS` order.
pub(crate) fn parts_in<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Found> {
    let mut prefixes: [Option<&str>; SIGNS.len()] = [None; SIGNS.len()];
    for name in names {
        for (slot, (sign, ..)) in prefixes.iter_mut().zip(SIGNS) {
            // A prefix ends at a dot: `single_transformer_blocks.0...` is no `transformer_blocks`.
            if let Some(p) = name.strip_suffix(sign)
                && (p.is_empty() || p.ends_with('.'))
                && slot.is_none_or(|q| p.len() < q.len())
            {
                *slot = Some(p);
            }
        }
    }
    prefixes
        .iter()
        .zip(SIGNS)
        .filter_map(|(p, (_, kind, naming))| {
            Some(Found {
                kind,
                prefix: (*p)?.to_string(),
                naming,
            })
        })
        .collect()
}

/// Whether some name in `names` is `sign` after a prefix that ends at a dot (or none):
/// `model.diffusion_model.x_pad_token` has `x_pad_token`, `cap_pad_token` has not `pad_token`.
pub(crate) fn has_name(names: &[String], sign: &str) -> bool {
    names.iter().any(|n| ends_with_name(n, sign))
}

fn ends_with_name(name: &str, sign: &str) -> bool {
    name.strip_suffix(sign)
        .is_some_and(|p| p.is_empty() || p.ends_with('.'))
}

/// A weight file's tensor names, from its header, sorted.
pub(crate) fn names_in_file(path: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = if has_ext(path, "gguf") {
        GgufFile::open(path)?.names().map(str::to_string).collect()
    } else {
        let files = SafetensorFiles::open(&[path.to_path_buf()])?;
        files.names().map(str::to_string).collect()
    };
    names.sort();
    Ok(names)
}

/// The parts one weight file holds, from its header.
pub(crate) fn parts_in_file(path: &Path) -> Result<Vec<Found>> {
    Ok(parts_in(names_in_file(path)?.iter().map(String::as_str)))
}

/// Classifies one weight file by reading its header.
pub(crate) fn classify_file(path: &Path) -> Result<Option<Kind>> {
    Ok(parts_in_file(path)?.first().map(|f| f.kind))
}

/// The kind of part a config file is written for: from diffusers' `_class_name`, else
/// from the fields only that kind's configs have.
fn config_kind(path: &Path) -> Option<Kind> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let has = |key: &str| json.get(key).is_some();
    match json.get("_class_name").and_then(|c| c.as_str()) {
        Some("FluxTransformer2DModel") => Some(Kind::Transformer),
        Some("AutoencoderKL") => Some(Kind::Vae),
        Some(_) => None,
        None if has("axes_dims_rope") || has("attention_head_dim") => Some(Kind::Transformer),
        None if has("norm_num_groups") || has("latent_channels") => Some(Kind::Vae),
        None => None,
    }
}

fn has_ext(path: &Path, ext: &str) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// The weight files (`.safetensors`, `.gguf`) at the top of `dir`, sorted.
pub(crate) fn weight_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = list_files(dir)?;
    files.retain(|p| has_ext(p, "safetensors") || has_ext(p, "gguf"));
    Ok(files)
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).map_err(|e| EngineError::file(dir, e))?;
    let mut files = Vec::new();
    for entry in read {
        let path = entry.map_err(|e| EngineError::file(dir, e))?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Each part of a model looked for, found or not, as [`ModelFiles::survey`] leaves it:
/// `pictor models inspect` describes what is there and names what is missing, where
/// [`ModelFiles::resolve`] needs every part.
#[derive(Debug)]
pub struct Survey {
    /// The flux transformer.
    pub transformer: Result<Part>,
    /// The autoencoder.
    pub vae: Result<Part>,
    /// The CLIP-L text encoder.
    pub clip: Result<Part>,
    /// The T5 encoder.
    pub t5: Result<Part>,
    /// See [`ModelFiles::clip_tokenizer`].
    pub clip_tokenizer: Option<PathBuf>,
    /// See [`ModelFiles::t5_tokenizer`].
    pub t5_tokenizer: Option<PathBuf>,
}

impl Survey {
    /// Each network part with the name users are told (`transformer`, `autoencoder`,
    /// `CLIP`, `T5`), in that order.
    pub fn parts(&self) -> [(&'static str, &Result<Part>); 4] {
        [
            ("transformer", &self.transformer),
            ("autoencoder", &self.vae),
            ("CLIP", &self.clip),
            ("T5", &self.t5),
        ]
    }

    /// The model, if every part was found.
    pub fn into_files(self) -> Result<ModelFiles> {
        Ok(ModelFiles {
            transformer: self.transformer?,
            vae: self.vae?,
            clip: self.clip?,
            t5: self.t5?,
            clip_tokenizer: self.clip_tokenizer,
            t5_tokenizer: self.t5_tokenizer,
        })
    }
}

impl ModelFiles {
    /// Finds a model from what a user typed: a folder, a weight file (its other parts are
    /// looked for beside it), or a Hugging Face repo id (`owner/name`, optionally
    /// `owner/name@revision`) looked up in the local Hugging Face cache.
    pub fn resolve(spec: &str) -> Result<Self> {
        Self::resolve_in(spec, &hf_hub_cache_dir())
    }

    /// [`ModelFiles::resolve`] with an explicit Hugging Face hub cache folder.
    pub fn resolve_in(spec: &str, hf_cache: &Path) -> Result<Self> {
        Self::survey_in(spec, hf_cache)?.into_files()
    }

    /// Looks for every part where [`ModelFiles::resolve`] would, keeping what is found when
    /// some part is not. Fails only when `spec` itself names nothing, or names a weight file
    /// that is not a transformer.
    pub fn survey(spec: &str) -> Result<Survey> {
        Self::survey_in(spec, &hf_hub_cache_dir())
    }

    /// [`ModelFiles::survey`] with an explicit Hugging Face hub cache folder.
    pub fn survey_in(spec: &str, hf_cache: &Path) -> Result<Survey> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::assemble(path, None);
        }
        if path.is_file() {
            return Self::survey_file(path);
        }
        if let Some(snapshot) = hf_snapshot(spec, hf_cache)? {
            return Self::assemble(&snapshot, None);
        }
        Err(EngineError::NotFound(format!(
            "`{spec}` is neither a file, a folder, nor a repo id in the Hugging Face cache ({})",
            hf_cache.display()
        )))
    }

    /// A model in one folder: diffusers sub-folders (`transformer/`, `vae/`,
    /// `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`), or weight files at
    /// the top (`flux1-schnell.safetensors`, `ae.safetensors`, ...) recognised by content.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::assemble(dir, None)?.into_files()
    }

    /// A model named by one transformer file, with its other parts found beside it.
    pub fn from_file(file: &Path) -> Result<Self> {
        Self::survey_file(file)?.into_files()
    }

    fn survey_file(file: &Path) -> Result<Survey> {
        // Other families' checkpoints share some names with FLUX's parts (diffusers' block
        // names, an SDXL file's LDM autoencoder): their own names are looked for first.
        let names = names_in_file(file)?;
        if other_family(&names).is_some() {
            return Err(unknown_layout(file, &names));
        }
        let found = parts_in(names.iter().map(String::as_str));
        match found.first().map(|f| f.kind) {
            Some(Kind::Transformer) => {}
            Some(other) => {
                return Err(EngineError::UnknownLayout {
                    path: file.to_path_buf(),
                    message: format!(
                        "this is a {}, not a FLUX transformer; point at the transformer file or the model folder",
                        other.label()
                    ),
                });
            }
            None => return Err(unknown_layout(file, &names)),
        }
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let bundled: Vec<Kind> = found.iter().map(|f| f.kind).collect();
        Self::assemble(dir, Some((file, bundled)))
    }

    /// `transformer`: a file the user named, and the other parts it bundles (ComfyUI's
    /// single-file checkpoints hold all four), which are taken from it.
    fn assemble(dir: &Path, transformer: Option<(&Path, Vec<Kind>)>) -> Result<Survey> {
        if transformer.is_none() {
            refuse_other_pipelines(dir)?;
        }
        let top = TopLevel::scan(dir)?;
        let part = |folder: &str, kind: Kind| -> Result<Part> {
            if let Some((file, bundled)) = &transformer
                && bundled.contains(&kind)
            {
                return Ok(Part::beside(file, kind));
            }
            let sub = dir.join(folder);
            if sub.is_dir() {
                return Part::folder(&sub);
            }
            top.only(kind, dir, folder)
        };
        let transformer = match &transformer {
            Some((file, _)) => Ok(Part::beside(file, Kind::Transformer)),
            None => part("transformer", Kind::Transformer),
        };
        let tokenizer = |folder: &str| {
            let sub = dir.join(folder);
            sub.is_dir().then_some(sub)
        };
        Ok(Survey {
            transformer,
            vae: part("vae", Kind::Vae),
            clip: part("text_encoder", Kind::Clip),
            t5: part("text_encoder_2", Kind::T5),
            clip_tokenizer: tokenizer("tokenizer"),
            t5_tokenizer: tokenizer("tokenizer_2"),
        })
    }
}

/// Tensor names that only other image model families' checkpoints have, and the family:
/// what a file that is no FLUX part is, when it is one of these.
const OTHER_FAMILIES: [(&str, &str); 8] = [
    (
        "input_blocks.0.0.weight",
        "a Stable Diffusion 1.x/2.x or SDXL UNet (single-file checkpoint)",
    ),
    (
        "time_embedding.linear_1.weight",
        "a diffusers UNet (Stable Diffusion)",
    ),
    (
        "joint_blocks.0.x_block.attn.qkv.weight",
        "Stable Diffusion 3 (MMDiT)",
    ),
    (
        "pos_embed.proj.weight",
        "Stable Diffusion 3 or PixArt (diffusers)",
    ),
    ("txt_norm.weight", "Qwen-Image"),
    ("distilled_guidance_layer.in_proj.weight", "Chroma"),
    // ComfyUI's test for its Lumina 2 family, Z-Image's architecture, and diffusers' name.
    (
        "noise_refiner.0.attention.k_norm.weight",
        "Z-Image or Lumina 2",
    ),
    ("noise_refiner.0.attention.norm_k.weight", "Z-Image"),
];

/// The error for a weight file with no FLUX part: the family it belongs to when its names
/// say, and a few of the names it holds.
fn unknown_layout(path: &Path, names: &[String]) -> EngineError {
    let family = other_family(names);
    let sample: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    let found = match family {
        Some(family) => format!("it looks like {family}, which Pictor does not serve"),
        None if sample.is_empty() => "it holds no tensors".into(),
        None => format!(
            "it holds {} tensors such as {}",
            names.len(),
            sample.join(", ")
        ),
    };
    EngineError::UnknownLayout {
        path: path.to_path_buf(),
        message: format!(
            "no FLUX transformer, autoencoder, CLIP or T5 tensor names found: {found}; Pictor \
             serves FLUX.1 (schnell, dev and its fine-tunes) and Z-Image-Turbo (its diffusers \
             folder, or its transformer file with the text encoder and autoencoder beside it)"
        ),
    }
}

/// The other family whose names `names` hold, if any.
fn other_family(names: &[String]) -> Option<&'static str> {
    names.iter().find_map(|n| {
        OTHER_FAMILIES
            .iter()
            .find_map(|(sign, family)| ends_with_name(n, sign).then_some(*family))
    })
}

/// A diffusers folder of another pipeline (its `model_index.json` names a class that is
/// not FLUX's) is refused by that name, before its parts are looked at.
fn refuse_other_pipelines(dir: &Path) -> Result<()> {
    match pipeline_class(dir) {
        Some(class) if !class.starts_with("Flux") => Err(EngineError::UnknownLayout {
            path: dir.join("model_index.json"),
            message: format!(
                "this folder holds a diffusers `{class}`, not a FLUX.1 pipeline; Pictor serves \
                 FLUX.1 (schnell, dev and its fine-tunes) and Z-Image-Turbo"
            ),
        }),
        _ => Ok(()),
    }
}

/// The weight files at the top of a folder, classified.
/// Each weight file at the top of a folder with the parts it holds (its main part first).
struct TopLevel(Vec<(PathBuf, Vec<Kind>)>);

impl TopLevel {
    fn scan(dir: &Path) -> Result<Self> {
        let mut found = Vec::new();
        for path in weight_files_in(dir)? {
            let kinds: Vec<Kind> = parts_in_file(&path)?.iter().map(|f| f.kind).collect();
            if !kinds.is_empty() {
                found.push((path, kinds));
            }
        }
        Ok(Self(found))
    }

    /// The one file holding `kind`: a file whose main part it is, else a bundle holding it.
    fn only(&self, kind: Kind, dir: &Path, folder: &str) -> Result<Part> {
        let holding = |main: bool| -> Vec<&PathBuf> {
            self.0
                .iter()
                .filter(|(_, kinds)| {
                    if main {
                        kinds.first() == Some(&kind)
                    } else {
                        kinds.contains(&kind)
                    }
                })
                .map(|(p, _)| p)
                .collect()
        };
        let mut matches = holding(true);
        if matches.is_empty() {
            matches = holding(false);
        }
        match matches.as_slice() {
            [one] => Ok(Part::beside(one, kind)),
            [] => Err(EngineError::NotFound(format!(
                "{}: no {} (neither a `{folder}/` folder nor a weight file holding one)",
                dir.display(),
                kind.label()
            ))),
            many => Err(EngineError::NotFound(format!(
                "{}: several files hold a {}: {}; name the one to use",
                dir.display(),
                kind.label(),
                many.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

/// The Hugging Face hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`, as `huggingface_hub` itself decides.
pub fn hf_hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Where `spec` points: the file or folder itself, else the snapshot folder of the Hugging
/// Face repo id it names in the local cache (`None` when it is neither).
pub fn locate(spec: &str) -> Result<Option<PathBuf>> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(Some(path.to_path_buf()));
    }
    hf_snapshot(spec, &hf_hub_cache_dir())
}

/// The snapshot folder of repo id `owner/name[@revision]` in the local cache, if the spec
/// looks like a repo id and the repo is cached.
fn hf_snapshot(spec: &str, cache: &Path) -> Result<Option<PathBuf>> {
    let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    let Some((owner, name)) = repo.split_once('/') else {
        return Ok(None);
    };
    let valid = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if !valid(owner) || !valid(name) {
        return Ok(None);
    }
    let repo_dir = cache.join(format!("models--{owner}--{name}"));
    if !repo_dir.is_dir() {
        return Ok(None);
    }
    let snapshots = repo_dir.join("snapshots");
    let direct = snapshots.join(revision);
    if direct.is_dir() {
        return Ok(Some(direct));
    }
    let reference = repo_dir.join("refs").join(revision);
    if let Ok(hash) = std::fs::read_to_string(&reference) {
        let snap = snapshots.join(hash.trim());
        if snap.is_dir() {
            return Ok(Some(snap));
        }
        return Err(EngineError::NotFound(format!(
            "{}: points at snapshot {} which is not in {}",
            reference.display(),
            hash.trim(),
            snapshots.display()
        )));
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|e| EngineError::file(&snapshots, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    all.sort();
    match all.as_slice() {
        [one] => Ok(Some(one.clone())),
        [] => Err(EngineError::NotFound(format!(
            "{}: the repo has no snapshots",
            repo_dir.display()
        ))),
        _ => Err(EngineError::NotFound(format!(
            "{}: several snapshots and no refs/{revision}; ask for `{repo}@<revision>`",
            repo_dir.display()
        ))),
    }
}

/// The pipeline class a diffusers folder's `model_index.json` names (`FluxPipeline`,
/// `ZImagePipeline`, ...), when it has a readable one.
pub(crate) fn pipeline_class(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("model_index.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(json.get("_class_name")?.as_str()?.to_string())
}
