//! Name maps from the canonical names the models read (Black Forest Labs' for FLUX,
//! Tongyi-MAI's original ones for Z-Image) to diffusers' names.
//!
//! They are the inverse of diffusers' own converters
//! (`scripts/convert_flux_to_diffusers.py`, `loaders/single_file_utils.py`:
//! `convert_flux_transformer_checkpoint_to_diffusers`, `convert_ldm_vae_checkpoint`), and
//! the fixture script `tools/make_tiny_flux.py` checks them against those converters.

use super::Recipe;

/// Splits `name` into `(block index, rest)` after `prefix` (e.g. `double_blocks.`).
fn indexed<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (index, rest) = rest.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

fn one(s: String) -> Recipe {
    Recipe::Tensor(s)
}

/// The diffusers `FluxTransformer2DModel` source of BFL tensor `name`.
pub(super) fn flux_transformer(name: &str) -> Recipe {
    const TOP: [(&str, &str); 9] = [
        ("img_in.", "x_embedder."),
        ("txt_in.", "context_embedder."),
        (
            "time_in.in_layer.",
            "time_text_embed.timestep_embedder.linear_1.",
        ),
        (
            "time_in.out_layer.",
            "time_text_embed.timestep_embedder.linear_2.",
        ),
        (
            "vector_in.in_layer.",
            "time_text_embed.text_embedder.linear_1.",
        ),
        (
            "vector_in.out_layer.",
            "time_text_embed.text_embedder.linear_2.",
        ),
        (
            "guidance_in.in_layer.",
            "time_text_embed.guidance_embedder.linear_1.",
        ),
        (
            "guidance_in.out_layer.",
            "time_text_embed.guidance_embedder.linear_2.",
        ),
        ("final_layer.linear.", "proj_out."),
    ];
    for (bfl, diff) in TOP {
        if let Some(rest) = name.strip_prefix(bfl) {
            return one(format!("{diff}{rest}"));
        }
    }
    if let Some(rest) = name.strip_prefix("final_layer.adaLN_modulation.1.") {
        // diffusers' AdaLayerNormContinuous stores [scale; shift], BFL [shift; scale].
        return Recipe::SwapHalves(format!("norm_out.linear.{rest}"));
    }
    if let Some((n, rest)) = indexed(name, "double_blocks.") {
        return double_block(n, rest).unwrap_or_else(|| one(name.to_string()));
    }
    if let Some((n, rest)) = indexed(name, "single_blocks.") {
        return single_block(n, rest).unwrap_or_else(|| one(name.to_string()));
    }
    one(name.to_string())
}

fn double_block(n: usize, rest: &str) -> Option<Recipe> {
    let b = format!("transformer_blocks.{n}");
    let (stream, rest) = rest.split_once('.')?;
    let img = match stream {
        "img_mod" | "img_attn" | "img_mlp" => true,
        "txt_mod" | "txt_attn" | "txt_mlp" => false,
        _ => return None,
    };
    let field = stream.split_once('_')?.1;
    let recipe = match (field, rest) {
        ("mod", r) => one(format!(
            "{b}.{}.{}",
            if img { "norm1" } else { "norm1_context" },
            r.strip_prefix("lin.")
                .map(|x| format!("linear.{x}"))
                .unwrap_or_else(|| r.to_string())
        )),
        ("attn", r) if r.starts_with("qkv.") => {
            let x = r.strip_prefix("qkv.")?;
            let names: [&str; 3] = if img {
                ["to_q", "to_k", "to_v"]
            } else {
                ["add_q_proj", "add_k_proj", "add_v_proj"]
            };
            Recipe::Concat(names.iter().map(|p| format!("{b}.attn.{p}.{x}")).collect())
        }
        ("attn", "norm.query_norm.scale") => one(format!(
            "{b}.attn.{}.weight",
            if img { "norm_q" } else { "norm_added_q" }
        )),
        ("attn", "norm.key_norm.scale") => one(format!(
            "{b}.attn.{}.weight",
            if img { "norm_k" } else { "norm_added_k" }
        )),
        ("attn", r) if r.starts_with("proj.") => one(format!(
            "{b}.attn.{}.{}",
            if img { "to_out.0" } else { "to_add_out" },
            r.strip_prefix("proj.")?
        )),
        ("mlp", r) => {
            let ff = if img { "ff" } else { "ff_context" };
            if let Some(x) = r.strip_prefix("0.") {
                one(format!("{b}.{ff}.net.0.proj.{x}"))
            } else {
                one(format!("{b}.{ff}.net.2.{}", r.strip_prefix("2.")?))
            }
        }
        _ => return None,
    };
    Some(recipe)
}

