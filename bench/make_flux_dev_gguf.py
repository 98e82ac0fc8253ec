#!/usr/bin/env python3
"""A full-size FLUX.1-dev transformer with random weights, written straight to a Q8_0 GGUF
in city96's conventions (Black Forest Labs names; blocks' matrices Q8_0, the input and
output layers F16, 1-D tensors F32), for the memory run of BENCHMARKS.md: the bf16 file
(23.8 GB) does not fit this machine's disk beside the others, and a Q8_0 GGUF is what a
24 GiB machine runs anyway. 11.9 B parameters with the guidance embedding (12.7 GB).

    ~/.cache/pictor/venv-zimage/bin/python bench/make_flux_dev_gguf.py [--out FILE]
(default ~/.cache/pictor/bench/flux-full-q8_0-dev/flux1-dev-Q8_0.gguf, with links to the
schnell run's T5, CLIP and autoencoder beside it).

Weights are N(0, 0.02), norm scales 1: the numbers are meaningless, the work and memory are
real.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

BENCH = Path.home() / ".cache" / "pictor" / "bench"
H, MLP, DOUBLE, SINGLE, HEAD = 3072, 12288, 19, 38, 128
KEEP = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {}

    def linear(name: str, inp: int, out: int) -> None:
        s[f"{name}.weight"] = (out, inp)
        s[f"{name}.bias"] = (out,)

    linear("img_in", 64, H)
    linear("txt_in", 4096, H)
    for emb, inp in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        linear(f"{emb}.in_layer", inp, H)
        linear(f"{emb}.out_layer", H, H)
    for i in range(DOUBLE):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            linear(f"{p}_mod.lin", H, 6 * H)
            linear(f"{p}_attn.qkv", H, 3 * H)
            s[f"{p}_attn.norm.query_norm.scale"] = (HEAD,)
            s[f"{p}_attn.norm.key_norm.scale"] = (HEAD,)
            linear(f"{p}_attn.proj", H, H)
            linear(f"{p}_mlp.0", H, MLP)
            linear(f"{p}_mlp.2", MLP, H)
    for i in range(SINGLE):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", H, 3 * H + MLP)
        linear(f"{p}.linear2", H + MLP, H)
        s[f"{p}.norm.query_norm.scale"] = (HEAD,)
        s[f"{p}.norm.key_norm.scale"] = (HEAD,)
        linear(f"{p}.modulation.lin", H, 3 * H)
    linear("final_layer.linear", H, 64)
    linear("final_layer.adaLN_modulation.1", H, 2 * H)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=BENCH / "flux-full-q8_0-dev" / "flux1-dev-Q8_0.gguf")
    out: Path = ap.parse_args().out
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(out), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, shape in shapes().items():
        if name.endswith(".scale"):
            data = np.ones(shape, np.float32)
        else:
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, data)
        elif name.startswith(KEEP):
            writer.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    schnell = BENCH / "flux-full-q8_0"
    for name in ("t5xxl-Q8_0.gguf", "clip_l.safetensors", "vae"):
        link = out.parent / name
        if not link.exists() and (schnell / name).exists():
            link.symlink_to((schnell / name).resolve())
    print(out)


if __name__ == "__main__":
    main()
