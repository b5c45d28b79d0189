"""Stage 2 ``--recipe llm2clip`` (LLM2CLIP's official stage-2 defaults): values, explicit flags and
--config files overriding it, ``--global-batch-size`` turned into the per-rank micro-batch, and the
resolved settings with their origin saved in config.json (tiny demo, bag-of-words cache)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from _stage2_runs import make_demo

from llm2clip_fast.train import stage2
from llm2clip_fast.train.__main__ import main as train_main
from llm2clip_fast.train.__main__ import parse_args
from llm2clip_fast.train.cli.recipes import STAGE2_RECIPES, resolve_recipe

BASE = ["stage2", "--data", "d", "--out", "o", "--embeddings", "c"]
OFFICIAL = {"lr": 1e-5, "llrd": 0.85, "wd": 0.05, "grad_clip": 5.0, "warmup": 0, "global_batch_size": 4096,
            "embed_dim": 1280, "caption": "short:0.5,long:0.5"}


def _resolved(*argv: str) -> argparse.Namespace:
    args = parse_args([*BASE, *argv])
    resolve_recipe(args, STAGE2_RECIPES)
    return args


def test_no_recipe_keeps_the_stage2_defaults():
    args = _resolved()
    got = {k: getattr(args, k) for k in OFFICIAL}
    assert got == {"lr": 5e-4, "llrd": 0.85, "wd": 0.05, "grad_clip": 1.0, "warmup": None,
                   "global_batch_size": None, "embed_dim": 512, "caption": "long"}
    assert args.batch_size == 64 and set(args.recipe_origin.values()) == {"default"}


def test_recipe_sets_the_official_values_and_every_explicit_flag_wins():
    args = _resolved("--recipe", "llm2clip")
    assert {k: getattr(args, k) for k in OFFICIAL} == OFFICIAL
    assert all(args.recipe_origin[k] == "recipe" for k in OFFICIAL)
    assert args.recipe_origin["batch_size"] == "default"

    args = _resolved("--recipe", "llm2clip", "--lr", "3e-4", "--max-grad-norm", "2", "--warmup-steps", "7",
                     "--embed-dim", "32", "--caption", "long", "--wd", "0.1", "--llrd", "1",
                     "--global-batch-size", "64")
    assert (args.lr, args.grad_clip, args.warmup, args.embed_dim) == (3e-4, 2.0, 7, 32)
    assert (args.caption, args.wd, args.llrd, args.global_batch_size) == ("long", 0.1, 1.0, 64)
    assert all(args.recipe_origin[k] == "flag" for k in OFFICIAL)
    assert resolve_recipe(args, STAGE2_RECIPES)["lr"] == "flag" and args.lr == 3e-4  # idempotent


def test_an_explicit_batch_size_replaces_the_recipes_global_batch():
    args = _resolved("--recipe", "llm2clip", "--batch-size", "32")
    assert args.global_batch_size is None and args.recipe_origin["global_batch_size"] == "default"
    assert args.recipe_origin["batch_size"] == "flag"
    stage2.resolve_batch_size(args, world_size=8)
    assert args.batch_size == 32
    with pytest.raises(SystemExit):  # argparse: --batch-size and --global-batch-size exclude each other
        parse_args([*BASE, "--batch-size", "8", "--global-batch-size", "64"])


@pytest.mark.parametrize("world, accum, per_rank", [(8, 1, 512), (1, 8, 512), (2, 4, 512), (4, 2, 512),
                                                    (1, 1, 4096), (16, 1, 256)])
def test_global_batch_becomes_the_per_rank_micro_batch(world, accum, per_rank):
    args = _resolved("--recipe", "llm2clip", "--grad-accum", str(accum))
    stage2.resolve_batch_size(args, world_size=world)
    assert args.batch_size == per_rank and args.batch_size * world * accum == 4096
    assert args.recipe_origin["batch_size"] == "derived"


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    args = _resolved("--global-batch-size", "100", "--grad-accum", "3")
    with pytest.raises(ValueError, match=r"--global-batch-size 100 is not a multiple of world size 2 x "
                                         r"--grad-accum 3 = 6"):
        stage2.resolve_batch_size(args, world_size=2)
    args = _resolved("--global-batch-size", "0")
    with pytest.raises(ValueError, match="--global-batch-size must be >= 1"):
        stage2.resolve_batch_size(args, world_size=1)


def test_config_file_values_count_as_given(tmp_path):
    cfg = tmp_path / "s2.yaml"
    cfg.write_text("recipe: llm2clip\nmax-grad-norm: 2.0\ncaption: short\nlr: 1.0e-3\n")
    args = _resolved("--config", str(cfg), "--lr", "3e-4")
    assert (args.grad_clip, args.caption, args.lr) == (2.0, "short", 3e-4)
    origin = args.recipe_origin
    assert origin["grad_clip"] == origin["caption"] == origin["lr"] == "flag"
    assert (args.llrd, args.global_batch_size, origin["embed_dim"]) == (0.85, 4096, "recipe")


def test_help_documents_the_recipe_and_the_global_batch(capsys):
    with pytest.raises(SystemExit):
        parse_args(["stage2", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--global-batch-size N" in text and "N / (world size x --grad-accum)" in text
    assert "--recipe {llm2clip,none}" in text and "global batch 4096 over all ranks" in text
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--recipe", "nope"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return make_demo(tmp_path_factory.mktemp("recipe_stage2"))


def test_recipe_run_saves_resolved_settings_and_where_they_came_from(demo, tmp_path):
    out = tmp_path / "run"
    argv = ["stage2", "--embeddings", str(demo["cache"]), "--data", str(demo["data"]), "--out", str(out),
            "--vision-preset", "micro", "--adapter-blocks", "1", "--steps", "2", "--num-workers", "0",
            "--no-progress", "--log-every", "1", "--recipe", "llm2clip", "--global-batch-size", "16",
            "--grad-accum", "2", "--lr", "2e-3"]
    assert train_main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["recipe"] == "llm2clip"
    assert (saved["lr"], saved["llrd"], saved["wd"], saved["grad_clip"]) == (2e-3, 0.85, 0.05, 5.0)
    assert (saved["warmup"], saved["warmup_steps"], saved["embed_dim"]) == (0, 0, 1280)
    assert (saved["global_batch_size"], saved["batch_size"], saved["global_batch"]) == (16, 8, 16)
    assert saved["caption"] == "short:0.5,long:0.5" and saved["caption_mix"] == {"short": 0.5, "long": 0.5}
    assert saved["model"]["embed_dim"] == 1280
    origin = saved["settings_from"]
    assert origin["lr"] == origin["global_batch_size"] == "flag" and origin["batch_size"] == "derived"
    for key in ("llrd", "wd", "grad_clip", "warmup", "embed_dim", "caption"):
        assert origin[key] == "recipe", key
    assert not any(k.startswith("_") for k in saved)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # No warmup: cosine from the first step (a 1-step warmup, the default's 5%, would hold 2e-3 at step 2).
    assert [r["lr"] for r in log] == pytest.approx([2e-3, 1e-3])


def test_recipe_caption_mix_on_data_without_those_captions_says_where_it_came_from(demo, tmp_path):
    rows = [json.loads(line) for line in demo["data"].read_text().splitlines()]
    for row in rows:
        row["brief"] = row.pop("short")
    manifest = demo["data"].parent / "renamed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["stage2", "--text-tower", "clip", "--data", str(manifest), "--out", str(tmp_path / "run"),
            "--vision-preset", "micro", "--steps", "1", "--num-workers", "0", "--no-progress",
            "--recipe", "llm2clip", "--batch-size", "8"]
    with pytest.raises(ValueError, match=r"'short' is not a caption of the data; it has \['long', 'brief'\] "
                                         r"\(--caption short:0.5,long:0.5 came from --recipe llm2clip"):
        train_main(argv)
