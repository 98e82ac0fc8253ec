#!/usr/bin/env python3
"""The PyTorch/diffusers twin of `cargo bench -p pictor-engine --bench components`: times one
FLUX component loaded from the same folder with the same inputs and prints one JSON line.

    python bench/diffusers_part.py --model DIR --part transformer|t5|clip|vae|matmul|linear|zimage \
        --size 512 --reps 3 --dtype f32|bf16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def status_bytes(key: str) -> int:
    """A /proc/self/status memory line (VmRSS, VmHWM) in bytes, as the Rust bench reads it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Starts VmHWM again from the current resident size (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--part", default="matmul")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--shape", default="1280,3072,3072", help="linear: m,k,n")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(a.dtype, torch.float32)
    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    if a.part == "matmul":
        x = torch.randn(a.size, a.size, generator=g).to(dtype)
        y = torch.randn(a.size, a.size, generator=g).to(dtype)
        run = lambda: x @ y  # noqa: E731
    elif a.part == "linear":
        # x·Wᵀ as a transformer layer runs it, W stored (n, k): the twin of Pictor's
        # `--part linear --kernel pictor`.
        m_, k_, n_ = (int(v) for v in a.shape.split(","))
        x = torch.randn(1, m_, k_, generator=g).to(dtype)
        w = (torch.randn(n_, k_, generator=g) * 0.02).to(dtype)
        run = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    elif a.part == "transformer":
        from diffusers import FluxTransformer2DModel
        m = FluxTransformer2DModel.from_pretrained(a.model, subfolder="transformer", torch_dtype=dtype).eval()
        c = m.config
        n = (a.size // 16) ** 2
        img = torch.randn(1, n, c.in_channels, generator=g).to(dtype)
        txt = torch.randn(1, 256, c.joint_attention_dim, generator=g).to(dtype)
        pooled = torch.randn(1, c.pooled_projection_dim, generator=g).to(dtype)
        ids = torch.zeros(a.size // 16, a.size // 16, 3)
        ids[..., 1] = torch.arange(a.size // 16)[:, None]
        ids[..., 2] = torch.arange(a.size // 16)[None, :]
        ids = ids.reshape(-1, 3).to(dtype)
        txt_ids = torch.zeros(256, 3).to(dtype)
        t = torch.ones(1).to(dtype)
        # FLUX.1-dev's guidance embedding runs at its default scale, as Pictor's does.
        guidance = torch.full([1], 3.5).to(dtype) if c.guidance_embeds else None
        run = lambda: m(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled,  # noqa: E731
                        timestep=t, img_ids=ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)
    elif a.part == "zimage":
        # Z-Image's transformer (diffusers >= 0.36: the venv of `tools/setup-venv.sh zimage`):
        # one forward at `--size` with a 128-token caption, as Pictor's `--part zimage` runs it.
        from diffusers import ZImageTransformer2DModel
        m = ZImageTransformer2DModel.from_pretrained(a.model, subfolder="transformer", torch_dtype=dtype).eval()
        c = m.config
        x = [torch.randn(c.in_channels, 1, a.size // 8, a.size // 8, generator=g).to(dtype)]
        cap = [torch.randn(128, c.cap_feat_dim, generator=g).to(dtype)]
        t = torch.full([1], 0.5).to(dtype)
        run = lambda: m(x, t, cap, return_dict=False)  # noqa: E731
    elif a.part == "t5":
        from transformers import T5EncoderModel
        m = T5EncoderModel.from_pretrained(a.model, subfolder="text_encoder_2", torch_dtype=dtype).eval()
        ids = (3 + torch.arange(256) % 500)[None]
        run = lambda: m(ids)  # noqa: E731
    elif a.part == "clip":
        from transformers import CLIPTextModel
        m = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder", torch_dtype=dtype).eval()
        n = m.config.max_position_embeddings
        ids = (3 + torch.arange(n) % 500)[None]
        run = lambda: m(ids)  # noqa: E731
    elif a.part == "vae":
        from diffusers import AutoencoderKL
        m = AutoencoderKL.from_pretrained(a.model, subfolder="vae", torch_dtype=dtype).eval()
        z = torch.randn(1, m.config.latent_channels, a.size // 8, a.size // 8, generator=g).to(dtype)
        run = lambda: m.decode(z)  # noqa: E731
    else:
        raise SystemExit(f"unknown part {a.part}")
    load = time.time() - t0
    loaded, load_peak = status_bytes("VmRSS"), status_bytes("VmHWM")
    reset_peak_rss()
    times = []
    with torch.inference_mode():
        run()  # warm-up
        for _ in range(max(1, a.reps)):
            s = time.time()
            run()
            times.append(time.time() - s)
    print(json.dumps({
        "engine": "diffusers", "part": a.part, "size": a.size, "dtype": a.dtype,
        "threads": torch.get_num_threads(), "times": times, "median": sorted(times)[len(times) // 2],
        "load_seconds": load, "loaded_rss_bytes": loaded, "load_peak_rss_bytes": load_peak,
        "run_peak_rss_bytes": status_bytes("VmHWM"),
        "peak_rss_bytes": max(load_peak, status_bytes("VmHWM"),
                              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }))


if __name__ == "__main__":
    main()
