//! `pictor generate`: one prompt to PNG files, with a progress bar.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pictor_core::{
    Control, Dimensions, Generation, GenerationRequest, ModelRules, Pipeline, Progress, RgbImage,
};
use pictor_image::{Format, Receipt};

use crate::{
    config::{Config, ModelConfig},
    load::{Loaded, load},
};

/// Arguments of `pictor generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model named in the configuration, a model folder, a transformer file, a Hugging
    /// Face repo id in the local cache (e.g. black-forest-labs/FLUX.1-schnell), or
    /// `pictor-tiny`, the model built in.
    #[arg(long, short = 'm', default_value = crate::shipped::NAME)]
    model: String,
    /// The prompt.
    #[arg(long, short = 'p', required_unless_present = "from_image")]
    prompt: Option<String>,
    /// Reproduce an image from the receipt in its own PNG, JPEG or WebP file (prompt, steps,
    /// seed, size, guidance, LoRAs by name and scale);
    /// `--model` must name the model that drew it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "size", "steps", "seed", "n", "guidance", "loras"])]
    from_image: Option<PathBuf>,
    /// Image size, WIDTHxHEIGHT, on the model's grid (multiples of 16 for FLUX); default the
    /// model's (1024x1024 for FLUX.1-schnell, 128x128 for pictor-tiny).
    #[arg(long)]
    size: Option<Dimensions>,
    /// Denoising steps; default the model's (4 for schnell, which is distilled for them;
    /// 28 for FLUX.1-dev).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale, for a model with a guidance input (FLUX.1-dev: default 3.5).
    #[arg(long)]
    guidance: Option<f64>,
    /// Seed of the first image; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of images.
    #[arg(short = 'n', long = "n", default_value_t = 1)]
    n: usize,
    /// Output file; with -n > 1, `out-0.png`, `out-1.png`, ...
    #[arg(long, short = 'o', default_value = "out.png")]
    output: PathBuf,
    /// Compute dtype: auto (f32 on CPU, bf16 on GPU), f32, bf16, f16; default the
    /// configuration's for a configured model, else auto.
    #[arg(long, value_parser = dtype)]
    dtype: Option<String>,
    /// Where to run: auto (the first CUDA GPU when there is one and this build has CUDA,
    /// else the CPU), cpu, cuda or cuda:N; default the configuration's, else auto.
    #[arg(long, value_parser = device)]
    device: Option<String>,
    /// Run on CUDA GPU number N: the same as --device cuda:N.
    #[arg(long, value_name = "N", conflicts_with = "device")]
    cuda: Option<usize>,
    /// Most images denoised together (default 4, or the configuration's).
    #[arg(long)]
    max_batch: Option<usize>,
    /// Add a LoRA from the LoRA folder (`lora_dir`, default `<data_dir>/loras`), as
    /// NAME or NAME:SCALE (default scale 1); may repeat.
    #[arg(long = "lora", value_name = "NAME[:SCALE]", value_parser = lora)]
    loras: Vec<pictor_core::LoraRequest>,
    /// Run from a quantized copy (q8_0, q6_k, q5_k, q4_k, ...) of the transformer and T5,
    /// made once into the data folder's cache when they are not GGUF already.
    #[arg(long, value_name = "TYPE")]
    quantize: Option<String>,
}

fn device(s: &str) -> Result<String, String> {
    s.parse::<pictor_engine::DeviceChoice>()
        .map(|_| s.to_string())
}

fn lora(s: &str) -> Result<pictor_core::LoraRequest, String> {
    let (name, scale) = match s.rsplit_once(':') {
        Some((name, scale)) => (
            name,
            scale
                .parse::<f64>()
                .map_err(|_| format!("`{scale}` is not a scale"))?,
        ),
        None => (s, 1.0),
    };
    Ok(pictor_core::LoraRequest {
        name: name.to_string(),
        scale,
    })
}

fn dtype(s: &str) -> Result<String, String> {
    s.parse::<pictor_engine::DTypeChoice>()
        .map(|_| s.to_string())
}

/// Where image `i` of `n` goes.
fn output_path(base: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return base.to_path_buf();
    }
    let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = base.extension().and_then(|s| s.to_str()).unwrap_or("png");
    base.with_file_name(format!("{stem}-{i}.{ext}"))
}

