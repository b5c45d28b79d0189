"""Stage 2 trainer on CPU at tiny sizes: end to end, exact resume, accumulation, bad set-ups, 2-rank gloo.

The embedding cache is real (written by ``build_embedding_cache``) with a cheap, deterministic text
encoder: a hashed bag of words (each word a fixed random vector), so captions that share words get
similar embeddings and the run has signal to learn from, without any LLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _ranks import free_ports, run_in_turn, run_on_ranks
from _stage2_runs import DIM, N_TRAIN, bag_of_words, final_state, stage2_args, stop_stage2_in_step

from llm2clip_fast.data.demo import write_demo
from llm2clip_fast.data.embedding_cache import build_embedding_cache
from llm2clip_fast.data.sources import open_source
from llm2clip_fast.models.llm2clip import LLM2CLIPModel
from llm2clip_fast.train import stage2
from llm2clip_fast.train.__main__ import main as train_main


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage2")
    spec = write_demo(root / "data", n_train=N_TRAIN, n_val=0, n_long_detail_groups=0, image_size=32)["train"]
    source = open_source(spec)
    build_embedding_cache(source.iter_captions(), bag_of_words, root / "cache",
                          caption_names=source.caption_names, dim=DIM,
                          metadata={"path": "bag-of-words", "pooling": "mean"})
    # A cache that lacks the last 5 keys of the data.
    partial = [(k, c) for k, c in source.iter_captions()][:-5]
    build_embedding_cache(partial, bag_of_words, root / "partial_cache", caption_names=source.caption_names,
                          dim=DIM)
    return {"root": root, "data": Path(spec), "cache": root / "cache", "partial": root / "partial_cache"}


def test_end_to_end_trains_and_writes_run_folder(demo, tmp_path):
    out = tmp_path / "run"
    assert train_main(stage2_args(demo, out, "--save-every", "5", "--warmup", "1", "--lr", "3e-3",
                                  steps=10, batch=16)) == 0
    for name in ("log.jsonl", "loss.png", "config.json", "summary.json", "model/config.json",
                 "model/model.safetensors"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    losses = [r["loss"] for r in log]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]
    model = LLM2CLIPModel.from_pretrained(out / "model")
    assert model.config.llm == {"path": "bag-of-words", "pooling": "mean"}
    assert model.config.llm_dim == DIM and model.image_size == 32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["bad_data"]["bad"] == 0


def test_resume_after_kill_equals_uninterrupted(demo, tmp_path, monkeypatch):
    args = ("--save-every", "2", "--caption", "random")
    train_main(stage2_args(demo, tmp_path / "full", *args, steps=6, batch=8))

    # killed during step 6 (epoch 1), after the step-4 checkpoint
    stop_stage2_in_step(monkeypatch, stage2_args(demo, tmp_path / "killed", *args, steps=6, batch=8), 6)
    assert not (tmp_path / "killed" / "model").exists()
    train_main(stage2_args(demo, tmp_path / "killed", *args, "--resume", steps=6, batch=8))

    full, resumed = final_state(tmp_path / "full"), final_state(tmp_path / "killed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    log = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    full_log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]

    with pytest.raises(ValueError, match="batch_size"):
        train_main(stage2_args(demo, tmp_path / "killed", *args, "--resume", steps=6, batch=4))


def test_resume_at_an_odd_step_with_two_loader_workers_equals_uninterrupted(demo, tmp_path, monkeypatch):
    # Checkpoint at step 3, killed in step 4: the resumed loader starts at the odd slot 3 with two
    # workers, where a worker assignment ignoring the start slot would swap slots 3 and 4.
    args = ("--save-every", "3", "--caption", "random", "--num-workers", "2")
    train_main(stage2_args(demo, tmp_path / "full", *args, steps=5, batch=8))

    stop_stage2_in_step(monkeypatch, stage2_args(demo, tmp_path / "killed", *args, steps=5, batch=8), 4)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step_00000003"]
    train_main(stage2_args(demo, tmp_path / "killed", *args, "--resume", steps=5, batch=8))

    full, resumed = final_state(tmp_path / "full"), final_state(tmp_path / "killed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    log = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    full_log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]


def test_grad_accum_equals_one_big_batch(demo, tmp_path):
    train_main(stage2_args(demo, tmp_path / "big", "--save-every", "0", steps=2, batch=8))
    train_main(stage2_args(demo, tmp_path / "accum", "--save-every", "0", "--grad-accum", "2",
                           steps=2, batch=4))
    big, accum = final_state(tmp_path / "big"), final_state(tmp_path / "accum")
    for k in big:
        torch.testing.assert_close(accum[k], big[k], atol=2e-5, rtol=1e-4, msg=k)


def test_model_records_the_llm_behind_the_cache():
    info = stage2.llm_provenance({"model": "/models/llm", "pooling": "mean", "instruction": None})
    assert info == {"model": "/models/llm", "path": "/models/llm", "pooling": "mean", "instruction": None}


def test_siglip_loss_trains_logit_bias(demo, tmp_path):
    out = tmp_path / "siglip"
    train_main(stage2_args(demo, out, "--save-every", "0", "--loss", "siglip", steps=2))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # At the initial bias -10 every sigmoid is ~0: the positive pairs' gradient on the bias (~ -B) dwarfs
    # the negatives' (~ B^2 e^-10), so Adam moves it up by exactly lr on step 1 (m/sqrt(v) = 1) and by
    # at most lr on step 2 (same sign; a smaller second gradient makes the step smaller: measured 0.94 lr).
    bias = [r["logit_bias"] for r in log]
    assert bias[0] == pytest.approx(-10.0 + log[0]["lr"], rel=1e-6, abs=1e-6)
    assert 0.8 * log[1]["lr"] < bias[1] - bias[0] <= 1.001 * log[1]["lr"]
    model = LLM2CLIPModel.from_pretrained(out / "model")
    assert model.config.loss == "siglip" and model.logit_bias.item() == pytest.approx(bias[-1], abs=1e-6)


def test_clip_text_tower_baseline_trains_on_raw_captions(demo, tmp_path):
    out = tmp_path / "clip"
    args = stage2_args(demo, out, "--save-every", "0", "--text-tower", "clip", "--clip-text-width", "32",
                       "--clip-text-layers", "1", "--clip-text-heads", "2", steps=2)
    i = args.index("--embeddings")
    del args[i:i + 2]
    assert train_main(args) == 0
    model = LLM2CLIPModel.from_pretrained(out / "model").eval()
    assert model.config.text_tower == "clip"
    texts = ["a small red circle", "a large blue square above a green cross"]
    got = model.encode_captions(texts)
    # The saved tower itself, tokenised and run by hand, then L2-normalised: (2, embed_dim 16).
    ids, mask = model.clip_text.tokenize(texts)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.clip_text(ids, mask), dim=-1)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_freeze_vision_layers_and_llrd(demo, tmp_path):
    from llm2clip_fast.models.llm2clip import LLM2CLIPConfig
    from llm2clip_fast.models.vision import VISION_PRESETS

    torch.manual_seed(3)
    config = LLM2CLIPConfig(vision=VISION_PRESETS["micro"], embed_dim=16, llm_dim=DIM,
                            adapter={"num_blocks": 1, "expansion": 2, "dropout": 0.0})
    init = LLM2CLIPModel(config)
    init.save_pretrained(tmp_path / "init")
    start = init.state_dict()

    multipliers = stage2.lr_multipliers(init, 0.5)
    assert multipliers["vision.model.embeddings.patch_embedding.weight"] == 0.5 ** 3
    assert multipliers["vision.model.encoder.layers.1.mlp.fc1.weight"] == 0.5
    assert multipliers["vision.model.post_layernorm.weight"] == 1.0

    args = stage2_args(demo, tmp_path / "frozen", "--save-every", "0", "--freeze-vision-layers", "1", steps=2)
    i = args.index("--vision-preset")
    args[i:i + 2] = ["--init-model", str(tmp_path / "init")]
    train_main(args)
    trained = final_state(tmp_path / "frozen")
    for name in ("vision.model.embeddings.patch_embedding.weight",
                 "vision.model.encoder.layers.0.mlp.fc1.weight"):
        assert torch.equal(trained[name], start[name]), name
    for name in ("vision.model.encoder.layers.1.mlp.fc1.weight", "text_adapter.proj.weight",
                 "visual_projection.weight"):
        assert not torch.equal(trained[name], start[name]), name


@pytest.mark.parametrize("case", ["missing_keys", "dim_mismatch", "image_size", "caption", "too_small",
                                  "no_cache"])
def test_bad_setups_fail_at_start_with_clear_errors(demo, tmp_path, case):
    out = tmp_path / case
    if case == "missing_keys":
        args = stage2_args(demo, out)
        args[args.index("--embeddings") + 1] = str(demo["partial"])
        match = r"lacks embeddings for 5 of the 48 keys"
    elif case == "dim_mismatch":
        from llm2clip_fast.models.llm2clip import LLM2CLIPConfig
        from llm2clip_fast.models.vision import VISION_PRESETS

        config = LLM2CLIPConfig(vision=VISION_PRESETS["micro"], embed_dim=16, llm_dim=DIM + 8)
        LLM2CLIPModel(config).save_pretrained(tmp_path / "init")
        args = stage2_args(demo, out)
        i = args.index("--vision-preset")
        args[i:i + 2] = ["--init-model", str(tmp_path / "init")]
        match = rf"cache holds {DIM}-d embeddings but .* llm_dim={DIM + 8}"
    elif case == "image_size":
        args = stage2_args(demo, out, "--image-size", "64")
        match = "image size mismatch: --image-size 64 but the vision tower takes 32x32"
    elif case == "caption":
        args = stage2_args(demo, out, "--caption", "medium")
        match = r"--caption 'medium' is not a caption of the data; it has \['short', 'long'\]"
    elif case == "too_small":
        args = stage2_args(demo, out, batch=64)
        match = "fewer than batch-size 64"
    else:
        args = stage2_args(demo, out)
        args[args.index("--embeddings") + 1] = str(tmp_path / "nowhere")
        match = "run the embed step first"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train_main(args)
    assert not (out / "checkpoints").exists()


DISTRIBUTED_COMMON = ("--save-every", "0", "--caption", "random")


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_gloo_equals_one_process_on_the_same_global_batch(demo, tmp_path):
    train_main(stage2_args(demo, tmp_path / "single", *DISTRIBUTED_COMMON, steps=3, batch=8))
    runs = {  # each: the same 8-image global batch per step as the single process
        # DDP with static_graph (auto: on without accumulation) and 10 KB buckets (many all-reduces, each
        # launched as its bucket fills during the backward), then with accumulation (static_graph off)
        "ddp": stage2_args(demo, tmp_path / "ddp", *DISTRIBUTED_COMMON, "--ddp-bucket-mb", "0.01", steps=3,
                           batch=4),
        "ddp_accum": stage2_args(demo, tmp_path / "ddp_accum", *DISTRIBUTED_COMMON, "--grad-accum", "2",
                                 steps=3, batch=2),
        "fsdp": stage2_args(demo, tmp_path / "fsdp", *DISTRIBUTED_COMMON, "--fsdp", "--grad-accum", "2",
                            steps=3, batch=2),  # 2 ranks x 2 micro-batches x 2 images
        # FSDP2 with every vision layer checkpointed: the recompute runs on unsharded weights
        "fsdp_ckpt": stage2_args(demo, tmp_path / "fsdp_ckpt", *DISTRIBUTED_COMMON, "--fsdp",
                                 "--grad-checkpointing", steps=3, batch=4),
    }
    # Each run on its own rendezvous port, as separate torchrun jobs would (see tests/_ranks.py).
    ports = free_ports(len(runs))
    run_on_ranks(lambda rank: run_in_turn(train_main, runs.values(), ports), world=2, group=False,
                 timeout_s=600)

    single = final_state(tmp_path / "single")
    log1 = [json.loads(x)["loss"] for x in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    ddp = {m: json.loads((tmp_path / m / "config.json").read_text())["step"]["ddp"]
           for m in ("ddp", "ddp_accum")}
    assert ddp["ddp"] == {"bucket_cap_mb": 0.01, "static_graph": True, "gradient_as_bucket_view": True}
    assert ddp["ddp_accum"]["static_graph"] is False
    for mode in runs:
        other = final_state(tmp_path / mode)
        for k in single:
            torch.testing.assert_close(other[k], single[k], atol=5e-5, rtol=1e-4, msg=f"{mode}: {k}")
        log2 = [json.loads(x)["loss"] for x in (tmp_path / mode / "log.jsonl").read_text().splitlines()]
        torch.testing.assert_close(torch.tensor(log2), torch.tensor(log1), atol=1e-5, rtol=1e-5, msg=mode)
