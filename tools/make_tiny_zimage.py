#!/usr/bin/env python3
"""Build a tiny, randomly initialised Z-Image-Turbo pipeline plus diffusers reference outputs.

What it makes (in --out, e.g. tests/data/tiny-z-image-turbo):

* A diffusers-format Z-Image repository laid out like Tongyi-MAI/Z-Image-Turbo
  (model_index.json, scheduler/, tokenizer/, text_encoder/, transformer/, vae/), with the
  REAL architectures (transformers `Qwen3Model`, diffusers `ZImageTransformer2DModel` and
  the FLUX `AutoencoderKL`) at tiny widths, weights stored in bf16 like the real files.
* reference.safetensors + reference.json from a real `ZImagePipeline.__call__` on CPU in
  float32, reloaded from the saved files: the chat-templated prompt's token ids, the text
  features (`hidden_states[-2]` over the real tokens), the transformer's input and output
  at step 0, the latents after every step, the sigmas, and the decoded image.

The traps a port must get right are all exercised: the caption and the image tokens are
each padded to a multiple of 32 with learned pad tokens that join attention (15 image
tokens, a caption that is not a multiple of 32); the transformer sees 1 - sigma and its
output is negated; the FFN width is int(dim / 3 * 8) with dim = 64 (not a multiple of 3).

The tokenizer is a byte-level BPE trained on the FLUX fixtures' procedural corpus, with
Qwen's special tokens and a chat template that renders a user message exactly as Qwen3's
does with enable_thinking=True: "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n".
The autoencoder is the FLUX fixture's own (tests/data/tiny-flux-schnell/vae), as Z-Image
uses FLUX's.

Needs diffusers >= 0.36 (0.40.0 pinned: the default sigmas changed in 0.39):
    bash tools/setup-venv.sh zimage
    ~/.cache/pictor/venv-zimage/bin/python tools/make_tiny_zimage.py --out tests/data/tiny-z-image-turbo
Deterministic (fixed seeds, one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from captions import build_corpus  # noqa: E402
import diffusers  # noqa: E402
import safetensors.torch  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel  # noqa: E402
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model  # noqa: E402

SEED_TEXT = 11
SEED_TRANSFORMER = 12
SEED_NOISE = 42
PROMPT = "a small red circle on a blue background in the top left"
WIDTH, HEIGHT = 80, 48
STEPS = 8
GUIDANCE = 0.0
MAX_SEQ_LEN = 512
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3's chat template reduced to what a single user message with a generation prompt
# renders (enable_thinking=True adds nothing; False adds an empty think block).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def make_tokenizer(lines: list[str]) -> Qwen2TokenizerFast:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIAL,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None,
                              eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 131072
    return fast


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter at random (nothing left at zero or one): N(0, 1/fan_in) for
    matrices, small normals for vectors, 1 + N(0, 0.1²) for norm scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def make_text_encoder(vocab: int) -> Qwen3Model:
    torch.manual_seed(SEED_TEXT)
    model = Qwen3Model(Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
        hidden_act="silu")).eval()
    reinit_(model, SEED_TEXT)
    return model


def make_transformer() -> ZImageTransformer2DModel:
    torch.manual_seed(SEED_TRANSFORMER)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
        n_refiner_layers=2, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
        rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512]).eval()
    reinit_(model, SEED_TRANSFORMER)
    return model


def run_reference(out: Path) -> tuple[dict, dict]:
    pipe = ZImagePipeline.from_pretrained(out, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref: dict[str, torch.Tensor] = {}
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n", text
    ids = pipe.tokenizer(text, return_tensors="pt").input_ids
    ref["input_ids"] = ids[0]
    cap: dict[str, list] = {"te": [], "tr": []}

    def te_hook(m, a, k, o):
        cap["te"].append(o.hidden_states[-2].clone())

    def tr_hook(m, a, k, o):
        cap["tr"].append(([x.clone() for x in a[0]], a[1].clone(), [c.clone() for c in a[2]],
                          [y.clone() for y in o[0]]))

    hooks = [pipe.text_encoder.register_forward_hook(te_hook, with_kwargs=True),
             pipe.transformer.register_forward_hook(tr_hook, with_kwargs=True)]
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    g = torch.Generator("cpu").manual_seed(SEED_NOISE)
    noise = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=g, dtype=torch.float32)
    image = pipe(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 max_sequence_length=MAX_SEQ_LEN, latents=noise.clone(), output_type="pt",
                 callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"]).images
    for h in hooks:
        h.remove()
    assert len(cap["te"]) == 1 and len(cap["tr"]) == STEPS, (len(cap["te"]), len(cap["tr"]))
    n = len(ids[0])
    ref["text_features"] = cap["te"][0][0, :n]
    x0, t0, c0, o0 = cap["tr"][0]
    assert torch.equal(c0[0], ref["text_features"])
    ref["noise"] = noise
    ref["transformer_in_step0"] = x0[0]
    ref["transformer_timestep_step0"] = t0
    ref["transformer_out_step0"] = o0[0]
    for i, s in enumerate(steps):
        ref[f"latents_step{i}"] = s
    ref["final_latents"] = steps[-1].clone()
    ref["image"] = image
    ref["image_u8"] = (image * 255).round().clamp(0, 255).to(torch.uint8)
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    assert float(ref["transformer_out_step0"].std()) > 0.05 and float(image.std()) > 0.02
    meta = {
        "prompt": PROMPT, "templated": text, "width": WIDTH, "height": HEIGHT,
        "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "max_sequence_length": MAX_SEQ_LEN,
        "caption_tokens": n, "image_tokens": (HEIGHT // 16) * (WIDTH // 16),
        "scheduler_sigmas": sigmas, "seeds": {"noise": SEED_NOISE},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in ref.items()},
    }
    return {k: v.contiguous() for k, v in ref.items()}, meta


def write_readme(out: Path, meta: dict) -> None:
    v = meta["versions"]
    tensors = "\n".join(f"| `{k}` | {t['dtype']} | {t['shape']} |" for k, t in meta["tensors"].items())
    (out / "README.md").write_text(f"""# tiny-z-image-turbo test fixture

