//! Reading a LoRA file: its low-rank pairs by module, whatever the naming convention
//! (PEFT/diffusers `lora_A`/`lora_B`, kohya `lora_down`/`lora_up` with `alpha`, XLabs
//! `down`/`up`). Which layer a module is, is [`super::names`]' business.

use std::{collections::BTreeMap, path::Path};

use candle_core::{DType, Device, Tensor};

/// One module's low-rank pair: the update is `(alpha / rank) · up · down`.
pub(crate) struct Module {
    /// `(rank, inputs)`.
    pub down: Tensor,
    /// `(outputs, rank)`.
    pub up: Tensor,
    /// `None`: the rank (a scale of 1).
    pub alpha: Option<f64>,
}

impl Module {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// `alpha / rank`, the factor the update carries before the request's scale.
    pub fn factor(&self) -> f64 {
        match self.alpha {
            Some(alpha) if self.rank() > 0 => alpha / self.rank() as f64,
            _ => 1.0,
        }
    }
}

/// A LoRA file's modules, by the module name its keys give (prefixes kept; stripped when
/// matched against layers), and its size in memory.
pub(crate) struct LoraFile {
    pub modules: BTreeMap<String, Module>,
    pub bytes: u64,
}

/// Suffixes of down (`A`) and up (`B`) matrices, the longer before the shorter that ends
/// them: diffusers' older attention-processor files (`….lora.down.weight`,
/// `….lora_linear_layer.down.weight`) before XLabs' `….down.weight`.
const DOWN: [&str; 6] = [
    ".lora_A.weight",
    ".lora_down.weight",
    ".lora_A.default.weight",
    ".lora_linear_layer.down.weight",
    ".lora.down.weight",
    ".down.weight",
];
const UP: [&str; 6] = [
    ".lora_B.weight",
    ".lora_up.weight",
    ".lora_B.default.weight",
    ".lora_linear_layer.up.weight",
    ".lora.up.weight",
    ".up.weight",
];

/// What an unsupported tensor is, to say so.
fn unsupported(name: &str) -> String {
    let kind = if name.contains("dora_scale") || name.contains("magnitude_vector") {
        "DoRA's magnitude vectors (DoRA is not supported, only plain LoRA)"
    } else if name.contains("hada_") {
        "a LoHa factor (LyCORIS LoHa is not supported, only plain LoRA)"
    } else if name.contains("lokr_") {
        "a LoKr factor (LyCORIS LoKr is not supported, only plain LoRA)"
    } else if name.ends_with(".diff") || name.ends_with(".diff_b") {
        "a full weight difference (only low-rank pairs are supported)"
    } else if name.ends_with(".lora_B.bias") || name.ends_with(".lora_up.bias") {
        "a bias update, as control LoRAs (FLUX.1-Canny/Depth) carry; those need their own model"
    } else {
        "not a LoRA tensor (expected lora_A/lora_B, lora_down/lora_up, down/up or alpha)"
    };
    format!("`{name}` is {kind}")
}

