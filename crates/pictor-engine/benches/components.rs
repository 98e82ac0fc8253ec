//! Times one FLUX component from a model folder, for side-by-side runs against diffusers
//! (`bench/engine.py` drives it; `bench/diffusers_part.py` is the PyTorch twin).
//!
//! ```sh
//! cargo bench -p pictor-engine --bench components -- \
//!     --model DIR --part transformer|t5|clip|vae|matmul --size 512 --reps 3 --dtype f32|bf16 \
//!     [--attention blocks|whole|flash]   (transformer: scores in 256 MB query blocks, the
//!                                         default; all at once; candle-nn's flash kernel)
//! cargo bench -p pictor-engine --bench components -- --part linear --shape M,K,N \
//!     --dtype f32|bf16 [--kernel pictor|candle]   (x·Wᵀ, x (M, K) f32 into Pictor's
//!                                         kernel, or both in --dtype into candle's)
//! cargo bench -p pictor-engine --bench components -- --part gelu --kernel pictor|candle \
//!     --size 512                         (the MLP activation of one full-width block:
//!                                         (size/16)² + 256 tokens × 12288, f32)
//! ```
//!
//! Prints one JSON line: the part, the settings, every timed run (after one warm-up), the
//! median, the load time and memory: resident once loaded (`VmRSS`), the peak while loading
//! and the peak while running (`VmHWM`, reset in between), and the process's peak; and the
//! bytes allocated once loaded and at their peak while running, which RSS exceeds by the
//! heap's fragmentation.
//! The inputs are fixed-size, as in the pipeline: T5 sees 256 tokens, CLIP 77, the
//! transformer `(size/16)²` image tokens plus 256 text tokens at sigma 1, and the decoder
//! the latents of one `size`² image.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use candle_core::{DType, Device, Tensor};
use pictor_engine::{
    ModelFiles,
    flux::{AttentionKernel, sampling, transformer::Transformer, vae::Vae},
    text::{ClipEncoder, Embeddings, T5Encoder},
};

