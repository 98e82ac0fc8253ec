//! Layers built from weights in any layout: a [`Linear`] whose matrix is dense (any
//! dtype) or quantized blocks, and the [`Source`] the networks read their tensors from by
//! canonical name, so one implementation of each network runs a bf16 safetensors file and
//! a Q4_K GGUF alike. The networks themselves live with their families.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use candle_core::{D, DType, Device, Module, Tensor, quantized::QMatMul};
use candle_nn::RmsNorm;

use crate::{
    error::{EngineError, Result},
    weights::{MappedWeights, QWeights},
};

/// A low-rank update of one layer (a LoRA's, at the scale asked for):
/// `y += (x·downᵀ)·upᵀ`, in f32 whatever the layer's dtype. A fused layer's parts keep
/// their own `up` (no zero blocks stored): each `(offset, up)` lands on output rows
/// `offset..offset + rows(up)` and takes the next `cols(up)` rows of `down`.
pub(crate) struct Delta {
    /// `(total rank, inputs)`: the parts' downs, stacked in the order of `ups`.
    pub down: Tensor,
    /// `(first output row, (rows, rank))`, in row order, not overlapping.
    pub ups: Vec<(usize, Tensor)>,
}

/// The updates a layer adds for the batch being run; shared by the layer and its row views.
#[derive(Default)]
struct Adapters(RwLock<Vec<Arc<Delta>>>);

/// Every linear layer a network built, by canonical name: where a batch's low-rank
/// updates (LoRA) are attached, without touching the shared weights, and detached after.
#[derive(Default, Clone)]
pub(crate) struct LayerTable(Arc<Mutex<BTreeMap<String, Arc<Adapters>>>>);

impl LayerTable {
    fn register(&self, name: &str) -> Arc<Adapters> {
        let adapters = Arc::new(Adapters::default());
        let mut table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        table.insert(name.to_string(), adapters.clone());
        adapters
    }

    /// Adds `deltas` to their layers until the returned guard drops. The names come from
    /// the network's own list of layers (`tensor_names`), so each is there; one that is
    /// not would be a bug, logged and skipped.
    pub(crate) fn attach(&self, deltas: Vec<(String, Delta)>) -> Attached {
        let table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut touched = Vec::new();
        for (name, delta) in deltas {
            match table.get(&name) {
                Some(adapters) => {
                    let mut list = adapters.0.write().unwrap_or_else(PoisonError::into_inner);
                    list.push(Arc::new(delta));
                    touched.push(adapters.clone());
                }
                None => {
                    tracing::error!(layer = %name, "a LoRA update for a layer the network lacks")
                }
            }
        }
        Attached(touched)
    }
}

/// Attached updates; dropping it takes them off again.
pub(crate) struct Attached(Vec<Arc<Adapters>>);

impl Drop for Attached {
    fn drop(&mut self) {
        for adapters in &self.0 {
            adapters
                .0
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }
}

/// A linear layer: `x·Wᵀ + b`, with `W` dense or quantized, plus any low-rank updates
/// attached for the batch being run.
pub(crate) struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
    adapters: Arc<Adapters>,
    /// For a view of some output rows ([`Linear::rows`]): which rows of the whole layer.
    rows: Option<(usize, usize)>,
}

impl Linear {
    /// The layer restricted to outputs `start..start + len`, sharing this one's weight
    /// (a view, no copy); `None` for quantized weights, whose blocks do not split by row.
    pub(crate) fn rows(&self, start: usize, len: usize) -> candle_core::Result<Option<Self>> {
        let QMatMul::Tensor(w) = &self.weight else {
            return Ok(None);
        };
        Ok(Some(Self {
            weight: QMatMul::Tensor(w.narrow(0, start, len)?),
            bias: match &self.bias {
                Some(b) => Some(b.narrow(0, start, len)?),
                None => None,
            },
            adapters: self.adapters.clone(),
            rows: Some((start, len)),
        }))
    }

    /// `[xs₁ xs₂ …]·Wᵀ + b` for inputs that are the column blocks of one input, without
    /// concatenating them where the weights are dense and the inputs f32 on the CPU.
    pub(crate) fn forward_parts(&self, xs: &[&Tensor]) -> candle_core::Result<Tensor> {
        if let QMatMul::Tensor(w) = &self.weight
            && xs.iter().all(|x| crate::ops::linear_is_fast(x, w))
        {
            let ys = crate::ops::linear(xs, w, self.bias.as_ref())?;
            return self.adapt(xs, ys);
        }
        Tensor::cat(xs, D::Minus1)?.apply(self)
    }

