//! `pictor keys create|list|revoke|usage`.

use anyhow::Context;
use pictor_store::Db;

use crate::config::Config;

/// Key commands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret (shown only this once).
    Create {
        /// A name to tell the key apart.
        #[arg(long)]
        name: String,
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

fn when(t: i64) -> String {
    t.to_string()
}

/// Runs a key command against the configured database.
pub async fn run(config: Config, command: KeysCommand) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let db = Db::connect(&config.database_url())
        .await
        .context("opening the database")?;
    match command {
        KeysCommand::Create { name } => {
            let new = db.create_key(&name).await?;
            println!("{}", new.secret);
            eprintln!(
                "created {} ({}); the secret above is not stored and will not be shown again",
                new.key.id, name
            );
        }
        KeysCommand::List => {
            println!(
                "{:<22} {:<20} {:<12} {:<12} status",
                "id", "name", "prefix", "created"
            );
            for k in db.list_keys().await? {
                let status = k
                    .revoked_at
                    .map_or("active".to_string(), |t| format!("revoked at {}", when(t)));
                println!(
                    "{:<22} {:<20} {:<12} {:<12} {status}",
                    k.id,
                    k.name,
                    k.prefix,
                    when(k.created_at)
                );
            }
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
