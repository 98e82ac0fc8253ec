//! Shared state: configuration, stores, models and their queues.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use pictor_core::ModelRules;
use pictor_sched::JobQueue;
use pictor_store::{Blobs, Db};

use crate::{
    error::ApiError,
    links::Signer,
    openapi::ModelPart,
    wire::{BodyLimits, form::UploadLimits},
};

/// Server settings the API needs.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Base of image links, e.g. `https://images.example.com` behind a proxy.
    pub public_url: String,
    /// How long image links and files live.
    pub image_ttl: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Prompt and `n` limits.
    pub limits: BodyLimits,
    /// What edits and variations may upload.
    pub uploads: UploadLimits,
    /// `url` responses are presigned GETs of the image store (S3) instead of this
    /// server's own signed links.
    pub presigned_links: bool,
    /// This server is one of a cluster's API nodes: per-key rate limits, `Idempotency-Key`
    /// runs and SDK-retry attach are kept in the database (and response bodies in the
    /// image store), shared by every node, instead of in this process's memory.
    pub shared_state: bool,
    /// Serve requests without a key while no key exists (only ever true on loopback).
    pub open_when_no_keys: bool,
    /// How long an `Idempotency-Key`'s response is replayed.
    pub idempotency_ttl: Duration,
    /// Connection timeouts and cap (see `server`).
    pub connections: Connections,
    /// `/metrics` answers only with a valid key (when keys exist).
    pub metrics_require_key: bool,
    /// What to tell a client that asks for a model this server does not serve, by model
    /// name (`FLUX.1-schnell`, `black-forest-labs/FLUX.1-schnell` and `flux-1-schnell` are
    /// one name: case, owner, dots and underscores do not count).
    pub model_hints: Vec<(String, String)>,
    /// The folder of LoRA files requests may name (`loras`); `None`: none are taken.
    pub lora_dir: Option<std::path::PathBuf>,
    /// Serve the playground page at `/`.
    pub playground: bool,
}

/// How long and how many connections may be held (see `server`).
#[derive(Debug, Clone)]
pub struct Connections {
    /// Time to send a request's headers, from the connection's start or its previous
    /// response (so also how long an idle keep-alive connection stays open).
    pub header_timeout: Duration,
    /// Time to send a request's body once its headers arrived.
    pub body_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// A configured model, before it loads.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Its name.
    pub name: String,
    /// Other names that reach it (`dall-e-3`, `gpt-image-1`, ...).
    pub aliases: Vec<String>,
    /// Unix time shown as `created` in `/v1/models`.
    pub created: i64,
}

/// A loaded model: its queue, the rules it is served by, its memory.
pub(crate) struct Loaded {
    pub queue: Arc<dyn JobQueue>,
    pub rules: ModelRules,
    pub memory: Vec<ModelPart>,
}

/// A model and, once loaded, what it needs to serve.
pub(crate) struct ModelSlot {
    pub spec: ModelSpec,
    loaded: OnceLock<Loaded>,
    failed: OnceLock<String>,
    hash: OnceLock<String>,
}

impl ModelSlot {
    /// Its queue, rules and memory, once loaded.
    pub fn loaded(&self) -> Option<&Loaded> {
        self.loaded.get()
    }

    /// A short hash of its weight files, once computed.
    pub fn hash(&self) -> Option<&str> {
        self.hash.get().map(String::as_str)
    }

    /// The loaded model, or the 503 that says it is still loading or failed to.
    pub fn ready(&self) -> Result<&Loaded, ApiError> {
        self.loaded().ok_or_else(|| {
            let name = &self.spec.name;
            let (message, secs) = match self.failed.get() {
                Some(why) => (format!("The model `{name}` failed to load: {why}"), 60),
                None => (format!("The model `{name}` is still loading."), 10),
            };
            ApiError::Unavailable {
                message,
                retry_after: Duration::from_secs(secs),
            }
        })
    }
}

pub(crate) struct Inner {
    pub config: ApiConfig,
    pub db: Db,
    pub blobs: Blobs,
    pub signer: Signer,
    pub models: Vec<Arc<ModelSlot>>,
    pub names: HashMap<String, usize>,
    pub shutting_down: AtomicBool,
    /// A key has been created (keys are never deleted, so this never turns back).
    pub keyed: AtomicBool,
    /// Responses by `Idempotency-Key`.
    pub replays: crate::idempotency::Replays,
    /// Responses by request body, for SDK retries to attach to (see `generation::detach`).
    pub retries: crate::idempotency::Replays,
    /// Per-key rate limits.
    pub limiter: crate::ratelimit::Limiter,
    /// Requests being answered, their response bodies included (see `server`).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Set when the shutdown's grace period is over: requests still waiting answer 503.
    pub cut_off: tokio::sync::watch::Sender<bool>,
    /// This node's name in shared records.
    pub node: String,
    /// Permits for upload bodies held in memory at once (`uploads.max_concurrent`).
    pub uploads: Arc<tokio::sync::Semaphore>,
}

/// Memory for stored `Idempotency-Key` responses (base64 images are large).
const REPLAY_BYTES: usize = 256 << 20;
/// How long a finished job waits for an SDK retry to collect it, and the memory for them.
pub(crate) const RETRY_TTL: Duration = Duration::from_secs(120);
const RETRY_BYTES: usize = 64 << 20;

/// The state every handler shares; cheap to clone.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

