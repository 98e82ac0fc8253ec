//! Reading the transformer's and the autoencoder's architecture from the weights and
//! whatever records the rest.
//!
//! Every size is read from tensor shapes. What shapes cannot say (the RoPE axes, the
//! decoder's group count, the latent scale and shift) comes from a config that records it:
//! diffusers' `config.json`, one beside a single file, Pictor's GGUF metadata or the
//! model's settings. Only where a part has FLUX.1's own dimensions is FLUX.1's value taken
//! without a record; anything else is refused with what to supply, never guessed.
//! A config that contradicts the weights is refused field by field.

mod transformer;
mod vae;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub use self::{transformer::TransformerArch, vae::VaeArch};
pub(crate) use self::{transformer::transformer, vae::vae};
use crate::{
    error::{EngineError, Result},
    weights::{MappedWeights, QWeights},
};

/// Where a fact about a part's architecture came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A config file: diffusers' `config.json`, or one beside a single weight file.
    Config(PathBuf),
    /// The weight file's own metadata (Pictor's GGUF files record the RoPE axes).
    Metadata,
    /// The model's settings (`rope_axes` in pictor.toml).
    Settings,
    /// FLUX.1's own value, taken because the part has FLUX.1's dimensions.
    Flux1,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(path) => write!(f, "from {}", path.display()),
            Self::Metadata => write!(f, "from the file's metadata"),
            Self::Settings => write!(f, "from the model's settings"),
            Self::Flux1 => write!(f, "FLUX.1's, for FLUX.1's dimensions"),
        }
    }
}

/// Shape lookups by canonical name, over any weight source.
pub(crate) trait Shapes {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>>;
    fn origin(&self) -> PathBuf;
    /// RoPE axes the file itself records (Pictor's GGUF files do), if any.
    fn rope_axes(&self) -> Option<Vec<usize>> {
        None
    }
}

/// The GGUF metadata key under which converted transformers keep their RoPE axes, which
/// tensor shapes cannot tell (a diffusers `config.json` can).
pub const ROPE_AXES_KEY: &str = "pictor.flux.axes_dims_rope";

impl Shapes for MappedWeights {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.shape(name)
    }
    fn origin(&self) -> PathBuf {
        self.files().path_of("")
    }
}

impl Shapes for QWeights {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.shape(name)
    }
    fn origin(&self) -> PathBuf {
        self.origin().to_path_buf()
    }
    fn rope_axes(&self) -> Option<Vec<usize>> {
        self.meta(ROPE_AXES_KEY)?
            .split(',')
            .map(|a| a.trim().parse().ok())
            .collect()
    }
}

fn dim(w: &dyn Shapes, name: &str, axis: usize) -> Result<usize> {
    let shape = w.shape_of(name).ok_or_else(|| EngineError::Tensor {
        path: w.origin(),
        tensor: name.to_string(),
        problem: "missing".into(),
    })?;
    shape.get(axis).copied().ok_or_else(|| EngineError::Tensor {
        path: w.origin(),
        tensor: name.to_string(),
        problem: format!(
            "has shape {shape:?}, expected at least {} dimensions",
            axis + 1
        ),
    })
}

fn count(w: &dyn Shapes, pattern: impl Fn(usize) -> String) -> usize {
    (0..)
        .take_while(|&i| w.shape_of(&pattern(i)).is_some())
        .count()
}

fn bad(w: &dyn Shapes, message: String) -> EngineError {
    EngineError::UnknownLayout {
        path: w.origin(),
        message,
    }
}

/// Reads a config file; `None` when there is none.
fn read_config<T: for<'de> Deserialize<'de>>(path: Option<&Path>) -> Result<Option<T>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::file(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::file(path, format!("bad config: {e}")))
}

/// Collects "`field` is X, but the weights have Y" for each config field that disagrees.
#[derive(Default)]
struct Disagreements(Vec<String>);

impl Disagreements {
    fn field<T: PartialEq + fmt::Debug>(&mut self, name: &str, stated: Option<T>, actual: T) {
        if let Some(stated) = stated.filter(|s| *s != actual) {
            self.0.push(format!(
                "`{name}` is {stated:?}, but the weights have {actual:?}"
            ));
        }
    }

    fn push(&mut self, message: impl Into<String>) {
        self.0.push(message.into());
    }

