#!/usr/bin/env python3
"""Side-by-side engine benchmark: Pictor (candle) against diffusers (PyTorch) on the same
full-width FLUX.1-schnell files with random weights, same sizes, same thread count.

For every part, size and dtype it runs the two engines in alternating separate processes
(`--rounds` each, so slow drift hits both), takes the median of their medians, and prints:
seconds, the ratio Pictor/diffusers, each process's peak RSS, the bytes of the part's
weights, the part's FLOPs and the fraction of the machine's matmul roofline (a 4096³
x·Wᵀ timed through each engine's own layer kernel in the same run). The transformer is built at reduced depth;
its per-block time and an estimate for the real 19 + 38 blocks are printed too.

    python bench/engine.py [--parts transformer,vae,t5,clip] [--sizes 512,1024]
                           [--dtypes f32,bf16] [--rounds 2] [--reps 2] [--threads 2] [--dev]

Needs the tools venv (tools/setup-venv.sh); builds the bench binary with cargo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import make_fullwidth  # noqa: E402


def run(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def weights_bytes(model: Path, sub: str, dtype: str) -> int:
    n = sum(f.stat().st_size for f in (model / sub).glob("*.safetensors"))
    return n * 2 if dtype == "f32" else n  # stored in bf16


def flops(model: Path, part: str, size: int) -> float:
    cfg = lambda sub: json.loads((model / sub / "config.json").read_text())  # noqa: E731
    if part == "transformer":
        c = cfg("transformer")
        d = c["num_attention_heads"] * c["attention_head_dim"]
        n = (size // 16) ** 2 + 256
        return (c["num_layers"] + c["num_single_layers"]) * (24 * n * d * d + 4 * n * n * d)
    if part == "t5":
        c = cfg("text_encoder_2")
        inner, d, n = c["num_heads"] * c["d_kv"], c["d_model"], 256
        return c["num_layers"] * (2 * n * (4 * d * inner + 3 * d * c["d_ff"]) + 4 * n * n * inner)
    if part == "clip":
        c = cfg("text_encoder")
        d, n = c["hidden_size"], c["max_position_embeddings"]
        return c["num_hidden_layers"] * (2 * n * (4 * d * d + 2 * d * c["intermediate_size"]) + 4 * n * n * d)
    if part == "vae":
        c = cfg("vae")
        chans = list(reversed(c["block_out_channels"]))
        z, per = c["latent_channels"], c["layers_per_block"] + 1
        h = size // 8
        conv = lambda ci, co, hw, k=3: 2 * ci * co * k * k * hw * hw  # noqa: E731
        f = conv(z, chans[0], h)
        res = lambda ci, co, hw: conv(ci, co, hw) + conv(co, co, hw) + (conv(ci, co, hw, 1) if ci != co else 0)  # noqa: E731
        f += 2 * res(chans[0], chans[0], h) + 4 * (h * h) ** 2 * chans[0] + 8 * chans[0] ** 2 * h * h
        c_in = chans[0]
        for i, co in enumerate(chans):
            for _ in range(per):
                f += res(c_in, co, h)
                c_in = co
            if i < len(chans) - 1:
                h *= 2
                f += conv(co, co, h)
        return f + conv(c_in, 3, h)
    return 2 * size ** 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--parts", default="transformer,vae,t5,clip")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw runs here")
    ap.add_argument("--dev", action="store_true",
                    help="FLUX.1-dev's transformer (guidance embedding, run at guidance 3.5)")
    a = ap.parse_args()
    if a.model:
        model = a.model
    elif a.dev:
        model = make_fullwidth.make_dev(make_fullwidth.default_dir(2, 4, 2, dev=True), 2, 4, 2)
    else:
        model = make_fullwidth.make(make_fullwidth.default_dir(2, 4, 2), 2, 4, 2)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    subprocess.run(["cargo", "bench", "-q", "-p", "pictor-engine", "--bench", "components", "--no-run"],
                   cwd=ROOT, check=True)
    py = sys.executable

    def engines(part: str, size: int, dtype: str, extra: list[str] | None = None,
                pictor_extra: list[str] | None = None) -> dict:
        args = ["--model", str(model), "--part", part, "--size", str(size), "--reps", str(a.reps),
                "--dtype", dtype, *(extra or [])]
        pictor = ["cargo", "bench", "-q", "-p", "pictor-engine", "--bench", "components", "--", *args,
                  *(pictor_extra or [])]
        torch = [py, str(HERE / "diffusers_part.py"), *args, "--threads", str(a.threads)]
        got: dict = {"pictor": [], "diffusers": []}
        for r in range(a.rounds):
            order = [("pictor", pictor), ("diffusers", torch)]
            for name, cmd in (order if r % 2 == 0 else order[::-1]):
                got[name].append(run(cmd, env))
        return got

    raw, rows = [], []
    for dtype in a.dtypes.split(","):
        # Each engine's own layer kernel: Pictor's takes f32 activations and the weight in
        # `dtype`, as its transformer runs it.
        roof = engines("linear", 4096, dtype, ["--shape", "4096,4096,4096"], ["--kernel", "pictor"])
        raw.append(roof)
        peak = {e: 2 * 4096 ** 3 / statistics.median(r["median"] for r in roof[e]) for e in roof}
        print(f"[{dtype}] linear 4096³: pictor {peak['pictor'] / 1e9:.0f} GFLOP/s, "
              f"diffusers {peak['diffusers'] / 1e9:.0f} GFLOP/s", flush=True)
        for part in a.parts.split(","):
            for size in ([int(s) for s in a.sizes.split(",")] if part in ("transformer", "vae") else [0]):
                got = engines(part, size or 512, dtype)
                raw.append(got)
                med = {e: statistics.median(r["median"] for r in got[e]) for e in got}
                rss = {e: max(r["peak_rss_bytes"] for r in got[e]) for e in got}
                run_rss = {e: max(r.get("run_peak_rss_bytes", 0) for r in got[e]) for e in got}
                f = flops(model, part, size or 512)
                sub = {"transformer": "transformer", "vae": "vae", "t5": "text_encoder_2",
                       "clip": "text_encoder"}[part]
                row = {"part": part, "size": size or "-", "dtype": dtype, "pictor_s": med["pictor"],
                       "diffusers_s": med["diffusers"], "ratio": med["pictor"] / med["diffusers"],
                       "pictor_rss_gb": rss["pictor"] / 2**30, "diffusers_rss_gb": rss["diffusers"] / 2**30,
                       "pictor_run_rss_gb": run_rss["pictor"] / 2**30,
                       "diffusers_run_rss_gb": run_rss["diffusers"] / 2**30,
                       "weights_gb": weights_bytes(model, sub, dtype) / 2**30, "gflop": f / 1e9,
                       "pictor_roof": f / med["pictor"] / peak["pictor"],
                       "diffusers_roof": f / med["diffusers"] / peak["diffusers"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("RSS: each process's peak, and in brackets its peak while running (after loading).")
    print("| part | size | dtype | Pictor s | diffusers s | Pictor/diffusers | Pictor RSS GiB | diffusers RSS GiB "
          "| weights GiB | Pictor RSS / weights | GFLOP | Pictor % roofline | diffusers % roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['size']} | {r['dtype']} | {r['pictor_s']:.3f} | {r['diffusers_s']:.3f} | "
              f"{r['ratio']:.2f}× | {r['pictor_rss_gb']:.2f} ({r['pictor_run_rss_gb']:.2f}) | "
              f"{r['diffusers_rss_gb']:.2f} ({r['diffusers_run_rss_gb']:.2f}) | {r['weights_gb']:.2f} | "
              f"{r['pictor_rss_gb'] / r['weights_gb']:.2f}× | "
              f"{r['gflop']:.0f} | {100 * r['pictor_roof']:.0f} % | {100 * r['diffusers_roof']:.0f} % |")
    tr = json.loads((model / "transformer" / "config.json").read_text())
    blocks = tr["num_layers"] + tr["num_single_layers"]
    for r in rows:
        if r["part"] == "transformer":
            print(f"transformer {r['size']}² {r['dtype']}: per block pictor {r['pictor_s'] / blocks:.2f} s, "
                  f"diffusers {r['diffusers_s'] / blocks:.2f} s; the real 19 + 38 blocks ≈ "
                  f"{57 * r['pictor_s'] / blocks:.0f} s vs {57 * r['diffusers_s'] / blocks:.0f} s per step")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "raw": raw}, indent=1))


if __name__ == "__main__":
    main()
