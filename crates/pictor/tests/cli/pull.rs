//! `pictor models pull` against a loopback fake of the Hugging Face Hub (`HF_ENDPOINT`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use super::{
    fake_hub, fixture, generate, pictor,
    serve::{self, ready},
    small_generate,
};

/// `pictor models pull ARGS` with the fake Hub, the cache under `home/hf` and the data
/// folder and working directory in `home`.
fn pull(hub: &fake_hub::Running, home: &Path, args: &[&str]) -> Output {
    pull_cmd(hub, home)
        .args(args)
        .output()
        .expect("pictor runs")
}

fn pull_cmd(hub: &fake_hub::Running, home: &Path) -> Command {
    let mut cmd = pictor();
    for var in [
        "HF_TOKEN",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_ENDPOINT", format!("{}/", hub.url))
        .env("HF_HOME", home.join("hf"))
        .env("XDG_DATA_HOME", home)
        .current_dir(home)
        .args(["models", "pull"]);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn snapshot(home: &Path, repo: &str, commit: &str) -> PathBuf {
    home.join("hf/hub")
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(commit)
}

#[test]
fn a_catalogue_model_is_pulled_resumed_checked_and_served() {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let mut repo = fake_hub::Repo::from_dir(&fixture(), commit);
    let shard = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors";
    repo.drop_once.insert(shard.into());
    let hub = fake_hub::start(BTreeMap::from([(
        "black-forest-labs/FLUX.1-schnell".to_string(),
        repo,
    )]));

    let out = pull(&hub, home.path(), &["flux-1-schnell", "--write-config"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("Added `flux-1-schnell`"), "{said}");

    // Only the diffusers folder: the single-file checkpoints and the references stay there.
    let log = hub.log();
    for skipped in [
        "flux1-schnell.safetensors",
        "ae.safetensors",
        "reference.safetensors",
        "README.md",
    ] {
        assert!(
            !log.iter().any(|l| l.split(' ').nth(1) == Some(skipped)),
            "{skipped}: {log:?}"
        );
    }
    // The dropped shard was resumed from where it broke, not fetched again from 0.
    let resumed: Vec<&String> = log
        .iter()
        .filter(|l| l.contains(shard) && !l.ends_with("bytes=0-0") && !l.ends_with("bytes=0-"))
        .collect();
    assert_eq!(resumed.len(), 1, "{log:?}");
    let from: u64 = resumed[0]
        .rsplit("bytes=")
        .next()
        .unwrap()
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from > 0, "{log:?}");
    // The standard cache layout, byte for byte, with `refs/main`.
    let snap = snapshot(home.path(), "black-forest-labs/FLUX.1-schnell", commit);
    for file in [
        "model_index.json",
        shard,
        "text_encoder_2/model-00002-of-00002.safetensors",
        "tokenizer_2/spiece.model",
    ] {
        assert_eq!(
            std::fs::read(snap.join(file)).unwrap(),
            std::fs::read(fixture().join(file)).unwrap(),
            "{file}"
        );
    }
    let refs = home
        .path()
        .join("hf/hub/models--black-forest-labs--FLUX.1-schnell/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap().trim(), commit);
    let config = std::fs::read_to_string(home.path().join("pictor.toml")).unwrap();
    assert_eq!(
        config,
        "[models.flux-1-schnell]\npath = \"black-forest-labs/FLUX.1-schnell\"\n"
    );

    // Pulling again fetches nothing, and will not configure the name twice.
    let before = hub.log().len();
    let again = pull(&hub, home.path(), &["flux-1-schnell"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("already here"), "{}", text(&again));
    assert_eq!(hub.log().len(), before, "{:?}", hub.log());
    let twice = pull(&hub, home.path(), &["flux-1-schnell", "--write-config"]);
    assert!(!twice.status.success());
    assert!(
        text(&twice).contains("already has a model `flux-1-schnell`"),
        "{}",
        text(&twice)
    );

    // `pictor models list` finds it complete and in the cache, beside what is not.
    let mut config = std::fs::read_to_string(home.path().join("pictor.toml")).unwrap();
    config.push_str("[models.gone]\npath = \"acme/not-pulled\"\n");
    config.push_str("[models.half]\npath = \"half\"\n");
    let half = home.path().join("half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::copy(
        fixture().join("ae.safetensors"),
        half.join("ae.safetensors"),
    )
    .unwrap();
    let listed_config = home.path().join("listed.toml");
    std::fs::write(&listed_config, config).unwrap();
    let loras = home.path().join("pictor/loras");
    std::fs::create_dir_all(&loras).unwrap();
    std::fs::write(loras.join("pixel-art.safetensors"), [0u8; 2048]).unwrap();
    let listed = pictor()
        .env("HF_HOME", home.path().join("hf"))
        .env("XDG_DATA_HOME", home.path())
        .current_dir(home.path())
        .args(["--config", "listed.toml", "models", "list"])
        .output()
        .unwrap();
    let said = text(&listed);
    assert!(listed.status.success(), "{said}");
    let line = |start: &str| {
        said.lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no line for {start}: {said}"))
            .to_string()
    };
    assert!(line("flux-1-schnell:").contains("FLUX, complete"), "{said}");
    assert!(line("gone:").contains("not found"), "{said}");
    let half_line = line("half:");
    assert!(
        half_line.contains("incomplete") && half_line.contains("no transformer"),
        "{said}"
    );
    assert!(line("pixel-art").contains("2.0 kB"), "{said}");
    assert!(
        line("black-forest-labs/FLUX.1-schnell").contains("used by flux-1-schnell"),
        "{said}"
    );

    // `pictor serve` serves it by the written configuration, from the cache.
    let mut cmd = pictor();
    cmd.env("HF_HOME", home.path().join("hf"))
        .env("XDG_DATA_HOME", home.path())
        .current_dir(home.path());
    let (mut server, url) = serve::start(cmd, std::process::Stdio::null());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let client = reqwest::Client::new();
        if !ready(&client, &url).await {
            return (0, String::new());
        }
        let body = serde_json::json!({"model": "flux-1-schnell", "prompt": "a red circle",
            "size": "256x256", "steps": 1, "response_format": "b64_json"});
        let r = client
            .post(format!("{url}/v1/images/generations"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert!(answer.1.contains("b64_json"), "{}", answer.1);
}

#[test]
fn a_quantized_catalogue_model_links_the_gguf_beside_the_other_parts() {
    let home = tempfile::tempdir().unwrap();
    let gguf = home.path().join("flux1-schnell-Q8_0.gguf");
    let q = pictor()
        .arg("quantize")
        .arg(fixture().join("flux1-schnell.safetensors"))
        .args(["--to", "q8_0", "-o"])
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", text(&q));
    let mut quantized = fake_hub::Repo {
        commit: "1111111111111111111111111111111111111111".into(),
        ..Default::default()
    };
    quantized.files.insert(
        "flux1-schnell-Q8_0.gguf".into(),
        std::fs::read(&gguf).unwrap(),
    );
    quantized
        .files
        .insert("flux1-schnell-Q4_K_S.gguf".into(), b"not this one".to_vec());
    quantized
        .files
        .insert("README.md".into(), b"# GGUF".to_vec());
    let base = fake_hub::Repo::from_dir(&fixture(), "2222222222222222222222222222222222222222");
    let hub = fake_hub::start(BTreeMap::from([
        ("black-forest-labs/FLUX.1-schnell".to_string(), base),
        ("city96/FLUX.1-schnell-gguf".to_string(), quantized),
    ]));
    let out = pull(
        &hub,
        home.path(),
        &["flux-1-schnell:q8_0", "--as", "schnell-q8"],
    );
    assert!(out.status.success(), "{}", text(&out));
    // Neither the base transformer nor the other quantization moved.
    let log = hub.log();
    assert!(
        !log.iter()
            .any(|l| l.contains(" transformer/") || l.contains("Q4_K_S")),
        "{log:?}"
    );
    let folder = home.path().join("pictor/models/schnell-q8");
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "[models.schnell-q8]\npath = \"{}\"",
            folder.display()
        )),
        "{said}"
    );
    // The linked folder is a model: the GGUF transformer with the base's other parts.
    let inspect = pictor()
        .args(["models", "inspect"])
        .arg(&folder)
        .output()
        .unwrap();
    assert!(inspect.status.success(), "{}", text(&inspect));
    let image = home.path().join("out.png");
    let generated = generate(folder.to_str().unwrap(), &image, &[]);
    assert!(generated.status.success(), "{}", text(&generated));
    assert!(image.is_file());
}

#[test]
fn a_gated_repo_needs_a_token_and_says_how_to_get_one() {
    let home = tempfile::tempdir().unwrap();
    let mut repo = fake_hub::Repo {
        commit: "3333333333333333333333333333333333333333".into(),
        gated: true,
        ..Default::default()
    };
    repo.files.insert("config.json".into(), b"{}".to_vec());
    repo.files
        .insert("model.safetensors".into(), vec![7u8; 4096]);
    let hub = fake_hub::start(BTreeMap::from([("acme/gated".to_string(), repo)]));

    let out = pull(&hub, home.path(), &["acme/gated"]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("401") && said.contains("gated") && said.contains("HF_TOKEN"),
        "{said}"
    );
    assert!(said.contains(&format!("{}/acme/gated", hub.url)), "{said}");

    let wrong = pull_cmd(&hub, home.path())
        .env("HF_TOKEN", "hf_other")
        .arg("acme/gated")
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        text(&wrong).contains("refused the token"),
        "{}",
        text(&wrong)
    );

    let right = pull_cmd(&hub, home.path())
        .env("HF_TOKEN", fake_hub::TOKEN)
        .arg("acme/gated")
        .output()
        .unwrap();
    assert!(right.status.success(), "{}", text(&right));
    let snap = snapshot(
        home.path(),
        "acme/gated",
        "3333333333333333333333333333333333333333",
    );
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        vec![7u8; 4096]
    );
    assert!(
        text(&right).contains("[models.gated]\npath = \"acme/gated\""),
        "{}",
        text(&right)
    );
}

#[test]
fn a_corrupted_download_is_caught_by_its_hash_and_not_kept() {
    let home = tempfile::tempdir().unwrap();
    let mut repo = fake_hub::Repo {
        commit: "4444444444444444444444444444444444444444".into(),
        ..Default::default()
    };
    repo.files
        .insert("good.safetensors".into(), vec![1u8; 3000]);
    repo.files.insert(
        "bad.safetensors".into(),
        (0..5000u32).map(|i| (i % 251) as u8).collect(),
    );
    repo.corrupt.insert("bad.safetensors".into());
    let hub = fake_hub::start(BTreeMap::from([("acme/broken".to_string(), repo)]));

    let out = pull(
        &hub,
        home.path(),
        &["acme/broken@main", "--include", "*.safetensors"],
    );
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("bad.safetensors") && said.contains("SHA-256") && said.contains("deleted"),
        "{said}"
    );
    // Fetched twice (once more after the first failed its check), and not left in the cache.
    let fetches = hub
        .log()
        .iter()
        .filter(|l| l.contains("bad.safetensors bytes=0-") && !l.ends_with("0-0"))
        .count();
    assert_eq!(fetches, 2, "{:?}", hub.log());
    let snap = snapshot(
        home.path(),
        "acme/broken",
        "4444444444444444444444444444444444444444",
    );
    assert!(!snap.join("bad.safetensors").exists());
    let blobs = home.path().join("hf/hub/models--acme--broken/blobs");
    for entry in std::fs::read_dir(blobs).unwrap() {
        let blob = std::fs::read(entry.unwrap().path()).unwrap();
        assert_ne!(blob.len(), 5000, "a corrupted copy was kept");
    }

    // Unknown names are named; a pattern matching nothing lists what is there.
    let unknown = pull(&hub, home.path(), &["flux-schnel"]);
    assert!(
        text(&unknown).contains("flux-1-schnell"),
        "{}",
        text(&unknown)
    );
    let missing = pull(&hub, home.path(), &["acme/nothing"]);
    assert!(text(&missing).contains("404"), "{}", text(&missing));
    let nomatch = pull(&hub, home.path(), &["acme/broken", "--include", "*.gguf"]);
    assert!(
        text(&nomatch).contains("no file matches `*.gguf`")
            && text(&nomatch).contains("good.safetensors")
    );
}

