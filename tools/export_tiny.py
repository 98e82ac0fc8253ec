#!/usr/bin/env python3
"""Export the EMA weights trained by tools/train_tiny.py as a diffusers FLUX.1-schnell folder.

Writes models/pictor-tiny/ (model_index.json, scheduler/, tokenizer/, tokenizer_2/,
text_encoder/, text_encoder_2/, transformer/, vae/ -- single safetensors files, no shards)
with the measured latent shift_factor / scaling_factor in vae/config.json, then checks that
`FluxPipeline.from_pretrained(out, local_files_only=True)` reloads it bit-exactly, that the
pipeline's transformer call sees exactly the inputs training used, and that it generates at
4 steps.  A README.md already in the folder (the model card) is kept.

    python tools/export_tiny.py [--out models/pictor-tiny] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_tiny as T  # noqa: E402  (sets up offline env, imports make_tiny_flux)
import make_tiny_flux  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

SAMPLE_PROMPTS = [
    "a large red circle on a blue background in the centre",
    "a small yellow square on a black background in the top left",
    "a large green star on a white background in the centre",
    "a small white ring on a purple background in the bottom right",
    "top-left: tiny crimson disc, blue backdrop",
    "two shapes: a yellow star left of a green square on a gray background",
    "a large blue ring on an orange background in the centre",  # held-out pair
    "a small red star on a cyan background in the top right",  # held-out pair
]


def load_trained(d: Path, seed: int, stage: str = "tune"):
    tok, tok2 = T.load_tokenizers(d / "tokenizers")
    clip, t5, tr = T.make_models(tok, tok2, seed)
    fl = torch.load(d / "ckpt" / "flux.pt", map_location="cpu", weights_only=False)
    tuned = d / "ckpt" / f"{stage}.pt"
    tn = torch.load(tuned, map_location="cpu", weights_only=False) if tuned.exists() else None
    for k, m in (("transformer", tr), ("clip", clip), ("t5", t5)):
        m.load_state_dict((tn or fl)["ema"][k])
    vae = T.load_ema_vae(d, seed)
    st = json.loads((d / "latent_stats.json").read_text())
    vae.register_to_config(scaling_factor=round(st["scaling_factor"], 4), shift_factor=round(st["shift_factor"], 4))
    info = {"stage": stage if tn is not None else "flux", "flux_steps": fl["step"], "flux_minutes": fl["seconds"] / 60}
    if tn is not None:
        info.update({"tune_steps": tn["step"], "tune_minutes": tn["seconds"] / 60})
    ae = torch.load(d / "ckpt" / "ae.pt", map_location="cpu", weights_only=False)
    info.update({"ae_steps": ae["step"], "ae_minutes": ae["seconds"] / 60,
                 "shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor})
    for m in (clip, t5, tr, vae):
        m.eval()
    return tok, tok2, clip, t5, tr, vae, info


def save(out: Path, tok, tok2, clip, t5, tr, vae, dtype: torch.dtype) -> None:
    from diffusers import FluxPipeline
    card = (out / "README.md").read_text() if (out / "README.md").exists() else None
    if out.exists():
        if any(out.iterdir()) and not (out / "model_index.json").exists() and card is None:
            raise SystemExit(f"{out} is not empty and not a previous export; refusing")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pipe = FluxPipeline(scheduler=make_tiny_flux.make_scheduler(), vae=vae, text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok2, transformer=tr)
    for m in (clip, t5, tr, vae):
        m.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    for m in (clip, t5, tr, vae):
        m.to(torch.float32)
    tj = out / "tokenizer" / "tokenizer.json"
    if tj.exists():
        tj.unlink()
    if card is not None:
        (out / "README.md").write_text(card)


@torch.no_grad()
def verify(out: Path, tok, tok2, clip, t5, tr, vae, dtype, samples_png: Path | None) -> dict:
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(out, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    facts = {}
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer" and type(pipe.tokenizer_2).__name__ == "T5TokenizerFast"
    # weights round-trip
    for name, mine, theirs in (("text_encoder", clip, pipe.text_encoder), ("text_encoder_2", t5, pipe.text_encoder_2),
                               ("transformer", tr, pipe.transformer), ("vae", vae, pipe.vae)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert set(a) == set(b), name
        for k in a:
            assert torch.equal(a[k].to(dtype).float(), b[k].float()), (name, k)
    vc = pipe.vae.config
    assert vc.norm_num_groups == 32 and all(c % 32 == 0 for c in vc.block_out_channels)
    assert vc.latent_channels == 16 and not vc.use_quant_conv and not vc.use_post_quant_conv
    tc = pipe.transformer.config
    assert sum(tc.axes_dims_rope) == tc.attention_head_dim and all(x % 2 == 0 for x in tc.axes_dims_rope)
    assert tc.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert tc.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    cc = pipe.text_encoder.config
    assert cc.hidden_act == "quick_gelu" and cc.layer_norm_eps == 1e-5 and cc.eos_token_id == 2
    assert pipe.tokenizer.eos_token_id == len(pipe.tokenizer) - 1 == pipe.tokenizer.pad_token_id
    assert pipe.tokenizer.model_max_length == cc.max_position_embeddings == T.CLIP_LEN
    assert pipe.tokenizer_2.model_max_length == T.T5_LEN
    assert pipe.text_encoder_2.config.feed_forward_proj == "gated-gelu"
    facts["reload"] = "FluxPipeline.from_pretrained(local_files_only=True): all weights equal to the EMA weights"
    # slow/fast CLIP, sentencepiece / slow T5 / T5TokenizerFast / tokenizer.json alone agree
    prompts = SAMPLE_PROMPTS + [c for cs in json.loads((T.train_dir() / "data" / "captions.json").read_text())[:100]
                                for c in cs]
    make_tiny_flux.check_tokenizer_parity(out, prompts)
    facts["tokenizers"] = f"tokenizer parity (slow/fast/tokenizer.json/sentencepiece) on {len(prompts)} prompts"

    # The pipeline's transformer call sees exactly what training feeds it.
    prompt = SAMPLE_PROMPTS[0]
    cap = {}

    def hook(m, args, kwargs, o):
        if "k" not in cap:
            cap["k"] = {n: v.clone() for n, v in kwargs.items() if torch.is_tensor(v)}
            cap["o"] = o[0].clone()
    h = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 16, 16, 16), generator=g)
    img = pipe(prompt, height=128, width=128, num_inference_steps=4, guidance_scale=0.0,
               max_sequence_length=T.T5_LEN, latents=T.pack(noise), output_type="np").images
    h.remove()
    cids, tids = T.tokenize(pipe.tokenizer, pipe.tokenizer_2, [prompt])
    mine = T.flux_forward(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, T.pack(noise),
                          torch.ones(1), cids, tids)
    k = cap["k"]
    assert torch.equal(k["hidden_states"], T.pack(noise))
    assert torch.equal(k["img_ids"], T.img_ids(16, 16)) and not k["txt_ids"].any()
    assert float(k["timestep"][0]) == 1.0, k["timestep"]
    assert k["encoder_hidden_states"].shape[1] == T.T5_LEN
    err = float((mine - cap["o"]).abs().max())
    assert err < 1e-4, err
    facts["convention"] = (f"pipeline's step-0 transformer call == training forward (max |diff| {err:.1e}); "
                           "timestep 1.0, img_ids/txt_ids/packing identical")
    assert np.isfinite(img).all()

    # samples at 4 steps
    gens = [torch.Generator().manual_seed(i) for i in range(len(SAMPLE_PROMPTS))]
    t0 = time.time()
    ims = pipe(SAMPLE_PROMPTS, height=128, width=128, num_inference_steps=4, guidance_scale=0.0,
               max_sequence_length=T.T5_LEN, generator=gens, output_type="np").images
    facts["sample_seconds"] = round(time.time() - t0, 2)
    if samples_png is not None:
        from PIL import Image
        u8 = (ims * 255).round().astype(np.uint8)
        grid = np.concatenate([np.concatenate(list(u8[r * 4:(r + 1) * 4]), 1) for r in range(len(u8) // 4)], 0)
        Image.fromarray(grid).save(samples_png)
        facts["samples"] = str(samples_png)
    return facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE.parent / "models" / "pictor-tiny")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--stage", default="tune",
                    help="which fine-tuning checkpoint to export: tune, polish, polish2, ... "
                         "(falls back to the flux stage)")
    args = ap.parse_args()
    T.setup_torch(args.threads)
    T._quiet()
    d = T.train_dir()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    tok, tok2, clip, t5, tr, vae, info = load_trained(d, args.seed, args.stage)
    save(args.out, tok, tok2, clip, t5, tr, vae, dtype)
    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    total = sum(p.stat().st_size for p in files)
    assert weights <= 30e6, weights
    counts = {n: T.nparams(m) for n, m in (("transformer", tr), ("text_encoder", clip),
                                            ("text_encoder_2", t5), ("vae", vae))}
    info.update({"dtype": args.dtype, "weights_bytes": weights, "total_bytes": total, "params": counts,
                 "params_total": sum(counts.values())})
    if not args.no_verify:
        info["verify"] = verify(args.out, tok, tok2, clip, t5, tr, vae, dtype, d / "samples.png")
    (d / "export_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    print(f"exported to {args.out}: {len(files)} files, weights {weights / 1e6:.2f} MB ({args.dtype}), "
          f"total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
