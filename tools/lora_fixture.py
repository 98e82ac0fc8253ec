"""Helpers the LoRA fixture tools share (`make_tiny_lora.py` for FLUX,
`make_tiny_zimage_lora.py` for Z-Image): exact bf16 values, fused-layer LoRAs, saving,
the output folder, and comparisons. torch and safetensors only, so either venv imports it."""

from __future__ import annotations

import shutil
from pathlib import Path

import safetensors.torch
import torch


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16-representable values (kept as float32), so that every file can store
    them in either dtype without changing the update."""
    return t.to(torch.bfloat16).to(torch.float32)


def fuse_group(upd: dict, members: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA on a fused layer carrying its members' separate LoRAs exactly:
    down = [A_1; A_2; ...] (rank n*r), up = block-diagonal(B_1, B_2, ...) (exact zeros elsewhere)."""
    down = torch.cat([upd[m][0] for m in members], dim=0)
    up = torch.block_diag(*[upd[m][1] for m in members])
    return down.contiguous(), up.contiguous()


def save(sd: dict, path: Path, dtype: torch.dtype) -> None:
    safetensors.torch.save_file({k: v.to(dtype).contiguous() for k, v in sorted(sd.items())}, str(path))


def prepare_out(out: Path) -> None:
    """An empty output folder; refuses to delete a non-empty one that is no earlier fixture."""
    if out.exists():
        entries = list(out.iterdir())
        if entries and not (out / "reference.json").exists():
            raise SystemExit(f"{out} exists, is not empty and does not look like a previous fixture; refusing")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def plain_state_dict(model: torch.nn.Module) -> dict:
    """Weights without PEFT's wrapping (`x.base_layer.weight` -> `x.weight`), LoRA tensors dropped."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if ".lora_" not in k}


def max_diff(got: dict, want: dict) -> float:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())
