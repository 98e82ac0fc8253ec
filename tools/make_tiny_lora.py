#!/usr/bin/env python3
"""Build small random FLUX LoRA files for the tiny test pipeline, plus reference outputs.

What it makes (in --out, default tests/data/tiny-loras, usable as a server's `lora_dir`: a
LoRA's name is its file name without extension):

* ONE random rank-4 update of the tiny FLUX.1-schnell transformer in
  tests/data/tiny-flux-schnell, written in four LoRA file formats that must all
  give the same fused weights through diffusers:
    pixel-peft.safetensors   diffusers/PEFT names (FluxPipeline.save_lora_weights)
    pixel-kohya.safetensors  kohya sd-scripts names on BFL modules, with alphas
    pixel-bfl.safetensors    BFL module names + PEFT suffixes (diffusion_model.*.lora_A/B)
    pixel-xlabs.safetensors  XLabs-AI names: only the attention part of the update
  and te-kohya.safetensors: pixel-kohya plus a CLIP text-encoder LoRA.
* reference.safetensors + reference.json: the outputs of diffusers' FluxPipeline
  (CPU, float32, the same call as tools/make_tiny_flux.py's reference run) with
  each LoRA fused at scale 0.8, plus scale 0.4, a two-LoRA combination, and the
  fused weight deltas of two layers in BFL layout.
* README.md describing all of it.

diffusers 0.35.2 cannot read some of these real-world formats unaided (see
`patched_kohya_converter` and the README); the script records what the
unpatched library does and loads them through diffusers' own converter with
the smallest patches that make it work, then asserts that every format fuses to
the same weights as the PEFT file, which diffusers loads unpatched.

Deterministic (fixed seeds, one CPU thread): running it twice gives
byte-identical files.

Usage:  python tools/make_tiny_lora.py [--out tests/data/tiny-loras] [--base tests/data/tiny-flux-schnell]
(with the venv made by tools/setup-venv.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_flux as mtf  # noqa: E402  (sets 1 thread, offline mode, quiet logging)
from lora_fixture import bf16_exact, fuse_group, max_diff, plain_state_dict, prepare_out, rel, save  # noqa: E402

import diffusers  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402
from diffusers.loaders import lora_conversion_utils, lora_pipeline  # noqa: E402

torch.set_num_threads(1)
diffusers.logging.set_verbosity_error()
# loading a second adapter (the combination) is intended
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")

REPO = Path(__file__).resolve().parent.parent
V = mtf.VARIANTS["schnell"]

SEED_LORA = 100
SEED_TE_LORA = 101
RANK = 4
# A ~ N(0, 1/in), B ~ N(0, GAIN^2/RANK): B@A has std GAIN/sqrt(in), i.e. GAIN times the base
# weights' std (they are ~ N(0, 1/in)); at scale 0.8 the weights move by ~0.8*GAIN.
GAIN = 0.25
TE_GAIN = 0.25
SCALE = 0.8
SCALE_HALF = 0.4
COMBO = {"pixel-peft": 0.8, "pixel-xlabs": 0.5}
# kohya alpha = rank * fraction (so the file's own LoRA scale alpha/rank is the fraction; up is
# stored divided by it so that the effective update is the same as the other files').
# img_in / txt_in carry no alpha (kohya: alpha defaults to rank, scale 1), see README.
KOHYA_ALPHA_FRACTION = {"img_mlp.0": 0.25, "txt_mlp.0": 0.25}
KOHYA_ALPHA_FRACTION_DEFAULT = 0.5
TE_ALPHA = 2.0

# The layers the update covers, in diffusers names.
DOUBLE_MODULES = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
]
SINGLE_MODULES = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]
GLOBAL_MODULES = ["x_embedder", "context_embedder"]
# What XLabs' format can carry (attention only).
XLABS_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
XLABS_SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_out"]
TE_MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]

DELTA_KEYS = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]

NAMES = ["pixel-peft", "pixel-kohya", "pixel-bfl", "pixel-xlabs", "te-kohya"]


# ----------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------


def make_update(shapes: dict[str, tuple[int, int]], modules: list[str], seed: int, gain: float) -> dict:
    """{module: (A [RANK, in], B [out, RANK])}, float32, bf16-exact."""
    g = torch.Generator().manual_seed(seed)
    upd = {}
    for m in modules:
        out_f, in_f = shapes[m]
        a = torch.randn((RANK, in_f), generator=g) / in_f ** 0.5
        b = torch.randn((out_f, RANK), generator=g) * (gain / RANK ** 0.5)
        upd[m] = (bf16_exact(a), bf16_exact(b))
    return upd


def transformer_modules(cfg) -> list[str]:
    mods = []
    for i in range(cfg.num_layers):
        mods += [f"transformer_blocks.{i}.{m}" for m in DOUBLE_MODULES]
    for i in range(cfg.num_single_layers):
        mods += [f"single_transformer_blocks.{i}.{m}" for m in SINGLE_MODULES]
    return mods + GLOBAL_MODULES


def bfl_groups(cfg) -> list[tuple[str, list[str]]]:
    """(BFL module, [diffusers modules fused into it, in row order]) for the covered layers."""
    groups = []
    for i in range(cfg.num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        groups += [
            (b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"]),
            (b + "img_attn.proj", [d + "attn.to_out.0"]),
            (b + "img_mlp.0", [d + "ff.net.0.proj"]),
            (b + "img_mlp.2", [d + "ff.net.2"]),
            (b + "img_mod.lin", [d + "norm1.linear"]),
            (b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"]),
            (b + "txt_attn.proj", [d + "attn.to_add_out"]),
            (b + "txt_mlp.0", [d + "ff_context.net.0.proj"]),
            (b + "txt_mlp.2", [d + "ff_context.net.2"]),
        ]
    for i in range(cfg.num_single_layers):
        s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        groups += [
            (b + "linear1", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"]),
            (b + "linear2", [s + "proj_out"]),
        ]
    groups += [("img_in", ["x_embedder"]), ("txt_in", ["context_embedder"])]
    return groups


def pad_rank(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a LoRA to a higher rank (same product)."""
    r = down.shape[0]
    down = torch.cat([down, torch.zeros((rank - r, down.shape[1]))], dim=0)
    up = torch.cat([up, torch.zeros((up.shape[0], rank - r))], dim=1)
    return down.contiguous(), up.contiguous()


