"""The main job: ``python -m llm2clip_fast.train`` runs the whole LLM2CLIP pipeline on the demo set.

Stages, each through the same entry point a user runs alone (``python -m llm2clip_fast.train <stage>``):

1. ``data``: write the built-in demo set (train, val, long_detail) as JSONL manifests + PNGs;
2. ``stage1``: caption-contrastive LoRA fine-tuning of the packaged all-MiniLM-L6-v2 on the train
   captions (short <-> long of the same image), merged into a model folder;
3. ``embed``: every train caption through the frozen stage-1 model into the embedding cache;
4. ``stage2``: a small CLIP vision tower + text adapter trained on the cached embeddings;
5. ``eval``: retrieval / CRA / zero-shot on val and on the long-detail split (captions embedded
   through the frozen stage-1 LLM, then the adapter);
6. ``baseline``: the same stage 2 (same data, steps, batch, vision tower) with ``--text-tower clip``,
   a CLIP-style text transformer trained from scratch on 77 tokens, evaluated the same way.

It ends with a results table (LLM2CLIP against the 77-token baseline) and writes ``results.json`` into
the run folder (default ``runs/demo-<UTC timestamp>``), with the wall and CPU seconds of every stage.
``--quick`` is a tiny run (a few steps per stage) for tests.

Where the time goes on CPU: the stage-1 steps (forward + backward of MiniLM on 16 short + 16 long
captions of up to ~200 tokens) and the two stage-2 runs (a 4-layer ViT on 64 px images, batch 64; the
baseline also trains its text transformer). The default sizes stay within 10 minutes on 2
uncontended cores (3 min measured on an AMX Xeon, 2026-12-06); the embed step and the evaluations are
forward passes only and cost much less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llm2clip_fast.eval.held_out import DEFAULT_KS, evaluate_model_dir
from llm2clip_fast.eval.results_files import write_json_atomic
from llm2clip_fast.eval.text_encoder import load_text_encoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSizes:
    """Data and training sizes of one pipeline run (the same for LLM2CLIP and the baseline)."""

    n_train: int
    n_val: int
    long_detail_groups: int
    image_size: int
    stage1_steps: int
    stage1_batch: int
    stage1_lr: float
    stage1_eval_size: int
    stage2_steps: int
    stage2_batch: int
    stage2_lr: float
    embed_dim: int
    vision_preset: str
    clip_text_width: int
    clip_text_layers: int
    clip_text_heads: int
    adapter_blocks: int = 1


# FULL is sized to stay within 10 minutes on 2 uncontended CPU cores (3 min measured, 2026-12-06; module
# docstring: where the time goes); QUICK only checks that every stage runs and learns something.
#
# adapter_blocks: the official TextProj has 4 residual blocks, trained on 4096-d embeddings of ~13M
# captions for 20 epochs. At demo scale (384-d MiniLM, 1,500 images, 150 steps) those 4 blocks (2.4M
# weights from scratch) overfit the long captions and lose the LLM's short/long alignment: with 4 blocks
# LLM2CLIP's zero-shot fell below the baseline's on seeds 1 and 2 and the CRA through the adapter halved.
# One block (the same TextProj, scaled to the data) keeps both (issue 27, item 10; README "The demo").
FULL = DemoSizes(n_train=1500, n_val=300, long_detail_groups=50, image_size=64,
                 stage1_steps=30, stage1_batch=16, stage1_lr=2e-4, stage1_eval_size=100,
                 stage2_steps=150, stage2_batch=64, stage2_lr=5e-4, embed_dim=128,
                 vision_preset="demo-tiny", clip_text_width=128, clip_text_layers=4, clip_text_heads=4)
QUICK = DemoSizes(n_train=128, n_val=40, long_detail_groups=5, image_size=64,
                  stage1_steps=2, stage1_batch=8, stage1_lr=2e-4, stage1_eval_size=24,
                  stage2_steps=30, stage2_batch=32, stage2_lr=5e-4, embed_dim=64,
                  vision_preset="demo-tiny", clip_text_width=64, clip_text_layers=2, clip_text_heads=2)


def _say(message: str) -> None:
    logger.info("[pipeline] %s", message)


def run_stage(argv: list[str]) -> None:
    """Run one sub-command exactly as ``python -m llm2clip_fast.train ARGV`` would, in this process."""
    from llm2clip_fast.train.__main__ import main

    rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"stage {argv[0]!r} exited with status {rc}: python -m llm2clip_fast.train "
                           + " ".join(argv))


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime())


def stage1_argv(llm: Path, data: str, eval_data: str, out: Path, sizes: DemoSizes, seed: int) -> list[str]:
    return ["stage1", "--llm", str(llm), "--data", data, "--eval-data", eval_data,
            "--eval-size", str(sizes.stage1_eval_size), "--out", str(out),
            "--steps", str(sizes.stage1_steps), "--batch-size", str(sizes.stage1_batch),
            "--lr", str(sizes.stage1_lr), "--seed", str(seed), "--save-every", str(sizes.stage1_steps),
            "--log-every", "10"]


def read_stage1_cra(out: Path) -> dict[str, Any] | None:
    """Stage 1's own CRA record (``cra.json``: before/after fine-tuning), None when it wrote none."""
    path = out / "cra.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record if {"before", "after"} <= set(record) else None


