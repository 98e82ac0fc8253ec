//! The `pictor` binary, driven as a user would.

mod fake_hub;
mod families;
mod pull;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny-flux-schnell")
}

fn pictor() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pictor"));
    cmd.env_remove("HF_HUB_CACHE").env_remove("HF_HOME");
    cmd
}

fn generate(model: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    pictor()
        .args([
            "generate",
            "--model",
            model,
            "--prompt",
            "a small red circle on a blue background",
        ])
        .args(["--size", "64x48", "--steps", "2", "--seed", "7"])
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .expect("pictor runs")
}

#[test]
fn generate_writes_decodable_pngs_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let run = generate(fixture().to_str().unwrap(), &out, &["-n", "2"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("out-0.png") && stdout.contains("seed 8"),
        "{stdout}"
    );
    let a = image::open(dir.path().join("out-0.png")).unwrap().to_rgb8();
    let b = image::open(dir.path().join("out-1.png")).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (64, 48));
    assert_ne!(a, b, "different seeds draw different images");

    // The same command again: the same bytes.
    let first = std::fs::read(dir.path().join("out-0.png")).unwrap();
    let again = generate(fixture().to_str().unwrap(), &out, &["-n", "2"]);
    assert!(again.status.success());
    assert_eq!(first, std::fs::read(dir.path().join("out-0.png")).unwrap());
}

#[test]
fn bad_size_fails_with_a_message_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let run = pictor()
        .args([
            "generate",
            "--model",
            fixture().to_str().unwrap(),
            "--prompt",
            "x",
            "--size",
            "250x256",
        ])
        .arg("-o")
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("width") && stderr.contains("250"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn repo_id_is_found_under_hf_home() {
    let home = tempfile::tempdir().unwrap();
    let repo = home
        .path()
        .join("hub/models--black-forest-labs--FLUX.1-schnell");
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    std::os::unix::fs::symlink(
        fixture().canonicalize().unwrap(),
        repo.join("snapshots/abc123"),
    )
    .unwrap();
    let out = home.path().join("o.png");
    let run = pictor()
        .env("HF_HOME", home.path())
        .args([
            "generate",
            "--model",
            "black-forest-labs/FLUX.1-schnell",
            "--prompt",
            "x",
        ])
        .args(["--size", "32x32", "--steps", "1"])
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (32, 32));
}

#[test]
fn unknown_model_is_a_clear_error() {
    let run = pictor()
        .args([
            "generate",
            "--model",
            "nobody/nothing",
            "--prompt",
            "x",
            "-o",
            "/dev/null",
        ])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("nobody/nothing") && stderr.contains("not"),
        "{stderr}"
    );
}

/// Waits (up to 30 s) for a server at `url` to answer `/readyz`.
async fn ready(client: &reqwest::Client, url: &str) -> bool {
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serve_refuses_a_public_address_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = pictor()
        .env("XDG_DATA_HOME", dir.path())
        .current_dir(dir.path())
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("keys create") && stderr.contains("0.0.0.0"),
        "{stderr}"
    );
}