def kohya_fraction(bfl: str) -> float:
    tail = ".".join(bfl.split(".")[-2:])
    return KOHYA_ALPHA_FRACTION.get(tail, KOHYA_ALPHA_FRACTION_DEFAULT)


# ----------------------------------------------------------------------------
# The files
# ----------------------------------------------------------------------------

def write_peft(out: Path, upd: dict) -> None:
    layers = {}
    for m, (a, b) in upd.items():
        layers[f"{m}.lora_A.weight"] = a.contiguous()
        layers[f"{m}.lora_B.weight"] = b.contiguous()
    FluxPipeline.save_lora_weights(str(out), transformer_lora_layers=layers, weight_name="pixel-peft.safetensors")


def kohya_unet_dict(cfg, upd: dict) -> dict:
    sd = {}
    for bfl, members in bfl_groups(cfg):
        down, up = fuse_group(upd, members)
        key = "lora_unet_" + bfl.replace(".", "_")
        if bfl in ("img_in", "txt_in"):
            # no .alpha: diffusers 0.35.2 cannot read one on these (ValueError), kohya's default is alpha = rank
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
            continue
        frac = kohya_fraction(bfl)
        rank = down.shape[0]
        sd[key + ".lora_down.weight"] = down
        sd[key + ".lora_up.weight"] = up / frac  # exact: frac is a power of two
        sd[key + ".alpha"] = torch.tensor(rank * frac)
    return sd


def te_kohya_dict(upd_te: dict) -> dict:
    sd = {}
    for m, (a, b) in upd_te.items():
        key = "lora_te1_" + m.replace(".", "_")
        sd[key + ".lora_down.weight"] = a
        sd[key + ".lora_up.weight"] = b * (RANK / TE_ALPHA)
        sd[key + ".alpha"] = torch.tensor(TE_ALPHA)
    return sd


def bfl_dict(cfg, upd: dict) -> dict:
    sd = {}
    for bfl, members in bfl_groups(cfg):
        down, up = fuse_group(upd, members)
        sd[f"diffusion_model.{bfl}.lora_A.weight"] = down
        sd[f"diffusion_model.{bfl}.lora_B.weight"] = up
    return sd