def stage1_model_dir(out: Path) -> Path:
    """The merged stage-1 model folder that ``LLMTextEncoder.from_pretrained`` loads."""
    return out / "merged"


def embed_argv(llm: Path, data: str, out: Path) -> list[str]:
    return ["embed", "--llm", str(llm), "--data", data, "--out", str(out), "--dtype", "fp32",
            "--batch-size", "128", "--quiet"]


# What stage 2 trains on in the demo (both systems); see docs and the closing note for the comparison
# with the official recipe's 50/50 short/long mix.
DEFAULT_STAGE2_CAPTION = "long"


def stage2_argv(text_tower: str, data: str, out: Path, sizes: DemoSizes, seed: int,
                embeddings: Path | None = None, caption: str = "long") -> list[str]:
    argv = ["stage2", "--text-tower", text_tower, "--data", data, "--out", str(out),
            "--vision-preset", sizes.vision_preset, "--image-size", str(sizes.image_size),
            "--embed-dim", str(sizes.embed_dim), "--steps", str(sizes.stage2_steps),
            "--batch-size", str(sizes.stage2_batch), "--lr", str(sizes.stage2_lr), "--seed", str(seed),
            "--caption", caption, "--num-workers", "0", "--save-every", str(sizes.stage2_steps),
            "--log-every", "25"]
    if text_tower == "clip":
        argv += ["--clip-text-width", str(sizes.clip_text_width), "--clip-text-layers",
                 str(sizes.clip_text_layers), "--clip-text-heads", str(sizes.clip_text_heads)]
    else:
        argv += ["--embeddings", str(embeddings), "--adapter-blocks", str(sizes.adapter_blocks)]
    return argv


SUMMARY_COLUMNS = (
    [("val", f"i2t_R@{k}", f"val i2t R@{k}") for k in DEFAULT_KS]
    + [("val", f"t2i_R@{k}", f"val t2i R@{k}") for k in DEFAULT_KS]
    + [("long_detail", "t2i_R@1", "long t2i R@1"), ("long_detail", "i2t_R@1", "long i2t R@1"),
       ("val", "cra", "CRA"), ("val", "zero_shot", "zero-shot")]
)