fn single_block(n: usize, rest: &str) -> Option<Recipe> {
    let b = format!("single_transformer_blocks.{n}");
    let recipe = if let Some(x) = rest.strip_prefix("linear1.") {
        Recipe::Concat(vec![
            format!("{b}.attn.to_q.{x}"),
            format!("{b}.attn.to_k.{x}"),
            format!("{b}.attn.to_v.{x}"),
            format!("{b}.proj_mlp.{x}"),
        ])
    } else if let Some(x) = rest.strip_prefix("linear2.") {
        one(format!("{b}.proj_out.{x}"))
    } else if let Some(x) = rest.strip_prefix("modulation.lin.") {
        one(format!("{b}.norm.linear.{x}"))
    } else if rest == "norm.query_norm.scale" {
        one(format!("{b}.attn.norm_q.weight"))
    } else if rest == "norm.key_norm.scale" {
        one(format!("{b}.attn.norm_k.weight"))
    } else {
        return None;
    };
    Some(recipe)
}

/// The diffusers `AutoencoderKL` source of BFL autoencoder tensor `name`; `levels` is the
/// number of resolution levels (4 for FLUX), needed because diffusers numbers the decoder's
/// up blocks in the opposite order.
pub(super) fn vae(name: &str, levels: usize) -> Recipe {
    let Some((side, rest)) = name.split_once('.') else {
        return one(name.to_string());
    };
    match vae_rest(side, rest, levels) {
        Some(mapped) => one(format!("{side}.{mapped}")),
        None => one(name.to_string()),
    }
}

/// The diffusers `ZImageTransformer2DModel` source of Z-Image's original tensor `name`
/// (the names of Tongyi-MAI's single file, ComfyUI's and the GGUF files): the inverse of
/// diffusers' `convert_z_image_transformer_checkpoint_to_diffusers`, with the fused
/// `attention.qkv` read as diffusers' three projections stacked by rows.
pub(super) fn zimage_transformer(name: &str) -> Recipe {
    for (original, diffusers) in [
        ("x_embedder.", "all_x_embedder.2-1."),
        ("final_layer.", "all_final_layer.2-1."),
    ] {
        if let Some(rest) = name.strip_prefix(original) {
            return one(format!("{diffusers}{rest}"));
        }
    }
    let Some((block, rest)) = name.split_once(".attention.") else {
        return one(name.to_string());
    };
    match rest {
        "qkv.weight" => Recipe::Concat(
            ["to_q", "to_k", "to_v"]
                .map(|p| format!("{block}.attention.{p}.weight"))
                .to_vec(),
        ),
        "q_norm.weight" => one(format!("{block}.attention.norm_q.weight")),
        "k_norm.weight" => one(format!("{block}.attention.norm_k.weight")),
        _ => match rest.strip_prefix("out.") {
            Some(r) => one(format!("{block}.attention.to_out.0.{r}")),
            None => one(name.to_string()),
        },
    }
}

fn resnet(rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(x) => format!("conv_shortcut.{x}"),
        None => rest.to_string(),
    }
}

