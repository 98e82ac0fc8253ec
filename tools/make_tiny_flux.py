#!/usr/bin/env python3
"""Build a tiny, randomly initialised FLUX.1-schnell (or, with --variant dev, FLUX.1-dev)
pipeline plus reference outputs.

What it makes (in --out, e.g. tests/data/tiny-flux-schnell):

* A complete diffusers-format FLUX.1-schnell repository laid out exactly like
  black-forest-labs/FLUX.1-schnell (model_index.json, scheduler/, tokenizer/,
  tokenizer_2/, text_encoder/, text_encoder_2/ (2 shards), transformer/
  (2 shards), vae/), with the REAL architectures (transformers CLIPTextModel and
  T5EncoderModel, diffusers FluxTransformer2DModel and AutoencoderKL) and the
  REAL file formats, but tiny widths so the whole thing is a few MB.
* The same transformer and VAE again as Black Forest Labs single files at the
  root (flux1-schnell.safetensors, ae.safetensors), in BFL / LDM tensor names,
  verified to round-trip exactly through diffusers' own converters.
* reference.safetensors + reference.json: tokenizer ids, text-encoder outputs,
  the initial noise, the transformer output at step 0, the latents after every
  step, the decoded image (float and uint8) from a real `FluxPipeline.__call__`
  on CPU in float32, plus a long prompt (truncation) and a punctuation prompt.

Why: Pictor's Rust engine (candle) loads these files through its production
loader and compares its outputs with the reference tensors, so the whole
FLUX path (tokenizers, CLIP, T5, MMDiT, flow-matching Euler, VAE decode,
BFL single-file loading) is tested without the 30+ GB real checkpoint.

Everything is deterministic (fixed seeds, one CPU thread): running the script
twice gives byte-identical files.

FLUX.1-dev differs by its guidance embedding (`guidance_in`), its schedule shifted by image
size, a guidance scale of 3.5 and 512 T5 tokens; the text encoders, tokenizers and
autoencoder are the same files as schnell's (same seeds).

Usage:  python tools/make_tiny_flux.py [--variant schnell|dev] --out tests/data/tiny-flux-schnell
(with the venv made by tools/setup-venv.sh)
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import diffusers  # noqa: E402
import regex  # noqa: E402  (installed with transformers; CLIP's pre-tokenizer needs \p{L})
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402
from huggingface_hub import split_torch_state_dict_into_shards  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    T5TokenizerFast,
)
from transformers.models.clip.tokenization_clip import bytes_to_unicode  # noqa: E402

transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

# ----------------------------------------------------------------------------
# Fixed parameters
# ----------------------------------------------------------------------------

SEED_SPM = 1234
SEED_CLIP = 1
SEED_T5 = 2
SEED_TRANSFORMER = 3
SEED_VAE = 4
SEED_NOISE = 42
SEED_ENCODE = 43
SEED_LONG_PROMPT = 7

PROMPT = "a small red circle on a blue background in the top left"
PUNCT_PROMPT = "  A Yellow STAR, top-right:   on a green   backdrop!  "
WIDTH, HEIGHT = 80, 48
STEPS = 4

# What differs between the two FLUX.1 variants (--variant): FLUX.1-dev has a guidance
# embedding, a schedule shifted by image size (diffusers' `use_dynamic_shifting`, BFL's
# `shift=True`), a guidance scale (3.5 by default) and 512 T5 tokens.
VARIANTS = {
    "schnell": {"name": "FLUX.1-schnell", "file": "flux1-schnell", "guidance_embeds": False,
                "dynamic_shift": False, "shift": 1.0, "guidance": 0.0, "max_seq_len": 256},
    "dev": {"name": "FLUX.1-dev", "file": "flux1-dev", "guidance_embeds": True,
            "dynamic_shift": True, "shift": 3.0, "guidance": 3.5, "max_seq_len": 512},
}
V = VARIANTS["schnell"]  # set by main()

CLIP_NUM_MERGES = 480  # -> vocab 256 + 256 + merges + 2 specials
T5_VOCAB_SIZE = 600

# Random re-initialisation (see reinit_): weights ~ N(0, GAIN^2 / fan_in).
INIT = {
    "linear_gain": 1.0,
    "conv_gain": 1.0,
    "bias_std": 0.05,
    "norm_weight_std": 0.1,  # norm scales ~ 1 + N(0, 0.1^2)
    "norm_bias_std": 0.05,
    "embedding_std": 0.5,
}

from captions import (  # noqa: E402
    COLOURS,
    PLACES,
    SEED_CORPUS,
    SHAPES,
    SIZES,
    build_corpus,
)


def build_long_prompt() -> str:
    """A deterministic prompt long enough to be truncated by both encoders."""
    rng = random.Random(SEED_LONG_PROMPT)
    parts = []
    for _ in range(45 if V["max_seq_len"] <= 256 else 90):
        parts.append(
            f"a {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)} {rng.choice(PLACES)}"
        )
    return "Long prompt: " + ", ".join(parts) + "."


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------

# CLIP's pre-tokenizer regex (transformers CLIPTokenizer.pat without the two
# special-token alternatives, which never occur in the corpus).
CLIP_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def train_clip_bpe(corpus: list[str], num_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Train byte-level BPE merges the way CLIP's vocabulary is built.

    Words are CLIP-pre-tokenized (whitespace-cleaned, lower-cased, regex split),
    mapped through GPT-2's bytes_to_unicode table and split into symbols with
    "</w>" glued to the last one.  The most frequent adjacent pair is merged
    repeatedly (ties broken lexicographically, so it is deterministic).  The
    vocabulary is then built exactly like OpenAI CLIP's: 256 byte symbols,
    the same 256 with "</w>", one entry per merge, then <|startoftext|> and
    <|endoftext|> as the two highest ids.
    """
    byte_encoder = bytes_to_unicode()
    counts: dict[tuple[str, ...], int] = {}
    for sentence in corpus:
        text = re.sub(r"\s+", " ", sentence).strip().lower()
        for tok in CLIP_PAT.findall(text):
            chars = "".join(byte_encoder[b] for b in tok.encode("utf-8"))
            word = tuple(chars[:-1]) + (chars[-1] + "</w>",)
            counts[word] = counts.get(word, 0) + 1

    base = list(byte_encoder.values())
    vocab = base + [b + "</w>" for b in base]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    banned: set[tuple[str, str]] = set()
    words = dict(counts)
    while len(merges) < num_merges:
        pairs: dict[tuple[str, str], int] = {}
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        candidates = [(n, p) for p, n in pairs.items() if n >= 2 and p not in banned]
        if not candidates:
            break
        best_n = max(n for n, _ in candidates)
        best = min(p for n, p in candidates if n == best_n)
        merged = best[0] + best[1]
        if merged in known:  # keep vocab entries one-to-one with merges, as in CLIP
            banned.add(best)
            continue
        merges.append(best)
        vocab.append(merged)
        known.add(merged)
        new_words = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges


