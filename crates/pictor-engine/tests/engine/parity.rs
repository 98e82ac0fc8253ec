//! Parity with diffusers' FluxPipeline on the tiny fixture, stage by stage and end to end.
//! Tolerances: 1e-4 for text encoders and one transformer step, 1e-3 for pixels in 0..1.

use pictor_engine::{
    Control, ModelFiles, Pipeline, Progress,
    flux::{FluxPipeline, sampling},
};

use crate::common::*;

const TEXT_TOL: f32 = 1e-4;

fn diffusers_layout() -> FluxPipeline {
    load(&ModelFiles::from_dir(&fixture()).expect("diffusers layout resolves"))
}

#[test]
fn tokenizers_match_transformers_ids_exactly() {
    let r = reference();
    let s = setup();
    let p = diffusers_layout();
    for (prompt, clip, t5) in [
        (&s.prompt, "clip_input_ids", "t5_input_ids"),
        (&s.long_prompt, "long_clip_input_ids", "long_t5_input_ids"),
        (
            &s.punct_prompt,
            "punct_clip_input_ids",
            "punct_t5_input_ids",
        ),
    ] {
        let (got_clip, got_t5) = p.tokenize(prompt).expect("tokenize");
        assert_eq!(got_clip, ids(&r, clip), "CLIP ids for {prompt:?}");
        assert_eq!(got_t5, ids(&r, t5), "T5 ids for {prompt:?}");
    }
}

#[test]
fn text_encoders_match_within_1e4() {
    let r = reference();
    let s = setup();
    let mut p = diffusers_layout();
    for (prompt, pooled, hidden) in [
        (&s.prompt, "clip_pooled", "t5_hidden"),
        (&s.long_prompt, "long_clip_pooled", "long_t5_hidden"),
    ] {
        let emb = p.encode_prompt(prompt).expect("encode");
        let want_pooled = tensor(&r, pooled);
        let want_hidden = tensor(&r, hidden);
        assert!(
            std(&want_pooled) > 0.5 && std(&want_hidden) > 0.5,
            "reference is trivial"
        );
        let d_pooled = max_abs_diff(&emb.pooled, &want_pooled);
        let d_hidden = max_abs_diff(&emb.sequence, &want_hidden);
        eprintln!("{pooled}: max |Δ| {d_pooled:.2e}; {hidden}: max |Δ| {d_hidden:.2e}");
        assert!(d_pooled <= TEXT_TOL, "CLIP pooled differs by {d_pooled}");
        assert!(d_hidden <= TEXT_TOL, "T5 hidden differs by {d_hidden}");
    }
}

/// In bf16 the text encoders stay within bf16's rounding of diffusers' f32 numbers
/// (transformers' own T5 in bf16 lands 0.076 off on this fixture; candle-transformers' T5,
/// which also takes its scores, softmax and residual stream in bf16, landed 2.2 off).
#[test]
fn text_encoders_in_bf16_stay_within_bf16_rounding() {
    let r = reference();
    let s = setup();
    let files = ModelFiles::from_dir(&fixture()).expect("diffusers layout resolves");
    let options = pictor_engine::flux::FluxOptions {
        dtype: pictor_engine::DTypeChoice::Bf16,
        ..Default::default()
    };
    let mut p = FluxPipeline::load(&files, options).expect("loads in bf16");
    let emb = p.encode_prompt(&s.prompt).expect("encode");
    let d_pooled = max_abs_diff(&emb.pooled, &tensor(&r, "clip_pooled"));
    let d_hidden = max_abs_diff(&emb.sequence, &tensor(&r, "t5_hidden"));
    eprintln!("bf16: CLIP pooled max |Δ| {d_pooled:.3}; T5 hidden max |Δ| {d_hidden:.3}");
    assert!(
        d_pooled <= 0.05,
        "CLIP pooled in bf16 differs by {d_pooled}"
    );
    assert!(d_hidden <= 0.08, "T5 hidden in bf16 differs by {d_hidden}");
}

