"""Damaged or impossible inputs and unwritable outputs end in one line and a documented exit code, never a
traceback (issue 29, item 3):

- a tar shard whose PAX extended header claims 2**40 bytes (tarfile read it into memory: MemoryError) is
  a damaged shard, counted as bad data, local or streamed;
- a truncated ``model.safetensors`` (SafetensorError) in ``eval --model``, ``stage2 --init-model`` and
  ``convert``: exit 5 naming the file;
- an ``--out`` that cannot be written (PermissionError): exit 3 naming it, and ``eval`` finds out before
  it computes anything;
- a Karpathy split file whose ``sentences`` is not a list: exit 2 naming the record.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from _stage2_runs import make_demo, stage2_args
from _tiny_llm2clip import tiny_clip_tower_model
from PIL import Image

from llm2clip_fast.convert.__main__ import cli as convert_cli
from llm2clip_fast.data import BadDataError, build_loader, open_source
from llm2clip_fast.train import eval as eval_module
from llm2clip_fast.train.__main__ import cli
from llm2clip_fast.writable_output import check_writable


@pytest.fixture(autouse=True)
def _plain_errors(monkeypatch):
    monkeypatch.delenv("LLM2CLIP_DEBUG", raising=False)


def _one_line(err: str, prefix: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------- a PAX header of 2**40


def _png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (40 * i % 256, 90, 20)).save(out, "PNG")
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _shard(path: Path, keys: range, *, huge_pax_header_after: int | None = None) -> None:
    """A WebDataset shard of ``keys``; with ``huge_pax_header_after=n``, a PAX extended header whose size
    field claims 2**40 bytes follows the first n samples."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n, i in enumerate(keys):
            if n == huge_pax_header_after:
                break
            _add(tar, f"k{i:03d}.png", _png(i))
            _add(tar, f"k{i:03d}.json", json.dumps({"caption": f"picture {i}"}).encode())
    if huge_pax_header_after is None:
        return
    body = path.read_bytes()
    body = body[: body.rindex(bytes(1024))] if body.endswith(bytes(1024)) else body
    while body.endswith(bytes(512)):  # drop tarfile's closing blocks (and padding)
        body = body[:-512]
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size, pax.mtime = tarfile.XHDTYPE, 2**40, 0
    path.write_bytes(body + pax.tobuf(format=tarfile.GNU_FORMAT) + b"20 comment=broken1\n".ljust(512, b"\0")
                     + bytes(1024))


@pytest.fixture(scope="module")
def pax_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pax")
    _shard(folder / "d-000.tar", range(0, 4))
    _shard(folder / "d-001.tar", range(4, 8), huge_pax_header_after=2)
    return folder


@pytest.mark.parametrize("streaming", [False, True], ids=["local", "streamed"])
def test_a_pax_header_claiming_2_to_the_40_bytes_is_a_damaged_shard(pax_shards, streaming):
    spec = str(pax_shards / "d-{000..001}.tar")
    loader = build_loader(open_source(spec, streaming=streaming) if streaming else open_source(spec),
                          batch_size=2, image_size=8, num_workers=0, bad_data=1.0, shuffle=False)
    keys = sorted(k for batch in loader for k in batch["keys"])
    assert keys == [f"k{i:03d}" for i in range(6)]  # the samples before the damaged header are kept
    tracker = loader.bad_data
    assert tracker.lost == 2 and any("d-001.tar" in n for n in tracker.notes)  # its 2 unread samples
    if not streaming:  # the header scan read 2**40 bytes into memory: MemoryError before
        assert any("claims more bytes than can be read" in n for n in tracker.notes)
    with pytest.raises(BadDataError):  # under the default 1% rule: the one-line bad-data error (exit 7)
        list(build_loader(open_source(spec, streaming=streaming) if streaming else open_source(spec),
                          batch_size=2, image_size=8, num_workers=0))


# ------------------------------------------------------------------------------ truncated safetensors


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("one_line"))


@pytest.fixture
def truncated_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    tiny_clip_tower_model().save_pretrained(folder)
    _truncate(folder / "model.safetensors")
    return folder


def test_eval_of_a_truncated_model_is_one_line(truncated_model, demo, capsys):
    assert cli(["eval", "--model", str(truncated_model), "--data", str(demo["data"])]) == 5
    line = _one_line(capsys.readouterr().err, "llm2clip_fast.train eval: error:")
    assert f"{truncated_model / 'model.safetensors'} cannot be read as safetensors" in line
    assert "it is truncated" in line