def make_clip_tokenizer(corpus: list[str], workdir: Path) -> CLIPTokenizer:
    vocab, merges = train_clip_bpe(corpus, CLIP_NUM_MERGES)
    d = workdir / "clip_tok_src"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(
        vocab_file=str(d / "vocab.json"),
        merges_file=str(d / "merges.txt"),
        model_max_length=77,
    )
    n = len(tok)
    assert 500 <= n <= 1500, n
    assert tok.convert_tokens_to_ids("<|startoftext|>") == n - 2
    assert tok.convert_tokens_to_ids("<|endoftext|>") == n - 1
    assert tok.bos_token_id == n - 2 and tok.eos_token_id == n - 1 and tok.pad_token_id == n - 1
    return tok


def make_t5_tokenizer(corpus: list[str], workdir: Path) -> T5TokenizerFast:
    """SentencePiece unigram model with T5's special ids, wrapped as T5TokenizerFast."""
    model = io.BytesIO()
    spm.set_random_generator_seed(SEED_SPM)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_VOCAB_SIZE,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = workdir / "spiece.model"
    path.write_bytes(model.getvalue())
    # add_prefix_space=True matters: without it transformers 4.x converts with
    # Metaspace(prepend_scheme="never"), so the first word loses its "▁" and
    # the fast tokenizer disagrees with SentencePiece / the slow tokenizer.
    tok = T5TokenizerFast(vocab_file=str(path), extra_ids=0, legacy=True, add_prefix_space=True,
                          model_max_length=512)
    pre = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    assert pre["type"] == "Metaspace" and pre["prepend_scheme"] == "always", pre
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    return tok


