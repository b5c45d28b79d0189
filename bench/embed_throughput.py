"""Caption-embedding throughput of the frozen LLM: every precision and 8-bit mode, with fidelity.

    python bench/embed_throughput.py                 # CPU: the demo's MiniLM and a 4-layer Llama
    python bench/embed_throughput.py --quick         # a smoke run
    python bench/embed_throughput.py --device cuda   # the same models on the GPU

Captions are the demo set's (``llm2clip_fast.data.demo``), each record's short and long caption, encoded
by ``LLMTextEncoder.encode`` (length-sorted, token-budget batches) exactly as the embed step does. Modes:
``fp32``; ``bf16`` (bf16 autocast, fp32 weights: embed's default on CPUs with native bf16 and on CUDA);
``llm-int8`` (bitsandbytes); ``w8a8-int8`` and ``w8a8-fp8`` (llm2clip_fast.models.llm_quantization; fp8
GEMMs need a GPU of compute capability 8.9+, on the CPU they are emulated by the reference path and
marked so); ``torchao-int8`` (torchao's ``Int8DynamicActivationInt8WeightConfig`` through ``quantize_``,
when torchao is installed: what a user would otherwise install). Each point, in a fresh process:
captions/s and tokens/s, the weight bytes (parameters and buffers), peak memory above the loaded model
(CPU: RSS; CUDA: allocated), quantisation time, the layers kept in 16-bit, and fidelity against the
fp32 encoding of the same captions (raw cosine mean; centred cosine mean and minimum, the set's mean
embedding removed: the issue's targets are 0.999 / 0.99 / 0.97). ``speed_vs_bf16`` compares with the
bf16 point of the same model in the same run.

The Llama is a 4-layer, 256-wide random model whose token embeddings carry three massive-activation
channels (``build_tiny_llm(massive_channels=3)``): the outliers that make 8-bit activations lossy.

``--retrieval DIR`` instead checks the issue's third fidelity target end to end: the demo's stage 2
trained on a 16-bit (``bf16``) cache and on each 8-bit mode's cache of the same captions (the frozen LLM
is the demo's MiniLM, or ``--llm`` such as a stage-1 ``merged`` folder), same seed and steps, then the
validation retrieval of each; ``within_one_image`` holds when i2t and t2i R@1 differ from the 16-bit
run's by at most one validation image. ``--modes fp32`` gives the noise floor: how far an fp32 cache
(the closest thing to the 16-bit one) moves the same numbers. About 3 minutes per mode on 2 idle cores
(the demo's sizes).

``run_gpu_stage(budget_s, out_dir)`` is the GPU plan alone (bench/gpu_check.py's ``embed`` stage runs
:func:`gpu_check_points`, the same cases): an 8B-shaped Llama built directly on the GPU with random
weights (no checkpoint on disk), batches of caption lengths drawn from the demo's length distribution,
bf16 against w8a8-fp8, w8a8-int8, llm-int8 and torchao where installed;
then the fidelity points above on the GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench._common import (
    add_common_args,
    cuda_peak_mb,
    machine_description,
    mark_memory_baseline,
    print_table,
    run_cases_within_budget,
    run_point_in_subprocess,
    write_json,
)

MODES = ("fp32", "bf16", "llm-int8", "w8a8-int8", "w8a8-fp8", "torchao-int8")
# An 8B-shaped decoder (Llama-3-8B's widths) and a smaller one for a quick GPU run.
GPU_MODELS = {
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                     vocab=128256),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                     vocab=128256),
}
# Prompt template and BOS tokens around an llm2vec-style caption (Llama-3's template is about this long).
TEMPLATE_TOKENS = 10


def demo_captions(n_records: int, split: str = "val") -> list[str]:
    """Short and long caption of each demo record, in record order (what the embed step encodes)."""
    from llm2clip_fast.data.demo import demo_records

    texts = []
    for record in demo_records(split, n_records, image_size=8):
        texts += [record.captions["short"], record.captions["long"]]
    return texts


def padding_fraction(lengths: list[int], spans: list[tuple[int, int]]) -> float:
    """Share of padded positions when ``lengths`` (sorted) are batched into ``spans``."""
    padded = sum(max(lengths[s:e]) * (e - s) for s, e in spans)
    return 1.0 - sum(lengths) / padded if padded else 0.0


def _weights_mb(model: torch.nn.Module) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _torchao_int8(encoder: Any) -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(encoder.model, Int8DynamicActivationInt8WeightConfig())


def load_encoder(model_path: str, mode: str, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The encoder of ``mode`` on ``device``, and facts about how it was made."""
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder

    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if mode in ("fp32", "bf16"):
        encoder = LLMTextEncoder.from_pretrained(model_path, device=device, precision=mode)
    elif mode == "torchao-int8":
        encoder = LLMTextEncoder.from_pretrained(model_path, device=device, precision="bf16")
        _torchao_int8(encoder)
    else:
        # embed's defaults: fp32 weights on the CPU (bf16 on CUDA; fp16 for bitsandbytes there).
        dtype = torch.float32 if device.type == "cpu" else (
            torch.float16 if mode == "llm-int8" else torch.bfloat16)
        encoder = LLMTextEncoder.from_pretrained(model_path, device=device, dtype=dtype, quantize=mode,
                                                 precision="bf16")
        if encoder.quantization is not None:
            info["kept_16bit"] = len(encoder.quantization.kept_16bit)
            info["quantized"] = encoder.quantization.quantized
    info["load_s"] = time.perf_counter() - t0
    return encoder, info


