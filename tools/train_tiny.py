#!/usr/bin/env python3
"""Train `pictor-tiny`: a small model with the real FLUX.1-schnell architecture that draws
simple procedural scenes (tools/scenes.py), on CPU.

Stages (run in this order by --stage all; each one resumes where it stopped):

1. data   render the training scenes (images, foreground masks, 2 captions each) and
          train the two tokenizers (CLIP byte-level BPE, T5 SentencePiece) on the captions.
2. ae     AutoencoderKL (FLUX-like: 4 levels, 16 latent channels, GroupNorm(32)),
          L1+MSE (foreground-weighted) + small KL; 64x64 crops, then full 128x128.
3. encode encode every training image with the EMA autoencoder (posterior mean + logvar),
          measure shift_factor / scaling_factor on the posterior means.
4. flux   FluxTransformer2DModel + CLIPTextModel + T5EncoderModel trained jointly with
          rectified flow: x_t = (1-t) x0 + t eps, target v = eps - x0, timestep input t
          (diffusers' FluxPipeline passes sigma = t/1000), t ~ 75 % logit-normal(0,1),
          25 % uniform.  AdamW, warm-up + cosine, grad clip, EMA, bf16 autocast.
5. tune   continue the transformer and text encoders with a foreground-weighted loss, half
          the timesteps at the 4 sigmas inference uses, one-shape scenes and a T5 probe
          that must name each shape's cell and kind (see flux_phase).
6. decoder (only with --stage decoder) fine-tune the autoencoder's decoder alone, the encoder
          frozen (so the latents, their scale and shift and the transformer all stay valid),
          with the outermost pixels weighted up: the first decoder drew a faint frame a few
          pixels inside the border of solid backgrounds (see stage_decoder).  With
          --from-model it writes the tuned autoencoder back into that folder's vae/.
7. polish (only with --stage polish) the tune recipe again from the tune phase's weights,
          with a fresh cosine (--polish-steps, --polish-lr), for shape identity.  With
          --polish-round N it runs N rounds, each from the previous round's weights with a
          fresh optimiser and cosine; --polish-steps/--polish-lr take one value per round.  With
          --from-model models/pictor-tiny it starts from the shipped weights instead, on a
          machine without this directory (see adopt()).

All state lives in ${PICTOR_TRAIN_DIR:-$HOME/.cache/pictor/train-tiny}: checkpoints are
written atomically every --ckpt-minutes and when the time box (--minutes) ends; running the
same command again resumes from them.  Every random draw is a function of (seed, stage, step),
so a resumed run follows the same trajectory as an uninterrupted one.

    python tools/train_tiny.py --stage all --threads 1 --minutes 150
    python tools/export_tiny.py      # -> models/pictor-tiny
    python tools/eval_tiny.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import make_tiny_flux  # noqa: E402,F401  (sets 1 thread on import; setup_torch() overrides)
import scenes  # noqa: E402

# ----------------------------------------------------------------------------
# Fixed design (export_tiny.py / eval_tiny.py import these)
# ----------------------------------------------------------------------------

CLIP_LEN = 40  # CLIP max_position_embeddings == tokenizer model_max_length
T5_LEN = 40  # tokenizer_2 model_max_length == max_sequence_length used in training
CLIP_NUM_MERGES = 700
T5_VOCAB = 600
N_TOK_CORPUS = 6000  # scenes used to train the tokenizers

CLIP_CFG = dict(hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CLIP_LEN, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, attention_dropout=0.0)
T5_CFG = dict(d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=3, num_decoder_layers=3,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.0,
              tie_word_embeddings=False, is_encoder_decoder=True, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)
FLUX_CFG = dict(patch_size=1, in_channels=64, num_layers=3, num_single_layers=6, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
                guidance_embeds=False, axes_dims_rope=(8, 12, 12))
VAE_CFG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
               layers_per_block=1, latent_channels=16, norm_num_groups=32, act_fn="silu",
               sample_size=128, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False,
               use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=False)

DEFAULTS = dict(
    n_train=30000,
    ae_steps=3600, ae_lr=1e-3, ae_crop_frac=0.75, ae_crop=64, ae_bs_crop=16, ae_bs_full=8,
    ae_kl=1e-4, ae_fg_weight=4.0, ae_ema=0.999,
    flux_steps=10000, flux_stop=6022, flux_lr=1e-3, flux_bs=32, flux_ema=0.999, flux_min_lr_frac=0.05,
    tune_steps=8000, tune_lr=5e-4, tune_fg_weight=24.0, tune_discrete_frac=0.5, tune_single=1, tune_aux=0.1,
    # per polish round, comma-separated (the last value repeats)
    polish_steps="4400", polish_lr="2e-4",
    dec_steps=1500, dec_lr=2e-4, dec_bs=8, dec_border=6, dec_border_weight=4.0, dec_ema=0.998,
    warmup=100,
)


def per_round(values: str, rnd: int) -> float:
    """The value for polish round `rnd` (1-based) from a comma-separated list."""
    vals = [float(v) for v in values.split(",")]
    return vals[min(rnd, len(vals)) - 1]


def polish_phase(rnd: int) -> str:
    """The phase (and checkpoint) name of polish round `rnd`: "polish", "polish2", ..."""
    return "polish" if rnd == 1 else f"polish{rnd}"


def train_dir() -> Path:
    return Path(os.environ.get("PICTOR_TRAIN_DIR", Path.home() / ".cache" / "pictor" / "train-tiny"))


def setup_torch(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (make_tiny_flux does it on import)
        pass
    torch.set_flush_denormal(True)


def _quiet():
    import diffusers
    import transformers
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


class Log:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, *msg) -> None:
        line = time.strftime("%Y-%m-%d %H:%M:%S ") + " ".join(str(m) for m in msg)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    if path.exists():
        os.replace(path, path.with_suffix(path.suffix + ".prev"))
    os.replace(tmp, path)


def load_ckpt(path: Path):
    for p in (path, path.with_suffix(path.suffix + ".prev")):
        if p.exists():
            try:
                return torch.load(p, map_location="cpu", weights_only=False)
            except Exception as e:  # a torn file: fall back to the previous one
                print(f"could not read {p}: {e}", flush=True)
    return None


def lr_at(step: int, total: int, base: float, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def ema_update(ema: dict, model: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        else:
            ema[k].copy_(v)


def batch_indices(seed: int, stage: int, step: int, bs: int, n: int, cache: dict) -> np.ndarray:
    pos = step * bs + np.arange(bs)
    epochs, within = pos // n, pos % n
    out = np.empty(bs, np.int64)
    for e in np.unique(epochs):
        key = (stage, int(e))
        if key not in cache:
            cache.clear()
            cache[key] = np.random.default_rng([seed, stage, 1000 + int(e)]).permutation(n)
        sel = epochs == e
        out[sel] = cache[key][within[sel]]
    return out


def step_gen(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stage * 10_000_019 + step)


# ----------------------------------------------------------------------------
# Tokenizers and models
# ----------------------------------------------------------------------------

def tokenizer_corpus(seed: int) -> list[str]:
    import make_tiny_flux
    caps = []
    for i in range(N_TOK_CORPUS):
        caps += [scenes.caption_at(seed, i, v) for v in range(2)]
    for c, s in scenes.HELD_OUT + scenes.SEEN_PAIRS:  # canonical eval phrasings
        for cell in scenes.POSITIONS:
            caps.append(scenes.caption(scenes.eval_scene(c, s, "small", cell, "white"), canonical=True))
    # Every caption word also as a sentence of its own: without these, SentencePiece's unigram
    # seeding on such a repetitive corpus never proposes whole words ("small" -> "sm" "all").
    import re
    words = sorted({w for c in caps for w in re.findall(r"[A-Za-z]+|[^\sA-Za-z]", c)})
    return caps + make_tiny_flux.build_corpus() + [w for w in words for _ in range(3)]


def build_tokenizers(out: Path, seed: int, log) -> None:
    """tokenizer/ (CLIP BPE vocab.json+merges.txt) and tokenizer_2/ (T5 SentencePiece)."""
    import io
    import sentencepiece as spm
    from transformers import CLIPTokenizer, T5TokenizerFast

    import make_tiny_flux
    corpus = tokenizer_corpus(seed)
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    vocab, merges = make_tiny_flux.train_clip_bpe(corpus, CLIP_NUM_MERGES)
    (src / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(vocab_file=str(src / "vocab.json"), merges_file=str(src / "merges.txt"),
                        model_max_length=CLIP_LEN)
    n = len(tok)
    assert tok.eos_token_id == n - 1 and tok.pad_token_id == n - 1 and tok.bos_token_id == n - 2
    tok.save_pretrained(out / "tokenizer")
    tj = out / "tokenizer" / "tokenizer.json"
    if tj.exists():
        tj.unlink()

    model = io.BytesIO()
    spm.set_random_generator_seed(seed + 1234)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="unigram", vocab_size=T5_VOCAB,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
        hard_vocab_limit=False)
    (src / "spiece.model").write_bytes(model.getvalue())
    tok2 = T5TokenizerFast(vocab_file=str(src / "spiece.model"), extra_ids=0, legacy=True,
                           add_prefix_space=True, model_max_length=T5_LEN)
    assert tok2.pad_token_id == 0 and tok2.eos_token_id == 1
    tok2.save_pretrained(out / "tokenizer_2")
    lens_c = [len(tok(c).input_ids) for c in corpus[:2 * N_TOK_CORPUS]]
    lens_t = [len(tok2(c).input_ids) for c in corpus[:2 * N_TOK_CORPUS]]
    log(f"tokenizers: CLIP vocab {n}, T5 vocab {len(tok2)}; caption tokens CLIP max {max(lens_c)} "
        f"mean {np.mean(lens_c):.1f}, T5 max {max(lens_t)} mean {np.mean(lens_t):.1f}")
    assert max(lens_c) <= CLIP_LEN and max(lens_t) <= T5_LEN, "captions would be truncated"


def load_tokenizers(tok_dir: Path, fast: bool = False):
    from transformers import CLIPTokenizer, CLIPTokenizerFast, T5TokenizerFast
    cls = CLIPTokenizerFast if fast else CLIPTokenizer
    return cls.from_pretrained(tok_dir / "tokenizer"), T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_2")


def tokenize(tok, tok2, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly FluxPipeline's tokenizer calls (CLIP: model_max_length; T5: max_sequence_length=T5_LEN)."""
    a = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
    b = tok2(prompts, padding="max_length", max_length=T5_LEN, truncation=True, return_length=False,
             return_overflowing_tokens=False, return_tensors="pt").input_ids
    return a, b


