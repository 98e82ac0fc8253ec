//! CLIP's byte-level BPE tokenizer rebuilt from `vocab.json` + `merges.txt`.
//!
//! The FLUX repositories ship CLIP's tokenizer only in that "slow" form. This builds the
//! same pipeline as transformers' `CLIPConverter` (`convert_slow_tokenizer.py`): NFC,
//! whitespace collapsing and lower-casing; CLIP's word-splitting regex; byte-level mapping;
//! BPE with a `</w>` end-of-word suffix; `<|startoftext|> … <|endoftext|>` around the text.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

pub(super) fn from_vocab_and_merges(dir: &Path) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab_text =
        std::fs::read_to_string(&vocab_path).map_err(|e| EngineError::file(&vocab_path, e))?;
    let merges_text =
        std::fs::read_to_string(&merges_path).map_err(|e| EngineError::file(&merges_path, e))?;
    from_texts(&vocab_text, &merges_text, dir)
}

/// The same from the two files' contents; `origin` names them in errors.
pub(super) fn from_texts(vocab_text: &str, merges_text: &str, origin: &Path) -> Result<Tokenizer> {
    let vocab_path = origin.join("vocab.json");
    let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(vocab_text)
        .map_err(|e| EngineError::file(&vocab_path, format!("not a JSON vocabulary: {e}")))?;
    let merges: Vec<&str> = merges_text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .collect();
    let id = |token: &str| {
        vocab.get(token).and_then(|v| v.as_u64()).ok_or_else(|| {
            EngineError::file(&vocab_path, format!("special token `{token}` is missing"))
        })
    };
    let (bos, eos) = (id(BOS)?, id(EOS)?);
    let special = |token: &str, id: u64| {
        serde_json::json!({"id": id, "content": token, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": true})
    };
    let spec = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BOS, bos), special(EOS, eos)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split",
             "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "RobertaProcessing",
            "sep": [EOS, eos], "cls": [BOS, bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": EOS,
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    spec.to_string().parse::<Tokenizer>().map_err(|e| {
        EngineError::file(
            origin,
            format!("cannot build CLIP tokenizer from vocab.json and merges.txt: {e}"),
        )
    })
}