/// Writes the image with its receipt, in the format the file name asks for (`.jpg`/`.jpeg`
/// at quality 95, `.webp` lossless, PNG otherwise).
fn save(image: &RgbImage, receipt: &Receipt, path: &Path) -> anyhow::Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = match ext.as_deref() {
        Some("jpg" | "jpeg") => Format::Jpeg,
        Some("webp") => Format::Webp,
        _ => Format::Png,
    };
    let bytes = pictor_image::encode(image, format, 95, &receipt.to_parameters())?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The request: from the flags (the model's defaults where a flag is left out), or from an
/// image's own receipt.
fn request(args: &Args, rules: &ModelRules) -> anyhow::Result<GenerationRequest> {
    if let Some(file) = &args.from_image {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let r = Receipt::from_image(&bytes)
            .with_context(|| format!("reading the receipt in {}", file.display()))?;
        // The LoRAs by name and scale, from this server's LoRA folder.
        let loras = r
            .loras
            .into_iter()
            .map(|l| pictor_core::LoraRequest {
                name: l.name,
                scale: l.scale,
            })
            .collect();
        return Ok(GenerationRequest {
            loras,
            prompt: r.prompt,
            width: r.width,
            height: r.height,
            steps: r.steps,
            guidance: r.guidance,
            seed: r.seed,
            n: 1,
            previews: 0,
            edit: None,
        });
    }
    let size = args.size.unwrap_or(rules.default_size);
    let prompt = args.prompt.clone().unwrap_or_default();
    if let Some(problem) = pictor_core::prompt_problem(&prompt) {
        anyhow::bail!("--prompt holds {problem}");
    }
    Ok(GenerationRequest {
        loras: args.loras.clone(),
        prompt,
        width: size.width,
        height: size.height,
        steps: args.steps.unwrap_or(rules.default_steps),
        guidance: args.guidance.or(rules.default_guidance),
        seed: args.seed,
        n: args.n,
        previews: 0,
        edit: None,
    })
}

/// The model `args` names, with the flags given overriding its configured settings.
fn model(args: &Args, config: &Config) -> ModelConfig {
    let mut model = config.model(&args.model);
    model.dtype = args.dtype.clone().unwrap_or(model.dtype);
    model.max_batch = args.max_batch.unwrap_or(model.max_batch);
    if let Some(device) = args
        .device
        .clone()
        .or(args.cuda.map(|n| format!("cuda:{n}")))
    {
        (model.device, model.cuda) = (device, None);
    }
    model.quantize = args.quantize.clone().or(model.quantize);
    model
}

/// Generates `req` with a progress bar over its steps.
fn render(pipeline: &mut dyn Pipeline, req: &GenerationRequest) -> anyhow::Result<Generation> {
    let bar = ProgressBar::new((req.steps * req.n) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:10} [{bar:30}] {pos}/{len} steps, {elapsed} ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let generation = pipeline.generate(req, &mut |p| {
        match p {
            Progress::Encoding => bar.set_message("encoding"),
            Progress::Step { step, first, .. } => {
                bar.set_message("denoising");
                bar.set_position((first * req.steps + step) as u64);
            }
            Progress::Decoding => bar.set_message("decoding"),
            // None are asked for.
            Progress::Preview { .. } => {}
        }
        Control::Continue
    });
    bar.finish_and_clear();
    Ok(generation?)
}

/// Runs `pictor generate`.
pub fn run(args: Args, config: &Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let Loaded {
        mut pipeline,
        rules,
        ..
    } = load(&args.model, &model(&args, config), config)?;
    let loaded = started.elapsed().as_secs_f64();
    eprintln!(
        "loaded {} in {loaded:.2}s on {}",
        args.model,
        pipeline.device().unwrap_or_default()
    );

    let req = request(&args, &rules)?;
    // On the command line any size and steps the network can run are allowed, not only
    // the ranges a server offers.
    rules.without_serving_limits().check(&req)?;
    let generation = render(pipeline.as_mut(), &req)?;
    for (i, image) in generation.images.iter().enumerate() {
        let path = output_path(&args.output, i, req.n);
        let receipt = Receipt::new(&req, &generation, i, &args.model, None);
        save(image, &receipt, &path)?;
        println!(
            "wrote {} ({}x{}, seed {})",
            path.display(),
            image.width,
            image.height,
            receipt.seed
        );
    }
    let prompt = &generation.prompt;
    if prompt.truncated || prompt.pooled_truncated {
        println!(
            "prompt truncated (T5: {}, CLIP: {}); encoded: {:?}",
            prompt.truncated, prompt.pooled_truncated, prompt.encoded
        );
    }
    let [encode, denoise, decode] = [
        generation.phases.encode,
        generation.phases.denoise,
        generation.phases.decode,
    ]
    .map(|d| d.as_secs_f64());
    println!(
        "{} image(s) of {}x{}, {} steps: encode {encode:.3}s, denoise {denoise:.3}s ({:.4}s per step per image), decode {decode:.3}s, load {loaded:.2}s",
        req.n,
        req.width,
        req.height,
        req.steps,
        denoise / (req.steps * req.n) as f64,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_numbered_only_for_several_images() {
        assert_eq!(
            output_path(Path::new("a/out.png"), 0, 1),
            PathBuf::from("a/out.png")
        );
        assert_eq!(
            output_path(Path::new("a/out.png"), 1, 2),
            PathBuf::from("a/out-1.png")
        );
    }
}