def make_models(tok, tok2, seed: int):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                        pad_token_id=tok.pad_token_id, eos_token_id=2, **CLIP_CFG))
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), **T5_CFG))
    torch.manual_seed(seed + 3)
    tr = FluxTransformer2DModel(**FLUX_CFG)
    return clip, t5, tr


def make_vae(seed: int):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed + 4)
    return AutoencoderKL(**VAE_CFG)


def nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------
# Stage: data
# ----------------------------------------------------------------------------

def stage_data(d: Path, a, log) -> None:
    data = d / "data"
    done = data / "done.json"
    if done.exists() and json.loads(done.read_text()) == {"n": a.n_train, "seed": a.seed}:
        return
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok_dir = d / "tokenizers"
    if (tok_dir / "tokenizer_2" / "spiece.model").exists():
        log(f"data: keeping the tokenizers in {tok_dir}")
    else:
        build_tokenizers(tok_dir, a.seed, log)
    n = a.n_train
    imgs = np.lib.format.open_memmap(data / "images.npy", "w+", np.uint8, (n, scenes.SIZE, scenes.SIZE, 3))
    masks = np.lib.format.open_memmap(data / "masks.npy", "w+", np.uint8, (n, scenes.SIZE, scenes.SIZE))
    caps, sc = [], []
    chunk = 2000
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        im, cp, scs, mk = scenes.make_dataset(k, a.seed, start=s, variants=2, with_mask=True)
        imgs[s:s + k], masks[s:s + k] = im, mk
        caps += cp
        sc += scs
    imgs.flush()
    masks.flush()
    del imgs, masks
    (data / "captions.json").write_text(json.dumps(caps))
    (data / "scenes.json").write_text(json.dumps(sc))
    tok, tok2 = load_tokenizers(tok_dir, fast=True)
    slow, _ = load_tokenizers(tok_dir, fast=False)
    flat = [c for cs in caps for c in cs]
    ca, ta = tokenize(tok, tok2, flat)
    cs_, _ = tokenize(slow, tok2, flat[:500])
    assert torch.equal(cs_, ca[:500]), "CLIP slow/fast tokenizers disagree"
    assert int((ca == tok.eos_token_id).any(1).float().min()) == 1 and int((ta == 1).any(1).float().min()) == 1
    np.save(data / "clip_ids.npy", ca.view(n, 2, CLIP_LEN).numpy().astype(np.int32))
    np.save(data / "t5_ids.npy", ta.view(n, 2, T5_LEN).numpy().astype(np.int32))
    done.write_text(json.dumps({"n": a.n_train, "seed": a.seed}))
    log(f"data: rendered {n} scenes + tokenized {len(flat)} captions in {time.time() - t0:.0f}s")