/// Reads `bytes` (a safetensors file) into modules, f32 on the CPU. Errors say which
/// tensor is at fault.
pub(crate) fn parse(bytes: &[u8], path: &Path) -> Result<LoraFile, String> {
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let global_alpha = adapter_alpha(bytes);
    let mut downs = BTreeMap::new();
    let mut ups = BTreeMap::new();
    let mut alphas = BTreeMap::new();
    for (name, view) in file.tensors() {
        let load = || -> Result<Tensor, String> {
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| format!("`{name}`: {e}"))?;
            Ok(t)
        };
        if let Some(module) = name.strip_suffix(".alpha") {
            let alpha = load()?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| format!("`{name}`: {e}"))?;
            let [alpha] = alpha[..] else {
                return Err(format!("`{name}` holds {} values, not one", alpha.len()));
            };
            alphas.insert(module.to_string(), f64::from(alpha));
        } else if let Some(module) = DOWN.iter().find_map(|s| name.strip_suffix(s)) {
            downs.insert(module.to_string(), load()?);
        } else if let Some(module) = UP.iter().find_map(|s| name.strip_suffix(s)) {
            ups.insert(module.to_string(), load()?);
        } else {
            return Err(unsupported(&name));
        }
    }
    let mut modules = BTreeMap::new();
    let mut bytes_in_memory = 0u64;
    for (name, down) in downs {
        let up = ups
            .remove(&name)
            .ok_or_else(|| format!("`{name}` has a down matrix but no up matrix"))?;
        let (r_down, r_up) = (down.dims().first().copied(), up.dims().get(1).copied());
        if down.rank() != 2 || up.rank() != 2 || r_down != r_up {
            return Err(format!(
                "`{name}`: down {:?} and up {:?} are not a rank-r pair ((r, in) and (out, r))",
                down.dims(),
                up.dims()
            ));
        }
        bytes_in_memory += ((down.elem_count() + up.elem_count()) * 4) as u64;
        let alpha = alphas.remove(&name).or(global_alpha);
        modules.insert(name, Module { down, up, alpha });
    }
    if let Some(name) = ups.keys().next() {
        return Err(format!("`{name}` has an up matrix but no down matrix"));
    }
    if modules.is_empty() {
        return Err(format!("{} holds no LoRA pairs", path.display()));
    }
    Ok(LoraFile {
        modules,
        bytes: bytes_in_memory,
    })
}

/// The alpha diffusers records in a file's metadata (`lora_adapter_metadata`, PEFT's
/// `lora_alpha`) for files whose tensors carry none.
fn adapter_alpha(bytes: &[u8]) -> Option<f64> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let text = meta
        .metadata()
        .as_ref()?
        .get("lora_adapter_metadata")?
        .clone();
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("lora_alpha")?.as_f64()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn file(keys: &[(&str, Vec<usize>)]) -> Vec<u8> {
        let tensors: HashMap<String, Tensor> = keys
            .iter()
            .map(|(name, shape)| {
                let t = Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).expect("tensor");
                (name.to_string(), t)
            })
            .collect();
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("l.safetensors");
        candle_core::safetensors::save(&tensors, &path).expect("save");
        std::fs::read(&path).expect("read")
    }

    #[test]
    fn every_naming_of_a_pair_gives_the_module_name() {
        let q = "transformer.x.to_q";
        let cases = [
            (
                format!("{q}.lora_A.weight"),
                format!("{q}.lora_B.weight"),
                q,
            ),
            (
                format!("{q}.lora.down.weight"),
                format!("{q}.lora.up.weight"),
                q,
            ),
            (
                format!("{q}.lora_linear_layer.down.weight"),
                format!("{q}.lora_linear_layer.up.weight"),
                q,
            ),
            (
                "k_qkv.lora_down.weight".into(),
                "k_qkv.lora_up.weight".into(),
                "k_qkv",
            ),
            (
                "x.processor.qkv_lora1.down.weight".into(),
                "x.processor.qkv_lora1.up.weight".into(),
                "x.processor.qkv_lora1",
            ),
        ];
        for (down, up, module) in cases {
            let bytes = file(&[(&down, vec![2, 8]), (&up, vec![6, 2])]);
            let parsed = parse(&bytes, Path::new("l")).expect(&down);
            let names: Vec<_> = parsed.modules.keys().cloned().collect();
            assert_eq!(names, [module], "{down}");
            assert_eq!(parsed.modules[module].rank(), 2);
        }
    }

    #[test]
    fn a_pair_that_does_not_match_is_refused_by_name() {
        let bytes = file(&[
            ("a.lora_A.weight", vec![2, 8]),
            ("a.lora_B.weight", vec![6, 3]),
        ]);
        let err = parse(&bytes, Path::new("l")).err().expect("refused");
        assert!(err.contains("`a`") && err.contains("rank-r pair"), "{err}");
        let bytes = file(&[("a.lora_A.weight", vec![2, 8])]);
        let err = parse(&bytes, Path::new("l")).err().expect("refused");
        assert!(err.contains("no up matrix"), "{err}");
        let bytes = file(&[("a.dora_scale", vec![6])]);
        let err = parse(&bytes, Path::new("l")).err().expect("refused");
        assert!(err.contains("DoRA"), "{err}");
    }
}
