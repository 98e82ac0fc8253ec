//! The `pictor` binary, driven as a user would.

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
