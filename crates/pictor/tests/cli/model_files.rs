//! Model files as a user handles them: `pictor quantize` then inspect and generate,
//! quantizing at load, parts that do not fit, and RoPE axes set for a file that records none.

use std::path::Path;

use super::{fixture, generate, pictor, small_generate};

#[test]
fn quantize_then_inspect_then_generate_from_the_gguf_pair() {
    // A user with the BFL files makes small copies once, then points Pictor at them.
    let dir = tempfile::tempdir().unwrap();
    for (input, part, name) in [
        (
            fixture().join("flux1-schnell.safetensors"),
            None,
            "flux1-schnell-Q8_0.gguf",
        ),
        (fixture(), Some("t5"), "t5-Q8_0.gguf"),
    ] {
        let mut cmd = pictor();
        cmd.arg("quantize")
            .arg(&input)
            .args(["--to", "q8_0", "-o"])
            .arg(dir.path().join(name));
        if let Some(part) = part {
            cmd.args(["--part", part]);
        }
        let run = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "quantize: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(stdout.contains("Q8_0:"), "{stdout}");
    }
    // Refuses to overwrite.
    let again = pictor()
        .arg("quantize")
        .arg(fixture().join("flux1-schnell.safetensors"))
        .args(["--to", "q4_k", "-o"])
        .arg(dir.path().join("t5-Q8_0.gguf"))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));

    let inspect = pictor()
        .args(["models", "inspect"])
        .arg(dir.path().join("flux1-schnell-Q8_0.gguf"))
        .arg(dir.path().join("t5-Q8_0.gguf"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert!(
        text.contains("FLUX transformer (Black Forest Labs names): 80 tensors"),
        "{text}"
    );
    assert!(text.contains("T5 encoder (llama.cpp names)"), "{text}");
    assert!(text.contains("Q8_0"), "{text}");
    // The folder so far holds two parts: inspect describes them and names what is missing.
    let folder = |what: &str| {
        let run = pictor()
            .args(["models", "inspect"])
            .arg(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&run.stdout).to_string();
        assert!(run.status.success(), "{what}: {text}");
        text
    };
    let text = folder("partial");
    assert!(
        text.contains("2 heads of 32, RoPE axes [4, 14, 14] (from the file's metadata)"),
        "{text}"
    );
    assert!(text.contains("32-wide token embeddings out"), "{text}");
    assert!(
        text.contains("autoencoder: missing") && text.contains("CLIP: missing"),
        "{text}"
    );
    assert!(
        text.contains("incomplete") && !text.contains("a complete FLUX model"),
        "{text}"
    );
    // Beside the two GGUF files, the rest of the model as split files and its tokenizers;
    // the autoencoder's config beside it, since its decoder is not FLUX.1's.
    for e in [
        "ae.safetensors",
        "ae.json",
        "text_encoder",
        "tokenizer",
        "tokenizer_2",
    ] {
        std::os::unix::fs::symlink(
            fixture().join(e).canonicalize().unwrap(),
            dir.path().join(e),
        )
        .unwrap();
    }
    let text = folder("complete");
    assert!(text.contains("a complete FLUX model"), "{text}");
    assert!(
        text.contains("32 groups, latent scale 0.3611 and shift 0.1159 (from ")
            && text.contains("ae.json)"),
        "{text}"
    );
    let out = dir.path().join("q.png");
    let run = generate(dir.path().to_str().unwrap(), &out, &[]);
    assert!(
        run.status.success(),
        "generate: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(image::open(&out).is_ok());
}

#[test]
fn quantize_at_load_converts_once_and_a_small_budget_is_refused_by_part() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], config: Option<&str>| {
        let mut cmd = small_generate(fixture());
        cmd.env("XDG_DATA_HOME", dir.path());
        if let Some(text) = config {
            let path = dir.path().join("pictor.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        cmd.arg("-o")
            .arg(dir.path().join("q.png"))
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&["--quantize", "q8_0"], None);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(
        stderr.contains("quantizing the transformer to Q8_0"),
        "{stderr}"
    );
    let cache = dir.path().join("pictor/cache/quantized");
    let made: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(made.len(), 2, "transformer and T5: {made:?}");
    let second = run(&["--quantize", "q8_0"], None);
    assert!(second.status.success());
    assert!(
        !String::from_utf8_lossy(&second.stderr).contains("quantizing"),
        "reused"
    );

    let refused = run(&[], Some("memory_budget = \"64 MiB\"\n"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("not enough memory")
            && stderr.contains("FLUX transformer")
            && stderr.contains("memory budget of"),
        "{stderr}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A folder whose T5 comes from another model: `models inspect` and `generate` say the
/// same thing, that it cannot load and why, before anything is loaded.
#[test]
fn inspect_and_generate_agree_on_parts_that_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mixed");
    for part in [
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ] {
        copy_dir(&fixture().join(part), &model.join(part));
    }
    std::fs::copy(
        fixture().join("model_index.json"),
        model.join("model_index.json"),
    )
    .unwrap();
    let shipped = fixture().join("../../../models/pictor-tiny");
    copy_dir(
        &shipped.join("text_encoder_2"),
        &model.join("text_encoder_2"),
    );

    let inspect = pictor()
        .args(["models", "inspect"])
        .arg(&model)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{text}");
    assert!(!text.contains("a complete FLUX model"), "{text}");
    assert!(
        text.contains("cannot load") && text.contains("txt_in takes 32"),
        "{text}"
    );

    let run = generate(model.to_str().unwrap(), &dir.path().join("x.png"), &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("do not fit together") && stderr.contains("txt_in takes 32"),
        "{stderr}"
    );
}

/// A transformer file whose heads are not FLUX.1's and that records no RoPE axes is
/// refused, saying what to set; with `rope_axes` in the model's settings it draws what the
/// same model in diffusers' layout (whose config records them) draws.
#[test]
fn rope_axes_in_the_settings_serve_a_transformer_that_records_none() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("bfl");
    std::fs::create_dir(&model).unwrap();
    for e in [
        "flux1-schnell.safetensors",
        "ae.safetensors",
        "ae.json",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ] {
        std::os::unix::fs::symlink(fixture().join(e).canonicalize().unwrap(), model.join(e))
            .unwrap();
    }
    let run = |settings: &str, out: &Path| {
        let config = dir.path().join("pictor.toml");
        std::fs::write(
            &config,
            format!("[models.bfl]\npath = {:?}\n{settings}", model.display()),
        )
        .unwrap();
        pictor()
            .env("XDG_DATA_HOME", dir.path())
            .arg("--config")
            .arg(&config)
            .args(["generate", "--model", "bfl", "--prompt", "a red circle"])
            .args(["--size", "64x48", "--steps", "2", "--seed", "3", "-o"])
            .arg(out)
            .output()
            .unwrap()
    };
    let refused = run("", &dir.path().join("no.png"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("32 wide") && stderr.contains("rope_axes"),
        "{stderr}"
    );

    let out = dir.path().join("bfl.png");
    let served = run("rope_axes = [4, 14, 14]\n", &out);
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    let reference = dir.path().join("diffusers.png");
    let run = small_generate(fixture())
        .args(["--seed", "3", "-o"])
        .arg(&reference)
        .output()
        .unwrap();
    assert!(run.status.success());
    let a = image::open(&out).unwrap().to_rgb8();
    let b = image::open(&reference).unwrap().to_rgb8();
    let most = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(most <= 1, "the two layouts draw {most} levels apart");
}
