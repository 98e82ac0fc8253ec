//! `pictor generate`: one prompt to PNG files, with a progress bar.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use pictor_api::{encode::Format, receipt::Receipt};
use pictor_engine::{
    Control, DTypeChoice, DeviceChoice, GenerationRequest, ModelFiles, Pipeline, Progress,
    RgbImage,
    flux::{FluxOptions, FluxPipeline},
};

/// Arguments of `pictor generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model folder, a transformer file, a Hugging Face repo id in the local cache
    /// (e.g. black-forest-labs/FLUX.1-schnell), or `pictor-tiny`, the model built in.
    #[arg(long, short = 'm', default_value = crate::shipped::NAME)]
    model: String,
    /// The prompt.
    #[arg(long, short = 'p', required_unless_present = "from_image")]
    prompt: Option<String>,
    /// Reproduce an image from the receipt in its own PNG, JPEG or WebP file (prompt, steps,
    /// seed, size);
    /// `--model` must name the model that drew it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "size", "steps", "seed", "n"])]
    from_image: Option<PathBuf>,
    /// Image size, WIDTHxHEIGHT, multiples of 16 (default 512x512; 128x128 for pictor-tiny,
    /// its native size).
    #[arg(long, value_parser = parse_size)]
    size: Option<(usize, usize)>,
    /// Denoising steps (schnell is distilled for 4).
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Seed of the first image; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of images.
    #[arg(short = 'n', long = "n", default_value_t = 1)]
    n: usize,
    /// Output file; with -n > 1, `out-0.png`, `out-1.png`, ...
    #[arg(long, short = 'o', default_value = "out.png")]
    output: PathBuf,
    /// Compute dtype: auto (f32 on CPU, bf16 on GPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: DTypeChoice,
    /// Run on CUDA GPU number N (needs a build with --features cuda).
    #[arg(long, value_name = "N")]
    cuda: Option<usize>,
    /// Most images denoised together.
    #[arg(long, default_value_t = 4)]
    max_batch: usize,
    /// Run from a quantized copy (q8_0, q6_k, q5_k, q4_k, ...) of the transformer and T5,
    /// made once into the data folder's cache when they are not GGUF already.
    #[arg(long, value_name = "TYPE")]
    quantize: Option<String>,
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{s}` is not WIDTHxHEIGHT"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{s}` is not WIDTHxHEIGHT"))
    };
    Ok((parse(w)?, parse(h)?))
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
    let bytes = pictor_api::encode::encode(image, format, 95, &receipt.to_parameters())?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The request: from the flags, or from an image's own receipt.
fn request(args: &Args) -> anyhow::Result<GenerationRequest> {
    if let Some(file) = &args.from_image {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let r = Receipt::from_image(&bytes)
            .with_context(|| format!("reading the receipt in {}", file.display()))?;
        return Ok(GenerationRequest {
            prompt: r.prompt,
            width: r.width,
            height: r.height,
            steps: r.steps,
            seed: r.seed,
            n: 1,
            previews: 0,
        });
    }
    let native = if args.model == crate::shipped::NAME {
        crate::shipped::NATIVE_SIZE
    } else {
        (512, 512)
    };
    let size = args.size.unwrap_or(native);
    Ok(GenerationRequest {
        prompt: args.prompt.clone().unwrap_or_default(),
        width: size.0,
        height: size.1,
        steps: args.steps,
        seed: args.seed,
        n: args.n,
        previews: 0,
    })
}

/// Runs `pictor generate`.
pub fn run(args: Args, config: &crate::config::Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.as_path();
    if args.n == 0 {
        bail!("-n must be at least 1");
    }
    let n = if args.from_image.is_some() { 1 } else { args.n };
    let started = Instant::now();
    let mut files = ModelFiles::resolve(&crate::shipped::locate(&args.model, data_dir)?)?;
    if let Some(target) = &args.quantize {
        crate::quantized::apply(&mut files, target, data_dir)?;
    }
    let options = FluxOptions {
        device: args.cuda.map_or(DeviceChoice::Cpu, DeviceChoice::Cuda),
        dtype: args.dtype,
        max_batch: args.max_batch,
        memory_budget: config.memory_budget()?,
        ..FluxOptions::default()
    };
    let mut pipeline = FluxPipeline::load(&files, options)?;
    let loaded = started.elapsed();
    eprintln!(
        "loaded {} in {:.2}s ({:?})",
        args.model,
        loaded.as_secs_f64(),
        pipeline.dtype()
    );

    let req = request(&args)?;
    pipeline.check(&req)?;
    let bar = ProgressBar::new((req.steps * n) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:10} [{bar:30}] {pos}/{len} steps, {elapsed} ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    // Seconds per phase: the time between two progress events belongs to the phase the
    // earlier event opened (encode, denoise, decode).
    let mut phases = [0f64; 3];
    let mut phase = 0;
    let mut last = Instant::now();
    let generation = pipeline.generate(&req, &mut |p| {
        phases[phase] += last.elapsed().as_secs_f64();
        last = Instant::now();
        match p {
            Progress::Encoding => {
                phase = 0;
                bar.set_message("encoding");
            }
            Progress::Step { step, first, .. } => {
                phase = 1;
                bar.set_message("denoising");
                bar.set_position((first * req.steps + step) as u64);
            }
            Progress::Decoding => {
                phase = 2;
                bar.set_message("decoding");
            }
            // None are asked for.
            Progress::Preview { .. } => {}
        }
        Control::Continue
    })?;
    phases[phase] += last.elapsed().as_secs_f64();
    bar.finish_and_clear();

    for (i, image) in generation.images.iter().enumerate() {
        let path = output_path(&args.output, i, n);
        let receipt = Receipt {
            prompt: generation.prompt.encoded.clone(),
            steps: req.steps,
            seed: req.seed.wrapping_add(i as u64),
            width: image.width,
            height: image.height,
            model: args.model.clone(),
            model_hash: None,
        };
        save(image, &receipt, &path)?;
        println!(
            "wrote {} ({}x{}, seed {})",
            path.display(),
            image.width,
            image.height,
            receipt.seed
        );
    }
    if generation.prompt.truncated || generation.prompt.pooled_truncated {
        println!(
            "prompt truncated (T5: {}, CLIP: {}); encoded: {:?}",
            generation.prompt.truncated,
            generation.prompt.pooled_truncated,
            generation.prompt.encoded
        );
    }
    let [encode, denoise, decode] = phases;
    println!(
        "{} image(s) of {}x{}, {} steps: encode {encode:.3}s, denoise {denoise:.3}s ({:.4}s per step per image), decode {decode:.3}s, load {:.2}s",
        n,
        req.width,
        req.height,
        req.steps,
        denoise / (req.steps * n) as f64,
        loaded.as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_reject() {
        assert_eq!(parse_size("512x768"), Ok((512, 768)));
        assert!(parse_size("512").is_err());
        assert!(parse_size("ax5").is_err());
    }

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