# ----------------------------------------------------------------------------
# Stage: autoencoder
# ----------------------------------------------------------------------------

def to_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def ae_loss(vae, x, m, g, a):
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
    rec = vae.decode(z).sample.float()
    dlt = rec - x
    w = 1.0 + a.ae_fg_weight * m
    l_rec = (w * (dlt.abs() + dlt.square())).mean() / w.mean()
    kl = 0.5 * (post.mean.float().square() + post.var.float() - 1.0 - post.logvar.float()).mean()
    return l_rec + a.ae_kl * kl, dlt.detach().square().mean().item(), kl.item()


def stage_ae(d: Path, a, log, deadline: float) -> bool:
    ck = d / "ckpt" / "ae.pt"
    ck.parent.mkdir(parents=True, exist_ok=True)
    vae = make_vae(a.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.ae_lr, betas=(0.9, 0.99), weight_decay=0.01)
    state = load_ckpt(ck)
    # A finished stage (also one adopted from an exported model, which has no optimizer
    # state) returns before loading anything.
    if state is not None and state["step"] >= a.ae_steps:
        return True
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        step, spent = state["step"], state["seconds"]
    else:
        ema = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        step, spent = 0, 0.0
    log(f"ae: {nparams(vae):,} params; resuming at step {step}/{a.ae_steps} ({spent / 60:.1f} min so far)")
    imgs = np.load(d / "data" / "images.npy", mmap_mode="r")
    masks = np.load(d / "data" / "masks.npy", mmap_mode="r")
    n = imgs.shape[0] - 1000  # last 1000 scenes: validation
    perm_cache: dict = {}
    vae.train()
    lossf = open(d / "loss_ae.tsv", "a")
    last_ck = time.time()
    t_acc, run = time.time(), []
    n_crop = int(a.ae_crop_frac * a.ae_steps)
    while step < a.ae_steps:
        t_step = time.time()
        g = step_gen(a.seed, 1, step)
        crop = step < n_crop
        bs = a.ae_bs_crop if crop else a.ae_bs_full
        idx = np.sort(batch_indices(a.seed, 1 if crop else 2, step if crop else step - n_crop, bs, n, perm_cache))
        x, m = to_float(imgs[idx]), torch.from_numpy(masks[idx]).float().div(255.0)[:, None]
        if crop:
            c = a.ae_crop
            offs = torch.randint(0, scenes.SIZE - c + 1, (bs, 2), generator=g)
            x = torch.stack([x[i, :, oy:oy + c, ox:ox + c] for i, (oy, ox) in enumerate(offs.tolist())])
            m = torch.stack([m[i, :, oy:oy + c, ox:ox + c] for i, (oy, ox) in enumerate(offs.tolist())])
        lr = lr_at(step, a.ae_steps, a.ae_lr, a.warmup, 0.1)
        for pg in opt.param_groups:
            pg["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss, mse, kl = ae_loss(vae, x, m, g, a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema_update(ema, vae, a.ae_ema, step)
        step += 1
        spent += time.time() - t_step
        run.append((loss.item(), mse, kl))
        if step % 50 == 0 or step == a.ae_steps:
            r = np.mean(run, 0)
            psnr = 10 * math.log10(4.0 / max(r[1], 1e-12))
            lossf.write(f"{step}\t{spent:.0f}\t{r[0]:.5f}\t{r[1]:.5f}\t{r[2]:.4f}\t{lr:.2e}\t{'crop' if crop else 'full'}\n")
            lossf.flush()
            log(f"ae step {step}/{a.ae_steps} loss {r[0]:.4f} mse {r[1]:.4f} (psnr {psnr:.1f}) kl {r[2]:.2f} "
                f"lr {lr:.1e} {(time.time() - t_acc) / len(run):.2f}s/step")
            run, t_acc = [], time.time()
        stop = time.time() >= deadline
        if stop or step == a.ae_steps or time.time() - last_ck > a.ckpt_minutes * 60:
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step,
                         "seconds": spent, "args": vars(a)}, ck)
            last_ck = time.time()
            if stop and step < a.ae_steps:
                log(f"ae: time box reached at step {step}; checkpoint saved")
                return False
    # validation PSNR of the EMA weights
    vae.load_state_dict(ema)
    vae.eval()
    psnr = ae_val_psnr(vae, imgs[n:n + 256])
    log(f"ae: done, {step} steps, {spent / 60:.1f} min; EMA validation PSNR {psnr:.2f} dB (256 full images)")
    (d / "ae_val.json").write_text(json.dumps({"psnr_db": psnr, "steps": step, "minutes": spent / 60}))
    return True


