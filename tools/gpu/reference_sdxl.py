#!/usr/bin/env python3
"""Full-size SDXL reference run for the GPU machine: random weights, diffusers/transformers outputs and timings.

Builds the SDXL-base UNet, VAE and both text encoders with the hub configs' values and seeded, perturbed
random weights (the fixture generator's `perturb`), writes them in the diffusers layout under OUT_DIR
(default /tmp/sdxl-ref) together with golden inputs and outputs, and times the reference implementation.
Our binaries then load the very same files and compare (see docs/GPU.md).

    python3 tools/gpu/reference_sdxl.py [--out /tmp/sdxl-ref] [--parts unet vae text pipeline]

Needs diffusers (carried as a wheel; docs/GPU.md) and a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from generate import perturb  # noqa: E402  (same perturbation as the CPU fixtures)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, norm_num_groups=32, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                    pad_token_id=49407, layer_norm_eps=1e-5)
SDXL_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768, **_CLIP_COMMON)
SDXL_CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       hidden_act="gelu", projection_dim=1280, **_CLIP_COMMON)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Mean seconds per call, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def save_io(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def unet_part(out: Path, results: dict) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET).eval()
    perturb(unet, 100)
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    b = 2
    io = {
        "sample": torch.randn(b, 4, 128, 128, generator=gen, device="cuda"),
        "timesteps": torch.tensor([999.0, 17.0], device="cuda"),
        "encoder_hidden_states": torch.randn(b, 77, 2048, generator=gen, device="cuda"),
        "text_embeds": torch.randn(b, 1280, generator=gen, device="cuda"),
        "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b, device="cuda"),
    }

    def run(model, dtype):
        with torch.no_grad():
            return model(io["sample"].to(dtype), io["timesteps"], encoder_hidden_states=io["encoder_hidden_states"].to(dtype),
                         added_cond_kwargs={"text_embeds": io["text_embeds"].to(dtype), "time_ids": io["time_ids"].to(dtype)}).sample

    # fp32 in full precision: TF32 off for matrix products and convolutions (our side does the same).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    io["out_fp32"] = run(unet, torch.float32).float()
    torch.backends.cudnn.allow_tf32 = True  # back to PyTorch's defaults for the bf16 runs
    unet.to(torch.bfloat16)
    io["out_bf16"] = run(unet, torch.bfloat16).float()
    results["unet_bf16_vs_fp32_rel"] = rel(io["out_bf16"], io["out_fp32"])
    results["unet_bf16_1024_cfg2_s_per_step"] = cuda_time(lambda: run(unet, torch.bfloat16))
    results["unet_bf16_1024_cfg2_peak_gib"] = peak_gib(lambda: run(unet, torch.bfloat16))
    save_io(io, out / "unet-io.safetensors")
    del unet
    torch.cuda.empty_cache()


def vae_part(out: Path, results: dict) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKL(**SDXL_VAE).eval()
    perturb(vae, 101)
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    gen = torch.Generator(device="cuda").manual_seed(2)
    small = torch.randn(1, 4, 32, 32, generator=gen, device="cuda")
    image = torch.rand(1, 3, 256, 256, generator=gen, device="cuda") * 2 - 1
    with torch.no_grad():
        io = {"latents": small, "image": image, "decoded_fp32": vae.decode(small).sample,
              "mean_fp32": vae.encode(image).latent_dist.mean}
    save_io(io, out / "vae-io.safetensors")
    vae.to(torch.bfloat16)
    big = torch.randn(1, 4, 256, 256, generator=gen, device="cuda", dtype=torch.bfloat16)

    def decode():
        with torch.no_grad():
            return vae.decode(big).sample

    results["vae_bf16_2048_untiled_peak_gib"] = peak_gib(decode)
    results["vae_bf16_2048_untiled_s"] = cuda_time(decode, warmup=1, iters=3)
    vae.enable_tiling()
    results["vae_bf16_2048_tiled_peak_gib"] = peak_gib(decode)
    results["vae_bf16_2048_tiled_s"] = cuda_time(decode, warmup=1, iters=3)
    del vae
    torch.cuda.empty_cache()


def text_part(out: Path, results: dict) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1, te2 = CLIPTextConfig(**SDXL_CLIP_L), CLIPTextConfig(**SDXL_CLIP_BIG_G)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49406, (2, 77), generator=gen)
    ids[:, 0] = 49406
    ids[0, 12:] = 49407
    ids[1, 76] = 49407
    io = {"input_ids": ids}
    for name, cls, cfg, seed in [("text_encoder", CLIPTextModel, te1, 102),
                                 ("text_encoder_2", CLIPTextModelWithProjection, te2, 103)]:
        torch.manual_seed(0)
        model = cls(cfg).eval().cuda()
        perturb(model, seed)
        model.save_pretrained(str(out / name), safe_serialization=True)
        with torch.no_grad():
            res = model(ids.cuda(), output_hidden_states=True)
        io[f"{name}.penultimate"] = res.hidden_states[-2]
        io[f"{name}.pooled"] = res.text_embeds if name == "text_encoder_2" else res.pooler_output
        del model
    save_io(io, out / "text-io.safetensors")


def pipeline_part(out: Path, results: dict) -> None:
    """diffusers' StableDiffusionXLPipeline on the folders the other parts wrote: one 1024x1024 image,
    30 Euler steps (SDXL scheduler config), guidance 5, bf16, no VAE upcast (bf16 is not upcast). The
    prompt is given as embeddings (no tokenizer here; the text encoders' cost is milliseconds). Ours:
    `cargo run --release --example generate -- --model OUT --prompt "a cat" --steps 30 --kind bf16 --warmup`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    from generate import SDXL_SCHEDULER_CONFIG  # noqa: E402

    dtype = torch.bfloat16
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(out / "text_encoder", dtype=dtype),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2", dtype=dtype),
        tokenizer=None, tokenizer_2=None,
        unet=UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=dtype),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(4)
    embeds = torch.randn(1, 77, 2048, generator=gen).to("cuda", dtype)
    pooled = torch.randn(1, 1280, generator=gen).to("cuda", dtype)

    def run():
        with torch.no_grad():
            return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=1024, width=1024,
                        num_inference_steps=30, guidance_scale=5.0, output_type="pt").images

    results["pipeline_1024_30_steps_bf16_s"] = round(cuda_time(run, warmup=1, iters=2), 3)
    results["pipeline_1024_30_steps_bf16_peak_gib"] = round(peak_gib(run), 2)
    del pipe
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sdxl-ref"))
    parser.add_argument("--parts", nargs="*", default=["unet", "vae", "text"], choices=["unet", "vae", "text", "pipeline"],
                        help="pipeline reads the folders unet, vae and text write: run it after them")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (cuDNN times its algorithms per shape)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if not torch.cuda.is_available():
        print("reference_sdxl.py needs a CUDA device", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                     "cudnn_benchmark": args.cudnn_benchmark}
    parts = {"unet": unet_part, "vae": vae_part, "text": text_part, "pipeline": pipeline_part}
    for part in args.parts:
        t0 = time.time()
        parts[part](args.out, results)
        results[f"{part}_reference_wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(results, indent=1), flush=True)
    (args.out / "reference.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