/// `pictor selfcheck --dtype bf16` on the CPU, with native bf16 products where this CPU has
/// them: every stage stays within the half-precision bound the check holds such runs to.
#[test]
fn bf16_on_the_cpu_stays_within_the_selfcheck_bound() {
    let options = pictor_engine::flux::FluxOptions {
        dtype: pictor_engine::DTypeChoice::Bf16,
        ..Default::default()
    };
    let report = pictor_engine::flux::selfcheck::run(&fixture(), options).expect("checks");
    for stage in &report.stages {
        let bound = report.bound(stage, None);
        eprintln!(
            "{}: max |Δ| {:.2e} of {:.2} (bound {bound:.2e})",
            stage.stage, stage.max_abs_diff, stage.reference_max_abs
        );
        assert!(
            stage.max_abs_diff <= bound,
            "{} is {} off, over {bound}",
            stage.stage,
            stage.max_abs_diff
        );
    }
}

#[test]
fn long_prompt_is_truncated_and_reported() {
    let s = setup();
    let mut p = diffusers_layout();
    let emb = p.encode_prompt(&s.long_prompt).expect("encode");
    assert!(emb.prompt.truncated && emb.prompt.pooled_truncated);
    assert!(emb.prompt.encoded.len() < s.long_prompt.len());
    assert!(s.long_prompt.starts_with(&emb.prompt.encoded));
    // The kept text is exactly what fits: re-encoding it gives the same 255 tokens + EOS
    // and nothing more is cut.
    let again = p
        .encode_prompt(&emb.prompt.encoded)
        .expect("encode kept text");
    assert!(
        !again.prompt.truncated,
        "kept text {:?} still overflows",
        emb.prompt.encoded
    );
    assert_eq!(
        p.tokenize(&emb.prompt.encoded).unwrap().1,
        p.tokenize(&s.long_prompt).unwrap().1
    );

    let short = p.encode_prompt(&s.prompt).expect("encode");
    assert!(!short.prompt.truncated && !short.prompt.pooled_truncated);
    let r = reference();
    let unpadded = ids(&r, "t5_input_ids").iter().filter(|&&i| i != 0).count();
    assert_eq!(
        short.prompt.tokens, unpadded,
        "tokens counts the prompt's ids, EOS included"
    );
    assert_eq!(
        emb.prompt.tokens, 256,
        "a truncated prompt fills the sequence"
    );
    assert_eq!(short.prompt.encoded, s.prompt);
}

fn check_first_step(p: &FluxPipeline, label: &str) {
    let r = reference();
    let emb = reference_embeddings(&r);
    let noise = tensor(&r, "noise");
    let (_, _, h, w) = noise.dims4().unwrap();
    let packed = sampling::pack(&noise).unwrap();
    assert_eq!(
        max_abs_diff(&packed, &tensor(&r, "noise_packed")),
        0.0,
        "packing differs"
    );
    let v = p
        .denoiser()
        .velocity(&packed, &emb, 1.0, None, (h, w))
        .expect("velocity");
    let want = tensor(&r, "transformer_out_step0");
    let d = max_abs_diff(&v, &want);
    eprintln!(
        "{label}: transformer step 0 max |Δ| {d:.2e} (reference std {:.3})",
        std(&want)
    );
    assert!(d <= STEP_TOL, "{label}: step-0 velocity differs by {d}");
}

#[test]
fn one_transformer_step_matches_within_1e4_diffusers_layout() {
    check_first_step(&diffusers_layout(), "diffusers transformer (sharded)");
}

