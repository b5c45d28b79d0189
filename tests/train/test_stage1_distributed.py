"""Stage 1 on two gloo ranks equals one process on the same global batch.

With ``--batch-size 8`` over 2 ranks each rank embeds 4 caption pairs of every global batch; the
contrastive loss takes its negatives from both ranks (all-gather with autograd) and the LoRA (and
logit-scale) gradients are averaged over ranks. So, with dropout off, the adapters after 3 steps and
the logged losses must match a single process training on the 8-pair batches, for both losses.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from _ranks import run_on_ranks
from _tiny_llama import write_pairs, write_tiny_llama

from llm2clip_fast.train import stage1
from llm2clip_fast.train.run_log import read_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1_dist")
    return {"root": root, "data": write_pairs(root, 16), "llm": write_tiny_llama(root / "llm")}


LOSSES = ("clip", "infonce")


def _args(setup, out, loss: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)
    return parser.parse_args([
        "--llm", str(setup["llm"]), "--data", str(setup["data"]), "--out", str(out), "--batch-size", "8",
        "--steps", "3", "--eval-fraction", "0", "--lora-dropout", "0", "--lora-r", "4", "--lr", "5e-3",
        "--loss", loss, "--learn-scale", "--scale", "20", "--max-length", "32", "--save-every", "100",
        "--quiet"])


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_global_batch(setup):
    from safetensors.torch import load_file

    root = setup["root"]

    def rank_run(rank: int) -> None:
        for loss in LOSSES:
            stage1.train_stage1(_args(setup, root / f"ranks_{loss}", loss))

    # The single-process runs go first: the forked ranks then inherit transformers/peft imported.
    for loss in LOSSES:
        stage1.train_stage1(_args(setup, root / f"single_{loss}", loss))
    run_on_ranks(rank_run, world=2)
    for loss in LOSSES:
        single = load_file(str(root / f"single_{loss}" / "adapter" / "adapter_model.safetensors"))
        ranks = load_file(str(root / f"ranks_{loss}" / "adapter" / "adapter_model.safetensors"))
        assert single.keys() == ranks.keys() and len(single) > 0
        initial_b_is_zero = [k for k in single if "lora_B" in k]
        assert initial_b_is_zero and all(single[k].abs().max() > 0 for k in initial_b_is_zero)  # it trained
        for k in single:
            torch.testing.assert_close(ranks[k], single[k], atol=1e-5, rtol=1e-4, msg=f"{loss}: {k}")
        log1 = read_jsonl(root / f"single_{loss}" / "log.jsonl")
        log2 = read_jsonl(root / f"ranks_{loss}" / "log.jsonl")
        assert [r["step"] for r in log2] == [1, 2, 3]
        for key in ("loss", "scale"):
            got, want = torch.tensor([r[key] for r in log2]), torch.tensor([r[key] for r in log1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{loss}: {key}")
