//! `pictor.toml`: one file, overridable by `PICTOR_*` environment variables and flags.
//! Defaults live on the types (figment's `Serialized::defaults`), not in strings elsewhere.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context;
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use pictor_core::Dimensions;
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Base of image links (set it behind a reverse proxy); default `http://<listen>`.
    pub public_url: Option<String>,
    /// Where the database, signing key and images live.
    pub data_dir: PathBuf,
    /// The folder of LoRA files requests may add by name (`loras`); default
    /// `<data_dir>/loras`.
    pub lora_dir: Option<PathBuf>,
    /// SQL database URL; default `sqlite://<data_dir>/pictor.db`.
    pub database_url: Option<String>,
    /// Lifetime of image links and files, seconds (OpenAI: 60 minutes).
    pub image_ttl_secs: u64,
    /// How often expired images are deleted, seconds.
    pub sweep_interval_secs: u64,
    /// How long a response is replayed for its `Idempotency-Key`, seconds.
    pub idempotency_ttl_secs: u64,
    /// Time given to in-flight work on SIGTERM, seconds.
    pub shutdown_grace_secs: u64,
    /// Memory each model may take: `auto` (the machine's memory less 10%, at least 1 GiB
    /// kept back), `none`, or a size such as `20 GiB`. A model over it is staged (T5 and
    /// the transformer take turns) or refused at startup with the part that does not fit.
    pub memory_budget: String,
    /// Request limits.
    pub limits: Limits,
    /// `/metrics` answers only with a valid API key (once keys exist).
    pub metrics_require_key: bool,
    /// Serve the playground page at `/`; default: on when listening on loopback or when
    /// API keys exist.
    pub playground: Option<bool>,
    /// Where images are stored.
    pub storage: Storage,
    /// Models by name. Empty: the model shipped with Pictor.
    pub models: BTreeMap<String, ModelConfig>,
}

/// Where images are stored: `<data_dir>/images` by default, or an S3-compatible bucket
/// (credentials from the usual AWS variables).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// `s3://bucket` or `s3://bucket/prefix`; absent: the local folder.
    pub url: Option<String>,
    /// The S3 server, for a store other than AWS (`http://127.0.0.1:8333`).
    pub endpoint: Option<String>,
    /// The bucket's region (`us-east-1` when absent).
    pub region: Option<String>,
    /// How `url` responses reach an image in S3: `presigned` (a presigned GET of the store
    /// itself, valid `image_ttl_secs`) or `proxy` (the server's own signed link, which
    /// reads the object: for a bucket clients cannot reach).
    pub links: String,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            url: None,
            endpoint: None,
            region: None,
            links: "presigned".into(),
        }
    }
}

impl Storage {
    /// The image store this names.
    pub fn open(&self, data_dir: &std::path::Path) -> anyhow::Result<pictor_store::Blobs> {
        let Some(url) = &self.url else {
            return Ok(pictor_store::Blobs::local(&data_dir.join("images"))?);
        };
        Ok(pictor_store::Blobs::s3(&pictor_store::S3Options {
            url: url.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
        })?)
    }

    /// Whether `url` responses are presigned store links (else the server's own).
    pub fn presigned_links(&self) -> anyhow::Result<bool> {
        match self.links.as_str() {
            "presigned" => Ok(self.url.is_some()),
            "proxy" => Ok(false),
            other => anyhow::bail!("storage.links `{other}`: use presigned or proxy"),
        }
    }
}

