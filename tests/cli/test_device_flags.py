"""--device and --precision: one spelling and meaning across the sub-commands; stage1's old
--bf16-autocast / --no-bf16-autocast switches as hidden aliases of --precision; --help shows defaults."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from llm2clip_fast.train.__main__ import (
    SUBCOMMANDS,
    _DefaultsHelpFormatter,
    add_subcommand_options,
    parse_args,
)
from llm2clip_fast.train.cli.device_flags import DEVICE_HELP, PRECISION_HELP

REQUIRED = {
    "stage1": ["--llm", "m", "--data", "d", "--out", "o"],
    "embed": ["--llm", "m", "--data", "d", "--out", "o"],
    "stage2": ["--data", "d", "--out", "o"],
    "eval": ["--model", "m"],
    "pipeline": [],
}


def _stage1(*extra: str) -> argparse.Namespace:
    return parse_args(["stage1", *REQUIRED["stage1"], *extra])


@pytest.mark.parametrize("command", ["stage1", "embed", "stage2", "eval"])
def test_device_is_one_flag_with_one_meaning(command, capsys):
    assert parse_args([command, *REQUIRED[command]]).device == "auto"
    assert parse_args([command, *REQUIRED[command], "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        parse_args([command, "--help"])
    assert " ".join(DEVICE_HELP.split()) in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["stage1", "stage2"])
def test_precision_is_one_flag_with_one_meaning(command, capsys):
    assert parse_args([command, *REQUIRED[command]]).precision == "auto"
    assert parse_args([command, *REQUIRED[command], "--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parse_args([command, *REQUIRED[command], "--precision", "fp16"])  # not an autocast choice
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args([command, "--help"])
    assert " ".join(PRECISION_HELP.split()) in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("argv", "precision"), [
    ([], "auto"),
    (["--bf16-autocast"], "auto"),
    (["--no-bf16-autocast"], "fp32"),
    (["--precision", "bf16", "--no-bf16-autocast"], "fp32"),  # the last one given wins, as for any flag
    (["--no-bf16-autocast", "--precision", "bf16"], "bf16"),
])
def test_old_autocast_switches_are_spellings_of_precision(argv, precision):
    assert _stage1(*argv).precision == precision


def test_old_autocast_switches_are_hidden_and_not_in_the_config(capsys):
    args = _stage1("--no-bf16-autocast")
    assert not hasattr(args, "bf16_autocast")
    from llm2clip_fast.train.stage1 import stage1_config

    config = stage1_config(args)
    assert config["precision"] == "fp32" and config["device"] == "auto" and "bf16_autocast" not in config
    with pytest.raises(SystemExit):
        parse_args(["stage1", "--help"])
    assert "bf16-autocast" not in capsys.readouterr().out


@pytest.mark.parametrize(("content", "precision"), [
    ("bf16_autocast: false\n", "fp32"),
    ("bf16-autocast: true\n", "auto"),
    ("precision: bf16\n", "bf16"),
    ("precision: bf16\nbf16_autocast: false\n", "fp32"),
])
def test_config_files_with_the_old_key_still_work(tmp_path, content, precision):
    pytest.importorskip("yaml")
    cfg = tmp_path / "s1.yaml"
    cfg.write_text(content)
    assert _stage1("--config", str(cfg)).precision == precision


def test_an_unknown_config_key_lists_only_the_current_flags(tmp_path):
    from llm2clip_fast.train.cli.config_file import ConfigFileError

    cfg = tmp_path / "s1.json"
    cfg.write_text(json.dumps({"autocast": True}))
    with pytest.raises(ConfigFileError, match="'autocast' is not a flag") as info:
        _stage1("--config", str(cfg))
    flags = str(info.value).split("its flags: ")[1].split(", ")
    assert "precision" in flags and "device" in flags
    assert not {"bf16-autocast", "no-bf16-autocast"} & set(flags)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A one-layer Llama and a text-only manifest of 16 (short, long) caption pairs."""
    from llm2clip_fast.models.tiny_llm import build_tiny_llm

    root = tmp_path_factory.mktemp("s1dev")
    llm = build_tiny_llm(root / "llama", "llama", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2)
    colours = ["red", "green", "blue", "pink", "grey", "black", "white", "brown"] * 2
    rows = [{"key": f"k{i}", "short": f"a {c} square", "long": f"a photo of a {c} square, number {i}"}
            for i, c in enumerate(colours)]
    data = root / "captions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return llm, data


