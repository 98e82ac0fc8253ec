#!/usr/bin/env python3
"""Pictor against diffusers (eager, PyTorch's SDPA attention) on one GPU, with full-size
FLUX.1-schnell random weights in bf16 made on the spot; run by bench/gpu.sh, which prepares
the binary, the CUDA libraries and the Python packages.

  (a) `pictor selfcheck` on the tiny fixture in f32 and bf16 on the GPU: max |diff| per
      stage against diffusers' f32 references (f32 held to 1e-4, bf16 to BF16_BOUND of
      each reference's largest value);
  (b) the random checkpoint, as diffusers writes it (diffusers' own layout, which Pictor
      reads too), tokenizers from the fixture;
  (c) diffusers: load, one warm-up, then REPS runs per size: end to end, per transformer
      step (median interval between step callbacks), peak GPU memory;
  (d) Pictor: `pictor serve` on the same folder (bf16 on cuda:0), one warm-up, REPS
      requests per size: end to end (the response's generation_seconds), per step
      (denoise_seconds / steps), peak GPU memory.

Peak GPU memory is what nvidia-smi reports used on the GPU, sampled every 0.1 s while the
engine's process runs, less what was used before it started. Every figure goes to one
JSON file. `--dry` runs the same steps on the CPU with a toy-sized model, to test the
script where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/data/tiny-flux-schnell"
PROMPT = "a white siamese cat sitting on a red velvet sofa, soft window light"
# bf16 on the GPU: each stage within this fraction of the reference's largest value. The
# CPU's bf16 T5 is 1.6 % of it off (the worst stage); a broken kernel is off by its size.
BF16_BOUND = 0.05


def log(*a):
    print(*a, flush=True)


class Peak:
    """The peak of a memory reading while a block runs, less the reading before it."""

    def __init__(self, read):
        self.read, self.peak, self.stop = read, 0, threading.Event()

    def __enter__(self):
        self.base = self.read(None) or 0
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def watch(self, pid):
        self.pid = pid

    def _poll(self):
        while not self.stop.is_set():
            value = self.read(getattr(self, "pid", None)) or 0
            self.peak = max(self.peak, value - self.base)
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def gib(self):
        return round(self.peak / 2**30, 2)


def gpu_used(_pid):
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=5,
        ).stdout
        return int(out.split()[0]) * 2**20
    except Exception:
        return None


def rss_peak(pid):
    """--dry: the process's peak RSS (VmHWM) stands in for GPU memory."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def selfcheck(pictor, device, dry):
    rows = {}
    for dtype, extra in [("f32", []), ("bf16", ["--max-relative", str(BF16_BOUND)])]:
        r = subprocess.run(
            [pictor, "selfcheck", str(FIXTURE), "--device", device, "--dtype", dtype, *extra],
            capture_output=True, text=True, timeout=300,
        )
        try:
            report = json.loads(r.stdout)
        except json.JSONDecodeError:
            report = {"passed": False, "error": r.stderr.strip()[-2000:]}
        rows[dtype] = report
        worst = max((s["max_abs_diff"] for s in report.get("stages", [])), default=None)
        log(f"(a) selfcheck {dtype} on {report.get('device', device)}: passed={report.get('passed')} worst max|diff| {worst}")
        if r.returncode != 0:
            log(r.stderr.strip()[-1000:])
    return rows


def config(dry):
    """diffusers' configs of FLUX.1-schnell's parts (toy-sized with --dry)."""
    depth = (1, 2) if dry else (19, 38)
    heads = 2 if dry else 24
    return {
        "transformer": dict(patch_size=1, in_channels=64, num_layers=depth[0], num_single_layers=depth[1],
                            attention_head_dim=128, num_attention_heads=heads,
                            joint_attention_dim=4096 if not dry else 64, pooled_projection_dim=768 if not dry else 32,
                            guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
        "t5": dict(d_model=4096 if not dry else 64, d_ff=10240 if not dry else 128, d_kv=64 if not dry else 16,
                   num_heads=64 if not dry else 4, num_layers=24 if not dry else 2,
                   feed_forward_proj="gated-gelu", vocab_size=32128, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, layer_norm_epsilon=1e-6),
        "clip": dict(hidden_size=768 if not dry else 32, intermediate_size=3072 if not dry else 64,
                     num_attention_heads=12 if not dry else 2, num_hidden_layers=12 if not dry else 2,
                     max_position_embeddings=77, vocab_size=49408, projection_dim=768 if not dry else 32,
                     hidden_act="quick_gelu"),
        "vae": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4,
                    block_out_channels=[128, 256, 512, 512] if not dry else [32, 32, 32, 32],
                    layers_per_block=2 if not dry else 1, latent_channels=16, scaling_factor=0.3611,
                    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, norm_num_groups=32),
    }


