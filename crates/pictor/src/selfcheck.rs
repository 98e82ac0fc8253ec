//! `pictor selfcheck`: this binary, on this device and dtype, against diffusers' numbers
//! for a fixture made by `tools/make_tiny_flux.py` (see `pictor_engine::flux::selfcheck`).

use std::path::PathBuf;

use anyhow::Context;
use pictor_engine::{DTypeChoice, DeviceChoice, flux::FluxOptions};

/// Arguments of `pictor selfcheck`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fixture folder: a tiny FLUX.1-schnell with reference.safetensors and
    /// reference.json beside it.
    #[arg(default_value = "tests/data/tiny-flux-schnell")]
    fixture: PathBuf,
    /// Where to run: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Compute dtype: auto, f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Fail when a stage is further than this from the reference, relative to the
    /// reference's largest value. Default: the bounds the test suite holds the CPU to,
    /// 1e-4 absolute (1e-3 for pixels) in f32, 3 % in bf16 or f16.
    #[arg(long, value_name = "FRACTION")]
    max_relative: Option<f32>,
}

/// Runs the check; prints one JSON object; fails when a stage is out of bounds.
pub fn run(args: Args) -> anyhow::Result<()> {
    let device: DeviceChoice = args.device.parse().map_err(anyhow::Error::msg)?;
    let dtype: DTypeChoice = args.dtype.parse().map_err(anyhow::Error::msg)?;
    let options = FluxOptions {
        device,
        dtype,
        ..FluxOptions::default()
    };
    let report = pictor_engine::flux::selfcheck::run(&args.fixture, options)
        .with_context(|| format!("checking against {}", args.fixture.display()))?;
    let ran_on = &report.ran_on;
    let mut failed = Vec::new();
    let rows: Vec<serde_json::Value> = report
        .stages
        .iter()
        .map(|s| {
            let bound = report.bound(s, args.max_relative);
            if s.max_abs_diff > bound {
                failed.push(s.stage);
            }
            serde_json::json!({
                "stage": s.stage,
                "max_abs_diff": s.max_abs_diff,
                "reference_max_abs": s.reference_max_abs,
                "bound": bound,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({ "device": ran_on, "stages": rows, "passed": failed.is_empty() })
    );
    anyhow::ensure!(
        failed.is_empty(),
        "out of bounds on {ran_on}: {}",
        failed.join(", ")
    );
    Ok(())
}
