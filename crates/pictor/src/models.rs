//! `pictor models inspect` and `pictor quantize`: what model files hold, and making a
//! small GGUF copy of a transformer or T5 encoder once (`pictor models pull` is `pull`,
//! `pictor models list` is `model_list`).

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use pictor_engine::{
    ModelFiles, Part, flux,
    inspect::{human_bytes, human_count, inspect_file},
    quantize::{Component, Target, quantize},
    text,
};

/// `pictor models ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Print what Pictor sees in weight files or a model: parts, tensor naming, storage
    /// types, parameters, bytes on disk and in memory, and what is missing.
    Inspect {
        /// Weight files (.safetensors, .gguf), model folders or Hugging Face repo ids.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Download a model from the Hugging Face Hub into its standard cache (resumed,
    /// checked by size and hash), then print the configuration lines that serve it.
    Pull(crate::pull::PullArgs),
    /// List the configured models (complete or not, size on disk), the LoRAs, and the
    /// Hugging Face cache's repositories with the models that use them.
    List,
}

/// Arguments of `pictor quantize`.
#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    /// A transformer or T5 file (safetensors in any layout, fp8, bf16, or GGUF), a bundled
    /// checkpoint, or a model folder; for Z-Image, its transformer file or its folder.
    input: String,
    /// q8_0 (near lossless), q6_k, q5_k, q4_k (smallest that keeps quality), q5_0, q4_0, f16.
    #[arg(long, value_parser = |s: &str| s.parse::<Target>())]
    to: Target,
    /// Which network: transformer or t5 (default: the file's main part; the transformer
    /// for a model folder or bundle).
    #[arg(long, value_parser = parse_component)]
    part: Option<Component>,
    /// Output file (default: `<input name>-<TYPE>.gguf` in the current folder).
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
}

fn parse_component(s: &str) -> Result<Component, String> {
    match s {
        "transformer" => Ok(Component::Transformer),
        "t5" => Ok(Component::T5),
        other => Err(format!("unknown part `{other}`: use transformer or t5")),
    }
}

/// Runs `pictor models ...`.
pub fn run(command: ModelsCommand, config: Option<&Path>) -> anyhow::Result<()> {
    match command {
        ModelsCommand::Pull(args) => crate::pull::run(args, config),
        ModelsCommand::List => crate::model_list::run(&crate::config::Config::load(config)?),
        ModelsCommand::Inspect { paths } => {
            for path in paths {
                inspect(&path)?;
            }
            Ok(())
        }
    }
}

/// A Z-Image model: the family, its layout, the transformer's architecture, the files.
fn inspect_zimage(spec: &str, files: &pictor_engine::zimage::ZImageFiles) -> anyhow::Result<()> {
    let cfg = files.transformer_config()?;
    println!("{spec}: Z-Image-Turbo ({})", files.layout);
    println!(
        "  transformer: width {}, {} main blocks and {} refiner blocks each for the image and \
         the caption, {} heads, RoPE axes {:?}, {}-wide caption features, {} latent channels",
        cfg.dim,
        cfg.n_layers,
        cfg.n_refiner_layers,
        cfg.n_heads,
        cfg.axes_dims,
        cfg.cap_feat_dim,
        cfg.in_channels
    );
    let mut total = 0;
    for file in files.weight_files() {
        let bytes = std::fs::metadata(&file)?.len();
        total += bytes;
        println!("  {} ({})", file.display(), human_bytes(bytes));
    }
    match &files.tokenizer {
        Some(t) => println!("  tokenizer: {}", t.display()),
        None => println!("  tokenizer: Qwen's, built into Pictor"),
    }
    println!(
        "{spec}: a complete Z-Image-Turbo model, {} on disk (served on the CPU)",
        human_bytes(total)
    );
    Ok(())
}