def measure_point(model_path: str, mode: str, device: str, n_records: int, batch_size: int,
                  max_batch_tokens: int, reps: int) -> dict:
    """One (model, mode) point; ``run_point_in_subprocess`` runs it in its own process."""
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder, token_budget_batches
    from llm2clip_fast.models.llm_quantization import embedding_fidelity
    from llm2clip_fast.ops import _backend

    logging.disable(logging.WARNING)
    dev = torch.device(device)
    texts = demo_captions(n_records)
    reference = LLMTextEncoder.from_pretrained(model_path, device=dev).encode(
        texts, batch_size=batch_size, max_batch_tokens=max_batch_tokens, show_progress=False)
    encoder, result = load_encoder(model_path, mode, dev)
    lengths = sorted(encoder.token_lengths(texts), reverse=True)
    result.update(weights_mb=_weights_mb(encoder.model), captions=len(texts), tokens=sum(lengths),
                  pad_frac=padding_fraction(lengths,
                                            token_budget_batches(lengths, batch_size, max_batch_tokens)))

    def run() -> torch.Tensor:
        return encoder.encode(texts, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                              show_progress=False)

    _backend.clear_selections()
    got = run()  # warm-up; also the fidelity sample
    result.update(embedding_fidelity(got, reference))
    result["pool_backend"] = _backend.last_selected("masked_mean_pool") or "none (last-token pooling)"
    result["linear_backend"] = _backend.last_selected("w8a8_linear") or {
        "llm-int8": "bitsandbytes", "torchao-int8": "torchao"}.get(mode, "torch (nn.Linear)")
    if mode == "w8a8-fp8" and result["linear_backend"] == "torch":
        result["note"] = "fp8 GEMMs emulated by the reference path (no fp8 GPU here): fidelity only"
    if dev.type == "cuda":
        peak, before = cuda_peak_mb(run, dev)
        result["peak_above_weights_mb"] = peak - before
    else:
        mark_memory_baseline()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        run()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    best = min(times)
    result["captions_per_s"] = len(texts) / best
    result["tokens_per_s"] = result["tokens"] / best
    return result


def _fidelity_models(tmp: Path, quick: bool) -> dict[str, str]:
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path
    from llm2clip_fast.models.tiny_llm import build_tiny_llm

    width, layers = (64, 2) if quick else (256, 4)
    heads, kv_heads = (4, 2) if quick else (8, 4)
    llama = build_tiny_llm(tmp / "llama", "llama", hidden_size=width, num_layers=layers, num_heads=heads,
                           num_kv_heads=kv_heads, massive_channels=3)
    return {"minilm-l6 (packaged)": str(packaged_minilm_path()),
            f"llama h{width} l{layers} (massive activations)": str(llama)}


def _available(mode: str, device: torch.device) -> str | None:
    """Why ``mode`` cannot run here (None when it can)."""
    if mode == "llm-int8" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if mode.startswith("torchao") and importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'llm2clip_fast[torchao]')"
    return None


def _add_ratios(rows: list[dict]) -> None:
    for row in rows:
        bf16 = next((r for r in rows if r["model"] == row["model"] and r["mode"] == "bf16"
                     and r.get("captions_per_s")), None)
        if bf16 and row.get("captions_per_s"):
            row["speed_vs_bf16"] = row["captions_per_s"] / bf16["captions_per_s"]
            row["weights_vs_bf16"] = row["weights_mb"] / bf16["weights_mb"]