#[test]
fn serve_answers_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = pictor()
        .env("XDG_DATA_HOME", dir.path())
        .current_dir(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ready = rt.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = client.get(format!("{url}/readyz")).send().await
                && r.status() == 200
            {
                let body = serde_json::json!({"model": "gpt-image-1", "prompt": "a cat", "size": "128x128",
                                              "response_format": "b64_json"});
                let r = client.post(format!("{url}/v1/images/generations")).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                // It draws only the size it was trained at, and says so.
                let other = serde_json::json!({"model": "gpt-image-1", "prompt": "a cat", "size": "256x256"});
                let r = client.post(format!("{url}/v1/images/generations")).json(&other).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 400);
                let refused: serde_json::Value = r.json().await.unwrap();
                assert_eq!(refused["error"]["param"], "size");
                let why = refused["error"]["message"].as_str().unwrap_or_default();
                assert!(why.contains("draws only 128x128"), "{why}");
                // Each part's memory, in /v1/models and /metrics.
                let models: serde_json::Value =
                    client.get(format!("{url}/v1/models")).send().await.unwrap().json().await.unwrap();
                let rules = &models["data"][0]["rules"];
                assert_eq!(rules["default_size"], "128x128", "{models}");
                assert_eq!((rules["min_side"].as_u64(), rules["max_side"].as_u64()), (Some(128), Some(128)));
                let parts = models["data"][0]["memory"].as_array().cloned().unwrap_or_default();
                let names: Vec<&str> = parts.iter().filter_map(|p| p["part"].as_str()).collect();
                assert_eq!(names, ["clip", "t5", "transformer", "vae"], "{models}");
                assert!(parts.iter().all(|p| p["bytes"].as_u64().unwrap_or(0) > 0 && p["resident"] == true));
                // A build without CUDA runs `device = "auto"` on the CPU, and says so.
                assert_eq!(models["data"][0]["device"], "cpu f32", "{models}");
                assert!(parts.iter().all(|p| p["device"] == "cpu"), "{models}");
                // The seed's own request on a fresh install: 404, and the command that gets it.
                let seed = serde_json::json!({"model": "flux-1-schnell", "prompt": "A white siamese cat"});
                let r = client.post(format!("{url}/v1/images/generations")).json(&seed).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 404);
                let missing: serde_json::Value = r.json().await.unwrap();
                let why = missing["error"]["message"].as_str().unwrap_or_default();
                assert!(why.contains("pictor models pull flux-1-schnell") && why.contains("pictor-tiny"), "{why}");
                let metrics = client.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
                assert!(metrics.contains("pictor_model_memory_bytes{"), "{metrics}");
                assert!(metrics.contains("pictor_process_resident_bytes"), "{metrics}");
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        0
    });
    assert_eq!(
        ready, 200,
        "the shipped model answers with no config and no key on loopback"
    );
    // SIGTERM: graceful shutdown, exit status 0.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    // The data directory (hashed keys, usage, images, the signing key) is the user's alone.
    use std::os::unix::fs::PermissionsExt;
    let data = dir.path().join("pictor");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        let want = if entry.file_type().unwrap().is_dir() {
            0o700
        } else {
            0o600
        };
        assert_eq!(mode(&entry.path()), want, "{}", entry.path().display());
    }
    assert_eq!(mode(&data.join("pictor.db")), 0o600);
}

/// An image reproduces from its own file: the receipt in the PNG gives the prompt, steps,
/// seed and size, and the pixels come out the same.
/// `pictor generate --from-image SRC -o OUT` with the fixture model.
fn from_image(src: &Path, out: &Path) -> std::process::Output {
    from_image_of(&fixture(), src, out)
}

/// `pictor generate --model MODEL --from-image SRC -o OUT`.
fn from_image_of(model: &Path, src: &Path, out: &Path) -> std::process::Output {
    pictor()
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--from-image",
        ])
        .arg(src)
        .arg("-o")
        .arg(out)
        .output()
        .expect("pictor runs")
}

#[test]
fn from_image_reproduces_an_image_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let run = generate(fixture().to_str().unwrap(), &out, &["-n", "2"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let original = dir.path().join("out-1.png");
    let again = dir.path().join("again.png");
    let run = from_image(&original, &again);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("seed 8"));
    let a = image::open(&original).unwrap().to_rgb8();
    let b = image::open(&again).unwrap().to_rgb8();
    assert_eq!(a, b, "same pixels");

    // WebP (lossless) carries the receipt in EXIF and reproduces the same way.
    let webp = dir.path().join("out.webp");
    let run = generate(fixture().to_str().unwrap(), &webp, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let from_webp = dir.path().join("from-webp.png");
    let run = from_image(&webp, &from_webp);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        image::open(&webp).unwrap().to_rgb8(),
        image::open(&from_webp).unwrap().to_rgb8()
    );

    // A PNG without a receipt is a clear error.
    let plain = dir.path().join("plain.png");
    image::RgbImage::new(4, 4).save(&plain).unwrap();
    let run = from_image(&plain, &dir.path().join("never.png"));
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("parameters"));
}

#[test]
fn keys_carry_rate_limits_from_create_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let keys = |args: &[&str]| {
        let run = pictor()
            .env("XDG_DATA_HOME", dir.path())
            .current_dir(dir.path())
            .arg("keys")
            .args(args)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        (
            String::from_utf8_lossy(&run.stdout).to_string(),
            String::from_utf8_lossy(&run.stderr).to_string(),
        )
    };
    let (secret, created) = keys(&["create", "--name", "ci", "--rpm", "30"]);
    assert!(secret.trim().starts_with("sk-"));
    let id = created
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .expect("the id is printed")
        .to_string();
    let (list, _) = keys(&["list"]);
    assert!(list.contains("30/-"), "{list}");
    let (set, _) = keys(&["limit", &id, "--ipm", "8"]);
    assert!(set.contains("30/8"), "a limit not given is kept: {set}");
    let (set, _) = keys(&["limit", &id, "--rpm", "0"]);
    assert!(set.contains("-/8"), "0 removes a limit: {set}");
}

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
        let mut cmd = pictor();
        cmd.env("XDG_DATA_HOME", dir.path());
        if let Some(text) = config {
            let path = dir.path().join("pictor.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        cmd.args(["generate", "--model"])
            .arg(fixture())
            .args([
                "--prompt",
                "a red circle",
                "--size",
                "64x48",
                "--steps",
                "2",
                "-o",
            ])
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
    let run = pictor()
        .args(["generate", "--model"])
        .arg(fixture())
        .args([
            "--prompt",
            "a red circle",
            "--size",
            "64x48",
            "--steps",
            "2",
        ])
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

#[test]
fn migrate_prepares_the_configured_database_and_refuses_an_unknown_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = pictor()
        .arg("migrate")
        .env("PICTOR_DATA_DIR", dir.path())
        .env_remove("PICTOR_DATABASE_URL")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success() && said.contains("Sqlite"), "{said}");
    assert!(dir.path().join("pictor.db").exists());
    let run = pictor()
        .arg("migrate")
        .env("PICTOR_DATA_DIR", dir.path())
        .env("PICTOR_DATABASE_URL", "mysql://localhost/pictor")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && said.contains("postgres://"),
        "{said}"
    );
}