    /// `ys` plus the attached updates' `(x·downᵀ)·upᵀ` (only this view's rows), where `xs`
    /// are the input's column blocks (one, or those `forward_parts` was given). `ys` is the
    /// layer's fresh output: on the CPU in f32 each part's product is added into its own
    /// columns in place; elsewhere with tensor ops.
    fn adapt(&self, xs: &[&Tensor], ys: Tensor) -> candle_core::Result<Tensor> {
        let list = self
            .adapters
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if list.is_empty() {
            return Ok(ys);
        }
        let width = ys.dim(D::Minus1)?;
        let (start, end) = match self.rows {
            Some((start, len)) => (start, start + len),
            None => (0, width),
        };
        let xs: Vec<Tensor> = xs
            .iter()
            .map(|x| x.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        let in_place = crate::ops::can_add_columns(&ys);
        let mut sum: Option<Tensor> = None;
        for delta in list.iter() {
            let low = low_rank(&xs, &delta.down)?;
            // This view's rows, part by part.
            let (mut parts, mut col) = (Vec::new(), 0);
            for (offset, up) in &delta.ups {
                let (len, rank) = up.dims2()?;
                let (a, b) = ((*offset).max(start), (offset + len).min(end));
                if a < b {
                    let rows = up.narrow(0, a - offset, b - a)?;
                    let part = low.narrow(D::Minus1, col, rank)?;
                    parts.push((a - start, part.broadcast_matmul(&rows.t()?)?));
                }
                col += rank;
            }
            if in_place {
                for (at, part) in &parts {
                    crate::ops::add_columns(&ys, part, *at)?;
                }
            } else if let Some(add) = spread(parts, end - start)? {
                sum = Some(match sum {
                    Some(s) => (s + add)?,
                    None => add,
                });
            }
        }
        match sum {
            Some(add) => {
                let add = add.to_dtype(ys.dtype())?;
                ys + add
            }
            None => Ok(ys),
        }
    }

    fn plain(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if let QMatMul::Tensor(w) = &self.weight {
            // The modulations and embedders take `(b, features)`: one row per image.
            let rows = match xs.rank() {
                2 => xs.unsqueeze(0)?,
                _ => xs.clone(),
            };
            if crate::ops::linear_is_fast(&rows, w) {
                let ys = crate::ops::linear(&[&rows], w, self.bias.as_ref())?;
                return if xs.rank() == 2 {
                    ys.squeeze(0)
                } else {
                    Ok(ys)
                };
            }
            if w.dtype() != xs.dtype() {
                // Half-precision weights with f32 arithmetic off the CPU kernels: widened
                // for this call (a fallback; the CPU kernels widen block by block).
                let ys = xs.broadcast_matmul(&w.to_dtype(xs.dtype())?.t()?)?;
                return match &self.bias {
                    Some(b) => ys.broadcast_add(&b.to_dtype(xs.dtype())?),
                    None => Ok(ys),
                };
            }
        }
        let ys = match &self.weight {
            QMatMul::QTensor(_) => xs.contiguous()?.apply(&self.weight)?,
            _ => xs.apply(&self.weight)?,
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let ys = self.plain(xs)?;
        self.adapt(&[xs], ys)
    }
}

/// `x·downᵀ` for the input given as column blocks `xs` (f32), without joining them.
fn low_rank(xs: &[Tensor], down: &Tensor) -> candle_core::Result<Tensor> {
    if let [x] = xs {
        return x.broadcast_matmul(&down.t()?);
    }
    let (mut low, mut at): (Option<Tensor>, usize) = (None, 0);
    for x in xs {
        let cols = x.dim(D::Minus1)?;
        let block = x.broadcast_matmul(&down.narrow(1, at, cols)?.contiguous()?.t()?)?;
        low = Some(match low {
            Some(l) => (l + block)?,
            None => block,
        });
        at += cols;
    }
    low.ok_or_else(|| candle_core::Error::Msg("a layer with no input".into()))
}

/// The parts `(first column, product)` laid out over `width` columns, zeros where no part
/// lands; `None` without parts.
fn spread(parts: Vec<(usize, Tensor)>, width: usize) -> candle_core::Result<Option<Tensor>> {
    let Some((_, first)) = parts.first() else {
        return Ok(None);
    };
    let (lead, device) = (first.dims().to_vec(), first.device().clone());
    let zeros = |n: usize| {
        let mut shape = lead.clone();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Tensor::zeros(shape, DType::F32, &device)
    };
    let (mut blocks, mut at) = (Vec::new(), 0);
    for (col, part) in parts {
        if col > at {
            blocks.push(zeros(col - at)?);
        }
        at = col + part.dim(D::Minus1)?;
        blocks.push(part);
    }
    if at < width {
        blocks.push(zeros(width - at)?);
    }
    Ok(Some(Tensor::cat(&blocks, D::Minus1)?))
}

/// Where layers come from: dense safetensors or quantized GGUF weights, by canonical
/// name; every linear layer made is listed in its [`LayerTable`].
pub(crate) struct Source<'a> {
    from: From<'a>,
    layers: LayerTable,
}

enum From<'a> {
    /// Safetensors (any layout): the linear layers' weight matrices converted to `matrices`,
    /// everything else (biases, norm scales) to the compute dtype.
    Dense {
        weights: &'a MappedWeights,
        matrices: DType,
        compute: DType,
        device: &'a candle_core::Device,
    },
    /// GGUF or converted blocks; computed in f32.
    Quantized(&'a QWeights),
}

/// A tensor of shape `shape` from dense weights, in `dtype`.
fn load_dense(
    weights: &MappedWeights,
    device: &candle_core::Device,
    name: &str,
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    let t = weights.load(name, dtype, device)?;
    if t.dims() != shape {
        return Err(EngineError::Tensor {
            path: weights.files().path_of(""),
            tensor: name.to_string(),
            problem: format!("has shape {:?}, expected {shape:?}", t.dims()),
        });
    }
    Ok(t)
}

impl Source<'_> {
    /// The linear layers made so far (all of a network, once it is built).
    pub(crate) fn layers(&self) -> LayerTable {
        self.layers.clone()
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        match &self.from {
            From::Dense { weights, .. } => weights.contains(name),
            From::Quantized(q) => q.contains(name),
        }
    }