def run_cpu_or_gpu_points(device: torch.device, modes: list[str], n_records: int, batch_size: int,
                          max_batch_tokens: int, reps: int, quick: bool,
                          out: str | Path | None) -> list[dict]:
    """Every (model, mode) point on ``device``, each in a fresh process; ``out``: rewritten after each."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="embed_bench_") as tmp:
        for model_name, path in _fidelity_models(Path(tmp), quick).items():
            for mode in modes:
                why = _available(mode, device)
                if why:
                    rows.append({"model": model_name, "mode": mode, "status": "skipped", "note": why})
                    continue
                point = run_point_in_subprocess(
                    "bench.embed_throughput:measure_point",
                    dict(model_path=path, mode=mode, device=str(device), n_records=n_records,
                         batch_size=batch_size, max_batch_tokens=max_batch_tokens, reps=reps), timeout_s=3600)
                rows.append({"model": model_name, "mode": mode, **point})
                print(f"{model_name} {mode}: {point}", flush=True)
                if out is not None:
                    write_json(out, {"machine": machine_description(), "rows": rows, "partial": True})
    _add_ratios(rows)
    return rows


# ------------------------------------------------------------------------------------------------
# The GPU plan.


def caption_length_batches(n_captions: int, max_batch_tokens: int, seed: int = 0) -> list[list[int]]:
    """Token lengths of ``n_captions`` captions drawn from the demo's length distribution (MiniLM's
    word pieces plus a prompt template's worth), sorted and cut into token-budget batches."""
    from transformers import AutoTokenizer

    from llm2clip_fast.models.llm_encoder import packaged_minilm_path, token_budget_batches

    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    pool = [len(ids) + TEMPLATE_TOKENS for ids in tokenizer(demo_captions(256, "train"))["input_ids"]]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(pool), (n_captions,), generator=g).tolist()
    drawn = sorted((pool[i] for i in picks), reverse=True)
    return [drawn[s:e] for s, e in token_budget_batches(drawn, 512, max_batch_tokens)]


def build_gpu_llama(name: str, device: torch.device, mode: str) -> torch.nn.Module:
    """A ``LlamaModel`` of ``GPU_MODELS[name]``'s shape with random bf16 weights, made on ``device``
    (nothing written to disk), its linear layers turned to ``mode`` ("bf16", "w8a8-*", "llm-int8",
    "torchao-fp8", "torchao-int8")."""
    from transformers import LlamaConfig, LlamaModel

    c = GPU_MODELS[name]
    config = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden_size"],
                         intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
                         num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
                         max_position_embeddings=2048)
    config._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaModel(config).eval()
    finally:
        torch.set_default_dtype(prev)
    if mode.startswith("w8a8"):
        from llm2clip_fast.models.w8a8 import W8A8Linear

        # Random weights have no outlier channels: no calibration, no smoothing; speed is the question.
        for mod_name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent, _, child = mod_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, W8A8Linear(module, mode))
    elif mode == "llm-int8":
        import bitsandbytes as bnb

        for mod_name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear):
                q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, module.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(module.weight.data.to(torch.float16).cpu(), requires_grad=False,
                                             has_fp16_weights=False)
                parent, _, child = mod_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, q.to(device))
    elif mode.startswith("torchao"):
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            quantize_,
        )

        config_ = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if mode == "torchao-fp8"
                   else Int8DynamicActivationInt8WeightConfig())
        quantize_(model, config_)
    return model