@torch.no_grad()
def ae_val_psnr(vae, imgs: np.ndarray) -> float:
    se, cnt = 0.0, 0
    for s in range(0, len(imgs), 32):
        x = to_float(imgs[s:s + 32])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        se += float((rec - x).square().sum())
        cnt += x.numel()
    return 10 * math.log10(4.0 / (se / cnt))


def border_band(size: int, width: int) -> torch.Tensor:
    """1 on the outermost `width` pixels of a size x size image, 0 inside."""
    band = torch.ones(1, 1, size, size)
    band[..., width:size - width, width:size - width] = 0.0
    return band


@torch.no_grad()
def frame_offset(vae, imgs: np.ndarray) -> float:
    """Mean over images of the worst side's |edge band (2 px) - median just inside (4..12 px)|
    of the posterior-mean reconstruction, in 0..255 levels (tools/eval_tiny.py's frame)."""
    import eval_tiny
    x = to_float(imgs)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    rec = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return float(np.mean([eval_tiny.frame_offset(im) for im in rec]))


def stage_decoder(d: Path, a, log, deadline: float) -> bool:
    """The autoencoder's decoder alone, fine-tuned on full images from posterior samples of
    the frozen encoder.  The loss is stage_ae's (L1 + MSE, foreground weighted) with the
    outermost --dec-border pixels weighted up as well: stage_ae trained mostly on 64x64
    crops with the background weighted down, and the decoder it made painted solid
    backgrounds 5-7 levels lighter or darker along the image's edges.  (A further term on
    each outer line's mean error, weighted 50, was tried and did worse: frame 4.0 against
    3.9, PSNR 26.7 against 27.2 dB.)"""
    ck = d / "ckpt" / "decoder.pt"
    vae = load_ema_vae(d, a.seed)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.dec_lr, betas=(0.9, 0.99), weight_decay=0.0)
    state = load_ckpt(ck)
    imgs = np.load(d / "data" / "images.npy", mmap_mode="r")
    masks = np.load(d / "data" / "masks.npy", mmap_mode="r")
    n = imgs.shape[0] - 1000
    val = np.array(imgs[n:n + 256])
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema, step, spent = state["ema"], state["step"], state["seconds"]
    else:
        vae.eval()
        log(f"decoder: before tuning, validation PSNR {ae_val_psnr(vae, val):.2f} dB, "
            f"frame {frame_offset(vae, val[:128]):.2f} levels")
        ema = {k: v.detach().clone() for k, v in vae.decoder.state_dict().items()}
        step, spent = 0, 0.0
    band = border_band(scenes.SIZE, a.dec_border)
    vae.decoder.train()
    perm_cache: dict = {}
    last_ck, t_acc, run = time.time(), time.time(), []
    while step < a.dec_steps:
        t_step = time.time()
        g = step_gen(a.seed, 7, step)
        idx = np.sort(batch_indices(a.seed, 7, step, a.dec_bs, n, perm_cache))
        x, m = to_float(imgs[idx]), torch.from_numpy(masks[idx]).float().div(255.0)[:, None]
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        lr = lr_at(step, a.dec_steps, a.dec_lr, a.warmup, 0.1)
        for pg in opt.param_groups:
            pg["lr"] = lr
        dlt = vae.decode(z).sample.float() - x
        w = 1.0 + a.ae_fg_weight * m + a.dec_border_weight * band
        loss = (w * (dlt.abs() + dlt.square())).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, vae.decoder, a.dec_ema, step)
        step += 1
        spent += time.time() - t_step
        edge = (dlt.detach().abs() * band).sum() / (band.sum() * dlt.shape[0] * 3)
        run.append((loss.item(), float(edge)))
        if step % 50 == 0 or step == a.dec_steps:
            r = np.mean(run, 0)
            log(f"decoder step {step}/{a.dec_steps} loss {r[0]:.4f} edge |err| {r[1] * 127.5:.2f} levels "
                f"lr {lr:.1e} {(time.time() - t_acc) / len(run):.2f}s/step")
            run, t_acc = [], time.time()
        stop = time.time() >= deadline
        if stop or step == a.dec_steps or time.time() - last_ck > a.ckpt_minutes * 60:
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step,
                         "seconds": spent, "args": vars(a)}, ck)
            last_ck = time.time()
            if stop and step < a.dec_steps:
                log(f"decoder: time box reached at step {step}; checkpoint saved")
                return False
    vae.decoder.load_state_dict(ema)
    vae.eval()
    log(f"decoder: done, {step} steps, {spent / 60:.1f} min; EMA validation PSNR {ae_val_psnr(vae, val):.2f} dB, "
        f"frame {frame_offset(vae, val[:128]):.2f} levels")
    if a.from_model is not None:
        from diffusers import AutoencoderKL
        shipped = AutoencoderKL.from_pretrained(a.from_model / "vae")
        shipped.decoder.load_state_dict(vae.decoder.state_dict())
        shipped.save_pretrained(a.from_model / "vae", safe_serialization=True)
        # save_pretrained records where the model was loaded from; the shipped config never did.
        cfg_path = a.from_model / "vae" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("_name_or_path", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        log(f"decoder: wrote the tuned autoencoder into {a.from_model / 'vae'}")
    return True


# ----------------------------------------------------------------------------
# Stage: encode
# ----------------------------------------------------------------------------

def load_ema_vae(d: Path, seed: int):
    vae = make_vae(seed)
    vae.load_state_dict(torch.load(d / "ckpt" / "ae.pt", map_location="cpu", weights_only=False)["ema"])
    return vae.eval()


@torch.no_grad()
def stage_encode(d: Path, a, log, deadline: float) -> bool:
    out = d / "latents"
    stats_p = d / "latent_stats.json"
    if stats_p.exists():
        return True
    out.mkdir(parents=True, exist_ok=True)
    vae = load_ema_vae(d, a.seed)
    imgs = np.load(d / "data" / "images.npy", mmap_mode="r")
    n = imgs.shape[0]
    chunk = 1000
    t0 = time.time()
    for s in range(0, n, chunk):
        f = out / f"{s:06d}.npz"
        if f.exists():
            continue
        if time.time() >= deadline:
            log(f"encode: time box reached at {s}/{n}")
            return False
        mus, lvs = [], []
        for b in range(s, min(n, s + chunk), 50):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                post = vae.encode(to_float(imgs[b:min(b + 50, s + chunk)])).latent_dist
            mus.append(post.mean.float().half())
            lvs.append(post.logvar.float().half())
        tmp = out / f"{s:06d}.tmp.npz"
        np.savez(tmp, mean=torch.cat(mus).numpy(), logvar=torch.cat(lvs).numpy())
        os.replace(tmp, f)
        log(f"encode: {min(n, s + chunk)}/{n} ({time.time() - t0:.0f}s)")
    mean, _ = load_latents(d)
    m = torch.from_numpy(mean[:-1000]).float()
    shift = float(m.mean())
    scale = float(1.0 / m.std())
    stats_p.write_text(json.dumps({"shift_factor": shift, "scaling_factor": scale,
                                   "per_channel_mean": m.mean((0, 2, 3)).tolist(),
                                   "per_channel_std": m.std((0, 2, 3)).tolist(),
                                   "posterior_std_mean": float(
                                       np.exp(0.5 * load_latents(d)[1][:2000].astype(np.float32)).mean())}))
    log(f"encode: latent shift_factor {shift:.4f} scaling_factor {scale:.4f}")
    return True


def load_latents(d: Path):
    fs = sorted(p for p in (d / "latents").glob("*.npz") if ".tmp" not in p.name)
    mean = np.concatenate([np.load(f)["mean"] for f in fs])
    lv = np.concatenate([np.load(f)["logvar"] for f in fs])
    return mean, lv


# ----------------------------------------------------------------------------
# Stage: flux
# ----------------------------------------------------------------------------

def pack(lat: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents."""
    b, c, h, w = lat.shape
    lat = lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return lat.reshape(b, (h // 2) * (w // 2), c * 4)


def img_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids(h//2, w//2)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def flux_forward(tr, clip, t5, x_t, t, cids, tids, with_ctx: bool = False):
    pooled = clip(cids).pooler_output
    ctx = t5(tids).last_hidden_state
    h = w = int(math.isqrt(x_t.shape[1])) * 2
    out = tr(hidden_states=x_t, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
             img_ids=img_ids(h, w), txt_ids=torch.zeros(ctx.shape[1], 3), guidance=None,
             return_dict=False)[0]
    return (out, ctx) if with_ctx else out


def scene_labels(d: Path, n: int) -> torch.Tensor:
    """[n, 2] (3x3 cell index, shape index) of each one-shape scene; -100 (ignored) for
    two-shape scenes, whose captions name two of each."""
    sc = json.loads((d / "data" / "scenes.json").read_text())[:n]
    lab = torch.full((n, 2), -100, dtype=torch.long)
    for i, x in enumerate(sc):
        if len(x["objects"]) == 1:
            o = x["objects"][0]
            lab[i, 0] = o["cell"][0] * 3 + o["cell"][1]
            lab[i, 1] = scenes.SHAPES.index(o["shape"])
    return lab


def token_cover(masks: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """Fraction of each packed token's 16x16 pixels that belong to a shape: [bs, tokens]."""
    m = torch.from_numpy(np.array(masks[idx])).float().div(255.0)[:, None]
    return torch.nn.functional.avg_pool2d(m, 16).flatten(1)


# The sigmas a 4-step schnell run evaluates the transformer at (FlowMatchEulerDiscrete,
# no shift): the tune phase spends part of its samples exactly there.
INFERENCE_SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25])


