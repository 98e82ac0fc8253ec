//! LoRA per request: the files in a folder, read once and cached by content hash within a
//! memory bound, turned into low-rank updates of a network's layers
//! ([`crate::layers::Delta`]) for one batch. The shared weights are never changed: the
//! updates run beside them, so quantized weights take LoRAs too.

mod cache;
mod file;
mod names;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use candle_core::{Device, Tensor};
use pictor_core::{LoraRequest, LoraUse};
use sha2::Digest;

use crate::{
    error::{EngineError, Result},
    layers::{Delta, LayerTable},
    weights::Scheme,
};
use cache::Cache;
use file::LoraFile;
use names::Names;

/// A request's LoRAs, read and checked against the network's layers, not yet attached:
/// the transformer's low-rank updates and the text encoder's dense ones.
pub struct Prepared {
    transformer: Vec<(String, Delta)>,
    text_encoder: HashMap<String, Tensor>,
    used: Vec<LoraUse>,
}

impl Prepared {
    /// Nothing to apply.
    pub fn none() -> Self {
        Self {
            transformer: Vec::new(),
            text_encoder: HashMap::new(),
            used: Vec::new(),
        }
    }

    /// Whether nothing is applied.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// The text encoder's updates, by weight name (`…q_proj.weight`), dense.
    pub(crate) fn text_encoder(&self) -> &HashMap<String, Tensor> {
        &self.text_encoder
    }

    /// Attaches the transformer's updates to its layers (asked for only when there are
    /// LoRAs) until the answer drops.
    pub(crate) fn attach<'a>(
        self,
        layers: impl FnOnce() -> Result<&'a LayerTable>,
    ) -> Result<Applied> {
        if self.is_empty() {
            return Ok(Applied::none());
        }
        Ok(Applied {
            _attached: Some(layers()?.attach(self.transformer)),
            used: self.used,
        })
    }
}

/// LoRA updates attached to a loaded network, and what they are; they come off when this
/// drops.
pub struct Applied {
    _attached: Option<crate::layers::Attached>,
    used: Vec<LoraUse>,
}

impl Applied {
    /// Nothing attached.
    pub fn none() -> Self {
        Self {
            _attached: None,
            used: Vec::new(),
        }
    }

    /// The LoRAs, with their files' hashes, as receipts record them.
    pub fn used(&self) -> &[LoraUse] {
        &self.used
    }
}

/// The bytes of parsed LoRAs kept in memory by default.
pub const DEFAULT_CACHE_BYTES: u64 = 2 << 30;

/// The LoRA files in a folder, by name (file name without `.safetensors`).
pub struct LoraLibrary {
    dir: PathBuf,
    cache: Mutex<Cache>,
}

/// What every pipeline does with a request's LoRAs before it runs: read them from
/// `library` and check them against the transformer whose tensors `tensors` lists (its
/// `tensor_names`, in canonical names, diffusers' given by `scheme`; asked for only when
/// there are LoRAs, and without loading it) and, for a model whose text encoder takes
/// LoRAs, that encoder's linear layers. No LoRA folder is a request error.
pub(crate) fn prepare(
    library: Option<&LoraLibrary>,
    loras: &[LoraRequest],
    tensors: impl FnOnce() -> Vec<(String, Vec<usize>)>,
    scheme: Scheme,
    text_encoder: Option<&BTreeMap<String, (usize, usize)>>,
    device: &Device,
) -> Result<Prepared> {
    if loras.is_empty() {
        return Ok(Prepared::none());
    }
    let library = library.ok_or_else(|| EngineError::InvalidInput {
        field: "loras",
        message: "Invalid 'loras': this server has no LoRA folder (lora_dir).".into(),
    })?;
    // Every 2-D `….weight` is a linear layer's matrix.
    let layers: BTreeMap<String, (usize, usize)> = tensors()
        .into_iter()
        .filter_map(|(name, shape)| match shape[..] {
            [out, inp] => Some((name.strip_suffix(".weight")?.to_string(), (out, inp))),
            _ => None,
        })
        .collect();
    let names = Names::new(&layers, scheme);
    let text_encoder = text_encoder.map(|layers| Names::new(layers, Scheme::Identity));
    library.prepare(loras, &names, text_encoder.as_ref(), device)
}

