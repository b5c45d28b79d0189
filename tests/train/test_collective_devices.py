"""Every tensor handed to a torch.distributed collective lives on the trainer's device (2-rank gloo).

NCCL, the backend of every multi-GPU run, takes only tensors on the rank's own GPU; a collective fed
``torch.tensor([n])`` (no ``device=``, so on the CPU) raises there. This machine has no GPU: the
trainer's device *is* the CPU, so such a tensor lands on the right device by accident and a bare
``tensor.device == trainer_device`` check could never fail. Two pieces make the test able to fail:

- :class:`PlacementTracker`, a ``TorchFunctionMode`` active in each rank during the whole run, marks
  every tensor made without a chosen device: a factory call (``torch.tensor``, ``torch.zeros``, ...)
  without ``device=``, and everything computed from a marked tensor. An
  explicit placement (``.to(device)``, ``device=`` on any call) clears the mark. On a GPU run a
  marked tensor is exactly one that sits on the CPU while the trainer runs on ``cuda:r``.
- :func:`install_collective_checks` wraps every collective on ``torch.distributed`` (the training code,
  FSDP and ``torch.distributed.nn`` all call through that module's attributes) and records, per call
  site in ``llm2clip_fast``, each tensor that is marked or not on the trainer's device. The collective
  still runs, so a violation never leaves the other rank waiting.

Limitations: ``x.to("cpu")`` and ``x.to(device)`` look the same when ``device`` is the CPU, and a move
to the CPU returns ``x`` itself here, so the mark follows the object: ``y = x.to(device)`` also clears
``x``'s mark, and ``.cpu()`` cannot be told apart. The test catches tensors whose device was never
chosen, which is how this defect (and its kind) arises.

The parent then asserts no violations, and that the wrapper saw every collective call site of both
trainers and of the distributed losses (so a test that silently intercepted nothing cannot pass).
"""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from _ranks import free_port, free_ports, run_in_turn, run_on_ranks
from _stage2_runs import bag_of_words, stage2_args

import llm2clip_fast
from llm2clip_fast.data.demo import write_demo
from llm2clip_fast.data.embedding_cache import build_embedding_cache
from llm2clip_fast.data.sources import open_source

PACKAGE = str(Path(llm2clip_fast.__file__).parent)
_MARK = "_llm2clip_unplaced"

# Factories that put their result on the default device (the CPU) unless given device=.
_FACTORIES = frozenset({
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
    torch.rand, torch.randn, torch.randint, torch.linspace, torch.logspace, torch.eye, torch.scalar_tensor,
    torch.empty_strided,
})


def _is_marked(t: torch.Tensor) -> bool:
    return getattr(t, _MARK, False)