def flux_phase(d: Path, a, log, deadline: float, phase: str) -> bool:
    """One phase of transformer training.

    flux  from scratch: plain rectified-flow MSE, t ~ 75 % logit-normal(0,1) + 25 % uniform,
          cosine over --flux-steps, stopped at --flux-stop.
    tune  from the flux phase's weights and EMA, fresh optimizer, cosine over --tune-steps:
          - every packed token's loss weighted 1 + --tune-fg-weight x (its shape coverage),
            normalised per batch, so that small shapes are not drowned by the background;
          - half of the timesteps drawn from the 4 sigmas inference uses;
          - only one-shape scenes on solid backgrounds (--tune-single), where the caption's
            position phrase alone decides where the shape goes;
          - a training-only linear probe on T5's mean output that must name the shape's
            cell and kind (--tune-aux, the weight of its cross-entropy).

    Why: at flux step 6022 the model had colours right but put small shapes everywhere,
    and neither the foreground weighting nor the inference sigmas alone changed that in
    2,000 steps (held-out position 3 %): the jointly trained T5 gave "top left" and
    "bottom right" almost the same output (mean |diff| 0.05 against 0.59 for two colour
    words), so the transformer had nothing to learn position from.  With the probe, 1,000
    steps lifted held-out position to 57 % (24 % with two-shape and striped scenes kept).
    """
    # "polish" is round 1 of the polish phase, "polishN" round N: each round starts from the
    # previous one's checkpoint (round 1 from the tune phase's) with a fresh optimiser and
    # cosine, and draws its own random numbers.
    polish = phase.startswith("polish")
    rnd = int(phase[len("polish"):] or 1) if polish else 0
    tune = phase == "tune" or polish
    ck = d / "ckpt" / f"{phase}.pt"
    stage_id = 5 if rnd == 1 else 50 + rnd if polish else {"flux": 3, "tune": 4}[phase]
    total = int(per_round(a.polish_steps, rnd)) if polish else {"flux": a.flux_steps, "tune": a.tune_steps}[phase]
    stop = total if tune else min(a.flux_stop, a.flux_steps)
    base_lr = per_round(a.polish_lr, rnd) if polish else {"flux": a.flux_lr, "tune": a.tune_lr}[phase]
    tok, tok2 = load_tokenizers(d / "tokenizers")
    clip, t5, tr = make_models(tok, tok2, a.seed)
    mods = {"transformer": tr, "clip": clip, "t5": t5}
    # With --tune-aux, a linear probe on T5's mean output must name the shape's cell and kind
    # (a training-only head; it is not exported).  Without it the jointly trained T5 learnt
    # to output nearly the same vectors for "top left" and "bottom right" (the transformer
    # had not learnt to use them yet), so neither could ever learn position.
    aux = tune and a.tune_aux > 0
    if aux:
        mods["probe"] = torch.nn.Linear(T5_CFG["d_model"], 9 + len(scenes.SHAPES))
    params = [p for m in mods.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(0.9, 0.99), weight_decay=0.01)
    state = load_ckpt(ck)
    if state is not None and state["step"] >= stop:  # finished, or adopted (see stage_ae)
        return True
    if state is not None:
        for k, m in mods.items():
            m.load_state_dict(state["model"][k])
        opt.load_state_dict(state["opt"])
        ema, step, spent = state["ema"], state["step"], state["seconds"]
    elif tune:
        src = "flux" if phase == "tune" else "tune" if rnd == 1 else polish_phase(rnd - 1)
        init = load_ckpt(d / "ckpt" / f"{src}.pt")
        if init is None:
            raise SystemExit(f"{phase}: needs ckpt/{src}.pt first")
        for k, m in mods.items():
            if k in init["model"]:
                m.load_state_dict(init["model"][k])
        ema = dict(init["ema"])
        ema.update({k: {n: v.detach().clone() for n, v in m.state_dict().items()}
                    for k, m in mods.items() if k not in ema})
        step, spent = 0, 0.0
    else:
        ema = {k: {n: v.detach().clone() for n, v in m.state_dict().items()} for k, m in mods.items()}
        step, spent = 0, 0.0
    log(f"{phase}: transformer {nparams(tr):,} + CLIP {nparams(clip):,} + T5 {nparams(t5):,} params; "
        f"resuming at step {step}/{stop} ({spent / 60:.1f} min so far)")
    st = json.loads((d / "latent_stats.json").read_text())
    shift, scale = st["shift_factor"], st["scaling_factor"]
    mean, logvar = load_latents(d)
    std = np.exp(0.5 * logvar.astype(np.float32)).astype(np.float16)
    del logvar
    n = mean.shape[0] - 1000
    masks = np.load(d / "data" / "masks.npy", mmap_mode="r") if tune else None
    # Optionally only scenes with one shape on a solid background: the caption's position
    # phrase then fully decides where the shape is.
    pool = np.arange(n)
    if tune and a.tune_single:
        sc = json.loads((d / "data" / "scenes.json").read_text())[:n]
        pool = np.array([i for i, x in enumerate(sc)
                         if len(x["objects"]) == 1 and x["background"]["kind"] == "solid"])
        log(f"{phase}: {len(pool)} single-shape solid-background scenes of {n}")
    labels = scene_labels(d, n) if aux else None
    cids_all = torch.from_numpy(np.load(d / "data" / "clip_ids.npy")).long()
    tids_all = torch.from_numpy(np.load(d / "data" / "t5_ids.npy")).long()
    for m in mods.values():
        m.train()
    lossf = open(d / f"loss_{phase}.tsv", "a")
    perm_cache: dict = {}
    last_ck, t_acc, run = time.time(), time.time(), []
    while step < stop:
        t_step = time.time()
        g = step_gen(a.seed, stage_id, step)
        idx = np.sort(pool[batch_indices(a.seed, stage_id, step, a.flux_bs, len(pool), perm_cache)])
        bs = len(idx)
        var = torch.randint(0, 2, (bs,), generator=g)
        cids = cids_all[idx, var]
        tids = tids_all[idx, var]
        mu = torch.from_numpy(mean[idx]).float()
        sd = torch.from_numpy(std[idx]).float()
        x0 = pack((mu + sd * torch.randn(mu.shape, generator=g) - shift) * scale)
        u = torch.rand(bs, generator=g)
        t_ln = torch.sigmoid(torch.randn(bs, generator=g))
        t = torch.where(torch.rand(bs, generator=g) < 0.75, t_ln, u)
        eps = torch.randn(x0.shape, generator=g)
        if tune:
            at = INFERENCE_SIGMAS[torch.randint(0, 4, (bs,), generator=g)]
            t = torch.where(torch.rand(bs, generator=g) < a.tune_discrete_frac, at, t)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        v = eps - x0
        lr = lr_at(step, total, base_lr, a.warmup, a.flux_min_lr_frac)
        for pg in opt.param_groups:
            pg["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            pred, ctx = flux_forward(tr, clip, t5, x_t, t, cids, tids, with_ctx=True)
        err = (pred.float() - v).square()
        if tune:
            w = 1.0 + a.tune_fg_weight * token_cover(masks, idx)
            loss = (w * err.mean(-1)).sum() / w.sum()
        else:
            loss = err.mean()
        if aux:
            keep = (tids != 0).float()[..., None]
            feat = (ctx.float() * keep).sum(1) / keep.sum(1).clamp(min=1.0)
            logits = mods["probe"](feat)
            lab = labels[torch.from_numpy(idx)]
            ce = torch.nn.functional.cross_entropy
            loss = loss + a.tune_aux * (ce(logits[:, :9], lab[:, 0], ignore_index=-100)
                                        + ce(logits[:, 9:], lab[:, 1], ignore_index=-100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        for k, m in mods.items():
            ema_update(ema[k], m, a.flux_ema, step)
        step += 1
        spent += time.time() - t_step
        run.append((loss.item(), gn))
        if step % 50 == 0 or step == stop:
            r = np.mean(run, 0)
            lossf.write(f"{step}\t{spent:.0f}\t{r[0]:.5f}\t{r[1]:.3f}\t{lr:.2e}\n")
            lossf.flush()
            log(f"{phase} step {step}/{stop} loss {r[0]:.4f} gnorm {r[1]:.2f} lr {lr:.1e} "
                f"{(time.time() - t_acc) / len(run):.2f}s/step")
            run, t_acc = [], time.time()
        out_of_time = time.time() >= deadline
        if out_of_time or step == stop or time.time() - last_ck > a.ckpt_minutes * 60:
            atomic_save({"model": {k: m.state_dict() for k, m in mods.items()}, "opt": opt.state_dict(),
                         "ema": ema, "step": step, "seconds": spent, "args": vars(a)}, ck)
            last_ck = time.time()
            if out_of_time and step < stop:
                log(f"{phase}: time box reached at step {step}; checkpoint saved")
                return False
    log(f"{phase}: done, {step} steps, {spent / 60:.1f} min")
    return True


# ----------------------------------------------------------------------------
# Adopting an exported model
# ----------------------------------------------------------------------------

# What the run that produced the shipped models/pictor-tiny recorded (its model card):
# (stage, steps, minutes).  Only used to label adopted checkpoints for export_tiny.py.
SHIPPED_RUN = {"ae": (3600, 29.1), "flux": (6022, 60.1), "tune": (8000, 76.2)}


def adopt(d: Path, folder: Path, log) -> None:
    """Rebuild the state the later stages start from out of an exported FluxPipeline folder,
    so that `--stage polish --from-model models/pictor-tiny` continues the shipped weights on
    a machine that no longer has the training directory.

    Writes, where missing: tokenizers/ (copied, so token ids are the shipped ones),
    ckpt/ae.pt (the shipped autoencoder as EMA weights), ckpt/flux.pt and ckpt/tune.pt (the
    shipped transformer and text encoders as both weights and EMA).  The data and encode
    stages then render and encode the scenes with these, exactly as in the original run.
    """
    import shutil
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    ck = d / "ckpt"
    ck.mkdir(parents=True, exist_ok=True)
    tok_dir = d / "tokenizers"
    for sub in ("tokenizer", "tokenizer_2"):
        if not (tok_dir / sub).exists():
            shutil.copytree(folder / sub, tok_dir / sub)
    if not (ck / "ae.pt").exists():
        vae = AutoencoderKL.from_pretrained(folder / "vae").float()
        steps, minutes = SHIPPED_RUN["ae"]
        sd = vae.state_dict()
        atomic_save({"model": sd, "opt": None, "ema": sd, "step": steps, "seconds": minutes * 60,
                     "adopted_from": str(folder)}, ck / "ae.pt")
    parts = None
    for stage in ("flux", "tune"):
        if (ck / f"{stage}.pt").exists():
            continue
        if parts is None:
            parts = {
                "transformer": FluxTransformer2DModel.from_pretrained(folder / "transformer").float().state_dict(),
                "clip": CLIPTextModel.from_pretrained(folder / "text_encoder").float().state_dict(),
                "t5": T5EncoderModel.from_pretrained(folder / "text_encoder_2").float().state_dict(),
            }
        steps, minutes = SHIPPED_RUN[stage]
        atomic_save({"model": parts, "opt": None, "ema": parts, "step": steps, "seconds": minutes * 60,
                     "adopted_from": str(folder)}, ck / f"{stage}.pt")
    log(f"adopted {folder}: tokenizers, ckpt/ae.pt, ckpt/flux.pt, ckpt/tune.pt")


# ----------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["data", "ae", "encode", "flux", "tune", "polish", "decoder", "all"],
                    default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=150.0, help="time box for this invocation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false")
    ap.add_argument("--polish-round", type=int, default=1,
                    help="with --stage polish: round N starts from round N-1's checkpoint")
    ap.add_argument("--from-model", type=Path, default=None,
                    help="start from an exported folder (models/pictor-tiny) instead of this "
                         "directory's earlier stages; see adopt()")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = ap.parse_args()
    setup_torch(a.threads)
    _quiet()
    d = train_dir()
    d.mkdir(parents=True, exist_ok=True)
    log = Log(d / "train.log")
    deadline = time.time() + a.minutes * 60
    log(f"start: stage {a.stage}, dir {d}, threads {a.threads}, minutes {a.minutes}, seed {a.seed}")
    if a.from_model is not None:
        adopt(d, a.from_model, log)
    run_all = a.stage == "all"
    if run_all or a.stage == "data" or not (d / "data" / "done.json").exists():
        stage_data(d, a, log)
    if run_all or a.stage == "ae":
        if not stage_ae(d, a, log, deadline):
            return
    if a.stage == "decoder":
        if stage_decoder(d, a, log, deadline):
            log("finished: decoder stage complete")
        return
    if run_all or a.stage in ("encode", "flux", "tune", "polish"):
        if not stage_encode(d, a, log, deadline):
            return
    if run_all or a.stage in ("flux", "tune"):
        if not flux_phase(d, a, log, deadline, "flux"):
            return
    if run_all or a.stage in ("tune", "polish"):
        if not flux_phase(d, a, log, deadline, "tune"):
            return
    # Not part of "all": polish rounds run only when asked for (the shipped weights are
    # polish round 3's; see the model card for the commands).
    if a.stage == "polish":
        for r in range(1, a.polish_round + 1):
            if not flux_phase(d, a, log, deadline, polish_phase(r)):
                return
    log("finished: all requested stages complete")


if __name__ == "__main__":
    main()
