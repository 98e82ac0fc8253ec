//! Loading a model, the one way `pictor serve` and `pictor generate` both do it: its files
//! found (a folder, a file, a Hugging Face cache entry or the shipped model), a quantized
//! copy made if the configuration asks, the pipeline built within the memory budget, and
//! the rules it is served by: its own, as the configuration changes them. `start_model`
//! then runs it on its own queue, as every `serve` role that holds models does.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use pictor_core::{ModelRules, Pipeline};
use pictor_engine::{
    DTypeChoice, ModelFiles,
    flux::{FluxOptions, FluxPipeline},
};
use pictor_sched::{ModelQueue, QueueConfig};

use crate::config::{Config, ModelConfig};

/// A loaded model.
pub struct Loaded {
    /// The pipeline, of the family its files hold.
    pub pipeline: Box<dyn Pipeline>,
    /// The rules it is served by.
    pub rules: ModelRules,
    /// Its weight files (hashed for receipts).
    pub weights: Vec<PathBuf>,
}

/// Loads model `name` as `m` describes it, in `config`'s data folder (its caches) and
/// LoRA folder, within its memory budget.
pub fn load(name: &str, m: &ModelConfig, config: &Config) -> anyhow::Result<Loaded> {
    let data_dir = config.data_dir.as_path();
    let memory_budget = config.memory_budget()?;
    let path = crate::shipped::locate(&m.path, data_dir)?;
    if let Some(mut files) = pictor_engine::zimage::ZImageFiles::find_spec(&path)
        .with_context(|| format!("finding model {name} at {}", m.path))?
    {
        if let Some(target) = &m.quantize {
            crate::quantized::apply_zimage(&mut files, target, data_dir)?;
        }
        return load_zimage(name, m, &files, config);
    }
    let mut files = ModelFiles::resolve(&path)
        .with_context(|| format!("finding model {name} at {}", m.path))?;
    files.transformer.rope_axes = m.rope_axes.clone();
    if let Some(target) = &m.quantize {
        crate::quantized::apply(&mut files, target, data_dir)?;
    }
    let dtype: DTypeChoice = m.dtype.parse().map_err(anyhow::Error::msg)?;
    let options = FluxOptions {
        device: m
            .device()
            .with_context(|| format!("models.{name}.device"))?,
        dtype,
        max_batch: m.max_batch,
        memory_budget,
        lora_dir: Some(config.lora_dir()),
        ..FluxOptions::default()
    };
    let pipeline = FluxPipeline::load(&files, options)?;
    let rules = served_rules(name, m, pipeline.rules())?;
    Ok(Loaded {
        pipeline: Box::new(pipeline),
        rules,
        weights: crate::hash::weight_files(&files),
    })
}

/// The rules model `name` is served by: its own, as the configuration changes them.
fn served_rules(name: &str, m: &ModelConfig, own: ModelRules) -> anyhow::Result<ModelRules> {
    let rules = m.rules(own);
    rules
        .check_defaults()
        .with_context(|| format!("models.{name}: the default size and steps break its rules"))?;
    Ok(rules)
}

/// A Z-Image model (any of its layouts, its transformer quantized if asked): on the CPU, in
/// the dtype asked for or the widest that fits the budget.
fn load_zimage(
    name: &str,
    m: &ModelConfig,
    files: &pictor_engine::zimage::ZImageFiles,
    config: &Config,
) -> anyhow::Result<Loaded> {
    let memory_budget = config.memory_budget()?;
    use pictor_engine::{DeviceChoice, zimage};
    let dtype: DTypeChoice = m.dtype.parse().map_err(anyhow::Error::msg)?;
    let device = m
        .device()
        .with_context(|| format!("models.{name}.device"))?;
    anyhow::ensure!(
        matches!(device, DeviceChoice::Auto | DeviceChoice::Cpu),
        "models.{name}: Z-Image runs on the CPU so far; leave device unset"
    );
    let options = zimage::ZImageOptions {
        dtype,
        memory_budget,
        lora_dir: Some(config.lora_dir()),
    };
    let pipeline = zimage::ZImagePipeline::load_files(files, options)
        .with_context(|| format!("loading model {name} from {}", m.path))?;
    let rules = served_rules(name, m, pipeline.rules())?;
    Ok(Loaded {
        pipeline: Box::new(pipeline),
        rules,
        weights: files.weight_files(),
    })
}

/// A model loaded and running on its own worker thread.
pub(crate) struct Running {
    /// Its queue.
    pub queue: ModelQueue,
    /// The rules it is served by.
    pub rules: pictor_core::ModelRules,
    /// Its weight files (hashed for receipts).
    pub weights: Vec<PathBuf>,
}

/// Loads model `name` (blocking) and starts its queue.
pub(crate) fn start_model(
    config: &Config,
    name: &str,
    m: &crate::config::ModelConfig,
) -> anyhow::Result<Running> {
    let loaded = crate::load::load(name, m, config)?;
    let device = loaded.pipeline.device().unwrap_or_default();
    tracing::info!(model = %name, %device, "model loaded");
    eprintln!("model {name} loaded from {} on {device}", m.path);
    let queue = QueueConfig {
        depth: config.limits.queue_depth,
        timeout: Duration::from_secs(config.limits.request_timeout_secs),
        batch_images: m.max_batch,
    };
    Ok(Running {
        queue: ModelQueue::start(name, loaded.pipeline, queue),
        rules: loaded.rules,
        weights: loaded.weights,
    })
}

/// The hash of a model's weights (cached in the data directory), for receipts.
pub(crate) fn weights_hash(config: &Config, weights: &[PathBuf]) -> Option<String> {
    crate::hash::weights_hash(weights, &config.data_dir.join("weight-hashes.json"))
        .map_err(|e| tracing::warn!("hashing the weights failed: {e:#}"))
        .ok()
}