def gpu_throughput(name: str, mode: str, device: torch.device, n_captions: int, max_batch_tokens: int,
                   reps: int) -> dict:
    """Captions/s of ``build_gpu_llama(name, mode)`` over caption-length batches, the embed loop's way:
    pinned token ids copied without waiting, pooled vectors copied back into a pinned buffer, one
    synchronisation at the end."""
    from llm2clip_fast.ops.masked_mean_pool import masked_mean_pool

    t0 = time.perf_counter()
    model = build_gpu_llama(name, device, mode)
    torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    weights_mb = _weights_mb(model)
    batches = caption_length_batches(n_captions, max_batch_tokens)
    vocab = GPU_MODELS[name]["vocab"]
    g = torch.Generator().manual_seed(1)
    inputs = []
    for lengths in batches:
        width = lengths[0]
        ids = torch.randint(3, vocab, (len(lengths), width), generator=g).pin_memory()
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long().pin_memory()
        inputs.append((ids, mask))
    out = torch.empty(n_captions, model.config.hidden_size, pin_memory=True)

    def run() -> None:
        row = 0
        with torch.inference_mode():
            for ids, mask in inputs:
                ids_d, mask_d = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                hidden = model(input_ids=ids_d, attention_mask=mask_d).last_hidden_state
                pooled = masked_mean_pool(hidden, mask_d)
                out[row:row + len(ids)].copy_(pooled, non_blocking=True)
                row += len(ids)
        torch.cuda.synchronize(device)

    run()  # warm-up
    peak, before = cuda_peak_mb(run, device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    tokens = sum(sum(b) for b in batches)
    best = min(times)
    return {"mode": mode, "model": name, "build_s": build_s, "weights_mb": weights_mb, "captions": n_captions,
            "batches": len(batches), "tokens": tokens, "captions_per_s": n_captions / best,
            "tokens_per_s": tokens / best, "peak_above_weights_mb": peak - before}


GPU_PLAN_MODES = ("bf16", "w8a8-fp8", "w8a8-int8", "llm-int8", "torchao-fp8")


def gpu_skipped(device: torch.device, quick: bool) -> list[tuple[str, str]]:
    """(name, why) of the GPU plan's points that cannot run here (a package missing)."""
    if quick:
        return []
    return [(f"llama-8b embed {mode}", why) for mode in GPU_PLAN_MODES if (why := _available(mode, device))]


def gpu_cases(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    """(name, measure) of the GPU plan: the 8B-shaped Llama in bf16 and every 8-bit mode that can run
    (:func:`gpu_skipped` names the others), each speed relative to bf16's; ``quick``: a tiny Llama on
    the CPU (the same code path, w8a8-int8)."""
    name = "llama-8b"
    modes = [m for m in GPU_PLAN_MODES if _available(m, device) is None]
    n_captions, budget, reps = (2048, 16384, 2)
    if quick:
        GPU_MODELS["tiny"] = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                                  num_kv_heads=2, vocab=512)
        name, modes, n_captions, reps = "tiny", ["bf16", "w8a8-int8"], 16, 1
    results: dict[str, dict] = {}
    cases = []
    for mode in modes:
        def run(mode: str = mode) -> dict:
            if device.type != "cuda":
                return _cpu_smoke(name, mode, n_captions)
            r = gpu_throughput(name, mode, device, n_captions, budget, reps)
            torch.cuda.empty_cache()  # the model is gone: its memory back before the next one
            results[mode] = r
            if "bf16" in results and mode != "bf16":
                r["speed_vs_bf16"] = r["captions_per_s"] / results["bf16"]["captions_per_s"]
                r["weights_vs_bf16"] = r["weights_mb"] / results["bf16"]["weights_mb"]
            return r

        cases.append((f"{name} embed {mode}", run))
    return cases


def _cpu_smoke(name: str, mode: str, n_captions: int) -> dict:
    """The quick GPU plan's stand-in on the CPU: the model build and one forward per batch."""
    model = build_gpu_llama(name, torch.device("cpu"), mode)
    batches = caption_length_batches(n_captions, 2048)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for lengths in batches:
            ids = torch.randint(3, GPU_MODELS[name]["vocab"], (len(lengths), lengths[0]))
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return {"mode": mode, "weights_mb": _weights_mb(model), "batches": len(batches)}


def run_gpu_stage(budget_s: float, out_dir: str | Path, quick: bool = False) -> dict:
    """The GPU plan (:func:`gpu_cases`), then the fidelity points on the GPU, until ``budget_s`` is
    spent; ``out_dir/embed_gpu.json`` is rewritten after every case."""
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    doc: dict[str, Any] = {"bench": "embed_gpu", "device": str(device), "quick": quick,
                           "machine": machine_description(), "results": []}
    path = Path(out_dir) / "embed_gpu.json"
    start = time.monotonic()
    doc["results"] += [{"name": name, "status": "skipped", "note": why}
                       for name, why in gpu_skipped(device, quick)]
    run_cases_within_budget(gpu_cases(device, quick), budget_s, path, doc)
    if device.type == "cuda" and time.monotonic() - start < budget_s:
        doc["fidelity"] = run_cpu_or_gpu_points(device, ["bf16", "w8a8-fp8", "w8a8-int8"], 64, 256, 16384, 1,
                                                quick=False, out=None)
    write_json(path, doc)
    return doc


def retrieval_check(out_dir: str | Path, modes: list[str], llm: str | None = None,
                    seed: int = 0) -> list[dict]:
    """Stage-2 retrieval on caches made with each mode against the 16-bit (bf16) cache's (see the module
    docstring); returns one row per mode with val R@1/5 and ``within_one_image``."""
    from llm2clip_fast.eval.held_out import evaluate_model_dir
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path
    from llm2clip_fast.train.pipeline import (
        FULL,
        StageClock,
        embed_argv,
        run_stage,
        stage2_argv,
        write_demo_data,
    )

    root = Path(out_dir)
    splits = write_demo_data(root, FULL, seed, StageClock())
    llm_path = llm or str(packaged_minilm_path())
    rows: list[dict] = []
    for mode in ["bf16", *[m for m in modes if m != "bf16"]]:
        cache, run = root / f"cache-{mode}", root / f"stage2-{mode}"
        # fp32: the other 16-bit-free reference, whose distance from bf16 is the run-to-run noise floor.
        numerics = (["--precision", "fp32"] if mode == "fp32" else
                    ["--precision", "bf16"] + ([] if mode == "bf16" else ["--quantize", mode]))
        t0 = time.perf_counter()
        run_stage([*embed_argv(Path(llm_path), splits["train"], cache), *numerics])
        embed_s = time.perf_counter() - t0
        run_stage(stage2_argv("llm-adapter", splits["train"], run, FULL, seed, embeddings=cache))
        result = evaluate_model_dir(run / "model", splits["val"], llm=llm_path)
        row = {"mode": mode, "n_val": result["n"], "embed_s": embed_s,
               **{k: result[k] for k in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5")}}
        base = rows[0] if rows else row
        row["i2t_R@1_images_vs_16bit"] = round((row["i2t_R@1"] - base["i2t_R@1"]) * row["n_val"], 2)
        row["t2i_R@1_images_vs_16bit"] = round((row["t2i_R@1"] - base["t2i_R@1"]) * row["n_val"], 2)
        moved = max(abs(row["i2t_R@1_images_vs_16bit"]), abs(row["t2i_R@1_images_vs_16bit"]))
        row["within_one_image"] = moved <= 1
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="bench/results/embed_throughput.json")
    parser.add_argument("--records", type=int, default=None, help="demo records (2 captions each)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--modes", default=None, help="comma-separated subset of " + ",".join(MODES)
                        + " (default: all; fp32,bf16,w8a8-int8 with --quick)")
    parser.add_argument("--retrieval", default=None, metavar="DIR",
                        help="run the stage-2 retrieval check in DIR instead (see the module docstring)")
    parser.add_argument("--llm", default=None,
                        help="--retrieval: the frozen LLM (default: the demo's MiniLM)")
    args = parser.parse_args(argv)
    if args.retrieval:
        modes = [m.strip() for m in (args.modes or "w8a8-int8,llm-int8").split(",") if m.strip()]
        rows = retrieval_check(args.retrieval, modes, llm=args.llm)
        print_table(rows, list(rows[0]), title="stage-2 val retrieval per cache, demo sizes")
        write_json(args.out, {"machine": machine_description(), "args": vars(args), "retrieval": rows})
        print(f"wrote {args.out}")
        return 0 if all(r["within_one_image"] for r in rows) else 1
    default_modes = "fp32,bf16,w8a8-int8" if args.quick else ",".join(MODES)
    modes = [m.strip() for m in (args.modes or default_modes).split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad}; choose from {list(MODES)}")
    dev = torch.device(args.device)
    n_records = args.records or (4 if args.quick else 128)
    rows = run_cpu_or_gpu_points(dev, modes, n_records, args.batch_size, args.max_batch_tokens,
                                 1 if args.quick else 3, args.quick, args.out)
    columns = ["model", "mode", "status", "linear_backend", "captions_per_s", "speed_vs_bf16", "tokens_per_s",
               "weights_mb", "weights_vs_bf16", "raw_mean", "centred_mean", "centred_min", "kept_16bit",
               "load_s", "pad_frac", "peak_above_baseline_mb", "peak_above_weights_mb"]
    title = (f"frozen-LLM caption embedding on {dev.type}, batch <= {args.batch_size}, "
             f"<= {args.max_batch_tokens} tokens")
    table = print_table(rows, columns, title=title)
    errors = [r for r in rows if r.get("status") not in ("ok", "skipped")]
    for r in errors:
        print(f"{r['model']} {r['mode']}: {r.get('status')}: {str(r.get('error'))[-500:]}", file=sys.stderr)
    write_json(args.out, {"machine": machine_description(), "args": vars(args), "rows": rows, "table": table})
    print(f"wrote {args.out}")
    return 1 if errors else 0


def gpu_check_points(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    """The ``embed`` stage of bench/gpu_check.py: the 8B-shaped Llama built on the GPU in bf16 and every
    8-bit mode (:func:`gpu_cases`); the modes that cannot run here come first, as ``skipped`` rows with
    the missing package named."""
    skipped = [(name, lambda why=why: {"status": "skipped", "note": why})
               for name, why in gpu_skipped(device, quick)]
    return [*skipped, *gpu_cases(device, quick)]


if __name__ == "__main__":
    sys.exit(main())
