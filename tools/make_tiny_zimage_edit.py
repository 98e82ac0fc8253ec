#!/usr/bin/env python3
"""Edit references for the tiny Z-Image-Turbo fixture: diffusers' ZImageImg2ImgPipeline and
ZImageInpaintPipeline on tests/data/tiny-z-image-turbo (made by make_tiny_zimage.py), which
this script reads and does not change, writing edit-reference.safetensors and
edit-reference.json beside it.

The picture is a smooth random image (low-resolution noise, upscaled) rounded to 8-bit RGB,
so that an engine given those bytes sees exactly the pipeline's input. The posterior is
read at its mean (the pipelines would sample it; a deterministic engine takes the mean), so
each pipeline's only draw from its seeded generator is the noise, recorded here.

* img2img: strength 0.6 of 8 steps (the last 5 run), `img2img_noise`,
  `img2img_final_latents`, `img2img_image_u8`;
* inpaint: strength 0.7 of 8 steps (the last 6 run), repainting rows 16..40 and columns
  0..48 of the 80x48 picture (`inpaint_mask`), `inpaint_noise`, `inpaint_final_latents`,
  `inpaint_image_u8`.

    ~/.cache/pictor/venv-zimage/bin/python tools/make_tiny_zimage_edit.py
Deterministic (fixed seeds, one CPU thread).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import safetensors.torch
import torch
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline
from diffusers.pipelines.z_image import pipeline_z_image_img2img, pipeline_z_image_inpaint

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "tiny-z-image-turbo"
PROMPT = "a small red circle on a blue background in the top left"
WIDTH, HEIGHT, STEPS = 80, 48, 8
IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.6, 0.7
INPAINT_ROWS, INPAINT_COLS = (16, 40), (0, 48)
SEED_PICTURE, SEED_IMG2IMG, SEED_INPAINT = 5, 6, 7


def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mean


def run(pipe_class, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    pipe = pipe_class.from_pretrained(FIXTURE, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    steps: list[torch.Tensor] = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    image = pipe(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=0.0,
                 output_type="pt", callback_on_step_end=on_step_end,
                 callback_on_step_end_tensor_inputs=["latents"], **kwargs).images
    return steps, image


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    pipeline_z_image_img2img.retrieve_latents = posterior_mean
    pipeline_z_image_inpaint.retrieve_latents = posterior_mean
    g = torch.Generator().manual_seed(SEED_PICTURE)
    coarse = torch.rand((1, 3, HEIGHT // 16, WIDTH // 16), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    picture_u8 = (smooth * 255).round().clamp(0, 255).to(torch.uint8)
    picture = picture_u8.float() / 255
    latent_shape = (1, 16, HEIGHT // 8, WIDTH // 8)
    ref: dict[str, torch.Tensor] = {"picture_u8": picture_u8[0]}

    img2img_noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(SEED_IMG2IMG))
    steps, image = run(ZImageImg2ImgPipeline, image=picture, strength=IMG2IMG_STRENGTH,
                       generator=torch.Generator().manual_seed(SEED_IMG2IMG))
    assert len(steps) == STEPS - int(STEPS - STEPS * IMG2IMG_STRENGTH), len(steps)
    ref.update(img2img_noise=img2img_noise, img2img_final_latents=steps[-1],
               img2img_image_u8=(image * 255).round().clamp(0, 255).to(torch.uint8)[0])

    mask = torch.zeros((1, 1, HEIGHT, WIDTH))
    mask[..., INPAINT_ROWS[0]:INPAINT_ROWS[1], INPAINT_COLS[0]:INPAINT_COLS[1]] = 1.0
    inpaint_noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(SEED_INPAINT))
    steps, image = run(ZImageInpaintPipeline, image=picture, mask_image=mask, strength=INPAINT_STRENGTH,
                       generator=torch.Generator().manual_seed(SEED_INPAINT))
    assert len(steps) == STEPS - int(STEPS - STEPS * INPAINT_STRENGTH), len(steps)
    ref.update(inpaint_mask=mask[0, 0], inpaint_noise=inpaint_noise, inpaint_final_latents=steps[-1],
               inpaint_image_u8=(image * 255).round().clamp(0, 255).to(torch.uint8)[0])

    ref = {k: v.contiguous() for k, v in ref.items()}
    safetensors.torch.save_file(ref, str(FIXTURE / "edit-reference.safetensors"))
    meta = {
        "prompt": PROMPT, "width": WIDTH, "height": HEIGHT, "steps": STEPS,
        "img2img": {"strength": IMG2IMG_STRENGTH, "steps_run": STEPS - int(STEPS - STEPS * IMG2IMG_STRENGTH)},
        "inpaint": {"strength": INPAINT_STRENGTH, "steps_run": STEPS - int(STEPS - STEPS * INPAINT_STRENGTH),
                    "rows": INPAINT_ROWS, "cols": INPAINT_COLS},
        "seeds": {"picture": SEED_PICTURE, "img2img": SEED_IMG2IMG, "inpaint": SEED_INPAINT},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in ref.items()},
    }
    (FIXTURE / "edit-reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {FIXTURE / 'edit-reference.safetensors'}: {sorted(ref)}")


if __name__ == "__main__":
    main()
