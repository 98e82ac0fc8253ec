//! The `pictor` command: serve the OpenAI Images API, generate from the command line,
//! manage keys, pull, inspect and quantize model files.

mod catalogue;
mod cluster;
mod config;
mod generate;
mod hash;
mod keys;
mod load;
mod model_list;
mod models;
mod pull;
mod quantized;
mod selfcheck;
mod serve;
mod shipped;

use clap::{Parser, Subcommand};

/// Pictor: self-hosted, OpenAI-compatible image generation.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (default: ./pictor.toml if it exists).
    #[arg(long, global = true, env = "PICTOR_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI Images API.
    Serve(serve::Args),
    /// Generate images from a prompt and write them as PNG files.
    Generate(generate::Args),
    /// Print the OpenAPI document of the HTTP API.
    Openapi,
    /// Manage API keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Get models from the Hugging Face Hub and look inside model files.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Write a quantized GGUF copy of a transformer or T5 encoder (streams tensor by
    /// tensor: memory stays at one tensor).
    Quantize(models::QuantizeArgs),
    /// Check this build on a device against diffusers' numbers for a tiny fixture (text
    /// encoders, one transformer step, the final latents, the pixels); prints JSON.
    Selfcheck(selfcheck::Args),
    /// Apply the database migrations (SQLite or PostgreSQL, as `database_url` says);
    /// `serve` and `keys` also apply them when they open the database.
    Migrate,
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: large tensors reuse freed pages instead of faulting in
    // fresh ones (see `pictor_engine::heap`).
    pictor_engine::heap::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PICTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => {
            config::Config::load(cli.config.as_deref()).and_then(|c| generate::run(args, &c))
        }
        Command::Openapi => {
            println!("{}", pictor_api::openapi_json());
            Ok(())
        }
        Command::Serve(args) => block_on(cli.config.as_deref(), |c| serve::run(c, args)),
        Command::Keys(k) => block_on(cli.config.as_deref(), |c| keys::run(c, k)),
        Command::Migrate => block_on(cli.config.as_deref(), keys::migrate),
        Command::Models(m) => models::run(m, cli.config.as_deref()),
        Command::Selfcheck(args) => selfcheck::run(args),
        Command::Quantize(q) => models::quantize_command(q),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Loads the configuration and runs an async command on a fresh runtime.
fn block_on<F, Fut>(config: Option<&std::path::Path>, command: F) -> anyhow::Result<()>
where
    F: FnOnce(config::Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = config::Config::load(config)?;
    tokio::runtime::Runtime::new()?.block_on(command(config))
}
