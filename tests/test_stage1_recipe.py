"""Stage 1 as LLM2CLIP trains it: text-only sources, non-finite stops, the hard-negative loss, per-direction
query instructions, the llm2clip recipe (tiny Llama, CPU, a few steps)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from llm2clip_fast.models.tiny_llm import build_tiny_llm
from llm2clip_fast.train import stage1
from llm2clip_fast.train.checkpoint import list_checkpoints, load_checkpoint

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "llama", "llama", hidden_size=32, num_layers=1,
                          num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def text_manifest(tmp_path_factory):
    """A JSONL manifest with key, short, long and hard-negative captions, and no image column."""
    rows = []
    for i in range(24):
        c, s = COLOURS[i % 6], SHAPES[i % 4]
        other = COLOURS[(i + 1) % 6]
        rows.append({"key": f"t{i}", "short": f"a {c} {s}",
                     "long": f"a photo of a {c} {s} above a small {other} square on a white background",
                     "hard": f"a photo of a {other} {s} above a small {c} square on a white background"})
    path = tmp_path_factory.mktemp("text") / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(llm, data, out, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)
    return parser.parse_args(["--llm", str(llm), "--data", str(data), "--out", str(out), "--batch-size", "8",
                              "--eval-fraction", "0", "--quiet", "--max-length", "48", *extra])


def test_text_only_manifest_is_valid_for_stage1_and_embed(tiny, text_manifest, tmp_path):
    from llm2clip_fast.data.embedding_cache import EmbeddingCache
    from llm2clip_fast.data.sources import open_source
    from llm2clip_fast.train.__main__ import main

    with pytest.raises(ValueError, match="no image column"):
        open_source(text_manifest)  # stage 2 and eval still need images
    source = open_source(text_manifest, require_images=False)
    with pytest.raises(ValueError, match="text-only"):
        source.image_at(0)
    result = stage1.train_stage1(_args(tiny, text_manifest, tmp_path / "run", "--steps", "2"))
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    assert main(["embed", "--llm", str(tmp_path / "run" / "merged"), "--data", str(text_manifest), "--out",
                 str(tmp_path / "cache"), "--dtype", "fp32", "--captions", "short", "--quiet"]) == 0
    cache = EmbeddingCache.open(tmp_path / "cache")
    assert cache.keys() == [f"t{i}" for i in range(24)]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tiny, text_manifest, tmp_path, monkeypatch):
    real = stage1.contrastive_loss
    calls = []

    def poisoned(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(stage1, "contrastive_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(stage1.NonFiniteTrainingError, match=r"step 3 \(contrastive\): loss nan") as err:
        stage1.train_stage1(_args(tiny, text_manifest, out, "--steps", "5", "--save-every", "1"))
    assert "step_00000002" in str(err.value) and "--resume" in str(err.value)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001", "step_00000002"]
    ckpt = load_checkpoint(list_checkpoints(out)[-1])
    assert all(t.isfinite().all() for t in ckpt.model_state.values())
    assert not (out / "merged").exists()


def test_non_finite_options_are_refused(tiny, text_manifest, tmp_path):
    with pytest.raises(ValueError, match="--lr must be finite"):
        stage1.train_stage1(_args(tiny, text_manifest, tmp_path / "run", "--lr", "inf"))
