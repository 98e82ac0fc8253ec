//! Tokenizers in the files users hold, set up as diffusers' FluxPipeline uses them:
//! truncated to a fixed length (keeping the end-of-sequence token) and padded to it.

use std::path::{Path, PathBuf};

use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::error::{EngineError, Result};

/// A tokenizer with FluxPipeline's fixed-length rule.
pub struct FixedLengthTokenizer {
    inner: Tokenizer,
    length: usize,
    source: PathBuf,
}

/// Token ids plus what truncation kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly `length` ids.
    pub ids: Vec<u32>,
    /// The prompt was cut.
    pub truncated: bool,
    /// The prompt text behind the kept tokens (the whole prompt when not truncated).
    pub kept_text: String,
    /// Ids that are not padding.
    pub used: usize,
}

impl FixedLengthTokenizer {
    /// Loads CLIP's tokenizer from a folder holding `tokenizer.json`, or `vocab.json` +
    /// `merges.txt` (the FLUX repos ship only those two), or from a `tokenizer.json` file.
    pub fn clip(path: &Path, length: usize) -> Result<Self> {
        let json = path.join("tokenizer.json");
        let inner = if path.is_file() {
            read_tokenizer_json(path)?
        } else if json.is_file() {
            read_tokenizer_json(&json)?
        } else {
            super::clip_bpe::from_vocab_and_merges(path)?
        };
        let pad = special_token(path, "pad_token").unwrap_or_else(|| "<|endoftext|>".into());
        Self::configure(inner, length, &pad, path)
    }

    /// Loads T5's tokenizer from a folder holding `tokenizer.json` or from the file itself.
    pub fn t5(path: &Path, length: usize) -> Result<Self> {
        let json = if path.is_file() {
            path.to_path_buf()
        } else {
            path.join("tokenizer.json")
        };
        if !json.is_file() {
            let hint = if path.join("spiece.model").is_file() {
                " (only spiece.model is there; export tokenizer.json with transformers' T5TokenizerFast.save_pretrained)"
            } else {
                ""
            };
            return Err(EngineError::file(path, format!("no tokenizer.json{hint}")));
        }
        let inner = read_tokenizer_json(&json)?;
        let pad = special_token(path, "pad_token").unwrap_or_else(|| "<pad>".into());
        Self::configure(inner, length, &pad, path)
    }

    /// FLUX.1's own CLIP-L tokenizer, built in (see `assets/flux-tokenizers/`), for
    /// models that come without tokenizer files.
    pub fn builtin_clip(length: usize) -> Result<Self> {
        let origin = Path::new("<built-in FLUX.1 CLIP tokenizer>");
        let inner = super::clip_bpe::from_texts(
            include_str!("../../assets/flux-tokenizers/tokenizer/vocab.json"),
            include_str!("../../assets/flux-tokenizers/tokenizer/merges.txt"),
            origin,
        )?;
        // FLUX's tokenizer_config.json: model_max_length 77, pad `<|endoftext|>`.
        Self::configure_exact(inner, length.min(77), "<|endoftext|>", origin)
    }

    /// FLUX.1's own T5 v1.1 tokenizer, built in (see `assets/flux-tokenizers/`).
    pub fn builtin_t5(length: usize) -> Result<Self> {
        let origin = Path::new("<built-in FLUX.1 T5 tokenizer>");
        let inner = Tokenizer::from_bytes(include_bytes!(
            "../../assets/flux-tokenizers/tokenizer_2/tokenizer.json"
        ))
        .map_err(|e| EngineError::file(origin, format!("bad tokenizer.json: {e}")))?;
        // FLUX's tokenizer_config.json: model_max_length 512, pad `<pad>`.
        Self::configure_exact(inner, length.min(512), "<pad>", origin)
    }

    /// `length` is a cap: a tokenizer whose `tokenizer_config.json` declares a smaller
    /// `model_max_length` (a small model trained on short prompts) gets that length, as
    /// diffusers pads to `min(max_sequence_length, tokenizer.model_max_length)`.
    fn configure(inner: Tokenizer, length: usize, pad: &str, source: &Path) -> Result<Self> {
        let length = declared_max_length(source).map_or(length, |declared| declared.min(length));
        Self::configure_exact(inner, length, pad, source)
    }

    fn configure_exact(
        mut inner: Tokenizer,
        length: usize,
        pad: &str,
        source: &Path,
    ) -> Result<Self> {
        let pad_id = inner.token_to_id(pad).ok_or_else(|| {
            EngineError::file(
                source,
                format!("padding token `{pad}` is not in the vocabulary"),
            )
        })?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| EngineError::file(source, e))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad.to_string(),
        }));
        Ok(Self {
            inner,
            length,
            source: source.to_path_buf(),
        })
    }

    /// Tokenizes `prompt` to exactly the configured length.
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let enc = self
            .inner
            .encode(prompt, true)
            .map_err(|e| EngineError::file(&self.source, format!("tokenizing failed: {e}")))?;
        let ids = enc.get_ids().to_vec();
        if ids.len() != self.length {
            return Err(EngineError::file(
                &self.source,
                format!("tokenizer gave {} ids, expected {}", ids.len(), self.length),
            ));
        }
        let truncated = !enc.get_overflowing().is_empty();
        let used = enc.get_attention_mask().iter().filter(|&&m| m == 1).count();
        let kept_text = if truncated {
            let end = enc
                .get_offsets()
                .iter()
                .zip(enc.get_special_tokens_mask())
                .filter(|(_, special)| **special == 0)
                .map(|((_, end), _)| *end)
                .max()
                .unwrap_or(0);
            prompt.get(..end).unwrap_or(prompt).trim_end().to_string()
        } else {
            prompt.to_string()
        };
        Ok(Tokens {
            ids,
            truncated,
            kept_text,
            used,
        })
    }
}

fn read_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| EngineError::file(path, format!("bad tokenizer.json: {e}")))
}

/// Reads a special token (e.g. `pad_token`) from `special_tokens_map.json` or
/// `tokenizer_config.json` beside the tokenizer; both spell it as a string or as
/// `{"content": ...}`.
fn special_token(path: &Path, key: &str) -> Option<String> {
    let dir = if path.is_file() { path.parent()? } else { path };
    ["special_tokens_map.json", "tokenizer_config.json"]
        .iter()
        .find_map(|file| {
            let text = std::fs::read_to_string(dir.join(file)).ok()?;
            let value: serde_json::Value = serde_json::from_str(&text).ok()?;
            match value.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        })
}

/// `model_max_length` from `tokenizer_config.json`, when it is a real bound (transformers
/// writes a huge float such as 1e30 when there is none).
fn declared_max_length(path: &Path) -> Option<usize> {
    let dir = if path.is_file() { path.parent()? } else { path };
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let max = value.get("model_max_length")?.as_f64()?;
    (1.0..1e6).contains(&max).then_some(max as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_tokenizers_give_the_known_ids() {
        // The ids transformers gives for FLUX.1's tokenizers (see assets/flux-tokenizers).
        let clip = FixedLengthTokenizer::builtin_clip(77).unwrap();
        let t = clip.encode("a photo of a cat").unwrap();
        assert_eq!(t.ids[..7], [49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!((t.ids.len(), t.used, t.ids[76]), (77, 7, 49407));
        let t5 = FixedLengthTokenizer::builtin_t5(256).unwrap();
        let t = t5.encode("Hello world").unwrap();
        assert_eq!(t.ids[..4], [8774, 296, 1, 0]);
        assert_eq!((t.ids.len(), t.used), (256, 3));
    }
}
