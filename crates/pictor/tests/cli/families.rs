//! The model families beside FLUX.1-schnell from the command line: FLUX.1-dev's guidance
//! and a Z-Image-Turbo folder.

use super::{fixture, from_image_of, generate, pictor, small_generate};

/// FLUX.1-dev from the command line: `--guidance` reaches the image and its receipt, and
/// `--from-image` reproduces it at that guidance; schnell refuses a guidance scale.
#[test]
fn guidance_runs_on_a_dev_model_and_is_refused_by_schnell() {
    let dir = tempfile::tempdir().unwrap();
    let dev = fixture().with_file_name("tiny-flux-dev");
    let out = dir.path().join("dev.png");
    let run = generate(dev.to_str().unwrap(), &out, &["--guidance", "2"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let receipt = pictor_image::Receipt::from_image(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(receipt.guidance, Some(2.0));
    let again = dir.path().join("again.png");
    let run = from_image_of(&dev, &out, &again);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let a = image::open(&out).unwrap().to_rgb8();
    assert_eq!(a, image::open(&again).unwrap().to_rgb8(), "same pixels");
    let default = dir.path().join("default.png");
    let run = generate(dev.to_str().unwrap(), &default, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_ne!(a, image::open(&default).unwrap().to_rgb8(), "3.5 is not 2");

    let run = generate(
        fixture().to_str().unwrap(),
        &dir.path().join("schnell.png"),
        &["--guidance", "2"],
    );
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("guidance"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A Z-Image-Turbo diffusers folder runs from the command line like a FLUX one: the same
/// seed draws the same image, `--from-image` reproduces it, `models inspect` names it, and
/// what it cannot run yet (bf16) is refused with the reason.
#[test]
fn a_z_image_folder_generates_and_reproduces() {
    let dir = tempfile::tempdir().unwrap();
    let z = fixture().with_file_name("tiny-z-image-turbo");
    let out = dir.path().join("z.png");
    let run = generate(z.to_str().unwrap(), &out, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let again = dir.path().join("again.png");
    let run = from_image_of(&z, &out, &again);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let a = image::open(&out).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (64, 48));
    assert_eq!(a, image::open(&again).unwrap().to_rgb8(), "same pixels");
    let inspect = pictor()
        .args(["models", "inspect", z.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{stdout}");
    assert!(
        stdout.contains("a complete Z-Image-Turbo model"),
        "{stdout}"
    );
    // bf16 weights: the same picture to the eye, not to the bit.
    let half = dir.path().join("bf16.png");
    let run = generate(z.to_str().unwrap(), &half, &["--dtype", "bf16"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let b = image::open(&half).unwrap().to_rgb8();
    let worst = a
        .pixels()
        .zip(b.pixels())
        .flat_map(|(p, q)| {
            p.0.iter()
                .zip(q.0)
                .map(|(x, y)| x.abs_diff(y))
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap();
    assert!(worst <= 16, "bf16 pixels differ by {worst}");
    let run = generate(z.to_str().unwrap(), &half, &["--device", "cuda"]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("on the CPU so far"), "{stderr}");
}

/// ComfyUI's split files (the transformer named, its text encoder and autoencoder beside
/// it) and a GGUF transformer generate, and `models inspect` names their layout.
#[test]
fn z_image_split_files_and_gguf_generate() {
    let dir = tempfile::tempdir().unwrap();
    let split = fixture().with_file_name("tiny-z-image-turbo-split");
    for (file, layout) in [
        (
            "z_image_turbo_bf16.safetensors",
            "split files (ComfyUI's layout)",
        ),
        (
            "z_image_turbo-Q8_0.gguf",
            "the transformer quantized (GGUF)",
        ),
    ] {
        let path = split.join(file);
        let out = dir.path().join(format!("{file}.png"));
        let run = generate(path.to_str().unwrap(), &out, &[]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (64, 48));
        let inspect = pictor()
            .args(["models", "inspect", path.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&inspect.stdout);
        assert!(inspect.status.success(), "{stdout}");
        assert!(stdout.contains(layout), "{stdout}");
    }
}

/// Z-Image quantized: `pictor quantize` on its diffusers folder writes the transformer as a
/// GGUF in the original names, which runs beside the split text encoder and autoencoder;
/// `generate --quantize q8_0` converts the transformer once into the data folder's cache.
#[test]
fn z_image_quantizes_with_pictor_quantize_and_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let z = fixture().with_file_name("tiny-z-image-turbo");
    let split = fixture().with_file_name("tiny-z-image-turbo-split");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let gguf = model.join("z_image_turbo-Q8_0.gguf");
    let run = pictor()
        .arg("quantize")
        .arg(&z)
        .args(["--to", "q8_0", "-o"])
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for f in [
        "qwen_3_4b.safetensors",
        "ae.safetensors",
        "ae.json",
        "tokenizer.json",
    ] {
        let target = split.join(f).canonicalize().unwrap();
        std::os::unix::fs::symlink(target, model.join(f)).unwrap();
    }
    let out = dir.path().join("q.png");
    let run = generate(model.to_str().unwrap(), &out, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let at_load = |name: &str| {
        small_generate(&z)
            .env("XDG_DATA_HOME", dir.path())
            .args(["--quantize", "q8_0", "-o"])
            .arg(dir.path().join(name))
            .output()
            .unwrap()
    };
    let first = at_load("a.png");
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(
        stderr.contains("quantizing the zimage-transformer to Q8_0"),
        "{stderr}"
    );
    let second = at_load("b.png");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(!stderr.contains("quantizing"), "converted once: {stderr}");
    let made = std::fs::read_dir(dir.path().join("pictor/cache/quantized"))
        .unwrap()
        .count();
    assert_eq!(made, 1, "the transformer only");
}

/// A Z-Image repo in the Hugging Face cache, named by its repo id, is found and inspected.
#[test]
fn a_z_image_repo_in_the_hugging_face_cache_is_found_by_its_id() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--Tongyi-MAI--Z-Image-Turbo");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let z = fixture()
        .with_file_name("tiny-z-image-turbo")
        .canonicalize()
        .unwrap();
    for entry in std::fs::read_dir(&z).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let inspect = pictor()
        .env("HF_HUB_CACHE", cache.path())
        .args(["models", "inspect", "Tongyi-MAI/Z-Image-Turbo"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert!(
        stdout.contains("Z-Image-Turbo (diffusers folder"),
        "{stdout}"
    );
}