/// The MLPs taken a few rows at a time (as 1024² images are at full width) give what they
/// give whole, since every row of the hidden activation is its own; and each image of a
/// batch, with its own prompt, comes out as it does alone.
#[test]
fn mlps_in_row_blocks_match_whole_ones() {
    let p = diffusers_layout();
    let r = reference();
    let mut emb = reference_embeddings(&r);
    let noise = tensor(&r, "noise");
    let (_, _, h, w) = noise.dims4().unwrap();
    let packed = sampling::pack(&noise).unwrap();
    // Two images with prompts of their own (so their modulations differ), so that blocks
    // also split the batch.
    let twice =
        |t: &candle_core::Tensor| candle_core::Tensor::cat(&[t, &(t * 0.5).unwrap()], 0).unwrap();
    let packed = twice(&packed);
    (emb.sequence, emb.pooled) = (twice(&emb.sequence), twice(&emb.pooled));
    let whole = p
        .denoiser()
        .velocity(&packed, &emb, 1.0, None, (h, w))
        .expect("velocity");
    // 3 rows of the fixture's hidden width per block: several blocks per image, the last
    // one short.
    let width = p.denoiser().transformer_arch().config.hidden_size * 4;
    pictor_engine::flux::set_mlp_block_elements(Some(3 * width));
    let blocks = p.denoiser().velocity(&packed, &emb, 1.0, None, (h, w));
    pictor_engine::flux::set_mlp_block_elements(None);
    let blocks = blocks.expect("velocity in row blocks");
    let d = max_abs_diff(&whole, &blocks);
    // Not bit for bit: gemm's kernels differ at the edges of blocks of other heights.
    assert!(d <= 1e-5, "row blocks differ from whole MLPs by {d}");
    let first = blocks.narrow(0, 0, 1).unwrap();
    let d = max_abs_diff(&first, &tensor(&r, "transformer_out_step0"));
    assert!(d <= STEP_TOL, "row blocks against diffusers: {d}");
    // The second image, alone, is what it was in the batch.
    let second = |t: &candle_core::Tensor| t.narrow(0, 1, 1).unwrap();
    (emb.sequence, emb.pooled) = (second(&emb.sequence), second(&emb.pooled));
    let alone = p
        .denoiser()
        .velocity(&second(&packed), &emb, 1.0, None, (h, w))
        .expect("velocity");
    let d = max_abs_diff(&alone, &second(&blocks));
    assert!(
        d <= 1e-5,
        "the batch's second image differs from itself alone by {d}"
    );
}

#[test]
fn one_transformer_step_matches_within_1e4_bfl_file() {
    let files =
        ModelFiles::from_file(&fixture().join("flux1-schnell.safetensors")).expect("resolves");
    check_first_step(&load(&files), "BFL flux1-schnell.safetensors");
}

#[test]
fn every_step_and_the_final_latents_match_within_1e4() {
    let r = reference();
    let s = setup();
    let p = diffusers_layout();
    let emb = reference_embeddings(&r);
    let noise = tensor(&r, "noise");
    let mut seen = Vec::new();
    let latents = p
        .denoiser()
        .denoise(&noise, &emb, s.steps, None, |state| {
            seen.push(state.step);
            Ok(Control::Continue)
        })
        .expect("denoise");
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    let d = max_abs_diff(&latents, &tensor(&r, "final_latents"));
    eprintln!("final latents max |Δ| {d:.2e}");
    assert!(d <= STEP_TOL, "final latents differ by {d}");
}

fn check_decode(p: &FluxPipeline, label: &str) {
    let r = reference();
    let s = setup();
    let image = p
        .denoiser()
        .decode(&tensor(&r, "final_latents"), s.height, s.width)
        .expect("decode");
    let want = tensor(&r, "image");
    let d = max_abs_diff(&image, &want);
    eprintln!("{label}: decoded pixels (0..1) max |Δ| {d:.2e}");
    assert!(d <= PIXEL_TOL, "{label}: pixels differ by {d}");
}

#[test]
fn decoded_pixels_match_within_1e3_diffusers_vae() {
    check_decode(&diffusers_layout(), "diffusers vae/");
}

#[test]
fn decoded_pixels_match_within_1e3_bfl_ae() {
    let dir = tempfile::tempdir().unwrap();
    link(
        &[
            "flux1-schnell.safetensors",
            "flux1-schnell.json",
            "ae.safetensors",
            "ae.json",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
        ],
        dir.path(),
    );
    let files = ModelFiles::from_dir(dir.path()).expect("BFL folder resolves");
    assert_eq!(files.vae.files, vec![dir.path().join("ae.safetensors")]);
    check_decode(&load(&files), "BFL ae.safetensors");
}

