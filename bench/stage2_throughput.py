"""Stage-2 training step: images/s and peak memory, fused loss + fused adapter against plain torch.

    python bench/stage2_throughput.py                # CPU: demo-tiny at B=256, micro at B=4096, fp32
    python bench/stage2_throughput.py --quick        # a smoke run
    python bench/stage2_throughput.py --device cuda  # ViT-B/16 at B=4096, bf16 autocast
    python bench/train_throughput.py --stage 2       # the same, through the trainer benchmark

Both implementations run the trainer's own step (:func:`llm2clip_fast.train.stage2.train_step`, then
gradient clipping and AdamW) on the same model and weights; they differ only where this library differs
from the usual code:

- ``fused``: ``LLM2CLIPModel`` with :class:`TextAdapter` (fused Triton kernels on CUDA, the torch path
  on CPU) and the fused ``clip_loss`` (Triton on CUDA, the C++ backend on CPU): no B x B matrix;
- ``plain``: the adapter swapped for :class:`TextAdapterReference` (eager nn.Modules, same state dict)
  and OpenCLIP's materialised loss (the B x B logits, cross-entropy in both directions).

Each point runs in a fresh process. Reported: median step time, images/s, and the step's peak memory
above what exists before it (weights, gradients, AdamW state and the inputs): CUDA max-allocated, CPU
peak RSS. ``logits_mb`` is the size of one B x B fp32 matrix, for scale. On CUDA the vision tower uses
gradient checkpointing (ViT-B/16 activations at B=4096 would not fit otherwise) unless
``--micro-batch`` splits the batch into accumulation passes (the trainer's global-batch accumulation).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    add_common_args,
    cuda_peak_mb,
    machine_description,
    mark_memory_baseline,
    print_table,
    run_point_in_subprocess,
    time_fn,
    write_json,
)

IMPLS = ("fused", "plain")
CPU_POINTS = "demo-tiny:256,micro:4096"
GPU_POINTS = "vit-b-16:4096"


def materialised_clip_loss(kind: str, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                           logit_bias: torch.Tensor | None) -> torch.Tensor:
    """OpenCLIP's ``ClipLoss`` (single process): the full logits matrix and two cross-entropies."""
    if kind != "clip":
        raise ValueError("the plain stage-2 step is the CLIP loss only")
    logits_per_image = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (torch.nn.functional.cross_entropy(logits_per_image, labels)
            + torch.nn.functional.cross_entropy(logits_per_image.T, labels)) / 2


def point(impl: str, preset: str, batch: int, llm_dim: int, embed_dim: int, device: str, precision: str,
          micro_batch: int, grad_checkpointing: bool, budget_s: float) -> dict:
    """One benchmark point (runs in its own process)."""
    from llm2clip_fast.models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
    from llm2clip_fast.models.text_adapter import TextAdapterReference
    from llm2clip_fast.models.vision import VisionTower
    from llm2clip_fast.train.optim import adamw_param_groups, clip_grad_norm
    from llm2clip_fast.train.stage2 import MicroBatch, train_step

    dev = torch.device(device)
    torch.manual_seed(0)
    tower = VisionTower.from_preset(preset)
    config = LLM2CLIPConfig(vision=tower.config_dict(), embed_dim=embed_dim, llm_dim=llm_dim)
    model = LLM2CLIPModel(config, vision_tower=tower)
    if impl == "plain":
        reference = TextAdapterReference(llm_dim, embed_dim)
        reference.load_state_dict(model.text_adapter.state_dict())
        model.text_adapter = reference
    if grad_checkpointing:
        model.vision.set_gradient_checkpointing(True)
    model.to(dev).train()
    optimizer = torch.optim.AdamW(adamw_param_groups(model.named_parameters(), 0.05, lr=1e-4), lr=1e-4)
    for g in optimizer.param_groups:
        g.pop("param_names", None)

    size = model.image_size
    chunks = range(0, batch, micro_batch)
    micro = [MicroBatch(torch.randn(min(micro_batch, batch - i), 3, size, size, device=dev),
                        (torch.randn(min(micro_batch, batch - i), llm_dim, device=dev),)) for i in chunks]
    bf16 = precision == "bf16"
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    loss_fn = materialised_clip_loss if impl == "plain" else None

    def step() -> None:
        train_step(model, micro, "clip", autocast, dev, loss_fn=loss_fn)
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep .grad allocated: it belongs to the baseline

    from llm2clip_fast.ops import _backend

    _backend.clear_selections()
    step()  # allocates gradients and AdamW state, warms up kernels
    # What the fused ops recorded they ran on (the plain step calls neither op).
    backends = {"loss_backend": _backend.last_selected("clip_loss") or "materialised",
                "adapter_backend": _backend.last_selected("text_adapter") or "torch (nn.Module)"}
    result = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if dev.type == "cuda":
        peak, before = cuda_peak_mb(step, dev)
        result["step_peak_mb"] = peak - before
    else:
        mark_memory_baseline()
        step()  # the parent reads peak_above_baseline_mb
    result.update(backends)
    timing = time_fn(step, device=dev, warmup=0, min_reps=3, max_reps=20, budget_s=budget_s)
    result["step_ms"] = timing.median_ms
    result["images_per_s"] = batch / (timing.median_ms / 1000)
    return result


