"""Checkpoints carry SHA-256 checksums written at save and verified at resume: a damaged file is named,
a damaged newest checkpoint is reported and the previous complete one used, and ``--resume`` with no
usable checkpoint is an error (never a silent fresh start)."""

from __future__ import annotations

import json

import pytest
import torch
from _stage2_runs import logged_losses, make_demo, stage2_args

from llm2clip_fast.train import checkpoint as ckpt
from llm2clip_fast.train.__main__ import main as train_main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("checkpoint_integrity"))


def _save(run, step):
    return ckpt.save_checkpoint(run, step=step, epoch=0, batch_index=step,
                                model_state={"w": torch.arange(64, dtype=torch.float32) * step},
                                extra={"note": step}, keep_last=None)


def _flip_a_bit(path, offset_from_end=3):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.safetensors", "trainer_state.json"])
def test_flipped_bit_is_caught_and_named(tmp_path, name):
    path = _save(tmp_path, 1)
    _flip_a_bit(path / name)
    with pytest.raises(ckpt.CheckpointError, match=rf"{path / name}.*SHA-256"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.safetensors"])
def test_truncated_file_gives_an_error_naming_it(tmp_path, name):
    path = _save(tmp_path, 1)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=str(path / name)):
        ckpt.load_checkpoint(path)
    # Without recorded checksums (an older checkpoint: format 1, no SHA256SUMS) the reader still names it.
    meta = json.loads((path / "meta.json").read_text())
    del meta["sha256"]
    meta["format_version"] = 1
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "SHA256SUMS").unlink()
    with pytest.raises(ckpt.CheckpointError, match=str(path / name)):
        ckpt.load_checkpoint(path)


def test_damaged_newest_falls_back_to_previous_and_says_so(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    newest = _save(tmp_path, 3)
    _flip_a_bit(newest / "model.safetensors")
    said: list[str] = []
    loaded = ckpt.load_latest_usable(tmp_path, said.append)
    assert loaded.step == 2 and loaded.extra == {"note": 2}
    assert str(newest) in said[0] and "damaged" in said[0]
    assert "step_00000002" in said[-1] and "1 newer one(s) damaged" in said[-1]


def test_no_usable_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.load_latest_usable(tmp_path, print)
    for step in (1, 2):
        (_save(tmp_path, step) / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint.*step_00000002.*step_00000001"):
        ckpt.load_latest_usable(tmp_path, print)


def test_stage2_resume_uses_the_previous_checkpoint_when_the_newest_is_damaged(demo, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(stage2_args(demo, out, "--save-every", "2", "--keep-checkpoints", "3", steps=6)) == 0
    reference = logged_losses(out)
    _flip_a_bit(out / "checkpoints" / "step_00000006" / "model.safetensors")
    (out / "model").rename(tmp_path / "model-before")  # as if killed before the final model was written
    capsys.readouterr()
    assert train_main(stage2_args(demo, out, "--save-every", "2", "--keep-checkpoints", "3",
                                  "--resume", steps=6)) == 0
    said = capsys.readouterr().err  # status lines are logged to stderr
    assert f"checkpoint {out / 'checkpoints' / 'step_00000006'} is damaged" in said
    assert f"resuming from {out / 'checkpoints' / 'step_00000004'}" in said
    assert logged_losses(out) == reference  # steps 5 and 6 redone, identically


def test_stage2_resume_without_usable_checkpoint_fails_and_keeps_the_log(demo, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        train_main(stage2_args(demo, tmp_path / "nothing", "--resume", steps=2))
    out = tmp_path / "run"
    assert train_main(stage2_args(demo, out, "--save-every", "1", steps=2)) == 0
    log = (out / "log.jsonl").read_bytes()
    for p in (out / "checkpoints").iterdir():
        (p / "meta.json").write_text("")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        train_main(stage2_args(demo, out, "--save-every", "1", "--resume", steps=2))
    assert (out / "log.jsonl").read_bytes() == log


# ------------------------------------------------------------- meta.json is covered too (issue 28, item 4)


def test_every_file_including_meta_json_is_listed_in_sha256sums(tmp_path):
    import hashlib

    path = _save(tmp_path, 1)
    lines = (path / "SHA256SUMS").read_text().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    assert sorted(listed) == sorted(p.name for p in path.iterdir() if p.name != "SHA256SUMS")
    assert "meta.json" in listed
    for name, digest in listed.items():  # the sha256sum format: `sha256sum -c SHA256SUMS` checks it
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest


def test_a_flipped_digit_of_meta_json_is_caught(tmp_path):
    path = _save(tmp_path, 1)
    text = (path / "meta.json").read_text()
    assert '"step": 1,' in text
    (path / "meta.json").write_text(text.replace('"step": 1,', '"step": 7,'))
    with pytest.raises(ckpt.CheckpointError, match=rf"{path / 'meta.json'} is damaged.*SHA256SUMS"):
        ckpt.load_checkpoint(path)


def test_a_missing_or_damaged_sha256sums_is_caught(tmp_path):
    path = _save(tmp_path, 1)
    sums = (path / "SHA256SUMS").read_text()
    (path / "SHA256SUMS").write_text(sums.replace("  meta.json\n", "  meta.jsonx\n"))
    with pytest.raises(ckpt.CheckpointError, match=r"does not list meta\.json"):
        ckpt.load_checkpoint(path)
    (path / "SHA256SUMS").write_text("not a checksum line\n")
    with pytest.raises(ckpt.CheckpointError, match="line 1 is not"):
        ckpt.load_checkpoint(path)
    (path / "SHA256SUMS").unlink()
    with pytest.raises(ckpt.CheckpointError, match="SHA256SUMS is missing"):
        ckpt.load_checkpoint(path)


def test_a_checkpoint_from_before_sha256sums_loads_with_a_warning_naming_meta_json(tmp_path, caplog):
    path = _save(tmp_path, 3)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 1
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "SHA256SUMS").unlink()
    with caplog.at_level("WARNING"):
        loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 3
    assert f"checkpoint {path} was written before checkpoints carried SHA256SUMS: meta.json cannot be " \
           "verified" in caplog.text
    # Older still (no sums at all): every file is named.
    del meta["sha256"]
    (path / "meta.json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level("WARNING"):
        ckpt.load_checkpoint(path)
    every_file = "meta.json, model.safetensors, trainer_state.safetensors, trainer_state.json cannot be"
    assert every_file in caplog.text


def test_stage2_resume_refuses_a_checkpoint_whose_step_was_changed(demo, tmp_path):
    out = tmp_path / "run"
    assert train_main(stage2_args(demo, out, "--save-every", "2", "--keep-checkpoints", "1", steps=4)) == 0
    meta_path = out / "checkpoints" / "step_00000004" / "meta.json"
    meta_path.write_text(meta_path.read_text().replace('"step": 4,', '"step": 1,'))
    (out / "model").rename(tmp_path / "model-before")
    with pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint.*meta.json is damaged"):
        train_main(stage2_args(demo, out, "--save-every", "2", "--keep-checkpoints", "1", "--resume",
                               steps=4))