/// The whole pipeline from the prompt, with the reference's initial noise injected.
#[test]
fn prompt_to_pixels_matches_diffusers_end_to_end() {
    let r = reference();
    let s = setup();
    let mut p = diffusers_layout();
    let emb = p.encode_prompt(&s.prompt).expect("encode");
    let latents = p
        .denoiser()
        .denoise(&tensor(&r, "noise"), &emb, s.steps, None, |_| {
            Ok(Control::Continue)
        })
        .expect("denoise");
    let image = p
        .denoiser()
        .decode(&latents, s.height, s.width)
        .expect("decode");
    let d = max_abs_diff(&image, &tensor(&r, "image"));
    eprintln!("end to end: pixels max |Δ| {d:.2e}");
    assert!(d <= PIXEL_TOL, "end-to-end pixels differ by {d}");

    // 8-bit output: diffusers rounds; allow 1 LSB where a value sits on a rounding edge.
    let ours = pictor_engine::to_rgb8(&image).expect("rgb8");
    let want: Vec<u8> = tensor(&r, "image_u8")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = ours[0]
        .pixels
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "8-bit pixels differ by {worst}");
}

#[test]
fn generate_is_deterministic_per_seed_and_reports_progress() {
    let s = setup();
    let mut p = diffusers_layout();
    let req = pictor_engine::GenerationRequest {
        loras: Vec::new(),
        prompt: s.prompt.clone(),
        width: s.width,
        height: s.height,
        steps: 2,
        guidance: None,
        seed: 7,
        n: 2,
        previews: 0,
        edit: None,
    };
    let mut events = Vec::new();
    let a = p
        .generate(&req, &mut |e| {
            events.push(owned(e));
            Control::Continue
        })
        .expect("generate");
    assert_eq!(a.images.len(), 2);
    assert_eq!(
        (
            a.images[0].width,
            a.images[0].height,
            a.images[0].pixels.len()
        ),
        (s.width, s.height, s.width * s.height * 3)
    );
    assert_eq!(events.first(), Some(&Progress::Encoding));
    assert!(events.contains(&Progress::Step {
        step: 2,
        total: 2,
        first: 0,
        count: 2
    }));
    assert_eq!(events.last(), Some(&Progress::Decoding));
    assert_eq!(a.prompt.encoded, s.prompt);

    let b = p
        .generate(&req, &mut |_| Control::Continue)
        .expect("generate");
    assert_eq!(a.images, b.images, "same seed, same pixels");
    assert_ne!(a.images[0], a.images[1], "seed 7 and seed 8 differ");

    // Image 1 of the batch is the image seed 8 gives alone, batched or not.
    let single = p
        .generate(
            &pictor_engine::GenerationRequest {
                seed: 8,
                n: 1,
                ..req.clone()
            },
            &mut |_| Control::Continue,
        )
        .expect("generate");
    let diff = single.images[0]
        .pixels
        .iter()
        .zip(&a.images[1].pixels)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(
        diff <= 1,
        "batched image differs from the single one by {diff}"
    );
}

