"""Stage ``loss_compare``: the fused losses beside the code a user would otherwise run.

bf16 matmul rate; CLIP and SigLIP fwd+bwd at each size: fused (both CLIP paths) beside OpenCLIP as
written, the one-GEMM plain loss (eager, compiled), Inf-CL and siglip-kernel, each with its FLOP
convention, share of the matmul rate, peak memory and float64 error; the autotuned epilogue configs;
issue 24's goals met or missed; the fused CLIP loss in pieces (:mod:`.clip_pieces`).
"""

from __future__ import annotations

from typing import Any

from bench.gpu_check_stages.clip_pieces import safe_pieces
from bench.gpu_check_stages.measure import Timer, free_memory, peak_mb
from bench.gpu_check_stages.plan import Sizes
from bench.gpu_check_stages.recorder import Recorder

# The order is the priority: the goal size first, the providers the goals compare next.
COMPARE_PROVIDERS = {
    "clip": ["fused", "fused-recompute", "materialised-1gemm-compiled", "inf-cl", "materialised",
             "materialised-1gemm"],
    "siglip": ["fused", "siglip-kernel", "materialised"],
}
GOALS_NOTE = ("targets: recompute >= 70 % of matmul (8BBD), >= 0.85x plain compiled at <= 1/8 memory; "
              "keep >= 1.1x plain; >= 3x Inf-CL; SigLIP >= siglip-kernel at <= its error")


def matmul_rate(dev: Any, n: int, reps: int) -> dict:
    """One n x n x n matmul (bf16 on CUDA, fp32 on CPU): median ms and TFLOP/s, the roofline."""
    import torch

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    (ms,) = Timer(dev).split([lambda: torch.mm(a, b)], reps=max(reps, 5) * 4)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def _time_provider(fn: Any, kind: str, dev: Any, b: int, d: int, dtype: Any, reps: int) -> dict[str, Any]:
    """fwd and bwd median ms and the peak memory of one fwd+bwd of a provider's loss ``fn``."""
    import torch

    from bench.loss_throughput import BIAS, SCALE, make_inputs

    img, txt = (t.requires_grad_() for t in make_inputs(b, d, dev, dtype))
    scale = torch.tensor(SCALE[kind], device=dev, requires_grad=True)
    bias = torch.tensor(BIAS, device=dev, requires_grad=True)
    state: dict[str, Any] = {}

    def fwd() -> None:
        img.grad = txt.grad = scale.grad = bias.grad = None
        state["loss"] = fn(img, txt, scale, bias)

    def bwd() -> None:
        state.pop("loss").backward()

    fwd_ms, bwd_ms = Timer(dev).split([fwd, bwd], reps=reps)
    peak = peak_mb(lambda: (fwd(), bwd()), dev)
    return {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "total_ms": fwd_ms + bwd_ms, "peak_mb": peak}


def compare_point(kind: str, provider: str, dev: Any, b: int, d: int, sizes: Sizes,
                  mm_tflops: float) -> dict:
    """One provider at one size: fwd and bwd time, TFLOP/s counting what it executes, its share of
    the matmul rate, peak memory, float64 error on the leading rows."""
    import torch

    from bench.loss_throughput import PROVIDERS, _fused_factor, float64_errors, make_inputs
    from llm2clip_fast.ops import _backend, _chunking

    prov = PROVIDERS[kind][provider]
    dtype_name = "bf16" if dev.type == "cuda" else "fp32"
    why = prov.unavailable(b, d, dev.type, dtype_name)
    if why:
        return {"status": "skipped", "note": why, "flops_counted": prov.convention}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    fn = prov.build(b, d, str(dev))
    _backend.clear_selections()
    _chunking.clear_paths()
    m = _time_provider(fn, kind, dev, b, d, dtype, sizes.reps)
    factor = prov.factor
    if provider.startswith("fused"):
        m["backend"] = _backend.last_selected(f"{kind}_loss")
        m["path"] = _chunking.last_path(f"{kind}_loss")
        factor = _fused_factor(m["path"], factor)
    m["flops_counted"] = f"{factor:g}*B^2*D" + (f" ({m['path']})" if "path" in m else "")
    m["tflops"] = factor * b * b * d / m["total_ms"] / 1e9
    m["frac_of_matmul"] = m["tflops"] / mm_tflops if mm_tflops else None
    free_memory(dev)
    eb = min(b, sizes.error_b)
    e_img, e_txt = make_inputs(eb, d, dev, dtype)
    m.update(float64_errors(kind, prov.build(eb, d, str(dev)), e_img, e_txt), error_b=eb)
    return m