fn inspect(spec: &str) -> anyhow::Result<()> {
    let path = Path::new(spec);
    if let Some(files) = pictor_engine::zimage::ZImageFiles::find_spec(spec)? {
        return inspect_zimage(spec, &files);
    }
    if path.is_file() {
        print!("{}", inspect_file(path)?);
    }
    let survey = match ModelFiles::survey(spec) {
        Ok(survey) => survey,
        Err(e) if path.is_file() => {
            println!("  as a model: {e}");
            return Ok(());
        }
        Err(e) => bail!("{spec}: {e}"),
    };
    println!("{spec}:");
    let parts = survey.parts();
    let mut missing = Vec::new();
    for (label, part) in parts {
        let part = match part {
            Ok(part) => part,
            Err(e) => {
                println!("  {label}: missing ({e})");
                missing.push(label);
                continue;
            }
        };
        let names: Vec<String> = part.files.iter().map(|f| f.display().to_string()).collect();
        let config = part
            .config
            .as_ref()
            .map_or(String::new(), |c| format!(" (config {})", c.display()));
        println!("  {label}: {}{config}", names.join(", "));
        println!("    {}", describe(label, part));
    }
    let tokenizer = |t: &Option<PathBuf>| {
        t.as_ref()
            .map_or("FLUX.1's own, built in".to_string(), |p| {
                p.display().to_string()
            })
    };
    println!(
        "  tokenizers: {} / {}",
        tokenizer(&survey.clip_tokenizer),
        tokenizer(&survey.t5_tokenizer)
    );
    if !path.is_file() {
        let mut seen = Vec::new();
        for part in parts.iter().filter_map(|(_, p)| p.as_ref().ok()) {
            for f in &part.files {
                if !seen.contains(f) {
                    print!("{}", inspect_file(f)?);
                    seen.push(f.clone());
                }
            }
        }
    }
    // The check `pictor serve` makes before loading, so both say the same.
    if !missing.is_empty() {
        println!(
            "{spec}: incomplete, not a model pictor serve can load: no {}",
            missing.join(", no ")
        );
        return Ok(());
    }
    match survey.into_files().and_then(|files| flux::validate(&files)) {
        Ok(_) => println!("{spec}: a complete FLUX model"),
        Err(e) => println!("{spec}: every part is present, but it cannot load: {e}"),
    }
    Ok(())
}

/// One part's architecture, or why it cannot be read.
fn describe(label: &str, part: &Part) -> String {
    let described = match label {
        "transformer" => flux::transformer::arch_of(part).map(|a| a.to_string()),
        "autoencoder" => flux::vae::arch_of(part).map(|a| a.to_string()),
        "CLIP" => text::clip_width(part).map(|w| format!("{w}-wide pooled vector out")),
        _ => text::t5_width(part).map(|w| format!("{w}-wide token embeddings out")),
    };
    described.unwrap_or_else(|e| format!("cannot be read: {e}"))
}

/// Runs `pictor quantize`.
pub fn quantize_command(args: QuantizeArgs) -> anyhow::Result<()> {
    let path = Path::new(&args.input);
    // Z-Image has one network to quantize, its transformer.
    let zimage = match args.part {
        Some(Component::T5) => None,
        _ => pictor_engine::zimage::ZImageFiles::find_spec(&args.input)?,
    };
    let (part, component) = if let Some(files) = zimage {
        (files.transformer, Component::ZImageTransformer)
    } else if path.is_file() {
        let info = inspect_file(path)?;
        let main = info.parts.first().map(|p| p.kind);
        let component = match (args.part, main) {
            (Some(c), _) => c,
            (None, Some("T5 encoder")) => Component::T5,
            (None, Some("FLUX transformer")) => Component::Transformer,
            (None, other) => bail!(
                "{}: holds {}, which cannot be quantized; pass a transformer or T5 file",
                path.display(),
                other.unwrap_or("no known part")
            ),
        };
        (Part::from_file(path)?, component)
    } else {
        let files = ModelFiles::resolve(&args.input)?;
        match args.part.unwrap_or(Component::Transformer) {
            Component::Transformer => (files.transformer, Component::Transformer),
            Component::T5 => (files.t5, Component::T5),
            Component::ZImageTransformer => {
                bail!("{}: no Z-Image transformer here", path.display())
            }
        }
    };
    let output = args.output.unwrap_or_else(|| {
        let stem = path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        let suffix = match component {
            Component::Transformer | Component::ZImageTransformer => "",
            Component::T5 => "-t5",
        };
        PathBuf::from(format!("{stem}{suffix}-{}.gguf", args.to.label()))
    });
    if output.exists() {
        bail!(
            "{} exists; remove it or name another with -o",
            output.display()
        );
    }
    let started = Instant::now();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {wide_msg}")
            .context("progress style")?,
    );
    let partial = output.with_extension("gguf.partial");
    let summary = quantize(&part, component, args.to, &partial, |i, n, name| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        bar.set_message(name.to_string());
    });
    bar.finish_and_clear();
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.into());
        }
    };
    std::fs::rename(&partial, &output)
        .with_context(|| format!("moving {} into place", partial.display()))?;
    let types: Vec<String> = summary
        .by_type
        .iter()
        .map(|(t, (n, bytes))| format!("{t}: {n} tensors, {}", human_bytes(*bytes)))
        .collect();
    println!(
        "wrote {}: {} tensors, {} parameters, {} in {:.1} s ({})",
        output.display(),
        summary.tensors,
        human_count(summary.parameters),
        human_bytes(summary.bytes),
        started.elapsed().as_secs_f64(),
        types.join("; ")
    );
    Ok(())
}
