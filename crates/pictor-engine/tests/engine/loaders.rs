//! Every way of pointing at a model: diffusers folders, BFL files, single files, Hugging
//! Face cache snapshots. Each is checked to pick the right files and to compute the same
//! first transformer step as the reference.

use std::path::Path;

use pictor_engine::ModelFiles;

use crate::common::*;

/// Loads `files` and checks one transformer step against the reference (1e-4).
fn assert_runs_like_reference(files: &ModelFiles) {
    let d = step0_error(files);
    assert!(d <= 1e-4, "step 0 differs by {d}");
}

#[test]
fn diffusers_folder_uses_subfolders_and_sharded_indexes() {
    let files = ModelFiles::from_dir(&fixture()).expect("resolves");
    let t = &files.transformer;
    assert_eq!(
        t.files.len(),
        2,
        "the transformer index names two shards: {:?}",
        t.files
    );
    assert!(
        t.files
            .iter()
            .all(|f| f.parent().unwrap().ends_with("transformer"))
    );
    assert!(
        t.config
            .as_ref()
            .unwrap()
            .ends_with("transformer/config.json")
    );
    assert_eq!(files.t5.files.len(), 2, "T5 is sharded too");
    assert!(files.vae.files[0].ends_with("vae/diffusion_pytorch_model.safetensors"));
    assert!(
        files
            .clip_tokenizer
            .as_ref()
            .is_some_and(|t| t.ends_with("tokenizer"))
    );
    assert_runs_like_reference(&files);
}

#[test]
fn bfl_files_at_the_top_of_a_folder_are_recognised_by_content() {
    let dir = tempfile::tempdir().unwrap();
    link(
        &["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"],
        dir.path(),
    );
    // Renamed on purpose: parts are recognised by tensor names, not file names.
    for (src, dst) in [
        ("flux1-schnell.safetensors", "my-transformer.safetensors"),
        ("flux1-schnell.json", "my-transformer.json"),
        ("ae.safetensors", "decoder.safetensors"),
        ("ae.json", "decoder.json"),
    ] {
        std::os::unix::fs::symlink(
            fixture().join(src).canonicalize().unwrap(),
            dir.path().join(dst),
        )
        .unwrap();
    }
    let files = ModelFiles::from_dir(dir.path()).expect("resolves");
    assert_eq!(
        files.transformer.files,
        vec![dir.path().join("my-transformer.safetensors")]
    );
    assert_eq!(
        files.vae.files,
        vec![dir.path().join("decoder.safetensors")]
    );
    // Each finds the config named after it, which records what its tensors cannot.
    assert_eq!(
        files.transformer.config,
        Some(dir.path().join("my-transformer.json"))
    );
    assert_eq!(files.vae.config, Some(dir.path().join("decoder.json")));
    assert_runs_like_reference(&files);
}

#[test]
fn a_transformer_file_finds_its_other_parts_beside_it() {
    let file = fixture().join("flux1-schnell.safetensors");
    let files = ModelFiles::resolve(file.to_str().unwrap()).expect("resolves");
    assert_eq!(files.transformer.files, vec![file]);
    assert!(files.vae.files[0].ends_with("vae/diffusion_pytorch_model.safetensors"));
    assert_runs_like_reference(&files);
}

#[test]
fn a_file_that_is_not_a_transformer_is_refused_with_what_it_is() {
    let err =
        ModelFiles::from_file(&fixture().join("ae.safetensors")).expect_err("not a transformer");
    let msg = err.to_string();
    assert!(
        msg.contains("ae.safetensors") && msg.contains("autoencoder"),
        "{msg}"
    );
}