def tokenize_like_flux(pipe_or_tokenizers, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly the tokenizer calls of FluxPipeline._get_clip/_get_t5_prompt_embeds."""
    tok, tok2 = pipe_or_tokenizers
    clip = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
    t5 = tok2(prompt, padding="max_length", max_length=V['max_seq_len'], truncation=True,
              return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
    return clip, t5


def check_tokenizer_parity(out: Path, prompts: list[str]) -> dict:
    """Slow (pure Python) vs fast (Rust `tokenizers`) give identical ids, from the saved folders."""
    clip_slow = CLIPTokenizer.from_pretrained(out / "tokenizer")
    clip_fast = CLIPTokenizerFast.from_pretrained(out / "tokenizer")  # converted from vocab.json+merges.txt
    t5_slow = T5Tokenizer(vocab_file=str(out / "tokenizer_2" / "spiece.model"), extra_ids=0, legacy=True,
                          model_max_length=512)
    t5_fast = T5TokenizerFast.from_pretrained(out / "tokenizer_2")  # from tokenizer.json
    # What a non-Python runtime sees: tokenizer.json alone, through the `tokenizers` library.
    t5_raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer_2" / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer_2" / "spiece.model"))
    for p in prompts:
        assert t5_raw.encode(p).ids == t5_fast(p).input_ids, f"tokenizer.json mismatch on {p!r}"
        assert sp.encode(p) + [1] == t5_slow(p).input_ids, f"sentencepiece mismatch on {p!r}"
        a = tokenize_like_flux((clip_slow, t5_slow), p)
        b = tokenize_like_flux((clip_fast, t5_fast), p)
        assert torch.equal(a[0], b[0]), f"CLIP slow/fast mismatch on {p!r}"
        assert torch.equal(a[1], b[1]), f"T5 slow/fast mismatch on {p!r}:\n{a[1]}\n{b[1]}"
        # unpadded, untruncated lengths too
        assert clip_slow(p).input_ids == clip_fast(p).input_ids
        assert t5_slow(p).input_ids == t5_fast(p).input_ids
    return {"prompts_checked": len(prompts)}


# ----------------------------------------------------------------------------
# Deterministic random re-initialisation
# ----------------------------------------------------------------------------

def _is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "RMSNorm" in name or "LayerNorm" in name


@torch.no_grad()
def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise EVERY parameter (default inits zero some layers, e.g. Flux's
    modulation / output projections, which would make parity tests trivial)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()

    def normal_(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)
        seen.add(id(p))

    for mname, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        if isinstance(module, torch.nn.Linear):
            normal_(module.weight, INIT["linear_gain"] / math.sqrt(module.in_features))
            if module.bias is not None:
                normal_(module.bias, INIT["bias_std"])
        elif isinstance(module, torch.nn.Conv2d):
            fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            normal_(module.weight, INIT["conv_gain"] / math.sqrt(fan_in))
            if module.bias is not None:
                normal_(module.bias, INIT["bias_std"])
        elif isinstance(module, torch.nn.Embedding):
            normal_(module.weight, INIT["embedding_std"])
        elif _is_norm(module):
            for pname, p in params.items():
                if pname == "weight":
                    normal_(p, INIT["norm_weight_std"], mean=1.0)
                elif pname == "bias":
                    normal_(p, INIT["norm_bias_std"])
                else:
                    raise AssertionError(f"unexpected norm parameter {mname}.{pname}")
        else:
            raise AssertionError(f"no init rule for {mname} ({type(module).__name__}): {list(params)}")
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    assert not missing, missing


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------

def make_clip_text_encoder(tok: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        # 2, like openai/clip-vit-large-patch14: selects the legacy pooling
        # (argmax of input_ids = first <|endoftext|>, the highest id).
        eos_token_id=2,
    )
    torch.manual_seed(SEED_CLIP)
    model = CLIPTextModel(config).eval()
    reinit_(model, SEED_CLIP)
    return model


def make_t5_encoder(tok: T5TokenizerFast) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=16,
        num_heads=2,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(SEED_T5)
    model = T5EncoderModel(config).eval()
    reinit_(model, SEED_T5)
    return model


def make_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(SEED_TRANSFORMER)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=V["guidance_embeds"],
        axes_dims_rope=(4, 14, 14),
    ).eval()
    reinit_(model, SEED_TRANSFORMER)
    return model


def make_vae() -> AutoencoderKL:
    torch.manual_seed(SEED_VAE)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        act_fn="silu",
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()
    reinit_(model, SEED_VAE)
    return model


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=V["shift"],
        use_dynamic_shifting=V["dynamic_shift"],
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


# ----------------------------------------------------------------------------
# Saving (diffusers layout, sharded like the real repo)
# ----------------------------------------------------------------------------

def two_shard_size(state_dict: dict[str, torch.Tensor]) -> int:
    """Smallest-ish max_shard_size (bytes) for which the hub splitter gives exactly 2 shards."""
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    for frac in [x / 100 for x in range(50, 100)]:
        size = int(total * frac)
        split = split_torch_state_dict_into_shards(state_dict, max_shard_size=size)
        if len(split.filename_to_tensors) == 2:
            return size
    raise AssertionError("could not find a 2-shard size")


def save_pipeline(out: Path, pipe: FluxPipeline) -> None:
    pipe.save_pretrained(out, safe_serialization=True)

    # text_encoder_2: 2 shards, like the real repo.  Tied weights: transformers
    # drops encoder.embed_tokens.weight (an alias of shared.weight) itself.
    te2 = out / "text_encoder_2"
    (te2 / "model.safetensors").unlink()
    sd = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    pipe.text_encoder_2.save_pretrained(te2, safe_serialization=True, max_shard_size=two_shard_size(sd))
    shards = sorted(p.name for p in te2.glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], shards
    assert (te2 / "model.safetensors.index.json").exists()

    tr = out / "transformer"
    (tr / "diffusion_pytorch_model.safetensors").unlink()
    pipe.transformer.save_pretrained(
        tr, safe_serialization=True, max_shard_size=two_shard_size(pipe.transformer.state_dict())
    )
    shards = sorted(p.name for p in tr.glob("*.safetensors"))
    assert shards == [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ], shards
    assert (tr / "diffusion_pytorch_model.safetensors.index.json").exists()

    # The real FLUX.1-schnell tokenizer/ folder has no tokenizer.json.
    tj = out / "tokenizer" / "tokenizer.json"
    if tj.exists():
        tj.unlink()


# ----------------------------------------------------------------------------
# Black Forest Labs single-file layout
# ----------------------------------------------------------------------------

def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_bfl_transformer(sd: dict[str, torch.Tensor], num_layers: int, num_single_layers: int) -> dict:
    """FluxTransformer2DModel state dict -> flux1-schnell.safetensors names."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def mv(src: str, dst: str) -> None:
        for suffix in (".weight", ".bias"):
            out[dst + suffix] = sd.pop(src + suffix)

    def cat(srcs: list[str], dst: str) -> None:
        for suffix in (".weight", ".bias"):
            out[dst + suffix] = torch.cat([sd.pop(s + suffix) for s in srcs], dim=0)

    mv("x_embedder", "img_in")
    mv("context_embedder", "txt_in")
    mv("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    mv("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    mv("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    mv("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        mv("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        mv("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    for i in range(num_layers):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        mv(s + "norm1.linear", d + "img_mod.lin")
        mv(s + "norm1_context.linear", d + "txt_mod.lin")
        cat([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"], d + "img_attn.qkv")
        cat([s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"], d + "txt_attn.qkv")
        out[d + "img_attn.norm.query_norm.scale"] = sd.pop(s + "attn.norm_q.weight")
        out[d + "img_attn.norm.key_norm.scale"] = sd.pop(s + "attn.norm_k.weight")
        out[d + "txt_attn.norm.query_norm.scale"] = sd.pop(s + "attn.norm_added_q.weight")
        out[d + "txt_attn.norm.key_norm.scale"] = sd.pop(s + "attn.norm_added_k.weight")
        mv(s + "attn.to_out.0", d + "img_attn.proj")
        mv(s + "attn.to_add_out", d + "txt_attn.proj")
        mv(s + "ff.net.0.proj", d + "img_mlp.0")
        mv(s + "ff.net.2", d + "img_mlp.2")
        mv(s + "ff_context.net.0.proj", d + "txt_mlp.0")
        mv(s + "ff_context.net.2", d + "txt_mlp.2")
    for i in range(num_single_layers):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        mv(s + "norm.linear", d + "modulation.lin")
        cat([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"], d + "linear1")
        out[d + "norm.query_norm.scale"] = sd.pop(s + "attn.norm_q.weight")
        out[d + "norm.key_norm.scale"] = sd.pop(s + "attn.norm_k.weight")
        mv(s + "proj_out", d + "linear2")
    # diffusers' AdaLayerNormContinuous stores [scale; shift], BFL [shift; scale]
    out["final_layer.adaLN_modulation.1.weight"] = swap_halves(sd.pop("norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = swap_halves(sd.pop("norm_out.linear.bias"))
    mv("proj_out", "final_layer.linear")
    assert not sd, f"unmapped transformer keys: {sorted(sd)}"
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_bfl_vae(sd: dict[str, torch.Tensor], num_blocks: int) -> dict:
    """AutoencoderKL state dict -> ae.safetensors (LDM) names; the inverse of
    diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint."""
    out: dict[str, torch.Tensor] = {}
    attn_names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, t in sd.items():
        k = key
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
        if m:
            part, layer, kind = m.groups()
            if layer != "group_norm" and kind == "weight":
                t = t[:, :, None, None]  # Linear [C,C] -> 1x1 Conv2d [C,C,1,1]
            out[f"{part}.mid.attn_1.{attn_names[layer]}.{kind}"] = t.contiguous()
            continue
        k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                   lambda mm: f"{mm.group(1)}.mid.block_{int(mm.group(2)) + 1}.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda mm: f"decoder.up.{num_blocks - 1 - int(mm.group(1))}.block.{mm.group(2)}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
                   lambda mm: f"decoder.up.{num_blocks - 1 - int(mm.group(1))}.upsample.conv.", k)
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
        assert re.match(
            r"^(encoder|decoder)\.(conv_in|conv_out|norm_out|mid\.block_[12]\.(norm1|norm2|conv1|conv2)"
            r"|(down|up)\.\d\.block\.\d\.(norm1|norm2|conv1|conv2|nin_shortcut)"
            r"|down\.\d\.downsample\.conv|up\.\d\.upsample\.conv)\.(weight|bias)$",
            k,
        ), f"unmapped VAE key {key} -> {k}"
        out[k] = t.contiguous()
    assert len(out) == len(sd)
    return out


def patched_flux_converter(inner_dim: int):
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers hard-codes
    inner_dim = 3072 (the real model) to split single_blocks.N.linear1; the
    same function with only that constant changed, so it runs on the tiny model."""
    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1
    src = src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}")
    namespace = dict(single_file_utils.__dict__)
    exec(compile(src, single_file_utils.__file__, "exec"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def assert_same_state_dict(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: key mismatch {sorted(set(got) ^ set(want))}"
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, (what, k)
        assert torch.equal(got[k], want[k]), f"{what}: tensor {k} differs"


def save_and_verify_bfl(out: Path, transformer: FluxTransformer2DModel, vae: AutoencoderKL) -> list[str]:
    facts = []
    cfg = transformer.config
    tsd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    bfl = diffusers_to_bfl_transformer(tsd, cfg.num_layers, cfg.num_single_layers)
    safetensors.torch.save_file(bfl, str(out / (V["file"] + ".safetensors")))
    loaded = safetensors.torch.load_file(str(out / (V["file"] + ".safetensors")))

    # The unmodified converter cannot split linear1 of a non-3072-wide model.
    try:
        single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(loaded))
        facts.append("unpatched diffusers flux converter unexpectedly accepted the tiny checkpoint")
    except RuntimeError as e:
        facts.append(f"unpatched convert_flux_transformer_checkpoint_to_diffusers fails on the tiny model "
                     f"(inner_dim hard-coded to 3072): {str(e).splitlines()[0]}")
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    conv = patched_flux_converter(inner)(dict(loaded))
    assert_same_state_dict(conv, tsd, V["file"] + ".safetensors")
    # BFL files record neither RoPE axes nor group counts; these heads and this decoder
    # are not FLUX.1's, so each single file gets its diffusers config beside it.
    shutil.copy(out / "transformer" / "config.json", out / (V["file"] + ".json"))
    facts.append(f"{V['file']}.safetensors ({len(loaded)} tensors) -> diffusers' "
                 f"convert_flux_transformer_checkpoint_to_diffusers (inner_dim={inner}) == transformer state dict, "
                 f"all {len(tsd)} tensors bit-exact")

    vsd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    ae = diffusers_to_bfl_vae(vsd, len(vae.config.block_out_channels))
    safetensors.torch.save_file(ae, str(out / "ae.safetensors"))
    shutil.copy(out / "vae" / "config.json", out / "ae.json")
    loaded = safetensors.torch.load_file(str(out / "ae.safetensors"))
    conv = single_file_utils.convert_ldm_vae_checkpoint(dict(loaded), dict(vae.config))
    assert_same_state_dict(conv, vsd, "ae.safetensors")
    facts.append(f"ae.safetensors ({len(loaded)} tensors) -> diffusers' convert_ldm_vae_checkpoint == vae state "
                 f"dict, all {len(vsd)} tensors bit-exact")
    single = AutoencoderKL.from_single_file(str(out / "ae.safetensors"), config=str(out), subfolder="vae",
                                            local_files_only=True, torch_dtype=torch.bfloat16)
    assert_same_state_dict(single.state_dict(), vsd, "AutoencoderKL.from_single_file(ae.safetensors)")
    facts.append("AutoencoderKL.from_single_file(ae.safetensors, config=<out>, subfolder='vae') loads offline "
                 "and equals the vae state dict bit-exactly")
    return facts


# ----------------------------------------------------------------------------
# Reference run
# ----------------------------------------------------------------------------

def std(t: torch.Tensor) -> float:
    return float(t.float().std())


@torch.no_grad()
def run_reference(out: Path, long_prompt: str) -> tuple[dict, dict]:
    pipe = FluxPipeline.from_pretrained(out, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer", type(pipe.tokenizer)
    assert type(pipe.tokenizer_2).__name__ == "T5TokenizerFast", type(pipe.tokenizer_2)

    ref: dict[str, torch.Tensor] = {}

    # Tokenization exactly as FluxPipeline does it.
    clip_ids, t5_ids = tokenize_like_flux((pipe.tokenizer, pipe.tokenizer_2), PROMPT)
    ref["clip_input_ids"], ref["t5_input_ids"] = clip_ids, t5_ids

    # Captures during the real __call__.
    cap: dict[str, list] = {"clip_in": [], "clip_out": [], "t5_in": [], "t5_out": [], "tr": [], "vae": []}
    # (forward hooks must return None, otherwise they replace the module output)
    def clip_hook(m, a, k, o):
        cap["clip_in"].append(a[0].clone())
        cap["clip_out"].append(o.pooler_output.clone())

    def t5_hook(m, a, k, o):
        cap["t5_in"].append(a[0].clone())
        cap["t5_out"].append(o[0].clone())

    def transformer_hook(m, a, k, o):
        cap["tr"].append(({n: v.clone() for n, v in k.items() if torch.is_tensor(v)}, o[0].clone()))

    hooks = [
        pipe.text_encoder.register_forward_hook(clip_hook, with_kwargs=True),
        pipe.text_encoder_2.register_forward_hook(t5_hook, with_kwargs=True),
        pipe.transformer.register_forward_hook(transformer_hook, with_kwargs=True),
    ]
    orig_decode = pipe.vae.decode

    def decode(z, *args, **kwargs):
        res = orig_decode(z, *args, **kwargs)
        cap["vae"].append((z.clone(), res[0].clone()))
        return res

    pipe.vae.decode = decode

    step_latents = []

    def on_step_end(p, i, t, kw):
        step_latents.append(kw["latents"].clone())
        return {}

    g = torch.Generator("cpu").manual_seed(SEED_NOISE)
    lat_h, lat_w = 2 * (HEIGHT // (pipe.vae_scale_factor * 2)), 2 * (WIDTH // (pipe.vae_scale_factor * 2))
    noise = torch.randn((1, 16, lat_h, lat_w), generator=g, dtype=torch.float32)
    packed = FluxPipeline._pack_latents(noise, 1, 16, lat_h, lat_w)

    image = pipe(
        PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=V['guidance'],
        max_sequence_length=V['max_seq_len'], latents=packed.clone(), output_type="pt",
        callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
    ).images
    for h in hooks:
        h.remove()
    pipe.vae.decode = orig_decode
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    timesteps = [float(t) for t in pipe.scheduler.timesteps]

    assert len(cap["clip_in"]) == 1 and len(cap["t5_in"]) == 1 and len(cap["tr"]) == STEPS
    assert torch.equal(cap["clip_in"][0], clip_ids) and torch.equal(cap["t5_in"][0], t5_ids)
    ref["clip_pooled"] = cap["clip_out"][0]
    # Legacy CLIP pooling (config eos_token_id == 2): the hidden state at argmax(input_ids),
    # i.e. the first <|endoftext|> (the highest id), right after the last prompt token.
    eos_pos = int((clip_ids[0] == pipe.tokenizer.eos_token_id).nonzero()[0])
    assert eos_pos == int(clip_ids[0].argmax())
    hidden = pipe.text_encoder(clip_ids).last_hidden_state
    assert torch.equal(hidden[0, eos_pos], ref["clip_pooled"][0])
    ref["t5_hidden"] = cap["t5_out"][0]
    ref["noise"] = noise
    ref["noise_packed"] = packed
    k0, out0 = cap["tr"][0]
    assert torch.equal(k0["hidden_states"], packed)
    ref["img_ids"] = k0["img_ids"].float()
    ref["txt_ids"] = k0["txt_ids"].float()
    ref["transformer_timestep_step0"] = k0["timestep"].float()
    if "guidance" in k0:  # FLUX.1-dev: the guidance scale as the transformer gets it
        ref["transformer_guidance_step0"] = k0["guidance"].float()
    ref["transformer_out_step0"] = out0
    for i, lat in enumerate(step_latents):
        ref[f"latents_step{i}"] = lat
    ref["final_latents"] = step_latents[-1].clone()
    ref["vae_decoder_input"], ref["vae_decoder_output"] = cap["vae"][0]
    ref["image"] = image.float()
    u8 = (image.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    ref["image_u8"] = torch.from_numpy(u8)

    # Cross-check the uint8 image against diffusers' own PIL path.
    pil = pipe(
        PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=V['guidance'],
        max_sequence_length=V['max_seq_len'], latents=packed.clone(), output_type="pil",
    ).images[0]
    assert np.array_equal(np.asarray(pil), u8[0]), "PIL path differs from round(x*255)"

    # Long prompt: truncation.
    l_clip, l_t5 = tokenize_like_flux((pipe.tokenizer, pipe.tokenizer_2), long_prompt)
    n_clip_full = len(pipe.tokenizer(long_prompt).input_ids)
    n_t5_full = len(pipe.tokenizer_2(long_prompt).input_ids)
    assert n_clip_full > 100 and n_t5_full > 300, (n_clip_full, n_t5_full)
    eos_clip, eos_t5 = pipe.tokenizer.eos_token_id, pipe.tokenizer_2.eos_token_id
    assert l_clip[0, -1] == eos_clip and l_clip[0, 0] == pipe.tokenizer.bos_token_id
    assert l_t5[0, -1] == eos_t5 and (l_t5[0, :-1] != eos_t5).all()
    t5_hidden_l, pooled_l, _ = pipe.encode_prompt(long_prompt, long_prompt, max_sequence_length=V['max_seq_len'])
    ref["long_clip_input_ids"], ref["long_t5_input_ids"] = l_clip, l_t5
    ref["long_clip_pooled"], ref["long_t5_hidden"] = pooled_l, t5_hidden_l

    p_clip, p_t5 = tokenize_like_flux((pipe.tokenizer, pipe.tokenizer_2), PUNCT_PROMPT)
    ref["punct_clip_input_ids"], ref["punct_t5_input_ids"] = p_clip, p_t5

    # Also the prompt's encode_prompt must agree with what the __call__ saw.
    t5h, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=V['max_seq_len'])
    assert torch.equal(t5h, ref["t5_hidden"]) and torch.equal(pooled, ref["clip_pooled"])

    # The encoder (image edits): a smooth random image in [-1, 1] (low-resolution noise,
    # upscaled), its posterior mean and the latents FLUX pipelines normalise from it.
    g = torch.Generator("cpu").manual_seed(SEED_ENCODE)
    coarse = torch.rand((1, 3, HEIGHT // 16, WIDTH // 16), generator=g) * 2 - 1
    picture = torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    mean = pipe.vae.encode(picture).latent_dist.mean
    ref["encode_image"], ref["encode_mean"] = picture, mean
    ref["encode_latents"] = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor

    ref = {k: v.contiguous() for k, v in ref.items()}

    # Non-triviality.
    assert std(ref["transformer_out_step0"]) > 0.05
    assert std(ref["t5_hidden"]) > 0.05 and std(ref["clip_pooled"]) > 0.05
    assert std(ref["long_t5_hidden"]) > 0.05 and std(ref["long_clip_pooled"]) > 0.05
    img = ref["image"]
    clipped = float(((img <= 0.0) | (img >= 1.0)).float().mean())
    assert std(img) > 0.02, std(img)
    assert clipped < 0.5, clipped
    assert not torch.equal(ref["final_latents"], ref["noise_packed"])

    meta = {
        "prompt": PROMPT,
        "long_prompt": long_prompt,
        "punct_prompt": PUNCT_PROMPT,
        "width": WIDTH,
        "height": HEIGHT,
        "num_inference_steps": STEPS,
        "guidance_scale": V["guidance"],
        "max_sequence_length": V["max_seq_len"],
        "batch_size": 1,
        "latent_shape_unpacked": list(noise.shape),
        "latent_shape_packed": list(packed.shape),
        "noise": f"torch.randn((1,16,{lat_h},{lat_w}), generator=torch.Generator('cpu').manual_seed({SEED_NOISE}), "
                 "dtype=float32), packed with FluxPipeline._pack_latents and passed as latents=",
        "scheduler_sigmas": sigmas,
        "scheduler_timesteps": timesteps,
        "long_prompt_untruncated_lengths": {"clip": n_clip_full, "t5": n_t5_full},
        "image_clipped_fraction": clipped,
        "seeds": {
            "corpus": SEED_CORPUS, "sentencepiece": SEED_SPM, "clip_text_encoder": SEED_CLIP,
            "t5_encoder": SEED_T5, "transformer": SEED_TRANSFORMER, "vae": SEED_VAE, "noise": SEED_NOISE,
            "long_prompt": SEED_LONG_PROMPT,
        },
        "init": INIT,
        "versions": versions(),
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                        **({"std": round(std(v), 6)} if v.is_floating_point() and v.numel() > 1 else {})}
                    for k, v in sorted(ref.items())},
    }
    return ref, meta


def versions() -> dict:
    import google.protobuf
    return {
        "python": ".".join(map(str, __import__("sys").version_info[:3])),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "sentencepiece": spm.__version__,
        "numpy": np.__version__,
        "protobuf": google.protobuf.__version__,
    }


# ----------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------

def write_readme(out: Path, meta: dict, facts: list[str], pipe_info: dict) -> None:
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "README.md")
    sizes = {f: (out / f).stat().st_size for f in files}
    v = meta["versions"]
    tensor_lines = "\n".join(
        f"| `{k}` | {t['dtype']} | {t['shape']} | {t.get('std', '')} |" for k, t in meta["tensors"].items()
    )
    file_lines = "\n".join(f"| `{f}` | {sizes[f]:,} |" for f in files)
    variant = V["file"].removeprefix("flux1-")
    guidance_note = ("has `guidance_in.{in,out}_layer` (diffusers' `time_text_embed.guidance_embedder`)"
                     if V["guidance_embeds"] else "has no `guidance_in.*` (schnell)")
    text = f"""# tiny-flux-{variant} test fixture

A tiny, randomly initialised {V['name']} pipeline in the real file formats,
plus reference outputs from diffusers' `FluxPipeline` (CPU, float32).
Generated — do not edit by hand. Regenerate with:

```sh
bash tools/setup-venv.sh                      # venv at ${{PICTOR_TOOLS_VENV:-$HOME/.cache/pictor/venv-tools}}
~/.cache/pictor/venv-tools/bin/python tools/make_tiny_flux.py --variant {variant} --out tests/data/tiny-flux-{variant}
```

The script is deterministic (fixed seeds, 1 CPU thread): re-running it gives
byte-identical files with the versions below.

Library versions: python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']},
transformers {v['transformers']}, tokenizers {v['tokenizers']}, safetensors {v['safetensors']},
sentencepiece {v['sentencepiece']}, numpy {v['numpy']}, protobuf {v['protobuf']}.

## Layout (same as black-forest-labs/{V['name']})

| path | what |
| --- | --- |
| `model_index.json` | written by `FluxPipeline.save_pretrained` |
| `scheduler/scheduler_config.json` | `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift={V['shift']}, use_dynamic_shifting={V['dynamic_shift']}, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)` |
| `tokenizer/` | CLIP byte-level BPE: `vocab.json`, `merges.txt`, `special_tokens_map.json`, `tokenizer_config.json` as `CLIPTokenizer.save_pretrained` writes them; **no `tokenizer.json`** (like the real repo). {pipe_info['clip_vocab']} entries = 256 bytes + 256 bytes+`</w>` + {pipe_info['clip_merges']} merges + `<\\|startoftext\\|>` ({pipe_info['clip_bos']}) + `<\\|endoftext\\|>` ({pipe_info['clip_eos']}, also pad/unk), the two highest ids as in real CLIP. model_max_length 77. |
| `tokenizer_2/` | T5: SentencePiece unigram `spiece.model` (vocab {pipe_info['t5_vocab']}, pad=0, eos=1, unk=2, no bos, no extra_ids) + `tokenizer.json`, `special_tokens_map.json`, `tokenizer_config.json` from `T5TokenizerFast.save_pretrained` (legacy=True, model_max_length 512). |
| `text_encoder/` | transformers `CLIPTextModel`: `config.json` + `model.safetensors`. hidden 32, intermediate 64, 2 layers, 2 heads, max_position_embeddings 77, quick_gelu, vocab {pipe_info['clip_vocab']}, `eos_token_id` = 2 (legacy argmax pooling like openai/clip-vit-large-patch14). |
| `text_encoder_2/` | transformers `T5EncoderModel`, 2 shards + `model.safetensors.index.json`. d_model 32, d_kv 16, 2 heads, d_ff 64, 2 layers, gated-gelu (`dense_act_fn` gelu_new), 32 buckets, max distance 128, eps 1e-6, vocab {pipe_info['t5_vocab']}. Embedding keys in the files: {pipe_info['t5_embed_keys']} (transformers drops the tied alias `encoder.embed_tokens.weight` when saving). |
| `transformer/` | diffusers `FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds={V['guidance_embeds']}, axes_dims_rope=(4,14,14))`, 2 shards + `diffusion_pytorch_model.safetensors.index.json`. |
| `vae/` | diffusers `AutoencoderKL` (4 blocks, block_out_channels (32,32,64,64), layers_per_block 1, 16 latent channels, 32 groups, scaling_factor 0.3611, shift_factor 0.1159, no quant convs, mid-block attention), single `diffusion_pytorch_model.safetensors`. |
| `{V['file']}.safetensors` | the same transformer in Black Forest Labs names (`img_in`, `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `final_layer.adaLN_modulation.1` with [shift; scale], ...). |
| `{V['file']}.json`, `ae.json` | copies of `transformer/config.json` and `vae/config.json` beside the single files: BFL files record neither RoPE axes nor group counts, and these are not FLUX.1's, so a loader must be told. |
| `ae.safetensors` | the same VAE in BFL/LDM names (`encoder.down.i.block.j`, `decoder.up.(3-k)`, `mid.attn_1.{{q,k,v,proj_out}}` as 1x1 conv weights [C,C,1,1], ...). |
| `reference.safetensors` | reference tensors (below). |
| `reference.json` | prompts, size, steps, scheduler sigmas/timesteps actually used, seeds, versions, tensor shapes and stds. |

All weights are stored in bfloat16 (as the real FLUX.1 files are) and computed in float32. Every parameter is re-initialised at random
(weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05²), norm scales ~ 1 + N(0, 0.1²),
norm biases ~ N(0, 0.05²), embeddings ~ N(0, 0.5²)) so nothing is trivially
zero (diffusers' default init zeroes e.g. Flux's output projection).

Tokenizers were trained on a built-in procedurally generated corpus of
English captions; the slow (Python) and fast (`tokenizers`) implementations
were checked to give identical ids on all reference prompts.

## Notes for loaders

- `{V['file']}.safetensors` {guidance_note}. Inner dim is 64 and the MLP hidden dim 256, so
  `single_blocks.N.linear1` has 3*64+256 = 448 rows: infer the split from shapes; diffusers' own converter
  hard-codes the real model's 3072 and cannot read this file unpatched (see below).
- `final_layer.adaLN_modulation.1` is [shift; scale] (BFL) while diffusers' `norm_out.linear` is [scale; shift].
- `ae.safetensors` has no `quant_conv`/`post_quant_conv` (like the real FLUX `ae.safetensors`); its mid-block
  attention q/k/v/proj_out weights are 4-D [C,C,1,1].
- T5 uses gated GELU with the tanh approximation (`dense_act_fn: gelu_new`).
- `tokenizer_2/tokenizer.json`: Unigram model; normalizer = Precompiled(charsmap) + Strip(right) +
  Replace(" {{2,}}" -> "▁"); pre-tokenizer Metaspace(prepend_scheme "always"); post-processor appends `</s>` (1).
- CLIP: pad = eos = `<|endoftext|>` (highest id); `eos_token_id` 2 in the text-encoder config means the
  pooled output is taken at argmax(input_ids), the first `<|endoftext|>`.
- transformers 4.57 writes `"dtype"` (not `"torch_dtype"`) into `config.json`.

## Verified when generated

{chr(10).join('- ' + f for f in facts)}

## Reference run

`FluxPipeline.from_pretrained(<this dir>)` (so from the saved files), prompt
`{meta['prompt']}`, width {meta['width']}, height {meta['height']},
{meta['num_inference_steps']} steps, guidance_scale {meta['guidance_scale']},
max_sequence_length {meta['max_sequence_length']}, batch 1, initial noise =
{meta['noise']}. Sigmas used: {meta['scheduler_sigmas']}; timesteps {meta['scheduler_timesteps']}.

| tensor | dtype | shape | std |
| --- | --- | --- | --- |
{tensor_lines}

- `clip_input_ids`/`t5_input_ids`: as `FluxPipeline.encode_prompt` tokenizes (padding="max_length", truncation=True; 77 and 256).
- `clip_pooled`: CLIPTextModel `pooler_output`; `t5_hidden`: T5 `last_hidden_state` (no attention mask, as FluxPipeline calls it).
- `noise`: unpacked [B,16,2*(H//16),2*(W//16)]; `noise_packed` = `_pack_latents(noise)`, what the transformer sees at step 0.
- `img_ids`, `txt_ids`, `transformer_timestep_step0` (= t/1000): the other transformer inputs at step 0.
- `transformer_out_step0`: transformer output (packed) at step 0, from a forward hook inside `__call__`.
- `latents_stepI`: packed latents after step I (`callback_on_step_end`); `final_latents` = the last one.
- `vae_decoder_input`: unpacked latents / scaling_factor + shift_factor; `vae_decoder_output`: raw `vae.decode` output (before postprocess).
- `image`: postprocessed image in [0,1], NCHW, not rounded; `image_u8`: NHWC `round(image*255)`, checked equal to the pipeline's PIL output.
- `long_*`: a {meta['long_prompt_untruncated_lengths']['t5']}-T5-token / {meta['long_prompt_untruncated_lengths']['clip']}-CLIP-token prompt (in `reference.json`) for truncation (CLIP ends with EOS at 76, T5 with EOS at 255).
- `punct_*`: ids for `{meta['punct_prompt']!r}` (capitals, punctuation, extra whitespace).

## Files

| file | bytes |
| --- | --- |
{file_lines}
"""
    (out / "README.md").write_text(text)


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

def prepare_out(out: Path) -> None:
    if out.exists():
        entries = list(out.iterdir())
        if entries and not (out / "model_index.json").exists():
            raise SystemExit(f"{out} exists, is not empty and does not look like a previous fixture; refusing")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="schnell")
    args = ap.parse_args()
    global V
    V = VARIANTS[args.variant]
    out: Path = args.out
    prepare_out(out)

    corpus = build_corpus()
    long_prompt = build_long_prompt()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = make_clip_tokenizer(corpus, tmp)
        tokenizer_2 = make_t5_tokenizer(corpus, tmp)
        text_encoder = make_clip_text_encoder(tokenizer)
        text_encoder_2 = make_t5_encoder(tokenizer_2)
        transformer = make_transformer()
        vae = make_vae()
        pipe = FluxPipeline(
            scheduler=make_scheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
        # Store weights in bf16, as the real FLUX.1 files are: half the bytes, and the load
        # path widens them exactly. The references below are computed in f32 from the files.
        for model in (text_encoder, text_encoder_2, transformer, vae):
            model.to(torch.bfloat16)
        save_pipeline(out, pipe)

    prompts = [PROMPT, PUNCT_PROMPT, long_prompt] + corpus[:50]
    check_tokenizer_parity(out, prompts)
    facts = [f"on {len(prompts)} prompts (the 3 reference prompts + 50 corpus sentences), padded/truncated as "
             "FluxPipeline does and unpadded: slow CLIPTokenizer == CLIPTokenizerFast (converted from "
             "vocab.json+merges.txt); sentencepiece(spiece.model)+EOS == slow T5Tokenizer == T5TokenizerFast == "
             "tokenizer_2/tokenizer.json loaded alone with the `tokenizers` library",
             "CLIP pooler_output == last_hidden_state at argmax(input_ids) == the first <|endoftext|> position"]
    facts += save_and_verify_bfl(out, transformer, vae)

    te2_index = json.loads((out / "text_encoder_2" / "model.safetensors.index.json").read_text())
    embed_keys = sorted(k for k in te2_index["weight_map"] if "shared" in k or "embed_tokens" in k)
    assert embed_keys == ["shared.weight"], embed_keys

    ref, meta = run_reference(out, long_prompt)
    safetensors.torch.save_file(ref, str(out / "reference.safetensors"))
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    facts.append("the pipeline reloaded from these files reproduces the captured text-encoder inputs/outputs; "
                 "image_u8 == np.asarray(output_type='pil' image)")

    pipe_info = {
        "clip_vocab": len(tokenizer), "clip_merges": len(tokenizer.bpe_ranks),
        "clip_bos": tokenizer.bos_token_id, "clip_eos": tokenizer.eos_token_id,
        "t5_vocab": len(tokenizer_2), "t5_embed_keys": ", ".join(embed_keys),
    }
    write_readme(out, meta, facts, pipe_info)

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    for f in facts:
        print(" -", f)
    for k, t in meta["tensors"].items():
        print(f"   {k:28s} {t['dtype']:8s} {str(t['shape']):16s} {t.get('std', '')}")


if __name__ == "__main__":
    main()