def format_comparison(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The final table: one row per system, percentages; ``results[system][split]`` is an eval dict."""
    headers = [label for _, _, label in SUMMARY_COLUMNS]
    name_w = max(len(name) for name in [*results, "chance"])
    widths = [max(6, len(h)) for h in headers]
    lines = ["  ".join([" " * name_w, *(h.rjust(w) for h, w in zip(headers, widths))])]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    for name, by_split in results.items():
        cells = [cell(by_split.get(split, {}).get(key)) for split, key, _ in SUMMARY_COLUMNS]
        lines.append("  ".join([name.ljust(name_w), *(c.rjust(w) for c, w in zip(cells, widths))]))
    any_system = next(iter(results.values()))
    chance = []
    for split, key, _ in SUMMARY_COLUMNS:
        n = any_system.get(split, {}).get("n")
        k = int(key.rsplit("@", 1)[1]) if "@" in key else 1
        chance.append(cell(min(1.0, k / n)) if n and key != "zero_shot" else "-")
    lines.append("  ".join(["chance".ljust(name_w), *(c.rjust(w) for c, w in zip(chance, widths))]))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="run folder (default runs/demo-<UTC timestamp>)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (tests, smoke checks): about a minute")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every stage")
    parser.add_argument("--n-train", type=int, default=None,
                        help="train images (default 1500; 128 with --quick)")
    parser.add_argument("--skip-baseline", action="store_true", help="train and evaluate LLM2CLIP only")
    parser.add_argument("--caption", default=DEFAULT_STAGE2_CAPTION,
                        help="stage 2's caption choice for both systems: a field name, 'random', or a "
                             "weighted mix such as short:0.5,long:0.5 (the official recipe's)")


def demo_sizes(args: argparse.Namespace) -> DemoSizes:
    """FULL or QUICK (``--quick``), with ``--n-train`` applied (at least two batches of either stage)."""
    sizes = QUICK if args.quick else FULL
    if args.n_train is not None:
        if args.n_train < 2 * max(sizes.stage1_batch, sizes.stage2_batch):
            raise ValueError(f"--n-train must be at least {2 * max(sizes.stage1_batch, sizes.stage2_batch)} "
                             f"(two batches), got {args.n_train}")
        sizes = replace(sizes, n_train=args.n_train)
    return sizes


class StageClock:
    """Wall and CPU seconds of each stage, announced as it starts and ends."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def timed(self, name: str, what: str) -> Iterator[None]:
        _say(f"--- {name}: {what}")
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = time.perf_counter() - t0
        self.cpu[name] = time.process_time() - c0
        _say(f"--- {name} done in {self.wall[name]:.1f}s ({self.cpu[name]:.1f} CPU-s)")


def write_demo_data(run_dir: Path, sizes: DemoSizes, seed: int, clock: StageClock) -> dict[str, str]:
    """The ``data`` stage: the demo splits (train, val, long_detail) as manifest specs."""
    from llm2clip_fast.data.demo import write_demo

    with clock.timed("data", f"demo set: {sizes.n_train} train, {sizes.n_val} val, "
                             f"{sizes.long_detail_groups} long-detail groups of 4, {sizes.image_size}px"):
        splits = write_demo(run_dir / "data", n_train=sizes.n_train, n_val=sizes.n_val,
                            n_long_detail_groups=sizes.long_detail_groups, seed=seed,
                            image_size=sizes.image_size)
    return {name: str(spec) for name, spec in splits.items()}


def train_llm2clip(run_dir: Path, splits: dict[str, str], sizes: DemoSizes, args: argparse.Namespace,
                   clock: StageClock) -> None:
    """The ``stage1``, ``embed`` and ``stage2`` stages, each through its sub-command."""
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path

    stage1_dir = run_dir / "stage1"
    with clock.timed("stage1", f"caption-contrastive LoRA on all-MiniLM-L6-v2, {sizes.stage1_steps} steps"):
        run_stage(stage1_argv(packaged_minilm_path(), splits["train"], splits["val"], stage1_dir, sizes,
                              args.seed))
    with clock.timed("embed", "train captions through the frozen stage-1 model"):
        run_stage(embed_argv(stage1_model_dir(stage1_dir), splits["train"], run_dir / "embeddings"))
    with clock.timed("stage2", f"vision tower + adapter on cached embeddings, {sizes.stage2_steps} steps"):
        run_stage(stage2_argv("llm-adapter", splits["train"], run_dir / "llm2clip", sizes, args.seed,
                              embeddings=run_dir / "embeddings", caption=args.caption))


def evaluate_llm2clip(run_dir: Path, splits: dict[str, str], clock: StageClock) -> dict[str, dict[str, Any]]:
    """The ``eval`` stage: the LLM2CLIP model on val and long_detail (``eval/llm2clip_<split>.json``)."""
    from llm2clip_fast.models.llm2clip import LLM2CLIPModel

    results: dict[str, dict[str, Any]] = {}
    with clock.timed("eval", "LLM2CLIP on val and long_detail"):
        model_dir = run_dir / "llm2clip" / "model"
        encoder = load_text_encoder(LLM2CLIPModel.from_pretrained(model_dir))
        for split in ("val", "long_detail"):
            r = evaluate_model_dir(model_dir, splits[split], encoder=encoder)
            write_json_atomic(run_dir / "eval" / f"llm2clip_{split}.json", r)
            results[split] = r
        del encoder
    return results


def run_baseline(run_dir: Path, splits: dict[str, str], sizes: DemoSizes, args: argparse.Namespace,
                 clock: StageClock) -> dict[str, dict[str, Any]]:
    """The ``baseline`` and ``baseline-eval`` stages: stage 2 with the 77-token CLIP text tower, then
    its evaluation (``eval/baseline_<split>.json``)."""
    results: dict[str, dict[str, Any]] = {}
    with clock.timed("baseline", f"stage 2 with the 77-token CLIP text tower, {sizes.stage2_steps} steps"):
        run_stage(stage2_argv("clip", splits["train"], run_dir / "baseline", sizes, args.seed,
                              caption=args.caption))
    with clock.timed("baseline-eval", "baseline on val and long_detail"):
        for split in ("val", "long_detail"):
            r = evaluate_model_dir(run_dir / "baseline" / "model", splits[split])
            write_json_atomic(run_dir / "eval" / f"baseline_{split}.json", r)
            results[split] = r
    return results


def print_results(results: dict[str, dict[str, dict[str, Any]]], table: str,
                  stage1_cra: dict[str, Any] | None, clock: StageClock, total: float, run_dir: Path) -> None:
    """The closing report on stdout: the comparison table, stage 1's CRA, the time per stage."""
    print()
    print(f"Results (%, val: {results['LLM2CLIP']['val']['n']} images; long_detail: "
          f"{results['LLM2CLIP']['long_detail']['n']} images in groups of 4 whose long captions share "
          f"their first 77+ tokens)")
    print(table)
    print("(CRA above: short -> own long caption through the LLM and the trained adapter or text tower.)")
    if stage1_cra:
        print(f"Stage-1 CRA of the LLM alone on {stage1_cra.get('pairs')} val pairs: "
              f"{100 * stage1_cra['before']:.1f}% before, {100 * stage1_cra['after']:.1f}% after fine-tuning")
    print()
    per_stage = ", ".join(f"{k} {v:.0f}s" for k, v in clock.wall.items())
    print(f"time per stage: {per_stage}; total {total:.0f}s")
    print(f"run folder: {run_dir.resolve()}")


def run(args: argparse.Namespace) -> int:
    """The whole pipeline on the demo set (module docstring); writes ``results.json``."""
    sizes = demo_sizes(args)
    run_dir = Path(args.out) if args.out else default_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    _say(f"run folder {run_dir.resolve()} ({'quick' if args.quick else 'full'} run, seed {args.seed})")
    clock = StageClock()
    splits = write_demo_data(run_dir, sizes, args.seed, clock)
    train_llm2clip(run_dir, splits, sizes, args, clock)
    results: dict[str, dict[str, dict[str, Any]]] = {"LLM2CLIP": evaluate_llm2clip(run_dir, splits, clock)}
    if not args.skip_baseline:
        results["CLIP-77 baseline"] = run_baseline(run_dir, splits, sizes, args, clock)
    total = time.perf_counter() - clock.started
    table = format_comparison(results)
    stage1_cra = read_stage1_cra(run_dir / "stage1")
    summary = {"run_dir": str(run_dir.resolve()), "seed": args.seed, "quick": bool(args.quick),
               "stage1_cra": stage1_cra,
               "sizes": asdict(sizes), "seconds": clock.wall, "cpu_seconds": clock.cpu,
               "total_seconds": total, "results": results,
               "table": table}
    write_json_atomic(run_dir / "results.json", summary)
    print_results(results, table, stage1_cra, clock, total, run_dir)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