/// A copy of a progress event that borrows nothing (no previews are asked for here).
fn owned(e: Progress<'_>) -> Progress<'static> {
    match e {
        Progress::Encoding => Progress::Encoding,
        Progress::Step {
            step,
            total,
            first,
            count,
        } => Progress::Step {
            step,
            total,
            first,
            count,
        },
        Progress::Decoding => Progress::Decoding,
        Progress::Preview { .. } => panic!("no previews were asked for"),
    }
}

/// Previews come at the spread-out steps, for every image, and are the decoded clean-image
/// prediction of that step; at the last step that prediction is the final latent itself.
#[test]
fn previews_are_the_decoded_prediction_at_their_steps() {
    let s = setup();
    let mut p = diffusers_layout();
    let req = pictor_engine::GenerationRequest {
        loras: Vec::new(),
        prompt: s.prompt.clone(),
        width: s.width,
        height: s.height,
        steps: 4,
        guidance: None,
        seed: 5,
        n: 2,
        previews: 2,
        edit: None,
    };
    assert_eq!(pictor_engine::preview_steps(4, 2), vec![1, 3]);
    let mut seen = Vec::new();
    let generation = p
        .generate(&req, &mut |e| {
            if let Progress::Preview {
                request,
                image,
                index,
                step,
                pixels,
            } = e
            {
                seen.push((request, image, index, step, pixels.clone()));
            }
            Control::Continue
        })
        .expect("generate");
    let order: Vec<_> = seen
        .iter()
        .map(|(r, i, k, st, _)| (*r, *i, *k, *st))
        .collect();
    assert_eq!(
        order,
        vec![(0, 0, 0, 1), (0, 1, 0, 1), (0, 0, 1, 3), (0, 1, 1, 3)]
    );
    // The same image without previews is unchanged by them.
    let plain = p
        .generate(
            &pictor_engine::GenerationRequest {
                previews: 0,
                ..req.clone()
            },
            &mut |_| Control::Continue,
        )
        .expect("generate");
    assert_eq!(generation.images, plain.images);

    // Recompute image 0's step-3 preview by hand from the sampler's state.
    let emb = p.encode_prompt(&req.prompt).expect("encode");
    let noise = p
        .denoiser()
        .noise(req.seed, 1, req.height, req.width)
        .expect("noise");
    let mut clean = Vec::new();
    let latents = p
        .denoiser()
        .denoise(&noise, &emb, 4, None, |state| {
            clean.push(state.predicted_clean()?);
            Ok(Control::Continue)
        })
        .expect("denoise");
    assert!(clean[0].is_none(), "no prediction before the first step");
    let last = clean[4].as_ref().expect("after the last step");
    assert_eq!(
        max_abs_diff(last, &latents),
        0.0,
        "σ = 0: the prediction is x"
    );
    let decoded = p
        .denoiser()
        .decode(clean[3].as_ref().expect("step 3"), req.height, req.width)
        .expect("decode");
    let by_hand = pictor_engine::to_rgb8(&decoded).expect("rgb").remove(0);
    assert_eq!(seen[2].4, by_hand);
    assert_ne!(
        seen[2].4, generation.images[0],
        "a preview is not the final image"
    );
}

#[test]
fn cancel_stops_between_steps() {
    let s = setup();
    let mut p = diffusers_layout();
    let req = pictor_engine::GenerationRequest {
        loras: Vec::new(),
        prompt: s.prompt,
        width: s.width,
        height: s.height,
        steps: 4,
        guidance: None,
        seed: 1,
        n: 1,
        previews: 0,
        edit: None,
    };
    let mut steps = 0;
    let err = p
        .generate(&req, &mut |e| {
            if let Progress::Step { step, .. } = e {
                steps += 1;
                assert_eq!(step, 0, "cancel is honoured before the first step");
                return Control::Cancel;
            }
            Control::Continue
        })
        .expect_err("cancelled");
    assert!(
        matches!(err, pictor_engine::PipelineError::Cancelled),
        "{err}"
    );
    assert_eq!(steps, 1, "the first step never started");
}

#[test]
fn sizes_off_the_grid_are_rejected_with_the_field() {
    let p = diffusers_layout();
    let req = pictor_engine::GenerationRequest {
        loras: Vec::new(),
        prompt: "x".into(),
        width: 80,
        height: 40,
        steps: 4,
        guidance: None,
        seed: 0,
        n: 1,
        previews: 0,
        edit: None,
    };
    let e = p
        .rules()
        .without_serving_limits()
        .check(&req)
        .expect_err("40 is off the grid of 16");
    assert_eq!(e.param, "size");
    assert!(e.message.contains("height is 40"), "{e}");
    // The pipeline itself refuses it too, with the same words, before running anything.
    let mut p = p;
    match p.generate(&req, &mut |_| Control::Continue) {
        Err(pictor_engine::PipelineError::Invalid(again)) => assert_eq!(again, e),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// Requests with different prompts and seeds denoised in one batch give the images each
/// gets alone.
#[test]
fn a_batch_of_different_prompts_equals_each_alone() {
    let s = setup();
    let mut p = diffusers_layout();
    let a = pictor_engine::GenerationRequest {
        loras: Vec::new(),
        prompt: s.prompt.clone(),
        width: s.width,
        height: s.height,
        steps: 2,
        guidance: None,
        seed: 3,
        n: 2,
        previews: 0,
        edit: None,
    };
    let b = pictor_engine::GenerationRequest {
        prompt: s.punct_prompt.clone(),
        seed: 11,
        n: 1,
        ..a.clone()
    };
    let together = p
        .generate_batch(&[a.clone(), b.clone()], &mut |_| Control::Continue)
        .expect("batch");
    assert_eq!(together.len(), 2);
    assert_eq!((together[0].images.len(), together[1].images.len()), (2, 1));
    assert_eq!(together[1].prompt.encoded, s.punct_prompt);
    for (req, got) in [(&a, &together[0]), (&b, &together[1])] {
        let alone = p.generate(req, &mut |_| Control::Continue).expect("alone");
        for (x, y) in alone.images.iter().zip(&got.images) {
            let worst = x
                .pixels
                .iter()
                .zip(&y.pixels)
                .map(|(p, q)| p.abs_diff(*q))
                .max()
                .unwrap();
            assert!(
                worst <= 1,
                "batched image differs from its single run by {worst}"
            );
        }
    }
    assert_ne!(together[0].images[0], together[1].images[0]);
}

/// `dtype = bf16` on the CPU runs end to end (the decoder stays in f32 there, as candle
/// has no bf16 convolution on the CPU) and lands near the f32 image.
#[test]
fn bf16_on_the_cpu_generates_close_to_f32() {
    let s = setup();
    let files = ModelFiles::from_dir(&fixture()).expect("resolves");
    let options = pictor_engine::flux::FluxOptions {
        dtype: pictor_engine::DTypeChoice::Bf16,
        ..Default::default()
    };
    let mut bf16 = FluxPipeline::load(&files, options).expect("bf16 loads");
    let mut f32p = diffusers_layout();
    let req = pictor_engine::GenerationRequest {
        loras: Vec::new(),
        prompt: s.prompt.clone(),
        width: s.width,
        height: s.height,
        steps: 4,
        guidance: None,
        seed: 3,
        n: 1,
        previews: 0,
        edit: None,
    };
    let a = bf16
        .generate(&req, &mut |_| Control::Continue)
        .expect("bf16 generates");
    let b = f32p
        .generate(&req, &mut |_| Control::Continue)
        .expect("f32 generates");
    let pixels = &a.images[0].pixels;
    assert_eq!(pixels.len(), s.width * s.height * 3);
    let mean_diff = pixels
        .iter()
        .zip(&b.images[0].pixels)
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum::<f64>()
        / pixels.len() as f64;
    eprintln!("bf16 vs f32: mean |Δ| {mean_diff:.2} of 255");
    assert!(mean_diff < 8.0, "bf16 strays {mean_diff} from f32");
}

/// The encoder (image edits) on the first fixture, in both layouts: the posterior mean and
/// the normalised latents of a given image, against diffusers' `AutoencoderKL.encode`.
#[test]
fn encoder_matches_diffusers_in_both_layouts() {
    use pictor_engine::{Part, flux::encoder::Encoder};
    let r = reference();
    let image = tensor(&r, "encode_image");
    for (label, vae) in [
        (
            "diffusers vae/",
            Part::folder(&fixture().join("vae")).unwrap(),
        ),
        (
            "BFL ae.safetensors",
            Part {
                config: Some(fixture().join("ae.json")),
                ..Part::file(fixture().join("ae.safetensors"))
            },
        ),
    ] {
        let encoder =
            Encoder::load(&vae, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let mean = max_abs_diff(
            &encoder.posterior_mean(&image).unwrap(),
            &tensor(&r, "encode_mean"),
        );
        let latents = max_abs_diff(
            &encoder.encode(&image).unwrap(),
            &tensor(&r, "encode_latents"),
        );
        eprintln!("{label} encoder: mean {mean:.2e}, latents {latents:.2e}");
        assert!(mean <= STEP_TOL && latents <= STEP_TOL, "{label}");
    }
}
