#!/usr/bin/env python3
"""Writes full-width FLUX.1-schnell components with random weights, in the diffusers folder
layout and in bf16 like the real files, for speed and memory benchmarks (never for
quality):

* transformer: FLUX.1's width (3072, 24 heads × 128, RoPE axes 16/56/56) at reduced depth,
  `--double` double and `--single` single blocks (the real model has 19 and 38);
* text_encoder_2: T5-XXL's width (d_model 4096, 64 heads × 64, d_ff 10240, vocab 32128) with
  `--t5-layers` of its 24 layers;
* text_encoder: CLIP-L, whole (12 layers, 768 wide);
* vae: the FLUX autoencoder, whole (128/256/512/512 channels, 16 latent channels);
* tokenizers and scheduler: copied from tests/data/tiny-flux-schnell (the benches feed
  token ids directly).

With `--dev` the transformer has FLUX.1-dev's guidance embedding (`guidance_embeds`), in a
folder of its own whose other parts link to the schnell folder's.

The folder is cached outside the repository (default ~/.cache/pictor/bench/) and reused.

    python bench/make_fullwidth.py [--out DIR] [--double 2] [--single 4] [--t5-layers 2] [--dev]
    ~/.cache/pictor/venv-zimage/bin/python bench/make_fullwidth.py --zimage [--double L] [--single R]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def default_dir(double: int, single: int, t5_layers: int, dev: bool = False) -> Path:
    name = f"flux-fullwidth-{double}d{single}s-t5x{t5_layers}" + ("-dev" if dev else "")
    return Path.home() / ".cache" / "pictor" / "bench" / name


def transformer(double: int, single: int, dev: bool):
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=dev, axes_dims_rope=(16, 56, 56))


def make_dev(out: Path, double: int, single: int, t5_layers: int) -> Path:
    """The dev transformer beside links to the schnell folder's other parts (made first)."""
    if (out / "model_index.json").exists():
        return out
    schnell = make(default_dir(double, single, t5_layers), double, single, t5_layers)
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub in ("tokenizer", "tokenizer_2", "scheduler", "text_encoder", "text_encoder_2", "vae"):
        (tmp / sub).symlink_to(schnell / sub)
    model = transformer(double, single, dev=True).to(torch.bfloat16)
    model.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size="10GB")
    print(f"wrote dev transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", flush=True)
    shutil.copy(schnell / "model_index.json", tmp / "model_index.json")
    tmp.rename(out)
    return out


def make(out: Path, double: int, single: int, t5_layers: int) -> Path:
    if (out / "model_index.json").exists():
        return out
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny = ROOT / "tests" / "data" / "tiny-flux-schnell"
    for sub in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(tiny / sub, tmp / sub)
    shutil.copy(tiny / "model_index.json", tmp / "model_index.json")
    bf16 = torch.bfloat16

    def save(model, sub):
        model.to(bf16).save_pretrained(tmp / sub, safe_serialization=True, max_shard_size="10GB")
        print(f"wrote {sub}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", flush=True)

    save(transformer(double, single, dev=False), "transformer")
    save(T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers,
                                 num_heads=64, relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                                 dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False)),
         "text_encoder_2")
    save(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      projection_dim=768, num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77, hidden_act="quick_gelu")),
         "text_encoder")
    save(AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                       scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                       use_post_quant_conv=False, mid_block_add_attention=True),
         "vae")
    tmp.rename(out)
    return out


def make_zimage(out: Path, layers: int, refiners: int) -> Path:
    """Z-Image-Turbo's transformer at full width (3840, 30 heads of 128, 2560-wide caption
    features) with `layers` main blocks and `refiners` refiner blocks each (the real model:
    30 and 2), bf16, random, in a diffusers folder that names `ZImagePipeline`. Needs the
    venv of `tools/setup-venv.sh zimage`."""
    if (out / "model_index.json").exists():
        return out
    from diffusers import ZImageTransformer2DModel
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=layers,
        n_refiner_layers=refiners, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512])
    with torch.no_grad():  # its pad tokens are made with torch.empty
        model.x_pad_token.normal_(0, 0.02)
        model.cap_pad_token.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size="10GB")
    (tmp / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}\n')
    print(f"wrote Z-Image transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", flush=True)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--t5-layers", type=int, default=2)
    ap.add_argument("--dev", action="store_true", help="FLUX.1-dev's guidance embedding")
    ap.add_argument("--zimage", action="store_true",
                    help="Z-Image-Turbo's transformer instead: --double main blocks, --single refiners")
    a = ap.parse_args()
    if a.zimage:
        out = a.out or Path.home() / ".cache" / "pictor" / "bench" / f"zimage-fullwidth-{a.double}l{a.single}r"
        out.parent.mkdir(parents=True, exist_ok=True)
        print(make_zimage(out, a.double, a.single))
        return
    out = a.out or default_dir(a.double, a.single, a.t5_layers, a.dev)
    out.parent.mkdir(parents=True, exist_ok=True)
    print((make_dev if a.dev else make)(out, a.double, a.single, a.t5_layers))


if __name__ == "__main__":
    main()
