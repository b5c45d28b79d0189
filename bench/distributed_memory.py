"""Per-rank peak memory of the global-batch losses against OpenCLIP-style gathering (gloo, CPU).

For each provider, ``--world`` processes (default 2) are started with gloo; each holds B/world rows
of a global batch B (default 16384) with D features (default 512) and runs one forward+backward
of the loss. Reported per rank: peak RSS above the baseline taken once the inputs exist and the
provider has run once at a tiny size (so library loading and gloo set-up are not counted), and the
step's time.

Providers:
- ``global-clip``: :func:`llm2clip_fast.ops.clip_loss.clip_loss_global` (texts gathered, one fused
  pass over local rows x global columns, column LSE partials all-reduced, text gradients
  reduce-scattered).
- ``openclip-clip``: OpenCLIP ``ClipLoss(local_loss=True, gather_with_grad=True)``: all features
  gathered with autograd, two B_local x B_global logit matrices.
- ``global-siglip``: :func:`llm2clip_fast.ops.siglip_loss.siglip_loss_global`.
- ``openclip-siglip``: OpenCLIP ``SigLipLoss(dist_impl="gather")``: texts gathered with autograd,
  one B_local x B_local logit block per rank, all kept for the backward.

Target (issue 5): per-rank peak of the global loss at most 1/10 of OpenCLIP-style gathering.

Example::

    python bench/distributed_memory.py               # B=16384, D=512, 2 ranks, all providers
    python bench/distributed_memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench._common import (
    machine_description,
    mark_memory_baseline,
    peak_rss_mb,
    print_table,
    write_json,
)

PROVIDERS = ("global-clip", "openclip-clip", "global-siglip", "openclip-siglip")
TARGET_RATIO = 1 / 10


def openclip_clip_gather(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
    """OpenCLIP ClipLoss(local_loss=True, gather_with_grad=True).forward on one rank."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    rank = dist.get_rank()
    all_img = torch.cat(dist_nn.all_gather(img))
    all_txt = torch.cat(dist_nn.all_gather(txt))
    logits_per_image = scale * img @ all_txt.T
    logits_per_text = scale * txt @ all_img.T
    labels = torch.arange(img.shape[0]) + img.shape[0] * rank
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def openclip_siglip_gather(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
    """OpenCLIP SigLipLoss(dist_impl="gather").forward on one rank: a block per rank's texts."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    rank, world = dist.get_rank(), dist.get_world_size()

    def block(text: torch.Tensor, negative_only: bool) -> torch.Tensor:
        logits = scale * img @ text.T + bias
        n = img.shape[0]
        labels = -torch.ones((n, n), dtype=img.dtype)
        if not negative_only:
            labels = 2 * torch.eye(n, dtype=img.dtype) + labels
        return -F.logsigmoid(labels * logits).sum() / n

    texts = dist_nn.all_gather(txt)
    loss = block(txt, negative_only=False)
    for r in range(world):
        if r != rank:
            loss = loss + block(texts[r], negative_only=True)
    return loss


def _global_clip(img, txt, scale, bias):
    from llm2clip_fast.ops.clip_loss import clip_loss_global

    return clip_loss_global(img, txt, scale)


def _global_siglip(img, txt, scale, bias):
    from llm2clip_fast.ops.siglip_loss import siglip_loss_global

    return siglip_loss_global(img, txt, scale, bias)


_LOSSES = {
    "global-clip": _global_clip,
    "openclip-clip": openclip_clip_gather,
    "global-siglip": _global_siglip,
    "openclip-siglip": openclip_siglip_gather,
}


def worker(rank: int, world: int, port: str, provider: str, batch: int, dim: int, out: str) -> None:
    """One rank: inputs, a tiny warm-up, baseline, one measured forward+backward; JSON to ``out``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from llm2clip_fast.distributed import destroy_distributed, init_distributed_from_env

    init_distributed_from_env(backend="gloo", timeout_s=1800)
    loss_fn = _LOSSES[provider]
    gen = torch.Generator().manual_seed(1000 + rank)

    def leaves(rows: int) -> list[torch.Tensor]:
        img = F.normalize(torch.randn(rows, dim, generator=gen), dim=-1).requires_grad_()
        txt = F.normalize(torch.randn(rows, dim, generator=gen), dim=-1).requires_grad_()
        return [img, txt, torch.tensor(1 / 0.07, requires_grad=True), torch.tensor(-10.0, requires_grad=True)]

    from llm2clip_fast.ops import _backend

    loss_fn(*(warm := leaves(8))).backward()  # library loading, gloo buffers, C++ ops: not the loss's memory
    del warm
    inputs = leaves(batch // world)
    torch.distributed.barrier()
    mark_memory_baseline()
    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    loss = loss_fn(*inputs)
    loss.backward()
    step_s = time.perf_counter() - t0
    peak = peak_rss_mb()
    # The op the global losses run per rank, as it recorded it (the OpenCLIP providers call no op).
    op = "clip_loss" if provider.endswith("clip") and not provider.endswith("siglip") else "siglip_loss"
    backend = _backend.last_selected(op) if provider.startswith("global") else "torch (materialised)"
    result = {"rank": rank, "backend": backend, "loss": float(loss), "step_s": step_s, "peak_rss_mb": peak,
              "baseline_rss_mb": baseline, "peak_above_baseline_mb": peak - baseline,
              "inputs_mb": sum(t.numel() * t.element_size() for t in inputs[:2]) / 2**20}
    Path(out).write_text(json.dumps(result))
    destroy_distributed()


def _free_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_provider(provider: str, world: int, batch: int, dim: int, timeout_s: float) -> list[dict[str, Any]]:
    """Start ``world`` ranks for one provider; one row per rank ("OOM"/"error"/"timeout" on failure)."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        procs = [
            subprocess.Popen([*cmd, str(r), str(world), port, provider, str(batch), str(dim), outs[r]],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(world)
        ]
        deadline = time.monotonic() + timeout_s
        logs: list[str] = []
        timed_out = False
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        rows = []
        for r, p in enumerate(procs):
            base = {"provider": provider, "world": world, "B": batch, "D": dim, "rank": r}
            if os.path.exists(outs[r]):
                rows.append({**base, "status": "ok", **json.loads(Path(outs[r]).read_text())})
            elif timed_out:
                rows.append({**base, "status": "timeout"})
            elif p.returncode in (-9, 137):
                rows.append({**base, "status": "OOM", "error": "killed (SIGKILL, likely the OOM killer)"})
            else:
                tail = logs[r][-1500:] if r < len(logs) else ""
                rows.append({**base, "status": "error", "returncode": p.returncode, "error": tail})
        return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def worst(provider: str) -> float | None:
        mine = [r for r in rows if r["provider"] == provider]
        if not mine or any(r["status"] != "ok" for r in mine):
            return None
        return max(r["peak_above_baseline_mb"] for r in mine)

    out = {}
    for loss in ("clip", "siglip"):
        ours, theirs = worst(f"global-{loss}"), worst(f"openclip-{loss}")
        if ours is None or theirs is None:
            continue
        ratio = ours / max(theirs, 1e-9)
        out[loss] = {"global_peak_mb": ours, "openclip_peak_mb": theirs, "ratio": ratio,
                     "target": TARGET_RATIO, "ok": ratio <= TARGET_RATIO}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        rank, world, port, provider, batch, dim, out = argv[1:8]
        worker(int(rank), int(world), port, provider, int(batch), int(dim), out)
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: B=128, D=16, the two CLIP providers unless --providers is given")
    parser.add_argument("--world", type=int, default=2, help="number of gloo ranks")
    parser.add_argument("--batch", type=int, default=16384, help="global batch B (split evenly over ranks)")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension D")
    parser.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS)
    parser.add_argument("--timeout-s", type=float, default=1800, help="per provider")
    parser.add_argument("--out", default="bench/results/distributed_memory.json")
    args = parser.parse_args(argv)
    batch, dim = (128, 16) if args.quick else (args.batch, args.dim)
    providers = args.providers or (["global-clip", "openclip-clip"] if args.quick else list(PROVIDERS))
    if args.world < 2 or batch % args.world:
        parser.error(f"--world must be >= 2 and divide --batch; got world={args.world}, batch={batch}")

    rows: list[dict[str, Any]] = []
    columns = ["provider", "backend", "rank", "B", "D", "status", "step_s", "peak_above_baseline_mb",
               "inputs_mb"]
    for provider in providers:
        rows += run_provider(provider, args.world, batch, dim, args.timeout_s)
        print_table(rows[-args.world:], columns)
    print()
    print_table(rows, columns, title=f"per-rank peak RSS above baseline, gloo, {args.world} ranks")
    summary = _summary(rows)
    for loss, s in summary.items():
        verdict = "ok" if s["ok"] else "MISSED"
        print(f"{loss}: global {s['global_peak_mb']:.1f} MB vs OpenCLIP-style {s['openclip_peak_mb']:.1f} MB "
              f"per rank -> ratio {s['ratio']:.4f} (target <= {TARGET_RATIO:g}: {verdict})")
    path = write_json(args.out, {"machine": machine_description(), "world": args.world, "B": batch, "D": dim,
                                 "rows": rows, "summary": summary})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