def make_checkpoint(folder: Path, dry: bool):
    if (folder / "model_index.json").exists():
        log(f"(b) reusing {folder}")
        return
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    t0 = time.time()
    device = "cpu" if dry else "cuda"
    torch.manual_seed(0)
    c = config(dry)
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        transformer = FluxTransformer2DModel(**c["transformer"])
        t5 = T5EncoderModel(T5Config(**c["t5"]))
        clip = CLIPTextModel(CLIPTextConfig(**c["clip"]))
        vae = AutoencoderKL(**c["vae"])
        torch.set_default_dtype(torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=CLIPTokenizer.from_pretrained(FIXTURE / "tokenizer"),
                        text_encoder_2=t5, tokenizer_2=T5TokenizerFast.from_pretrained(FIXTURE / "tokenizer_2"),
                        transformer=transformer)
    tmp = folder.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, max_shard_size="10GB")
    tmp.rename(folder)
    del pipe, transformer, t5, clip, vae
    if not dry:
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    log(f"(b) random bf16 checkpoint: {size / 2**30:.1f} GiB in {time.time() - t0:.0f} s")


def diffusers_child(args):
    """Runs in its own process: prints one JSON line."""
    import torch
    from diffusers import FluxPipeline

    device = "cpu" if args.dry else "cuda"
    t0 = time.time()
    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(device)
    load = time.time() - t0
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {"load_seconds": round(load, 2), "sizes": {}}

    def run(size):
        marks = []

        def on_step(_pipe, _i, _t, kw):
            sync()
            marks.append(time.perf_counter())
            return kw

        sync()
        t = time.perf_counter()
        pipe(PROMPT, height=size, width=size, num_inference_steps=args.steps, guidance_scale=0.0,
             max_sequence_length=256, generator=torch.Generator(device).manual_seed(1),
             callback_on_step_end=on_step, output_type="pil")
        sync()
        steps = [b - a for a, b in zip(marks, marks[1:])]
        return time.perf_counter() - t, statistics.median(steps) if steps else None

    run(args.sizes[0])  # warm-up
    for size in args.sizes:
        runs = [run(size) for _ in range(args.reps)]
        out["sizes"][str(size)] = {
            "end_to_end_seconds": round(statistics.median(r[0] for r in runs), 4),
            "step_seconds": round(statistics.median(r[1] for r in runs), 4) if runs[0][1] else None,
            "runs": len(runs),
        }
    if device == "cuda":
        out["torch_max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(json.dumps(out), flush=True)


def run_diffusers(args, folder, read):
    cmd = [sys.executable, __file__, "diffusers", "--model", str(folder), "--steps", str(args.steps),
           "--reps", str(args.reps), "--sizes", ",".join(map(str, args.sizes))] + (["--dry"] if args.dry else [])
    with Peak(read) as peak:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        peak.watch(p.pid)
        stdout, _ = p.communicate(timeout=args.timeout)
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}"}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_memory_gib"] = peak.gib
    log(f"(c) diffusers: {json.dumps(result)}")
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: {e.code} {e.read().decode(errors='replace')[:500]}") from e