def _set_mark(obj: Any, marked: bool) -> None:
    for t in tree_flatten(obj)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _MARK, marked)
            except (AttributeError, RuntimeError):
                pass  # a few C-level tensor kinds take no attributes; they are never collective inputs


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _places_explicitly(func: Any, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("device") is not None:
        return True
    if func in (torch.Tensor.to, torch.Tensor.cuda):
        if func is torch.Tensor.cuda:
            return True
        return any(isinstance(a, (torch.device, str, int, torch.Tensor)) for a in args[1:2])
    return False


class PlacementTracker(TorchFunctionMode):
    """Marks tensors whose device nobody chose (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _places_explicitly(func, args, kwargs):
            _set_mark(out, False)
        elif func in _FACTORIES:
            copies = func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], torch.Tensor)
            _set_mark(out, _is_marked(args[0]) if copies else True)
        else:
            inputs = _tensors((args, kwargs))
            if any(_is_marked(t) for t in inputs):
                # In-place results (the input object itself) keep their own placement.
                _set_mark([t for t in _tensors(out) if not any(t is i for i in inputs)], True)
        return out


# Collectives on torch.distributed. Object collectives take Python objects: only their call sites are
# recorded; the device they stage on (the current one) is what check_collective_device verifies.
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "gather", "scatter",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "barrier",
    "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "batch_isend_irecv",
)


def _call_site() -> str:
    """The innermost llm2clip_fast frame calling the collective, as ``module.function``."""
    for frame in traceback.extract_stack()[::-1]:
        if frame.filename.startswith(PACKAGE):
            module = Path(frame.filename).relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
            return f"{module}.{frame.name}"
    return "<outside llm2clip_fast>"


def install_collective_checks(expected: torch.device, sites: dict[str, int], bad: list[str]) -> None:
    """Wrap torch.distributed's collectives: record call sites and tensors not placed on ``expected``."""
    for name in COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:
            continue

        @functools.wraps(real)
        def checked(*args, _real=real, _name=name, **kwargs):
            site = _call_site()
            sites[site] = sites.get(site, 0) + 1
            if _name == "barrier" and kwargs.get("device_ids"):
                ids = kwargs["device_ids"]
                if expected.type != "cuda" or ids != [expected.index]:
                    bad.append(f"{site}: barrier(device_ids={ids}) but the trainer runs on {expected}")
            # batch_isend_irecv takes P2POp objects: their tensors are what travels.
            p2p = [op.tensor for op in args[0]] if _name == "batch_isend_irecv" else []
            for t in _tensors((args, kwargs)) + p2p:
                if t.device != expected:
                    bad.append(f"{site}: {_name} got a tensor on {t.device}, the trainer runs on {expected}")
                elif _is_marked(t):
                    bad.append(f"{site}: {_name} got a tensor whose device was never chosen (made without "
                               "device=): on a GPU run it would be on the CPU")
            return _real(*args, **kwargs)

        setattr(dist, name, checked)


def test_tracker_marks_tensors_whose_device_was_never_chosen():
    cpu = torch.device("cpu")
    with PlacementTracker():
        unplaced = torch.tensor([3])
        derived = unplaced.clone() - 1
        host = torch.as_tensor(np.ones(2))
        placed = torch.tensor([3], device=cpu)
        moved = (unplaced * 2).to(cpu)
        like = torch.zeros_like(unplaced, device=cpu)
        buffer = torch.zeros(2, device=cpu)
        buffer[:1] = unplaced  # in place: the buffer keeps its own placement
    assert _is_marked(unplaced) and _is_marked(derived) and _is_marked(host)
    assert not any(_is_marked(t) for t in (placed, moved, like, buffer))


def test_check_collective_device_refuses_a_device_the_group_does_not_exchange():
    from llm2clip_fast.distributed import check_collective_device
    from llm2clip_fast.ops.clip_loss import clip_loss

    check_collective_device("meta")  # single process: no collectives, nothing to check
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        check_collective_device("cpu")
        with pytest.raises(ValueError, match=r"tensors on meta, but the process group's backend 'gloo'"):
            check_collective_device(torch.device("meta"))
        x = torch.randn(3, 4, device="meta")
        with pytest.raises(ValueError, match=r"tensors on meta, but the process group's backend 'gloo'"):
            clip_loss(x, x, 2.0, distributed=True)  # the distributed losses check their features' device
    finally:
        dist.destroy_process_group()


# ---- the 2-rank run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("collectives")
    spec = write_demo(root / "data", n_train=32, n_val=0, n_long_detail_groups=0, image_size=32)["train"]
    source = open_source(spec)
    from _stage2_runs import DIM

    build_embedding_cache(source.iter_captions(), bag_of_words, root / "cache",
                          caption_names=source.caption_names, dim=DIM)
    return {"root": root, "data": Path(spec), "cache": root / "cache"}


def _stage1_args(data: Path, out: Path, *extra: str) -> list[str]:
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path

    return ["stage1", "--llm", str(packaged_minilm_path()), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--steps", "2", "--eval-fraction", "0", "--quiet", "--max-length", "32",
            "--lora-r", "2", "--num-workers", "0", *extra]


def _rank_main(rank: int, runs: list[list[str]], ports: list[int]) -> tuple[dict[str, int], list[str]]:
    """One rank (forked: the parent's imports are reused): every run in turn, each on its own port (stage
    1 tears its process group down at the end, and a new group on the old port could meet the old store
    still closing). Returns (sites, violations)."""
    from llm2clip_fast.train.__main__ import main as train_main

    sites: dict[str, int] = {}
    bad: list[str] = []
    install_collective_checks(torch.device("cpu"), sites, bad)  # every run passes --device cpu
    with PlacementTracker():
        run_in_turn(train_main, runs, ports)
    return sites, bad


# Where the library hands tensors to collectives; each must be seen at least once in the runs.
EXPECTED_SITES = {
    "train.stage2.equalise_across_ranks", "train.stage2.global_loss", "train.stage2.average_replicated_grads",
    "train.stage2._gather_objects", "distributed.barrier", "distributed.gather_batch_sizes",
    "distributed.all_gather_rows", "distributed.reduce_scatter_rows", "distributed.logsumexp_across_ranks",
    "ops.clip_loss.backward", "distributed.mean_over_ranks", "distributed.average_gradients",
    "ops.global_batch_ring.exchange",
}


def _run_two_ranks(runs: list[list[str]]) -> list[tuple[dict[str, int], list[str]]]:
    return run_on_ranks(functools.partial(_rank_main, runs=runs, ports=free_ports(len(runs))), world=2,
                        group=False)


@pytest.mark.distributed
@pytest.mark.slow
def test_every_collective_gets_tensors_on_the_trainer_device(data, tmp_path):
    runs = [
        # DDP, CLIP loss, a random caption per sample; the final save gathers every rank's RNG state.
        stage2_args(data, tmp_path / "ddp", "--device", "cpu", "--caption", "random", "--save-every", "0",
                    steps=2, batch=4),
        # FSDP2 (replicated logit scale/bias averaged by hand), SigLIP, gradient accumulation.
        stage2_args(data, tmp_path / "fsdp", "--device", "cpu", "--fsdp", "--loss", "siglip",
                    "--grad-accum", "2", "--save-every", "0", steps=1, batch=2),
        # Stage 1 with the packaged MiniLM: InfoNCE over all ranks' keys, then the fused CLIP loss.
        _stage1_args(data["data"], tmp_path / "s1_infonce", "--loss", "infonce", "--learn-scale"),
        _stage1_args(data["data"], tmp_path / "s1_clip", "--loss", "clip"),
    ]
    per_rank = _run_two_ranks(runs)
    for rank, (sites, bad) in enumerate(per_rank):
        assert not bad, f"rank {rank}:\n" + "\n".join(sorted(set(bad)))
        missing = EXPECTED_SITES - set(sites)
        assert not missing, f"rank {rank}: no collective seen from {sorted(missing)}; saw {sorted(sites)}"
