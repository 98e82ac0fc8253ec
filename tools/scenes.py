#!/usr/bin/env python3
"""Deterministic procedural scenes (simple shapes on simple backgrounds) with captions.

Used to train and evaluate the tiny FLUX-architecture model `models/pictor-tiny`
(tools/train_tiny.py, tools/eval_tiny.py).  numpy + PIL only.

* 6 shapes: circle, square, triangle, star, ring, cross
* 12 named colours (with synonyms in captions)
* sizes small / large, positions on a 3x3 grid (top left ... centre ... bottom right)
* backgrounds: solid (80 %), two-colour gradient (10 %), two-colour stripes (10 %)
* one shape (70 %) or two small shapes in different cells (30 %)
* drawn at 2x and downsampled with LANCZOS (antialiasing)
* HELD_OUT colour-shape pairs are never drawn as a foreground by `sample_scene`
  (they are only used by the evaluation, see `eval_scene`).

Everything is a pure function of (seed, index): `scene_at(seed, i)` always returns
the same scene, so data can be regenerated anywhere and in any order.

    python tools/scenes.py --out /tmp/scenes --n 16     # writes PNGs + captions.txt to look at
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128  # native image size

# Named colours (RGB).  Chosen far apart so the nearest-colour metric is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 35),
    "orange": (245, 135, 20),
    "purple": (125, 45, 175),
    "pink": (245, 140, 195),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (115, 70, 30),
    "cyan": (40, 200, 215),
}
COLOUR_NAMES = list(COLOURS)

# Caption synonyms; the first entry is the canonical word.
COLOUR_WORDS: dict[str, list[str]] = {
    "red": ["red", "crimson", "scarlet"],
    "green": ["green", "emerald"],
    "blue": ["blue", "azure"],
    "yellow": ["yellow", "golden"],
    "orange": ["orange", "tangerine"],
    "purple": ["purple", "violet"],
    "pink": ["pink", "rose"],
    "white": ["white", "ivory"],
    "black": ["black", "jet-black"],
    "gray": ["gray", "grey", "silver"],
    "brown": ["brown", "chocolate"],
    "cyan": ["cyan", "turquoise", "aqua"],
}

SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]
SHAPE_WORDS: dict[str, list[str]] = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "block"],
    "triangle": ["triangle"],
    "star": ["star", "five-pointed star"],
    "ring": ["ring", "donut", "hoop"],
    "cross": ["cross", "plus sign"],
}

SIZES = ["small", "large"]
SIZE_WORDS = {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]}
RADIUS = {"small": 12.0, "large": 28.0}  # at SIZE; +-10 % jitter
GRID = {"small": (22.0, 64.0, 106.0), "large": (36.0, 64.0, 92.0)}  # cell centres per axis
POS_JITTER = 3.0

# (row, col) -> caption phrases.  "in the {x}" / "at the {x}" are composed below.
POSITIONS = [(r, c) for r in range(3) for c in range(3)]
POS_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "centre", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
POS_PHRASES = {
    (0, 0): ["in the top left", "in the top-left corner", "in the upper left"],
    (0, 1): ["at the top", "in the top centre", "at the top middle"],
    (0, 2): ["in the top right", "in the top-right corner", "in the upper right"],
    (1, 0): ["on the left", "at the left", "in the middle left"],
    (1, 1): ["in the centre", "in the center", "in the middle"],
    (1, 2): ["on the right", "at the right", "in the middle right"],
    (2, 0): ["in the bottom left", "in the bottom-left corner", "in the lower left"],
    (2, 1): ["at the bottom", "in the bottom centre", "at the bottom middle"],
    (2, 2): ["in the bottom right", "in the bottom-right corner", "in the lower right"],
}
POS_LABELS = {  # short "label:" forms
    (0, 0): ["top-left", "top left"], (0, 1): ["top", "top centre"], (0, 2): ["top-right", "top right"],
    (1, 0): ["left", "middle left"], (1, 1): ["centre", "center"], (1, 2): ["right", "middle right"],
    (2, 0): ["bottom-left", "bottom left"], (2, 1): ["bottom", "bottom centre"],
    (2, 2): ["bottom-right", "bottom right"],
}
BG_WORDS = ["background", "backdrop"]

# Colour-shape pairs never used as a foreground in training (each colour once, each shape twice).
HELD_OUT: list[tuple[str, str]] = [
    ("red", "star"), ("green", "triangle"), ("blue", "ring"), ("yellow", "cross"),
    ("purple", "square"), ("orange", "circle"), ("pink", "triangle"), ("white", "star"),
    ("black", "ring"), ("gray", "cross"), ("brown", "square"), ("cyan", "circle"),
]
HELD_OUT_SET = set(HELD_OUT)
SEEN_PAIRS = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELD_OUT_SET]

P_TWO = 0.30
P_GRADIENT = 0.10
P_STRIPES = 0.10


# ----------------------------------------------------------------------------
# Scene sampling
# ----------------------------------------------------------------------------

def _rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(stream)])


def _pick(rng: np.random.Generator, xs):
    return xs[int(rng.integers(len(xs)))]


def _shape_obj(rng, colour, shape, size, cell) -> dict:
    r = RADIUS[size] * float(rng.uniform(0.9, 1.1))
    g = GRID[size]
    cx = g[cell[1]] + float(rng.uniform(-POS_JITTER, POS_JITTER))
    cy = g[cell[0]] + float(rng.uniform(-POS_JITTER, POS_JITTER))
    return {"colour": colour, "shape": shape, "size": size, "cell": list(cell), "cx": cx, "cy": cy, "r": r}


def sample_scene(rng: np.random.Generator) -> dict:
    """A random training scene (never contains a HELD_OUT foreground pair)."""
    u = float(rng.random())
    if u < P_GRADIENT:
        kind = "gradient"
    elif u < P_GRADIENT + P_STRIPES:
        kind = "stripes"
    else:
        kind = "solid"
    bg_cols = [_pick(rng, COLOUR_NAMES)]
    if kind != "solid":
        bg_cols.append(_pick(rng, [c for c in COLOUR_NAMES if c != bg_cols[0]]))
    bg = {"kind": kind, "colours": bg_cols,
          "vertical": bool(rng.random() < 0.5),
          "period": float(rng.uniform(14, 28))}
    fg_choices = [p for p in SEEN_PAIRS if p[0] not in bg_cols]
    n = 2 if rng.random() < P_TWO else 1
    objs = []
    if n == 1:
        size = _pick(rng, SIZES)
        cell = _pick(rng, POSITIONS)
        c, s = _pick(rng, fg_choices)
        objs.append(_shape_obj(rng, c, s, size, cell))
    else:
        i, j = rng.choice(9, size=2, replace=False)
        for cell in (POSITIONS[int(i)], POSITIONS[int(j)]):
            c, s = _pick(rng, fg_choices)
            objs.append(_shape_obj(rng, c, s, "small", cell))
    return {"background": bg, "objects": objs}


def scene_at(seed: int, index: int) -> dict:
    return sample_scene(_rng(seed, index, 0))


def eval_scene(colour: str, shape: str, size: str, cell, bg: str, jitter_seed: int | None = None) -> dict:
    """A single-shape scene on a solid background, for evaluation (any pair allowed)."""
    if jitter_seed is None:
        obj = {"colour": colour, "shape": shape, "size": size, "cell": list(cell),
               "cx": GRID[size][cell[1]], "cy": GRID[size][cell[0]], "r": RADIUS[size]}
    else:
        obj = _shape_obj(_rng(jitter_seed, 0, 9), colour, shape, size, cell)
    return {"background": {"kind": "solid", "colours": [bg], "vertical": False, "period": 20.0},
            "objects": [obj]}


# ----------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------

def _cw(rng, colour, canonical):
    return colour if canonical else (colour if rng.random() < 0.7 else _pick(rng, COLOUR_WORDS[colour]))


def _sw(rng, shape, canonical):
    return shape if canonical else (shape if rng.random() < 0.7 else _pick(rng, SHAPE_WORDS[shape]))


def _zw(rng, size, canonical):
    return size if canonical else (size if rng.random() < 0.6 else _pick(rng, SIZE_WORDS[size]))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _bg_phrase(rng, bg, canonical=False) -> str:
    bw = "background" if canonical else _pick(rng, BG_WORDS)
    cols = [_cw(rng, c, canonical) for c in bg["colours"]]
    if bg["kind"] == "solid":
        return f"{cols[0]} {bw}"
    if bg["kind"] == "gradient":
        return _pick(rng, [f"{cols[0]} to {cols[1]} gradient {bw}", f"{cols[0]} and {cols[1]} gradient {bw}"])
    return _pick(rng, [f"{cols[0]} and {cols[1]} striped {bw}", f"{cols[0]} and {cols[1]} stripes {bw}"])


def _np(rng, obj, canonical, with_size=True) -> str:
    """Noun phrase without article: '[size] colour shape'."""
    words = []
    if with_size:
        words.append(_zw(rng, obj["size"], canonical))
    words += [_cw(rng, obj["colour"], canonical), _sw(rng, obj["shape"], canonical)]
    return " ".join(words)


def caption(scene: dict, rng: np.random.Generator | None = None, canonical: bool = False) -> str:
    """A caption for `scene`.  canonical=True gives the fixed evaluation template
    ("a small red circle on a blue background in the top left")."""
    if rng is None:
        rng = np.random.default_rng(0)
    objs, bg = scene["objects"], scene["background"]
    if canonical:
        o = objs[0]
        s = f"a {_np(rng, o, True)} on a {_bg_phrase(rng, bg, True)} {POS_PHRASES[tuple(o['cell'])][0]}"
        if len(objs) == 2:
            o2 = objs[1]
            s = (f"a {_np(rng, o, True)} {POS_PHRASES[tuple(o['cell'])][0]} and a {_np(rng, o2, True)} "
                 f"{POS_PHRASES[tuple(o2['cell'])][0]} on a {_bg_phrase(rng, bg, True)}")
        return s
    bgp = _bg_phrase(rng, bg)
    if len(objs) == 1:
        o = objs[0]
        cell = tuple(o["cell"])
        with_size = rng.random() < 0.9
        np_ = _np(rng, o, False, with_size)
        a = _article(np_)
        pos = _pick(rng, POS_PHRASES[cell])
        lab = _pick(rng, POS_LABELS[cell])
        t = int(rng.integers(7))
        if t == 0:
            return f"{a} {np_} on {_article(bgp)} {bgp} {pos}"
        if t == 1:
            return f"{a} {np_} {pos} on {_article(bgp)} {bgp}"
        if t == 2:
            return f"{lab}: {np_}, {bgp}"
        if t == 3:
            return f"{bgp} with {a} {np_} {pos}"
        if t == 4:
            return f"{pos}, {a} {np_} on {_article(bgp)} {bgp}"
        if t == 5:
            return f"{np_}, {lab}, {bgp}"
        return f"{_article(bgp)} {bgp}, {a} {np_} {pos}"
    o1, o2 = objs
    (r1, c1), (r2, c2) = o1["cell"], o2["cell"]
    n1, n2 = _np(rng, o1, False, rng.random() < 0.5), _np(rng, o2, False, rng.random() < 0.5)
    a1, a2 = _article(n1), _article(n2)
    rel = None
    if r1 == r2:
        rel = "left of" if c1 < c2 else "right of"
    elif c1 == c2:
        rel = "above" if r1 < r2 else "below"
    if rel is not None and rng.random() < 0.5:
        lead = _pick(rng, ["two shapes: ", "", ""])
        rowcol = ""
        if r1 == r2 and rng.random() < 0.5:
            rowcol = " " + ["at the top", "in the middle", "at the bottom"][r1]
        if c1 == c2 and r1 != r2 and rng.random() < 0.5:
            rowcol = " " + ["on the left", "in the middle", "on the right"][c1]
        return f"{lead}{a1} {n1} {rel} {a2} {n2}{rowcol} on {_article(bgp)} {bgp}"
    p1, p2 = _pick(rng, POS_PHRASES[(r1, c1)]), _pick(rng, POS_PHRASES[(r2, c2)])
    t = int(rng.integers(3))
    if t == 0:
        return f"{a1} {n1} {p1} and {a2} {n2} {p2}, {bgp}"
    if t == 1:
        return f"two shapes: {a1} {n1} {p1}, {a2} {n2} {p2} on {_article(bgp)} {bgp}"
    return f"{_article(bgp)} {bgp} with {a1} {n1} {p1} and {a2} {n2} {p2}"


def caption_at(seed: int, index: int, variant: int = 0) -> str:
    return caption(scene_at(seed, index), _rng(seed, index, 1 + variant))


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

def shape_polygons(shape: str, cx: float, cy: float, r: float) -> list[tuple[str, list]]:
    """Drawing primitives for one shape: list of (op, points) with op in
    {'poly','ellipse','hole'} (hole = ellipse painted with the background)."""
    if shape == "circle":
        return [("ellipse", [cx - r, cy - r, cx + r, cy + r])]
    if shape == "ring":
        ri = 0.55 * r
        return [("ellipse", [cx - r, cy - r, cx + r, cy + r]), ("hole", [cx - ri, cy - ri, cx + ri, cy + ri])]
    if shape == "square":
        h = 0.85 * r
        return [("poly", [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)])]
    if shape == "triangle":
        oy = cy + 0.25 * r  # centre the bounding box vertically
        pts = [(cx + r * math.cos(a), oy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return [("poly", pts)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + 0.05 * r + rr * math.sin(a)))
        return [("poly", pts)]
    if shape == "cross":
        w = 0.3 * r
        return [("poly", [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                          (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                          (cx - r, cy - w), (cx - w, cy - w)])]
    raise ValueError(shape)


def _background(bg: dict, n: int) -> np.ndarray:
    cols = [np.array(COLOURS[c], dtype=np.float32) for c in bg["colours"]]
    if bg["kind"] == "solid":
        return np.broadcast_to(cols[0], (n, n, 3)).copy()
    coord = (np.arange(n, dtype=np.float32) + 0.5) / n
    if bg["kind"] == "gradient":
        w = coord[:, None, None] if bg["vertical"] else coord[None, :, None]
        img = cols[0] * (1 - w) + cols[1] * w
        return np.broadcast_to(img, (n, n, 3)).copy()
    period = bg["period"] * n / SIZE
    band = (np.floor(np.arange(n) / (period / 2)) % 2).astype(np.float32)
    w = band[:, None, None] if bg["vertical"] else band[None, :, None]
    return np.broadcast_to(cols[0] * (1 - w) + cols[1] * w, (n, n, 3)).copy()


def render(scene: dict, size: int = SIZE, with_mask: bool = False):
    """-> uint8 [size,size,3] (and a uint8 [size,size] foreground mask if with_mask)."""
    ss = 2 * size
    k = ss / SIZE
    bgarr = _background(scene["background"], ss)
    img = Image.fromarray(np.clip(bgarr + 0.5, 0, 255).astype(np.uint8))
    mask = Image.new("L", (ss, ss), 0)
    for o in scene["objects"]:
        prims = shape_polygons(o["shape"], o["cx"] * k, o["cy"] * k, o["r"] * k)
        layer = Image.new("L", (ss, ss), 0)
        d = ImageDraw.Draw(layer)
        for op, pts in prims:
            if op == "poly":
                d.polygon(pts, fill=255)
            elif op == "ellipse":
                d.ellipse(pts, fill=255)
            else:
                d.ellipse(pts, fill=0)
        img.paste(Image.new("RGB", (ss, ss), COLOURS[o["colour"]]), (0, 0), layer)
        mask.paste(255, (0, 0), layer)
    img = img.resize((size, size), Image.LANCZOS)
    out = np.asarray(img, dtype=np.uint8).copy()
    if with_mask:
        return out, np.asarray(mask.resize((size, size), Image.BILINEAR), dtype=np.uint8).copy()
    return out


def make_dataset(n: int, seed: int, start: int = 0, size: int = SIZE, variants: int = 1,
                 with_mask: bool = False):
    """Scenes start..start+n-1 -> (images uint8 [n,size,size,3], captions [n][variants], scenes[, masks])."""
    imgs = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8) if with_mask else None
    caps, scenes = [], []
    for j in range(n):
        i = start + j
        sc = scene_at(seed, i)
        if with_mask:
            imgs[j], masks[j] = render(sc, size, True)
        else:
            imgs[j] = render(sc, size)
        caps.append([caption_at(seed, i, v) for v in range(variants)])
        scenes.append(sc)
    if with_mask:
        return imgs, caps, scenes, masks
    return imgs, caps, scenes


def nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float32)
    return min(COLOUR_NAMES, key=lambda c: float(((np.array(COLOURS[c], np.float32) - rgb) ** 2).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description="write example scenes")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    imgs, caps, scenes = make_dataset(args.n, args.seed, variants=2)
    lines = []
    for i in range(args.n):
        Image.fromarray(imgs[i]).save(args.out / f"{i:04d}.png")
        lines.append(f"{i:04d}\t{caps[i][0]}\t{caps[i][1]}\t{json.dumps(scenes[i])}")
    (args.out / "captions.txt").write_text("\n".join(lines) + "\n")
    grid = np.concatenate([np.concatenate(list(imgs[r * 4:(r + 1) * 4]), 1) for r in range(args.n // 4)], 0)
    Image.fromarray(grid).save(args.out / "grid.png")
    print(f"wrote {args.n} scenes to {args.out}")


if __name__ == "__main__":
    main()