#[test]
fn a_lora_repo_is_linked_into_the_lora_folder_and_used() {
    let home = tempfile::tempdir().unwrap();
    let loras = fixture().join("../tiny-loras");
    let mut repo = fake_hub::Repo {
        commit: "5555555555555555555555555555555555555555".into(),
        ..Default::default()
    };
    repo.files.insert(
        "pixel_art_flux.safetensors".into(),
        std::fs::read(loras.join("pixel-kohya.safetensors")).unwrap(),
    );
    repo.files
        .insert("README.md".into(), b"# A pixel-art LoRA".to_vec());
    repo.files.insert(
        "sample.safetensors".into(),
        std::fs::read(loras.join("pixel-peft.safetensors")).unwrap(),
    );
    let hub = fake_hub::start(BTreeMap::from([("acme/pixel-art".to_string(), repo)]));
    // Two weight files: which one is the LoRA must be said.
    let two = pull(&hub, home.path(), &["acme/pixel-art", "--lora"]);
    assert!(
        !two.status.success() && text(&two).contains("--include"),
        "{}",
        text(&two)
    );
    let out = pull(
        &hub,
        home.path(),
        &[
            "acme/pixel-art",
            "--lora",
            "--include",
            "pixel_art_flux.safetensors",
            "--as",
            "pixel",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let link = home.path().join("pictor/loras/pixel.safetensors");
    assert_eq!(
        std::fs::read(&link).unwrap(),
        std::fs::read(loras.join("pixel-kohya.safetensors")).unwrap()
    );
    let image = home.path().join("out.png");
    let run = small_generate(fixture())
        .env("XDG_DATA_HOME", home.path())
        .args(["--lora", "pixel:0.8", "-o"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
}

#[test]
fn a_pull_larger_than_the_free_disk_stops_before_fetching() {
    let home = tempfile::tempdir().unwrap();
    let mut repo = fake_hub::Repo {
        commit: "5555555555555555555555555555555555555555".into(),
        ..Default::default()
    };
    repo.files.insert("huge.safetensors".into(), vec![7u8; 100]);
    repo.listed_size.insert("huge.safetensors".into(), 1 << 55);
    let hub = fake_hub::start(BTreeMap::from([("acme/huge".to_string(), repo)]));
    let out = pull(
        &hub,
        home.path(),
        &["acme/huge", "--include", "*.safetensors"],
    );
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("needs 32.0 PiB more") && said.contains("free") && said.contains("HF_HOME"),
        "{said}"
    );
    assert!(hub.log().is_empty(), "nothing fetched: {:?}", hub.log());
}
