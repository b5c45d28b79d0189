"""Cheap stage-2 runs for the reliability tests: a tiny demo set, a bag-of-words embedding cache (no
LLM), the micro vision preset. Imported by the test modules (not a test module itself)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from llm2clip_fast.data.demo import write_demo
from llm2clip_fast.data.embedding_cache import build_embedding_cache
from llm2clip_fast.data.sources import open_source
from llm2clip_fast.models.llm2clip import LLM2CLIPModel

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


def final_state(run: Path) -> dict[str, torch.Tensor]:
    return LLM2CLIPModel.from_pretrained(run / "model").state_dict()


def logged_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]
