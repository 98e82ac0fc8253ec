//! Broken or wrong files: each gives an error naming the file and the tensor, never a
//! panic.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use pictor_engine::{
    EngineError, ModelFiles, Part,
    flux::{FluxOptions, FluxPipeline},
};

use crate::common::*;

fn bfl_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("flux1-schnell.safetensors"), &Device::Cpu)
        .unwrap()
}

fn load_with_transformer(path: &std::path::Path) -> EngineError {
    let mut files = ModelFiles::from_dir(&fixture()).unwrap();
    files.transformer = bfl_transformer(path);
    match FluxPipeline::load(&files, FluxOptions::default()) {
        Ok(_) => panic!("{} loaded but is broken", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-schnell.safetensors");
    let mut t = bfl_tensors();
    t.remove("single_blocks.1.linear2.weight").unwrap();
    candle_core::safetensors::save(&t, &path).unwrap();
    let msg = load_with_transformer(&path).to_string();
    assert!(msg.contains("single_blocks.1.linear2.weight"), "{msg}");
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
}

#[test]
fn wrong_shape_names_file_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-schnell.safetensors");
    let mut t = bfl_tensors();
    let wrong = Tensor::zeros((64, 63), candle_core::DType::BF16, &Device::Cpu).unwrap();
    t.insert("double_blocks.1.img_attn.proj.weight".into(), wrong);
    candle_core::safetensors::save(&t, &path).unwrap();
    let msg = load_with_transformer(&path).to_string();
    assert!(
        msg.contains("double_blocks.1.img_attn.proj.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("[64, 63]") && msg.contains("[64, 64]"),
        "{msg}"
    );
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
}

#[test]
fn wrong_shape_in_a_diffusers_shard_names_the_source_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture().join("vae/diffusion_pytorch_model.safetensors");
    let mut t = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let wrong = Tensor::zeros((5,), candle_core::DType::BF16, &Device::Cpu).unwrap();
    t.insert("decoder.up_blocks.0.resnets.0.norm1.weight".into(), wrong);
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&t, &path).unwrap();
    let mut files = ModelFiles::from_dir(&fixture()).unwrap();
    files.vae = Part {
        files: vec![path.clone()],
        ..files.vae.clone()
    };
    let msg = FluxPipeline::load(&files, FluxOptions::default())
        .err()
        .expect("broken")
        .to_string();
    assert!(
        msg.contains("decoder.up_blocks.0.resnets.0.norm1.weight"),
        "{msg}"
    );
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-schnell.safetensors");
    let bytes = std::fs::read(fixture().join("flux1-schnell.safetensors")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_with_transformer(&path);
    assert!(matches!(err, EngineError::File { .. }), "{err:?}");
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    // Resolving by path fails the same way, before anything is loaded.
    assert!(ModelFiles::resolve(path.to_str().unwrap()).is_err());
}

#[test]
fn truncated_gguf_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.gguf");
    let t = bfl_tensors();
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    let q: Vec<(&str, candle_core::quantized::QTensor)> = names
        .iter()
        .map(|n| {
            let x = t[*n].to_dtype(candle_core::DType::F32).unwrap();
            (
                n.as_str(),
                candle_core::quantized::QTensor::quantize(
                    &x,
                    candle_core::quantized::GgmlDType::F32,
                )
                .unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        q.iter().map(|(n, x)| (*n, x)).collect();
    candle_core::quantized::gguf_file::write(
        &mut std::fs::File::create(&full).unwrap(),
        &[],
        &refs,
    )
    .unwrap();
    let bytes = std::fs::read(&full).unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let msg = load_with_transformer(&path).to_string();
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn unknown_layout_says_what_it_saw() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mystery.safetensors");
    let mut t = HashMap::new();
    t.insert(
        "foo.bar.weight".to_string(),
        Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &path).unwrap();
    let err = load_with_transformer(&path);
    assert!(matches!(err, EngineError::UnknownLayout { .. }), "{err:?}");
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    let err = ModelFiles::from_file(&path).expect_err("unknown");
    assert!(matches!(err, EngineError::UnknownLayout { .. }), "{err:?}");
}

#[test]
fn index_naming_a_missing_shard_names_index_and_shard() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("transformer");
    std::fs::create_dir(&t).unwrap();
    for f in [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model-00001-of-00002.safetensors",
    ] {
        std::os::unix::fs::symlink(
            fixture()
                .join("transformer")
                .join(f)
                .canonicalize()
                .unwrap(),
            t.join(f),
        )
        .unwrap();
    }
    let err = Part::folder(&t).expect_err("a shard is missing");
    let msg = err.to_string();
    assert!(
        msg.contains("index.json") && msg.contains("00002-of-00002"),
        "{msg}"
    );
}

#[test]
fn missing_parts_are_named() {
    let dir = tempfile::tempdir().unwrap();
    link(
        &[
            "transformer",
            "vae",
            "text_encoder",
            "tokenizer",
            "tokenizer_2",
        ],
        dir.path(),
    );
    let msg = ModelFiles::from_dir(dir.path())
        .expect_err("no T5")
        .to_string();
    assert!(
        msg.contains("T5") && msg.contains("text_encoder_2"),
        "{msg}"
    );
}

/// Parts from different models are refused at load, naming the parts and the widths that
/// disagree, instead of failing at the first request: the shipped model's text encoders
/// are 64 wide, the fixture's transformer takes 32.
#[test]
fn parts_from_different_models_are_refused_at_load() {
    let shipped = fixture().join("../../../models/pictor-tiny");
    let other = ModelFiles::from_dir(&shipped).unwrap();
    let refused = |files: &ModelFiles| match FluxPipeline::load(files, FluxOptions::default()) {
        Err(e @ EngineError::Mismatch { .. }) => e.to_string(),
        Err(other) => panic!("expected a mismatch, got {other}"),
        Ok(_) => panic!("parts of different widths loaded"),
    };
    let mut files = ModelFiles::from_dir(&fixture()).unwrap();
    files.t5 = other.t5.clone();
    let text = refused(&files);
    assert!(
        text.contains("T5 encoder") && text.contains("text_encoder_2"),
        "{text}"
    );
    assert!(
        text.contains("64-wide") && text.contains("txt_in takes 32"),
        "{text}"
    );
    assert!(!text.contains("CLIP"), "only the part that differs: {text}");

    let mut files = ModelFiles::from_dir(&fixture()).unwrap();
    files.clip = other.clip.clone();
    let text = refused(&files);
    assert!(
        text.contains("CLIP encoder") && text.contains("vector_in takes 32"),
        "{text}"
    );

    // The control: the fixture's own parts fit.
    FluxPipeline::load(
        &ModelFiles::from_dir(&fixture()).unwrap(),
        FluxOptions::default(),
    )
    .expect("matching parts load");
}

/// A diffusers autoencoder config that states an architecture the decoder does not
/// implement is refused, naming the field, instead of decoding wrong pixels (with
/// `norm_num_groups: 16` the fixture's pixels came out off by 0.44).
#[test]
fn autoencoder_fields_the_decoder_does_not_implement_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let own: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("vae/config.json")).unwrap())
            .unwrap();
    let with = |field: &str, value: serde_json::Value| {
        let mut config = own.clone();
        config[field] = value;
        let path = dir.path().join(format!("{field}.json"));
        std::fs::write(&path, config.to_string()).unwrap();
        let mut files = ModelFiles::from_dir(&fixture()).unwrap();
        files.vae.config = Some(path);
        FluxPipeline::load(&files, FluxOptions::default())
            .err()
            .map(|e| e.to_string())
    };
    for (field, value, said) in [
        (
            "norm_num_groups",
            serde_json::json!(24),
            "does not divide the width 32",
        ),
        (
            "mid_block_add_attention",
            serde_json::json!(false),
            "mid-block attention",
        ),
        (
            "up_block_types",
            serde_json::json!(["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
            "`AttnUpDecoderBlock2D`",
        ),
        ("latents_mean", serde_json::json!(vec![0.0; 16]), "is set"),
        ("shift_factor", serde_json::Value::Null, "is missing"),
        ("act_fn", serde_json::json!("gelu"), "`gelu`"),
        ("latent_channels", serde_json::json!(4), "is 4"),
        (
            "block_out_channels",
            serde_json::json!([32, 64, 64, 64]),
            "[32, 64, 64, 64]",
        ),
        ("layers_per_block", serde_json::json!(2), "is 2"),
        (
            "use_post_quant_conv",
            serde_json::json!(true),
            "post_quant_conv",
        ),
    ] {
        let msg = with(field, value).unwrap_or_else(|| panic!("{field} was accepted"));
        assert!(msg.contains(field) && msg.contains(said), "{msg}");
        assert!(
            msg.contains(&format!("{field}.json")),
            "names the file: {msg}"
        );
    }
    // The control: the fixture's own config, rewritten unchanged, loads.
    assert_eq!(with("norm_num_groups", serde_json::json!(32)), None);
}

/// Another family's checkpoint is refused with what it is, even where some of its names
/// are FLUX's too (diffusers' block names, an SDXL file's LDM autoencoder); a file of no
/// known family, with a few of its names; a diffusers folder of another pipeline, by its
/// class.
#[test]
fn other_families_are_named_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = || Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    let write = |file: &str, names: &[&str]| {
        let path = dir.path().join(file);
        let t: HashMap<String, Tensor> = names.iter().map(|n| (n.to_string(), tiny())).collect();
        candle_core::safetensors::save(&t, &path).unwrap();
        path
    };
    for (file, names, want) in [
        (
            "sdxl.safetensors",
            &[
                "model.diffusion_model.input_blocks.0.0.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
            ][..],
            "SDXL UNet",
        ),
        (
            "sd3.safetensors",
            &[
                "pos_embed.proj.weight",
                "transformer_blocks.0.attn.to_q.weight",
            ],
            "Stable Diffusion 3",
        ),
        (
            "qwen.safetensors",
            &["txt_norm.weight", "transformer_blocks.0.attn.to_q.weight"],
            "Qwen-Image",
        ),
        (
            "z-image.safetensors",
            &[
                "cap_embedder.1.weight",
                "noise_refiner.0.attention.k_norm.weight",
            ],
            "Z-Image",
        ),
        (
            "mystery.safetensors",
            &[
                "alpha.weight",
                "beta.weight",
                "gamma.weight",
                "delta.weight",
            ],
            "such as alpha.weight, beta.weight, delta.weight",
        ),
    ] {
        let path = write(file, names);
        let msg = ModelFiles::resolve(path.to_str().unwrap())
            .expect_err("not FLUX")
            .to_string();
        assert!(msg.contains(want), "{file}: {msg}");
        assert!(msg.contains("Pictor serves FLUX.1"), "{file}: {msg}");
    }
    // The tiny Z-Image-Turbo (`tools/make_tiny_zimage.py`): its folder by its pipeline class,
    // its transformer file by its names.
    let zimage = fixture().with_file_name("tiny-z-image-turbo");
    let msg = ModelFiles::resolve(zimage.to_str().unwrap())
        .expect_err("not FLUX")
        .to_string();
    assert!(msg.contains("ZImagePipeline"), "{msg}");
    let file = zimage.join("transformer/diffusion_pytorch_model.safetensors");
    let msg = ModelFiles::resolve(file.to_str().unwrap())
        .expect_err("not FLUX")
        .to_string();
    assert!(msg.contains("Z-Image"), "{msg}");
    let folder = dir.path().join("sd3-folder");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(
        folder.join("model_index.json"),
        r#"{"_class_name": "StableDiffusion3Pipeline"}"#,
    )
    .unwrap();
    let msg = ModelFiles::resolve(folder.to_str().unwrap())
        .expect_err("not FLUX")
        .to_string();
    assert!(msg.contains("StableDiffusion3Pipeline"), "{msg}");
}