fn vae_rest(side: &str, rest: &str, levels: usize) -> Option<String> {
    if let Some(x) = rest.strip_prefix("norm_out.") {
        return Some(format!("conv_norm_out.{x}"));
    }
    if let Some(mid) = rest.strip_prefix("mid.") {
        let (part, x) = mid.split_once('.')?;
        return Some(match part {
            "block_1" => format!("mid_block.resnets.0.{}", resnet(x)),
            "block_2" => format!("mid_block.resnets.1.{}", resnet(x)),
            "attn_1" => {
                let (layer, p) = x.split_once('.')?;
                let layer = match layer {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return None,
                };
                format!("mid_block.attentions.0.{layer}.{p}")
            }
            _ => return None,
        });
    }
    let (blocks, level, x) = match side {
        "encoder" => {
            let (i, x) = indexed(rest, "down.")?;
            ("down_blocks", i, x)
        }
        "decoder" => {
            let (i, x) = indexed(rest, "up.")?;
            ("up_blocks", levels.checked_sub(i + 1)?, x)
        }
        _ => return None,
    };
    if let Some((j, r)) = indexed(x, "block.") {
        return Some(format!("{blocks}.{level}.resnets.{j}.{}", resnet(r)));
    }
    for (bfl, diff) in [
        ("downsample.", "downsamplers.0."),
        ("upsample.", "upsamplers.0."),
    ] {
        if let Some(r) = x.strip_prefix(bfl) {
            return Some(format!("{blocks}.{level}.{diff}{r}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Recipe {
        one(s.to_string())
    }

    #[test]
    fn transformer_names() {
        assert_eq!(flux_transformer("img_in.weight"), t("x_embedder.weight"));
        assert_eq!(
            flux_transformer("double_blocks.3.txt_mod.lin.bias"),
            t("transformer_blocks.3.norm1_context.linear.bias")
        );
        assert_eq!(
            flux_transformer("double_blocks.0.txt_attn.norm.key_norm.scale"),
            t("transformer_blocks.0.attn.norm_added_k.weight")
        );
        assert_eq!(
            flux_transformer("double_blocks.0.img_attn.proj.weight"),
            t("transformer_blocks.0.attn.to_out.0.weight")
        );
        assert_eq!(
            flux_transformer("double_blocks.0.txt_mlp.2.weight"),
            t("transformer_blocks.0.ff_context.net.2.weight")
        );
        assert_eq!(
            flux_transformer("double_blocks.0.img_mlp.0.bias"),
            t("transformer_blocks.0.ff.net.0.proj.bias")
        );
        assert_eq!(
            flux_transformer("single_blocks.7.linear1.bias"),
            Recipe::Concat(vec![
                "single_transformer_blocks.7.attn.to_q.bias".into(),
                "single_transformer_blocks.7.attn.to_k.bias".into(),
                "single_transformer_blocks.7.attn.to_v.bias".into(),
                "single_transformer_blocks.7.proj_mlp.bias".into(),
            ])
        );
        assert_eq!(
            flux_transformer("final_layer.adaLN_modulation.1.weight"),
            Recipe::SwapHalves("norm_out.linear.weight".into())
        );
    }

    #[test]
    fn zimage_names_are_diffusers_converter_inverted() {
        assert_eq!(
            zimage_transformer("x_embedder.bias"),
            t("all_x_embedder.2-1.bias")
        );
        assert_eq!(
            zimage_transformer("final_layer.adaLN_modulation.1.weight"),
            t("all_final_layer.2-1.adaLN_modulation.1.weight")
        );
        assert_eq!(
            zimage_transformer("noise_refiner.1.attention.qkv.weight"),
            Recipe::Concat(vec![
                "noise_refiner.1.attention.to_q.weight".into(),
                "noise_refiner.1.attention.to_k.weight".into(),
                "noise_refiner.1.attention.to_v.weight".into(),
            ])
        );
        assert_eq!(
            zimage_transformer("layers.29.attention.out.weight"),
            t("layers.29.attention.to_out.0.weight")
        );
        assert_eq!(
            zimage_transformer("context_refiner.0.attention.k_norm.weight"),
            t("context_refiner.0.attention.norm_k.weight")
        );
        assert_eq!(
            zimage_transformer("layers.3.feed_forward.w2.weight"),
            t("layers.3.feed_forward.w2.weight")
        );
        assert_eq!(
            zimage_transformer("cap_embedder.1.weight"),
            t("cap_embedder.1.weight")
        );
    }

    #[test]
    fn vae_names_reverse_the_decoder_levels() {
        assert_eq!(
            vae("decoder.up.3.block.0.nin_shortcut.weight", 4),
            t("decoder.up_blocks.0.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            vae("decoder.up.1.upsample.conv.bias", 4),
            t("decoder.up_blocks.2.upsamplers.0.conv.bias")
        );
        assert_eq!(
            vae("encoder.down.2.downsample.conv.weight", 4),
            t("encoder.down_blocks.2.downsamplers.0.conv.weight")
        );
        assert_eq!(
            vae("decoder.mid.attn_1.proj_out.weight", 4),
            t("decoder.mid_block.attentions.0.to_out.0.weight")
        );
        assert_eq!(
            vae("decoder.mid.block_2.norm1.weight", 4),
            t("decoder.mid_block.resnets.1.norm1.weight")
        );
        assert_eq!(
            vae("decoder.norm_out.bias", 4),
            t("decoder.conv_norm_out.bias")
        );
        assert_eq!(
            vae("decoder.conv_in.weight", 4),
            t("decoder.conv_in.weight")
        );
    }
}
