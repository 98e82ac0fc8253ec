//! LoRA per request against diffusers' `load_lora_weights` + `fuse_lora` on the tiny
//! fixture (`tools/make_tiny_lora.py`, `tests/data/tiny-loras`): every file format, two
//! LoRAs at once, scale, a quantized base, the shared weights untouched after, and bad
//! files refused with the layer named.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use candle_core::{Device, Tensor};
use pictor_engine::{
    Control, LoraRequest, ModelFiles, Part, PipelineError,
    flux::{FluxOptions, FluxPipeline, sampling},
    quantize::{Component, Target, quantize},
};

use crate::common::*;

fn loras_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny-loras")
}

fn lora_reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(loras_dir().join("reference.safetensors"), &Device::Cpu)
        .expect("tiny-loras/reference.safetensors")
}

fn pipeline(files: &ModelFiles, lora_dir: &Path) -> FluxPipeline {
    let options = FluxOptions {
        lora_dir: Some(lora_dir.to_path_buf()),
        ..FluxOptions::default()
    };
    FluxPipeline::load(files, options).expect("pipeline loads")
}

fn ask(loras: &[(&str, f64)]) -> Vec<LoraRequest> {
    loras
        .iter()
        .map(|(name, scale)| LoraRequest {
            name: name.to_string(),
            scale: *scale,
        })
        .collect()
}

/// The final latents from the reference's noise and text embeddings.
fn final_latents(p: &FluxPipeline) -> Tensor {
    let r = reference();
    p.denoiser()
        .denoise(
            &tensor(&r, "noise"),
            &reference_embeddings(&r),
            setup().steps,
            None,
            |_| Ok(Control::Continue),
        )
        .expect("denoise")
}

#[test]
fn every_format_matches_diffusers_and_comes_off_after() {
    let want = lora_reference();
    let base = tensor(&reference(), "final_latents");
    let p = pipeline(&ModelFiles::from_dir(&fixture()).unwrap(), &loras_dir());
    let mut report = Vec::new();
    for (loras, key) in [
        (&[("pixel-peft", 0.8)][..], "pixel-peft.final_latents"),
        (&[("pixel-kohya", 0.8)], "pixel-kohya.final_latents"),
        (&[("pixel-bfl", 0.8)], "pixel-bfl.final_latents"),
        (&[("pixel-xlabs", 0.8)], "pixel-xlabs.final_latents"),
        (&[("pixel-peft", 0.4)], "pixel-peft@0.4.final_latents"),
        (
            &[("pixel-peft", 0.8), ("pixel-xlabs", 0.5)],
            "combo.final_latents",
        ),
    ] {
        let applied = p
            .attach_loras(p.prepare_loras(&ask(loras)).expect("prepares"))
            .expect("applies");
        assert_eq!(applied.used().len(), loras.len());
        assert!(applied.used().iter().all(|u| u.sha256.len() == 64));
        let got = final_latents(&p);
        drop(applied);
        let expected = tensor(&want, key);
        let d = max_abs_diff(&got, &expected);
        let moved = max_abs_diff(&expected, &base);
        report.push(format!("{key} {d:.1e} (LoRA moves it {moved:.2})"));
        assert!(moved > 0.1, "{key}: the LoRA hardly changes the image");
        assert!(d <= STEP_TOL, "{key}: {d} from diffusers");
    }
    eprintln!(
        "final latents max |Δ| vs diffusers fuse_lora: {}",
        report.join(", ")
    );
    // Taken off again: the shared weights were never changed.
    let d = max_abs_diff(&final_latents(&p), &base);
    assert!(
        d <= STEP_TOL,
        "after the LoRAs came off: {d} from the base image"
    );
}

