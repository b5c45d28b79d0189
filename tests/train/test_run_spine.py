"""The run spine shared by stage1, embed and stage2 (``llm2clip_fast.train.run_spine``): device
resolution, the autocast choice, the resume config check, the end of a run (plot notice, summary),
and that every sub-command writes its resolved config as ``config.json``."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch
from _stage2_runs import make_demo, stage2_args

from llm2clip_fast.train import run_spine
from llm2clip_fast.train.__main__ import main as train_main
from llm2clip_fast.train.checkpoint import CheckpointError
from llm2clip_fast.train.run_spine import (
    RunPlace,
    autocast_factory,
    check_resume_config,
    distributed_run,
    finish_run,
    plot_run_loss,
    resolve_device,
    start_or_resume,
)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA reported present with two devices (nothing here ever touches one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# ------------------------------------------------------------------------------------------ device


@pytest.mark.parametrize("spec", [None, "auto", "cpu", "CPU"])
def test_device_without_cuda_is_the_cpu(no_cuda, spec):
    assert resolve_device(spec) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_asked_for_without_cuda_is_a_clear_error(no_cuda, spec):
    with pytest.raises(ValueError, match=rf"--device {spec} asked for, but no CUDA device is available"):
        resolve_device(spec)


# ("gpu" itself would be taken for the gpu marker by conftest's skip rule.)
@pytest.mark.parametrize("spec", ["tpu", "cpu:1", "cuda:x", "auto:0", "", "cuda:-1"])
def test_a_device_that_is_not_one_of_the_forms_names_them(spec):
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_flag_name_appears_in_errors(no_cuda):
    with pytest.raises(ValueError, match="--eval-device cuda asked for"):
        resolve_device("cuda", flag="--eval-device")


def test_auto_and_bare_cuda_take_this_ranks_gpu_under_torchrun(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device(None) == torch.device("cuda", 0)


def test_a_gpu_index_beyond_the_visible_ones_is_an_error(two_gpus):
    with pytest.raises(ValueError, match=r"GPU 2 asked for, but 2 CUDA device\(s\) are visible"):
        resolve_device("cuda:2")


def test_single_process_run_place_and_no_process_group(no_cuda):
    with distributed_run("auto") as place:
        assert place == RunPlace(torch.device("cpu"), 0, 1) and place.main
        assert not torch.distributed.is_initialized()


def test_bad_device_fails_before_any_process_group(monkeypatch):
    called = []
    monkeypatch.setattr(run_spine.distributed, "init_distributed_from_env", lambda **kw: called.append(kw))
    with pytest.raises(ValueError, match="--device must be"):
        with distributed_run("tpu"):
            pass
    assert not called


def test_cpu_run_starts_a_gloo_group(no_cuda, monkeypatch):
    seen = []
    monkeypatch.setattr(run_spine.distributed, "init_distributed_from_env",
                        lambda backend, timeout_s: seen.append((backend, timeout_s)))
    with distributed_run("cpu", timeout_s=42.0):
        pass
    assert seen == [("gloo", 42.0)]  # NCCL exchanges CUDA tensors only; --dist-timeout is the group's


# ----------------------------------------------------------------------------------------- autocast


def _autocast_on(factory, device_type: str) -> bool:
    with factory():
        return torch.is_autocast_enabled(device_type)


@pytest.mark.parametrize(("precision", "device", "bf16"), [
    ("auto", "cpu", False),    # plain fp32 on the CPU
    ("fp32", "cpu", False),
    ("bf16", "cpu", True),     # asked for: bf16 autocast on any device
    ("fp32", "cuda", False),   # --no-bf16-autocast / --precision fp32 on a GPU
])
def test_autocast_choice(precision, device, bf16):
    factory = autocast_factory(precision, torch.device(device))
    assert (factory is not contextlib.nullcontext) == bf16
    if device == "cpu":
        assert _autocast_on(factory, "cpu") == bf16


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # only the choice is checked here
def test_auto_on_cuda_is_bf16_autocast_on_cuda():
    factory = autocast_factory("auto", torch.device("cuda", 0))
    context = factory()
    assert isinstance(context, torch.autocast)
    assert context.device == "cuda" and context.fast_dtype == torch.bfloat16
    assert factory() is not context  # each forward enters a fresh context


def test_autocast_bf16_casts_cpu_matmuls():
    a = torch.randn(3, 5)
    with autocast_factory("bf16", torch.device("cpu"))():
        assert (a @ a.t()).dtype == torch.bfloat16
    with autocast_factory("auto", torch.device("cpu"))():
        assert (a @ a.t()).dtype == torch.float32


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, got 'fp16'"):
        autocast_factory("fp16", torch.device("cpu"))


# ---------------------------------------------------------------------------------- resume config


def test_resume_config_names_every_differing_option_with_both_values():
    saved = {"batch_size": 8, "lr": 1e-3, "seed": 0, "crop_scale": [0.9, 1.0], "log_every": 10}
    current = {"batch_size": 4, "lr": 1e-3, "seed": 1, "crop_scale": (0.9, 1.0), "log_every": 1}
    with pytest.raises(ValueError) as e:
        check_resume_config(saved, current, ("batch_size", "lr", "seed", "crop_scale"),
                            checkpoint="ck/step_4")
    message = str(e.value)
    assert message.startswith("--resume from ck/step_4: these options differ from the interrupted run")
    assert "batch_size: 8 in the checkpoint, 4 now" in message
    assert "seed: 0 in the checkpoint, 1 now" in message
    assert "lr" not in message.split("exactly:")[1]  # equal
    assert "crop_scale" not in message  # a tuple equals the list JSON made of it
    assert "log_every" not in message  # not a must-match option


def test_resume_config_skips_options_the_checkpoint_predates():
    check_resume_config({"batch_size": 8}, {"batch_size": 8, "keep_projection": True},
                        ("batch_size", "keep_projection"), checkpoint="ck")


def test_resume_config_agreeing_passes():
    config = {"batch_size": 8, "caption_mix": {"long": 1.0}}
    check_resume_config(json.loads(json.dumps(config)), config, tuple(config), checkpoint="ck")


def test_fresh_start_and_resume_without_a_checkpoint(tmp_path):
    start = start_or_resume(tmp_path, resume=False, config={}, must_match=(), say=print)
    assert not start.resumed and start.step == start.epoch == start.batch_index == 0
    assert start.log_from is None and len(start.run_id) == 32
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        start_or_resume(tmp_path, resume=True, config={}, must_match=(), say=print)


@pytest.mark.parametrize(("switch", "meant"), [(False, "fp32"), (True, "auto")])
def test_stage1_checkpoint_before_precision_is_compared_by_what_its_switch_meant(tmp_path, switch, meant):
    """A stage-1 checkpoint saved with --bf16-autocast/--no-bf16-autocast (no precision key) resumes in
    the precision it meant and is refused in another one, instead of the check skipping the key."""
    from llm2clip_fast.train.checkpoint import save_checkpoint
    from llm2clip_fast.train.stage1 import _RESUME_MUST_MATCH, upgrade_saved_config

    save_checkpoint(tmp_path, step=2, epoch=0, batch_index=2, model_state={"w": torch.zeros(2)},
                    config={"bf16_autocast": switch, "lr": 1e-4}, run_id="r" * 32)
    other = "auto" if meant == "fp32" else "fp32"
    start = start_or_resume(tmp_path, resume=True, config={"precision": meant, "lr": 1e-4},
                            must_match=_RESUME_MUST_MATCH, say=print, upgrade_saved=upgrade_saved_config)
    assert start.resumed and start.step == 2
    with pytest.raises(ValueError, match=f"precision: '{meant}' in the checkpoint, '{other}' now"):
        start_or_resume(tmp_path, resume=True, config={"precision": other, "lr": 1e-4},
                        must_match=_RESUME_MUST_MATCH, say=print, upgrade_saved=upgrade_saved_config)


# ---------------------------------------------------------------------------------------- the end


def test_nothing_to_plot_is_a_logged_notice_and_the_summary_is_still_written(tmp_path):
    (tmp_path / "log.jsonl").write_text("")  # a resumed run that was already complete logs no step
    said: list[str] = []
    finish_run(tmp_path, plot_title="t", summary={"steps": 3}, say=said.append, final_lines=["done", "bye"])
    assert not (tmp_path / "loss.png").exists()
    assert said[0].startswith("no loss.png:") and "holds no loss to draw" in said[0]
    assert said[1:] == ["done", "bye"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 3}


def test_a_logged_loss_is_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.1}) + "\n"
                                                for s in (1, 2, 3)))
    said: list[str] = []
    assert plot_run_loss(tmp_path, title="t", say=said.append) == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG" and not said


def test_missing_matplotlib_skips_the_plot_with_a_warning(tmp_path, monkeypatch, caplog):
    import builtins

    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with caplog.at_level(logging.WARNING):
        finish_run(tmp_path, plot_title="t", summary={"steps": 1}, say=lambda m: None)
    assert "matplotlib is not installed: no loss.png" in caplog.text
    assert (tmp_path / "summary.json").is_file() and not (tmp_path / "loss.png").exists()


# ------------------------------------------------------------------------ config.json of every command


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("spine"))


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def test_stage2_writes_config_json(demo, tmp_path):
    assert train_main(stage2_args(demo, tmp_path / "s2", steps=1)) == 0
    config = _config(tmp_path / "s2")
    assert config["batch_size"] == 8 and config["world_size"] == 1 and config["total_steps"] == 1
    assert config["model"]["embed_dim"] == 16 and config["crop_scale"] == [0.9, 1.0]
    assert "command" not in config and "recipe_origin" not in config


@pytest.mark.slow
def test_stage1_and_embed_write_config_json(demo, tmp_path):
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path

    llm = str(packaged_minilm_path())
    assert train_main(["stage1", "--llm", llm, "--data", str(demo["data"]), "--out", str(tmp_path / "s1"),
                       "--batch-size", "4", "--steps", "1", "--eval-fraction", "0", "--quiet",
                       "--max-length", "16", "--lora-r", "2"]) == 0
    config = _config(tmp_path / "s1")
    assert config["lora_r"] == 2 and config["total_steps"] == 1 and config["world_size"] == 1
    assert config["lora_targets_resolved"]
    summary = json.loads((tmp_path / "s1" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["merged"] == str(tmp_path / "s1" / "merged")

    out = tmp_path / "cache"
    assert train_main(["embed", "--llm", llm, "--data", str(demo["data"]), "--out", str(out),
                       "--dtype", "fp32", "--batch-size", "16", "--max-length", "16", "--quiet"]) == 0
    config = _config(out)
    assert config["device"] == "cpu" and config["world_size"] == 1 and config["batch_size"] == 16
    assert config["max_length"] == 16 and config["pooling"] == "mean" and config["model_dtype"] == "fp32"
    assert config["captions"] == ["short", "long"] and config["dtype"] == "float32"
    from llm2clip_fast.data.embedding_cache import EmbeddingCache

    assert len(EmbeddingCache.open(out)) > 0  # the extra file does not disturb the cache reader


@pytest.mark.parametrize(("command", "meaning"), [
    ("stage1", r"caption pairs per micro-batch over all ranks"),
    ("embed", r"captions per forward pass of the LLM, on each rank \(an encode batch"),
    ("stage2", r"images per rank per micro-batch"),
])
def test_help_says_what_batch_size_means_and_its_default(command, meaning, capsys):
    import re

    from llm2clip_fast.train.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    entry = text[text.rindex("--batch-size BATCH_SIZE "):].split(" --")[0]  # its help, not the usage
    assert re.match(rf"--batch-size BATCH_SIZE {meaning}", entry)
    assert re.search(r"\(default: \d+\)$", entry)
