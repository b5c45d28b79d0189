"""Stage 1 as LLM2CLIP trains it: text-only sources, non-finite stops, the hard-negative loss, per-direction
query instructions, the llm2clip recipe (tiny Llama, CPU, a few steps)."""

from __future__ import annotations

import argparse
import json
import logging
import math

import pytest
import torch
from _lora_deltas import lora_deltas

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


def test_hard_negative_loss_by_hand():
    from llm2clip_fast.train.hard_negative_loss import hard_negative_nll_loss

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cosine ignores the norm
    neg = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    s, r = 2.0, math.sqrt(0.5)
    # cos(q0, [p0, p1, n0, n1]) = [1, 0, r, -1]; cos(q1, .) = [0, 1, r, 0]; targets p0, p1.
    loss0 = -s * 1 + math.log(math.exp(s) + math.exp(0) + math.exp(s * r) + math.exp(-s))
    loss1 = -s * 1 + math.log(math.exp(0) + math.exp(s) + math.exp(s * r) + math.exp(0))
    got = hard_negative_nll_loss(q, pos, neg, scale=s)
    assert abs(got.item() - (loss0 + loss1) / 2) < 1e-6
    no_neg = -s + math.log(math.exp(s) + 1.0)  # both queries: [1, 0] and [0, 1]
    assert abs(hard_negative_nll_loss(q, pos, None, scale=s).item() - no_neg) < 1e-6


def test_hard_negative_loss_matches_llm2vec_and_its_gradients():
    from _llm2vec_0_2_3_reference import HardNegativeNLLLoss

    from llm2clip_fast.train.hard_negative_loss import hard_negative_nll_loss

    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.randn(b, 7, generator=g, dtype=torch.float64, requires_grad=True) for b in (5, 5, 3))
    want = HardNegativeNLLLoss(scale=50.0)(q, p, n)
    got = hard_negative_nll_loss(q, p, n, scale=50.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (q, p, n)), torch.autograd.grad(want, (q, p, n))):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="negative must be"):
        hard_negative_nll_loss(q, p, torch.zeros(2, 3))


def test_hardneg_and_query_side_instructions_in_stage1(tiny, text_manifest, tmp_path, monkeypatch):
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder

    seen = []
    real = LLMTextEncoder.tokenize

    def spy(self, texts, instructions=None):
        seen.append((list(texts), None if instructions is None else list(instructions)))
        return real(self, texts, instructions)

    monkeypatch.setattr(LLMTextEncoder, "tokenize", spy)
    s2l, l2s = "Find the detailed caption of this short one:", "Find the short caption of this one:"
    result = stage1.train_stage1(_args(
        tiny, text_manifest, tmp_path / "run", "--steps", "2", "--loss", "hardneg",
        "--hard-negative-caption", "hard", "--query-instruction-short", s2l, "--query-instruction-long", l2s))
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    rows = json.loads((tmp_path / "run" / "config.json").read_text())
    assert rows["loss"] == "hardneg" and rows["query_instruction_short"] == s2l
    # Per step: queries (with their direction's instruction), documents and hard negatives (none).
    queries, documents, negatives = seen[0], seen[1], seen[2]
    assert set(queries[1]) <= {s2l, l2s} and len(set(queries[1])) == 2  # both directions drawn
    for text, instr in zip(*queries):
        assert ("photo" in text) == (instr == l2s)  # long captions get the long -> short instruction
    assert documents[1] == [None] * len(documents[0]) and negatives[1] == [None] * len(negatives[0])
    assert all("photo" in t for t in negatives[0])
    for bad in (["--loss", "hardneg"], ["--instruction", "x", "--query-instruction-short", "y"]):
        with pytest.raises(ValueError, match=r"hard-negative-caption|exclude"):
            stage1.train_stage1(_args(tiny, text_manifest, tmp_path / "bad", "--steps", "1", *bad))


