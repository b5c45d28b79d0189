"""The demo trained from an int8 embedding cache against an fp16 one, two seeds each.

    python scripts/cache_dtype_demo.py --out runs/cache-dtypes            # the pipeline's --quick sizes
    python scripts/cache_dtype_demo.py --out runs/cache-dtypes --full     # the full demo sizes

One stage-1 model (the pipeline's stage 1 on the demo set), then the train captions embedded three
times through the same ``embed`` command (``--dtype fp32``, ``fp16``, ``int8``); prints bytes per
caption and the cosine of every fp16 / int8 embedding to its fp32 one. Stage 2 then runs from the
fp16 and from the int8 cache with seeds 0 and 1 (same data, steps, batch and vision tower as the
pipeline), each evaluated like the pipeline (val and long_detail); the table shows all four runs, so
the seed-to-seed spread (the noise) sits next to the fp16-int8 difference. Writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # the idiom of bench/_repo_path.py, which a file in scripts/ cannot import
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm2clip_fast.eval.held_out import evaluate_model_dir
from llm2clip_fast.eval.results_files import write_json_atomic
from llm2clip_fast.eval.text_encoder import load_text_encoder
from llm2clip_fast.train.pipeline import (
    FULL,
    QUICK,
    format_comparison,
    run_stage,
    stage1_argv,
    stage1_model_dir,
    stage2_argv,
)

DTYPES = ("fp32", "fp16", "int8")


def cache_bytes_per_caption(folder: Path) -> float:
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = ("file", "scales_file", "stats_file")
    files = [folder / s[k] for s in manifest["shards"] for k in parts if k in s]
    return sum(f.stat().st_size for f in files) / manifest["num_rows"]


def fidelity(folder: Path, ref_folder: Path) -> dict[str, float]:
    from llm2clip_fast.data.embedding_cache import EmbeddingCache

    cache, ref = EmbeddingCache.open(folder), EmbeddingCache.open(ref_folder)
    cos = []
    for name in ref.caption_names:
        a = cache.lookup(ref.keys(), name).double().numpy()
        b = ref.lookup(ref.keys(), name).double().numpy()
        cos.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    c = np.concatenate(cos)
    return {"cos_mean": float(c.mean()), "cos_min": float(c.min()), "rows": int(c.size)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--full", action="store_true", help="the full demo sizes (default: --quick sizes)")
    parser.add_argument("--seeds", default="0,1", help="stage-2 seeds per cache dtype")
    args = parser.parse_args(argv)
    from llm2clip_fast.data.demo import write_demo
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path

    sizes = FULL if args.full else QUICK
    seeds = [int(s) for s in args.seeds.split(",")]
    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    splits = {k: str(v) for k, v in write_demo(run / "data", n_train=sizes.n_train, n_val=sizes.n_val,
                                               n_long_detail_groups=sizes.long_detail_groups, seed=0,
                                               image_size=sizes.image_size).items()}
    run_stage(stage1_argv(packaged_minilm_path(), splits["train"], splits["val"], run / "stage1", sizes, 0))
    llm = stage1_model_dir(run / "stage1")
    for dtype in DTYPES:
        run_stage(["embed", "--llm", str(llm), "--data", splits["train"], "--out",
                   str(run / f"cache-{dtype}"), "--dtype", dtype, "--batch-size", "128", "--quiet"])
    caches = {d: {"bytes_per_caption": cache_bytes_per_caption(run / f"cache-{d}"),
                  **fidelity(run / f"cache-{d}", run / "cache-fp32")} for d in DTYPES}
    for d, c in caches.items():
        print(f"cache {d}: {c['bytes_per_caption']:.1f} bytes per caption, cosine to fp32 mean "
              f"{c['cos_mean']:.6f} min {c['cos_min']:.6f} over {c['rows']} embeddings", flush=True)
    results: dict[str, dict] = {}
    encoder = None
    for dtype in ("fp16", "int8"):
        for seed in seeds:
            name = f"{dtype} seed {seed}"
            out = run / f"stage2-{dtype}-s{seed}"
            run_stage(stage2_argv("llm-adapter", splits["train"], out, sizes, seed,
                                  embeddings=run / f"cache-{dtype}"))
            model_dir = out / "model"
            if encoder is None:
                from llm2clip_fast.models.llm2clip import LLM2CLIPModel

                encoder = load_text_encoder(LLM2CLIPModel.from_pretrained(model_dir))
            results[name] = {split: evaluate_model_dir(model_dir, splits[split], encoder=encoder)
                             for split in ("val", "long_detail")}
    table = format_comparison(results)
    write_json_atomic(run / "results.json", {"sizes": "full" if args.full else "quick", "caches": caches,
                                             "results": results, "table": table})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