A tiny, randomly initialised Z-Image-Turbo pipeline in diffusers' layout, plus reference
outputs from diffusers' `ZImagePipeline` (CPU, float32, reloaded from these files).
Generated — do not edit by hand. Regenerate with:

```sh
bash tools/setup-venv.sh zimage
~/.cache/pictor/venv-zimage/bin/python tools/make_tiny_zimage.py --out tests/data/tiny-z-image-turbo
```

Deterministic; versions: torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']},
tokenizers {v['tokenizers']}.

- `text_encoder/`: transformers `Qwen3Model`, hidden 32, 3 layers, 2 heads (1 KV head) of 16, MLP 64,
  RoPE theta 1e6, tied embeddings. The pipeline takes `hidden_states[-2]` over the real tokens.
- `tokenizer/`: byte-level BPE (vocab 700 with `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`),
  trained on `tools/captions.py`; its chat template renders `{meta['templated']!r}`.
- `transformer/`: `ZImageTransformer2DModel(dim=64, n_layers=2, n_refiner_layers=2, n_heads=2,
  cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512], rope_theta=256)`; FFN width
  int(64/3*8) = 170; every parameter (pad tokens included) random.
- `vae/`: the FLUX fixture's autoencoder, byte for byte (`tests/data/tiny-flux-schnell/vae`).
- `scheduler/`: `FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)`.

Reference run: prompt `{meta['prompt']}`, {meta['width']}x{meta['height']} ({meta['image_tokens']} image
tokens, {meta['caption_tokens']} caption tokens: neither a multiple of 32), {meta['num_inference_steps']}
steps, guidance {meta['guidance_scale']} (Turbo), sigmas {[round(x, 5) for x in meta['scheduler_sigmas']]}.
The transformer sees `1 - sigma`; the pipeline negates its output before the Euler step.

| tensor | dtype | shape |
| --- | --- | --- |
{tensors}
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    out: Path = ap.parse_args().out
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory():
        tokenizer = make_tokenizer(build_corpus())
        text_encoder = make_text_encoder(len(tokenizer))
        transformer = make_transformer()
        vae = AutoencoderKL.from_pretrained(ROOT / "tests" / "data" / "tiny-flux-schnell" / "vae")
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)
        pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)
        for model in (text_encoder, transformer, vae):
            model.to(torch.bfloat16)
        pipe.save_pretrained(out, safe_serialization=True)
    ref, meta = run_reference(out)
    safetensors.torch.save_file(ref, str(out / "reference.safetensors"))
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_readme(out, meta)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB); caption {meta['caption_tokens']} tokens, "
          f"sigmas {[round(s, 5) for s in meta['scheduler_sigmas']]}")


if __name__ == "__main__":
    main()