def test_llm2clip_recipe_defaults_flags_override_and_settings_saved(tiny, text_manifest, tmp_path):
    from llm2clip_fast.train.cli.recipes import resolve_recipe

    def parsed(*argv):
        parser = argparse.ArgumentParser()
        stage1.add_arguments(parser)
        args = parser.parse_args(["--llm", "x", "--data", "x", "--out", "x", *argv])
        resolve_recipe(args)
        return args

    plain = parsed()
    assert (plain.warmup_steps, plain.lr, plain.batch_size, plain.lora_r) == (0, 2e-4, 512, 16)
    rec = parsed("--recipe", "llm2clip", "--lr", "1e-3")
    assert (rec.lr, rec.warmup_steps, rec.batch_size, rec.scale) == (1e-3, 300, 512, 50.0)
    assert (rec.lora_r, rec.lora_alpha, rec.lora_dropout, rec.lora_targets) == (16, 32.0, 0.05, "auto")
    assert rec.recipe_origin["lr"] == "flag" and rec.recipe_origin["warmup_steps"] == "recipe"
    assert resolve_recipe(rec)["lr"] == "flag" and rec.lr == 1e-3  # idempotent

    out = tmp_path / "run"
    result = stage1.train_stage1(_args(tiny, text_manifest, out, "--recipe", "llm2clip", "--steps", "1",
                                       "--warmup-steps", "1"))
    assert result.steps == 1
    saved = json.loads((out / "config.json").read_text())
    assert saved["recipe"] == "llm2clip" and saved["warmup_steps"] == 1 and saved["batch_size"] == 8
    lora = (saved["lora_r"], saved["lora_alpha"], saved["lora_dropout"], saved["scale"])
    assert lora == (16, 32.0, 0.05, 50.0)
    assert saved["lora_targets_resolved"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"]
    assert saved["settings_from"]["batch_size"] == "flag" and saved["settings_from"]["lr"] == "recipe"


def _base_state(folder):
    from transformers import AutoModel

    return {k: v.float() for k, v in AutoModel.from_pretrained(folder).state_dict().items()}


@pytest.mark.slow
def test_mntp_data_phase_is_merged_before_the_contrastive_phase(tiny, text_manifest, tmp_path, caplog):
    passages = tmp_path / "wiki.txt"
    passages.write_text("\n".join(f"the {c} {s} is next to the {o} one, said the report"
                                  for c in COLOURS for s in SHAPES for o in COLOURS[:2]) + "\n\n")
    out = tmp_path / "run"
    argv = ["--mntp-data", str(passages), "--mntp-steps", "2", "--steps", "2", "--lr", "5e-3"]
    result = stage1.train_stage1(_args(tiny, text_manifest, out, *argv))
    assert result.steps == 2  # contrastive steps; the MNTP phase ran before, on its own LoRA
    from llm2clip_fast.train.run_log import read_jsonl

    assert [r["phase"] for r in read_jsonl(out / "log.jsonl")] == ["contrastive", "contrastive"]
    base = _base_state(tiny)
    mntp_merged = _base_state(out / "mntp" / "merged")
    final = _base_state(out / "merged")
    # Keyed like the base state dict: the delta of module M applies to M.weight.
    mntp_delta = {f"{k}.weight": d for k, d in lora_deltas(out / "mntp" / "adapter").items()}
    contrastive_delta = {f"{k}.weight": d for k, d in lora_deltas(out / "adapter").items()}
    assert mntp_delta and contrastive_delta and any(d.abs().max() > 0 for d in mntp_delta.values())
    for name, w in base.items():
        want = w + mntp_delta.get(name, 0)
        torch.testing.assert_close(mntp_merged[name], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[name], want + contrastive_delta.get(name, 0), atol=1e-5, rtol=1e-5)
    # The phase's messages go through logging (the command line's handler prints them on stderr).
    with caplog.at_level(logging.INFO, logger="llm2clip_fast"):
        stage1.train_stage1(_args(tiny, text_manifest, out, *argv, "--resume"))
    assert "MNTP phase already done" in caplog.text
    with pytest.raises(ValueError, match="--mntp-data needs --mntp-steps"):
        stage1.train_stage1(_args(tiny, text_manifest, tmp_path / "bad", "--mntp-data", str(passages)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-empty passage"):
        stage1.train_stage1(_args(tiny, text_manifest, tmp_path / "bad2", "--mntp-data", str(empty),
                                  "--mntp-steps", "1"))


@pytest.mark.distributed
def test_hard_negative_loss_over_two_ranks_is_llm2vecs_global_batch_loss(tmp_path):
    """Mean of the ranks' losses = llm2vec's loss on the global batch; the ranks' input gradients,
    averaged over ranks as the trainer averages parameter gradients, = its gradients."""
    from _hard_negative_rank import global_batch, rank_results
    from _llm2vec_0_2_3_reference import HardNegativeNLLLoss
    from _ranks import run_on_ranks

    results = run_on_ranks(lambda rank: rank_results(rank, 2), world=2, timeout_s=240)
    q, p, n = (t.requires_grad_(True) for t in global_batch(2, 3, 2))
    want = HardNegativeNLLLoss(scale=5.0)(q, p, n)
    grads = torch.autograd.grad(want, (q, p, n))
    torch.testing.assert_close(sum(r["loss"] for r in results) / 2, want.float(), atol=1e-6, rtol=1e-6)
    for i, full in enumerate(grads):
        got = torch.cat([r["grads"][i] for r in results]) / 2
        torch.testing.assert_close(got.double(), full, atol=1e-6, rtol=1e-5)