    /// The shape canonical `name` has, from the headers alone.
    pub(crate) fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.from {
            From::Dense { weights, .. } => weights.shape(name),
            From::Quantized(q) => q.shape(name),
        }
    }

    /// The dtype activations are computed in.
    pub(crate) fn compute(&self) -> DType {
        match &self.from {
            From::Dense { compute, .. } => *compute,
            From::Quantized(_) => DType::F32,
        }
    }

    /// A plain tensor of shape `shape` in the compute dtype.
    pub(crate) fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match &self.from {
            From::Dense {
                weights,
                compute,
                device,
                ..
            } => load_dense(weights, device, name, shape, *compute),
            From::Quantized(q) => {
                let t = q.get(name, shape)?.dequantize(q.device())?;
                q.release(name);
                Ok(t)
            }
        }
    }

    /// A weight table of shape `shape` (an embedding) kept as the weight matrices are:
    /// in their dtype when dense, widened to f32 when quantized.
    pub(crate) fn matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match &self.from {
            From::Dense {
                weights,
                matrices,
                device,
                ..
            } => load_dense(weights, device, name, shape, *matrices),
            From::Quantized(_) => self.tensor(name, shape),
        }
    }

    /// The linear layer `prefix.weight` `(out, inp)` with `prefix.bias` when present.
    pub(crate) fn linear(&self, prefix: &str, inp: usize, out: usize) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let weight = match &self.from {
            From::Dense {
                weights,
                matrices,
                device,
                ..
            } => QMatMul::Tensor(load_dense(weights, device, &name, &[out, inp], *matrices)?),
            From::Quantized(q) => {
                let weight = QMatMul::from_arc(q.get(&name, &[out, inp])?)?;
                if matches!(weight, QMatMul::QTensor(_)) {
                    // Two rows are enough for every kernel to build its repacked copy now,
                    // after which the mapped original can go back to the page cache.
                    let probe = Tensor::zeros((2, inp), DType::F32, q.device())?;
                    probe.apply(&weight)?;
                }
                q.release(&name);
                weight
            }
        };
        let bias_name = format!("{prefix}.bias");
        let bias = if self.has(&bias_name) {
            Some(self.tensor(&bias_name, &[out])?)
        } else {
            None
        };
        let adapters = self.layers.register(prefix);
        Ok(Linear {
            weight,
            bias,
            adapters,
            rows: None,
        })
    }

    /// An RMS norm whose scale is `name` `(dim,)`.
    pub(crate) fn rms_norm(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.tensor(name, &[dim])?, eps))
    }
}

/// A network's weights, opened but not yet read.
pub(crate) enum Weights {
    /// Safetensors in any layout, seen through canonical names.
    Dense(MappedWeights),
    /// GGUF (or converted blocks), by canonical name.
    Quantized(QWeights),
}

impl Weights {
    /// Whether canonical `name` exists.
    pub(crate) fn contains(&self, name: &str) -> bool {
        match self {
            Self::Dense(w) => w.contains(name),
            Self::Quantized(w) => w.contains(name),
        }
    }

    /// The shape canonical `name` has, from the headers alone.
    pub(crate) fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            Self::Dense(w) => w.shape(name),
            Self::Quantized(w) => w.shape(name),
        }
    }

    /// Canonical `name` in f32 on the CPU (a GGUF tensor's file pages handed back after).
    pub(crate) fn f32(&self, name: &str) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.load(name, DType::F32, &Device::Cpu),
            Self::Quantized(w) => {
                let shape = w.shape(name).unwrap_or_default();
                let t = w.get(name, &shape)?.dequantize(&Device::Cpu)?;
                w.release(name);
                Ok(t)
            }
        }
    }

    /// Where layers come from when the weights are kept in `dtype` on `device`. On the CPU
    /// a half dtype is a storage format: the weight matrices stay half the size and the
    /// arithmetic runs in f32 on the CPU kernels, which widen each matrix block by block,
    /// or multiply bf16 natively (candle's CPU matmul has no bf16 gemm and widens both
    /// operands in full on every call). Quantized blocks compute in f32.
    pub(crate) fn source<'a>(&'a self, dtype: DType, device: &'a Device) -> Source<'a> {
        let from = match self {
            Self::Dense(weights) => From::Dense {
                weights,
                matrices: dtype,
                compute: if device.is_cpu() { DType::F32 } else { dtype },
                device,
            },
            Self::Quantized(q) => From::Quantized(q),
        };
        Source {
            from,
            layers: LayerTable::default(),
        }
    }
}
