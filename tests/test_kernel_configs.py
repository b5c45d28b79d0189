"""Autotune configs of the Triton kernels: pruned per operand dtype to what fits sm_90.

Runs on CPU: the sm_90 config lists exist whether or not the interpreter is on (the autotuners get one
config under the interpreter), and the pruning is plain Python over ``triton.Config`` objects.
"""

from __future__ import annotations

import pytest
import torch
import triton
from llm2clip_fast.kernels import adapter
from llm2clip_fast.kernels._config_fit import (
    SM90_SHARED_MEMORY_BYTES,
    TileConfigs,
    estimated_shared_bytes,
    fitting_configs,
    gemm_configs,
)

PRODUCTION = {
    "adapter forward": adapter._FWD_TILES,
    "adapter backward": adapter._BWD_TILES,
    "adapter weight gradient": adapter._WGRAD_TILES,
}


def test_shared_memory_estimate_counts_stages_tiles_and_element_size():
    (cfg,) = gemm_configs([(128, 64, 32, 8, 3)])
    assert estimated_shared_bytes("adapter_fwd", cfg, 2) == 3 * (128 * 32 + 32 * 64) * 2
    assert estimated_shared_bytes("adapter_fwd", cfg, 4) == 3 * (128 * 32 + 32 * 64) * 4
    # The adapter backward streams two operand pairs (LN(x), W1 and dy, W2) through one K loop.
    assert estimated_shared_bytes("adapter_bwd", cfg, 2) == 3 * 2 * (128 * 32 + 32 * 64) * 2
    with pytest.raises(KeyError, match="kernel must be one of"):
        estimated_shared_bytes("nope", cfg, 2)


def test_configs_over_the_shared_memory_budget_are_dropped_per_dtype():
    big, small = gemm_configs([(128, 128, 64, 8, 4), (64, 64, 32, 4, 3)])
    # 4 stages of two 128x64 tiles: 128 KiB in bf16 fits sm_90's 227 KiB, 256 KiB in fp32 does not.
    assert fitting_configs("adapter_fwd", [big, small], 2, SM90_SHARED_MEMORY_BYTES) == [big, small]
    assert fitting_configs("adapter_fwd", [big, small], 4, SM90_SHARED_MEMORY_BYTES) == [small]
    # Nothing fits: keep the smallest rather than leave the autotuner without a config.
    assert fitting_configs("adapter_fwd", [big, small], 4, 1024) == [small]
    tiles = TileConfigs("adapter_fwd", ("A", "W"), half=(big, small), fp32=(big, small))
    assert tiles.for_elem_size(2) == [big, small]
    assert tiles.for_elem_size(4) == [small]


def test_prune_picks_the_list_of_the_widest_operand_dtype():
    half = tuple(gemm_configs([(128, 128, 64, 8, 3), (128, 64, 64, 4, 3)]))
    fp32 = tuple(gemm_configs([(64, 64, 16, 4, 3)]))
    tiles = TileConfigs("adapter_fwd", ("image_ptr", "text_ptr"), half=half, fp32=fp32)
    configs = tiles.all()
    bf16 = torch.empty(2, 2, dtype=torch.bfloat16)
    f32 = torch.empty(2, 2, dtype=torch.float32)
    assert tiles.prune(configs, {"image_ptr": bf16, "text_ptr": bf16, "D": 64}) == list(half)
    assert tiles.prune(configs, {"image_ptr": f32, "text_ptr": f32, "D": 64}) == list(fp32)
    # fp32 activations against bf16 weights still stage fp32 tiles.
    assert tiles.prune(configs, {"image_ptr": f32, "text_ptr": bf16, "D": 64}) == list(fp32)
    autotune = tiles.autotune_args(False, None)
    assert autotune["configs"] == configs
    assert autotune["prune_configs_by"]["early_config_prune"] == tiles.prune
    one = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
    assert tiles.autotune_args(True, one) == {"configs": [one]}


@pytest.mark.parametrize("name", list(PRODUCTION))
@pytest.mark.parametrize("elem_size", [2, 4])
def test_every_config_the_autotuner_may_benchmark_fits_sm90(name, elem_size):
    tiles = PRODUCTION[name]
    kept = tiles.for_elem_size(elem_size)
    assert kept
    listed = tiles.fp32 if elem_size == 4 else tiles.half
    assert len(kept) == len(listed), f"{name}: a listed config overflows sm_90's shared memory"
    for cfg in kept:
        assert estimated_shared_bytes(tiles.kernel, cfg, elem_size) <= SM90_SHARED_MEMORY_BYTES, (name, cfg)


def test_spilling_tiles_are_not_listed():
    # Measured with `python -m llm2clip_fast.kernels._ptxas_report` (sm_90a): these spilled registers.
    def shapes(configs):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in configs}

    assert (128, 128, 64, 8) not in shapes(adapter._FWD_TILES.fp32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the interpreter's autotuner")
def test_autotuner_benchmarks_only_the_operand_dtype_list(monkeypatch):
    # Triton's own autotuner with the production sm_90 configs and prune hook, under the interpreter.
    from _autotune_probe import autotuner_with_winner

    tiles = adapter._WGRAD_TILES
    tuned = autotuner_with_winner(adapter._weight_grad_kernel, tiles.all(), winner=1, prune=tiles.prune)
    monkeypatch.setattr(adapter, "_weight_grad_kernel", tuned)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(70, 20, generator=gen)
    x = torch.randn(70, 33, generator=gen)
    dw, db = adapter.weight_grad(g, x, dot_dtype=torch.float32)
    benchmarked = list(tuned.configs_timings)
    assert [c.kwargs for c in benchmarked] == [c.kwargs for c in tiles.fp32]
    assert tuned.best_config.kwargs == tiles.fp32[1].kwargs
    torch.testing.assert_close(dw.double(), g.double().t() @ x.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), g.double().sum(0), rtol=1e-5, atol=1e-5)