def test_stage2_init_model_from_a_truncated_model_is_one_line(demo, tmp_path, capsys):
    first = tmp_path / "first"
    assert cli(stage2_args(demo, first, steps=1)) == 0
    _truncate(first / "model" / "model.safetensors")
    capsys.readouterr()
    argv = stage2_args(demo, tmp_path / "second", "--init-model", str(first / "model"), steps=1)
    i = argv.index("--vision-preset")
    del argv[i:i + 2]  # the model brings its tower
    assert cli(argv) == 5
    line = _one_line(capsys.readouterr().err, "llm2clip_fast.train stage2: error:")
    assert f"{first / 'model' / 'model.safetensors'} cannot be read as safetensors" in line


def test_convert_of_a_truncated_source_is_one_line(truncated_model, tmp_path, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = tmp_path / "tower"
    CLIPVisionModel(CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tower)
    _truncate(tower / "model.safetensors")
    assert convert_cli(["--from", "hf-clip", str(tower), "--out", str(tmp_path / "a"), "--llm-dim", "8",
                        "--embed-dim", "8"]) == 5
    assert f"{tower / 'model.safetensors'} cannot be read as safetensors" in _one_line(
        capsys.readouterr().err, "llm2clip_fast.convert: error:")
    # Our own model folder, exported: read through LLM2CLIPModel.from_pretrained.
    assert convert_cli(["--to", "open_clip", str(truncated_model), "--out",
                        str(tmp_path / "b" / "open_clip_model.safetensors")]) == 5
    line = _one_line(capsys.readouterr().err, "llm2clip_fast.convert: error:")
    assert "cannot be read as safetensors" in line


# ------------------------------------------------------------------------------------ unwritable --out


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder no file can be created in, whoever runs the tests (root writes through permissions:
    then sysfs, which refuses new files to everyone)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys")
    try:
        check_writable(folder, flag="probe", folder=True)
    except PermissionError:
        yield folder
        return
    pytest.skip("running as root without a folder that refuses new files (no /sys)")


def test_eval_checks_out_before_computing_anything(unwritable, demo, tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    tiny_clip_tower_model().save_pretrained(model)

    def computed(*args, **kwargs):
        raise AssertionError("eval computed before finding out that --out cannot be written")

    monkeypatch.setattr(eval_module, "evaluate_model_dir", computed)
    monkeypatch.setattr(eval_module, "run_suites", computed, raising=False)
    out = unwritable / "llm2clip_fast_results" / "r.json"
    assert cli(["eval", "--model", str(model), "--data", str(demo["data"]), "--out", str(out)]) == 3
    line = _one_line(capsys.readouterr().err, "llm2clip_fast.train eval: error:")
    assert f"--out {str(out)!r} cannot be written" in line
    assert cli(["eval", "--model", str(model), "--suite", "flickr30k", "--root", str(tmp_path),
                "--out", str(unwritable / "llm2clip_fast_suites")]) == 3
    assert "cannot be written" in _one_line(capsys.readouterr().err, "llm2clip_fast.train eval: error:")


def test_trainers_and_convert_name_an_unwritable_out(unwritable, demo, tmp_path, capsys):
    out = unwritable / "llm2clip_fast_run"
    assert cli(stage2_args(demo, out, steps=1)) == 3
    assert f"--out {str(out)!r} cannot be written" in _one_line(capsys.readouterr().err,
                                                                "llm2clip_fast.train stage2: error:")
    good = tmp_path / "good"
    tiny_clip_tower_model().save_pretrained(good)
    assert convert_cli(["--to", "open_clip", str(good), "--out",
                        str(unwritable / "x" / "open_clip_model.safetensors")]) == 3
    assert "cannot be written" in _one_line(capsys.readouterr().err, "llm2clip_fast.convert: error:")


# ------------------------------------------------------------------------ a malformed Karpathy split file


@pytest.mark.parametrize("sentences", ["a dog on a beach", [{"raw": 3}], ["a dog"]],
                         ids=["a string", "raw not a string", "not objects"])
def test_a_karpathy_file_with_bad_sentences_is_one_line(tmp_path, capsys, sentences):
    root = tmp_path / "flickr30k"
    (root / "flickr30k-images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "flickr30k-images" / "1.jpg")
    images = [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "a cat"}]},
              {"filename": "2.jpg", "split": "test", "sentences": sentences}]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    model = tmp_path / "model"
    tiny_clip_tower_model().save_pretrained(model)
    assert cli(["eval", "--model", str(model), "--suite", "flickr30k", "--root", str(root), "--no-cache",
                "--quiet", "--num-workers", "0"]) == 2
    line = _one_line(capsys.readouterr().err, "llm2clip_fast.train eval: error:")
    assert f"flickr30k: {root / 'dataset_flickr30k.json'}: images[1] is not a Karpathy image record" in line

