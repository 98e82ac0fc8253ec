#!/usr/bin/env python3
"""A full-size Z-Image-Turbo with random weights, laid out as ComfyUI users hold it, for
the memory run of BENCHMARKS.md (`bench/zimage_memory.sh`): every tensor the real model has,
at its real shape, in the real names.

* z_image_turbo-Q8_0.gguf: the transformer (6.15 B parameters: width 3840, 30 main blocks,
  2 + 2 refiner blocks, 30 heads of 128, FFN 10240) in Z-Image's original names, written
  with the `gguf` package as ComfyUI-GGUF's converter does: matrices in Q8_0, the rest F32
  (6.5 GB). The real bf16 file is 12.3 GB.
* qwen_3_4b.safetensors: Qwen3-4B (hidden 2560, 36 layers, 32 heads and 8 KV heads of 128,
  MLP 9728, vocabulary 151936) with `model.` names, in bf16 (8.0 GB), as ComfyUI ships it.
* ae.safetensors + ae.json: links to the full-width FLUX autoencoder that
  `bench/make_fullwidth.py` makes (FLUX's, which Z-Image uses).
No tokenizer: Pictor's built-in Qwen tokenizer is used, as with the real split files.

Weights are N(0, 0.02), norms 1: the numbers are meaningless, the work and memory are real.

    ~/.cache/pictor/venv-zimage/bin/python bench/make_zimage_full.py [--out DIR]
(about 15 GB on disk; default ~/.cache/pictor/bench/zimage-full).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
import safetensors.torch
import torch

BENCH = Path.home() / ".cache" / "pictor" / "bench"
DIM, LAYERS, REFINERS, HEAD, FFN, CAP, ADALN = 3840, 30, 2, 128, 10240, 2560, 256


def transformer_shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {
        "x_embedder.weight": (DIM, 64), "x_embedder.bias": (DIM,),
        "cap_embedder.0.weight": (CAP,), "cap_embedder.1.weight": (DIM, CAP), "cap_embedder.1.bias": (DIM,),
        "x_pad_token": (1, DIM), "cap_pad_token": (1, DIM),
        "t_embedder.mlp.0.weight": (1024, 256), "t_embedder.mlp.0.bias": (1024,),
        "t_embedder.mlp.2.weight": (ADALN, 1024), "t_embedder.mlp.2.bias": (ADALN,),
        "final_layer.linear.weight": (64, DIM), "final_layer.linear.bias": (64,),
        "final_layer.adaLN_modulation.1.weight": (DIM, ADALN), "final_layer.adaLN_modulation.1.bias": (DIM,),
    }
    blocks = [(f"noise_refiner.{i}", True) for i in range(REFINERS)]
    blocks += [(f"context_refiner.{i}", False) for i in range(REFINERS)]
    blocks += [(f"layers.{i}", True) for i in range(LAYERS)]
    for p, modulated in blocks:
        s[f"{p}.attention.qkv.weight"] = (3 * DIM, DIM)
        s[f"{p}.attention.out.weight"] = (DIM, DIM)
        s[f"{p}.attention.q_norm.weight"] = (HEAD,)
        s[f"{p}.attention.k_norm.weight"] = (HEAD,)
        for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            s[f"{p}.{n}.weight"] = (DIM,)
        s[f"{p}.feed_forward.w1.weight"] = (FFN, DIM)
        s[f"{p}.feed_forward.w2.weight"] = (DIM, FFN)
        s[f"{p}.feed_forward.w3.weight"] = (FFN, DIM)
        if modulated:
            s[f"{p}.adaLN_modulation.0.weight"] = (4 * DIM, ADALN)
            s[f"{p}.adaLN_modulation.0.bias"] = (4 * DIM,)
    return s


def encoder_shapes() -> dict[str, tuple[int, ...]]:
    h, q, kv, mlp = 2560, 32 * 128, 8 * 128, 9728
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (151936, h), "model.norm.weight": (h,)}
    for i in range(36):
        p = f"model.layers.{i}"
        s.update({f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                  f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                  f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, q),
                  f"{p}.self_attn.q_norm.weight": (128,), f"{p}.self_attn.k_norm.weight": (128,),
                  f"{p}.mlp.gate_proj.weight": (mlp, h), f"{p}.mlp.up_proj.weight": (mlp, h),
                  f"{p}.mlp.down_proj.weight": (h, mlp)})
    return s


def value(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if (len(shape) == 1 and "norm" in name) or name.startswith("cap_embedder.0"):
        return np.ones(shape, np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=BENCH / "zimage-full")
    out: Path = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    gguf_path = out / "z_image_turbo-Q8_0.gguf"
    if not gguf_path.exists():
        writer = gguf.GGUFWriter(str(gguf_path), arch="lumina2")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, shape in transformer_shapes().items():
            data = value(rng, name, shape)
            if len(shape) == 2 and shape[0] > 1:
                q = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
            else:
                writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()

    te_path = out / "qwen_3_4b.safetensors"
    if not te_path.exists():
        tensors = {n: torch.from_numpy(value(rng, n, s)).to(torch.bfloat16) for n, s in encoder_shapes().items()}
        safetensors.torch.save_file(tensors, str(te_path))
        del tensors

    vae = BENCH / "flux-fullwidth-2d4s-t5x2" / "vae"
    for link, target in (("ae.safetensors", "diffusion_pytorch_model.safetensors"), ("ae.json", "config.json")):
        if not (out / link).exists():
            (out / link).symlink_to(vae / target)
    print(out)


if __name__ == "__main__":
    main()
