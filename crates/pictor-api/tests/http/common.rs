//! A real server on 127.0.0.1:0 over a temp data dir, and a client.

use std::{path::Path, sync::Arc, time::Duration};

use base64::Engine as _;
use pictor_api::{ApiConfig, AppState, BodyLimits, ModelSpec};
use pictor_engine::{
    Dimensions, ModelFiles, ModelRules, Pipeline,
    flux::{FluxOptions, FluxPipeline},
};
use pictor_sched::{ModelQueue, QueueConfig};
use pictor_store::{Blobs, Db};
use serde_json::{Value, json};

pub struct Options {
    pub open: bool,
    pub ttl: Duration,
    pub queue_depth: usize,
    pub timeout: Duration,
    pub load_model: bool,
    pub connections: pictor_api::Connections,
    pub metrics_require_key: bool,
    pub grace: Duration,
    pub max_n: usize,
    pub uploads: pictor_api::UploadLimits,
    /// The fixture under `tests/data/` the model is loaded from.
    pub fixture: &'static str,
    /// The folder of LoRA files requests may name.
    pub lora_dir: Option<std::path::PathBuf>,
    /// Serve the playground at `/`.
    pub playground: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            open: false,
            ttl: Duration::from_secs(3600),
            queue_depth: 4,
            timeout: Duration::from_secs(300),
            load_model: true,
            connections: pictor_api::Connections::default(),
            metrics_require_key: false,
            grace: Duration::from_secs(60),
            max_n: 10,
            uploads: pictor_api::UploadLimits::default(),
            fixture: "tiny-flux-schnell",
            lora_dir: None,
            playground: true,
        }
    }
}

pub struct Server {
    pub url: String,
    /// The model's queue, when it was loaded (tests watch its waiting and running jobs).
    pub queue: Option<Arc<ModelQueue>>,
    pub state: AppState,
    pub db: Db,
    pub key: String,
    pub client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: Option<tokio::task::JoinHandle<std::io::Result<bool>>>,
    pub dir: tempfile::TempDir,
}

pub const MODEL: &str = "tiny";

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

pub async fn start(opts: Options) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_file(&dir.path().join("pictor.db")).await.unwrap();
    let key = db.create_key("test").await.unwrap().secret;
    if opts.open {
        // An open server is one with no keys at all.
        let fresh = Db::open_file(&dir.path().join("open.db")).await.unwrap();
        return start_with(opts, dir, fresh, String::new()).await;
    }
    start_with(opts, dir, db, key).await
}

async fn start_with(opts: Options, dir: tempfile::TempDir, db: Db, key: String) -> Server {
    let blobs = Blobs::local(&dir.path().join("images")).unwrap();
    let spec = ModelSpec {
        name: MODEL.into(),
        aliases: vec!["dall-e-3".into()],
        created: 1,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = ApiConfig {
        public_url: url.clone(),
        image_ttl: opts.ttl,
        max_body_bytes: 64 * 1024,
        limits: BodyLimits {
            max_prompt_chars: 8192,
            max_n: opts.max_n,
        },
        open_when_no_keys: opts.open,
        idempotency_ttl: Duration::from_secs(3600),
        connections: opts.connections.clone(),
        uploads: opts.uploads.clone(),
        presigned_links: false,
        shared_state: false,
        metrics_require_key: opts.metrics_require_key,
        model_hints: vec![(
            "FLUX.1-schnell".into(),
            "Serve it by adding it to pictor.toml.".into(),
        )],
        lora_dir: opts.lora_dir.clone(),
        playground: opts.playground,
    };
    let state = AppState::new(config, db.clone(), blobs, vec![9; 32], vec![spec]);
    let mut model_queue = None;
    if opts.load_model {
        let dir = fixture(opts.fixture);
        let pipeline: Box<dyn Pipeline> = if pictor_engine::zimage::is_folder(&dir) {
            Box::new(pictor_engine::zimage::ZImagePipeline::load(&dir).unwrap())
        } else {
            let files = ModelFiles::from_dir(&dir).unwrap();
            let options = FluxOptions {
                lora_dir: opts.lora_dir.clone(),
                ..FluxOptions::default()
            };
            Box::new(FluxPipeline::load(&files, options).unwrap())
        };
        // The pipeline's own rules, adjusted as a configuration would.
        let rules = ModelRules {
            min_side: 32,
            default_size: Dimensions::new(64, 64),
            // Long jobs let the lifecycle tests hold the worker busy.
            max_steps: 500,
            ..pipeline.rules()
        };
        let queue = QueueConfig {
            depth: opts.queue_depth,
            timeout: opts.timeout,
            batch_images: 4,
        };
        let queue = Arc::new(ModelQueue::start(MODEL, pipeline, queue));
        state.install(MODEL, queue.clone(), rules);
        model_queue = Some(queue);
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(pictor_api::serve(
        listener,
        state.clone(),
        async {
            let _ = rx.await;
        },
        opts.grace,
    ));
    Server {
        url,
        queue: model_queue,
        state,
        db,
        key,
        client: reqwest::Client::new(),
        shutdown: Some(tx),
        handle: Some(handle),
        dir,
    }
}

impl Server {
    pub fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/images/generations", self.url))
            .bearer_auth(&self.key)
            .json(body)
    }

    /// `GET path` with the key, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn generate(&self, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = self.post(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    pub fn stop(&mut self) -> tokio::task::JoinHandle<std::io::Result<bool>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.take().unwrap()
    }
}

pub fn small(prompt: &str) -> Value {
    json!({"model": MODEL, "prompt": prompt, "size": "64x48", "seed": 1, "steps": 2})
}

/// Asserts the OpenAI error shape and returns (type, param, code).
pub fn error_parts(body: &Value) -> (String, Option<String>, Option<String>) {
    let e = body
        .get("error")
        .unwrap_or_else(|| panic!("no error object in {body}"));
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    let s = |v: &Value| v.as_str().map(str::to_string);
    (s(&e["type"]).expect("type"), s(&e["param"]), s(&e["code"]))
}

pub fn decode(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory(bytes).expect("decodes").to_rgb8()
}

/// The bytes of image `i` of a `b64_json` answer.
pub fn image_of(reply: &Value, i: usize) -> Vec<u8> {
    let b64 = reply["data"][i]["b64_json"].as_str().expect("b64_json");
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}
