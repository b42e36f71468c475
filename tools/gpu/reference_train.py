#!/usr/bin/env python3
"""Reference LoRA training step for the GPU machine: diffusers + peft + bitsandbytes + accelerate, timed.

What one optimizer step of diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py` costs with the seed
recipe (`--mixed_precision bf16 --use_8bit_adam --rank 4 --train_batch_size 2 --gradient_accumulation_steps 2
--resolution 512 --lr_scheduler constant --max_grad_norm 1.0`, optionally `--gradient_checkpointing`), on the
full SDXL-base UNet with seeded, perturbed random weights, so that our trainer can be timed beside it in the
same call (docs/GPU.md). Per micro-step, as the script does it:

- latents [batch, 4, res/8, res/8] in bf16 (the script's VAE output cast to the weight dtype; the VAE is not
  part of the timed step, so a pool of random latents stands in for it), noise `randn_like`, timesteps
  `randint(0, 1000)`, `DDPMScheduler.add_noise` with SDXL's schedule, epsilon target;
- the frozen UNet in bf16 with SDPA attention (diffusers' default `AttnProcessor2_0`), peft LoRA
  `r=4, lora_alpha=4, init_lora_weights="gaussian"` on `to_k, to_q, to_v, to_out.0`; prompt embeds
  [batch, 77, 2048] and pooled [batch, 1280] random bf16 (the script precomputes them once for its instance
  prompt), time ids (res, res, 0, 0, res, res);
- accelerate with `mixed_precision="bf16"`: the UNet forward under `torch.autocast(bf16)`, its output cast to
  fp32, `F.mse_loss(pred.float(), target.float())`, `accelerator.backward` dividing the loss by the
  accumulation steps, and on every `accum`-th micro-step `clip_grad_norm_(lora params, 1.0)`, the optimizer
  step, the constant LR scheduler step and `zero_grad`; `loss.item()` every micro-step (the script's logs);
- the optimizer: `bnb.optim.AdamW8bit(lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)`, or with
  `--optimizer adamw` the script's fallback `torch.optim.AdamW` with the same arguments.

The LoRA parameters' dtype: with `--mixed_precision bf16` the script upcasts them only for fp16 (its
`cast_training_params` call sits under `if args.mixed_precision == "fp16"`), and peft gives a new adapter its
base layer's dtype, so the script trains bf16 LoRA weights. That is the default here; `--lora-dtype fp32` applies
`cast_training_params` as the fp16 path does (fp32 master weights, closer to what a careful trainer keeps).

Timing: `--warmup` optimizer steps, then `torch.cuda.synchronize()` around `--steps` optimizer steps; CUDA events
split each step into the micro-steps' forward+backward and the optimizer part (clip, step, zero_grad). Peak
memory is `torch.cuda.max_memory_allocated()` reset after warm-up (the same counter our `torch-cuda` reads).

`--cuda-graph` then also times the whole optimizer step (all micro-steps, clipping, optimizer step) captured as
one CUDA graph: static latents copied in before each replay, noise and timesteps drawn inside the graph, autocast
without its weight cache, a side-stream warm-up before capture. bitsandbytes' 8-bit step cannot be captured: it
calls `torch.cuda.synchronize()` after every parameter and passes the step count to its kernel as a host integer
(frozen at capture), so the graph uses `torch.optim.AdamW(capturable=True, fused=True)` instead, labelled as such.

`--check-loops` (for the CPU here) runs the same steps once through accelerate and once through the hand-written
step that the graph captures, from identical starting weights and seeds, and fails unless the LoRA weights agree.

    python3 tools/gpu/reference_train.py --steps 50 --warmup 3 --json out.json [--checkpointing]
        [--resolution 512|1024] [--batch 2] [--accum 2] [--optimizer adamw8bit|adamw] [--lr 1e-4]
        [--lora-dtype bf16|fp32] [--cuda-graph] [--unet DIR] [--tiny --device cpu] [--check-loops] [--profile DIR]

`--profile DIR` records one more optimizer step of each phase with torch.profiler (host operators with shapes,
CUDA kernels, allocations) after its timed loop and writes DIR/diffusers-<phase>.json (Chrome traces, read by
tools/gpu/profile_summary.py beside our trainer's `--profile_step` traces).

Needs diffusers and bitsandbytes (carried as wheels; docs/GPU.md), peft and accelerate.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from generate import SDXL_SCHEDULER_CONFIG, TINY_UNET_A, perturb  # noqa: E402  (same weights recipe as the fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_sdxl import SDXL_UNET  # noqa: E402  (the full SDXL-base UNet config)

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
PROMPT_TOKENS = 77
UNET_WEIGHTS_SEED = 100  # reference_sdxl.py's seed for the UNet, so `--unet /tmp/sdxl-ref/unet` is the same model


@dataclass
class Run:
    """Everything one training run needs: the model, its trainable parameters, the fixed conditioning."""

    unet: torch.nn.Module
    lora_params: list
    prompt_embeds: torch.Tensor  # [batch, 77, cross_attention_dim], weight dtype
    pooled_embeds: torch.Tensor  # [batch, pooled width], weight dtype
    time_ids: torch.Tensor  # [batch, 6], weight dtype
    latent_pool: torch.Tensor  # [pool, accum, batch, 4, h, w], weight dtype
    scheduler: object  # diffusers DDPMScheduler


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing")
    parser.add_argument("--checkpointing", action="store_true", help="unet.enable_gradient_checkpointing()")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (latents are 1/8); 512 or 1024 in full "
                        "size, default 512 (64 with --tiny)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    parser.add_argument("--optimizer", choices=["adamw8bit", "adamw"], default="adamw8bit")
    parser.add_argument("--lr", type=float, default=1e-4, help="constant learning rate (the seed recipe uses 5e-5)")
    parser.add_argument("--lora-dtype", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: as the script leaves them under --mixed_precision bf16; fp32: cast_training_params")
    parser.add_argument("--tiny", action="store_true", help="the fixtures' tiny UNet config (for the CPU)")
    parser.add_argument("--unet", type=Path, default=None,
                        help="load the UNet from this diffusers folder (e.g. /tmp/sdxl-ref/unet) instead of building it")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--cuda-graph", action="store_true", help="also time the step captured as one CUDA graph")
    parser.add_argument("--check-loops", action="store_true",
                        help="check that the hand-written step equals accelerate's (same LoRA weights after --steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--profile", type=Path, default=None, help="write a profiler trace of one step per phase here")
    args = parser.parse_args()
    if args.resolution is None:
        args.resolution = 64 if args.tiny else 512
    for name in ("steps", "batch", "accum"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must not be negative, got {args.warmup}")
    if not args.tiny and args.resolution not in (512, 1024):
        parser.error(f"--resolution must be 512 or 1024 for the full-size UNet, got {args.resolution}")
    levels = len((TINY_UNET_A if args.tiny else SDXL_UNET)["block_out_channels"])
    multiple = 8 * 2 ** (levels - 1)
    if args.resolution % multiple:
        parser.error(f"--resolution must be a multiple of {multiple} for this UNet, got {args.resolution}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu with --tiny)")
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    if args.unet is not None and not (args.unet / "config.json").is_file():
        parser.error(f"--unet {args.unet}: no config.json there (expected a diffusers UNet folder)")
    return args


def build_run(args: argparse.Namespace, device: torch.device, for_graph: bool = False) -> Run:
    """The frozen bf16 UNet with peft LoRA adapters, the noise schedule and seeded random inputs.

    Deterministic in `args.seed`: two calls give identical weights and inputs (the loop check relies on it).
    `for_graph` checkpoints without stashing the generators' states: reading and restoring them are host-side
    operations that a CUDA graph capture does not allow, and the UNet draws no random numbers (no dropout), so
    the recomputation is the same either way."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    weight_dtype = torch.bfloat16
    if args.unet is not None:
        unet = UNet2DConditionModel.from_pretrained(args.unet, torch_dtype=torch.float32).to(device)
    else:
        torch.manual_seed(args.seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**(TINY_UNET_A if args.tiny else SDXL_UNET))
        perturb(unet, UNET_WEIGHTS_SEED)
    # As the script: freeze, cast the frozen weights to the mixed-precision dtype, then checkpointing, then LoRA.
    unet.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA; diffusers' default, set so the choice is explicit
    if args.checkpointing and for_graph:
        unet.enable_gradient_checkpointing(functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=False, preserve_rng_state=False))
    elif args.checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers' default: non-reentrant, RNG states stashed
    torch.manual_seed(args.seed + 1)  # peft's gaussian init of lora_A draws from the global generator
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    if args.lora_dtype == "fp32":
        cast_training_params(unet, dtype=torch.float32)
    unet.train()
    lora_params = [p for p in unet.parameters() if p.requires_grad]

    cfg = unet.config
    pooled_width = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    latent_side = args.resolution // 8
    gen = torch.Generator().manual_seed(args.seed + 2)
    pool_size = 4  # distinct accumulation groups the timed steps cycle through

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, weight_dtype)

    res = float(args.resolution)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the fp32 copy is gone; keep the build's blocks out of the reserved figure
    return Run(
        unet=unet,
        lora_params=lora_params,
        prompt_embeds=randn(args.batch, PROMPT_TOKENS, cfg.cross_attention_dim),
        pooled_embeds=randn(args.batch, pooled_width),
        time_ids=torch.tensor([[res, res, 0.0, 0.0, res, res]] * args.batch, device=device, dtype=weight_dtype),
        latent_pool=randn(pool_size, args.accum, args.batch, cfg.in_channels, latent_side, latent_side),
        scheduler=DDPMScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "_class_name": "DDPMScheduler"}),
    )