def xlabs_dict(cfg, upd: dict) -> tuple[dict, int]:
    """XLabs names. diffusers' XLabs converter copies a qkv down to q, k and v and splits up, so
    separate q/k/v LoRAs need rank 3r with a block-diagonal up; every other module is zero-padded
    to that rank too, because diffusers gives a LoRA without alphas lora_alpha = (one module's)
    rank, so mixed ranks would be mis-scaled."""
    rank = 3 * RANK
    sd = {}

    def put(prefix, down, up):
        down, up = pad_rank(down, up, rank)
        sd[prefix + ".down.weight"], sd[prefix + ".up.weight"] = down, up

    for i in range(cfg.num_layers):
        d, p = f"transformer_blocks.{i}.", f"double_blocks.{i}.processor."
        put(p + "qkv_lora1", *fuse_group(upd, [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"]))
        put(p + "qkv_lora2", *fuse_group(upd, [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"]))
        put(p + "proj_lora1", *upd[d + "attn.to_out.0"])
        put(p + "proj_lora2", *upd[d + "attn.to_add_out"])
    for i in range(cfg.num_single_layers):
        s, p = f"single_transformer_blocks.{i}.", f"single_blocks.{i}.processor."
        put(p + "qkv_lora", *fuse_group(upd, [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"]))
        put(p + "proj_lora", *upd[s + "proj_out"])
    return sd, rank


# ----------------------------------------------------------------------------
# diffusers' kohya converter, patched
# ----------------------------------------------------------------------------

def patched_kohya_converter(cfg, patches: tuple[str, ...] = ("dims", "prefix", "te1")):
    """diffusers 0.35.2's _convert_kohya_flux_lora_to_diffusers with up to three one-line changes:
    dims:   single_blocks.N.linear1 is split with the real model's hard-coded [3072,3072,3072,12288]
            (the tiny model's are [64,64,64,256]); like make_tiny_flux.patched_flux_converter.
    prefix: img_in/txt_in (and the other non-block layers) are converted to keys without the
            'transformer.' prefix, which load_lora_weights then silently ignores.
    te1:    the ComfyUI-compat filter keeps keys starting with 'lora_unet_' or 'lora_te_' only, so
            kohya sd-scripts' FLUX CLIP keys ('lora_te1_...') are silently dropped."""
    src = inspect.getsource(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    edits = {
        "dims": ("dims=[3072, 3072, 3072, 12288]", f"dims=[{inner}, {inner}, {inner}, {4 * inner}]"),
        "prefix": ("target_key = target_fmt.format(lora_key=lora_key)",
                   'target_key = "transformer." + target_fmt.format(lora_key=lora_key)'),
        "te1": ('if k.startswith(("lora_unet_", "lora_te_"))', 'if k.startswith(("lora_unet_", "lora_te_", "lora_te1_"))'),
    }
    for p in patches:
        old, new = edits[p]
        assert src.count(old) == 1, (p, src.count(old))
        src = src.replace(old, new)
    namespace = dict(lora_conversion_utils.__dict__)
    exec(compile(src, lora_conversion_utils.__file__, "exec"), namespace)
    return namespace["_convert_kohya_flux_lora_to_diffusers"]


@contextlib.contextmanager
def kohya_patched(cfg):
    orig = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = patched_kohya_converter(cfg)
    try:
        yield
    finally:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = orig


def bfl_as_comfy_kohya(sd: dict) -> dict:
    """pixel-bfl's keys with lora_A/lora_B renamed lora_down/lora_up: the 'diffusion_model.' +
    lora_down/lora_up (ComfyUI) form that diffusers' kohya converter reads (it maps
    'diffusion_model.' to 'lora_unet_' and dots to underscores). Values untouched, no alphas."""
    out = {}
    for k, v in sd.items():
        assert k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")), k
        out[k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")] = v
    return out


# ----------------------------------------------------------------------------
# Pipelines and runs
# ----------------------------------------------------------------------------

class Ctx:
    def __init__(self, base: Path, out: Path):
        self.base, self.out = base, out
        ref = safetensors.torch.load_file(str(base / "reference.safetensors"))
        self.base_ref = ref
        self.noise_packed = ref["noise_packed"]
        self.cfg = None


def load_pipe(ctx: Ctx) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(ctx.base, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_lora(ctx: Ctx, pipe: FluxPipeline, name: str, adapter: str) -> None:
    if name in ("pixel-peft", "pixel-xlabs"):
        pipe.load_lora_weights(str(ctx.out), weight_name=f"{name}.safetensors", adapter_name=adapter)
    elif name in ("pixel-kohya", "te-kohya"):
        with kohya_patched(ctx.cfg):
            pipe.load_lora_weights(str(ctx.out), weight_name=f"{name}.safetensors", adapter_name=adapter)
    elif name == "pixel-bfl":
        sd = safetensors.torch.load_file(str(ctx.out / f"{name}.safetensors"))
        with kohya_patched(ctx.cfg):
            pipe.load_lora_weights(bfl_as_comfy_kohya(sd), adapter_name=adapter)
    else:
        raise AssertionError(name)
    assert adapter in pipe.get_list_adapters().get("transformer", []), (name, pipe.get_list_adapters())


@torch.no_grad()
def generate(ctx: Ctx, pipe: FluxPipeline) -> dict:
    """The same call as make_tiny_flux.run_reference."""
    cap = {"tr": [], "pooled": []}
    hooks = [
        pipe.transformer.register_forward_hook(lambda m, a, k, o: cap["tr"].append(o[0].clone()), with_kwargs=True),
        pipe.text_encoder.register_forward_hook(
            lambda m, a, k, o: cap["pooled"].append(o.pooler_output.clone()), with_kwargs=True),
    ]
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    image = pipe(
        mtf.PROMPT, height=mtf.HEIGHT, width=mtf.WIDTH, num_inference_steps=mtf.STEPS, guidance_scale=V["guidance"],
        max_sequence_length=V["max_seq_len"], latents=ctx.noise_packed.clone(), output_type="pt",
        callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
    ).images
    for h in hooks:
        h.remove()
    assert len(steps) == mtf.STEPS and len(cap["tr"]) == mtf.STEPS and len(cap["pooled"]) == 1
    u8 = (image.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    res = {"final_latents": steps[-1], "image_u8": torch.from_numpy(u8),
           "transformer_out_step0": cap["tr"][0], "clip_pooled": cap["pooled"][0]}
    for k, v in res.items():
        assert torch.isfinite(v.float()).all(), k
    return res


def expected_weights(base_sd: dict, terms: list[tuple[float, dict]]) -> dict:
    want = dict(base_sd)
    for scale, upd in terms:
        for m, (a, b) in upd.items():
            want[m + ".weight"] = want[m + ".weight"] + (b @ a) * scale
    return want


# ----------------------------------------------------------------------------
# Facts about unpatched diffusers
# ----------------------------------------------------------------------------

def probe_unpatched(ctx: Ctx, files: dict) -> list[str]:
    facts = []
    cfg = ctx.cfg
    conv = lora_conversion_utils._convert_kohya_flux_lora_to_diffusers
    try:
        conv(dict(files["pixel-kohya"]))
        raise AssertionError("unpatched kohya converter accepted the tiny linear1")
    except AssertionError as e:
        assert str(e) == "", e
        facts.append("unpatched `_convert_kohya_flux_lora_to_diffusers` fails on `single_blocks.N.linear1` of the "
                     "tiny model: `assert sum(dims) == up_weight.shape[0]` with dims hard-coded to the real model's "
                     "[3072, 3072, 3072, 12288] (patched to [64, 64, 64, 256] here)")
    only_dims = patched_kohya_converter(cfg, ("dims",))(dict(files["pixel-kohya"]))
    stray = sorted(k for k in only_dims if not k.startswith(("transformer.", "text_encoder.")))
    assert stray == ["context_embedder.lora_A.weight", "context_embedder.lora_B.weight",
                     "x_embedder.lora_A.weight", "x_embedder.lora_B.weight"], stray
    facts.append("diffusers 0.35.2's kohya converter maps `lora_unet_img_in`/`lora_unet_txt_in` (and every other "
                 "non-block layer) to keys WITHOUT the `transformer.` prefix (" + ", ".join(f"`{k}`" for k in stray[:2])
                 + ", ...), which `load_lora_weights` then silently ignores: patched here")
    g = torch.Generator().manual_seed(0)
    probe = {"lora_unet_img_in.lora_down.weight": torch.randn((4, 64), generator=g),
             "lora_unet_img_in.lora_up.weight": torch.randn((64, 4), generator=g),
             "lora_unet_img_in.alpha": torch.tensor(2.0)}
    try:
        conv(dict(probe))
        raise AssertionError("kohya img_in alpha accepted")
    except ValueError as e:
        facts.append("a kohya `lora_unet_img_in.alpha` (or `txt_in`) makes diffusers' converter raise "
                     f"`ValueError: {str(e).strip().splitlines()[0]} ...` (the converter has `# TODO: alphas` "
                     "there), so pixel-kohya has no alpha on img_in/txt_in")
    no_te1 = patched_kohya_converter(cfg, ("dims", "prefix"))(dict(files["te-kohya"]))
    assert not any(k.startswith("text_encoder.") for k in no_te1)
    with_te1 = patched_kohya_converter(cfg)(dict(files["te-kohya"]))
    n_te = sum(k.startswith("text_encoder.") for k in with_te1)
    assert n_te == 2 * len(TE_MODULES) * 2, n_te
    facts.append("diffusers 0.35.2 silently drops kohya sd-scripts' FLUX CLIP keys `lora_te1_*`: its ComfyUI-compat "
                 "branch keeps only keys starting with `lora_unet_` or `lora_te_` (patched here; with the patch "
                 f"all {n_te} CLIP LoRA tensors load)")

    pipe = load_pipe(ctx)
    before = plain_state_dict(pipe.transformer)
    pipe.load_lora_weights(str(ctx.out), weight_name="pixel-bfl.safetensors", adapter_name="bfl")
    assert pipe.get_list_adapters() == {}, pipe.get_list_adapters()
    assert max_diff(plain_state_dict(pipe.transformer), before) == 0.0
    facts.append("unpatched `load_lora_weights` on pixel-bfl.safetensors (`diffusion_model.*.lora_A/B`) loads "
                 "NOTHING, without an error (only a 'No LoRA keys associated to FluxTransformer2DModel' warning): "
                 "no converter in 0.35.2 claims these keys (the BFL control-LoRA one wants un-prefixed keys plus "
                 "`query_norm.scale` and every layer of the 19/38-block model). Its reference is computed by "
                 "renaming lora_A/lora_B to lora_down/lora_up (ComfyUI style) and using the kohya converter")

    # Mixed ranks without alphas: lora_alpha is set to one module's rank for all modules.
    pipe = load_pipe(ctx)
    g = torch.Generator().manual_seed(0)
    m1, m2 = "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out"
    probe = {f"transformer.{m1}.lora_A.weight": torch.randn((4, 64), generator=g),
             f"transformer.{m1}.lora_B.weight": torch.randn((64, 4), generator=g),
             f"transformer.{m2}.lora_A.weight": torch.randn((8, 64), generator=g),
             f"transformer.{m2}.lora_B.weight": torch.randn((64, 8), generator=g)}
    pipe.load_lora_weights(probe, adapter_name="mixed")
    blk = pipe.transformer.transformer_blocks[0].attn
    s1, s2 = blk.to_out[0].scaling["mixed"], blk.to_add_out.scaling["mixed"]
    assert (s1, s2) == (1.0, 0.5), (s1, s2)
    facts.append("a PEFT-named LoRA without alphas/metadata whose modules have different ranks is mis-scaled by "
                 "diffusers: lora_alpha = the first module's rank for all (probe: rank 4 -> scaling 1.0, rank 8 "
                 f"-> {s2}); hence pixel-xlabs is rank 12 in every module (q/k/v need 3*4, the rest are zero-padded)")

    default = inspect.signature(lora_pipeline.FluxLoraLoaderMixin.fuse_lora).parameters["components"].default
    assert default == ["transformer"], default
    facts.append("`FluxPipeline.fuse_lora()` defaults to components=['transformer']: a text-encoder LoRA stays "
                 "unfused (and active at adapter weight 1.0, not lora_scale); the references fuse "
                 "components=['transformer', 'text_encoder']")
    return facts


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def std(t: torch.Tensor) -> float:
    return float(t.float().std())


def versions() -> dict:
    v = mtf.versions()
    v["peft"] = peft.__version__
    import accelerate
    v["accelerate"] = accelerate.__version__
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/data/tiny-loras")
    ap.add_argument("--base", type=Path, default=REPO / "tests/data/tiny-flux-schnell")
    args = ap.parse_args()
    out: Path = args.out
    prepare_out(out)
    ctx = Ctx(args.base, out)
    facts: list[str] = []

    # --- base run: must reproduce the tiny pipeline's own reference
    pipe = load_pipe(ctx)
    ctx.cfg = cfg = pipe.transformer.config
    base_sd = plain_state_dict(pipe.transformer)
    base_te_sd = plain_state_dict(pipe.text_encoder)
    base = generate(ctx, pipe)
    for k in ("final_latents", "image_u8", "transformer_out_step0", "clip_pooled"):
        assert torch.equal(base[k], ctx.base_ref[k]), f"base run differs from {args.base}/reference.safetensors: {k}"
    facts.append(f"the base pipeline run here reproduces `{args.base.name}/reference.safetensors` (final_latents, "
                 "image_u8, transformer_out_step0, clip_pooled) bit-exactly")
    del pipe

    # --- the updates
    mods = transformer_modules(cfg)
    shapes = {m: tuple(base_sd[m + ".weight"].shape) for m in mods}
    upd = make_update(shapes, mods, SEED_LORA, GAIN)
    xl_mods = [m for m in mods if any(m == f"transformer_blocks.{i}.{x}" for i in range(cfg.num_layers) for x in XLABS_DOUBLE)
               or any(m == f"single_transformer_blocks.{i}.{x}" for i in range(cfg.num_single_layers) for x in XLABS_SINGLE)]
    upd_attn = {m: upd[m] for m in xl_mods}
    te_mods = [f"text_model.encoder.layers.{i}.{m}" for i in range(pipe_te_layers(base_te_sd)) for m in TE_MODULES]
    te_shapes = {m: tuple(base_te_sd[m + ".weight"].shape) for m in te_mods}
    upd_te = make_update(te_shapes, te_mods, SEED_TE_LORA, TE_GAIN)

    # --- the files
    write_peft(out, upd)
    files = {"pixel-kohya": kohya_unet_dict(cfg, upd)}
    save(files["pixel-kohya"], out / "pixel-kohya.safetensors", torch.bfloat16)
    files["pixel-bfl"] = bfl_dict(cfg, upd)
    save(files["pixel-bfl"], out / "pixel-bfl.safetensors", torch.bfloat16)
    xl, xl_rank = xlabs_dict(cfg, upd)
    files["pixel-xlabs"] = xl
    save(xl, out / "pixel-xlabs.safetensors", torch.bfloat16)
    files["te-kohya"] = {**files["pixel-kohya"], **te_kohya_dict(upd_te)}
    save(files["te-kohya"], out / "te-kohya.safetensors", torch.bfloat16)
    loaded = {n: safetensors.torch.load_file(str(out / f"{n}.safetensors")) for n in NAMES}
    # stored values are exactly the constructed ones (bf16-exact by construction)
    for n, sd in files.items():
        assert set(loaded[n]) == set(sd) and all(torch.equal(loaded[n][k].float(), sd[k].float()) for k in sd), n

    facts += probe_unpatched(ctx, {n: loaded[n] for n in NAMES})

    # --- references
    ref: dict[str, torch.Tensor] = {}
    want = {
        "pixel": expected_weights(base_sd, [(SCALE, upd)]),
        "xlabs": expected_weights(base_sd, [(SCALE, upd_attn)]),
    }
    want_te = expected_weights(base_te_sd, [(SCALE, upd_te)])
    figures = {"fused_weights_vs_expected": {}, "unfused_vs_fused_final_latents": {},
               "relative_change_vs_base": {}}
    fused_sd = {}
    for name in NAMES:
        pipe = load_pipe(ctx)
        load_lora(ctx, pipe, name, name)
        pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=SCALE, adapter_names=[name])
        got = plain_state_dict(pipe.transformer)
        fused_sd[name] = got
        d = max_diff(got, want["xlabs" if name == "pixel-xlabs" else "pixel"])
        assert d <= 1e-6, (name, d)
        figures["fused_weights_vs_expected"][name] = d
        te_got = plain_state_dict(pipe.text_encoder)
        d_te = max_diff(te_got, want_te if name == "te-kohya" else base_te_sd)
        assert d_te <= 1e-6, (name, d_te)
        if name == "te-kohya":
            figures["fused_weights_vs_expected"]["te-kohya.text_encoder"] = d_te
        res = generate(ctx, pipe)
        for k in ("final_latents", "image_u8", "transformer_out_step0"):
            ref[f"{name}.{k}"] = res[k]
        if name == "te-kohya":
            ref["te-kohya.clip_pooled"] = res["clip_pooled"]
        else:
            assert torch.equal(res["clip_pooled"], base["clip_pooled"]), name
        del pipe

        pipe = load_pipe(ctx)  # unfused: LoRA layers active at adapter weight 0.8
        load_lora(ctx, pipe, name, name)
        pipe.set_adapters([name], adapter_weights=[SCALE])
        unf = generate(ctx, pipe)
        du = float((unf["final_latents"] - res["final_latents"]).abs().max())
        assert du <= 1e-5, (name, du)
        figures["unfused_vs_fused_final_latents"][name] = du
        if name == "te-kohya":
            dp = float((unf["clip_pooled"] - res["clip_pooled"]).abs().max())
            assert dp <= 1e-5, dp
            figures["unfused_vs_fused_final_latents"]["te-kohya.clip_pooled"] = dp
        del pipe
        figures["relative_change_vs_base"][name] = rel(res["final_latents"], base["final_latents"])

    # formats agree with each other
    pair = {}
    for name in ("pixel-kohya", "pixel-bfl", "te-kohya"):
        pair[f"{name} vs pixel-peft fused weights"] = max_diff(fused_sd[name], fused_sd["pixel-peft"])
        if name == "te-kohya":
            continue  # its CLIP LoRA changes the output
        pair[f"{name} vs pixel-peft final_latents"] = float(
            (ref[f"{name}.final_latents"] - ref["pixel-peft.final_latents"]).abs().max())
    for name in ("pixel-kohya", "pixel-bfl"):
        assert pair[f"{name} vs pixel-peft fused weights"] <= 1e-6
        assert pair[f"{name} vs pixel-peft final_latents"] <= 1e-5
    figures["pairwise"] = pair

    # non-triviality
    rc = figures["relative_change_vs_base"]
    for name in ("pixel-peft", "pixel-kohya", "pixel-bfl"):
        assert 0.05 <= rc[name] <= 0.5, (name, rc[name])
    assert rc["pixel-xlabs"] >= 0.02, rc["pixel-xlabs"]
    te_vs_kohya = rel(ref["te-kohya.final_latents"], ref["pixel-kohya.final_latents"])
    pooled_change = rel(ref["te-kohya.clip_pooled"], base["clip_pooled"])
    assert te_vs_kohya >= 0.01 and pooled_change >= 0.05, (te_vs_kohya, pooled_change)
    figures["te-kohya final_latents vs pixel-kohya (relative)"] = te_vs_kohya
    figures["te-kohya clip_pooled vs base (relative)"] = pooled_change
    for name in NAMES:
        assert not torch.equal(ref[f"{name}.image_u8"], base["image_u8"]), name

    # scale 0.4
    pipe = load_pipe(ctx)
    load_lora(ctx, pipe, "pixel-peft", "pixel-peft")
    pipe.fuse_lora(lora_scale=SCALE_HALF, adapter_names=["pixel-peft"])
    d = max_diff(plain_state_dict(pipe.transformer), expected_weights(base_sd, [(SCALE_HALF, upd)]))
    assert d <= 1e-6, d
    figures["fused_weights_vs_expected"]["pixel-peft@0.4"] = d
    half = generate(ctx, pipe)
    ref["pixel-peft@0.4.final_latents"] = half["final_latents"]
    r_half = rel(half["final_latents"], base["final_latents"])
    assert 0.3 * rc["pixel-peft"] < r_half < 0.7 * rc["pixel-peft"], (r_half, rc["pixel-peft"])
    rc["pixel-peft@0.4"] = r_half
    del pipe

    # two LoRAs: unfused with set_adapters weights (the reference), fused for the check
    combo_want = expected_weights(base_sd, [(COMBO["pixel-peft"], upd), (COMBO["pixel-xlabs"], upd_attn)])
    pipe = load_pipe(ctx)
    for n in COMBO:
        load_lora(ctx, pipe, n, n)
    pipe.set_adapters(list(COMBO), adapter_weights=list(COMBO.values()))
    combo = generate(ctx, pipe)
    pipe.fuse_lora(lora_scale=1.0, adapter_names=list(COMBO))
    d = max_diff(plain_state_dict(pipe.transformer), combo_want)
    assert d <= 1e-6, d
    figures["fused_weights_vs_expected"]["combo"] = d
    combo_fused = generate(ctx, pipe)
    du = float((combo_fused["final_latents"] - combo["final_latents"]).abs().max())
    assert du <= 1e-5, du
    figures["unfused_vs_fused_final_latents"]["combo"] = du
    ref["combo.final_latents"] = combo["final_latents"]
    rc["combo"] = rel(combo["final_latents"], base["final_latents"])
    assert rel(combo["final_latents"], ref["pixel-peft.final_latents"]) > 0.01
    del pipe

    # fused weight deltas in BFL layout (pixel-peft at 0.8)
    bfl_after = mtf.diffusers_to_bfl_transformer(fused_sd["pixel-peft"], cfg.num_layers, cfg.num_single_layers)
    bfl_before = mtf.diffusers_to_bfl_transformer(base_sd, cfg.num_layers, cfg.num_single_layers)
    for k in DELTA_KEYS:
        ref[f"delta.{k}"] = (bfl_after[k] - bfl_before[k]).contiguous()
    # cross-check against the BFL file's own up @ down
    for k in DELTA_KEYS:
        mod = k.removesuffix(".weight")
        a = files["pixel-bfl"][f"diffusion_model.{mod}.lora_A.weight"]
        b = files["pixel-bfl"][f"diffusion_model.{mod}.lora_B.weight"]
        dd = float((ref[f"delta.{k}"] - SCALE * (b @ a)).abs().max())
        assert dd <= 1e-6, (k, dd)
        figures.setdefault("delta_vs_0.8*up@down", {})[k] = dd

    ref = {k: v.contiguous() for k, v in sorted(ref.items())}
    safetensors.torch.save_file(ref, str(out / "reference.safetensors"))

    meta = {
        "base": str(args.base.relative_to(REPO)) if args.base.is_relative_to(REPO) else str(args.base),
        "call": {"prompt": mtf.PROMPT, "width": mtf.WIDTH, "height": mtf.HEIGHT, "num_inference_steps": mtf.STEPS,
                 "guidance_scale": V["guidance"], "max_sequence_length": V["max_seq_len"],
                 "latents": "noise_packed from the base fixture's reference.safetensors"},
        "rank": RANK, "gain": GAIN, "te_gain": TE_GAIN,
        "seeds": {"lora": SEED_LORA, "te_lora": SEED_TE_LORA},
        "scale": SCALE,
        "scale_half": SCALE_HALF,
        "recipes": {
            "<name>": "FluxPipeline.from_pretrained(base, torch_dtype=float32); load_lora_weights(lora_dir, "
                      "weight_name='<name>.safetensors', adapter_name='<name>'); fuse_lora(components=['transformer', "
                      f"'text_encoder'], lora_scale={SCALE}, adapter_names=['<name>'])",
            "pixel-peft@0.4": f"as pixel-peft with fuse_lora(lora_scale={SCALE_HALF})",
            "combo": "load_lora_weights pixel-peft (adapter 'pixel-peft') and pixel-xlabs (adapter 'pixel-xlabs'); "
                     f"set_adapters(['pixel-peft', 'pixel-xlabs'], adapter_weights={list(COMBO.values())}); not fused "
                     "(fusing both with fuse_lora(lora_scale=1.0) was checked to give the same output)",
            "pixel-kohya, te-kohya, pixel-bfl": "loaded through diffusers' kohya converter patched as README says",
            "delta.<bfl key>": f"pixel-peft fused at {SCALE}: weight after - before, in BFL layout "
                               "(make_tiny_flux.diffusers_to_bfl_transformer)",
        },
        "files": {},
        "figures": figures,
        "versions": versions(),
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                        **({"std": round(std(v), 6)} if v.is_floating_point() else {})}
                    for k, v in ref.items()},
    }
    for n in NAMES:
        sd = loaded[n]
        meta["files"][n] = {
            "tensors": len(sd),
            "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}),
            "bytes": (out / f"{n}.safetensors").stat().st_size,
            "metadata": safetensors.safe_open(str(out / f"{n}.safetensors"), "pt").metadata(),
        }
    meta["files"]["pixel-xlabs"]["rank"] = xl_rank
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")

    write_readme(out, meta, facts, loaded, cfg)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total < 1_000_000, total
    print(f"wrote {out} ({total / 1e6:.3f} MB)")
    for f in facts:
        print(" -", f)
    print(json.dumps(figures, indent=1))


def pipe_te_layers(te_sd: dict) -> int:
    return len({k.split(".")[3] for k in te_sd if k.startswith("text_model.encoder.layers.")})


# ----------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------

def key_table(sd: dict, patterns: list[str]) -> str:
    rows = []
    for p in patterns:
        ks = [k for k in sorted(sd) if p in k]
        assert ks, p
        for k in ks[:3]:
            v = sd[k]
            rows.append(f"| `{k}` | {str(v.dtype).replace('torch.', '')} | {list(v.shape)} |"
                        + (f" {float(v):g} |" if v.dim() == 0 else " |"))
    return "| key | dtype | shape | value |\n| --- | --- | --- | --- |\n" + "\n".join(rows)


def write_readme(out: Path, meta: dict, facts: list[str], loaded: dict, cfg) -> None:
    v = meta["versions"]
    fig = meta["figures"]
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "README.md")
    file_lines = "\n".join(f"| `{f}` | {(out / f).stat().st_size:,} |" for f in files)
    tensor_lines = "\n".join(f"| `{k}` | {t['dtype']} | {t['shape']} | {t.get('std', '')} |"
                             for k, t in meta["tensors"].items())
    fmt = lambda x: "0 (bit-exact)" if x == 0 else f"{x:.3g}"  # noqa: E731
    rc = fig["relative_change_vs_base"]
    text = f"""# tiny-loras test fixture

Small random FLUX.1 LoRA files for the tiny pipeline `{meta['base']}`, in the
real-world key formats, plus reference outputs from diffusers' `FluxPipeline`
(CPU, float32). This folder works as a server's `lora_dir`: a LoRA's name is its
file name without `.safetensors`. Generated — do not edit by hand. Regenerate with:

```sh
bash tools/setup-venv.sh                      # venv at ${{PICTOR_TOOLS_VENV:-$HOME/.cache/pictor/venv-tools}}
~/.cache/pictor/venv-tools/bin/python tools/make_tiny_lora.py   # --out tests/data/tiny-loras --base tests/data/tiny-flux-schnell
```

Deterministic (fixed seeds, 1 CPU thread): re-running gives byte-identical files
with these versions: python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']},
transformers {v['transformers']}, peft {v['peft']}, accelerate {v['accelerate']}, safetensors {v['safetensors']}.

## The update

One random low-rank update, rank {meta['rank']}, per diffusers module `m`: `A_m` [{meta['rank']}, in] ~ N(0, 1/in),
`B_m` [out, {meta['rank']}] ~ N(0, {meta['gain']}²/{meta['rank']}) (seed {meta['seeds']['lora']}), both rounded to
bfloat16-representable values, so every file stores the same numbers whether it is float32 or bfloat16.
Effective weight change at LoRA scale `s`: `W_m += s · B_m A_m` (the files' own alpha/rank factors are
compensated in their up/B tensors, by powers of two, so they cancel exactly).

Covered (diffusers names; both double blocks, both single blocks):
- double blocks: `attn.to_q/to_k/to_v/to_out.0/add_q_proj/add_k_proj/add_v_proj/to_add_out`, `ff.net.0.proj`,
  `ff.net.2`, `ff_context.net.0.proj`, `ff_context.net.2`, `norm1.linear`
- single blocks: `attn.to_q/to_k/to_v`, `proj_mlp`, `proj_out`
- `x_embedder`, `context_embedder`

In BFL names: `double_blocks.N.{{img,txt}}_attn.{{qkv,proj}}`, `double_blocks.N.{{img,txt}}_mlp.{{0,2}}`,
`double_blocks.N.img_mod.lin` (not `txt_mod.lin`), `single_blocks.N.linear1` (q, k, v and mlp rows),
`single_blocks.N.linear2`, `img_in`, `txt_in`. A fused BFL layer's LoRA carries its parts' separate LoRAs
exactly: down = [A_q; A_k; A_v] (rank 3·4 = 12; linear1: [A_q; A_k; A_v; A_mlp], rank 16) and up =
block-diagonal(B_q, B_k, B_v[, B_mlp]) (the off-diagonal blocks are exact zeros).

## Files

| file | format | dtype | rank | alpha | layers |
| --- | --- | --- | --- | --- | --- |
| `pixel-peft.safetensors` | diffusers/PEFT, written by `FluxPipeline.save_lora_weights` (metadata `{{"format": "pt"}}`) | float32 | 4 | none (diffusers: alpha = rank, scale 1) | all of the above, per diffusers module |
| `pixel-kohya.safetensors` | kohya sd-scripts FLUX (`lora_unet_<bfl name with _>`) | bfloat16 | 4; qkv 12; linear1 16 | `.alpha` = rank/2 (`img_mlp_0`, `txt_mlp_0`: rank/4); img_in/txt_in: none (= rank) | all |
| `pixel-bfl.safetensors` | BFL module names + PEFT suffixes, `diffusion_model.` prefix | bfloat16 | 4; qkv 12; linear1 16 | none (scale 1) | all |
| `pixel-xlabs.safetensors` | XLabs-AI (`*.processor.{{qkv,proj}}_lora*`) | bfloat16 | {meta['files']['pixel-xlabs']['rank']} everywhere (see below) | none (scale 1) | attention only: double `img/txt_attn.qkv`, `img/txt_attn.proj`; single q/k/v part of `linear1`, `linear2` |
| `te-kohya.safetensors` | pixel-kohya's tensors + kohya CLIP LoRA (`lora_te1_...`) | bfloat16 | 4 | unet as pixel-kohya; CLIP `.alpha` = {TE_ALPHA:g} (scale 0.5) | all + CLIP layers 0,1: `self_attn.{{q,k,v,out}}_proj`, `mlp.fc1/fc2` |

pixel-peft, pixel-kohya and pixel-bfl are the SAME update: fused through diffusers at 0.8 their
transformer weights equal `W + 0.8·B A` (computed in float32; max abs diff {fmt(max(fig['fused_weights_vs_expected'][n] for n in ('pixel-peft', 'pixel-kohya', 'pixel-bfl'))) },
asserted <= 1e-6), each other (max abs diff {fmt(max(fig['pairwise'][f'{n} vs pixel-peft fused weights'] for n in ('pixel-kohya', 'pixel-bfl')))}), and their final latents agree (max abs diff
{fmt(max(fig['pairwise'][f'{n} vs pixel-peft final_latents'] for n in ('pixel-kohya', 'pixel-bfl')))}). pixel-xlabs is exactly the attention subset of that update (fused weights equal
`W + 0.8·B A` on its layers and `W` elsewhere: max abs diff {fmt(fig['fused_weights_vs_expected']['pixel-xlabs'])}). te-kohya's transformer part is pixel-kohya's; its
CLIP part is a second random update (seed {meta['seeds']['te_lora']}, gain {meta['te_gain']}).

### Key naming (first keys of each kind; shapes as stored)

`pixel-peft.safetensors` ({meta['files']['pixel-peft']['tensors']} tensors): `transformer.<diffusers module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].

{key_table(loaded['pixel-peft'], ['transformer.transformer_blocks.0.attn.to_q.', 'transformer_blocks.0.norm1.linear', 'single_transformer_blocks.0.proj_mlp', 'x_embedder'])}

`pixel-kohya.safetensors` ({meta['files']['pixel-kohya']['tensors']} tensors): `lora_unet_<BFL module, dots as _>.lora_down.weight` [r, in], `.lora_up.weight`
[out, r], `.alpha` (0-dim). The loader's scale is alpha/r with r = that module's down rows (12 for qkv, 16
for linear1); up is stored multiplied by r/alpha.

{key_table(loaded['pixel-kohya'], ['double_blocks_0_img_attn_qkv.', 'double_blocks_0_img_mlp_0.', 'single_blocks_0_linear1.', 'lora_unet_img_in.'])}

`pixel-bfl.safetensors` ({meta['files']['pixel-bfl']['tensors']} tensors): `diffusion_model.<BFL module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r].
(BFL's own FLUX.1-Canny/Depth-dev-lora files use the same suffixes WITHOUT the `diffusion_model.` prefix, plus
`lora_B.bias` and full `*.norm.*_norm.scale` tensors; a loader should accept both prefixes.)

{key_table(loaded['pixel-bfl'], ['double_blocks.0.img_attn.qkv.', 'double_blocks.0.img_mod.lin.', 'single_blocks.0.linear1.', 'diffusion_model.txt_in.'])}

`pixel-xlabs.safetensors` ({meta['files']['pixel-xlabs']['tensors']} tensors): `double_blocks.N.processor.{{qkv_lora1,proj_lora1}}` (image stream: `img_attn.qkv`,
`img_attn.proj`), `{{qkv_lora2,proj_lora2}}` (text stream: `txt_attn.qkv/proj`), `single_blocks.N.processor.qkv_lora`
(the first 3·64 rows of `linear1`, i.e. q, k, v) and `proj_lora` (`linear2`), each `.down.weight` [r, in] /
`.up.weight` [out, r]. All rank 12: qkv as above (block-diagonal up); the proj LoRAs are the rank-4 ones
zero-padded to 12 (rows of down / columns of up 4..11 are 0), because diffusers mis-scales mixed ranks (see the
facts below).

{key_table(loaded['pixel-xlabs'], ['double_blocks.0.processor.qkv_lora1.', 'double_blocks.0.processor.proj_lora2.', 'single_blocks.0.processor.qkv_lora.', 'single_blocks.0.processor.proj_lora.'])}

`te-kohya.safetensors` ({meta['files']['te-kohya']['tensors']} tensors): pixel-kohya's keys plus
`lora_te1_text_model_encoder_layers_<L>_{{self_attn_q_proj,self_attn_k_proj,self_attn_v_proj,self_attn_out_proj,mlp_fc1,mlp_fc2}}.{{lora_down.weight,lora_up.weight,alpha}}`.

{key_table(loaded['te-kohya'], ['lora_te1_text_model_encoder_layers_0_self_attn_q_proj.', 'lora_te1_text_model_encoder_layers_1_mlp_fc1.'])}

## How diffusers {v['diffusers']} loads them (and does not)

pixel-peft and pixel-xlabs load with plain `load_lora_weights`. pixel-kohya and te-kohya load through
diffusers' `_convert_kohya_flux_lora_to_diffusers` with three one-line patches (`patched_kohya_converter`):
the tiny model's linear1 split sizes; the `transformer.` prefix on non-block layers (img_in/txt_in); and
accepting `lora_te1_` keys. pixel-bfl is renamed to the ComfyUI kohya form (`lora_A`→`lora_down`,
`lora_B`→`lora_up`, keeping `diffusion_model.`) and loaded through that same patched converter. The
equality of all fused weights with pixel-peft's (loaded unpatched) is what makes these references trustworthy.

{chr(10).join('- ' + f for f in facts)}

## References (`reference.safetensors`, `reference.json`)

Each `<name>`: `FluxPipeline.from_pretrained(<base>, torch_dtype=float32, local_files_only=True)`,
`load_lora_weights`, `fuse_lora(components=['transformer', 'text_encoder'], lora_scale={meta['scale']})`, then the
base fixture's reference call: prompt `{meta['call']['prompt']}`, {meta['call']['width']}x{meta['call']['height']}, {meta['call']['num_inference_steps']} steps,
guidance_scale {meta['call']['guidance_scale']}, max_sequence_length {meta['call']['max_sequence_length']}, `latents=` the base `noise_packed`.
`final_latents`: packed latents after the last step; `image_u8`: NHWC `round(image*255)`;
`transformer_out_step0`: transformer output at step 0; `te-kohya.clip_pooled`: CLIP pooled output.
`pixel-peft@0.4.final_latents`: pixel-peft fused at 0.4. `combo.final_latents`: pixel-peft and pixel-xlabs
loaded as two adapters, `set_adapters(['pixel-peft', 'pixel-xlabs'], [{COMBO['pixel-peft']}, {COMBO['pixel-xlabs']}])`, unfused
(fusing both gives the same within {fmt(fig['unfused_vs_fused_final_latents']['combo'])}); its weights are `W + 0.8·B A + 0.5·B A|attention`.
`delta.<BFL key>`: pixel-peft fused at {meta['scale']}, weight after − before, BFL fused layout
(equals 0.8·lora_B@lora_A of pixel-bfl within {fmt(max(fig['delta_vs_0.8*up@down'].values()))}).

Unfused (`set_adapters([name], [0.8])`, no fuse) vs fused final latents, max abs: {', '.join(f"{k} {fmt(x)}" for k, x in fig['unfused_vs_fused_final_latents'].items())}.
Relative change of final latents vs the base reference (‖x−base‖/‖base‖): {', '.join(f"{k} {x:.3f}" for k, x in rc.items())};
te-kohya vs pixel-kohya {fig['te-kohya final_latents vs pixel-kohya (relative)']:.3f}; te-kohya clip_pooled vs base {fig['te-kohya clip_pooled vs base (relative)']:.3f}.

| tensor | dtype | shape | std |
| --- | --- | --- | --- |
{tensor_lines}

## Files

| file | bytes |
| --- | --- |
{file_lines}
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