/// The system allocator, counting the bytes live and their peak, so that a run's peak of
/// live tensors can be told apart from the heap's fragmentation in its peak RSS.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to `System` unchanged; only the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A `/proc/self/status` memory line (`VmHWM`, `VmRSS`) in bytes.
fn status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Starts `VmHWM` again from the current resident size (Linux ≥ 4.0; ignored elsewhere).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args: HashMap<String, String> = HashMap::new();
    let raw: Vec<String> = std::env::args().skip(1).collect();
    for pair in raw.windows(2) {
        if let Some(key) = pair[0].strip_prefix("--") {
            args.insert(key.to_string(), pair[1].clone());
        }
    }
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    // As `pictor` does, unless `--heap default` asks for glibc's own settings.
    let heap = get("heap", "keep");
    if heap == "keep" {
        pictor_engine::heap::keep_freed_memory();
    }
    let part = get("part", "matmul");
    let size: usize = get("size", "512").parse()?;
    let reps: usize = get("reps", "3").parse()?;
    let dtype = match get("dtype", "f32").as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let attention = get("attention", "fused");
    pictor_engine::flux::set_attention_kernel(match attention.as_str() {
        "whole" => AttentionKernel::Blocks(usize::MAX),
        "blocks" => AttentionKernel::Blocks(1 << 26),
        "flash" => AttentionKernel::CandleFlash,
        _ => AttentionKernel::Fused,
    });
    let dev = Device::Cpu;
    let started = Instant::now();
    // Each arm loads its part, then returns the closure to time.
    let mut run: Box<dyn FnMut() -> anyhow::Result<()>> = match part.as_str() {
        "matmul" => {
            let n = size;
            let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(dtype)?;
            Box::new(move || {
                a.matmul(&b)?;
                Ok(())
            })
        }
        "linear" => {
            // x·Wᵀ as the transformer's layers run it: `--shape m,k,n`, W stored (n, k).
            let dims: Vec<usize> = get("shape", "1280,3072,3072")
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            anyhow::ensure!(dims.len() == 3, "--shape wants m,k,n");
            // `--kernel pictor`: f32 activations through Pictor's kernel, the weight in
            // `--dtype` (bf16: native bf16 products where the CPU has them, unless
            // PICTOR_CPU_BF16=off); otherwise candle's matmul with both in `--dtype`.
            let x = Tensor::randn(0f32, 1.0, (1, dims[0], dims[1]), &dev)?;
            let w = Tensor::randn(0f32, 0.02, (dims[2], dims[1]), &dev)?.to_dtype(dtype)?;
            if get("kernel", "candle") == "pictor" {
                Box::new(move || {
                    pictor_engine::ops::linear(&[&x], &w, None)?;
                    Ok(())
                })
            } else {
                let x = x.to_dtype(dtype)?;
                let mm = candle_core::quantized::QMatMul::Tensor(w);
                Box::new(move || {
                    x.apply(&mm)?;
                    Ok(())
                })
            }
        }
        "zimage" => {
            // Z-Image's transformer from `--model`'s diffusers folder, in `--dtype` (f32 by
            // default): one forward at `--size` with a 128-token caption (the twin of
            // diffusers_part.py's).
            use pictor_engine::zimage::transformer::Transformer;
            let dir = std::path::Path::new(&get("model", "")).join("transformer");
            let part = pictor_engine::Part::folder(&dir)?;
            let (net, cfg) = Transformer::open(&part, dtype, &dev)?;
            let x = Tensor::randn(0f32, 1.0, (cfg.in_channels, 1, size / 8, size / 8), &dev)?;
            let cap = Tensor::randn(0f32, 1.0, (128, cfg.cap_feat_dim), &dev)?;
            Box::new(move || {
                net.forward(&x, 0.5, &cap)?;
                Ok(())
            })
        }
        "attention" => {
            // One single block's attention at `--size`: q/k/v of 24 heads of 128 from a
            // (1, tokens, 3·3072) projection, with FLUX's rotary table. The kernel normalises
            // q and k in place, so each run after the first normalises normalised values:
            // the same work.
            use pictor_engine::ops::{QkvPart, flux_attention};
            let tokens = (size / 16).pow(2) + 256;
            let qkv = Tensor::randn(0f32, 1.0, (1, tokens, 3 * 3072), &dev)?;
            let angles = Tensor::randn(0f32, 1.0, (1, 1, tokens, 64, 1, 1), &dev)?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            let pe = Tensor::cat(&[&cos, &sin.neg()?, &sin, &cos], 4)?
                .reshape((1, 1, tokens, 64, 2, 2))?;
            let scale = Tensor::ones(128, DType::F32, &dev)?;
            Box::new(move || {
                let part = QkvPart {
                    qkv: &qkv,
                    q_scale: &scale,
                    k_scale: &scale,
                };
                flux_attention(&[part], 24, 1e-6, &pe)?;
                Ok(())
            })
        }
        "gelu" => {
            let x = Tensor::randn(0f32, 1.0, ((size / 16).pow(2) + 256, 12_288), &dev)?;
            let candle = get("kernel", "pictor") == "candle";
            Box::new(move || {
                if candle {
                    x.gelu()?;
                } else {
                    pictor_engine::ops::gelu(&x)?;
                }
                Ok(())
            })
        }
        "qmatmul" => {
            // One 1280×3072 by 3072×3072 product with quantized weights, through candle's
            // QMatMul (repacked tiles on VNNI CPUs) or its plain row kernel.
            use candle_core::quantized::{GgmlDType, QMatMul, QTensor, k_quants};
            let (m, k, n) = (1280, 3072, 3072);
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let quant = get("quant", "q4_k");
            let kernel = get("kernel", "tiles");
            let ggml = match quant.as_str() {
                "q8_0" => GgmlDType::Q8_0,
                "q4_0" => GgmlDType::Q4_0,
                "q5_0" => GgmlDType::Q5_0,
                _ => GgmlDType::Q4K,
            };
            if kernel == "tiles" {
                let mm = QMatMul::from_qtensor(QTensor::quantize(&w, ggml)?)?;
                Box::new(move || {
                    x.apply(&mm)?;
                    Ok(())
                })
            } else {
                fn direct<T: k_quants::GgmlType + 'static>(
                    w: &Tensor,
                    x: &Tensor,
                    (m, k, n): (usize, usize, usize),
                ) -> anyhow::Result<Box<dyn FnMut() -> anyhow::Result<()>>> {
                    let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
                    let mut blocks = vec![T::zeros(); n * k / T::BLCK_SIZE];
                    T::from_float(&wv, &mut blocks);
                    let lhs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                    Ok(Box::new(move || {
                        let mut dst = vec![0f32; m * n];
                        k_quants::matmul((m, k, n), &lhs, &blocks, &mut dst)?;
                        Ok(())
                    }))
                }
                match ggml {
                    GgmlDType::Q8_0 => direct::<k_quants::BlockQ8_0>(&w, &x, (m, k, n))?,
                    GgmlDType::Q4_0 => direct::<k_quants::BlockQ4_0>(&w, &x, (m, k, n))?,
                    GgmlDType::Q5_0 => direct::<k_quants::BlockQ5_0>(&w, &x, (m, k, n))?,
                    _ => direct::<k_quants::BlockQ4K>(&w, &x, (m, k, n))?,
                }
            }
        }
        _ => {
            let model = get("model", "");
            anyhow::ensure!(!model.is_empty(), "--model DIR is needed for --part {part}");
            let files = ModelFiles::resolve(&model)?;
            match part.as_str() {
                "transformer" => {
                    let t = Transformer::load(&files.transformer, dtype, &dev)?;
                    let cfg = t.config().clone();
                    let (h, w) = sampling::latent_dims(size, size);
                    let img =
                        Tensor::randn(0f32, 1.0, (1, (h / 2) * (w / 2), cfg.in_channels), &dev)?;
                    let emb = Embeddings {
                        sequence: Tensor::randn(0f32, 1.0, (1, 256, cfg.context_in_dim), &dev)?,
                        pooled: Tensor::randn(0f32, 1.0, (1, cfg.vec_in_dim), &dev)?,
                        prompt: Default::default(),
                    };
                    // FLUX.1-dev's guidance embedding runs at its default scale.
                    let guidance = cfg.guidance_embed.then_some(3.5);
                    Box::new(move || {
                        t.velocity(&img, &emb, 1.0, guidance, (h, w))?;
                        Ok(())
                    })
                }
                "t5" => {
                    let t5 = T5Encoder::load(&files.t5, dtype, &dev)?;
                    let ids: Vec<u32> = (0..256u32).map(|i| 3 + i % 500).collect();
                    Box::new(move || {
                        t5.hidden(&ids)?;
                        Ok(())
                    })
                }
                "clip" => {
                    let clip = ClipEncoder::load(&files.clip, dtype, &dev)?;
                    let n = clip.max_positions();
                    let ids: Vec<u32> = (0..n as u32).map(|i| 3 + i % 500).collect();
                    Box::new(move || {
                        clip.pooled(&ids)?;
                        Ok(())
                    })
                }
                "vae" => {
                    let vae = Vae::load(&files.vae, dtype, &dev)?;
                    let (h, w) = sampling::latent_dims(size, size);
                    let packed = Tensor::randn(0f32, 1.0, (1, (h / 2) * (w / 2), 64), &dev)?;
                    Box::new(move || {
                        vae.decode(&packed, size, size)?;
                        Ok(())
                    })
                }
                other => anyhow::bail!("unknown part {other}"),
            }
        }
    };
    let load = started.elapsed().as_secs_f64();
    let loaded_rss = status_bytes("VmRSS");
    let load_peak = status_bytes("VmHWM");
    reset_peak_rss();
    let loaded_heap = LIVE.load(Ordering::Relaxed);
    PEAK.store(loaded_heap, Ordering::Relaxed);
    run()?; // warm-up
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let out = serde_json::json!({
        "engine": "pictor",
        "part": part,
        "attention": attention,
        "heap": heap,
        "size": size,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "threads": rayon::current_num_threads(),
        "times": times,
        "median": median(times.clone()),
        "load_seconds": load,
        "loaded_rss_bytes": loaded_rss,
        "load_peak_rss_bytes": load_peak,
        "run_peak_rss_bytes": status_bytes("VmHWM"),
        "loaded_heap_bytes": loaded_heap,
        "run_peak_heap_bytes": PEAK.load(Ordering::Relaxed),
        "peak_rss_bytes": load_peak.max(status_bytes("VmHWM")),
    });
    println!("{out}");
    Ok(())
}
