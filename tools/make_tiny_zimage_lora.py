#!/usr/bin/env python3
"""Build small random Z-Image LoRA files for the tiny Z-Image-Turbo pipeline, plus reference outputs.

What it makes (in --out, default tests/data/tiny-loras-zimage, usable as a LoRA folder: a LoRA's
name is its file name without `.safetensors`):

* ONE random rank-4 update of the tiny Z-Image transformer in tests/data/tiny-z-image-turbo
  (made by tools/make_tiny_zimage.py), covering in every main layer (`layers.N`) and every
  refiner layer (`noise_refiner.N`, `context_refiner.N`): attention q/k/v/out, feed_forward
  w1/w2/w3 and adaLN_modulation.0 (the context refiner has none), written in three formats that
  must give the same fused transformer weights:
    z-peft.safetensors   diffusers/PEFT names (ZImagePipeline.save_lora_weights)
    z-comfy.safetensors  original Tongyi-MAI / ComfyUI names (`diffusion_model.<module>.lora_A/B`),
                         on the ORIGINAL layers: fused `attention.qkv` and `attention.out`
    z-kohya.safetensors  kohya names (`lora_unet_<original module with _>.lora_down/lora_up/alpha`),
                         same original layers, alpha != rank (compensated in lora_up)
* reference.safetensors + reference.json: diffusers' ZImagePipeline output (CPU, float32, the same
  call and the same initial latents as make_tiny_zimage.py's reference run) with z-peft fused at
  scale 0.8.
* README.md describing all of it.

diffusers 0.40.0 cannot load the fused `attention.qkv` or the `attention.out` LoRAs of z-comfy /
z-kohya: it silently ignores them in z-comfy and raises a ValueError on z-kohya (see
`probe_unpatched`). The script records that, then loads both files through diffusers' own converter after a small shim (`split_fused_qkv`) that
splits qkv into to_q/to_k/to_v exactly, and asserts that their fused weights equal z-peft's
bit-exactly, so z-peft's reference holds for them too. It also checks the fusion directly in the
original (fused-qkv) layout, as a port that fuses `W_qkv += s * up @ down` would.

Needs the zimage venv with peft (tools/requirements-zimage.txt):
    bash tools/setup-venv.sh zimage
    ~/.cache/pictor/venv-zimage/bin/python tools/make_tiny_zimage_lora.py
Deterministic (fixed seeds, one CPU thread): running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_zimage as mtz  # noqa: E402  (sets 1 thread; PROMPT, sizes, steps, seeds)
from lora_fixture import bf16_exact, fuse_group, max_diff, plain_state_dict, prepare_out, rel, save  # noqa: E402

import accelerate  # noqa: E402
import diffusers  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import ZImagePipeline  # noqa: E402

torch.set_num_threads(1)
diffusers.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")

REPO = Path(__file__).resolve().parent.parent

SEED_LORA = 200
RANK = 4
# A ~ N(0, 1/in), B ~ N(0, GAIN^2/RANK): B@A has std GAIN/sqrt(in), i.e. GAIN times the base
# weights' std (they are ~ N(0, 1/in)); at scale 0.8 the weights move by ~0.8*GAIN.
GAIN = 0.25
SCALE = 0.8
# kohya: alpha/rank is a power of two (so compensating it in lora_up is exact). The fused qkv has
# rank 3*RANK = 12 (rank = lora_down.shape[0], as kohya defines it) and its own fraction.
KOHYA_FRACTION = 0.5        # alpha = 2 on rank-4 layers
KOHYA_FRACTION_QKV = 0.25   # alpha = 3 on the rank-12 qkv
NAMES = ["z-peft", "z-comfy", "z-kohya"]

ATTN = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
FFN = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
ADALN = "adaLN_modulation.0"


# ----------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------


def blocks(cfg) -> list[str]:
    return ([f"layers.{i}" for i in range(cfg.n_layers)]
            + [f"noise_refiner.{i}" for i in range(cfg.n_refiner_layers)]
            + [f"context_refiner.{i}" for i in range(cfg.n_refiner_layers)])


def transformer_modules(cfg, base_sd: dict) -> list[str]:
    """The covered layers, diffusers names, in a fixed order."""
    mods = []
    for b in blocks(cfg):
        mods += [f"{b}.{m}" for m in ATTN + FFN]
        if f"{b}.{ADALN}.weight" in base_sd:
            mods.append(f"{b}.{ADALN}")
    return mods


def original_groups(cfg, base_sd: dict) -> list[tuple[str, list[str]]]:
    """(original Tongyi-MAI module, [diffusers modules fused into it, in row order]): the inverse of
    diffusers' convert_z_image_transformer_checkpoint_to_diffusers (and of
    crates/pictor-engine/src/weights/diffusers.rs zimage_transformer)."""
    groups = []
    for b in blocks(cfg):
        a = f"{b}.attention."
        groups += [(a + "qkv", [a + "to_q", a + "to_k", a + "to_v"]), (a + "out", [a + "to_out.0"])]
        groups += [(f"{b}.{m}", [f"{b}.{m}"]) for m in FFN]
        if f"{b}.{ADALN}.weight" in base_sd:
            groups.append((f"{b}.{ADALN}", [f"{b}.{ADALN}"]))
    return groups


def make_update(shapes: dict[str, tuple[int, int]], modules: list[str]) -> dict:
    """{module: (A [RANK, in], B [out, RANK])}, float32, bf16-exact."""
    g = torch.Generator().manual_seed(SEED_LORA)
    upd = {}
    for m in modules:
        out_f, in_f = shapes[m]
        a = torch.randn((RANK, in_f), generator=g) / in_f ** 0.5
        b = torch.randn((out_f, RANK), generator=g) * (GAIN / RANK ** 0.5)
        upd[m] = (bf16_exact(a), bf16_exact(b))
    return upd


def kohya_fraction(orig: str) -> float:
    return KOHYA_FRACTION_QKV if orig.endswith(".attention.qkv") else KOHYA_FRACTION


# ----------------------------------------------------------------------------
# The files
# ----------------------------------------------------------------------------

def write_peft(out: Path, upd: dict) -> None:
    layers = {}
    for m, (a, b) in upd.items():
        layers[f"{m}.lora_A.weight"] = a.contiguous()
        layers[f"{m}.lora_B.weight"] = b.contiguous()
    ZImagePipeline.save_lora_weights(str(out), transformer_lora_layers=layers, weight_name="z-peft.safetensors")


def comfy_dict(groups, upd: dict) -> dict:
    sd = {}
    for orig, members in groups:
        down, up = fuse_group(upd, members)
        sd[f"diffusion_model.{orig}.lora_A.weight"] = down
        sd[f"diffusion_model.{orig}.lora_B.weight"] = up
    return sd


def kohya_dict(groups, upd: dict) -> dict:
    sd = {}
    for orig, members in groups:
        down, up = fuse_group(upd, members)
        key = "lora_unet_" + orig.replace(".", "_")
        frac = kohya_fraction(orig)
        sd[key + ".lora_down.weight"] = down
        sd[key + ".lora_up.weight"] = up / frac  # exact: frac is a power of two
        sd[key + ".alpha"] = torch.tensor(down.shape[0] * frac)
    return sd


# ----------------------------------------------------------------------------
# Loading the fused-qkv formats: a shim in front of diffusers' own converter
# ----------------------------------------------------------------------------

def split_fused_qkv(sd: dict) -> dict:
    """What diffusers 0.40.0's Z-Image converter lacks, in the file's own naming, before it runs:
    `attention.qkv` (down [3r, in], block-diagonal up [3*dim, 3r]) -> `attention.to_q/to_k/to_v`
    (down rows / up diagonal blocks, exact; kohya alpha divided by 3 with the rank), and the
    original `attention.out` -> `attention.to_out.0` (diffusers renames `.out` only before
    lora_down/lora_up/alpha, and its kohya unmangling turns `_attention_out.lora_down` into the
    dot format `.out.lora.down`, which it then drops). Every other key is left for diffusers."""
    out = {}
    for k, v in sd.items():
        for sep, parts in ((".attention.qkv.", [".attention.to_q.", ".attention.to_k.", ".attention.to_v."]),
                           ("_attention_qkv.", ["_attention_to_q.", "_attention_to_k.", "_attention_to_v."])):
            if sep not in k:
                continue
            base, suffix = k.split(sep)
            if suffix in ("lora_A.weight", "lora_down.weight"):
                chunks = v.chunk(3, dim=0)
            elif suffix in ("lora_B.weight", "lora_up.weight"):
                r = v.shape[1] // 3
                rows = v.chunk(3, dim=0)
                chunks = [rows[i][:, i * r:(i + 1) * r] for i in range(3)]
                for i in range(3):
                    off = torch.cat([rows[i][:, :i * r], rows[i][:, (i + 1) * r:]], dim=1)
                    assert not off.any(), f"{k}: up is not block-diagonal"
            elif suffix == "alpha":
                chunks = [v / 3] * 3
            else:
                raise AssertionError(k)
            for p, c in zip(parts, chunks):
                out[base + p + suffix] = c.contiguous()
            break
        else:
            k = k.replace(".attention.out.lora_", ".attention.to_out.0.lora_")
            k = re.sub(r"_attention_out\.(lora_down\.weight|lora_up\.weight|alpha)$", r"_attention_to_out_0.\1", k)
            out[k] = v
    return out


# ----------------------------------------------------------------------------
# Pipelines and runs
# ----------------------------------------------------------------------------

class Ctx:
    def __init__(self, base: Path, out: Path):
        self.base, self.out = base, out
        self.base_ref = safetensors.torch.load_file(str(base / "reference.safetensors"))
        g = torch.Generator("cpu").manual_seed(mtz.SEED_NOISE)
        noise = torch.randn((1, 16, mtz.HEIGHT // 8, mtz.WIDTH // 8), generator=g, dtype=torch.float32)
        assert torch.equal(noise, self.base_ref["noise"]), "base fixture's noise is not make_tiny_zimage's"
        self.noise = self.base_ref["noise"]


def load_pipe(ctx: Ctx) -> ZImagePipeline:
    pipe = ZImagePipeline.from_pretrained(ctx.base, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_lora(ctx: Ctx, pipe: ZImagePipeline, name: str, adapter: str) -> None:
    if name == "z-peft":
        pipe.load_lora_weights(str(ctx.out), weight_name=f"{name}.safetensors", adapter_name=adapter)
    elif name in ("z-comfy", "z-kohya"):
        sd = safetensors.torch.load_file(str(ctx.out / f"{name}.safetensors"))
        pipe.load_lora_weights(split_fused_qkv(sd), adapter_name=adapter)
    else:
        raise AssertionError(name)
    assert adapter in pipe.get_list_adapters().get("transformer", []), (name, pipe.get_list_adapters())


@torch.no_grad()
def generate(ctx: Ctx, pipe: ZImagePipeline) -> dict:
    """The same call as make_tiny_zimage.run_reference, from the same initial latents."""
    cap: list = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, k, o: cap.append([y.clone() for y in o[0]]), with_kwargs=True)
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    image = pipe(mtz.PROMPT, height=mtz.HEIGHT, width=mtz.WIDTH, num_inference_steps=mtz.STEPS,
                 guidance_scale=mtz.GUIDANCE, max_sequence_length=mtz.MAX_SEQ_LEN, latents=ctx.noise.clone(),
                 output_type="pt", callback_on_step_end=on_step_end,
                 callback_on_step_end_tensor_inputs=["latents"]).images
    hook.remove()
    assert len(steps) == mtz.STEPS and len(cap) == mtz.STEPS, (len(steps), len(cap))
    res = {"final_latents": steps[-1].clone(), "transformer_out_step0": cap[0][0],
           "image_u8": (image * 255).round().clamp(0, 255).to(torch.uint8)}
    for k, v in res.items():
        assert torch.isfinite(v.float()).all(), k
    return res


def lora_modules(model: torch.nn.Module, adapter: str) -> list[str]:
    return sorted(n for n, m in model.named_modules() if adapter in getattr(m, "lora_A", {}))


def expected_weights(base_sd: dict, upd: dict, scale: float) -> dict:
    want = dict(base_sd)
    for m, (a, b) in upd.items():
        want[m + ".weight"] = want[m + ".weight"] + (b @ a) * scale
    return want


def fused_original_check(groups, base_sd: dict, peft_fused: dict, files: dict) -> dict:
    """The fusion done in the ORIGINAL layout, straight from each file's tensors:
    W_orig + SCALE * (alpha/rank) * up @ down, against z-peft's fused diffusers weights concatenated
    into the original layout (qkv = [q; k; v])."""
    res = {}
    for name in ("z-comfy", "z-kohya"):
        sd = {k: v.float() for k, v in files[name].items()}
        worst = 0.0
        for orig, members in groups:
            w = torch.cat([base_sd[m + ".weight"] for m in members], dim=0)
            want = torch.cat([peft_fused[m + ".weight"] for m in members], dim=0)
            if name == "z-comfy":
                down = sd[f"diffusion_model.{orig}.lora_A.weight"]
                up = sd[f"diffusion_model.{orig}.lora_B.weight"]
                f = 1.0
            else:
                key = "lora_unet_" + orig.replace(".", "_")
                down, up = sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"]
                f = float(sd[key + ".alpha"]) / down.shape[0]
            got = w + (up @ down) * (SCALE * f)
            worst = max(worst, float((got - want).abs().max()))
        res[name] = worst
    return res


# ----------------------------------------------------------------------------
# Facts about unpatched diffusers
# ----------------------------------------------------------------------------

def probe_unpatched(ctx: Ctx, groups, n_modules: int) -> list[str]:
    """What diffusers does with z-comfy / z-kohya on its own (asserted, then recorded for the README)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers as conv
    facts = []
    everything = {m for _, members in groups for m in members}
    qkv = {m for orig, members in groups if orig.endswith(".attention.qkv") for m in members}
    out = {m for orig, members in groups if orig.endswith(".attention.out") for m in members}

    pipe = load_pipe(ctx)
    before = plain_state_dict(pipe.transformer)
    pipe.load_lora_weights(str(ctx.out), weight_name="z-comfy.safetensors", adapter_name="probe")
    got = set(lora_modules(pipe.transformer, "probe"))
    assert got == everything - qkv - out, sorted(got ^ (everything - qkv - out))[:8]
    pipe.fuse_lora(lora_scale=SCALE, adapter_names=["probe"])
    after = plain_state_dict(pipe.transformer)
    assert all(torch.equal(after[m + ".weight"], before[m + ".weight"]) for m in qkv | out)
    facts.append(
        f"unpatched `load_lora_weights` on z-comfy.safetensors loads only {len(got)} of the {n_modules} layers "
        "(feed_forward.w1/w2/w3, adaLN_modulation.0), without an error: `_convert_non_diffusers_z_image_lora_to_"
        "diffusers` strips `diffusion_model.` but does not split the fused `attention.qkv`, and renames `.out` to "
        "`.to_out.0` only before `lora_down`/`lora_up`/`alpha`, not before `lora_A`/`lora_B`; the keys "
        "`layers.N.attention.qkv.lora_A.weight` / `attention.out.lora_A.weight` match no module and are ignored")
    del pipe

    kohya = safetensors.torch.load_file(str(ctx.out / "z-kohya.safetensors"))
    pipe = load_pipe(ctx)
    try:
        pipe.load_lora_weights(dict(kohya), adapter_name="probe")
        raise AssertionError("unpatched diffusers loaded z-kohya")
    except ValueError as e:
        msg = str(e).strip().splitlines()[0]
        assert "should be empty" in msg and "attention.to_out.0.alpha" in msg, msg
    del pipe
    no_alpha = conv({k: v for k, v in kohya.items() if not k.endswith(".alpha")})
    kept = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in no_alpha}
    assert kept == everything - qkv - out, sorted(kept ^ (everything - qkv - out))[:8]
    facts.append(
        "unpatched `load_lora_weights` on z-kohya.safetensors raises `ValueError: `state_dict` should be empty at "
        "this point but has ...['...attention.to_out.0.alpha', ...]`: the kohya name unmangling splits at every "
        "`_`, so `lora_unet_layers_0_attention_out.lora_down.weight` becomes `layers.0.attention.out.lora.down."
        "weight`, which its dot-format (Anime-Z) branch DROPS, expecting separate `to_out.0` keys alongside, as it drops "
        "`attention.qkv.lora.down` (leaving `attention.out`'s alpha behind: the error). Without the alphas it "
        f"would keep only {len(kept)} of the {n_modules} layers (feed_forward, adaLN_modulation), silently")
    return facts


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def versions() -> dict:
    import tokenizers
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/data/tiny-loras-zimage")
    ap.add_argument("--base", type=Path, default=REPO / "tests/data/tiny-z-image-turbo")
    args = ap.parse_args()
    out: Path = args.out
    prepare_out(out)
    ctx = Ctx(args.base, out)
    facts: list[str] = []

    # --- base run: must reproduce the tiny pipeline's own reference
    pipe = load_pipe(ctx)
    cfg = pipe.transformer.config
    base_sd = plain_state_dict(pipe.transformer)
    base = generate(ctx, pipe)
    for k in ("final_latents", "transformer_out_step0", "image_u8"):
        assert torch.equal(base[k], ctx.base_ref[k]), f"base run differs from {args.base}/reference.safetensors: {k}"
    facts.append(f"the base pipeline run here reproduces `{args.base.name}/reference.safetensors` (final_latents, "
                 "transformer_out_step0, image_u8) bit-exactly")
    del pipe

    # --- the update and the files
    mods = transformer_modules(cfg, base_sd)
    groups = original_groups(cfg, base_sd)
    assert sorted(m for _, ms in groups for m in ms) == sorted(mods)
    shapes = {m: tuple(base_sd[m + ".weight"].shape) for m in mods}
    upd = make_update(shapes, mods)

    write_peft(out, upd)
    files = {"z-comfy": comfy_dict(groups, upd), "z-kohya": kohya_dict(groups, upd)}
    save(files["z-comfy"], out / "z-comfy.safetensors", torch.bfloat16)
    save(files["z-kohya"], out / "z-kohya.safetensors", torch.bfloat16)
    loaded = {n: safetensors.torch.load_file(str(out / f"{n}.safetensors")) for n in NAMES}
    for n, sd in files.items():  # stored values are exactly the constructed ones (bf16-exact by construction)
        assert set(loaded[n]) == set(sd) and all(torch.equal(loaded[n][k].float(), sd[k].float()) for k in sd), n
    peft_want = {f"transformer.{m}.lora_{x}.weight" for m in mods for x in "AB"}
    assert set(loaded["z-peft"]) == peft_want, sorted(set(loaded["z-peft"]) ^ peft_want)[:6]
    for m, (a, b) in upd.items():
        assert torch.equal(loaded["z-peft"][f"transformer.{m}.lora_A.weight"], a)
        assert torch.equal(loaded["z-peft"][f"transformer.{m}.lora_B.weight"], b)

    facts += probe_unpatched(ctx, groups, len(mods))

    # --- references and equivalence
    ref: dict[str, torch.Tensor] = {}
    want = expected_weights(base_sd, upd, SCALE)
    figures: dict = {"fused_weights_vs_expected": {}, "fused_weights_vs_z-peft": {},
                     "unfused_vs_fused_final_latents": {}, "relative_change_vs_base": {}}
    fused_sd, results = {}, {}
    for name in NAMES:
        pipe = load_pipe(ctx)
        load_lora(ctx, pipe, name, name)
        assert lora_modules(pipe.transformer, name) == sorted(mods), name
        pipe.fuse_lora(lora_scale=SCALE, adapter_names=[name])
        got = plain_state_dict(pipe.transformer)
        fused_sd[name] = got
        d = max_diff(got, want)
        assert d <= 1e-6, (name, d)
        figures["fused_weights_vs_expected"][name] = d
        res = generate(ctx, pipe)
        results[name] = res
        del pipe

        pipe = load_pipe(ctx)  # unfused: LoRA layers active at adapter weight 0.8
        load_lora(ctx, pipe, name, name)
        pipe.set_adapters([name], adapter_weights=[SCALE])
        unf = generate(ctx, pipe)
        du = float((unf["final_latents"] - res["final_latents"]).abs().max())
        assert du <= 1e-5, (name, du)
        figures["unfused_vs_fused_final_latents"][name] = du
        del pipe
        figures["relative_change_vs_base"][name] = rel(res["final_latents"], base["final_latents"])

    for name in ("z-comfy", "z-kohya"):
        d = max_diff(fused_sd[name], fused_sd["z-peft"])
        assert d == 0.0, (name, d)  # bit-exact: z-peft's reference holds for it
        figures["fused_weights_vs_z-peft"][name] = d
        for k in ("final_latents", "transformer_out_step0", "image_u8"):
            assert torch.equal(results[name][k], results["z-peft"][k]), (name, k)
    figures["original_layout_fusion_vs_z-peft"] = fused_original_check(groups, base_sd, fused_sd["z-peft"], loaded)
    for name, d in figures["original_layout_fusion_vs_z-peft"].items():
        assert d <= 1e-6, (name, d)

    rc = figures["relative_change_vs_base"]
    assert 0.05 <= rc["z-peft"] <= 0.5, rc
    figures["relative_change_vs_base"]["z-peft.transformer_out_step0"] = rel(
        results["z-peft"]["transformer_out_step0"], base["transformer_out_step0"])
    assert not torch.equal(results["z-peft"]["image_u8"], base["image_u8"])

    for k in ("final_latents", "transformer_out_step0", "image_u8"):
        ref[f"z-peft.{k}"] = results["z-peft"][k]
    ref = {k: v.contiguous() for k, v in sorted(ref.items())}
    safetensors.torch.save_file(ref, str(out / "reference.safetensors"))

    meta = {
        "base": str(args.base.relative_to(REPO)) if args.base.is_relative_to(REPO) else str(args.base),
        "call": {"prompt": mtz.PROMPT, "width": mtz.WIDTH, "height": mtz.HEIGHT,
                 "num_inference_steps": mtz.STEPS, "guidance_scale": mtz.GUIDANCE,
                 "max_sequence_length": mtz.MAX_SEQ_LEN,
                 "latents": "`noise` [1, 16, 6, 10] from the base fixture's reference.safetensors "
                            f"(torch.randn, seed {mtz.SEED_NOISE})"},
        "rank": RANK, "gain": GAIN, "seed": SEED_LORA, "scale": SCALE,
        "kohya_alpha": {"rank-4 layers": RANK * KOHYA_FRACTION, "attention.qkv (rank 12)": 3 * RANK * KOHYA_FRACTION_QKV},
        "layers": {"diffusers": mods, "original": [o for o, _ in groups]},
        "recipe": "ZImagePipeline.from_pretrained(base, torch_dtype=float32); load_lora_weights(lora_dir, "
                  "weight_name='z-peft.safetensors', adapter_name='z-peft'); fuse_lora(lora_scale="
                  f"{SCALE}, adapter_names=['z-peft']); the base fixture's call with latents=noise",
        "files": {},
        "figures": figures,
        "facts": facts,
        "versions": versions(),
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in ref.items()},
    }
    for n in NAMES:
        sd = loaded[n]
        meta["files"][n] = {
            "tensors": len(sd),
            "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}),
            "bytes": (out / f"{n}.safetensors").stat().st_size,
            "metadata": safetensors.safe_open(str(out / f"{n}.safetensors"), "pt").metadata(),
        }
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")

    write_readme(out, meta, loaded)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total < 1_000_000, total
    print(f"wrote {out} ({total / 1e6:.3f} MB)")
    for f in facts:
        print(" -", f)
    print(json.dumps(figures, indent=1))


