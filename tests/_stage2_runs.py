"""Cheap stage-2 runs for the reliability tests: a tiny demo set, a bag-of-words embedding cache (no
LLM), the micro vision preset. Imported by the test modules (not a test module itself)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from llm2clip_fast.data.demo import write_demo
from llm2clip_fast.data.embedding_cache import build_embedding_cache
from llm2clip_fast.data.sources import open_source
from llm2clip_fast.models.llm2clip import LLM2CLIPModel
from llm2clip_fast.train import stage2
from llm2clip_fast.train.__main__ import main as train_main

DIM = 24
N_TRAIN = 48


def bag_of_words(texts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), DIM)
    for i, text in enumerate(texts):
        for word in text.lower().replace(".", " ").replace(",", " ").split():
            seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=7).digest(), "little")
            out[i] += torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    return out


def make_demo(root: Path) -> dict[str, Path]:
    spec = write_demo(root / "data", n_train=N_TRAIN, n_val=0, n_long_detail_groups=0, image_size=32)["train"]
    source = open_source(spec)
    build_embedding_cache(source.iter_captions(), bag_of_words, root / "cache",
                          caption_names=source.caption_names, dim=DIM,
                          metadata={"path": "bag-of-words", "pooling": "mean"})
    return {"root": root, "data": Path(spec), "cache": root / "cache"}


def stage2_args(demo: dict[str, Path], out: Path, *extra: str, batch: int = 8, steps: int = 4) -> list[str]:
    return ["stage2", "--embeddings", str(demo["cache"]), "--data", str(demo["data"]), "--out", str(out),
            "--vision-preset", "micro", "--embed-dim", "16", "--adapter-blocks", "1",
            "--batch-size", str(batch), "--steps", str(steps), "--num-workers", "0", "--log-every", "1",
            "--no-progress", "--lr", "2e-3", *extra]


def stop_stage2_in_step(monkeypatch: pytest.MonkeyPatch, argv: list[str], step: int) -> None:
    """Run ``train_main(argv)`` and interrupt it inside its ``step``-th training step (a kill mid-step:
    that step's update is never applied, only the checkpoints saved before it remain); the real step
    is put back afterwards, ready for the ``--resume`` run."""
    real_step, calls = stage2.train_step, {"n": 0}

    def stops_in_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt(f"stopped in step {step}")
        return real_step(*a, **k)

    monkeypatch.setattr(stage2, "train_step", stops_in_step)
    with pytest.raises(KeyboardInterrupt):
        train_main(argv)
    monkeypatch.setattr(stage2, "train_step", real_step)


def final_state(run: Path) -> dict[str, torch.Tensor]:
    return LLM2CLIPModel.from_pretrained(run / "model").state_dict()


def logged_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]
