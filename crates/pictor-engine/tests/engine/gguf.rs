//! A GGUF transformer written by the test itself from the BFL file: unquantized it must
//! match the reference like the safetensors file; Q8_0 within a measured bound.

use std::collections::HashMap;

use candle_core::{
    DType, Device, Tensor,
    quantized::{GgmlDType, QTensor, gguf_file},
};
use pictor_engine::{ModelFiles, Part, flux::sampling};

use crate::common::*;

/// Writes the BFL transformer as GGUF: 2-D weights in `quant` (when their rows fit its
/// blocks), everything else in f32, as community FLUX GGUF files do.
fn write_gguf(path: &std::path::Path, quant: GgmlDType) {
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture().join("flux1-schnell.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let qtensors: Vec<(&str, QTensor)> = names
        .iter()
        .map(|name| {
            let t = tensors[*name].to_dtype(DType::F32).unwrap();
            let dtype = if t.rank() == 2 && t.dim(1).unwrap().is_multiple_of(quant.block_size()) {
                quant
            } else {
                GgmlDType::F32
            };
            (name.as_str(), QTensor::quantize(&t, dtype).unwrap())
        })
        .collect();
    let mut file = std::fs::File::create(path).unwrap();
    let refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, q)| (*n, q)).collect();
    gguf_file::write(&mut file, &[], &refs).unwrap();
}

fn with_gguf(path: &std::path::Path) -> ModelFiles {
    let mut files = ModelFiles::from_dir(&fixture()).unwrap();
    // The test's GGUF records no RoPE axes: the model's settings state them.
    files.transformer = Part {
        rope_axes: Some(vec![4, 14, 14]),
        ..Part::file(path)
    };
    files
}

#[test]
fn f32_gguf_transformer_matches_within_1e4() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-schnell-F32.gguf");
    write_gguf(&path, GgmlDType::F32);
    let d = step0_error(&with_gguf(&path));
    eprintln!("GGUF F32 step 0 max |Δ| {d:.2e}");
    assert!(d <= 1e-4, "GGUF F32 differs by {d}");
}

#[test]
fn q8_0_gguf_transformer_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-schnell-Q8_0.gguf");
    write_gguf(&path, GgmlDType::Q8_0);
    // A folder holding the GGUF and the other parts finds it by its tensor names.
    link(
        &[
            "vae",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
        ],
        dir.path(),
    );
    // Its RoPE axes, which the file does not record, in the config named after it.
    let config = dir.path().join("flux1-schnell-Q8_0.json");
    std::fs::copy(fixture().join("flux1-schnell.json"), &config).unwrap();
    let files = ModelFiles::from_dir(dir.path()).expect("folder with a GGUF resolves");
    assert_eq!(
        files.transformer,
        Part {
            config: Some(config),
            ..Part::file(&path)
        }
    );
    let d = step0_error(&files);
    let want = tensor(&reference(), "transformer_out_step0");
    // The yardstick: how far the f32 model's output moves for another initial noise.
    let p = load(&ModelFiles::from_dir(&fixture()).unwrap());
    let r = reference();
    let other = pictor_engine::gaussian_noise(1, 16 * 6 * 10);
    let other = Tensor::from_vec(other, (1, 16, 6, 10), &Device::Cpu).unwrap();
    let v_other = p
        .denoiser()
        .velocity(
            &sampling::pack(&other).unwrap(),
            &reference_embeddings(&r),
            1.0,
            None,
            (6, 10),
        )
        .unwrap();
    let seeds_apart = max_abs_diff(&v_other, &want);
    eprintln!(
        "GGUF Q8_0 step 0 max |Δ| {d:.3e}; another seed moves it {seeds_apart:.3e} ({:.1}x)",
        seeds_apart / d
    );
    // Measured 2026-11-25: Q8_0 5.6e-2 from f32, another seed 5.0 (90x further).
    assert!(
        d > 0.0,
        "Q8_0 should not be bit-exact; is the file really quantized?"
    );
    assert!(
        d * 20.0 < seeds_apart,
        "Q8_0 is {d} from f32, not 20x closer than another seed ({seeds_apart})"
    );
}
