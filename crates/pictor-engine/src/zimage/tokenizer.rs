//! Z-Image's tokenizer: the model's own `tokenizer.json` where it has one (the diffusers
//! folder), else Qwen's, built in (see `assets/qwen-tokenizer/`) for the files that come
//! without one (ComfyUI's split files, GGUF).
//!
//! The built-in one is Qwen2's byte-level BPE rebuilt from `vocab.json` + `merges.txt` with
//! the settings of Z-Image's `tokenizer.json`: NFC, Qwen's word-splitting regex (isolated),
//! byte-level mapping without a prefix space, BPE with no unknown token, and the 26 added
//! tokens (`<|endoftext|>` 151643 … `</think>` 151668).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};

/// Qwen's pre-tokenizer regex, as Z-Image's `tokenizer.json` spells it.
const SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer in `file`, or Qwen's built-in one for `None`.
pub fn load(file: Option<&Path>) -> Result<Tokenizer> {
    match file {
        Some(path) => {
            Tokenizer::from_file(path).map_err(|e| EngineError::file(path, e.to_string()))
        }
        None => builtin(),
    }
}

/// Qwen's tokenizer, built in.
pub fn builtin() -> Result<Tokenizer> {
    let origin = Path::new("<built-in Qwen tokenizer>");
    let bad = |e: String| EngineError::file(origin, e);
    let vocab: serde_json::Value =
        serde_json::from_str(include_str!("../../assets/qwen-tokenizer/vocab.json"))
            .map_err(|e| bad(format!("vocab.json: {e}")))?;
    let added: Vec<serde_json::Value> = serde_json::from_str(include_str!(
        "../../assets/qwen-tokenizer/added_tokens.json"
    ))
    .map_err(|e| bad(format!("added_tokens.json: {e}")))?;
    let merges: Vec<&str> = include_str!("../../assets/qwen-tokenizer/merges.txt")
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .collect();
    let added: Vec<serde_json::Value> = added
        .into_iter()
        .map(|a| {
            serde_json::json!({"id": a["id"], "content": a["content"], "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": a["special"]})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": false, "use_regex": false});
    let spec = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    spec.to_string().parse::<Tokenizer>().map_err(|e| {
        bad(format!(
            "cannot build it from vocab.json and merges.txt: {e}"
        ))
    })
}
