"""Stage-2 training step: our step against the best plain step on the same tower, with MFU and a breakdown.

    python bench/stage2_throughput.py                # CPU: demo-tiny at B=256, micro at B=4096, fp32
    python bench/stage2_throughput.py --quick        # a smoke run
    python bench/stage2_throughput.py --device cuda  # ViT-B/16, ViT-L/14-336 (transformers CLIP) and
                                                     # EVA02-L/14-336 (timm) at 512 per GPU, bf16
    python bench/train_throughput.py --stage 2       # the same, through the trainer benchmark

From Python, :func:`run_gpu_stage` ``(budget_s, out_dir) -> dict`` runs the CUDA plan within a time budget
(the ``stage2_step`` stage of ``bench/gpu_check.py``).

**What is compared.** One model per point (tower, batch), set up as the trainer sets it up
(:func:`llm2clip_fast.train.stage2.configure_step`: the attention kernel checked, and on CUDA timed; gradient
checkpointing chosen by memory; each vision layer ``torch.compile``d on CUDA) with the trainer's fused AdamW
over LLRD groups. Three steps share that tower, its weights and its optimizer, and differ only where this
library differs from what a user would write:

- ``fused`` (ours): the trainer's :func:`~llm2clip_fast.train.stage2.train_step` with
  :class:`TextAdapter` and the library's ``clip_loss`` (whichever backend dispatch picks);
- ``plain``: the best plain step: the eager adapter (:class:`TextAdapterReference`, sharing the same
  parameters) and a one-GEMM CLIP loss (``logits = s * I @ T.T``, cross-entropy over its rows and over its
  transpose) under ``torch.compile``;
- ``openclip``: OpenCLIP's ``ClipLoss`` as written (open_clip_torch 3.3.0 ``loss.py``: ``get_logits`` runs
  two GEMMs, ``logits_per_image`` and ``logits_per_text``) with the eager adapter: the second reference.

The steps run interleaved (round after round, each step once per round, the order rotating), so load on a
shared machine falls on all of them alike; speed ratios are medians of the per-round ratios.

**Memory.** ``step_peak_mb``: the allocator's peak of live tensor bytes during one step, above what was live
before it (weights, AdamW state, inputs; gradients are freed by the step's ``zero_grad(set_to_none=True)``, so
they count in the step): CUDA ``max_memory_allocated``, CPU the profiler's allocation events
(:func:`bench._common.cpu_peak_allocated_mb`). Earlier versions reported CPU peak RSS above an RSS baseline
taken after a warm-up step; that figure measures glibc's reuse of the warm-up step's freed heap, not the
step: identical code gave the fused demo-tiny step 707 and 792 MiB in two runs, and fused/plain ratios from
0.89x to 1.37x, while the allocator's peaks are identical on demo-tiny at B=256 (the loss is 0.25 MiB there)
and 0.75x plain on micro at B=4096. ``process_peak_rss_mb`` is still recorded, for context.

**MFU.** ``mfu = F_step / step_s / R``, with the model FLOPs (forward + backward, no recomputation)::

    F_step = 3 * B * (2*T*W_tower + 4*L*T^2*d_attn + 2*h*E + 2*W_adapter) + 6 * B * B * E

(T tokens per image, W_tower the Linear and patch-embedding weights, L layers of attention width d_attn, h the
pooled width, E the embedding size; :mod:`llm2clip_fast.train.step_flops`) and R the dense matmul rate
measured in the same run (square ``torch.mm`` in the step's dtype). The loss counts 6*B^2*E whatever the
implementation runs; recomputation (checkpointing, a recomputing fused loss) is not model work.

**Breakdown** (our step, each part timed alone, median of a few repetitions): tower forward (with the
projection and normalisation), tower backward, adapter forward+backward, loss forward+backward, optimizer
(gradient clipping + AdamW + zero_grad), communication (the gradient all-reduce: 0 in a single process).
``compile_s`` is a step's first run less its second: the tower's layers compile in the first step of the
first implementation (``fused``), the plain loss in ``plain``'s.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench._common import (
    add_common_args,
    cpu_peak_allocated_mb,
    machine_description,
    measured_matmul_tflops,
    peak_rss_mb,
    print_table,
    run_point_in_subprocess,
    write_json,
)

IMPLS = ("fused", "plain", "openclip")
CPU_POINTS = "demo-tiny:256,micro:4096"
GPU_POINTS = "vit-l-14-336:512,timm:eva02_large_patch14_clip_336:512,vit-b-16:512"


# ---------------------------------------------------------------------------------------------------------
# The reference losses (same signature as llm2clip_fast.train.stage2.contrastive_loss)


def plain_clip_loss(kind: str, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    logit_bias: torch.Tensor | None) -> torch.Tensor:
    """The best plain CLIP loss: one logits GEMM, cross-entropy over its rows and its columns."""
    if kind != "clip":
        raise ValueError("the plain stage-2 step is the CLIP loss only")
    logits = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def openclip_clip_loss(kind: str, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor | None) -> torch.Tensor:
    """OpenCLIP's ``ClipLoss`` (world size 1) as open_clip_torch 3.3.0 writes it: two logits GEMMs."""
    if kind != "clip":
        raise ValueError("the OpenCLIP stage-2 step is the CLIP loss only")
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logit_scale * text @ image.T
    labels = torch.arange(image.shape[0], device=image.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# ---------------------------------------------------------------------------------------------------------
# One point: a model, its optimizer, the three steps


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], Any], dev: torch.device) -> float:
    """Seconds of one call, the device synchronised before and after."""
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def _share_parameters(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Make ``dst``'s parameters the very Parameter objects of ``src`` (same names): one optimizer, one
    set of weights, for both adapters."""
    for name, param in src.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = dst.get_submodule(owner_name) if owner_name else dst
        setattr(owner, leaf, param)


def build_tower(spec: str):
    """A random-init tower: a preset name, or ``timm:MODEL_NAME``."""
    from llm2clip_fast.models.vision import VisionTower

    if spec.startswith("timm:"):
        return VisionTower.from_timm(spec.removeprefix("timm:"))
    return VisionTower.from_preset(spec)


def _step_args(batch: int, micro: int, precision: str, checkpointing: str, compile_tower: str,
               attention: str) -> argparse.Namespace:
    """The trainer options configure_step and build_optimizer read."""
    return argparse.Namespace(batch_size=micro, grad_accum=batch // micro, precision=precision,
                              grad_checkpointing=checkpointing, compile_tower=compile_tower,
                              attention=attention, fsdp=False, ddp_static_graph="auto", ddp_bucket_mb=25.0,
                              wd=0.05, lr=1e-5, llrd=0.85, beta2=0.98)


class StepBench:
    """The shared model and optimizer of one point, and a step function per implementation."""

    def __init__(self, tower_spec: str, batch: int, micro_batch: int, llm_dim: int, embed_dim: int,
                 device: str, precision: str, checkpointing: str, compile_tower: str, attention: str,
                 compile_loss: bool, impls: tuple[str, ...]) -> None:
        from llm2clip_fast.models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
        from llm2clip_fast.models.text_adapter import TextAdapterReference
        from llm2clip_fast.train.run_spine import autocast_factory
        from llm2clip_fast.train.stage2 import build_optimizer, configure_step

        if batch % micro_batch:
            raise ValueError(f"batch {batch} is not a multiple of the micro-batch {micro_batch}")
        self.dev = torch.device(device)
        self.batch, self.micro_batch = batch, micro_batch
        torch.manual_seed(0)
        tower = build_tower(tower_spec)
        config = LLM2CLIPConfig(vision=tower.config_dict(), embed_dim=embed_dim, llm_dim=llm_dim)
        self.model = LLM2CLIPModel(config, vision_tower=tower).to(self.dev).train()
        self.args = _step_args(batch, micro_batch, precision, checkpointing, compile_tower, attention)
        self.autocast = autocast_factory(precision, self.dev)
        self.setup = configure_step(self.args, self.model, self.dev, world_size=1)
        self.optimizer = build_optimizer(self.model, self.args, self.model.named_parameters(), fused=True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        reference = TextAdapterReference(llm_dim, embed_dim).to(self.dev)
        _share_parameters(reference, self.model.text_adapter)
        plain = plain_clip_loss
        if compile_loss:
            plain = torch.compile(plain_clip_loss)
        self.adapters = {"fused": self.model.text_adapter, "plain": reference, "openclip": reference}
        self.losses = {"fused": None, "plain": plain, "openclip": openclip_clip_loss}
        self.impls = impls
        size = self.model.image_size
        gen = torch.Generator(device=self.dev).manual_seed(1)
        self.micro = []
        from llm2clip_fast.train.stage2 import MicroBatch

        for _ in range(batch // micro_batch):
            pixels = torch.randn(micro_batch, 3, size, size, device=self.dev, generator=gen)
            text = torch.randn(micro_batch, llm_dim, device=self.dev, generator=gen)
            self.micro.append(MicroBatch(pixels, (text,)))

    def step(self, impl: str) -> Callable[[], None]:
        from llm2clip_fast.train.optim import clip_grad_norm
        from llm2clip_fast.train.stage2 import train_step

        adapter, loss_fn = self.adapters[impl], self.losses[impl]

        def run() -> None:
            self.model.text_adapter = adapter
            train_step(self.model, self.micro, "clip", self.autocast, self.dev, loss_fn=loss_fn)
            clip_grad_norm(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return run

    def peak_mb(self, impl: str) -> float:
        """The step's allocator peak above what is live before it (MiB)."""
        fn = self.step(impl)
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            fn()
            torch.cuda.synchronize(self.dev)
            return (torch.cuda.max_memory_allocated(self.dev) - before) / 2**20
        return cpu_peak_allocated_mb(fn)

    def breakdown(self, reps: int) -> dict[str, float]:
        """Milliseconds of each part of our step, timed alone (median of ``reps``)."""
        from llm2clip_fast.ops.clip_loss import clip_loss
        from llm2clip_fast.train.optim import clip_grad_norm

        model, dev, mb = self.model, self.dev, self.micro[0]
        model.text_adapter = self.adapters["fused"]
        scale = model.logit_scale_value().detach()
        times: dict[str, list[float]] = {k: [] for k in ("tower_forward", "tower_backward", "adapter", "loss",
                                                         "optimizer")}
        n_micro = len(self.micro)
        for _ in range(reps):
            holder: dict[str, torch.Tensor] = {}

            def tower_fwd(holder: dict[str, torch.Tensor] = holder) -> None:
                with self.autocast():
                    holder["img"] = model.encode_image(mb.pixel_values, normalize=True)

            def tower_bwd(holder: dict[str, torch.Tensor] = holder) -> None:
                image = holder.pop("img")
                image.backward(torch.ones_like(image))

            def adapter() -> None:
                with self.autocast():
                    txt = model.encode_text(*mb.text_inputs, normalize=True)
                txt.backward(torch.ones_like(txt))

            feats = [F.normalize(torch.randn(self.batch, model.embed_dim, device=dev), dim=-1)
                     .requires_grad_(True) for _ in range(2)]

            def loss(feats: list[torch.Tensor] = feats) -> None:
                with self.autocast():
                    value = clip_loss(feats[0], feats[1], scale)
                value.backward()

            def optimizer() -> None:
                clip_grad_norm(self.params, 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

            times["tower_forward"].append(_timed(tower_fwd, dev) * n_micro)
            times["tower_backward"].append(_timed(tower_bwd, dev) * n_micro)
            times["adapter"].append(_timed(adapter, dev) * n_micro)
            times["loss"].append(_timed(loss, dev))
            times["optimizer"].append(_timed(optimizer, dev))
        out = {k: statistics.median(v) * 1000 for k, v in times.items()}
        out["communication"] = 0.0
        return out


def _interleaved(steps: dict[str, Callable[[], None]], dev: torch.device, budget_s: float,
                 min_rounds: int = 3, max_rounds: int = 50) -> dict[str, list[float]]:
    """Seconds per step, round-robin with a rotating order, until ``budget_s`` is spent."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    spent, r = 0.0, 0
    while r < min_rounds or (r < max_rounds and spent < budget_s):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            dt = _timed(steps[n], dev)
            times[n].append(dt)
            spent += dt
        r += 1
    return times


def measure_point(tower: str, batch: int, micro_batch: int, llm_dim: int, embed_dim: int, device: str,
                  precision: str, checkpointing: str, compile_tower: str, attention: str, compile_loss: bool,
                  impls: list[str], budget_s: float, breakdown_reps: int = 3) -> dict:
    """All implementations of one point in this process: set-up, warm-up (compile time apart), memory,
    interleaved timing, breakdown and MFU. Returns ``{"rows": [...], "breakdown": {...}, ...}``."""
    from llm2clip_fast.ops import _backend
    from llm2clip_fast.train.step_flops import FORMULA, stage2_step_flops

    t0 = time.perf_counter()
    bench = StepBench(tower, batch, micro_batch, llm_dim, embed_dim, device, precision, checkpointing,
                      compile_tower, attention, compile_loss, tuple(impls))
    setup_s = time.perf_counter() - t0
    dev = bench.dev
    steps = {impl: bench.step(impl) for impl in impls}
    first, warm = {}, {}
    backends: dict[str, dict[str, str]] = {}
    for impl, fn in steps.items():
        _backend.clear_selections()
        first[impl] = _timed(fn, dev)  # compilation, autotuning, allocation
        backends[impl] = {"loss_backend": _backend.last_selected("clip_loss") or "materialised",
                          "adapter_backend": _backend.last_selected("text_adapter") or "torch (nn.Module)"}
        warm[impl] = _timed(fn, dev)
    memory = {impl: bench.peak_mb(impl) for impl in impls}
    times = _interleaved(steps, dev, budget_s)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    matmul = measured_matmul_tflops(dev, dtype, n=8192 if dev.type == "cuda" else 1024)
    flops = stage2_step_flops(bench.model, batch, batch)
    parts = bench.breakdown(breakdown_reps) if "fused" in impls else {}
    rows = []
    med = {impl: statistics.median(v) for impl, v in times.items()}
    for impl in impls:
        step_s = med[impl]
        row = {"impl": impl, "tower": tower, "batch": batch, "micro": micro_batch, "status": "ok",
               "step_ms": step_s * 1000, "images_per_s": batch / step_s, "step_peak_mb": memory[impl],
               "logits_mb": batch * batch * 4 / 2**20, "mfu": flops["total"] / step_s / (matmul * 1e12),
               "tflops": flops["total"] / step_s / 1e12, "first_step_s": first[impl],
               "compile_s": max(0.0, first[impl] - warm[impl]), "rounds": len(times[impl]),
               "round_ms": [round(t * 1000, 2) for t in times[impl]],
               "attention": bench.setup.attention.kernel,
               "grad_checkpointing": f"{bench.setup.checkpointing.mode} ({bench.setup.checkpointing.layers}/"
                                     f"{bench.setup.checkpointing.num_layers})",
               "compiled": bench.setup.compiled, **backends[impl]}
        for ref in ("plain", "openclip"):
            if ref in times and ref != impl:
                ratios = [a / b for a, b in zip(times[ref], times[impl])]
                row[f"speedup_vs_{ref}"] = statistics.median(ratios)
                row[f"mem_vs_{ref}"] = memory[impl] / memory[ref] if memory[ref] > 0 else None
        rows.append(row)
    result = {"rows": rows, "setup_s": setup_s, "matmul_tflops": matmul, "flops": flops,
              "flops_formula": FORMULA, "step": bench.setup.as_dict(), "process_peak_rss_mb": peak_rss_mb(),
              "threads": torch.get_num_threads()}
    if parts:
        total = med["fused"] * 1000
        result["breakdown"] = {"tower": tower, "batch": batch, "step_ms": total, **parts,
                               "sum_of_parts_ms": sum(parts.values()),
                               "share": {k: v / total for k, v in parts.items()}}
    return result


def parse_points(spec: str) -> list[tuple[str, int]]:
    """``TOWER:BATCH`` items; TOWER a preset or ``timm:MODEL_NAME``."""
    points = []
    for item in spec.split(","):
        tower, _, batch = item.strip().rpartition(":")
        if not tower or not batch.isdigit() or int(batch) < 2:
            raise ValueError(f"--points: expected TOWER:BATCH items (batch >= 2, TOWER a preset or "
                             f"timm:MODEL_NAME), got {item!r}")
        points.append((tower, int(batch)))
    return points


def sweep(points: list[tuple[str, int]], *, device: str, precision: str, llm_dim: int, embed_dim: int,
          micro_batch: int | None, checkpointing: str, compile_tower: str, attention: str, compile_loss: bool,
          impls: list[str], budget_s: float, deadline: float | None = None,
          threads: int | None = None) -> dict:
    """Each point in a fresh process (its memory and compile caches its own); ``deadline``
    (``time.monotonic()``): points that would start after it are recorded as skipped."""
    rows, breakdowns, points_out = [], [], []
    for tower, batch in points:
        base = {"tower": tower, "batch": batch, "micro": micro_batch or batch}
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < 30:
            rows += [{**base, "impl": impl, "status": "skipped", "error": "time budget spent"}
                     for impl in impls]
            continue
        r = run_point_in_subprocess(
            "bench.stage2_throughput:measure_point",
            {"tower": tower, "batch": batch, "micro_batch": micro_batch or batch, "llm_dim": llm_dim,
             "embed_dim": embed_dim, "device": device, "precision": precision, "checkpointing": checkpointing,
             "compile_tower": compile_tower, "attention": attention, "compile_loss": compile_loss,
             "impls": impls, "budget_s": budget_s},
            timeout_s=3600 if left is None else max(30.0, left),
            env={"OMP_NUM_THREADS": str(threads)} if threads else None)
        if r.get("status") != "ok":
            error = str(r.get("error", ""))[-600:]
            print(f"  {tower} B={batch}: {r.get('status')}: {error}", flush=True)
            rows += [{**base, "impl": impl, "status": r.get("status"), "error": error} for impl in impls]
            continue
        rows += r["rows"]
        if r.get("breakdown"):
            breakdowns.append(r["breakdown"])
        keep = ("setup_s", "matmul_tflops", "flops", "step", "process_peak_rss_mb", "threads")
        points_out.append({"tower": tower, "batch": batch, **{k: r[k] for k in keep if k in r}})
    return {"rows": rows, "breakdowns": breakdowns, "points": points_out}


ROW_COLUMNS = ["impl", "tower", "batch", "loss_backend", "attention", "grad_checkpointing", "step_ms",
               "images_per_s", "speedup_vs_plain", "speedup_vs_openclip", "step_peak_mb", "mem_vs_plain",
               "logits_mb", "mfu", "compile_s", "status"]
BREAKDOWN_COLUMNS = ["tower", "batch", "step_ms", "tower_forward", "tower_backward", "adapter", "loss",
                     "optimizer", "communication", "sum_of_parts_ms"]


def run_gpu_stage(budget_s: float, out_dir: str | Path, quick: bool = False) -> dict:
    """The CUDA plan (``bench/gpu_check.py``'s ``stage2_step`` stage): ViT-L/14-336 (transformers CLIP),
    EVA02-L/14-336 (timm) and ViT-B/16, 512 images per GPU, bf16, our step against the best plain step
    and OpenCLIP's, interleaved; MFU, breakdown, attention kernel, checkpointing and compile time per
    point; then the GPU JPEG decode rate (``bench/loader_throughput.py``). Points run most important
    first, each in its own process, and are recorded as skipped once ``budget_s`` is spent (all three
    take about 8 minutes on one H100). ``quick``: the same code on CPU at a tiny size (the micro tower, 16
    images, fp32), for gpu_check's ``--quick``. Writes ``out_dir/stage2_step.json`` and returns its
    content (``status`` "ok", "partial" or "error")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    device = "cpu" if quick else "cuda"
    if not quick and not torch.cuda.is_available():
        doc = {"bench": "stage2_throughput", "device": "cuda", "status": "error", "rows": [],
               "error": "torch sees no CUDA device"}
        write_json(out_dir / "stage2_step.json", doc)
        return doc
    points = parse_points("micro:16" if quick else GPU_POINTS)
    skipped = []
    timm_problem = _timm_importable()
    if timm_problem is not None:
        skipped = [{"tower": t, "batch": b, "impl": i, "status": "skipped", "error": timm_problem}
                   for t, b in points if t.startswith("timm:") for i in IMPLS]
        points = [(t, b) for t, b in points if not t.startswith("timm:")]
    per_point = 0.05 if quick else max(5.0, min(20.0, budget_s / 20))
    result = sweep(points, device=device, precision="fp32" if quick else "bf16",
                   llm_dim=32 if quick else 4096, embed_dim=16 if quick else 1280, micro_batch=None,
                   checkpointing="auto", compile_tower="auto", attention="auto", compile_loss=not quick,
                   impls=list(IMPLS), budget_s=per_point, deadline=start + budget_s)
    result["rows"] += skipped
    result["gpu_decode"] = _gpu_decode_entry(device, quick, start + budget_s)
    statuses = {r.get("status") for r in result["rows"]}
    status = "ok" if statuses == {"ok"} else ("error" if "ok" not in statuses else "partial")
    doc = {"bench": "stage2_throughput", "device": device, "precision": "fp32" if quick else "bf16",
           "status": status, "machine": machine_description(), "seconds": time.monotonic() - start, **result}
    write_json(out_dir / "stage2_step.json", doc)
    print_table(doc["rows"], ROW_COLUMNS, title=f"stage-2 step, {device}, {doc['precision']}, per GPU")
    if doc["breakdowns"]:
        print_table(doc["breakdowns"], BREAKDOWN_COLUMNS, title="our step, ms per part")
    print(f"GPU JPEG decode: {doc['gpu_decode']}")
    return doc


def _gpu_decode_entry(device: str, quick: bool, deadline: float) -> dict[str, Any]:
    """The GPU half of ``--decode gpu`` on 1024x768 JPEGs at 336 pixels (images/s), or why not."""
    import tempfile

    from bench.loader_throughput import gpu_decode_rate, write_jpeg_set

    if time.monotonic() > deadline - 20:
        return {"status": "skipped", "error": "time budget spent"}
    with tempfile.TemporaryDirectory(prefix="gpu_decode_") as tmp:
        spec = str(write_jpeg_set(Path(tmp), 8 if quick else 128))
        try:
            return {"size": 336, "batch": 64, **gpu_decode_rate(spec, 336, 64, reps=1 if quick else 3,
                                                               device="cuda" if not quick else device)}
        except Exception as exc:  # reported, not raised: the step results above stand
            return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


def _timm_importable() -> str | None:
    """None when timm imports, else why not (the EVA02 point is then skipped)."""
    try:
        from llm2clip_fast.models import timm_vision

        timm_vision.import_timm()
    except Exception as exc:  # any import failure is a reason to skip, reported as is
        return f"timm is not importable: {exc}"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", default=None,
                        help=f"comma-separated TOWER:BATCH, TOWER a preset or timm:MODEL_NAME (CPU default "
                        f"{CPU_POINTS}, CUDA {GPU_POINTS})")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--llm-dim", type=int, default=None,
                        help="cached embedding size (CPU 384, CUDA 4096)")
    parser.add_argument("--embed-dim", type=int, default=None,
                        help="shared embedding size (CPU 256, CUDA 1280)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="accumulation micro-batch (default: the whole batch in one pass)")
    parser.add_argument("--grad-checkpointing", choices=("auto", "none", "selective", "full"), default="auto")
    parser.add_argument("--compile-tower", choices=("auto", "on", "off"), default="auto",
                        help="per-layer torch.compile of the tower (auto: the trainer's choice, on on CUDA)")
    parser.add_argument("--attention", default="auto", help="attention kernel (auto: the trainer's choice)")
    parser.add_argument("--compile-loss", choices=("on", "off"), default=None,
                        help="torch.compile the plain step's loss (default on; off with --quick)")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per point (default: torch's; on a loaded machine 1 avoids OpenMP "
                        "barrier stalls that slow 2-thread steps by 10-80x)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds of interleaved timing per point (default 20, --quick 0.05)")


def run(args: argparse.Namespace) -> int:
    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    spec = args.points or (GPU_POINTS if on_gpu else ("micro:16" if args.quick else CPU_POINTS))
    points = parse_points(spec)
    llm_dim = args.llm_dim or (4096 if on_gpu else 384)
    embed_dim = args.embed_dim or (1280 if on_gpu else 256)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls:
        raise ValueError(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    budget_s = args.budget_s if args.budget_s is not None else (0.05 if args.quick else 20.0)
    compile_loss = (args.compile_loss or ("off" if args.quick else "on")) == "on"
    result = sweep(points, device=str(dev), precision=precision, llm_dim=llm_dim, embed_dim=embed_dim,
                   micro_batch=args.micro_batch, checkpointing=args.grad_checkpointing,
                   compile_tower=args.compile_tower, attention=args.attention, compile_loss=compile_loss,
                   impls=impls, budget_s=budget_s, threads=args.threads)
    title = (f"stage-2 step (vision + adapter {llm_dim}->{embed_dim} + CLIP loss + AdamW), {precision}, "
             f"{dev.type}, {args.threads or torch.get_num_threads()} threads; ratios from interleaved rounds")
    print_table(result["rows"], ROW_COLUMNS, title=title)
    if result["breakdowns"]:
        print_table(result["breakdowns"], BREAKDOWN_COLUMNS, title="our step, ms per part (each timed alone)")
    path = write_json(args.out, {"bench": "stage2_throughput", "device": dev.type, "precision": precision,
                                 "llm_dim": llm_dim, "embed_dim": embed_dim, "machine": machine_description(),
                                 **result})
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="bench/results/stage2_throughput.json")
    add_arguments(parser)
    return run(parser.parse_args(argv))




def gpu_check_points(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    """The ``stage2_step`` stage of bench/gpu_check.py: (name, run) pairs, most important first.

    Each runs one point of :data:`GPU_POINTS` (512 images per GPU, bf16, 4096-d cached LLM embeddings,
    1280-d shared space) in its own process: our step against the best plain step, interleaved, with
    checkpointing, per-layer compile and the attention kernel chosen as the trainer chooses them; the
    stage's time limit cuts the list where it must (results are written one by one). ``quick`` (CPU):
    the micro tower at 16 images. For the full sweep with OpenCLIP's step and the GPU decode rate, see
    :func:`run_gpu_stage`.
    """
    on_gpu = device.type == "cuda"
    points = parse_points(GPU_POINTS if on_gpu else "micro:16")
    impls = ["fused", "plain"]

    def measure(tower: str, batch: int) -> dict:
        if tower.startswith("timm:"):
            problem = _timm_importable()
            if problem is not None:
                return {"status": "skipped", "note": problem}
        r = run_point_in_subprocess(
            "bench.stage2_throughput:measure_point",
            {"tower": tower, "batch": batch, "micro_batch": batch, "llm_dim": 4096 if on_gpu else 32,
             "embed_dim": 1280 if on_gpu else 16, "device": str(device),
             "precision": "bf16" if on_gpu else "fp32", "checkpointing": "auto", "compile_tower": "auto",
             "attention": "auto", "compile_loss": on_gpu, "impls": impls,
             "budget_s": 5.0 if on_gpu else 0.05, "breakdown_reps": 1},
            timeout_s=600)
        if r.get("status") != "ok":
            return {"status": "error", "note": str(r.get("error", ""))[-400:]}
        flat: dict = {"matmul_tflops": r["matmul_tflops"], "setup_s": r["setup_s"]}
        for row in r["rows"]:
            impl = row["impl"]
            for key in ("step_ms", "images_per_s", "mfu", "step_peak_mb", "compile_s"):
                flat[f"{impl}_{key}"] = row[key]
            if impl == "fused":
                flat.update(speedup_vs_plain=row.get("speedup_vs_plain"), attention=row["attention"],
                            grad_checkpointing=row["grad_checkpointing"], compiled=str(row["compiled"]),
                            loss_backend=row["loss_backend"], adapter_backend=row["adapter_backend"])
        for part, ms in (r.get("breakdown") or {}).items():
            if part not in ("tower", "batch", "share") and isinstance(ms, (int, float)):
                flat[f"part_{part}_ms"] = ms
        flat["note"] = "ours vs the best plain step (same compiled tower, SDPA, fused AdamW), interleaved"
        return {k: v for k, v in flat.items() if v is not None}

    return [(f"stage-2 step {t} B={b}", lambda t=t, b=b: measure(t, b)) for t, b in points]


if __name__ == "__main__":
    sys.exit(main())
