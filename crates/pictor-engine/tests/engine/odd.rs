//! The second fixture (`tools/make_odd_flux.py`): a FLUX-architecture model with none of
//! FLUX.1's dimensions (one 64-wide head with RoPE axes (16, 24, 24), 8 latent channels, a
//! decoder of 16 groups, its own latent scale and shift), run from the reference's own
//! embeddings and noise through the public [`Denoiser`], in both file layouts, against
//! diffusers' `FluxPipeline`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pictor_engine::{
    Control, Part, PromptInfo,
    flux::{Denoiser, sampling},
    text::Embeddings,
};

use crate::common::*;

fn odd() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/odd-flux")
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(odd().join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors")
}

fn embeddings(r: &std::collections::HashMap<String, Tensor>) -> Embeddings {
    Embeddings {
        sequence: tensor(r, "t5_hidden"),
        pooled: tensor(r, "clip_pooled"),
        prompt: PromptInfo::default(),
    }
}

/// (transformer, autoencoder) in diffusers' folders, then as BFL files with their configs.
fn layouts() -> [(&'static str, Part, Part); 2] {
    [
        (
            "diffusers",
            Part::folder(&odd().join("transformer")).unwrap(),
            Part::folder(&odd().join("vae")).unwrap(),
        ),
        (
            "Black Forest Labs",
            Part {
                config: Some(odd().join("odd-flux.json")),
                ..Part::file(odd().join("odd-flux.safetensors"))
            },
            Part {
                config: Some(odd().join("odd-ae.json")),
                ..Part::file(odd().join("odd-ae.safetensors"))
            },
        ),
    ]
}

fn load(transformer: &Part, vae: &Part) -> Denoiser {
    Denoiser::load(transformer, vae, DType::F32, &Device::Cpu).expect("the odd model loads")
}

fn first_velocity(d: &Denoiser, r: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let noise = tensor(r, "noise");
    let (_, _, h, w) = noise.dims4().unwrap();
    d.velocity(
        &sampling::pack(&noise).unwrap(),
        &embeddings(r),
        1.0,
        None,
        (h, w),
    )
    .expect("velocity")
}

#[test]
fn an_unseen_architecture_matches_diffusers_in_both_layouts() {
    let r = reference();
    let (width, height) = (96, 64);
    for (label, transformer, vae) in layouts() {
        let d = load(&transformer, &vae);
        assert_eq!(d.transformer_arch().config.axes_dim, vec![16, 24, 24]);
        assert_eq!(d.transformer_arch().head_dim, 64);
        assert_eq!((d.vae_arch().groups, d.vae_arch().z_channels), (16, 8));

        let want = tensor(&r, "transformer_out_step0");
        let step = max_abs_diff(&first_velocity(&d, &r), &want);

        let mut seen = Vec::new();
        let latents = d
            .denoise(&tensor(&r, "noise"), &embeddings(&r), 3, None, |s| {
                seen.push(s.step);
                Ok(Control::Continue)
            })
            .expect("denoise");
        assert_eq!(seen, vec![0, 1, 2, 3]);
        let last = max_abs_diff(&latents, &tensor(&r, "final_latents"));

        let image = d
            .decode(&tensor(&r, "final_latents"), height, width)
            .expect("decode");
        let pixels = max_abs_diff(&image, &tensor(&r, "image"));
        eprintln!(
            "odd {label}: step 0 {step:.2e}, final latents {last:.2e}, pixels {pixels:.2e} \
             (reference stds {:.2}, {:.2}, {:.2})",
            std(&want),
            std(&tensor(&r, "final_latents")),
            std(&tensor(&r, "image"))
        );
        assert!(
            step <= STEP_TOL,
            "{label}: step-0 velocity differs by {step}"
        );
        assert!(last <= STEP_TOL, "{label}: final latents differ by {last}");
        assert!(pixels <= PIXEL_TOL, "{label}: pixels differ by {pixels}");
        // The seeded noise has the decoder's 8 channels.
        assert_eq!(d.noise(7, 2, height, width).unwrap().dims(), &[2, 8, 8, 12]);
    }
}

/// The BFL files alone record neither the RoPE axes nor the decoder's groups, scale and
/// shift: each is refused, saying what to supply, never run on a guess.
#[test]
fn bfl_files_without_their_configs_are_refused_with_what_to_supply() {
    let transformer = Part::file(odd().join("odd-flux.safetensors"));
    let vae = Part::file(odd().join("odd-ae.safetensors"));
    let with_configs = &layouts()[1];
    let msg = Denoiser::load(&transformer, &with_configs.2, DType::F32, &Device::Cpu)
        .err()
        .expect("no axes recorded")
        .to_string();
    assert!(
        msg.contains("64 wide")
            && msg.contains("axes_dims_rope")
            && msg.contains("rope_axes")
            && msg.contains("odd-flux.safetensors"),
        "{msg}"
    );
    let msg = Denoiser::load(&with_configs.1, &vae, DType::F32, &Device::Cpu)
        .err()
        .expect("no groups recorded")
        .to_string();
    assert!(
        msg.contains("group count") && msg.contains("[32, 32, 32, 32]") && msg.contains("odd-ae"),
        "{msg}"
    );
}

/// Why nothing is guessed: the values the engine once guessed run, and are wrong. FLUX.1's
/// proportion of RoPE axes for 64-wide heads, (8, 28, 28), moves the first velocity far
/// outside the tolerance; FLUX.1's 32 groups move the pixels.
#[test]
fn the_old_guesses_would_have_drawn_wrong_pictures() {
    let r = reference();
    let (_, transformer, vae) = layouts()[1].clone();
    let guessed = Part {
        config: None,
        rope_axes: Some(vec![8, 28, 28]),
        ..transformer.clone()
    };
    let d = load(&guessed, &vae);
    let off = max_abs_diff(
        &first_velocity(&d, &r),
        &tensor(&r, "transformer_out_step0"),
    );
    assert!(off > 100.0 * STEP_TOL, "guessed axes are off by only {off}");
    eprintln!("RoPE axes (8, 28, 28) instead of (16, 24, 24): first velocity off by {off:.3}");

    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(odd().join("odd-ae.json")).unwrap()).unwrap();
    config["norm_num_groups"] = 32.into();
    let path = dir.path().join("odd-ae.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let thirty_two = Part {
        config: Some(path),
        ..vae
    };
    let d = load(&transformer, &thirty_two);
    let image = d
        .decode(&tensor(&r, "final_latents"), 64, 96)
        .expect("decode");
    let off = max_abs_diff(&image, &tensor(&r, "image"));
    assert!(off > 10.0 * PIXEL_TOL, "32 groups are off by only {off}");
    eprintln!("32 groups instead of 16: pixels off by {off:.3}");
}

