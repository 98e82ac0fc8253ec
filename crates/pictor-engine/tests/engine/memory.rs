//! The memory budget: everything resident when it fits, T5 and the transformer taking
//! turns when only one of them fits beside the small parts (same images), and a refusal
//! naming the part, its size and the budget when even that cannot fit. On a GPU: all of it
//! there, or T5 on the CPU, or a refusal naming the GPU. The autoencoder's
//! share covers the encoder that edits load, and an edit runs staged as it runs resident.

use candle_core::DType;
use pictor_engine::{
    Control, EditInput, EngineError, GenerationRequest, ModelFiles, Pipeline, RgbImage,
    flux::{
        FluxOptions, FluxPipeline,
        memory::{GPU_WORKING_BYTES, WORKING_BYTES, plan, plan_gpu},
    },
};

use crate::common::*;

fn images(files: &ModelFiles, budget: Option<u64>) -> Result<Vec<Vec<u8>>, EngineError> {
    let mut p = FluxPipeline::load(
        files,
        FluxOptions {
            memory_budget: budget,
            ..FluxOptions::default()
        },
    )?;
    let mut out = Vec::new();
    // Two requests in a row: the second must find T5 again after the transformer ran.
    for prompt in ["a red circle", "a blue square"] {
        let req = GenerationRequest {
            prompt: prompt.into(),
            width: 64,
            height: 48,
            steps: 2,
            seed: 3,
            n: 1,
            ..Default::default()
        };
        // A load that succeeded must generate; only loading may fail here.
        let g = p
            .generate(&req, &mut |_| Control::Continue)
            .expect("a loaded model generates");
        out.push(g.images[0].pixels.clone());
    }
    // An edit of the last image: its encoder comes from the autoencoder's file too.
    let last = out.last().cloned().unwrap_or_default();
    let edit = GenerationRequest {
        prompt: "a green triangle".into(),
        width: 64,
        height: 48,
        steps: 2,
        seed: 4,
        n: 1,
        edit: Some(std::sync::Arc::new(EditInput {
            image: RgbImage {
                width: 64,
                height: 48,
                pixels: last,
            },
            mask: None,
            strength: 0.75,
            image_sha256: String::new(),
        })),
        ..Default::default()
    };
    let g = p
        .generate(&edit, &mut |_| Control::Continue)
        .expect("a loaded model edits");
    out.push(g.images[0].pixels.clone());
    Ok(out)
}

