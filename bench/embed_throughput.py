"""Caption-embedding throughput of the frozen LLM: precision (fp32 / bf16 / LLM.int8) and length sorting.

    python bench/embed_throughput.py                 # CPU: packaged MiniLM + a tiny random Llama
    python bench/embed_throughput.py --quick         # a smoke run
    python bench/embed_throughput.py --device cuda   # GPU: adds a real-sized random Llama (--gpu-model)

Captions are the demo set's (``llm2clip_fast.data.demo``), each record's short and long caption in
record order, exactly as the embed step feeds them. For every model and precision, in a fresh
process: captions/s and (non-pad) tokens/s of ``LLMTextEncoder.encode`` (length-sorted batches)
and of the same batches in input order, the fraction of padded tokens both ways, the weight bytes
(``get_memory_footprint``: parameters + buffers) and peak memory (CPU: peak RSS, and above the
baseline taken after loading; CUDA: peak allocated during encoding). Targets: LLM.int8 weights
<= 0.55x bf16; length sorting cuts padded tokens by >= 30%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    add_common_args,
    cuda_peak_mb,
    machine_description,
    mark_memory_baseline,
    print_table,
    run_point_in_subprocess,
    write_json,
)

PRECISIONS = ("fp32", "bf16", "int8")
# A real-sized decoder for the GPU run (random weights, built from the config alone).
GPU_MODELS = {
    "llama-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8),
    "llama-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8),
}


def demo_captions(n_records: int) -> list[str]:
    """Short and long caption of each demo record, in record order (what the embed step encodes)."""
    try:
        from llm2clip_fast.data.demo import demo_records
    except ImportError:
        demo_records = None
    if demo_records is not None:
        texts = []
        for record in demo_records("train", n_records, image_size=16):
            texts += [record.captions["short"], record.captions["long"]]
        return texts
    # Fallback without the demo module: captions of varied length.
    words = "a small red circle sits above two large blue squares next to a green star".split()
    return [" ".join(words[: 3 + (i * 7) % len(words)] * (1 + i % 3)) for i in range(2 * n_records)]


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of padded positions when ``lengths`` are batched in ``order`` and padded to each batch's max."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1.0 - real / padded if padded else 0.0


def _encode_in_input_order(encoder, texts: list[str], batch_size: int) -> None:
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = encoder.tokenize(texts[start:start + batch_size])
            encoder(enc["input_ids"], enc["attention_mask"], enc["embed_mask"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_point(model_path: str, precision: str, device: str, n_records: int, batch_size: int,
                  max_length: int, reps: int) -> dict:
    """One (model, precision) point; run in its own process by :func:`run_point_in_subprocess`."""
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder

    dev = torch.device(device)
    # int8: the layers bitsandbytes leaves unquantised (embeddings, norms) in bf16 on CPU / fp16 on CUDA,
    # so the weight ratio compares like with like against the bf16 point.
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16 if dev.type == "cpu"
             else torch.float16}[precision]
    encoder = LLMTextEncoder.from_pretrained(model_path, dtype=dtype, load_in_8bit=precision == "int8",
                                             max_length=max_length, device=dev)
    texts = demo_captions(n_records)
    lengths = encoder.token_lengths(texts)
    sorted_order = encoder.length_order(texts)
    result = {
        "weights_mb": encoder.model.get_memory_footprint() / 2**20,
        "captions": len(texts),
        "pad_frac_sorted": padding_fraction(lengths, sorted_order, batch_size),
        "pad_frac_unsorted": padding_fraction(lengths, list(range(len(texts))), batch_size),
    }
    from llm2clip_fast.ops import _backend

    _backend.clear_selections()
    encoder.encode(texts[: 2 * batch_size], batch_size=batch_size, show_progress=False)  # warm-up
    result["pool_backend"] = _backend.last_selected("masked_mean_pool") or "none (last-token pooling)"
    mark_memory_baseline()
    for name, run in (("sorted", lambda: encoder.encode(texts, batch_size=batch_size, show_progress=False)),
                      ("unsorted", lambda: _encode_in_input_order(encoder, texts, batch_size))):
        times = []
        for _ in range(reps):
            _sync(dev)
            t0 = time.perf_counter()
            if dev.type == "cuda" and name == "sorted" and not times:
                peak, before = cuda_peak_mb(run, dev)
                result["cuda_peak_above_weights_mb"] = peak - before
            else:
                run()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        best = min(times)
        result[f"captions_per_s_{name}"] = len(texts) / best
        result[f"tokens_per_s_{name}"] = sum(lengths) / best
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="bench/results/embed_throughput.json")
    parser.add_argument("--records", type=int, default=None, help="demo records (2 captions each)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gpu-model", choices=sorted(GPU_MODELS), default="llama-1b")
    parser.add_argument("--models", default=None,
                        help="subset of minilm, tiny-llama, gpu (the real-sized one, CUDA only); default "
                        "all, tiny-llama alone with --quick")
    parser.add_argument("--precisions", default=None,
                        help="subset of fp32,bf16,int8 (default all; bf16,int8 with --quick)")
    args = parser.parse_args()
    models_arg = args.models or ("tiny-llama" if args.quick else "minilm,tiny-llama,gpu")
    wanted = {m.strip() for m in models_arg.split(",") if m.strip()}
    precisions_arg = args.precisions or ("bf16,int8" if args.quick else ",".join(PRECISIONS))
    precisions = [p.strip() for p in precisions_arg.split(",") if p.strip()]
    bad = sorted(wanted - {"minilm", "tiny-llama", "gpu"}) + [p for p in precisions if p not in PRECISIONS]
    if bad:
        parser.error(f"unknown --models/--precisions entries: {bad}")
    dev = torch.device(args.device)
    n_records = args.records or (4 if args.quick else (512 if dev.type == "cuda" else 128))
    reps = 1 if args.quick else 3

    from llm2clip_fast.models.llm_encoder import packaged_minilm_path
    from llm2clip_fast.models.tiny_llm import build_tiny_llm

    rows = []
    with tempfile.TemporaryDirectory(prefix="embed_bench_") as tmp:
        models = {}
        if "minilm" in wanted:
            models["minilm-l6 (packaged)"] = str(packaged_minilm_path())
        if "tiny-llama" in wanted:
            models["tiny-llama h256 l4"] = str(build_tiny_llm(Path(tmp) / "tiny", "llama", hidden_size=256,
                                                              num_layers=4, num_heads=8, num_kv_heads=4))
        if dev.type == "cuda" and "gpu" in wanted:
            name = args.gpu_model
            models[f"{name} (random)"] = str(build_tiny_llm(Path(tmp) / name, "llama", **GPU_MODELS[name]))
        for model_name, path in models.items():
            for precision in precisions:
                point = run_point_in_subprocess(
                    "bench.embed_throughput:measure_point",
                    dict(model_path=path, precision=precision, device=str(dev), n_records=n_records,
                         batch_size=args.batch_size, max_length=512, reps=reps),
                    timeout_s=1800,
                )
                rows.append({"model": model_name, "precision": precision, **point})
                print(f"{model_name} {precision}: {point}", flush=True)
                # Written after every point so an interrupted sweep keeps what it measured.
                write_json(args.out, {"machine": machine_description(), "args": vars(args), "rows": rows,
                                      "partial": True})

    for model_name in dict.fromkeys(r["model"] for r in rows):
        by = {r["precision"]: r for r in rows if r["model"] == model_name}
        if "weights_mb" in by.get("int8", {}) and "weights_mb" in by.get("bf16", {}):
            for r in by.values():
                r["int8_over_bf16_weights"] = by["int8"]["weights_mb"] / by["bf16"]["weights_mb"]
    for r in rows:
        if r.get("pad_frac_unsorted"):
            r["padding_cut"] = 1.0 - r["pad_frac_sorted"] / r["pad_frac_unsorted"]
    columns = ["model", "precision", "pool_backend", "status", "captions_per_s_sorted",
               "captions_per_s_unsorted", "tokens_per_s_sorted", "pad_frac_unsorted", "pad_frac_sorted",
               "padding_cut", "weights_mb",
               "int8_over_bf16_weights", "peak_rss_mb", "peak_above_baseline_mb",
               "cuda_peak_above_weights_mb"]
    title = f"LLM text-encoder throughput on {args.device}, batch {args.batch_size}"
    table = print_table(rows, columns, title=title)
    errors = [r for r in rows if r.get("status") != "ok"]
    for r in errors:
        why = str(r.get("error"))[-500:]
        print(f"{r['model']} {r['precision']}: {r.get('status')}: {why}", file=sys.stderr)
    write_json(args.out, {"machine": machine_description(), "args": vars(args), "rows": rows, "table": table})
    print(f"wrote {args.out}")
    return 1 if errors else 0



# The gpu_check stage's LLM: an 8B-shaped Llama (random weights from the config), a tiny one for --quick.
_GPU_CHECK_LLM = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate=14336,
                      vocab=32000)
_QUICK_LLM = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate=64, vocab=100)


def llm_embed_point(device: torch.device, llm: dict[str, int], batch: tuple[int, int], reps: int,
                    int8: bool) -> dict:
    """Embedding throughput of a random Llama built from ``llm`` on ``device`` (bf16 on CUDA, fp32 on
    CPU; ``int8``: its linear layers swapped for bitsandbytes' LLM.int8), mean-pooled over the mask."""
    from transformers import LlamaConfig, LlamaModel

    from bench.gpu_check import Timer
    from llm2clip_fast.ops import _backend
    from llm2clip_fast.ops.masked_mean_pool import masked_mean_pool

    config = LlamaConfig(vocab_size=llm["vocab"], hidden_size=llm["hidden_size"],
                         intermediate_size=llm["intermediate"], num_hidden_layers=llm["num_layers"],
                         num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"],
                         max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # random init straight on the device: no host copy of 8B weights
            model = LlamaModel(config).eval()
    finally:
        torch.set_default_dtype(prev)
    if int8:
        import bitsandbytes as bnb

        def swap(mod: torch.nn.Module) -> None:
            for name, child in mod.named_children():
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False,
                                                 has_fp16_weights=False)
                    setattr(mod, name, q.to(device))
                else:
                    swap(child)

        swap(model)
    build_s = time.perf_counter() - t0
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    bsz, seq = batch
    g = torch.Generator(device="cpu").manual_seed(5)
    ids = torch.randint(3, llm["vocab"], (bsz, seq), generator=g).to(device)
    lengths = torch.randint(seq // 4, seq + 1, (bsz,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(device)

    def embed() -> torch.Tensor:
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            return masked_mean_pool(hidden, mask)

    _backend.clear_selections()
    (ms,) = Timer(device).split([embed], reps=reps)
    tokens = int(lengths.sum())
    return {"precision": "int8" if int8 else str(dtype).replace("torch.", ""), "build_s": build_s,
            "weights_mb": weights_mb, "batch": bsz, "seq": seq, "ms": ms, "captions_per_s": bsz / ms * 1000,
            "tokens_per_s": tokens / ms * 1000, "pool_backend": _backend.last_selected("masked_mean_pool"),
            "note": "random token ids, random weights; attention over padded length, pooling over the mask"}


def gpu_check_points(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    """The ``embed`` stage of bench/gpu_check.py: (name, run) pairs in priority order, each ``run()``
    returning one result's flat metrics (optional ``status``/``note``).

    An 8B-shaped random Llama, bf16 then LLM.int8 (CUDA with bitsandbytes), batch 32 x 256 tokens;
    quick (CPU): a tiny Llama in fp32, int8 reported as skipped.
    """
    import importlib.util

    on_gpu = device.type == "cuda"
    llm, batch, reps = (_GPU_CHECK_LLM, (32, 256), 5) if on_gpu else (_QUICK_LLM, (2, 8), 2)
    name = "8B-shaped Llama" if on_gpu else "tiny Llama"

    def sixteen() -> dict:
        return llm_embed_point(device, llm, batch, reps, int8=False)

    def eight() -> dict:
        if importlib.util.find_spec("bitsandbytes") is None:
            return {"status": "skipped", "note": "bitsandbytes is not installed"}
        if not on_gpu:
            return {"status": "skipped", "note": "int8 is measured on CUDA only in this check"}
        torch.cuda.empty_cache()  # the 16-bit model is gone: give its memory back before the int8 copy
        return llm_embed_point(device, llm, batch, reps, int8=True)

    return [(f"{name} embed {'bf16' if on_gpu else 'fp32'}", sixteen), (f"{name} embed int8", eight)]


if __name__ == "__main__":
    sys.exit(main())
