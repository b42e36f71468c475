#!/usr/bin/env python3
"""Writes a full-size SDXL-base diffusers folder with seeded, perturbed random weights (fp16 variant).

The same architecture and the same weights as reference_sdxl.py (UNet seed 100, VAE 101, CLIP-L 102,
bigG 103, the fixture generator's `perturb`), saved as `*.fp16.safetensors` with `model_index.json` and
the SDXL scheduler config, i.e. the layout `stabilityai/stable-diffusion-xl-base-1.0` has with
`variant="fp16"`. The trainer's full-size GPU runs train on it (docs/BENCHMARKS.md).

    python3 tools/gpu/random_sdxl.py [--out /tmp/sdxl-random]

Needs diffusers (carried as a wheel; docs/GPU.md) and transformers; uses CUDA when present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from generate import SDXL_SCHEDULER_CONFIG, perturb  # noqa: E402
from reference_sdxl import SDXL_CLIP_BIG_G, SDXL_CLIP_L, SDXL_UNET, SDXL_VAE  # noqa: E402

SCHEDULER = SDXL_SCHEDULER_CONFIG  # the hub's SDXL base scheduler_config.json, as the CPU fixtures use it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/sdxl-random"))
    args = parser.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    te1, te2 = CLIPTextConfig(**SDXL_CLIP_L), CLIPTextConfig(**SDXL_CLIP_BIG_G)
    parts = [
        ("unet", lambda: UNet2DConditionModel(**SDXL_UNET), 100),
        ("vae", lambda: AutoencoderKL(**SDXL_VAE), 101),
        ("text_encoder", lambda: CLIPTextModel(te1), 102),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(te2), 103),
    ]
    for name, build, seed in parts:
        torch.manual_seed(0)
        with torch.device(device):
            model = build().eval()
        perturb(model, seed)
        model.to(torch.float16).save_pretrained(str(args.out / name), safe_serialization=True, variant="fp16")
        del model
        print(f"{name}: written ({time.time() - start:.0f} s)", flush=True)
    (args.out / "scheduler").mkdir(parents=True, exist_ok=True)
    (args.out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = {"_class_name": "StableDiffusionXLPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (args.out / "model_index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {args.out} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