#[test]
fn budget_decides_resident_staged_or_refused() {
    let files = ModelFiles::from_dir(&fixture()).unwrap();
    let estimate = plan(&files, DType::F32, None).unwrap();
    let b = |p: &str| estimate.bytes(p);
    assert!(b("transformer") > 0 && b("t5") > 0 && b("clip") > 0 && b("vae") > 0);
    // The estimate is the f32 size of the weights: the fixture's BF16 transformer widened.
    let info = pictor_engine::inspect::inspect_file(&files.transformer.files[0]).unwrap();
    let params: u64 = info.parts.iter().map(|p| p.parameters).sum();
    let shards: u64 = files.transformer.files[1..]
        .iter()
        .map(|f| {
            pictor_engine::inspect::inspect_file(f)
                .unwrap()
                .parts
                .iter()
                .map(|p| p.parameters)
                .sum::<u64>()
        })
        .sum();
    assert_eq!(b("transformer"), (params + shards) * 4);

    // The autoencoder's estimate is its whole file, the encoder that edits load included.
    let vae_file = std::fs::read(&files.vae.files[0]).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&vae_file).unwrap();
    let (mut all, mut encoder) = (0u64, 0u64);
    for (name, info) in header.tensors() {
        let n: usize = info.shape.iter().product();
        all += n as u64;
        if name.starts_with("encoder.") {
            encoder += n as u64;
        }
    }
    assert!(encoder > 0, "the fixture's autoencoder holds its encoder");
    assert_eq!(b("vae"), all * 4);

    let small = WORKING_BYTES + b("clip") + b("vae");
    let everything = small + b("t5") + b("transformer");
    let resident = plan(&files, DType::F32, Some(everything)).unwrap();
    assert!(!resident.staged && resident.parts.iter().all(|p| p.resident));
    let reference = images(&files, None).unwrap();
    assert_eq!(images(&files, Some(everything)).unwrap(), reference);

    let turns = small + b("t5").max(b("transformer"));
    let staged = plan(&files, DType::F32, Some(turns)).unwrap();
    assert!(staged.staged);
    let resident_parts: Vec<&str> = staged
        .parts
        .iter()
        .filter(|p| p.resident)
        .map(|p| p.part)
        .collect();
    assert_eq!(resident_parts, ["clip", "vae"]);
    assert_eq!(
        images(&files, Some(turns)).unwrap(),
        reference,
        "staging changes no pixel"
    );

    let (big, label) = if b("transformer") >= b("t5") {
        (b("transformer"), "FLUX transformer")
    } else {
        (b("t5"), "T5 encoder")
    };
    let too_small = small + big - 1;
    let err = images(&files, Some(too_small)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngineError::OutOfMemory { .. }), "{text}");
    assert!(
        text.contains(label) && text.contains("pictor quantize"),
        "{text}"
    );
    assert!(
        text.contains(&pictor_engine::inspect::human_bytes(too_small)),
        "names the budget: {text}"
    );
}

/// On a GPU the budget is its free memory: everything there when it fits, T5 moved to the
/// CPU (in f32, or bf16 when the CPU's budget is short) when only the rest fits, and a
/// refusal naming the GPU when the transformer cannot fit beside the small parts.
#[test]
fn gpu_plan_moves_t5_to_the_cpu_before_refusing() {
    let files = ModelFiles::from_dir(&fixture()).unwrap();
    let gpu = "cuda:0 (Test GPU)";
    let est = plan(&files, DType::BF16, None).unwrap();
    let b = |p: &str| est.bytes(p);
    let rest = GPU_WORKING_BYTES + b("clip") + b("vae") + b("transformer");

    let whole = plan_gpu(&files, DType::BF16, gpu, rest + b("t5"), Some(0)).unwrap();
    assert_eq!(whole.t5_on_host, None);
    assert!(whole.parts.iter().all(|p| p.device == gpu && p.resident));

    let moved = plan_gpu(&files, DType::BF16, gpu, rest + b("t5") - 1, None).unwrap();
    assert_eq!(moved.t5_on_host, Some(DType::F32));
    let t5_f32 = plan(&files, DType::F32, None).unwrap().bytes("t5");
    for p in &moved.parts {
        let (device, bytes) = if p.part == "t5" {
            ("cpu", t5_f32)
        } else {
            (gpu, b(p.part))
        };
        assert_eq!((p.device.as_str(), p.bytes), (device, bytes), "{}", p.part);
    }
    assert!(
        !moved.staged,
        "nothing takes turns: T5 stays loaded on the CPU"
    );

    // The CPU's budget holds T5 in bf16 but not in f32.
    let host = WORKING_BYTES + b("t5");
    let short = plan_gpu(&files, DType::BF16, gpu, rest, Some(host)).unwrap();
    assert_eq!(short.t5_on_host, Some(DType::BF16));
    let err = plan_gpu(&files, DType::BF16, gpu, rest, Some(host - 1)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("T5 encoder") && text.contains(gpu), "{text}");

    let err = plan_gpu(&files, DType::BF16, gpu, rest - 1, None).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngineError::OutOfMemory { .. }), "{text}");
    assert!(
        text.contains("FLUX transformer")
            && text.contains(&format!("free on {gpu}"))
            && text.contains(&pictor_engine::inspect::human_bytes(rest - 1)),
        "{text}"
    );
}
