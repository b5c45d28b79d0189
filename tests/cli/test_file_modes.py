"""Files we write follow the umask (issue 28, item 5): every file of a run, the safetensors ones included
(safetensors creates its files 0600 whatever the umask), gets ``0666 & ~umask``, as ``open()`` gives."""

from __future__ import annotations

import os

import pytest
from _stage2_runs import make_demo, stage2_args

from llm2clip_fast.atomic_files import default_file_mode, write_path_atomic
from llm2clip_fast.train.__main__ import main as train_main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("file_modes"))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_file_a_run_writes_follows_the_umask(demo, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert default_file_mode() == 0o666 & ~umask
        assert train_main(stage2_args(demo, tmp_path / "run", "--save-every", "1", steps=2)) == 0
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777
             for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert "run/model/model.safetensors" in modes
    assert "run/checkpoints/step_00000002/model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != expected} == {}


def test_a_writer_that_chmods_its_file_is_brought_back_to_the_umask(tmp_path):
    def private_writer(path):
        with open(path, "wb") as f:
            f.write(b"x")
        os.chmod(path, 0o600)  # what safetensors' save_file does

    old = os.umask(0o022)
    try:
        write_path_atomic(tmp_path / "f.bin", private_writer)
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