#[test]
fn the_pixels_match_diffusers_with_a_lora() {
    let want = lora_reference();
    let p = pipeline(&ModelFiles::from_dir(&fixture()).unwrap(), &loras_dir());
    let s = setup();
    let _applied = p
        .attach_loras(p.prepare_loras(&ask(&[("pixel-kohya", 0.8)])).unwrap())
        .unwrap();
    let pixels = p
        .denoiser()
        .decode(&final_latents(&p), s.height, s.width)
        .unwrap();
    let image = pictor_engine::to_rgb8(&pixels).unwrap().remove(0);
    let expected: Vec<u8> = tensor(&want, "pixel-kohya.image_u8")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = image
        .pixels
        .iter()
        .zip(&expected)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "pixels differ by {worst}/255");
}

/// The difference a LoRA makes to one transformer step, on a quantized base, matches the
/// difference it makes in diffusers.
#[test]
fn a_quantized_base_takes_the_same_update() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = ModelFiles::from_dir(&fixture()).unwrap();
    let gguf = dir.path().join("q8.gguf");
    quantize(
        &files.transformer,
        Component::Transformer,
        Target::Q8_0,
        &gguf,
        |_, _, _| {},
    )
    .expect("quantize");
    files.transformer = Part::file(&gguf);
    let p = pipeline(&files, &loras_dir());
    let r = reference();
    let plain = first_step(&p, None);
    let with = {
        let _applied = p
            .attach_loras(p.prepare_loras(&ask(&[("pixel-peft", 0.8)])).unwrap())
            .unwrap();
        first_step(&p, None)
    };
    let ours = (with - plain).unwrap();
    let theirs = (tensor(&lora_reference(), "pixel-peft.transformer_out_step0")
        - tensor(&r, "transformer_out_step0"))
    .unwrap();
    let size = max_abs_diff(&theirs, &theirs.zeros_like().unwrap());
    let d = max_abs_diff(&ours, &theirs);
    eprintln!(
        "Q8_0 base: the LoRA's change to step 0 is {d:.2e} from diffusers' (change {size:.2})"
    );
    assert!(d < 0.05 * size, "{d} against a change of {size}");
}

/// The velocity at the reference's noise and text, sigma 1, for `guidance`.
fn first_step(p: &FluxPipeline, guidance: Option<f64>) -> Tensor {
    let r = reference();
    let noise = tensor(&r, "noise");
    let (_, _, h, w) = noise.dims4().unwrap();
    let packed = sampling::pack(&noise).unwrap();
    p.denoiser()
        .velocity(&packed, &reference_embeddings(&r), 1.0, guidance, (h, w))
        .unwrap()
}