def parse_points(spec: str) -> list[tuple[str, int]]:
    points = []
    for item in spec.split(","):
        preset, _, batch = item.strip().partition(":")
        if not preset or not batch.isdigit() or int(batch) < 2:
            raise ValueError(f"--points: expected PRESET:BATCH items (batch >= 2), got {item!r}")
        points.append((preset, int(batch)))
    return points


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", default=None,
                        help=f"comma-separated PRESET:BATCH (CPU default {CPU_POINTS}, CUDA {GPU_POINTS})")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--llm-dim", type=int, default=None,
                        help="cached embedding size (CPU 384, CUDA 4096)")
    parser.add_argument("--embed-dim", type=int, default=None,
                        help="shared embedding size (CPU 256, CUDA 512)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="accumulation micro-batch (default: the whole batch in one pass)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of fused,plain")


def run(args: argparse.Namespace) -> int:
    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    spec = args.points or (GPU_POINTS if on_gpu else ("micro:16" if args.quick else CPU_POINTS))
    points = parse_points(spec)
    llm_dim = args.llm_dim or (4096 if on_gpu else 384)
    embed_dim = args.embed_dim or (512 if on_gpu else 256)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    budget_s = 0.05 if args.quick else 4.0

    rows = []
    for preset, batch in points:
        micro = args.micro_batch or batch
        checkpointing = on_gpu and micro == batch
        plain_ms = plain_mb = None
        for impl in impls:
            r = run_point_in_subprocess(
                "bench.stage2_throughput:point",
                {"impl": impl, "preset": preset, "batch": batch, "llm_dim": llm_dim, "embed_dim": embed_dim,
                 "device": str(dev), "precision": precision, "micro_batch": micro,
                 "grad_checkpointing": checkpointing, "budget_s": budget_s},
                timeout_s=3600,
            )
            row = {"impl": impl, "tower": preset, "batch": batch, "micro": micro, "status": r.get("status"),
                   "logits_mb": batch * batch * 4 / 2**20}
            if r.get("status") == "ok":
                keys = ("loss_backend", "adapter_backend", "step_ms", "images_per_s", "params_m")
                row.update({k: r.get(k) for k in keys})
                row["step_peak_mb"] = r.get("step_peak_mb", r.get("peak_above_baseline_mb"))
                if impl == "plain":
                    plain_ms, plain_mb = r["step_ms"], row["step_peak_mb"]
            else:
                row["error"] = str(r.get("error", ""))[-400:]
                print(f"  {impl} {preset} B={batch}: {row['status']}: {row['error']}", flush=True)
            rows.append(row)
        for row in rows:
            if row["tower"] == preset and row["batch"] == batch and plain_ms and row.get("step_ms"):
                row["speedup_vs_plain"] = plain_ms / row["step_ms"]
                if plain_mb:
                    row["mem_vs_plain"] = row["step_peak_mb"] / plain_mb
    cols = ["impl", "tower", "batch", "micro", "loss_backend", "adapter_backend", "step_ms", "images_per_s",
            "speedup_vs_plain", "step_peak_mb", "mem_vs_plain", "logits_mb", "status"]
    title = (f"stage-2 step (vision + adapter {llm_dim}->{embed_dim} + CLIP loss + AdamW), {precision}, "
             f"{dev.type}, {torch.get_num_threads()} threads")
    print_table(rows, cols, title=title)
    path = write_json(args.out, {"bench": "stage2_throughput", "device": dev.type, "precision": precision,
                                 "llm_dim": llm_dim, "embed_dim": embed_dim, "machine": machine_description(),
                                 "rows": rows})
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="bench/results/stage2_throughput.json")
    add_arguments(parser)
    return run(parser.parse_args(argv))



def gpu_check_points(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    """The ``stage2_step`` stage of bench/gpu_check.py: (name, run) pairs in priority order, each
    ``run()`` returning one result's flat metrics (optional ``status``/``note``).

    A fused stage-2 step on ViT-L/14 with cached (random) 4096-d LLM embeddings at batch 1024, bf16,
    gradient checkpointing; quick (CPU): the micro tower at batch 8.
    """
    on_gpu = device.type == "cuda"
    preset, batch, llm_dim, embed_dim = ("vit-l-14", 1024, 4096, 1280) if on_gpu else ("micro", 8, 32, 16)

    def run() -> dict:
        r = point(impl="fused", preset=preset, batch=batch, llm_dim=llm_dim, embed_dim=embed_dim,
                  device=str(device), precision="bf16" if on_gpu else "fp32", micro_batch=batch,
                  grad_checkpointing=on_gpu, budget_s=0.3 if quick else 1.0)
        r.pop("peak_above_baseline_mb", None)
        r["note"] = "fused adapter + fused CLIP loss + AdamW; cached (random) LLM embeddings"
        return r

    return [(f"stage-2 step {preset} B={batch}", run)]


if __name__ == "__main__":
    sys.exit(main())