def goals(results: dict[tuple[str, str, int], dict], b: int, d: int, mm_tflops: float, gpu: bool) -> dict:
    """Issue 24's GPU goals at B, met or missed, from the measured rows (on CPU: computed, not judged)."""
    def get(kind: str, provider: str) -> dict | None:
        r = results.get((kind, provider, b))
        return r if r and r.get("status", "ok") == "ok" and "total_ms" in r else None

    m: dict[str, Any] = {"B": b, "matmul_tflops": mm_tflops}
    met = _clip_goals(m, get, b, d, mm_tflops) + _siglip_goals(m, get("siglip", "fused"),
                                                               get("siglip", "siglip-kernel"))
    m["goals_met"] = f"{sum(met)}/{len(met)}"
    m["status"] = "skipped" if not (gpu and met) else "ok" if all(met) else "fail"
    m["note"] = GOALS_NOTE
    return m


def _clip_goals(m: dict[str, Any], get: Any, b: int, d: int, mm_tflops: float) -> list[bool]:
    recompute, keep = get("clip", "fused-recompute"), get("clip", "fused")
    plain, infcl = get("clip", "materialised-1gemm-compiled"), get("clip", "inf-cl")
    met: list[bool] = []
    if recompute:
        m["clip_recompute_frac_8BBD"] = 8.0 * b * b * d / recompute["total_ms"] / 1e9 / mm_tflops
        met.append(m["clip_recompute_frac_8BBD"] >= 0.70)
    if recompute and plain:
        m["recompute_speed_vs_plain"] = plain["total_ms"] / recompute["total_ms"]
        m["recompute_memory_vs_plain"] = recompute["peak_mb"] / plain["peak_mb"]
        met += [m["recompute_speed_vs_plain"] >= 0.85, m["recompute_memory_vs_plain"] <= 1 / 8]
    if keep and plain and keep.get("path") == "keep-logits":
        m["keep_speed_vs_plain"] = plain["total_ms"] / keep["total_ms"]
        met.append(m["keep_speed_vs_plain"] >= 1.1)
    if keep and infcl:
        m["fused_speed_vs_inf_cl"] = infcl["total_ms"] / keep["total_ms"]
        met.append(m["fused_speed_vs_inf_cl"] >= 3.0)
    return met


def _siglip_goals(m: dict[str, Any], sig: dict | None, sigk: dict | None) -> list[bool]:
    if not (sig and sigk):
        return []
    m["siglip_speed_vs_siglip_kernel"] = sigk["total_ms"] / sig["total_ms"]
    err_ok = all(sig.get(k, 0) <= sigk.get(k, 0) * 1.0001 + 1e-7 for k in ("loss_err", "d_image_err",
                                                                            "d_text_err"))
    m["siglip_error_le_siglip_kernel"] = err_ok
    return [m["siglip_speed_vs_siglip_kernel"] >= 1.0, err_ok]


def _compare_loss(rec: Recorder, dev: Any, kind: str, b: int, sizes: Sizes, mm_tflops: float,
                  results: dict[tuple[str, str, int], dict], quick: bool) -> None:
    """Every provider of ``kind`` at B, in priority order; each result also kept in ``results``."""
    d = sizes.compare_d
    for provider in COMPARE_PROVIDERS[kind]:
        if quick and "compiled" in provider:
            continue

        def run(provider: str = provider) -> dict:
            r = compare_point(kind, provider, dev, b, d, sizes, mm_tflops)
            results[(kind, provider, b)] = r
            return r

        rec.attempt(f"{kind} {provider} fwd+bwd B={b} D={d}", run)
        free_memory(dev)


def stage_loss_compare(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    mm = matmul_rate(dev, sizes.matmul_n, sizes.reps)
    rec.add(f"matmul {mm['dtype']} {sizes.matmul_n}^3", "ok", **mm)
    if quick:
        rec.note("quick: the torch.compile'd provider is not measured (CPU code generation takes minutes)")
    results: dict[tuple[str, str, int], dict] = {}
    d = sizes.compare_d
    for b in sizes.compare_b:
        _compare_loss(rec, dev, "clip", b, sizes, mm["tflops"], results, quick)
        from llm2clip_fast.kernels import clip_loss as clip_kernels

        rec.add(f"clip epilogue configs B={b}", "ok", **clip_kernels.chosen_configs())
        _compare_loss(rec, dev, "siglip", b, sizes, mm["tflops"], results, quick)
        from llm2clip_fast.kernels import siglip_loss as siglip_kernels

        rec.add(f"siglip epilogue configs B={b}", "ok", **siglip_kernels.chosen_configs())
        rec.attempt(f"goals B={b}", lambda b=b: goals(results, b, d, mm["tflops"], dev.type == "cuda"))
        for name, metrics in safe_pieces(rec, dev, b, d, sizes):
            rec.add_metrics(name, metrics)
        free_memory(dev)