def test_stage1_runs_where_device_and_precision_say(tiny_text, tmp_path, monkeypatch):
    from llm2clip_fast.train import stage1

    llm, data = tiny_text
    seen: list[tuple[str | None, str]] = []
    real_run, real_factory = stage1.distributed_run, stage1.autocast_factory

    def spy_run(spec, **kwargs):
        seen.append(("device", spec))
        return real_run(spec, **kwargs)

    def spy_factory(precision, device):
        seen.append((precision, str(device)))
        return real_factory(precision, device)

    monkeypatch.setattr(stage1, "distributed_run", spy_run)
    monkeypatch.setattr(stage1, "autocast_factory", spy_factory)
    common = ["--llm", str(llm), "--data", str(data), "--batch-size", "4", "--steps", "1", "--eval-fraction",
              "0", "--quiet", "--max-length", "24", "--lora-r", "2"]
    out = tmp_path / "fp32"
    stage1.train_stage1(parse_args(["stage1", *common, "--out", str(out), "--device", "cpu",
                                    "--precision", "fp32"]))
    assert seen == [("device", "cpu"), ("fp32", "cpu")]
    config = json.loads((out / "config.json").read_text())
    assert (config["device"], config["precision"]) == ("cpu", "fp32") and "bf16_autocast" not in config
    seen.clear()
    stage1.train_stage1(parse_args(["stage1", *common, "--out", str(tmp_path / "old"), "--device", "cpu",
                                    "--no-bf16-autocast"]))
    assert seen == [("device", "cpu"), ("fp32", "cpu")]  # the old switch resolves as --precision fp32


def test_stage1_device_cuda_without_cuda_is_a_clear_error_before_loading(tmp_path, monkeypatch):
    from llm2clip_fast.train import stage1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = parse_args(["stage1", "--llm", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"),
                       "--out", str(tmp_path / "o"), "--device", "cuda"])
    with pytest.raises(ValueError, match=r"--device cuda asked for, but no CUDA device is available"):
        stage1.train_stage1(args)
    args.device = "gpu"
    with pytest.raises(ValueError, match=r"--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        stage1.train_stage1(args)


def _help_entry(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_help_shows_every_default(command):
    parser = argparse.ArgumentParser(formatter_class=_DefaultsHelpFormatter)
    add_subcommand_options(parser, command)
    checked = 0
    for action in parser._actions:
        if action.help is argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            continue
        entry = _help_entry(parser, action)
        if any(action.default is v for v in (None, False)):
            continue  # unset, or a switch that is off: nothing to show
        assert "default" in entry.lower(), f"{command} {action.option_strings[0]}: no default in {entry!r}"
        checked += 1
    assert checked >= 2  # the test saw options with defaults (pipeline has the fewest: --seed, --caption)


def test_zero_defaults_are_shown_too(capsys):
    with pytest.raises(SystemExit):
        parse_args(["stage1", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED default: 0" in text and "--weight-decay WEIGHT_DECAY default: 0.0" in text
    assert "--lora-r LORA_R default: 16" in text  # an option without help text gets its default line


def test_eval_uses_the_trainers_spellings_and_keeps_its_old_ones(tmp_path, capsys):
    args = parse_args(["eval", "--model", "m", "--num-workers", "2", "--quiet"])
    assert (args.workers, args.no_progress) == (2, True)
    old = parse_args(["eval", "--model", "m", "--workers", "3", "--no-progress"])
    assert (old.workers, old.no_progress) == (3, True)
    defaults = parse_args(["eval", "--model", "m"])
    assert (defaults.workers, defaults.no_progress) == (4, False)
    cfg = tmp_path / "e.json"
    cfg.write_text(json.dumps({"workers": 1, "no_progress": True}))  # keys by dest keep working
    from_file = parse_args(["eval", "--model", "m", "--config", str(cfg)])
    assert (from_file.workers, from_file.no_progress) == (1, True)
    with pytest.raises(SystemExit):
        parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--num-workers" in text and "--quiet" in text
    assert "--workers" not in text and "--no-progress" not in text
