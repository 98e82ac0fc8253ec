//! `pictor keys create|list|revoke|usage`.

use anyhow::Context;
use pictor_store::{Db, KeyLimits};

use crate::config::Config;

/// Key commands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret (shown only this once).
    Create {
        /// A name to tell the key apart.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Set or remove a key's rate limits (0 removes one; a limit not given is kept).
    Limit {
        /// The key id (`key_...`).
        id: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by id.
    Revoke {
        /// The key id (`key_...`).
        id: String,
    },
    /// Usage per key: requests, images, pixels, seconds.
    Usage,
}

/// Per-key rate limits.
#[derive(Debug, clap::Args)]
pub struct LimitArgs {
    /// Requests per minute (0: unlimited).
    #[arg(long)]
    rpm: Option<u32>,
    /// Images per minute, `n` per request (0: unlimited).
    #[arg(long)]
    ipm: Option<u32>,
}

impl LimitArgs {
    /// `current` with the given limits applied.
    fn over(&self, current: KeyLimits) -> KeyLimits {
        let set = |new: Option<u32>, old| match new {
            Some(0) => None,
            Some(v) => Some(v),
            None => old,
        };
        KeyLimits {
            requests_per_minute: set(self.rpm, current.requests_per_minute),
            images_per_minute: set(self.ipm, current.images_per_minute),
        }
    }
}

fn show(limits: KeyLimits) -> String {
    let one = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    format!(
        "{}/{}",
        one(limits.requests_per_minute),
        one(limits.images_per_minute)
    )
}

fn when(t: i64) -> String {
    t.to_string()
}

/// Opens the configured database (creating the data directory a SQLite file lives in),
/// migrated.
async fn open(config: &Config) -> anyhow::Result<Db> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    Db::connect(&config.database_url())
        .await
        .context("opening the database")
}

/// `pictor migrate`: applies the migrations and says to which database.
pub async fn migrate(config: Config) -> anyhow::Result<()> {
    let db = open(&config).await?;
    eprintln!("the {:?} database is migrated", db.backend());
    Ok(())
}

/// Runs a key command against the configured database.
pub async fn run(config: Config, command: KeysCommand) -> anyhow::Result<()> {
    let db = open(&config).await?;
    match command {
        KeysCommand::Create { name, limits } => {
            let new = db.create_key(&name).await?;
            let limits = limits.over(KeyLimits::default());
            if limits != KeyLimits::default() {
                db.set_limits(&new.key.id, limits).await?;
            }
            println!("{}", new.secret);
            eprintln!(
                "created {} ({}); the secret above is not stored and will not be shown again",
                new.key.id, name
            );
        }
        KeysCommand::List => {
            println!(
                "{:<22} {:<20} {:<12} {:<12} {:<12} status",
                "id", "name", "prefix", "created", "rpm/ipm"
            );
            for k in db.list_keys().await? {
                let status = k
                    .revoked_at
                    .map_or("active".to_string(), |t| format!("revoked at {}", when(t)));
                println!(
                    "{:<22} {:<20} {:<12} {:<12} {:<12} {status}",
                    k.id,
                    k.name,
                    k.prefix,
                    when(k.created_at),
                    show(k.limits)
                );
            }
        }
        KeysCommand::Limit { id, limits } => {
            let key = db
                .list_keys()
                .await?
                .into_iter()
                .find(|k| k.id == id)
                .with_context(|| format!("no key with id {id}"))?;
            let limits = limits.over(key.limits);
            db.set_limits(&id, limits).await?;
            println!("{id}: requests/images per minute {}", show(limits));
        }
        KeysCommand::Revoke { id } => {
            db.revoke_key(&id).await?;
            println!("revoked {id}");
        }
        KeysCommand::Usage => {
            println!(
                "{:<22} {:<20} {:>9} {:>8} {:>14} {:>10}",
                "id", "name", "requests", "images", "pixels", "seconds"
            );
            for u in db.usage().await? {
                println!(
                    "{:<22} {:<20} {:>9} {:>8} {:>14} {:>10.1}",
                    u.key.id, u.key.name, u.requests, u.images, u.pixels, u.seconds
                );
            }
        }
    }
    Ok(())
}
