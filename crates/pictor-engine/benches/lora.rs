//! What a LoRA costs per step: one transformer evaluation of the full-width benchmark model
//! (FLUX.1's 3072 width, 2 double + 4 single blocks, random weights; `bench/make_fullwidth.py`)
//! at 512×512 (1024 image + 256 text tokens), without a LoRA and with a random kohya LoRA
//! of rank 16 and 64 on every linear layer of the blocks, side by side in one run. Prints
//! medians and the ratio to no LoRA.
//!
//! Run: `cargo bench -p pictor-engine --bench lora` (model folder from
//! `PICTOR_BENCH_FULLWIDTH`, default `~/.cache/pictor/bench/flux-fullwidth-2d4s-t5x2`;
//! `PICTOR_BENCH_DTYPE=bf16` for bf16 weights).

use std::{collections::HashMap, path::PathBuf, time::Instant};

use candle_core::{Device, Tensor};
use pictor_engine::{
    DTypeChoice, LoraRequest, ModelFiles, PromptInfo,
    flux::{FluxOptions, FluxPipeline, sampling},
    text::Embeddings,
};

const RUNS: usize = 3;
const H: usize = 3072;
const MLP: usize = 4 * H;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Every linear layer of 2 double and 4 single full-width blocks, `(name, out, in)`.
fn layers() -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for i in 0..2 {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            out.push((format!("{p}_attn.qkv"), 3 * H, H));
            out.push((format!("{p}_attn.proj"), H, H));
            out.push((format!("{p}_mlp.0"), MLP, H));
            out.push((format!("{p}_mlp.2"), H, MLP));
            out.push((format!("{p}_mod.lin"), 6 * H, H));
        }
    }
    for i in 0..4 {
        let p = format!("single_blocks.{i}");
        out.push((format!("{p}.linear1"), 3 * H + MLP, H));
        out.push((format!("{p}.linear2"), H, H + MLP));
        out.push((format!("{p}.modulation.lin"), 3 * H, H));
    }
    out
}

/// A random kohya-named LoRA of `rank` on every layer.
fn write_lora(path: &std::path::Path, rank: usize) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut tensors = HashMap::new();
    for (name, out, inp) in layers() {
        let key = format!("lora_unet_{}", name.replace('.', "_"));
        tensors.insert(
            format!("{key}.lora_down.weight"),
            Tensor::randn(0f32, 0.02, (rank, inp), &dev)?,
        );
        tensors.insert(
            format!("{key}.lora_up.weight"),
            Tensor::randn(0f32, 0.02, (out, rank), &dev)?,
        );
        tensors.insert(format!("{key}.alpha"), Tensor::new(rank as f32, &dev)?);
    }
    candle_core::safetensors::save(&tensors, path)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let folder = std::env::var_os("PICTOR_BENCH_FULLWIDTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/pictor/bench/flux-fullwidth-2d4s-t5x2")
        });
    if !folder.is_dir() {
        eprintln!(
            "{} is missing: make it with `python bench/make_fullwidth.py`",
            folder.display()
        );
        return Ok(());
    }
    let dtype: DTypeChoice = std::env::var("PICTOR_BENCH_DTYPE")
        .unwrap_or_else(|_| "f32".into())
        .parse()
        .map_err(|e: String| e)?;
    let loras = tempfile::tempdir()?;
    for rank in [16, 64] {
        write_lora(&loras.path().join(format!("rank{rank}.safetensors")), rank)?;
    }
    let options = FluxOptions {
        dtype,
        lora_dir: Some(loras.path().to_path_buf()),
        ..FluxOptions::default()
    };
    let p = FluxPipeline::load(&ModelFiles::from_dir(&folder)?, options)?;
    let dev = Device::Cpu;
    let emb = Embeddings {
        sequence: Tensor::randn(0f32, 1.0, (1, 256, 4096), &dev)?,
        pooled: Tensor::randn(0f32, 1.0, (1, 768), &dev)?,
        prompt: PromptInfo {
            encoded: String::new(),
            truncated: false,
            pooled_truncated: false,
            tokens: 0,
        },
    };
    let noise = sampling::pack(&Tensor::randn(0f32, 1.0, (1, 16, 64, 64), &dev)?)?;
    println!(
        "threads: {}, dtype {dtype:?}",
        candle_core::utils::get_num_threads()
    );
    let mut base = None;
    for lora in [None, Some(16), Some(64)] {
        let applied = match lora {
            Some(rank) => Some(p.attach_loras(p.prepare_loras(&[LoraRequest {
                name: format!("rank{rank}"),
                scale: 1.0,
            }])?)?),
            None => None,
        };
        p.denoiser().velocity(&noise, &emb, 1.0, None, (64, 64))?; // warm-up
        let mut times = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            p.denoiser().velocity(&noise, &emb, 1.0, None, (64, 64))?;
            times.push(t.elapsed().as_secs_f64());
        }
        drop(applied);
        let m = median(times);
        let ratio = base.map(|b: f64| m / b).unwrap_or(1.0);
        base.get_or_insert(m);
        let label = lora.map_or("no LoRA".to_string(), |r| {
            format!("rank {r} on all {} layers", layers().len())
        });
        println!("{label:28} {m:8.3} s  ({ratio:.3}x)");
    }
    Ok(())
}