/// Request limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Longest prompt, characters.
    pub max_prompt_chars: usize,
    /// Most images per request.
    pub max_n: usize,
    /// Requests that may wait per model beyond the running one; more get 429.
    pub queue_depth: usize,
    /// Longest a request may take, queue included, seconds.
    pub request_timeout_secs: u64,
    /// Time a client has to send a request's headers, from its connection's start or its
    /// previous response (so also how long an idle keep-alive connection stays), seconds.
    pub header_timeout_secs: u64,
    /// Time a client has to send a request's body once its headers arrived, seconds.
    pub body_timeout_secs: u64,
    /// Connections served at once (also kept under the process's file limit); one more is
    /// answered 503 and closed.
    pub max_connections: usize,
    /// Largest file an edit or variation may upload, bytes.
    pub max_upload_bytes: usize,
    /// Largest edit or variation request, files included, bytes.
    pub max_upload_request_bytes: usize,
    /// Most images in one edit.
    pub max_edit_images: usize,
    /// Most pixels an uploaded image may declare (refused from its header beyond).
    pub max_upload_pixels: u64,
    /// Longest side an uploaded image may declare, pixels.
    pub max_upload_side: u32,
    /// Time a client has to send an upload's body once its headers arrived, seconds.
    pub upload_timeout_secs: u64,
    /// Upload bodies received at once; one more is answered 503.
    pub max_concurrent_uploads: usize,
}

/// One model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Folder, transformer file, or Hugging Face repo id in the local cache.
    pub path: String,
    /// Other names clients may use (`dall-e-3`, `gpt-image-1`, ...).
    pub aliases: Vec<String>,
    /// `auto`, `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Where it runs: `auto` (the first CUDA GPU when this build has CUDA and the machine
    /// a driver and a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// CUDA device number: the same as `device = "cuda:N"`.
    pub cuda: Option<usize>,
    /// Most images denoised together, from one request or several compatible ones.
    pub max_batch: usize,
    /// `size: auto`, `WxH`. This and the five keys below change the model's own rules
    /// (FLUX.1-schnell: 1024x1024, sides 256 to 2048, 2048² pixels, 4 steps, at most 50);
    /// left out, the model's own apply. The size grid is the model's and cannot change.
    pub default_size: Option<Dimensions>,
    /// Smallest side, pixels.
    pub min_side: Option<usize>,
    /// Largest side, pixels.
    pub max_side: Option<usize>,
    /// Most pixels per image.
    pub max_pixels: Option<usize>,
    /// Steps for `quality: auto|high`.
    pub default_steps: Option<usize>,
    /// Most steps a request may ask for.
    pub max_steps: Option<usize>,
    /// Run from a quantized copy (`q8_0`, `q6_k`, `q5_k`, `q4_k`, ...) of the transformer
    /// and T5 when they are not GGUF already: made once with `pictor quantize`'s code into
    /// `<data_dir>/cache/quantized/` and reused while the source files are unchanged.
    pub quantize: Option<String>,
    /// How RoPE splits the transformer's heads (`[16, 56, 56]` for FLUX.1), for a
    /// transformer file that records it nowhere; a config or GGUF that records it must
    /// agree. Needed only for heads that are not FLUX.1's 128 wide.
    pub rope_axes: Option<Vec<usize>>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            aliases: Vec::new(),
            dtype: "auto".into(),
            device: "auto".into(),
            cuda: None,
            max_batch: 4,
            default_size: None,
            min_side: None,
            max_side: None,
            max_pixels: None,
            default_steps: None,
            max_steps: None,
            quantize: None,
            rope_axes: None,
        }
    }
}

impl ModelConfig {
    /// Where it runs, from `device` and its shorthand `cuda`.
    pub fn device(&self) -> anyhow::Result<pictor_engine::DeviceChoice> {
        use pictor_engine::DeviceChoice;
        let device: DeviceChoice = self.device.parse().map_err(anyhow::Error::msg)?;
        match (self.cuda, device) {
            (None, device) => Ok(device),
            (Some(n), DeviceChoice::Auto) => Ok(DeviceChoice::Cuda(n)),
            (Some(n), other) if other == DeviceChoice::Cuda(n) => Ok(other),
            (Some(n), _) => anyhow::bail!(
                "`cuda = {n}` and `device = \"{}\"` disagree: keep one",
                self.device
            ),
        }
    }

