//! Z-Image-Turbo (Tongyi-MAI): its Qwen3 text encoder ([`encoder`]) with Qwen's tokenizer
//! ([`tokenizer`], built in for files that come without one) and chat template
//! ([`chat_prompt`]), its single-stream transformer ([`transformer`]), its schedule
//! ([`sigmas`]) and the pipeline ([`ZImagePipeline`]), from every layout it is distributed
//! in ([`ZImageFiles`]: the diffusers folder, ComfyUI's split files, a GGUF transformer),
//! held to diffusers 0.40's `ZImagePipeline`, `ZImageImg2ImgPipeline` and
//! `ZImageInpaintPipeline` on the tiny fixtures.
//!
//! On the CPU, in f32 or with bf16 weight matrices, with a quantized GGUF transformer if
//! given or asked for, the text encoder and transformer resident or taking turns, as the
//! memory budget allows ([`memory`]). Not yet: CUDA, a GGUF text encoder, batching several
//! requests in one pass, negative prompts (Turbo has no CFG).

pub mod encoder;
pub mod files;
pub mod memory;
pub mod pipeline;
pub mod tokenizer;
pub mod transformer;

pub use files::{ZImageFiles, is_folder};
pub use pipeline::{ZImageOptions, ZImagePipeline};

/// What the text encoder reads for `prompt`: Qwen3's chat template for one user message
/// with a generation prompt, as diffusers renders it with `enable_thinking=True` (no think
/// block). Its tokens, without padding, are encoded; the features are the output of the
/// encoder's last layer but one, before the final norm.
pub fn chat_prompt(prompt: &str) -> String {
    format!("{PROMPT_HEAD}{prompt}{PROMPT_TAIL}")
}

/// What [`chat_prompt`] puts before the prompt, and after it.
const PROMPT_HEAD: &str = "<|im_start|>user\n";
const PROMPT_TAIL: &str = "<|im_end|>\n<|im_start|>assistant\n";

/// The shape `shape` gives tensor `name` of the file `origin`, or an error naming it as
/// needed to read `what`'s shape.
fn needed_shape(
    shape: &impl Fn(&str) -> Option<Vec<usize>>,
    name: &str,
    origin: &std::path::Path,
    what: &str,
) -> crate::error::Result<Vec<usize>> {
    shape(name).ok_or_else(|| crate::EngineError::Tensor {
        path: origin.to_path_buf(),
        tensor: name.to_string(),
        problem: format!("missing (needed to read the {what}'s shape)"),
    })
}

/// A JSON file of the model folder.
fn json(path: &std::path::Path) -> crate::error::Result<serde_json::Value> {
    use crate::EngineError;
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::file(path, e))
}

/// The sigmas of `steps` steps, as diffusers' `ZImagePipeline` (0.39 and later) makes them:
/// `linspace(1, 1/steps, steps)`, each shifted to `shift·s / (1 + (shift - 1)·s)`
/// (Z-Image-Turbo's scheduler: shift 3, no dynamic shifting), then 0. The transformer sees
/// `1 - sigma`; each Euler step adds `(sigma_next - sigma) · -output`.
pub fn sigmas(steps: usize, shift: f64) -> Vec<f64> {
    let steps = steps.max(1);
    (0..steps)
        .map(|i| 1.0 - i as f64 * (1.0 - 1.0 / steps as f64) / (steps - 1).max(1) as f64)
        .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
        .chain(std::iter::once(0.0))
        .collect()
}

#[cfg(test)]
mod tests {
    /// diffusers 0.40's sigmas for Z-Image-Turbo's 8 steps (its scheduler, printed there).
    #[test]
    fn turbo_sigmas_match_diffusers() {
        let want = [
            1.0, 0.954_545, 0.9, 0.833_333, 0.75, 0.642_857, 0.5, 0.3, 0.0,
        ];
        let got = super::sigmas(8, 3.0);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }
}