impl AppState {
    /// Builds the state; models start unloaded (see [`AppState::install`]).
    pub fn new(
        config: ApiConfig,
        db: Db,
        blobs: Blobs,
        signing_key: Vec<u8>,
        models: Vec<ModelSpec>,
    ) -> Self {
        let mut names = HashMap::new();
        for (i, m) in models.iter().enumerate() {
            names.insert(m.name.clone(), i);
            for alias in &m.aliases {
                names.entry(alias.clone()).or_insert(i);
            }
        }
        let models = models
            .into_iter()
            .map(|spec| {
                Arc::new(ModelSlot {
                    spec,
                    loaded: OnceLock::new(),
                    failed: OnceLock::new(),
                    hash: OnceLock::new(),
                })
            })
            .collect();
        let replays = crate::idempotency::Replays::new(config.idempotency_ttl, 4096, REPLAY_BYTES);
        let retries = crate::idempotency::Replays::new(RETRY_TTL, 1024, RETRY_BYTES);
        Self(Arc::new(Inner {
            replays,
            retries,
            limiter: if config.shared_state {
                crate::ratelimit::Limiter::Shared(db.clone())
            } else {
                crate::ratelimit::Limiter::default()
            },
            db,
            blobs,
            signer: Signer::new(signing_key),
            models,
            names,
            shutting_down: AtomicBool::new(false),
            keyed: AtomicBool::new(false),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            cut_off: tokio::sync::watch::Sender::new(false),
            node: format!("api-{}", hex::encode(rand::random::<[u8; 6]>())),
            uploads: Arc::new(tokio::sync::Semaphore::new(config.uploads.max_concurrent)),
            config,
        }))
    }

    /// Makes model `name` servable through `queue`, held to `rules` (the pipeline's own,
    /// as the configuration adjusted them). Its parts' memory, as the queue's pipeline
    /// reported it, shows in `/v1/models` and `/metrics`.
    pub fn install(&self, name: &str, queue: Arc<dyn JobQueue>, rules: ModelRules) {
        let Some(slot) = self.model(name) else {
            return;
        };
        let memory: Vec<ModelPart> = queue.memory().iter().map(ModelPart::from).collect();
        for p in &memory {
            metrics::gauge!("pictor_model_memory_bytes", "model" => slot.spec.name.clone(),
                "part" => p.part.clone(), "storage" => p.storage.clone(),
                "resident" => p.resident.to_string())
            .set(p.bytes as f64);
        }
        let _ = slot.loaded.set(Loaded {
            queue,
            rules,
            memory,
        });
    }

    /// Records the short hash of model `name`'s weights (shown in receipts).
    pub fn set_hash(&self, name: &str, hash: String) {
        if let Some(slot) = self.model(name) {
            let _ = slot.hash.set(hash);
        }
    }

    /// Records that model `name` could not be loaded.
    pub fn mark_failed(&self, name: &str, why: String) {
        if let Some(slot) = self.model(name) {
            let _ = slot.failed.set(why);
        }
    }

    /// The slot a name or alias reaches.
    pub(crate) fn model(&self, name: &str) -> Option<&Arc<ModelSlot>> {
        self.0.names.get(name).map(|&i| &self.0.models[i])
    }

    /// The 404 for a model this server does not serve: what it serves, and how to serve
    /// `name` where the configuration knows.
    pub(crate) fn model_not_found(&self, name: &str) -> ApiError {
        let served: Vec<String> = self
            .0
            .models
            .iter()
            .map(|m| match m.spec.aliases.as_slice() {
                [] => format!("`{}`", m.spec.name),
                aliases => format!("`{}` (also as `{}`)", m.spec.name, aliases.join("`, `")),
            })
            .collect();
        let mut help = match served.as_slice() {
            [] => "This server serves no model.".to_string(),
            _ => format!("This server serves {}.", served.join(", ")),
        };
        let wanted = pictor_core::loose_model_name(name);
        if let Some((_, hint)) = self
            .0
            .config
            .model_hints
            .iter()
            .find(|(known, _)| pictor_core::loose_model_name(known) == wanted)
        {
            help.push(' ');
            help.push_str(hint);
        }
        ApiError::ModelNotFound {
            model: name.to_string(),
            help,
        }
    }

    /// All models.
    pub(crate) fn models(&self) -> &[Arc<ModelSlot>] {
        &self.0.models
    }

    /// Whether every model is loaded.
    pub fn ready(&self) -> bool {
        self.0.models.iter().all(|m| m.loaded().is_some())
    }

    /// Whether requests need no key: a loopback server on which no key was ever created.
    /// Once one exists every request needs a key, and the database is not asked again.
    pub(crate) async fn open(&self) -> Result<bool, pictor_store::StoreError> {
        if !self.0.config.open_when_no_keys || self.0.keyed.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if self.db().has_keys().await? {
            self.0.keyed.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    /// The database.
    pub(crate) fn db(&self) -> &Db {
        &self.0.db
    }

    /// Starts refusing new generations (503) while in-flight ones finish.
    pub fn begin_shutdown(&self) {
        self.0.shutting_down.store(true, Ordering::Relaxed);
        for m in &self.0.models {
            if let Some(loaded) = m.loaded() {
                loaded.queue.close();
            }
        }
    }

    /// Ends the shutdown's grace period: requests still waiting answer 503.
    pub(crate) fn cut_off(&self) {
        self.0.cut_off.send_replace(true);
    }

    /// Resolves once the shutdown's grace period is over.
    pub(crate) async fn cut_off_reached(&self) {
        let mut cut = self.0.cut_off.subscribe();
        let _ = cut.wait_for(|&c| c).await;
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.0.shutting_down.load(Ordering::Relaxed)
    }

    /// Waits up to `grace` for every model's worker to finish its queued work.
    pub async fn drain(&self, grace: Duration) -> bool {
        let mut all = true;
        for m in &self.0.models {
            if let Some(loaded) = m.loaded() {
                all &= loaded.queue.shutdown(grace).await;
            }
        }
        all
    }
}