/// The encoder (for image-to-image, issue 21): the posterior mean and the normalised
/// latents of a given image match diffusers' `AutoencoderKL.encode`, in both layouts.
#[test]
fn the_encoder_matches_diffusers_in_both_layouts() {
    let r = reference();
    let image = tensor(&r, "encode_image");
    for (label, _, vae) in layouts() {
        let encoder = pictor_engine::flux::encoder::Encoder::load(&vae, DType::F32, &Device::Cpu)
            .expect("the encoder loads");
        let mean = encoder.posterior_mean(&image).expect("encodes");
        let want = tensor(&r, "encode_mean");
        let d_mean = max_abs_diff(&mean, &want);
        let d_latents = max_abs_diff(
            &encoder.encode(&image).unwrap(),
            &tensor(&r, "encode_latents"),
        );
        eprintln!(
            "odd {label} encoder: mean {d_mean:.2e}, latents {d_latents:.2e} (reference std {:.2})",
            std(&want)
        );
        assert!(d_mean <= STEP_TOL && d_latents <= STEP_TOL, "{label}");
    }
    let odd_size = image.narrow(3, 0, 92).unwrap();
    let encoder =
        pictor_engine::flux::encoder::Encoder::load(&layouts()[0].2, DType::F32, &Device::Cpu)
            .unwrap();
    let msg = encoder.posterior_mean(&odd_size).unwrap_err().to_string();
    assert!(msg.contains("multiples of 8"), "{msg}");
}

