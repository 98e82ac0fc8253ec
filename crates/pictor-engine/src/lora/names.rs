//! Which layer, and which of its output rows, a LoRA module updates, for every naming the
//! community's files use: the model's canonical names (BFL's for FLUX, bare or behind
//! `diffusion_model.`), diffusers' module names (`transformer.` PEFT files), kohya's
//! underscored forms of either (`lora_unet_…`, `lora_transformer_…`) and XLabs'
//! `processor.*_lora*`. Built from the network's own layer table and its diffusers
//! scheme, so a fused canonical layer (FLUX's `qkv`, `linear1`) takes its parts' LoRAs at
//! their rows, as diffusers' converters split them.

use std::collections::{BTreeMap, HashMap};

use crate::weights::{Recipe, Scheme};

/// Where a module's update lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The canonical layer.
    pub layer: String,
    /// Its first output row updated.
    pub offset: usize,
    /// Output rows updated.
    pub len: usize,
    /// Inputs the layer takes.
    pub inputs: usize,
    /// Outputs of the whole layer.
    pub outputs: usize,
    /// The module's rows are the layer's with their two halves swapped (diffusers'
    /// `norm_out.linear` against BFL's `final_layer.adaLN_modulation.1`).
    pub swap_halves: bool,
}

/// Module names to targets, for one network.
pub(crate) struct Names {
    map: HashMap<String, Target>,
}

/// Prefixes files put before module names, longest first.
const PREFIXES: [&str; 10] = [
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "lora_unet_",
    "lora_transformer_",
    "unet.",
    "lora_te1_",
    "lora_te_",
    "text_encoder.",
];

/// Prefixes of text-encoder modules (kohya `lora_te1_` for CLIP, `lora_te2_` for T5;
/// diffusers `text_encoder.` and `text_encoder_2.`).
const TEXT_ENCODER: [&str; 4] = ["lora_te1_", "lora_te2_", "lora_te_", "text_encoder"];

/// Whether `module` names a text encoder's layer.
pub(crate) fn is_text_encoder(module: &str) -> bool {
    TEXT_ENCODER.iter().any(|p| module.starts_with(p))
}

impl Names {
    /// The names of a network with these layers (`(outputs, inputs)` by canonical name)
    /// whose diffusers names `scheme` gives.
    pub fn new(layers: &BTreeMap<String, (usize, usize)>, scheme: Scheme) -> Self {
        let mut map = HashMap::new();
        let mut add = |name: String, target: Target| {
            map.insert(name.replace('.', "_"), target.clone());
            map.insert(name, target);
        };
        for (layer, &(outputs, inputs)) in layers {
            let whole = Target {
                layer: layer.clone(),
                offset: 0,
                len: outputs,
                inputs,
                outputs,
                swap_halves: false,
            };
            add(layer.clone(), whole.clone());
            for (alias, target) in xlabs(layer, &whole) {
                add(alias, target);
            }
            match scheme.recipe("", &format!("{layer}.weight")) {
                Recipe::Tensor(name) => {
                    if let Some(module) = name.strip_suffix(".weight") {
                        add(module.to_string(), whole.clone());
                    }
                }
                Recipe::SwapHalves(name) => {
                    if let Some(module) = name.strip_suffix(".weight") {
                        let swapped = Target {
                            swap_halves: true,
                            ..whole.clone()
                        };
                        add(module.to_string(), swapped);
                    }
                }
                Recipe::Concat(parts) => {
                    // The parts are the layer's input width each (q, k, v), the last one
                    // taking the rest (FLUX's single-block MLP input).
                    let mut offset = 0;
                    for (i, part) in parts.iter().enumerate() {
                        let len = match i + 1 == parts.len() {
                            true => outputs.saturating_sub(offset),
                            false => inputs,
                        };
                        if let Some(module) = part.strip_suffix(".weight") {
                            let target = Target {
                                offset,
                                len,
                                ..whole.clone()
                            };
                            add(module.to_string(), target);
                        }
                        offset += len;
                    }
                }
            }
        }
        Self { map }
    }

    /// The outputs of canonical layer `layer`.
    pub fn outputs(&self, layer: &str) -> Option<usize> {
        self.map.get(layer).map(|t| t.outputs)
    }