/// Builds a Hugging Face cache the way `huggingface_hub` does: blobs named by hash,
/// snapshot folders of symlinks into them, `refs/main` naming the snapshot.
fn make_hf_cache(cache: &Path, repo: &str, revision: &str) {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let blobs = repo_dir.join("blobs");
    let snapshot = repo_dir.join("snapshots").join(revision);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), revision).unwrap();
    let mut n = 0;
    for entry in walk(&fixture()) {
        let rel = entry.strip_prefix(fixture()).unwrap();
        if rel.starts_with("reference.safetensors") || rel.starts_with("README.md") {
            continue;
        }
        n += 1;
        let blob = blobs.join(format!("blob{n:04}"));
        std::fs::copy(&entry, &blob).unwrap();
        let link = snapshot.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&blob, &link).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_repo_id_resolves_through_the_hugging_face_cache() {
    let cache = tempfile::tempdir().unwrap();
    make_hf_cache(cache.path(), "black-forest-labs/FLUX.1-schnell", "0123abcd");
    let files =
        ModelFiles::resolve_in("black-forest-labs/FLUX.1-schnell", cache.path()).expect("resolves");
    let snap = cache
        .path()
        .join("models--black-forest-labs--FLUX.1-schnell/snapshots/0123abcd");
    assert!(files.transformer.files.iter().all(|f| f.starts_with(&snap)));
    assert_runs_like_reference(&files);

    // An explicit revision, and one that is not there.
    assert!(
        ModelFiles::resolve_in("black-forest-labs/FLUX.1-schnell@0123abcd", cache.path()).is_ok()
    );
    let err = ModelFiles::resolve_in("black-forest-labs/FLUX.1-dev", cache.path())
        .expect_err("not cached");
    assert!(err.to_string().contains("FLUX.1-dev"), "{err}");
}

/// One file holding every part under prefixes, as bundled single-file checkpoints do:
/// each part finds its own tensors by their names.
#[test]
fn a_bundled_file_with_prefixed_parts_loads_every_part() {
    use candle_core::Device;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.safetensors");
    let mut all = std::collections::HashMap::new();
    let base = ModelFiles::from_dir(&fixture()).unwrap();
    let parts = [
        (
            "model.diffusion_model.",
            vec![fixture().join("flux1-schnell.safetensors")],
        ),
        ("vae.", vec![fixture().join("ae.safetensors")]),
        ("text_encoders.clip_l.transformer.", base.clip.files.clone()),
        ("text_encoders.t5xxl.transformer.", base.t5.files.clone()),
    ];
    for (prefix, files) in &parts {
        for f in files {
            for (name, t) in candle_core::safetensors::load(f, &Device::Cpu).unwrap() {
                all.insert(format!("{prefix}{name}"), t);
            }
        }
    }
    candle_core::safetensors::save(&all, &bundle).unwrap();
    let part = |config: &Option<std::path::PathBuf>| pictor_engine::Part {
        files: vec![bundle.clone()],
        config: config.clone(),
        rope_axes: None,
    };
    let files = ModelFiles {
        transformer: part(&base.transformer.config),
        vae: part(&base.vae.config),
        clip: part(&base.clip.config),
        t5: part(&base.t5.config),
        ..base.clone()
    };
    assert_runs_like_reference(&files);
    let mut p = load(&files);
    let r = reference();
    let emb = p.encode_prompt(&setup().prompt).unwrap();
    assert!(max_abs_diff(&emb.sequence, &tensor(&r, "t5_hidden")) <= 1e-4);
    assert!(max_abs_diff(&emb.pooled, &tensor(&r, "clip_pooled")) <= 1e-4);
}

/// A tokenizer declaring a shorter `model_max_length` (a small model trained on short
/// prompts) pads and truncates to that length, keeping the end-of-sequence token.
#[test]
fn a_tokenizer_declaring_a_shorter_length_is_honoured() {
    use pictor_engine::text::FixedLengthTokenizer;
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        fixture()
            .join("tokenizer_2/tokenizer.json")
            .canonicalize()
            .unwrap(),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 8}"#,
    )
    .unwrap();
    let t5 = FixedLengthTokenizer::t5(dir.path(), 256).unwrap();
    let long = t5.encode(&setup().long_prompt).unwrap();
    assert_eq!(long.ids.len(), 8);
    assert_eq!(long.ids[7], 1, "EOS kept at the end");
    assert!(long.truncated);
    let full = FixedLengthTokenizer::t5(&fixture().join("tokenizer_2"), 256).unwrap();
    assert_eq!(
        full.encode("a").unwrap().ids.len(),
        256,
        "512 declared, 256 asked: 256"
    );
}
