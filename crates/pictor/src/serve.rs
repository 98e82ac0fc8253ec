//! `pictor serve`: the OpenAI-compatible image server.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, bail};
use pictor_api::{ApiConfig, AppState, BodyLimits, ModelRules, ModelSpec};
use pictor_engine::{
    DTypeChoice, DeviceChoice, ModelFiles,
    flux::{FluxOptions, FluxPipeline},
};
use pictor_sched::{ModelQueue, QueueConfig};
use pictor_store::{Blobs, Db, now_unix};

use crate::config::{Config, ModelConfig};

/// Arguments of `pictor serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Listen address (overrides the config's `listen`).
    #[arg(long)]
    listen: Option<String>,
}

fn rules(name: &str, m: &ModelConfig) -> anyhow::Result<ModelRules> {
    let (w, h) = pictor_api::wire::dimensions(&m.default_size)
        .with_context(|| format!("models.{name}.default_size `{}` is not WxH", m.default_size))?;
    Ok(ModelRules {
        min_side: m.min_side,
        max_side: m.max_side,
        max_pixels: m.max_pixels,
        default_size: (w, h),
        default_steps: m.default_steps,
        max_steps: m.max_steps,
        ..ModelRules::flux_schnell()
    })
}

/// The URL-signing key, made on first start and kept in the data directory.
fn signing_key(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = dir.join("url-signing.key");
    if let Ok(key) = std::fs::read(&path)
        && key.len() >= 32
    {
        return Ok(key);
    }
    let key: [u8; 32] = rand::random();
    std::fs::write(&path, key).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(key.to_vec())
}

fn load_model(
    name: &str,
    m: &ModelConfig,
    data_dir: &Path,
    memory_budget: Option<u64>,
) -> anyhow::Result<(FluxPipeline, ModelFiles)> {
    let path = crate::shipped::locate(&m.path, data_dir)?;
    let mut files = ModelFiles::resolve(&path)
        .with_context(|| format!("finding model {name} at {}", m.path))?;
    if let Some(target) = &m.quantize {
        crate::quantized::apply(&mut files, target, data_dir)?;
    }
    let dtype: DTypeChoice = m.dtype.parse().map_err(anyhow::Error::msg)?;
    let options = FluxOptions {
        device: m.cuda.map_or(DeviceChoice::Cpu, DeviceChoice::Cuda),
        dtype,
        max_batch: m.max_batch,
        memory_budget,
        ..FluxOptions::default()
    };
    Ok((FluxPipeline::load(&files, options)?, files))
}

/// Every weight file of a model, each once, in a fixed order.
fn weight_files(files: &ModelFiles) -> Vec<std::path::PathBuf> {
    let mut all = Vec::new();
    for part in [&files.transformer, &files.vae, &files.clip, &files.t5] {
        for f in &part.files {
            if !all.contains(f) {
                all.push(f.clone());
            }
        }
    }
    all
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Runs the server until SIGTERM or Ctrl-C.
pub async fn run(mut config: Config, args: Args) -> anyhow::Result<()> {
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let addr: SocketAddr = config
        .listen
        .parse()
        .with_context(|| format!("listen address `{}` is not IP:PORT", config.listen))?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let db = Db::connect(&config.database_url())
        .await
        .context("opening the database")?;
    let has_keys = db.has_keys().await?;
    if !addr.ip().is_loopback() && !has_keys {
        bail!(
            "refusing to listen on {addr} with no API key: anyone who can reach it could use it. \
             Create a key first with `pictor keys create --name NAME`, or listen on 127.0.0.1."
        );
    }
    if !has_keys {
        eprintln!(
            "No API keys yet: requests without a key are accepted on this loopback address. \
             Create one with `pictor keys create --name NAME`; from then on every request needs a key."
        );
    }
    let blobs = Blobs::local(&config.data_dir.join("images"))?;
    let specs = config
        .models
        .iter()
        .map(|(name, m)| {
            Ok(ModelSpec {
                name: name.clone(),
                aliases: m.aliases.clone(),
                rules: rules(name, m)?,
                created: now_unix(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let api = ApiConfig {
        public_url: config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}")),
        image_ttl: Duration::from_secs(config.image_ttl_secs),
        max_body_bytes: config.limits.max_body_bytes,
        limits: BodyLimits {
            max_prompt_chars: config.limits.max_prompt_chars,
            max_n: config.limits.max_n,
        },
        open_when_no_keys: addr.ip().is_loopback(),
        idempotency_ttl: Duration::from_secs(config.idempotency_ttl_secs),
    };
    let state = AppState::new(api, db, blobs, signing_key(&config.data_dir)?, specs);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("pictor listening on http://{}", listener.local_addr()?);

    // Models load in the background: /readyz says 503 and generations get 503 until then.
    let queue = QueueConfig {
        depth: config.limits.queue_depth,
        timeout: Duration::from_secs(config.limits.request_timeout_secs),
        batch_images: 1,
    };
    let memory_budget = config.memory_budget()?;
    for (name, m) in config.models.clone() {
        let state = state.clone();
        let hash_cache = config.data_dir.join("weight-hashes.json");
        let data_dir = config.data_dir.clone();
        let queue = QueueConfig {
            batch_images: m.max_batch,
            ..queue.clone()
        };
        tokio::task::spawn_blocking(move || {
            match load_model(&name, &m, &data_dir, memory_budget) {
                Ok((pipeline, files)) => {
                    tracing::info!(model = %name, "model loaded");
                    eprintln!("model {name} loaded from {}", m.path);
                    let parts = pipeline
                        .memory()
                        .iter()
                        .map(|p| pictor_api::openapi::ModelPart {
                            part: p.part.to_string(),
                            bytes: p.bytes,
                            storage: p.storage.clone(),
                            resident: p.resident,
                        })
                        .collect();
                    state.set_memory(&name, parts);
                    state.install(&name, ModelQueue::start(&name, Box::new(pipeline), queue));
                    // Receipts name the weights by hash; large models take a while to hash.
                    match crate::hash::weights_hash(&weight_files(&files), &hash_cache) {
                        Ok(hash) => state.set_hash(&name, hash),
                        Err(e) => {
                            tracing::warn!(model = %name, "hashing the weights failed: {e:#}")
                        }
                    }
                }
                Err(e) => {
                    eprintln!("model {name} failed to load: {e:#}");
                    state.mark_failed(&name, format!("{e:#}"));
                }
            }
        });
    }
    pictor_api::spawn_sweeper(
        state.clone(),
        Duration::from_secs(config.sweep_interval_secs.max(1)),
    );
    let clean = pictor_api::serve(
        listener,
        state,
        shutdown_signal(),
        Duration::from_secs(config.shutdown_grace_secs),
    )
    .await?;
    if !clean {
        eprintln!("grace period over; exiting with work unfinished");
    }
    Ok(())
}