    /// The target of module `module` as a file names it, or why there is none.
    pub fn find(&self, module: &str) -> Result<&Target, String> {
        let mut name = module;
        for prefix in PREFIXES {
            if let Some(rest) = name.strip_prefix(prefix) {
                name = rest;
            }
        }
        if let Some(found) = self.map.get(name) {
            return Ok(found);
        }
        if is_text_encoder(module) {
            return Err(format!(
                "`{module}` updates a text encoder this model does not take LoRAs for (only \
                 FLUX's CLIP, `lora_te1_`, and transformer are)"
            ));
        }
        Err(format!(
            "`{module}` is not a layer of this model's transformer (a LoRA made for another model family?)"
        ))
    }
}

/// XLabs-AI's names for FLUX's attention layers: `double_blocks.N.processor.qkv_lora1`
/// (image stream) and `…2` (text), `proj_lora1/2`; single blocks' `processor.qkv_lora`
/// (the q, k, v rows of `linear1`) and `processor.proj_lora` (`linear2`).
fn xlabs(layer: &str, whole: &Target) -> Vec<(String, Target)> {
    let Some((block, field)) = layer
        .strip_prefix("double_blocks.")
        .or_else(|| layer.strip_prefix("single_blocks."))
        .and_then(|rest| rest.split_once('.'))
    else {
        return Vec::new();
    };
    let base = if layer.starts_with("double") {
        format!("double_blocks.{block}.processor")
    } else {
        format!("single_blocks.{block}.processor")
    };
    let alias = |name: &str, target: Target| vec![(format!("{base}.{name}"), target)];
    match field {
        "img_attn.qkv" => alias("qkv_lora1", whole.clone()),
        "txt_attn.qkv" => alias("qkv_lora2", whole.clone()),
        "img_attn.proj" => alias("proj_lora1", whole.clone()),
        "txt_attn.proj" => alias("proj_lora2", whole.clone()),
        "linear1" => alias(
            "qkv_lora",
            Target {
                len: 3 * whole.inputs,
                ..whole.clone()
            },
        ),
        "linear2" => alias("proj_lora", whole.clone()),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flux_names() -> Names {
        // One double and one single block of a 64-wide FLUX with a 256-wide MLP.
        let layers: BTreeMap<String, (usize, usize)> = [
            ("double_blocks.0.img_attn.qkv", (192, 64)),
            ("double_blocks.0.txt_mlp.0", (256, 64)),
            ("single_blocks.0.linear1", (448, 64)),
            ("single_blocks.0.linear2", (64, 320)),
            ("final_layer.adaLN_modulation.1", (128, 64)),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        Names::new(&layers, Scheme::DiffusersFluxTransformer)
    }

    #[test]
    fn every_naming_finds_its_rows() {
        let names = flux_names();
        let at = |m: &str| {
            let t = names.find(m).unwrap();
            (t.layer.as_str(), t.offset, t.len, t.swap_halves)
        };
        let qkv = "double_blocks.0.img_attn.qkv";
        assert_eq!(
            at("transformer.transformer_blocks.0.attn.to_k"),
            (qkv, 64, 64, false)
        );
        assert_eq!(
            at("lora_unet_double_blocks_0_img_attn_qkv"),
            (qkv, 0, 192, false)
        );
        assert_eq!(
            at("diffusion_model.double_blocks.0.img_attn.qkv"),
            (qkv, 0, 192, false)
        );
        assert_eq!(
            at("double_blocks.0.processor.qkv_lora1"),
            (qkv, 0, 192, false)
        );
        assert_eq!(
            at("lora_transformer_transformer_blocks_0_ff_context_net_0_proj").0,
            "double_blocks.0.txt_mlp.0"
        );
        let l1 = "single_blocks.0.linear1";
        assert_eq!(
            at("single_transformer_blocks.0.proj_mlp"),
            (l1, 192, 256, false)
        );
        assert_eq!(
            at("single_blocks.0.processor.qkv_lora"),
            (l1, 0, 192, false)
        );
        assert_eq!(
            at("single_blocks.0.processor.proj_lora").0,
            "single_blocks.0.linear2"
        );
        assert_eq!(
            at("transformer.norm_out.linear"),
            ("final_layer.adaLN_modulation.1", 0, 128, true)
        );
        assert!(
            names
                .find("lora_unet_input_blocks_1_0_emb_layers_1")
                .unwrap_err()
                .contains("another model family")
        );
        assert!(
            names
                .find("lora_te1_text_model_encoder_layers_0_mlp_fc1")
                .unwrap_err()
                .contains("text encoder")
        );
    }
}