/// Image-to-image (issue 21): the encoded image noised to strength 0.6 of 4 steps and
/// denoised over the last 2 matches diffusers' `FluxImg2ImgPipeline` (taking the posterior
/// mean), latents and pixels, in both layouts.
#[test]
fn image_to_image_matches_diffusers_in_both_layouts() {
    use pictor_engine::flux::{encoder::Encoder, img2img_start};
    let r = reference();
    assert_eq!(
        img2img_start(4, 0.6).unwrap(),
        1,
        "diffusers truncates 4 - 2.4"
    );
    for (label, transformer, vae) in layouts() {
        let d = load(&transformer, &vae);
        let encoder = Encoder::load(&vae, DType::F32, &Device::Cpu).unwrap();
        let latents = encoder.encode(&tensor(&r, "encode_image")).unwrap();
        let mut seen = Vec::new();
        let last = d
            .denoise_image(
                &latents,
                None,
                &tensor(&r, "img2img_noise"),
                &embeddings(&r),
                4,
                0.6,
                None,
                |s| {
                    seen.push(s.step);
                    Ok(Control::Continue)
                },
            )
            .expect("image to image");
        assert_eq!(seen, vec![0, 1, 2, 3], "{label}: 3 of 4 steps run");
        let d_latents = max_abs_diff(&last, &tensor(&r, "img2img_final_latents"));
        let pixels = d.decode(&last, 64, 96).unwrap();
        let d_pixels = max_abs_diff(&pixels, &tensor(&r, "img2img_image"));
        eprintln!(
            "odd {label} image to image: final latents {d_latents:.2e}, pixels {d_pixels:.2e}"
        );
        assert!(d_latents <= STEP_TOL && d_pixels <= PIXEL_TOL, "{label}");
    }
    // Bad strengths and steps are the engine's input errors (the schedule's own cases are
    // `pictor_core::edit_start`'s tests).
    for (steps, strength, field) in [(4, 0.0, "strength"), (0, 0.5, "steps")] {
        let err = img2img_start(steps, strength).unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
}

/// Inpainting (issue 21): strength 0.7 of 4 steps with the known region put back after
/// every step matches diffusers' `FluxInpaintPipeline` (posterior mean), latents and
/// pixels, in both layouts.
#[test]
fn inpainting_matches_diffusers_in_both_layouts() {
    use pictor_engine::flux::{encoder::Encoder, latent_mask};
    let r = reference();
    let mask = latent_mask(&tensor(&r, "inpaint_mask")).unwrap();
    // Rows 16..48 and columns 0..48 of 64x96 pixels: latent rows 2..6, columns 0..6.
    assert_eq!(mask.sum_all().unwrap().to_scalar::<f32>().unwrap(), 24.0);
    for (label, transformer, vae) in layouts() {
        let d = load(&transformer, &vae);
        let encoder = Encoder::load(&vae, DType::F32, &Device::Cpu).unwrap();
        let latents = encoder.encode(&tensor(&r, "encode_image")).unwrap();
        let last = d
            .denoise_image(
                &latents,
                Some(&mask),
                &tensor(&r, "inpaint_noise"),
                &embeddings(&r),
                4,
                0.7,
                None,
                |_| Ok(Control::Continue),
            )
            .expect("inpaint");
        let d_latents = max_abs_diff(&last, &tensor(&r, "inpaint_final_latents"));
        let pixels = d.decode(&last, 64, 96).unwrap();
        let d_pixels = max_abs_diff(&pixels, &tensor(&r, "inpaint_image"));
        eprintln!("odd {label} inpainting: final latents {d_latents:.2e}, pixels {d_pixels:.2e}");
        assert!(d_latents <= STEP_TOL && d_pixels <= PIXEL_TOL, "{label}");
    }
    let bad = Tensor::zeros((1, 1, 60, 96), DType::F32, &Device::Cpu).unwrap();
    let msg = latent_mask(&bad).unwrap_err().to_string();
    assert!(
        msg.contains("mask") && msg.contains("multiples of 8"),
        "{msg}"
    );
}
