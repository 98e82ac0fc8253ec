//! The `pictor` binary, driven as a user would.

mod fake_hub;
mod families;
mod model_files;
mod pull;
mod serve;

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

/// `pictor generate --model MODEL` of a small red circle (64x48, 2 steps), for a test to
/// add its own flags to.
fn small_generate(model: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = pictor();
    cmd.args(["generate", "--model"]).arg(model).args([
        "--prompt",
        "a red circle",
        "--size",
        "64x48",
        "--steps",
        "2",
    ]);
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
        small_generate(fixture())
            .env("PICTOR_LORA_DIR", &loras)
            .args(["--seed", "3"])
            .args(args)
            .arg("-o")
            .arg(out)
            .output()
            .expect("pictor runs")
    };
    let styled = dir.path().join("styled.png");
    let out = run(&["--lora", "pixel-kohya:0.8"], &styled);
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
    assert!(run(&[], &plain).status.success());
    let again = dir.path().join("again.png");
    let out = pictor()
        .env("PICTOR_LORA_DIR", &loras)
        .args(["generate", "--model"])
        .arg(fixture())
        .arg("--from-image")
        .arg(&styled)
        .arg("-o")
        .arg(&again)
        .output()
        .expect("pictor runs");
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
    let missing = run(&["--lora", "nope"], &dir.path().join("x.png"));
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(
        said.contains("no LoRA `nope`") && said.contains("pixel-kohya"),
        "{said}"
    );
}
