"""Autotune configs of the Triton kernels: pruned per operand dtype to what fits sm_90.

Runs on CPU: the sm_90 config lists exist whether or not the interpreter is on (the autotuners get one
config under the interpreter), and the pruning is plain Python over ``triton.Config`` objects.
"""

from __future__ import annotations

import pytest
import torch
import triton
from llm2clip_fast.kernels import clip_loss, siglip_loss
from llm2clip_fast.kernels._config_fit import (
    SM90_SHARED_MEMORY_BYTES,
    TileConfigs,
    estimated_shared_bytes,
    fitting_configs,
    gemm_configs,
)

PRODUCTION = {
    "clip forward": clip_loss._FWD_TILES,
    "clip backward": clip_loss._BWD_TILES,
    "siglip forward": siglip_loss._FWD_TILES,
    "siglip backward": siglip_loss._BWD_TILES,
}


def test_shared_memory_estimate_counts_stages_tiles_and_element_size():
    (cfg,) = gemm_configs([(128, 64, 32, 8, 3)])
    assert estimated_shared_bytes("clip_fwd", cfg, 2) == 3 * (128 * 32 + 64 * 32) * 2
    assert estimated_shared_bytes("clip_fwd", cfg, 4) == 3 * (128 * 32 + 64 * 32) * 4
    with pytest.raises(KeyError, match="kernel must be one of"):
        estimated_shared_bytes("nope", cfg, 2)


def test_configs_over_the_shared_memory_budget_are_dropped_per_dtype():
    big, small = gemm_configs([(128, 128, 64, 8, 4), (64, 64, 32, 4, 3)])
    # 4 stages of two 128x64 tiles: 128 KiB in bf16 fits sm_90's 227 KiB, 256 KiB in fp32 does not.
    assert fitting_configs("clip_fwd", [big, small], 2, SM90_SHARED_MEMORY_BYTES) == [big, small]
    assert fitting_configs("clip_fwd", [big, small], 4, SM90_SHARED_MEMORY_BYTES) == [small]
    # Nothing fits: keep the smallest rather than leave the autotuner without a config.
    assert fitting_configs("clip_fwd", [big, small], 4, 1024) == [small]
    tiles = TileConfigs("clip_fwd", ("A", "W"), half=(big, small), fp32=(big, small))
    assert tiles.for_elem_size(2) == [big, small]
    assert tiles.for_elem_size(4) == [small]


def test_prune_picks_the_list_of_the_widest_operand_dtype():
    half = tuple(gemm_configs([(128, 128, 64, 8, 3), (128, 64, 64, 4, 3)]))
    fp32 = tuple(gemm_configs([(64, 64, 16, 4, 3)]))
    tiles = TileConfigs("clip_fwd", ("image_ptr", "text_ptr"), half=half, fp32=fp32)
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

    assert (128, 256, 64, 8) not in shapes(clip_loss._FWD_TILES.all())
    for tiles in (siglip_loss._FWD_TILES, siglip_loss._BWD_TILES):
        assert not shapes(tiles.all()) & {(128, 256, 64, 8), (256, 128, 64, 8), (128, 128, 32, 4)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the interpreter's autotuner")
def test_autotuner_benchmarks_only_the_operand_dtype_list(monkeypatch):
    # Triton's own autotuner with the production sm_90 configs and prune hook, under the interpreter.
    from _autotune_probe import autotuner_with_winner

    tiles = clip_loss._BWD_TILES
    tuned = autotuner_with_winner(clip_loss._clip_grad_tile_kernel, tiles.all(), winner=1, prune=tiles.prune)
    monkeypatch.setattr(clip_loss, "_clip_grad_tile_kernel", tuned)
    monkeypatch.setattr(clip_loss, "_MIN_BLOCK_M", tiles.block_min("BLOCK_M"))
    monkeypatch.setattr(clip_loss, "_MIN_BLOCK_N", tiles.block_min("BLOCK_N"))
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(70, 20, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(66, 20, generator=gen), dim=-1)
    scale = torch.tensor(5.0)
    x = 5.0 * img.double() @ txt.double().t()
    row_lse, col_lse = x.logsumexp(1), x.logsumexp(0)
    coef_r, coef_c = torch.full((70,), 0.5), torch.full((66,), 0.5)
    g_out = torch.empty(70, 66)
    d_scale = clip_loss.clip_grad_chunk_triton(img, txt, scale, row_lse.float(), col_lse.float(),
                                               coef_r, coef_c, g_out)
    benchmarked = list(tuned.configs_timings)
    assert [c.kwargs for c in benchmarked] == [c.kwargs for c in tiles.fp32]
    assert tuned.best_config.kwargs == tiles.fp32[1].kwargs
    want_g = 0.5 * ((x - row_lse[:, None]).exp() + (x - col_lse[None, :]).exp())
    torch.testing.assert_close(g_out.double(), want_g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_scale.double(), (want_g * x / 5.0).sum(), rtol=1e-5, atol=1e-5)