/// `pictor selfcheck` runs the fixture's stages against diffusers' numbers and reports
/// them as JSON; it fails where a stage is out of bounds, or the device cannot be used.
#[test]
fn selfcheck_reports_every_stage_and_fails_out_of_bounds() {
    let out = pictor().arg("selfcheck").arg(fixture()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["device"], "cpu f32");
    assert_eq!(report["passed"], true);
    let stages: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "clip_pooled",
            "t5_hidden",
            "transformer_step0",
            "final_latents",
            "pixels"
        ]
    );
    for s in report["stages"].as_array().unwrap() {
        assert!(
            s["max_abs_diff"].as_f64().unwrap() <= s["bound"].as_f64().unwrap(),
            "{s}"
        );
        assert!(s["reference_max_abs"].as_f64().unwrap() > 0.5, "{s}");
    }

    let strict = pictor()
        .args(["selfcheck", "--max-relative", "1e-12"])
        .arg(fixture())
        .output()
        .unwrap();
    assert!(!strict.status.success());
    let report: serde_json::Value = serde_json::from_slice(&strict.stdout).unwrap();
    assert_eq!(report["passed"], false);
    assert!(String::from_utf8_lossy(&strict.stderr).contains("out of bounds on cpu f32"));

    let gpu = pictor()
        .args(["selfcheck", "--device", "cuda:0"])
        .arg(fixture())
        .output()
        .unwrap();
    assert!(!gpu.status.success());
    let why = String::from_utf8_lossy(&gpu.stderr);
    assert!(why.contains("cannot use cuda:0"), "{why}");
}

/// `--lora NAME:SCALE` from the LoRA folder (here set by `PICTOR_LORA_DIR`): recorded in
/// the receipt, reproduced by `--from-image`, and an unknown name says what there is.
#[test]
fn loras_on_the_command_line_are_recorded_and_reproduced() {
    let dir = tempfile::tempdir().unwrap();
    let loras = fixture().join("../tiny-loras");
    let run = |args: &[&str], out: &Path| {
        pictor()
            .env("PICTOR_LORA_DIR", &loras)
            .args(["generate", "--model", fixture().to_str().unwrap()])
            .args(args)
            .arg("-o")
            .arg(out)
            .output()
            .expect("pictor runs")
    };
    let base = [
        "--prompt",
        "a red circle",
        "--size",
        "64x48",
        "--steps",
        "2",
        "--seed",
        "3",
    ];
    let styled = dir.path().join("styled.png");
    let out = run(
        &[&base[..], &["--lora", "pixel-kohya:0.8"]].concat(),
        &styled,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let receipt = pictor_image::Receipt::from_image(&std::fs::read(&styled).unwrap()).unwrap();
    let [lora] = receipt.loras.as_slice() else {
        panic!("{receipt:?}");
    };
    assert_eq!(
        (lora.name.as_str(), lora.scale, lora.sha256.len()),
        ("pixel-kohya", 0.8, 12)
    );
    let plain = dir.path().join("plain.png");
    assert!(run(&base, &plain).status.success());
    let again = dir.path().join("again.png");
    let out = run(&["--from-image", styled.to_str().unwrap()], &again);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8();
    assert_eq!(
        pixels(&styled),
        pixels(&again),
        "--from-image re-applies the LoRA"
    );
    assert_ne!(pixels(&styled), pixels(&plain));
    let missing = run(
        &[&base[..], &["--lora", "nope"]].concat(),
        &dir.path().join("x.png"),
    );
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(
        said.contains("no LoRA `nope`") && said.contains("pixel-kohya"),
        "{said}"
    );
}
