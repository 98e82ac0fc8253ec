#!/usr/bin/env python3
"""Lay the tiny Z-Image-Turbo fixture out as users hold the real one outside diffusers.

Reads tests/data/tiny-z-image-turbo (made by make_tiny_zimage.py) and writes, in --out
(e.g. tests/data/tiny-z-image-turbo-split), the same weights as:

* z_image_turbo_bf16.safetensors: the transformer in Z-Image's original names (Tongyi-MAI's
  single file, ComfyUI's `split_files/diffusion_models/z_image_turbo_bf16.safetensors`):
  fused `attention.qkv`, `attention.out`, `q_norm`/`k_norm`, `x_embedder`, `final_layer`.
  The renaming is checked by running diffusers' own single-file converter
  (`convert_z_image_transformer_checkpoint_to_diffusers`) on it: it must give back the
  diffusers state dict exactly.
* qwen_3_4b.safetensors: the Qwen3 text encoder with `model.` before its names, as
  `Qwen3ForCausalLM` and ComfyUI's `split_files/text_encoders/qwen_3_4b.safetensors` have.
* ae.safetensors + ae.json: the FLUX autoencoder in Black Forest Labs' names, as links to
  the FLUX fixture's own files (Z-Image's autoencoder is byte for byte the FLUX fixture's).
* tokenizer.json: the fixture's tokenizer (the real split files come without one; Pictor then
  uses Qwen's, built in).
* z_image_turbo-Q8_0.gguf: the transformer as a GGUF in the original names, written with the
  `gguf` package as ComfyUI-GGUF's converter does (architecture `lumina2`): matrices whose
  rows are a multiple of 32 in Q8_0, everything else in F32.

    ~/.cache/pictor/venv-zimage/bin/python tools/make_tiny_zimage_split.py \
        --out tests/data/tiny-z-image-turbo-split
Deterministic.
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
import safetensors.torch
import torch
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "data" / "tiny-z-image-turbo"
FLUX = ROOT / "tests" / "data" / "tiny-flux-schnell"


def to_original(diffusers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ZImageTransformer2DModel names back to Z-Image's original ones."""
    out: dict[str, torch.Tensor] = {}
    for key, value in diffusers.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q.weight" in key:
            block = key.split(".attention.")[0]
            out[f"{block}.attention.qkv.weight"] = torch.cat(
                [diffusers[f"{block}.attention.to_{p}.weight"] for p in "qkv"], dim=0)
            continue
        new = (key.replace("all_x_embedder.2-1.", "x_embedder.")
                  .replace("all_final_layer.2-1.", "final_layer.")
                  .replace(".attention.to_out.0.", ".attention.out.")
                  .replace(".attention.norm_q.", ".attention.q_norm.")
                  .replace(".attention.norm_k.", ".attention.k_norm."))
        out[new] = value
    return out


def check_against_diffusers(original: dict, diffusers: dict) -> None:
    back = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(diffusers), set(back) ^ set(diffusers)
    for key, value in diffusers.items():
        assert torch.equal(back[key], value), key


def write_gguf(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    writer = gguf.GGUFWriter(str(path), arch="lumina2")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kinds = {}
    for name, value in sorted(tensors.items()):
        data = value.to(torch.float32).numpy()
        if data.ndim == 2 and data.shape[-1] % 32 == 0 and name != "x_pad_token" and name != "cap_pad_token":
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            kind = gguf.GGMLQuantizationType.F32
            writer.add_tensor(name, np.ascontiguousarray(data))
        kinds[name] = kind.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    out: Path = ap.parse_args().out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    diffusers = safetensors.torch.load_file(str(SOURCE / "transformer" / "diffusion_pytorch_model.safetensors"))
    original = to_original(diffusers)
    check_against_diffusers(original, diffusers)
    safetensors.torch.save_file(original, str(out / "z_image_turbo_bf16.safetensors"))

    encoder = safetensors.torch.load_file(str(SOURCE / "text_encoder" / "model.safetensors"))
    safetensors.torch.save_file({f"model.{k}": v for k, v in encoder.items()}, str(out / "qwen_3_4b.safetensors"))

    for name in ("ae.safetensors", "ae.json"):
        (out / name).symlink_to(Path("..") / FLUX.name / name)
    shutil.copyfile(SOURCE / "tokenizer" / "tokenizer.json", out / "tokenizer.json")
    kinds = write_gguf(out / "z_image_turbo-Q8_0.gguf", original)

    q8 = sorted(n for n, k in kinds.items() if k == "Q8_0")
    (out / "README.md").write_text(
        "# tiny-z-image-turbo-split test fixture\n\n"
        "The tiny Z-Image-Turbo fixture (`tests/data/tiny-z-image-turbo`, same weights) laid out as\n"
        "users hold the real model outside diffusers. Generated — do not edit by hand. Regenerate with:\n\n"
        "```sh\n~/.cache/pictor/venv-zimage/bin/python tools/make_tiny_zimage_split.py "
        "--out tests/data/tiny-z-image-turbo-split\n```\n\n"
        "- `z_image_turbo_bf16.safetensors`: transformer, Z-Image's original names (fused qkv); "
        "diffusers' single-file converter turns it back into the diffusers state dict exactly.\n"
        "- `qwen_3_4b.safetensors`: text encoder, names prefixed `model.`.\n"
        "- `ae.safetensors`, `ae.json`: links to the FLUX fixture's autoencoder (BFL names).\n"
        "- `tokenizer.json`: the fixture's tokenizer.\n"
        f"- `z_image_turbo-Q8_0.gguf`: the transformer as GGUF (`gguf` {version('gguf')} package, arch "
        f"`lumina2`), {len(q8)} matrices in Q8_0, the rest F32.\n")
    print(f"wrote {out}: {len(original)} transformer tensors ({len(q8)} in Q8_0 in the GGUF)")


if __name__ == "__main__":
    main()