    /// Refuses the config, naming every disagreement, if there is any.
    fn check(self, path: &Path, what: &str) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        Err(EngineError::file(
            path,
            format!("{what}: {}", self.0.join("; ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::layout::Part;

    /// Shapes without weights: what a header would say.
    #[derive(Default)]
    struct FakeShapes(HashMap<String, Vec<usize>>);

    impl FakeShapes {
        fn with(mut self, name: &str, shape: &[usize]) -> Self {
            self.0.insert(name.into(), shape.to_vec());
            self
        }
    }

    impl Shapes for FakeShapes {
        fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
            self.0.get(name).cloned()
        }
        fn origin(&self) -> PathBuf {
            PathBuf::from("fake.safetensors")
        }
    }

    fn flux_transformer(head: usize, heads: usize) -> FakeShapes {
        let hidden = head * heads;
        FakeShapes::default()
            .with("img_in.weight", &[hidden, 64])
            .with("double_blocks.0.img_attn.norm.query_norm.scale", &[head])
            .with("double_blocks.0.img_mlp.0.weight", &[hidden * 4, hidden])
            .with("double_blocks.0.img_attn.qkv.weight", &[hidden * 3, hidden])
            .with("single_blocks.0.linear1.weight", &[hidden * 7, hidden])
            .with("vector_in.in_layer.weight", &[hidden, 768])
            .with("txt_in.weight", &[hidden, 4096])
    }

    fn vae_decoder(ch: usize, mult: &[usize], resnets: usize, z: usize) -> FakeShapes {
        let mut s = FakeShapes::default()
            .with(
                "decoder.conv_in.weight",
                &[ch * mult[mult.len() - 1], z, 3, 3],
            )
            .with("decoder.conv_out.weight", &[3, ch, 3, 3]);
        for (i, m) in mult.iter().enumerate() {
            for j in 0..resnets {
                let prefix = format!("decoder.up.{i}.block.{j}");
                s = s
                    .with(&format!("{prefix}.conv1.weight"), &[ch * m, ch * m, 3, 3])
                    .with(&format!("{prefix}.conv2.weight"), &[ch * m, ch * m, 3, 3]);
            }
        }
        s
    }

    #[test]
    fn flux1_heads_take_flux1_axes_and_others_are_refused_with_what_to_supply() {
        let part = Part::file("fake.safetensors");
        let arch = transformer(&flux_transformer(128, 24), &part).unwrap();
        assert_eq!(arch.config.axes_dim, vec![16, 56, 56]);
        assert_eq!(arch.axes_from, Source::Flux1);
        assert_eq!(arch.config.num_heads, 24);

        let err = transformer(&flux_transformer(64, 2), &part)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("64 wide") && err.contains("axes_dims_rope") && err.contains("rope_axes"),
            "{err}"
        );

        let stated = Part {
            rope_axes: Some(vec![16, 24, 24]),
            ..part.clone()
        };
        let arch = transformer(&flux_transformer(64, 2), &stated).unwrap();
        assert_eq!(arch.config.axes_dim, vec![16, 24, 24]);
        assert_eq!(arch.axes_from, Source::Settings);

        let odd = Part {
            rope_axes: Some(vec![8, 28, 27, 1]),
            ..part
        };
        let err = transformer(&flux_transformer(64, 2), &odd)
            .unwrap_err()
            .to_string();
        assert!(err.contains("three even numbers"), "{err}");
    }

    #[test]
    fn a_config_and_the_settings_must_agree_on_the_axes() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("t.json");
        std::fs::write(&config, r#"{"axes_dims_rope": [8, 12, 12]}"#).unwrap();
        let part = Part {
            config: Some(config),
            rope_axes: Some(vec![4, 14, 14]),
            ..Part::file("fake.safetensors")
        };
        let err = transformer(&flux_transformer(32, 2), &part)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[8, 12, 12]") && err.contains("[4, 14, 14]") && err.contains("settings"),
            "{err}"
        );
    }

    #[test]
    fn a_transformer_config_that_contradicts_the_weights_is_refused_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("t.json");
        std::fs::write(
            &config,
            r#"{"axes_dims_rope": [8, 12, 12], "num_attention_heads": 3, "patch_size": 2}"#,
        )
        .unwrap();
        let part = Part {
            config: Some(config),
            ..Part::file("fake.safetensors")
        };
        let err = transformer(&flux_transformer(32, 2), &part)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`num_attention_heads` is 3") && err.contains("`patch_size` is 2"),
            "{err}"
        );
    }

    #[test]
    fn flux1_decoders_take_flux1_groups_and_others_need_a_config() {
        let part = Part::file("fake.safetensors");
        let arch = vae(&vae_decoder(128, &[1, 2, 4, 4], 3, 16), &part).unwrap();
        assert_eq!((arch.groups, arch.from.clone()), (32, Source::Flux1));
        assert_eq!((arch.scale_factor, arch.shift_factor), (0.3611, 0.1159));

        let err = vae(&vae_decoder(32, &[1, 1, 2, 2], 2, 16), &part)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[32, 32, 64, 64]") && err.contains("config.json"),
            "{err}"
        );

        let err = vae(&vae_decoder(32, &[1, 2, 2], 2, 16), &part)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 levels"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ae.json");
        std::fs::write(
            &config,
            r#"{"norm_num_groups": 16, "scaling_factor": 0.5, "shift_factor": 0.25}"#,
        )
        .unwrap();
        let given = Part {
            config: Some(config.clone()),
            ..part
        };
        let arch = vae(&vae_decoder(32, &[1, 1, 2, 2], 2, 8), &given).unwrap();
        assert_eq!(arch.groups, 16);
        assert_eq!((arch.scale_factor, arch.shift_factor), (0.5, 0.25));
        assert_eq!(arch.from, Source::Config(config));
    }
}
