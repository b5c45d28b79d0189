"""Trainer throughput: captions/s (stage 1) or images/s (stage 2) and peak memory of one training step.

    python bench/train_throughput.py --stage 1            # CPU: a small random Llama, B=64
    python bench/train_throughput.py --stage 1 --quick    # a smoke run
    python bench/train_throughput.py --stage 1 --device cuda   # a 1B-sized Llama config, B=256, bf16
    python bench/train_throughput.py --stage 2 [...]      # bench/stage2_throughput.py's options

Stage 1 runs the stage-1 trainer's own pieces (``build_trainable_encoder``: bidirectional Llama with
LoRA r=16 on q/k/v/o/gate/up/down; ``contrastive_loss``; gradient clipping; AdamW) on random token
ids (short captions ``--short-len`` tokens, long ones ``--long-len``), for each combination of

- loss: ``fused`` (the library's ``clip_loss``: no B x B matrix) or ``materialised`` (OpenCLIP-style
  logits matrix and two cross-entropies);
- frozen base: ``bf16`` weights or ``int8`` (LLM.int8 through bitsandbytes, LoRA on top); ``fp32``
  on request (``--bases``), the reference point on CPUs whose bf16 GEMMs are slow.

Each point runs in a fresh process. Reported: median step time, captions/s (2 B per step), the
frozen base's weight bytes, the process's peak RSS (CPU) or max-allocated (CUDA) and the step's
peak above what exists before it (weights, LoRA, AdamW state). ``logits_mb`` is one B x B fp32 matrix.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench._common import (
    add_common_args,
    cuda_peak_mb,
    machine_description,
    mark_memory_baseline,
    print_table,
    run_point_in_subprocess,
    time_fn,
    write_json,
)

LOSSES = ("fused", "materialised")
BASES = ("bf16", "int8", "fp32")
# Llama shapes: (hidden, layers, heads, kv heads, intermediate, vocab).
PRESETS = {
    "micro": (64, 2, 4, 2, 128, 1024),
    "small": (256, 4, 8, 4, 768, 8192),
    "1b": (2048, 16, 32, 8, 8192, 128256),
}


def _write_random_llama(folder: Path, preset: str) -> None:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    hidden, layers, heads, kv, inter, vocab = PRESETS[preset]
    # A tokenizer is only needed to build the encoder; the benchmark feeds token ids directly.
    words = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="[UNK]")),
                                  pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    tok.save_pretrained(folder)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=1024, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cpu"):
        LlamaModel(cfg).to(torch.bfloat16).save_pretrained(folder)


def materialised_contrastive_loss(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """OpenCLIP's ``ClipLoss``: the (B, B) logits and a cross-entropy in each direction."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    k = torch.nn.functional.normalize(key.float(), dim=-1)
    logits = scale * q @ k.t()
    labels = torch.arange(q.shape[0], device=q.device)
    return (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2


def stage1_point(loss: str, base: str, preset: str, batch: int, short_len: int, long_len: int, device: str,
                 gradient_checkpointing: bool, budget_s: float) -> dict:
    """One stage-1 step configuration, measured in this process (run through run_point_in_subprocess)."""
    from llm2clip_fast.train import stage1
    from llm2clip_fast.train.optim import adamw_param_groups, clip_grad_norm

    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        _write_random_llama(Path(tmp), preset)
        parser = argparse.ArgumentParser()
        stage1.add_arguments(parser)
        dtype = "fp32" if base == "fp32" else "bf16"
        args = parser.parse_args(["--llm", tmp, "--data", "-", "--out", "-", "--dtype", dtype]
                                 + (["--load-in-8bit"] if base == "int8" else [])
                                 + (["--gradient-checkpointing"] if gradient_checkpointing else []))
        built = stage1.build_trainable_encoder(args, dev)
    encoder = built.encoder
    named = [(n, p) for n, p in built.peft_model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    optimizer = torch.optim.AdamW(adamw_param_groups(named, 0.0, lr=1e-4))
    frozen = [p for p in built.peft_model.parameters() if not p.requires_grad]
    base_bytes = sum(p.numel() * p.element_size() for p in frozen)
    vocab = PRESETS[preset][5]
    g = torch.Generator().manual_seed(0)
    ids_s = torch.randint(3, vocab, (batch, short_len), generator=g).to(dev)
    ids_l = torch.randint(3, vocab, (batch, long_len), generator=g).to(dev)
    mask_s, mask_l = torch.ones_like(ids_s), torch.ones_like(ids_l)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    built.peft_model.train()

    def step() -> None:
        with autocast:
            q = encoder(ids_s, mask_s)
            k = encoder(ids_l, mask_l)
            if loss == "fused":
                value = stage1.contrastive_loss(q, k, 50.0, "clip")
            else:
                value = materialised_contrastive_loss(q, k, 50.0)
        value.backward()
        clip_grad_norm(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    from llm2clip_fast.ops import _backend

    _backend.clear_selections()
    step()  # AdamW state exists from here on: it belongs to the baseline, not the step
    result = {"base_mb": base_bytes / 2**20, "lora_params_m": sum(p.numel() for p in trainable) / 1e6,
              # as the ops recorded them; the materialised loss calls no op
              "loss_backend": _backend.last_selected("clip_loss") or "torch (materialised)",
              "pool_backend": _backend.last_selected("masked_mean_pool")}
    if dev.type == "cuda":
        peak, before = cuda_peak_mb(step, dev)
        result.update(step_peak_mb=peak - before, peak_mb=peak)
    else:
        mark_memory_baseline()
    t = time_fn(step, device=dev, warmup=0, min_reps=2, max_reps=20, budget_s=budget_s)
    result.update(step_ms=t.median_ms, captions_per_s=2 * batch / (t.median_ms * 1e-3))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="Llama shape (default: small on CPU, 1b on CUDA; micro with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="caption pairs per step (CPU 64, CUDA 256)")
    parser.add_argument("--short-len", type=int, default=24)
    parser.add_argument("--long-len", type=int, default=128)
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--bases", default=None,
                        help=f"comma-separated subset of {','.join(BASES)} "
                        "(default bf16,int8; bf16 with --quick)")
    parser.add_argument("--gradient-checkpointing", action="store_true")


def run_stage1(args: argparse.Namespace) -> int:
    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    preset = args.preset or ("1b" if on_gpu else ("micro" if args.quick else "small"))
    batch = args.batch or (256 if on_gpu else (4 if args.quick else 64))
    if args.quick:  # a smoke run: short sequences (the step's code is the same at any length)
        args.short_len, args.long_len = min(args.short_len, 8), min(args.long_len, 16)
    if batch < 2:
        raise ValueError(f"--batch must be >= 2 (in-batch negatives), got {batch}")
    losses = [x for x in args.losses.split(",") if x]
    bases = [x for x in (args.bases or ("bf16" if args.quick else "bf16,int8")).split(",") if x]
    for name, chosen, allowed in (("--losses", losses, LOSSES), ("--bases", bases, BASES)):
        bad = [x for x in chosen if x not in allowed]
        if bad or not chosen:
            raise ValueError(f"{name}: unknown {bad}; choose from {list(allowed)}")
    budget_s = 0.05 if args.quick else 6.0
    rows = []
    for base in bases:
        for loss in losses:
            r = run_point_in_subprocess(
                "bench.train_throughput:stage1_point",
                {"loss": loss, "base": base, "preset": preset, "batch": batch, "short_len": args.short_len,
                 "long_len": args.long_len, "device": str(dev),
                 "gradient_checkpointing": bool(args.gradient_checkpointing or on_gpu), "budget_s": budget_s},
                timeout_s=3600)
            row = {"loss": loss, "base": base, "model": preset, "batch": batch, "status": r.get("status"),
                   "logits_mb": batch * batch * 4 / 2**20}
            if r.get("status") == "ok":
                keys = ("loss_backend", "pool_backend", "step_ms", "captions_per_s", "base_mb",
                        "lora_params_m")
                row.update({k: r.get(k) for k in keys})
                row["step_peak_mb"] = r.get("step_peak_mb", r.get("peak_above_baseline_mb"))
                row["peak_mb"] = r.get("peak_mb", r.get("peak_rss_mb"))
            else:
                row["error"] = str(r.get("error", ""))[-400:]
                print(f"  {loss} {base}: {row['status']}: {row['error']}", flush=True)
            rows.append(row)
    cols = ["loss", "loss_backend", "pool_backend", "base", "model", "batch", "step_ms", "captions_per_s",
            "base_mb", "step_peak_mb", "peak_mb", "logits_mb", "status"]
    print_table(rows, cols, title=f"stage-1 step (LoRA r=16, {args.short_len}+{args.long_len} tokens, "
                                  f"{dev.type}, {torch.get_num_threads()} threads)")
    path = write_json(args.out, {"bench": "train_throughput", "stage": 1, "device": dev.type,
                                 "preset": preset, "machine": machine_description(), "rows": rows})
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage", type=int, choices=(1, 2), default=1)
    known, rest = pre.parse_known_args(argv)
    if known.stage == 2:
        from bench import stage2_throughput

        return stage2_throughput.main(rest)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    add_common_args(parser, default_out="bench/results/train_throughput_stage1.json")
    add_arguments(parser)
    return run_stage1(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