fn write_lora(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.01).collect();
            (
                name.to_string(),
                Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn bad_loras_are_refused_naming_the_lora_and_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    write_lora(
        &dir.path().join("sdxl-style.safetensors"),
        &[
            (
                "lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight",
                vec![4, 1280],
            ),
            (
                "lora_unet_input_blocks_1_0_emb_layers_1.lora_up.weight",
                vec![320, 4],
            ),
        ],
    );
    write_lora(
        &dir.path().join("too-wide.safetensors"),
        &[
            (
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                vec![4, 3072],
            ),
            (
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
                vec![9216, 4],
            ),
        ],
    );
    write_lora(
        &dir.path().join("dora.safetensors"),
        &[
            ("transformer.x_embedder.lora_A.weight", vec![4, 64]),
            ("transformer.x_embedder.lora_B.weight", vec![64, 4]),
            (
                "transformer.x_embedder.lora_magnitude_vector.dora_scale",
                vec![64],
            ),
        ],
    );
    std::fs::write(
        dir.path().join("garbage.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let p = pipeline(&ModelFiles::from_dir(&fixture()).unwrap(), dir.path());
    let refused = |name: &str| {
        let err = p
            .prepare_loras(&ask(&[(name, 1.0)]))
            .err()
            .expect("refused");
        let message = err.to_string();
        let PipelineError::Invalid(invalid) = PipelineError::from(err) else {
            panic!("{name}: not a request error: {message}");
        };
        assert_eq!(invalid.param, "loras");
        assert!(message.contains(&format!("`{name}`")), "{message}");
        message
    };
    let m = refused("sdxl-style");
    assert!(
        m.contains("lora_unet_input_blocks_1_0_emb_layers_1") && m.contains("another model"),
        "{m}"
    );
    let m = refused("too-wide");
    assert!(
        m.contains("double_blocks.0.img_attn.qkv") && m.contains("64 inputs"),
        "{m}"
    );
    assert!(refused("dora").contains("DoRA"));
    assert!(refused("garbage").contains("not a safetensors file"));
    let m = refused("absent");
    assert!(
        m.contains("no LoRA `absent`") && m.contains("sdxl-style"),
        "{m}"
    );
    // Nothing stayed attached after the refusals.
    let d = max_abs_diff(&final_latents(&p), &tensor(&reference(), "final_latents"));
    assert!(d <= STEP_TOL, "{d}");
}

/// kohya's text-encoder LoRA (`lora_te1_`): CLIP's pooled vector and the final latents as
/// diffusers gives them with the LoRA fused into CLIP and the transformer; the shared CLIP
/// is left as it was.
#[test]
fn a_text_encoder_lora_matches_diffusers() {
    let want = lora_reference();
    let r = reference();
    let s = setup();
    let mut p = pipeline(&ModelFiles::from_dir(&fixture()).unwrap(), &loras_dir());
    let loras = p.prepare_loras(&ask(&[("te-kohya", 0.8)])).unwrap();
    let emb = p.encode_prompt_with(&s.prompt, &loras).unwrap();
    let d = max_abs_diff(&emb.pooled, &tensor(&want, "te-kohya.clip_pooled"));
    let moved = max_abs_diff(
        &tensor(&want, "te-kohya.clip_pooled"),
        &tensor(&r, "clip_pooled"),
    );
    eprintln!("te-kohya: CLIP pooled {d:.1e} from diffusers (the LoRA moves it {moved:.2})");
    assert!(moved > 0.05 && d <= STEP_TOL, "{d}");
    let _applied = p.attach_loras(loras).unwrap();
    let latents = p
        .denoiser()
        .denoise(&tensor(&r, "noise"), &emb, s.steps, None, |_| {
            Ok(Control::Continue)
        })
        .unwrap();
    let d = max_abs_diff(&latents, &tensor(&want, "te-kohya.final_latents"));
    assert!(d <= STEP_TOL, "te-kohya final latents: {d}");
    // The shared CLIP is unchanged.
    let plain = p.encode_prompt(&s.prompt).unwrap();
    assert!(max_abs_diff(&plain.pooled, &tensor(&r, "clip_pooled")) <= STEP_TOL);
}

/// FLUX.1-dev takes the same LoRAs (its guidance embedding takes none): they change its
/// step and come off again.
#[test]
fn a_dev_model_takes_loras_too() {
    let dev = fixture().join("../tiny-flux-dev");
    let p = pipeline(&ModelFiles::from_dir(&dev).unwrap(), &loras_dir());
    let plain = first_step(&p, Some(3.5));
    let with = {
        let _applied = p
            .attach_loras(p.prepare_loras(&ask(&[("pixel-kohya", 0.8)])).unwrap())
            .unwrap();
        first_step(&p, Some(3.5))
    };
    assert!(max_abs_diff(&with, &plain) > 0.1);
    assert_eq!(max_abs_diff(&first_step(&p, Some(3.5)), &plain), 0.0);
}

/// One file updating a fused layer both whole (kohya's `qkv`) and by part (diffusers'
/// `to_q`) sums both, as the two applied as separate LoRAs do.
#[test]
fn a_file_updating_a_layer_whole_and_by_part_sums_both() {
    let dir = tempfile::tempdir().unwrap();
    let read = |name: &str| {
        candle_core::safetensors::load(
            loras_dir().join(format!("{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap()
    };
    let (kohya, peft) = (read("pixel-kohya"), read("pixel-peft"));
    let pick = |from: &HashMap<String, Tensor>, prefix: &str| -> HashMap<String, Tensor> {
        from.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let whole = pick(&kohya, "lora_unet_double_blocks_0_img_attn_qkv.");
    let part = pick(&peft, "transformer.transformer_blocks.0.attn.to_q.");
    assert_eq!((whole.len(), part.len()), (3, 2));
    let both: HashMap<String, Tensor> = whole.clone().into_iter().chain(part.clone()).collect();
    for (name, tensors) in [("whole", &whole), ("part", &part), ("both", &both)] {
        candle_core::safetensors::save(tensors, dir.path().join(format!("{name}.safetensors")))
            .unwrap();
    }
    let p = pipeline(&ModelFiles::from_dir(&fixture()).unwrap(), dir.path());
    let with = |loras: &[(&str, f64)]| {
        let _applied = p
            .attach_loras(p.prepare_loras(&ask(loras)).unwrap())
            .unwrap();
        first_step(&p, None)
    };
    let separate = with(&[("whole", 1.0), ("part", 1.0)]);
    let together = with(&[("both", 1.0)]);
    assert!(
        max_abs_diff(&separate, &with(&[("whole", 1.0)])) > 1e-3,
        "the part changes the step"
    );
    assert!(max_abs_diff(&separate, &together) < 1e-5);
}

/// Z-Image-Turbo takes LoRAs in diffusers' PEFT names and in the original (fused `qkv`)
/// names as ComfyUI and kohya write them (`tools/make_tiny_zimage_lora.py`): the final
/// latents land on diffusers' fused z-peft at 0.8, from the reference's noise and features.
#[test]
fn z_image_takes_loras_in_every_naming() {
    use pictor_engine::zimage::{ZImageFiles, ZImageOptions, ZImagePipeline};
    let base = fixture().join("../tiny-z-image-turbo");
    let loras = fixture().join("../tiny-loras-zimage");
    let options = ZImageOptions {
        dtype: pictor_engine::DTypeChoice::F32,
        lora_dir: Some(loras.clone()),
        ..ZImageOptions::default()
    };
    let p = ZImagePipeline::load_files(&ZImageFiles::diffusers(&base).unwrap(), options).unwrap();
    let load = |dir: &Path| {
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
    };
    let (r, want) = (load(&base), load(&loras));
    let noise = tensor(&r, "noise").squeeze(0).unwrap();
    let caption = tensor(&r, "text_features");
    let run = || {
        p.denoise(&noise, &caption, 8, |_, _| Ok(Control::Continue))
            .unwrap()
    };
    let expected = tensor(&want, "z-peft.final_latents").squeeze(0).unwrap();
    let moved = max_abs_diff(&expected, &tensor(&r, "final_latents").squeeze(0).unwrap());
    let mut report = Vec::new();
    for name in ["z-peft", "z-comfy", "z-kohya"] {
        let applied = p
            .attach_loras(p.prepare_loras(&ask(&[(name, 0.8)])).unwrap())
            .unwrap();
        assert_eq!(applied.used()[0].name, name);
        let d = max_abs_diff(&run(), &expected);
        drop(applied);
        report.push(format!("{name} {d:.1e}"));
        assert!(d <= STEP_TOL, "{name}: {d}");
    }
    eprintln!(
        "Z-Image final latents vs diffusers (the LoRA moves them {moved:.2}): {}",
        report.join(", ")
    );
    assert!(moved > 0.05);
    let d = max_abs_diff(&run(), &tensor(&r, "final_latents").squeeze(0).unwrap());
    assert!(d <= STEP_TOL, "after the LoRAs came off: {d}");
    // A FLUX LoRA is refused, naming a layer.
    let flux = ZImageOptions {
        dtype: pictor_engine::DTypeChoice::F32,
        lora_dir: Some(loras_dir()),
        ..ZImageOptions::default()
    };
    let z = ZImagePipeline::load_files(&ZImageFiles::diffusers(&base).unwrap(), flux).unwrap();
    let err = z
        .prepare_loras(&ask(&[("pixel-kohya", 1.0)]))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("another model family"), "{err}");
}