    /// The model's own `rules` with the ones this configuration changes.
    pub fn rules(&self, own: pictor_core::ModelRules) -> pictor_core::ModelRules {
        pictor_core::ModelRules {
            default_size: self.default_size.unwrap_or(own.default_size),
            min_side: self.min_side.unwrap_or(own.min_side),
            max_side: self.max_side.unwrap_or(own.max_side),
            max_pixels: self.max_pixels.unwrap_or(own.max_pixels),
            default_steps: self.default_steps.unwrap_or(own.default_steps),
            max_steps: self.max_steps.unwrap_or(own.max_steps),
            ..own
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_prompt_chars: 8192,
            max_n: 10,
            queue_depth: 16,
            request_timeout_secs: 600,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            max_connections: 1024,
            max_upload_bytes: 16 << 20,
            max_upload_request_bytes: 50 << 20,
            max_edit_images: 16,
            max_upload_pixels: 40_000_000,
            max_upload_side: 16_384,
            upload_timeout_secs: 120,
            max_concurrent_uploads: 8,
        }
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("pictor");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/pictor"),
        None => PathBuf::from("pictor-data"),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            data_dir: default_data_dir(),
            lora_dir: None,
            database_url: None,
            image_ttl_secs: 3600,
            sweep_interval_secs: 60,
            idempotency_ttl_secs: 24 * 3600,
            shutdown_grace_secs: 30,
            memory_budget: "auto".into(),
            limits: Limits::default(),
            metrics_require_key: false,
            playground: None,
            storage: Storage::default(),
            models: BTreeMap::new(),
        }
    }
}

/// The model shipped with Pictor, served when no model is configured: `pictor-tiny`,
/// compiled into the binary (see `shipped.rs`), native size 128×128.
pub fn shipped_models() -> BTreeMap<String, ModelConfig> {
    let model = ModelConfig {
        path: crate::shipped::NAME.into(),
        aliases: vec!["gpt-image-1".into(), "dall-e-3".into(), "dall-e-2".into()],
        // It was trained at 128² and draws only that: at 96² shapes are cut off, from 160²
        // up they repeat (tiling), so other sizes are refused rather than drawn wrong.
        default_size: Some(crate::shipped::NATIVE_SIZE),
        min_side: Some(crate::shipped::NATIVE_SIZE.width),
        max_side: Some(crate::shipped::NATIVE_SIZE.width),
        ..ModelConfig::default()
    };
    BTreeMap::from([(crate::shipped::NAME.to_string(), model)])
}

/// What a client asking for a well-known model this server does not serve is told: for a
/// model Pictor knows by name, the command that fetches it; for other families, that this
/// version cannot run them.
pub fn model_hints() -> Vec<(String, String)> {
    let mut hints = Vec::new();
    for entry in crate::catalogue::ENTRIES {
        let hint = format!(
            "Get it with `pictor models pull {}` (it prints the lines to add to pictor.toml, or \
             add --write-config), then restart `pictor serve`.",
            entry.name
        );
        hints.push((entry.name.to_string(), hint.clone()));
        if !hints.iter().any(|(known, _)| known == entry.family) {
            hints.push((entry.family.to_string(), hint));
        }
    }
    for family in [
        "FLUX.1-Kontext-dev",
        "FLUX.2-dev",
        "FLUX.2-klein",
        "Qwen-Image",
        "sdxl-turbo",
        "stable-diffusion-xl-base-1.0",
    ] {
        hints.push((
            family.to_string(),
            format!(
                "This version of Pictor cannot run {family}; it runs FLUX.1 (schnell, dev) and Z-Image-Turbo models."
            ),
        ));
    }
    hints
}

/// The top-level keys, for picking configuration out of the environment.
const FIELDS: &[&str] = &[
    "listen",
    "public_url",
    "data_dir",
    "lora_dir",
    "database_url",
    "image_ttl_secs",
    "sweep_interval_secs",
    "idempotency_ttl_secs",
    "shutdown_grace_secs",
    "memory_budget",
    "limits",
    "metrics_require_key",
    "playground",
    "storage",
    "models",
];

