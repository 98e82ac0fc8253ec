//! `pictor serve`: the OpenAI-compatible image server.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use pictor_api::{ApiConfig, AppState, BodyLimits, ModelSpec};
use pictor_store::{Db, now_unix};

use crate::config::Config;

/// Arguments of `pictor serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Listen address (overrides the config's `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// `all`: one process (the default); `api`: answer clients, running jobs on the
    /// cluster's workers; `worker`: hold models and run the cluster's jobs. `api` and
    /// `worker` need PostgreSQL (`database_url`) and S3 (`[storage] url`).
    #[arg(long, value_enum, default_value_t = crate::cluster::Role::All, env = "PICTOR_ROLE")]
    role: crate::cluster::Role,
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

/// Makes the data directory and what is directly in it (database, images, keys, model
/// copies) readable by this user only: it holds hashed keys, usage and every image. What
/// the server creates from now on is private too (umask 077), from files an older version
/// left behind to the database's journal files and each image.
fn keep_private(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
        unsafe {
            libc::umask(0o077);
        }
        use std::os::unix::fs::PermissionsExt;
        let private = |path: &Path, is_dir: bool| {
            let mode = if is_dir { 0o700 } else { 0o600 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("restricting {} to this user", path.display()))
        };
        private(dir, true)?;
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            // A link's target is someone else's to set.
            if !kind.is_symlink() {
                private(&entry.path(), kind.is_dir())?;
            }
        }
    }
    Ok(())
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

/// The API's settings for a server listening on `addr`.
fn api_config(
    config: &Config,
    addr: SocketAddr,
    role: crate::cluster::Role,
) -> anyhow::Result<ApiConfig> {
    Ok(ApiConfig {
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
        connections: pictor_api::Connections {
            header_timeout: Duration::from_secs(config.limits.header_timeout_secs),
            body_timeout: Duration::from_secs(config.limits.body_timeout_secs),
            max_connections: connection_cap(config.limits.max_connections),
        },
        uploads: pictor_api::UploadLimits {
            max_file_bytes: config.limits.max_upload_bytes,
            max_request_bytes: config.limits.max_upload_request_bytes,
            max_images: config.limits.max_edit_images,
            max_pixels: config.limits.max_upload_pixels,
            max_side: config.limits.max_upload_side,
            body_timeout: Duration::from_secs(config.limits.upload_timeout_secs),
            max_concurrent: config.limits.max_concurrent_uploads,
        },
        metrics_require_key: config.metrics_require_key,
        model_hints: crate::config::model_hints(),
        lora_dir: Some(config.lora_dir()),
        // On by default: a server runs only on loopback or with keys (`open_db` refuses
        // the rest), which is where the page may be offered.
        playground: config.playground.unwrap_or(true),
        presigned_links: config.storage.presigned_links()?,
        // API nodes share rate limits and detached runs across the cluster.
        shared_state: role == crate::cluster::Role::Api,
    })
}

/// Files the process keeps open besides its connections: the database, images being
/// written, model files.
const FILES_BESIDES_CONNECTIONS: u64 = 64;

/// The connection cap: `wanted`, but under the process's open-file limit (raised to its
/// hard limit first), so that accepting never fails for want of a file descriptor.
fn connection_cap(wanted: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!("reading the open-file limit: {e}");
            return wanted;
        }
    };
    let room = limit.saturating_sub(FILES_BESIDES_CONNECTIONS).max(1);
    if (wanted as u64) > room {
        tracing::warn!(
            "max_connections {wanted} is over what the open-file limit ({limit}) allows; serving {room} at once"
        );
    }
    wanted.min(room as usize).max(1)
}

/// Opens the database and refuses a keyless server anywhere but on loopback.
async fn open_db(config: &Config, addr: SocketAddr) -> anyhow::Result<Db> {
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
            "No API keys yet: on this loopback address every request is accepted, with or without \
             a key (any bearer will do). Create one with `pictor keys create --name NAME`; from \
             then on every request needs a valid key."
        );
    }
    Ok(db)
}

/// Loads every model in the background, installing each in `state` as it is ready (until
/// then its requests get 503), then hashes its weights for receipts.
fn load_models(config: &Config, state: &AppState) {
    for (name, m) in config.models.clone() {
        let (state, config) = (state.clone(), config.clone());
        tokio::task::spawn_blocking(move || {
            let running = match crate::load::start_model(&config, &name, &m) {
                Ok(running) => running,
                Err(e) => {
                    eprintln!("model {name} failed to load: {e:#}");
                    state.mark_failed(&name, format!("{e:#}"));
                    return;
                }
            };
            state.install(&name, Arc::new(running.queue), running.rules);
            // Receipts name the weights by hash; large models take a while to hash.
            if let Some(hash) = crate::load::weights_hash(&config, &running.weights) {
                state.set_hash(&name, hash);
            }
        });
    }
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
    keep_private(&config.data_dir)?;
    if args.role == crate::cluster::Role::Worker {
        return crate::cluster::run_worker(config, shutdown_signal()).await;
    }
    let db = open_db(&config, addr).await?;
    let blobs = config
        .storage
        .open(&config.data_dir)
        .context("opening the image store")?;
    let specs = config
        .models
        .iter()
        .map(|(name, m)| ModelSpec {
            name: name.clone(),
            aliases: m.aliases.clone(),
            created: now_unix(),
        })
        .collect();
    // API nodes sign image links with one key, so any node serves a link another made.
    let key = match args.role {
        crate::cluster::Role::Api => {
            let shared = db
                .shared_setting(
                    "url-signing-key",
                    || hex::encode(rand::random::<[u8; 32]>()),
                )
                .await?;
            hex::decode(shared).context("the shared URL-signing key is not hex")?
        }
        _ => signing_key(&config.data_dir)?,
    };
    let state = AppState::new(api_config(&config, addr, args.role)?, db, blobs, key, specs);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("pictor listening on http://{}", listener.local_addr()?);
    match args.role {
        crate::cluster::Role::Api => crate::cluster::serve_shared_models(&config, &state).await?,
        _ => load_models(&config, &state),
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
