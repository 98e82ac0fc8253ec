#!/usr/bin/env python3
"""Evaluate models/pictor-tiny on prompts with HELD-OUT colour-shape pairs (tools/scenes.py).

Images come from diffusers' FluxPipeline loaded from the exported folder (4 steps,
guidance_scale 0, max_sequence_length = the trained T5 length, 128x128), or with --pictor
from Pictor itself over its HTTP API (what users get), and are scored
by pixel statistics:

* bg colour : nearest named colour of the median of the outer 10 % frame
* fg mask   : pixels whose RGB distance to that median is > 80
* position  : 3x3 cell containing the centroid of the mask
* fg colour : nearest named colour of the median of the most object-like 30 % of the mask
* shape     : argmax over the 6 shapes of the IoU between the mask and the shape's template
              (rendered at the prompted size and cell, moved to the mask centroid, 3 scales)
* frame     : how far the outermost 2 pixels of each side stray from the background just
              inside them (the median of the band 4..12 px in), in 0..255 levels averaged
              over RGB; the worst side counts. Solid backgrounds have none (ground truth: 0).

Prompt sets (solid backgrounds chosen far from the shape colour):
  centre-held  "a large {c} {s} on a {bg} background in the centre", 12 held-out pairs x 4 bg
  centre-seen  the same for 12 pairs seen in training
  pos-held     small held-out shapes in the 8 non-centre cells, canonical and "label:" captions

    python tools/eval_tiny.py [--model models/pictor-tiny] [--source model|gt|ae] [--steps 4]
                              [--pictor target/release/pictor]   # through Pictor's HTTP API
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_tiny as T  # noqa: E402
import scenes  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

FG_THRESHOLD = 80.0


def far_backgrounds(colour: str, k: int, seed: int) -> list[str]:
    rgb = np.array(scenes.COLOURS[colour], np.float32)
    far = [c for c in scenes.COLOUR_NAMES
           if np.linalg.norm(np.array(scenes.COLOURS[c], np.float32) - rgb) > 150]
    rng = np.random.default_rng([seed, scenes.COLOUR_NAMES.index(colour)])
    return [far[i] for i in rng.choice(len(far), size=min(k, len(far)), replace=False)]


def seen_pairs() -> list[tuple[str, str]]:
    held = dict(scenes.HELD_OUT)
    return [(c, scenes.SHAPES[(scenes.SHAPES.index(held[c]) + 3) % 6]) for c in scenes.COLOUR_NAMES]


def prompt_sets(seed: int) -> dict[str, list[dict]]:
    sets: dict[str, list[dict]] = {"centre-held": [], "centre-seen": [], "pos-held": []}
    for name, pairs in (("centre-held", scenes.HELD_OUT), ("centre-seen", seen_pairs())):
        for c, s in pairs:
            for bg in far_backgrounds(c, 4, seed):
                sc = scenes.eval_scene(c, s, "large", (1, 1), bg)
                sets[name].append({"prompt": scenes.caption(sc, canonical=True), "colour": c, "shape": s,
                                   "size": "large", "cell": [1, 1], "bg": bg})
    cells = [p for p in scenes.POSITIONS if p != (1, 1)]
    for i, (c, s) in enumerate(scenes.HELD_OUT):
        bgs = far_backgrounds(c, 8, seed + 1)
        for j, cell in enumerate(cells):
            bg = bgs[j % len(bgs)]
            sc = scenes.eval_scene(c, s, "small", cell, bg)
            if (i + j) % 2 == 0:
                p = scenes.caption(sc, canonical=True)
            else:
                p = f"{scenes.POS_LABELS[cell][0]}: small {c} {s}, {bg} background"
            sets["pos-held"].append({"prompt": p, "colour": c, "shape": s, "size": "small",
                                     "cell": list(cell), "bg": bg})
    return sets


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


_TEMPLATES: dict = {}


def templates(size: str, cell) -> dict:
    key = (size, tuple(cell))
    if key not in _TEMPLATES:
        out = {}
        for s in scenes.SHAPES:
            ms = []
            for k in (0.85, 1.0, 1.15):
                sc = scenes.eval_scene("white", s, size, cell, "black")
                sc["objects"][0]["r"] *= k
                _, m = scenes.render(sc, with_mask=True)
                ms.append(m > 127)
            out[s] = ms
        _TEMPLATES[key] = out
    return _TEMPLATES[key]


def analyse(img: np.ndarray, item: dict) -> dict:
    h = img.shape[0]
    f = max(1, int(round(0.1 * h)))
    x = img.astype(np.float32)
    frame = np.concatenate([x[:f].reshape(-1, 3), x[-f:].reshape(-1, 3), x[:, :f].reshape(-1, 3),
                            x[:, -f:].reshape(-1, 3)])
    bg_rgb = np.median(frame, 0)
    res = {"bg": scenes.nearest_colour(bg_rgb), "fg": None, "cell": None, "shape": None,
           "frame": frame_offset(img)}
    dist = np.linalg.norm(x - bg_rgb, axis=-1)
    mask = dist > FG_THRESHOLD
    if mask.sum() < 8:
        return res
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    res["cell"] = [min(2, int(cy / (h / 3))), min(2, int(cx / (h / 3)))]
    d = dist[mask]
    sel = d >= np.quantile(d, 0.7)
    res["fg"] = scenes.nearest_colour(np.median(x[mask][sel], 0))
    best, best_iou = None, -1.0
    for s, ms in templates(item["size"], item["cell"]).items():
        for m in ms:
            ty, tx = np.nonzero(m)
            mm = _shift(m, int(round(cy - ty.mean())), int(round(cx - tx.mean())))
            iou = (mm & mask).sum() / max(1, (mm | mask).sum())
            if iou > best_iou:
                best, best_iou = s, iou
    res["shape"], res["iou"] = best, float(best_iou)
    return res


def frame_offset(img: np.ndarray) -> float:
    """The worst side's mean |edge band (2 px) - background just inside (median of 4..12 px)|."""
    x = img.astype(np.float32)
    sides = [x, x[::-1], x.transpose(1, 0, 2), x.transpose(1, 0, 2)[::-1]]
    worst = 0.0
    for side in sides:
        edge = side[:2, 12:-12].reshape(-1, 3).mean(0)
        inside = np.median(side[4:12, 12:-12].reshape(-1, 3), 0)
        worst = max(worst, float(np.abs(edge - inside).mean()))
    return worst