def run_pictor(args, folder, read, device):
    port = free_port()
    data = Path(args.work) / "pictor-data"
    data.mkdir(parents=True, exist_ok=True)
    conf = Path(args.work) / "pictor.toml"
    conf.write_text(
        f'listen = "127.0.0.1:{port}"\ndata_dir = "{data}"\n'
        f'[models.flux]\npath = "{folder}"\ndevice = "{device}"\ndtype = "bf16"\nmax_batch = 1\n'
    )
    url = f"http://127.0.0.1:{port}"
    out = {"sizes": {}}
    with Peak(read) as peak:
        t0 = time.time()
        p = subprocess.Popen([args.pictor, "--config", str(conf), "serve"], stdout=subprocess.DEVNULL,
                             stderr=open(Path(args.work) / "pictor-serve.log", "w"))
        peak.watch(p.pid)
        try:
            while True:
                if p.poll() is not None:
                    return {"error": "pictor serve exited: " + (Path(args.work) / "pictor-serve.log").read_text()[-2000:]}
                try:
                    models = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=2).read())
                    if models["data"][0].get("ready"):
                        out["device"] = models["data"][0].get("device")
                        break
                except Exception:
                    pass
                if time.time() - t0 > args.timeout:
                    return {"error": "pictor serve did not load in time"}
                time.sleep(0.5)
            out["load_seconds"] = round(time.time() - t0, 2)
            body = lambda s: {"model": "flux", "prompt": PROMPT, "size": f"{s}x{s}", "n": 1,
                              "response_format": "b64_json", "seed": 1}
            post(f"{url}/v1/images/generations", body(args.sizes[0]), args.timeout)  # warm-up
            for size in args.sizes:
                runs = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    r = post(f"{url}/v1/images/generations", body(size), args.timeout)
                    wall = time.perf_counter() - t
                    tm = r["data"][0]["timings"]
                    runs.append((tm["generation_seconds"], tm["denoise_seconds"] / args.steps, wall))
                out["sizes"][str(size)] = {
                    "end_to_end_seconds": round(statistics.median(x[0] for x in runs), 4),
                    "step_seconds": round(statistics.median(x[1] for x in runs), 4),
                    "http_wall_seconds": round(statistics.median(x[2] for x in runs), 4),
                    "runs": len(runs),
                }
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    out["peak_memory_gib"] = peak.gib
    log(f"(d) pictor: {json.dumps(out)}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "diffusers"])
    ap.add_argument("--pictor", default=str(ROOT / "target/release/pictor"))
    ap.add_argument("--work", default="/tmp/pictor-gpu-bench-work")
    ap.add_argument("--out", default="/tmp/pictor-gpu-bench/gpu-bench.json")
    ap.add_argument("--model")
    ap.add_argument("--sizes", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args()
    args.sizes = [int(s) for s in (args.sizes or ("256,512" if args.dry else "512,1024")).split(",")]
    if args.mode == "diffusers":
        return diffusers_child(args)

    t0 = time.time()
    device = "cpu" if args.dry else "cuda:0"
    read = rss_peak if args.dry else gpu_used
    result = {"dry": args.dry, "steps": args.steps, "reps": args.reps, "sizes": args.sizes}
    try:
        import torch
        result["torch"] = torch.__version__
        result["torch_cuda"] = torch.version.cuda
        if not args.dry:
            result["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # the selfcheck and Pictor's runs need no torch
        result["torch"] = f"unavailable: {e}"
    result["selfcheck"] = selfcheck(args.pictor, device, args.dry)
    folder = Path(args.work) / ("flux-random-toy" if args.dry else "flux-random")
    try:
        make_checkpoint(folder, args.dry)
        result["diffusers"] = run_diffusers(args, folder, read)
    except Exception as e:
        result["diffusers"] = {"error": repr(e)}
        log(f"(b/c) diffusers failed: {e!r}")
    if folder.exists():
        result["pictor"] = run_pictor(args, folder, read, device)
    ratios = {}
    for size in map(str, args.sizes):
        p = result.get("pictor", {}).get("sizes", {}).get(size)
        d = result.get("diffusers", {}).get("sizes", {}).get(size)
        if p and d:
            ratios[size] = {k: round(p[k] / d[k], 3) for k in ("end_to_end_seconds", "step_seconds") if d.get(k)}
    result["pictor_over_diffusers"] = ratios
    result["wall_seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    log(json.dumps({"ratios": ratios, "wall_seconds": result["wall_seconds"]}))
    passed = all(r.get("passed") for r in result["selfcheck"].values())
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