def make_optimizer(kind: str, params: list, lr: float, graph_safe: bool = False):
    """The script's optimizer with its arguments (betas 0.9/0.999, weight decay 1e-4, eps 1e-8).

    `graph_safe` asks for torch's fused AdamW with device-side step counts (capturable)."""
    common = dict(lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    if graph_safe:
        return torch.optim.AdamW(params, capturable=True, fused=True, **common), "torch AdamW (capturable, fused)"
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **common), f"bitsandbytes {bnb.__version__} AdamW8bit"
    return torch.optim.AdamW(params, **common), "torch AdamW"


def constant_schedule(optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant", optimizer=optimizer)


def noisy_inputs(run: Run, latents: torch.Tensor):
    """Noise, timesteps and noised latents for one micro-batch, as the script draws them.

    # Shapes
    latents [batch, 4, h, w] -> (noisy [batch, 4, h, w], noise [batch, 4, h, w], timesteps [batch] int64)"""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, run.scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    return run.scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def unet_forward(run: Run, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The UNet call of the script (prediction [batch, 4, h, w]); autocast is the caller's business."""
    return run.unet(noisy, timesteps, run.prompt_embeds,
                    added_cond_kwargs={"time_ids": run.time_ids, "text_embeds": run.pooled_embeds},
                    return_dict=False)[0]


def profiled(args, device: torch.device, phase: str, step) -> None:
    """With --profile: one more call of `step()` recorded by torch.profiler, its trace written as a file."""
    if args.profile is None:
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        step()
        sync(device)
    args.profile.mkdir(parents=True, exist_ok=True)
    path = args.profile / f"diffusers-{phase}.json"
    prof.export_chrome_trace(str(path))
    print(f"reference_train: profile of one {phase} step written to {path}", flush=True)


class StepTimer:
    """CUDA events around the parts of each optimizer step; read once after the timed loop (no syncs inside)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.micro: list = []
        self.optim: list = []

    def mark(self, kind: str):
        if not self.enabled:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if kind == "micro":
            self.micro.append(event)
        else:
            self.optim.append(event)
        return event

    def mean_s(self, kind: str) -> float | None:
        events = self.micro if kind == "micro" else self.optim
        if not events:
            return None
        spans = [a.elapsed_time(b) / 1000.0 for a, b in zip(events[0::2], events[1::2])]
        return sum(spans) / len(spans)


def accelerate_loop(run: Run, args, optimizer_kind: str):
    """The script's loop body through accelerate itself.

    Returns `step(group_index, timer) -> mean loss of the step's micro-steps` and the optimizer's label."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=args.accum,
                              cpu=args.device == "cpu")
    optimizer, label = make_optimizer(optimizer_kind, run.lora_params, args.lr)
    lr_scheduler = constant_schedule(optimizer)
    run.unet, optimizer, lr_scheduler = accelerator.prepare(run.unet, optimizer, lr_scheduler)

    def step(group: int, timer: StepTimer) -> float:
        losses = []
        for micro in range(args.accum):
            with accelerator.accumulate(run.unet):
                timer.mark("micro")
                noisy, noise, timesteps = noisy_inputs(run, run.latent_pool[group, micro])
                pred = unet_forward(run, noisy, timesteps)  # prepare() wrapped it in autocast + fp32 outputs
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                timer.mark("micro")
                if accelerator.sync_gradients:
                    timer.mark("optim")
                    accelerator.clip_grad_norm_(run.lora_params, 1.0)
                optimizer.step()  # accelerate skips these until the last micro-step of the group
                lr_scheduler.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    timer.mark("optim")
            losses.append(loss.detach().item())  # the script logs it every micro-step (a host sync)
        return sum(losses) / len(losses)

    return step, label


def manual_optimizer_step(run: Run, args, optimizer, latents: torch.Tensor) -> torch.Tensor:
    """One optimizer step by hand, with accelerate's semantics and no host syncs (what the CUDA graph captures).

    # Shapes
    latents [accum, batch, 4, h, w] -> summed micro-step losses [] (fp32, before the 1/accum scaling)"""
    total = torch.zeros((), device=latents.device)
    for micro in range(args.accum):
        noisy, noise, timesteps = noisy_inputs(run, latents[micro])
        # accelerate's forward wrapper: autocast to bf16, outputs back to fp32. No autocast weight cache, since
        # cached casts would outlive a graph capture.
        with torch.autocast(latents.device.type, dtype=torch.bfloat16, cache_enabled=False):
            pred = unet_forward(run, noisy, timesteps)
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        (loss / args.accum).backward()  # accelerator.backward
        total = total + loss.detach()
    torch.nn.utils.clip_grad_norm_(run.lora_params, 1.0)
    optimizer.step()
    return total


def manual_loop(run: Run, args, optimizer_kind: str):
    """The same step without accelerate, eager; returns what `accelerate_loop` returns."""
    optimizer, label = make_optimizer(optimizer_kind, run.lora_params, args.lr)
    lr_scheduler = constant_schedule(optimizer)

    def step(group: int, timer: StepTimer) -> float:
        total = manual_optimizer_step(run, args, optimizer, run.latent_pool[group])
        lr_scheduler.step()
        optimizer.zero_grad()
        return total.item() / args.accum

    return step, label


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_figures(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def time_eager(run: Run, args, device: torch.device, optimizer_kind: str) -> dict:
    """Warm-up, then the timed loop through accelerate."""
    step, label = accelerate_loop(run, args, optimizer_kind)
    pool = run.latent_pool.shape[0]
    for i in range(args.warmup):
        step(i % pool, StepTimer(False))
    reset_peak(device)
    timer = StepTimer(device.type == "cuda")
    sync(device)
    start = time.perf_counter()
    loss = float("nan")
    for i in range(args.steps):
        loss = step((args.warmup + i) % pool, timer)
    sync(device)
    seconds = time.perf_counter() - start
    profiled(args, device, "eager", lambda: step(0, StepTimer(False)))
    return {"mode": "eager (accelerate)", "optimizer": label, **step_figures(args, seconds),
            "micro_fwd_bwd_s": rounded(timer.mean_s("micro")), "optimizer_part_s": rounded(timer.mean_s("optim")),
            **memory_figures(device), "last_loss": loss}


def time_eager_fused(run: Run, args, device: torch.device) -> dict:
    """Eager steps with the graph's optimizer (torch AdamW, capturable and fused): the graph's own baseline."""
    optimizer, label = make_optimizer(args.optimizer, run.lora_params, args.lr, graph_safe=True)
    pool = run.latent_pool.shape[0]
    for i in range(args.warmup):
        manual_optimizer_step(run, args, optimizer, run.latent_pool[i % pool])
        optimizer.zero_grad()
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    total = torch.zeros(())
    for i in range(args.steps):
        total = manual_optimizer_step(run, args, optimizer, run.latent_pool[(args.warmup + i) % pool])
        optimizer.zero_grad()
    sync(device)
    seconds = time.perf_counter() - start
    return {"mode": "eager (hand-written step)", "optimizer": label, **step_figures(args, seconds),
            **memory_figures(device), "last_loss": total.item() / args.accum}


def time_cuda_graph(run: Run, args, device: torch.device) -> dict:
    """The whole optimizer step captured as one CUDA graph and replayed."""
    optimizer, label = make_optimizer(args.optimizer, run.lora_params, args.lr, graph_safe=True)
    static_latents = run.latent_pool[0].clone()
    pool = run.latent_pool.shape[0]

    # Side-stream warm-up: builds the optimizer state and the autograd/cuBLAS workspaces outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(max(args.warmup, 3)):
            static_latents.copy_(run.latent_pool[i % pool])
            manual_optimizer_step(run, args, optimizer, static_latents)
            optimizer.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    # Gradients are None at capture, so the first micro-step's backward writes them and the next ones add:
    # every replay starts from fresh gradients without a zero_grad inside the graph.
    optimizer.zero_grad(set_to_none=True)
    # Replays allocate nothing, so the allocation peak of a graph is the one its capture reaches (activations
    # come from the graph's private pool and stay reserved for it afterwards).
    reset_peak(device)
    with torch.cuda.graph(graph):
        static_loss = manual_optimizer_step(run, args, optimizer, static_latents)
    torch.cuda.synchronize()
    memory = memory_figures(device)
    for i in range(args.warmup):
        static_latents.copy_(run.latent_pool[i % pool])
        graph.replay()

    start = time.perf_counter()
    for i in range(args.steps):
        static_latents.copy_(run.latent_pool[(args.warmup + i) % pool])
        graph.replay()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory["peak_reserved_gib"] = memory_figures(device)["peak_reserved_gib"]
    profiled(args, device, "graph", graph.replay)
    return {"mode": "cuda graph (whole optimizer step)", "optimizer": label, **step_figures(args, seconds),
            **memory, "last_loss": static_loss.item() / args.accum}


def step_figures(args, seconds: float) -> dict:
    images = args.steps * args.accum * args.batch
    return {"s_per_optimizer_step": rounded(seconds / args.steps),
            "s_per_micro_step": rounded(seconds / (args.steps * args.accum)),
            "images_per_s": round(images / seconds, 3)}


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def check_loops(args, device: torch.device) -> dict:
    """accelerate's loop and the hand-written step, from the same start, must end at the same LoRA weights."""
    finals, losses = {}, {}
    initial = None
    for name, make in (("accelerate", accelerate_loop), ("manual", manual_loop)):
        run = build_run(args, device, for_graph=name == "manual")  # the model exactly as the graph captures it
        if initial is None:
            initial = [p.detach().float().clone() for p in run.lora_params]
        step, _ = make(run, args, args.optimizer)
        torch.manual_seed(args.seed + 3)
        losses[name] = [step(i % run.latent_pool.shape[0], StepTimer(False)) for i in range(args.steps)]
        finals[name] = [p.detach().float().clone() for p in run.lora_params]
        release(run)
    diff = max((a - m).abs().max().item() for a, m in zip(finals["accelerate"], finals["manual"]))
    moved = max((a - w).abs().max().item() for a, w in zip(finals["accelerate"], initial))
    return {"check_loops_max_abs_diff": diff, "check_loops_max_abs_update": moved,
            "check_loops_losses_accelerate": losses["accelerate"], "check_loops_losses_manual": losses["manual"]}


def release(run: Run | None) -> None:
    """Frees a run's model before the next phase builds its own, so each phase's peak counts one model."""
    if run is not None:
        run.unet = None
        run.lora_params.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resident_gib(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 3) if device.type == "cuda" else None


def versions() -> dict:
    import diffusers
    import peft
    import accelerate

    found = {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
             "accelerate": accelerate.__version__}
    try:
        import bitsandbytes

        found["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        found["bitsandbytes"] = None
    return found


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def summary_line(args, figures: dict) -> str:
    """The one line a phase prints: configuration, then its figures."""
    split = ""
    if figures.get("micro_fwd_bwd_s") is not None:
        split = (f" (fwd+bwd {figures['micro_fwd_bwd_s']:.4f} s/micro-step, "
                 f"optimizer part {figures['optimizer_part_s']:.4f} s)")
    allocated, reserved = figures["peak_allocated_gib"], figures["peak_reserved_gib"]
    memory = "n/a (cpu)" if allocated is None else f"{allocated:.2f} GiB allocated ({reserved:.2f} reserved)"
    size = "tiny" if args.tiny else "SDXL-base"
    return (f"reference_train: {figures['mode']}, {figures['optimizer']}, {size} UNet bf16, "
            f"LoRA r4 {args.lora_dtype}, {args.resolution} px, batch {args.batch} x accum {args.accum}, "
            f"checkpointing {'on' if args.checkpointing else 'off'}: "
            f"{figures['s_per_optimizer_step']:.4f} s/optimizer step, {figures['s_per_micro_step']:.4f} s/micro-step"
            f"{split}, {figures['images_per_s']:.2f} images/s, peak {memory}, loss {figures['last_loss']:.4f}, "
            f"max |update| {figures['max_abs_update']:.3g}")


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        # The script leaves TF32 off unless --allow_tf32; bf16 matmuls do not use it anyway.
        torch.backends.cuda.matmul.allow_tf32 = False
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "versions": versions(),
                     "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    status = 0
    t0 = time.time()
    if args.check_loops:
        check = check_loops(args, device)
        results.update(check)
        # Both paths run the same operations in the same order with the same generator: equal weights are
        # expected (a small tolerance covers reductions that may be ordered differently), and the weights must
        # have moved, or the comparison proves nothing.
        ok = (math.isfinite(check["check_loops_max_abs_diff"]) and check["check_loops_max_abs_diff"] <= 1e-6
              and check["check_loops_max_abs_update"] > 0)
        results["check_loops_ok"] = ok
        print(f"reference_train: check-loops {'ok' if ok else 'FAILED'}: accelerate vs hand-written step, "
              f"{args.steps} optimizer steps, {args.optimizer}, LoRA {args.lora_dtype}, checkpointing "
              f"{'on' if args.checkpointing else 'off'}: max |W_accelerate - W_manual| "
              f"{check['check_loops_max_abs_diff']:.3g}, max |update| {check['check_loops_max_abs_update']:.3g}, "
              f"losses {[round(x, 5) for x in check['check_loops_losses_accelerate']]} vs "
              f"{[round(x, 5) for x in check['check_loops_losses_manual']]}", flush=True)
        status = 0 if ok else 1
    else:
        phases = [("eager", lambda run: time_eager(run, args, device, args.optimizer))]
        graph_phases = {"eager_graph_optimizer", "cuda_graph"}  # models built the way the capture needs them
        if args.cuda_graph:
            if args.optimizer == "adamw8bit":
                results["cuda_graph_note"] = (
                    "bitsandbytes AdamW8bit cannot be captured: its step() calls torch.cuda.synchronize() after "
                    "every parameter and passes the step count to its kernel as a host int (frozen at capture), so "
                    "the graph uses torch AdamW (capturable=True, fused=True)")
                print(f"reference_train: note: {results['cuda_graph_note']}", flush=True)
            # The graph's like-for-like baseline: the same hand-written step and optimizer, not captured.
            phases.append(("eager_graph_optimizer", lambda run: time_eager_fused(run, args, device)))
            phases.append(("cuda_graph", lambda run: time_cuda_graph(run, args, device)))
        for name, measure in phases:
            run = None
            try:
                # A fresh model per phase: accelerate's prepare() wraps the forward of the model it is given.
                run = build_run(args, device, for_graph=name in graph_phases)
                results.setdefault("lora_parameters", sum(p.numel() for p in run.lora_params))
                results.setdefault("lora_tensors", len(run.lora_params))
                results.setdefault("attention_processor", type(next(iter(run.unet.attn_processors.values()))).__name__)
                resident = resident_gib(device)
                initial = [p.detach().to("cpu", torch.float32, copy=True) for p in run.lora_params]  # off the GPU
                figures = measure(run)
                figures["resident_before_gib"] = resident
                # Proof that the phase trained: the largest change of a LoRA weight over warm-up and timed steps.
                figures["max_abs_update"] = max((p.detach().to("cpu", torch.float32) - w).abs().max().item()
                                                for p, w in zip(run.lora_params, initial))
                results[name] = figures
                print(summary_line(args, figures), flush=True)
            except Exception as err:  # keep the other phases' figures and say what failed
                results[f"{name}_error"] = f"{type(err).__name__}: {err}"
                print(f"reference_train: {name} failed: {results[f'{name}_error']}", flush=True)
                status = 1
            finally:
                release(run)
    results["wall_s"] = round(time.time() - t0, 1)
    if args.json is not None:
        write_json(args.json, results)
    return status


if __name__ == "__main__":
    sys.exit(main())