def score(items: list[dict], results: list[dict]) -> dict:
    n = len(items)
    acc = lambda k, want: 100.0 * sum(r[k] == want(i) for i, r in zip(items, results)) / n  # noqa: E731
    return {"n": n,
            "fg": acc("fg", lambda i: i["colour"]),
            "bg": acc("bg", lambda i: i["bg"]),
            "pos": acc("cell", lambda i: i["cell"]),
            "shape": acc("shape", lambda i: i["shape"]),
            "frame": float(np.mean([r["frame"] for r in results])),
            "frame_over_4": 100.0 * sum(r["frame"] > 4 for r in results) / n}


@torch.no_grad()
def generate(pipe, items: list[dict], steps: int, seed: int, bs: int = 16) -> np.ndarray:
    out = []
    for s in range(0, len(items), bs):
        chunk = items[s:s + bs]
        gens = [torch.Generator().manual_seed(seed * 100_000 + s + j) for j in range(len(chunk))]
        ims = pipe([it["prompt"] for it in chunk], height=128, width=128, num_inference_steps=steps,
                   guidance_scale=0.0, max_sequence_length=T.T5_LEN, generator=gens, output_type="np").images
        out.append((ims * 255).round().astype(np.uint8))
    return np.concatenate(out)


def generate_pictor(binary: Path, model: Path, items: list[dict], steps: int, seed: int) -> np.ndarray:
    """The same prompts through Pictor itself: `pictor serve` on a free loopback port with
    the model, one POST /v1/images/generations per prompt (b64_json, seed per item)."""
    import base64
    import io
    import socket
    import subprocess
    import tempfile
    import urllib.request

    from PIL import Image
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="pictor-eval-"))
    cfg = tmp / "pictor.toml"
    cfg.write_text(f'listen = "127.0.0.1:{port}"\ndata_dir = "{tmp / "data"}"\n'
                   f'[models.eval]\npath = "{model.resolve()}"\ndefault_size = "128x128"\nmin_side = 64\n')
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([str(binary), "--config", str(cfg), "serve"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/readyz").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"pictor serve did not become ready; see {tmp / 'serve.log'}")
        out = []
        for k, it in enumerate(items):
            body = json.dumps({"model": "eval", "prompt": it["prompt"], "size": "128x128", "steps": steps,
                               "seed": seed * 100_000 + k, "response_format": "b64_json"}).encode()
            req = urllib.request.Request(url + "/v1/images/generations", data=body,
                                         headers={"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(req).read())
            png = base64.b64decode(reply["data"][0]["b64_json"])
            out.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        return np.stack(out)
    finally:
        proc.terminate()
        proc.wait()


def ground_truth(items: list[dict], seed: int) -> np.ndarray:
    return np.stack([scenes.render(scenes.eval_scene(it["colour"], it["shape"], it["size"], it["cell"], it["bg"],
                                                     jitter_seed=seed * 100_000 + k))
                     for k, it in enumerate(items)])


@torch.no_grad()
def ae_roundtrip(vae, imgs: np.ndarray) -> np.ndarray:
    x = T.to_float(imgs)
    rec = torch.cat([vae.decode(vae.encode(x[s:s + 32]).latent_dist.mean).sample for s in range(0, len(x), 32)])
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_grid(imgs: np.ndarray, path: Path, cols: int = 8) -> None:
    from PIL import Image
    n = (len(imgs) // cols) * cols
    if n == 0:
        return
    rows = [np.concatenate(list(imgs[r * cols:(r + 1) * cols]), 1) for r in range(n // cols)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=HERE.parent / "models" / "pictor-tiny")
    ap.add_argument("--source", choices=["model", "gt", "ae"], default="model")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1,
                    help="score the prompt sets of seeds seed..seed+N-1 together (each seed draws "
                         "its own backgrounds and noise), for a less noisy estimate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="results JSON + sample grids go here")
    ap.add_argument("--pictor", type=Path, default=None, metavar="BIN",
                    help="generate through this pictor binary's HTTP API instead of diffusers")
    args = ap.parse_args()
    T.setup_torch(args.threads)
    T._quiet()
    out = args.out or (T.train_dir() / "eval")
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    per_seed = {sd: prompt_sets(sd) for sd in seeds}
    sets = {name: [it for sd in seeds for it in per_seed[sd][name]] for name in per_seed[seeds[0]]}
    pipe = None
    if args.source == "ae" or (args.source == "model" and args.pictor is None):
        from diffusers import FluxPipeline
        pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
    engine = "pictor" if args.pictor is not None else "diffusers"
    report = {"source": args.source, "engine": engine, "steps": args.steps, "model": str(args.model),
              "seeds": seeds, "sets": {}}
    t0 = time.time()

    def images(items: list[dict], seed: int) -> np.ndarray:
        if args.source == "model" and args.pictor is not None:
            return generate_pictor(args.pictor, args.model, items, args.steps, seed)
        if args.source == "model":
            return generate(pipe, items, args.steps, seed)
        imgs = ground_truth(items, seed)
        return ae_roundtrip(pipe.vae, imgs) if args.source == "ae" else imgs

    for name, items in sets.items():
        imgs = np.concatenate([images(per_seed[sd][name], sd) for sd in seeds])
        res = [analyse(im, it) for im, it in zip(imgs, items)]
        report["sets"][name] = score(items, res)
        save_grid(imgs[:32], out / f"{args.source}-{name}-{args.steps}steps.png")
        with open(out / f"{args.source}-{name}-{args.steps}steps.jsonl", "w") as f:
            for it, r in zip(items, res):
                f.write(json.dumps({**it, "got": r}) + "\n")
    report["seconds"] = round(time.time() - t0, 1)
    ch, ph = report["sets"]["centre-held"], report["sets"]["pos-held"]
    nh = ch["n"] + ph["n"]
    report["held"] = {
        "fg_colour": (ch["fg"] * ch["n"] + ph["fg"] * ph["n"]) / nh,
        "bg_colour": (ch["bg"] * ch["n"] + ph["bg"] * ph["n"]) / nh,
        "position": ph["pos"],
        "shape_large": ch["shape"],
    }
    (out / f"{args.source}-{args.steps}steps.json").write_text(json.dumps(report, indent=2))
    print(f"source {args.source}, engine {engine}, {args.steps} steps, seeds {seeds}, model {args.model} "
          f"({report['seconds']} s)")
    print(f"{'set':12s} {'n':>4s} {'fg':>6s} {'bg':>6s} {'pos':>6s} {'shape':>6s} {'frame':>6s} {'>4':>6s}")
    for name, r in report["sets"].items():
        print(f"{name:12s} {r['n']:4d} {r['fg']:6.1f} {r['bg']:6.1f} {r['pos']:6.1f} {r['shape']:6.1f} "
              f"{r['frame']:6.2f} {r['frame_over_4']:6.1f}")
    h = report["held"]
    print(f"HELD-OUT pairs: fg colour {h['fg_colour']:.1f}%  bg colour {h['bg_colour']:.1f}%  "
          f"position (small, 8 cells) {h['position']:.1f}%  shape (large, centre) {h['shape_large']:.1f}%  "
          f"[targets: colours/position >= 90, shape >= 75]")


if __name__ == "__main__":
    main()
