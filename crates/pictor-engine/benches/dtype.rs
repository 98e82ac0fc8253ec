//! Which compute dtype to use on this machine: times one full-width FLUX.1 transformer
//! (hidden 3072, 24 heads; 1 double + 1 single block, random weights) at 512×512
//! (1024 image + 256 text tokens) in f32, bf16 and f16, and a 3072-wide matmul of the same
//! token count, and prints medians and achieved GFLOP/s. `DTypeChoice::Auto` follows it.
//!
//! Run: `cargo bench -p pictor-engine --bench dtype` (set RAYON_NUM_THREADS to pin threads).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::flux::{WithForward, model};

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut() -> candle_core::Result<()>>(mut f: F) -> candle_core::Result<f64> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (img_tokens, txt_tokens) = (1024usize, 256usize);
    let l = (img_tokens + txt_tokens) as f64;
    let d = 3072f64;
    // 24·L·D² for the linears of one double block (both streams) and of one single block,
    // plus 4·L²·D for each joint attention (research/engine-flux-candle.md §5.1).
    let block_flops = 24.0 * l * d * d + 4.0 * l * l * d;
    let matmul_flops = 2.0 * l * d * d;
    println!("threads: {}", candle_core::utils::get_num_threads());
    println!(
        "{:6} {:>14} {:>10} {:>18} {:>10}",
        "dtype", "matmul (s)", "GFLOP/s", "1+1 blocks (s)", "GFLOP/s"
    );
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let a = Tensor::randn(0f32, 1.0, (img_tokens + txt_tokens, 3072), &dev)?.to_dtype(dtype)?;
        let w = Tensor::randn(0f32, 0.02, (3072, 3072), &dev)?.to_dtype(dtype)?;
        let mm = time(|| a.matmul(&w.t()?).map(|_| ()))?;

        let cfg = model::Config {
            depth: 1,
            depth_single_blocks: 1,
            ..model::Config::schnell()
        };
        let varmap = VarMap::new();
        let flux = model::Flux::new(&cfg, VarBuilder::from_varmap(&varmap, dtype, &dev))?;
        let img = Tensor::randn(0f32, 1.0, (1, img_tokens, 64), &dev)?.to_dtype(dtype)?;
        let txt = Tensor::randn(0f32, 1.0, (1, txt_tokens, 4096), &dev)?.to_dtype(dtype)?;
        let y = Tensor::randn(0f32, 1.0, (1, 768), &dev)?.to_dtype(dtype)?;
        let ids: Vec<f32> = (0..32)
            .flat_map(|r| (0..32).flat_map(move |c| [0.0, r as f32, c as f32]))
            .collect();
        let img_ids = Tensor::from_vec(ids, (1, img_tokens, 3), &dev)?.to_dtype(dtype)?;
        let txt_ids = Tensor::zeros((1, txt_tokens, 3), dtype, &dev)?;
        let t = Tensor::new(&[1f32], &dev)?.to_dtype(dtype)?;
        let fwd = time(|| {
            flux.forward(&img, &img_ids, &txt, &txt_ids, &t, &y, None)
                .map(|_| ())
        })?;
        println!(
            "{:6} {:>14.4} {:>10.1} {:>18.3} {:>10.1}",
            format!("{dtype:?}"),
            mm,
            matmul_flops / mm / 1e9,
            fwd,
            2.0 * block_flops / fwd / 1e9
        );
    }
    println!(
        "median of {RUNS} runs after one warm-up; FLUX.1-schnell has 19 double + 38 single blocks"
    );
    Ok(())
}