# ----------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------

def key_table(sd: dict, keys: list[str]) -> str:
    rows = []
    for k in keys:
        v = sd[k]
        rows.append(f"| `{k}` | {str(v.dtype).replace('torch.', '')} | {list(v.shape)} |"
                    + (f" {float(v):g} |" if v.dim() == 0 else " |"))
    return "| key | dtype | shape | value |\n| --- | --- | --- | --- |\n" + "\n".join(rows)


def write_readme(out: Path, meta: dict, loaded: dict) -> None:
    v = meta["versions"]
    fig = meta["figures"]
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "README.md")
    file_lines = "\n".join(f"| `{f}` | {(out / f).stat().st_size:,} |" for f in files)
    tensor_lines = "\n".join(f"| `{k}` | {t['dtype']} | {t['shape']} |" for k, t in meta["tensors"].items())
    fmt = lambda x: "0 (bit-exact)" if x == 0 else f"{x:.3g}"  # noqa: E731
    rc = fig["relative_change_vs_base"]
    peft_keys = [f"transformer.{m}.lora_{x}.weight" for m in
                 ("layers.0.attention.to_q", "layers.0.feed_forward.w2", "layers.0.adaLN_modulation.0",
                  "context_refiner.1.attention.to_out.0") for x in "AB"]
    comfy_keys = [f"diffusion_model.{m}.lora_{x}.weight" for m in
                  ("layers.0.attention.qkv", "layers.0.attention.out", "noise_refiner.0.feed_forward.w1",
                   "noise_refiner.0.adaLN_modulation.0") for x in "AB"]
    kohya_keys = [f"lora_unet_{m}.{x}" for m in
                  ("layers_0_attention_qkv", "context_refiner_0_attention_out", "layers_1_feed_forward_w3",
                   "noise_refiner_1_adaLN_modulation_0") for x in ("lora_down.weight", "lora_up.weight", "alpha")]
    facts = "\n".join(f"- {f}" for f in meta["facts"])
    text = f"""# tiny-loras-zimage test fixture

Small random Z-Image LoRA files for the tiny Z-Image-Turbo pipeline `{meta['base']}`, in three
real-world key formats, plus reference outputs from diffusers' `ZImagePipeline` (CPU, float32).
This folder works as a LoRA folder: a LoRA's name is its file name without `.safetensors`.
Generated — do not edit by hand. Regenerate with:

```sh
bash tools/setup-venv.sh zimage     # venv at ${{PICTOR_ZIMAGE_VENV:-$HOME/.cache/pictor/venv-zimage}}, with peft
~/.cache/pictor/venv-zimage/bin/python tools/make_tiny_zimage_lora.py   # --out tests/data/tiny-loras-zimage --base tests/data/tiny-z-image-turbo
```

Deterministic (fixed seeds, 1 CPU thread): re-running gives byte-identical files with these
versions: python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']},
peft {v['peft']}, accelerate {v['accelerate']}, safetensors {v['safetensors']}.

## The update

One random low-rank update, rank {meta['rank']}, per diffusers module `m`: `A_m` [{meta['rank']}, in] ~ N(0, 1/in),
`B_m` [out, {meta['rank']}] ~ N(0, {meta['gain']}²/{meta['rank']}) (seed {meta['seed']}), both rounded to
bfloat16-representable values. Effective change at LoRA scale `s`: `W_m += s · B_m A_m` (kohya's
alpha/rank is compensated in `lora_up` by a power of two, so it cancels exactly).

Covered, in each of `layers.0-1`, `noise_refiner.0-1`, `context_refiner.0-1` ({len(meta['layers']['diffusers'])} diffusers modules):
`attention.to_q`, `attention.to_k`, `attention.to_v`, `attention.to_out.0`, `feed_forward.w1`,
`feed_forward.w2`, `feed_forward.w3`, and `adaLN_modulation.0` (layers and noise refiner only: the
context refiner has no modulation). Shapes (out, in): q/k/v/out (64, 64); w1, w3 (170, 64); w2 (64, 170);
adaLN_modulation.0 (256, 64).

The original (Tongyi-MAI / ComfyUI) layers, per block `P` ({len(meta['layers']['original'])} in all): `P.attention.qkv`
(= rows [to_q; to_k; to_v], (192, 64)), `P.attention.out` (= to_out.0), `P.feed_forward.w1/w2/w3`,
`P.adaLN_modulation.0` (same names in both). On `attention.qkv` one LoRA carries the three exactly:
down = [A_q; A_k; A_v] (rank 3·4 = 12, [12, 64]) and up = block-diagonal(B_q, B_k, B_v) ([192, 12],
exact zeros off the diagonal blocks).

## Files

| file | bytes |
| --- | --- |
{file_lines}

| LoRA | format | dtype | rank | alpha |
| --- | --- | --- | --- | --- |
| `z-peft` | diffusers/PEFT, `ZImagePipeline.save_lora_weights` (metadata `{{"format": "pt"}}`), diffusers module names | float32 | 4 | none (diffusers: alpha = rank, scale 1) |
| `z-comfy` | original names, `diffusion_model.<module>.lora_A/lora_B.weight` (ComfyUI / PEFT suffixes) | bfloat16 | 4; qkv 12 | none (scale 1) |
| `z-kohya` | kohya, `lora_unet_<original module, . -> _>.lora_down/lora_up.weight` + `.alpha` | bfloat16 | 4; qkv 12 | `.alpha` = 2 on rank 4 (alpha/rank 1/2, up stored ×2); 3 on qkv rank 12 (1/4, up ×4) |

z-peft:

{key_table(loaded['z-peft'], peft_keys)}

z-comfy:

{key_table(loaded['z-comfy'], comfy_keys)}

z-kohya (rank = `lora_down.shape[0]`; effective update = (alpha/rank) · up @ down):

{key_table(loaded['z-kohya'], kohya_keys)}

## Equivalence

All three are the SAME update. Fused through diffusers at {meta['scale']} (z-comfy and z-kohya through
`split_fused_qkv`, see below) their transformer weights equal `W + 0.8·B A` computed in float32 (max abs
diff {fmt(max(fig['fused_weights_vs_expected'].values()))}, asserted <= 1e-6), and z-comfy's and z-kohya's fused
weights equal z-peft's (max abs diff {fmt(max(fig['fused_weights_vs_z-peft'].values()))}, asserted), so their outputs are
z-peft's (asserted identical) and z-peft's reference holds for them. Fusing directly in the original
layout from the files' own tensors, `W_orig + 0.8·(alpha/rank)·up @ down` with `W_qkv = [W_q; W_k; W_v]`,
matches z-peft's fused weights too (max abs diff {fmt(max(fig['original_layout_fusion_vs_z-peft'].values()))}).
Unfused (`set_adapters([name], [0.8])`) vs fused final latents: max abs diff
{fmt(max(fig['unfused_vs_fused_final_latents'].values()))} (asserted <= 1e-5).

The LoRA changes the output clearly: relative L2 change of the final latents vs the base fixture's
{rc['z-peft']:.3f} (transformer output at step 0: {rc['z-peft.transformer_out_step0']:.3f}).

Checked facts (including what diffusers {v['diffusers']} does with these files unaided):

{facts}

## reference.safetensors

`{meta['recipe']}`. The call is the base fixture's own (prompt `{meta['call']['prompt']}`,
{meta['call']['width']}x{meta['call']['height']}, {meta['call']['num_inference_steps']} steps, guidance {meta['call']['guidance_scale']}), started from its
`noise` tensor; the keys follow the base reference's conventions (`final_latents`: the latents after
the last step, before VAE decoding, [1, 16, H/8, W/8]; `transformer_out_step0`: the transformer's raw
output for the image at step 0, [16, 1, H/8, W/8], before the pipeline negates it; `image_u8`:
round(image·255), [1, 3, H, W]).

| tensor | dtype | shape |
| --- | --- | --- |
{tensor_lines}
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
