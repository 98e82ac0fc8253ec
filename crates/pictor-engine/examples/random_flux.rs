//! Writes full-size FLUX.1-schnell parts with random weights in the layouts and dtypes
//! users download, for benchmarks that cannot have the real weights:
//!
//! - `flux1-schnell.safetensors`: the transformer, Black Forest Labs names, BF16 (23.8 GB);
//! - `t5xxl_fp16.safetensors`: T5-XXL's encoder, transformers names, F16 (9.5 GB);
//! - `clip_l.safetensors`: CLIP-L's text model, transformers names, F16 (246 MB).
//!
//! Files are streamed tensor by tensor (memory stays at one buffer), values are uniform
//! with the standard deviation of a 0.02 normal (norm scales 1, biases 0) from a fixed
//! seed, so a rerun writes the same bytes. Existing complete files are kept.
//!
//! `cargo run --release -p pictor-engine --example random_flux -- OUT_DIR [transformer|t5|clip]...`

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use candle_transformers::models::{flux::model::Config as FluxConfig, t5};
use pictor_engine::{flux::tensor_names, text::t5 as t5names};

#[derive(Clone, Copy)]
enum Dtype {
    Bf16,
    F16,
}

/// xorshift64*: fast, deterministic, good enough for weights nobody reads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-a, a].
    fn uniform(&mut self, a: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
}

fn value_bits(dtype: Dtype, v: f32) -> [u8; 2] {
    match dtype {
        Dtype::Bf16 => half::bf16::from_f32(v).to_le_bytes(),
        Dtype::F16 => half::f16::from_f32(v).to_le_bytes(),
    }
}

fn write(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    dtype: Dtype,
    seed: u64,
) -> std::io::Result<()> {
    let total: usize = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() * 2)
        .sum();
    if std::fs::metadata(path).is_ok_and(|m| m.len() as usize > total) {
        println!("{} exists, kept", path.display());
        return Ok(());
    }
    let name = match dtype {
        Dtype::Bf16 => "BF16",
        Dtype::F16 => "F16",
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (n, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": name, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "pictor": "random weights for benchmarks"}),
    );
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let partial = path.with_extension("safetensors.partial");
    let mut out = BufWriter::with_capacity(1 << 22, File::create(&partial)?);
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    let mut rng = Rng(seed | 1);
    let a = 0.02 * 3f32.sqrt();
    let mut buf = Vec::with_capacity(1 << 22);
    for (n, shape) in tensors {
        let elems: usize = shape.iter().product();
        let fill = if n.ends_with(".scale") || n.contains("norm") && n.ends_with(".weight") {
            Some(1.0)
        } else if n.ends_with(".bias") {
            Some(0.0)
        } else {
            None
        };
        let mut left = elems;
        while left > 0 {
            let chunk = left.min(1 << 21);
            buf.clear();
            for _ in 0..chunk {
                let v = fill.unwrap_or_else(|| rng.uniform(a));
                buf.extend_from_slice(&value_bits(dtype, v));
            }
            out.write_all(&buf)?;
            left -= chunk;
        }
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&partial, path)?;
    println!(
        "wrote {} ({:.2} GB)",
        path.display(),
        (offset + json.len() + 8) as f64 / 1e9
    );
    Ok(())
}

fn t5_xxl() -> t5::Config {
    t5::Config {
        vocab_size: 32128,
        d_model: 4096,
        d_kv: 64,
        d_ff: 10240,
        num_layers: 24,
        num_heads: 64,
        ..t5::Config::default()
    }
}

fn clip_l() -> Vec<(String, Vec<usize>)> {
    let (d, ff) = (768, 3072);
    let mut names = vec![
        (
            "text_model.embeddings.token_embedding.weight".to_string(),
            vec![49408, d],
        ),
        (
            "text_model.embeddings.position_embedding.weight".to_string(),
            vec![77, d],
        ),
    ];
    for i in 0..12 {
        let p = format!("text_model.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            names.push((format!("{p}.self_attn.{proj}.weight"), vec![d, d]));
            names.push((format!("{p}.self_attn.{proj}.bias"), vec![d]));
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            names.push((format!("{p}.{norm}.weight"), vec![d]));
            names.push((format!("{p}.{norm}.bias"), vec![d]));
        }
        names.push((format!("{p}.mlp.fc1.weight"), vec![ff, d]));
        names.push((format!("{p}.mlp.fc1.bias"), vec![ff]));
        names.push((format!("{p}.mlp.fc2.weight"), vec![d, ff]));
        names.push((format!("{p}.mlp.fc2.bias"), vec![d]));
    }
    names.push(("text_model.final_layer_norm.weight".to_string(), vec![d]));
    names.push(("text_model.final_layer_norm.bias".to_string(), vec![d]));
    names
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        eprintln!("usage: random_flux OUT_DIR [transformer|t5|clip]...");
        std::process::exit(2);
    };
    let out = Path::new(&out);
    std::fs::create_dir_all(out)?;
    let mut parts: Vec<String> = args.collect();
    if parts.is_empty() {
        parts = vec!["clip".into(), "t5".into(), "transformer".into()];
    }
    for part in parts {
        match part.as_str() {
            "transformer" => write(
                &out.join("flux1-schnell.safetensors"),
                &tensor_names(&FluxConfig::schnell()),
                Dtype::Bf16,
                1,
            )?,
            "t5" => write(
                &out.join("t5xxl_fp16.safetensors"),
                &t5names::tensor_names(&t5_xxl()),
                Dtype::F16,
                2,
            )?,
            "clip" => write(&out.join("clip_l.safetensors"), &clip_l(), Dtype::F16, 3)?,
            other => {
                eprintln!("unknown part {other}");
                std::process::exit(2);
            }
        }
    }
    Ok(())
}