impl LoraLibrary {
    /// The LoRAs in `dir`, keeping at most `cache_bytes` of parsed files in memory.
    pub fn new(dir: PathBuf, cache_bytes: u64) -> Self {
        Self {
            dir,
            cache: Mutex::new(Cache::new(cache_bytes)),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `loras` and checks them against a network whose transformer layers `names`
    /// names and whose text encoder `text_encoder` names (`None`: it takes no LoRA), with
    /// the updates put on `device`. A name with no file, a file that is no LoRA, or one
    /// for other layers is a request error naming the LoRA and the layer.
    pub(crate) fn prepare(
        &self,
        loras: &[LoraRequest],
        names: &Names,
        text_encoder: Option<&Names>,
        device: &Device,
    ) -> Result<Prepared> {
        let mut prepared = Prepared::none();
        for lora in loras {
            let (sha256, file) = self.load(&lora.name)?;
            let invalid = |why: String| EngineError::InvalidInput {
                field: "loras",
                message: format!("Invalid 'loras': LoRA `{}`: {why}.", lora.name),
            };
            let (ours, theirs) = route(&file, names, text_encoder).map_err(invalid)?;
            for (layer, delta) in updates(&ours, names, lora.scale).map_err(invalid)? {
                prepared.transformer.push((layer, delta.to_device(device)?));
            }
            if let Some(te) = text_encoder {
                for (layer, delta) in updates(&theirs, te, lora.scale).map_err(invalid)? {
                    let outputs = te.outputs(&layer).unwrap_or(0);
                    let dense = delta.dense(outputs)?.to_device(device)?;
                    let name = format!("{layer}.weight");
                    let sum = match prepared.text_encoder.remove(&name) {
                        Some(before) => (before + dense)?,
                        None => dense,
                    };
                    prepared.text_encoder.insert(name, sum);
                }
            }
            prepared.used.push(LoraUse {
                name: lora.name.clone(),
                sha256,
                scale: lora.scale,
            });
        }
        Ok(prepared)
    }

    /// The parsed file named `name`, and its hash.
    fn load(&self, name: &str) -> Result<(String, Arc<LoraFile>)> {
        let path = self
            .dir
            .join(format!("{name}.{}", pictor_core::LORA_EXTENSION));
        let missing = || {
            let invalid = pictor_core::missing_lora(name, Some(&self.dir));
            EngineError::InvalidInput {
                field: invalid.param,
                message: invalid.message,
            }
        };
        if pictor_core::lora_name_problem(name).is_some() {
            return Err(missing());
        }
        let meta = std::fs::metadata(&path).map_err(|_| missing())?;
        let stamp = (meta.len(), meta.modified().ok());
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((len, modified, sha)) = cache.hashes.get(&path)
            && (*len, *modified) == stamp
            && let Some(file) = cache.files.get(sha).cloned()
        {
            let sha = sha.clone();
            cache.touch(&sha);
            return Ok((sha, file));
        }
        let bytes = std::fs::read(&path).map_err(|_| missing())?;
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        cache
            .hashes
            .insert(path.clone(), (stamp.0, stamp.1, sha.clone()));
        if let Some(file) = cache.files.get(&sha).cloned() {
            cache.touch(&sha);
            return Ok((sha, file));
        }
        let file =
            Arc::new(
                file::parse(&bytes, &path).map_err(|why| EngineError::InvalidInput {
                    field: "loras",
                    message: format!("Invalid 'loras': LoRA `{name}`: {why}."),
                })?,
            );
        cache.insert(sha.clone(), file.clone());
        Ok((sha, file))
    }
}

/// One low-rank piece of a layer's update: `up` `(len, rank)` lands on rows
/// `offset..offset + len`.
struct Piece {
    down: Tensor,
    up: Tensor,
    offset: usize,
}

/// The file's modules split into the transformer's and the text encoder's: a module the
/// transformer lacks is the text encoder's when its name says so and it has one.
fn route<'a>(
    file: &'a LoraFile,
    names: &Names,
    text_encoder: Option<&Names>,
) -> Result<(Modules<'a>, Modules<'a>), String> {
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for (module, m) in &file.modules {
        match names.find(module) {
            Ok(_) => ours.push((module.as_str(), m)),
            Err(why) => match text_encoder {
                Some(te) if names::is_text_encoder(module) => {
                    te.find(module)?;
                    theirs.push((module.as_str(), m));
                }
                _ => return Err(why),
            },
        }
    }
    Ok((ours, theirs))
}

type Modules<'a> = Vec<(&'a str, &'a file::Module)>;

/// The modules' updates at `scale`, one [`Delta`] per layer: a fused layer's parts (q, k,
/// v, ...) keep their own `up` at their rows, their downs stacked, so no zero blocks are
/// stored; parts that overlap (a file with both a fused and a split entry) are joined
/// into one `up` over all the rows.
fn updates(
    modules: &Modules<'_>,
    names: &Names,
    scale: f64,
) -> Result<Vec<(String, Delta)>, String> {
    let mut by_layer: BTreeMap<String, (usize, Vec<Piece>)> = BTreeMap::new();
    for &(module, m) in modules {
        let target = names.find(module)?;
        let (rank, inputs) = (m.rank(), m.down.dims()[1]);
        if inputs != target.inputs || m.up.dims()[0] != target.len {
            return Err(format!(
                "`{module}` (down {:?}, up {:?}) does not fit `{}`, which takes {} inputs and \
                 has {} outputs there (a LoRA made for another model?)",
                m.down.dims(),
                m.up.dims(),
                target.layer,
                target.inputs,
                target.len
            ));
        }
        let fail = |e: candle_core::Error| format!("`{module}`: {e}");
        let mut up = (&m.up * (m.factor() * scale)).map_err(fail)?;
        if target.swap_halves {
            let half = target.len / 2;
            let (second, first) = (
                up.narrow(0, half, half).map_err(fail)?,
                up.narrow(0, 0, half).map_err(fail)?,
            );
            up = Tensor::cat(&[second, first], 0).map_err(fail)?;
        }
        let entry = by_layer
            .entry(target.layer.clone())
            .or_insert_with(|| (target.outputs, Vec::new()));
        if rank > 0 {
            entry.1.push(Piece {
                down: m.down.clone(),
                up,
                offset: target.offset,
            });
        }
    }
    let mut deltas = Vec::new();
    for (layer, (outputs, mut pieces)) in by_layer {
        let fail = |e: candle_core::Error| format!("`{layer}`: {e}");
        if pieces.is_empty() {
            continue;
        }
        pieces.sort_by_key(|p| p.offset);
        let overlap = pieces
            .windows(2)
            .any(|w| w[0].offset + w[0].up.dims()[0] > w[1].offset);
        let downs: Vec<&Tensor> = pieces.iter().map(|p| &p.down).collect();
        let down = Tensor::cat(&downs, 0).map_err(fail)?;
        let ups = match overlap {
            false => pieces.into_iter().map(|p| (p.offset, p.up)).collect(),
            true => vec![(0, padded_up(&pieces, outputs).map_err(fail)?)],
        };
        deltas.push((layer, Delta { down, ups }));
    }
    Ok(deltas)
}

/// The pieces' ups side by side, each at its rows of a layer with `outputs` rows.
fn padded_up(pieces: &[Piece], outputs: usize) -> candle_core::Result<Tensor> {
    let ups = pieces
        .iter()
        .map(|p| {
            let len = p.up.dims()[0];
            p.up.pad_with_zeros(0, p.offset, outputs - p.offset - len)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&ups, 1)
}

impl Delta {
    fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            down: self.down.to_device(device)?,
            ups: self
                .ups
                .iter()
                .map(|(offset, up)| Ok((*offset, up.to_device(device)?)))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// The whole `(outputs, inputs)` update, for a network whose weights take it densely.
    fn dense(&self, outputs: usize) -> candle_core::Result<Tensor> {
        let inputs = self.down.dims()[1];
        let mut rows = Vec::new();
        let (mut at, mut col) = (0, 0);
        for (offset, up) in &self.ups {
            let (len, rank) = up.dims2()?;
            if *offset > at {
                rows.push(Tensor::zeros(
                    (offset - at, inputs),
                    up.dtype(),
                    up.device(),
                )?);
            }
            rows.push(up.matmul(&self.down.narrow(0, col, rank)?)?);
            (at, col) = (offset + len, col + rank);
        }
        if at < outputs {
            rows.push(Tensor::zeros(
                (outputs - at, inputs),
                self.down.dtype(),
                self.down.device(),
            )?);
        }
        Tensor::cat(&rows, 0)
    }
}