impl Config {
    /// The memory budget in bytes (`None`: unlimited).
    pub fn memory_budget(&self) -> anyhow::Result<Option<u64>> {
        match self.memory_budget.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(pictor_engine::flux::memory::default_budget()),
            "none" | "off" | "unlimited" => Ok(None),
            size => size
                .parse::<bytesize::ByteSize>()
                .map(|b| Some(b.as_u64()))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "memory_budget `{}`: {e} (use auto, none, or a size such as 20 GiB)",
                        self.memory_budget
                    )
                }),
        }
    }

    /// Defaults, then the TOML file (if given or if `./pictor.toml` exists), then
    /// `PICTOR_*` variables (`PICTOR_LISTEN`, `PICTOR_LIMITS__MAX_N`, ...).
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                anyhow::ensure!(
                    path.is_file(),
                    "config file {} does not exist",
                    path.display()
                );
                figment = figment.merge(Toml::file(path));
            }
            None => figment = figment.merge(Toml::file("pictor.toml")),
        }
        let mut config: Config = figment
            .merge(Env::prefixed("PICTOR_").split("__").filter(|key| {
                // Other PICTOR_* variables (PICTOR_LOG, PICTOR_CONFIG, a tool's own) are not
                // configuration keys; only the file is held to deny_unknown_fields.
                let top = key.as_str().split(['.']).next().unwrap_or_default();
                let top = top.split("__").next().unwrap_or_default();
                FIELDS.contains(&top.to_ascii_lowercase().as_str())
            }))
            .extract()
            .context("reading the configuration")?;
        if config.models.is_empty() {
            config.models = shipped_models();
        }
        Ok(config)
    }

    /// The folder of LoRA files: `lora_dir`, else `<data_dir>/loras`.
    pub fn lora_dir(&self) -> PathBuf {
        self.lora_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("loras"))
    }

    /// The model `name` names: a configured one, else the shipped one, else a model
    /// folder, file or Hugging Face repo id at `name` with the model's own rules.
    pub fn model(&self, name: &str) -> ModelConfig {
        self.models
            .get(name)
            .cloned()
            .or_else(|| shipped_models().remove(name))
            .unwrap_or_else(|| ModelConfig {
                path: name.to_string(),
                ..ModelConfig::default()
            })
    }

    /// The database URL in use.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("pictor.db").display()))
    }
}

#[cfg(test)]
// figment's Jail API fixes the closure's error type (figment::Error, which is large).
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn file_and_environment_layer_over_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "pictor.toml",
                r#"
                listen = "127.0.0.1:9000"
                [limits]
                max_n = 3
                [models.a]
                path = "/m"
                aliases = ["dall-e-3"]
                "#,
            )?;
            jail.set_env("PICTOR_LIMITS__QUEUE_DEPTH", "2");
            jail.set_env("PICTOR_BIN", "/not/a/config/key");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.listen, "127.0.0.1:9000");
            assert_eq!((c.limits.max_n, c.limits.queue_depth), (3, 2));
            assert_eq!(c.limits.max_prompt_chars, 8192);
            assert_eq!(c.models["a"].aliases, vec!["dall-e-3".to_string()]);
            assert_eq!(
                c.models["a"].default_steps, None,
                "the model's own steps apply"
            );
            Ok(())
        });
    }

    #[test]
    fn a_typo_in_the_file_is_an_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("pictor.toml", "lisen = \"127.0.0.1:1\"")?;
            assert!(Config::load(None).is_err());
            Ok(())
        });
    }

    #[test]
    fn no_models_means_the_shipped_one() {
        figment::Jail::expect_with(|_| {
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert!(c.models.contains_key("pictor-tiny"));
            Ok(())
        });
    }

    #[test]
    fn device_and_its_cuda_shorthand_agree_or_are_refused() {
        use pictor_engine::DeviceChoice;
        let model = |device: &str, cuda: Option<usize>| ModelConfig {
            device: device.into(),
            cuda,
            ..ModelConfig::default()
        };
        assert_eq!(model("auto", None).device().unwrap(), DeviceChoice::Auto);
        assert_eq!(model("cpu", None).device().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            model("auto", Some(1)).device().unwrap(),
            DeviceChoice::Cuda(1)
        );
        assert_eq!(
            model("cuda:1", Some(1)).device().unwrap(),
            DeviceChoice::Cuda(1)
        );
        let err = model("cpu", Some(0)).device().unwrap_err().to_string();
        assert!(err.contains("disagree"), "{err}");
        let err = model("gpu0", None).device().unwrap_err().to_string();
        assert!(err.contains("unknown device `gpu0`"), "{err}");
    }
}
